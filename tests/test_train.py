"""train.py: it learns, it resumes exactly, DDP keeps processes identical, mode temporal trains only
the temporal modules; a resumed run refuses other settings, checkpoints and the model are written
whole or not at all, Ctrl-C checkpoints. Baby configs at 16x16 pixels (4x4 latents) keep every run
to seconds. The options themselves: test_train_options.py."""

import dataclasses
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from training import loop
from training import data as video_data
from pipeline import StableDiffusionXLVideoPipeline
from tiny_pipeline import tiny_video_pipeline
from train import TrainConfig

REPOSITORY = Path(__file__).resolve().parents[1]
SMALL = dict(size=16, vae_downsampling=4, batch_size=2, vae_batch_size=4, warmup_steps=2, log_every=1000, sample_every=1000, threads=1)


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
    # Noise prediction on whole contexts, as this test was calibrated (v-prediction falls 5x in these steps).
    config = TrainConfig(out=str(tmp_path), clips=1, vae_steps=60, unet_steps=150, learning_rate=3e-3,
                         vae_learning_rate=3e-3,
                         context_drop=0.0, text_drop=0.0, context_noise_probability=0.0, prediction_type="epsilon",
                         context_shorten=0.0, **SMALL)
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
    settings = dict(vae_steps=4, unet_steps=6, checkpoint_every=3, ema_decay=0.9, **SMALL)  # the model: the average
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
        f"config = train.TrainConfig(out={str(tmp_path / 'out')!r}, vae_steps=2, unet_steps=3, **{SMALL!r})\n"
        "pipeline = train.train(config)\n"
        f"torch.save(pipeline.unet.state_dict(), {str(tmp_path)!r} + f'/rank{{dist.get_rank()}}.pt')\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    # Each process trained on its own clips (video_data.batch_of); DDP's averaged gradients kept them equal.
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_mode_temporal_changes_only_temporal_parameters(tmp_path):
    tiny_video_pipeline(tmp_path / "tokenizer", groupnorm_scope="frame").save_pretrained(
        tmp_path / "checkpoint", provenance={"unet": "the base's"})
    before = StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "checkpoint")
    config = TrainConfig(mode="temporal", model=str(tmp_path / "checkpoint"), out=str(tmp_path / "out"), unet_steps=3,
                         context_drop=0.0, **{**SMALL, "size": 32})
    after = train.train(config)
    changed = {name for name, p in after.unet.state_dict().items() if not torch.equal(p, before.unet.state_dict()[name])}
    temporal = {name for name in before.unet.state_dict() if ".temp_" in name}
    assert changed and changed <= temporal
    assert all(torch.equal(a, b) for a, b in zip(after.vae.state_dict().values(), before.vae.state_dict().values()))
    provenance = json.loads((tmp_path / "out" / "model" / "config.json").read_text())["provenance"]
    assert provenance == {"trained_by": "train.py", "settings": dataclasses.asdict(config),
                          "base": {"unet": "the base's"}}


@pytest.mark.parametrize("overrides, option", [(dict(mode="video"), "--mode"), (dict(size=0), "--size"),
                                                (dict(autocast="fp8"), "--autocast"), (dict(text_drop=2.0), "--text-drop"),
                                                (dict(mode="temporal", model="missing"), "--model"),
                                                (dict(data="missing-folder"), "--data"),
                                                (dict(prediction_type="sample"), "--prediction-type"),
                                                (dict(grad_clip=0.0), "--grad-clip"), (dict(size=18), "--size"),
                                                (dict(vae_downsampling=6), "--vae-downsampling"),
                                                (dict(size=36, vae_downsampling=8), "--size"),
                                                (dict(learning_rate=float("nan")), "--learning-rate"),
                                                (dict(unet_steps=2.5), "--unet-steps"), (dict(warmup_steps=-1), "--warmup-steps"),
                                                (dict(out=__file__), "--out"), (dict(ema_decay=1.0), "--ema-decay"),
                                                (dict(ema_decay=-0.5), "--ema-decay"),
                                                (dict(validation_data="missing-folder"), "--validation-data"),
                                                (dict(fsdp=True, self_context="one-step"), "--fsdp"),
                                                (dict(processes=-1), "--processes"), (dict(peak_tflops=0.0), "--peak-tflops"),
                                                (dict(validate_every=-1), "--validate-every")])
def test_bad_settings_name_the_option(overrides, option):
    with pytest.raises(ValueError, match=option):
        TrainConfig(**overrides)


def test_command_line_options_are_typed():
    config = train.parse_config(["--unet-steps", "7", "--learning-rate", "0.5", "--gradient-checkpointing", "--out",
                                 "x"])
    assert (config.unet_steps, config.learning_rate, config.gradient_checkpointing, config.out) == (7, 0.5, True, "x")
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
    data = video_data.ShapesData(config.size, config.context_frames + config.frames, config.seed)
    videos, _ = video_data.batch_of(data, 0, config.batch_size, 0, 1)
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
    data = video_data.ShapesData(config.size, context_frames + config.frames, config.seed)
    recorder, generator = ContextRecorder(), torch.Generator().manual_seed(0)
    loss = train.unet_loss(pipeline, data, config, 0, 1)
    with torch.no_grad():
        for index in range(12):
            loss(recorder, index, generator)
        latents = pipeline.vae.encode_video(video_data.batch_of(data, 11, config.batch_size, 0, 1)[0])
    assert {context.shape[2] for context in recorder.contexts} == expected
    last = recorder.contexts[-1]  # the context of batch 11: its last frames before the chunk
    assert torch.equal(last, latents[:, :, context_frames - last.shape[2] : context_frames])


# Resuming, checkpoint files, Ctrl-C, progress, the written model ----------------------------------

TINY = dict(vae_steps=2, unet_steps=2, **SMALL)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished run of 2 VAE and 2 UNet steps; tests work on copies (`copy_of`)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    train.train(TrainConfig(out=str(out), **TINY))
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_resumed_run_refuses_other_settings_and_goes_on_with_more_steps(tiny_run, tmp_path, capsys):
    out = copy_of(tiny_run, tmp_path)
    before = files(out)
    with pytest.raises(ValueError, match=r"--size 16 -> 32.*--learning-rate 0.001 -> 0.002"):
        train.train(TrainConfig(out=str(out), **{**TINY, "size": 32, "learning_rate": 2e-3}))
    assert files(out) == before  # nothing touched: the model keeps its VAE's scaling factor
    capsys.readouterr()
    train.train(TrainConfig(out=str(out), **{**TINY, "unet_steps": 4}))
    resuming = capsys.readouterr().out.splitlines()[0]
    assert resuming.startswith(f"resuming {out} (vae.pt at step 2, unet.pt at step 2); accepted ")
    assert resuming.endswith(", --unet-steps 2 -> 4")  # after --out, the run's old folder -> this copy
    assert len(losses(out, "unet")) == 4 and json.loads((out / "train_config.json").read_text())["unet_steps"] == 4


def test_the_trained_model_samples_as_the_baby_does(tiny_run):
    from video_settings import SETTING_NAMES

    written = json.loads((tiny_run / "model" / "config.json").read_text())["sample_defaults"]
    baby = json.loads((REPOSITORY / "models" / "baby" / "config.json").read_text())["sample_defaults"]
    assert written == {**baby, "height": 16, "width": 16}
    assert set(written) <= set(SETTING_NAMES)  # names sample.py takes from a model's sample_defaults
    config = train.parse_config(["--out", str(tiny_run), "--sample-steps", "12", "--sample-guidance", "4",
                                 "--no-sample-anchor-frame"])
    assert {k: train.sample_defaults(config)[k] for k in ("steps", "guidance", "anchor_frame")} == dict(
        steps=12, guidance=4.0, anchor_frame=False)


def main_exit(config: TrainConfig, capsys) -> tuple[int, list[str]]:
    """train.main(config): its exit status and the lines it wrote to stderr."""
    with pytest.raises(SystemExit) as exit:
        train.main(config)
    return exit.value.code, capsys.readouterr().err.splitlines()


def test_ctrl_c_checkpoints_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    config = TrainConfig(out=str(tmp_path), **{**TINY, "unet_steps": 5, "sample_every": 2, "checkpoint_every": 100})
    handler = signal.getsignal(signal.SIGINT)  # the default one, or SIG_IGN in a job started in the background

    def ctrl_c(*args):  # Ctrl-C while the samples of step 2 are written
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C interrupted training in the middle of a step")

    monkeypatch.setattr(train, "write_samples", ctrl_c)
    status, lines = main_exit(config, capsys)
    assert status == 130
    assert lines[-1] == f"stopped at unet step 2/5, saved in {tmp_path / 'unet.pt'}; run the same command to resume"
    assert torch.load(tmp_path / "unet.pt", weights_only=True)["step"] == 2
    monkeypatch.undo()
    train.train(config)
    assert len(losses(tmp_path, "unet")) == 5 and signal.getsignal(signal.SIGINT) is handler  # given back


def test_checkpoints_and_the_model_are_fsynced_before_their_rename(tmp_path, monkeypatch):
    events, fsync, replace = [], os.fsync, os.replace

    def recording_fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        fsync(descriptor)

    def recording_replace(source, target):
        events.append(("replace", str(Path(source).resolve()), str(Path(target).resolve())))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    out = tmp_path.resolve() / "run"
    train.train(TrainConfig(out=str(out), **TINY))
    synced = lambda until: {event[1] for event in events[:until] if event[0] == "fsync"}  # noqa: E731
    for name in ("vae.pt", "unet.pt", "train_config.json", "model"):
        renames = [i for i, event in enumerate(events) if event[0] == "replace" and event[2] == str(out / name)]
        assert renames, name
        for index in renames:
            temporary = Path(events[index][1])
            files_in = {str(temporary / path) for path in files(out / name)} if name == "model" else {str(temporary)}
            assert files_in <= synced(index), name
        assert str(out) in synced(len(events))  # the folder that holds the new name


def test_a_full_disk_keeps_the_last_checkpoint_and_model_and_says_which_file(tiny_run, tmp_path, monkeypatch, capsys):
    out = copy_of(tiny_run, tmp_path)
    before = files(out)
    save = torch.save

    def full_disk(state, file):
        save(state, file)  # half of it reaches the disk
        file.truncate(file.tell() // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    status, lines = main_exit(TrainConfig(out=str(out), **{**TINY, "unet_steps": 3}), capsys)
    assert status == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and str(out / "unet.pt") in lines[0] and "No space left" in lines[0]
    assert files(out)["unet.pt"] == before["unet.pt"] and not list(out.glob("*.tmp"))
    monkeypatch.undo()

    def full_disk_in_the_model(pipeline, folder, **settings):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "unet.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder) / "unet.safetensors"))

    monkeypatch.setattr(StableDiffusionXLVideoPipeline, "save_pretrained", full_disk_in_the_model)
    status, lines = main_exit(TrainConfig(out=str(out), **{**TINY, "unet_steps": 3}), capsys)
    assert status == 1 and "No space left" in lines[-1] and "unet.safetensors" in lines[-1], lines
    model = {name: data for name, data in files(out).items() if name.startswith("model/")}
    assert model == {name: data for name, data in before.items() if name.startswith("model/")}
    assert sorted(path.name for path in out.iterdir() if path.name.startswith("model")) == ["model"]


@pytest.mark.parametrize("damage, named", [("truncate unet.pt", "unet.pt"), ("garbage vae.pt", "vae.pt"),
                                           ("remove vae.pt", "unet.pt")])
def test_a_broken_checkpoint_is_named_before_any_work(tiny_run, tmp_path, capsys, damage, named):
    out = copy_of(tiny_run, tmp_path)
    action, name = damage.split()
    if action == "truncate":
        (out / name).write_bytes((out / name).read_bytes()[:5000])
    elif action == "garbage":
        (out / name).write_bytes(b"not a checkpoint\n" * 100)
    else:
        (out / name).unlink()
    before = files(out)
    status, lines = main_exit(TrainConfig(out=str(out), **{**TINY, "unet_steps": 3}), capsys)
    assert status == 1 and len(lines) == 1 and lines[0].startswith(f"error: {out / named}"), lines
    assert files(out) == before


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_live_line_in_a_terminal_and_a_line_per_interval_otherwise():
    for stream in (io.StringIO(), Terminal()):
        progress = loop.Progress("unet", 0, 5, 2, stream)
        for step in range(1, 6):
            progress.update(step, 0.5, 1e-3, {"samples_per_second": 12.5, "frames_per_second": 50.0, "mfu": 0.41})
        kept = [line.split("\r")[-1].strip() for line in stream.getvalue().split("\n") if line]  # as a terminal shows
        assert [line.split(" loss")[0] for line in kept] == [f"unet step {step}/5" for step in (2, 4, 5)]
        assert all(line.endswith(" left") and " spent, " in line for line in kept)
        assert all(" | 12.5 samples/s, 50 frames/s, MFU 41.0% | " in line for line in kept)
        assert stream.getvalue().count("\r") == (5 if stream.isatty() else 0)


# Throughput, the weights' average ----------------------------------------------------------------


def test_every_step_logs_its_throughput(tiny_run):
    records = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["stage"] in ("vae", "unet")]
    assert len(steps) == 4 and all(r["samples_per_second"] > 0 for r in steps)
    frames = {"vae": 1, "unet": TrainConfig().frames}  # the VAE stage trains on one frame per clip
    for record in steps:
        assert record["frames_per_second"] == pytest.approx(record["samples_per_second"] * frames[record["stage"]])
        assert "mfu" not in record  # a CPU has no peak to compare with


def test_the_average_follows_its_formula():
    # After weights w1 .. wn, the average of w0 is d^n w0 + sum_i (1 - d) d^(n - i) wi.
    decay, start = 0.8, torch.tensor([1.0, -2.0])
    weights = {"w": start.clone()}
    average, sequence = loop.EMA(weights, decay), [torch.tensor([0.5, 0.0]), torch.tensor([3.0, 1.0]),
                                                      torch.tensor([-1.0, 4.0])]
    for value in sequence:
        weights["w"].copy_(value)
        average.update(weights)
    n = len(sequence)
    expected = decay**n * start + sum((1 - decay) * decay ** (n - i) * w for i, w in enumerate(sequence, start=1))
    assert torch.allclose(average.averages["w"], expected, atol=1e-7)
    average.copy_to(weights)
    assert torch.equal(weights["w"], average.averages["w"])


def test_the_model_is_the_average_of_the_trained_weights(tmp_path):
    tiny_video_pipeline(tmp_path / "tokenizer").save_pretrained(tmp_path / "checkpoint")
    start = StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "checkpoint").unet.state_dict()
    decay, seen = 0.7, []
    config = TrainConfig(mode="temporal", model=str(tmp_path / "checkpoint"), out=str(tmp_path / "out"), unet_steps=3,
                         ema_decay=decay, **{**SMALL, "size": 32})
    train.train(config, on_step=lambda stage: seen.append({k: p.detach().clone() for k, p in stage.trained.items()}))
    written = StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "out" / "model").unet.state_dict()
    checkpoint = torch.load(tmp_path / "out" / "unet.pt", weights_only=True)
    for name, value in written.items():
        if name in seen[0]:
            expected = decay**3 * start[name] + sum((1 - decay) * decay ** (3 - i) * w[name] for i, w in enumerate(seen, 1))
            assert torch.allclose(value, expected, atol=1e-6), name
            assert torch.equal(checkpoint["ema"][name], value) and torch.equal(checkpoint["module"][name], seen[-1][name])
        else:
            assert torch.equal(value, start[name]), name  # frozen


# A loss or weights that are not finite (issue 22 item 7) -------------------------------------------


def poisoned_unet_loss(monkeypatch, from_index: int, where: str) -> None:
    """train.unet_loss, whose micro-steps from `from_index` on give a NaN loss (`where` "loss", as a
    shard whose values were changed does) or a finite loss with NaN gradients ("gradient")."""
    unet_loss = train.unet_loss

    def poisoned(*args):
        loss = unet_loss(*args)

        def each(unet, index, generator):
            value = loss(unet, index, generator)
            if index < from_index:
                return value
            if where == "loss":
                return value * float("nan")
            weight = next(p for p in unet.parameters() if p.requires_grad)
            return value + 0 * (weight.sum() * 0).sqrt()  # 0 forward; 0 * inf = NaN backward

        return each

    monkeypatch.setattr(train, "unet_loss", poisoned)


def kept(out: Path) -> dict[str, bytes]:
    """The files of a run that a stopped run must leave as they were: checkpoints and the model."""
    return {name: data for name, data in files(out).items() if name.endswith(".pt") or name.startswith("model/")}


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_non_finite_loss_or_gradient_stops_in_one_line_and_keeps_the_last_checkpoint(tiny_run, tmp_path,
                                                                                       monkeypatch, capsys, where):
    out = copy_of(tiny_run, tmp_path)
    before = kept(out)
    poisoned_unet_loss(monkeypatch, 2, where)  # the third UNet step
    status, lines = main_exit(TrainConfig(out=str(out), **{**TINY, "unet_steps": 4, "checkpoint_every": 1}), capsys)
    assert status == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: unet step 3/4: ") and "not a finite number" in lines[0], lines
    assert f"{out / 'unet.pt'} keeps step 2" in lines[0], lines
    assert kept(out) == before  # no checkpoint nor model of NaN weights
    assert max(json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()) == 2


def test_a_run_that_diverges_before_its_first_checkpoint_writes_no_checkpoint_nor_model(tmp_path, monkeypatch,
                                                                                        capsys):
    poisoned_unet_loss(monkeypatch, 0, "loss")
    status, lines = main_exit(TrainConfig(out=str(tmp_path / "run"), **TINY), capsys)
    assert status == 1 and len(lines) == 1 and lines[0].startswith("error: unet step 1/2: "), lines
    assert "no checkpoint of the unet stage was written" in lines[0]
    assert not (tmp_path / "run" / "unet.pt").exists() and not (tmp_path / "run" / "model").exists()


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    def damage(stage):  # as an overflowing update would leave them, with a finite loss before
        if stage.name == "unet" and stage.step == 1:
            with torch.no_grad():
                next(iter(stage.trained.values()))[0] = float("inf")

    with pytest.raises(ValueError,
                       match=r"unet step 1/2: the trained weights .*not all finite.*no checkpoint of the unet stage"):
        train.train(TrainConfig(out=str(tmp_path), **{**TINY, "checkpoint_every": 1}), on_step=damage)
    assert not (tmp_path / "unet.pt").exists() and not (tmp_path / "model").exists()


def test_a_checkpoint_of_non_finite_weights_is_refused_and_the_model_is_kept(tiny_run, tmp_path, capsys):
    out = copy_of(tiny_run, tmp_path)
    state = torch.load(out / "unet.pt", weights_only=True)
    next(iter(state["module"].values())).fill_(float("nan"))  # written by a run before this check
    torch.save(state, out / "unet.pt")
    before = kept(out)
    status, lines = main_exit(TrainConfig(out=str(out), **TINY), capsys)  # the stage is done: only the model is left
    assert status == 1 and len(lines) == 1 and lines[0].startswith(f"error: {out / 'unet.pt'} holds weights"), lines
    assert kept(out) == before


# Hostile values (issue 22): refused before any work, in one line ------------------------------------


def test_a_range_open_at_one_end_says_so():
    with pytest.raises(ValueError, match=r"--self-context-level must be in \(0, 1\], got 2.0"):
        TrainConfig(self_context_level=2.0)
    with pytest.raises(ValueError, match=r"--learning-rate must be in \(0, 1\], got 1e\+300"):
        TrainConfig(learning_rate=1e300)


@pytest.mark.parametrize("settings, named", [
    (dict(batch_size=10**12), "--batch-size"), (dict(vae_batch_size=10**12), "--vae-batch-size"),
    (dict(size=400_000), "--size"), (dict(frames=10**12), "--frames"),
    (dict(sample_steps=5000), "--sample-steps"), (dict(self_context="sampled", self_context_steps=5000),
                                                  "--self-context-steps")])
def test_a_batch_that_cannot_fit_or_a_sampler_that_cannot_run_is_refused_before_any_work(tmp_path, capsys, settings,
                                                                                          named):
    status, lines = main_exit(TrainConfig(out=str(tmp_path / "run"), **{**TINY, **settings}), capsys)
    assert status == 1 and len(lines) == 1 and lines[0].startswith("error: --") and f"{named} " in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_two_runs_on_one_out_at_once_are_refused_and_the_first_keeps_its_files(tiny_run, tmp_path, capsys):
    out = copy_of(tiny_run, tmp_path)
    before = files(out)
    with train.RunLock(out):  # a run of this --out in progress
        status, lines = main_exit(TrainConfig(out=str(out), **{**TINY, "unet_steps": 3}), capsys)
        assert status == 1 and len(lines) == 1, lines
        assert lines[0] == (f"error: --out {out} is being written by process {os.getpid()} (it holds "
                            f"{out / 'train.lock'}); wait for that run to end or stop it")
        assert {name: data for name, data in files(out).items() if name != "train.lock"} == before
    assert not (out / "train.lock").exists()
    train.train(TrainConfig(out=str(out), **{**TINY, "unet_steps": 3}))  # once it has ended
    assert not (out / "train.lock").exists() and len(losses(out, "unet")) == 3


def test_running_out_of_memory_is_one_line_that_keeps_the_checkpoints(tiny_run, tmp_path, monkeypatch, capsys):
    out = copy_of(tiny_run, tmp_path)
    before = kept(out)

    def out_of_memory(*args):
        def loss(unet, index, generator):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB\nmore lines")
        return loss

    monkeypatch.setattr(train, "unet_loss", out_of_memory)
    status, lines = main_exit(TrainConfig(out=str(out), **{**TINY, "unet_steps": 3}), capsys)
    assert status == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: out of memory (CUDA out of memory. Tried to allocate 80.00 GiB)")
    assert "--plan" in lines[0] and "--batch-size" in lines[0] and kept(out) == before


def test_a_vae_whose_latents_do_not_vary_is_refused_not_scaled_by_infinity(tmp_path):
    config = TrainConfig(out=str(tmp_path), **SMALL)
    vae = train.build_pipeline(config).vae
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.zero_()  # every latent 0: a VAE collapsed by its training
    data = video_data.ShapesData(config.size, config.context_frames + config.frames, config.seed)
    with pytest.raises(ValueError, match=r"the VAE's latents have a standard deviation of 0"):
        train.scaling_factor(vae, data, config)


def test_plan_refuses_a_clip_it_could_not_draw_to_count_with(tmp_path):
    with pytest.raises(ValueError, match=r"^--size 400000 --context-frames 2 --frames 4: --plan draws one clip of "):
        train.plan(TrainConfig(out=str(tmp_path), size=400_000))


def test_a_checkpoint_that_does_not_fit_the_model_is_named_in_one_line(tiny_run, tmp_path, capsys):
    out = copy_of(tiny_run, tmp_path)
    state = torch.load(out / "unet.pt", weights_only=True)
    del state["module"][next(iter(state["module"]))]  # as a checkpoint of another model, or a damaged one
    torch.save(state, out / "unet.pt")
    before = kept(out)
    status, lines = main_exit(TrainConfig(out=str(out), **{**TINY, "unet_steps": 3}), capsys)
    assert status == 1 and len(lines) == 1 and lines[0].startswith(f"error: {out / 'unet.pt'} does not fit"), lines
    assert kept(out) == before


def test_a_file_in_the_place_of_the_lock_that_is_not_one_is_kept_and_named(tiny_run, tmp_path):
    out = copy_of(tiny_run, tmp_path)
    (out / "train.lock").write_text("my notes\n")
    with pytest.raises(ValueError, match=r"train.lock exists and is not a lock of train.py \(it holds no process id\)"):
        train.train(TrainConfig(out=str(out), **{**TINY, "unet_steps": 3}))
    assert (out / "train.lock").read_text() == "my notes\n"


def test_a_non_finite_loss_in_one_process_stops_every_process_at_the_same_step(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch.distributed as dist\n"
        f"sys.path.insert(0, {str(REPOSITORY)!r})\n"
        "import train\n"
        "unet_loss = train.unet_loss\n"
        "def poisoned(*args):\n"
        "    loss = unet_loss(*args)\n"
        "    return lambda unet, index, generator: loss(unet, index, generator) * (\n"
        "        float('nan') if index >= 2 and dist.get_rank() == 1 else 1.0)  # a damaged clip of one process\n"
        "train.unet_loss = poisoned\n"
        f"config = train.TrainConfig(out={str(tmp_path / 'out')!r}, vae_steps=1, unet_steps=4, checkpoint_every=1, "
        f"**{SMALL!r})\n"
        "try:\n"
        "    train.train(config)\n"
        "except ValueError as error:\n"
        "    print(f'rank {dist.get_rank()}: {error}')\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
               str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    stops = sorted(line.split(": ", 1) for line in result.stdout.splitlines() if line.startswith("rank "))
    assert [rank for rank, _ in stops] == ["rank 0", "rank 1"] and stops[0][1] == stops[1][1], result.stdout
    assert stops[0][1].startswith("unet step 3/4: the loss is nan, not a finite number"), stops
    assert "keeps step 2" in stops[0][1]
    assert torch.load(tmp_path / "out" / "unet.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "out" / "model").exists()
