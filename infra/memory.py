"""What a run needs in memory, counted before any model is loaded, on PyTorch's meta device
(tensors with shapes and no data: no weights, no time): the estimate that sample.py checks (sampling)
and the --plan table of train.py (training).

One mechanism counts both. The code runs on the meta device under `FusedAttention`, which runs
`scaled_dot_product_attention` as the fused kernel (flash / memory-efficient SDPA, and PyTorch's CPU
kernel): its output and its log-sum-exp, never the (tokens x tokens) matrix of the math path that
meta would otherwise take. Sampling adds up the bytes alive at once (`LiveBytes`, `peak_bytes`);
training adds up what autograd saves for the backward (`saved_bytes`). `unet_inputs` makes a UNet
call's inputs for training's count and for tools/bench.py; sampling's count makes its inputs inside
the count, as a denoising step makes them (`unet_inputs` draws them on the CPU).

Sampling (`estimate`, `check_memory`) has two parts:
- weights: the parameters of the UNet and the VAE built from the checkpoint's config.json on the
  meta device, and of the text encoders from their safetensors headers, at the dtype they run in;
- activations: the peak of the bytes alive at once while one denoising step runs (`prepare_chunk`
  and one UNet call on the guidance-doubled batch), while the VAE decodes a chunk, and while the
  text encoders run. `LiveBytes` adds up the bytes of every new storage and takes them off when
  the storage is freed.

Which parts are on the accelerator together depends on the offload mode (infra/offload.py):
- "none": everything is loaded onto the device; the text encoders leave it once the prompts are
  encoded, so the denoising loop and the decode have the UNet's and the VAE's weights only;
- "model": one of text encoders, UNet, VAE at a time;
- "sequential": as "model", and the UNet's levels one at a time (its small stem stays).
The peak is the largest phase, times ALLOCATOR_MARGIN.

Training (`plan_table`): bytes per process under DDP and under FSDP, and model FLOPs:
    weights          DDP: every parameter, float32. FSDP: this process's shard of every parameter,
                     float32 (FSDP2 cuts dim 0 into `processes` parts of ceil(dim 0 / processes) rows,
                     the last ones padded)
    gathered         the weights in the compute dtype while they are used. DDP with autocast: a copy of
                     every weight, saved for the backward. FSDP: the root's weights (never freed) and
                     two units' (the one running and the one prefetched: at most the two largest), and the largest unit's whole
                     float32 gradients while they are reduced
    gradients        of the trained parameters, float32: all of them under DDP, the shard under FSDP
    optimizer        AdamW's two moments and step of the trained parameters, float32 (whole / shard)
    activations      per sample: what autograd saves for the backward of one sample's forward (not the
                     weights), in the compute dtype, attention as the fused kernel keeps it (its inputs,
                     output and log-sum-exp); with gradient checkpointing, the
                     inputs of the checkpointed units, what is saved outside them, and the largest
                     unit's own (recomputed during the backward)
Not counted: the allocator's fragmentation, the CUDA context and communication buffers (a few GB).
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
from torch.utils.flop_counter import FlopCounterMode

from infra.checkpoint import DTYPES, safetensors_header
from model import UNet, UNetConfig, micro_conditioning
from vae import TILE, TILES_ABOVE, AutoencoderKL, VAEConfig

ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
OFFLOAD_MODES = ("none", "model", "sequential")
# The caching allocator rounds blocks up and fragments, and kernels take workspaces: a margin on the
# counted bytes, to be checked against max_memory_allocated by `tools/bench.py --quick` on a GPU.
ALLOCATOR_MARGIN = 1.1
TEXT_TOKENS = 77
GIB = 2**30
UNITS = {"GB": 1e9, "MB": 1e6, "kB": 1e3}  # of the --plan table
ROWS = ("weights", "gathered", "gradients", "optimizer")  # the --plan table's rows per process


# Counting on the meta device -------------------------------------------------------------------


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
    """`scaled_dot_product_attention` run as the fused (flash) kernel, whatever the device: its op
    returns the output (..., queries, value_dim) and a float32 log-sum-exp (..., queries), and under
    autograd saves its inputs, output and log-sum-exp, as a GPU's kernels do; never the (queries x
    keys) matrix of the math path, which meta takes by default."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args, **kwargs)[0]
        return func(*args, **kwargs)


def peak_bytes(function) -> int:
    """The most bytes alive at once while `function()` runs, counting what it creates (its inputs
    too, if it makes them), with attention counted as a fused kernel."""
    counter = LiveBytes()
    with torch.no_grad(), FusedAttention(), counter:
        function()
    return counter.peak


def saved_bytes(model: torch.nn.Module, units: list[torch.nn.Module], forward) -> tuple[int, int]:
    """Bytes autograd keeps for the backward of `forward()` (saved tensors that are not `model`'s
    parameters, each storage once): (without, with) gradient checkpointing of `units`. With it,
    a unit keeps only its inputs, and the largest unit's own saved tensors come back while its
    backward runs."""
    parameter_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    storages: dict[int, tuple[int, int]] = {}  # storage -> (bytes, the unit that saved it or -1)
    inputs: set[int] = set()  # storages of the units' tensor inputs
    alive = []  # keeps every counted tensor, so that no storage address is reused
    current = [-1]

    def note(tensor: torch.Tensor, unit: int) -> int:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameter_storages and storage._cdata not in storages:
            storages[storage._cdata] = (storage.nbytes(), unit)
            alive.append(tensor)
        return storage._cdata

    def pack(tensor):
        note(tensor, current[0])
        return tensor

    def enter(index):
        def hook(module, args):
            tensors = [a for a in tree_leaves(args) if isinstance(a, torch.Tensor)]
            inputs.update(note(tensor, -1) for tensor in tensors if tensor.is_floating_point())
            current[0] = index
        return hook

    def leave(module, args, output):
        current[0] = -1

    handles = [h for index, unit in enumerate(units)
               for h in (unit.register_forward_pre_hook(enter(index)), unit.register_forward_hook(leave))]
    try:
        with FusedAttention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            forward()
    finally:
        for handle in handles:
            handle.remove()
    kept_inputs = sum(storages[key][0] for key in inputs)
    outside, per_unit = 0, [0] * len(units)
    for key, (size, unit) in storages.items():
        if key in inputs:
            continue
        if unit >= 0:
            per_unit[unit] += size
        else:
            outside += size
    return outside + kept_inputs + sum(per_unit), outside + kept_inputs + max(per_unit, default=0)


def unet_inputs(config: UNetConfig, batch: int, frames: int, height: int, width: int, context_frames: int,
                device, dtype: torch.dtype, text_tokens: int = TEXT_TOKENS, seed: int = 0) -> dict:
    """The keyword arguments of a UNet call: random latents (batch, in_channels, frames, height,
    width), timestep 500, random text (batch, text_tokens, cross_attention_dim) and pooled text,
    the micro-conditioning of 8 * height x 8 * width frames, and a random context (1, in_channels,
    context_frames, height, width), None without context frames. Drawn on the CPU from `seed`, so
    that every device gets the same numbers."""
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(shape, generator=generator).to(device, dtype)
    return dict(
        sample=draw(batch, config.in_channels, frames, height, width),
        timestep=torch.tensor(500.0, device=device),
        encoder_hidden_states=draw(batch, text_tokens, config.cross_attention_dim),
        text_embeds=draw(batch, config.pooled_text_dim),
        time_ids=micro_conditioning(batch, 8 * height, 8 * width, dtype=dtype, device=device),
        previous_latents=draw(1, config.in_channels, context_frames, height, width) if context_frames else None,
    )


# Sampling: the estimate that sample.py checks ----------------------------------------------------


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

    def step():  # its inputs made inside the count, as a step makes them (not `unet_inputs`, which draws on the CPU)
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
    pixels; dtype and vae_dtype: names of infra.checkpoint.DTYPES; vae_tiles None: as `decode_video` decides."""
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


# Training: the --plan table of train.py -------------------------------------------------------------


def shard_numel(shape: torch.Size, processes: int) -> int:
    """Elements of one process's FSDP2 shard of a parameter of `shape` (padded: the largest)."""
    if len(shape) == 0:
        return 1
    return math.ceil(shape[0] / processes) * math.prod(shape[1:])


def memory_plan(model: torch.nn.Module, units: list[torch.nn.Module], processes: int,
                compute_dtype: torch.dtype | None) -> dict[str, dict[str, int]]:
    """{"ddp": {row: bytes}, "fsdp": {row: bytes}} per process for the ROWS of the module docstring,
    for `model` (meta or not) whose trained parameters require grad, sharded as `units` then the
    whole model (the root: the parameters outside every unit). `compute_dtype`: autocast's (and
    FSDP's param_dtype), None for float32."""
    compute = (compute_dtype or torch.float32).itemsize
    in_unit = {id(p): index for index, unit in enumerate(units) for p in unit.parameters()}
    parameters = list(model.parameters())
    trained = [p for p in parameters if p.requires_grad]
    unit_numel = [0] * len(units)
    unit_trained = [0] * len(units)
    root_numel = 0
    for p in parameters:
        if id(p) in in_unit:
            unit_numel[in_unit[id(p)]] += p.numel()
            unit_trained[in_unit[id(p)]] += p.numel() if p.requires_grad else 0
        else:
            root_numel += p.numel()
    numel, trained_numel = sum(p.numel() for p in parameters), sum(p.numel() for p in trained)
    shard_all = sum(shard_numel(p.shape, processes) for p in parameters)
    shard_trained = sum(shard_numel(p.shape, processes) for p in trained)
    step_bytes = 4 * len(trained)  # AdamW's step, a float32 scalar per parameter
    ddp = {"weights": 4 * numel, "gathered": compute * numel if compute_dtype else 0,
           "gradients": 4 * trained_numel, "optimizer": 8 * trained_numel + step_bytes}
    two_largest = sum(sorted(unit_numel)[-2:])
    gathered = compute * (root_numel + two_largest) + 4 * max(unit_trained, default=0)
    fsdp = {"weights": 4 * shard_all, "gathered": gathered, "gradients": 4 * shard_trained,
            "optimizer": 8 * shard_trained + step_bytes}
    return {"ddp": ddp, "fsdp": fsdp}


@dataclass(frozen=True)
class Sample:
    """One training sample's UNet input: chunk frames and context frames of latents, text tokens."""

    frames: int
    context_frames: int
    latent_size: int  # latent height and width
    text_tokens: int = TEXT_TOKENS


def one_sample_inputs(config: UNetConfig, sample: Sample, dtype: torch.dtype, device="meta") -> dict:
    """`unet_inputs` for a batch of one training `sample` on `device`."""
    size = sample.latent_size
    return unet_inputs(config, 1, sample.frames, size, size, sample.context_frames, device, dtype, sample.text_tokens)


def meta_unet(config: UNetConfig, temporal_only: bool, dtype: torch.dtype = torch.float32) -> UNet:
    """The UNet on the meta device, its trained parameters requiring grad: the temporal ones
    (`temporal_only`, mode temporal) or all (mode baby)."""
    with torch.device("meta"):
        unet = UNet(config).to(dtype)
    if temporal_only:
        unet.requires_grad_(False)
        for parameter in unet.temporal_parameters():
            parameter.requires_grad_(True)
    return unet


def unet_units(unet: UNet) -> list[torch.nn.Module]:
    """What --fsdp shards one by one (and checkpoints): each level and the mid block."""
    return [block for block, _ in unet.levels()]


def activation_bytes(config: UNetConfig, temporal_only: bool, sample: Sample,
                     compute_dtype: torch.dtype | None) -> tuple[int, int]:
    """Bytes saved for the backward of one sample: (without, with) gradient checkpointing."""
    dtype = compute_dtype or torch.float32
    unet = meta_unet(config, temporal_only, dtype)
    inputs = one_sample_inputs(config, sample, dtype)
    return saved_bytes(unet, unet_units(unet), lambda: unet(**inputs))


def training_flops(config: UNetConfig, temporal_only: bool, sample: Sample) -> int:
    """Model FLOPs of one sample's forward and backward (no recomputation), counted on meta; the
    backward computes no gradients for frozen weights."""
    unet = meta_unet(config, temporal_only)
    inputs = one_sample_inputs(config, sample, torch.float32)
    with FlopCounterMode(display=False) as counter:
        unet(**inputs).float().square().mean().backward()
    return counter.get_total_flops()


def plan_table(config: UNetConfig, temporal_only: bool, sample: Sample, processes: int, batch_size: int,
               compute_dtype: torch.dtype | None, gradient_checkpointing: bool, frozen_bytes: int) -> str:
    """The --plan table: bytes per process (in GB, MB or kB, as the totals need) under DDP and FSDP
    for one UNet, with `frozen_bytes` of other frozen modules (VAE, text encoders) on every process."""
    unet = meta_unet(config, temporal_only)
    plans = memory_plan(unet, unet_units(unet), processes, compute_dtype)
    without, with_checkpointing = activation_bytes(config, temporal_only, sample, compute_dtype)
    activations = with_checkpointing if gradient_checkpointing else without
    parameters = sum(p.numel() for p in unet.parameters())
    trained = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    dtype = str(compute_dtype or torch.float32).removeprefix("torch.")
    letter, scale = ("B", 1e9) if parameters >= 1e8 else ("M", 1e6)
    lines = [f"UNet: {parameters / scale:.2f} {letter} parameters, {trained / scale:.2f} {letter} trained; "
             f"processes: {processes}, "
             f"compute in {dtype}, batch {batch_size} per process, {sample.frames} + {sample.context_frames} "
             f"context frames of {sample.latent_size}x{sample.latent_size} latents; gradient checkpointing "
             f"{'on' if gradient_checkpointing else 'off'}",
             ""]
    rows = {name: (plans["ddp"][name], plans["fsdp"][name]) for name in ROWS}
    rows["activations per sample"] = (activations, activations)
    rows["VAE and text encoders (frozen, float32)"] = (frozen_bytes, frozen_bytes)
    totals = [sum(plans[kind].values()) + batch_size * activations + frozen_bytes for kind in ("ddp", "fsdp")]
    rows[f"total at batch {batch_size}"] = tuple(totals)
    unit = next((name for name, size in UNITS.items() if max(totals) >= size), "kB")
    lines += [f"| {unit} per process | DDP | FSDP |", "|---|---:|---:|"]
    lines += [f"| {name} | {ddp / UNITS[unit]:.2f} | {fsdp / UNITS[unit]:.2f} |" for name, (ddp, fsdp) in rows.items()]
    other, value = ("without", without) if gradient_checkpointing else ("with", with_checkpointing)
    lines.append(f"\nactivations per sample {other} gradient checkpointing: {value / UNITS[unit]:.2f} {unit}")
    return "\n".join(lines)
