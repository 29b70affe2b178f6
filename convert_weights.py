"""Import SDXL and original video-model weights into this codebase's checkpoint folder.

    python convert_weights.py SRC OUT [--video-unet DIR] [--tokenizers DIR] [--configs DIR]
                                      [--dtype fp32|fp16|bf16] [--lora FILE[:STRENGTH]]... [--overwrite]
                                      [--revision REV] [--unet FILE] [--schedule video|sdxl|release]

SRC is one of:
- an SDXL folder in diffusers' layout (unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
  tokenizer_2/), weights as .safetensors or .bin, fp32 or fp16, fp16 variants and shards included;
- a single-file SDXL checkpoint in the original layout (`sd_xl_base_1.0.safetensors`, fine-tunes).
  It holds no configs and no tokenizers: the configs come from `--configs` (SDXL base 1.0's copy in
  configs/ by default), the tokenizers from the SDXL folder given with `--tokenizers`;
- a full folder of the original video release: diffusers' layout with a video UNet in the original
  design's layout (docs/SEED_FORMAT.md: `.spatial_conv` wrappers, `temp_attentions`, `temp_cond_attentions`),
  and FlowingFrames' `refiner/` when it has one (refiner.py; its sizes read from its config.json and weights).
`--video-unet DIR` takes the whole UNet, spatial and temporal weights, from such a video UNet next to
an SDXL SRC (the video UNet's spatial weights were trained with its temporal ones, so they win).
`--unet FILE` takes the UNet from one file holding a UNet alone, a few-step one such as SDXL-Lightning's
or DMD2's (.safetensors or a .bin, in diffusers' names or the original layout's), with SRC's UNet
config and fresh temporal modules; `--schedule sdxl` stores SDXL's own noise schedule (trailing
timesteps, Euler), which few-step SDXL models and LoRAs need (docs/convert.md, "Few-step SDXL models").
SRC, `--video-unet` and `--tokenizers` may also be hub names (`stabilityai/stable-diffusion-xl-base-1.0`,
`motexture/FlowingFrames`; SRC at `--revision`): only the files read are fetched into huggingface_hub's
cache, or taken from it offline (formats/hub.py). A local path that exists wins over a hub name.

OUT is written by `StableDiffusionXLVideoPipeline.save_pretrained` (pipeline.py): UNet and VAE as
safetensors, text encoders and tokenizers in transformers' layout, and a config.json with the model
configs, the scheduler settings and sample.py's defaults of the original inference setup, and the
provenance of every part.
A UNet without temporal weights gets fresh ones with zero output projections and per-frame
GroupNorm, so it makes images frame by frame exactly as SDXL does; an imported video UNet gets
GroupNorm across the chunk's frames, as it was trained.
`--lora FILE[:STRENGTH]` (repeatable, strength 1 by default, from -10 to 10) merges a LoRA (kohya-ss or
diffusers/PEFT, formats/lora_files.py) into the UNet and text encoders of OUT, in the stored dtype; config.json's
provenance records each file, its strength and SHA-256. Each file is checked against the models before any
weight is read; merged weights that are not finite or beyond what a model holds (formats/lora.py) are refused
and nothing is written.

Every key and shape is checked before anything is written, and a source file that cannot be read
(truncated, not JSON) is named; pickled .bin files are read with `torch.load(weights_only=True)`
only (memory-mapped, but for the legacy non-zip format, which is read whole). OUT is written to a
hidden sibling folder named with the process id, flushed to disk, and moved into place when complete,
so a failure (a full disk included) loses nothing; the next run removes what a killed one left.
`--overwrite` replaces only a checkpoint folder or an empty folder, and never one that holds an input
or lies inside one.
"""

import argparse
import os
import pickle
import re
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from formats.hub import HubError, is_hub_name, local_sources
from formats.lora import MergedLoras, check_loras, read_updates
from formats.lora_files import MAX_STRENGTH, LoraError, file_sha256
from model import NUM_TIME_IDS, UNet, UNetConfig
from infra.checkpoint import CHECKPOINT_FILES, DTYPES, load_checkpoint_config
from infra.cli import OneLineParser
from infra.files import fsync, listing, process_alive, read_json_object
from pipeline import StableDiffusionXLVideoPipeline
from refiner import Refiner, config_from_release
from scheduler import SchedulerConfig
from formats.sdxl_layout import Rule, clip_rules, single_file_rules, unet_rules
from text import SUBFOLDERS, TextEncoder
from vae import AutoencoderKL, VAEConfig
from video_settings import RECIPES, lora_given_twice, parse_lora

SDXL_CONFIGS = Path(__file__).resolve().parent / "configs" / "sdxl-base-1.0"
MODEL_CLASSES = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                 "text_encoder_2": CLIPTextModelWithProjection}
TOKENIZERS = ("tokenizer", "tokenizer_2")
FRESH_SEED = 0
# sample.py's defaults for a converted model without a refiner: the seed text's loop's chunk, context,
# steps and guidance (video_settings.RECIPES["seed"]: its other values are Settings' defaults).
SAMPLE_DEFAULTS = {"frames": 4, "context_frames": 4, "steps": 50, "guidance": 9.0}
SHOWN = 5  # names listed per problem
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
UNET_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # --unet FILE; pickles read weights_only
# The noise schedules OUT may sample with (--schedule), as its provenance names them. Few-step SDXL
# models (Lightning, LCM-LoRA, DMD2, Turbo, Hyper-SD) are distilled on SDXL's own: at timestep 999
# its sigma is 14.6, the video model's 21.1.
SCHEDULES = {
    "video": "SchedulerConfig.video_model(): the original video model's inference setup",
    "sdxl": "SDXL base 1.0's schedule (SchedulerConfig.sdxl_base()), trailing timesteps, Euler: what few-step "
            "SDXL models are distilled on",
    "release": "SRC's scheduler/scheduler_config.json with trailing timesteps and SDE DPM-Solver++, as the published "
               "release's run.py builds its scheduler",
}
RELEASE_SCHEDULER = Path("scheduler") / "scheduler_config.json"


class ConversionError(ValueError):
    """Bad input: raised before anything is written."""


# 1. Weights, read lazily: names and shapes first, one tensor at a time when building.


ZIP_SIGNATURE = b"PK\x03\x04"  # how torch.save's zip format begins; the legacy format is a pickle stream
WEIGHTS_UNPICKLER = "WeightsUnpickler error:"  # in torch.load's error when weights_only refuses what a file holds
# What torch.load raises for a damaged or foreign file (a legacy one: whatever its unpickler meets).
TORCH_LOAD_ERRORS = (OSError, RuntimeError, EOFError, LookupError, ValueError, pickle.UnpicklingError)


class LazyTensor(NamedTuple):
    name: str  # in the source, for messages
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]


# A component folder's weight files, preferred first: safetensors before pickles, full precision
# before the fp16 variant, one file before shards (diffusers' and transformers' names).
WEIGHT_NAMES = tuple(
    name
    for extension, stems in (("safetensors", ("diffusion_pytorch_model", "model")),
                             ("bin", ("diffusion_pytorch_model", "pytorch_model")))
    for variant in ("", ".fp16")
    for stem in stems
    for name in (f"{stem}{variant}.{extension}", f"{stem}.{extension}.index{variant}.json")
)


def shown(value) -> str:
    """A value in a message: its repr on one line, cut at 40 characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 40 else text[:37] + "..."


def load_reason(error: Exception) -> str:
    """Why torch.load failed, in one line: what the weights-only unpickler refused, else the first sentence."""
    text = str(error).split(WEIGHTS_UNPICKLER)[-1].strip()
    return text.split(". ")[0].splitlines()[0] if text else type(error).__name__


def read_pickled(path: Path):
    """What a torch.save file holds, unpickled weights_only: the zip format memory-mapped, a legacy
    (non-zip) file, one pickle stream that torch cannot map, read whole. ConversionError naming `path`."""
    try:
        with open(path, "rb") as file:
            legacy = file.read(len(ZIP_SIGNATURE)) != ZIP_SIGNATURE
    except OSError as error:
        raise ConversionError(f"{path} cannot be read ({error.strerror})") from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=not legacy)
    except TORCH_LOAD_ERRORS as error:
        if WEIGHTS_UNPICKLER in str(error):
            raise ConversionError(f"{path} holds more than tensors, which is not unpickled: "
                                  f"{load_reason(error)}") from error
        if legacy:
            reason = type(error).__name__ + (f": {load_reason(error)}" if str(error) else "")
            raise ConversionError(f"{path} is not in torch.save's zip format, and cannot be read as a legacy (non-zip) "
                                  f"torch file either ({reason}); is it truncated?") from error
        raise ConversionError(f"{path} cannot be read as a torch.save zip file ({load_reason(error)}); "
                              "is it truncated?") from error


def read_weights(path: Path) -> dict[str, LazyTensor]:
    """The tensors of a .safetensors file, a .bin file (weights_only; memory-mapped unless in the
    legacy non-zip format) or a shard index.

    Both formats are checked whole when opened (the safetensors header against the file size, the
    zip directory at the end of a .bin), so a truncated file fails here, before anything is built."""
    if path.name.endswith(".json"):
        weight_map = load_json(path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{path} has no weight_map object of a shard index")
        shards = {name: read_weights(path.parent / name) for name in set(weight_map.values())}
        return {key: shards[name][key] for key, name in weight_map.items()}
    if path.suffix == ".safetensors":
        try:
            handle = safe_open(path, framework="pt")
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except (OSError, SafetensorError) as error:
            raise ConversionError(f"{path} cannot be read as safetensors ({error}); is it truncated?") from error
        return {key: LazyTensor(key, shape, lambda key=key: handle.get_tensor(key)) for key, shape in shapes.items()}
    state = read_pickled(path)
    if not isinstance(state, dict):
        raise ConversionError(f"{path} is not a state dict (tensors by name): it holds a {type(state).__name__}")
    for key, value in state.items():
        if not (isinstance(key, str) and isinstance(value, torch.Tensor)):
            raise ConversionError(f"{path} is not a state dict (tensors by name): it holds {shown(key)} "
                                  f"({type(key).__name__}) -> {type(value).__name__}")
    return {key: LazyTensor(key, tuple(value.shape), lambda value=value: value) for key, value in state.items()}


def find_weights(folder: Path) -> Path:
    """The preferred weight file of a component folder."""
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise ConversionError(f"{folder} holds no weights; looked for {', '.join(WEIGHT_NAMES[:4])}, ...")


# 2. Configs: diffusers' and the original video UNet's config.json into ours.

# Settings that must have these values, because model.py and vae.py implement only SDXL's;
# checked where a config.json has them. Keys in neither table nor read below are refused.
UNET_REQUIRED_VALUES = {
    "act_fn": "silu", "addition_embed_type": "text_time", "attention_type": "default",
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_norm": None, "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "num_attention_heads": None,
    "num_class_embeds": None, "only_cross_attention": False, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None, "time_cond_proj_dim": None, "time_embedding_act_fn": None,
    "time_embedding_dim": None, "time_embedding_type": "positional", "timestep_post_act": None,
    "use_linear_projection": True,
}
# Inference-only or precision-only settings, and the temporal depth (read from the weights instead).
UNET_INERT_KEYS = {"addition_embed_type_num_heads", "dropout", "upcast_attention", "temporal_layers_per_block"}
# The settings read, with the type of their values ([int]: a list of ints; a tuple: any of these).
UNET_READ_KEYS = {
    "in_channels": int, "out_channels": int, "block_out_channels": [int], "layers_per_block": int,
    "transformer_layers_per_block": (int, [int]), "attention_head_dim": (int, [int]), "cross_attention_dim": int,
    "addition_time_embed_dim": int, "projection_class_embeddings_input_dim": int, "norm_num_groups": int,
    "norm_eps": float, "sample_size": int, "down_block_types": [str], "up_block_types": [str],
}
DOWN_BLOCK_HAS_ATTENTION = {"DownBlock2D": False, "CrossAttnDownBlock2D": True,
                            "DownBlock3D": False, "CrossAttnDownBlock3D": True}
# What `attention_head_dim` means (docs/SEED_FORMAT.md): heads per level in diffusers' SDXL config,
# channels per head in the original video UNet's config: (level width, value) -> channels per head.
HEAD_DIM_FROM = {"diffusers": lambda width, value: width // value, "original": lambda width, value: value}

VAE_REQUIRED_VALUES = {
    "act_fn": "silu", "latents_mean": None, "latents_std": None, "shift_factor": None,
    "mid_block_add_attention": True, "use_quant_conv": True, "use_post_quant_conv": True,
}
VAE_FIELDS = {field.name for field in fields(VAEConfig)}
VAE_READ_KEYS = VAE_FIELDS | {"down_block_types", "up_block_types"}
VAE_INERT_KEYS = {"sample_size"}


def load_json(path: Path) -> dict:
    """A JSON object from a file; ConversionError naming the file if it is missing, not JSON or not an object."""
    try:
        return read_json_object(path)
    except ValueError as error:
        raise ConversionError(str(error)) from error


def has_type(value, kind) -> bool:
    """Whether `value` is of `kind`: a type (float takes an int too; bool is no int), [type] for a
    list of them, a tuple for any of several kinds."""
    if isinstance(kind, tuple):
        return any(has_type(value, option) for option in kind)
    if isinstance(kind, list):
        return isinstance(value, list) and all(has_type(item, kind[0]) for item in value)
    kinds = (int, float) if kind is float else kind
    return isinstance(value, kinds) and not isinstance(value, bool)


def check_config(values: dict, read: set, required: dict, inert: set, path: Path) -> None:
    """ConversionError naming `path` for a setting we do not implement or a key we do not know."""
    problems = [f"{key}={value!r} (only {required[key]!r} is supported)"
                for key, value in values.items() if key in required and value != required[key]]
    problems += [f"unknown key {key!r}" for key in values
                 if key not in read | required.keys() | inert and not key.startswith("_")]
    if problems:
        raise ConversionError(f"{path}: " + "; ".join(problems))


def per_level(value, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def unet_spatial_config(path: Path, layout: str) -> dict:
    """UNetConfig's spatial fields from a UNet config.json in `layout` ("diffusers" or "original")."""
    values = load_json(path)
    check_config(values, set(UNET_READ_KEYS), UNET_REQUIRED_VALUES, UNET_INERT_KEYS, path)
    if missing := sorted(UNET_READ_KEYS.keys() - values.keys()):
        raise ConversionError(f"{path} lacks {missing}")
    if wrong := [f"{key}={values[key]!r}" for key, kind in UNET_READ_KEYS.items() if not has_type(values[key], kind)]:
        raise ConversionError(f"{path}: values of the wrong type: {', '.join(wrong)}")
    widths, down, up = values["block_out_channels"], values["down_block_types"], values["up_block_types"]
    mirrored = [name.replace("Down", "Up") for name in reversed(down)]
    if any(name not in DOWN_BLOCK_HAS_ATTENTION for name in down) or up != mirrored:
        raise ConversionError(f"{path}: block types {down} / {up} are not an SDXL-style UNet's")
    depths = [depth if DOWN_BLOCK_HAS_ATTENTION[name] else 0
              for name, depth in zip(down, per_level(values["transformer_layers_per_block"], len(widths)))]
    head_values = per_level(values["attention_head_dim"], len(widths))
    head_dims = {HEAD_DIM_FROM[layout](width, value)
                 for width, value, depth in zip(widths, head_values, depths) if depth}
    if len(head_dims) != 1:
        raise ConversionError(f"{path}: attention heads of different widths per level are not supported")
    time_ids_dim = NUM_TIME_IDS * values["addition_time_embed_dim"]
    return dict(
        in_channels=values["in_channels"], out_channels=values["out_channels"], block_out_channels=tuple(widths),
        layers_per_block=values["layers_per_block"], transformer_layers_per_block=tuple(depths),
        head_dim=head_dims.pop(), cross_attention_dim=values["cross_attention_dim"],
        pooled_text_dim=values["projection_class_embeddings_input_dim"] - time_ids_dim,
        addition_time_embed_dim=values["addition_time_embed_dim"], norm_num_groups=values["norm_num_groups"],
        norm_eps=values["norm_eps"], sample_size=values["sample_size"],
    )


def fresh_temporal_config(spatial: dict) -> dict:
    """The original design's temporal modules (two blocks with a second self-attention, one
    conditioner block), the conditioner twice as wide as the widest level (2560 at SDXL's size),
    with SDXL's per-frame GroupNorm: fresh modules then leave SDXL's images unchanged."""
    return dict(temporal_layers=2, temporal_double_self_attention=True, conditioner_layers=1,
                conditioner_dim=2 * max(spatial["block_out_channels"]), groupnorm_scope="frame")


def imported_temporal_config(shapes: dict[str, tuple]) -> dict:
    """Temporal depth, second self-attention and conditioner width, read from a video UNet's keys
    and shapes; GroupNorm across the chunk's frames, as the original weights were trained."""
    def count_blocks(module: str) -> int:
        pattern = rf"\.{module}\.\d+\.transformer_blocks\.(\d+)\."
        return 1 + max((int(m[1]) for key in shapes if (m := re.search(pattern, key))), default=-1)

    conv_in = r"\.temp_cond_attentions\.\d+\.conv_in\.weight$"
    return dict(
        temporal_layers=count_blocks("temp_attentions"),
        temporal_double_self_attention=any(re.search(r"\.temp_attentions\..*\.attn2\.", key) for key in shapes),
        conditioner_layers=count_blocks("temp_cond_attentions"),
        conditioner_dim=max((shape[0] for key, shape in shapes.items() if re.search(conv_in, key)), default=0),
        groupnorm_scope="chunk",
    )


def temporal_depths(shapes: dict[str, tuple], levels: int) -> dict[str, int]:
    """The temporal transformers' depth at each place of a video UNet's keys, {"level 1": 2, ...,
    "mid block": 2}, levels numbered as in the original's `temporal_layers_per_block` (down block L
    and up block levels-1-L are level L; the mid block takes the last entry)."""
    depths = defaultdict(int)
    pattern = r"(down_blocks\.|up_blocks\.|mid_block)(\d*)\.?temp_attentions\.\d+\.transformer_blocks\.(\d+)\."
    for key in shapes:
        if not (match := re.match(pattern, key)):
            continue
        block, index = match[1], int(match[2] or 0)
        level = index if block == "down_blocks." else levels - 1 - index
        place = "mid block" if block == "mid_block" else f"level {level}"
        depths[place] = max(depths[place], int(match[3]) + 1)
    return dict(sorted(depths.items(), key=lambda item: (item[0] == "mid block", len(item[0]), item[0])))


def check_temporal_depths(shapes: dict[str, tuple], levels: int, path: Path) -> None:
    """ConversionError naming `path` when the temporal depth differs per level: UNetConfig has one
    `temporal_layers` for every level."""
    depths = temporal_depths(shapes, levels)
    if len(set(depths.values())) > 1:
        found = ", ".join(f"{place}: {depth}" for place, depth in depths.items())
        raise ConversionError(f"{path}: temporal_layers_per_block differs per level, which is not supported "
                              f"(temporal blocks at {found}); UNetConfig.temporal_layers is one depth for every level")


def vae_config(path: Path) -> VAEConfig:
    values = load_json(path)
    check_config(values, VAE_READ_KEYS, VAE_REQUIRED_VALUES, VAE_INERT_KEYS, path)
    blocks = set(values.get("down_block_types", [])) | set(values.get("up_block_types", []))
    if not blocks <= {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
        raise ConversionError(f"{path}: block types {sorted(blocks)} are not SDXL's VAE's")
    return make_config(VAEConfig, path, **{key: values[key] for key in values.keys() & VAE_FIELDS})


def make_config(config_class, path: Path, **values):
    """The config, or a ConversionError naming the file the values came from."""
    try:
        return config_class(**values)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{path}: {error}") from error


def meta_model(component: str, config, path: Path) -> nn.Module:
    """The component built on the meta device: its state dict gives the expected keys and shapes.
    ConversionError naming `path`, the config's file, for settings it cannot be built with."""
    try:
        with torch.device("meta"):
            return MODEL_CLASSES[component](config)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConversionError(f"{path}: the {component} cannot be built from it: {error}") from error


def image_unet_model(path: Path) -> nn.Module:
    """An SDXL UNet from diffusers' config.json, with fresh temporal modules to come."""
    spatial = unet_spatial_config(path, "diffusers")
    return meta_model("unet", make_config(UNetConfig, path, **spatial, **fresh_temporal_config(spatial)), path)


def vae_and_text_models(configs: Path) -> dict[str, nn.Module]:
    """The VAE and both text encoders from the config.json files of a folder in diffusers' layout."""
    paths = {name: configs / name / "config.json" for name in ("vae", "text_encoder", "text_encoder_2")}
    built = {"vae": vae_config(paths["vae"])}
    for name in ("text_encoder", "text_encoder_2"):
        values = load_json(paths[name])
        try:
            built[name] = CLIPTextConfig.from_dict(values)
        except (TypeError, ValueError) as error:
            raise ConversionError(f"{paths[name]}: {error}") from error
    return {name: meta_model(name, config, paths[name]) for name, config in built.items()}


# 3. Key mapping: one table-driven function; the tables for each layout are in formats/sdxl_layout.py.

TRANSFORMS = {
    "copy": lambda t: t,
    "linear": lambda t: t.reshape(t.shape[0], -1) if t.ndim > 2 else t,  # 1x1 conv weight -> linear
    "transpose": lambda t: t.T.contiguous(),
    "q": lambda t: t.chunk(3)[0].clone(),  # fused in_proj: q, k, v stacked on dim 0
    "k": lambda t: t.chunk(3)[1].clone(),
    "v": lambda t: t.chunk(3)[2].clone(),
}
COPY = (("", "copy"),)


class Mapped(NamedTuple):
    parts: dict[str, dict[str, LazyTensor]]  # component -> our key -> tensor
    unknown: list[str]  # source keys that no rule takes, or that land on a key already taken
    dropped: list[str]  # source keys of buffers and parameters that no model here uses


def transformed(tensor: LazyTensor, transform: str) -> LazyTensor:
    function = TRANSFORMS[transform]
    shape = tuple(function(torch.empty(tensor.shape, device="meta")).shape)
    return LazyTensor(tensor.name, shape, lambda: function(tensor.read()))


def map_weights(weights: dict[str, LazyTensor], rules: list[Rule]) -> Mapped:
    """Apply to every source key the rule with the longest matching `source` prefix."""
    rules = sorted(rules, key=lambda rule: len(rule.source), reverse=True)
    mapped = Mapped(defaultdict(dict), [], [])
    for key, tensor in weights.items():
        rule = next((rule for rule in rules if key.startswith(rule.source)), None)
        if rule is None or rule.component is None:
            (mapped.unknown if rule is None else mapped.dropped).append(key)
            continue
        rest = key[len(rule.source):]
        fragment = max((f for f in rule.inner if rest.startswith(f)), key=len, default="")
        for new_fragment, transform in rule.inner.get(fragment, COPY):
            name = rule.target + new_fragment + rest[len(fragment):]
            if name in mapped.parts[rule.component]:
                mapped.unknown.append(f"{key} (lands on {name}, already taken)")
            else:
                mapped.parts[rule.component][name] = transformed(tensor, transform)
    return mapped


# 4. Reading a source: each component as a model on the meta device, weights under our names, origin.


@dataclass
class Part:
    """One component of the checkpoint: its model, its source tensors under our names, their origin."""

    model: nn.Module  # on the meta device until built
    weights: dict[str, LazyTensor]
    origin: str
    fresh_temporal: bool = False  # temporal modules are made fresh, not read


def is_original_video_layout(weights: dict[str, LazyTensor]) -> bool:
    return any(".spatial_conv." in key or ".temp_attentions." in key for key in weights)


def read_video_unet(folder: Path) -> Part:
    """A video UNet in the original layout: spatial and temporal weights, `.spatial_conv` stripped."""
    path = find_weights(folder)
    weights = {key.replace(".spatial_conv.", "."): tensor for key, tensor in read_weights(path).items()}
    spatial = unet_spatial_config(folder / "config.json", "original")
    shapes = {key: tensor.shape for key, tensor in weights.items()}
    check_temporal_depths(shapes, len(spatial["block_out_channels"]), path)
    temporal = imported_temporal_config(shapes)
    config = make_config(UNetConfig, folder / "config.json", **spatial, **temporal)
    return Part(meta_model("unet", config, folder / "config.json"), weights, f"{path} (original video layout)")


def read_refiner(folder: Path) -> Part:
    """FlowingFrames' refiner/: its sizes from its config.json and weights (`config_from_release`),
    its weights under their own names, which are ours."""
    path = find_weights(folder)
    weights, values = read_weights(path), load_json(folder / "config.json")
    try:
        config = config_from_release(values, {key: tensor.shape for key, tensor in weights.items()},
                                     str(folder / "config.json"), str(path))
    except ValueError as error:
        raise ConversionError(str(error)) from None
    with torch.device("meta"):
        return Part(Refiner(config), weights, str(path))


def read_unet_folder(folder: Path) -> Part:
    """diffusers' SDXL UNet (temporal modules to be made fresh) or a video UNet in the original layout."""
    path = find_weights(folder)
    weights = read_weights(path)
    if is_original_video_layout(weights):
        return read_video_unet(folder)
    return Part(image_unet_model(folder / "config.json"), weights, str(path), fresh_temporal=True)


def read_unet_file(path: Path, source: Path, configs) -> Part:
    """`--unet FILE`: a UNet alone in place of SRC's, such as a few-step one (SDXL-Lightning's
    `sdxl_lightning_4step_unet.safetensors`, DMD2's `dmd2_sdxl_4step_unet_fp16.bin`), in diffusers'
    names (a UNet2DConditionModel's state dict) or the original layout's (`input_blocks.`, with or
    without `model.diffusion_model.`), built with SRC's UNet config; temporal modules made fresh."""
    folder = source / "unet" if source.is_dir() else Path(configs or SDXL_CONFIGS) / "unet"
    if source.is_dir() and is_original_video_layout(read_weights(find_weights(folder))):
        raise ConversionError(f"--unet {path} replaces an SDXL UNet, but SRC {source} holds a video UNet: "
                              "give an SDXL SRC")
    weights = read_weights(path)
    model = image_unet_model(folder / "config.json")
    if is_original_video_layout(weights):
        raise ConversionError(f"--unet {path} is a video UNet in the original layout: give its folder with "
                              "--video-unet")
    if any(key.startswith(("first_stage_model.", "conditioner.")) for key in weights):
        raise ConversionError(f"--unet {path} is a whole single-file checkpoint (VAE and text encoders too): "
                              "give it as SRC, with --tokenizers")
    if "conv_in.weight" in weights:
        return Part(model, weights, f"{path} (a UNet alone, diffusers' names)", fresh_temporal=True)
    prefix = next((p for p in ("model.diffusion_model.", "") if f"{p}input_blocks.0.0.weight" in weights), None)
    if prefix is None:
        raise ConversionError(f"--unet {path} holds no SDXL UNet: it has neither conv_in.weight (diffusers' names) "
                              f"nor input_blocks.0.0.weight (the original layout's); its keys start "
                              f"{', '.join(list(weights)[:3])}")
    mapped = map_weights(weights, unet_rules(model.config, prefix))
    if mapped.unknown:
        raise ConversionError(f"--unet {path}: {listing('keys of no UNet module', mapped.unknown, SHOWN)}")
    return Part(model, mapped.parts["unet"], f"{path} (a UNet alone, the original layout's names)", fresh_temporal=True)


def read_diffusers_folder(folder: Path, unet: Part | None) -> tuple[dict[str, Part], Mapped]:
    """An SDXL folder in diffusers' layout or the original release's folder (its UNet unless given)."""
    parts = {"unet": unet or read_unet_folder(folder / "unet")}
    if (folder / "refiner").is_dir():
        parts["refiner"] = read_refiner(folder / "refiner")
    mapped = Mapped({}, [], [])
    for name, model in vae_and_text_models(folder).items():
        path = find_weights(folder / name)
        rules = clip_rules(name, model, "") if name.startswith("text") else [Rule("", name)]
        component = map_weights(read_weights(path), rules)
        parts[name] = Part(model, component.parts[name], str(path))
        mapped.unknown.extend(component.unknown)
        mapped.dropped.extend(component.dropped)
    return parts, mapped


def read_single_file(path: Path, configs: Path, unet: Part | None) -> tuple[dict[str, Part], Mapped]:
    """An original single-file SDXL checkpoint, for the component configs in `configs`."""
    models = vae_and_text_models(configs)
    if unet is None:
        models["unet"] = image_unet_model(configs / "unet" / "config.json")
    mapped = map_weights(read_weights(path), single_file_rules(models))
    prefixes = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                "text_encoder": "conditioner.embedders.0.transformer.",
                "text_encoder_2": "conditioner.embedders.1.model."}
    parts = {name: Part(model, mapped.parts.get(name, {}), f"{path} ({prefixes[name]}*)", name == "unet")
             for name, model in models.items()}
    return {"unet": unet, **parts} if unet else parts, mapped


# 5. Checks, all reported together.


def key_problems(name: str, part: Part) -> list[str]:
    """Missing keys, unknown keys and shape mismatches of one component."""
    expected = {key: tuple(value.shape) for key, value in part.model.state_dict().items()
                if not (part.fresh_temporal and ".temp_" in key)}
    given = part.weights
    found = {
        "missing keys": [key for key in expected if key not in given],
        "unknown keys": [given[key].name for key in given if key not in expected],
        "shape mismatches": [f"{given[key].name} is {given[key].shape}, the model needs {expected[key]}"
                             for key in given if key in expected and given[key].shape != expected[key]],
    }
    return [f"{name}: {listing(what, names, SHOWN)}" for what, names in found.items() if names]


def consistency_problems(parts: dict[str, Part]) -> list[str]:
    """Widths that the components must agree on."""
    unet, vae, text, text_2 = (parts[name].model.config for name in MODEL_CLASSES)
    pairs = [
        ("UNet cross_attention_dim", unet.cross_attention_dim, "the text encoders' hidden sizes add up to",
         text.hidden_size + text_2.hidden_size),
        ("UNet pooled_text_dim", unet.pooled_text_dim, "text_encoder_2's projection_dim is", text_2.projection_dim),
        ("UNet in_channels", unet.in_channels, "the VAE's latent_channels is", vae.latent_channels),
        ("UNet out_channels", unet.out_channels, "the VAE's latent_channels is", vae.latent_channels),
    ]
    if "refiner" in parts:
        pairs.append(("refiner in_channels", parts["refiner"].model.config.in_channels,
                      "the VAE's latent_channels is", vae.latent_channels))
    return [f"{a} is {x}, but {b} {y}" for a, x, b, y in pairs if x != y]


def check(parts: dict[str, Part], unknown: list[str]) -> None:
    """One ConversionError listing every problem, or nothing."""
    problems = [listing("unknown source keys", unknown, SHOWN)] if unknown else []
    for name, part in parts.items():
        problems += key_problems(name, part)
    problems += consistency_problems(parts)
    if problems:
        raise ConversionError("the weights do not fit the model, nothing was written:\n  " + "\n  ".join(problems))


# 6. Building: assign the source tensors to the meta models, one copy in the stored dtype.


def add_fresh_temporal_modules(unet: UNet, dtype: torch.dtype) -> None:
    """Freshly initialised temporal modules (zero output projections) in place of the meta ones."""
    with torch.random.fork_rng():
        torch.manual_seed(FRESH_SEED)
        unet.add_fresh_temporal_modules(dtype)


def restore_position_ids(model: nn.Module) -> None:
    """CLIP's position ids are a buffer outside the state dict, so it is still on the meta device."""
    embeddings = getattr(model, "text_model", model).embeddings
    embeddings.position_ids = torch.arange(embeddings.position_embedding.num_embeddings).expand(1, -1)


def build(part: Part, dtype: torch.dtype) -> nn.Module:
    """The part's meta model holding its tensors, one at a time read and cast to `dtype`."""
    state = {key: tensor.read().to(dtype) for key, tensor in part.weights.items()}
    model = part.model
    model.load_state_dict(state, strict=not part.fresh_temporal, assign=True)
    if part.fresh_temporal:
        add_fresh_temporal_modules(model, dtype)
    if isinstance(model, CLIPTextModel | CLIPTextModelWithProjection):
        restore_position_ids(model)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    assert not left, f"not built: {left[:SHOWN]}"
    return model.eval()


# 7. Writing: into a hidden sibling folder named with the process id, moved into place when complete.


def staging_folder(out: Path, purpose: str) -> Path:
    """The hidden sibling of OUT that this process writes into ("converting") or moves the folder
    it replaces to ("previous"); `clean_up_killed_conversions` reads the process id back."""
    return out.parent / f".{out.name}.{os.getpid()}.{purpose}"


def clean_up_killed_conversions(out: Path) -> None:
    """Remove the staging folders of conversions into OUT whose process is gone, one line each; a
    process killed between its two renames left OUT as ".previous": that goes back to OUT."""
    pattern = rf"\.{re.escape(out.name)}\.(\d{{1,9}})\.(converting|previous)"
    for folder in sorted(out.parent.iterdir()) if out.parent.is_dir() else []:
        match = re.fullmatch(pattern, folder.name)
        if not match or process_alive(int(match[1])):
            continue
        if match[2] == "previous" and not out.exists() and not out.is_symlink():
            folder.rename(out)
            print(f"put {folder} back as {out}: process {match[1]} was killed while replacing it")
        else:
            shutil.rmtree(folder)
            print(f"removed {folder}, left by process {match[1]}, which is gone")


def write_error(error: OSError, staging: Path, out: Path) -> ConversionError:
    """"no space left on device while writing OUT/vae.safetensors": the file by its final name."""
    path = Path(error.filename) if error.filename else out
    if path.is_relative_to(staging):
        path = out / path.relative_to(staging)
    reason = os.strerror(error.errno).lower() if error.errno else str(error)
    return ConversionError(f"{reason} while writing {path}; nothing was written, {out} is as it was")


def write_checkpoint(pipeline: StableDiffusionXLVideoPipeline, out: Path, provenance: dict, overwrite: bool,
                     defaults: dict = SAMPLE_DEFAULTS) -> None:
    """Save into a hidden sibling of OUT, on disk (fsync) before it replaces OUT, which is checked
    again first: whatever came to OUT during the conversion is kept unless --overwrite may replace it."""
    staging, previous = staging_folder(out, "converting"), staging_folder(out, "previous")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        pipeline.save_pretrained(staging, provenance, defaults)
        if problems := out_problems(out, overwrite):
            raise ConversionError("; ".join(problems))
        if out.exists():
            out.rename(previous)
        try:
            staging.rename(out)
        except OSError:
            if previous.exists():
                previous.rename(out)
            raise
    except OSError as error:
        raise write_error(error, staging, out) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsync(out.parent)  # the rename, on disk
    shutil.rmtree(previous, ignore_errors=True)


# 8. The conversion.


def out_problems(out: Path, overwrite: bool) -> list[str]:
    """Why OUT may not be written: it exists without --overwrite, or it is not a folder that
    --overwrite may replace (an empty folder, or a checkpoint folder holding only its own files)."""
    if out.is_symlink():
        return [f"OUT {out} is a symbolic link; give the folder it points to, {out.resolve()}"]
    if not out.exists():
        return []
    if not out.is_dir():
        return [f"OUT {out} exists and is not a folder"]
    if not overwrite:
        return [f"OUT {out} exists; pass --overwrite to replace it"]
    entries = sorted(out.iterdir())
    if not entries:
        return []
    if foreign := [path.name for path in entries if not (path.name in CHECKPOINT_FILES and path.is_file()
                                                         or path.name in SUBFOLDERS and path.is_dir())]:
        reason = f"it holds {foreign}, which a checkpoint folder does not"
    else:
        try:
            load_checkpoint_config(out)
            return []
        except ValueError as error:
            reason = str(error)
    return [f"OUT {out} is not a folder that --overwrite may replace (an empty one or a checkpoint folder): {reason}"]


def nesting_problems(out: Path, inputs: dict[str, str | Path | None]) -> list[str]:
    """OUT must be no input, lie inside none and hold none (symbolic links resolved)."""
    target, problems = out.resolve(), []
    for option, given in inputs.items():
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source:
            problems.append(f"OUT {out} is one of the inputs, {option} {given}")
        elif target.is_relative_to(source):
            problems.append(f"OUT {out} is inside {option} {given}")
        elif source.is_relative_to(target):
            problems.append(f"{option} {given} is inside OUT {out}")
    return problems


def check_arguments(source: Path, out: Path, video_unet, tokenizers, configs, dtype: str, overwrite: bool,
                    loras: list[tuple[str, float]] = ()) -> None:
    """ConversionError for bad input, before any weights are read."""
    single_file = source.is_file()
    folders = (*MODEL_CLASSES, *TOKENIZERS)
    problems = {
        f"SRC {source} does not exist": not source.exists(),
        f"a single-file SRC must be a .safetensors file, got {source.name}":
            single_file and source.suffix != ".safetensors",
        f"SRC {source} lacks {[n for n in folders if not (source / n).is_dir()]} of an SDXL folder":
            source.is_dir() and not all((source / name).is_dir() for name in folders),
        "a single-file SRC has no tokenizers: give an SDXL folder in diffusers' layout with --tokenizers DIR":
            single_file and tokenizers is None,
        f"--tokenizers {tokenizers} lacks tokenizer/ or tokenizer_2/":
            tokenizers is not None and not all((Path(tokenizers) / name).is_dir() for name in TOKENIZERS),
        "--tokenizers and --configs are for a single-file SRC only": source.is_dir() and bool(tokenizers or configs),
        f"--video-unet {video_unet} is not a folder": video_unet is not None and not Path(video_unet).is_dir(),
        f"--dtype must be one of {list(DTYPES)}, got {dtype!r}": dtype not in DTYPES,
    }
    inputs = {"SRC": source, "--video-unet": video_unet, "--tokenizers": tokenizers, "--configs": configs}
    failed = [message for message, fails in problems.items() if fails]
    failed += [problem for path, _ in loras for problem in nesting_problems(out, {"--lora": path})]
    if twice := lora_given_twice([str(path) for path, _ in loras]):
        failed.append(f"--lora {twice} is given twice (links resolved): give each file once, with the sum of its strengths")
    failed += nesting_problems(out, inputs) or out_problems(out, overwrite)
    if failed:
        raise ConversionError("; ".join(failed))


def few_step_problems(source: Path, out: Path, unet_file, video_unet, schedule: str) -> list[str]:
    """Why `--unet FILE` or `--schedule` cannot be used: the file missing or of no weight format,
    given with --video-unet (each replaces the whole UNet), OUT the file or around it; "release"
    for a SRC without a scheduler config, or with one that `stored_schedule` refuses."""
    release = schedule == "release" and (source / RELEASE_SCHEDULER).is_file()
    problems = {
        f"--schedule must be one of {list(SCHEDULES)}, got {schedule!r}": schedule not in (None, *SCHEDULES),
        f"--schedule release: {source} has no {RELEASE_SCHEDULER}": schedule == "release" and not release,
        f"--unet {unet_file} is not a file": unet_file is not None and not Path(unet_file).is_file(),
        f"--unet must be a {' or '.join(UNET_FILE_SUFFIXES)} file, got {Path(unet_file or '').name}":
            unet_file is not None and Path(unet_file).suffix not in UNET_FILE_SUFFIXES,
        "--unet and --video-unet each give the whole UNet: give one": unet_file is not None and video_unet is not None,
    }
    failed = [message for message, fails in problems.items() if fails]
    if release:
        try:
            stored_schedule("release", source)
        except ConversionError as error:
            failed.append(str(error))
    return failed + nesting_problems(out, {"--unet": unet_file})


def stored_schedule(name: str, source: Path | None = None) -> SchedulerConfig:
    """The scheduler config OUT stores for `--schedule NAME` (SCHEDULES); ConversionError naming
    SRC's scheduler config if "release" cannot read it (SRC: needed for "release" only)."""
    if name == "video":
        return SchedulerConfig.video_model()
    if name == "sdxl":
        return replace(SchedulerConfig.sdxl_base(), timestep_spacing="trailing", algorithm_type="euler")
    path = source / RELEASE_SCHEDULER
    values = load_json(path)
    try:
        config = SchedulerConfig.from_diffusers_config(values)
    except (TypeError, ValueError) as error:  # TypeError: a value of the wrong type, such as "beta_start": "low"
        raise ConversionError(f"{path}: {error}") from None
    return replace(config, timestep_spacing="trailing", algorithm_type="sde-dpmsolver++")


def default_schedule(source: Path, parts: dict[str, Part]) -> str:
    """The published release's own schedule for a release folder (a video UNet and a scheduler
    config), else the original video model's."""
    release = source.is_dir() and (source / RELEASE_SCHEDULER).is_file() and not parts["unet"].fresh_temporal
    return "release" if release else "video"


def sample_defaults(parts: dict[str, Part]) -> dict:
    """sample.py's defaults for OUT: the published program's recipe for a model with a refiner, else
    the seed text's loop (video_settings.RECIPES)."""
    if "refiner" in parts:
        return {name: value for name, value in RECIPES["flowingframes"].items() if value is not None}
    return SAMPLE_DEFAULTS


def convert(source, out, video_unet=None, tokenizers=None, configs=None, dtype: str = "fp32",
            overwrite: bool = False, loras: list[tuple[str, float]] = (), unet_file=None,
            schedule: str | None = None) -> dict:
    """Convert SRC (and a video UNet, or a UNet alone) into a checkpoint folder OUT, with `loras`
    [(file, strength)] merged, sampling with `schedule` (SCHEDULES; None: `default_schedule`); return
    its provenance."""
    started = time.perf_counter()
    source, out = Path(source), Path(out)

    # 1. Read names, shapes and configs, and check them all: nothing is written unless this passes.
    clean_up_killed_conversions(out)
    check_arguments(source, out, video_unet, tokenizers, configs, dtype, overwrite, loras)
    if problems := few_step_problems(source, out, unet_file, video_unet, schedule):
        raise ConversionError("; ".join(problems))
    print(f"reading {source}" + (f" and {video_unet}" if video_unet else ""))
    unet = read_video_unet(Path(video_unet)) if video_unet else None
    if unet_file:
        unet = read_unet_file(Path(unet_file), source, configs)
    if source.is_file():
        configs = Path(configs or SDXL_CONFIGS)
        parts, mapped = read_single_file(source, configs, unet)
        tokenizer_paths = [Path(tokenizers) / name for name in TOKENIZERS]
    else:
        parts, mapped = read_diffusers_folder(source, unet)
        tokenizer_paths = [source / name for name in TOKENIZERS]
    check(parts, mapped.unknown)
    schedule = schedule or default_schedule(source, parts)
    scheduler = stored_schedule(schedule, source)  # a default "release": its config checked before any tensor
    try:  # the LoRAs' tensors too: one holding NaN is refused before any model is built
        updates = [read_updates(file) for file in
                   check_loras([path for path, _ in loras], {name: parts[name].model for name in LORA_COMPONENTS})]
    except LoraError as error:
        raise ConversionError(f"--lora: {error}; nothing was written") from None

    # 2. Read the tensors into the models, in the stored dtype; merge the LoRAs.
    print(f"building the models in {DTYPES[dtype]}")
    models = {name: build(part, DTYPES[dtype]) for name, part in parts.items()}
    clip_tokenizers = [CLIPTokenizer.from_pretrained(path, local_files_only=True) for path in tokenizer_paths]
    text_encoder = TextEncoder(*clip_tokenizers, models["text_encoder"], models["text_encoder_2"])
    pipeline = StableDiffusionXLVideoPipeline(models["unet"], models["vae"], text_encoder, scheduler,
                                              models.get("refiner"))
    if loras:
        print(f"merging {len(loras)} LoRA(s)")
        try:
            MergedLoras.load(pipeline, [path for path, _ in loras], [strength for _, strength in loras],
                             keep_originals=False, updates=updates)
        except LoraError as error:  # merged weights not finite or beyond what a model holds
            raise ConversionError(f"--lora: {error}; nothing was written") from None

    # 3. Write a complete folder next to OUT, then move it into place.
    provenance = make_provenance(source, parts, tokenizer_paths, configs, dtype, loras)
    provenance["scheduler"] = SCHEDULES[schedule]
    print(f"writing {out}")
    write_checkpoint(pipeline, out, provenance, overwrite, sample_defaults(parts))
    print(summary(models, provenance, mapped.dropped, time.perf_counter() - started))
    return provenance


def make_provenance(source: Path, parts: dict[str, Part], tokenizer_paths, configs, dtype: str,
                    loras: list[tuple[str, float]] = ()) -> dict:
    """Which part came from where, which is fresh, which LoRAs are merged; stored in config.json."""
    unet = parts["unet"]
    temporal = (f"fresh: initialised with seed {FRESH_SEED}, zero output projections" if unet.fresh_temporal
                else f"imported with the spatial weights from {unet.origin}")
    return {
        "converted_by": "convert_weights.py", "source": str(source), "dtype": str(DTYPES[dtype]).removeprefix("torch."),
        **{name: part.origin for name, part in parts.items()},
        "unet_temporal": temporal, "groupnorm_scope": unet.model.config.groupnorm_scope,
        **{name: str(path) for name, path in zip(TOKENIZERS, tokenizer_paths)},
        **({"configs": str(configs)} if configs else {}),
        "scheduler": "SchedulerConfig.video_model(): the original video model's inference setup",
        **({"loras": [{"path": str(path), "strength": strength, "sha256": file_sha256(path)}
                      for path, strength in loras]} if loras else {}),
    }


def count(parameters) -> str:
    return f"{sum(p.numel() for p in parameters):>15,}"


def summary(models: dict[str, nn.Module], provenance: dict, dropped: list[str], seconds: float) -> str:
    """Parameters per component, where they came from, the stored dtype."""
    unet = models["unet"]
    temporal = {id(p) for p in unet.temporal_parameters()}
    lines = [
        f"converted {provenance['source']} in {seconds:.1f} s, stored as {provenance['dtype']}",
        f"  {'unet':<16}{count(p for p in unet.parameters() if id(p) not in temporal)}  spatial, "
        f"from {provenance['unet']}",
        f"  {'':<16}{count(unet.temporal_parameters())}  temporal, {provenance['unet_temporal']}; "
        f"GroupNorm scope {provenance['groupnorm_scope']!r}",
        *(f"  {name:<16}{count(models[name].parameters())}  from {provenance[name]}"
          for name in ("vae", "text_encoder", "text_encoder_2", "refiner") if name in models),
        f"  {'tokenizers':<16}{'':>15}  from {provenance['tokenizer']}, {provenance['tokenizer_2']}",
        f"  {'scheduler':<16}{'':>15}  {provenance['scheduler']}",
        *(f"  {'lora':<16}{'':>15}  {lora['path']} merged at strength {lora['strength']:g}"
          for lora in provenance.get("loras", [])),
    ]
    return "\n".join(lines + ([f"  {listing('source keys not used', dropped, SHOWN)}"] if dropped else []))


def lora_option(value: str) -> tuple[str, float]:
    """--lora FILE or FILE:STRENGTH -> (FILE, STRENGTH): one strength (timelines are sample.py's)."""
    def no_position(text: str) -> int:
        raise ValueError

    try:
        setting = parse_lora(value, no_position)
    except ValueError as error:
        raise ConversionError(f"{error} (a conversion merges one strength: FILE or FILE:S)") from None
    return setting.path, setting.strengths[0][1]


def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", metavar="SRC",
                        help="SDXL folder (diffusers' layout or the original video release), single .safetensors, "
                             "or a hub name (owner/name) of such a folder")
    parser.add_argument("out", metavar="OUT", help="checkpoint folder to write")
    parser.add_argument("--video-unet", metavar="DIR",
                        help="video UNet in the original layout, or a hub name (its unet/): the whole UNet comes "
                             "from it")
    parser.add_argument("--tokenizers", metavar="DIR",
                        help="SDXL folder (or hub name) whose tokenizer/ and tokenizer_2/ a single-file SRC uses")
    parser.add_argument("--configs", metavar="DIR",
                        help=f"component configs for a single-file SRC (default {SDXL_CONFIGS})")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="stored precision (default fp32)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="merge a LoRA (kohya-ss or diffusers/PEFT .safetensors) into the UNet and text encoders "
                             f"at STRENGTH (default 1, from -{MAX_STRENGTH:g} to {MAX_STRENGTH:g}); repeat for more")
    parser.add_argument("--unet", metavar="FILE",
                        help="a UNet alone (.safetensors or .bin, diffusers' or the original names) in place of "
                             "SRC's, e.g. SDXL-Lightning's or DMD2's few-step UNet")
    parser.add_argument("--schedule", choices=SCHEDULES,
                        help="the noise schedule to sample with: the original video model's, SDXL's own (which "
                             "few-step SDXL models need), or the release's (SRC's scheduler config, as its run.py "
                             "uses it); default: the release's for a video release folder with one, else video")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT, a checkpoint folder or an empty one, once the new folder is complete")
    parser.add_argument("--revision", metavar="REV", help="branch, tag or commit of a SRC given by its hub name")
    args = parser.parse_args(argv)
    try:
        loras = [lora_option(value) for value in args.lora]
        if any(map(is_hub_name, (args.source, args.video_unet, args.tokenizers))) and (
                problems := out_problems(Path(args.out), args.overwrite)):  # before a download
            raise ConversionError("; ".join(problems))
        source, video_unet, tokenizers = local_sources(args.source, args.video_unet, args.tokenizers, args.revision,
                                                       WEIGHT_NAMES, fp16=args.dtype == "fp16")
        convert(source, args.out, video_unet, tokenizers, args.configs, args.dtype, args.overwrite, loras,
                args.unet, args.schedule)
    except (ConversionError, HubError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
