"""LoRAs merged into the UNet's and the text encoders' weights, at strengths that can change.

formats/lora_files.py reads a file's header and checks it against the model (its format, which of our
modules each of its modules updates, the shapes); here its tensors are read and merged:

    weight = original + sum over LoRAs of strength * (up @ down) * alpha / rank

computed in float32 (float64 for float64 weights) on the weight's device and cast to the weight's
dtype once. Strengths lie in -10..10 (lora_files.MAX_STRENGTH), and a merged weight must be finite
and at most MAX_WEIGHT in size: an alpha like 1e30, or factors whose product overflows, would make
black frames (or a checkpoint of 1e29 weights); such a merge is refused, naming the file, its
strength and alpha, and the weights keep the strengths they had. Each weight a LoRA
touches is recomputed from its kept original (a copy on the CPU) whenever a strength changes, so
strength 0 and `remove()` give the original weights back bit for bit, whatever came before, and a
strength reached twice gives the same weights twice. Without `keep_originals` (strengths fixed
for the whole run, as sample.py loads them when no timeline changes them) no copy is kept and the
strengths can be set once.

Merged weights rather than low-rank adds at every step (a hook computing x @ down^T @ up^T on every
call of every touched layer): a denoising step then costs exactly what it costs without a LoRA,
where the adds made the linear layers of an SDXL transformer block 5 to 34% slower at rank 32
(measured on a CPU). The price: the copy of the touched weights on the CPU (4.1 GiB in bf16 for a
LoRA of all 722 layers of SDXL's transformers) and a re-merge when a strength changes, at most once
per chunk and only while a timeline moves a strength (21 s for those 722 layers on one CPU thread;
on an accelerator the merge runs there).

    pipeline.load_loras(["style.safetensors"], [0.8])   # pipeline.py delegates to `MergedLoras.load`
    pipeline.loras.set_strengths([0.3])
    pipeline.loras.remove()
"""

import math
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from formats.lora_files import MAX_STRENGTH, LoraError, LoraFile, canonical_name, read_lora_file

TEXT_COMPONENTS = {"text_encoder", "text_encoder_2"}
# The largest merged weight taken, a judgement: trained weights are of order 1 (the baby's largest
# is 1.6); a weight merged beyond 1e4 comes from a broken file or strength, not from a style.
MAX_WEIGHT = 1e4


class Update(NamedTuple):
    """One LoRA module's low-rank update of one weight, float32 (or the file's float64) on the CPU."""

    down: torch.Tensor  # (rank, in * kh * kw)
    up: torch.Tensor  # (out, rank)
    scale: float  # alpha / rank (alpha / sqrt(rank) with rsLoRA)
    alpha: float  # as the file gives it (the rank where it gives none), for messages
    path: str  # the file, for messages


def pipeline_models(pipeline) -> dict[str, nn.Module]:
    return {"unet": pipeline.unet, "text_encoder": pipeline.text_encoder.text_encoder,
            "text_encoder_2": pipeline.text_encoder.text_encoder_2}


def model_layers(models: dict[str, nn.Module]) -> dict[str, dict[str, nn.Module]]:
    """component -> module name (`lora_files.canonical_name`) -> the linear and convolution layers
    that a LoRA may update, of the models "unet", "text_encoder" and "text_encoder_2"."""
    return {component: {canonical_name(component, name): module for name, module in model.named_modules()
                        if isinstance(module, (nn.Linear, nn.Conv2d))}
            for component, model in models.items()}


def check_loras(paths: list[str], models: dict[str, nn.Module]) -> list[LoraFile]:
    """Each file read and checked against the models' layers (meta-device models will do), before
    any tensor is read; LoraError naming the first bad one."""
    targets = {component: {name: tuple(layer.weight.shape) for name, layer in layers.items()}
               for component, layers in model_layers(models).items()}
    return [read_lora_file(path, targets, models["unet"].config) for path in paths]


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """float16 and bfloat16 factors in float32 (exactly), float32 and float64 as they are."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def read_updates(file: LoraFile) -> dict[tuple[str, str], Update]:
    """(component, module) -> Update of each module of a checked LoRA file; LoraError naming the
    file for a tensor it cannot read or that holds a non-finite number."""
    updates = {}
    try:
        with safe_open(file.path, framework="pt") as handle:
            for module in file.modules:
                down, up = (upcast(handle.get_tensor(key)) for key in (module.down, module.up))
                rank = down.shape[0]
                alpha = handle.get_tensor(module.alpha).item() if isinstance(module.alpha, str) else module.alpha
                alpha = float(rank if alpha is None else alpha)
                if not (math.isfinite(alpha) and down.isfinite().all() and up.isfinite().all()):
                    raise LoraError(f"LoRA {file.path}: {module.down} / {module.up} / alpha hold non-finite numbers")
                scale = alpha / (math.sqrt(rank) if module.rslora else rank)
                updates[module.component, module.module] = Update(down.flatten(1), up.flatten(1), scale, alpha,
                                                                  file.path)
    except (OSError, SafetensorError, RuntimeError) as error:
        raise LoraError(f"LoRA {file.path} cannot be read: {error}") from None
    return updates


class MergedLoras:
    """LoRA files merged into a pipeline's layers; `strengths[i]` is file i's strength."""

    def __init__(self, paths: list[str], layers: dict[tuple[str, str], nn.Module],
                 updates: list[dict[tuple[str, str], Update]], keep_originals: bool = True):
        self.paths = list(paths)
        self.layers = layers  # (component, module) -> layer, for every module some LoRA updates
        self.updates = updates  # per file: (component, module) -> Update
        self.strengths = [0.0] * len(paths)  # what the weights hold now
        self.keep_originals = keep_originals
        self.originals = {key: layer.weight.detach().to("cpu", copy=True) for key, layer in layers.items()
                          } if keep_originals else None
        self.merged_once = False

    @classmethod
    def load(cls, pipeline, paths: list[str], strengths: list[float] | None = None,
             keep_originals: bool = True, updates: list[dict] | None = None) -> "MergedLoras":
        """Read and check every file (LoraError naming the first bad one, before any weight changes),
        then merge them at `strengths` (default 1 each); `updates`: the files' `read_updates`, where
        the caller read them already (checked against models of the same layers). A pipeline holding
        LoRAs at a strength other than 0 is refused: the weights kept as originals would not be the model's."""
        if pipeline.loras is not None and any(pipeline.loras.strengths):
            raise ValueError("the pipeline holds LoRAs already: load every file in one call, or remove() them first")
        models = pipeline_models(pipeline)
        layers = model_layers(models)
        if updates is None:
            updates = [read_updates(file) for file in check_loras(paths, models)]
        touched = {key: layers[key[0]][key[1]] for file in updates for key in file}
        merged = cls(paths, touched, updates, keep_originals)
        merged.set_strengths([1.0] * len(paths) if strengths is None else strengths)
        return merged

    @torch.no_grad()
    def set_strengths(self, strengths: list[float]) -> set[str]:
        """Recompute every weight whose LoRAs' strengths change; returns the components changed
        ("unet", "text_encoder", "text_encoder_2": prompts must then be encoded again)."""
        strengths = [float(s) for s in strengths]
        if len(strengths) != len(self.paths) or not all(abs(s) <= MAX_STRENGTH for s in strengths):
            raise ValueError(f"strengths must be {len(self.paths)} finite numbers from -{MAX_STRENGTH:g} to "
                             f"{MAX_STRENGTH:g}, one per LoRA, got {strengths}")
        changed_files = [i for i, (old, new) in enumerate(zip(self.strengths, strengths)) if old != new]
        if not changed_files:
            return set()
        if not self.keep_originals and self.merged_once:
            raise ValueError("these LoRAs were merged without keep_originals: their strengths cannot change")
        keys = {key for i in changed_files for key in self.updates[i]}
        merged = []
        try:
            for key in keys:
                self.merge(key, strengths)
                merged.append(key)
        except LoraError:
            if self.keep_originals:  # the weights back at the strengths they had
                for key in merged:
                    self.merge(key, self.strengths)
            raise
        self.strengths, self.merged_once = strengths, True
        return {component for component, _ in keys}

    def merge(self, key: tuple[str, str], strengths: list[float]) -> None:
        """One layer's weight: its original plus each LoRA's update at its strength; LoraError, the
        weight unchanged, naming each LoRA at its strength and alpha if the result is not finite or
        larger than MAX_WEIGHT (and larger than the original's largest) in the weight's dtype."""
        weight = self.layers[key].weight
        original = weight if self.originals is None else self.originals[key]
        terms = [(s, file[key]) for s, file in zip(strengths, self.updates) if key in file and s != 0]
        if not terms:
            weight.copy_(original)
            return
        dtype = torch.promote_types(weight.dtype, torch.float32)  # float64 weights stay float64
        total = original.to(weight.device, dtype).flatten(1)  # (out, in * kh * kw)
        for strength, update in terms:
            up, down = update.up.to(weight.device, dtype), update.down.to(weight.device, dtype)
            factor = strength * update.scale
            if not abs(factor) <= torch.finfo(dtype).max:
                raise LoraError(merge_problem(terms, key, f"a scale of {factor:.3g}, beyond {dtype}'s range,"))
            total = total.addmm(up, down, alpha=factor)  # (out, rank) @ (rank, in * kh * kw)
        total = total.reshape(weight.shape).to(weight.dtype)
        largest = total.abs().max().item()
        if not largest <= MAX_WEIGHT and not largest <= original.abs().max().item():
            size = ("non-finite weights (inf or nan)" if not math.isfinite(largest) else
                    f"weights of {largest:.3g} (beyond {MAX_WEIGHT:g}, which no model holds)")
            raise LoraError(merge_problem(terms, key, f"{size} in {weight.dtype}"))
        weight.copy_(total)

    def remove(self) -> None:
        """Every weight back to its original, bit for bit."""
        self.set_strengths([0.0] * len(self.paths))


def merge_problem(terms: list[tuple[float, Update]], key: tuple[str, str], what: str) -> str:
    """'LoRA F at strength S (alpha A, rank R) makes WHAT for COMPONENT MODULE', every LoRA of the weight."""
    loras = " with ".join(f"LoRA {update.path} at strength {strength:g} (alpha {update.alpha:g}, rank "
                          f"{update.down.shape[0]})" for strength, update in terms)
    return (f"{loras} makes {what} for {key[0]} {key[1]}: lower the strength, or the file is damaged "
            f"(its alpha or its weights)")
