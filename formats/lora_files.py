"""LoRA files, read without torch: their format, the modules of ours they change, and whether they fit.

Two formats hold nearly every SDXL LoRA:
- kohya-ss / sd-scripts: modules `lora_unet_*`, `lora_te1_*` (CLIP ViT-L) and `lora_te2_*` (OpenCLIP
  ViT-bigG), each with `.lora_down.weight` (rank, in[, kh, kw]), `.lora_up.weight` (out, rank[, 1, 1])
  and `.alpha` (without one, alpha = rank, as sd-scripts and diffusers read it); the module's name
  is its dotted name with dots written as underscores, for the UNet in the original SDXL layout
  (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`, what sd-scripts trains) or in diffusers'
  (`down_blocks_1_attentions_0_...`, as LCM-LoRA's and DMD2's scripts write them). Linear layers,
  1x1 convolutions and 3x3 convolutions (LoCon: the down projection is a convolution of the layer's
  kernel, the up 1x1).
- diffusers / PEFT (`pytorch_lora_weights.safetensors`): `unet.<module>.lora_A.weight` (down) and
  `.lora_B.weight` (up), `text_encoder.` and `text_encoder_2.` alike, or in the names diffusers'
  training scripts write (`.lora.down.weight` / `.lora.up.weight`, the text encoders'
  `.lora_linear_layer.down.weight` / `.up.weight`); alpha from a `<module>.alpha` key, else from the `lora_adapter_metadata` that diffusers writes into the header (PEFT's
  `lora_alpha`, `alpha_pattern`, `use_rslora`), else the rank (a scale of 1, as diffusers loads it).

A module's update is up @ down * alpha / rank (alpha / sqrt(rank) with rsLoRA), times the strength.
Other kinds of adapter (LoHa, LoKr, DoRA, ...) are refused by name rather than loaded wrong.

Standard library only: a safetensors header is JSON after an 8-byte length, and a checkpoint
folder's headers give its modules' names and shapes, so sample.py checks every LoRA against the
model before torch loads anything. formats/lora.py reads the tensors and merges them.
"""

import errno
import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

from formats.sdxl_layout import source_name, unet_rules
from infra.files import listing

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
# The ends of a module's keys, after a dot: kohya-ss modules are one name without dots, PEFT's dotted.
KOHYA_ENDS = ("alpha", "lora_up.weight", "lora_down.weight")
PEFT_ENDS = ("alpha", "lora_A.weight", "lora_B.weight", "lora.up.weight", "lora.down.weight",
             "lora_linear_layer.up.weight", "lora_linear_layer.down.weight")  # shortest first
PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
         "lora.down.weight": "down", "lora.up.weight": "up", "lora_linear_layer.down.weight": "down",
         "lora_linear_layer.up.weight": "up", "alpha": "alpha"}
# The ends of keys of other adapters and formats, which are refused by name.
VARIANTS = (
    (r"\.hada_(w[12]_[ab]|t[12])", "LoHa (LyCORIS)"),
    (r"\.lokr_(w[12](_[ab])?|t[12])", "LoKr (LyCORIS)"),
    (r"\.(dora_scale|lora_magnitude_vector(\.weight)?)", "DoRA"),
    (r"\.lora_mid\.weight", "LoCon with a CP-decomposed convolution (LyCORIS lora_mid)"),
    (r"\.(oft_blocks|oft_diag|oft_r|boft_R|boft_s)", "OFT / BOFT"),
    (r"\.diff(_b)?", "full weight differences (LyCORIS full)"),
    (r"\.[ab][12]\.weight", "GLoRA (LyCORIS)"),
    (r"\.(on_input|ia3_l)", "(IA)^3"),
    (r"\.[wb]_norm", "norm-layer tuning (LyCORIS)"),
    (r"\.lora_B\.bias", "LoRA with a bias (PEFT lora_bias)"),
    (r"\.lora_embedding_[AB]", "LoRA of an embedding layer"),
    (r"\.to_(q|k|v|out)_lora\.(down|up)\.weight", "diffusers' old attention-processor LoRA (to_q_lora; "
                                                     "diffusers' load_lora_weights and save_lora_weights convert it)"),
)
VARIANT_ENDS = tuple((re.compile(pattern + "$"), name) for pattern, name in VARIANTS)
# nn.Embedding weights are 2-D too, but a linear LoRA does not apply to them.
NOT_LINEAR = re.compile(r"(^|\.)(token|position)_embedding$")
SHOWN = 8  # names listed per problem
# The dtypes of a LoRA's weights, and of its alphas (numbers, integers too); booleans, fp8 and the
# rest are no LoRA.
WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")
ALPHA_DTYPES = (*WEIGHT_DTYPES, "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")
MAX_HEADER = 100 * 2**20
# The strengths users mean: 0..1 mostly, up to 2 or -2 for sliders; beyond 10 a LoRA's update
# outweighs the model it changes, and strengths like 1e30 overflow the weights into black frames.
MAX_STRENGTH = 10.0


class LoraError(ValueError):
    """A LoRA file that cannot be used, in one line naming it."""


class LoraModule(NamedTuple):
    """One module of a LoRA file: where its update goes and the keys it is read from."""

    component: str  # "unet", "text_encoder" or "text_encoder_2"
    module: str  # our module's name (`canonical_name`: the text encoders' with `text_model.`)
    down: str  # key of the down projection (rank, in[, kh, kw])
    up: str  # key of the up projection (out, rank[, 1, 1])
    alpha: str | float | None  # the key of a stored alpha, its value (from the header's metadata), or None: the rank
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank


class Header(NamedTuple):
    """A safetensors header: each key's shape and dtype ("F32", "BF16", ...), and the metadata."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict


class LoraFile(NamedTuple):
    """What a LoRA file holds, checked against a model: `modules` in file order."""

    path: str
    modules: list[LoraModule]


# 1. The file: a safetensors header.


def read_header(path, what: str = "LoRA") -> Header:
    """The header of a .safetensors file, read without its data; LoraError naming the file (as
    `what` PATH) if it is missing or no file (a folder, a FIFO, a link loop: said), not
    safetensors, or truncated."""
    path = Path(path)
    if problem := not_a_file(path):
        raise LoraError(f"{what} {path}{problem}")
    try:
        return parse_header(path, what)
    except OSError as error:
        raise LoraError(f"{what} {path} cannot be read: {error.strerror}") from None


def not_a_file(path: Path) -> str | None:
    """What `path` is, as the end of a message, when it is no regular file (': no such file', ' is
    a folder, not a file', ' is a FIFO (named pipe), not a file', ...); None for a file. Never
    opens it: a FIFO would block."""
    try:
        mode = path.stat().st_mode
    except ValueError:  # a NUL in the name
        return " is no file name (it holds a NUL character)"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return " is a loop of symbolic links, not a file"
        if path.is_symlink():
            return f" is a symbolic link to {os.readlink(path)}, which does not exist"
        return ": no such file" if error.errno in (errno.ENOENT, errno.ENOTDIR) else f" cannot be read: {error.strerror}"
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISSOCK: "a socket",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
    if stat.S_ISREG(mode):
        return None
    return f" is {next((kind for test, kind in kinds.items() if test(mode)), 'not a regular file')}, not a file"


def parse_header(path: Path, what: str) -> Header:
    size = path.stat().st_size
    with path.open("rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if size < 8 or not 2 <= length <= min(size - 8, MAX_HEADER):
            raise LoraError(f"{what} {path} is not a .safetensors file (or is truncated): its first 8 bytes "
                            f"give no header length that fits its {size} bytes")
        try:
            header = json.loads(file.read(length))
            metadata = header.pop("__metadata__", None) or {}
            shapes = {key: tuple(entry["shape"]) for key, entry in header.items()}
            dtypes = {key: entry["dtype"] for key, entry in header.items()}
            end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
            if not (isinstance(metadata, dict) and all(isinstance(d, str) for d in dtypes.values())
                    and all(type(n) is int and n >= 0 for s in shapes.values() for n in s)):
                raise TypeError("metadata, dtypes or shapes")
        except RecursionError:
            raise LoraError(f"{what} {path} is not a .safetensors file: its header is JSON nested too deep") from None
        except (ValueError, AttributeError, TypeError, KeyError, IndexError):  # ValueError: not UTF-8, not JSON
            raise LoraError(f"{what} {path} is not a .safetensors file: it has no valid safetensors header") from None
    if end != size - 8 - length:
        raise LoraError(f"{what} {path} is truncated or damaged: its header declares {end} bytes of tensors, "
                        f"it holds {size - 8 - length}")
    return Header(shapes, dtypes, metadata)


def file_sha256(path) -> str:
    """The SHA-256 of a file, hex (what a resumed run checks its LoRA files against)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(2**22):
            digest.update(block)
    return digest.hexdigest()


# 2. Its modules: the format, the variants refused, the keys grouped by module.


def variant_of(keys) -> tuple[str, str] | None:
    """(the name of an adapter other than LoRA, a key of it) if the keys hold one."""
    for pattern, name in VARIANT_ENDS:
        if key := next((key for key in keys if pattern.search(key)), None):
            return name, key
    return None


def split_key(key: str) -> tuple[str, str, str] | None:
    """("kohya" | "peft", module, "down" | "up" | "alpha") of a LoRA key, or None for another key;
    by its end, in time linear in its length (a regular expression took the square: a header may
    hold a key of millions of characters). A kohya-ss module has no dot; a PEFT module has one
    inside it and no line break; the shortest end wins."""
    for kind, ends in (("kohya", KOHYA_ENDS), ("peft", PEFT_ENDS)):
        for end in ends:
            module = key[:-len(end) - 1]
            if not (key.endswith("." + end) and module):
                continue
            if kind == "kohya" and "." not in module or kind == "peft" and "." in module[1:-1] and "\n" not in module:
                return kind, module, PARTS[end]
    return None


def group_keys(path, shapes: dict) -> tuple[str, dict[str, dict[str, str]], list[str]]:
    """(format, file module name -> {"down" | "up" | "alpha": key}, keys that are no LoRA part)."""
    if variant := variant_of(shapes):
        raise LoraError(f"LoRA {path} is a {variant[0]} file (key {named(variant[1])}), which is not supported: "
                        f"only LoRA and LoCon (kohya-ss .lora_down/.lora_up, PEFT .lora_A/.lora_B) are read")
    groups, others, formats = {}, [], set()
    for key in shapes:
        if (split := split_key(key)) is None:
            others.append(key)
            continue
        kind, module, part = split
        formats.add(kind)
        groups.setdefault(module, {})[part] = key
    if not any("down" in parts or "up" in parts for parts in groups.values()):
        raise LoraError(f"LoRA {path} is not a LoRA: none of its {len(shapes)} keys is a LoRA weight "
                        f"(.lora_down/.lora_up or .lora_A/.lora_B), e.g. {', '.join(named(key) for key in list(shapes)[:3])}")
    if len(formats) > 1:
        raise LoraError(f"LoRA {path} mixes kohya-ss keys (.lora_down/.lora_up) with PEFT keys (.lora_A/.lora_B)")
    return formats.pop(), groups, others


def check_dtypes(path, groups: dict[str, dict[str, str]], dtypes: dict[str, str]) -> None:
    """LoraError naming the first key (and how many more) whose dtype no LoRA has: weights are
    floats (WEIGHT_DTYPES), alphas floats or integers (ALPHA_DTYPES); booleans, fp8 and the rest never."""
    for part, allowed, what in (("down", WEIGHT_DTYPES, "weight"), ("up", WEIGHT_DTYPES, "weight"),
                                ("alpha", ALPHA_DTYPES, "alpha")):
        if wrong := [parts[part] for parts in groups.values() if part in parts and dtypes[parts[part]] not in allowed]:
            more = f"; {len(wrong) - 1} more keys are no LoRA {what} either" if len(wrong) > 1 else ""
            raise LoraError(f"LoRA {path}: {named(wrong[0])} holds {named(dtypes[wrong[0]])}, which no LoRA {what} "
                            f"is ({', '.join(allowed)}){more}")


def peft_alphas(path, metadata: dict) -> dict[str, dict]:
    """component -> PEFT's LoraConfig fields that set the scale (lora_alpha, alpha_pattern,
    use_rslora), from the `lora_adapter_metadata` diffusers writes into a header. The keys of
    `alpha_pattern` and `rank_pattern` are data: module-name suffixes (`to_k`, `attn1.to_k`), what
    PEFT writes; a key that is no module name (a regular expression, say) is refused, never run."""
    if "lora_adapter_metadata" not in metadata:
        return {}
    try:
        values = json.loads(metadata["lora_adapter_metadata"])
        configs = {c: {k.removeprefix(f"{c}."): v for k, v in values.items() if k.startswith(f"{c}.")}
                   for c in COMPONENTS}
    except RecursionError:
        raise LoraError(f"LoRA {path}: its lora_adapter_metadata is JSON nested too deep") from None
    except json.JSONDecodeError:
        raise LoraError(f"LoRA {path}: its lora_adapter_metadata is not JSON") from None
    except ValueError:  # int()'s limit
        raise LoraError(f"LoRA {path}: its lora_adapter_metadata holds an integer of over 4300 digits") from None
    except (TypeError, AttributeError):
        raise LoraError(f"LoRA {path}: its lora_adapter_metadata is not a JSON object") from None
    for component, config in configs.items():
        check_peft_config(path, component, config)
        if config.get("use_dora"):
            raise LoraError(f"LoRA {path} is a DoRA file ({component}.use_dora in its metadata), which is not supported")
        if config.get("lora_bias"):
            raise LoraError(f"LoRA {path} is a LoRA with a bias ({component}.lora_bias), which is not supported")
    return configs


def check_peft_config(path, component: str, config: dict) -> None:
    """LoraError naming the file and the field unless the fields read from PEFT's config are of
    their types: lora_alpha a finite number, alpha_pattern and rank_pattern objects of module
    names (`is_module_name`) to finite numbers and positive integers, the switches true or false."""
    where = f"LoRA {path}: its lora_adapter_metadata's {component}."
    for field in ("use_rslora", "use_dora", "lora_bias"):
        if not (config.get(field) is None or isinstance(config[field], bool)):
            raise LoraError(f"{where}{field} is {json_value(config[field])}, expected true or false")
    if config.get("lora_alpha") is not None and not finite_number(config["lora_alpha"]):
        raise LoraError(f"{where}lora_alpha is {json_value(config['lora_alpha'])}, expected a finite number")
    for field, fits, expected in (("alpha_pattern", finite_number, "a finite number"),
                                  ("rank_pattern", lambda n: type(n) is int and n > 0, "a positive integer")):
        patterns = {} if config.get(field) is None else config[field]
        if not isinstance(patterns, dict):
            raise LoraError(f"{where}{field} is {json_value(patterns)}, expected an object of module names")
        if bad := [key for key in patterns if not is_module_name(key)]:
            raise LoraError(f"{where}{field} key {shown(bad[0])} is no module name; module-name suffixes "
                            f"(to_k, attn1.to_k) are read, patterns are not")
        if bad := [key for key, value in patterns.items() if not fits(value)]:
            raise LoraError(f"{where}{field} value of {shown(bad[0])} is {json_value(patterns[bad[0]])}, expected {expected}")


def finite_number(value) -> bool:
    """Whether a JSON value is a finite number (not a boolean, not too large for a float)."""
    try:
        return type(value) in (int, float) and math.isfinite(value)
    except OverflowError:
        return False


def json_value(value) -> str:
    """A JSON value from a file, shown in a message: scalars as JSON (cut short), containers by kind."""
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    text = json.dumps(value) if not isinstance(value, int) or abs(value) < 10**40 else f"an integer of {len(str(value))} digits"
    return text if len(text) <= 60 else text[:60] + "..."


def is_module_name(text: str) -> bool:
    """Whether `text` is a dotted module name: parts of ASCII letters, digits and underscores."""
    return all(part.isascii() and part.replace("_", "a").isalnum() for part in text.split("."))


def ends_module(module: str, suffix: str) -> bool:
    """Whether the module-name `suffix` ends `module` at a dot (`attn1.to_k` ends `...attn1.to_k`)."""
    return module == suffix or module.endswith("." + suffix)


def peft_alpha(config: dict, module: str) -> float | None:
    """PEFT's alpha for `module` (its name inside the component): the first `alpha_pattern` key
    that ends the name at a dot (as PEFT picks), else `lora_alpha`; None without either."""
    for suffix, alpha in (config.get("alpha_pattern") or {}).items():
        if ends_module(module, suffix):
            return float(alpha)
    return float(config["lora_alpha"]) if config.get("lora_alpha") is not None else None


def named(text: str, limit: int = 200) -> str:
    """A key from a file as part of a one-line message: control characters escaped, cut at `limit`."""
    if not (len(text) <= limit and text.isprintable()):
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[:limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


def shown(text: str, limit: int = 120) -> str:
    """`text` from a file as one short line of a message: quoted and escaped (JSON), cut at `limit`."""
    quoted = json.dumps(text)
    return quoted if len(quoted) <= limit else quoted[:limit] + f'..." ({len(text)} characters)'


# 3. Our modules and every name a LoRA file may give them.


def canonical_name(component: str, module: str) -> str:
    """Our module's name as LoRA files spell it: a text encoder's with `text_model.` in front
    (transformers keeps CLIPTextModel's modules flat since 5.6, files keep the old names)."""
    if component == "unet" or module.startswith("text_model.") or module == "text_projection":
        return module
    return "text_model." + module


def weight_targets(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape of the linear and convolution layers among a state dict's shapes."""
    return {key.removesuffix(".weight"): shape for key, shape in shapes.items()
            if key.endswith(".weight") and len(shape) in (2, 4) and not NOT_LINEAR.search(key.removesuffix(".weight"))}


def lookup_names(targets: dict[str, dict[str, tuple]], unet_config) -> dict[str, tuple[str, str]]:
    """Every name a LoRA file may give a module of `targets` (component -> module -> weight shape,
    modules by `canonical_name`) -> (component, module). `unet_config` (UNetConfig or its dict)
    gives the original SDXL layout's names."""
    rules = unet_rules(SimpleNamespace(**unet_config) if isinstance(unet_config, dict) else unet_config, "")
    names = {}
    for component, modules in targets.items():
        kohya = next(prefix for prefix, name in KOHYA_PREFIXES.items() if name == component)
        for module in modules:
            spellings = {f"{component}.{module}", kohya + module.replace(".", "_")}
            if component == "unet" and (original := source_name(module, rules)):
                spellings.add("lora_unet_" + original.replace(".", "_"))
            if module.startswith("text_model.") and component == "text_encoder":
                spellings.add(f"{component}.{module.removeprefix('text_model.')}")  # transformers' flat names
            names.update((spelling, (component, module)) for spelling in spellings)
    return names


# 4. The check: every module matched, every shape fitting.


def shape_problem(down: tuple, up: tuple, weight: tuple) -> str | None:
    """Why a LoRA of `down` (rank, in[, kh, kw]) and `up` (out, rank[, 1, 1]) shapes cannot update a
    weight of `weight` shape (out, in[, kh, kw]), or None."""
    kernel = lambda shape: tuple(shape[2:]) if len(shape) == 4 else (1, 1)
    fits = (len(down) in (2, 4) and len(up) in (2, 4) and up[0] == weight[0] and down[1] == weight[1]
            and up[1] == down[0] and kernel(up) == (1, 1) and kernel(down) == kernel(weight))
    return None if fits else f"down {down} and up {up} do not fit the weight {weight}"


def read_lora_file(path, targets: dict[str, dict[str, tuple]], unet_config) -> LoraFile:
    """A LoRA file's modules matched to `targets` (see `lookup_names`); one LoraError listing every
    key that matches no module, every part missing and every shape that does not fit."""
    shapes, dtypes, metadata = read_header(path)
    kind, groups, unmatched = group_keys(path, shapes)
    check_dtypes(path, groups, dtypes)
    names = lookup_names(targets, unet_config)
    configs = peft_alphas(path, metadata) if kind == "peft" else {}
    modules, problems, taken = [], [], {}
    for name, parts in groups.items():
        if name not in names:
            unmatched += parts.values()
            continue
        component, module = names[name]
        if missing := [part for part in ("down", "up") if part not in parts]:
            problems.append(f"{named(name)} has no {' or '.join(missing)} weight")
            continue
        if (component, module) in taken:
            problems.append(f"{named(name)} and {named(taken[component, module])} are the same module")
            continue
        taken[component, module] = name
        alpha = parts.get("alpha")
        down, up = shapes[parts["down"]], shapes[parts["up"]]
        if 0 in (*down[:1], *up[1:2]):
            problems.append(f"{named(name)} has rank 0 (down {down}, up {up}): no update, and no scale alpha / rank")
        elif problem := shape_problem(down, up, targets[component][module]):
            problems.append(f"{named(name)}: {problem}")
        if alpha is not None and math.prod(shapes[alpha]) != 1:
            problems.append(f"{named(alpha)} has shape {shapes[alpha]}, expected one number")
        config = configs.get(component, {})
        if alpha is None and config:
            alpha = peft_alpha(config, name.removeprefix(f"{component}."))
        modules.append(LoraModule(component, module, parts["down"], parts["up"], alpha, bool(config.get("use_rslora"))))
    if unmatched:
        problems.insert(0, listing("keys match no module of the model (is it an SDXL LoRA?)", [named(key) for key in sorted(unmatched)], SHOWN))
    if problems:
        more = [f"and {len(problems) - SHOWN} more problems"] if len(problems) > SHOWN else []
        raise LoraError(f"LoRA {path} does not fit the model: " + "; ".join(problems[:SHOWN] + more))
    return LoraFile(str(path), modules)


def checkpoint_targets(folder) -> tuple[dict[str, dict[str, tuple]], dict]:
    """(component -> module -> weight shape, the UNet's config) of a checkpoint folder, from its
    config.json and safetensors headers (pipeline.py's layout), without loading a weight."""
    folder = Path(folder)
    files = {"unet": folder / "unet.safetensors", "text_encoder": folder / "text_encoder" / "model.safetensors",
             "text_encoder_2": folder / "text_encoder_2" / "model.safetensors"}
    targets = {}
    for component, path in files.items():
        shapes = read_header(path, "the model's weight file").shapes
        targets[component] = {canonical_name(component, module): shape
                              for module, shape in weight_targets(shapes).items()}
    return targets, json.loads((folder / "config.json").read_text())["unet"]
