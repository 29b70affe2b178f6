"""The checkpoint folder: what `convert_weights.py` and `train.py` write, what `sample.py` loads.

    config.json          {"format": ..., "unet": UNetConfig, "vae": VAEConfig,
                          "scheduler": SchedulerConfig, "provenance": {...},
                          "sample_defaults": {...}}
    unet.safetensors     the UNet, spatial and temporal weights
    vae.safetensors      the VAE
    refiner.safetensors  the refiner (refiner.py), only when config.json has a "refiner" section
    text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/   transformers' layout

`save_checkpoint` writes config.json last, after every other file is on disk (`fsync_tree`): a folder
with a config.json is complete, even after a crash or a power loss. `check_checkpoint_files` checks a
folder's files cheaply (config.json, the safetensors headers) before anything heavy is loaded;
`load_checkpoint` then loads it strictly (every key, every shape).
"""

import json
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from infra.files import fsync, fsync_tree, listing, naming, read_json_object
from model import UNet, UNetConfig
from refiner import Refiner, RefinerConfig
from scheduler import SchedulerConfig
from text import SUBFOLDERS, TextEncoder
from vae import AutoencoderKL, VAEConfig

CHECKPOINT_FORMAT = "sdxl-video-checkpoint/1"
CHECKPOINT_FILES = ("config.json", "unet.safetensors", "vae.safetensors",
                    "refiner.safetensors")  # and the folders text.SUBFOLDERS
# The sections of config.json that build the models: name -> its config from the stored dict.
MODEL_CONFIGS = {"unet": lambda values: UNetConfig(**values), "vae": lambda values: VAEConfig(**values),
                 "scheduler": SchedulerConfig.from_dict, "refiner": lambda values: RefinerConfig(**values)}
OPTIONAL_CONFIGS = {"refiner"}  # sections a checkpoint may lack (absent or null)
# What each subfolder of text.SUBFOLDERS needs: any one of these sets of files.
TEXT_FILES = {"text_encoder": (("config.json", "model.safetensors"),),
              "tokenizer": (("tokenizer_config.json", "tokenizer.json"),
                            ("tokenizer_config.json", "vocab.json", "merges.txt"))}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # the names of --dtype
SHOWN = 3  # keys listed per problem


# Reading: config.json and the safetensors headers, checked before any weight is loaded.


def load_checkpoint_config(folder) -> dict:
    """config.json of a checkpoint folder, checked to be one; ValueError naming the folder otherwise."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} is not a checkpoint folder: it has no config.json (make one with convert_weights.py)")
    config = read_json_object(path)
    if config.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has format {config.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    return config


def model_configs(folder) -> dict:
    """The UNet's, the VAE's and the scheduler's configs of config.json, built and so checked, and
    the refiner's when it has one."""
    path, config = Path(folder) / "config.json", load_checkpoint_config(folder)
    configs = {}
    for name, make in MODEL_CONFIGS.items():
        if name in OPTIONAL_CONFIGS and config.get(name) is None:
            continue
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
    UNet's, the VAE's and the refiner's weights (for a memory estimate): config.json and its model
    settings, the safetensors headers of unet.safetensors, vae.safetensors and refiner.safetensors
    when config.json has a refiner (complete, file size as declared),
    and the files of the text encoders (config.json, a complete model.safetensors) and tokenizers.
    ValueError naming the first broken file."""
    folder = Path(folder)
    parts = ("unet", "vae", "refiner") if "refiner" in model_configs(folder) else ("unet", "vae")
    weights = sum(data_bytes(safetensors_header(folder / f"{name}.safetensors")) for name in parts)
    for name in SUBFOLDERS:
        kind, subfolder = name.removesuffix("_2"), folder / name
        choices = TEXT_FILES[kind]
        if not any(all((subfolder / file).is_file() for file in files) for files in choices):
            missing = next(subfolder / file for file in choices[0] if not (subfolder / file).is_file())
            needs = " or ".join(f"[{', '.join(files)}]" for files in choices)
            raise ValueError(f"{missing} is missing: a {kind} folder needs the files {needs}")
        for file in sorted(subfolder.glob("*.json")):
            read_json_object(file)
        if kind == "text_encoder":
            safetensors_header(subfolder / "model.safetensors")
    return weights


# Loading: strict, every key and every shape.


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
    if problems := [listing(what, sorted(names), SHOWN) for what, names in found.items() if names]:
        model = module_class.__name__
        raise ValueError(f"{weights_path} does not fit the {model} of config.json: " + "; ".join(problems))
    try:
        state = load_file(weights_path, device=str(device or "cpu"))
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{weights_path} cannot be read: {error}") from error
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(dtype=dtype).eval() if dtype else module.eval()


class Checkpoint(NamedTuple):
    """What a checkpoint folder holds, loaded."""

    unet: UNet
    vae: AutoencoderKL
    text_encoder: TextEncoder
    scheduler_config: SchedulerConfig
    provenance: dict  # where each part came from (config.json's "provenance")
    refiner: Refiner | None = None  # None: the checkpoint has none


def load_checkpoint(folder, device=None, dtype=None) -> Checkpoint:
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
    provenance = load_checkpoint_config(folder).get("provenance", {})
    refiner = None
    if "refiner" in configs:
        refiner = load_module(Refiner, configs["refiner"], folder / "refiner.safetensors", device, dtype)
    return Checkpoint(unet, vae, text_encoder, configs["scheduler"], provenance, refiner)


# Saving: every file on disk before config.json, which comes last.


def save_checkpoint(folder, unet: UNet, vae: AutoencoderKL, text_encoder: TextEncoder,
                    scheduler_config: SchedulerConfig, provenance: dict | None = None,
                    sample_defaults: dict | None = None, refiner: Refiner | None = None) -> None:
    """Write the checkpoint folder (weights in their current dtype), with refiner.safetensors and
    a "refiner" section when there is a `refiner`. config.json also keeps
    `provenance` (where each part came from) and `sample_defaults` (sample.py's defaults for
    this model: height, width, frames, context_frames, steps, guidance).

    An old config.json goes first and the new one comes last, once every other file is on disk:
    a folder whose writing stopped part way is no checkpoint. An error while writing is an
    OSError naming the file (the text encoders' and tokenizers' by the folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").unlink(missing_ok=True)
    modules = (("unet.safetensors", unet), ("vae.safetensors", vae), ("refiner.safetensors", refiner))
    for name, module in [(name, module) for name, module in modules if module is not None]:
        with naming(folder / name) as path:
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)
    with naming(folder):
        text_encoder.save_pretrained(folder)
        fsync_tree(folder)
    config = {
        "format": CHECKPOINT_FORMAT,
        "unet": unet.config.to_dict(),
        "vae": asdict(vae.config),
        "scheduler": scheduler_config.to_dict(),
        **({"refiner": refiner.config.to_dict()} if refiner is not None else {}),
        "provenance": provenance or {},
        "sample_defaults": sample_defaults or {},
    }
    with naming(folder / "config.json") as path:
        path.write_text(json.dumps(config, indent=2) + "\n")
        fsync(path)
        fsync(folder)
