"""How much accelerator memory a video needs, counted before any model is loaded.

The estimate has two parts, both counted, not guessed:
- weights: the parameters of the UNet and the VAE built from the checkpoint's config.json on the
  meta device, and of the text encoders from their safetensors headers, at the dtype they run in;
- activations: the peak of the bytes alive at once while one denoising step runs (`prepare_chunk`
  and one UNet call on the guidance-doubled batch), while the VAE decodes a chunk, and while the
  text encoders run. The step and the decode are run on the meta device, where every op makes
  tensors with shapes and no data, under `LiveBytes`, which adds up the bytes of every new storage
  and takes them off when the storage is freed. Attention is counted as a fused kernel does it
  (flash / memory-efficient SDPA, and PyTorch's CPU kernel): the output and its log-sum-exp, no
  (tokens x tokens) matrix (`FusedAttention`).

Which parts are on the accelerator together depends on the offload mode (infra/offload.py):
- "none": everything is loaded onto the device; the text encoders leave it once the prompts are
  encoded, so the denoising loop and the decode have the UNet's and the VAE's weights only;
- "model": one of text encoders, UNet, VAE at a time;
- "sequential": as "model", and the UNet's levels one at a time (its small stem stays).
The peak is the largest phase, times ALLOCATOR_MARGIN.
"""

import functools
import json
import math
import os
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model import UNet, UNetConfig
from pipeline import DTYPES, micro_conditioning, safetensors_header
from vae import TILE, TILES_ABOVE, AutoencoderKL, VAEConfig

ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
OFFLOAD_MODES = ("none", "model", "sequential")
# The caching allocator rounds blocks up and fragments, and kernels take workspaces: a margin on the
# counted bytes, to be checked against max_memory_allocated by `tools/bench.py --quick` on a GPU.
ALLOCATOR_MARGIN = 1.1
TEXT_TOKENS = 77
GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages that the ops run inside it create: `live` now, `peak` the
    most at any time. A view or an in-place op returns a storage of its inputs and adds nothing
    (weights made before it count only with the weights); a storage is taken off when Python frees
    it (weak references). Works on real tensors and on the meta device."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.seen = weakref.WeakSet()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and id(tensor.untyped_storage()) not in inputs:  # not a view
                self.add(tensor.untyped_storage())
        return out

    def add(self, storage) -> None:
        if storage in self.seen:
            return
        size = storage.nbytes()
        self.seen.add(storage)
        weakref.finalize(storage, self.remove, size)
        self.live += size
        self.peak = max(self.peak, self.live)

    def remove(self, size: int) -> None:
        self.live -= size


class FusedAttention(TorchFunctionMode):
    """`scaled_dot_product_attention` as a fused kernel allocates it: its output (..., queries,
    value_dim) and a float32 log-sum-exp (..., queries), instead of the math path's matrix."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            query, value = args[0], args[2]
            torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)  # log-sum-exp, freed at once
            return query.new_empty((*query.shape[:-1], value.shape[-1]))
        return func(*args, **kwargs)


def peak_bytes(function) -> int:
    """The most bytes alive at once while `function()` runs, counting what it creates (its inputs
    too, if it makes them), with attention counted as a fused kernel."""
    counter = LiveBytes()
    with torch.no_grad(), FusedAttention(), counter:
        function()
    return counter.peak


def memoised(function):
    """`function`, answering arguments it has seen before in this process (compared by their repr)
    from memory: the counts below are pure functions of a config and shapes, and each takes seconds
    of meta-device ops, so a process that checks many runs of one model (the remedies `what_would_fit`
    tries, the tests' sample.py runs) counts each case once. Positional arguments only."""
    results = {}

    @functools.wraps(function)
    def answer(*arguments):
        key = repr(arguments)
        if key not in results:
            results[key] = function(*arguments)
        return results[key]

    return answer


@memoised
def step_activations(config: UNetConfig, batch: int, frames: int, context_frames: int, height: int, width: int,
                     dtype: torch.dtype) -> int:
    """Peak bytes of one denoising step on the meta device: the starting latents, the guidance
    batch, the chunk's cache (`prepare_chunk`) and a UNet call, for `batch` (2 with guidance)
    videos of `frames` latents of height x width (latent pixels) with a context of `context_frames`."""
    with torch.device("meta"):
        unet = UNet(config).to(dtype)

    def step():
        draw = lambda *shape: torch.empty(shape, dtype=dtype, device="meta")
        latents = draw(batch, config.in_channels, frames, height, width)
        text = draw(batch, TEXT_TOKENS, config.cross_attention_dim)
        pooled = draw(batch, config.pooled_text_dim)
        time_ids = micro_conditioning(batch, 8 * height, 8 * width, dtype=dtype, device="meta")
        context = draw(1, config.in_channels, context_frames, height, width) if context_frames else None
        cache = unet.prepare_chunk(text, pooled, time_ids, context, height, width, dtype)
        unet(latents, torch.tensor(500.0, device="meta"), text, pooled, time_ids, context, cache=cache)

    return peak_bytes(step)


@memoised
def decode_activations(config: VAEConfig, frames: int, decode_frames: int, height: int, width: int,
                       dtype: torch.dtype, tiles: bool) -> int:
    """Peak bytes of decoding a chunk of `frames` latents of height x width, `decode_frames` at a
    time (tiled or not), on the meta device: the latents, each batch's activations and the video."""
    with torch.device("meta"):
        vae = AutoencoderKL(config).to(dtype)
    def peak(rows: int, columns: int) -> int:
        latents = torch.empty(1, config.latent_channels, frames, rows, columns, dtype=dtype, device="meta")
        return peak_bytes(lambda: vae.decode_frames(latents, decode_frames, tiles, dtype))

    small = 3 * TILE  # past one tile a side, a tiled decode's peak is one tile's work plus buffers linear in pixels
    if not tiles or height * width <= small * small:
        return peak(height, width)
    # Running every tile on the meta device takes minutes at huge sizes: fit the line through two
    # sizes of the same tiling and read it at height x width.
    first, second = peak(2 * TILE, 2 * TILE), peak(small, small)
    slope = (second - first) / (small * small - 4 * TILE * TILE)
    return int(first + slope * (height * width - 4 * TILE * TILE))


@memoised
def parameter_count(module_class, config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in module_class(config).parameters())


def text_encoder_parts(folder: Path) -> tuple[int, int]:
    """(parameters, activation elements) of the two text encoders of a checkpoint folder: the
    parameters from their safetensors headers; the activations of encoding a prompt and a negative
    one, every layer's hidden states kept (the pipeline asks for them) plus one MLP's inner width."""
    parameters = activations = 0
    for name in ("text_encoder", "text_encoder_2"):
        header = safetensors_header(folder / name / "model.safetensors")
        parameters += sum(math.prod(entry["shape"]) for entry in header.values())
        config = json.loads((folder / name / "config.json").read_text())
        hidden, layers, inner = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
        activations += 2 * TEXT_TOKENS * ((layers + 1) * hidden + inner)
    return parameters, activations


@dataclass
class MemoryEstimate:
    """Bytes on the accelerator, by part and by phase, for one run's settings."""

    offload: str
    weights: dict[str, int]  # "unet", "unet_resident" (stem + largest level), "vae", "text_encoders"
    activations: dict[str, int]  # "step", "decode", "text"
    settings: dict = field(default_factory=dict)

    def phases(self) -> dict[str, int]:
        """Bytes on the device while the prompts are encoded, while a step runs, while a chunk is decoded."""
        w, a = self.weights, self.activations
        if self.offload == "none":
            loop = w["unet"] + w["vae"]
            return {"text": loop + w["text_encoders"] + a["text"], "step": loop + a["step"], "decode": loop + a["decode"]}
        unet = w["unet_resident"] if self.offload == "sequential" else w["unet"]
        return {"text": w["text_encoders"] + a["text"], "step": unet + a["step"], "decode": w["vae"] + a["decode"]}

    def peak(self) -> int:
        return int(max(self.phases().values()) * ALLOCATOR_MARGIN)

    def with_offload(self, offload: str) -> "MemoryEstimate":
        return replace(self, offload=offload)

    def describe(self) -> str:
        """'about 10.2 GiB (weights 8.6 GiB, step 1.4 GiB, decode 0.9 GiB; offload none)'."""
        w, a = self.weights, self.activations
        resident = w["unet_resident"] if self.offload == "sequential" else w["unet"]
        return (f"about {gib(self.peak())} (UNet weights {gib(resident)}, VAE {gib(w['vae'])}, text encoders "
                f"{gib(w['text_encoders'])}; a step's activations {gib(a['step'])}, a decode's {gib(a['decode'])}; "
                f"offload {self.offload})")


def gib(count: int) -> str:
    return f"{count / GIB:.1f} GiB"


@memoised
def largest_level_parameters(config: UNetConfig) -> tuple[int, int]:
    """(parameters outside the levels, parameters of the largest level) of a UNet: what
    `--offload sequential` keeps on the device, and the most it moves there at once."""
    with torch.device("meta"):
        unet = UNet(config)
    level_counts = [sum(p.numel() for p in block.parameters()) for block, _ in unet.levels()]
    total = sum(p.numel() for p in unet.parameters())
    return total - sum(level_counts), max(level_counts)


def estimate(model_config: dict, folder, height: int, width: int, frames: int, context_frames: int,
             guidance: float, decode_frames: int, dtype: str, vae_dtype: str, offload: str = "none",
             vae_tiles: bool | None = False) -> MemoryEstimate:
    """The memory estimate of a run (see the module's docstring). model_config: a checkpoint's
    config.json; folder: the checkpoint (its text encoders' headers and configs); height, width in
    pixels; dtype and vae_dtype: names of pipeline.DTYPES; vae_tiles None: as `decode_video` decides."""
    unet_config, vae_config = UNetConfig(**model_config["unet"]), VAEConfig(**model_config["vae"])
    element, vae_element = ELEMENT_BYTES[dtype], ELEMENT_BYTES[vae_dtype]
    factor = vae_config.downsample_factor
    latent_height, latent_width = height // factor, width // factor
    vae_tiles = latent_height * latent_width > TILES_ABOVE if vae_tiles is None else vae_tiles
    batch = 2 if guidance > 1 else 1
    stem, largest_level = largest_level_parameters(unet_config)
    text_parameters, text_elements = text_encoder_parts(Path(folder))
    weights = {
        "unet": parameter_count(UNet, unet_config) * element,
        "unet_resident": (stem + largest_level) * element,
        "vae": parameter_count(AutoencoderKL, vae_config) * vae_element,
        "text_encoders": text_parameters * element,
    }
    activations = {
        "step": step_activations(unet_config, batch, frames, context_frames, latent_height, latent_width,
                                 DTYPES[dtype]),
        "decode": decode_activations(vae_config, frames, decode_frames, latent_height, latent_width,
                                     DTYPES[vae_dtype], vae_tiles),
        "text": text_elements * element,
    }
    settings = dict(height=height, width=width, frames=frames, context_frames=context_frames, guidance=guidance,
                    decode_frames=decode_frames, dtype=dtype, vae_dtype=vae_dtype, vae_tiles=vae_tiles)
    return MemoryEstimate(offload, weights, activations, settings)


def available_memory(device: str) -> int:
    """Bytes free for this run on `device` (on a CPU: MemAvailable from /proc/meminfo, else all memory)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def what_would_fit(found: MemoryEstimate, free: int, model_config: dict, folder) -> str:
    """The first of the usual remedies, cheapest first, whose estimate fits in `free` bytes, as the
    options to give; the remedies tried if none does."""
    order = OFFLOAD_MODES[OFFLOAD_MODES.index(found.offload) + 1:]
    for mode in order:
        if found.with_offload(mode).peak() <= free:
            return f"--offload {mode} would make it fit ({found.with_offload(mode).describe()})"
    settings, offload = dict(found.settings), order[-1] if order else found.offload
    remedies = []
    if not settings["vae_tiles"]:
        remedies.append(("--vae-tiles on", dict(vae_tiles=True)))
    if settings["decode_frames"] > 1:
        remedies.append(("--decode-frames 1", dict(decode_frames=1)))
    if settings["dtype"] == "fp32":
        remedies.append(("--dtype bf16", dict(dtype="bf16", vae_dtype="bf16")))
    tried = [f"--offload {offload}"] if offload != found.offload else []
    for option, change in remedies:
        settings.update(change)
        tried.append(option)
        if (candidate := estimate(model_config, folder, offload=offload, **settings)).peak() <= free:
            return f"{' '.join(tried)} would make it fit ({candidate.describe()})"
    return f"even {' '.join(tried) or 'these settings'} would not fit: use a smaller --height/--width or fewer --frames"


def check_memory(model_config: dict, folder, device: str, **settings) -> MemoryEstimate:
    """The estimate of `estimate(model_config, folder, **settings)`; ValueError, with it and the
    options that would make it fit, if it is more than `device` has free."""
    found = estimate(model_config, folder, **settings)
    free = available_memory(device)
    if found.peak() > free:
        raise ValueError(
            f"--height {settings['height']} --width {settings['width']} --frames {settings['frames']}: a chunk needs "
            f"{found.describe()} and {device} has {gib(free)} free; {what_would_fit(found, free, model_config, folder)}")
    return found
