"""`StableDiffusionXLVideoPipeline`: one chunk of video from a prompt, and the checkpoint folder.

A checkpoint folder (what `convert_weights.py` and `train.py` write, what `sample.py` loads):

    config.json          {"format": ..., "unet": UNetConfig, "vae": VAEConfig,
                          "scheduler": SchedulerConfig, "provenance": {...},
                          "sample_defaults": {...}}
    unet.safetensors     the UNet, spatial and temporal weights
    vae.safetensors      the VAE
    text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/   transformers' layout

One call of the pipeline denoises one chunk of `num_frames` latents, conditioned on the clean
latents of the frames before it (`previous_latents`, the context). Endless generation
(`sample.py`) calls it chunk after chunk with the prompt encoded once.
"""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model import UNet, UNetConfig
from scheduler import DPMSolverMultistepScheduler, SchedulerConfig
from text import PromptEmbeddings, TextEncoder
from vae import AutoencoderKL, VAEConfig

CHECKPOINT_FORMAT = "sdxl-video-checkpoint/1"
OUTPUT_TYPES = ("latent", "pt", "np", "pil")


def randn(shape, generator, device, dtype) -> torch.Tensor:
    """Normal noise of `shape` drawn in float32 on the generator's device, then moved and cast.

    `generator` is one torch.Generator, or a list of one per batch item (so that item i of a batch
    gets the numbers a run of item i alone would get).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator must be one torch.Generator or a list of {shape[0]}, got {len(generator)}")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device, dtype)


def load_checkpoint_config(folder) -> dict:
    """config.json of a checkpoint folder, checked to be one; ValueError naming the folder otherwise."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} is not a checkpoint folder: it has no config.json (make one with convert_weights.py)")
    config = json.loads(path.read_text())
    if config.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has format {config.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    return config


def load_module(module_class, config, weights_path, device, dtype):
    """Build on the meta device, then take the stored tensors as they are (strict: every key)."""
    with torch.device("meta"):
        module = module_class(config)
    module.load_state_dict(load_file(weights_path, device=str(device or "cpu")), strict=True, assign=True)
    return module.to(dtype=dtype).eval() if dtype else module.eval()


class StableDiffusionXLVideoPipeline:
    """UNet + VAE + text encoders + DPM-Solver++ scheduler settings."""

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: TextEncoder, scheduler_config: SchedulerConfig):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.scheduler_config = scheduler_config
        self.vae_scale_factor = vae.config.downsample_factor

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None) -> "StableDiffusionXLVideoPipeline":
        """Load a checkpoint folder, keeping the stored dtype unless `dtype` is given."""
        folder = Path(folder)
        config = load_checkpoint_config(folder)
        unet = load_module(UNet, UNetConfig(**config["unet"]), folder / "unet.safetensors", device, dtype)
        vae = load_module(AutoencoderKL, VAEConfig(**config["vae"]), folder / "vae.safetensors", device, dtype)
        text_encoder = TextEncoder.from_pretrained(folder).to(device=device, dtype=dtype)
        pipeline = cls(unet, vae, text_encoder, SchedulerConfig.from_dict(config["scheduler"]))
        pipeline.provenance = config.get("provenance", {})
        return pipeline

    def save_pretrained(self, folder, provenance: dict | None = None, sample_defaults: dict | None = None) -> None:
        """Write the checkpoint folder (weights in their current dtype). config.json also keeps
        `provenance` (where each part came from) and `sample_defaults` (sample.py's defaults for
        this model: height, width, frames, context_frames, steps, guidance)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.unet.state_dict().items()}, folder / "unet.safetensors")
        save_file({k: v.contiguous() for k, v in self.vae.state_dict().items()}, folder / "vae.safetensors")
        self.text_encoder.save_pretrained(folder)
        config = {
            "format": CHECKPOINT_FORMAT,
            "unet": self.unet.config.to_dict(),
            "vae": asdict(self.vae.config),
            "scheduler": self.scheduler_config.to_dict(),
            "provenance": provenance or {},
            "sample_defaults": sample_defaults or {},
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    def to(self, device=None, dtype=None) -> "StableDiffusionXLVideoPipeline":
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    def encode_prompt(self, prompt, negative_prompt=None, do_classifier_free_guidance=True) -> PromptEmbeddings:
        """See `TextEncoder.encode_prompt`; the result is on the UNet's device and dtype."""
        embeddings = self.text_encoder.encode_prompt(prompt, negative_prompt, do_classifier_free_guidance)
        return PromptEmbeddings(*(None if e is None else e.to(self.device, self.dtype) for e in embeddings))

    def check_size(self, height: int, width: int) -> None:
        """ValueError unless the VAE and the UNet can take frames of height x width pixels."""
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < factor or value % factor:
                raise ValueError(f"{name} must be a positive multiple of {factor} (the VAE's downsampling), got {value!r}")

    def prepare_latents(self, batch_size, num_frames, height, width, generator, latents=None) -> torch.Tensor:
        """Starting noise (batch, in_channels, frames, height / 8, width / 8), scaled for the scheduler."""
        shape = (batch_size, self.unet.config.in_channels, num_frames, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is None:
            if generator is None:
                raise ValueError("generator is needed to draw the starting latents (never the global RNG)")
            return randn(shape, generator, self.device, self.dtype)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(self.device, self.dtype)

    def time_ids(self, batch_size: int, height: int, width: int) -> torch.Tensor:
        """SDXL micro-conditioning (original size, crop top-left, target size): (batch, 6)."""
        values = torch.tensor([height, width, 0, 0, height, width], dtype=self.dtype, device=self.device)
        return values.repeat(batch_size, 1)

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        negative_prompt=None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int = 4,
        num_inference_steps: int = 50,
        guidance_scale: float = 9.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        previous_latents: torch.Tensor | None = None,
        latent_image: torch.Tensor | None = None,
        conditioning_strength: float = 0.0,
        output_type: str = "pil",
        prompt_embeds: PromptEmbeddings | None = None,
        callback=None,
    ):
        """Generate one chunk of `num_frames` frames.

        prompt / negative_prompt: str or list of str (or `prompt_embeds` from `encode_prompt`,
        with negatives when guidance_scale > 1). latents: starting noise (batch, 4, frames, h, w).
        previous_latents: the context, clean latents (batch or 1, 4, context_frames, h, w).
        latent_image: scaled latents (batch or 1, 4, 1 or frames, h, w) to start from; with
        conditioning_strength s in [0, 1] the first round(s * steps) steps are skipped and the
        chunk starts from the image noised to that step (0 ignores it, 1 returns it).
        generator: a torch.Generator, or a list of one per batch item, for every random draw
        (starting noise, SDE noise); never the global RNG. callback(step, total): progress.
        Returns latents (batch, 4, frames, h, w) for output_type "latent"; a video in [0, 1]
        (batch, 3, frames, H, W) for "pt"; (batch, frames, H, W, 3) float for "np"; lists of PIL
        images for "pil".
        """
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        height = default_size if height is None else height
        width = default_size if width is None else width
        self.check_size(height, width)
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not 0.0 <= conditioning_strength <= 1.0:
            raise ValueError(f"conditioning_strength must be in [0, 1], got {conditioning_strength}")
        stochastic = self.scheduler_config.algorithm_type == "sde-dpmsolver++"
        if generator is None and (stochastic or latents is None):
            raise ValueError("generator is needed for the starting noise and the SDE noise (never the global RNG)")
        do_classifier_free_guidance = guidance_scale > 1.0

        # 1. Text: embeddings once per call (or given), then the guidance batch [negative, positive].
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("give prompt or prompt_embeds")
            prompt_embeds = self.encode_prompt(prompt, negative_prompt, do_classifier_free_guidance)
        if do_classifier_free_guidance and prompt_embeds.negative_prompt_embeds is None:
            raise ValueError("prompt_embeds has no negative embeddings, which guidance_scale > 1 needs")
        batch_size = prompt_embeds.prompt_embeds.shape[0]
        text, pooled = prompt_embeds.prompt_embeds, prompt_embeds.pooled_prompt_embeds
        if do_classifier_free_guidance:
            text = torch.cat([prompt_embeds.negative_prompt_embeds, text])  # (2b, tokens, dim)
            pooled = torch.cat([prompt_embeds.negative_pooled_prompt_embeds, pooled])  # (2b, pooled_dim)
        time_ids = self.time_ids(text.shape[0], height, width)

        # 2. Timesteps and starting latents.
        scheduler = DPMSolverMultistepScheduler(self.scheduler_config)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps
        latents = self.prepare_latents(batch_size, num_frames, height, width, generator, latents)
        if latent_image is not None and conditioning_strength > 0:
            skipped = round(conditioning_strength * num_inference_steps)
            start = latent_image.to(self.device, self.dtype).expand_as(latents)
            if skipped == num_inference_steps:
                timesteps, latents = timesteps[:0], start
            else:
                timesteps = timesteps[skipped:]
                latents = scheduler.add_noise(start, latents, timesteps[:1].expand(batch_size))
        else:
            latents = latents * scheduler.init_noise_sigma
        if previous_latents is not None:
            previous_latents = previous_latents.to(self.device, self.dtype)

        # 3. Denoising loop. What depends only on the text and the context is computed at the first
        # step and kept in `cache` for the others.
        cache = {}
        for index, timestep in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
            model_input = scheduler.scale_model_input(model_input, timestep)
            noise_pred = self.unet(model_input, timestep, text, pooled, time_ids, previous_latents, cache=cache)
            if do_classifier_free_guidance:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            noise = randn(latents.shape, generator, self.device, torch.float32) if stochastic else None
            latents = scheduler.step(noise_pred, timestep, latents, noise=noise)
            if callback is not None:
                callback(index + 1, len(timesteps))

        if output_type == "latent":
            return latents
        video = (self.vae.decode_video(latents) / 2 + 0.5).clamp(0, 1).float()  # (b, 3, f, H, W)
        if output_type == "pt":
            return video
        frames = video.permute(0, 2, 3, 4, 1).cpu().numpy()  # (b, f, H, W, 3)
        if output_type == "np":
            return frames
        from PIL import Image  # comes with imageio

        return [[Image.fromarray(np.round(frame * 255).astype(np.uint8)) for frame in clip] for clip in frames]
