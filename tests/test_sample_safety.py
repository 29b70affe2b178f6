"""sample.py's safety for files and input (issue 10): the output lock, --overwrite that keeps the
old video until the new one's first chunk is on disk, failed starts that leave nothing, inputs
that are never overwritten, --resume's checks, killed and disk-full runs that resume exactly, and
bad options refused before any file is made.

A tiny random checkpoint is written once; `sample.main` runs in-process (it raises ValueError for
bad input, the command line prints `error: ...`), and in subprocesses for the kill and for the
command line's one-line errors.
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import endless
import sample
import vae
from infra.run_state import OutputLock
from pipeline import StableDiffusionXLVideoPipeline

REPOSITORY = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--frames", "2", "--context-frames", "1", "--height", "32", "--width", "48"]
PROMPT = ["--prompt", "a red circle"]


def run(model, out, *arguments, prompt=PROMPT):
    sample.main(["--model", str(model), "--out", str(out), *FAST, *prompt, *arguments])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes); folders as None."""
    return {str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes()
            for path in sorted(folder.rglob("*"))}


def video_bytes(out: Path):
    """A video file's bytes, or a PNG folder's files and their bytes."""
    return snapshot(out) if out.is_dir() else out.read_bytes()


def state_file(out) -> Path:
    return endless.state_path(str(out))


def leftovers(folder: Path) -> list[str]:
    """Temporaries and locks that a run must not leave behind."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial", ".sample.lock")))


def gif_frames(path) -> int:
    """Frames of a GIF, every one decoded by Pillow (an independent reader)."""
    with Image.open(path) as image:
        for index in range(image.n_frames):
            image.seek(index)
            image.convert("RGB").load()
        return image.n_frames


# ---------------------------------------------------------------------------------------------
# 1. The lock


def test_a_second_run_on_a_locked_output_is_refused_naming_the_holder(model, tmp_path):
    out = tmp_path / "video.gif"
    with OutputLock(str(out)):
        with pytest.raises(ValueError, match=rf"being written by process {os.getpid()}\b.*video\.gif\.sample\.lock"):
            run(model, out, "--chunks", "1")
        assert sorted(os.listdir(tmp_path)) == ["video.gif.sample.lock"]  # nothing but the holder's lock
    assert list(tmp_path.iterdir()) == []


def test_a_stale_lock_file_does_not_block_and_the_lock_is_removed_after_a_run(model, tmp_path):
    out = tmp_path / "video.gif"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "video.gif.sample.lock"
    lock.write_text(f"{int(dead.stdout)}\n")  # its process is gone, and so is its flock
    run(model, out, "--chunks", "1")
    assert sorted(os.listdir(tmp_path)) == ["video.gif", "video.gif.state.pt"]
    with pytest.raises(ValueError, match="--overwrite"):  # a failed run removes its lock too
        run(model, out, "--chunks", "1")
    assert sorted(os.listdir(tmp_path)) == ["video.gif", "video.gif.state.pt"]


def test_a_file_of_the_lock_s_name_that_is_not_a_lock_is_refused_and_kept(model, tmp_path):
    out = tmp_path / "frames"
    theirs = tmp_path / "frames.sample.lock"
    theirs.write_text("my notes\n")
    with pytest.raises(ValueError, match=r"frames\.sample\.lock exists and is not a lock of sample\.py"):
        run(model, out, "--chunks", "1")
    assert theirs.read_text() == "my notes\n" and sorted(os.listdir(tmp_path)) == ["frames.sample.lock"]


# ---------------------------------------------------------------------------------------------
# 2., 3. --overwrite and failed starts


def fail_in_decode(monkeypatch, error):
    def decode_video(self, *args, **kwargs):
        raise error
    monkeypatch.setattr(vae.AutoencoderKL, "decode_video", decode_video)


def fail_in_call(monkeypatch, error):
    def call(self, **kwargs):
        raise error
    monkeypatch.setattr(StableDiffusionXLVideoPipeline, "__call__", call)


def fail_at_placing(monkeypatch, error):
    """The first chunk is complete in its temporary; the rename that puts it in place is interrupted."""
    replace = os.replace

    def failing(source, target, *args, **kwargs):
        if str(source).endswith(".partial"):
            raise error
        return replace(source, target, *args, **kwargs)
    monkeypatch.setattr(os, "replace", failing)


@pytest.mark.parametrize("name, fail, error", [
    *((name, fail_in_decode, KeyboardInterrupt()) for name in ("video.mp4", "video.gif", "frames")),
    *((name, fail_in_call, RuntimeError("boom")) for name in ("video.mp4", "video.gif", "frames")),
    # (An existing PNG folder has no single rename: its old frames go once the new ones are on disk.)
    *((name, fail_at_placing, KeyboardInterrupt()) for name in ("video.mp4", "video.gif")),
], ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else getattr(value, "__name__", value))
def test_overwrite_keeps_the_old_video_and_state_until_the_first_chunk_is_in_place(model, tmp_path, monkeypatch,
                                                                                     name, fail, error):
    out = tmp_path / name
    run(model, out, "--chunks", "2", "--seed", "1")
    before = snapshot(tmp_path)
    assert state_file(out).name in before
    fail(monkeypatch, error)
    if isinstance(error, KeyboardInterrupt):
        run(model, out, "--chunks", "2", "--seed", "2", "--overwrite")  # stops, as Ctrl-C does
    else:
        with pytest.raises(RuntimeError, match="boom"):
            run(model, out, "--chunks", "2", "--seed", "2", "--overwrite")
    assert snapshot(tmp_path) == before
    monkeypatch.undo()
    sample.main(["--out", str(out), "--resume", "--chunks", "3"])  # the old state still describes the old video
    fresh = tmp_path / "fresh" / name
    fresh.parent.mkdir()
    run(model, fresh, "--chunks", "3", "--seed", "1")
    assert video_bytes(out) == video_bytes(fresh)


@pytest.mark.parametrize("name", ["video.gif", "frames"])
def test_after_an_overwrite_the_state_describes_the_new_video_and_resume_continues_it(model, tmp_path, name):
    out = tmp_path / "replaced" / name
    out.parent.mkdir()
    run(model, out, "--chunks", "2", "--seed", "1")
    run(model, out, "--chunks", "1", "--seed", "2", "--overwrite", prompt=["--prompt", "a blue square"])
    settings, state, pending = endless.load_state(state_file(out))
    assert (settings.seed, settings.timeline, state.frames_written, pending) == (2, [(0, "a blue square")], 2, None)
    sample.main(["--out", str(out), "--resume", "--chunks", "2"])
    fresh = tmp_path / "fresh" / name
    fresh.parent.mkdir()
    run(model, fresh, "--chunks", "2", "--seed", "2", prompt=["--prompt", "a blue square"])
    assert video_bytes(out) == video_bytes(fresh)  # no frame of the old video is left


@pytest.mark.parametrize("name", ["video.mp4", "video.gif", "frames"])
def test_a_failed_start_leaves_no_output_and_a_rerun_works(model, tmp_path, monkeypatch, name):
    out = tmp_path / name
    fail_in_call(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        run(model, out, "--chunks", "1")
    assert list(tmp_path.iterdir()) == []  # no output, no 0-byte file, no state, no lock, no temporary
    monkeypatch.undo()
    fail_in_decode(monkeypatch, KeyboardInterrupt())
    run(model, out, "--chunks", "1")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    run(model, out, "--chunks", "1")  # no --overwrite needed
    assert sorted(os.listdir(tmp_path)) == sorted([name, state_file(out).name])


# ---------------------------------------------------------------------------------------------
# 4. Inputs are never overwritten


def test_an_input_is_never_the_output(model, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    source = videos / "source.gif"
    run(model, source, "--chunks", "1")
    (videos / "link.gif").symlink_to(source)
    os.link(source, videos / "hard.gif")
    before, model_before = snapshot(tmp_path), snapshot(model)
    refused = [
        (["--extend", source, "--out", source], "--extend"),
        (["--extend", source, "--out", videos / "link.gif"], "--extend"),
        (["--extend", videos / "link.gif", "--out", source], "--extend"),
        (["--extend", source, "--out", videos / "hard.gif"], "--extend"),
        (["--image", source, "--out", source], "--image"),
        (["--image", videos / "hard.gif", "--out", source], "--image"),
        (["--out", model / "video.mp4"], "--model"),
        (["--out", model / "text_encoder"], "--model"),
    ]
    for arguments, option in refused:
        with pytest.raises(ValueError, match=rf"--out .* is {option} "):
            sample.main(["--model", str(model), *FAST, *PROMPT, "--chunks", "1", "--overwrite", *map(str, arguments)])
        assert snapshot(tmp_path) == before and snapshot(model) == model_before, arguments


# ---------------------------------------------------------------------------------------------
# 5. --resume's checks


def test_resume_refuses_changed_settings_and_accepts_the_same(model, tmp_path):
    out = tmp_path / "frames"
    run(model, out, "--chunks", "1", "--seed", "3")
    other_model = tmp_path / "other-model"
    other_model.mkdir()
    before = snapshot(tmp_path)
    changed = [
        (["--prompt", "a blue square"], "--prompt"),
        (["--height", "64"], "--height 64"),
        (["--model", str(other_model)], "--model"),
        (["--seed", "4"], "--seed 4"),
        (["--seed", "0"], "--seed 0"),  # 0 is a value, not an unset option
        (["--steps", "3"], "--steps 3"),
        (["--fps", "7"], "--fps 7"),
        (["--guidance", "0"], "--guidance 0"),
        (["--anchor-frame"], "--anchor-frame"),
        (["--scheduler", "euler"], r"--scheduler euler \(the state file has sde-dpmsolver\+\+\)"),  # the model's
    ]
    for arguments, option in changed:
        with pytest.raises(ValueError, match=f"these options differ from it: {option}"):
            sample.main(["--out", str(out), "--resume", "--chunks", "2", *arguments])
        assert snapshot(tmp_path) == before, arguments
    with pytest.raises(ValueError, match="differ from it: --height 64 .*; --seed 4 "):
        sample.main(["--out", str(out), "--resume", "--chunks", "2", "--seed", "4", "--height", "64"])
    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        sample.main(["--out", str(out), "--resume", "--overwrite", "--chunks", "2"])
    assert snapshot(tmp_path) == before

    sample.main(["--out", str(out), "--resume", "--chunks", "2", "--model", str(model), *PROMPT, "--height", "32",
                 "--seed", "3", "--steps", "2", "--fps", "6", "--no-anchor-frame", "--threads", "1",
                 "--scheduler", "sde-dpmsolver++"])  # the model's sampler, which the run used, named
    sample.main(["--out", str(out), "--resume", "--chunks", "3"])
    assert sorted(os.listdir(out)) == [f"frame_{index:06d}.png" for index in range(6)]


def png_frames(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path)) for path in sorted(folder.glob("frame_*.png"))])


def test_resume_decodes_with_the_run_s_vae_dtype_and_refuses_another(model, tmp_path):
    """The VAE's dtype changes the decoded pixels: the state file keeps it, a resumed run decodes as
    the run did (with any --offload, which changes no pixel), and another --vae-dtype is refused."""
    fresh = {dtype: tmp_path / f"fresh-{dtype}" for dtype in ("fp32", "bf16")}
    for dtype, folder in fresh.items():
        run(model, folder, "--chunks", "2", "--vae-dtype", dtype)
    assert not np.array_equal(png_frames(fresh["fp32"]), png_frames(fresh["bf16"]))
    for dtype, given, others in (("bf16", ["--vae-dtype", "bf16"], ["fp32", "fp16"]), ("fp32", [], ["bf16", "fp16"])):
        out = tmp_path / dtype
        run(model, out, "--chunks", "1", *given)
        before = snapshot(tmp_path)
        for other in others:
            with pytest.raises(ValueError, match=rf"differ from it: --vae-dtype {other} \(the state file has {dtype}\)$"):
                sample.main(["--out", str(out), "--resume", "--chunks", "2", "--vae-dtype", other])
            assert snapshot(tmp_path) == before
        sample.main(["--out", str(out), "--resume", "--chunks", "2", "--offload", "sequential"])
        assert np.array_equal(png_frames(out), png_frames(fresh[dtype]))
        sample.main(["--out", str(out), "--resume", "--chunks", "2", "--vae-dtype", dtype, "--offload", "model"])


def test_resume_decodes_in_tiles_as_the_run_did_where_tiles_change_pixels(model, tmp_path):
    """Tiles change the pixels of a frame wider than one tile (vae.TILE latent pixels): the state
    file keeps the tiling, and another --vae-tiles is refused; a frame of one tile decodes the same
    either way, so there any --vae-tiles resumes it."""
    wide = ["--width", "544"]  # 68 latent pixels: two tiles across
    fresh = {tiles: tmp_path / f"fresh-{tiles}" for tiles in ("on", "off")}
    for tiles, folder in fresh.items():
        run(model, folder, "--chunks", "2", "--vae-tiles", tiles, *wide)
    assert not np.array_equal(png_frames(fresh["on"]), png_frames(fresh["off"]))
    out = tmp_path / "tiled"
    run(model, out, "--chunks", "1", "--vae-tiles", "on", *wide)
    before = snapshot(tmp_path)
    for other in ("off", "auto"):  # auto: no tiles at this size
        with pytest.raises(ValueError, match=rf"differ from it: --vae-tiles {other} \(the state file's frames "
                                             rf"are decoded in tiles\)$"):
            sample.main(["--out", str(out), "--resume", "--chunks", "2", "--vae-tiles", other])
        assert snapshot(tmp_path) == before
    sample.main(["--out", str(out), "--resume", "--chunks", "2"])
    assert np.array_equal(png_frames(out), png_frames(fresh["on"]))

    small, small_fresh = tmp_path / "small", tmp_path / "small-fresh"  # 6 latent pixels across: one tile
    run(model, small, "--chunks", "1", "--vae-tiles", "on")
    sample.main(["--out", str(small), "--resume", "--chunks", "2", "--vae-tiles", "off"])
    run(model, small_fresh, "--chunks", "2", "--vae-tiles", "on")
    assert np.array_equal(png_frames(small), png_frames(small_fresh))


def as_before_the_decoding_was_stored(path: Path) -> None:
    """Make a state file what the version before (9d6bd41's endless.save_state) wrote: no VAE dtype
    or tiling in its state, no empty_restart among its drift controls."""
    def edit(saved):
        del saved["state"]["vae_dtype"], saved["state"]["vae_tiles"], saved["settings"]["drift"]["empty_restart"]
    edit_state(path, edit)


def test_a_state_file_from_before_the_decoding_was_stored_resumes_as_that_run_decoded(model, tmp_path):
    """Such a file says nothing of --vae-dtype or --vae-tiles: its run decoded with their defaults
    (the VAE in --dtype's dtype, tiles above 1024x1024) unless it was given them, which it cannot
    tell; so they are taken as given, else the defaults, and stored from then on."""
    fresh = {dtype: tmp_path / f"fresh-{dtype}" for dtype in ("fp32", "bf16")}
    for dtype, folder in fresh.items():
        run(model, folder, "--chunks", "2", "--vae-dtype", dtype)
    for dtype, given in (("fp32", []), ("bf16", ["--vae-dtype", "bf16"])):
        out = tmp_path / f"old-{dtype}"
        run(model, out, "--chunks", "1", *given)
        as_before_the_decoding_was_stored(state_file(out))
        sample.main(["--out", str(out), "--resume", "--chunks", "2", *given])
        assert np.array_equal(png_frames(out), png_frames(fresh[dtype]))
        state = endless.load_state(state_file(out))[1]
        assert (state.vae_dtype, state.vae_tiles) == (dtype, False)


# ---------------------------------------------------------------------------------------------
# 6. A killed GIF run, resumed


def wait_for_chunks(state: Path, chunks: int, process, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if torch.load(state, weights_only=True)["state"]["chunk_index"] >= chunks:
                return
        except (OSError, EOFError, RuntimeError):
            pass
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    raise TimeoutError


def test_killed_gif_holds_whole_chunks_and_resume_equals_an_uninterrupted_run(model, tmp_path):
    killed = tmp_path / "killed" / "video.gif"
    killed.parent.mkdir()
    command = [sys.executable, str(REPOSITORY / "sample.py"), "--model", str(model), *FAST, *PROMPT,
               "--chunks", "60", "--threads", "1", "--out", str(killed)]
    process = subprocess.Popen(command, cwd=REPOSITORY, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_chunks(state_file(killed), 2, process)
        # While it runs, its lock refuses a second run on the same output, naming its process.
        with pytest.raises(ValueError, match=rf"being written by process {process.pid}\b"):
            run(model, killed, "--chunks", "1", "--overwrite")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    complete = torch.load(state_file(killed), weights_only=True)["state"]["frames_written"] // 2
    assert 2 <= complete < 60
    frames = gif_frames(killed)  # decodable, whole chunks, at least those the state file counts
    assert frames % 2 == 0 and frames >= 2 * complete

    sample.main(["--out", str(killed), "--resume", "--chunks", str(complete + 1)])  # its stale lock file is no obstacle
    uninterrupted = tmp_path / "uninterrupted.gif"
    run(model, uninterrupted, "--chunks", str(complete + 1))
    assert killed.read_bytes() == uninterrupted.read_bytes()
    assert gif_frames(killed) == 2 * (complete + 1)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 7. A full disk


def fill_disk_at_save(monkeypatch, failing_save: int) -> None:
    """torch.save (the state file's writer) writes part of its bytes, then finds no space left."""
    save, calls = torch.save, []

    def saving(obj, file, *args, **kwargs):
        calls.append(1)
        if len(calls) == failing_save:
            file.write(b"\x80\x02partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, file, *args, **kwargs)
    monkeypatch.setattr(torch, "save", saving)


def test_a_full_disk_while_saving_the_state_is_named_and_resume_completes_the_video(model, tmp_path, monkeypatch):
    out = tmp_path / "video.mp4"
    fill_disk_at_save(monkeypatch, 3)  # saves: the first chunk's placing, after chunk 1, after chunk 2
    with pytest.raises(OSError) as raised:
        run(model, out, "--chunks", "3")
    assert sample.write_error_message(raised.value).startswith(
        f"no space left on device while writing {state_file(out)}; free some, then --resume")
    assert leftovers(tmp_path) == []
    assert endless.load_state(state_file(out))[1].frames_written == 2  # the last state that was saved whole
    monkeypatch.undo()  # space is freed
    sample.main(["--out", str(out), "--resume", "--chunks", "3"])
    fresh = tmp_path / "fresh.mp4"
    run(model, fresh, "--chunks", "3")
    assert out.read_bytes() == fresh.read_bytes()


@pytest.mark.parametrize("old", [False, True])
def test_a_full_disk_at_the_first_state_save_keeps_the_old_output(model, tmp_path, monkeypatch, old):
    out = tmp_path / "video.gif"
    if old:
        run(model, out, "--chunks", "1", "--seed", "1")
    before = snapshot(tmp_path)
    fill_disk_at_save(monkeypatch, 1)
    with pytest.raises(OSError, match="No space left") as raised:
        run(model, out, "--chunks", "2", "--seed", "2", *(["--overwrite"] if old else []))
    assert raised.value.filename == str(state_file(out))
    assert snapshot(tmp_path) == before  # the old video and its state byte for byte, or nothing at all
    monkeypatch.undo()
    if old:  # its state still names no temporary, and resumes the old video
        assert endless.load_state(state_file(out))[2] is None
        sample.main(["--out", str(out), "--resume", "--chunks", "2"])
        assert gif_frames(out) == 4


def fill_disk_at_video_write(monkeypatch) -> None:
    """The video writer's first write finds no space left (the GIF and MP4 writers write through
    `_pwrite_all`)."""
    from infra import video_io

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(video_io, "_pwrite_all", full)


@pytest.mark.parametrize("old", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("fill", [lambda m: fill_disk_at_save(m, 1), fill_disk_at_video_write], ids=["state", "video"])
def test_a_full_disk_before_the_first_chunk_is_in_place_says_what_is_true(model, tmp_path, monkeypatch, fill, old):
    """Nothing of the run was kept, so there is nothing for --resume to continue (issue 22 item 14):
    the message says so, and that the old output (with --overwrite) is as it was."""
    out = tmp_path / "video.gif"
    if old:
        run(model, out, "--chunks", "1", "--seed", "1")
    fill(monkeypatch)
    with pytest.raises(OSError) as raised:
        run(model, out, "--chunks", "2", "--seed", "2", *(["--overwrite"] if old else []))
    kept = f" (the old {out} is as it was)" if old else ""
    assert sample.write_error_message(raised.value) == (
        f"no space left on device while writing {raised.value.filename}; nothing of this run was kept{kept}: "
        f"free some, then run it again")
    monkeypatch.undo()
    if not old:
        with pytest.raises(ValueError, match="--resume: no state file"):  # indeed nothing to resume
            sample.main(["--out", str(out), "--resume", "--chunks", "2"])


def test_a_full_disk_in_a_resumed_run_says_resume_continues_it(model, tmp_path, monkeypatch):
    out = tmp_path / "video.gif"
    run(model, out, "--chunks", "1")
    fill_disk_at_video_write(monkeypatch)
    with pytest.raises(OSError) as raised:
        sample.main(["--out", str(out), "--resume", "--chunks", "2"])
    assert sample.write_error_message(raised.value) == (
        f"no space left on device while writing {out}; free some, then --resume continues the run")
    monkeypatch.undo()
    sample.main(["--out", str(out), "--resume", "--chunks", "2"])
    assert gif_frames(out) == 4


# ---------------------------------------------------------------------------------------------
# 8. Damaged state files


def edit_state(path: Path, edit) -> None:
    saved = torch.load(path, weights_only=True)
    edit(saved)
    torch.save(saved, path)


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(b"this is no state file\n" * 10), "damaged"),
    (lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]), "damaged"),
    (lambda path: path.write_bytes(b""), "damaged"),
    (lambda path: edit_state(path, lambda s: s["settings"].update(steps="2")), "damaged or edited .*steps"),
    (lambda path: edit_state(path, lambda s: s["settings"].update(timeline=[(0, 5)])), "damaged or edited .*timeline"),
    (lambda path: edit_state(path, lambda s: s["settings"].update(timeline=[(1, "a red circle")])),
     "damaged or edited .*timeline"),
    (lambda path: edit_state(path, lambda s: s["settings"].update(guidance=-1.0)), "damaged or edited .*--guidance"),
    (lambda path: edit_state(path, lambda s: s["settings"].pop("seed")), "damaged or edited"),
    (lambda path: edit_state(path, lambda s: s["state"].pop("frames_written")), "damaged or edited"),
    (lambda path: edit_state(path, lambda s: s["state"].update(context=[1.0])), "damaged or edited .*context"),
    (lambda path: edit_state(path, lambda s: s["state"].update(vae_dtype="fp64")), "damaged or edited .*vae_dtype"),
    (lambda path: edit_state(path, lambda s: s["state"].update(vae_tiles=1)), "damaged or edited .*vae_tiles"),
    (lambda path: edit_state(path, lambda s: s.update(version=1)), "state version 1"),
], ids=["garbage", "truncated", "empty", "steps-a-string", "timeline-entry-type", "timeline-not-from-0",
        "guidance-negative", "seed-missing", "frames_written-missing", "context-not-a-tensor", "vae-dtype-unknown",
        "vae-tiles-not-a-bool", "old-version"])
def test_a_damaged_state_file_is_refused_in_one_line_naming_it(model, tmp_path, damage, message):
    out = tmp_path / "video.gif"
    run(model, out, "--chunks", "1")
    damage(state_file(out))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=message) as raised:
        sample.main(["--out", str(out), "--resume", "--chunks", "2"])
    assert str(state_file(out)) in str(raised.value) and "\n" not in str(raised.value)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# 9. Bad input, refused before any file is made


@pytest.fixture(scope="module")
def inputs(model, tmp_path_factory):
    """Broken models and input files, outside the tests' own folders."""
    folder = tmp_path_factory.mktemp("inputs")
    for name, breaking in {
        "missing-unet": lambda m: (m / "unet.safetensors").unlink(),
        "truncated-unet": lambda m: os.truncate(m / "unet.safetensors", (m / "unet.safetensors").stat().st_size - 100),
        "bad-config": lambda m: (m / "config.json").write_text('{"format": "sdxl-video-checkpoint/1", "unet": {'),
    }.items():
        shutil.copytree(model, folder / name)
        breaking(folder / name)
    garbage = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    (folder / "garbage.mp4").write_bytes(garbage)
    (folder / "garbage.png").write_bytes(garbage)
    (folder / "timeline.txt").write_bytes(b"a red circle@0\na blue \xff square@1\n")
    return folder


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


@pytest.mark.parametrize("arguments, message", [
    (["--guidance", "inf"], "--guidance"),
    (["--guidance", "nan"], "--guidance"),
    (["--guidance", "-1"], "--guidance"),
    (["--context-noise", "nan"], "--context-noise"),
    (["--seconds", "inf"], "--seconds"),
    (["--seconds", "nan"], "--seconds"),
    (["--prompt", "a blue square@infs"], "--prompt 'a blue square@infs'"),
    (["--prompt", "a blue square@1e400s"], "--prompt 'a blue square@1e400s'"),
    (["--prompt", "a blue square@-0.1s"], "--prompt 'a blue square@-0.1s'"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--device", "bogus"], "--device 'bogus'"),
    pytest.param(["--device", "cuda"], "--device cuda", marks=no_cuda),
    (["--prompt", "a red \udcff"], "--prompt .*UTF-8"),
    (["--timeline", "INPUTS/timeline.txt"], "--timeline .*timeline.txt.*UTF-8"),
    (["--crf", "52"], "--crf"),
    (["--height", "65536", "--width", "65536"], "--height 65536"),
    (["--model", "INPUTS/missing-unet"], "missing-unet/unet.safetensors is missing"),
    (["--model", "INPUTS/truncated-unet"], "truncated-unet/unet.safetensors is truncated"),
    (["--model", "INPUTS/bad-config"], "bad-config/config.json is not valid JSON"),
    (["--extend", "INPUTS/garbage.mp4"], "--extend .*garbage.mp4: cannot decode"),
    (["--image", "INPUTS/garbage.png"], "--image .*garbage.png: cannot decode"),
])
def test_bad_input_is_refused_naming_the_option_before_any_file_is_made(model, inputs, tmp_path, arguments, message):
    arguments = [a.replace("INPUTS", str(inputs)) for a in arguments]
    length = [] if "--seconds" in arguments else ["--chunks", "1"]
    before = snapshot(inputs)
    with pytest.raises(ValueError, match=message) as raised:
        sample.main(["--model", str(model), *FAST, *PROMPT, *length, "--out", str(tmp_path / "video.mp4"), *arguments])
    assert "\n" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []
    assert snapshot(inputs) == before


@pytest.mark.parametrize("defaults, message", [
    ({"empty_restart": "0.5"}, "sample_defaults empty_restart '0.5' is not a float"),
    ({"empty_restart": None}, "sample_defaults empty_restart None is not a float"),
    ({"empty_restart": True}, "sample_defaults empty_restart True is not a float"),
    ({"steps": [3]}, r"sample_defaults steps \[3\] is not an int"),
    ({"steps": 2.5}, "sample_defaults steps 2.5 is not an int"),
    ({"scheduler": 5}, "sample_defaults scheduler 5 is not a str or None"),
    ({"anchor_frame": 1}, "sample_defaults anchor_frame 1 is not a bool"),
    ([["steps", 3]], "sample_defaults is not an object"),
], ids=["float-a-string", "float-null", "float-a-bool", "int-a-list", "int-a-float", "str-a-number", "bool-a-number",
        "a-list"])
def test_a_model_s_sample_defaults_of_the_wrong_type_are_refused_naming_its_config(model, tmp_path, defaults, message):
    """A model's config.json is a file a user is given: its sample_defaults are checked as the
    command line's options are, in one line naming the file and the key (not a TypeError)."""
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sample_defaults": defaults}))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(folder))}/config.json: {message}") as raised:
        sample.main(["--model", str(folder), *PROMPT, "--chunks", "1", "--out", str(out / "video.gif")])
    assert "\n" not in str(raised.value) and list(out.iterdir()) == []


def test_an_unwritable_output_folder_is_refused_even_if_the_old_output_is_writable(model, tmp_path, monkeypatch):
    folder = tmp_path / "videos"
    folder.mkdir()
    out = folder / "video.gif"
    out.write_bytes(b"old video")  # writable itself; the new video goes to a temporary in its folder
    if os.geteuid() == 0:  # root writes anywhere: the permission check is simulated
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != folder and access(path, mode, **kw))
    else:
        folder.chmod(0o555)
    try:
        with pytest.raises(ValueError, match=rf"--out .*video.gif.*{folder}.* is not writable"):
            run(model, out, "--chunks", "1", "--overwrite")
    finally:
        folder.chmod(0o755)
    assert snapshot(tmp_path) == {"videos": None, "videos/video.gif": b"old video"}


@pytest.mark.parametrize("arguments, message", [
    (["--guidance", "nan"], "error: --guidance must be a finite number"),  # before torch is imported
    (["--chunks", "1"], "error: --out .* is being written by process PID"),  # after: the lock, held here
])
def test_the_command_line_prints_one_error_line_and_exits_1(model, tmp_path, arguments, message):
    out = tmp_path / "video.gif"
    command = [sys.executable, str(REPOSITORY / "sample.py"), "--model", str(model), *FAST, *PROMPT,
               "--out", str(out), *arguments]
    with OutputLock(str(out)):
        result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and re.fullmatch(message.replace("PID", str(os.getpid())) + ".*", lines[0]), \
        result.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 10.-12. The timeline, progress and unknown words on stderr


def test_a_timeline_entry_after_the_end_is_warned_about(model, tmp_path, capsys):
    run(model, tmp_path / "frames", "--chunks", "2", prompt=[*PROMPT, "--prompt", "a blue square@5"])
    err = capsys.readouterr().err
    assert "chunk 5 (1.66667 s): 'a blue square'  (warning: after the video's last chunk 1, never shown)" in err
    assert "chunk 0 (0 s): 'a red circle'\n" in err


def test_a_prompt_with_an_at_sign_ends_with_its_position(model, tmp_path, capsys):
    run(model, tmp_path / "frames", "--chunks", "1", prompt=["--prompt", "meet @ noon@0"])
    assert "chunk 0 (0 s): 'meet @ noon'\n" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--prompt 'meet @ noon'.*'@' in its text ends with its position.*@0"):
        sample.main(["--prompt", "meet @ noon", "--out", str(tmp_path / "other.gif")])
    assert sorted(os.listdir(tmp_path)) == ["frames", "frames.state.pt"]


def test_progress_without_a_terminal_is_one_line_per_chunk(model, tmp_path, capsys):
    run(model, tmp_path / "frames", "--chunks", "3")
    err = capsys.readouterr().err
    assert "\r" not in err
    progress = [line for line in err.splitlines() if line.startswith("chunk ") and " step " in line]
    assert [line.split(" |")[0] for line in progress] == [f"chunk {n}/3 step 2/2" for n in (1, 2, 3)]


def test_words_the_model_does_not_know_are_named(model, tmp_path, capsys):
    run(model, tmp_path / "frames", "--chunks", "1", prompt=["--prompt", "a cat"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "does not know the words cat of 'a cat'" in warnings[0]
    assert "it knows: " in warnings[0] and "circle" in warnings[0]
