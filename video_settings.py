"""What decides the frames of a video: `Settings`, and its checks.

Only the standard library, so that sample.py can check its options and answer `--help` before
torch is imported. The chunk loop that uses these settings is in endless.py.
"""

import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "baby"
DTYPE_NAMES = ("fp32", "fp16", "bf16")


@dataclass
class Settings:
    """Everything that decides the frames of a video; stored in the state file for --resume."""

    timeline: list[tuple[int, str]]  # (first chunk index, prompt), sorted, the first at chunk 0
    negative_prompt: str = ""
    model: str = str(DEFAULT_MODEL)
    height: int | None = None  # pixels; None: the model's
    width: int | None = None
    frames: int = 4  # frames per chunk
    context_frames: int = 4
    steps: int = 25  # denoising steps per chunk
    guidance: float = 9.0
    seed: int = 0
    fps: float = 6.0
    crf: int = 18
    transition: int = 0
    context_noise: float = 0.0
    anchor_frame: bool = False
    renormalize: bool = False
    drop_first_chunk: bool = False
    image: str | None = None
    image_strength: float = 0.5
    extend: str | None = None
    scheduler: str | None = None
    device: str | None = None  # None: cuda if there is one, else cpu (decided when the run starts)
    dtype: str = "fp32"
    decode_frames: int = 2


def check_settings(settings: Settings, model_config: dict | None = None) -> None:
    """Every check that needs no model weights; ValueError naming the option.

    With `model_config` (a checkpoint's config.json), also fills in a None height and width with
    the model's size and checks that the VAE can take them.
    """
    positive = {"--frames": settings.frames, "--context-frames": settings.context_frames, "--steps": settings.steps,
                "--decode-frames": settings.decode_frames}
    for option, value in positive.items():
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    if settings.context_frames > settings.frames:
        raise ValueError(
            f"--context-frames {settings.context_frames} is more than the {settings.frames} frames a chunk makes"
        )
    ranges = {"--guidance": (settings.guidance, 0, math.inf), "--context-noise": (settings.context_noise, 0, math.inf),
              "--image-strength": (settings.image_strength, 0, 1), "--fps": (settings.fps, 0.01, 1000)}
    for option, (value, low, high) in ranges.items():
        if not (math.isfinite(value) and low <= value <= high):
            bounds = f"at least {low}" if high == math.inf else f"in [{low}, {high}]"
            raise ValueError(f"{option} must be a finite number {bounds}, got {value}")
    if not 0 <= settings.crf <= 51:
        raise ValueError(f"--crf must be in 0..51 (H.264's quality scale, lower is better), got {settings.crf}")
    if not 0 <= settings.seed < 2**64:
        raise ValueError(f"--seed must be in 0 .. 2**64 - 1 (what a torch.Generator takes), got {settings.seed}")
    if settings.transition < 0:
        raise ValueError(f"--transition must be >= 0, got {settings.transition}")
    if settings.dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype must be one of {list(DTYPE_NAMES)}, got {settings.dtype!r}")
    if settings.image and settings.extend:
        raise ValueError("give --image or --extend, not both")
    if model_config is None:
        return
    factor = 2 ** (len(model_config["vae"]["block_out_channels"]) - 1)
    default_size = model_config["unet"]["sample_size"] * factor
    settings.height = default_size if settings.height is None else settings.height
    settings.width = default_size if settings.width is None else settings.width
    for option, value in (("--height", settings.height), ("--width", settings.width)):
        if value < factor or value % factor:
            raise ValueError(f"{option} must be a positive multiple of {factor} (the VAE's downsampling), got {value}")


def settings_from_dict(values: dict) -> Settings:
    """Settings from a state file's dict, every field present and of its type (TypeError otherwise)."""
    names = [f.name for f in fields(Settings)]
    if not isinstance(values, dict) or sorted(values) != sorted(names):
        raise TypeError("its settings do not have the fields of Settings")
    for f in fields(Settings):
        value = values[f.name]
        if f.name == "timeline":
            if not (isinstance(value, list) and value and all(
                    len(entry) == 2 and isinstance(entry[0], int) and isinstance(entry[1], str) for entry in value)):
                raise TypeError("timeline")
            if [entry[0] for entry in value] != sorted({entry[0] for entry in value}) or value[0][0] != 0:
                raise ValueError("timeline: its chunks must be sorted, unique and start at 0")
        elif not of_type(value, f.type):
            raise TypeError(f.name)
    settings = Settings(**values)
    settings.timeline = [tuple(entry) for entry in settings.timeline]
    return settings


def of_type(value, annotation) -> bool:
    """Whether `value` is of the annotation `int`, `float`, `str`, `bool` or `X | None` (an int is a float)."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return any(value is None if option is type(None) else isinstance(value, (int, float) if option is float else option)
               for option in options)
