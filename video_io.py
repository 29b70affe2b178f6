"""Video input and output: streaming writers (MP4, GIF, a folder of PNG frames) and readers.

`open_writer` picks the format from the path: `.mp4` (H.264, yuv420p, crash-safe and resumable),
`.gif`, or a folder of PNG frames (no extension, or a trailing `/`). Frames are uint8 numpy arrays
`(frames, height, width, 3)`, one chunk at a time; memory does not grow with the number of chunks.

How the MP4 stays playable through a crash: every chunk is encoded by its own ffmpeg run into a
fragmented MP4 (the header `ftyp`+`moov`, then one `moof`+`mdat` fragment that starts with a
keyframe). The first chunk's header goes to the file once; each chunk's fragment is then appended
by this process, with its sequence number and decode time shifted to follow the file. It is
written with its `moof` type renamed `free` (a box every reader skips), flushed to disk, and only
then switched to `moof` by a 4-byte write, flushed again. A kill at any moment (of Python, of
ffmpeg, of both) leaves a file that plays every chunk whose `write_chunk` returned, and nothing of
a later one. Resuming keeps the first N frames' bytes as they are (cut at a fragment boundary)
and appends after them. Chunks are encoded independently and deterministically, so on the same
machine a resumed file is byte for byte the file an uninterrupted run writes.
"""

import os
import re
import struct
import subprocess
import tempfile
from collections import deque
from fractions import Fraction

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import torch
import torch.nn.functional as F

FRAME_NAME = "frame_{:06d}.png"
_FRAME_RE = re.compile(r"frame_(\d{6,})\.png")
_ACCEPTED = "'.mp4', '.gif', or a folder of PNG frames (no extension, or a trailing '/')"

# libx264 settings that make every chunk one fragment: no B-frames (no reordering, no edit
# list), a single keyframe at the chunk's start; BT.709 colours (limited range), tagged.
_X264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-x264-params", "bframes=0:keyint=infinite:scenecut=0",
         "-vf", "scale=out_color_matrix=bt709:out_range=tv,"
                "setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709:range=tv"]


# ---------------------------------------------------------------------------------------------
# Output paths


def output_format(path):
    """'mp4', 'gif' or 'png' (a folder of PNG frames) from `path`'s extension; ValueError if unknown."""
    if path.endswith(("/", os.sep)):
        return "png"
    ext = os.path.splitext(path)[1].lower()
    if ext in ("", ".mp4", ".gif"):
        return {"": "png", ".mp4": "mp4", ".gif": "gif"}[ext]
    raise ValueError(f"--out {path!r}: unknown extension {ext!r}; use {_ACCEPTED}")


def check_output_path(path, resume_frames=None):
    """Check that `path` can be written (and resumed at `resume_frames`) without creating anything.

    Returns the format ('mp4', 'gif' or 'png'). With resume_frames > 0 the output must already
    hold at least that many complete frames, ending on a chunk boundary (MP4) or as PNG frames
    `frame_000000.png` ... ; a GIF cannot be resumed.
    """
    kind = output_format(path)
    resume_frames = resume_frames or 0
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {path!r}: folder {parent!r} does not exist")
    if kind == "png" and os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"--out {path!r}: exists and is not a folder (PNG frames go to a folder)")
    if kind != "png" and os.path.isdir(target):
        raise ValueError(f"--out {path!r}: is a folder, expected a {kind.upper()} file")
    writable = target if os.path.exists(target) else parent
    if not os.access(writable, os.W_OK | (os.X_OK if os.path.isdir(writable) else 0)):
        raise ValueError(f"--out {path!r}: {writable!r} is not writable")
    if resume_frames < 0:
        raise ValueError(f"resume_frames must be >= 0, got {resume_frames}")
    if resume_frames > 0:
        if kind == "gif":
            raise ValueError(f"--out {path!r}: a GIF cannot be resumed; write an MP4 or a PNG folder")
        if not os.path.exists(target):
            raise ValueError(f"cannot resume {path!r}: it does not exist")
        if kind == "mp4":
            _resume_point(path, resume_frames)
        else:
            missing = [i for i in range(resume_frames) if not os.path.isfile(_frame_path(path, i))]
            if missing:
                raise ValueError(f"cannot resume {path!r} at frame {resume_frames}: "
                                 f"{len(missing)} frames missing, first {_frame_path(path, missing[0])!r}")
    return kind


def open_writer(path, fps, crf=18, frames_per_chunk=None, resume_frames=None):
    """Open a streaming writer for `path` (format from the extension, see `output_format`).

    fps: frames per second (MP4 and GIF). crf: x264 quality, 0 (best) to 51 (MP4 only).
    frames_per_chunk: if given, every chunk must have exactly this many frames (else the first
    chunk sets it). resume_frames: keep the first N frames already in `path` and append after
    them (None or 0: start a new output, replacing any old one). Raises ValueError for bad input
    before anything is written.
    """
    kind = check_output_path(path, resume_frames)
    resume_frames = resume_frames or 0
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in 0..51, got {crf}")
    if frames_per_chunk is not None and (frames_per_chunk < 1 or resume_frames % frames_per_chunk):
        raise ValueError(f"frames_per_chunk={frames_per_chunk} must be >= 1 and divide "
                         f"resume_frames={resume_frames}")
    writer = {"mp4": Mp4Writer, "gif": GifWriter, "png": PngFolderWriter}[kind]
    return writer(path, Fraction(fps).limit_denominator(1001), crf, frames_per_chunk, resume_frames)


# ---------------------------------------------------------------------------------------------
# Writers


class VideoWriter:
    """Base of the writers: checks every chunk, counts frames, works as a context manager.

    `frames_written` counts the frames in the output, those kept by a resume included.
    """

    def __init__(self, path, fps, crf, frames_per_chunk, resume_frames):
        self.path, self.fps, self.crf = path, fps, crf
        self.frames_per_chunk = frames_per_chunk
        self.frames_written = resume_frames
        self.frame_size = None  # (height, width), fixed by the first chunk or the resumed file
        self.closed = False

    def write_chunk(self, frames):
        """Append one chunk. frames: uint8 numpy array (frames, height, width, 3)."""
        if self.closed:
            raise ValueError(f"writer for {self.path!r} is closed")
        if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4
                and frames.shape[-1] == 3 and len(frames) > 0):
            got = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames)
            raise ValueError(f"frames must be a uint8 array (frames, height, width, 3), got {got}")
        if self.frames_per_chunk not in (None, len(frames)):
            raise ValueError(f"every chunk must have {self.frames_per_chunk} frames, got {len(frames)}")
        if self.frame_size not in (None, frames.shape[1:3]):
            raise ValueError(f"frames are {frames.shape[1]}x{frames.shape[2]} (height x width) but "
                             f"{self.path!r} holds {self.frame_size[0]}x{self.frame_size[1]}")
        self._write(np.ascontiguousarray(frames))
        self.frames_per_chunk, self.frame_size = len(frames), frames.shape[1:3]
        self.frames_written += len(frames)

    def close(self):
        """Finish the output; calling it again does nothing."""
        if not self.closed:
            self.closed = True
            self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _write(self, frames):
        raise NotImplementedError

    def _close(self):
        pass


class Mp4Writer(VideoWriter):
    """H.264 in fragmented MP4, one fragment per chunk, crash-safe and resumable (module docstring).

    Width and height must be even (yuv420p halves the colour planes): odd sizes raise ValueError
    rather than being padded or cropped behind the caller's back.
    """

    def __init__(self, path, fps, crf, frames_per_chunk, resume_frames):
        super().__init__(path, fps, crf, frames_per_chunk, resume_frames)
        if resume_frames:
            self.header, self.size, self.sequence, self.decode_time = _resume_point(path, resume_frames)
            self.frame_size = _frame_size(self.header)
        else:
            self.header, self.size, self.sequence, self.decode_time = None, 0, 0, 0
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
        os.ftruncate(self.fd, self.size)  # drop what a killed run left after the resume point
        os.fsync(self.fd)

    def _write(self, frames):
        height, width = frames.shape[1:3]
        if height % 2 or width % 2:
            raise ValueError(f"MP4 (H.264, yuv420p) needs an even width and height, got "
                             f"{height}x{width} (height x width); use a PNG folder or resize")
        header, moof, mdat = _split_chunk(_encode_chunk(frames, self.fps, self.crf))
        if self.header is None:
            self.header = header
            data = header
        elif header == self.header:
            data = b""
        else:
            raise ValueError(f"cannot append to {self.path!r}: its header differs from this chunk's "
                             f"(different fps, crf or ffmpeg build than the run that wrote it)")
        self.sequence += 1
        moof, duration = _shift_fragment(moof, self.sequence, self.decode_time)
        moof_at = self.size + len(data)
        _pwrite_all(self.fd, data + moof[:4] + b"free" + moof[8:] + mdat, self.size)
        os.fsync(self.fd)
        os.pwrite(self.fd, b"moof", moof_at + 4)  # the fragment becomes visible
        os.fsync(self.fd)
        self.size = moof_at + len(moof) + len(mdat)
        self.decode_time += duration

    def _close(self):
        os.close(self.fd)


class GifWriter(VideoWriter):
    """Animated GIF through one ffmpeg process (a palette per frame, looping).

    Not resumable, and not cut at chunks: if Python dies, ffmpeg sees the end of its input and
    finishes the file with whatever frames reached it; if ffmpeg dies too, the GIF lacks its
    trailer byte (most viewers still show it).
    """

    def __init__(self, path, fps, crf, frames_per_chunk, resume_frames):
        super().__init__(path, fps, crf, frames_per_chunk, resume_frames)
        self.process = None
        self.log = tempfile.TemporaryFile()

    def _write(self, frames):
        if self.process is None:
            height, width = frames.shape[1:3]
            palette = "split[a][b];[a]palettegen=stats_mode=single[p];[b][p]paletteuse=new=1"
            cmd = [*_ffmpeg_input(height, width, self.fps), "-vf", palette, "-loop", "0",
                   "-f", "gif", "-y", self.path]
            self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=self.log)
        try:
            self.process.stdin.write(frames.tobytes())
            self.process.stdin.flush()
        except BrokenPipeError:
            self.close()  # raises with ffmpeg's log

    def _close(self):
        if self.process is not None:
            self._finish()
        self.log.close()

    def _finish(self):
        """Close ffmpeg's input, wait for it, raise with its log if it failed."""
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        if self.process.wait() != 0:
            self.log.seek(0)
            raise RuntimeError(f"ffmpeg failed writing {self.path!r}: {self.log.read().decode()}")


class PngFolderWriter(VideoWriter):
    """A folder of lossless PNG frames `frame_000000.png`, ...; each file is flushed to disk.

    Opening removes old frames from index `resume_frames` on (all of them for a new output).
    """

    def __init__(self, path, fps, crf, frames_per_chunk, resume_frames):
        super().__init__(path, fps, crf, frames_per_chunk, resume_frames)
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            match = _FRAME_RE.fullmatch(name)
            if match and int(match.group(1)) >= resume_frames:
                os.remove(os.path.join(path, name))
        if resume_frames:
            self.frame_size = iio.imread(_frame_path(path, 0)).shape[:2]

    def _write(self, frames):
        for i, frame in enumerate(frames):
            with open(_frame_path(self.path, self.frames_written + i), "wb") as f:
                f.write(iio.imwrite("<bytes>", frame, extension=".png"))
                f.flush()
                os.fsync(f.fileno())


def _frame_path(folder, index):
    return os.path.join(folder, FRAME_NAME.format(index))


# ---------------------------------------------------------------------------------------------
# MP4: one ffmpeg run per chunk, and the few boxes we read or patch


def _ffmpeg_input(height, width, fps):
    """The start of an ffmpeg command line reading raw rgb24 frames from stdin."""
    return [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "rawvideo",
            "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(fps), "-i", "pipe:0"]


def _encode_chunk(frames, fps, crf):
    """Encode frames (frames, height, width, 3) uint8 to the bytes of a fragmented MP4."""
    cmd = [*_ffmpeg_input(*frames.shape[1:3], fps), *_X264, "-crf", str(crf), "-fflags", "+bitexact",
           "-movflags", "frag_keyframe+empty_moov+default_base_moof", "-f", "mp4", "pipe:1"]
    result = subprocess.run(cmd, input=frames.tobytes(), capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg failed encoding a chunk: {result.stderr.decode()}")
    return result.stdout


def _boxes(data, start=0, end=None):
    """Yield (type, payload start, box end) for the boxes in data[start:end]; stops at a cut box."""
    end = len(data) if end is None else end
    while start + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, start)
        if size < 8 or start + size > end:
            return
        yield kind, start + 8, start + size
        start += size


def _find(data, *path, start=0, end=None):
    """Payload (start, end) of the box at `path` (types, e.g. b"traf", b"tfdt") inside data."""
    for kind, payload, box_end in _boxes(data, start, end):
        if kind == path[0]:
            return (payload, box_end) if len(path) == 1 else _find(data, *path[1:], start=payload, end=box_end)
    raise ValueError(f"MP4 box {b'/'.join(path).decode()} not found")


def _split_chunk(data):
    """ffmpeg's output for one chunk -> (header ftyp+moov, moof, mdat) bytes."""
    kinds = [(kind, payload - 8, end) for kind, payload, end in _boxes(data)]
    names = [kind for kind, _, _ in kinds]
    if names[:2] != [b"ftyp", b"moov"] or names.count(b"moof") != 1 or names[3:4] != [b"mdat"]:
        raise RuntimeError(f"unexpected fragmented MP4 layout from ffmpeg: {names}")
    (_, _, header_end), (_, moof_at, moof_end), (_, _, mdat_end) = kinds[1:4]
    return data[:header_end], data[moof_at:moof_end], data[moof_end:mdat_end]


def _fragment(moof):
    """(sequence number, decode time, frames, duration) of a moof box (its bytes)."""
    (sequence,) = struct.unpack_from(">I", moof, _find(moof, b"moof", b"mfhd")[0] + 4)
    tfdt = _find(moof, b"moof", b"traf", b"tfdt")[0]
    decode_time = struct.unpack_from(">Q" if moof[tfdt] == 1 else ">I", moof, tfdt + 4)[0]
    tfhd = _find(moof, b"moof", b"traf", b"tfhd")[0]
    trun = _find(moof, b"moof", b"traf", b"trun")[0]
    (tfhd_flags,) = struct.unpack_from(">I", moof, tfhd)
    trun_flags, frames = struct.unpack_from(">II", moof, trun)
    if trun_flags & 0x100:  # a duration per sample
        fields = bin(trun_flags & 0xF00).count("1")
        first = trun + 8 + 4 * bin(trun_flags & 0x5).count("1")
        duration = sum(struct.unpack_from(">I", moof, first + 4 * fields * i)[0] for i in range(frames))
    elif tfhd_flags & 0x8:  # one default duration
        offset = tfhd + 8 + (8 if tfhd_flags & 0x1 else 0) + (4 if tfhd_flags & 0x2 else 0)
        duration = frames * struct.unpack_from(">I", moof, offset)[0]
    else:
        raise ValueError("MP4 fragment without sample durations (not written by video_io)")
    return sequence, decode_time, frames, duration


def _shift_fragment(moof, sequence, decode_time):
    """A chunk's moof renumbered to `sequence` and moved to start at `decode_time`; also its duration."""
    moof = bytearray(moof)
    struct.pack_into(">I", moof, _find(moof, b"moof", b"mfhd")[0] + 4, sequence)
    tfdt = _find(moof, b"moof", b"traf", b"tfdt")[0]
    if moof[tfdt] != 1:
        raise RuntimeError("expected a 64-bit tfdt box from ffmpeg")
    struct.pack_into(">Q", moof, tfdt + 4, decode_time)
    return bytes(moof), _fragment(moof)[3]


def _resume_point(path, frames):
    """Where an MP4 holding at least `frames` frames is cut to keep exactly them.

    Returns (header bytes, byte size, last sequence number, decode time) at the cut; ValueError
    if the file holds fewer complete frames or `frames` is not at a chunk boundary.
    """
    with open(path, "rb") as f:
        data = f.read(1 << 20)
        boxes = list(_boxes(data))
        if [kind for kind, _, _ in boxes[:2]] != [b"ftyp", b"moov"]:
            raise ValueError(f"cannot resume {path!r}: not an MP4 with a complete header")
        header = data[:boxes[1][2]]
        size, sequence, decode_time, total = len(header), 0, 0, 0
        file_size = os.fstat(f.fileno()).st_size
        while total < frames and size + 8 <= file_size:
            f.seek(size)
            moof_size, kind = struct.unpack(">I4s", f.read(8))
            if kind != b"moof" or moof_size < 16 or size + moof_size + 8 > file_size:
                break
            moof = struct.pack(">I4s", moof_size, kind) + f.read(moof_size - 8)
            mdat_size, kind = struct.unpack(">I4s", f.read(8))
            if kind != b"mdat" or size + moof_size + mdat_size > file_size:
                break
            sequence, start, count, duration = _fragment(moof)
            size, decode_time, total = size + moof_size + mdat_size, start + duration, total + count
    if total != frames:
        where = "not at a chunk boundary" if total > frames else f"only {total} complete frames"
        raise ValueError(f"cannot resume {path!r} at frame {frames}: {where}")
    return header, size, sequence, decode_time


def _frame_size(header):
    """(height, width) of the video track from an MP4 header (tkhd's 16.16 fixed-point size)."""
    start, end = _find(header, b"moov", b"trak", b"tkhd")
    width, height = struct.unpack_from(">II", header, end - 8)
    return height >> 16, width >> 16


def _pwrite_all(fd, data, offset):
    """os.pwrite until every byte of data is written at offset."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


# ---------------------------------------------------------------------------------------------
# Readers


def read_image(path, height, width):
    """An image file as a float tensor (3, height, width) in [-1, 1], resized to cover then centre-cropped."""
    if not os.path.isfile(path):
        raise ValueError(f"image {path!r} does not exist")
    try:
        image = iio.imread(path, mode="RGB")  # (h, w, 3) uint8
    except Exception as error:  # imageio raises many types for unreadable files
        raise ValueError(f"cannot read image {path!r}: {error}") from error
    return _to_model_frames(image[None], height, width)[:, 0]


def read_video(path, height, width, last_frames=None):
    """The last `last_frames` frames of a video file (all if None) and its frame rate.

    Returns (tensor (3, frames, height, width) in [-1, 1], fps). The video is streamed through
    ffmpeg; only the last `last_frames` decoded frames are held at a time.
    """
    if not os.path.isfile(path):
        raise ValueError(f"video {path!r} does not exist")
    if last_frames is not None and last_frames < 1:
        raise ValueError(f"last_frames must be >= 1 or None, got {last_frames}")
    kept = deque(maxlen=last_frames)
    reader = imageio_ffmpeg.read_frames(path)
    try:
        meta = next(reader)
        w, h = meta["size"]
        for frame in reader:
            kept.append(np.frombuffer(frame, np.uint8).reshape(h, w, 3))
    except (OSError, RuntimeError, StopIteration, KeyError) as error:
        raise ValueError(f"cannot read video {path!r}: {error}") from error
    finally:
        reader.close()
    if not kept:
        raise ValueError(f"video {path!r} has no frames")
    if last_frames is not None and len(kept) < last_frames:
        raise ValueError(f"video {path!r} has {len(kept)} frames, fewer than last_frames={last_frames}")
    return _to_model_frames(np.stack(kept), height, width), meta["fps"]


def _to_model_frames(frames, height, width):
    """uint8 (frames, h, w, 3) -> float (3, frames, height, width) in [-1, 1]: resize to cover, centre crop."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (f, 3, h, w)
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top:top + height, left:left + width]  # (f, 3, height, width)
    return (x / 127.5 - 1).permute(1, 0, 2, 3).contiguous()  # (3, f, height, width)
