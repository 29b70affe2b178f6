"""Endless text-to-video: chunk after chunk, each conditioned on the last frames already made.

    python sample.py --prompt "a red circle moving left" --chunks 30 --out video.mp4

The prompt is encoded once; between chunks only the context (the last `--context-frames` latents)
and the random state survive, so memory does not grow with the length of the video. Each
finished chunk is decoded a few frames at a time and handed to a streaming writer at once; then a
small state file next to the output is replaced atomically, and `--resume` continues a run that
was stopped or killed with exactly the frames an uninterrupted run would have made.

Every option is checked before torch is imported, a file touched or a model loaded. The output is
locked for the whole run; an old output given with --overwrite is replaced only once the new
video's first chunk is complete on disk.
"""

import argparse
import errno
import math
import os
import stat
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

from infra.cli import OneLineParser, check_device_name, of_type, option_name
from video_settings import (DEFAULT_MODEL, LORA_SYNTAX, RECIPES, SETTING_NAMES, DriftControls, Settings, add_chunk_options,
                            check_settings, check_sampler, parse_lora)

# Options that only say how long a resumed run goes on or how it runs, not what its frames are
# (--offload changes no pixel: tests/test_memory_modes.py). --vae-dtype and --vae-tiles change the
# decoded pixels: the state file keeps them (`decoding`), and --resume refuses another value.
STANDARD_OUTPUT = "-"  # --out -: a fragmented MP4 stream, chunk by chunk (infra/video_io.Mp4StreamWriter)
RESUME_MAY_CHANGE = {"out", "resume", "chunks", "seconds", "threads", "offload"}
OFFLOAD_MODES = ("none", "model", "sequential")  # infra/offload.py's modes, and none


# ---------------------------------------------------------------------------------------------
# The timeline


def parse_position(text: str, fps: float, frames: int) -> int:
    """A timeline position, a chunk index ("12") or seconds ("12.5s"), as a chunk index; ValueError if not."""
    if text.endswith("s"):
        seconds = float(text[:-1])
        if not (math.isfinite(seconds) and 0 <= seconds * fps / frames < 2**63):
            raise ValueError
        return round(seconds * fps / frames)
    chunk = int(text)
    if not 0 <= chunk < 2**63:
        raise ValueError
    return chunk


def parse_timeline(values: list[str], fps: float, frames: int) -> list[tuple[int, str]]:
    """--prompt values "TEXT" or "TEXT@T" (T a chunk index, or seconds as "12.5s") -> sorted (chunk, TEXT).

    The position is what follows the last '@'; a text with an '@' of its own ends with its position
    ("meet @ noon@0").
    """
    if not values:
        raise ValueError("--prompt is required (or a --timeline file)")
    entries = []
    for value in values:
        check_text("--prompt", value)
        text, _, position = value.rpartition("@") if "@" in value else (value, "", "0")
        try:
            chunk = parse_position(position.strip(), fps, frames)
        except ValueError:
            raise ValueError(f"--prompt {value!r}: after the last '@' give a chunk index (0, 1, ...) or finite, non-negative seconds like 12.5s "
                             f"(a prompt with '@' in its text ends with its position, e.g. '...@0')") from None
        if not text.strip():
            raise ValueError(f"--prompt {value!r}: needs a text before its position")
        entries.append((chunk, text))
    entries.sort()
    starts = [chunk for chunk, _ in entries]
    if starts[0] != 0 or len(set(starts)) != len(starts):
        raise ValueError(f"--prompt: the timeline must start at chunk 0 with one prompt per position, got {starts}")
    return entries


def follow_start(path: str) -> tuple[int, list[int]]:
    """The size of the --follow file now and its [st_dev, st_ino]; ValueError naming it unless it is
    a readable regular file."""
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError(f"--follow {path}: not a readable file (create it, then append prompts to it while the run goes on)")
    status = os.stat(path)
    return status.st_size, [status.st_dev, status.st_ino]


def followed_lines(settings: Settings, state) -> list[str]:
    """The complete lines appended to the --follow file since `state.followed_bytes` (which moves past
    them); a line still being written waits for its newline. A file that cannot be read now, is no
    regular file (a FIFO would block), or shrank gives a warning and no line; a shrunk file is
    followed from its new end; a file replaced by another (`state.followed_file`, its device and
    inode, changed) is read from its start."""
    try:
        descriptor = os.open(settings.follow, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO's open must not wait for a writer
        with open(descriptor, "rb") as file:
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                warnings.warn(f"--follow {settings.follow}: not a regular file now; trying again at the next chunk")
                return []
            identity = [status.st_dev, status.st_ino]
            if state.followed_file is not None and state.followed_file != identity:
                warnings.warn(f"--follow {settings.follow}: the file was replaced; reading the new one from its start")
                state.followed_bytes = 0
            state.followed_file = identity
            size = status.st_size
            if size < state.followed_bytes:
                warnings.warn(f"--follow {settings.follow}: the file shrank; following it from its end")
                state.followed_bytes = size
                return []
            file.seek(state.followed_bytes)
            data = file.read(size - state.followed_bytes)
    except OSError as error:
        warnings.warn(f"--follow {settings.follow}: cannot read it now ({error.strerror}); trying again at the next chunk")
        return []
    complete = data[:data.rfind(b"\n") + 1]
    state.followed_bytes += len(complete)
    return complete.decode("utf-8", "replace").splitlines()


def place_followed(settings: Settings, prompts, state, lines: list[str]) -> None:
    """Place each followed line on the timeline, "TEXT" at the first chunk free of a prompt from the
    first chunk not yet made plus --transition on (so the blend toward it starts now, and lines read
    together go to successive chunks), "TEXT@T" at T or, if T is past, as "TEXT" would; a blank line or
    one starting with # is skipped silently, a bad one, or one at a T that has a prompt, with a warning."""
    import endless

    now = state.chunk_index + settings.transition
    for line in (line.strip() for line in lines):
        if not line or line.startswith("#"):
            continue
        text, _, position = line.rpartition("@") if "@" in line else (line, "", "")
        try:
            chunk = parse_position(position.strip(), settings.fps, settings.frames) if position else -1
            if chunk < now:  # no position, or a past one
                taken = {start for start, _ in settings.timeline}
                chunk = next(free for free in range(now, now + len(taken) + 1) if free not in taken)
        except (ValueError, OverflowError):
            warnings.warn(f"--follow {settings.follow}: {line!r} skipped: after its last '@' give a chunk index or "
                          f"seconds like 12.5s")
            continue
        if "\ufffd" in line or not text.strip():
            warnings.warn(f"--follow {settings.follow}: {line!r} skipped: {'not UTF-8' if text.strip() else 'no text'}")
        elif chunk in {start for start, _ in settings.timeline}:
            warnings.warn(f"--follow {settings.follow}: {line!r} skipped: chunk {chunk} has a prompt already")
        else:
            endless.place_prompt(settings, prompts, chunk, text.strip())
            print(f"\nchunk {chunk}: {text.strip()!r} (from --follow)", file=sys.stderr)


def check_text(option: str, text: str) -> None:
    """ValueError unless `text` (from the command line or a file) is valid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{option} {text.encode('utf-8', 'replace')!r}: is not valid UTF-8 text") from None


def read_timeline_file(path: str) -> list[str]:
    """A UTF-8 text file with one "TEXT@T" per line (blank lines and lines starting with # are skipped)."""
    try:
        lines = Path(path).read_bytes().decode("utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"--timeline {path}: cannot read it ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"--timeline {path}: is not UTF-8 text (byte {error.start})") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


# ---------------------------------------------------------------------------------------------
# Options


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", action="append", help='"TEXT", or "TEXT@T" (T: chunk index or seconds like 4s); repeat for a timeline')
    parser.add_argument("--timeline", help='UTF-8 text file with one "TEXT@T" per line')
    parser.add_argument("--follow", metavar="FILE",
                        help='a UTF-8 text file to follow while the run goes on: each line appended to it, "TEXT" or '
                             '"TEXT@T", places a prompt, "TEXT" at the next chunk (blended over --transition from '
                             'there) that has no prompt yet, so lines appended together go to successive chunks; '
                             '"TEXT@T" at T (a past T: as "TEXT"), skipped with a warning if T has a prompt; a bad '
                             'line is skipped with a warning; the state file keeps the timeline as used')
    add_chunk_options(parser)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--out", default="video.mp4",
                        help=".mp4, .gif, a folder (PNG frames), or - (an MP4 stream to standard output, chunk by chunk: "
                             "| ffplay - plays it while it is made)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out, once the new video's first chunk is complete")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--chunks", type=int, help="chunks to write (default: until Ctrl-C)")
    length.add_argument("--seconds", type=float, help="length of the video in seconds")
    parser.add_argument("--seed", type=int, help=f"random seed, 0 .. 2**64 - 1 (default {Settings.seed})")
    parser.add_argument("--fps", type=float, help=f"frames per second of the output (default {Settings.fps:g})")
    parser.add_argument("--crf", type=int, help=f"H.264 quality, 0..51, lower is better (default {Settings.crf})")
    parser.add_argument("--image", help="image-to-video: start from this image")
    parser.add_argument("--image-strength", type=float,
                        help=f"how much of --image the first chunk keeps, in [0, 1] (default {Settings.image_strength})")
    parser.add_argument("--extend", help="continue this video: its last frames are the first context")
    parser.add_argument("--resume", action="store_true", help="continue the run that wrote --out: every setting comes from its state file; --chunks or --seconds may change the length")
    parser.add_argument("--transition", type=int, help=f"chunks over which timeline prompts blend (default {Settings.transition})")
    parser.add_argument("--lora", action="append", metavar="FILE[:STRENGTHS]",
                        help=f"a LoRA (kohya-ss or diffusers/PEFT .safetensors) merged into the UNet and both text "
                             f"encoders; repeat for more: {LORA_SYNTAX}; strengths blend over --transition chunks "
                             f"like prompts, e.g. style.safetensors:0@0,1@10,0.3@20s")
    parser.add_argument("--drop-first-chunk", action="store_true", default=None, help="drop the first chunk (made without context), as the original did")
    parser.add_argument("--skip-frames", type=int,
                        help="frames not written at the start of a new video (default: the model's, else 0; "
                             "the published release's recipe: 7)")
    parser.add_argument("--offload", choices=OFFLOAD_MODES, default="none",
                        help="model: each of text encoders, UNet, VAE on the device only while it runs; sequential: "
                             "also the UNet's levels one at a time (smallest cards, slowest); default none")
    parser.add_argument("--vae-tiles", choices=("auto", "on", "off"),
                        help="decode frames in overlapping 512-pixel tiles (less memory, slightly other pixels); "
                             "auto (the default): above 1024x1024; --resume keeps the run's")
    parser.add_argument("--vae-dtype", choices=("fp32", "fp16", "bf16"),
                        help="the VAE's dtype (default: --dtype's, but fp32 for fp16, where SDXL's VAE overflows); "
                             "--resume keeps the run's")
    return parser


def parse_arguments(argv=None) -> argparse.Namespace:
    """The options; those not given are None (their defaults come from the model, then Settings)."""
    return build_parser().parse_args(argv)


def given_options(args: argparse.Namespace) -> set[str]:
    """The names of the options given on the command line: those whose value is not the parser's
    default (so `--seed 0`, `--guidance 0` and `--no-anchor-frame` count: 0 and False are values)."""
    defaults = vars(build_parser().parse_args([]))
    return {name for name, value in vars(args).items() if value != defaults[name]} | {"out"}


def settings_from_arguments(args: argparse.Namespace, model_defaults: dict | None = None) -> Settings:
    """Options given on the command line, else the model's `sample_defaults`, else Settings' defaults."""
    given = {name: getattr(args, name) for name in SETTING_NAMES if getattr(args, name) is not None}
    values = {**(model_defaults or {}), **(RECIPES[args.recipe] if args.recipe else {}), **given}
    for name in ("model", "image", "extend", "negative_prompt", "follow"):
        if isinstance(values.get(name), str):
            check_text(f"--{name.replace('_', '-')}", values[name])
    if isinstance(values.get("follow"), str):  # stored absolute: a resumed run may start in another folder
        values["follow"] = os.path.abspath(values["follow"])
    prompts = (args.prompt or []) + (read_timeline_file(args.timeline) if args.timeline else [])
    fps, frames = values.get("fps", Settings.fps), values.get("frames", Settings.frames)
    for option, value in (("--fps", fps), ("--frames", frames)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{option} must be a positive number, got {value}")
    loras = [parse_lora(value, lambda text: parse_position(text, fps, frames)) for value in args.lora or []]
    settings = Settings.from_options(timeline=parse_timeline(prompts, fps, frames), loras=loras, **values)
    check_settings(settings)
    return settings


def total_chunks(args: argparse.Namespace, settings: Settings) -> int | None:
    """Chunks to write from --chunks or --seconds; None: until Ctrl-C."""
    if args.chunks is not None:
        if args.chunks < 1:
            raise ValueError(f"--chunks must be at least 1, got {args.chunks}")
        return args.chunks
    if args.seconds is not None:
        if not (math.isfinite(args.seconds) and args.seconds > 0):
            raise ValueError(f"--seconds must be a positive finite number, got {args.seconds}")
        return math.ceil(args.seconds * settings.fps / settings.frames)
    return None


def check_steps(settings: Settings, model_config: dict) -> None:
    """ValueError naming --steps unless the sampler's schedule can take that many (at most the model's
    training timesteps; at most 50 with the lcm spacing), from the model's config, before its weights."""
    from scheduler import LCM_ORIGINAL_STEPS, SchedulerConfig, make_schedule, with_sampler

    if settings.timesteps is not None:  # checked by `check_settings`
        return
    config = with_sampler(SchedulerConfig.from_dict(model_config["scheduler"]), settings.scheduler,
                          settings.timestep_spacing)
    steps, training_timesteps = settings.steps, config.num_train_timesteps
    if config.timestep_spacing == "lcm" and steps > LCM_ORIGINAL_STEPS:
        raise ValueError(f"--steps {steps}: the lcm timestep spacing (--scheduler lcm or tcd, or --timestep-spacing "
                         f"lcm) takes at most {LCM_ORIGINAL_STEPS} steps")
    if steps > training_timesteps:
        raise ValueError(f"--steps {steps}: the model has {training_timesteps} training timesteps; give at most that")
    try:
        make_schedule(config, steps)
    except ValueError:
        raise ValueError(f"--steps {steps} at timestep spacing {config.timestep_spacing} repeats a noise level "
                         f"of the model's schedule; give fewer steps") from None


def check_not_an_input(out: str, settings: Settings) -> None:
    """ValueError if --out is (or holds, or lies inside) a file this run reads, links resolved."""
    from infra.files import check_not_an_input as refuse_an_input

    refuse_an_input("--out", out, [("--extend", settings.extend), ("--image", settings.image), ("--model", settings.model),
                                   ("--follow", settings.follow), *(("--lora", lora.path) for lora in settings.loras)])


def decoding(settings: Settings, model_config: dict, vae_dtype: str | None, vae_tiles: str | None) -> tuple[str, bool]:
    """How a run decodes its frames, as its state file keeps it (it changes their pixels): the VAE's
    dtype (`vae_dtype`, --vae-dtype; None: --dtype's, but fp32 for fp16 where the VAE overflows) and
    whether in tiles (`vae_tiles`, --vae-tiles; None or auto: where a frame has more than
    vae.TILES_ABOVE latent pixels), never where a frame is one tile (then it decodes the same)."""
    import vae
    from pipeline import vae_dtype_name

    factor = vae.VAEConfig(**model_config["vae"]).downsample_factor
    height, width = settings.height // factor, settings.width // factor  # latent pixels
    tiles = {None: None, "auto": None, "on": True, "off": False}[vae_tiles]
    tiles = height * width > vae.TILES_ABOVE if tiles is None else tiles
    dtype = vae_dtype_name(settings.dtype, vae_dtype, model_config["vae"].get("force_upcast", True))
    return dtype, tiles and (height > vae.TILE or width > vae.TILE)


def resume_conflicts(args: argparse.Namespace, stored: Settings, state: "endless.VideoState",
                     model_config: dict) -> list[str]:
    """The options given with --resume whose values differ from the state file's: its settings, and
    how its frames are decoded (`decoding`; from a file that does not say, the options are taken)."""
    from scheduler import SchedulerConfig

    conflicts, stored_values = [], stored.options()
    dtype, tiles = decoding(stored, model_config, args.vae_dtype, args.vae_tiles)
    sampler = lambda name: name or SchedulerConfig.from_dict(model_config["scheduler"]).algorithm_type
    for name in sorted(given_options(args) - RESUME_MAY_CHANGE):
        option = option_name(name)
        if name in ("prompt", "timeline"):
            prompts = (args.prompt or []) + (read_timeline_file(args.timeline) if args.timeline else [])
            if parse_timeline(prompts, stored.fps, stored.frames) != stored.timeline:
                conflicts.append(f"{option} (the state file has {stored.timeline})")
        elif name == "lora":
            fps, frames = stored.fps, stored.frames
            given = [parse_lora(value, lambda text: parse_position(text, fps, frames)) for value in args.lora]
            placed = lambda loras: [(os.path.realpath(lora.path), lora.strengths) for lora in loras]
            if placed(given) != placed(stored.loras):
                conflicts.append(f"{option} (the state file has {[(lora.path, lora.strengths) for lora in stored.loras]})")
        elif name == "model":
            if os.path.realpath(args.model) != os.path.realpath(stored.model):
                conflicts.append(f"{option} {args.model} (the state file has {stored.model})")
        elif name == "follow":
            if os.path.abspath(args.follow) != stored.follow:
                conflicts.append(f"{option} {args.follow} (the state file has {stored.follow})")
        elif name in ("overwrite",):
            conflicts.append("--overwrite (a resumed run keeps what was written)")
        elif name == "recipe":  # a None height or width: the model's, whichever the run took
            differ = {key: stored_values[key] for key, value in RECIPES[args.recipe].items()
                      if value is not None and stored_values[key] != value}
            if differ:
                conflicts.append(f"{option} {args.recipe} (the state file has {differ})")
        elif name == "scheduler":  # none stored: the model's sampler, which may be named
            if sampler(args.scheduler) != sampler(stored.scheduler):
                conflicts.append(f"{option} {args.scheduler} (the state file has {sampler(stored.scheduler)})")
        elif name == "vae_dtype":
            if state.vae_dtype not in (None, dtype):
                conflicts.append(f"{option} {args.vae_dtype} (the state file has {state.vae_dtype})")
        elif name == "vae_tiles":
            if state.vae_tiles not in (None, tiles):
                conflicts.append(f"{option} {args.vae_tiles} (the state file's frames are decoded "
                                 f"{'in tiles' if state.vae_tiles else 'whole'})")
        elif getattr(args, name) != stored_values[name]:
            shown = lambda value: ("on" if value else "off") if isinstance(value, bool) else value  # as --refiner takes it
            conflicts.append(f"{option} {shown(getattr(args, name))} (the state file has {shown(stored_values[name])})")
    return conflicts


# ---------------------------------------------------------------------------------------------
# The run: preflight (every check, under the output's lock), load, then the loop


@dataclass
class Plan:
    """What `preflight` checked and read: all that `load` and `write_video` need."""

    out: str
    settings: Settings  # complete: the model's defaults and size filled in, the device resolved
    state: "endless.VideoState"  # a new video's, or the state file's with --resume
    state_file: Path
    chunks_to_write: int | None  # None: until Ctrl-C
    offload: str  # one of OFFLOAD_MODES
    vae_dtype: str  # the VAE's dtype, as stored in the state (`decoding`)
    vae_tiles: bool  # decode in tiles, as stored in the state (`decoding`)
    image: "torch.Tensor | None"  # --image (3, H, W) in [-1, 1], for a video's first chunk
    video: "torch.Tensor | None"  # --extend's last frames (3, context_frames, H, W) in [-1, 1]
    unfinished_frames: int = 0  # written at the end from the refiner's window (`write_unfinished`)


def run(args: argparse.Namespace, settings: Settings | None, on_chunk=None) -> None:
    """Check everything and lock the output (`preflight`), load the model (`load`), then write chunk
    after chunk (`write_video`).

    settings: from the command line, or None with --resume (they come from the state file).
    on_chunk: passed to endless.generate_latents (called before every chunk).
    """
    # Imported here, once the options are checked, so that --help and option errors are instant.
    import torch

    from infra.run_state import default_threads, format_seconds

    torch.set_num_threads(args.threads or default_threads())
    try:
        with torch.no_grad(), preflight(args, settings) as plan:  # the output stays locked until the end
            started = time.time()
            pipeline = load(plan)
            in_place = write_video(pipeline, plan, on_chunk)
    except OSError as error:  # before the writer: a resumed run's state is as it was, a new run made nothing
        if not getattr(error, "__notes__", None):
            error.add_note(what_now(error, args.out, resumable=args.resume))
        raise
    frames = plan.state.frames_written + plan.unfinished_frames
    if in_place and plan.state_file is None:
        print(f"\nstandard output: {frames} frames at {plan.settings.fps:g} fps, made in "
              f"{format_seconds(time.time() - started)}", file=sys.stderr)
    elif in_place:
        out, fps = plan.out, plan.settings.fps
        print(f"\n{out}: {frames} frames, {frames / fps:.1f} s at {fps:g} fps, "
              f"made in {format_seconds(time.time() - started)}; state in {plan.state_file}: "
              f"`python sample.py --out {out} --resume --chunks N` continues it", file=sys.stderr)


@contextmanager
def preflight(args: argparse.Namespace, settings: Settings | None):
    """Every check that can refuse the run, before any work, and the output's lock: yields the Plan
    while the lock is held.

    In order: the output's format and folder; the lock; the state file (--resume) or the model's
    defaults; that no input is the output; the sampler, the checkpoint's files, the output's frames,
    the length, the device, the memory a chunk needs; then --image or --extend is read.
    """
    import endless
    from infra import memory
    from infra.checkpoint import check_checkpoint_files, load_checkpoint_config
    from infra.files import remove_stale_temporaries
    from infra.run_state import OutputLock, resolve_device
    from infra.video_io import check_output_path, read_image, read_video
    from scheduler import SAMPLERS

    out = args.out
    streaming = out == STANDARD_OUTPUT  # no file: no lock, no state file, nothing to resume
    if not streaming:
        check_output_path(out)  # its format and folder, before the lock is made next to it
    if settings is not None and not streaming:  # and that it is no input (its lock would go inside --model)
        check_not_an_input(out, settings)
    with nullcontext() if streaming else OutputLock(out):
        state_file = None if streaming else endless.state_path(out)
        if state_file is not None:
            remove_stale_temporaries(state_file)
        if args.resume:
            settings, state, pending = endless.load_state(state_file)
            model_config = load_checkpoint_config(settings.model)
            check_settings(settings, model_config)
            if conflicts := resume_conflicts(args, settings, state, model_config):
                raise ValueError(f"--resume continues {out} as its state file says; these options differ from it: "
                                 + "; ".join(conflicts))
            endless.finish_pending_output(pending, out)
        else:
            if args.model is None and not (DEFAULT_MODEL / "config.json").is_file():
                raise ValueError(f"no --model given, and the embedded baby model is missing from {DEFAULT_MODEL}")
            model_config = load_checkpoint_config(settings.model)
            settings = with_model_defaults(args, model_config)
            if not streaming and os.path.lexists(out) and not args.overwrite:
                raise ValueError(f"--out {out} exists: give --overwrite to replace it, or --resume to continue it")
            state = endless.VideoState()
            if settings.follow:  # only what is appended from now on counts
                state.followed_bytes, state.followed_file = follow_start(settings.follow)
        if not streaming:
            check_not_an_input(out, settings)
        check_sampler(settings, SAMPLERS)
        check_steps(settings, model_config)
        check_checkpoint_files(settings.model)
        if not streaming:
            check_output_path(out, state.frames_written if args.resume else None)
        chunks_to_write = total_chunks(args, settings)
        if args.chunks is not None and settings.skip_frames >= chunks_to_write * settings.frames:
            raise ValueError(f"--skip-frames {settings.skip_frames} skips all {chunks_to_write * settings.frames} frames "
                             f"of --chunks {chunks_to_write}: nothing would be written")
        settings.device = device = resolve_device(settings.device)  # stored as it is run
        vae_dtype, vae_tiles = decoding(settings, model_config, args.vae_dtype, args.vae_tiles)
        # A resumed run decodes as its state file says; one from before that was stored, as it was given
        # (`resume_conflicts`), and says so from now on.
        state.vae_dtype = vae_dtype = state.vae_dtype or vae_dtype
        state.vae_tiles = vae_tiles = vae_tiles if state.vae_tiles is None else state.vae_tiles
        memory.check_memory(model_config, settings.model, device, height=settings.height, width=settings.width,
                            frames=settings.frames, context_frames=settings.context_frames, guidance=settings.guidance,
                            decode_frames=settings.decode_frames, dtype=settings.dtype, vae_dtype=vae_dtype,
                            offload=args.offload, vae_tiles=vae_tiles)
        starting = state.chunk_index == 0  # a resumed run past its first chunk needs no starting point
        image = video = None
        if settings.image and starting:
            image = read_image(settings.image, settings.height, settings.width, option="--image")
        if settings.extend and starting:
            video, _ = read_video(settings.extend, settings.height, settings.width, last_frames=settings.context_frames,
                                  option="--extend")
        if chunks_to_write is None:
            print("no --chunks or --seconds: running until Ctrl-C", file=sys.stderr)
        yield Plan(out, settings, state, state_file, chunks_to_write, args.offload, vae_dtype, vae_tiles,
                   image, video)


def load(plan: Plan):
    """The model on the device (offloaded: waiting on the CPU), its VAE's dtype and tiling, and the
    LoRAs merged at their strengths where the run starts."""
    import endless
    from infra.checkpoint import DTYPES
    from pipeline import StableDiffusionXLVideoPipeline

    settings = plan.settings
    load_on = settings.device if plan.offload == "none" else "cpu"  # offloaded models wait on the CPU
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(settings.model, load_on, DTYPES[settings.dtype])
    pipeline.set_vae_dtype(plan.vae_dtype, settings.dtype)
    pipeline.vae_tiles = plan.vae_tiles
    if plan.offload != "none":
        pipeline.enable_offload(plan.offload, settings.device)
    endless.load_loras(pipeline, settings, plan.state.chunk_index)  # before the prompts: the text encoders have LoRAs too
    return pipeline


def write_video(pipeline, plan: Plan, on_chunk=None) -> bool:
    """Encode the prompts and start from --image or --extend, then chunk after chunk: denoise,
    decode, write, save the state; until --chunks or --seconds, or Ctrl-C. Returns whether the output
    is in place (a new one's first chunk was complete), False for a stream whose reader quit."""
    import torch

    import endless
    from infra.run_state import Progress
    from infra.video_io import open_writer

    settings, state, state_file, out = plan.settings, plan.state, plan.state_file, plan.out
    prompts = endless.timeline_prompts(pipeline, settings)  # then the text encoders leave the device
    generator = torch.Generator().manual_seed(settings.seed)
    if state.generator_state is not None:
        generator.set_state(state.generator_state)
    latent_image = endless.starting_point(pipeline, state, plan.image, plan.video)
    state.to(pipeline.device, pipeline.dtype)  # a resumed state's tensors, from the CPU
    print_timeline(settings, plan.chunks_to_write)
    warn_unknown_words(pipeline.text_encoder.tokenizer, settings)

    dropping_first_chunk = settings.drop_first_chunk and not (settings.image or settings.extend)
    # With a refiner or skipped frames, --chunks counts the chunks made (frames leave the refiner's
    # window two chunks late); else the chunks written, as before.
    by_chunks_made = settings.refiner or settings.skip_frames > 0
    written_chunks = state.chunk_index if by_chunks_made else state.frames_written // settings.frames
    progress = Progress(plan.chunks_to_write, written_chunks, video_seconds_per_chunk=settings.frames / settings.fps)
    old_state = []  # the old output's state file (its bytes, or None), once `placing` replaced it

    def placing(temporary: str | None) -> None:
        """The first chunk of a new output is complete, about to replace any old output: record it
        (a crash between the two renames is finished by --resume), or, for a PNG folder whose old
        frames go one by one, drop the old state so that it never describes the new frames."""
        if temporary is None:
            state_file.unlink(missing_ok=True)
            return
        previous = state_file.read_bytes() if state_file.is_file() else None
        endless.save_state(state_file, settings, state, pending_output=temporary)
        old_state.append(previous)

    writer = open_writer(out, settings.fps, crf=settings.crf, resume_frames=state.frames_written or None,
                         before_placing=placing)
    try:
        chunks = endless.generate_latents(pipeline, settings.chunk, settings.drift, prompts, state, generator,
                                          latent_image, settings.image_strength, progress.step, on_chunk,
                                          refine=settings.refiner)
        while plan.chunks_to_write is None or written_chunks < plan.chunks_to_write:
            if settings.follow:
                place_followed(settings, prompts, state, followed_lines(settings, state))
            latents = next(chunks)
            state.generator_state = generator.get_state()
            if by_chunks_made:
                latents = not_skipped(latents, endless.final_latents(state, settings.frames), settings.skip_frames)
                if latents.shape[2]:
                    frames = endless.frames_of(pipeline, latents, settings.decode_frames)[0]  # (n, H, W, 3)
                    state.frames_written += len(frames)
                    writer.write_chunk(frames)  # a new output's first: `placing`
                written_chunks = progress.chunk = state.chunk_index
            elif not (dropping_first_chunk and state.chunk_index == 1):
                frames = endless.frames_of(pipeline, latents, settings.decode_frames)[0]  # (frames, H, W, 3)
                state.frames_written += settings.frames
                writer.write_chunk(frames)  # a new output's first: `placing`
                written_chunks += 1
                progress.chunk = written_chunks
            if writer.in_place and state_file is not None:
                endless.save_state(state_file, settings, state)
        plan.unfinished_frames = write_unfinished(pipeline, writer, settings, state)
        if state.frames_written + plan.unfinished_frames == 0:
            print(f"\nnothing was written: the run made {state.chunk_index * settings.frames} frames, "
                  f"none past --skip-frames {settings.skip_frames}", file=sys.stderr)
    except BrokenPipeError:  # --out -: the player reading the stream quit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that no flush at exit fails again
        print(f"\nstopped: standard output was closed after {writer.frames_written} frames", file=sys.stderr)  # those sent
        return False  # no summary of a finished run
    except OSError as error:  # a full disk, say: the state file describes the output, or nothing of this run is kept
        error.add_note(what_now(error, out, resumable=writer.in_place))
        raise
    except KeyboardInterrupt:
        if writer.in_place and state_file is None:
            print("\nstopped: the stream ends at its last complete chunk", file=sys.stderr)
        elif writer.in_place:
            print(f"\nstopped: {out} ends at its last complete chunk; --resume continues it", file=sys.stderr)
        else:
            print(f"\nstopped before the first chunk was complete: nothing was written"
                  f"{'; the old ' + out + ' is kept' if os.path.lexists(out) else ''}", file=sys.stderr)
    finally:
        writer.close()
        if old_state and not writer.in_place and writer.temporary is not None:
            # The state file names a temporary that was never placed (and is gone): the old
            # output is still there, so its state file goes back.
            endless.restore_state(state_file, old_state[0])
    return writer.in_place


def not_skipped(latents, final: int, skip: int):
    """Of the latents (b, 4, n, h, w) that just became final, the last n of `final` so far, those
    at or past the video's frame `skip`."""
    first = final - latents.shape[2]
    return latents[:, :, max(skip - first, 0):]


def write_unfinished(pipeline, writer, settings: Settings, state) -> int:
    """At the end of a run with a refiner: write the frames still in its window, final since the video
    ends here. The state file still ends before them, so --resume of a finished run for more chunks
    writes them again as the chunks after them change them. Returns how many frames it wrote."""
    import endless

    latents = endless.unfinished(state)
    if latents is not None:
        latents = not_skipped(latents, endless.final_latents(state, settings.frames) + latents.shape[2],
                              settings.skip_frames)
    if latents is None or not latents.shape[2]:
        return 0
    writer.write_chunk(endless.frames_of(pipeline, latents, settings.decode_frames)[0])
    return latents.shape[2]


def warn_unknown_words(tokenizer, settings: Settings) -> None:
    """Say which words of the prompts the model's tokenizer knows only letter by letter, and list
    the words it knows when its vocabulary is small (the baby's)."""
    from text import known_words, unknown_words

    for _, text in settings.timeline:
        if unknown := unknown_words(tokenizer, text):
            known = known_words(tokenizer)
            listing = f"; it knows: {', '.join(known)}" if known else ""
            print(f"warning: the model does not know the words {', '.join(unknown)} of {text!r} "
                  f"(it reads them letter by letter){listing}", file=sys.stderr)


def print_timeline(settings: Settings, chunks_to_write: int | None) -> None:
    """The timeline as it will be used: each prompt, its first chunk and second; a warning for an entry
    placed after the end of the video."""
    seconds_per_chunk = settings.frames / settings.fps
    for chunk, text in settings.timeline:
        late = chunks_to_write is not None and chunk >= chunks_to_write
        note = f"  (warning: after the video's last chunk {chunks_to_write - 1}, never shown)" if late else ""
        print(f"chunk {chunk} ({chunk * seconds_per_chunk:g} s): {text!r}{note}", file=sys.stderr)
    for lora in settings.loras:
        placed = ", ".join(f"{strength:g} at chunk {chunk}" for chunk, strength in lora.strengths)
        print(f"LoRA {lora.path}: {placed}", file=sys.stderr)


def with_model_defaults(args: argparse.Namespace, model_config: dict) -> Settings:
    """The settings of a new run: the command line's, else the model's `sample_defaults`, else Settings'."""
    config, defaults = f"{args.model or DEFAULT_MODEL}/config.json", model_config.get("sample_defaults", {})
    if not isinstance(defaults, dict):
        raise ValueError(f"{config}: sample_defaults is not an object of option values, got {json_type(defaults)}")
    if unknown := sorted(set(defaults) - set(SETTING_NAMES)):
        raise ValueError(f"{config}: unknown sample_defaults {unknown}")
    types = {f.name: f.type for cls in (Settings, DriftControls) for f in fields(cls)}
    for name, value in defaults.items():  # the command line's types, as argparse gives them
        if not of_type(value, types[name]):
            raise ValueError(f"{config}: sample_defaults {name} {value!r} is not {type_name(types[name])}")
    settings = settings_from_arguments(args, defaults)
    if settings.refiner and not model_config.get("refiner") and args.refiner is None:
        source = f"--recipe {args.recipe}" if args.recipe else f"{config}'s sample_defaults"
        raise ValueError(f"{source} turns the refiner on, but the model {settings.model} has no refiner: "
                         f"give --refiner off")
    check_settings(settings, model_config)
    return settings


def type_name(annotation) -> str:
    """'an int', 'a float', 'a str or None': a field's annotation (a type or a union), in words."""
    names = [getattr(t, "__name__", str(t)) for t in getattr(annotation, "__args__", [annotation])]
    words = " or ".join("None" if name == "NoneType" else name for name in names)
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def json_type(value) -> str:
    """The JSON name of a value's type (what a user sees in a config.json)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def main(argv=None, on_chunk=None) -> None:
    """Run the command line `argv`; on_chunk(index, context, embeddings) is called before every chunk."""
    args = parse_arguments(argv)
    # 1. The options alone: no torch yet, no file touched.
    if args.resume and args.overwrite:
        raise ValueError("give --resume (continue --out) or --overwrite (replace it), not both")
    if args.out == STANDARD_OUTPUT and (args.resume or args.overwrite):
        raise ValueError("--out - streams the video to standard output: there is nothing to --resume or --overwrite")
    if args.out == STANDARD_OUTPUT and sys.stdout is None:
        raise ValueError("--out - writes an MP4 stream to standard output, which is closed here; pipe it to a "
                         "player (| ffplay -) or a file")
    if args.out == STANDARD_OUTPUT and sys.stdout.isatty():
        raise ValueError("--out - writes an MP4 stream to standard output, which is a terminal here; pipe it to a "
                         "player (| ffplay -) or a file")
    check_device_name(args.device)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    settings = None if args.resume else settings_from_arguments(args)
    if settings is not None:
        total_chunks(args, settings)
    elif args.chunks is not None and args.chunks < 1 or args.seconds is not None and not (
            math.isfinite(args.seconds) and args.seconds > 0):
        raise ValueError("--chunks must be at least 1 and --seconds a positive finite number")
    run(args, settings, on_chunk)


def what_now(error: OSError, out: str, resumable: bool) -> str:
    """What is true after `error` stopped a run, and what to do, for `write_error_message`:
    resumable (a resumed run, or a new one whose first chunk is in place: the state file describes
    the output) or not (a new run before that: nothing of it was kept, an old output is as it was)."""
    mend = "free some, then " if error.errno == errno.ENOSPC else ""
    if out == STANDARD_OUTPUT:
        return "the stream ends at its last complete chunk" if resumable else f"nothing was streamed: {mend}run it again"
    if resumable:
        return f"{mend}--resume continues the run"
    kept = f" (the old {out} is as it was)" if os.path.lexists(out) else ""
    return f"nothing of this run was kept{kept}: {mend}run it again"


def write_error_message(error: OSError) -> str:
    """One line for an OSError: 'no space left on device while writing PATH', and the like, then
    what is true now and what to do (`what_now`, added as the error's note by `run`)."""
    where = f" while writing {error.filename}" if error.filename else ""
    what = "no space left on device" if error.errno == errno.ENOSPC else error.strerror or str(error)
    return "; ".join([f"{what}{where}", *getattr(error, "__notes__", ())])


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line, no source line
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
    except OSError as error:
        sys.exit(f"error: {write_error_message(error)}")
