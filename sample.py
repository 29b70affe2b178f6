"""Endless text-to-video: chunk after chunk, each conditioned on the last frames already made.

    python sample.py --prompt "a red circle moving left" --chunks 30 --out video.mp4

The prompt is encoded once; between chunks only the context (the last `--context-frames` latents)
and the random state survive, so memory does not grow with the length of the video. Each
finished chunk is decoded a few frames at a time and handed to a streaming writer at once; then a
small state file next to the output is replaced atomically, and `--resume` continues a run that
was stopped or killed with exactly the frames an uninterrupted run would have made.
"""

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline import StableDiffusionXLVideoPipeline, load_checkpoint_config, randn
from text import PromptEmbeddings
from video_io import check_output_path, open_writer, read_image, read_video

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "baby"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STATE_VERSION = 1


@dataclass
class Settings:
    """Everything that decides the frames of a video; stored in the state file for --resume."""

    timeline: list[tuple[int, str]]  # (first chunk index, prompt), sorted, the first at chunk 0
    negative_prompt: str = ""
    model: str = str(DEFAULT_MODEL)
    height: int | None = None
    width: int | None = None
    frames: int = 4
    context_frames: int = 4
    steps: int = 25
    guidance: float = 9.0
    seed: int = 0
    fps: int = 6
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
    device: str = "cpu"
    dtype: str = "fp32"
    decode_frames: int = 2


@dataclass
class VideoState:
    """What survives between chunks: small, and all that --resume needs besides the settings."""

    chunk_index: int = 0  # chunks made so far (written or dropped)
    frames_written: int = 0
    context: torch.Tensor | None = None  # (batch, 4, context_frames, h, w), clean latents
    anchor: torch.Tensor | None = None  # (batch, 4, 1, h, w): the first frame, with --anchor-frame
    latent_statistics: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # count, sum, sum of squares
    generator_state: torch.Tensor | None = None


def parse_timeline(values: list[str], fps: int, frames: int) -> list[tuple[int, str]]:
    """--prompt values "TEXT" or "TEXT@T" (T a chunk index, or seconds as "12.5s") -> sorted (chunk, TEXT)."""
    if not values:
        raise ValueError("--prompt is required (or a --timeline file)")
    entries = []
    for value in values:
        text, at, position = value.rpartition("@") if "@" in value else (value, "", "0")
        try:
            chunk = round(float(position[:-1]) * fps / frames) if position.endswith("s") else int(position)
        except ValueError:
            raise ValueError(f"--prompt {value!r}: after '@' give a chunk index or seconds like 12.5s") from None
        if not text.strip() or chunk < 0:
            raise ValueError(f"--prompt {value!r}: needs a text and a non-negative position")
        entries.append((chunk, text))
    entries.sort()
    starts = [chunk for chunk, _ in entries]
    if starts[0] != 0 or len(set(starts)) != len(starts):
        raise ValueError(f"--prompt: the timeline must start at chunk 0 with one prompt per position, got {starts}")
    return entries


def read_timeline_file(path: str) -> list[str]:
    """A text file with one "TEXT@T" per line (blank lines and lines starting with # are skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise ValueError(f"--timeline {path}: cannot read it ({error.strerror})") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def prompt_weights(timeline: list[tuple[int, str]], chunk: int, transition: int) -> list[tuple[int, float]]:
    """Which timeline entries make the embeddings of `chunk`: [(entry, weight)].

    Over the `transition` chunks before an entry starts (fewer if the previous entry starts later),
    its weight rises linearly from 1 / (transition + 1) while the previous entry's falls, so every
    entry is pure at the chunk where it is placed.
    """
    current = max(index for index, (start, _) in enumerate(timeline) if start <= chunk)
    if current + 1 < len(timeline):
        start, next_start = timeline[current][0], timeline[current + 1][0]
        blend = min(transition, next_start - start - 1)
        if chunk >= next_start - blend:
            weight = (chunk - next_start + blend + 1) / (blend + 1)
            return [(current, 1 - weight), (current + 1, weight)]
    return [(current, 1.0)]


def mix_embeddings(weighted: list[tuple[PromptEmbeddings, float]]) -> PromptEmbeddings:
    """The weighted sum of prompt embeddings, field by field (None stays None)."""
    if len(weighted) == 1:
        return weighted[0][0]
    fields = zip(*(embeddings for embeddings, _ in weighted))
    return PromptEmbeddings(
        *(None if parts[0] is None else sum(w * p for p, (_, w) in zip(parts, weighted)) for parts in fields)
    )


def renormalize(latents: torch.Tensor, statistics: list[float]) -> torch.Tensor:
    """The original's renormalisation, in constant memory.

    The original normalised the whole stack of latents made so far to zero mean and unit (unbiased)
    standard deviation after every chunk. `statistics` (count, sum, sum of squares of the
    normalised stack) let us compute the same mean and deviation without keeping the stack; the
    new chunk is normalised with them. Frames already written are not transformed again (the
    original re-normalised them before its single decode at the end).
    """
    count, total, squares = statistics
    count += latents.numel()
    total += latents.double().sum().item()
    squares += latents.double().square().sum().item()
    mean = total / count
    deviation = math.sqrt(max(squares - count * mean**2, 0.0) / max(count - 1, 1)) + 1e-8
    statistics[:] = [count, (total - count * mean) / deviation, (squares - 2 * mean * total + count * mean**2) / deviation**2]
    return (latents - mean) / deviation


def chunk_context(state: VideoState, settings: Settings, generator) -> torch.Tensor | None:
    """The context of the next chunk: the last frames (after the anchor frame, if kept), noised if asked."""
    if state.context is None:
        return None
    context = state.context
    if state.anchor is not None:
        context = torch.cat([state.anchor, context[:, :, 1:]], dim=2)  # (b, 4, k, h, w)
    if settings.context_noise > 0:
        context = context + settings.context_noise * randn(context.shape, generator, context.device, context.dtype)
    return context


def generate_latents(pipeline, settings: Settings, embeddings: list[PromptEmbeddings], state: VideoState,
                     generator, latent_image=None, callback=None):
    """Yield the latents of chunk after chunk (batch, 4, frames, h, w), updating `state` before each."""
    while True:
        weights = prompt_weights(settings.timeline, state.chunk_index, settings.transition)
        first = state.chunk_index == 0
        latents = pipeline(
            prompt_embeds=mix_embeddings([(embeddings[entry], weight) for entry, weight in weights]),
            height=settings.height,
            width=settings.width,
            num_frames=settings.frames,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            generator=generator,
            previous_latents=chunk_context(state, settings, generator),
            latent_image=latent_image if first else None,
            conditioning_strength=settings.image_strength if first and latent_image is not None else 0.0,
            output_type="latent",
            callback=callback,
        )
        if settings.renormalize:
            latents = renormalize(latents, state.latent_statistics)
        if settings.anchor_frame and state.anchor is None:
            state.anchor = latents[:, :, :1] if state.context is None else state.context[:, :, :1]
        previous = latents if state.context is None else torch.cat([state.context, latents], dim=2)
        state.context = previous[:, :, -settings.context_frames:].clone()  # (b, 4, k, h, w)
        state.chunk_index += 1
        yield latents


def to_uint8_frames(video: torch.Tensor):
    """(3, frames, H, W) in [-1, 1] -> numpy uint8 (frames, H, W, 3)."""
    return ((video.float() / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(1, 2, 3, 0).cpu().numpy()


def state_path(out: str) -> Path:
    return Path(str(out).rstrip("/") + ".state.pt")


def save_state(path: Path, settings: Settings, state: VideoState) -> None:
    """Replace the state file atomically: a crash leaves the old one or the new one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save({"version": STATE_VERSION, "settings": asdict(settings), "state": dict(vars(state))}, temporary)
    os.replace(temporary, path)


def load_state(path: Path) -> tuple[Settings, VideoState]:
    if not path.is_file():
        raise ValueError(f"--resume: no state file {path} (it is written next to --out after every chunk)")
    saved = torch.load(path, weights_only=True)
    if saved.get("version") != STATE_VERSION:
        raise ValueError(f"--resume: {path} has state version {saved.get('version')}, expected {STATE_VERSION}")
    settings = Settings(**saved["settings"])
    settings.timeline = [tuple(entry) for entry in settings.timeline]
    return settings, VideoState(**saved["state"])


def check_settings(settings: Settings) -> None:
    """Every check that needs no model weights: sizes, counts, files. ValueError names the option."""
    positive = {"--frames": settings.frames, "--context-frames": settings.context_frames, "--steps": settings.steps,
                "--fps": settings.fps, "--decode-frames": settings.decode_frames}
    for option, value in positive.items():
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    if settings.context_frames > settings.frames:
        raise ValueError(
            f"--context-frames {settings.context_frames} is more than the {settings.frames} frames a chunk makes"
        )
    if settings.context_noise < 0 or not 0 <= settings.image_strength <= 1:
        raise ValueError("--context-noise must be >= 0 and --image-strength in [0, 1]")
    if settings.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {settings.dtype!r}")
    if settings.image and settings.extend:
        raise ValueError("give --image or --extend, not both")
    model_config = load_checkpoint_config(settings.model)
    factor = 2 ** (len(model_config["vae"]["block_out_channels"]) - 1)
    default_size = model_config["unet"]["sample_size"] * factor
    settings.height = default_size if settings.height is None else settings.height
    settings.width = default_size if settings.width is None else settings.width
    for option, value in (("--height", settings.height), ("--width", settings.width)):
        if value < factor or value % factor:
            raise ValueError(f"{option} must be a positive multiple of {factor} (the VAE's downsampling), got {value}")


def starting_point(pipeline, settings: Settings, state: VideoState, image=None, video=None):
    """Encode --image (first context and first chunk's start) or --extend (first context); returns the latent image."""
    if image is not None:
        latents = pipeline.vae.encode_video(image[None, :, None].to(pipeline.device, pipeline.dtype))
        state.context = latents  # (1, 4, 1, h, w)
        return latents
    if video is not None:
        state.context = pipeline.vae.encode_video(video[None].to(pipeline.device, pipeline.dtype))  # (1, 4, k, h, w)
    return None


class Progress:
    """One status line on stderr: chunk, step, seconds per chunk, ETA."""

    def __init__(self, total_chunks: int | None, first_chunk: int):
        self.total, self.first, self.start = total_chunks, first_chunk, time.time()
        self.chunk = first_chunk

    def step(self, step: int, steps: int) -> None:
        done = self.chunk - self.first
        elapsed = time.time() - self.start
        per_chunk = elapsed / (done + step / steps) if done or step else 0.0
        total = f"/{self.total}" if self.total else ""
        eta = f" | ETA {format_seconds(per_chunk * (self.total - self.chunk - step / steps))}" if self.total else ""
        print(f"\rchunk {self.chunk + 1}{total} step {step}/{steps} | {per_chunk:.1f} s/chunk{eta}   ",
              end="", file=sys.stderr, flush=True)


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(max(seconds, 0)), 60)
    return f"{minutes}m{seconds:02d}s"


def add_chunk_options(parser: argparse.ArgumentParser) -> None:
    """The options that shape every chunk, shared with evaluate.py. Unset (None) options take the
    model's `sample_defaults`, then Settings' defaults (`with_model_defaults`)."""
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder (convert_weights.py makes one)")
    parser.add_argument("--frames", type=int, help="frames per chunk")
    parser.add_argument("--context-frames", type=int, help="latents of the last frames each chunk sees")
    parser.add_argument("--steps", type=int, help="denoising steps per chunk")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    parser.add_argument("--height", type=int, help="pixels (default: the model's)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's)")
    parser.add_argument("--context-noise", type=float, help="std of noise added to the context (default 0)")
    parser.add_argument("--anchor-frame", action=argparse.BooleanOptionalAction,
                        help="keep the first frame in the context (default: the model's, else off)")
    parser.add_argument("--renormalize", action=argparse.BooleanOptionalAction,
                        help="the original's latent renormalisation (default: the model's, else off)")
    parser.add_argument("--decode-frames", type=int, help="frames the VAE decodes at a time (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", action="append", default=[], help='"TEXT", or "TEXT@T" (T: chunk index or seconds like 4s); repeat for a timeline')
    parser.add_argument("--timeline", help='text file with one "TEXT@T" per line')
    add_chunk_options(parser)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--out", default="video.mp4", help=".mp4, .gif, or a folder (PNG frames)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--chunks", type=int, help="chunks to write (default: until Ctrl-C)")
    length.add_argument("--seconds", type=float, help="length of the video in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=6)
    parser.add_argument("--crf", type=int, default=18, help="H.264 quality (lower is better)")
    parser.add_argument("--image", help="image-to-video: start from this image")
    parser.add_argument("--image-strength", type=float, default=0.5, help="how much of --image the first chunk keeps")
    parser.add_argument("--extend", help="continue this video: its last frames are the first context")
    parser.add_argument("--resume", action="store_true", help="continue the run that wrote --out: every setting comes from its state file; --chunks or --seconds may change the length")
    parser.add_argument("--scheduler", choices=["sde-dpmsolver++", "dpmsolver++"], help="default: the checkpoint's (the original setup)")
    parser.add_argument("--transition", type=int, default=0, help="chunks over which timeline prompts blend")
    parser.add_argument("--drop-first-chunk", action="store_true", help="drop the first chunk (made without context), as the original did")
    return parser.parse_args(argv)


def with_model_defaults(values: dict) -> dict:
    """`values` (None: not given) completed by the model's `sample_defaults`; what is still None is
    dropped, so that Settings' own defaults apply."""
    if values["model"] == str(DEFAULT_MODEL) and not (DEFAULT_MODEL / "config.json").is_file():
        raise ValueError(f"no --model given, and the embedded baby model is missing from {DEFAULT_MODEL}")
    defaults = load_checkpoint_config(values["model"]).get("sample_defaults", {})
    values = {**defaults, **{name: value for name, value in values.items() if value is not None}}
    return {name: value for name, value in values.items() if value is not None}


def settings_from_arguments(args: argparse.Namespace) -> Settings:
    """Options given on the command line, else the model's `sample_defaults`, else Settings' defaults."""
    names = {f.name for f in dataclasses.fields(Settings)} - {"timeline"}
    values = with_model_defaults({name: getattr(args, name) for name in names})
    prompts = args.prompt + (read_timeline_file(args.timeline) if args.timeline else [])
    timeline = parse_timeline(prompts, args.fps, values.get("frames", Settings.frames))
    settings = Settings(timeline=timeline, **values)
    check_settings(settings)
    return settings


def total_chunks(args, settings: Settings) -> int | None:
    if args.chunks is not None:
        if args.chunks < 1:
            raise ValueError(f"--chunks must be at least 1, got {args.chunks}")
        return args.chunks
    if args.seconds is not None:
        if args.seconds <= 0:
            raise ValueError(f"--seconds must be positive, got {args.seconds}")
        return math.ceil(args.seconds * settings.fps / settings.frames)
    return None


@torch.no_grad()
def main(argv=None) -> None:
    args = parse_arguments(argv)
    # 1. Check everything that can be checked before a model is loaded or a file touched.
    if args.resume:
        settings, state = load_state(state_path(args.out))
        check_settings(settings)
    else:
        settings, state = settings_from_arguments(args), VideoState()
        if Path(args.out).exists() and not args.overwrite:
            raise ValueError(f"--out {args.out} exists: give --overwrite to replace it, or --resume to continue it")
    check_output_path(args.out)
    chunks_to_write = total_chunks(args, settings)
    starting = state.chunk_index == 0  # a resumed run past its first chunk needs no starting point
    image = read_image(settings.image, settings.height, settings.width) if settings.image and starting else None
    video = None
    if settings.extend and starting:
        video, _ = read_video(settings.extend, settings.height, settings.width, last_frames=settings.context_frames)
        if video.shape[1] < settings.context_frames:
            raise ValueError(f"--extend {settings.extend} has {video.shape[1]} frames; --context-frames needs {settings.context_frames}")

    # 2. Load the model and encode the prompts, once.
    started = time.time()
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(settings.model, settings.device, DTYPES[settings.dtype])
    if settings.scheduler:
        pipeline.scheduler_config = type(pipeline.scheduler_config)(
            **{**pipeline.scheduler_config.to_dict(), "algorithm_type": settings.scheduler}
        )
    embeddings = [pipeline.encode_prompt(text, settings.negative_prompt, settings.guidance > 1) for _, text in settings.timeline]
    generator = torch.Generator().manual_seed(settings.seed)
    if state.generator_state is not None:
        generator.set_state(state.generator_state)
    latent_image = starting_point(pipeline, settings, state, image, video)
    if state.context is not None:
        state.context = state.context.to(pipeline.device, pipeline.dtype)
    if state.anchor is not None:
        state.anchor = state.anchor.to(pipeline.device, pipeline.dtype)

    # 3. Chunk after chunk: denoise, decode, write, save the state.
    dropping_first_chunk = settings.drop_first_chunk and not (settings.image or settings.extend)
    written_chunks = state.frames_written // settings.frames
    progress = Progress(chunks_to_write, written_chunks)
    if not args.resume:
        state_path(args.out).unlink(missing_ok=True)  # an overwritten run's state
    writer = open_writer(args.out, settings.fps, crf=settings.crf, resume_frames=state.frames_written if args.resume else None)
    try:
        chunks = generate_latents(pipeline, settings, embeddings, state, generator, latent_image, progress.step)
        while chunks_to_write is None or written_chunks < chunks_to_write:
            latents = next(chunks)
            if not (dropping_first_chunk and state.chunk_index == 1):
                frames = pipeline.vae.decode_video(latents, frames_per_batch=settings.decode_frames)
                writer.write_chunk(to_uint8_frames(frames[0]))
                state.frames_written += settings.frames
                written_chunks += 1
                progress.chunk = written_chunks
            state.generator_state = generator.get_state()
            save_state(state_path(args.out), settings, state)
    except KeyboardInterrupt:
        print("\nstopped: the file ends at the last complete chunk; --resume continues it", file=sys.stderr)
    finally:
        writer.close()
    seconds = state.frames_written / settings.fps
    print(f"\n{args.out}: {state.frames_written} frames, {seconds:.1f} s at {settings.fps} fps, "
          f"made in {format_seconds(time.time() - started)}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
