"""The shapes world's yardstick: what a frame shows (`detect`) and the numbers of one video
(`VideoScore`), fed chunk by chunk in constant memory. evaluate.py makes and scores videos with
them; training/validation.py scores its training samples with them.

The detector (`detect`): pixels farther from BACKGROUND than half the distance to the nearest
palette colour are the shape (specks removed). Its colour is the majority vote of the pixels'
nearest palette colours; its centroid and bounding box are taken after cutting the toroidal frame
along the widest empty band of columns and of rows, so a shape split by the edges is whole again;
its class (`shape_class`): an upright triangle's rows are skewed toward its base (a circle's and a
square's are symmetric); a square fills its box (a circle pi/4) and its corners reach farther from
its centroid (`squareness`). Both rules are exact on clean renders and hold for the softened shapes
the baby's VAE decodes (the old rules, 3/8 of the area in the box's top half for a triangle and 0.95
of the box filled for a square, took most of the baby's squares for circles).

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
    survival      1 if the video was never lost (`window` wrong chunks in a row, shapes/survival.py), else 0
Jumps and displacements count only pairs of frames that both have a shape; a number with nothing to
count (no pair, no shape in the first or last chunk, no motion inside chunks for continuity) is NaN
(null in JSON) and skipped by the means.

A video of several shapes ("a red circle moving left and a blue square moving up", `parse_scene`;
their colours are distinct) is scored by `SceneScore`: each shape is looked for by its colour
(`detect` with a colour: the pixels off the background nearest to it), so its `found` and `colour`
are the same number, and scored as a video of its own; the video's numbers are the means over its
shapes, but for `survival`: a chunk is right when it is right for every shape.
"""

import math
import re
from dataclasses import dataclass

import numpy as np

from shapes.survival import Survival
from shapes.world import BACKGROUND, COLOURS, DIRECTIONS, SHAPES

PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (colours, 3)
BACKGROUND_RGB = np.array(BACKGROUND, dtype=np.float32)  # (3,)
THRESHOLD = 0.5 * float(np.linalg.norm(PALETTE - BACKGROUND_RGB, axis=1).min())  # RGB distance from the background
# The mean distance from the centroid of the outermost 5% of a shape's area, over the radius of a disc of
# the same area (numerical integration of the continuous shapes).
DISC_REACH = 0.987
TRIANGLE_SKEWNESS = -0.28  # half an upright triangle's (-2 sqrt(2) / 5); a single stray pixel moves it by about 0.05
SQUARE_REACH = 1.124
MIN_AREA = 0.005  # fraction of the frame; a smaller shape is not found
MIN_SPEED = 0.01  # fraction of the frame's smaller side per frame; slower is not moving
METRICS = ("found", "colour", "shape", "direction", "continuity", "colour_drift", "size_drift", "survival")
SCORE_COLUMNS = ("chunk", "found", "colour", "shape", "direction", "right", "alive", "colour_drift", "size_ratio")


@dataclass
class Detection:
    """The shape on one frame: found or not, and if found what it is and where."""

    found: bool
    area: int  # pixels
    colour: str | None = None
    shape: str | None = None
    centre: tuple[float, float] | None = None  # (x, y) in pixels; pixel i spans [i, i + 1), as in shapes/world.py
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


def detect(frame, colour: str | None = None) -> Detection:
    """frame: (H, W, 3) RGB in 0..255 (uint8 or float) -> the shape on it, if any: its pixels off the
    background, or with a `colour` (one shape among others) those of them nearest to that colour."""
    rgb = np.asarray(frame, dtype=np.float32)
    foreground = np.linalg.norm(rgb - BACKGROUND_RGB, axis=-1) > THRESHOLD  # (H, W)
    if colour is not None:
        nearest = np.linalg.norm(rgb[..., None, :] - PALETTE, axis=-1).argmin(axis=-1)  # (H, W)
        foreground &= nearest == list(COLOURS).index(colour)
    mask = remove_specks(foreground)  # (H, W)
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
    """x, y: (area,) the unwrapped coordinates of a shape's pixels -> "triangle" if the skewness of its
    rows is below TRIANGLE_SKEWNESS (an upright triangle's area grows linearly toward its base: -0.566;
    a circle's or a square's is 0), else "square" if its `squareness` is 1/2 or more, else "circle"."""
    rows = y - y.mean()  # (area,)
    if (rows**3).mean() < TRIANGLE_SKEWNESS * (rows**2).mean() ** 1.5:
        return "triangle"
    return "square" if squareness(x, y) >= 0.5 else "circle"


def squareness(x: np.ndarray, y: np.ndarray) -> float:
    """x, y: (area,) a shape's pixel coordinates -> 0 for a disc, 1 for a square: the mean of two
    measures, each scaled from a disc's value (0) to a square's (1): how much of its bounding box it
    fills (a disc pi/4) and how far its outermost 5% of pixels reach from the centroid, over the radius
    of a disc of its area (DISC_REACH, SQUARE_REACH). A square with softened corners, as a VAE
    decodes one, loses some fill but keeps its reach toward the corners."""
    fill = len(x) / ((np.ptp(x) + 1) * (np.ptp(y) + 1))
    distances = np.hypot(x - x.mean(), y - y.mean())  # (area,)
    outermost = np.sort(distances)[-max(1, len(x) // 20):]
    reach = outermost.mean() / math.sqrt(len(x) / math.pi)
    return 0.5 * (fill - math.pi / 4) / (1 - math.pi / 4) + 0.5 * (reach - DISC_REACH) / (SQUARE_REACH - DISC_REACH)


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
    chunk by chunk; it keeps a fixed handful of numbers, whatever the number of chunks, and says
    for each chunk what it was (`add_chunk`'s record) and whether the video survives
    (survival.Survival with `window`). With `by_colour`, the shape is one among others of other
    colours, looked for by its colour (`detect`)."""

    def __init__(self, colour: str, shape: str, direction: str, window: int = 3, by_colour: bool = False):
        self.expected = (colour, shape, direction)
        self.by_colour = by_colour
        self.frames = self.found = self.right_colour = self.right_shape = 0
        self.chunks = self.right_direction = 0
        self.inside = [0.0, 0]  # [sum, count] of centroid jumps between consecutive frames of a chunk
        self.boundary = [0.0, 0]  # [sum, count] of centroid jumps from a chunk's last frame to the next one's first
        self.previous: Detection | None = None  # the last frame of the previous chunk
        self.first = self.last = None  # appearance() of the first and of the latest chunk
        self.survival = Survival(window)

    def add_chunk(self, frames: np.ndarray) -> dict:
        """frames: (frames, H, W, 3) RGB in 0..255, the next chunk of the video. Returns its record:
        chunk (1-based); found, colour, shape (fractions of its frames); direction (1 if it moves the
        prompt's way); right (1 if more than half of its frames show the prompt's colour and shape and
        it moves the prompt's way); alive (survival); colour_drift and size_ratio against chunk 1."""
        colour, shape, way = self.expected
        detections = [detect(frame, colour if self.by_colour else None) for frame in frames]
        size = (frames.shape[2], frames.shape[1])  # (W, H)
        counts = [sum(d.found for d in detections), sum(d.colour == colour for d in detections),
                  sum(d.shape == shape for d in detections)]
        both = sum(d.colour == colour and d.shape == shape for d in detections)
        moves = direction(detections, size) == way
        self.frames += len(detections)
        self.found, self.right_colour, self.right_shape = (a + b for a, b in zip(
            (self.found, self.right_colour, self.right_shape), counts))
        self.right_direction += moves
        self.inside = add_jumps(self.inside, steps_between(detections, size))
        if self.previous is not None:
            self.boundary = add_jumps(self.boundary, steps_between([self.previous, detections[0]], size))
        self.previous = detections[-1]
        self.last = appearance(detections)
        self.first = self.last if self.chunks == 0 else self.first
        self.chunks += 1
        right = 2 * both > len(detections) and moves
        colour_drift, size_ratio = self.drift()
        return {"chunk": self.chunks, "found": counts[0] / len(detections), "colour": counts[1] / len(detections),
                "shape": counts[2] / len(detections), "direction": int(moves), "right": int(right),
                "alive": int(self.survival.add(right)), "colour_drift": colour_drift, "size_ratio": size_ratio}

    def drift(self) -> tuple[float, float]:
        """(colour drift, size ratio) of the latest chunk against the first; NaN where either shows no shape."""
        if self.first is None or self.last is None:
            return math.nan, math.nan
        return float(np.linalg.norm(self.last[0] - self.first[0])), self.last[1] / self.first[1]

    def result(self) -> dict[str, float]:
        """The numbers of the module docstring, NaN where there is nothing to count."""
        def mean(tally):
            return tally[0] / tally[1] if tally[1] else math.nan

        colour_drift, size_drift = self.drift()
        return {
            "found": self.found / self.frames,
            "colour": self.right_colour / self.frames,
            "shape": self.right_shape / self.frames,
            "direction": self.right_direction / self.chunks,
            "continuity": mean(self.boundary) / mean(self.inside) if mean(self.inside) else math.nan,
            "colour_drift": colour_drift,
            "size_drift": size_drift,
            "survival": float(self.survival.lost_at is None),
        }


def parse_caption(text: str) -> tuple[str, str, str]:
    """"a red circle moving left" -> ("red", "circle", "left"); ValueError for anything else."""
    match = re.fullmatch(r"a (\w+) (\w+) moving (\w+)", text.strip())
    if not match or match[1] not in COLOURS or match[2] not in SHAPES or match[3] not in DIRECTIONS:
        raise ValueError(f"{text!r} is not 'a COLOUR SHAPE moving DIRECTION' with a colour of {list(COLOURS)}, "
                         f"a shape of {list(SHAPES)}, a direction of {list(DIRECTIONS)}")
    return match[1], match[2], match[3]


def parse_scene(text: str) -> tuple[tuple[str, str, str], ...]:
    """"a red circle moving left and a blue square moving up" -> (("red", "circle", "left"),
    ("blue", "square", "up")): each shape of a caption (one or several, joined by "and", of distinct
    colours); ValueError for anything else."""
    combinations = tuple(parse_caption(part) for part in re.split(r"\s+and\s+", text.strip()))
    colours = [combination[0] for combination in combinations]
    repeated = [colour for colour in colours if colours.count(colour) > 1]
    if repeated:
        raise ValueError(f"{text!r} has {colours.count(repeated[0])} {repeated[0]} shapes; the shapes of a caption "
                         f"must have distinct colours (the scorer tells them apart by colour)")
    return combinations


def caption(combination) -> str:
    """(colour, shape, direction) -> "a red circle moving left"; a tuple of them -> their captions joined by "and"."""
    if isinstance(combination[0], tuple):
        return " and ".join(caption(part) for part in combination)
    return "a {} {} moving {}".format(*combination)


def mean_skipping_nan(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def mean_over(results: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over videos, skipping NaN (NaN if all are)."""
    return {name: mean_skipping_nan([result[name] for result in results]) for name in METRICS}


class SceneScore:
    """Running tallies over one video that should show several shapes, each (colour, shape,
    direction) of `combinations` with its own colour: a VideoScore per shape (by colour), and the
    video's survival (`window`), a chunk being right when it is right for every shape."""

    def __init__(self, combinations, window: int = 3):
        self.shapes = [VideoScore(*combination, window, by_colour=True) for combination in combinations]
        self.survival = Survival(window)

    def add_chunk(self, frames: np.ndarray) -> dict:
        """frames: (frames, H, W, 3) RGB in 0..255. Returns VideoScore.add_chunk's record, each number
        the mean over the shapes (NaN skipped), but right (1 if right for every shape) and alive."""
        records = [score.add_chunk(frames) for score in self.shapes]
        right = all(record["right"] for record in records)
        record = {name: mean_skipping_nan([one[name] for one in records]) for name in SCORE_COLUMNS}
        record.update(chunk=records[0]["chunk"], right=int(right), alive=int(self.survival.add(right)))
        return record

    def result(self) -> dict[str, float]:
        """VideoScore.result's numbers, the mean over the shapes, but survival (the video's)."""
        return {**mean_over([score.result() for score in self.shapes]),
                "survival": float(self.survival.lost_at is None)}


def video_score(text: str, window: int = 3) -> VideoScore | SceneScore:
    """The score of a video of caption `text` (`parse_scene`): a VideoScore for one shape, else a SceneScore."""
    combinations = parse_scene(text)
    return VideoScore(*combinations[0], window) if len(combinations) == 1 else SceneScore(combinations, window)
