"""What decides the frames of a video: `Settings`, its drift controls, their options and checks.

Only the standard library, so that sample.py can check its options and answer `--help` before
torch is imported (the drift controls' methods work on the tensors they are given, with tensor
methods alone). The chunk loop that uses these settings is in endless.py. LoRA files are read
and checked against the model here too, from their headers (formats/lora_files.py, standard library).
"""

import argparse
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from formats import lora_files
from infra.cli import of_type, on_off, option_name

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "baby"
DTYPE_NAMES = ("fp32", "fp16", "bf16")
# scheduler.SAMPLERS' own samplers, for --help without torch (tests/test_scheduler.py holds them equal);
# --scheduler takes any name of the registry, `check_sampler` checks it.
SAMPLER_NAMES = ("dpmsolver++", "sde-dpmsolver++", "euler", "euler-ancestral", "lcm", "tcd")
# scheduler.TIMESTEP_SPACINGS, for --timestep-spacing without torch (tests/test_few_step_samplers.py holds them equal).
SPACING_NAMES = ("leading", "trailing", "linspace", "lcm")


@dataclass(frozen=True)
class ChunkSpec:
    """What every chunk of a video is: its size, its frames, the context it sees and how it is
    sampled (`Settings.chunk`; endless.generate_latents and the drift controls read it)."""

    height: int  # pixels
    width: int
    frames: int  # frames per chunk
    context_frames: int  # latents of the last frames each chunk sees
    steps: int  # denoising steps per chunk
    guidance: float  # classifier-free guidance scale; 1 or less: none
    scheduler: str | None = None  # the sampler, a name of scheduler.SAMPLERS; None: the model's scheduler config's
    timestep_spacing: str | None = None  # one of SPACING_NAMES; None: the sampler's own, else the scheduler config's
    timesteps: str | None = None  # explicit training timesteps, "999,749,499,249" (`parse_timesteps`); they override steps

    @classmethod
    def from_options(cls, options: dict) -> "ChunkSpec":
        """The ChunkSpec of flat options (Settings' names, as a model's `sample_defaults` gives them);
        a field with a default may be missing; other names are ignored."""
        return cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options})

    @property
    def timestep_list(self) -> list[int] | None:
        """The explicit timesteps as ints, descending (None if not given)."""
        return None if self.timesteps is None else parse_timesteps(self.timesteps)


TIMESTEPS_SYNTAX = "distinct training timesteps in descending order, comma-separated integers >= 0, e.g. 999,749,499,249"


def parse_timesteps(text: str) -> list[int]:
    """--timesteps "999,749,499,249" -> [999, 749, 499, 249]; ValueError naming --timesteps unless
    they are distinct integers >= 0 in descending order (the model's bound is `check_settings`')."""
    items = [item.strip() for item in text.split(",")]
    shown = repr(text if len(text) <= 80 else text[:77] + "...")  # one line, however long the value
    for item in items:
        if not re.fullmatch("-?[0-9]+", item):
            raise ValueError(f"--timesteps {shown}: {item[:20]!r} is no integer; give {TIMESTEPS_SYNTAX}")
        if len(item) > 18:  # no training schedule has timesteps past 10**18 (and int() refuses 4,300 digits)
            raise ValueError(f"--timesteps {shown}: {item[:20]}... is too large; give {TIMESTEPS_SYNTAX}")
    values = [int(item) for item in items]
    if min(values) < 0 or any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"--timesteps {shown}: give {TIMESTEPS_SYNTAX}")
    return values


def control(default, help: str, low: float = -math.inf, high: float = math.inf, spans_batch: bool = False):
    """A field of DriftControls: its default (off), its --help, for a number its range [low, high],
    and whether its statistics span the batch (then a batch of videos differs from each made alone)."""
    return field(default=default, metadata={"help": help, "range": (low, high), "spans_batch": spans_batch})


@dataclass
class DriftControls:
    """The controls against drift over a long video. Each is a field (its command-line option, help
    and range come from the field, in sample.py and evaluate.py alike) and one step of the two
    methods below, which endless.generate_latents calls around every chunk with the chunk's
    `ChunkSpec` (its frames and context_frames), in this order:

    `next_context`, before a chunk: its context, from the last latents made
        1. context_matching: the context is the last chunk matched to every latent's statistics (7.)
        2. anchor_frame: the first frame replaces the oldest frame of the context
        3. empty_restart: a video whose newest context frame is empty (its spatial latent std below
           this fraction of the first frame's) starts again from the first frame: every context
           frame becomes it
        4. context_noise: Gaussian noise of this std is added to the context
    `finish_chunk`, after it: its latents, before they are decoded and kept as the next context
        5. renormalize: the original's renormalisation over every latent made so far
        6. statistics_lock: each channel's mean and std move this far toward the first chunk's
        7. anchor_frame, empty_restart: at the first chunk, the first frame is kept (in `state.anchor`);
           context_matching: the next context is kept (in `state.matched_context`)

    Every control defaults to off, so a default video is made without any of them. `state` is
    endless.VideoState: what the controls keep between chunks lives there, a field each (its
    tensors are saved, checked and moved to the device with the state's others).
    """

    context_noise: float = control(0.0, "std of noise added to the context", 0)
    anchor_frame: bool = control(False, "keep the first frame in the context")
    renormalize: bool = control(False, "the original's latent renormalisation", spans_batch=True)
    statistics_lock: float = control(
        0.0, "closed loop: move each finished chunk's per-channel latent mean and std this far, in [0, 1], "
             "toward the first chunk's", 0, 1)
    empty_restart: float = control(
        0.0, "restart a video from its first frame when its newest frame is empty: its spatial latent std "
             "below this fraction, in [0, 1], of the first frame's", 0, 1)
    context_matching: bool = control(
        False, "the earlier release's (FluxDiff's) context: each chunk's per-channel latent mean and std "
               "matched to those of every latent made so far, then clipped to [-1, 1]; the frames keep their own")

    @classmethod
    def from_options(cls, options: dict) -> "DriftControls":
        """The controls given in flat options (as a model's `sample_defaults` gives them), the others
        off; other names are ignored."""
        return cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options})

    def spanning_batch(self) -> list[str]:
        """The names of the controls that are on and whose statistics span the batch."""
        return [f.name for f in fields(self) if f.metadata["spans_batch"] and getattr(self, f.name)]

    def next_context(self, state, noise, chunk: ChunkSpec) -> "torch.Tensor | None":
        """The context of the next chunk (batch, 4, k, h, w), or None before the first; `noise(shape)`
        draws Gaussian noise from the run's generator. k is chunk.context_frames, or fewer at the first
        chunk of --image (one frame) or --extend."""
        if state.context is None:
            return None
        context = state.context
        if self.context_matching and state.matched_context is not None:
            context = state.matched_context
        if self.anchor_frame and state.anchor is not None:
            context = context.clone()
            context[:, :, :1] = state.anchor  # (b, 4, k, h, w)
        if self.empty_restart > 0 and state.anchor is not None:
            empty = is_empty(context[:, :, -1:], state.anchor, self.empty_restart)  # (b,)
            if empty.any():
                context = context.clone()
                context[empty] = state.anchor[empty].expand_as(context[empty])  # (e, 4, k, h, w)
        if self.context_noise > 0:
            context = context + self.context_noise * noise(context.shape)
        return context

    def finish_chunk(self, latents, state, chunk: ChunkSpec) -> "torch.Tensor":
        """A finished chunk's latents (batch, 4, chunk.frames, h, w), post-processed; called before
        `state.context` moves on to their last chunk.context_frames."""
        if self.renormalize:
            latents = renormalize(latents, state.latent_statistics)
        if self.statistics_lock > 0:
            latents = lock_statistics(latents, state, self.statistics_lock)
        if (self.anchor_frame or self.empty_restart > 0) and state.anchor is None:
            state.anchor = latents[:, :, :1] if state.context is None else state.context[:, :, :1]
        if self.context_matching:
            state.matched_context = match_statistics(latents, state)[:, :, -chunk.context_frames:]
        return latents


def is_empty(frame, reference, fraction: float):
    """(b,) bool: whether each video's latent frame (b, 4, 1, h, w) is empty, its spatial standard
    deviation (per channel, then averaged over channels) below `fraction` of the reference frame's
    (b, 4, 1, h, w). A plain background has little spatial variation; a shape adds it."""
    spread = lambda latents: latents.float().std(dim=(3, 4)).mean(dim=(1, 2))  # (b, 4, 1, h, w) -> (b,)
    return spread(frame) < fraction * spread(reference)


def renormalize(latents, statistics: list[float]):
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


def match_statistics(latents, state):
    """FluxDiff's context: the chunk's latents (b, 4, f, h, w) with each (video, channel)'s mean and
    std over its frames and pixels moved to those of every latent the video made so far, this chunk
    included, then clipped to [-1, 1]. The running count, sum and sum of squares per (video, channel)
    are kept in float64 in `state.latent_moments` (3, b, 4), so memory does not grow."""
    values = latents.double()
    moments = values.new_empty((3, *values.shape[:2]))  # (3, b, 4): count, sum, sum of squares
    moments[0] = values[0, 0].numel()
    moments[1] = values.sum(dim=(2, 3, 4))
    moments[2] = values.square().sum(dim=(2, 3, 4))
    if state.latent_moments is not None:
        moments += state.latent_moments.to(moments.device)
    state.latent_moments = moments.cpu()
    count, total, squares = moments
    mean = total / count  # (b, 4)
    std = ((squares - count * mean**2).clamp(min=0) / (count - 1).clamp(min=1)).sqrt()  # unbiased, as torch.std
    chunk_mean = values.mean(dim=(2, 3, 4), keepdim=True)  # (b, 4, 1, 1, 1)
    chunk_std = values.std(dim=(2, 3, 4), keepdim=True)
    target_mean, target_std = mean[..., None, None, None], std[..., None, None, None]  # (b, 4, 1, 1, 1)
    matched = (values - chunk_mean) * (target_std / (chunk_std + 1e-8)) + target_mean
    return matched.clamp(-1, 1).to(latents.dtype)


def lock_statistics(latents, state, strength: float):
    """Move each (batch, channel)'s mean and std over the chunk's frames and pixels `strength` of
    the way to the first chunk's (kept in `state.reference_statistics` at the first call)."""
    mean = latents.mean(dim=(2, 3, 4), keepdim=True)  # (b, 4, 1, 1, 1)
    std = latents.std(dim=(2, 3, 4), keepdim=True)  # (b, 4, 1, 1, 1)
    if state.reference_statistics is None:
        state.reference_statistics = latents.new_empty((2, *mean.shape))  # (2, b, 4, 1, 1, 1): mean, std
        state.reference_statistics[0], state.reference_statistics[1] = mean, std
        return latents
    reference_mean, reference_std = state.reference_statistics
    locked = (latents - mean) / (std + 1e-8) * reference_std + reference_mean
    return latents + strength * (locked - latents)


DRIFT_NAMES = tuple(f.name for f in fields(DriftControls))
LORA_SYNTAX = ("FILE, FILE:S (strength S throughout; default 1) or FILE:S@T,S@T,... (strength S from "
               "position T, a chunk index or seconds like 12s; 0 before the first T); strengths from "
               f"-{lora_files.MAX_STRENGTH:g} to {lora_files.MAX_STRENGTH:g}")
STRENGTH_RANGE = f"finite numbers from -{lora_files.MAX_STRENGTH:g} to {lora_files.MAX_STRENGTH:g}"


@dataclass
class LoraSetting:
    """One LoRA of a video (`--lora FILE[:STRENGTHS]`): its file, its strengths on the timeline, and
    the file's SHA-256 (filled in when a run starts, so that --resume refuses a changed file)."""

    path: str
    strengths: list[tuple[int, float]]  # (first chunk index, strength), sorted, the first at chunk 0
    sha256: str = ""


def parse_lora(value: str, position) -> LoraSetting:
    """`--lora` FILE, FILE:S or FILE:S@T,S@T,... -> LoraSetting; `position(T)` gives T's chunk index
    (ValueError if T is none). A FILE that exists is taken whole, ':' and all. Strengths are placed
    like the prompts: pure at their chunks, blended over --transition chunks before each (endless.
    lora_strengths); a LoRA placed first after chunk 0 is off (0) until then."""
    path, spec = value, "1"
    if ":" in value and not Path(value).is_file():
        path, _, spec = value.rpartition(":")
    if not path:
        raise ValueError(f"--lora {value!r}: give {LORA_SYNTAX}")
    placed = {}
    for item in spec.split(","):
        text, at, where = item.partition("@")
        try:
            chunk, strength = position(where.strip()) if at else 0, float(text)
        except (ValueError, OverflowError):  # OverflowError: seconds like 1e308s made a chunk index
            raise ValueError(f"--lora {value!r}: {item.strip()!r} is no strength; give {LORA_SYNTAX}") from None
        if not abs(strength) <= lora_files.MAX_STRENGTH:
            raise ValueError(f"--lora {value!r}: strengths must be {STRENGTH_RANGE}, got {text.strip()}")
        if chunk in placed:
            raise ValueError(f"--lora {value!r}: two strengths at chunk {chunk}")
        placed[chunk] = strength
    strengths = sorted(placed.items())
    return LoraSetting(path, strengths if strengths[0][0] == 0 else [(0, 0.0), *strengths])


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
    drift: DriftControls = field(default_factory=DriftControls)
    loras: list[LoraSetting] = field(default_factory=list)  # merged in this order; strengths per chunk
    drop_first_chunk: bool = False
    image: str | None = None
    image_strength: float = 0.5
    extend: str | None = None
    scheduler: str | None = None
    timestep_spacing: str | None = None
    timesteps: str | None = None  # ChunkSpec's: "999,749,499,249"; given, `check_settings` makes steps their count
    device: str | None = None  # None: cuda if there is one, else cpu (decided when the run starts)
    dtype: str = "fp32"
    decode_frames: int = 2
    refiner: bool = False  # the model's refiner over the last two chunks' latents (endless.through_refiner)
    skip_frames: int = 0  # frames not written at the start of a new video (the published recipe: 7)
    follow: str | None = None  # a file whose appended lines place prompts while the run goes on (sample.py --follow)

    @classmethod
    def from_options(cls, **values) -> "Settings":
        """Settings from flat names, as the command line, a model's `sample_defaults` and train.py give
        them: a drift control's name (`anchor_frame=True`) goes into `drift`."""
        drift = DriftControls(**{name: values.pop(name) for name in DRIFT_NAMES if name in values})
        return cls(**values, drift=drift)

    def options(self) -> dict:
        """The settings by flat name (the inverse of `from_options`), drift controls included."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "drift"}
        return {**values, **asdict(self.drift)}

    @property
    def chunk(self) -> ChunkSpec:
        """What every chunk of the video is (a None height and width are filled in by `check_settings`)."""
        return ChunkSpec.from_options(vars(self))


# Every setting's flat name but the timeline's and the LoRAs' (sample.py parses those from --prompt,
# --timeline and --lora): what the command line and `sample_defaults` may give.
SETTING_NAMES = tuple(name for name in Settings.from_options(timeline=[]).options() if name not in ("timeline", "loras"))


def add_drift_options(parser: argparse.ArgumentParser) -> None:
    """An option per DriftControls field: its name, type, help and default from the field."""
    for f in fields(DriftControls):
        default = ("on" if f.default else "off") if f.type is bool else f"{f.default:g}"
        help = f"{f.metadata['help']} (default: the model's, else {default})"
        if f.type is bool:
            parser.add_argument(option_name(f.name), action=argparse.BooleanOptionalAction, help=help)
        else:
            parser.add_argument(option_name(f.name), type=f.type, help=help)


# Named recipes: sample.py's defaults for a model, as its `sample_defaults` give them; `--recipe NAME`
# puts one over the model's. Each names the same settings, so that any one replaces any other whole.
RECIPES = {
    # The seed text's inference loop (docs/SEED_FORMAT.md), what convert_weights.py stores for a model
    # without a refiner: chunks of 4 frames, a context of 4, 50 steps, guidance 9, the model's size.
    "seed": {"frames": 4, "context_frames": 4, "steps": 50, "guidance": 9.0, "negative_prompt": "", "height": None,
             "width": None, "refiner": False, "skip_frames": 0},
    # The published FlowingFrames release's program (run.py of motexture/FlowingFrames at d408c50):
    # chunks of 6, a context of 4, 30 steps, guidance 12, its negative prompt, 1024x576, the refiner
    # over the last two chunks, the video decoded from latent 7 on.
    "flowingframes": {"frames": 6, "context_frames": 4, "steps": 30, "guidance": 12.0,
                      "negative_prompt": "low quality, grainy, bad textures", "height": 576, "width": 1024,
                      "refiner": True, "skip_frames": 7},
}


def add_chunk_options(parser: argparse.ArgumentParser) -> None:
    """The options that shape every chunk, shared by sample.py and evaluate.py. Unset (None) options
    take the model's `sample_defaults`, then Settings' defaults (sample.py's `with_model_defaults`)."""
    parser.add_argument("--model", help="checkpoint folder (convert_weights.py makes one); default: the embedded baby")
    parser.add_argument("--recipe", choices=list(RECIPES),
                        help="defaults of a named recipe over the model's own: seed (the seed text's loop) or "
                             "flowingframes (the published release's program); options given still win")
    parser.add_argument("--frames", type=int, help=f"frames per chunk (default: the model's, else {Settings.frames})")
    parser.add_argument("--context-frames", type=int,
                        help=f"latents of the last frames each chunk sees (default: the model's, else {Settings.context_frames})")
    parser.add_argument("--steps", "--num-inference-steps", dest="steps", type=int,
                        help=f"denoising steps per chunk (default: the model's, else {Settings.steps})")
    parser.add_argument("--guidance", "--guidance-scale", dest="guidance", type=float,
                        help=f"classifier-free guidance scale, >= 0, 1 or less: none (default: the model's, else {Settings.guidance:g})")
    parser.add_argument("--height", type=int, help="pixels (default: the model's)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's)")
    parser.add_argument("--scheduler", metavar="SAMPLER",
                        help=f"the sampler: {', '.join(SAMPLER_NAMES)} (default: the model's, else its scheduler config's)")
    parser.add_argument("--timestep-spacing", choices=list(SPACING_NAMES),
                        help="which training timesteps --steps samples at; lcm: LCM's (default: the model's, else "
                             "the sampler's own for lcm and tcd, else the scheduler config's)")
    parser.add_argument("--timesteps", metavar="T,T,...",
                        help=f"sample at these training timesteps, in place of --steps and the spacing: {TIMESTEPS_SYNTAX}")
    parser.add_argument("--refiner", type=on_off, metavar="on|off",
                        help="refine the last two chunks' latents after every chunk with the model's refiner, as the "
                             "published release does; a frame is final once no later chunk changes it "
                             "(default: on when the model has one)")
    add_drift_options(parser)
    parser.add_argument("--decode-frames", type=int, help=f"frames the VAE decodes at a time (default {Settings.decode_frames})")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: half the cores this process may use, fewer on a busy "
                             "machine, at least 1; more threads than idle cores make torch many times slower)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if there is one, else cpu)")
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), help=f"default {Settings.dtype}")


def check_settings(settings: Settings, model_config: dict | None = None) -> None:
    """Every check that needs no model weights; ValueError naming the option.

    With `model_config` (a checkpoint's config.json), also fills in a None height and width with
    the model's size and checks that the VAE can take them. Explicit --timesteps set the steps to
    their count.
    """
    if settings.timesteps is not None:
        settings.steps = len(parse_timesteps(settings.timesteps))
    positive = {"--frames": settings.frames, "--context-frames": settings.context_frames, "--steps": settings.steps,
                "--decode-frames": settings.decode_frames}
    for option, value in positive.items():
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    if settings.context_frames > settings.frames:
        raise ValueError(
            f"--context-frames {settings.context_frames} is more than the {settings.frames} frames a chunk makes"
        )
    ranges = {"--guidance": (settings.guidance, 0, math.inf), "--image-strength": (settings.image_strength, 0, 1),
              "--fps": (settings.fps, 0.01, 1000)}
    ranges |= {option_name(f.name): (getattr(settings.drift, f.name), *f.metadata["range"])
               for f in fields(DriftControls) if f.type is float}
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
    if settings.skip_frames < 0:
        raise ValueError(f"--skip-frames must be >= 0, got {settings.skip_frames}")
    if settings.dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype must be one of {list(DTYPE_NAMES)}, got {settings.dtype!r}")
    if settings.image and settings.extend:
        raise ValueError("give --image or --extend, not both")
    if settings.drop_first_chunk and (settings.refiner or settings.skip_frames > 0):
        raise ValueError(f"--drop-first-chunk is not taken with {'--refiner on' if settings.refiner else '--skip-frames'} "
                         f"(from the options, the recipe or the model's defaults): drop the first chunk as "
                         f"--skip-frames {settings.frames} (skip-frames = frames) instead")
    if settings.timestep_spacing is not None and settings.timestep_spacing not in SPACING_NAMES:
        raise ValueError(f"--timestep-spacing must be one of {list(SPACING_NAMES)}, got {settings.timestep_spacing!r}")
    check_lora_values(settings.loras)
    if model_config is None:
        return
    factor = 2 ** (len(model_config["vae"]["block_out_channels"]) - 1)
    default_size = model_config["unet"]["sample_size"] * factor
    settings.height = default_size if settings.height is None else settings.height
    settings.width = default_size if settings.width is None else settings.width
    for option, value in (("--height", settings.height), ("--width", settings.width)):
        if value < factor or value % factor:
            raise ValueError(f"{option} must be a positive multiple of {factor} (the VAE's downsampling), got {value}")
    training_timesteps = model_config["scheduler"]["num_train_timesteps"]
    if settings.timesteps is not None and max(parse_timesteps(settings.timesteps)) >= training_timesteps:
        raise ValueError(f"--timesteps {settings.timesteps!r}: the model has training timesteps 0 to "
                         f"{training_timesteps - 1}; give {TIMESTEPS_SYNTAX}")
    check_lora_files(settings)
    if settings.refiner and not model_config.get("refiner"):
        raise ValueError(f"--refiner on: the model {settings.model} has no refiner (convert_weights.py takes one "
                         f"from a release's refiner/ folder)")


def check_sampler(settings: Settings, samplers) -> None:
    """ValueError naming --scheduler unless settings.scheduler is None or a name in `samplers`
    (scheduler.SAMPLERS, which the caller passes once torch may be imported)."""
    if settings.scheduler is not None and settings.scheduler not in samplers:
        raise ValueError(f"--scheduler {settings.scheduler!r} is not a sampler; choose one of {', '.join(samplers)}")


def check_lora_values(loras: list[LoraSetting]) -> None:
    """ValueError unless each LoRA's strengths are finite numbers from -10 to 10 (MAX_STRENGTH), at
    sorted unique chunks from 0, and no file is given twice."""
    for lora in loras:
        chunks = [chunk for chunk, _ in lora.strengths]
        if not (chunks and chunks[0] == 0 and chunks == sorted(set(chunks))
                and all(abs(strength) <= lora_files.MAX_STRENGTH for _, strength in lora.strengths)):
            raise ValueError(f"--lora {lora.path}: strengths must be {STRENGTH_RANGE} at sorted, unique chunks "
                             f"starting at 0, got {lora.strengths}")
    if twice := lora_given_twice([lora.path for lora in loras]):
        raise ValueError(f"--lora {twice} is given twice: give each file once, with its strengths as S@T,S@T")


def lora_given_twice(paths: list[str]) -> str | None:
    """The first (sorted) of `paths` that names the same file as another, links resolved (hard links
    too: the same device and inode), or None. Merged twice, a file's update would count twice."""
    def identity(path: str):
        try:
            status = os.stat(path)
        except (OSError, ValueError):  # missing (refused later, by name), a link loop, a NUL in the name
            return path if "\0" in path else os.path.realpath(path)
        return status.st_dev, status.st_ino

    files = [identity(path) for path in paths]
    return min((path for path, file in zip(paths, files) if files.count(file) > 1), default=None)


def check_lora_files(settings: Settings) -> None:
    """ValueError naming the file for a LoRA that is missing, not safetensors, not a LoRA, of another
    kind (LoHa, LoKr, DoRA, ...), with keys matching no module of `settings.model` (listed) or shapes
    that do not fit; from the headers alone. Fills in each file's SHA-256, or, for settings from a
    state file, refuses a file that has changed since."""
    if not settings.loras:
        return
    targets, unet_config = lora_files.checkpoint_targets(settings.model)
    for lora in settings.loras:
        lora_files.read_lora_file(lora.path, targets, unet_config)
        sha256 = lora_files.file_sha256(lora.path)
        if lora.sha256 and lora.sha256 != sha256:
            raise ValueError(f"--lora {lora.path} has changed since this video was started (its SHA-256 is not "
                             f"the state file's): --resume needs the same file")
        lora.sha256 = sha256


# Settings added since STATE_VERSION 4: a state file written before lacks them, and its video was
# made as their values here make one.
ADDED_SETTINGS = {"refiner": False, "skip_frames": 0, "follow": None, "timestep_spacing": None, "timesteps": None}


def settings_from_dict(values: dict) -> Settings:
    """Settings from a state file's dict, every field present and of its type, the drift controls'
    too (TypeError otherwise); a drift control the file does not name was added after it was
    written, so the video was made without it: it is off."""
    if isinstance(values, dict):
        values = {**ADDED_SETTINGS, **values}
    check_fields(Settings, values)
    drift = values["drift"]
    if isinstance(drift, dict):
        drift = {**asdict(DriftControls()), **drift}
    check_fields(DriftControls, drift, "drift.")
    loras = values["loras"]
    if not isinstance(loras, list):
        raise TypeError("loras")
    for index, lora in enumerate(loras):
        check_fields(LoraSetting, lora, f"loras[{index}].")
        if not (isinstance(lora["strengths"], list) and all(
                isinstance(entry, tuple | list) and len(entry) == 2 and of_type(entry[0], int)
                and of_type(entry[1], float) for entry in lora["strengths"])):
            raise TypeError(f"loras[{index}].strengths")
    timeline = values["timeline"]
    if not (isinstance(timeline, list) and timeline and all(
            len(entry) == 2 and isinstance(entry[0], int) and isinstance(entry[1], str) for entry in timeline)):
        raise TypeError("timeline")
    if [entry[0] for entry in timeline] != sorted({entry[0] for entry in timeline}) or timeline[0][0] != 0:
        raise ValueError("timeline: its chunks must be sorted, unique and start at 0")
    loras = [LoraSetting(lora["path"], [tuple(entry) for entry in lora["strengths"]], lora["sha256"]) for lora in loras]
    settings = Settings(**{**values, "drift": DriftControls(**drift), "loras": loras})
    settings.timeline = [tuple(entry) for entry in settings.timeline]
    return settings


def check_fields(cls, values: dict, prefix: str = "") -> None:
    """TypeError unless `values` has exactly the fields of the dataclass `cls`, each of its type
    (the timeline, the nested drift controls and LoRAs and their strengths are checked by the caller)."""
    if not isinstance(values, dict) or sorted(values) != sorted(f.name for f in fields(cls)):
        raise TypeError(f"its settings do not have the fields of {prefix}{cls.__name__}")
    for f in fields(cls):
        if f.name not in ("timeline", "drift", "loras", "strengths") and not of_type(values[f.name], f.type):
            raise TypeError(prefix + f.name)
