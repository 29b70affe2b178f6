"""The shapes world: procedural video clips of a coloured shape moving on a plain background.

Every clip is fixed by its seed: a shape ("circle", "square", "triangle") of a colour moves one way
("left", "right", "up", "down") at a constant speed, wrapping around the edges, so it keeps moving
for as long as the video runs. Its caption says so: "a red circle moving left". This is the data
of the baby model, which `python sample.py` uses by default, and the yardstick of `shapes/scoring.py` and `evaluate.py`.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = (24, 24, 32)
VOCABULARY = ["a", "moving", *COLOURS, *SHAPES, *DIRECTIONS]
# Never trained on: the evaluation asks for these combinations of words the model knows separately.
HELD_OUT = {("red", "triangle", "up"), ("green", "circle", "left"), ("blue", "square", "down"),
            ("yellow", "triangle", "right"), ("white", "circle", "down")}


@dataclass(frozen=True)
class Clip:
    """One clip's content: what the caption says, and where and how big the shape is."""

    colour: str
    shape: str
    direction: str
    x: float  # centre at frame 0, in pixels
    y: float
    radius: float
    speed: float  # pixels per frame

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"


def random_clip(seed: int, size: int, held_out: bool = False) -> Clip:
    """The clip of `seed` for frames of size x size pixels: a training clip (never a HELD_OUT
    combination), or with `held_out` one of the HELD_OUT combinations."""
    rng = random.Random(seed)
    combinations = [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS if ((c, s, d) in HELD_OUT) == held_out]
    return placed_clip(*rng.choice(combinations), rng, size)


def placed_clip(colour: str, shape: str, direction: str, rng: random.Random, size: int) -> Clip:
    """A clip of this caption with its place, size and speed drawn from `rng`, as training clips are."""
    return Clip(
        colour=colour,
        shape=shape,
        direction=direction,
        x=rng.uniform(0, size),
        y=rng.uniform(0, size),
        radius=rng.uniform(0.14, 0.2) * size,
        speed=rng.uniform(0.08, 0.12) * size,
    )


def shape_mask(clip: Clip, frame: int, size: int) -> torch.Tensor:
    """(size, size) bool: the pixels the shape covers at `frame`, wrapping around the edges."""
    step_x, step_y = DIRECTIONS[clip.direction]
    centre_x = clip.x + step_x * clip.speed * frame
    centre_y = clip.y + step_y * clip.speed * frame
    pixels = torch.arange(size, dtype=torch.float32) + 0.5
    dx = (pixels[None, :] - centre_x + size / 2) % size - size / 2  # (1, size): toroidal offsets
    dy = (pixels[:, None] - centre_y + size / 2) % size - size / 2  # (size, 1)
    r = clip.radius
    if clip.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if clip.shape == "square":
        return (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r)
    top, bottom = -r, 0.8 * r  # an upright triangle, apex at the top
    return (dy >= top) & (dy <= bottom) & (dx.abs() <= (dy - top) / (bottom - top) * r)


def render(clip: Clip, num_frames: int, size: int, first_frame: int = 0) -> torch.Tensor:
    """(3, frames, size, size) in [-1, 1]: frames first_frame ... first_frame + num_frames - 1."""
    background = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None]
    colour = torch.tensor(COLOURS[clip.colour], dtype=torch.float32)[:, None, None]
    frames = [
        torch.where(shape_mask(clip, first_frame + index, size), colour, background)  # (3, size, size)
        for index in range(num_frames)
    ]
    return torch.stack(frames, dim=1) / 127.5 - 1


def write_tokenizer_files(folder, words=VOCABULARY) -> Path:
    """vocab.json and merges.txt of a CLIP BPE tokenizer whose whole words are `words`.

    Byte-level characters (OpenAI CLIP's order), each again with the end-of-word mark, a merge
    chain for every world word, then the start and end tokens; any text still tokenizes.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    characters = [chr(byte) for byte in printable] + [chr(256 + index) for index in range(len(others))]
    tokens = characters + [character + "</w>" for character in characters]
    merges = []
    for word in words:  # "r e" -> "re", "re d</w>" -> "red</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in tokens:
                tokens.append(pieces[0])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder
