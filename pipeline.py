"""`StableDiffusionXLVideoPipeline`: one chunk of video from a prompt.

One call of the pipeline denoises one chunk of `num_frames` latents, conditioned on the clean
latents of the frames before it (`previous_latents`, the context). Endless generation
(`sample.py`) calls it chunk after chunk with the prompt encoded once. The checkpoint folder that
`from_pretrained` loads and `save_pretrained` writes is infra/checkpoint.py's.
"""

import numpy as np
import torch

from formats.lora import MergedLoras
from infra.checkpoint import DTYPES, load_checkpoint, save_checkpoint
from infra.offload import Offload
from model import UNet, micro_conditioning
from refiner import Refiner
from scheduler import (SAMPLERS, History, SchedulerConfig, add_noise, denoised_from, make_schedule, training_sigmas_of,
                       vp_coefficients, with_sampler)
from text import PromptEmbeddings, TextEncoder
from vae import AutoencoderKL

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


def vae_dtype_name(dtype: str, requested: str | None, force_upcast: bool) -> str:
    """The dtype the VAE runs in: `requested`, else the model's `dtype`, but float32 for float16
    when the VAE's config says it overflows in float16 (`force_upcast`, SDXL's): bfloat16 has
    float32's range, float16 does not."""
    if requested is not None:
        return requested
    return "fp32" if dtype == "fp16" and force_upcast else dtype


class StableDiffusionXLVideoPipeline:
    """UNet + VAE + text encoders + DPM-Solver++ scheduler settings, and the refiner (refiner.py)
    when the model has one (None otherwise)."""

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: TextEncoder, scheduler_config: SchedulerConfig,
                 refiner: Refiner | None = None):
        self.unet = unet
        self.refiner = refiner
        self.vae = vae
        self.text_encoder = text_encoder
        self.scheduler_config = scheduler_config
        self.vae_scale_factor = vae.config.downsample_factor
        self.offload: Offload | None = None  # see `enable_offload`
        self.vae_tiles: bool | None = None  # decode in tiles: None, above vae.TILES_ABOVE latent pixels
        self.vae_upcast: bool | None = None  # float16 VAE weights run in float32: None, as config.force_upcast
        self.loras: MergedLoras | None = None  # see `load_loras`

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None) -> "StableDiffusionXLVideoPipeline":
        """Load a checkpoint folder (`infra.checkpoint.load_checkpoint`), keeping the stored dtype
        unless `dtype` is given; ValueError naming the file for a missing or broken one."""
        checkpoint = load_checkpoint(folder, device, dtype)
        pipeline = cls(checkpoint.unet, checkpoint.vae, checkpoint.text_encoder, checkpoint.scheduler_config,
                       checkpoint.refiner)
        pipeline.provenance = checkpoint.provenance
        return pipeline

    def save_pretrained(self, folder, provenance: dict | None = None, sample_defaults: dict | None = None) -> None:
        """Write the checkpoint folder (`infra.checkpoint.save_checkpoint`: weights in their current
        dtype, config.json last); `provenance` says where each part came from, `sample_defaults` are
        sample.py's defaults for this model. An error while writing is an OSError naming the file."""
        save_checkpoint(folder, self.unet, self.vae, self.text_encoder, self.scheduler_config, provenance,
                        sample_defaults, self.refiner)

    def load_loras(self, paths: list[str], strengths: list[float] | None = None,
                   keep_originals: bool = True) -> MergedLoras:
        """Merge LoRA files into the UNet and text encoders at `strengths` (default 1 each), after
        checking them all; `self.loras.set_strengths(...)` changes them and `self.loras.remove()`
        restores the weights exactly (formats/lora.py)."""
        self.loras = MergedLoras.load(self, paths, strengths, keep_originals)
        return self.loras

    def to(self, device=None, dtype=None) -> "StableDiffusionXLVideoPipeline":
        for module in (self.unet, self.vae, self.text_encoder, self.refiner):
            if module is not None:
                module.to(device=device, dtype=dtype)
        return self

    def set_vae_dtype(self, name: str | None, dtype: str) -> str:
        """Cast the VAE to `vae_dtype_name(dtype, name, ...)` (names of DTYPE_NAMES) and return it.
        An explicit "fp16" runs in float16 (no upcast: a VAE fixed for float16)."""
        chosen = vae_dtype_name(dtype, name, self.vae.config.force_upcast)
        self.vae.to(dtype=DTYPES[chosen])
        self.vae_upcast = False if name == "fp16" else None
        return chosen

    def enable_offload(self, mode: str, device) -> None:
        """Keep the models on the CPU and move each to `device` only while it runs (infra/offload.py:
        "model" or "sequential"); `self.device` is then `device`."""
        self.offload = Offload(self, mode, device)

    @property
    def device(self) -> torch.device:
        """Where the models run: the UNet's device, or the offload's accelerator."""
        return self.offload.device if self.offload is not None else self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    def encode_prompt(self, prompt, negative_prompt=None, do_classifier_free_guidance=True) -> PromptEmbeddings:
        """See `TextEncoder.encode_prompt`; the result is on the UNet's device and dtype."""
        embeddings = self.text_encoder.encode_prompt(prompt, negative_prompt, do_classifier_free_guidance)
        return PromptEmbeddings(*(None if e is None else e.to(self.device, self.dtype) for e in embeddings))

    def encode_prompts(self, prompts: list[str], negative_prompt=None, do_classifier_free_guidance=True
                       ) -> list[PromptEmbeddings]:
        """`encode_prompt` of each of `prompts` (a timeline's, all of them first), on the device (where
        they are encoded again later in a run: a LoRA's new strength, a followed prompt; so that a
        resumed run gets the same numbers), then the text encoders leave the accelerator (to the CPU):
        the loop and the decode get their memory. With an offload, its hooks move them."""
        if self.offload is None:
            self.text_encoder.to(self.device)
        embeddings = [self.encode_prompt(prompt, negative_prompt, do_classifier_free_guidance) for prompt in prompts]
        if self.offload is None:
            self.text_encoder.to("cpu")
        return embeddings

    def decode_video(self, latents: torch.Tensor, frames_per_batch: int = 8) -> torch.Tensor:
        """`vae.decode_video` with the pipeline's tiling and upcast settings."""
        return self.vae.decode_video(latents, frames_per_batch=frames_per_batch, upcast=self.vae_upcast, tiles=self.vae_tiles)

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
        sampler: str | None = None,
        timestep_spacing: str | None = None,
        timesteps: list[int] | None = None,
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
        sampler: a name of scheduler.SAMPLERS to sample with in place of the scheduler config's.
        timestep_spacing: one of scheduler.TIMESTEP_SPACINGS in place of the sampler's own or the
        scheduler config's (`scheduler.with_sampler`). timesteps: the training timesteps to sample at,
        descending, in place of num_inference_steps and the spacing.
        Returns latents (batch, 4, frames, h, w) for output_type "latent"; a video in [0, 1]
        (batch, 3, frames, H, W) for "pt"; (batch, frames, H, W, 3) float for "np"; lists of PIL
        images for "pil".
        """
        # 0. Checks: a bad argument is a ValueError naming it, before any work.
        scheduler_config = with_sampler(self.scheduler_config, sampler, timestep_spacing)
        height, width = self.check_inputs(height, width, num_frames, output_type, conditioning_strength, generator,
                                          latents, scheduler_config)
        do_classifier_free_guidance = guidance_scale > 1.0
        # 1. Text: embeddings once per call (or given), as the guidance batch [negative, positive].
        batch_size, text, pooled = self.guidance_batch(prompt, negative_prompt, prompt_embeds,
                                                       do_classifier_free_guidance)
        time_ids = micro_conditioning(text.shape[0], height, width, dtype=self.dtype, device=self.device)
        # 2. Timesteps and starting latents: noise, or latent_image noised to the first kept step.
        steps = None if timesteps is not None else num_inference_steps
        timesteps, sigmas = make_schedule(scheduler_config, steps, timesteps)
        latents = self.prepare_latents(batch_size, num_frames, height, width, generator, latents)
        timesteps, sigmas, latents = self.starting_point(scheduler_config, timesteps.to(self.device), sigmas, latents,
                                                         latent_image, conditioning_strength)
        # 3. Denoising loop.
        latents = self.denoise(scheduler_config, timesteps, sigmas, latents, text, pooled, time_ids, previous_latents,
                               guidance_scale, generator, callback)
        # 4. Output.
        return self.decode_output(latents, output_type)

    def check_inputs(self, height, width, num_frames, output_type, conditioning_strength, generator, latents,
                     scheduler_config):
        """`__call__`'s phase 0: ValueError naming a bad argument; returns (height, width), the
        UNet's default size where None."""
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
        stochastic = SAMPLERS[scheduler_config.algorithm_type].stochastic
        if generator is None and (stochastic or latents is None):
            raise ValueError("generator is needed for the starting noise and the SDE noise (never the global RNG)")
        return height, width

    def guidance_batch(self, prompt, negative_prompt, prompt_embeds, do_classifier_free_guidance):
        """`__call__`'s phase 1: (batch_size, text (b or 2b, tokens, dim), pooled (b or 2b, pooled_dim)),
        the negatives first under guidance; the prompt is encoded unless `prompt_embeds` is given."""
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
        return batch_size, text, pooled

    def starting_point(self, scheduler_config, timesteps, sigmas, noise, latent_image, conditioning_strength):
        """`__call__`'s phase 2: (timesteps to run, their sigmas followed by the final one, starting
        latents), cut from make_schedule's (timesteps, sigmas). From `noise` (batch, 4, frames, h, w)
        over the whole schedule (the latents are variance preserving: the noise is the start); or, with a
        latent_image and conditioning_strength s > 0, from the image noised to the step after the
        first round(s * steps) (the image itself when every step is skipped)."""
        if latent_image is None or conditioning_strength == 0:
            return timesteps, sigmas, noise
        skipped = round(conditioning_strength * len(timesteps))
        start = latent_image.to(self.device, self.dtype).expand_as(noise)
        timesteps, sigmas = timesteps[skipped:], sigmas[skipped:]
        if len(timesteps) == 0:
            return timesteps, sigmas, start
        return timesteps, sigmas, add_noise(scheduler_config, start, noise, timesteps[:1].expand(noise.shape[0]))

    def denoise(self, scheduler_config, timesteps, sigmas, latents, text, pooled, time_ids, previous_latents,
                guidance_scale, generator, callback=None):
        """`__call__`'s phase 3: one UNet call (on the guidance batch) and one step of the scheduler
        config's sampler (scheduler.SAMPLERS) per timestep, from sigmas[i] to sigmas[i + 1]; returns
        the denoised latents. What depends only on the text and the context is computed at the first
        step and kept in `cache` for the others."""
        do_classifier_free_guidance = guidance_scale > 1.0
        step, stochastic = SAMPLERS[scheduler_config.algorithm_type]
        history = History(scheduler_config.solver_order, training_sigmas=training_sigmas_of(scheduler_config))
        run_timesteps = timesteps.tolist() + [0]  # and 0 after the last step
        if previous_latents is not None:
            previous_latents = previous_latents.to(self.device, self.dtype)
        cache = self.unet.prepare_chunk(text, pooled, time_ids, previous_latents, *latents.shape[-2:], latents.dtype)
        for index, timestep in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
            noise_pred = self.unet(model_input, timestep, text, pooled, time_ids, previous_latents, cache=cache)
            if do_classifier_free_guidance:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            noise = randn(latents.shape, generator, self.device, torch.float32) if stochastic else None
            sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
            history.timestep, history.timestep_next = run_timesteps[index], run_timesteps[index + 1]
            sample = latents.float()  # the step in float32
            denoised = denoised_from(scheduler_config, noise_pred.float(), sample, *vp_coefficients(sigma))
            latents = step(sample, denoised, sigma, sigma_next, history, noise).to(latents.dtype)
            history.sigma, history.denoised = sigma, denoised
            if callback is not None:
                callback(index + 1, len(timesteps))
        return latents

    def decode_output(self, latents, output_type):
        """`__call__`'s phase 4: the latents as `output_type` says (see `__call__`)."""
        if output_type == "latent":
            return latents
        video = (self.decode_video(latents) / 2 + 0.5).clamp(0, 1).float()  # (b, 3, f, H, W)
        if output_type == "pt":
            return video
        frames = video.permute(0, 2, 3, 4, 1).cpu().numpy()  # (b, f, H, W, 3)
        if output_type == "np":
            return frames
        from PIL import Image  # comes with imageio

        return [[Image.fromarray(np.round(frame * 255).astype(np.uint8)) for frame in clip] for clip in frames]
