"""train.py: it learns, it resumes exactly, DDP keeps processes identical, mode temporal trains only
the temporal modules. Baby configs at 16x16 pixels (4x4 latents) keep every run to seconds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from pipeline import StableDiffusionXLVideoPipeline
from tiny_pipeline import tiny_video_pipeline
from train import TrainConfig

REPOSITORY = Path(__file__).resolve().parents[1]
SMALL = dict(size=16, batch_size=2, vae_batch_size=4, warmup_steps=2, log_every=1000, sample_every=1000, threads=1)


def losses(out: Path, stage: str) -> list[float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in records if r["stage"] == stage}  # a resumed step replaces the first
    return [by_step[step] for step in sorted(by_step)]


def fixed_draws_loss(stage) -> float:
    """The stage's loss averaged over the same 8 draws of timestep, noise and batch every time."""
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return sum(stage.loss(stage.module, 0, generator).item() for _ in range(8)) / 8


def test_overfitting_one_clip_drives_the_loss_down(tmp_path):
    config = TrainConfig(out=str(tmp_path), clips=1, vae_steps=60, steps=150, learning_rate=3e-3, vae_learning_rate=3e-3,
                         context_drop=0.0, text_drop=0.0, context_noise_probability=0.0, **SMALL)
    measured = {}

    def measure(stage):
        if stage.step in (1, stage.steps):
            measured[stage.name, stage.step] = fixed_draws_loss(stage)

    train.train(config, on_step=measure)
    assert measured["vae", 60] <= 0.1 * measured["vae", 1], measured
    assert measured["unet", 150] <= 0.1 * measured["unet", 1], measured


class Interrupted(Exception):
    pass


def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path):
    settings = dict(vae_steps=4, steps=6, checkpoint_every=3, **SMALL)
    train.train(TrainConfig(out=str(tmp_path / "straight"), **settings))

    def interrupt(stage):
        if stage.name == "unet" and stage.step == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        train.train(TrainConfig(out=str(tmp_path / "resumed"), **settings), on_step=interrupt)
    train.train(TrainConfig(out=str(tmp_path / "resumed"), **settings))
    for stage in ("vae", "unet"):
        assert losses(tmp_path / "straight", stage) == losses(tmp_path / "resumed", stage)
    straight = StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "straight" / "model")
    resumed = StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "resumed" / "model")
    for (name, a), (_, b) in zip(straight.unet.state_dict().items(), resumed.unet.state_dict().items()):
        assert torch.equal(a, b), name


def test_two_processes_under_torchrun_end_identical(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {str(REPOSITORY)!r})\n"
        "import train\n"
        f"config = train.TrainConfig(out={str(tmp_path / 'out')!r}, vae_steps=2, steps=3, **{SMALL!r})\n"
        "pipeline = train.train(config)\n"
        f"torch.save(pipeline.unet.state_dict(), {str(tmp_path)!r} + f'/rank{{dist.get_rank()}}.pt')\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    # Each process trained on its own clips (train.batch_of); DDP's averaged gradients kept them equal.
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_mode_temporal_changes_only_temporal_parameters(tmp_path):
    tiny_video_pipeline(tmp_path / "tokenizer", groupnorm_scope="frame").save_pretrained(tmp_path / "checkpoint")
    before = StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "checkpoint")
    config = TrainConfig(mode="temporal", model=str(tmp_path / "checkpoint"), out=str(tmp_path / "out"), steps=3,
                         context_drop=0.0, **{**SMALL, "size": 32})
    after = train.train(config)
    changed = {name for name, p in after.unet.state_dict().items() if not torch.equal(p, before.unet.state_dict()[name])}
    temporal = {name for name in before.unet.state_dict() if ".temp_" in name}
    assert changed and changed <= temporal
    assert all(torch.equal(a, b) for a, b in zip(after.vae.state_dict().values(), before.vae.state_dict().values()))


@pytest.mark.parametrize("overrides, option", [(dict(mode="video"), "--mode"), (dict(size=0), "--size"),
                                                (dict(autocast="fp8"), "--autocast"), (dict(text_drop=2.0), "--text-drop"),
                                                (dict(mode="temporal", model="missing"), "--model"),
                                                (dict(data="missing-folder"), "--data"),
                                                (dict(prediction_type="sample"), "--prediction-type")])
def test_bad_settings_name_the_option(overrides, option):
    with pytest.raises(ValueError, match=option):
        TrainConfig(**overrides)


def test_command_line_options_are_typed():
    config = train.parse_config(["--steps", "7", "--learning-rate", "0.5", "--gradient-checkpointing", "--out", "x"])
    assert (config.steps, config.learning_rate, config.gradient_checkpointing, config.out) == (7, 0.5, True, "x")
    with pytest.raises(SystemExit):
        train.parse_config(["--steps", "seven"])


class Oracle(torch.nn.Module):
    """Knows the clean chunk latents, so it answers with diffusers' target for the noisy input it gets:
    the noise (epsilon) or DDPMScheduler.get_velocity (v_prediction)."""

    def __init__(self, clean: torch.Tensor, scheduler, prediction_type: str):
        super().__init__()
        self.clean, self.scheduler, self.prediction_type = clean, scheduler, prediction_type

    def forward(self, noisy, timesteps, text, pooled, time_ids, context):
        alphas_cumprod = self.scheduler.alphas_cumprod[timesteps][:, None, None, None, None]
        noise = (noisy - alphas_cumprod.sqrt() * self.clean) / (1 - alphas_cumprod).sqrt()
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(self.clean, noise, timesteps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_training_target_is_what_diffusers_predicts(tmp_path, prediction_type):
    diffusers = pytest.importorskip("diffusers")
    config = TrainConfig(out=str(tmp_path), prediction_type=prediction_type, **SMALL)
    pipeline = train.build_pipeline(config)
    scheduler = diffusers.DDPMScheduler.from_config(pipeline.scheduler_config.to_dict())
    assert scheduler.config.prediction_type == prediction_type
    data = train.ShapesData(config.size, config.context_frames + config.chunk_frames, config.seed)
    videos, _ = train.batch_of(data, 0, config.batch_size, 0, 1)
    with torch.no_grad():
        clean = pipeline.vae.encode_video(videos)[:, :, config.context_frames:]  # (b, 4, chunk frames, h, w)
        loss = train.unet_loss(pipeline, data, config, 0, 1)(Oracle(clean, scheduler, prediction_type), 0,
                                                             torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10


class ContextRecorder(torch.nn.Module):
    """Predicts zeros and records the context of each call."""

    def __init__(self):
        super().__init__()
        self.contexts = []

    def forward(self, noisy, timesteps, text, pooled, time_ids, context):
        self.contexts.append(context)
        return torch.zeros_like(noisy)


@pytest.mark.parametrize("context_frames, shorten, expected", [(3, 0.0, {3}), (3, 1.0, {1, 2}), (2, 1.0, {1})])
def test_context_shorten_keeps_the_last_context_frames(tmp_path, context_frames, shorten, expected):
    config = TrainConfig(out=str(tmp_path), context_frames=context_frames, context_drop=0.0, context_shorten=shorten,
                         context_noise_probability=0.0, **SMALL)
    pipeline = train.build_pipeline(config)
    data = train.ShapesData(config.size, context_frames + config.chunk_frames, config.seed)
    recorder, generator = ContextRecorder(), torch.Generator().manual_seed(0)
    loss = train.unet_loss(pipeline, data, config, 0, 1)
    with torch.no_grad():
        for index in range(12):
            loss(recorder, index, generator)
        latents = pipeline.vae.encode_video(train.batch_of(data, 11, config.batch_size, 0, 1)[0])
    assert {context.shape[2] for context in recorder.contexts} == expected
    last = recorder.contexts[-1]  # the context of batch 11: its last frames before the chunk
    assert torch.equal(last, latents[:, :, context_frames - last.shape[2] : context_frames])
