"""video_io: writers decoded by an independent decoder (PyAV), kill and resume, readers, bad input."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import av
import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
import torch

import video_io

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
import sys, numpy as np, video_io
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
                             env=env, cwd=os.path.dirname(video_io.__file__), start_new_session=True)
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
        with pytest.raises(ValueError, match="4 frames"):
            writer.write_chunk(chunk(1)[:3])
    assert len(decode(tmp_path / "odd.mp4")[0]) == FRAMES
    write_video(path, [0])  # a new output replaces the old file
    assert len(decode(path)[0]) == FRAMES


# ---------------------------------------------------------------------------------------------
# GIF and PNG folders


def test_gif_round_trip(tmp_path):
    path = tmp_path / "out.gif"
    write_video(path, range(3))
    with av.open(str(path)) as container:
        frames = [f for f in container.decode(video=0)]
    durations = np.diff([float(f.pts * f.time_base) for f in frames])
    assert len(frames) == 12 and abs(durations.mean() - 1 / FPS) < 0.01
    pixels = np.stack([f.to_ndarray(format="rgb24") for f in frames])
    assert np.abs(pixels.astype(int) - expected(range(3))).max() <= 2  # <= 256 colours: near exact
    with pytest.raises(ValueError, match="GIF cannot be resumed"):
        video_io.open_writer(str(path), FPS, resume_frames=4)


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
    with pytest.raises(ValueError, match="fewer than last_frames=13"):
        video_io.read_video(str(path), 24, 32, last_frames=13)
    with pytest.raises(ValueError, match="does not exist"):
        video_io.read_video(str(tmp_path / "missing.mp4"), 24, 32)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="bad.mp4"):
        video_io.read_video(str(tmp_path / "bad.mp4"), 24, 32)
