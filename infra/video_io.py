"""Video input and output: streaming writers (MP4, GIF, a folder of PNG frames) and readers.

`open_writer` picks the format from the path: `.mp4` (H.264, yuv420p), `.gif`, or a folder of PNG
frames (no extension, or a trailing `/`). Frames are uint8 numpy arrays `(frames, height, width, 3)`,
one chunk at a time; memory does not grow with the number of chunks. Every format is crash-safe
and resumable at a chunk boundary.

The guarantee: a kill at any moment (of Python, of ffmpeg, of both; every step is flushed to disk
before the next, so a power cut too) leaves an output that holds every frame of each chunk whose
`write_chunk` returned, and nothing of a later one. How each format keeps it:

- MP4: every chunk is encoded by its own ffmpeg run into a fragmented MP4 (the header `ftyp`+`moov`,
  then one `moof`+`mdat` fragment that starts with a keyframe). The first chunk's header goes to
  the file once; each chunk's fragment is then appended by this process, with its sequence number
  and decode time shifted to follow the file. It is written with its `moof` type renamed `free` (a
  box every reader skips), flushed to disk, and only then switched to `moof` by a 4-byte write,
  flushed again.
- GIF: written here, a palette per frame (Pillow quantises and LZW-compresses each frame). The file
  always ends with the trailer byte `;` (0x3B), where every reader stops. A chunk's bytes start
  with `!` (0x21, a marker extension, `_GIF_CHUNK`); it is appended as all of them but the first,
  plus a new trailer, from one byte after the old trailer, flushed to disk; then its first byte
  overwrites the old trailer, flushed again.
- PNG folder: a chunk's frames are written under hidden temporary names, flushed, and renamed to
  `frame_NNNNNN.png` once all of them are on disk, the chunk's first frame last: the frames
  numbered without a gap from frame_000000.png are whole chunks (a kill during the renames can
  leave some of the chunk's last frames after the gap; a resume removes them).

A new output never destroys the old one before its first chunk is complete: that chunk goes to a
hidden temporary `.NAME.<pid>.partial` next to `path` (for a PNG folder that exists: temporary
frame names inside it, see `PngFolderWriter`), which then replaces `path` (`before_placing` is
called just before, see `open_writer`); `writer.in_place` says whether that has happened. Closing
the writer before it leaves `path` as it was and removes the temporary; what a killed process
leaves, the next `open_writer` for that path removes.

A full disk (or any OSError) in `open_writer`, `write_chunk` or `close` raises OSError with its
errno and `filename` set to the output path as it was given, whichever of its files failed (a hidden
temporary, which the user never gave, is never named: infra/files.naming with `always`); an error
that `before_placing` raises keeps its own file name. The output still holds the previous
complete chunks and can be resumed once there is space. Resuming keeps the first N frames' bytes
as they are (cut at a chunk boundary) and appends after them. MP4 chunks are encoded
independently and deterministically, and a GIF frame's bytes depend only on its pixels, index and
the fps, so a resumed file is byte for byte the file an uninterrupted run writes (for MP4: with
the same ffmpeg build).
"""

import contextlib
import io
import math
import os
import re
import struct
import subprocess
import sys
from collections import deque
from fractions import Fraction

import imageio_ffmpeg
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from infra.files import PROCESS_ID, fsync, naming, process_alive

FRAME_NAME = "frame_{:06d}.png"
_FRAME_RE = re.compile(r"frame_([0-9]{6,})\.png")  # ASCII digits: a name with others is not ours
_ACCEPTED = "'.mp4', '.gif', or a folder of PNG frames (no extension, or a trailing '/')"

# libx264 settings that make every chunk one fragment: no B-frames (no reordering, no edit
# list), a single keyframe at the chunk's start; BT.709 colours (limited range), tagged.
_X264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-x264-params", "bframes=0:keyint=infinite:scenecut=0",
         "-vf", "scale=out_color_matrix=bt709:out_range=tv,"
                "setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709:range=tv"]

# GIF blocks: the looping extension (forever), and the marker that starts every chunk (an
# application extension with one data byte, which ffmpeg needs to keep the duration: readers
# skip it, resume finds it).
_GIF_LOOP = b"!\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
_GIF_CHUNK_ID = b"video_iochk"
_GIF_CHUNK = b"!\xff\x0b" + _GIF_CHUNK_ID + b"\x01\x00\x00"


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
    hold at least that many complete frames, ending on a chunk boundary (MP4, GIF) or as PNG
    frames `frame_000000.png` ... .
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
    # A resume writes into the output; a new one into a temporary next to it, or in its folder.
    writable = target if os.path.exists(target) and (resume_frames or kind == "png") else parent
    if not os.access(writable, os.W_OK | (os.X_OK if os.path.isdir(writable) else 0)):
        raise ValueError(f"--out {path!r}: {writable!r} is not writable")
    if resume_frames < 0:
        raise ValueError(f"resume_frames must be >= 0, got {resume_frames}")
    if resume_frames > 0:
        if not os.path.exists(target):
            raise ValueError(f"cannot resume {path!r}: it does not exist")
        if kind == "mp4":
            _resume_point(path, resume_frames)
        elif kind == "gif":
            _gif_resume_point(path, resume_frames)
        else:
            missing = [i for i in range(resume_frames) if not os.path.isfile(_frame_path(path, i))]
            if missing:
                raise ValueError(f"cannot resume {path!r} at frame {resume_frames}: "
                                 f"{len(missing)} frames missing, first {_frame_path(path, missing[0])!r}")
    return kind


def open_writer(path, fps, crf=18, frames_per_chunk=None, resume_frames=None, before_placing=None):
    """Open a streaming writer for `path` (format from the extension, see `output_format`).

    fps: frames per second (MP4 and GIF). crf: x264 quality, 0 (best) to 51 (MP4 only).
    path "-": an MP4 stream to standard output (`Mp4StreamWriter`), nothing else applies.
    frames_per_chunk: if given, every chunk must have exactly this many frames (else chunks may
    differ: a run with a refiner writes its frames as they leave the refiner's window). resume_frames: keep the first N frames already in `path` and append after
    them (None or 0: start a new output, which replaces any old one once its first chunk is
    complete). before_placing: for a new output, called with the temporary (file, or folder for
    a PNG folder that did not exist) once the first chunk is complete in it, just before it is
    renamed to `path` (to record it, so that a crash between the two can be finished); for a PNG
    folder that exists, called with None just before its old frames are removed (the new ones are
    renamed in one by one, there is no single rename to finish). Raises ValueError
    for bad input before anything is written. Temporaries of `path` left by dead processes are
    removed.
    """
    if path == "-":
        return Mp4StreamWriter(sys.stdout.buffer, Fraction(fps).limit_denominator(1001), crf)
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
    with naming(path, always=True):
        _remove_stale_temporaries(path)
        writer = writer(path, Fraction(fps).limit_denominator(1001), crf, frames_per_chunk, resume_frames)
    writer.before_placing = before_placing
    return writer


# ---------------------------------------------------------------------------------------------
# Writers


class VideoWriter:
    """Base of the writers: checks every chunk, counts frames, works as a context manager.

    `frames_written` counts the frames in the output, those kept by a resume included.
    `in_place` says whether the output is at `path`: from the start for a resume, for a new
    output once its first chunk is complete (before that, `path` still holds what it held).
    `temporary`: where a new output is written until it is put in place (None: at `path`).
    """

    def __init__(self, path, fps, crf, frames_per_chunk, resume_frames):
        self.path, self.fps, self.crf = path, fps, crf
        self.frames_per_chunk = frames_per_chunk
        self.frames_written = resume_frames
        self.frame_size = None  # (height, width), fixed by the first chunk or the resumed file
        self.in_place = bool(resume_frames)
        self.temporary = None
        self.before_placing = None  # see open_writer
        self.closed = False

    def write_chunk(self, frames):
        """Append one chunk. frames: uint8 numpy array (frames, height, width, 3).

        An OSError (e.g. ENOSPC, a full disk) is raised again with its errno and `filename` set
        to the output path; the output then still holds the chunks written before. If a new
        output's first chunk cannot be put in place, the writer is closed.
        """
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
        with naming(self.path, always=True):
            self._write(np.ascontiguousarray(frames))
        if not self.in_place:
            try:
                self._place()
            except BaseException:
                self.close()
                raise
            self.in_place = True
        self.frame_size = frames.shape[1:3]
        self.frames_written += len(frames)

    def close(self):
        """Finish the output (a new one not yet in place: remove its temporary); again: nothing."""
        if not self.closed:
            self.closed = True
            with naming(self.path, always=True):
                self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _write(self, frames):
        """Write the chunk (a new output's first: into `temporary`, or over an existing PNG folder)."""
        raise NotImplementedError

    def _place(self):
        """Rename `temporary` (after `before_placing`) to `path`, on disk."""
        if self.temporary is not None:
            self._before_placing(self.temporary)
            with naming(self.path, always=True):
                os.replace(self.temporary, os.path.abspath(self.path))
                self.temporary = None
                fsync(os.path.dirname(os.path.abspath(self.path)))  # the rename, on disk

    def _before_placing(self, temporary):
        """Call `before_placing`; an OSError from it is the caller's, about its own file: marked
        `from_caller`, it passes `naming` as it is."""
        if self.before_placing is not None:
            try:
                self.before_placing(temporary)
            except OSError as error:
                error.from_caller = True
                raise

    def _close(self):
        pass


class _FileWriter(VideoWriter):
    """Base of the one-file writers (MP4, GIF): appends through one file descriptor.

    A new output is written to `temporary` until its first chunk is on disk, which then replaces
    `path`; later chunks are appended to the same open file. `size` is the byte size of the
    complete chunks; `_cut` brings the file back to them.
    """

    def __init__(self, path, fps, crf, frames_per_chunk, resume_frames, size=0):
        """size: for a resume, the byte size of the file cut at `resume_frames`."""
        super().__init__(path, fps, crf, frames_per_chunk, resume_frames)
        self.size = size
        self.temporary = None if resume_frames else _temporary(path)
        flags = os.O_WRONLY if resume_frames else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.fd = os.open(self.temporary or path, flags, 0o666)
        if resume_frames:
            try:
                self._cut()  # drop the frames after the resume point and what a killed run left
            except BaseException:
                os.close(self.fd)
                raise

    def _commit(self, data, switch=b"", switch_at=0):
        """Append `data` at `size`, flush it to disk, then write `switch` at `switch_at`, flush again.

        On an OSError (a full disk) the file is cut back to `size`, freeing the space; what
        another error leaves after it is invisible to readers.
        """
        try:
            _pwrite_all(self.fd, data, self.size)
            os.fsync(self.fd)
            if switch:
                _pwrite_all(self.fd, switch, switch_at)
                os.fsync(self.fd)
        except OSError:
            with contextlib.suppress(OSError):
                self._cut()
            raise
        self.size += len(data)

    def _cut(self):
        """Truncate the file to `size` bytes, on disk."""
        os.ftruncate(self.fd, self.size)
        os.fsync(self.fd)

    def _close(self):
        os.close(self.fd)
        if self.temporary is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.temporary)


class Mp4Writer(_FileWriter):
    """H.264 in fragmented MP4, one fragment per chunk, crash-safe and resumable (module docstring).

    Width and height must be even (yuv420p halves the colour planes): odd sizes raise ValueError
    rather than being padded or cropped behind the caller's back.
    """

    def __init__(self, path, fps, crf, frames_per_chunk, resume_frames):
        header, size, sequence, decode_time = (_resume_point(path, resume_frames) if resume_frames
                                               else (None, 0, 0, 0))
        super().__init__(path, fps, crf, frames_per_chunk, resume_frames, size)
        self.header, self.sequence, self.decode_time = header, sequence, decode_time
        if header is not None:
            self.frame_size = _frame_size(header)

    def _write(self, frames):
        height, width = frames.shape[1:3]
        if height % 2 or width % 2:
            raise ValueError(f"MP4 (H.264, yuv420p) needs an even width and height, got "
                             f"{height}x{width} (height x width); use a PNG folder or resize")
        header, moof, mdat = _split_chunk(_encode_chunk(frames, self.fps, self.crf))
        if self.header not in (None, header):
            raise ValueError(f"cannot append to {self.path!r}: its header differs from this chunk's "
                             f"(different fps, crf or ffmpeg build than the run that wrote it)")
        data = header if self.header is None else b""
        moof, duration = _shift_fragment(moof, self.sequence + 1, self.decode_time)
        moof_at = self.size + len(data)
        self._commit(data + moof[:4] + b"free" + moof[8:] + mdat, b"moof", moof_at + 4)
        self.header, self.sequence, self.decode_time = header, self.sequence + 1, self.decode_time + duration


class Mp4StreamWriter:
    """H.264 in fragmented MP4 to a stream (`--out -`: standard output), one fragment per chunk,
    flushed as soon as it is made, so that a player reading the pipe shows each chunk as it comes.
    The fragments are the ones Mp4Writer writes to a file; a stream keeps nothing to resume."""

    temporary = None  # a stream has no temporary and no old output to replace

    def __init__(self, stream, fps, crf):
        self.stream, self.fps, self.crf = stream, fps, crf
        self.header, self.sequence, self.decode_time = None, 0, 0
        self.in_place = False  # the first chunk has been sent
        self.frames_written = 0

    def write_chunk(self, frames):
        """Send one chunk: uint8 numpy (frames, height, width, 3), even height and width."""
        if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4
                and frames.shape[-1] == 3 and len(frames) > 0):
            raise ValueError(f"frames must be a uint8 array (frames, height, width, 3), got {frames.shape}")
        if frames.shape[1] % 2 or frames.shape[2] % 2:
            raise ValueError(f"MP4 (H.264, yuv420p) needs an even width and height, got "
                             f"{frames.shape[1]}x{frames.shape[2]} (height x width)")
        header, moof, mdat = _split_chunk(_encode_chunk(np.ascontiguousarray(frames), self.fps, self.crf))
        if self.header not in (None, header):
            raise ValueError("a chunk's MP4 header differs from the first chunk's (another size?)")
        moof, duration = _shift_fragment(moof, self.sequence + 1, self.decode_time)
        self.stream.write((header if self.header is None else b"") + moof + mdat)
        self.stream.flush()
        self.header, self.sequence, self.decode_time = header, self.sequence + 1, self.decode_time + duration
        self.in_place = True
        self.frames_written += len(frames)

    def close(self):
        self.stream.flush()


class GifWriter(_FileWriter):
    """Animated GIF, looping, crash-safe and resumable (module docstring).

    The file: header, logical screen (no global colour table) and looping extension; per chunk
    the marker `_GIF_CHUNK`, then per frame a graphic control extension (its delay), an image
    descriptor, a local colour table of up to 256 colours and LZW data (`_gif_frame`); the
    trailer. Delays are whole centiseconds: frame i shows from round(100 i / fps) on, so the
    rounding never adds up (6 fps: 17, 16, 17, ... centiseconds).
    """

    def __init__(self, path, fps, crf, frames_per_chunk, resume_frames):
        frame_size, cut = _gif_resume_point(path, resume_frames) if resume_frames else (None, -1)
        super().__init__(path, fps, crf, frames_per_chunk, resume_frames, cut + 1)
        self.frame_size = frame_size

    def _write(self, frames):
        starts = [_centiseconds(self.frames_written + i, self.fps) for i in range(len(frames) + 1)]
        chunk = _GIF_CHUNK + b"".join(_gif_frame(frame, end - start)
                                      for frame, start, end in zip(frames, starts, starts[1:]))
        if self.size == 0:  # a new file, still under its temporary name
            self._commit(_gif_header(*frames.shape[1:3]) + chunk + b";")
        else:
            self._commit(chunk[1:] + b";", chunk[:1], self.size - 1)

    def _cut(self):
        """End the file with a trailer at `size` - 1 (on disk before the truncation), truncate it there."""
        if self.size:
            _pwrite_all(self.fd, b";", self.size - 1)
            os.fsync(self.fd)
        super()._cut()


class PngFolderWriter(VideoWriter):
    """A folder of lossless PNG frames `frame_000000.png`, ..., crash-safe and resumable.

    A chunk's frames are written under hidden temporary names (`.frame_000012.png.<pid>.partial`)
    and flushed to disk; once all are, they are renamed to their final names, the chunk's first
    frame last, and the folder is flushed. So the frames numbered without a gap from
    frame_000000.png (where a reader of `frame_%06d.png` stops) are always whole chunks: a kill
    during the renames can only leave some of the chunk's last frames after a gap, which a resume
    removes. On an error (a full disk) nothing of the chunk is left: its temporaries are removed,
    and so are its frames already renamed.

    A new output into a folder that does not exist yet is written to a temporary folder next to
    it, renamed to `path` after the first chunk. Into an existing folder, once the first chunk's
    frames are all on disk, the old frames are removed (frame_000000.png first; other files are
    left alone), then the new ones renamed in. A kill in that window leaves no frame_000000.png
    (no video), and maybe old or new frames after the gap, which the next new output removes.
    A resume removes the frames from index `resume_frames` on when it opens.
    """

    def __init__(self, path, fps, crf, frames_per_chunk, resume_frames):
        super().__init__(path, fps, crf, frames_per_chunk, resume_frames)
        if resume_frames:
            _remove_frames(path, resume_frames)
            with Image.open(_frame_path(path, 0)) as image:
                self.frame_size = image.size[::-1]
        elif not os.path.isdir(path):
            self.temporary = _temporary(path)
            os.mkdir(self.temporary)

    def _write(self, frames):
        folder = self.temporary or self.path
        finals = [_frame_path(folder, self.frames_written + i) for i in range(len(frames))]
        temporaries = []
        try:
            for frame, final in zip(frames, finals):
                temporaries.append(_temporary(final))
                with open(temporaries[-1], "wb") as f:
                    Image.fromarray(frame).save(f, "PNG")
                    f.flush()
                    os.fsync(f.fileno())
            if not self.in_place and self.temporary is None:
                self._before_placing(None)  # no single rename: the old frames go first
                _remove_frames(self.path, 0)  # the old video
            for temporary, final in reversed(list(zip(temporaries, finals))):
                os.replace(temporary, final)
            fsync(folder)
        except BaseException:
            for name in temporaries + finals if self.in_place else temporaries:
                with contextlib.suppress(OSError):
                    os.remove(name)
            raise

    def _close(self):
        if self.temporary is not None:  # the first chunk never completed
            _remove_temporary_folder(self.temporary)


def _frame_path(folder, index):
    return os.path.join(folder, FRAME_NAME.format(index))


def _remove_frames(folder, start):
    """Remove the frame_NNNNNN.png files numbered `start` and up, in order (so the first removal
    ends the gapless sequence at `start`), on disk."""
    frames = [(int(match.group(1)), match.group()) for match in map(_FRAME_RE.fullmatch, os.listdir(folder))
              if match and int(match.group(1)) >= start]
    for _, name in sorted(frames):
        os.remove(os.path.join(folder, name))
    fsync(folder)


# ---------------------------------------------------------------------------------------------
# Files: temporaries, renames, writes


def _temporary(path):
    """This process's hidden temporary for `path`: `.NAME.<pid>.partial` in the same folder."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.{os.getpid()}.partial")


def _pwrite_all(fd, data, offset):
    """os.pwrite until every byte of data is written at offset."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _remove_stale_temporaries(path):
    """Remove the temporaries of `path` (and of its frames, for a PNG folder) whose process is gone.

    This process's own pid counts as gone: a restarted container often reuses it, and a writer
    of this process that is still open on the same path is not supported. A name whose process id
    is not written as ours are (`PROCESS_ID`: ASCII, at most 9 digits) is left alone.
    """
    def remove(folder, name):
        pattern = re.compile(rf"\.{name}\.(?P<pid>{PROCESS_ID})\.partial")
        for entry in os.listdir(folder):
            match = pattern.fullmatch(entry)
            if match and (int(match["pid"]) == os.getpid() or not process_alive(int(match["pid"]))):
                stale = os.path.join(folder, entry)
                if os.path.isdir(stale):
                    _remove_temporary_folder(stale)
                else:
                    os.remove(stale)

    target = os.path.abspath(path)
    remove(os.path.dirname(target), re.escape(os.path.basename(target)))
    if os.path.isdir(target):
        remove(target, _FRAME_RE.pattern)


def _remove_temporary_folder(folder):
    """Remove a PNG writer's temporary folder: its frames and frame temporaries, then the folder
    (which stays if anything else is in it)."""
    pattern = re.compile(rf"{_FRAME_RE.pattern}|\.{_FRAME_RE.pattern}\.{PROCESS_ID}\.partial")
    for name in filter(pattern.fullmatch, os.listdir(folder)):
        os.remove(os.path.join(folder, name))
    with contextlib.suppress(OSError):
        os.rmdir(folder)


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


# ---------------------------------------------------------------------------------------------
# GIF: the blocks we write, and the walk that finds chunk boundaries


def _gif_header(height, width):
    """GIF89a, the logical screen (no global colour table, 8-bit colour resolution), looping."""
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0x70, 0, 0) + _GIF_LOOP


def _centiseconds(frame, fps):
    """When frame `frame` starts showing, in whole centiseconds (rounded half up)."""
    return math.floor(Fraction(100 * frame) / fps + Fraction(1, 2))


def _gif_frame(frame, delay):
    """One frame (height, width, 3) uint8 as GIF blocks, shown for `delay` centiseconds.

    Graphic control extension, image descriptor, local colour table (Pillow's octree palette of
    up to 256 colours, Floyd-Steinberg dithered) and LZW data, the last two lifted from the
    single-frame GIF Pillow writes.
    """
    image = Image.fromarray(frame)
    palette = image.quantize(256, method=Image.Quantize.FASTOCTREE)
    buffer = io.BytesIO()
    image.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(
        buffer, "GIF", interlace=False, optimize=False)
    data = buffer.getvalue()  # header, screen, global colour table, image descriptor, LZW data, trailer
    table_bits = data[10] & 7
    image_at = 13 + (3 << (table_bits + 1))
    if not data[10] & 0x80 or data[image_at] != ord(",") or data[image_at + 9] or data[-1] != ord(";"):
        raise RuntimeError("unexpected single-frame GIF layout from Pillow")
    height, width = frame.shape[:2]
    return (b"!\xf9\x04\x04" + struct.pack("<H", delay) + b"\x00\x00"  # disposal: keep, no transparency
            + b"," + struct.pack("<HHHHB", 0, 0, width, height, 0x80 | table_bits)
            + data[13:image_at] + data[image_at + 10:-1])


def _gif_resume_point(path, frames):
    """Where a GIF written by GifWriter holding at least `frames` frames is cut to keep exactly them.

    Returns ((height, width), offset of the chunk marker or trailer after those frames);
    ValueError if the file holds fewer complete frames or `frames` is not at a chunk boundary.
    """
    with open(path, "rb") as f:
        header = f.read(len(_gif_header(0, 0)))
        width, height = struct.unpack_from("<HH", header, 6) if len(header) >= 10 else (0, 0)
        if header != _gif_header(height, width):
            raise ValueError(f"cannot resume {path!r}: not a GIF written by video_io")
        total = 0
        for offset, total in _gif_chunk_boundaries(f):
            if total >= frames:
                break
    if total != frames:
        where = "not at a chunk boundary" if total > frames else f"only {total} complete frames"
        raise ValueError(f"cannot resume {path!r} at frame {frames}: {where}")
    return (height, width), offset


def _gif_chunk_boundaries(f):
    """Yield (offset, frames before it) of every chunk marker and of the trailer in a GIF file read
    from after its header; stops at the trailer, an unknown block, or where the file is cut."""
    frames = 0
    while True:
        offset, introducer = f.tell(), f.read(1)
        if introducer == b";":
            yield offset, frames
            return
        if introducer == b"!":
            label = f.read(1)
            first = _gif_sub_blocks(f)
            if first is None:
                return
            if label == b"\xff" and first == _GIF_CHUNK_ID:
                yield offset, frames
        elif introducer == b",":
            descriptor = f.read(9)
            if len(descriptor) < 9:
                return
            if descriptor[8] & 0x80:  # a local colour table
                f.seek(3 << ((descriptor[8] & 7) + 1), os.SEEK_CUR)
            if not f.read(1) or _gif_sub_blocks(f) is None:  # LZW minimum code size, data
                return
            frames += 1
        else:
            return


def _gif_sub_blocks(f):
    """Read a run of GIF data sub-blocks and its terminator: the first sub-block, None if cut."""
    first = None
    while (size := f.read(1)) != b"\0":
        block = f.read(size[0]) if size else b""
        if not size or len(block) < size[0]:
            return None
        first = block if first is None else first
    return b"" if first is None else first


# ---------------------------------------------------------------------------------------------
# Readers


def read_image(path, height, width, option=None):
    """An image file as a float tensor (3, height, width) in [-1, 1], resized to cover then centre-cropped.

    option: the command-line option that named the file (e.g. "--image"), to start error
    messages with; ValueError, one line, for a file that is missing or cannot be decoded.
    """
    name = _check_input(path, option, "an image")
    try:
        with Image.open(path) as image:
            pixels = np.array(image.convert("RGB"))  # (h, w, 3) uint8
    except Exception as error:  # Pillow raises many types for unreadable files
        raise ValueError(f"{name}: cannot decode it as an image ({_last_line(error)})") from None
    return _to_model_frames(pixels[None], height, width)[:, 0]


def read_video(path, height, width, last_frames=None, option=None, needed_for=None):
    """The last `last_frames` frames of a video file (all if None) and its frame rate.

    Returns (tensor (3, frames, height, width) in [-1, 1], fps). The video is streamed through
    ffmpeg; only the last `last_frames` decoded frames are held at a time. option: the
    command-line option that named the file (e.g. "--extend"), to start error messages with;
    needed_for: what needs the frames, for the message when there are fewer than `last_frames`
    (e.g. "the context": "--extend x.mp4 has 3 frames; the context needs 4"). ValueError, one
    line, for a file that is missing, cannot be decoded or is too short.
    """
    if last_frames is not None and last_frames < 1:
        raise ValueError(f"last_frames must be >= 1 or None, got {last_frames}")
    name = _check_input(path, option, "a video")
    kept = deque(maxlen=last_frames)
    reader = imageio_ffmpeg.read_frames(path)
    try:
        meta = next(reader)
        fps, (w, h) = meta["fps"], meta["size"]
        for frame in reader:
            kept.append(np.frombuffer(frame, np.uint8).reshape(h, w, 3))
    except Exception as error:  # imageio-ffmpeg raises many types, with ffmpeg's whole log
        raise ValueError(f"{name}: cannot decode it as a video ({_last_line(error)})") from None
    finally:
        reader.close()
    if not kept:
        raise ValueError(f"{name}: cannot decode it as a video (no frames)")
    if last_frames is not None and len(kept) < last_frames:
        needs = f"{needed_for} needs {last_frames}" if needed_for else f"{last_frames} are needed"
        raise ValueError(f"{name} has {len(kept)} frames; {needs}")
    return _to_model_frames(np.stack(kept), height, width), fps


def _check_input(path, option, kind):
    """The name of an input file for messages ("--extend x.mp4", or the path); ValueError if it
    is missing, a folder or empty. kind: "an image" or "a video"."""
    name = f"{option} {path}" if option else str(path)
    if os.path.isdir(path):
        raise ValueError(f"{name}: cannot decode it as {kind} (it is a folder)")
    if not os.path.isfile(path):
        raise ValueError(f"{name} does not exist")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{name}: cannot decode it as {kind} (the file is empty)")
    return name


def _last_line(error):
    """The last meaningful line of an error's message (ffmpeg logs: without the "[in#0 @ 0x..]" tag)."""
    lines = [re.sub(r"^\[[^]]*\]\s*", "", line).strip() for line in str(error).splitlines()]
    return next((line for line in reversed(lines) if line), type(error).__name__)


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
