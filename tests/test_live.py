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


# Regressions of a review of the live surfaces


def followed_settings(path) -> "sample.Settings":
    return sample.Settings(timeline=[(0, "a red circle")], follow=str(path))


def test_a_followed_fifo_is_skipped_with_a_warning_not_waited_on(tmp_path):
    import os

    from endless import VideoState

    fifo = tmp_path / "live.txt"
    os.mkfifo(fifo)  # no writer: a blocking open would wait for ever
    with pytest.warns(UserWarning, match="live.txt: not a regular file now"):
        assert sample.followed_lines(followed_settings(fifo), VideoState(followed_bytes=3)) == []


def test_a_followed_file_replaced_by_another_is_read_from_its_start(tmp_path):
    from endless import VideoState

    followed = tmp_path / "live.txt"
    followed.write_text("an old line that was read\n", encoding="utf-8")
    state = VideoState()
    state.followed_bytes, state.followed_file = sample.follow_start(str(followed))
    replacement = tmp_path / "new.txt"  # made while the old file exists: another inode (an editor's save)
    replacement.write_text("a blue square\na white circle that is longer than the old file\n", encoding="utf-8")
    replacement.replace(followed)
    with pytest.warns(UserWarning, match="replaced; reading the new one from its start"):
        lines = sample.followed_lines(followed_settings(followed), state)
    assert lines == ["a blue square", "a white circle that is longer than the old file"]
    assert state.followed_bytes == followed.stat().st_size
    assert state.followed_file == [followed.stat().st_dev, followed.stat().st_ino]


def test_lines_read_together_go_to_successive_free_chunks(monkeypatch):
    """At chunk 2 (transition 1: "now" is 3, where a prompt is already): three lines without a
    position, or with a past one, take chunks 4, 5, 6; a future position that has a prompt is skipped."""
    import endless

    monkeypatch.setattr(endless, "place_prompt", lambda settings, prompts, chunk, text: settings.timeline.append((chunk, text)))
    settings = sample.Settings(timeline=[(0, "a red circle"), (3, "a green square")], transition=1, follow="live.txt")
    state = endless.VideoState(chunk_index=2)
    with pytest.warns(UserWarning, match="'a white circle@3' skipped: chunk 3 has a prompt already"):
        sample.place_followed(settings, None, state, ["a blue square", "a red square@1", "a white square",
                                                      "a white circle@3"])
    assert settings.timeline == [(0, "a red circle"), (3, "a green square"), (4, "a blue square"),
                                 (5, "a red square"), (6, "a white square")]


def test_a_relative_followed_path_is_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = sample.settings_from_arguments(sample.parse_arguments(["--prompt", "a red circle", "--follow", "live.txt"]))
    assert settings.follow == str(tmp_path / "live.txt")


def test_a_closed_standard_output_is_refused_in_one_line(model, monkeypatch):
    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(ValueError, match="^--out - writes an MP4 stream to standard output, which is closed here"):
        sample.main(["--model", str(model), *ARGUMENTS, "--out", "-"])


def test_a_pipe_closed_before_the_first_chunk_counts_no_frame_and_prints_no_summary(model, monkeypatch, capsys):
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone: every write is a broken pipe
    pipe = open(write_end, "w")
    monkeypatch.setattr(sys, "stdout", pipe)
    try:
        sample.main(["--model", str(model), *ARGUMENTS, "--out", "-"])
    finally:
        pipe.close()
    errors = capsys.readouterr().err
    assert "stopped: standard output was closed after 0 frames" in errors
    assert "standard output: " not in errors


def test_ctrl_c_ends_a_stream_without_offering_to_resume_it(model, monkeypatch, capsys):
    def stop(index, context, embeddings):
        if index == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdout", Pipe())
    sample.main(["--model", str(model), *ARGUMENTS, "--out", "-"], stop)
    errors = capsys.readouterr().err
    assert "stopped: the stream ends at its last complete chunk" in errors and "--resume" not in errors


def test_a_write_error_of_a_stream_does_not_offer_to_resume_it():
    import errno

    message = sample.what_now(OSError(errno.EIO, "I/O error"), "-", resumable=True)
    assert message == "the stream ends at its last complete chunk"
