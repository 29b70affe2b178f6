"""Scores over time: survival and drift curves against chunk index, as a table and a PNG plot.

A video's chunk is "right" when more than half of its frames show the shape with the prompt's
colour and shape and the chunk moves the prompt's way (scoring.VideoScore decides). A video is
*lost* at chunk N when chunks N - window + 1 .. N are all wrong (`window` consecutive wrong chunks:
one stray chunk, a detector's slip, does not end a video; with window 1 every wrong chunk does),
and stays lost. survival(N) is the fraction of videos not lost at chunk N or before. Drift at chunk
N: the RGB distance (0..255) of the shape's mean colour from chunk 1's, and the ratio of its mean
area to chunk 1's, averaged over the videos that show a shape in both chunks.

Everything is streamed: a `Survival` is fed one chunk's right/wrong at a time and keeps two
numbers; `Curves` keeps a few sums per chunk index over all videos, never frames.
"""

import csv
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CURVE_COLUMNS = ("chunk", "videos", "survival", "right", "colour_drift", "size_ratio")
LINE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                (227, 119, 194), (127, 127, 127)]


class Survival:
    """One video's survival, fed chunk by chunk: `lost_at` is the chunk (1-based) that completed the
    first run of `window` consecutive wrong chunks, None while there is none."""

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"--survival-window must be at least 1, got {window}")
        self.window, self.wrong_run, self.chunks, self.lost_at = window, 0, 0, None

    def add(self, right: bool) -> bool:
        """The next chunk's verdict; returns whether the video is still alive after it."""
        self.chunks += 1
        self.wrong_run = 0 if right else self.wrong_run + 1
        if self.lost_at is None and self.wrong_run >= self.window:
            self.lost_at = self.chunks
        return self.lost_at is None


def survival_curve(verdicts: list[list[bool]], window: int) -> list[float]:
    """verdicts: per video, each chunk's right/wrong (all of the same length) -> survival(N) for N = 1 ..
    chunks: the fraction of videos alive after chunk N."""
    alive = np.zeros(len(verdicts[0]))
    for video in verdicts:
        survival = Survival(window)
        alive += [survival.add(right) for right in video]
    return list(alive / len(verdicts))


class Curves:
    """Per chunk index, sums over the videos of one setting: alive, right, colour drift and size ratio
    (with their counts, a drift being NaN where a chunk or chunk 1 shows no shape)."""

    def __init__(self):
        self.sums: list[list[float]] = []  # per chunk: [videos, alive, right, drift sum, drift count, ratio sum, ratio count]

    def add(self, chunk: int, alive: bool, right: bool, colour_drift: float, size_ratio: float) -> None:
        """One video's numbers at `chunk` (1-based)."""
        while len(self.sums) < chunk:
            self.sums.append([0.0] * 7)
        row = self.sums[chunk - 1]
        row[0] += 1
        row[1] += alive
        row[2] += right
        if not math.isnan(colour_drift):
            row[3], row[4] = row[3] + colour_drift, row[4] + 1
        if not math.isnan(size_ratio):
            row[5], row[6] = row[5] + size_ratio, row[6] + 1

    def rows(self) -> list[dict[str, float]]:
        """A dict of CURVE_COLUMNS per chunk: survival and right are fractions of the videos."""
        return [{"chunk": index + 1, "videos": int(s[0]), "survival": s[1] / s[0], "right": s[2] / s[0],
                 "colour_drift": s[3] / s[4] if s[4] else math.nan, "size_ratio": s[5] / s[6] if s[6] else math.nan}
                for index, s in enumerate(self.sums)]


def checkpoints(chunks: int) -> list[int]:
    """The chunk indices a summary table shows: 1, 10, 25, 50, 100, 250, 500, 1000 up to `chunks`, and `chunks`."""
    marks = [n for n in (1, 10, 25, 50, 100, 250, 500, 1000) if n < chunks]
    return marks + [chunks]


def summary_table(settings: dict[str, list[dict]]) -> str:
    """{setting name: Curves.rows()} -> a markdown table: survival, colour drift and size ratio at
    the checkpoint chunks of the longest."""
    marks = checkpoints(max(len(rows) for rows in settings.values()))
    head = ["setting", *[f"survival@{n}" for n in marks], f"colour_drift@{marks[-1]}", f"size_ratio@{marks[-1]}"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, rows in settings.items():
        at = {row["chunk"]: row for row in rows}
        cells = [f"{at[n]['survival']:.3f}" if n in at else "" for n in marks]
        last = rows[-1]
        cells += [f"{last['colour_drift']:.1f}", f"{last['size_ratio']:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_curves(path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, CURVE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_curves(path) -> list[dict]:
    """A file write_curves wrote -> its rows (numbers); ValueError naming the file otherwise."""
    try:
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            if tuple(reader.fieldnames or ()) != CURVE_COLUMNS:
                raise ValueError(f"its columns are {reader.fieldnames}, not {list(CURVE_COLUMNS)}")
            rows = [{key: float(row[key]) for key in CURVE_COLUMNS} for row in reader]
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"--compare {path}: not a curves file written by evaluate.py --curves ({error})") from None
    if not rows:
        raise ValueError(f"--compare {path}: no rows")
    return rows


def plot(settings: dict[str, list[dict]], path, width: int = 900) -> None:
    """{setting name: Curves.rows()} -> a PNG of three panels against chunk index, a line per setting:
    survival (0..1), colour drift against chunk 1 (0..255 scale, RGB distance) and size ratio."""
    panels = [("survival", 0.0, 1.0), ("colour_drift", 0.0, None), ("size_ratio", None, None)]
    panel_height, margin, legend = 220, 50, 20 * len(settings) + 10
    image = Image.new("RGB", (width, margin + len(panels) * (panel_height + margin) + legend), "white")
    draw = ImageDraw.Draw(image)
    draw.font = ImageFont.load_default_imagefont()  # Pillow's bitmap font: the TrueType default's spaces are 2 px
    chunks = max(len(rows) for rows in settings.values())
    for number, (key, low, high) in enumerate(panels):
        values = [row[key] for rows in settings.values() for row in rows if not math.isnan(row[key])]
        low = min(values + [1.0]) if low is None else low
        high = max(values + [low + 1e-6, 1.0 if key == "size_ratio" else low + 1.0]) if high is None else high
        top = margin + number * (panel_height + margin)
        left, right, bottom = 70, width - 20, top + panel_height
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, top - 15), f"{key} against chunk index", fill="black")
        for fraction in (0.0, 0.5, 1.0):
            y = bottom - fraction * panel_height
            draw.line([left - 4, y, left, y], fill="black")
            draw.text((5, y - 6), f"{low + fraction * (high - low):.3g}", fill="black")
        for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
            x = left + fraction * (right - left)
            draw.text((x - 10, bottom + 4), f"{1 + round(fraction * (chunks - 1))}", fill="black")

        def point(row):
            x = left + (row["chunk"] - 1) / max(chunks - 1, 1) * (right - left)
            return x, bottom - (row[key] - low) / (high - low) * panel_height

        for index, rows in enumerate(settings.values()):
            points = [point(row) for row in rows if not math.isnan(row[key])]
            if len(points) > 1:
                draw.line(points, fill=LINE_COLOURS[index % len(LINE_COLOURS)], width=2)
            elif points:
                draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2],
                             fill=LINE_COLOURS[index % len(LINE_COLOURS)])
    y = margin + len(panels) * (panel_height + margin) - 20
    for index, name in enumerate(settings):
        colour = LINE_COLOURS[index % len(LINE_COLOURS)]
        draw.line([70, y + 20 * index + 7, 100, y + 20 * index + 7], fill=colour, width=3)
        draw.text((110, y + 20 * index), name, fill="black")
    image.save(path)
