"""training/validation.py: the validation loss is the same number for the same weights (whatever the batch, in
a run and after loading the model it wrote), is the loss of diffusers' target at its fixed timesteps
and noise, and goes with the shapes world's metrics into log.jsonl; the curves plot. Cross-process:
test_train_distributed.py."""

import json
import math

import pytest
import torch
from PIL import Image

import train
from training import validation
from training import data as video_data
from pipeline import StableDiffusionXLVideoPipeline
from test_train import SMALL, Oracle
from train import TrainConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny baby run (2 VAE steps, 4 UNet steps) validating every 2 steps on 3 held-out clips."""
    out = tmp_path_factory.mktemp("validated") / "run"
    config = TrainConfig(out=str(out), vae_steps=2, unet_steps=4, validate_every=2, validation_clips=3, sample_steps=2,
                         **SMALL)
    train.train(config)
    return out, config


def held_out(config: TrainConfig):
    return validation.HeldOutShapes(video_data.ShapesData(config.size, config.context_frames + config.frames, config.seed))


def test_the_log_holds_the_validation_and_the_shapes_metrics(run):
    out, config = run
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    validations = [r for r in records if r["stage"] == "validation"]
    assert [r["step"] for r in validations] == [2, 4]
    for record in validations:
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert set(record["shapes"]) == {"all", *validation.SHAPES_PROMPTS}
        assert 0 <= record["shapes"]["all"]["found"] <= 1
    # The last one is the written model's (no average): recomputed from the model on disk, the same number.
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(out / "model")
    again = validation.validation_loss(pipeline.unet, pipeline, held_out(config), 3, config)
    assert again == validations[-1]["loss"]


def test_the_validation_loss_does_not_depend_on_the_batch(run):
    out, config = run
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(out / "model")
    clips = held_out(config)
    losses = {batch: validation.validation_loss(pipeline.unet, pipeline, clips, 3, TrainConfig(**{
        **SMALL, "out": str(out), "batch_size": batch})) for batch in (1, 2, 3)}
    assert losses[1] == validation.validation_loss(pipeline.unet, pipeline, clips, 3, TrainConfig(**{
        **SMALL, "out": str(out), "batch_size": 1}))  # the same number, again
    assert losses[2] == pytest.approx(losses[1], rel=1e-6) and losses[3] == pytest.approx(losses[1], rel=1e-6)


def test_the_validation_loss_is_that_of_diffusers_target(run):
    # An oracle that knows the clean chunks answers with DDPMScheduler's target for whatever noise and
    # timesteps it gets: the loss is 0 exactly when those are the ones validation_loss uses for its target.
    diffusers = pytest.importorskip("diffusers")
    out, config = run
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(out / "model")
    clips = held_out(config)
    scheduler = diffusers.DDPMScheduler.from_config(pipeline.scheduler_config.to_dict())
    with torch.no_grad():
        videos = torch.stack([clips[i].video for i in range(3)])
        clean = pipeline.vae.encode_video(videos)[:, :, config.context_frames:]  # (3, 4, chunk frames, h, w)
    oracle = Oracle(clean, scheduler, pipeline.scheduler_config.prediction_type)
    three = TrainConfig(**{**SMALL, "out": str(out), "batch_size": 3})
    assert validation.validation_loss(oracle, pipeline, clips, 3, three) < 1e-10
    assert validation.fixed_timesteps(4, 1000).tolist() == [125, 375, 625, 875]


def test_held_out_shapes_are_never_training_samples(run):
    _, config = run
    training = video_data.ShapesData(config.size, config.context_frames + config.frames, config.seed)
    clips = held_out(config)
    trained = {torch.Tensor.numpy(training[i].video).tobytes() for i in range(50)}
    assert not any(torch.Tensor.numpy(clips[i].video).tobytes() in trained for i in range(8))


def test_the_curves_are_plotted(run):
    out, _ = run
    image = Image.open(out / "curves.png").convert("RGB")
    assert image.size == (validation.PANEL[0], 2 * validation.PANEL[1])  # a panel per stage: vae, unet
    colours = {image.getpixel((x, y)) for x in range(image.width) for y in range(image.height)}
    assert {validation.COLOURS["average"], validation.COLOURS["validation"]} <= colours
    stages = validation.curves(out / "log.jsonl")
    assert list(stages) == ["vae", "unet"] and [step for step, _ in stages["unet"]["validation"]] == [2, 4]
