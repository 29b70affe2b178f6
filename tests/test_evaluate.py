"""evaluate.py: the detector on clips rendered by world.py, the metrics on rendered videos with known
faults, and the command line end to end on a tiny random checkpoint (numbers meaningless, plumbing real)."""

import functools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate
import sample
from endless import to_uint8_frames
from video_settings import Settings
from evaluate import VideoScore, detect, direction, displacement, parse_caption, resolve_prompts
from world import BACKGROUND, COLOURS, DIRECTIONS, HELD_OUT, SHAPES, Clip, render

SIZES = (24, 48, 64)


def frames_of(clip: Clip, num_frames: int, size: int, first_frame: int = 0) -> np.ndarray:
    """(frames, size, size, 3) uint8: what sample.py would write for this clip."""
    return to_uint8_frames(render(clip, num_frames, size, first_frame))


def every_clip(seed: int = 0) -> list[tuple[Clip, int]]:
    """Every colour x shape x direction at every size in SIZES, radii from the world's smallest to its
    largest, one clip in two starting on an edge or a corner (so the shape is split across it)."""
    rng = random.Random(seed)
    clips = []
    for index, (size, colour, shape, way) in enumerate(
        (size, c, s, d) for size in SIZES for c in COLOURS for s in SHAPES for d in DIRECTIONS
    ):
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        if index % 2:
            x, y = rng.choice([(rng.uniform(-1, 1) % size, y), (x, rng.uniform(-1, 1) % size), (0.3, size - 0.2)])
        radius = (0.14 + 0.06 * (index % 4) / 3) * size
        clips.append((Clip(colour, shape, way, x, y, radius, rng.uniform(0.05, 0.08) * size), size))
    return clips


def true_centre(clip: Clip, frame: int, size: int) -> tuple[float, float]:
    """The centroid of the continuous shape: the clip's centre, lower by 0.2 r for the triangle."""
    step_x, step_y = DIRECTIONS[clip.direction]
    lower = 0.2 * clip.radius if clip.shape == "triangle" else 0.0
    return ((clip.x + step_x * clip.speed * frame) % size, (clip.y + step_y * clip.speed * frame + lower) % size)


@functools.cache
def rendered_clips(num_frames: int = 5) -> list[tuple[Clip, int, np.ndarray]]:
    """every_clip() with its frames (num_frames, size, size, 3) uint8, rendered once for all tests."""
    return [(clip, size, frames_of(clip, num_frames, size)) for clip, size in every_clip()]


def detector_accuracy(std: float = 0.0, specks: float = 0.0) -> dict[str, float]:
    """Colour and shape accuracy per frame, direction per clip, and the worst centroid error in
    pixels, on every clip with Gaussian noise of `std` and a fraction `specks` of speckled pixels."""
    rng = np.random.default_rng(0)
    right, frames_seen, worst = {"colour": 0, "shape": 0, "direction": 0}, 0, 0.0
    for clip, size, frames in rendered_clips():
        detections = [detect(frame) for frame in add_noise(frames, rng, std, specks)]
        right["colour"] += sum(d.colour == clip.colour for d in detections)
        right["shape"] += sum(d.shape == clip.shape for d in detections)
        right["direction"] += direction(detections, (size, size)) == clip.direction
        frames_seen += len(detections)
        for index, d in enumerate(detections):
            worst = max(worst, math.hypot(*displacement(d.centre, true_centre(clip, index, size), (size, size))))
    accuracy = {"colour": right["colour"] / frames_seen, "shape": right["shape"] / frames_seen,
                "direction": right["direction"] / len(rendered_clips()), "worst_centroid_error": worst}
    print(f"detector, noise {std}, specks {specks}, {len(rendered_clips())} clips, {frames_seen} frames: {accuracy}")
    return accuracy


def add_noise(frames: np.ndarray, rng, std: float, specks: float) -> np.ndarray:
    """(..., 3) -> float (..., 3) in 0..255: Gaussian noise of `std` on every channel, and a
    fraction `specks` of the pixels set to random palette colours."""
    noisy = frames + rng.normal(0, std, frames.shape) if std else frames.astype(np.float64)
    speckled = rng.random(frames.shape[:-1]) < specks  # (...)
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    noisy[speckled] = palette[rng.integers(0, len(palette), speckled.sum())]
    return noisy.clip(0, 255)


def test_detector_is_exact_on_clean_renders():
    accuracy = detector_accuracy()
    assert (accuracy["colour"], accuracy["shape"], accuracy["direction"]) == (1.0, 1.0, 1.0)
    assert accuracy["worst_centroid_error"] < 0.75


def test_detector_is_exact_with_mild_noise():
    accuracy = detector_accuracy(std=12.0)
    assert (accuracy["colour"], accuracy["shape"], accuracy["direction"]) == (1.0, 1.0, 1.0)
    assert accuracy["worst_centroid_error"] < 0.75


def test_detector_with_specks():
    # Isolated specks are removed; a speck touching a square's side widens its box, and a few small
    # squares then count as circles.
    accuracy = detector_accuracy(std=12.0, specks=0.003)
    assert accuracy["colour"] == 1.0 and accuracy["direction"] == 1.0 and accuracy["shape"] >= 0.95
    assert accuracy["worst_centroid_error"] < 1.0


def test_shape_split_by_both_edges_is_one_shape():
    clip = Clip("blue", "square", "left", x=0.0, y=0.0, radius=10.0, speed=0.0)
    found = detect(frames_of(clip, 1, 64)[0])
    assert (found.found, found.colour, found.shape) == (True, "blue", "square")
    assert math.hypot(*displacement(found.centre, (0.0, 0.0), (64, 64))) < 0.5
    assert found.area == 18 * 18  # |dx|, |dy| <= 8.5 around a corner: 9 + 9 pixels each way


def test_background_and_noise_alone_have_no_shape():
    background = np.broadcast_to(np.array(BACKGROUND, dtype=np.float32), (48, 48, 3))
    assert not detect(background).found
    assert not detect(add_noise(background, np.random.default_rng(0), std=12.0, specks=0.003)).found


def video_score(chunks: list[np.ndarray], clip: Clip) -> dict[str, float]:
    score = VideoScore(clip.colour, clip.shape, clip.direction)
    for chunk in chunks:
        score.add_chunk(chunk)
    return score.result()


RED_CIRCLE = Clip("red", "circle", "right", x=5.0, y=40.0, radius=8.0, speed=3.0)


def test_a_rendered_video_scores_perfectly():
    chunks = [frames_of(RED_CIRCLE, 4, 48, first_frame=4 * index) for index in range(8)]
    result = video_score(chunks, RED_CIRCLE)
    assert [result[name] for name in ("found", "colour", "shape", "direction")] == [1.0] * 4
    assert result["continuity"] == pytest.approx(1.0, abs=0.05)
    assert result["colour_drift"] == pytest.approx(0.0, abs=0.5)
    assert result["size_drift"] == pytest.approx(1.0, abs=0.05)


def test_a_jump_at_a_chunk_boundary_shows_in_continuity_only():
    jumped = Clip(**{**vars(RED_CIRCLE), "y": 40.0 - 12.0})
    chunks = [frames_of(RED_CIRCLE, 4, 48), frames_of(RED_CIRCLE, 4, 48, 4), frames_of(jumped, 4, 48, 8)]
    result = video_score(chunks, RED_CIRCLE)
    # Inside chunks the shape moves 3 pixels a frame; the two boundaries move it 3 and hypot(3, 12).
    assert result["continuity"] == pytest.approx((3 + math.hypot(3, 12)) / 2 / 3, rel=0.05)
    assert result["direction"] == 1.0 and result["colour"] == 1.0


def recoloured(frames: np.ndarray, old: str, rgb: tuple[int, int, int]) -> np.ndarray:
    frames = frames.copy()
    frames[(frames == COLOURS[old]).all(axis=-1)] = rgb
    return frames


def test_drift_of_colour_and_size_shows():
    grown = Clip(**{**vars(RED_CIRCLE), "radius": 12.0})
    darker = (200, 70, 40)  # still nearest to red: colour accuracy stays 1
    chunks = [frames_of(RED_CIRCLE, 4, 48, 4 * index) for index in range(3)]
    chunks.append(recoloured(frames_of(grown, 4, 48, 12), "red", darker))
    result = video_score(chunks, RED_CIRCLE)
    assert result["colour_drift"] == pytest.approx(math.hypot(30, 30), abs=0.5)
    assert result["size_drift"] == pytest.approx((12 / 8) ** 2, rel=0.05)
    assert result["colour"] == 1.0


def test_a_still_or_missing_shape_fails_direction():
    still = Clip(**{**vars(RED_CIRCLE), "speed": 0.0})
    background = np.broadcast_to(np.array(BACKGROUND, dtype=np.uint8), (4, 48, 48, 3))
    result = video_score([frames_of(still, 4, 48), background], RED_CIRCLE)
    assert result["direction"] == 0.0 and result["found"] == 0.5
    assert math.isnan(result["continuity"]) and math.isnan(result["size_drift"])  # nothing in the last chunk


def test_prompts():
    assert set(resolve_prompts(["held-out"])) == HELD_OUT
    assert len(resolve_prompts(["train"])) == len(COLOURS) * len(SHAPES) * len(DIRECTIONS) - len(HELD_OUT)
    assert resolve_prompts(["a red triangle moving up", "held-out"])[0] == ("red", "triangle", "up")
    assert len(resolve_prompts(["a red triangle moving up", "held-out"])) == len(HELD_OUT)
    assert parse_caption(" a white square moving down ") == ("white", "square", "down")
    with pytest.raises(ValueError, match="purple"):
        parse_caption("a purple circle moving left")


FAST = ["--steps", "1", "--frames", "2", "--context-frames", "1", "--height", "32", "--width", "48", "--chunks", "2"]


def test_command_line_scores_the_videos_sample_py_makes(model, tmp_path, capsys):
    prompt = "a red circle moving left"
    report = evaluate.main(["--model", str(model), "--prompts", prompt, "--seeds", "2", *FAST])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == evaluate.without_nan(report)
    assert lines[0].startswith("| prompt | found | colour |")
    assert [line.split(" | ")[0] for line in lines[2:-1]] == [f"| {prompt}", "| all"]
    assert (report["frames"], report["chunks"], report["height"], report["steps"]) == (2, 2, 32, 1)
    assert report["guidance"] == Settings.guidance  # not given: sample.py's default

    # The row is the mean over seeds 0 and 1 of the videos sample.py makes, scored from its PNG files.
    results = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}/"
        sample.main(["--model", str(model), "--out", str(out), "--prompt", prompt, "--seed", str(seed), *FAST])
        frames = np.stack([np.asarray(Image.open(path)) for path in sorted(Path(out).glob("*.png"))])  # (4, H, W, 3)
        results.append(video_score(np.split(frames, 2), Clip("red", "circle", "left", 0, 0, 1, 1)))
    expected = evaluate.without_nan(evaluate.mean_over(results))
    assert evaluate.without_nan(report["prompts"][prompt]) == pytest.approx(expected)


def test_bad_prompt_fails_before_the_model_is_loaded(tmp_path):
    with pytest.raises(ValueError, match="purple"):
        evaluate.main(["--model", str(tmp_path / "missing"), "--prompts", "a purple circle moving left"])
