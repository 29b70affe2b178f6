"""`StableDiffusionXLVideoPipeline`: one chunk of video from a prompt, and the checkpoint folder.

A checkpoint folder (what `convert_weights.py` and `train.py` write, what `sample.py` loads):

    config.json          {"format": ..., "unet": UNetConfig, "vae": VAEConfig,
                          "scheduler": SchedulerConfig, "provenance": {...},
                          "sample_defaults": {...}}
    unet.safetensors     the UNet, spatial and temporal weights
    vae.safetensors      the VAE
    text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/   transformers' layout

`save_pretrained` writes config.json last, after every other file is on disk (`fsync_tree`): a folder
with a config.json is complete, even after a crash or a power loss. `check_checkpoint_files` checks a
folder's files cheaply (config.json, the safetensors headers) before anything heavy is loaded.

One call of the pipeline denoises one chunk of `num_frames` latents, conditioned on the clean
latents of the frames before it (`previous_latents`, the context). Endless generation
(`sample.py`) calls it chunk after chunk with the prompt encoded once.
"""

import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model import UNet, UNetConfig
from formats.lora import MergedLoras
from infra.offload import Offload
from scheduler import DPMSolverMultistepScheduler, SchedulerConfig
from text import SUBFOLDERS, PromptEmbeddings, TextEncoder
from vae import AutoencoderKL, VAEConfig

CHECKPOINT_FORMAT = "sdxl-video-checkpoint/1"
CHECKPOINT_FILES = ("config.json", "unet.safetensors", "vae.safetensors")  # and the folders text.SUBFOLDERS
# The sections of config.json that build the models: name -> its config from the stored dict.
MODEL_CONFIGS = {"unet": lambda values: UNetConfig(**values), "vae": lambda values: VAEConfig(**values),
                 "scheduler": SchedulerConfig.from_dict}
# What each subfolder of text.SUBFOLDERS needs: any one of these sets of files.
TEXT_FILES = {"text_encoder": (("config.json", "model.safetensors"),),
              "tokenizer": (("tokenizer_config.json", "tokenizer.json"),
                            ("tokenizer_config.json", "vocab.json", "merges.txt"))}
OUTPUT_TYPES = ("latent", "pt", "np", "pil")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # the names of --dtype
SHOWN = 3  # keys listed per problem


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


def micro_conditioning(batch_size: int, height: int, width: int, original_size: tuple[int, int] | None = None,
                       crop_top_left: tuple[int, int] = (0, 0), dtype=torch.float32, device=None) -> torch.Tensor:
    """SDXL's micro-conditioning (diffusers' `add_time_ids`), the same in training and sampling:
    (original height, original width, crop top, crop left, target height, target width) for
    frames of height x width pixels, by default neither resized (original = target) nor
    cropped. Returns (batch_size, 6) in `dtype` on `device`."""
    original_height, original_width = (height, width) if original_size is None else original_size
    values = torch.tensor([original_height, original_width, *crop_top_left, height, width], dtype=dtype, device=device)
    return values.repeat(batch_size, 1)  # (batch, 6)


def read_json(path: Path) -> dict:
    """A JSON object from a file; ValueError naming the file if it is missing, not JSON or not an object."""
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); is it truncated?") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a JSON {type(values).__name__}, expected an object")
    return values


def load_checkpoint_config(folder) -> dict:
    """config.json of a checkpoint folder, checked to be one; ValueError naming the folder otherwise."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} is not a checkpoint folder: it has no config.json (make one with convert_weights.py)")
    config = read_json(path)
    if config.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has format {config.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    return config


def model_configs(folder) -> dict:
    """The UNet's, the VAE's and the scheduler's configs of config.json, built and so checked."""
    path, config = Path(folder) / "config.json", load_checkpoint_config(folder)
    configs = {}
    for name, make in MODEL_CONFIGS.items():
        if not isinstance(config.get(name), dict):
            raise ValueError(f"{path}: {name!r} must be an object of settings, got {config.get(name)!r}")
        try:
            configs[name] = make(config[name])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: bad {name!r} settings: {error}") from error
    return configs


def safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a .safetensors file's header (name -> dtype, shape, data_offsets), read
    without the data; ValueError naming the file unless the header is whole and the data it declares
    fill the rest of the file exactly (a truncated copy or download fails here)."""
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    size = path.stat().st_size
    with path.open("rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if size < 8 or 8 + length > size:
            raise ValueError(f"{path} is truncated: {size} bytes, too few for its safetensors header")
        try:
            header = json.loads(file.read(length))
            tensors = {name: {**entry, "shape": tuple(entry["shape"])}
                       for name, entry in header.items() if name != "__metadata__"}
            data = data_bytes(tensors)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, KeyError, IndexError) as error:
            raise ValueError(f"{path} has no valid safetensors header ({error!r})") from error
    if data != (held := size - 8 - length):
        state = "truncated" if data > held else "longer than its header says"
        raise ValueError(f"{path} is {state}: its header declares {data} bytes of tensors, it holds {held}")
    return tensors


def data_bytes(header: dict[str, dict]) -> int:
    """Bytes of tensor data that a safetensors header declares."""
    return max((entry["data_offsets"][1] for entry in header.values()), default=0)


def check_checkpoint_files(folder) -> int:
    """Check a checkpoint folder's files without loading any weights, and return the bytes of the
    UNet's and the VAE's weights (for a memory estimate): config.json and its model settings, the
    safetensors headers of unet.safetensors and vae.safetensors (complete, file size as declared),
    and the files of the text encoders (config.json, a complete model.safetensors) and tokenizers.
    ValueError naming the first broken file."""
    folder = Path(folder)
    model_configs(folder)
    weights = sum(data_bytes(safetensors_header(folder / name)) for name in ("unet.safetensors", "vae.safetensors"))
    for name in SUBFOLDERS:
        kind, subfolder = name.removesuffix("_2"), folder / name
        choices = TEXT_FILES[kind]
        if not any(all((subfolder / file).is_file() for file in files) for files in choices):
            missing = next(subfolder / file for file in choices[0] if not (subfolder / file).is_file())
            needs = " or ".join(f"[{', '.join(files)}]" for files in choices)
            raise ValueError(f"{missing} is missing: a {kind} folder needs the files {needs}")
        for file in sorted(subfolder.glob("*.json")):
            read_json(file)
        if kind == "text_encoder":
            safetensors_header(subfolder / "model.safetensors")
    return weights


def listing(what: str, names: list[str]) -> str:
    """"2 missing keys: a, b", naming at most SHOWN."""
    return f"{len(names)} {what}: " + ", ".join(sorted(names)[:SHOWN]) + (", ..." if len(names) > SHOWN else "")


def load_module(module_class, config, weights_path: Path, device, dtype):
    """Build on the meta device, then take the stored tensors as they are (strict: every key, every
    shape); ValueError naming the file for a key or shape that does not fit the config."""
    with torch.device("meta"):
        module = module_class(config)
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    stored = {key: entry["shape"] for key, entry in safetensors_header(weights_path).items()}
    found = {"missing keys": [key for key in expected if key not in stored],
             "unknown keys": [key for key in stored if key not in expected],
             "shape mismatches": [f"{key} is {stored[key]}, the model needs {expected[key]}"
                                  for key in expected.keys() & stored.keys() if stored[key] != expected[key]]}
    if problems := [listing(what, names) for what, names in found.items() if names]:
        model = module_class.__name__
        raise ValueError(f"{weights_path} does not fit the {model} of config.json: " + "; ".join(problems))
    try:
        state = load_file(weights_path, device=str(device or "cpu"))
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{weights_path} cannot be read: {error}") from error
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(dtype=dtype).eval() if dtype else module.eval()


def fsync(path) -> None:
    """Flush one file or folder (its list of names) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder) -> None:
    """Flush every file and folder under `folder`, `folder` itself and its parent (which holds its
    name) to disk: what was written there then survives a crash or a power loss."""
    folder = Path(folder)
    for path in [*folder.rglob("*"), folder, folder.parent]:
        fsync(path)


@contextmanager
def writing(path: Path):
    """Report an error while writing `path` as an OSError naming it; safetensors reports an I/O
    error as a SafetensorError ending in "(os error N)", which becomes errno N."""
    try:
        yield path
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), error.filename or str(path)) from error
    except SafetensorError as error:
        if not (match := re.search(r"\(os error (\d+)\)", str(error))):
            raise
        raise OSError(int(match[1]), os.strerror(int(match[1])), str(path)) from error


class StableDiffusionXLVideoPipeline:
    """UNet + VAE + text encoders + DPM-Solver++ scheduler settings."""

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: TextEncoder, scheduler_config: SchedulerConfig):
        self.unet = unet
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
        """Load a checkpoint folder, keeping the stored dtype unless `dtype` is given; ValueError
        naming the file for a missing or broken one (`check_checkpoint_files` first)."""
        folder = Path(folder)
        check_checkpoint_files(folder)
        configs = model_configs(folder)
        unet = load_module(UNet, configs["unet"], folder / "unet.safetensors", device, dtype)
        vae = load_module(AutoencoderKL, configs["vae"], folder / "vae.safetensors", device, dtype)
        try:
            text_encoder = TextEncoder.from_pretrained(folder).to(device=device, dtype=dtype)
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:
            message = str(error).strip().splitlines()[0]
            raise ValueError(f"the text encoders and tokenizers in {folder} cannot be loaded: {message}") from error
        pipeline = cls(unet, vae, text_encoder, configs["scheduler"])
        pipeline.provenance = load_checkpoint_config(folder).get("provenance", {})
        return pipeline

    def save_pretrained(self, folder, provenance: dict | None = None, sample_defaults: dict | None = None) -> None:
        """Write the checkpoint folder (weights in their current dtype). config.json also keeps
        `provenance` (where each part came from) and `sample_defaults` (sample.py's defaults for
        this model: height, width, frames, context_frames, steps, guidance).

        An old config.json goes first and the new one comes last, once every other file is on disk:
        a folder whose writing stopped part way is no checkpoint. An error while writing is an
        OSError naming the file (the text encoders' and tokenizers' by the folder)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").unlink(missing_ok=True)
        for name, module in (("unet.safetensors", self.unet), ("vae.safetensors", self.vae)):
            with writing(folder / name) as path:
                save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)
        with writing(folder):
            self.text_encoder.save_pretrained(folder)
            fsync_tree(folder)
        config = {
            "format": CHECKPOINT_FORMAT,
            "unet": self.unet.config.to_dict(),
            "vae": asdict(self.vae.config),
            "scheduler": self.scheduler_config.to_dict(),
            "provenance": provenance or {},
            "sample_defaults": sample_defaults or {},
        }
        with writing(folder / "config.json") as path:
            path.write_text(json.dumps(config, indent=2) + "\n")
            fsync(path)
            fsync(folder)

    def load_loras(self, paths: list[str], strengths: list[float] | None = None,
                   keep_originals: bool = True) -> MergedLoras:
        """Merge LoRA files into the UNet and text encoders at `strengths` (default 1 each), after
        checking them all; `self.loras.set_strengths(...)` changes them and `self.loras.remove()`
        restores the weights exactly (formats/lora.py)."""
        self.loras = MergedLoras.load(self, paths, strengths, keep_originals)
        return self.loras

    def to(self, device=None, dtype=None) -> "StableDiffusionXLVideoPipeline":
        for module in (self.unet, self.vae, self.text_encoder):
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
        """`encode_prompt` of each of `prompts` (a timeline's, all of them first), then the text
        encoders leave the accelerator (to the CPU): the loop and the decode get their memory. With
        an offload, its hooks move them."""
        embeddings = [self.encode_prompt(prompt, negative_prompt, do_classifier_free_guidance) for prompt in prompts]
        if self.offload is None:
            self.text_encoder.to("cpu")
        return embeddings

    def decode_video(self, latents: torch.Tensor, frames_per_batch: int = 8) -> torch.Tensor:
        """`vae.decode_video` with the pipeline's tiling and upcast settings."""
        return self.vae.decode_video(latents, frames_per_batch, upcast=self.vae_upcast, tiles=self.vae_tiles)

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
        # 0. Checks: a bad argument is a ValueError naming it, before any work.
        height, width = self.check_inputs(height, width, num_frames, output_type, conditioning_strength, generator,
                                          latents)
        do_classifier_free_guidance = guidance_scale > 1.0
        # 1. Text: embeddings once per call (or given), as the guidance batch [negative, positive].
        batch_size, text, pooled = self.guidance_batch(prompt, negative_prompt, prompt_embeds,
                                                       do_classifier_free_guidance)
        time_ids = micro_conditioning(text.shape[0], height, width, dtype=self.dtype, device=self.device)
        # 2. Timesteps and starting latents: noise, or latent_image noised to the first kept step.
        scheduler = DPMSolverMultistepScheduler(self.scheduler_config)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = self.prepare_latents(batch_size, num_frames, height, width, generator, latents)
        timesteps, latents = self.starting_point(scheduler, latents, latent_image, conditioning_strength)
        # 3. Denoising loop.
        latents = self.denoise(scheduler, timesteps, latents, text, pooled, time_ids, previous_latents,
                               guidance_scale, generator, callback)
        # 4. Output.
        return self.decode_output(latents, output_type)

    def check_inputs(self, height, width, num_frames, output_type, conditioning_strength, generator, latents):
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
        stochastic = self.scheduler_config.algorithm_type == "sde-dpmsolver++"
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

    def starting_point(self, scheduler, noise, latent_image, conditioning_strength):
        """`__call__`'s phase 2: (timesteps to run, starting latents). From `noise` (batch, 4,
        frames, h, w) over the whole schedule; or, with a latent_image and conditioning_strength s
        > 0, from the image noised to the step after the first round(s * steps) (the image itself
        when every step is skipped)."""
        timesteps = scheduler.timesteps
        if latent_image is None or conditioning_strength == 0:
            return timesteps, noise * scheduler.init_noise_sigma
        skipped = round(conditioning_strength * len(timesteps))
        start = latent_image.to(self.device, self.dtype).expand_as(noise)
        if skipped == len(timesteps):
            return timesteps[:0], start
        timesteps = timesteps[skipped:]
        return timesteps, scheduler.add_noise(start, noise, timesteps[:1].expand(noise.shape[0]))

    def denoise(self, scheduler, timesteps, latents, text, pooled, time_ids, previous_latents, guidance_scale,
                generator, callback=None):
        """`__call__`'s phase 3: one UNet call (on the guidance batch) and one scheduler step per
        timestep; returns the denoised latents. What depends only on the text and the context is
        computed at the first step and kept in `cache` for the others."""
        do_classifier_free_guidance = guidance_scale > 1.0
        stochastic = scheduler.config.algorithm_type == "sde-dpmsolver++"
        if previous_latents is not None:
            previous_latents = previous_latents.to(self.device, self.dtype)
        cache = self.unet.prepare_chunk(text, pooled, time_ids, previous_latents, *latents.shape[-2:], latents.dtype)
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
