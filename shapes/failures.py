"""Failures, not averages: which videos go blank, when, and whether they come back.

A chunk is *blank* when no frame of it shows a shape (scoring's `found` is 0): the worst thing a
user can see, an empty frame. Per video, fed chunk by chunk (`Blanks`):
    first_blank   the first blank chunk (1-based), None if there is none
    blank_from    the first chunk of the blank stretch that runs to the last chunk made: the video
                  is *lost for good* from there (it never comes back); None if the last chunk shows
                  a shape
At a horizon N (30, 100, 1,000 chunks, and the last), over the videos: the fraction that went blank
by chunk N, the fraction lost for good by chunk N (blank from a chunk <= N to the end of the run),
and survival(N) (survival.py), each with its 95 % Wilson interval, so that a rate says how many
videos stand behind it (8 of 10 is anything from 0.49 to 0.94).
"""

import csv
import math

FAILURE_MARKS = (30, 100, 1000)
Z_95 = 1.959964  # the standard normal's 97.5 % quantile


def wilson_interval(successes: float, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval (95 % by default) of the proportion successes / trials."""
    if trials <= 0:
        return math.nan, math.nan
    share = successes / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


class Blanks:
    """One video's blank chunks, fed chunk by chunk with the fraction of its frames that show a shape."""

    def __init__(self):
        self.chunks, self.first_blank, self.blank_from = 0, None, None

    def add(self, found: float) -> None:
        self.chunks += 1
        if found > 0:
            self.blank_from = None
            return
        if self.first_blank is None:
            self.first_blank = self.chunks
        if self.blank_from is None:
            self.blank_from = self.chunks


def horizons(chunks: int) -> list[int]:
    """The horizons a failure table shows: FAILURE_MARKS up to `chunks`, and `chunks`."""
    return [mark for mark in FAILURE_MARKS if mark < chunks] + [chunks]


def failure_rows(videos: list[Blanks], alive: dict[int, int] | None = None) -> list[dict]:
    """Per horizon (all videos made the same number of chunks): videos, went_blank and lost_for_good
    (fractions) with their intervals ([low, high]); with `alive` ({chunk: videos still alive}),
    survival too."""
    rows = []
    for mark in horizons(min(video.chunks for video in videos)):
        count = len(videos)
        blank = sum(video.first_blank is not None and video.first_blank <= mark for video in videos)
        lost = sum(video.blank_from is not None and video.blank_from <= mark for video in videos)
        row = {"chunks": mark, "videos": count, "went_blank": blank / count, "went_blank_interval": list(wilson_interval(blank, count)),
               "lost_for_good": lost / count, "lost_for_good_interval": list(wilson_interval(lost, count))}
        if alive is not None:
            row.update(survival=alive[mark] / count, survival_interval=list(wilson_interval(alive[mark], count)))
        rows.append(row)
    return rows


def failure_table(rows: list[dict]) -> str:
    """failure_rows -> a markdown table: each rate as `share (low-high)` with the videos behind it."""
    def cell(row, key):
        low, high = row[key + "_interval"]
        return f"{row[key]:.3f} ({low:.2f}-{high:.2f})"

    keys = [key for key in ("went_blank", "lost_for_good", "survival") if key in rows[0]]
    lines = ["| chunks | videos | " + " | ".join(key.replace("_", " ") + " (95 % interval)" for key in keys) + " |",
             "|---" * (2 + len(keys)) + "|"]
    lines += [f"| {row['chunks']} | {row['videos']} | " + " | ".join(cell(row, key) for key in keys) + " |" for row in rows]
    return "\n".join(lines)


def whole_number(text: str) -> int:
    """A non-negative integer written in ASCII digits (ValueError otherwise)."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{text!r} is not a whole number")
    return int(text)


def read_scores(path) -> tuple[dict[tuple[str, int], Blanks], dict[int, int]]:
    """A --scores file (evaluate.py: a row per video per chunk, each video's rows in chunk order) ->
    ({(prompt, seed): Blanks}, {chunk: videos alive}); ValueError naming the file if it is not one."""
    videos, alive = {}, {}
    try:
        with open(path, newline="") as file:
            for row in csv.DictReader(file):
                key, chunk = (row["prompt"], whole_number(row["seed"])), whole_number(row["chunk"])
                video = videos.setdefault(key, Blanks())
                if chunk != video.chunks + 1:
                    raise ValueError(f"{key}: chunk {chunk} after chunk {video.chunks}")
                found = float(row["found"])
                if not 0 <= found <= 1 or row["alive"] not in ("0", "1"):
                    raise ValueError(f"{key} chunk {chunk}: found must be in [0, 1] and alive 0 or 1")
                video.add(found)
                alive[chunk] = alive.get(chunk, 0) + int(row["alive"])
    except (OSError, KeyError, TypeError, ValueError, csv.Error) as error:
        raise ValueError(f"--failures {path}: not a scores file written by evaluate.py --scores ({error})") from None
    if not videos:
        raise ValueError(f"--failures {path}: no rows")
    return videos, alive
