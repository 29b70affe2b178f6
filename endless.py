"""Endless generation as a library: the chunk loop, the state between chunks and its file.

A video is made chunk after chunk; between chunks only the context (the last `context_frames`
latents), what the drift controls keep (the anchor frame, statistics) and the random state survive,
so memory does not grow with the length of the video. `VideoState` is all of it; with the `Settings`
it is saved after every chunk, so a run resumes exactly. `generate_latents` takes what every chunk is
(`ChunkSpec`), the drift controls and the prompts along the video (`Prompts`); `decoded_chunks` and
`frames_of` are the one way from a chunk's latents to frames. sample.py is the command line around this
module; the run's machinery around the loop (the output's lock, the device, progress) is infra/run_state.py.
"""

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from formats.lora import TEXT_COMPONENTS
from infra.files import atomic_file, fsync
from pipeline import randn
from text import PromptEmbeddings
from video_settings import (DTYPE_NAMES, ChunkSpec, DriftControls, LoraSetting, Settings, check_settings,
                            settings_from_dict)

STATE_VERSION = 4  # 4: settings["loras"]; 3: the drift controls nested in settings["drift"]; reference_statistics
# The fields of VideoState every state file of STATE_VERSION has; a field added since may be missing
# from a file (it takes its default), so a new field needs no new version.
VERSION_FIELDS = ("chunk_index", "frames_written", "context", "anchor", "latent_statistics", "reference_statistics",
                  "generator_state")
TENSOR = torch.Tensor | None  # the type of VideoState's tensor fields


@dataclass
class VideoState:
    """What survives between chunks: small, and all that --resume needs besides the settings.

    Its tensors are the fields of type `torch.Tensor | None` (`tensors`, `to`): a drift control's
    new state is one such field, with a default, and is saved, checked and moved with the others.
    """

    chunk_index: int = 0  # chunks made so far (written or dropped)
    frames_written: int = 0
    context: torch.Tensor | None = None  # (batch, 4, context_frames, h, w), clean latents
    anchor: torch.Tensor | None = None  # (batch, 4, 1, h, w): the first frame, with --anchor-frame
    latent_statistics: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # count, sum, sum of squares
    reference_statistics: torch.Tensor | None = None  # (2, batch, 4, 1, 1, 1): the first chunk's channel mean, std
    generator_state: torch.Tensor | None = field(default=None, metadata={"on_cpu": True})  # torch.Generator's bytes
    # How the frames are decoded (sample.py's --vae-dtype and --vae-tiles as run): it changes their
    # pixels, not the latents. None: not recorded (a state file from before they were; sample.py
    # then takes what that version did).
    vae_dtype: str | None = None  # fp32, fp16 or bf16
    vae_tiles: bool | None = None  # decoded in tiles, where a frame is more than one tile
    # With a refiner: the latents it may still change, (batch, 4, <= 2 * frames, h, w), the newest
    # last, and how many latents the video has made (`through_refiner`).
    refiner_window: torch.Tensor | None = None
    latents_made: int = 0
    # With --context-matching: the next context, and every latent's count, sum and sum of squares
    # per (video, channel), (3, batch, 4) float64 (video_settings.match_statistics).
    matched_context: torch.Tensor | None = None
    followed_bytes: int = 0  # with sample.py --follow: how much of the followed file has been read
    followed_file: list[int] | None = None  # [st_dev, st_ino] of that file: another one is read from its start
    latent_moments: torch.Tensor | None = field(default=None, metadata={"on_cpu": True})

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """Every tensor field's value by name (None where there is none yet)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.type == TENSOR}

    def to(self, device, dtype: torch.dtype) -> "VideoState":
        """Move the tensors of latents (every tensor field but the generator's state, which stays on
        the CPU) to `device` and `dtype`, in place; returns the state."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == TENSOR and not f.metadata.get("on_cpu") and value is not None:
                setattr(self, f.name, value.to(device, dtype))
        return self


def prompt_weights(timeline: list[tuple[int, object]], chunk: int, transition: int) -> list[tuple[int, float]]:
    """Which timeline entries (first chunk, anything) make the embeddings of `chunk`: [(entry, weight)].

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


def lora_strengths(loras: list[LoraSetting], chunk: int, transition: int) -> list[float]:
    """Each LoRA's strength at `chunk`: its placed strengths blended over the `transition` chunks
    before each place, as `prompt_weights` blends prompts (pure at their places)."""
    return [sum(lora.strengths[entry][1] * weight for entry, weight in prompt_weights(lora.strengths, chunk, transition))
            for lora in loras]


def load_loras(pipeline, settings: Settings, chunk: int = 0) -> None:
    """Merge `settings.loras` into the pipeline at their strengths at `chunk` (where a run starts or
    resumes). The original weights are kept (on the CPU) only if the timeline changes a strength."""
    if settings.loras:
        changing = any(len({strength for _, strength in lora.strengths}) > 1 for lora in settings.loras)
        strengths = lora_strengths(settings.loras, chunk, settings.transition)
        pipeline.load_loras([lora.path for lora in settings.loras], strengths, changing)


@dataclass
class Prompts:
    """The prompts along a video: each one's embeddings placed at its first chunk and blended over
    the `transition` chunks before each place (`prompt_weights`), and the LoRAs, whose placed
    strengths blend the same way. With LoRAs, `encode()` gives the prompts' embeddings again, in
    order: a strength that changes a text encoder changes them."""

    placed: list[tuple[int, PromptEmbeddings]]  # (first chunk, embeddings), sorted, the first at chunk 0
    transition: int = 0
    loras: list[LoraSetting] = field(default_factory=list)  # merged into the pipeline first (`load_loras`)
    encode: Callable[[], list[PromptEmbeddings]] | None = None

    def at(self, pipeline, chunk: int) -> PromptEmbeddings:
        """The embeddings of `chunk`, once the pipeline's LoRAs are set to their strengths there."""
        if self.loras:
            changed = pipeline.loras.set_strengths(lora_strengths(self.loras, chunk, self.transition))
            if changed & TEXT_COMPONENTS:
                self.placed = list(zip([start for start, _ in self.placed], self.encode()))
        weights = prompt_weights(self.placed, chunk, self.transition)
        return mix_embeddings([(self.placed[entry][1], weight) for entry, weight in weights])


def timeline_prompts(pipeline, settings: Settings) -> Prompts:
    """The prompts of `settings`' timeline, encoded (then the text encoders leave the device), with
    its transition and LoRAs; merge the LoRAs first (`load_loras`): the text encoders have them too."""
    encode = lambda: pipeline.encode_prompts([text for _, text in settings.timeline], settings.negative_prompt,
                                             settings.guidance > 1)  # the timeline as it is then (`place_prompt`)
    placed = list(zip([start for start, _ in settings.timeline], encode()))
    return Prompts(placed, settings.transition, settings.loras, encode)


def place_prompt(settings: Settings, prompts: Prompts, chunk: int, text: str) -> None:
    """Put `text` on the timeline at `chunk` while a video is made (sample.py --follow): in
    `settings.timeline`, which the state file keeps, and in `prompts`, encoded with the others
    (whose embeddings come out as before). `chunk` must be free and not yet made."""
    settings.timeline = sorted([*settings.timeline, (chunk, text)])
    prompts.placed = list(zip([start for start, _ in settings.timeline], prompts.encode()))


def generate_latents(pipeline, chunk: ChunkSpec, drift: DriftControls, prompts: Prompts, state: VideoState,
                     generator, latent_image=None, image_strength: float = Settings.image_strength,
                     callback=None, on_chunk=None, refine: bool = False):
    """Yield the latents of chunk after chunk (batch, 4, chunk.frames, h, w), updating `state` before each.

    The drift controls make each chunk's context and post-process each finished chunk, in the order
    DriftControls' docstring lists. Each chunk's prompt embeddings and LoRA strengths come from
    `prompts` (`Prompts.at`). generator: a torch.Generator, or one per batch item. latent_image
    (1, 4, 1, h, w): where the first chunk starts, keeping `image_strength` of it. Every chunk is
    sampled with `chunk.scheduler` (None: the pipeline's scheduler config's sampler) at its
    timestep_spacing or explicit timesteps, here for every caller: sample.py, evaluate.py, training's
    samples and validation. callback(step, steps): after every denoising step. on_chunk(index, context, embeddings): before every chunk,
    with what the chunk is made from (its context, None for the first, and its prompt embeddings).
    refine: each chunk goes through `pipeline.refiner` over its last two chunks' latents
    (`through_refiner`), and what is yielded are the latents that left its window (fewer frames,
    none at first); the next context is taken from the refined latents, as the published loop does.
    """
    noise = lambda shape: randn(shape, generator, state.context.device, state.context.dtype)
    if prompts.loras and (pipeline.loras is None or pipeline.loras.paths != [lora.path for lora in prompts.loras]):
        raise ValueError("the pipeline does not hold the prompts' LoRAs: merge them first with endless.load_loras")
    while True:
        first = state.chunk_index == 0
        embeddings = prompts.at(pipeline, state.chunk_index)
        context = drift.next_context(state, noise, chunk)
        if on_chunk is not None:
            on_chunk(state.chunk_index, context, embeddings)
        latents = pipeline(
            prompt_embeds=embeddings,
            height=chunk.height,
            width=chunk.width,
            num_frames=chunk.frames,
            num_inference_steps=chunk.steps,
            guidance_scale=chunk.guidance,
            generator=generator,
            previous_latents=context,
            latent_image=latent_image if first else None,
            conditioning_strength=image_strength if first and latent_image is not None else 0.0,
            output_type="latent",
            callback=callback,
            sampler=chunk.scheduler,
            timestep_spacing=chunk.timestep_spacing,
            timesteps=chunk.timestep_list,
        )
        latents = drift.finish_chunk(latents, state, chunk)
        if refine:
            latents = through_refiner(pipeline.refiner, state, latents, 2 * chunk.frames)
            previous = state.refiner_window
        else:
            previous = latents if state.context is None else torch.cat([state.context, latents], dim=2)
        state.context = previous[:, :, -chunk.context_frames:].clone()  # (b, 4, k, h, w)
        state.chunk_index += 1
        yield latents


def through_refiner(refiner, state: VideoState, latents: torch.Tensor, window: int) -> torch.Tensor:
    """The published loop's refiner, streamed: a chunk's latents (b, 4, f, h, w) join the refiner's
    window (`state.refiner_window`); once the video has more than `window` latents, the window's
    last `window` are replaced by `refiner(them)`. Returns the latents that left the window, which
    no later chunk changes (b, 4, 0 to f, h, w); the window's are the video's last (`unfinished`).

    The published program refines the last `window` latents of its whole stack after every chunk
    (so the first chunk is never refined and later latents are refined twice) and decodes the
    stack at the end: writing each latent when it leaves the window gives the same frames.
    """
    stack = latents if state.refiner_window is None else torch.cat([state.refiner_window, latents], dim=2)
    state.latents_made += latents.shape[2]
    if state.latents_made > window:
        stack = torch.cat([stack[:, :, :-window], refiner(stack[:, :, -window:])], dim=2)  # (b, 4, <= window + f, h, w)
    state.refiner_window = stack[:, :, -window:]
    return stack[:, :, :max(stack.shape[2] - window, 0)]


def final_latents(state: VideoState, frames: int) -> int:
    """How many of the video's latents no later chunk changes: all of them without a refiner
    (`frames` per chunk), else those that left its window."""
    if state.refiner_window is None:
        return state.chunk_index * frames
    return state.latents_made - state.refiner_window.shape[2]


def unfinished(state: VideoState) -> torch.Tensor | None:
    """The latents still in the refiner's window (b, 4, <= window, h, w): final once the video
    ends there. None without a refiner."""
    return state.refiner_window


def decoded_chunks(pipeline, chunk: ChunkSpec, drift: DriftControls, prompts: Prompts, state: VideoState,
                   generator, decode_frames: int = 8, **options):
    """`generate_latents`' chunks as frames (`frames_of`): yields, chunk after chunk, a list of each
    batch item's frames, numpy uint8 (chunk.frames, H, W, 3). options: generate_latents'."""
    for latents in generate_latents(pipeline, chunk, drift, prompts, state, generator, **options):
        yield frames_of(pipeline, latents, decode_frames)


def frames_of(pipeline, latents: torch.Tensor, decode_frames: int = 8) -> list:
    """A chunk's latents (batch, 4, frames, h, w) -> a list of each batch item's frames, numpy uint8
    (frames, H, W, 3): decoded `decode_frames` frames at a time with the pipeline's VAE tiling and
    upcast (`pipeline.decode_video`)."""
    video = pipeline.decode_video(latents, frames_per_batch=decode_frames)  # (batch, 3, frames, H, W)
    return [to_uint8_frames(item) for item in video]


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
    with atomic_file(path) as file:
        torch.save(saved, file)


def restore_state(path: Path, data: bytes | None) -> None:
    """Put back the bytes a state file had before (None: there was none), atomically; if that
    fails, remove it rather than leave a state file that describes another video."""
    try:
        if data is None:
            path.unlink(missing_ok=True)
        else:
            with atomic_file(path) as file:
                file.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


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
    """VideoState from a state file's dict, its counts and tensors checked. It must have every field
    of VERSION_FIELDS and no unknown one; a field added to VideoState since may be missing (an older
    file) and takes its default."""
    if not isinstance(values, dict):
        raise TypeError("its state is not a dict")
    missing = [name for name in VERSION_FIELDS if name not in values]
    unknown = sorted(set(values) - {f.name for f in fields(VideoState)})
    if missing or unknown:
        raise TypeError(f"its state lacks the fields {missing} or has unknown ones {unknown}")
    state = VideoState(**values)
    counts = (state.chunk_index, state.frames_written, state.latents_made, state.followed_bytes)
    if not all(isinstance(count, int) and count >= 0 for count in counts):
        raise TypeError("chunk_index / frames_written / latents_made / followed_bytes")
    for name, value in state.tensors().items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(name)
    if not (state.vae_dtype is None or isinstance(state.vae_dtype, str) and state.vae_dtype in DTYPE_NAMES):
        raise TypeError("vae_dtype")
    if not (state.vae_tiles is None or isinstance(state.vae_tiles, bool)):
        raise TypeError("vae_tiles")
    if not (state.followed_file is None or isinstance(state.followed_file, list) and len(state.followed_file) == 2
            and all(isinstance(number, int) and number >= 0 for number in state.followed_file)):
        raise TypeError("followed_file")
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
