"""Memory modes: the pipeline's models on the accelerator only while they run.

`Offload(pipeline, mode, device)` keeps the weights on `offload_device` (the CPU) and moves them to
`device` (the accelerator) by hooks, just before they are needed:

- mode "model": each of the text encoders, the UNet and the VAE is moved to the device when it is
  about to run, and the one that ran before it is moved back. The UNet stays for the whole chunk
  (its steps run back to back), so a chunk costs two moves of the UNet (in, then out for the decode).
- mode "sequential", for the smallest cards: as "model", but of the UNet only its small stem (time
  and added embeddings, conv_in, conv_norm_out, conv_out) is moved as a whole; each level (the
  encoder's, the mid block, the decoder's) is moved in just before it runs and out right after,
  at every step; before the steps, each spatial transformer and each conditioner is moved in for
  the keys and values `prepare_chunk` makes of the text and the context, and out again.

The order of the moves, recorded in `events` as (name, "in" | "out"), is for a chunk:
1. ("text_encoders", "in") while the prompts are encoded;
2. ("text_encoders", "out"), ("unet", "in") at `prepare_chunk`;
   sequential: then for every spatial transformer and conditioner in module order, (its name,
   "in"), (its name, "out"), and at every step, for every level in the order it runs
   (down_blocks.0, ..., mid_block, up_blocks.0, ...), (its name, "in"), (its name, "out");
3. with a refiner, ("unet", "out"), ("refiner", "in") when it runs after the chunk's steps, then
   ("refiner", "out") before the next model;
4. ("unet", "out"), ("vae", "in") at the decode; the next chunk's `prepare_chunk` moves the VAE out
   and the UNet in again.
The inputs of a hooked module are moved to the device with it. Moving changes no number: outputs
equal those without offload (tests/test_memory_modes.py).
"""

import functools
from contextlib import contextmanager

import torch
from torch import nn

MODES = ("model", "sequential")


def to_device(values, device):
    """Tensors in nested tuples, lists and dicts moved to `device`; anything else as it is."""
    if isinstance(values, torch.Tensor):
        return values.to(device)
    if isinstance(values, (tuple, list)):
        return type(values)(to_device(v, device) for v in values)
    if isinstance(values, dict):
        return {k: to_device(v, device) for k, v in values.items()}
    return values


class Offload:
    """Hooks that move the pipeline's models between `offload_device` and `device` (see the module's
    docstring); `pipeline.device` is `device` while they are attached."""

    def __init__(self, pipeline, mode: str, device, offload_device="cpu"):
        if mode not in MODES:
            raise ValueError(f"--offload must be one of none, {', '.join(MODES)}, got {mode!r}")
        self.mode, self.device, self.offload_device = mode, torch.device(device), torch.device(offload_device)
        self.events: list[tuple[str, str]] = []
        self.active: str | None = None  # the model on the device
        self.parts: set[str] = set()  # sequential: the UNet's parts on the device (levels, or parts of one)
        unet = pipeline.unet
        levels = {name for name, _ in unet.named_children() if name in ("down_blocks", "mid_block", "up_blocks")}
        stem = [module for name, module in unet.named_children() if name not in levels]
        self.components = {
            "text_encoders": [pipeline.text_encoder],
            "unet": stem if mode == "sequential" else [unet],
            "vae": [pipeline.vae],
        }
        if pipeline.refiner is not None:  # it runs after the chunk's steps, before the decode
            self.components["refiner"] = [pipeline.refiner]
        for modules in self.components.values():
            for module in modules:
                module.to(self.offload_device)
        if mode == "sequential":
            unet.to(self.offload_device)
        text = pipeline.text_encoder
        self.hook_forward("text_encoders", [text.text_encoder, text.text_encoder_2])
        self.hook_forward("unet", [unet])
        self.hook_method("unet", unet, "prepare_chunk")
        self.hook_forward("vae", [pipeline.vae.encoder, pipeline.vae.quant_conv, pipeline.vae.post_quant_conv,
                                  pipeline.vae.decoder])
        if pipeline.refiner is not None:
            self.hook_forward("refiner", [pipeline.refiner])
        if mode == "sequential":
            self.hook_levels(unet)

    # Whole models.

    def activate(self, name: str) -> None:
        """Move the model `name` to the device and the one there before it back; nothing if it is there."""
        if self.active == name:
            return
        if self.active is not None:
            self.move(self.active, self.components[self.active], self.offload_device, "out")
        self.move(name, self.components[name], self.device, "in")
        self.active = name

    def move(self, name: str, modules: list[nn.Module], device: torch.device, direction: str) -> None:
        for module in modules:
            module.to(device)
        self.events.append((name, direction))

    def hook_forward(self, name: str, modules: list[nn.Module]) -> None:
        def before(module, args, kwargs):
            self.activate(name)
            return to_device(args, self.device), to_device(kwargs, self.device)

        for module in modules:
            module.register_forward_pre_hook(before, with_kwargs=True)

    def hook_method(self, name: str, owner: nn.Module, method: str) -> None:
        """owner.<method> runs after `activate(name)`, its tensor arguments on the device."""
        original = getattr(owner, method)

        @functools.wraps(original)
        def run(*args, **kwargs):
            self.activate(name)
            return original(*to_device(args, self.device), **to_device(kwargs, self.device))

        setattr(owner, method, run)

    # The UNet's parts, for "sequential".

    @contextmanager
    def resident(self, name: str, module: nn.Module):
        """`module` (the UNet's part `name`) on the device while inside, unless it is there already
        as a part of a level on the device."""
        if any(name == part or name.startswith(part + ".") for part in self.parts):
            yield
            return
        self.move_part(name, module, "in")
        try:
            yield
        finally:
            self.move_part(name, module, "out")

    def move_part(self, name: str, module: nn.Module, direction: str) -> None:
        (self.parts.add if direction == "in" else self.parts.discard)(name)
        self.move(name, [module], self.device if direction == "in" else self.offload_device, direction)

    def hook_levels(self, unet: nn.Module) -> None:
        """Each level in just before it runs, out right after; each spatial transformer and
        conditioner in and out around the keys and values that `prepare_chunk` makes with it."""
        names = {module: name for name, module in unet.named_modules()}
        for block, _ in unet.levels():
            name = names[block]

            def before(module, args, name=name):
                self.move_part(name, module, "in")

            def after(module, args, output, name=name):
                self.move_part(name, module, "out")

            block.register_forward_pre_hook(before)
            block.register_forward_hook(after)
            for sub_name, sub in block.named_modules():
                for method in ("text_keys_values", "prepare_context"):
                    if hasattr(sub, method):
                        self.wrap_resident(f"{name}.{sub_name}", sub, method)

    def wrap_resident(self, name: str, module: nn.Module, method: str) -> None:
        original = getattr(module, method)

        @functools.wraps(original)
        def run(*args, **kwargs):
            with self.resident(name, module):
                return original(*args, **kwargs)

        setattr(module, method, run)
