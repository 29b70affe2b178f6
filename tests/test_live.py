"""Live use of sample.py: the video streamed to standard output as it is made (`--out -`)."""

import io
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

import sample

REPOSITORY = Path(__file__).resolve().parents[1]
ARGUMENTS = ["--prompt", "a red circle", "--steps", "2", "--frames", "3", "--context-frames", "2",
             "--height", "32", "--width", "48", "--chunks", "3", "--fps", "5"]


def decoded(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


class Pipe(io.TextIOWrapper):
    """Standard output as a pipe: not a terminal, its bytes kept."""

    def __init__(self):
        super().__init__(io.BytesIO())

    def isatty(self):
        return False


def test_the_stream_holds_the_frames_and_bytes_of_the_file(model, tmp_path, monkeypatch):
    file = tmp_path / "video.mp4"
    sample.main(["--model", str(model), *ARGUMENTS, "--out", str(file)])
    pipe = Pipe()
    monkeypatch.setattr(sys, "stdout", pipe)
    sample.main(["--model", str(model), *ARGUMENTS, "--out", "-"])
    streamed = pipe.buffer.getvalue()
    assert streamed == file.read_bytes()  # the same header and fragments, sent as they are made
    assert len(decoded(streamed)) == 9
    assert not (tmp_path / "-").exists() and not Path("-.state.pt").exists()


def test_a_real_pipe_plays_chunk_by_chunk(model):
    """sample.py | a reader: the first chunk arrives, and decodes, before the run ends."""
    command = [sys.executable, str(REPOSITORY / "sample.py"), "--model", str(model), *ARGUMENTS, "--chunks", "4",
               "--threads", "1", "--out", "-"]
    process = subprocess.Popen(command, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    data, errors = process.communicate(timeout=300)
    assert process.returncode == 0, errors.decode()
    assert len(decoded(data)) == 12
    assert b"standard output: 12 frames" in errors


@pytest.mark.parametrize("extra, message", [(["--resume"], "nothing to --resume"),
                                            (["--overwrite"], "nothing to --resume or --overwrite")])
def test_a_stream_has_nothing_to_resume_or_overwrite(model, extra, message, monkeypatch):
    monkeypatch.setattr(sys, "stdout", Pipe())
    with pytest.raises(ValueError, match=message):
        sample.main(["--model", str(model), *ARGUMENTS, "--out", "-", *extra])


def test_a_terminal_is_refused(model, monkeypatch):
    class Terminal(Pipe):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    with pytest.raises(ValueError, match="is a terminal here; pipe it"):
        sample.main(["--model", str(model), *ARGUMENTS, "--out", "-"])


def test_a_closed_pipe_stops_the_run_in_one_line():
    """The player quits: the run stops, says so in one line, and exits cleanly."""
    command = [sys.executable, str(REPOSITORY / "sample.py"), "--prompt", "a red circle", "--threads", "1",
               "--out", "-"]  # the embedded baby, until stopped
    process = subprocess.Popen(command, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.read(1000)  # the first chunk has come
    process.stdout.close()
    _, errors = process.communicate(timeout=300)
    assert process.returncode == 0, errors.decode()
    assert "stopped: standard output was closed after" in errors.decode()
    assert "Traceback" not in errors.decode()


def test_progress_says_how_fast_the_video_is_made_against_its_own_time(monkeypatch):
    from infra import run_state

    now = [1000.0]
    monkeypatch.setattr(run_state.time, "time", lambda: now[0])
    progress = run_state.Progress(10, 0, live=False, video_seconds_per_chunk=4 / 6)  # 4 frames at 6 fps
    now[0] += 2.0  # a chunk in 2 s: its 0.67 s of video took 3 times as long
    assert progress.line(25, 25) == "chunk 1/10 step 25/25 | 2.0 s/chunk | 0.33x real time | ETA 0m18s"
    progress.start = now[0] - 0.4  # the same chunk in 0.4 s instead: it plays while it is made
    assert "| 1.7x real time |" in progress.line(25, 25)


def png_frames(folder) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(path)) for path in sorted(Path(folder).glob("*.png"))])


FOLLOWED = ["--prompt", "a red circle", "--steps", "2", "--frames", "3", "--context-frames", "2", "--height", "32",
            "--width", "48", "--chunks", "6"]


def appending(path, lines_at: dict[int, str], stop_at: int | None = None):
    """An on_chunk that appends lines to the followed file as chunks start (and may stop the run)."""
    def on_chunk(index, context, embeddings):
        if index == stop_at:
            raise KeyboardInterrupt
        if index in lines_at:
            with open(path, "a", encoding="utf-8") as file:
                file.write(lines_at[index])
    return on_chunk


def test_follow_places_appended_lines_at_the_next_chunk_as_a_timeline_would(model, tmp_path):
    """Lines appended while chunk 1 and chunk 3 are made take effect at chunks 2 and 4: the video is
    the one the same timeline given at the start makes; a bad line is skipped with a warning; what was
    in the file before the run is not a prompt."""
    followed = tmp_path / "live.txt"
    followed.write_text("a green square\n", encoding="utf-8")
    lines = {1: "a blue square\nno position@zz\n", 3: "a white circle@1\n# a comment\n"}
    with pytest.warns(UserWarning, match="'no position@zz' skipped"):
        sample.main(["--model", str(model), *FOLLOWED, "--follow", str(followed), "--out", f"{tmp_path / 'live'}/"],
                    appending(followed, lines))
    timeline = [(0, "a red circle"), (2, "a blue square"), (4, "a white circle")]
    saved = torch_load(tmp_path / "live.state.pt")
    assert [tuple(entry) for entry in saved["settings"]["timeline"]] == timeline
    assert saved["state"]["followed_bytes"] == followed.stat().st_size
    sample.main(["--model", str(model), *FOLLOWED, "--prompt", "a blue square@2", "--prompt", "a white circle@4",
                 "--out", f"{tmp_path / 'given'}/"])
    assert np.array_equal(png_frames(tmp_path / "live"), png_frames(tmp_path / "given"))


def test_a_followed_run_resumes_exactly(model, tmp_path):
    """Stopped at chunk 3 with a followed prompt placed; a line appended while it was stopped is
    read when it resumes: the same video as the run that was never stopped."""
    whole_file, stopped_file = tmp_path / "whole.txt", tmp_path / "stopped.txt"
    whole_file.touch(), stopped_file.touch()
    sample.main(["--model", str(model), *FOLLOWED, "--follow", str(whole_file), "--out", f"{tmp_path / 'whole'}/"],
                appending(whole_file, {1: "a blue square\n", 3: "a white circle@4\n"}))
    sample.main(["--model", str(model), *FOLLOWED, "--follow", str(stopped_file), "--out", f"{tmp_path / 'stopped'}/"],
                appending(stopped_file, {1: "a blue square\n"}, stop_at=3))
    stopped_file.write_text("a blue square\na white circle@4\n", encoding="utf-8")
    sample.main(["--out", f"{tmp_path / 'stopped'}/", "--resume", "--chunks", "6"])
    assert np.array_equal(png_frames(tmp_path / "stopped"), png_frames(tmp_path / "whole"))


def test_follow_refuses_a_missing_file_and_the_output_itself(model, tmp_path):
    with pytest.raises(ValueError, match="--follow .*missing.txt: not a readable file"):
        sample.main(["--model", str(model), *FOLLOWED, "--follow", str(tmp_path / "missing.txt"),
                     "--out", str(tmp_path / "v.mp4")])
    followed = tmp_path / "same.gif"
    followed.touch()
    with pytest.raises(ValueError, match="--out"):
        sample.main(["--model", str(model), *FOLLOWED, "--follow", str(followed), "--out", str(followed),
                     "--overwrite"])


def torch_load(path):
    import torch

    return torch.load(path, weights_only=True)
