"""video_io: writers decoded by independent decoders (PyAV, Pillow), kills at random points and
simulated crashes, a full disk, resume, new outputs that replace old ones, readers, bad input."""

import errno
import itertools
import os
import random
import signal
import subprocess
import sys
import time

import av
import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from infra import video_io

FPS, FRAMES, HEIGHT, WIDTH = 6, 4, 48, 64
COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 50, 210], [230, 200, 40], [150, 60, 200]], np.uint8)


def chunk(k, height=HEIGHT, width=WIDTH):
    """Chunk k: (FRAMES, height, width, 3) uint8, a solid colour per chunk with a frame-dependent ramp."""
    frames = np.broadcast_to(COLOURS[k % len(COLOURS)], (FRAMES, height, width, 3)).copy()
    frames[..., 1] += np.arange(FRAMES, dtype=np.uint8)[:, None, None] * 10
    return frames


def decode(path):
    """PyAV decode: (frames (n, h, w, 3) uint8, fps, codec, pix_fmt, packet bytes, keyframe flags)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.size]
        frames = [f.to_ndarray(format="rgb24") for p in packets for f in p.decode()]
        frames += [f.to_ndarray(format="rgb24") for f in stream.codec_context.decode(None)]
        fps = float(stream.average_rate) if stream.average_rate else None
        info = stream.codec_context.name, stream.codec_context.pix_fmt
    return np.stack(frames), fps, *info, [bytes(p) for p in packets], [p.is_keyframe for p in packets]


def expected(chunks):
    return np.concatenate([chunk(k) for k in chunks])


def write_video(path, chunks, **kwargs):
    with video_io.open_writer(str(path), FPS, **kwargs) as writer:
        for k in chunks:
            writer.write_chunk(chunk(k))
    return writer


def frames_of(path):
    """An output's frames (n, h, w, 3) uint8: a folder's PNG files numbered without a gap from
    frame_000000.png, or a file decoded by PyAV (a GIF: Pillow must decode the same frames,
    imageio as many)."""
    path = str(path)
    if os.path.isdir(path):
        names = itertools.takewhile(os.path.isfile, (os.path.join(path, f"frame_{i:06d}.png") for i in itertools.count()))
        frames = [np.asarray(Image.open(name)) for name in names]
    else:
        with av.open(path) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        if ".gif" in os.path.basename(path):
            np.testing.assert_array_equal(np.stack(gif_frames(path)[0]), np.stack(frames))
            assert len(iio.imread(path, index=None)) == len(frames)
    return np.stack(frames) if frames else np.zeros((0, HEIGHT, WIDTH, 3), np.uint8)


def gif_frames(path):
    """Pillow's decode of a GIF: (frames, each (h, w, 3) uint8; durations in milliseconds)."""
    frames, durations = [], []
    with Image.open(path) as image:
        for i in range(image.n_frames):
            image.seek(i)
            frames.append(np.asarray(image.convert("RGB")))
            durations.append(image.info["duration"])
    return frames, durations


def assert_frames(path, chunks):
    """`path` (or its temporary) holds exactly the frames of `chunks` (PNG exact; GIF within 2, MP4
    within 4 levels)."""
    frames, want, name = frames_of(path), expected(chunks), os.path.basename(path)
    tolerance = 2 if ".gif" in name else 4 if ".mp4" in name else 0
    assert frames.shape == want.shape and np.abs(frames.astype(int) - want).max() <= tolerance


def snapshot(root):
    """{relative path: bytes (None for a folder)} of everything under root, hidden files included."""
    files = {}
    for folder, subfolders, names in os.walk(root):
        for name in subfolders:
            files[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                files[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return files


def temporaries(root):
    return [name for name in snapshot(root) if name.endswith(".partial")]


def fail_at(monkeypatch, step, error):
    """From now on, call number `step` (from 0) of os.pwrite or os.fsync raises `error`; a failing
    pwrite first writes half of its bytes, as a full disk or a kill can leave."""
    calls = itertools.count()
    pwrite, fsync = os.pwrite, os.fsync

    def failing(real):
        def call(fd, *args):
            if next(calls) == step:
                if real is pwrite:
                    pwrite(fd, bytes(args[0])[:len(args[0]) // 2], args[1])
                raise error
            return real(fd, *args)
        return call
    monkeypatch.setattr(video_io.os, "pwrite", failing(pwrite))
    monkeypatch.setattr(video_io.os, "fsync", failing(fsync))


def completes_despite_a_crash_at(monkeypatch, step, writer, frames):
    """Write `frames` with a crash at the `step`-th write or flush; True if the chunk was complete
    before that step came (there is no later step to crash at)."""
    with monkeypatch.context() as patch:
        fail_at(patch, step, Crash())
        try:
            writer.write_chunk(frames)
            return True
        except Crash:
            return False


OUTPUTS = ["out.mp4", "out.gif", "frames/"]


# ---------------------------------------------------------------------------------------------
# MP4


def test_mp4_round_trip_plays_after_every_chunk(tmp_path):
    path = tmp_path / "out.mp4"
    with video_io.open_writer(str(path), FPS, frames_per_chunk=FRAMES) as writer:
        for k in range(3):
            writer.write_chunk(chunk(k))
            assert len(decode(path)[0]) == (k + 1) * FRAMES  # playable before close
    assert writer.frames_written == 12
    frames, fps, codec, pix_fmt, _, keyframes = decode(path)
    assert (frames.shape, fps, codec, pix_fmt) == ((12, HEIGHT, WIDTH, 3), FPS, "h264", "yuv420p")
    assert keyframes == [i % FRAMES == 0 for i in range(12)]  # each chunk starts with a keyframe
    assert np.abs(frames.astype(int) - expected(range(3))).max() <= 4


CHILD = """
import sys, numpy as np
from infra import video_io
sys.path.insert(0, {tests!r})
from test_video_io import chunk, FPS
writer = video_io.open_writer({path!r}, FPS)
for k in range(10):
    writer.write_chunk(chunk(k))
    print(k + 1, flush=True)
"""

# Stands in for ffmpeg: the third run encodes chunk 3, says so, then hangs, holding its output
# open, so the kill lands while chunk 3 is in flight (encoded, not yet returned by write_chunk).
FFMPEG_WRAPPER = """#!/bin/sh
n=$(ls "{marks}" | wc -l)
touch "{marks}/run$n"
"{ffmpeg}" "$@" || exit $?
if [ "$n" -ge 2 ]; then touch "{marks}/encoded"; sleep 60; fi
"""


def kill_after_two_chunks(path, tmp_path):
    """Run a writer in a child process; SIGKILL its process group (ffmpeg included) mid chunk 3."""
    marks, wrapper = tmp_path / "marks", tmp_path / "ffmpeg.sh"
    marks.mkdir()
    wrapper.write_text(FFMPEG_WRAPPER.format(marks=marks, ffmpeg=imageio_ffmpeg.get_ffmpeg_exe()))
    wrapper.chmod(0o755)
    code = CHILD.format(tests=os.path.dirname(__file__), path=str(path))
    env = {**os.environ, "IMAGEIO_FFMPEG_EXE": str(wrapper)}
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env=env, cwd=os.path.dirname(os.path.dirname(video_io.__file__)), start_new_session=True)
    try:
        assert child.stdout.readline().strip() == "1"
        assert child.stdout.readline().strip() == "2"
        deadline = time.monotonic() + 20
        while not (marks / "encoded").exists():
            assert time.monotonic() < deadline and child.poll() is None, "chunk 3 never reached ffmpeg"
            time.sleep(0.01)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def test_mp4_kill_then_resume_equals_uninterrupted(tmp_path):
    path = tmp_path / "killed.mp4"
    kill_after_two_chunks(path, tmp_path)
    killed, fps, codec, pix_fmt, killed_packets, _ = decode(path)
    assert (killed.shape, fps, codec, pix_fmt) == ((8, HEIGHT, WIDTH, 3), FPS, "h264", "yuv420p")
    assert np.abs(killed.astype(int) - expected(range(2))).max() <= 4

    writer = write_video(path, [2, 3], resume_frames=8)
    assert writer.frames_written == 16
    frames, fps, _, _, packets, keyframes = decode(path)
    assert frames.shape[0] == 16 and fps == FPS and keyframes == [i % FRAMES == 0 for i in range(16)]
    assert packets[:8] == killed_packets  # the old frames were not re-encoded
    np.testing.assert_array_equal(frames[:8], killed)
    assert np.abs(frames.astype(int) - expected(range(4))).max() <= 4
    write_video(tmp_path / "whole.mp4", range(4))
    assert path.read_bytes() == (tmp_path / "whole.mp4").read_bytes()  # deterministic encoding


class Crash(Exception):
    pass


def crash_before_commit(monkeypatch):
    """Make the next write_chunk stop after writing its fragment, before the 4-byte commit."""
    def fsync(fd):
        raise Crash
    monkeypatch.setattr(video_io.os, "fsync", fsync)


def test_mp4_uncommitted_and_cut_tails_are_invisible_and_dropped_on_resume(tmp_path, monkeypatch):
    path = tmp_path / "out.mp4"
    write_video(path, range(3))
    whole = path.read_bytes()
    path.write_bytes(whole + whole[-300:])  # a cut box after three complete chunks
    assert len(decode(path)[0]) == 12

    writer = video_io.open_writer(str(path), FPS, resume_frames=8)  # the state file said 2 chunks
    assert len(decode(path)[0]) == 8
    writer.write_chunk(chunk(2))
    with monkeypatch.context() as patch:
        crash_before_commit(patch)
        with pytest.raises(Crash):
            writer.write_chunk(chunk(3))  # the resumed run dies too: its fragment is not committed
    writer.close()
    assert os.path.getsize(path) > len(whole)
    frames = decode(path)[0]
    assert len(frames) == 12 and np.abs(frames.astype(int) - expected(range(3))).max() <= 4

    write_video(path, [3], resume_frames=12)
    assert len(decode(path)[0]) == 16


def test_mp4_bad_resume_and_sizes(tmp_path):
    path = tmp_path / "out.mp4"
    write_video(path, range(2))
    before = path.read_bytes()
    for frames, message in [(12, "only 8 complete frames"), (6, "not at a chunk boundary")]:
        with pytest.raises(ValueError, match=message):
            video_io.open_writer(str(path), FPS, resume_frames=frames)
    with pytest.raises(ValueError, match="frames_per_chunk"):
        video_io.open_writer(str(path), FPS, frames_per_chunk=3, resume_frames=8)
    with video_io.open_writer(str(path), FPS + 1, resume_frames=8) as writer:
        with pytest.raises(ValueError, match="header differs"):
            writer.write_chunk(chunk(2))
        with pytest.raises(ValueError, match="holds 48x64"):
            writer.write_chunk(chunk(2, 32, 32))
    assert path.read_bytes() == before
    with video_io.open_writer(str(tmp_path / "odd.mp4"), FPS) as writer:
        with pytest.raises(ValueError, match="even width and height"):
            writer.write_chunk(chunk(0, 47, 64))
        writer.write_chunk(chunk(0))
        with pytest.raises(ValueError, match="uint8"):
            writer.write_chunk(chunk(1).astype(np.float32))
        writer.write_chunk(chunk(1)[:3])  # chunks may differ in length (a refiner's run writes such)
    assert len(decode(tmp_path / "odd.mp4")[0]) == FRAMES + 3
    with video_io.open_writer(str(tmp_path / "fixed.mp4"), FPS, frames_per_chunk=FRAMES) as writer:
        with pytest.raises(ValueError, match="4 frames"):
            writer.write_chunk(chunk(1)[:3])
    write_video(path, [0])  # a new output replaces the old file
    assert len(decode(path)[0]) == FRAMES


# ---------------------------------------------------------------------------------------------
# GIF and PNG folders


def test_gif_round_trip_timing_and_loop(tmp_path):
    path = tmp_path / "out.gif"
    with video_io.open_writer(str(path), FPS) as writer:
        for k in range(3):
            writer.write_chunk(chunk(k))
            assert_frames(path, range(k + 1))  # readable before close
    with av.open(str(path)) as container:
        starts = [f.pts * f.time_base for f in container.decode(video=0)]
    assert [round(100 * t) for t in starts] == [int(100 * i / FPS + 0.5) for i in range(12)]  # 0, 17, 33, 50
    with Image.open(path) as image:
        assert image.info["loop"] == 0  # forever
    durations = gif_frames(path)[1]
    assert sum(durations) == 2000 and set(durations) == {160, 170}  # exact in total: 12 frames at 6 fps
    x, fps = video_io.read_video(str(path), HEIGHT, WIDTH)
    assert x.shape == (3, 12, HEIGHT, WIDTH) and round(fps) == FPS


def test_gif_resume_equals_uninterrupted(tmp_path):
    path, whole = tmp_path / "out.gif", tmp_path / "whole.gif"
    write_video(whole, range(4))
    write_video(path, range(3))
    assert video_io.check_output_path(str(path), resume_frames=8) == "gif"
    for frames, message in [(16, "only 12 complete frames"), (6, "not at a chunk boundary")]:
        with pytest.raises(ValueError, match=message):
            video_io.open_writer(str(path), FPS, resume_frames=frames)
    writer = write_video(path, [2, 3], resume_frames=8)  # the third chunk is cut and written again
    assert writer.frames_written == 16 and writer.in_place
    assert path.read_bytes() == whole.read_bytes()
    write_video(path, [4], resume_frames=16)
    assert_frames(path, [0, 1, 2, 3, 4])
    Image.fromarray(chunk(0)[0]).save(tmp_path / "other.gif")
    with pytest.raises(ValueError, match="not a GIF written by video_io"):
        video_io.open_writer(str(tmp_path / "other.gif"), FPS, resume_frames=1)
    with pytest.raises(ValueError, match="holds 48x64"):
        with video_io.open_writer(str(path), FPS, resume_frames=20) as writer:
            writer.write_chunk(chunk(0, 32, 32))


def test_png_folder_round_trip_and_resume(tmp_path):
    folder = tmp_path / "frames"
    write_video(str(folder) + "/", range(3))
    names = sorted(os.listdir(folder))
    assert names == [f"frame_{i:06d}.png" for i in range(12)]
    np.testing.assert_array_equal(np.stack([iio.imread(folder / n) for n in names]), expected(range(3)))

    writer = write_video(folder, [5], resume_frames=8)  # frames 8..11 are replaced
    assert writer.frames_written == 12 and len(os.listdir(folder)) == 12
    np.testing.assert_array_equal(iio.imread(folder / "frame_000008.png"), chunk(5)[0])
    with pytest.raises(ValueError, match="frames missing"):
        video_io.open_writer(str(folder), FPS, resume_frames=16)
    write_video(folder, [1])  # a new output replaces the old frames
    assert len(os.listdir(folder)) == FRAMES


# ---------------------------------------------------------------------------------------------
# Crashes and kills, new outputs over old ones, stale temporaries, a full disk


@pytest.mark.parametrize("name", ["out.mp4", "out.gif"])
def test_crash_at_every_write_keeps_returned_chunks_and_resumes(tmp_path, monkeypatch, name):
    """A crash at each os.pwrite (half written) and os.fsync of an append: the file shows the chunks
    before it; only after the last flush began does it show the new one; resuming gives the file
    an uninterrupted run writes."""
    path, whole = tmp_path / name, tmp_path / "whole" / name
    whole.parent.mkdir()
    write_video(whole, range(4))
    write_video(path, range(2))
    two_chunks = path.read_bytes()
    shown = []
    for step in itertools.count():
        path.write_bytes(two_chunks)
        writer = video_io.open_writer(str(path), FPS, resume_frames=8)
        if completes_despite_a_crash_at(monkeypatch, step, writer, chunk(2)):
            break
        writer.close()
        frames = frames_of(path)
        shown.append(len(frames))
        assert_frames(path, range(len(frames) // FRAMES))
        write_video(path, [2, 3], resume_frames=8)
        assert path.read_bytes() == whole.read_bytes()
    assert shown == [8, 8, 8, 12]  # body, its flush, the switch, its flush


def kill_writer_at(path, delay):
    """Fork a child (its own process group) that writes chunks 0..4 to a new output at `path` and
    says when each write_chunk returned; SIGKILL its process group after `delay` seconds. Returns
    how many write_chunk calls had returned."""
    said, say = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.setpgid(0, 0)
            with video_io.open_writer(str(path), FPS) as writer:
                for k in range(5):
                    writer.write_chunk(chunk(k))
                    os.write(say, b"x")
            status = 0
        finally:
            os._exit(status)
    os.close(say)
    os.setpgid(pid, pid)  # also here: no race with the child's own call
    time.sleep(delay)
    os.killpg(pid, signal.SIGKILL)  # the group still exists: the child is not reaped yet
    _, status = os.waitpid(pid, 0)
    with os.fdopen(said, "rb") as f:
        returned = len(f.read())
    assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0
    return returned


@pytest.mark.parametrize("name", OUTPUTS)
def test_kill_at_random_points_keeps_returned_chunks(tmp_path, name):
    """Over an old output, a new run is killed (its process group, ffmpeg included) at random
    times: the output is the old one until the new first chunk is complete, then holds whole
    chunks only, at least those whose write_chunk returned; resuming gives the whole video."""
    path, whole = tmp_path / name, tmp_path / "whole" / name
    whole.parent.mkdir()
    started = time.monotonic()
    write_video(whole, range(5))
    seconds = time.monotonic() - started
    old_chunk = [4]
    rng = random.Random(0)
    for _ in range(8):
        write_video(path, old_chunk)
        returned = kill_writer_at(path, rng.uniform(0, 1.2 * seconds))
        frames, old = frames_of(path), expected(old_chunk)
        if returned == 0 and len(frames) == len(old) and np.abs(frames.astype(int) - old).max() <= 4:
            pass  # not in place yet
        elif returned == 0 and name == "frames/" and len(frames) == 0:
            pass  # killed after the old frames were removed, before the new ones were renamed in
        else:
            assert len(frames) % FRAMES == 0 and returned <= len(frames) // FRAMES <= returned + 1
            assert_frames(path, range(len(frames) // FRAMES))
        write_video(path, range(returned, 5), resume_frames=returned * FRAMES or None)
        assert not temporaries(tmp_path)
        if name == "frames/":
            assert sorted(os.listdir(path)) == sorted(os.listdir(whole))  # nothing after a gap
            np.testing.assert_array_equal(frames_of(path), frames_of(whole))
        else:
            assert path.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("name", OUTPUTS)
def test_new_output_replaces_the_old_one_only_once_its_first_chunk_is_complete(tmp_path, monkeypatch, name):
    path = tmp_path / name
    with video_io.open_writer(str(path), FPS) as writer:  # no old output: a failed start leaves nothing
        assert not writer.in_place and temporaries(tmp_path)
    assert not os.path.exists(path) and not snapshot(tmp_path)

    write_video(path, range(2))
    (tmp_path / "frames-notes.txt").write_bytes(b"mine")
    if name == "frames/":
        (path / "notes.txt").write_bytes(b"mine")  # not a frame: never removed
    old = snapshot(tmp_path)
    for step in itertools.count():  # a crash at every write and flush of the first chunk
        writer = video_io.open_writer(str(path), FPS)
        assert not writer.in_place
        assert [os.path.basename(t) for t in temporaries(tmp_path)] == (
            [f".{name.strip('/')}.{os.getpid()}.partial"] if name != "frames/" else [])
        if completes_despite_a_crash_at(monkeypatch, step, writer, chunk(4)):
            break
        assert not writer.in_place
        writer.close()
        assert not temporaries(tmp_path)
        if snapshot(tmp_path) != old:  # the crash came after the old output was replaced:
            if name == "frames/" and len(frames_of(path)) == 0:
                pass  # the old frames are removed, the new ones not yet renamed in (PngFolderWriter)
            else:
                assert_frames(path, [4])  # the new output, only not flushed into its folder
            write_video(path, range(2))
    assert step > 0 and writer.in_place and not temporaries(tmp_path)
    assert_frames(path, [4])
    writer.write_chunk(chunk(0))
    writer.close()
    assert_frames(path, [4, 0])
    assert (tmp_path / "frames-notes.txt").read_bytes() == b"mine"
    if name == "frames/":
        assert (path / "notes.txt").read_bytes() == b"mine"


@pytest.mark.parametrize("name", OUTPUTS)
def test_before_placing_sees_the_complete_first_chunk_just_before_it_is_placed(tmp_path, name):
    path, seen = tmp_path / name, []

    def placing(temporary):
        assert not os.path.exists(path)
        assert_frames(temporary, [0])
        seen.append(temporary)
    with video_io.open_writer(str(path), FPS, before_placing=placing) as writer:
        writer.write_chunk(chunk(0))
        writer.write_chunk(chunk(1))
    assert seen == [str(tmp_path / f".{name.strip('/')}.{os.getpid()}.partial")]
    assert_frames(path, [0, 1])

    def failing(temporary):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "state.pt")
    old = snapshot(tmp_path)
    writer = video_io.open_writer(str(path), FPS, before_placing=failing)
    with pytest.raises(OSError) as error:
        writer.write_chunk(chunk(2))
    writer.close()
    assert error.value.filename == "state.pt" and not writer.in_place
    assert snapshot(tmp_path) == old  # a folder that exists: called with None before its old frames go

    existing = []
    with video_io.open_writer(str(path), FPS, before_placing=existing.append) as writer:
        writer.write_chunk(chunk(3))
    assert existing == ([None] if name == "frames/" else [str(tmp_path / f".{name.strip('/')}.{os.getpid()}.partial")])
    assert_frames(path, [3])


@pytest.mark.parametrize("name", OUTPUTS)
def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, name):
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive, path, base = os.getppid(), tmp_path / name, name.strip("/")
    for pid in (dead.pid, alive):
        temporary = tmp_path / f".{base}.{pid}.partial"
        if name == "frames/":  # a PNG writer's temporary folder, with a frame
            temporary.mkdir()
            (temporary / "frame_000000.png").write_bytes(b"x")
        else:
            temporary.write_bytes(b"x")
    (tmp_path / f".other.mp4.{dead.pid}.partial").write_bytes(b"x")  # another output's
    write_video(path, [0])
    kept = [f".{base}.{alive}.partial", f".other.mp4.{dead.pid}.partial"]
    if name == "frames/":  # and the temporaries of frames in the folder
        for pid in (dead.pid, alive):
            (path / f".frame_000004.png.{pid}.partial").write_bytes(b"x")
        write_video(path, [1], resume_frames=4)
        kept += [f".{base}.{alive}.partial/frame_000000.png", f"{base}/.frame_000004.png.{alive}.partial"]
    assert sorted(n for n in snapshot(tmp_path) if ".partial" in n) == sorted(kept)
    assert_frames(path, [0, 1] if name == "frames/" else [0])


@pytest.mark.parametrize("name", OUTPUTS)
def test_names_that_only_look_like_temporaries_or_frames_are_left_alone(tmp_path, name):
    """A process id of 20 digits (an OverflowError in os.kill before), Unicode digits of a dead
    process (int() reads them), a leading zero: not names we write, so never removed."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    arabic = "".join(chr(0x660 + int(digit)) for digit in str(dead.pid))
    path, base = tmp_path / name, name.strip("/")
    hostile = [f".{base}.99999999999999999999.partial", f".{base}.{arabic}.partial", f".{base}.0{dead.pid}.partial"]
    for entry in hostile:
        (tmp_path / entry).write_bytes(b"mine")
    if name == "frames/":  # and in the folder: a frame's temporaries, a frame numbered in Arabic-Indic digits
        path.mkdir()
        inside = [".frame_000000.png.99999999999999999999.partial", f".frame_000000.png.{arabic}.partial",
                  "frame_" + chr(0x660) * 6 + ".png"]
        for entry in inside:
            (path / entry).write_bytes(b"mine")
        hostile += [f"{base}/{entry}" for entry in inside]
    write_video(path, [0])
    write_video(path, [1])
    assert all(snapshot(tmp_path)[entry] == b"mine" for entry in hostile)
    assert_frames(path, [1])


@pytest.mark.parametrize("name", OUTPUTS)
def test_full_disk_keeps_the_complete_chunks_and_resumes_once_there_is_space(tmp_path, monkeypatch, name):
    """ENOSPC at each os.pwrite (half written) and os.fsync of a chunk: OSError naming the output,
    nothing of the chunk left (no partial PNG frame, no temporary), and a resume completes the video."""
    path, whole = tmp_path / name, tmp_path / "whole" / name
    whole.parent.mkdir()
    write_video(whole, range(3))
    writer = video_io.open_writer(str(path), FPS)
    writer.write_chunk(chunk(0))
    before = snapshot(tmp_path)
    for step in itertools.count():
        with monkeypatch.context() as patch:
            fail_at(patch, step, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
            try:
                writer.write_chunk(chunk(1))
                break
            except OSError as error:
                assert (error.errno, error.filename) == (errno.ENOSPC, str(path))
                assert f"No space left on device: '{path}'" in str(error)
        assert writer.frames_written == 4 and snapshot(tmp_path) == before
        writer.close()
        writer = video_io.open_writer(str(path), FPS, resume_frames=4)
    assert step > 0
    writer.write_chunk(chunk(2))
    writer.close()
    if name == "frames/":
        np.testing.assert_array_equal(frames_of(path), frames_of(whole))
    else:
        assert path.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("name", OUTPUTS)
def test_an_error_names_the_output_never_its_hidden_temporary(tmp_path, name):
    """docs/guarantees.md: "... while writing PATH", the output the user gave. An output whose name
    fits but whose hidden temporary's does not (255 bytes a name) fails at open; a folder where a
    file goes (or a file where a folder goes) fails the rename that places the first chunk."""
    path = str(tmp_path / ("a" * 250 + os.path.splitext(name.strip("/"))[1]))
    with pytest.raises(OSError) as error:
        write_video(path, [0])
    assert (error.value.errno, error.value.filename) == (errno.ENAMETOOLONG, path) and not snapshot(tmp_path)

    path = str(tmp_path / name)
    writer = video_io.open_writer(path, FPS)
    if name == "frames/":
        open(path, "wb").close()  # a file where the folder goes
    else:
        os.mkdir(path)  # a folder where the file goes
        open(os.path.join(path, "mine"), "wb").close()
    with pytest.raises(OSError) as error:
        writer.write_chunk(chunk(0))
    assert error.value.filename == path and not temporaries(tmp_path)


# ---------------------------------------------------------------------------------------------
# Bad output paths


def test_bad_output_paths_create_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"unknown extension '\.avi'.*'\.mp4', '\.gif'"):
        video_io.open_writer(str(tmp_path / "out.avi"), FPS)
    with pytest.raises(ValueError, match="does not exist"):
        video_io.check_output_path(str(tmp_path / "missing" / "out.mp4"))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ValueError, match="does not exist"):
        video_io.check_output_path(str(tmp_path / "file" / "out.mp4"))
    with pytest.raises(ValueError, match="not a folder"):
        video_io.check_output_path(str(tmp_path / "file") + "/")
    with pytest.raises(ValueError, match="cannot resume"):
        video_io.open_writer(str(tmp_path / "new.mp4"), FPS, resume_frames=4)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere
        assert video_io.check_output_path(str(locked / "out.mp4")) == "mp4"
    else:
        with pytest.raises(ValueError, match="not writable"):
            video_io.check_output_path(str(locked / "out.mp4"))
    assert sorted(os.listdir(tmp_path)) == ["file", "locked"] and not os.listdir(locked)


# ---------------------------------------------------------------------------------------------
# Readers


def test_read_image_covers_and_centre_crops(tmp_path):
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :20] = [0, 255, 0]
    image[:, 20:60] = [255, 0, 0]
    image[:, 60:] = [0, 0, 255]
    iio.imwrite(tmp_path / "a.png", image)
    x = video_io.read_image(str(tmp_path / "a.png"), 40, 40)  # no resize: the red middle, exact
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32
    assert torch.equal(x, torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 40, 40))
    y = video_io.read_image(str(tmp_path / "a.png"), 24, 32)  # scaled by 0.6 to 24x48, cropped
    assert y.shape == (3, 24, 32) and y.min() >= -1 and y.max() <= 1
    assert (y[0, :, 6:-6] > 0.95).all() and (y[1:, :, 6:-6] < -0.95).all()
    with pytest.raises(ValueError, match="does not exist"):
        video_io.read_image(str(tmp_path / "missing.png"), 8, 8)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        video_io.read_image(str(tmp_path / "bad.png"), 8, 8)


def test_read_video_last_frames(tmp_path):
    path = tmp_path / "in.mp4"
    write_video(path, range(3))
    x, fps = video_io.read_video(str(path), 24, 32, last_frames=5)
    assert x.shape == (3, 5, 24, 32) and fps == FPS and x.min() >= -1 and x.max() <= 1
    colours = (x.mean(dim=(2, 3)).T + 1) * 127.5  # (5, 3) mean colour per frame
    want = expected(range(3))[-5:].reshape(5, -1, 3).mean(1)
    assert np.abs(colours.numpy() - want).max() < 4
    assert video_io.read_video(str(path), HEIGHT, WIDTH)[0].shape == (3, 12, HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="has 12 frames; 13 are needed"):
        video_io.read_video(str(path), 24, 32, last_frames=13)
    with pytest.raises(ValueError) as error:
        video_io.read_video(str(path), 24, 32, last_frames=13, option="--extend", needed_for="the context")
    assert str(error.value) == f"--extend {path} has 12 frames; the context needs 13"
    with pytest.raises(ValueError, match="does not exist"):
        video_io.read_video(str(tmp_path / "missing.mp4"), 24, 32)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="bad.mp4"):
        video_io.read_video(str(tmp_path / "bad.mp4"), 24, 32)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty", "folder", "missing"])
def test_undecodable_inputs_give_one_line_value_errors(tmp_path, kind):
    video, image = tmp_path / "x.mp4", tmp_path / "x.png"
    write_video(tmp_path / "good.mp4", range(2))
    iio.imwrite(tmp_path / "good.png", np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8))
    good_png = (tmp_path / "good.png").read_bytes()
    content = {"garbage": (b"not a video " * 10, b"not an image " * 10), "empty": (b"", b""),
               "truncated": ((tmp_path / "good.mp4").read_bytes()[:300], good_png[:len(good_png) // 2])}
    for path, data in zip((video, image), content.get(kind, (None, None))):
        if kind == "folder":
            path.mkdir()
        elif data is not None:
            path.write_bytes(data)
    for read, path, option, what in [(video_io.read_video, video, "--extend", "a video"),
                                     (video_io.read_image, image, "--image", "an image")]:
        with pytest.raises(ValueError) as error:
            read(str(path), 8, 8, option=option)
        message = str(error.value)
        want = f"{option} {path} does not exist" if kind == "missing" else f"{option} {path}: cannot decode it as {what} ("
        assert message.startswith(want) and "\n" not in message and "last_frames" not in message, message
