"""Training clips: the shapes world, a folder of captioned videos, or shards prepared from one.

Sample `index` of a data set is always the same clip, and `batch_of` takes a fixed slice of the
samples for each step and process, so the data position is the step alone and a resumed run sees
what the uninterrupted one saw. `Batches` makes those batches ahead in DataLoader worker processes.

A video folder gives `VideoClip`s (frames and caption), which the trainer encodes with the VAE and
the text encoders at every step (`encoded_batch`). Prepared shards (tools/prepare_data.py) hold what
those encoders give, once for all: the VAE's latents (the posterior mean, scaled, as training
takes them: deterministic, so shards train exactly as the videos do) and the text embeddings; they
give `LatentClip`s. Both data sets pick sample `index` the same way: video `index % videos`, then
one of its windows drawn by `numpy.random.default_rng((seed, index))`, so a folder whose videos
each have one window trains as its shards do.

Shards of OUT: `shard-NNNNN.safetensors`, each `videos_per_shard` consecutive videos (sorted by
path) with tensors `latents` (clips, latent_channels, frames, h, w), `text` (videos, tokens, dim)
and `pooled` (videos, projection_dim), and metadata `contents` (JSON: "videos" [[name, clips], ...],
"skipped" [[name, reason], ...]) and `sha256` (of the data, the bytes after the header: `shard_checksum`);
`index.json` (INDEX_FORMAT) says what they hold and how they were made, and is written last; each
shard's entry has its `sha256`, which `ShardData` checks once per shard and process, when it first
reads it (shards and indexes from before checksums have none, and are read unchecked).
"""

import csv
import hashlib
import io
import json
import math
import subprocess
from collections import namedtuple
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from shapes import world
from infra.checkpoint import safetensors_header
from text import SUBFOLDERS
from infra.video_io import _to_model_frames

VIDEO_EXTENSIONS = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")
INDEX_FORMAT = "sdxl-video-shards/1"
INDEX_FILE = "index.json"
SHARD_PATTERN = "shard-*.safetensors"
SEEK_GAP = 48  # windows of one video closer than this many frames are decoded in one pass, without a seek

NO_TIMESTAMP = -(2**63)  # ffmpeg's AV_NOPTS_VALUE, as framecrc prints a packet without one
VideoLength = namedtuple("VideoLength", "frames fps variable")  # int, Fraction, bool: `video_length`
VideoClip = namedtuple("VideoClip", "video caption")  # (3, frames, H, W) in [-1, 1]; str (batched: stacked; a list)
LatentClip = namedtuple("LatentClip", "latents text pooled")  # (c, frames, h, w), (tokens, dim), (projection_dim,)


# Reading videos ---------------------------------------------------------------------------------


def last_line(error: Exception) -> str:
    """The last line of an error's message (ffmpeg's are its whole log)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[-1]


def video_length(path: Path) -> VideoLength:
    """(frames, fps, variable) of a video file from its packets' timestamps, without decoding it
    (ffmpeg copies the packets); ValueError naming the file if it cannot be read.

    A video is of constant frame rate when every frame i is within a quarter frame of time i / fps
    (fps: from the first to the last frame); a seek by time then reaches frame i. Otherwise it is of
    variable frame rate (a phone's, a GIF of uneven delays), and `read_windows` decodes it by time
    at fps = frames / duration: frame k is the one on screen at time k / fps."""
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0",
               "-c", "copy", "-f", "framecrc", "-"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, errors="replace")
    except OSError as error:
        raise ValueError(f"{path}: cannot read it as a video ({error})") from None
    if result.returncode:
        raise ValueError(f"{path}: cannot read it as a video ({last_line(RuntimeError(result.stderr))})")
    base, packets = None, []  # the stream's time base; (pts, duration) of each packet, in it
    for line in result.stdout.splitlines():
        if line.startswith("#tb 0:"):
            base = Fraction(line.split(":")[1].strip())
        elif line and not line.startswith("#"):
            fields = line.split(",")
            dts, pts, duration = (int(field) for field in fields[1:4])
            packets.append((dts if pts == NO_TIMESTAMP else pts, duration))
    times = sorted(pts for pts, _ in packets)
    if not times or not base or NO_TIMESTAMP in times:
        raise ValueError(f"{path}: cannot read it as a video (no frames, or frames without timestamps)")
    frames, end = len(times), max(pts + max(duration, 0) for pts, duration in packets)
    span = times[-1] - times[0]  # first frame to last, in `base`
    if frames == 1 or span <= 0:
        return VideoLength(frames, Fraction(1) if end <= times[0] else 1 / ((end - times[0]) * base), frames > 1)
    # Frame i at (i / (frames - 1)) * span, within a quarter frame (span / (frames - 1) / 4); integers only.
    constant = all(abs((time - times[0]) * (frames - 1) - i * span) * 4 <= span for i, time in enumerate(times))
    if constant:
        return VideoLength(frames, (frames - 1) / (span * base), False)
    return VideoLength(frames, frames / ((end - times[0]) * base), True)


def window_starts(strided_frames: int, num_frames: int, clips_per_video: int) -> list[int]:
    """Up to `clips_per_video` starts of windows of `num_frames` among `strided_frames` frames,
    evenly spaced from the first frame to the last window (fewer when the video is short; none
    when it is shorter than one window)."""
    last = strided_frames - num_frames
    if last < 0:
        return []
    if clips_per_video == 1:
        return [0]
    clips = min(clips_per_video, last + 1)  # more would repeat starts (every one of 0..last is taken already)
    return sorted({round(last * i / (clips - 1)) for i in range(clips)}) if clips > 1 else [0]


def read_windows(path: Path, starts: list[int], num_frames: int, frame_stride: int, size: int,
                 length: VideoLength) -> list[torch.Tensor]:
    """The windows of `num_frames` frames (every `frame_stride`-th) starting at the strided frames
    `starts`, each (3, num_frames, size, size) in [-1, 1], resized to cover and centre-cropped as
    video_io.read_video does. `length`: `video_length(path)`. Of a constant frame rate, each window
    is decoded once, after a seek to its first frame (a time); windows closer than SEEK_GAP frames
    share one pass. Of a variable frame rate, the video is decoded by time at `length.fps` (ffmpeg's
    fps filter), in one pass from its start: a seek by time would drop the frame on screen at the
    window's first tick when it began before it."""
    frames, fps, variable = length
    spans = [(start * frame_stride, (start + num_frames - 1) * frame_stride) for start in starts]  # in frames
    passes = []  # [first, last] frames of each decoding pass
    for first, last in sorted(spans):
        if passes and (variable or first <= passes[-1][1] + SEEK_GAP):
            passes[-1][1] = max(passes[-1][1], last)
        else:
            passes.append([0 if variable else first, last])
    by_time = ["-vf", f"setpts=PTS-STARTPTS,fps={fps.numerator}/{fps.denominator}"] if variable else []
    decoded = {}  # frame number -> (h, w, 3) uint8, the frames the windows need
    needed = {frame for first, last in spans for frame in range(first, last + 1, frame_stride)}
    for first, last in passes:
        # Half a frame early: ffmpeg's accurate seek then starts exactly at frame `first`.
        seek = ["-ss", f"{(first - 0.5) / float(fps):.6f}"] if first else []
        reader = imageio_ffmpeg.read_frames(str(path), input_params=seek, output_params=by_time)
        try:
            meta = next(reader)
            width, height = meta["size"]
            frame = first - 1
            for frame, raw in enumerate(reader, start=first):
                if frame in needed:
                    decoded[frame] = np.frombuffer(raw, np.uint8).reshape(height, width, 3)
                if frame == last:
                    break
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{path}: cannot decode it as a video ({last_line(error)})") from None
        finally:
            reader.close()
        if frame < last:
            raise ValueError(f"{path}: ends at frame {frame + 1}, its header counts {frames}; need frame {last + 1}")
    return [_to_model_frames(np.stack([decoded[f] for f in range(first, last + 1, frame_stride)]), size, size)
            for first, last in spans]


def read_captions(folder: Path) -> dict[Path, str]:
    """Video path -> caption: `metadata.jsonl` / `metadata.csv` rows (`file_name`, `text`), then a
    sidecar `NAME.txt` next to each video."""
    captions = {}
    path = folder / "metadata.jsonl"
    if path.is_file():
        for number, line in enumerate(read_text(path).splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    name, text = row["file_name"], str(row["text"])
                except (json.JSONDecodeError, TypeError, KeyError, RecursionError) as error:
                    reason = "nested too deeply" if isinstance(error, RecursionError) else repr(error)
                    raise ValueError(f"{path} line {number}: expected a JSON object with file_name and text "
                                     f"({reason})") from None
                captions[video_in(folder, name, f"{path} line {number}")] = text
    path = folder / "metadata.csv"
    if path.is_file():
        with io.StringIO(read_text(path), newline="") as file:
            for number, row in enumerate(csv.DictReader(file), start=2):
                if row.get("file_name") is None or row.get("text") is None:
                    raise ValueError(f"{path} line {number}: expected file_name and text columns")
                captions[video_in(folder, row["file_name"], f"{path} line {number}")] = row["text"]
    for video in folder.iterdir():
        if video.suffix.lower() in VIDEO_EXTENSIONS and video.with_suffix(".txt").is_file():
            captions[video] = read_text(video.with_suffix(".txt")).strip()
    return captions


def video_in(folder: Path, name, where: str) -> Path:
    """`folder / name` for a metadata row's file_name; ValueError naming `where` unless it is a relative
    path that stays inside `folder` (a row is data: it names no file elsewhere)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"{where}: file_name must be a path inside the folder (relative, without ..), got "
                         f"{json.dumps(name)[:80]}")
    return folder / name


def read_text(path: Path) -> str:
    """A caption file's text (UTF-8; a byte-order mark, as spreadsheets write, is dropped); ValueError
    naming the file if it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at {error.start}): save "
                         f"the captions as UTF-8") from None


def captioned_videos(folder: str) -> list[tuple[Path, str]]:
    """(path, caption) of every captioned video of `folder`, sorted by path; ValueError if none."""
    items = sorted(read_captions(Path(folder)).items())
    if not items:
        raise ValueError(f"--data {folder}: no videos with captions found (a NAME.txt next to each, or "
                         f"metadata.jsonl / metadata.csv with file_name and text)")
    return items


# Data sets --------------------------------------------------------------------------------------


class ShapesData:
    """Clips of the shapes world; sample `index` is always the same clip. With `num_clips` > 0
    the samples cycle over that many clips; with `shapes` > 1 each is a scene of that many shapes."""

    def __init__(self, size: int, num_frames: int, seed: int, num_clips: int = 0, shapes: int = 1):
        self.size, self.num_frames, self.seed, self.num_clips = size, num_frames, seed, num_clips
        self.shapes = shapes

    def __getitem__(self, index: int) -> VideoClip:
        """(3, frames, size, size) in [-1, 1] and its caption."""
        index = index % self.num_clips if self.num_clips else index
        clip = world.random_clip(self.seed * 1_000_003 + index, self.size, shapes=self.shapes)
        start = (index * 7919) % 64  # any stretch of the endless clip
        return VideoClip(world.render(clip, self.num_frames, self.size, first_frame=start), clip.caption)


class VideoFolder:
    """Videos with captions (`read_captions`). Sample `index` is a window of `num_frames` frames
    (every `frame_stride`-th) of video `index % videos`, at a start drawn from (seed, index),
    resized to cover and centre-cropped; only that window is decoded (`read_windows`)."""

    def __init__(self, folder: str, size: int, num_frames: int, frame_stride: int, seed: int):
        self.size, self.num_frames, self.stride, self.seed = size, num_frames, frame_stride, seed
        self.items = captioned_videos(folder)
        self.lengths = {}  # path -> video_length(path), filled as videos are first read

    def __getitem__(self, index: int) -> VideoClip:
        path, caption = self.items[index % len(self.items)]
        if path not in self.lengths:
            self.lengths[path] = video_length(path)
        strided = math.ceil(self.lengths[path][0] / self.stride)
        if strided < self.num_frames:
            raise ValueError(f"{path} has {strided} frames after stride {self.stride}; need {self.num_frames}")
        start = int(np.random.default_rng((self.seed, index)).integers(0, strided - self.num_frames + 1))
        [video] = read_windows(path, [start], self.num_frames, self.stride, self.size, self.lengths[path])
        return VideoClip(video, caption)


class ShardData:
    """Prepared shards (tools/prepare_data.py) of a folder with an INDEX_FILE. Sample `index` is one of
    the prepared windows of video `index % videos`, drawn from (seed, index), as VideoFolder draws
    its start. ValueError naming the file for an index or a shard that does not hold what it should."""

    def __init__(self, folder: str, seed: int):
        self.folder, self.seed = Path(folder), seed
        self.index = read_index(self.folder)
        self.checksums = {shard["file"]: shard.get("sha256") for shard in self.index["shards"]}
        self.checked = set()  # the shards whose checksum this process has checked (each once, when first read)
        self.videos = []  # (shard file, first clip row in it, clips, text row in it) per video with clips
        for shard in self.index["shards"]:
            row = 0
            for text_row, (_, clips) in enumerate(shard["videos"]):
                if clips:
                    self.videos.append((self.folder / shard["file"], row, clips, text_row))
                row += clips
        if not self.videos:
            raise ValueError(f"--data {folder}: its shards hold no clips")

    def __getitem__(self, index: int) -> LatentClip:
        path, first, clips, text_row = self.videos[index % len(self.videos)]
        row = first + int(np.random.default_rng((self.seed, index)).integers(0, clips))
        if path not in self.checked:
            self.check_checksum(path)
            self.checked.add(path)
        try:
            with safe_open(path, "pt") as shard:
                return LatentClip(shard.get_slice("latents")[row], shard.get_slice("text")[text_row],
                                  shard.get_slice("pooled")[text_row])
        except (OSError, SafetensorError) as error:  # removed or replaced since the index was read
            raise ValueError(f"{path}: cannot be read ({last_line(error)}); restore it, or prepare the data "
                             f"again") from None

    def check_checksum(self, path: Path) -> None:
        """ValueError naming the shard unless its data are what was indexed (its `sha256` in the index;
        an index from before checksums has none, and its shards are read unchecked)."""
        expected = self.checksums[path.name]
        try:
            found = shard_checksum(path) if expected is not None else None
        except OSError as error:
            raise ValueError(f"{path}: cannot be read ({error.strerror or error}); restore it, or prepare the data "
                             f"again") from None
        if found != expected:
            raise ValueError(f"{path}: its tensors changed since it was prepared (SHA-256 {found[:16]}..., "
                             f"{INDEX_FILE} records {expected[:16]}...); restore it, or prepare the data again")

    def check(self, config, fingerprints: dict[str, str]) -> None:
        """ValueError, one line, unless the shards were made for this run (`config`: a train.TrainConfig):
        mode temporal, the VAE and text encoders of its --model (`fingerprints`, `checkpoint_fingerprints`),
        its --size, --frame-stride and frames per clip (--context-frames + --frames)."""
        index, settings, name = self.index, self.index["settings"], f"--data {self.folder}"
        if config.mode != "temporal":
            raise ValueError(f"{name} holds prepared shards, which train mode temporal only (mode baby trains its VAE)")
        for part, words in (("vae", "the VAE"), ("text_encoders", "the text encoders")):
            if index["fingerprints"].get(part) != fingerprints[part]:
                raise ValueError(f"{name} was prepared with {words} of {index['model']}, not those of --model "
                                 f"{config.model}: prepare it again with --model {config.model}")
        clip_frames = config.context_frames + config.frames
        made = settings["context_frames"] + settings["frames"]
        for option, wanted, have in (("--size", config.size, settings["size"]),
                                     ("--frame-stride", config.frame_stride, settings["frame_stride"]),
                                     ("--context-frames + --frames", clip_frames, made)):
            if wanted != have:
                raise ValueError(f"{name} was prepared with {option} {have}; this run has {wanted}: give "
                                 f"{option} {have}, or prepare the videos again")


def read_index(folder: Path) -> dict:
    """The INDEX_FILE of a shard folder, checked (`check_index`) and against each shard's header;
    ValueError naming the file."""
    path = folder / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else error
        raise ValueError(f"{path} cannot be read as JSON ({reason})") from None
    keys = {"format", "shards", "settings", "fingerprints", "model", "latent_shape", "text_shape", "pooled_shape"}
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not keys <= index.keys():
        raise ValueError(f"{path} is not an index of shards ({INDEX_FORMAT}, written by tools/prepare_data.py)")
    check_index(index, path)
    for shard in index["shards"]:
        header = safetensors_header(folder / shard["file"])
        clips, videos = sum(c for _, c in shard["videos"]), len(shard["videos"])
        shapes = {"latents": [clips, *index["latent_shape"]], "text": [videos, *index["text_shape"]],
                  "pooled": [videos, *index["pooled_shape"]]}
        if {key: list(header.get(key, {}).get("shape", ())) for key in shapes} != shapes:
            raise ValueError(f"{folder / shard['file']} does not hold what {path} says ({shapes})")
    return index


def shard_checksum(path: Path) -> str:
    """SHA-256 (hex) of a safetensors file's data: every byte after its header (what
    tools/prepare_data.py records as the shard's `sha256`)."""
    with open(path, "rb") as file:
        file.seek(8 + int.from_bytes(file.read(8), "little"))
        return hashlib.file_digest(file, "sha256").hexdigest()


def whole(value, least: int = 0) -> bool:
    """Whether `value` is a JSON whole number (not a bool, not a float) of at least `least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_index(index: dict, path: Path) -> None:
    """ValueError, one line naming `path` and the key, unless the values that training reads from an
    index have their types: a valid JSON file can still hold `"shards": [1, 2]` or `"fingerprints": null`."""
    def refuse(key: str, expected: str, value) -> None:
        raise ValueError(f"{path}: {key} must be {expected}, got {json.dumps(value)[:80]}; prepare the data again "
                         f"(tools/prepare_data.py)")

    if not isinstance(index["model"], str):
        refuse("model", "the path of a checkpoint folder", index["model"])
    for key in ("fingerprints", "settings"):
        if not isinstance(index[key], dict):
            refuse(key, "an object", index[key])
    for key in ("vae", "text_encoders"):
        if not isinstance(index["fingerprints"].get(key), str):
            refuse(f"fingerprints.{key}", "a SHA-256 in hex", index["fingerprints"].get(key))
    for key in ("size", "frame_stride", "context_frames", "frames"):
        if not whole(index["settings"].get(key), 1):
            refuse(f"settings.{key}", "a whole number of at least 1", index["settings"].get(key))
    for key, length in (("latent_shape", 4), ("text_shape", 2), ("pooled_shape", 1)):
        shape = index[key]
        if not (isinstance(shape, list) and len(shape) == length and all(whole(size, 1) for size in shape)):
            refuse(key, f"a list of {length} whole numbers of at least 1", shape)
    if index["latent_shape"][1] != (made := index["settings"]["context_frames"] + index["settings"]["frames"]):
        refuse("latent_shape[1]", f"settings.context_frames + settings.frames = {made}", index["latent_shape"][1])
    if not isinstance(index["shards"], list):
        refuse("shards", "a list of objects", index["shards"])
    for number, shard in enumerate(index["shards"]):
        key = f"shards[{number}]"
        if not isinstance(shard, dict):
            refuse(key, "an object with file and videos", shard)
        name = shard.get("file")
        if not (isinstance(name, str) and Path(name).match(SHARD_PATTERN) and Path(name).name == name):
            refuse(f"{key}.file", f"the name of a shard in the folder ({SHARD_PATTERN})", name)
        if not isinstance(shard.get("videos"), list):
            refuse(f"{key}.videos", "a list of [name, clips]", shard.get("videos"))
        checksum = shard.get("sha256", "0" * 64)  # none: a shard from before checksums
        if not (isinstance(checksum, str) and len(checksum) == 64 and set(checksum) <= set("0123456789abcdef")):
            refuse(f"{key}.sha256", "a SHA-256 in hex (64 digits)", checksum)
        for row, video in enumerate(shard["videos"]):
            if not (isinstance(video, list) and len(video) == 2 and isinstance(video[0], str) and whole(video[1])):
                refuse(f"{key}.videos[{row}]", "[name, clips] with clips a whole number of at least 0", video)


def checkpoint_fingerprints(folder) -> dict[str, str]:
    """SHA-256 of what shards depend on in a checkpoint folder: `vae` (vae.safetensors and the
    VAE's config.json section, whose scaling_factor scales the latents) and `text_encoders`
    (every file of the tokenizer and text encoder folders)."""
    folder = Path(folder)
    vae = hashlib.sha256(json.dumps(json.loads((folder / "config.json").read_text())["vae"], sort_keys=True).encode())
    with open(folder / "vae.safetensors", "rb") as file:
        vae.update(hashlib.file_digest(file, "sha256").digest())
    text = hashlib.sha256()
    for path in sorted(p for name in SUBFOLDERS for p in (folder / name).rglob("*") if p.is_file()):
        text.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as file:
            text.update(hashlib.file_digest(file, "sha256").digest())
    return {"vae": vae.hexdigest(), "text_encoders": text.hexdigest()}


def make_data(config):
    """The run's clips (`config`: a train.TrainConfig): the shapes world, prepared shards (a folder
    with an INDEX_FILE, checked against the run: `ShardData.check`) or a folder of videos;
    ValueError if it holds none."""
    clip_frames = config.context_frames + config.frames
    folder = Path(config.data)
    if config.data == "shapes":
        return ShapesData(config.size, clip_frames, config.seed, config.clips, config.shapes)
    if (folder / INDEX_FILE).exists():
        data = ShardData(config.data, config.seed)
        data.check(config, checkpoint_fingerprints(config.model) if config.mode == "temporal" else {})
        return data
    if any(folder.glob(SHARD_PATTERN)):
        raise ValueError(f"--data {folder} holds shards but no {INDEX_FILE}: their preparation has not finished; "
                         f"run tools/prepare_data.py again with the same options to finish it")
    return VideoFolder(config.data, config.size, clip_frames, config.frame_stride, config.seed)


# Batches ----------------------------------------------------------------------------------------


def batch_of(data, step: int, batch_size: int, rank: int, world_size: int):
    """The samples of this process at `step`: a fixed slice of the global batch, so that the data
    position is the step alone. Returns a VideoClip (videos (batch, 3, frames, H, W), a list of
    captions) or a LatentClip (latents (batch, c, frames, h, w), text (batch, tokens, dim), pooled
    (batch, projection_dim)), as the data set gives."""
    first = (step * world_size + rank) * batch_size
    samples = [data[first + i] for i in range(batch_size)]
    fields = [torch.stack(values) if isinstance(values[0], torch.Tensor) else list(values) for values in zip(*samples)]
    return type(samples[0])(*fields)


class BatchSteps(torch.utils.data.Dataset):
    """batch_of(data, step, ...) as item `step`, for a DataLoader that makes whole batches; a
    ValueError (a video that cannot be read) is returned, for `Batches` to raise as it is."""

    def __init__(self, data, batch_size: int, rank: int, world_size: int):
        self.data, self.batch_size, self.rank, self.world_size = data, batch_size, rank, world_size

    def __getitem__(self, step: int):
        try:
            return batch_of(self.data, step, self.batch_size, self.rank, self.world_size)
        except ValueError as error:
            return error


class Batches:
    """`batches[step]` is `batch_of(data, step, batch_size, rank, world_size)`. With `workers` > 0,
    DataLoader worker processes make the batches of the steps after the first one asked for, in
    order, ahead of time (each worker a whole batch); a step asked out of that order (a resumed
    stage asks its own first step) is made here, and the workers go on. The batches are the same
    whatever the number of workers."""

    def __init__(self, data, batch_size: int, rank: int, world_size: int, workers: int = 0):
        self.steps = BatchSteps(data, batch_size, rank, world_size)
        self.workers = workers
        self.loader, self.next_step = None, None

    def __getitem__(self, step: int):
        if self.workers and self.loader is None:
            self.loader = iter(torch.utils.data.DataLoader(
                self.steps, batch_size=None, sampler=range(step, 2**62), num_workers=self.workers, prefetch_factor=2))
            self.next_step = step
        if self.workers and step == self.next_step:
            batch, self.next_step = next(self.loader), step + 1
        else:
            batch = self.steps[step]
        if isinstance(batch, ValueError):
            raise batch
        return batch


def encode_videos(pipeline, videos: torch.Tensor) -> torch.Tensor:
    """videos (batch, 3, frames, H, W) in [-1, 1] -> the VAE's scaled latents (batch, c, frames, h, w):
    the posterior mean, in the videos' dtype, on the pipeline's device, without gradients."""
    with torch.no_grad():
        return pipeline.vae.encode_video(videos.to(pipeline.device))


def encode_captions(pipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings (batch, tokens, dim1 + dim2) and pooled ones (batch, projection_dim) of the
    captions, as the UNet takes them (no guidance negatives), without gradients."""
    with torch.no_grad():
        text, _, pooled, _ = pipeline.text_encoder.encode_prompt(captions, do_classifier_free_guidance=False)
    return text, pooled


def encoded_batch(pipeline, batch) -> LatentClip:
    """A batch as the UNet's loss takes it, on the pipeline's device: a VideoClip encoded
    (`encode_videos`, `encode_captions`), or a LatentClip of shards as it is, its latents in
    float32 (the videos' dtype) and its text in the text encoders' dtype."""
    if isinstance(batch, VideoClip):
        return LatentClip(encode_videos(pipeline, batch.video), *encode_captions(pipeline, batch.caption))
    device, text_dtype = pipeline.device, pipeline.text_encoder.text_encoder_2.dtype
    return LatentClip(batch.latents.to(device, torch.float32), batch.text.to(device, text_dtype),
                      batch.pooled.to(device, text_dtype))
