"""Train the video model: the temporal modules of a converted SDXL checkpoint, or a baby from scratch.

    python train.py --mode temporal --model CHECKPOINT --data VIDEOS --out runs/temporal
    python train.py --mode baby --out runs/baby          # VAE, then UNet, on the shapes world
    python train.py --mode refiner --model models/baby --out runs/refiner   # a refiner for a model

Mode `temporal` freezes every spatial weight (and the VAE and text encoders) and trains only the
temporal transformers and conditioners. Mode `baby` builds a small model of the same architecture
and trains its VAE, then its whole UNet; its text encoders are frozen random CLIPs with a tokenizer
of the shapes world's words. Mode `refiner` freezes the whole --model and trains a new refiner
(refiner.py) to restore windows of 2 x --frames latents from corrupted ones (training/refiner.py);
its model is --model's with the refiner, which sample.py then runs by default.
Each training sample is a clip cut into context frames (clean; with a
probability noised, with a probability dropped so that the first chunk is in distribution, with a
probability cut to its last frames) and chunk frames, which are noised; the loss is on the chunk's
prediction of the noise or of v. The defaults are the recipe of the shipped baby (models/baby).

One process on a CPU, or several under `torchrun --nproc_per_node N train.py ...` (DDP, or with
--fsdp the UNet sharded by FSDP2; gloo on CPU, nccl on GPU). Every random draw of the loss is a
function of the seed and the step, the same on any number of processes (self-made contexts too).
Checkpoints resume exactly: model, optimiser, schedule, weight average and data position
(training/loop.py). --plan prints the memory a run needs per process, before any work (infra/memory.py). Every --validate-every steps a
validation loss at fixed timesteps and noise, and the shapes world's metrics, go to OUT/log.jsonl
and OUT/curves.png (training/validation.py). The same command (or only --out) resumes a run: options not given take the values
stored in OUT/train_config.json, and a changed option that would change the result is refused.
Ctrl-C (one process) stops after the step in progress, with a checkpoint. One run per --out at a time
(OUT/train.lock). A loss, gradient or weights that are not finite stop the run in one line naming the
step; nothing of them is written, so the last checkpoint and the model stay as they were.
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import sys
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin

from infra.cli import OneLineParser, of_type, option_name
from infra.files import check_not_an_input, read_json_object
from training.baby_sizes import BABY_VAE_CHANNELS
from video_settings import ChunkSpec, DriftControls

# What a run resumed in the same --out may do with a setting (TrainConfig's `resume`).
FIXED = "fixed"  # it shapes the trained model: it must keep its stored value
EXTEND = "extend"  # it may grow (more steps): the run goes on
FREE = "free"  # logging, speed, the machine, the sample defaults written with the model: it may change
STAGES = ("vae", "unet")  # each checkpoints to OUT/NAME.pt
# Settings renamed since: the old name, as a run's train_config.json may hold it -> the TrainConfig field.
RENAMED_SETTINGS = {"steps": "unet_steps", "chunk_frames": "frames"}
# Settings added since runs were stored without them: the value those runs had.
ADDED_SETTINGS = {"vae_downsampling": 4, "shapes": 1, "vocabulary": 1}
# ... unless the run was stored with the setting named here, which came in with the value given: the
# baby's vocabulary 2 came with --shapes (5b45222), so a run stored with "shapes" was trained with it.
ADDED_WITH = {"vocabulary": ("shapes", 2)}
# Settings per process: a run resumed on another number of processes keeps their product with it (the
# global batch), which train_config.json's "world_size" (the processes that started the run) gives.
PER_PROCESS = ("batch_size", "vae_batch_size")
REFINER_GROUPS = 32  # refiner.RefinerConfig.norm_num_groups: the refiner's width is a multiple of it
# Settings of the UNet's and the VAE's training and of the samples: mode refiner, which keeps --model's UNet,
# VAE and sample defaults, refuses them at other than their defaults (as the other modes refuse --refiner-*).
NOT_FOR_REFINER = ("vocabulary", "vae_downsampling", "context_frames", "context_drop", "context_shorten",
                   "context_noise", "context_noise_probability", "self_context", "self_context_probability",
                   "self_context_steps", "self_context_level", "text_drop", "prediction_type", "conditioner",
                   "unet_steps", "learning_rate", "gradient_checkpointing", "fsdp", "plan", "processes", "peak_tflops",
                   "vae_steps", "vae_batch_size", "vae_learning_rate", "sample_every", "sample_steps",
                   "sample_guidance", "sample_anchor_frame")


# Mode distill's own settings, and those it refuses at other than their defaults.
DISTILL_SETTINGS = ("distill_method", "student_steps", "teacher_guidance", "distill_steps", "distill_learning_rate",
                    "distill_weights")
NOT_FOR_DISTILL = ("vocabulary", "vae_downsampling", "self_context", "self_context_steps", "self_context_level",
                   "text_drop", "prediction_type", "conditioner", "unet_steps", "learning_rate", "vae_steps",
                   "vae_batch_size", "vae_learning_rate", "sample_steps", "sample_guidance", "sample_anchor_frame",
                   "plan", "processes", "peak_tflops", "validation_data", "validation_clips")


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

    mode: Literal["baby", "temporal", "refiner", "distill"] = setting(
        "baby", "baby: everything from scratch; temporal: only the temporal modules of --model; refiner: only a new "
                "refiner (refiner.py) for the frozen --model; distill: a few-step student of --model "
                "(training/distill.py)", FIXED)
    model: str = setting("", "modes temporal, refiner and distill: the checkpoint folder to start from "
                             "(convert_weights.py; distill: the teacher)", FIXED)
    data: str = setting("shapes", '"shapes" (the shapes world), a folder of videos with captions, or one of shards '
                                  "(tools/prepare_data.py; mode temporal)", FIXED)
    clips: int = setting(0, "shapes world: cycle over this many clips (1 overfits one); 0: endless", FIXED, minimum=0)
    shapes: int = setting(1, 'shapes world: shapes per clip, of distinct colours, one over the other, captioned "a red '
                             'circle moving left and a blue square moving up" (two shapes are 13 tokens of the '
                             "baby's 16)", FIXED, minimum=1, maximum=2)
    vocabulary: int = setting(
        2, "mode baby: the version of the tokenizer of the baby's text encoders (shapes/world.py VOCABULARIES), "
           'rebuilt from it and --seed: 2, every word of the world one token, "and" too; 1, the first babies\' '
           '(models/baby, docs/baby.md), which cuts "green" into 4 tokens and has no "and" (--shapes 1 only)',
        FIXED, minimum=1, maximum=2)
    out: str = setting("runs/baby", "the run's folder: checkpoints, log, samples and the trained model (OUT/model); "
                                      "not --model, --data or --validation-data, not inside one nor holding one",
                       FREE)
    size: int = setting(32, "frame height and width in pixels, a multiple of the VAE's downsampling", FIXED, minimum=1)
    vae_downsampling: int = setting(4, "mode baby: how much the VAE downsamples each side, 8 (four levels, as "
                                       "SDXL's) or 4 (three)", FIXED)
    frame_stride: int = setting(1, "video folders: keep every n-th frame", FIXED, minimum=1)
    context_frames: int = setting(2, "clean frames before each chunk", FIXED, minimum=1)
    frames: int = setting(4, "noised frames of each chunk, after its context frames (as sample.py's --frames)", FIXED,
                          minimum=1, aliases=("--chunk-frames",))
    context_drop: float = setting(0.3, "probability that a batch has no context", FIXED, minimum=0, maximum=1)
    context_shorten: float = setting(
        0.5, "probability that a batch keeps only its last 1 .. k-1 context frames (--image gives 1)", FIXED,
        minimum=0, maximum=1)
    context_noise: float = setting(0.1, "std of the noise added to the context when it is noised, at most 10 (the "
                                        "latents have unit variance: 10 already drowns the context)", FIXED, minimum=0,
                                   maximum=10)
    context_noise_probability: float = setting(0.3, "probability that a batch's context is noised", FIXED,
                                               minimum=0, maximum=1)
    self_context: Literal["off", "sampled", "one-step"] = setting(
        "off", "the context made by the model itself for some samples (training/self_context.py): sampled (the chunk "
               "before, in --self-context-steps) or one-step (the context noised and denoised once)", FIXED)
    self_context_probability: float = setting(0.5, "probability that a sample's context is the model's", FIXED,
                                              minimum=0, maximum=1)
    self_context_steps: int = setting(4, "sampler steps of a sampled self-context", FIXED, minimum=1)
    self_context_level: float = setting(
        0.5, "one-step self-context: the noise level is a timestep below this fraction of the training ones",
        FIXED, above=0, maximum=1)
    text_drop: float = setting(0.1, "probability that a sample's text is zeroed (trains the unconditional)", FIXED,
                               minimum=0, maximum=1)
    prediction_type: Literal["epsilon", "v_prediction"] = setting(
        "v_prediction", "what the UNet predicts, in mode baby (mode temporal keeps its checkpoint's)", FIXED)
    conditioner: str = setting("transformer", "mode baby: the temporal conditioner, a name in temporal.CONDITIONERS",
                               FIXED)
    batch_size: int = setting(16, "clips per step and process", FIXED, minimum=1)
    gradient_accumulation: int = setting(1, "micro-batches per step", FIXED, minimum=1)
    unet_steps: int = setting(9000, "steps of the UNet stage", EXTEND, minimum=1, aliases=("--steps",))
    learning_rate: float = setting(1e-3, "peak learning rate of the UNet stage, at most 1 (AdamW moves each weight "
                                         "by about this much a step)", FIXED, above=0, maximum=1)
    warmup_steps: int = setting(200, "steps of linear warm-up of each stage, then a cosine decay to 10%", FIXED,
                                minimum=0)
    weight_decay: float = setting(0.0, "AdamW's weight decay: each step multiplies the weights by 1 - learning rate "
                                       "x this, which must stay above 0", FIXED, minimum=0)
    grad_clip: float = setting(1.0, "the gradient norm is clipped to this", FIXED, above=0)
    autocast: Literal["none", "bf16", "fp16"] = setting("none", "mixed precision of the forward pass", FIXED)
    gradient_checkpointing: bool = setting(
        False, "recompute activations in the backward pass: less memory, the same numbers", FREE)
    fsdp: bool = setting(
        False, "under torchrun: shard the UNet over the processes with FSDP2 (each level and the mid block, then "
               "the whole UNet; weights gathered in --autocast's dtype, gradients reduced in float32) and "
               "checkpoint it sharded (OUT/unet.dcp); off: DDP, a whole copy on every process", FIXED)
    ema_decay: float = setting(
        0.0, "keep an exponential moving average of the trained UNet weights with this decay per step, in the "
             "checkpoint, and write it as the model; 0: none", FIXED, minimum=0)
    validate_every: int = setting(
        500, "every n UNet steps: the validation loss (and on the shapes world the metrics of shapes/scoring.py) in "
             "OUT/log.jsonl and OUT/curves.png (mode refiner: every n refiner steps, its losses); 0: never", FREE,
        minimum=0)
    validation_clips: int = setting(8, "held-out clips of the validation loss, at most 100000", FREE, minimum=1,
                                    maximum=100_000)
    validation_data: str = setting(
        "", "held-out clips for the validation loss: a folder of videos or prepared shards; the shapes world "
            "holds out its own", FREE)
    plan: bool = setting(
        False, "print the memory each process needs (weights, gradients, optimizer state, activations) under DDP "
               "and FSDP, counted without weights on the meta device, and exit", FREE)
    processes: int = setting(0, "--plan: the number of processes (0: WORLD_SIZE, or 1)", FREE, minimum=0)
    peak_tflops: float = setting(989.0, "the GPU's dense peak TFLOP/s in --autocast's dtype, for the model FLOPs "
                                        "utilisation (H100 and H200 SXM, bf16: 989)", FREE, above=0)
    vae_steps: int = setting(1500, "mode baby: steps of the VAE stage, before the UNet stage", EXTEND, minimum=1)
    vae_batch_size: int = setting(32, "mode baby: images per VAE step and process", FIXED, minimum=1)
    vae_learning_rate: float = setting(2e-3, "mode baby: peak learning rate of the VAE stage, at most 1", FIXED,
                                       above=0, maximum=1)
    refiner_steps: int = setting(3000, "mode refiner: steps of the refiner stage", EXTEND, minimum=1)
    refiner_learning_rate: float = setting(1e-3, "mode refiner: peak learning rate of the refiner stage, at most 1",
                                           FIXED, above=0, maximum=1)
    refiner_channels: int = setting(
        32, f"mode refiner: the refiner's convolution width, a multiple of {REFINER_GROUPS} (its GroupNorms' groups; "
            f"the release's: 320)", FIXED, minimum=REFINER_GROUPS, maximum=4096)
    refiner_heads: int = setting(2, "mode refiner: attention heads of the refiner's spatial and temporal transformers "
                                    "(the release's: 8)", FIXED, minimum=1, maximum=64)
    refiner_head_dim: int = setting(16, "mode refiner: the width of each of those heads (the release's: 64)", FIXED,
                                    minimum=1, maximum=1024)
    refiner_spatial_layers: int = setting(1, "mode refiner: blocks of the refiner's spatial transformer (the "
                                             "release's: 6)", FIXED, minimum=1, maximum=64)
    refiner_temporal_layers: int = setting(1, "mode refiner: blocks of the refiner's temporal transformer (the "
                                              "release's: 6)", FIXED, minimum=1, maximum=64)
    refiner_shift: float = setting(
        0.1, "mode refiner: std of the mean shift, per video and latent channel, of a corrupted window (colour "
             "drift; training/refiner.py); the latents have unit variance", FIXED, minimum=0, maximum=10)
    refiner_scale: float = setting(
        0.1, "mode refiner: std of the log of the scale of the deviations from that mean, per video and latent "
             "channel (contrast drift)", FIXED, minimum=0, maximum=10)
    refiner_noise: float = setting(0.2, "mode refiner: a corrupted window's Gaussian noise has a std drawn uniformly "
                                        "in [0, this] per video", FIXED, minimum=0, maximum=10)
    refiner_newest_only: float = setting(
        0.5, "mode refiner: probability that only the newest chunk of a window is corrupted (at sampling time its "
             "older chunk was refined once already)", FIXED, minimum=0, maximum=1)
    distill_method: Literal["consistency", "distribution-matching"] = setting(
        "consistency", "mode distill: consistency (LCM, the guidance folded in) or distribution-matching (DMD2, a "
                       "fake denoiser trained beside the student); training/distill.py", FIXED)
    student_steps: int = setting(4, "mode distill: the student's steps per chunk (the LCM sampler, no guidance), also "
                                    "those of the contexts it makes itself", FIXED, minimum=1, maximum=50)
    teacher_guidance: float = setting(0.0, "mode distill: the teacher's guidance scale; 0: --model's sample default "
                                           "(the shipped baby's: 3)", FIXED, minimum=0, maximum=100)
    distill_steps: int = setting(2000, "mode distill: steps of the distillation stage", EXTEND, minimum=1)
    distill_learning_rate: float = setting(1e-4, "mode distill: peak learning rate of the student (and the fake "
                                                 "denoiser), at most 1", FIXED, above=0, maximum=1)
    distill_weights: Literal["all", "temporal"] = setting(
        "all", "mode distill: the student's trained weights: all (a baby) or the temporal modules (a converted SDXL, "
               "its spatial weights frozen)", FIXED)
    log_every: int = setting(100, "a progress line every n steps (OUT/log.jsonl has every step)", FREE, minimum=1)
    sample_every: int = setting(3000, "sample GIFs in OUT/samples every n UNet steps", FREE, minimum=1)
    checkpoint_every: int = setting(250, "a checkpoint every n steps (and at the end of a stage, and on Ctrl-C)",
                                    FREE, minimum=1)
    seed: int = setting(0, "seed of the data, the initial weights and every random draw (what a torch.Generator "
                           "takes: below 2**64)", FIXED, minimum=0, maximum=2**64 - 1)
    threads: int = setting(0, "CPU threads for torch (0: torch's default), at most the machine's cores; 1 is fastest "
                              "on a busy machine", FREE, minimum=0)
    device: str = setting("auto", "auto (cuda if there is one, else cpu), cpu, cuda, cuda:N or mps", FREE)
    workers: int = setting(0, "DataLoader processes that read and decode the batches ahead (0: the main process), "
                              "at most 4 x the machine's cores", FREE, minimum=0)
    sample_steps: int = setting(25, "denoising steps of the samples; sample.py's default for the trained model",
                                FREE, minimum=1)
    sample_guidance: float = setting(3.0, "guidance scale of the samples; sample.py's default for the trained model",
                                     FREE, minimum=0)
    sample_anchor_frame: bool = setting(
        True, "keep the first frame in the samples' context; sample.py's default for the trained model", FREE)

    def __post_init__(self):
        """ValueError naming the option for a value the run cannot use."""
        for field in dataclasses.fields(self):
            check_setting(field, getattr(self, field.name))
        check_mode_settings(self)
        for option, path in (("--out", self.out), ("--data", self.data),
                             ("--model", self.model if self.mode != "baby" else "unused")):
            if not path.strip():  # Path("") is the current folder
                raise ValueError(f"{option} is empty; give a folder (an empty path would be the current one)")
        if self.mode != "baby" and not Path(self.model, "config.json").is_file():
            raise ValueError(f"--model {self.model!r}: mode {self.mode} needs a checkpoint folder (convert_weights.py)")
        if self.data != "shapes" and not Path(self.data).is_dir():
            raise ValueError(f"--data must be 'shapes' or a folder of videos, got {self.data!r}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} is a file; give a folder (new or a run's)")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps; got {self.device!r}")
        cores = os.cpu_count() or 1
        for option, value, most, what in (("--threads", self.threads, cores, "this machine's cores"),
                                          ("--workers", self.workers, 4 * cores, "4 x this machine's cores")):
            if value > most:
                raise ValueError(f"{option} must be at most {most} ({what}), got {value}")
        rates = [("--learning-rate", self.learning_rate)] + (
            [("--vae-learning-rate", self.vae_learning_rate)] if self.mode == "baby" else []) + (
            [("--refiner-learning-rate", self.refiner_learning_rate)] if self.mode == "refiner" else []) + (
            [("--distill-learning-rate", self.distill_learning_rate)] if self.mode == "distill" else [])
        for option, rate in rates:
            if rate * self.weight_decay >= 1:
                raise ValueError(f"--weight-decay {self.weight_decay} with {option} {rate}: AdamW multiplies every "
                                 f"weight by 1 - {option[2:]} x weight decay each step, which must stay above 0; give "
                                 f"a --weight-decay below {1 / rate:g}")
        if self.ema_decay >= 1:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.validation_data and not Path(self.validation_data).is_dir():
            raise ValueError(f"--validation-data must be a folder of videos or prepared shards, got "
                             f"{self.validation_data!r}")
        check_not_an_input("--out", self.out, [("--model", self.model if self.mode != "baby" else None),
                                               ("--data", None if self.data == "shapes" else self.data),
                                               ("--validation-data", self.validation_data or None)])
        if (model := model_folder_holding(self.out)) is not None:
            raise ValueError(f"--out {self.out} is or lies inside the model folder {model} (it holds a checkpoint's "
                             f"config.json); give a run's folder outside it")
        if (Path(self.out) / "model").exists() and not (Path(self.out) / "train_config.json").is_file():
            raise ValueError(f"--out {self.out} holds a model folder but no run (no train_config.json), and a run "
                             f"writes its model over {Path(self.out) / 'model'}: give a new --out or move that away")
        if self.fsdp and self.mode == "distill":
            raise ValueError("--fsdp with mode distill: the student makes its contexts itself, a number of UNet calls "
                             "that differs between processes, which FSDP cannot gather for; use DDP")
        if self.fsdp and self.self_context != "off":
            raise ValueError("--fsdp with --self-context: the self-made contexts call the UNet a number of times "
                             "that differs between processes, which FSDP cannot gather for; use DDP")
        if self.shapes > 1 and self.vocabulary < 2:
            raise ValueError(f'--shapes {self.shapes} needs --vocabulary 2 (version {self.vocabulary} has no word '
                             f'"and"), got --vocabulary {self.vocabulary}')
        if self.vae_downsampling not in BABY_VAE_CHANNELS:
            raise ValueError(f"--vae-downsampling must be one of {', '.join(map(str, BABY_VAE_CHANNELS))}; "
                             f"got {self.vae_downsampling}")
        factor = vae_factor(self)
        if self.size % factor:
            raise ValueError(f"--size must be a multiple of {factor} (the VAE's downsampling), got {self.size}")


def check_mode_settings(config: TrainConfig) -> None:
    """ValueError naming the option for a setting the run's mode does not read, at other than its
    default: those of NOT_FOR_REFINER in mode refiner, the --refiner-* ones in the other modes."""
    for field in dataclasses.fields(config):
        if getattr(config, field.name) == field.default:
            continue
        if config.mode == "refiner" and field.name in NOT_FOR_REFINER:
            raise ValueError(f"{option_name(field.name)} does not apply to mode refiner, which trains only a new "
                             f"refiner for the frozen --model (its UNet, VAE and sample defaults kept); leave it out")
        if config.mode != "refiner" and field.name.startswith("refiner_"):
            raise ValueError(f"{option_name(field.name)} applies to mode refiner only; leave it out in mode "
                             f"{config.mode}")
        if config.mode == "distill" and field.name in NOT_FOR_DISTILL:
            raise ValueError(f"{option_name(field.name)} does not apply to mode distill, whose student starts from "
                             f"--model (its VAE, text encoders and sample defaults kept) and makes its own contexts "
                             f"in --student-steps; leave it out")
        if config.mode != "distill" and field.name in DISTILL_SETTINGS:
            raise ValueError(f"{option_name(field.name)} applies to mode distill only; leave it out in mode "
                             f"{config.mode}")
    if config.refiner_channels % REFINER_GROUPS:
        raise ValueError(f"--refiner-channels must be a multiple of {REFINER_GROUPS} (the refiner's GroupNorm "
                         f"groups), got {config.refiner_channels}")


def model_folder_holding(path) -> Path | None:
    """The nearest folder at or above `path` (links resolved) that holds a checkpoint's config.json
    (convert_weights.py's, the embedded baby's, a run's OUT/model), or None."""
    path = Path(os.path.realpath(path))
    for folder in (path, *path.parents):
        config = folder / "config.json"
        try:
            if not config.is_file() or config.stat().st_size > 2**20:  # a checkpoint's is a few kB
                continue
            values = json.loads(config.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue  # not a checkpoint's
        if isinstance(values, dict) and str(values.get("format")).startswith("sdxl-video-checkpoint/"):
            return folder
    return None


def check_setting(field: dataclasses.Field, value) -> None:
    """ValueError naming the option unless `value` is of the field's type, one of its choices, finite
    and in its range."""
    option, choices = option_name(field.name), literal_choices(field)
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


def literal_choices(field: dataclasses.Field) -> tuple:
    """The values of a Literal[...] field; () for any other."""
    return get_args(field.type) if get_origin(field.type) is Literal else ()


def value_range(field: dataclasses.Field) -> str:
    """The range of a field's metadata in words: "at least 1", "in [0, 1]", "> 0"."""
    low, high, above = (field.metadata[key] for key in ("minimum", "maximum", "above"))
    if above is not None:
        return f"in ({above}, {high}]" if high is not None else f"> {above}"
    return f"in [{low}, {high}]" if high is not None else f"at least {low}"


def shown(value) -> str:
    """A setting's value as --help and the resume messages show it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return '""' if value == "" else str(value)


def vae_factor(config: TrainConfig) -> int:
    """How much the run's VAE downsamples: the baby's, or the one in --model's config.json."""
    channels = BABY_VAE_CHANNELS[config.vae_downsampling]
    if config.mode != "baby":
        path = Path(config.model, "config.json")
        vae = read_json_object(path).get("vae")
        channels = vae.get("block_out_channels") if isinstance(vae, dict) else None
        if not isinstance(channels, list) or not channels:
            raise ValueError(f"--model {config.model}: {path} has no vae.block_out_channels")
    return 2 ** (len(channels) - 1)


# Options and resuming ---------------------------------------------------------------------------


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
    RENAMED_SETTINGS says; a setting added since with the value ADDED_SETTINGS says those runs had;
    fields TrainConfig no longer has left out), or None when it holds no run."""
    path = out / "train_config.json"
    if not path.exists():
        return None
    values = read_json_object(path)
    for old, new in RENAMED_SETTINGS.items():
        if old in values and new not in values:
            values[new] = values.pop(old)
    added = {name: value for name, (since, value) in ADDED_WITH.items() if since in values}
    values = {**ADDED_SETTINGS, **added, **values}
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    for name, value in values.items():
        if name in fields:
            try:
                check_setting(fields[name], value)
            except ValueError as error:
                raise ValueError(f"{path}: the stored {error}; is the file damaged? It is the run's record of its "
                                 f"settings: mend it, or use a new --out") from None
    return {name: value for name, value in values.items() if name in fields}


def stored_processes(out: Path) -> int:
    """The processes that started the run in `out` (its train_config.json's "world_size"; 1 when it has
    none); ValueError naming the file for anything but a whole number of at least 1."""
    path = out / "train_config.json"
    count = read_json_object(path).get("world_size", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{path}: world_size must be a whole number of processes of at least 1, got {count!r}; is the "
                         f"file damaged?")
    return count


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
    since, and not in ADDED_SETTINGS) are not compared. --vae-steps may grow only until the UNet
    stage has begun. The batch sizes are per process: on another number of processes (WORLD_SIZE)
    their global batch must stay."""
    out = Path(config.out)
    stored = stored_settings(out) or {}
    started_on = stored_processes(out) if stored else 1
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    accepted, refused = [], []
    for field in dataclasses.fields(TrainConfig):
        if field.name in PER_PROCESS and field.name in stored and processes != started_on:
            if field.name == "vae_batch_size" and config.mode != "baby":
                continue  # only mode baby has a VAE stage
            old, new = stored[field.name], getattr(config, field.name)
            change = f"{option_name(field.name)} {old} x {started_on} processes -> {new} x {processes} processes"
            total = old * started_on  # the global batch
            if total == new * processes:
                accepted.append(change + " (the same global batch)")
            elif total % processes == 0:
                refused.append(change + f" (give {option_name(field.name)} {total // processes}: the global batch is "
                                        f"{total})")
            else:
                refused.append(change + f" (the global batch is {total}, which {processes} processes cannot share "
                                        f"evenly)")
            continue
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

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from endless import Prompts, VideoState, decoded_chunks
from infra.checkpoint import load_checkpoint_config, model_configs
from infra.files import atomic_file, fsync_tree, naming
from infra.run_state import OutputLock, resolve_device
from model import UNet, micro_conditioning
from pipeline import StableDiffusionXLVideoPipeline
from refiner import Refiner
from scheduler import SchedulerConfig, add_noise, make_schedule, training_target, with_sampler
from training.refiner import refiner_config, refiner_loss, validation_losses, validation_windows, window_clips
from training.distill import SAMPLER as STUDENT_SAMPLER, Distillation, Distiller, draws as distillation_draws
from training.self_context import SelfContext, augmented_context
from vae import AutoencoderKL
from training.baby import baby_configs, baby_text_encoder
from training.data import Batches, ShardData, batch_of, encoded_batch, make_data
from infra.video_io import open_writer
from training.loop import (AUTOCAST_DTYPES, Stage, Stopped, append_log, gathered, read_checkpoint,
                      replace_folder, shard)
from infra.memory import Sample, available_memory, gib, plan_table, training_flops, unet_units
from training.validation import SHAPES_PROMPTS, HeldOutShapes, plot_curves, shapes_metrics, validation_loss


# Losses ----------------------------------------------------------------------------------------


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
    batches = Batches(data, config.vae_batch_size, rank, world_size, config.workers)

    def loss(objective, index, generator):
        videos, _ = batches[index]
        images = videos[:, :, 0].to(next(objective.parameters()).device)  # (b, 3, H, W): one frame per clip
        mine = slice(rank * config.vae_batch_size, (rank + 1) * config.vae_batch_size)  # of the global batch
        noise = torch.randn((config.vae_batch_size * world_size, *latent_shape), generator=generator)[mine].to(images)
        return objective(images, noise)

    return loss


def unet_loss(pipeline: StableDiffusionXLVideoPipeline, data, config: TrainConfig, rank: int, world_size: int):
    """The denoising loss on the chunk frames, conditioned on the clean (or noised, or no) context: the
    model predicts the noise, or v = alpha * noise - sigma * latents, as its scheduler's prediction_type says
    (scheduler.add_noise and scheduler.training_target, in float32). Every draw is made
    for the global batch (`generator` is the same in every process) and each process takes its slice,
    so that a run gives the same numbers on any number of processes with the same global batch."""
    device = pipeline.device
    scheduler_config = pipeline.scheduler_config
    train_steps = scheduler_config.num_train_timesteps
    k = config.context_frames
    mine = slice(rank * config.batch_size, (rank + 1) * config.batch_size)  # this process's samples of a global batch
    self_context = SelfContext(config.self_context, config.self_context_probability, config.self_context_steps,
                               config.self_context_level, k, config.frames, config.size, config.seed, mine.start)
    if self_context.extra_frames:  # longer clips: the chunk the context is made as, and the frames before it
        data = make_data(dataclasses.replace(config, context_frames=k + self_context.extra_frames))

    batches = Batches(data, config.batch_size, rank, world_size, config.workers)

    def loss(unet, index, generator):
        latents, text, pooled = encoded_batch(pipeline, batches[index])  # (b, 4, k + f, h, w), (b, tokens, dim), (b, p)
        batch = latents.shape[0]
        every = batch * world_size  # the global batch, whose samples [mine] are this process's
        keep_text = (torch.rand(every, generator=generator)[mine] >= config.text_drop).to(text)  # (b,)
        text, pooled = text * keep_text[:, None, None], pooled * keep_text[:, None]
        context, chunk = self_context.split(pipeline, latents, text, pooled, index)  # (b, 4, k, h, w), (b, 4, f, h, w)
        context = augmented_context(context, config, every, mine, generator)  # None, or (b, 4, 1 .. k, h, w)
        timesteps = torch.randint(0, train_steps, (every,), generator=generator)[mine]
        noise = torch.randn((every, *chunk.shape[1:]), generator=generator)[mine].to(chunk)
        chunk, noise = chunk.float(), noise.float()  # (b, 4, f, h, w), the noising and target in float32
        noisy = add_noise(scheduler_config, chunk, noise, timesteps)
        target = training_target(scheduler_config, chunk, noise, timesteps)
        time_ids = micro_conditioning(batch, config.size, config.size, dtype=text.dtype, device=text.device)
        prediction = unet(noisy, timesteps.to(device), text, pooled, time_ids, context)
        return F.mse_loss(prediction.float(), target.float())

    return loss


def distill_loss(pipeline: StableDiffusionXLVideoPipeline, data, config: TrainConfig, rank: int, world_size: int):
    """Mode distill's loss (training/distill.py's method on the Distiller the stage trains): each
    batch's contexts made by the student itself in --student-steps for --self-context-probability of
    the samples (as --self-context sampled makes them, with the student's sampler), then dropped,
    shortened and noised as the UNet's loss does; no text is dropped (the guidance is the teacher's)."""
    k = config.context_frames
    mine = slice(rank * config.batch_size, (rank + 1) * config.batch_size)
    self_context = SelfContext("sampled", config.self_context_probability, config.student_steps, 1.0, k,
                               config.frames, config.size, config.seed, mine.start, sampler=STUDENT_SAMPLER)
    data = make_data(dataclasses.replace(config, context_frames=k + self_context.extra_frames))
    batches = Batches(data, config.batch_size, rank, world_size, config.workers)
    train_steps = pipeline.scheduler_config.num_train_timesteps

    def loss(distiller, index, generator):
        latents, text, pooled = encoded_batch(pipeline, batches[index])  # (b, 4, f + k + f, h, w), (b, tokens, dim), (b, p)
        every = latents.shape[0] * world_size
        context, chunk = self_context.split(pipeline, latents, text, pooled, index)  # (b, 4, k, h, w), (b, 4, f, h, w)
        context = augmented_context(context, config, every, mine, generator)  # None, or (b, 4, 1 .. k, h, w)
        drawn = distillation_draws(config.distill_method, config.student_steps, chunk.shape[1:], every, mine,
                                   train_steps, generator)
        drawn = {name: value.to(chunk.device) if torch.is_tensor(value) else value for name, value in drawn.items()}
        time_ids = micro_conditioning(chunk.shape[0], config.size, config.size, dtype=text.dtype, device=text.device)
        inputs = {"chunk": chunk} if config.distill_method == "consistency" else {}
        return distiller(**inputs, **drawn, text=text, pooled=pooled, time_ids=time_ids, context=context)

    return loss


# Samples, validation, the model ----------------------------------------------------------------


def sample_defaults(config: TrainConfig) -> dict:
    """How sample.py makes videos with the trained model (its config.json's `sample_defaults`), and
    how write_samples makes the training samples. Mode distill: --model's (its height and width too),
    with the run's frames and context frames, in --student-steps of the student's sampler without
    guidance."""
    if config.mode == "distill":
        teacher = load_checkpoint_config(config.model).get("sample_defaults", {})
        kept = {name: value for name, value in teacher.items() if name not in ("timestep_spacing", "timesteps")}
        return {**kept, "frames": config.frames, "context_frames": config.context_frames,
                "steps": config.student_steps, "guidance": 1.0, "scheduler": STUDENT_SAMPLER}
    return {"height": config.size, "width": config.size, "frames": config.frames,
            "context_frames": config.context_frames, "steps": config.sample_steps,
            "guidance": config.sample_guidance, "anchor_frame": config.sample_anchor_frame}


def write_samples(pipeline, config: TrainConfig, step: int, write: bool = True,
                  prompts=("a red circle moving left", "a blue square moving up")):
    """A 4-chunk GIF per prompt in out/samples/, made as sample.py makes videos. Under FSDP every
    process makes them (the UNet is sharded) and only one writes (`write`)."""
    folder = Path(config.out) / "samples"
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    was_training = pipeline.unet.training
    pipeline.unet.eval()
    with torch.no_grad():
        for index, prompt in enumerate(prompts):
            defaults = sample_defaults(config)
            chunks = decoded_chunks(pipeline, ChunkSpec.from_options(defaults), DriftControls.from_options(defaults),
                                    Prompts([(0, pipeline.encode_prompt(prompt))]), VideoState(),
                                    torch.Generator().manual_seed(index))
            frames = [next(chunks)[0] for _ in range(4)]
            if write:
                path = folder / f"step{step:06d}_{index}.gif"
                with naming(path), open_writer(str(path), fps=6) as writer:
                    for chunk in frames:
                        writer.write_chunk(chunk)
    pipeline.unet.train(was_training)


def save_model(pipeline: StableDiffusionXLVideoPipeline, config: TrainConfig) -> None:
    """Write out/model, the folder sample.py loads, whole or not at all: into out/model.tmp, fsynced
    (save_pretrained), then put in the place of the old one (`replace_folder`)."""
    folder = Path(config.out) / "model"
    temporary = folder.with_name("model.tmp")
    provenance = {"trained_by": "train.py", "settings": asdict(config)}
    if config.mode != "baby":
        provenance["base"] = pipeline.provenance  # the --model it was trained from
    defaults = sample_defaults(config)
    if config.mode == "refiner":  # --model's, with its new refiner on
        defaults = {**load_checkpoint_config(config.model).get("sample_defaults", {}), "refiner": True}
    try:
        with naming(folder):
            shutil.rmtree(temporary, ignore_errors=True)  # left by a save that was killed
            pipeline.save_pretrained(temporary, provenance=provenance, sample_defaults=defaults)
            fsync_tree(temporary)
            replace_folder(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def scaling_factor(vae: AutoencoderKL, data, config: TrainConfig) -> float:
    """1 / std of the VAE's latents over a few batches, so that scaled latents have unit variance."""
    with torch.no_grad():
        videos = torch.cat([batch_of(data, 10_000 + i, config.vae_batch_size, 0, 1)[0][:, :, 0] for i in range(4)])
        std = vae.encode(videos.to(next(vae.parameters()).device)).mean.std().item()
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"the VAE's latents have a standard deviation of {std:g} after its stage, which no scaling "
                         f"makes 1: it collapsed or diverged; move {Path(config.out) / 'vae.pt'} away and train it "
                         f"again with other settings")
    return 1.0 / std


def write_curves(config: TrainConfig) -> None:
    """OUT/curves.png: the training and validation curves of OUT/log.jsonl (validation.plot_curves)."""
    out = Path(config.out)
    image = plot_curves(out / "log.jsonl") if (out / "log.jsonl").exists() else None
    if image is not None:
        with atomic_file(out / "curves.png") as file:
            image.save(file, format="PNG")


# The shapes metrics' prompts with --shapes 2, as validation.SHAPES_PROMPTS: two shapes the baby trains on,
# and two it never sees (world.HELD_OUT).
TWO_SHAPES_PROMPTS = ("a red circle moving left and a blue square moving up",
                      "a red triangle moving up and a green circle moving left")


def validation_clips(config: TrainConfig):
    """The held-out clips of the validation loss: --validation-data, or the shapes world's own
    (`HeldOutShapes`); None for a run on videos without --validation-data."""
    if config.validation_data:
        return make_data(dataclasses.replace(config, data=config.validation_data))
    if config.data == "shapes":
        return HeldOutShapes(make_data(dataclasses.replace(config, clips=0)))  # not cycling: -1 - i is never trained on
    return None


def validate(pipeline: StableDiffusionXLVideoPipeline, clips, config: TrainConfig, step: int, rank: int,
             world_size: int) -> None:
    """Every process calls it: the validation loss on `clips` (each process its share), and on the
    shapes world the metrics of shapes/scoring.py (by rank 0, or by every process when the UNet is sharded);
    rank 0 appends them to OUT/log.jsonl and redraws OUT/curves.png."""
    record = {"stage": "validation", "step": step}
    if clips is not None:
        record["loss"] = validation_loss(pipeline.unet, pipeline, clips, config.validation_clips, config, rank,
                                         world_size)
    if config.data == "shapes" and (rank == 0 or config.fsdp):
        with gathered(pipeline.unet):
            prompts = SHAPES_PROMPTS if config.shapes == 1 else TWO_SHAPES_PROMPTS
            record["shapes"] = shapes_metrics(pipeline, sample_defaults(config), prompts)
    if rank == 0:
        append_log(config.out, record)
        write_curves(config)


def teacher_guidance(config: TrainConfig) -> float:
    """--teacher-guidance, or (0) --model's sample default guidance; ValueError when that is missing,
    not a number in (1, 100] (a model sampled without guidance, such as a student, is no teacher)."""
    if config.teacher_guidance:
        return config.teacher_guidance
    guidance = load_checkpoint_config(config.model).get("sample_defaults", {}).get("guidance")
    if type(guidance) not in (int, float) or not 1 < guidance <= 100:
        raise ValueError(f"--model {config.model}: its config.json's sample default guidance is {guidance!r}, not a "
                         f"teacher's (a number above 1, at most 100); give the teacher's as --teacher-guidance")
    return float(guidance)


def build_pipeline(config: TrainConfig) -> StableDiffusionXLVideoPipeline:
    """The run's pipeline, its UNet in float32 (the trained weights' master copy). Under --fsdp the
    UNet stays on the CPU: `fully_shard` moves each process's shards to the device."""
    device = resolve_device(config.device)
    unet_device = "cpu" if config.fsdp else device
    if config.mode == "refiner":  # every part of --model frozen, a new refiner drawn from --seed
        pipeline = StableDiffusionXLVideoPipeline.from_pretrained(config.model, device)
        for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
            module.requires_grad_(False).eval()
        torch.manual_seed(config.seed)
        pipeline.refiner = Refiner(refiner_config(config)).to(device)
        return pipeline
    if config.mode == "distill":  # the student is --model's UNet, trained all or in its temporal modules
        pipeline = StableDiffusionXLVideoPipeline.from_pretrained(config.model, device)
        pipeline.vae.requires_grad_(False)
        pipeline.text_encoder.requires_grad_(False)
        pipeline.unet.float()
        if config.distill_weights == "temporal":
            pipeline.unet.requires_grad_(False)
            for parameter in pipeline.unet.temporal_parameters():
                parameter.requires_grad_(True)
        return pipeline
    if config.mode == "temporal":
        pipeline = StableDiffusionXLVideoPipeline.from_pretrained(config.model, unet_device)
        pipeline.vae.to(device)
        pipeline.text_encoder.to(device)
        pipeline.unet.float().requires_grad_(False)
        for parameter in pipeline.unet.temporal_parameters():
            parameter.requires_grad_(True)
        pipeline.vae.requires_grad_(False)
        return pipeline
    unet_config, vae_config = baby_configs(config.size, config.conditioner, config.vae_downsampling)
    torch.manual_seed(config.seed)
    text_encoder = baby_text_encoder(Path(config.out) / "tokenizer-files", config.seed, config.shapes,
                                     config.vocabulary)
    scheduler_config = dataclasses.replace(SchedulerConfig.video_model(), prediction_type=config.prediction_type)
    pipeline = StableDiffusionXLVideoPipeline(UNet(unet_config), AutoencoderKL(vae_config), text_encoder,
                                              scheduler_config)
    pipeline.to(device)
    pipeline.unet.to(unet_device)
    return pipeline


def unet_flops(pipeline: StableDiffusionXLVideoPipeline, config: TrainConfig) -> int:
    """Model FLOPs of one training sample's forward and backward through the UNet (on meta)."""
    sample = Sample(config.frames, config.context_frames, config.size // pipeline.vae_scale_factor,
                    pipeline.text_encoder.tokenizer.model_max_length)
    return training_flops(pipeline.unet.config, config.mode == "temporal", sample)


class RunLock(OutputLock):
    """The lock of a run's folder, OUT/train.lock (infra/run_state.py's OutputLock): one run per
    --out at a time; a killed run's lock is free again."""

    def __init__(self, out):
        super().__init__(str(out))
        self.path = Path(out) / "train.lock"

    def __enter__(self) -> "RunLock":
        try:
            return super().__enter__()
        except ValueError as error:  # OutputLock's words are sample.py's
            raise ValueError(str(error).replace("a lock of sample.py", "a lock of train.py")) from None


def check_batches_fit(config: TrainConfig, data=None) -> None:
    """ValueError naming the options when one batch of clips (float32 pixels, as the shapes world or a
    folder of videos gives each step on the CPU, in every process of this machine) is more than the
    memory free here: such a run could only fail, after drawing its batch for a long time. Prepared
    shards hold latents, of the size their index fixes. Without `data` (--plan): one clip, which
    the plan draws to count with."""
    if isinstance(data, ShardData):
        return
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if data is not None else 1
    clip_frames = 2 * config.frames if config.mode == "refiner" else config.context_frames + config.frames
    clip = 4 * 3 * config.size**2 * clip_frames  # bytes of one clip
    free = available_memory("cpu")
    shape = f"--size {config.size} --context-frames {config.context_frames} --frames {config.frames}"
    batches = [(f"--batch-size {config.batch_size} {shape}: a batch of clips is", config.batch_size, "--batch-size, ")]
    if config.mode == "baby":
        batches.append((f"--vae-batch-size {config.vae_batch_size} {shape}: a batch of clips is", config.vae_batch_size,
                        "--vae-batch-size, "))
    if data is None:
        batches = [(f"{shape}: --plan draws one clip of", 1, "")]
    for what, batch, option in batches:
        if processes * batch * clip > free:
            need = batch * clip
            size = gib(need) if need < 2**50 else f"{min(need, 10**300) / 2**30:.3g} GiB"
            each = f" in each of {processes} processes" if processes > 1 else ""
            plan = " (--plan says what a step needs)" if data is not None else ""
            raise ValueError(f"{what} {size} of float32 pixels{each}, and this machine has {gib(free)} free; give a "
                             f"smaller {option}--size or --frames{plan}")


def check_sampler_steps(config: TrainConfig) -> None:
    """ValueError naming --sample-steps (the samples', the validation's and sample.py's default) or
    --self-context-steps when the model's scheduler cannot sample in that many steps (mode refiner
    samples nothing)."""
    if config.mode == "refiner":
        return
    if config.mode == "distill":
        teacher_guidance(config)
        try:
            make_schedule(with_sampler(model_configs(config.model)["scheduler"], STUDENT_SAMPLER), config.student_steps)
        except ValueError as error:
            raise ValueError(f"--student-steps {config.student_steps}: {error}") from None
        return
    scheduler_config = model_configs(config.model)["scheduler"] if config.mode == "temporal" else \
        SchedulerConfig.video_model()
    steps = [("--sample-steps", config.sample_steps)]
    if config.self_context == "sampled":
        steps.append(("--self-context-steps", config.self_context_steps))
    for option, count in steps:
        try:
            make_schedule(scheduler_config, count)
        except ValueError as error:
            raise ValueError(f"{option} {count}: {error}") from None


def train(config: TrainConfig, on_step=None) -> StableDiffusionXLVideoPipeline | None:
    """Run every stage of `config` (resuming any that has a checkpoint) and write the model to out/model
    (the weights' average with --ema-decay). Before any work: the settings are compared with those of
    a run already in out (`resume_changes`), its checkpoints are read, the data, the batch's memory,
    the sampler's steps and the device are checked (ValueError), and OUT is locked (`RunLock`) for the
    whole run. Returns the pipeline as written (under --fsdp on rank 0; None elsewhere)."""
    with ExitStack() as locks:
        return train_locked(config, on_step, locks)


def train_locked(config: TrainConfig, on_step, locks: ExitStack) -> StableDiffusionXLVideoPipeline | None:
    """`train`, which takes OUT's lock into `locks` before it writes anything."""
    out = Path(config.out)
    changes = resume_changes(config)
    distributed = "WORLD_SIZE" in os.environ
    if config.fsdp and not distributed:
        raise ValueError("--fsdp shards the UNet over processes: run it under torchrun "
                         "(torchrun --nproc_per_node N train.py ... --fsdp)")
    paths = {"vae": out / "vae.pt", "unet": out / ("unet.dcp" if config.fsdp else "unet.pt")}
    if config.mode == "refiner":
        paths = {"refiner": out / "refiner.pt"}
    if config.mode == "distill":
        paths = {"distill": out / "distill.pt"}
    other = out / ("unet.pt" if config.fsdp else "unet.dcp")
    if other.exists():
        raise ValueError(f"{other} is the checkpoint of a run {'without' if config.fsdp else 'with'} --fsdp: "
                         f"resume it {'without' if config.fsdp else 'with'} --fsdp, or use a new --out")
    checkpoints = {name: read_checkpoint(path, mmap=True) for name, path in paths.items()}
    steps = {name: state["step"] for name, state in checkpoints.items() if state is not None}
    del checkpoints
    if config.mode == "baby" and "unet" in steps and "vae" not in steps:
        raise ValueError(f"{paths['unet']} was trained on the latents of the VAE of {out / 'vae.pt'}, which is "
                         f"missing: move {paths['unet'].name} away too, or use a new --out")
    data = window_clips(config) if config.mode == "refiner" else make_data(config)
    clips = validation_windows(config) if config.mode == "refiner" else validation_clips(config)
    check_batches_fit(config, data)
    check_sampler_steps(config)
    device = resolve_device(config.device)
    if config.mode == "baby":
        try:
            baby_configs(config.size, config.conditioner, config.vae_downsampling)
        except ValueError as error:  # a conditioner temporal.py does not have
            raise ValueError(f"--conditioner {config.conditioner}: {error}") from None
    if config.threads:
        torch.set_num_threads(config.threads)
    if distributed and not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if rank == 0:
        with naming(out):
            out.mkdir(parents=True, exist_ok=True)
        locks.enter_context(RunLock(out))
        if (out / "train_config.json").exists():
            found = ", ".join(f"{paths[name].name} at step {step}" for name, step in steps.items()) or "no checkpoint yet"
            print(f"resuming {out} ({found})" + (f"; accepted {', '.join(changes)}" if changes else ""), flush=True)
        with atomic_file(out / "train_config.json") as file:  # and the processes that train it
            file.write((json.dumps({**asdict(config), "world_size": world_size}, indent=2) + "\n").encode())
    pipeline = build_pipeline(config)
    pipeline.unet.gradient_checkpointing = config.gradient_checkpointing
    if config.mode == "refiner":
        return train_refiner(pipeline, data, clips, config, on_step, rank, world_size)
    if config.mode == "distill":
        return train_distill(pipeline, data, config, on_step, rank, world_size)

    if config.mode == "baby":
        vae = pipeline.vae.train()
        factor = vae.config.downsample_factor
        latent_shape = (vae.config.latent_channels, config.size // factor, config.size // factor)
        stage = Stage("vae", VAEObjective(vae), vae_loss(data, config, rank, world_size, latent_shape),
                      config.vae_steps, config.vae_learning_rate, config, batch_size=config.vae_batch_size)
        stage.load()
        stage.run(on_step)
        vae.config.scaling_factor = scaling_factor(vae, data, config)
        vae.requires_grad_(False).eval()

    unet = pipeline.unet.train()
    if config.fsdp:
        shard(unet, unet_units(unet), AUTOCAST_DTYPES[config.autocast], device)
    flops = unet_flops(pipeline, config) if device.startswith("cuda") else None
    stage = Stage("unet", unet, unet_loss(pipeline, data, config, rank, world_size), config.unet_steps,
                  config.learning_rate, config, batch_size=config.batch_size, frames_per_sample=config.frames,
                  sharded=config.fsdp, ema_decay=config.ema_decay, flops_per_sample=flops)
    stage.load()

    def every_step(stage):
        if stage.step % config.sample_every == 0 and (rank == 0 or config.fsdp):
            with gathered(pipeline.unet):
                write_samples(pipeline, config, stage.step, rank == 0)
        if config.validate_every and stage.step % config.validate_every == 0:
            validate(pipeline, clips, config, stage.step, rank, world_size)
        if on_step is not None:
            on_step(stage)

    stage.run(every_step)
    if stage.ema is not None:
        stage.ema.copy_to(stage.trained)
    weights = stage.full_state_dict() if config.fsdp else None  # every process takes part; rank 0 gets them
    if rank == 0:
        if config.fsdp:
            with torch.device("meta"):
                pipeline.unet = UNet(unet.config)
            pipeline.unet.load_state_dict(weights, assign=True)
        pipeline.unet.eval()
        save_model(pipeline, config)
        write_curves(config)
    if distributed:
        dist.barrier()
    return pipeline if rank == 0 or not config.fsdp else None


def write_model(stage: Stage, trained, pipeline: StableDiffusionXLVideoPipeline, config: TrainConfig, rank: int,
                world_size: int) -> StableDiffusionXLVideoPipeline:
    """The end of a one-module stage (modes refiner and distill): the weights' average into the
    weights, then by rank 0 `trained` to eval, OUT/model and the curves; every process waits for it."""
    if stage.ema is not None:
        stage.ema.copy_to(stage.trained)
    if rank == 0:
        trained.eval()
        save_model(pipeline, config)
        write_curves(config)
    if world_size > 1:
        dist.barrier()
    return pipeline


def train_refiner(pipeline: StableDiffusionXLVideoPipeline, data, windows, config: TrainConfig, on_step, rank: int,
                  world_size: int) -> StableDiffusionXLVideoPipeline:
    """Mode refiner: the refiner stage (training/refiner.py's loss; every --validate-every steps its
    validation losses on `windows`, by rank 0), then OUT/model, --model's parts and the refiner."""
    stage = Stage("refiner", pipeline.refiner.train(), refiner_loss(pipeline, data, config, rank, world_size),
                  config.refiner_steps, config.refiner_learning_rate, config, batch_size=config.batch_size,
                  frames_per_sample=2 * config.frames, ema_decay=config.ema_decay)
    stage.load()

    def every_step(stage):
        if config.validate_every and stage.step % config.validate_every == 0 and windows is not None and rank == 0:
            losses = validation_losses(pipeline.refiner, pipeline, windows, config)
            append_log(config.out, {"stage": "validation", "of": "refiner", "step": stage.step, **losses})
            write_curves(config)
        if on_step is not None:
            on_step(stage)

    stage.run(every_step)
    return write_model(stage, pipeline.refiner, pipeline, config, rank, world_size)


def train_distill(pipeline: StableDiffusionXLVideoPipeline, data, config: TrainConfig, on_step, rank: int,
                  world_size: int) -> StableDiffusionXLVideoPipeline:
    """Mode distill: the distill stage (training/distill.py; every --validate-every steps the shapes
    metrics of the student as sample.py runs it), then OUT/model: --model with the student's UNet and
    sample defaults (--student-steps of the LCM sampler, no guidance)."""
    teacher = copy.deepcopy(pipeline.unet).requires_grad_(False).eval()
    distillation = Distillation(config.distill_method, config.student_steps, teacher_guidance(config))
    distiller = Distiller(pipeline.unet, teacher, pipeline.scheduler_config, distillation)
    if distiller.fake is not None:  # a copy of the teacher that trains the same weights as the student
        for name, parameter in distiller.fake.named_parameters():
            parameter.requires_grad_(pipeline.unet.get_parameter(name).requires_grad)
    stage = Stage("distill", distiller.train(), distill_loss(pipeline, data, config, rank, world_size),
                  config.distill_steps, config.distill_learning_rate, config, batch_size=config.batch_size,
                  frames_per_sample=config.frames, ema_decay=config.ema_decay)
    stage.load()

    def every_step(stage):
        if stage.step % config.sample_every == 0 and rank == 0:
            write_samples(pipeline, config, stage.step)
        if config.validate_every and stage.step % config.validate_every == 0:
            validate(pipeline, None, config, stage.step, rank, world_size)
        if on_step is not None:
            on_step(stage)

    stage.run(every_step)
    return write_model(stage, pipeline.unet, pipeline, config, rank, world_size)


def text_encoder_parameters(folder: Path) -> int:
    """Parameters of the two text encoders of a checkpoint folder, from their config.json files
    (0 for one the folder lacks)."""
    count = 0
    for name, model_class in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        if (folder / name / "config.json").is_file():
            with torch.device("meta"):
                model = model_class(CLIPTextConfig.from_pretrained(folder / name, local_files_only=True))
            count += sum(p.numel() for p in model.parameters())
    return count


def plan(config: TrainConfig) -> str:
    """The --plan table (infra/memory.py plan_table) for the run's UNet: --model's (mode temporal: from
    its config.json alone, no weights are read) or the baby's, over --processes (or WORLD_SIZE)."""
    processes = config.processes or int(os.environ.get("WORLD_SIZE", "1"))
    check_batches_fit(config)
    if config.mode == "temporal":
        configs = model_configs(config.model)
        unet_config, vae_config, tokens = configs["unet"], configs["vae"], 77
        text_parameters = text_encoder_parameters(Path(config.model))
    else:
        unet_config, vae_config = baby_configs(config.size, config.conditioner, config.vae_downsampling)
        tokens, text_parameters = 16, 0
    with torch.device("meta"):
        vae_parameters = sum(p.numel() for p in AutoencoderKL(vae_config).parameters())
    sample = Sample(config.frames, config.context_frames, config.size // vae_config.downsample_factor, tokens)
    return plan_table(unet_config, config.mode == "temporal", sample, processes, config.batch_size,
                      AUTOCAST_DTYPES[config.autocast], config.gradient_checkpointing,
                      4 * (vae_parameters + text_parameters))


def main(config: TrainConfig) -> None:
    """`train` (or with --plan, `plan`) for the command line: an error (a broken checkpoint, a full
    disk) is one line on stderr (exit status 1); Ctrl-C stops with a checkpoint and says how to
    resume (exit status 130)."""
    try:
        if config.plan:
            print(plan(config))
            return
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
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not isinstance(error, torch.OutOfMemoryError) and \
                "can't allocate memory" not in str(error):
            raise  # a bug, with its traceback
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: out of memory ({first}); {config.out} keeps its last checkpoints. --plan says what a step "
              f"needs; --gradient-checkpointing, a smaller --batch-size (with more --gradient-accumulation) or --fsdp "
              f"take less", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(CONFIG)
