"""What a training run will hold in memory per process, and its model FLOPs, before it runs: counted
on PyTorch's meta device (shapes without data: no weights, no time), under DDP and under FSDP.

Bytes per process (`memory_plan`):
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
                     weights), in the compute dtype, attention as a fused kernel keeps it (its output
                     and log-sum-exp, never the attention matrix); with gradient checkpointing, the
                     inputs of the checkpointed units, what is saved outside them, and the largest
                     unit's own (recomputed during the backward)
Not counted: the allocator's fragmentation, the CUDA context and communication buffers (a few GB).
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from model import UNet, UNetConfig

UNITS = {"GB": 1e9, "MB": 1e6, "kB": 1e3}
ROWS = ("weights", "gathered", "gradients", "optimizer")


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


@contextmanager
def fused_attention():
    """scaled_dot_product_attention as the fused (flash) kernel, whatever the device: on meta the
    default is the math one, which saves the attention matrix that GPUs never keep."""
    default = F.scaled_dot_product_attention

    def flash(q, k, v, **options):
        if options:
            return default(q, k, v, **options)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = default


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
            tensors = [a for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
            inputs.update(note(tensor, -1) for tensor in tensors if tensor.is_floating_point())
            current[0] = index
        return hook

    def leave(module, args, output):
        current[0] = -1

    handles = [h for index, unit in enumerate(units)
               for h in (unit.register_forward_pre_hook(enter(index)), unit.register_forward_hook(leave))]
    try:
        with fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
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


@dataclass(frozen=True)
class Sample:
    """One training sample's UNet input: chunk frames and context frames of latents, text tokens."""

    frames: int
    context_frames: int
    latent_size: int  # latent height and width
    text_tokens: int = 77


def unet_inputs(config: UNetConfig, sample: Sample, dtype: torch.dtype, device="meta") -> tuple:
    """The arguments of UNet.forward for a batch of one `sample`."""
    size = sample.latent_size
    options = dict(device=device, dtype=dtype)
    return (torch.randn(1, config.in_channels, sample.frames, size, size, **options),  # (1, 4, f, h, w)
            torch.tensor([500], device=device),
            torch.randn(1, sample.text_tokens, config.cross_attention_dim, **options),
            torch.randn(1, config.pooled_text_dim, **options),
            torch.randn(1, 6, **options),
            torch.randn(1, config.in_channels, sample.context_frames, size, size, **options))  # (1, 4, k, h, w)


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
    inputs = unet_inputs(config, sample, dtype)
    return saved_bytes(unet, unet_units(unet), lambda: unet(*inputs))


def training_flops(config: UNetConfig, temporal_only: bool, sample: Sample) -> int:
    """Model FLOPs of one sample's forward and backward (no recomputation), counted on meta; the
    backward computes no gradients for frozen weights."""
    unet = meta_unet(config, temporal_only)
    inputs = unet_inputs(config, sample, torch.float32)
    with FlopCounterMode(display=False) as counter:
        unet(*inputs).float().square().mean().backward()
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
