"""train.py --mode refiner (training/refiner.py): the corruption and loss against a hand computation, only
the refiner learns, the written folder samples with its refiner, a stopped and resumed run equals one
run, and the options other modes read are refused in one line. Runs of a few steps on the shipped baby
(8x8 latents) with a refiner of width 32 keep each test to seconds."""

import json
from pathlib import Path

import pytest
import torch

import train
from pipeline import StableDiffusionXLVideoPipeline
from refiner import Refiner, RefinerConfig
from test_train import Interrupted, losses
from test_train_options import run_train
from train import TrainConfig
from training.refiner import Corruption, Draws, corrupt, refiner_config, restoration_loss

REPOSITORY = Path(__file__).resolve().parents[1]
BABY = REPOSITORY / "models" / "baby"
SMALL = dict(mode="refiner", model=str(BABY), batch_size=2, warmup_steps=2, log_every=1000, validation_clips=2,
             threads=1)


# The corruption and the loss, by hand.


def test_the_loss_is_the_hand_computed_mean_squared_error_of_the_corrupted_windows():
    # One channel, chunks of 1 frame (windows of 2), frames of 1 x 2 latents: frame 0 is [1, 3], frame 1 [5, 7].
    clean = torch.tensor([[1.0, 3.0], [5.0, 7.0]]).reshape(1, 1, 2, 1, 2).repeat(2, 1, 1, 1, 1)  # (2, 1, 2, 1, 2)
    noise = torch.tensor([[1.0, -1.0], [0.0, 2.0]]).reshape(1, 1, 2, 1, 2).repeat(2, 1, 1, 1, 1)
    draws = Draws(shift=torch.tensor([[0.5], [0.5]]), scale=torch.tensor([[2.0], [2.0]]),
                  noise_std=torch.tensor([0.5, 0.5]), newest_only=torch.tensor([False, True]), noise=noise)
    # Window 0, all 4 latents: mean 4, deviations -3 -1 1 3 doubled, + 4 + 0.5 + 0.5 x noise.
    whole = [4 - 6 + 0.5 + 0.5, 4 - 2 + 0.5 - 0.5, 4 + 2 + 0.5 + 0, 4 + 6 + 0.5 + 1]  # -1, 2, 6.5, 11.5
    # Window 1, its newest frame only: mean 6, deviations -1 1 doubled, + 6 + 0.5 + 0.5 x noise; frame 0 kept.
    newest = [1, 3, 6 - 2 + 0.5 + 0, 6 + 2 + 0.5 + 1]  # 1, 3, 4.5, 9.5
    expected = torch.tensor([whole, newest]).reshape(2, 1, 2, 1, 2)
    assert torch.allclose(corrupt(clean, draws, frames=1), expected, atol=1e-6, rtol=0)
    # A fresh refiner returns its input: the loss is the corrupted windows' own error.
    # Squared errors: 4 1 2.25 20.25 and 0 0 0.25 6.25, over 8 latents.
    refiner = Refiner(RefinerConfig(in_channels=1, out_channels=1, inner_channels=32, spatial_heads=1,
                                    spatial_head_dim=8, spatial_layers=1, temporal_heads=1, temporal_head_dim=8,
                                    temporal_layers=1))
    with torch.no_grad():
        loss = restoration_loss(refiner, clean, draws, frames=1)
    assert loss.item() == pytest.approx((4 + 1 + 2.25 + 20.25 + 0.25 + 6.25) / 8, abs=1e-6)


def test_the_draws_follow_the_strengths():
    corruption = Corruption(shift=0.3, scale=0.2, noise=0.4, newest_only=0.25, frames=4)
    draws = corruption.draw((20_000, 4, 8, 1, 1), torch.Generator().manual_seed(0))
    assert draws.shift.std().item() == pytest.approx(0.3, rel=0.02)
    assert draws.scale.log().std().item() == pytest.approx(0.2, rel=0.02)
    assert 0 <= draws.noise_std.min() and draws.noise_std.max() <= 0.4
    assert draws.noise_std.mean().item() == pytest.approx(0.2, rel=0.02)
    assert draws.newest_only.float().mean().item() == pytest.approx(0.25, abs=0.01)
    nothing = Corruption(shift=0.0, scale=0.0, noise=0.0, newest_only=0.0, frames=4)
    latents = torch.randn(3, 4, 8, 2, 2)
    assert torch.allclose(corrupt(latents, nothing.draw(latents.shape, torch.Generator()), 4), latents, atol=1e-6)


# Training: what changes, what is written, resuming.


def test_only_the_refiner_learns_and_the_model_folder_holds_it(tmp_path):
    before = StableDiffusionXLVideoPipeline.from_pretrained(BABY)
    config = TrainConfig(out=str(tmp_path / "run"), refiner_steps=3, validate_every=3, **SMALL)
    after = train.train(config)
    for part in ("unet", "vae", "text_encoder"):
        old, new = getattr(before, part).state_dict(), getattr(after, part).state_dict()
        assert old.keys() == new.keys() and all(torch.equal(old[name], new[name]) for name in old), part
    torch.manual_seed(config.seed)
    fresh = Refiner(refiner_config(config)).state_dict()
    trained = after.refiner.state_dict()
    assert all(not torch.equal(fresh[name], trained[name]) for name in ("conv_in.weight", "conv_out.weight"))

    written = StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "run" / "model")
    assert written.refiner is not None and written.refiner.config == refiner_config(config)
    assert all(torch.equal(value, trained[name]) for name, value in written.refiner.state_dict().items())
    stored = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    baby = json.loads((BABY / "config.json").read_text())
    assert stored["sample_defaults"] == {**baby["sample_defaults"], "refiner": True}
    assert stored["provenance"]["base"] == baby["provenance"]
    validation = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()][-1]
    assert validation["stage"] == "validation" and validation["of"] == "refiner" and validation["step"] == 3
    assert validation["loss"] > 0 and validation["corrupted_loss"] > 0


def test_a_stopped_and_resumed_run_equals_one_run(tmp_path):
    settings = dict(refiner_steps=5, checkpoint_every=2, ema_decay=0.9, validate_every=2, **SMALL)
    train.train(TrainConfig(out=str(tmp_path / "straight"), **settings))

    def interrupt(stage):
        if stage.step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        train.train(TrainConfig(out=str(tmp_path / "resumed"), **settings), on_step=interrupt)
    train.train(TrainConfig(out=str(tmp_path / "resumed"), **settings))
    for stage in ("refiner", "validation"):
        assert losses(tmp_path / "straight", stage) == losses(tmp_path / "resumed", stage)
    assert len(losses(tmp_path / "straight", "refiner")) == 5
    straight, resumed = (StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / run / "model").refiner.state_dict()
                         for run in ("straight", "resumed"))
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


# Options.


@pytest.mark.parametrize("overrides, option", [
    (dict(mode="refiner", model=str(BABY), context_drop=0.5), "--context-drop does not apply to mode refiner"),
    (dict(mode="refiner", model=str(BABY), unet_steps=10), "--unet-steps does not apply"),
    (dict(mode="refiner", model=str(BABY), sample_guidance=5.0), "--sample-guidance does not apply"),
    (dict(mode="refiner", model=str(BABY), fsdp=True), "--fsdp does not apply"),
    (dict(mode="refiner", model=str(BABY), refiner_channels=48), "--refiner-channels must be a multiple of 32"),
    (dict(mode="refiner", model=str(BABY), refiner_newest_only=1.5), "--refiner-newest-only"),
    (dict(mode="refiner"), "--model"), (dict(mode="refiner", model="missing"), "--model"),
    (dict(refiner_steps=10), "--refiner-steps applies to mode refiner only"),
    (dict(mode="temporal", model=str(BABY), refiner_noise=0.5), "--refiner-noise applies to mode refiner only"),
])
def test_settings_another_mode_reads_are_refused_naming_the_option(overrides, option):
    with pytest.raises(ValueError, match=option):
        TrainConfig(**overrides)


def test_the_refiner_s_groups_are_those_train_py_checks():
    assert train.REFINER_GROUPS == RefinerConfig().norm_num_groups


def test_a_refused_option_is_one_line_before_torch_is_imported(tmp_path):
    result = run_train("--mode", "refiner", "--model", str(BABY), "--out", str(tmp_path / "run"),
                       "--self-context", "sampled")
    assert result.returncode == 2, result.stderr
    error, marker = result.stderr.splitlines()
    assert error.startswith("error: --self-context does not apply to mode refiner") and marker == "torch not imported"
    assert not (tmp_path / "run").exists()
