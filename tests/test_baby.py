"""The shipped baby model (models/baby) does what its prompts say: a short evaluation on prompts it
never saw in training (world.HELD_OUT), at thresholds it meets with a margin.

Measured with this command (4 chunks, seed 0, the model's defaults, one batch of 5): found 1.0,
colour 1.0, shape 1.0, direction 1.0, continuity 0.89 (the baby before its self-context fine-tune:
shape 0.85, continuity 0.78, at the old detector)."""

import evaluate


def test_baby_follows_held_out_prompts():
    scores = evaluate.main(["--prompts", "held-out", "--seeds", "1", "--chunks", "4", "--batch", "5"])["all"]
    assert scores["found"] >= 0.95
    assert scores["colour"] >= 0.9
    assert scores["shape"] >= 0.7
    assert scores["direction"] >= 0.8
    assert 0.5 <= scores["continuity"] <= 2.0
