"""Train the video model: the temporal modules of a converted SDXL checkpoint, or a baby from scratch.

    python train.py --mode temporal --model CHECKPOINT --data VIDEOS --out runs/temporal
    python train.py --mode baby --out runs/baby          # VAE, then UNet, on the shapes world

Mode `temporal` freezes every spatial weight (and the VAE and text encoders) and trains only the
temporal transformers and conditioners. Mode `baby` builds a small model of the same architecture
and trains its VAE, then its whole UNet; its text encoders are frozen random CLIPs with a tokenizer
of the shapes world's words. Each training sample is a clip cut into context frames (clean; with a
probability noised, with a probability dropped so that the first chunk is in distribution, with a
probability cut to its last frames) and chunk frames, which are noised; the loss is on the chunk's
prediction of the noise or of v. The defaults are the recipe of the shipped baby (models/baby).

One process on a CPU, or several under `torchrun --nproc_per_node N train.py ...` (DDP; gloo on
CPU, nccl on GPU). Checkpoints resume exactly: model, optimiser, schedule, data position and
random state. The same command (or only --out) resumes a run: options not given take the values
stored in OUT/train_config.json, and a changed option that would change the result is refused.
Ctrl-C (one process) stops after the step in progress, with a checkpoint.
"""

import argparse
import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin

# What a run resumed in the same --out may do with a setting (TrainConfig's `resume`).
FIXED = "fixed"  # it shapes the trained model: it must keep its stored value
EXTEND = "extend"  # it may grow (more steps): the run goes on
FREE = "free"  # logging, speed, the machine, the sample defaults written with the model: it may change
BABY_VAE_CHANNELS = (16, 32, 32)  # baby_configs' VAE: three levels, so it downsamples by 4
STAGES = ("vae", "unet")  # each checkpoints to OUT/NAME.pt
# Settings renamed since: the old name, as a run's train_config.json may hold it -> the TrainConfig field.
RENAMED_SETTINGS = {"steps": "unet_steps", "chunk_frames": "frames"}


def setting(default, help: str, resume: str, minimum=None, maximum=None, above=None, aliases=()):
    """A TrainConfig field: its default, its --help text, what a resumed run may do with it (FIXED,
    EXTEND or FREE), the range its value must be in (`above`: strictly greater), and other option
    names it answers to (old names, e.g. "--steps")."""
    metadata = {"help": help, "resume": resume, "minimum": minimum, "maximum": maximum, "above": above,
                "aliases": aliases}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every setting, typed; each becomes a command-line option (`--context-drop 0.3`) with its help,
    default and choices (from a Literal), and is checked before any work."""

    mode: Literal["baby", "temporal"] = setting(
        "baby", "baby: everything from scratch; temporal: only the temporal modules of --model", FIXED)
    model: str = setting("", "mode temporal: the checkpoint folder to start from (convert_weights.py)", FIXED)
    data: str = setting("shapes", '"shapes" (the shapes world) or a folder of videos with captions', FIXED)
    clips: int = setting(0, "shapes world: cycle over this many clips (1 overfits one); 0: endless", FIXED, minimum=0)
    out: str = setting("runs/baby", "the run's folder: checkpoints, log, samples and the trained model (OUT/model)",
                       FREE)
    size: int = setting(32, "frame height and width in pixels, a multiple of the VAE's downsampling", FIXED, minimum=1)
    frame_stride: int = setting(1, "video folders: keep every n-th frame", FIXED, minimum=1)
    context_frames: int = setting(2, "clean frames before each chunk", FIXED, minimum=1)
    frames: int = setting(4, "noised frames of each chunk, after its context frames (as sample.py's --frames)", FIXED,
                          minimum=1, aliases=("--chunk-frames",))
    context_drop: float = setting(0.3, "probability that a batch has no context", FIXED, minimum=0, maximum=1)
    context_shorten: float = setting(
        0.5, "probability that a batch keeps only its last 1 .. k-1 context frames (--image gives 1)", FIXED,
        minimum=0, maximum=1)
    context_noise: float = setting(0.1, "std of the noise added to the context when it is noised", FIXED, minimum=0)
    context_noise_probability: float = setting(0.3, "probability that a batch's context is noised", FIXED,
                                               minimum=0, maximum=1)
    text_drop: float = setting(0.1, "probability that a sample's text is zeroed (trains the unconditional)", FIXED,
                               minimum=0, maximum=1)
    prediction_type: Literal["epsilon", "v_prediction"] = setting(
        "v_prediction", "what the UNet predicts, in mode baby (mode temporal keeps its checkpoint's)", FIXED)
    conditioner: str = setting("transformer", "mode baby: the temporal conditioner, a name in temporal.CONDITIONERS",
                               FIXED)
    batch_size: int = setting(16, "clips per step and process", FIXED, minimum=1)
    gradient_accumulation: int = setting(1, "micro-batches per step", FIXED, minimum=1)
    unet_steps: int = setting(9000, "steps of the UNet stage", EXTEND, minimum=1, aliases=("--steps",))
    learning_rate: float = setting(1e-3, "peak learning rate of the UNet stage", FIXED, above=0)
    warmup_steps: int = setting(200, "steps of linear warm-up of each stage, then a cosine decay to 10%", FIXED,
                                minimum=0)
    weight_decay: float = setting(0.0, "AdamW's weight decay", FIXED, minimum=0)
    grad_clip: float = setting(1.0, "the gradient norm is clipped to this", FIXED, above=0)
    autocast: Literal["none", "bf16", "fp16"] = setting("none", "mixed precision of the forward pass", FIXED)
    gradient_checkpointing: bool = setting(
        False, "recompute activations in the backward pass: less memory, the same numbers", FREE)
    vae_steps: int = setting(1500, "mode baby: steps of the VAE stage, before the UNet stage", EXTEND, minimum=1)
    vae_batch_size: int = setting(32, "mode baby: images per VAE step and process", FIXED, minimum=1)
    vae_learning_rate: float = setting(2e-3, "mode baby: peak learning rate of the VAE stage", FIXED, above=0)
    log_every: int = setting(100, "a progress line every n steps (OUT/log.jsonl has every step)", FREE, minimum=1)
    sample_every: int = setting(3000, "sample GIFs in OUT/samples every n UNet steps", FREE, minimum=1)
    checkpoint_every: int = setting(250, "a checkpoint every n steps (and at the end of a stage, and on Ctrl-C)",
                                    FREE, minimum=1)
    seed: int = setting(0, "seed of the data, the initial weights and every random draw", FIXED, minimum=0)
    threads: int = setting(0, "CPU threads for torch (0: torch's default); 1 is fastest on a busy machine", FREE,
                           minimum=0)
    device: str = setting("auto", "auto (cuda if there is one, else cpu), cpu, cuda, cuda:N or mps", FREE)
    sample_steps: int = setting(25, "denoising steps of the samples; sample.py's default for the trained model",
                                FREE, minimum=1)
    sample_guidance: float = setting(2.0, "guidance scale of the samples; sample.py's default for the trained model",
                                     FREE, minimum=0)
    sample_anchor_frame: bool = setting(
        True, "keep the first frame in the samples' context; sample.py's default for the trained model", FREE)

    def __post_init__(self):
        """ValueError naming the option for a value the run cannot use."""
        for field in dataclasses.fields(self):
            value, option, choices = getattr(self, field.name), option_name(field.name), literal_choices(field)
            kind = str if choices else field.type
            if not of_type(value, kind):
                raise ValueError(f"{option} must be of type {kind.__name__}, got {value!r}")
            if choices and value not in choices:
                raise ValueError(f"{option} must be one of {', '.join(choices)}; got {value!r}")
            if field.type is float and not math.isfinite(value):
                raise ValueError(f"{option} must be a finite number, got {value}")
            low, high, above = (field.metadata.get(key) for key in ("minimum", "maximum", "above"))
            if (low is not None and value < low) or (high is not None and value > high) or (
                    above is not None and value <= above):
                raise ValueError(f"{option} must be {value_range(field)}, got {value}")
        if self.mode == "temporal" and not Path(self.model, "config.json").is_file():
            raise ValueError(f"--model {self.model!r}: mode temporal needs a checkpoint folder (convert_weights.py)")
        if self.data != "shapes" and not Path(self.data).is_dir():
            raise ValueError(f"--data must be 'shapes' or a folder of videos, got {self.data!r}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} is a file; give a folder (new or a run's)")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps; got {self.device!r}")
        factor = vae_downsampling(self)
        if self.size % factor:
            raise ValueError(f"--size must be a multiple of {factor} (the VAE's downsampling), got {self.size}")


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def of_type(value, kind: type) -> bool:
    """isinstance, with an int taken as a float and a bool as nothing but a bool."""
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


def literal_choices(field: dataclasses.Field) -> tuple:
    """The values of a Literal[...] field; () for any other."""
    return get_args(field.type) if get_origin(field.type) is Literal else ()


def value_range(field: dataclasses.Field) -> str:
    """The range of a field's metadata in words: "at least 1", "in [0, 1]", "> 0"."""
    low, high, above = (field.metadata[key] for key in ("minimum", "maximum", "above"))
    if above is not None:
        return f"> {above}"
    return f"in [{low}, {high}]" if high is not None else f"at least {low}"


def shown(value) -> str:
    """A setting's value as --help and the resume messages show it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return '""' if value == "" else str(value)


def read_json_object(path: Path) -> dict:
    """A JSON object from a file; ValueError naming the file otherwise."""
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read as JSON ({error})") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a JSON {type(values).__name__}, expected an object")
    return values


def vae_downsampling(config: TrainConfig) -> int:
    """How much the run's VAE downsamples: the baby's, or the one in --model's config.json."""
    channels = BABY_VAE_CHANNELS
    if config.mode == "temporal":
        path = Path(config.model, "config.json")
        vae = read_json_object(path).get("vae")
        channels = vae.get("block_out_channels") if isinstance(vae, dict) else None
        if not isinstance(channels, list) or not channels:
            raise ValueError(f"--model {config.model}: {path} has no vae.block_out_channels")
    return 2 ** (len(channels) - 1)


# Options and resuming ---------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (`error: ...`, exit status 2), not the whole usage."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def make_parser() -> argparse.ArgumentParser:
    """An option per TrainConfig field, with the field's help, default and choices. An option not
    given is absent from the parsed namespace (`parse_config` fills it in)."""
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           argument_default=argparse.SUPPRESS)
    for field in dataclasses.fields(TrainConfig):
        help = f"{field.metadata['help']} (default: {shown(field.default)})".replace("%", "%%")
        names = (option_name(field.name), *field.metadata["aliases"])
        if field.type is bool:
            parser.add_argument(*names, dest=field.name, action=argparse.BooleanOptionalAction, help=help)
        else:
            choices = literal_choices(field) or None
            parser.add_argument(*names, dest=field.name, type=str if choices else field.type, choices=choices,
                                help=help)
    return parser


def stored_settings(out: Path) -> dict | None:
    """The settings of the run in `out` (its train_config.json; an old name under its new one, as
    RENAMED_SETTINGS says; fields TrainConfig no longer has left out), or None when it holds no run."""
    path = out / "train_config.json"
    if not path.exists():
        return None
    values = read_json_object(path)
    for old, new in RENAMED_SETTINGS.items():
        if old in values and new not in values:
            values[new] = values.pop(old)
    names = {field.name for field in dataclasses.fields(TrainConfig)}
    return {name: value for name, value in values.items() if name in names}


def parse_config(argv=None) -> TrainConfig:
    """The options of the command line. An option not given takes the value stored in --out's
    train_config.json when it holds a run (so that the same command, or only --out, resumes the run
    as it was started), else its default."""
    given = vars(make_parser().parse_args(argv))
    stored = stored_settings(Path(given.get("out", TrainConfig.out))) or {}
    return TrainConfig(**{**stored, **given})


def resume_changes(config: TrainConfig) -> list[str]:
    """The settings of `config` that differ from those of the run already in its --out, as
    "--unet-steps 9000 -> 12000", when all of them only extend the run (EXTEND and FREE fields); a
    ValueError naming every one that would change its result. Fields the stored run lacks (added
    since) are not compared. --vae-steps may grow only until the UNet stage has begun."""
    out = Path(config.out)
    stored = stored_settings(out) or {}
    accepted, refused = [], []
    for field in dataclasses.fields(TrainConfig):
        if field.name not in stored or stored[field.name] == getattr(config, field.name):
            continue
        old, new, rule = stored[field.name], getattr(config, field.name), field.metadata["resume"]
        change = f"{option_name(field.name)} {shown(old)} -> {shown(new)}"
        if rule == EXTEND and new < old:
            refused.append(change + " (it may only increase)")
        elif rule == EXTEND and field.name == "vae_steps" and (out / "unet.pt").exists():
            refused.append(change + " (the UNet stage has begun)")
        elif rule == FIXED:
            refused.append(change)
        else:
            accepted.append(change)
    if refused:
        raise ValueError(f"--out {out} holds a run with other settings: {', '.join(refused)}; these change what "
                         f"it trains, so resume with the stored values ({out / 'train_config.json'}) or use a new --out")
    return accepted


def checked_config(argv=None) -> TrainConfig:
    """parse_config and resume_changes for the command line: a bad option, or one that would change
    the run in --out, is one line on stderr (exit status 2), before anything is imported or touched."""
    try:
        config = parse_config(argv)
        resume_changes(config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return config


if __name__ == "__main__":
    # Options are parsed and checked before the imports below (torch, transformers, the model
    # modules), so that --help and a bad option answer at once, not after seconds of imports.
    CONFIG = checked_config()

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import world
from endless import VideoState, generate_latents, to_uint8_frames
from model import UNet, UNetConfig
from pipeline import StableDiffusionXLVideoPipeline, fsync, fsync_tree, micro_conditioning, writing
from scheduler import DPMSolverMultistepScheduler, SchedulerConfig
from text import TextEncoder, clip_tokenizers
from vae import AutoencoderKL, VAEConfig
from video_io import open_writer, read_video
from video_settings import Settings

AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # TrainConfig.autocast's choices
VIDEO_EXTENSIONS = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")
CHECKPOINT_KEYS = {"step", "module", "optimizer", "schedule", "generators"}


# Data ------------------------------------------------------------------------------------------


class ShapesData:
    """Clips of the shapes world; sample `index` is always the same clip. With `num_clips` > 0
    the samples cycle over that many clips."""

    def __init__(self, size: int, num_frames: int, seed: int, num_clips: int = 0):
        self.size, self.num_frames, self.seed, self.num_clips = size, num_frames, seed, num_clips

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        """(3, frames, size, size) in [-1, 1] and its caption."""
        index = index % self.num_clips if self.num_clips else index
        clip = world.random_clip(self.seed * 1_000_003 + index, self.size)
        start = (index * 7919) % 64  # any stretch of the endless clip
        return world.render(clip, self.num_frames, self.size, first_frame=start), clip.caption


class VideoFolder:
    """Videos with captions: a sidecar `NAME.txt`, or `metadata.jsonl` / `metadata.csv` with
    `file_name` and `text` columns. Sample `index` is a window of `num_frames` frames (every
    `frame_stride`-th), resized to cover and centre-cropped."""

    def __init__(self, folder: str, size: int, num_frames: int, frame_stride: int, seed: int):
        self.size, self.num_frames, self.stride, self.seed = size, num_frames, frame_stride, seed
        self.items = sorted(read_captions(Path(folder)).items())
        if not self.items:
            raise ValueError(f"--data {folder}: no videos with captions found")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path, caption = self.items[index % len(self.items)]
        video, _ = read_video(str(path), self.size, self.size)  # (3, frames, size, size)
        video = video[:, :: self.stride]
        span = self.num_frames
        if video.shape[1] < span:
            raise ValueError(f"{path} has {video.shape[1]} frames after stride {self.stride}; need {span}")
        start = int(np.random.default_rng((self.seed, index)).integers(0, video.shape[1] - span + 1))
        return video[:, start : start + span], caption


def read_captions(folder: Path) -> dict[Path, str]:
    captions = {}
    if (folder / "metadata.jsonl").is_file():
        for line in (folder / "metadata.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                captions[folder / row["file_name"]] = row["text"]
    if (folder / "metadata.csv").is_file():
        import csv

        with open(folder / "metadata.csv", newline="") as file:
            for row in csv.DictReader(file):
                captions[folder / row["file_name"]] = row["text"]
    for video in folder.iterdir():
        if video.suffix.lower() in VIDEO_EXTENSIONS and video.with_suffix(".txt").is_file():
            captions[video] = video.with_suffix(".txt").read_text().strip()
    return captions


def make_data(config: TrainConfig):
    """The run's clips: the shapes world or a folder of videos (ValueError if it holds none)."""
    clip_frames = config.context_frames + config.frames
    if config.data == "shapes":
        return ShapesData(config.size, clip_frames, config.seed, config.clips)
    return VideoFolder(config.data, config.size, clip_frames, config.frame_stride, config.seed)


def batch_of(data, step: int, batch_size: int, rank: int, world_size: int):
    """The samples of this process at `step`: a fixed slice of the global batch, so that the data
    position is the step alone. Returns (batch, 3, frames, H, W) and a list of captions."""
    first = (step * world_size + rank) * batch_size
    samples = [data[first + i] for i in range(batch_size)]
    return torch.stack([video for video, _ in samples]), [caption for _, caption in samples]


# The baby model ---------------------------------------------------------------------------------


def baby_text_encoder(folder: Path, seed: int) -> TextEncoder:
    """Frozen random CLIP encoders (hidden 32, projection 32) and a tokenizer of the world's words."""
    tokenizer, tokenizer_2 = clip_tokenizers(world.write_tokenizer_files(folder), 16)
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=16, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=32, **common))
    return TextEncoder(tokenizer, tokenizer_2, text_encoder, text_encoder_2)


def baby_configs(size: int, conditioner: str = "transformer") -> tuple[UNetConfig, VAEConfig]:
    """Three levels each (the VAE downsamples by 4), 3.0 M UNet parameters, 1.3 M of them temporal
    (with the transformer conditioner)."""
    vae = VAEConfig(block_out_channels=BABY_VAE_CHANNELS, layers_per_block=1, norm_num_groups=8, force_upcast=False)
    unet = UNetConfig(
        block_out_channels=(32, 64, 64), layers_per_block=1, transformer_layers_per_block=(0, 1, 1), head_dim=16,
        cross_attention_dim=64, pooled_text_dim=32, addition_time_embed_dim=16, norm_num_groups=8,
        sample_size=size // vae.downsample_factor, temporal_layers=1, conditioner_dim=64, conditioner=conditioner,
    )
    return unet, vae


# Files ------------------------------------------------------------------------------------------


@contextmanager
def atomic_file(path: Path):
    """Open NAME.tmp next to `path` for writing; once the body is done, fsync it and rename it to
    `path`, so that a kill leaves the old file or the new one, never part of one. An error is an
    OSError naming `path`, and the temporary file is removed."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        with writing(path), open(temporary, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
            os.replace(temporary, path)
            fsync(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def replace_folder(temporary: Path, folder: Path) -> None:
    """Put the complete folder `temporary` (fsynced) at `folder`. A folder cannot be replaced in one
    rename: the old one goes to NAME.old first, so that a kill between the two leaves it there,
    never a half-written NAME."""
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(temporary, folder)
    fsync(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(path: Path, mmap: bool = False) -> dict | None:
    """A stage's checkpoint, or None when there is none; ValueError naming a file that is not a
    whole checkpoint (truncated, or something else). With `mmap` the tensors stay on disk: a cheap
    check of the file before any work."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except PermissionError:
        raise
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError):  # what torch.load raises for a broken file
        state = None
    if not (isinstance(state, dict) and CHECKPOINT_KEYS <= state.keys()):
        raise ValueError(f"{path} is not a complete checkpoint (truncated or corrupted); move it away to train "
                         f"its stage from the start")
    return state


# Training ---------------------------------------------------------------------------------------


class Stopped(Exception):
    """A stage stopped on Ctrl-C after checkpointing; the message says where and how to resume."""


def learning_rate_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then a cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """A stage's progress: step, loss, learning rate, time spent and left. In a terminal a live line,
    rewritten every step and kept every `every` steps; otherwise a line every `every` steps."""

    def __init__(self, name: str, first_step: int, steps: int, every: int, stream=None):
        self.name, self.first, self.steps, self.every = name, first_step, steps, every
        self.stream = stream or sys.stdout
        self.live, self.open_line, self.width = self.stream.isatty(), False, 0
        self.started = time.time()

    def update(self, step: int, loss: float, learning_rate: float) -> None:
        spent = time.time() - self.started
        left = spent / (step - self.first) * (self.steps - step)
        line = (f"{self.name} step {step}/{self.steps} loss {loss:.4f} lr {learning_rate:.2e} | "
                f"{duration(spent)} spent, {duration(left)} left")
        keep = step % self.every == 0 or step == self.steps
        if self.live:
            self.width = max(self.width, len(line))
            print("\r" + line.ljust(self.width), end="\n" if keep else "", file=self.stream, flush=True)
            self.open_line = not keep
        elif keep:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """End a live line left open (the stage stopped between two kept lines)."""
        if self.open_line:
            print(file=self.stream, flush=True)


@contextmanager
def stop_requests(enabled: bool):
    """While a stage trains, the first Ctrl-C only asks it to stop after the step in progress (the
    yielded list gets an entry); a second one interrupts at once. Off under torchrun, whose
    processes would each stop at another step."""
    requests = []
    enabled = enabled and threading.current_thread() is threading.main_thread()

    def request(signum, frame):
        requests.append(signum)
        signal.signal(signal.SIGINT, previous)
        print("\nstopping after this step, with a checkpoint (Ctrl-C again: at once, without)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, request) if enabled else None
    try:
        yield requests
    finally:
        if enabled:
            signal.signal(signal.SIGINT, previous)


class Stage:
    """One training loop: a module, the parameters it trains, a loss; checkpoints `out/NAME.pt`."""

    def __init__(self, name, module, parameters, loss, steps, learning_rate, config: TrainConfig, distributed):
        self.name, self.module, self.loss, self.steps, self.config = name, module, loss, steps, config
        self.parameters = list(parameters)
        self.path = Path(config.out) / f"{name}.pt"
        self.optimizer = torch.optim.AdamW(self.parameters, lr=learning_rate, weight_decay=config.weight_decay)
        factor = lambda step: learning_rate_factor(step, config.warmup_steps, steps)  # noqa: E731
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.distributed = distributed
        self.rank = dist.get_rank() if distributed else 0
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.rank)
        self.step = 0
        self.wrapped = module
        if distributed:
            self.wrapped = DistributedDataParallel(module, find_unused_parameters=True)

    def save(self) -> None:
        """Every process calls it; rank 0 writes every process's random state with the rest,
        atomically (`atomic_file`)."""
        generators = [self.generator.get_state()]
        if dist.is_initialized():
            generators = [None] * dist.get_world_size()
            dist.all_gather_object(generators, self.generator.get_state())
        if self.rank != 0:
            return
        state = {"step": self.step, "module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "generators": generators}
        with atomic_file(self.path) as file:
            torch.save(state, file)

    def load(self) -> None:
        """Continue from the checkpoint, if there is one (each process reads the same file)."""
        state = read_checkpoint(self.path)
        if state is None:
            return
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.generator.set_state(state["generators"][self.rank])
        self.step = state["step"]

    def run(self, on_step=None) -> None:
        """Train from the current step to the last, logging, sampling and checkpointing. Ctrl-C (one
        process) stops it after the step in progress, with a checkpoint: Stopped."""
        config = self.config
        autocast = AUTOCAST_DTYPES[config.autocast]
        device_type = self.parameters[0].device.type
        progress = Progress(self.name, self.step, self.steps, config.log_every)
        with stop_requests(enabled=not self.distributed) as stop:
            try:
                while self.step < self.steps:
                    self.optimizer.zero_grad(set_to_none=True)
                    total = 0.0
                    for micro in range(config.gradient_accumulation):
                        with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
                            loss = self.loss(self.wrapped, self.step * config.gradient_accumulation + micro,
                                             self.generator)
                        (loss / config.gradient_accumulation).backward()
                        total += loss.item() / config.gradient_accumulation
                    torch.nn.utils.clip_grad_norm_(self.parameters, config.grad_clip)
                    self.optimizer.step()
                    self.schedule.step()
                    self.step += 1
                    if self.rank == 0:
                        progress.update(self.step, total, log_step(self, total))
                    if on_step is not None:
                        on_step(self)
                    if stop or self.step % config.checkpoint_every == 0 or self.step == self.steps:
                        self.save()
                    if stop:
                        raise Stopped(f"stopped at {self.name} step {self.step}/{self.steps}, saved in {self.path}; "
                                      f"run the same command to resume")
            finally:
                progress.close()


def log_step(stage: Stage, loss: float) -> float:
    """Append the step's loss and learning rate to out/log.jsonl; returns the learning rate."""
    record = {"stage": stage.name, "step": stage.step, "loss": loss, "lr": stage.schedule.get_last_lr()[0]}
    path = Path(stage.config.out) / "log.jsonl"
    with writing(path), open(path, "a") as log:
        log.write(json.dumps(record) + "\n")
    return record["lr"]


class VAEObjective(torch.nn.Module):
    """Reconstruction (MSE) of images through the VAE plus a small KL term, as one forward (for DDP)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """images: (batch, 3, H, W) in [-1, 1]; noise: (batch, latent_channels, h, w)."""
        posterior = self.vae.encode(images)
        decoded = self.vae.decode(posterior.mean + posterior.std * noise)
        kl = 0.5 * (posterior.mean**2 + posterior.std**2 - 1 - posterior.logvar).mean()
        return F.mse_loss(decoded, images) + 1e-4 * kl


def vae_loss(data, config: TrainConfig, rank: int, world_size: int, latent_shape):
    def loss(objective, index, generator):
        videos, _ = batch_of(data, index, config.vae_batch_size, rank, world_size)
        images = videos[:, :, 0].to(next(objective.parameters()).device)  # (b, 3, H, W): one frame per clip
        noise = torch.randn((images.shape[0], *latent_shape), generator=generator).to(images)
        return objective(images, noise)

    return loss


def unet_loss(pipeline: StableDiffusionXLVideoPipeline, data, config: TrainConfig, rank: int, world_size: int):
    """The denoising loss on the chunk frames, conditioned on the clean (or noised, or no) context: the
    model predicts the noise, or v = alpha * noise - sigma * latents, as its scheduler's prediction_type says
    (`DPMSolverMultistepScheduler.add_noise` and `.training_target`, in float32)."""
    device = pipeline.device
    scheduler = DPMSolverMultistepScheduler(pipeline.scheduler_config)
    train_steps = pipeline.scheduler_config.num_train_timesteps
    k = config.context_frames

    def loss(unet, index, generator):
        videos, captions = batch_of(data, index, config.batch_size, rank, world_size)
        with torch.no_grad():
            latents = pipeline.vae.encode_video(videos.to(device))  # (b, 4, k + f, h, w)
            text, _, pooled, _ = pipeline.text_encoder.encode_prompt(captions, do_classifier_free_guidance=False)
        batch = latents.shape[0]
        keep_text = (torch.rand(batch, generator=generator) >= config.text_drop).to(text)  # (b,)
        text, pooled = text * keep_text[:, None, None], pooled * keep_text[:, None]
        context, chunk = latents[:, :, :k], latents[:, :, k:]  # (b, 4, k, h, w), (b, 4, f, h, w)
        draws = torch.rand(3, generator=generator)
        if draws[0] < config.context_drop:
            context = None
        else:
            if draws[2] < config.context_shorten and k > 1:
                context = context[:, :, -int(torch.randint(1, k, (), generator=generator)):]  # (b, 4, 1 .. k-1, h, w)
            if draws[1] < config.context_noise_probability:
                context = context + config.context_noise * torch.randn(context.shape, generator=generator).to(context)
        timesteps = torch.randint(0, train_steps, (batch,), generator=generator)
        noise = torch.randn(chunk.shape, generator=generator).to(chunk)
        chunk, noise = chunk.float(), noise.float()  # (b, 4, f, h, w), the noising and target in float32
        noisy = scheduler.add_noise(chunk, noise, timesteps)
        target = scheduler.training_target(chunk, noise, timesteps)
        time_ids = micro_conditioning(batch, config.size, config.size, dtype=text.dtype, device=text.device)
        prediction = unet(noisy, timesteps.to(device), text, pooled, time_ids, context)
        return F.mse_loss(prediction.float(), target.float())

    return loss


def sample_defaults(config: TrainConfig) -> dict:
    """How sample.py makes videos with the trained model (its config.json's `sample_defaults`), and
    how write_samples makes the training samples."""
    return {"height": config.size, "width": config.size, "frames": config.frames,
            "context_frames": config.context_frames, "steps": config.sample_steps,
            "guidance": config.sample_guidance, "anchor_frame": config.sample_anchor_frame}


def write_samples(pipeline, config: TrainConfig, step: int, prompts=("a red circle moving left", "a blue square moving up")):
    """A 4-chunk GIF per prompt in out/samples/, made as sample.py makes videos."""
    folder = Path(config.out) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    was_training = pipeline.unet.training
    pipeline.unet.eval()
    with torch.no_grad():
        for index, prompt in enumerate(prompts):
            settings = Settings.from_options(timeline=[(0, prompt)], **sample_defaults(config))
            chunks = generate_latents(pipeline, settings, [pipeline.encode_prompt(prompt)], VideoState(),
                                      torch.Generator().manual_seed(index))
            path = folder / f"step{step:06d}_{index}.gif"
            with writing(path), open_writer(str(path), fps=6) as writer:
                for _ in range(4):
                    writer.write_chunk(to_uint8_frames(pipeline.vae.decode_video(next(chunks))[0]))
    pipeline.unet.train(was_training)


def save_model(pipeline: StableDiffusionXLVideoPipeline, config: TrainConfig) -> None:
    """Write out/model, the folder sample.py loads, whole or not at all: into out/model.tmp, fsynced
    (save_pretrained), then put in the place of the old one (`replace_folder`)."""
    folder = Path(config.out) / "model"
    temporary = folder.with_name("model.tmp")
    provenance = {"trained_by": "train.py", "mode": config.mode, "data": config.data,
                  "unet_steps": config.unet_steps}
    try:
        with writing(folder):
            shutil.rmtree(temporary, ignore_errors=True)  # left by a save that was killed
            pipeline.save_pretrained(temporary, provenance=provenance, sample_defaults=sample_defaults(config))
            fsync_tree(temporary)
            replace_folder(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def scaling_factor(vae: AutoencoderKL, data, config: TrainConfig) -> float:
    """1 / std of the VAE's latents over a few batches, so that scaled latents have unit variance."""
    with torch.no_grad():
        videos = torch.cat([batch_of(data, 10_000 + i, config.vae_batch_size, 0, 1)[0][:, :, 0] for i in range(4)])
        return 1.0 / vae.encode(videos.to(next(vae.parameters()).device)).mean.std().item()


def resolve_device(name: str) -> str:
    """--device, with auto the GPU when there is one; ValueError for a device this machine lacks."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device (give --device auto or cpu)")
    return name


def build_pipeline(config: TrainConfig) -> StableDiffusionXLVideoPipeline:
    device = resolve_device(config.device)
    if config.mode == "temporal":
        pipeline = StableDiffusionXLVideoPipeline.from_pretrained(config.model, device)
        pipeline.unet.requires_grad_(False)
        for parameter in pipeline.unet.temporal_parameters():
            parameter.requires_grad_(True)
        pipeline.vae.requires_grad_(False)
        return pipeline
    unet_config, vae_config = baby_configs(config.size, config.conditioner)
    torch.manual_seed(config.seed)
    text_encoder = baby_text_encoder(Path(config.out) / "tokenizer-files", config.seed)
    scheduler_config = dataclasses.replace(SchedulerConfig.video_model(), prediction_type=config.prediction_type)
    pipeline = StableDiffusionXLVideoPipeline(UNet(unet_config), AutoencoderKL(vae_config), text_encoder,
                                              scheduler_config)
    return pipeline.to(device)


def train(config: TrainConfig, on_step=None) -> StableDiffusionXLVideoPipeline:
    """Run every stage of `config` (resuming any that has a checkpoint) and write the model to out/model.
    Before any work: the settings are compared with those of a run already in out (`resume_changes`),
    its checkpoints are read, and the data and the device are checked (ValueError)."""
    out = Path(config.out)
    changes = resume_changes(config)
    checkpoints = {name: read_checkpoint(out / f"{name}.pt", mmap=True) for name in STAGES}
    steps = {name: state["step"] for name, state in checkpoints.items() if state is not None}
    del checkpoints
    if config.mode == "baby" and "unet" in steps and "vae" not in steps:
        raise ValueError(f"{out / 'unet.pt'} was trained on the latents of the VAE of {out / 'vae.pt'}, which is "
                         f"missing: move unet.pt away too, or use a new --out")
    data = make_data(config)
    resolve_device(config.device)
    if config.mode == "baby":
        try:
            baby_configs(config.size, config.conditioner)
        except ValueError as error:  # a conditioner temporal.py does not have
            raise ValueError(f"--conditioner {config.conditioner}: {error}") from None
    if config.threads:
        torch.set_num_threads(config.threads)
    distributed = "WORLD_SIZE" in os.environ
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if rank == 0:
        if (out / "train_config.json").exists():
            found = ", ".join(f"{name}.pt at step {step}" for name, step in steps.items()) or "no checkpoint yet"
            print(f"resuming {out} ({found})" + (f"; accepted {', '.join(changes)}" if changes else ""), flush=True)
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
        with atomic_file(out / "train_config.json") as file:
            file.write((json.dumps(asdict(config), indent=2) + "\n").encode())
    pipeline = build_pipeline(config)
    pipeline.unet.gradient_checkpointing = config.gradient_checkpointing

    if config.mode == "baby":
        vae = pipeline.vae.train()
        factor = vae.config.downsample_factor
        latent_shape = (vae.config.latent_channels, config.size // factor, config.size // factor)
        stage = Stage("vae", VAEObjective(vae), vae.parameters(), vae_loss(data, config, rank, world_size, latent_shape),
                      config.vae_steps, config.vae_learning_rate, config, distributed)
        stage.load()
        stage.run(on_step)
        vae.config.scaling_factor = scaling_factor(vae, data, config)
        vae.requires_grad_(False).eval()

    unet = pipeline.unet.train()
    trained = [p for p in unet.parameters() if p.requires_grad]
    stage = Stage("unet", unet, trained, unet_loss(pipeline, data, config, rank, world_size), config.unet_steps,
                  config.learning_rate, config, distributed)
    stage.load()

    def every_step(stage):
        if rank == 0 and stage.step % config.sample_every == 0:
            write_samples(pipeline, config, stage.step)
        if on_step is not None:
            on_step(stage)

    stage.run(every_step)
    unet.eval()
    if rank == 0:
        save_model(pipeline, config)
    if distributed:
        dist.barrier()
    return pipeline


def main(config: TrainConfig) -> None:
    """`train` for the command line: an error (a broken checkpoint, a full disk) is one line on
    stderr (exit status 1); Ctrl-C stops with a checkpoint and says how to resume (exit status 130)."""
    try:
        train(config)
    except Stopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print(f"\nstopped; {config.out} keeps its last checkpoints: run the same command to resume", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(CONFIG)
