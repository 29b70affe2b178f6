"""Endless generation as a library: the chunk loop, the state between chunks and its file.

A video is made chunk after chunk; between chunks only the context (the last `context_frames`
latents), what the drift controls keep (the anchor frame, statistics) and the random state survive,
so memory does not grow with the length of the video. `VideoState` is all of it; with the `Settings`
it is saved after every chunk, so a run resumes exactly. sample.py is the command line around this
module; `Progress` and `default_threads` serve it and evaluate.py alike.
"""

import fcntl
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from formats.lora import TEXT_COMPONENTS
from pipeline import fsync, randn
from text import PromptEmbeddings
from infra.video_io import process_alive
from video_settings import Settings, check_settings, settings_from_dict

STATE_VERSION = 4  # 4: settings["loras"]; 3: the drift controls nested in settings["drift"]; reference_statistics


@dataclass
class VideoState:
    """What survives between chunks: small, and all that --resume needs besides the settings."""

    chunk_index: int = 0  # chunks made so far (written or dropped)
    frames_written: int = 0
    context: torch.Tensor | None = None  # (batch, 4, context_frames, h, w), clean latents
    anchor: torch.Tensor | None = None  # (batch, 4, 1, h, w): the first frame, with --anchor-frame
    latent_statistics: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # count, sum, sum of squares
    reference_statistics: torch.Tensor | None = None  # (2, batch, 4, 1, 1, 1): the first chunk's channel mean, std
    generator_state: torch.Tensor | None = None


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
    parts_by_field = zip(*(embeddings for embeddings, _ in weighted))
    return PromptEmbeddings(
        *(None if parts[0] is None else sum(w * p for p, (_, w) in zip(parts, weighted)) for parts in parts_by_field)
    )


def lora_strengths(settings: Settings, chunk: int) -> list[float]:
    """Each of `settings.loras`' strength at `chunk`: its placed strengths blended over the
    `transition` chunks before each place, as `prompt_weights` blends prompts (pure at their places)."""
    return [sum(lora.strengths[entry][1] * weight for entry, weight in prompt_weights(lora.strengths, chunk, settings.transition))
            for lora in settings.loras]


def load_loras(pipeline, settings: Settings, chunk: int = 0) -> None:
    """Merge `settings.loras` into the pipeline at their strengths at `chunk` (where a run starts or
    resumes). The original weights are kept (on the CPU) only if the timeline changes a strength."""
    if settings.loras:
        changing = any(len({strength for _, strength in lora.strengths}) > 1 for lora in settings.loras)
        pipeline.load_loras([lora.path for lora in settings.loras], lora_strengths(settings, chunk), changing)


def encode_timeline(pipeline, settings: Settings) -> list[PromptEmbeddings]:
    """The embeddings of every prompt of the timeline, in its order."""
    return pipeline.encode_prompts([text for _, text in settings.timeline], settings.negative_prompt,
                                   settings.guidance > 1)


def generate_latents(pipeline, settings: Settings, embeddings: list[PromptEmbeddings], state: VideoState,
                     generator, latent_image=None, callback=None, on_chunk=None):
    """Yield the latents of chunk after chunk (batch, 4, frames, h, w), updating `state` before each.

    The drift controls (`settings.drift`) make each chunk's context and post-process each finished
    chunk, in the order DriftControls' docstring lists. Each chunk's LoRA strengths
    (`lora_strengths`) are merged before it (`load_loras` merged the settings' LoRAs); when they
    change a text encoder, the prompts are encoded again. callback(step, steps): after every
    denoising step. on_chunk(index, context, embeddings): before every chunk, with what the chunk is
    made from (its context, None for the first, and its prompt embeddings).
    """
    noise = lambda shape: randn(shape, generator, state.context.device, state.context.dtype)
    if settings.loras and (pipeline.loras is None or pipeline.loras.paths != [lora.path for lora in settings.loras]):
        raise ValueError("the pipeline does not hold settings.loras: merge them first with endless.load_loras")
    while True:
        if settings.loras:
            changed = pipeline.loras.set_strengths(lora_strengths(settings, state.chunk_index))
            if changed & TEXT_COMPONENTS:
                embeddings = encode_timeline(pipeline, settings)
        weights = prompt_weights(settings.timeline, state.chunk_index, settings.transition)
        first = state.chunk_index == 0
        chunk_embeddings = mix_embeddings([(embeddings[entry], weight) for entry, weight in weights])
        context = settings.drift.next_context(state, noise)
        if on_chunk is not None:
            on_chunk(state.chunk_index, context, chunk_embeddings)
        latents = pipeline(
            prompt_embeds=chunk_embeddings,
            height=settings.height,
            width=settings.width,
            num_frames=settings.frames,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            generator=generator,
            previous_latents=context,
            latent_image=latent_image if first else None,
            conditioning_strength=settings.image_strength if first and latent_image is not None else 0.0,
            output_type="latent",
            callback=callback,
        )
        latents = settings.drift.finish_chunk(latents, state)
        previous = latents if state.context is None else torch.cat([state.context, latents], dim=2)
        state.context = previous[:, :, -settings.context_frames:].clone()  # (b, 4, k, h, w)
        state.chunk_index += 1
        yield latents


def to_uint8_frames(video: torch.Tensor):
    """(3, frames, H, W) in [-1, 1] -> numpy uint8 (frames, H, W, 3)."""
    return ((video.float() / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(1, 2, 3, 0).cpu().numpy()


def starting_point(pipeline, state: VideoState, image=None, video=None):
    """Encode an image (first context and first chunk's start) or a video's last frames (first
    context) into `state`; returns the latent image (1, 4, 1, h, w), or None."""
    if image is not None:
        latents = pipeline.vae.encode_video(image[None, :, None].to(pipeline.device, pipeline.dtype))
        state.context = latents  # (1, 4, 1, h, w)
        return latents
    if video is not None:
        state.context = pipeline.vae.encode_video(video[None].to(pipeline.device, pipeline.dtype))  # (1, 4, k, h, w)
    return None


# The state file: replaced atomically after every chunk.


def state_path(out: str) -> Path:
    """The state file of the output `out` (a file or a folder): `OUT.state.pt` next to it."""
    return Path(str(out).rstrip("/") + ".state.pt")


def save_state(path: Path, settings: Settings, state: VideoState, pending_output: str | None = None) -> None:
    """Replace the state file atomically and durably: a crash or a full disk leaves the old one or
    the new one, never half of one, and no temporary file.

    pending_output: the temporary file or folder that is about to replace the output (see
    `finish_pending_output`), recorded so that a crash between the two renames can be completed.
    """
    saved = {"version": STATE_VERSION, "settings": asdict(settings), "state": dict(vars(state)),
             "pending_output": pending_output}
    replace_file(path, lambda file: torch.save(saved, file))


def restore_state(path: Path, data: bytes | None) -> None:
    """Put back the bytes a state file had before (None: there was none), atomically; if that
    fails, remove it rather than leave a state file that describes another video."""
    try:
        if data is None:
            path.unlink(missing_ok=True)
        else:
            replace_file(path, lambda file: file.write(data))
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def replace_file(path: Path, write) -> None:
    """Replace `path` with what `write(file)` writes, atomically and durably: a crash or a full disk
    leaves the old file or the new one, never half of one, and no temporary file."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        fsync(path.parent)  # the rename, durable
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def remove_stale_state_temporaries(path: Path) -> None:
    """Remove `STATE.PID.tmp` files left by runs that were killed while saving (their process is gone)."""
    for stale in path.parent.glob(f"{path.name}.*.tmp"):
        pid = stale.name[len(path.name) + 1 : -len(".tmp")]
        if pid.isdigit() and not process_alive(int(pid)):
            stale.unlink(missing_ok=True)


def load_state(path: Path) -> tuple[Settings, VideoState, str | None]:
    """(settings, state, pending output) from a state file; ValueError naming it if it is missing,
    truncated, edited or of another version."""
    if not path.is_file():
        raise ValueError(f"--resume: no state file {path} (it is written next to --out after every chunk)")
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise ValueError(f"--resume: the state file {path} is damaged ({type(error).__name__}); "
                         f"start again with --overwrite") from None
    if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION:
        version = saved.get("version") if isinstance(saved, dict) else None
        raise ValueError(f"--resume: {path} has state version {version!r}, expected {STATE_VERSION}")
    try:
        settings = settings_from_dict(saved["settings"])
        check_settings(settings)  # its values too: an edited --guidance -1 is refused here, naming the file
        state = state_from_dict(saved["state"])
        pending = saved.get("pending_output")
        if pending is not None and not isinstance(pending, str):
            raise TypeError("pending_output")
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"--resume: the state file {path} is damaged or edited ({error})") from None
    return settings, state, pending


def state_from_dict(values: dict) -> VideoState:
    """VideoState from a state file's dict, its counts and tensors checked."""
    names = [f.name for f in fields(VideoState)]
    if not isinstance(values, dict) or sorted(values) != sorted(names):
        raise TypeError(f"its state does not have the fields {names}")
    state = VideoState(**values)
    if not (isinstance(state.chunk_index, int) and isinstance(state.frames_written, int)
            and 0 <= state.frames_written and 0 <= state.chunk_index):
        raise TypeError("chunk_index / frames_written")
    for name in ("context", "anchor", "reference_statistics", "generator_state"):
        value = getattr(state, name)
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(name)
    if state.chunk_index > 0 and state.context is None:
        raise TypeError("context")
    return state


def finish_pending_output(pending: str | None, out: str) -> None:
    """Complete a replacement of `out` that a crash interrupted.

    A new run saves its state (naming the temporary that holds its first chunk) just before the
    temporary replaces the old output. If the temporary is still there, the crash came between the
    two: the temporary is the output the state file describes, so it is moved into place now.
    """
    if pending is not None and os.path.lexists(pending):
        os.replace(pending, os.path.abspath(out))
        fsync(Path(os.path.abspath(out)).parent)


# The output's lock: one run per output at a time.


class OutputLock:
    """An exclusive lock on an output for a whole run, as a context manager: the file
    `OUT.sample.lock`, locked with flock and holding its owner's process id.

    The kernel releases a flock when its process ends, however it ends, so the lock of a killed run
    never blocks the next one; the file is removed when the lock is released. A file of that name
    that holds anything but a process id is someone else's: it is refused, never overwritten.
    """

    def __init__(self, out: str):
        self.out = out
        self.path = Path(str(out).rstrip("/") + ".sample.lock")
        self.descriptor = None

    def __enter__(self) -> "OutputLock":
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not os.pread(descriptor, 64, 0).strip().isdigit() and os.fstat(descriptor).st_size:
                os.close(descriptor)
                raise ValueError(f"--out {self.out}: {self.path} exists and is not a lock of sample.py "
                                 f"(it holds no process id); move it away")
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "another process"
                os.close(descriptor)
                raise ValueError(f"--out {self.out} is being written by process {holder} (it holds {self.path}); "
                                 f"wait for that run to end or stop it") from None
            try:  # the last owner may have removed the file between our open and our lock
                if os.stat(self.path).st_ino == os.fstat(descriptor).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(descriptor)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self.descriptor = descriptor
        return self

    def __exit__(self, *exception) -> None:
        self.path.unlink(missing_ok=True)  # while the lock is still held
        os.close(self.descriptor)


# The device, before a model is loaded (infra/memory.py estimates the memory a chunk needs).


def resolve_device(name: str | None) -> str:
    """The device to run on: `name`, or cuda if there is one, else cpu; ValueError if it is not there."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU on this machine; use --device cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return name


# Running: threads and progress (sample.py and evaluate.py).


def default_threads() -> int:
    """Half the cores this process may use, fewer when the machine is busy (its load average), at
    least 1: torch's default (every core) spins threads against other work and ran the quick start
    10 times slower on a busy 2-core machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    idle = cores - round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else cores
    return max(1, min(cores // 2, idle))


class Progress:
    """Progress on stderr: a live line (chunk, step, seconds per chunk, ETA) in a terminal, else a
    line per chunk."""

    def __init__(self, total_chunks: int | None, first_chunk: int, live: bool | None = None):
        self.total, self.first, self.start = total_chunks, first_chunk, time.time()
        self.chunk = first_chunk
        self.live = sys.stderr.isatty() if live is None else live

    def line(self, step: int, steps: int) -> str:
        done = self.chunk - self.first
        elapsed = time.time() - self.start
        per_chunk = elapsed / (done + step / steps) if done or step else 0.0
        total = f"/{self.total}" if self.total else ""
        eta = f" | ETA {format_seconds(per_chunk * (self.total - self.chunk - step / steps))}" if self.total else ""
        return f"chunk {self.chunk + 1}{total} step {step}/{steps} | {per_chunk:.1f} s/chunk{eta}"

    def step(self, step: int, steps: int) -> None:
        if self.live:
            print(f"\r{self.line(step, steps)}   ", end="", file=sys.stderr, flush=True)
        elif step == steps:
            print(self.line(step, steps), file=sys.stderr, flush=True)


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(max(seconds, 0)), 60)
    return f"{minutes}m{seconds:02d}s"
