"""The shapes world: procedural video clips of a coloured shape moving on a plain background.

Every clip is fixed by its seed: a shape ("circle", "square", "triangle") of a colour moves one way
("left", "right", "up", "down") at a constant speed, wrapping around the edges, so it keeps moving
for as long as the video runs. Its caption says so: "a red circle moving left". This is the data
of the baby model, which `python sample.py` uses by default, and the yardstick of `shapes/scoring.py` and `evaluate.py`.
A `Scene` holds several clips of distinct colours, drawn one over the other and captioned
"a red circle moving left and a blue square moving up".

The baby's tokenizer (`write_tokenizer_files`) knows every word of VOCABULARY as one token;
`check_vocabulary` says so of a tokenizer, and that the longest caption fits its text encoder.
The first babies' tokenizer is kept as version 1 of the baby's vocabulary (`VOCABULARIES`,
`baby_tokenizer_files`), so that their runs resume with the text encoders they were trained with.
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
VOCABULARY = ["a", "moving", *COLOURS, *SHAPES, *DIRECTIONS, "and"]
# The baby's vocabularies by version (train.py --vocabulary; its text encoders are rebuilt from them
# and the seed, not checkpointed). 1: the first babies' (models/baby), as 797ca6f wrote it: no "and",
# and each word's merges in the order of the words, so "r e" of "red" cuts "green" into g re e n</w>.
# 2: VOCABULARY, its merges in merge_order, every word one token (check_vocabulary).
VOCABULARIES = {1: ["a", "moving", *COLOURS, *SHAPES, *DIRECTIONS], 2: VOCABULARY}
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

    @property
    def clips(self) -> tuple["Clip", ...]:
        """A clip is a scene of one (`render` takes either)."""
        return (self,)


@dataclass(frozen=True)
class Scene:
    """Clips of distinct colours in one video, drawn one over the other (the last on top)."""

    clips: tuple[Clip, ...]

    @property
    def caption(self) -> str:
        return " and ".join(clip.caption for clip in self.clips)


def random_clip(seed: int, size: int, held_out: bool = False, shapes: int = 1) -> Clip | Scene:
    """The clip of `seed` for frames of size x size pixels: a training clip (never a HELD_OUT
    combination), or with `held_out` one of the HELD_OUT combinations. With `shapes` > 1, a Scene of
    that many such clips of distinct colours, each drawn after the one before (with 1, the same clip
    as a Scene's first)."""
    if not 1 <= shapes <= len(COLOURS):
        raise ValueError(f"shapes must be in [1, {len(COLOURS)}] (one colour each), got {shapes}")
    rng = random.Random(seed)
    clips = []
    for _ in range(shapes):
        used = {clip.colour for clip in clips}
        combinations = [(c, s, d) for c in COLOURS if c not in used for s in SHAPES for d in DIRECTIONS
                        if ((c, s, d) in HELD_OUT) == held_out]
        clips.append(placed_clip(*rng.choice(combinations), rng, size))
    return clips[0] if shapes == 1 else Scene(tuple(clips))


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


def placed_scene(combinations, rng: random.Random, size: int) -> Scene:
    """A Scene of these (colour, shape, direction) combinations, placed by `placed_clip` in turn."""
    return Scene(tuple(placed_clip(*combination, rng, size) for combination in combinations))


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


def render(scene: Clip | Scene, num_frames: int, size: int, first_frame: int = 0) -> torch.Tensor:
    """(3, frames, size, size) in [-1, 1]: frames first_frame ... first_frame + num_frames - 1 of a
    clip, or of a scene's clips drawn one over the other."""
    background = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None].expand(3, size, size)
    frames = []
    for index in range(num_frames):
        frame = background  # (3, size, size)
        for clip in scene.clips:
            colour = torch.tensor(COLOURS[clip.colour], dtype=torch.float32)[:, None, None]
            frame = torch.where(shape_mask(clip, first_frame + index, size), colour, frame)  # (3, size, size)
        frames.append(frame)
    return torch.stack(frames, dim=1) / 127.5 - 1


def characters_of(word: str) -> list[str]:
    """A word as BPE starts it: its characters, the last with the end-of-word mark ("red" -> r, e, d</w>)."""
    return list(word[:-1]) + [word[-1] + "</w>"]


def merge_chain(word: str) -> list[str]:
    """The merges that build `word` left to right: "red" -> "r e", "re d</w>"."""
    pieces, chain = characters_of(word), []
    while len(pieces) > 1:
        chain.append(f"{pieces[0]} {pieces[1]}")
        pieces = [pieces[0] + pieces[1]] + pieces[2:]  # (pieces - 1,)
    return chain


def splits(word: str, other: str) -> bool:
    """Whether `word`'s first merge joins two characters inside `other` (not at its start): ranked
    before `other`'s merges, it would cut `other` into pieces ("r e" of "red" in "green")."""
    pieces, chain = characters_of(other), merge_chain(word)
    inside = {f"{a} {b}" for a, b in zip(pieces[1:], pieces[2:])}  # the pairs after the first
    return word != other and bool(chain) and chain[0] in inside


def merge_order(words) -> list[str]:
    """`words` in the order of their merge chains: each after every word it would split (`splits`),
    otherwise in the given order. Words that would split each other (a cycle) stay in the given
    order, and `check_vocabulary` refuses them."""
    remaining, ordered = list(dict.fromkeys(words)), []
    while remaining:
        ready = [word for word in remaining if not any(splits(word, other) for other in remaining)]
        ordered.append((ready or remaining)[0])
        remaining.remove(ordered[-1])
    return ordered


def write_tokenizer_files(folder, words=VOCABULARY, ordered: bool = True) -> Path:
    """vocab.json and merges.txt of a CLIP BPE tokenizer whose whole words are `words`.

    Byte-level characters (OpenAI CLIP's order), each again with the end-of-word mark, the pieces of
    every world word (in the order of `words`), then the start and end tokens; any text still
    tokenizes. The merges are each word's chain, the words in `merge_order`, so that no word's
    merges cut another; not `ordered`, in the order of `words`, as version 1 wrote them (VOCABULARIES).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    characters = [chr(byte) for byte in printable] + [chr(256 + index) for index in range(len(others))]
    tokens = characters + [character + "</w>" for character in characters]
    for word in words:  # "r e" -> "re", "re d</w>" -> "red</w>"
        for merge in merge_chain(word):
            if merge.replace(" ", "") not in tokens:
                tokens.append(merge.replace(" ", ""))
    chained = merge_order(words) if ordered else words
    merges = list(dict.fromkeys(merge for word in chained for merge in merge_chain(word)))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def baby_tokenizer_files(folder, vocabulary: int) -> Path:
    """write_tokenizer_files of the baby's vocabulary `vocabulary` (a version of VOCABULARIES); those of
    version 1 are byte for byte the first babies' (tests/fixtures/baby-tokenizer-v1)."""
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"the baby's vocabulary is one of versions {', '.join(map(str, VOCABULARIES))}, "
                         f"got {vocabulary!r}")
    return write_tokenizer_files(folder, VOCABULARIES[vocabulary], ordered=vocabulary >= 2)


def longest_caption(shapes: int, tokens=len) -> str:
    """The longest caption of a scene of `shapes` shapes: the longest words, the longest colours, by
    `tokens` (a word's length in tokens; letters break ties, and by default count alone)."""
    def length(word):
        return tokens(word), len(word)

    shape, direction = max(SHAPES, key=length), max(DIRECTIONS, key=length)
    colours = sorted(COLOURS, key=length, reverse=True)[:shapes]
    return " and ".join(f"a {colour} {shape} moving {direction}" for colour in colours)


def check_vocabulary(tokenizer, shapes: int = 1, words=VOCABULARY) -> None:
    """ValueError, one line, unless `tokenizer` (a CLIP tokenizer, as text.clip_tokenizers makes of
    write_tokenizer_files' folder) takes every word of `words` as one token and the longest caption
    of `shapes` shapes in its tokens (`longest_caption`) in its model_max_length."""
    for word in words:
        pieces = tokenizer.tokenize(word)
        if len(pieces) != 1:
            raise ValueError(f"the world's word {word!r} is {len(pieces)} tokens ({' '.join(pieces)}), not one: "
                             f"another word's merges cut it (world.merge_order)")
    caption = longest_caption(shapes, lambda word: len(tokenizer.tokenize(word)))
    length = len(tokenizer(caption, verbose=False).input_ids)
    if length > tokenizer.model_max_length:
        raise ValueError(f"the caption {caption!r} is {length} tokens, more than the text encoder's "
                         f"{tokenizer.model_max_length}")
