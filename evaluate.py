"""Does the video do what the prompt says, and does it drift? Scores videos of the shapes world.

    python evaluate.py --model models/baby --chunks 100 --seeds 2            # the HELD_OUT prompts
    python evaluate.py --prompts "a red circle moving left" train --context-noise 0.1 --anchor-frame
    python evaluate.py --statistics-lock 0.5      # any drift control of video_settings.DriftControls

Each (prompt, seed) video is made as `python sample.py --prompt PROMPT --seed SEED` makes it (the
same `Settings`, `generate_latents` and decoding), chunk after chunk. Each chunk's frames go
through a detector and only running tallies survive, so memory does not grow with --chunks.
Prints a markdown table (a row per prompt, the mean over its seeds; a last row, the mean over all
videos) and one JSON line with every number.

The detector (`detect`): pixels farther from BACKGROUND than half the distance to the nearest
palette colour are the shape (specks removed). Its colour is the majority vote of the pixels'
nearest palette colours; its centroid and bounding box are taken after cutting the toroidal frame
along the widest empty band of columns and of rows, so a shape split by the edges is whole again;
its class comes from two ratios in that box (`shape_class`): an upright triangle has 1/4 of its
area in the top half (circles and squares 1/2), a square fills the box (a circle pi/4).

The numbers of one video (`VideoScore`):
    found         fraction of frames where a shape is found
    colour        fraction of frames where a shape is found and has the prompt's colour
    shape         fraction of frames where a shape is found and has the prompt's shape
    direction     fraction of chunks whose mean centroid displacement between consecutive frames
                  (wrap-aware) points the prompt's way along its larger axis, at MIN_SPEED or more
    continuity    mean centroid jump across chunk boundaries (last frame of a chunk to the first of
                  the next) / mean jump between consecutive frames inside chunks; 1 is seamless
    colour_drift  distance in RGB (0..255) between the mean shape colour of the last chunk and of
                  the first chunk; 0 is none
    size_drift    mean shape area in the last chunk / in the first chunk; 1 is none
Jumps and displacements count only pairs of frames that both have a shape; a number with nothing to
count (no pair, no shape in the first or last chunk, no motion inside chunks for continuity) is NaN
(null in JSON) and skipped by the means.
"""

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

from endless import DTYPES, Progress, VideoState, default_threads, generate_latents, resolve_device, to_uint8_frames
from pipeline import StableDiffusionXLVideoPipeline, load_checkpoint_config
from video_settings import DEFAULT_MODEL, SETTING_NAMES, Settings, add_chunk_options, check_settings
from world import BACKGROUND, COLOURS, DIRECTIONS, HELD_OUT, SHAPES

PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (colours, 3)
BACKGROUND_RGB = np.array(BACKGROUND, dtype=np.float32)  # (3,)
THRESHOLD = 0.5 * float(np.linalg.norm(PALETTE - BACKGROUND_RGB, axis=1).min())  # RGB distance from the background
SQUARE_FILL = 0.95  # a square fills its bounding box (1), a disc pi/4 (up to 0.94 when it is a few pixels wide)
MIN_AREA = 0.005  # fraction of the frame; a smaller shape is not found
MIN_SPEED = 0.01  # fraction of the frame's smaller side per frame; slower is not moving
METRICS = ("found", "colour", "shape", "direction", "continuity", "colour_drift", "size_drift")


@dataclass
class Detection:
    """The shape on one frame: found or not, and if found what it is and where."""

    found: bool
    area: int  # pixels
    colour: str | None = None
    shape: str | None = None
    centre: tuple[float, float] | None = None  # (x, y) in pixels; pixel i spans [i, i + 1), as in world.py
    mean_rgb: np.ndarray | None = None  # (3,) the mean colour of the shape's pixels, 0..255


def remove_specks(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) bool keeping the pixels with 3 or more set in their 3x3 neighbourhood (wrapping)."""
    count = sum(np.roll(mask, (dy, dx), axis=(0, 1)).astype(np.int32) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    return mask & (count >= 3)


def unwrapped_coordinates(occupied: np.ndarray) -> np.ndarray:
    """occupied: (n,) bool, which columns (or rows) of a toroidal frame hold shape pixels -> (n,) the
    coordinate of each column when the frame is cut at the widest empty band: the shape is in one piece."""
    n = len(occupied)
    index = np.flatnonzero(occupied)  # (k,)
    gaps = np.diff(np.append(index, index[0] + n))  # (k,) distance to the next occupied column, circularly
    start = index[(gaps.argmax() + 1) % len(index)]  # the first occupied column after the widest gap
    return start + (np.arange(n) - start) % n  # (n,)


def detect(frame) -> Detection:
    """frame: (H, W, 3) RGB in 0..255 (uint8 or float) -> the shape on it, if any."""
    rgb = np.asarray(frame, dtype=np.float32)
    mask = remove_specks(np.linalg.norm(rgb - BACKGROUND_RGB, axis=-1) > THRESHOLD)  # (H, W)
    area = int(mask.sum())
    if area < MIN_AREA * mask.size:
        return Detection(found=False, area=area)
    pixels = rgb[mask]  # (area, 3)
    nearest = np.linalg.norm(pixels[:, None] - PALETTE, axis=-1).argmin(axis=1)  # (area,)
    colour = list(COLOURS)[np.bincount(nearest, minlength=len(COLOURS)).argmax()]
    rows, columns = np.nonzero(mask)  # (area,) each
    x = unwrapped_coordinates(mask.any(axis=0))[columns]  # (area,)
    y = unwrapped_coordinates(mask.any(axis=1))[rows]  # (area,)
    shape = shape_class(x, y)
    centre = ((x.mean() + 0.5) % mask.shape[1], (y.mean() + 0.5) % mask.shape[0])
    return Detection(True, area, colour, shape, (float(centre[0]), float(centre[1])), pixels.mean(axis=0))


def shape_class(x: np.ndarray, y: np.ndarray) -> str:
    """x, y: (area,) the unwrapped coordinates of a shape's pixels -> "triangle" if less than 3/8 of
    its area lies in the top half of its bounding box (an upright triangle has 1/4 there, a circle or
    a square 1/2), else "square" if it fills SQUARE_FILL of the box or more, else "circle"."""
    width, height = np.ptp(x) + 1, np.ptp(y) + 1
    row = y - y.min() + 0.5  # (area,) pixel centres from the top of the box
    top = ((row < height / 2).sum() + 0.5 * (row == height / 2).sum()) / len(y)
    if top < 3 / 8:
        return "triangle"
    return "square" if len(x) >= SQUARE_FILL * width * height else "circle"


def displacement(start, end, size) -> tuple[float, float]:
    """(x, y) -> (x, y) on a toroidal frame of size (W, H): the shorter way round, per axis."""
    return tuple((b - a + n / 2) % n - n / 2 for a, b, n in zip(start, end, size))


def steps_between(detections: list[Detection], size) -> list[tuple[float, float]]:
    """Centroid displacements (dx, dy) between consecutive frames that both have a shape."""
    return [displacement(a.centre, b.centre, size) for a, b in zip(detections, detections[1:]) if a.found and b.found]


def direction(detections: list[Detection], size) -> str | None:
    """The way the shape moves over consecutive frames of size (W, H): the larger axis and sign of
    the mean displacement; None with fewer than two frames with a shape, or below MIN_SPEED."""
    steps = steps_between(detections, size)
    if not steps:
        return None
    dx, dy = np.mean(steps, axis=0)
    if max(abs(dx), abs(dy)) < MIN_SPEED * min(size):
        return None
    unit = (np.sign(dx), 0) if abs(dx) >= abs(dy) else (0, np.sign(dy))
    return next(name for name, step in DIRECTIONS.items() if step == unit)


def appearance(detections: list[Detection]) -> tuple[np.ndarray, float] | None:
    """The mean shape colour (3,) and mean area over the frames with a shape; None if there are none."""
    found = [d for d in detections if d.found]
    if not found:
        return None
    return np.mean([d.mean_rgb for d in found], axis=0), float(np.mean([d.area for d in found]))


def add_jumps(tally: list, steps: list[tuple[float, float]]) -> list:
    """[sum, count] of jump lengths, plus the lengths of `steps` (dx, dy)."""
    return [tally[0] + sum(math.hypot(dx, dy) for dx, dy in steps), tally[1] + len(steps)]


class VideoScore:
    """Running tallies over one video that should show a `colour` `shape` moving `direction`, fed
    chunk by chunk; it keeps a fixed handful of numbers, whatever the number of chunks."""

    def __init__(self, colour: str, shape: str, direction: str):
        self.expected = (colour, shape, direction)
        self.frames = self.found = self.right_colour = self.right_shape = 0
        self.chunks = self.right_direction = 0
        self.inside = [0.0, 0]  # [sum, count] of centroid jumps between consecutive frames of a chunk
        self.boundary = [0.0, 0]  # [sum, count] of centroid jumps from a chunk's last frame to the next one's first
        self.previous: Detection | None = None  # the last frame of the previous chunk
        self.first = self.last = None  # appearance() of the first and of the latest chunk

    def add_chunk(self, frames: np.ndarray) -> None:
        """frames: (frames, H, W, 3) RGB in 0..255, the next chunk of the video."""
        detections = [detect(frame) for frame in frames]
        size = (frames.shape[2], frames.shape[1])  # (W, H)
        colour, shape, way = self.expected
        self.frames += len(detections)
        self.found += sum(d.found for d in detections)
        self.right_colour += sum(d.colour == colour for d in detections)
        self.right_shape += sum(d.shape == shape for d in detections)
        self.right_direction += direction(detections, size) == way
        self.inside = add_jumps(self.inside, steps_between(detections, size))
        if self.previous is not None:
            self.boundary = add_jumps(self.boundary, steps_between([self.previous, detections[0]], size))
        self.previous = detections[-1]
        self.last = appearance(detections)
        self.first = self.last if self.chunks == 0 else self.first
        self.chunks += 1

    def result(self) -> dict[str, float]:
        """The numbers of the module docstring, NaN where there is nothing to count."""
        def mean(tally):
            return tally[0] / tally[1] if tally[1] else math.nan

        drift = self.first is not None and self.last is not None
        return {
            "found": self.found / self.frames,
            "colour": self.right_colour / self.frames,
            "shape": self.right_shape / self.frames,
            "direction": self.right_direction / self.chunks,
            "continuity": mean(self.boundary) / mean(self.inside) if mean(self.inside) else math.nan,
            "colour_drift": float(np.linalg.norm(self.last[0] - self.first[0])) if drift else math.nan,
            "size_drift": self.last[1] / self.first[1] if drift else math.nan,
        }


def parse_caption(text: str) -> tuple[str, str, str]:
    """"a red circle moving left" -> ("red", "circle", "left"); ValueError for anything else."""
    match = re.fullmatch(r"a (\w+) (\w+) moving (\w+)", text.strip())
    if not match or match[1] not in COLOURS or match[2] not in SHAPES or match[3] not in DIRECTIONS:
        raise ValueError(f"--prompts {text!r}: give held-out, train, or a caption 'a COLOUR SHAPE moving DIRECTION' "
                         f"with a colour of {list(COLOURS)}, a shape of {list(SHAPES)}, a direction of {list(DIRECTIONS)}")
    return match[1], match[2], match[3]


def resolve_prompts(values: list[str]) -> list[tuple[str, str, str]]:
    """--prompts values ("held-out", "train", or captions) -> (colour, shape, direction), in order, once each."""
    every = [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]
    groups = {"held-out": [c for c in every if c in HELD_OUT], "train": [c for c in every if c not in HELD_OUT]}
    combinations = [c for value in values for c in groups.get(value) or [parse_caption(value)]]
    return list(dict.fromkeys(combinations))


def caption(combination: tuple[str, str, str]) -> str:
    return "a {} {} moving {}".format(*combination)


@torch.no_grad()
def score_video(pipeline, settings: Settings, chunks: int) -> dict[str, float]:
    """Make the video of `settings` (one prompt, its seed) for `chunks` chunks and score it."""
    text = settings.timeline[0][1]
    embeddings = [pipeline.encode_prompt(text, settings.negative_prompt, settings.guidance > 1)]
    generator = torch.Generator().manual_seed(settings.seed)
    score, progress = VideoScore(*parse_caption(text)), Progress(chunks, 0)
    stream = generate_latents(pipeline, settings, embeddings, VideoState(), generator, callback=progress.step)
    for index in range(chunks):
        video = pipeline.vae.decode_video(next(stream), frames_per_batch=settings.decode_frames)  # (1, 3, f, H, W)
        score.add_chunk(to_uint8_frames(video[0]))
        progress.chunk = index + 1
    print(file=sys.stderr)
    return score.result()


def mean_over(results: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over videos, skipping NaN (NaN if all are)."""
    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    return {name: mean([result[name] for result in results]) for name in METRICS}


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """{row name: {metric: value}} -> a markdown table, a row per name."""
    lines = ["| prompt | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{row[m]:.3f}" for m in METRICS) + " |" for name, row in rows.items()]
    return "\n".join(lines)


def without_nan(value):
    """A copy of nested dicts of numbers with NaN as None (null in JSON)."""
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", nargs="+", default=["held-out"],
                        help='"held-out" (world.HELD_OUT), "train" (every other combination), or captions like "a red circle moving left"')
    parser.add_argument("--seeds", type=int, default=2, help="videos per prompt, with seeds 0 .. SEEDS - 1")
    parser.add_argument("--chunks", type=int, default=100, help="chunks per video")
    add_chunk_options(parser)
    return parser.parse_args(argv)


def settings_for(args: argparse.Namespace, text: str, seed: int) -> Settings:
    """sample.py's Settings for one video; options not given take the model's or sample.py's defaults."""
    model = args.model or str(DEFAULT_MODEL)
    config = load_checkpoint_config(model)
    given = {name: value for name, value in vars(args).items() if name in SETTING_NAMES and value is not None}
    values = {**config.get("sample_defaults", {}), **given, "model": model}
    settings = Settings.from_options(timeline=[(0, text)], seed=seed, **values)
    check_settings(settings, config)
    return settings


def main(argv=None) -> dict:
    """Score every (prompt, seed) video; print the table and the JSON line; return what the JSON says."""
    args = parse_arguments(argv)
    combinations = resolve_prompts(args.prompts)
    if args.seeds < 1 or args.chunks < 1:
        raise ValueError(f"--seeds and --chunks must be at least 1, got {args.seeds} and {args.chunks}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads or default_threads())
    settings = [[settings_for(args, caption(c), seed) for seed in range(args.seeds)] for c in combinations]
    first = settings[0][0]
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(first.model, resolve_device(args.device), DTYPES[first.dtype])
    per_prompt, videos_scored = {}, []
    for index, videos in enumerate(settings):
        text = videos[0].timeline[0][1]
        print(f"[{index + 1}/{len(settings)}] {text}, seeds 0..{args.seeds - 1}", file=sys.stderr)
        results = [score_video(pipeline, s, args.chunks) for s in videos]
        per_prompt[text] = mean_over(results)
        videos_scored += results
    overall = mean_over(videos_scored)
    print(markdown_table({**per_prompt, "all": overall}))
    report = {"model": first.model, "chunks": args.chunks, "seeds": args.seeds, "frames": first.frames,
              "context_frames": first.context_frames, "steps": first.steps, "guidance": first.guidance,
              "height": first.height, "width": first.width, **asdict(first.drift),
              "all": overall, "prompts": per_prompt}
    print(json.dumps(without_nan(report)))
    return report


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
