"""train.py --mode distill (training/distill.py): the consistency and the distribution-matching losses
against hand computations on stand-in networks (and which networks their gradients reach), two runs
from one seed and a stopped and resumed run equal, the student's contexts are its own chunks without
gradient, only the trained weights change, the written model samples in the student's steps, and the
options of other modes are refused in one line. Runs of 4 steps on the shipped baby (8x8 latents)
with batch 2 keep each to seconds."""

import copy
import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import train
from model import micro_conditioning
from pipeline import StableDiffusionXLVideoPipeline, randn
from scheduler import SchedulerConfig, make_schedule, with_sampler
from test_train import Interrupted, losses, main_exit
from test_train_options import run_train
from train import TrainConfig
from training import data as video_data
from training.distill import METHODS, Distillation, Distiller, consistency_loss, distribution_matching_loss
from training.loop import seeded_generator

REPOSITORY = Path(__file__).resolve().parents[1]
BABY = REPOSITORY / "models" / "baby"
SMALL = dict(mode="distill", model=str(BABY), batch_size=2, warmup_steps=2, log_every=1000, validate_every=0,
             threads=1)

# The losses by hand: float64 from the formulas, on a "UNet" whose output is a known function.

CONFIG = dataclasses.replace(SchedulerConfig.video_model(), prediction_type="v_prediction")
GUIDANCE = 3.0
SHAPE = (2, 4, 2, 3, 3)  # (b, 4, f, h, w)


def hand_alphas_cumprod() -> torch.Tensor:
    """(1000,) float64: the products of 1 - beta_t, beta_t = (sqrt(b0) + t / 999 (sqrt(b1) - sqrt(b0)))^2."""
    t = torch.arange(1000, dtype=torch.float64)
    first, last = math.sqrt(CONFIG.beta_start), math.sqrt(CONFIG.beta_end)
    return torch.cumprod(1 - (first + t / 999 * (last - first)) ** 2, dim=0)


ALPHAS_CUMPROD = hand_alphas_cumprod()


def per_sample(values) -> torch.Tensor:
    """A list of b numbers as (b, 1, 1, 1, 1) float64."""
    return torch.tensor(values, dtype=torch.float64).reshape(-1, 1, 1, 1, 1)


def signal_and_noise(timesteps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, std_t) = (sqrt(alphas_cumprod), sqrt(1 - alphas_cumprod)) at each of the b timesteps."""
    alphas_cumprod = per_sample(ALPHAS_CUMPROD[torch.tensor(timesteps)].tolist())
    return alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()


def boundary_scalings(timesteps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The consistency models' c_skip = 0.5^2 / (s^2 + 0.5^2), c_out = s / sqrt(s^2 + 0.5^2) at s = 10 t."""
    scaled = 10 * per_sample(timesteps)
    return 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25).sqrt()


class StandIn(nn.Module):
    """A "UNet" predicting v = weight * noisy + bias + timestep / 1000 + the means of the text and of the
    pooled embedding (0 for guidance's unconditional half, whose embeddings are zeros)."""

    def __init__(self, weight: float, bias: float):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.tensor(weight)), nn.Parameter(torch.tensor(bias))

    def forward(self, noisy, timesteps, text, pooled, time_ids, context):
        shape = (-1, 1, 1, 1, 1)
        conditioning = text.mean(dim=(1, 2)).reshape(shape) + pooled.mean(dim=1).reshape(shape)
        return self.weight * noisy + self.bias + timesteps.reshape(shape) / 1000 + conditioning


def hand_v(network: StandIn, noisy, timesteps: list[int], conditioning) -> torch.Tensor:
    """network's output in float64: noisy (b, ...), conditioning (b, 1, 1, 1, 1) or 0."""
    return network.weight.item() * noisy + network.bias.item() + per_sample(timesteps) / 1000 + conditioning


def hand_guided_x0(teacher: StandIn, noisy, timesteps: list[int], conditioning) -> torch.Tensor:
    """The teacher's x0 = alpha x - std v under guidance: v = v(zero text) + GUIDANCE (v(text) - v(zero text))."""
    unconditional = hand_v(teacher, noisy, timesteps, 0)
    guided = unconditional + GUIDANCE * (hand_v(teacher, noisy, timesteps, conditioning) - unconditional)
    alpha, std = signal_and_noise(timesteps)
    return alpha * noisy - std * guided


def embeddings(generator: torch.Generator) -> dict:
    """The text (b, 3, 8), pooled (b, 6) and time_ids (b, 6) of a stand-in batch, and no context."""
    return dict(text=torch.randn(2, 3, 8, generator=generator), pooled=torch.randn(2, 6, generator=generator),
                time_ids=torch.zeros(2, 6), context=None)


def hand_conditioning(batch: dict) -> torch.Tensor:
    """(b, 1, 1, 1, 1) float64: what StandIn adds for the batch's text and pooled embeddings."""
    return (batch["text"].double().mean(dim=(1, 2)) + batch["pooled"].double().mean(dim=1)).reshape(-1, 1, 1, 1, 1)


# The losses are float32 means of unit-sized latents: they equal the float64 ones within 1e-6 of their size
# (or 1e-7); a gradient within ROUNDING of the sizes it is made of (`assert_sum`).
ROUNDING = 1e-6  # float32's relative rounding (6e-8), grown over chains of a few operations


def assert_sum(gradient: torch.Tensor, terms: torch.Tensor, sizes: torch.Tensor) -> None:
    """gradient (a float32 scalar) is the sum of the float64 terms (its per-latent parts) within float32's
    rounding: ROUNDING of the sum of `sizes`, each term with the difference it scales (estimate - target)
    replaced by the sum of the sizes of its two sides, whose rounding the difference carries."""
    assert abs(gradient.item() - terms.sum().item()) <= ROUNDING * sizes.sum().item(), (gradient, terms.sum())


def test_the_consistency_loss_is_the_hand_computed_distance_to_the_teacher_s_ddim_step_and_trains_the_student():
    generator = torch.Generator().manual_seed(0)
    student, teacher = StandIn(0.3, 0.1), StandIn(-0.2, 0.05)
    chunk, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    batch = embeddings(generator)
    grid = torch.tensor([0, 37])  # LCM's grid t = 20 (n + 1) - 1: 19 (one below: -1, clamped to 0) and 759 (739)
    loss = consistency_loss(student, teacher, CONFIG, GUIDANCE, chunk, noise, grid, **batch)
    loss.backward()

    timesteps, previous, conditioning = [19, 759], [0, 739], hand_conditioning(batch)
    alpha, std = signal_and_noise(timesteps)
    noisy = alpha * chunk.double() + std * noise.double()
    c_skip, c_out = boundary_scalings(timesteps)
    estimate = c_skip * noisy + c_out * (alpha * noisy - std * hand_v(student, noisy, timesteps, conditioning))
    teacher_x0 = hand_guided_x0(teacher, noisy, timesteps, conditioning)
    teacher_noise = (noisy - alpha * teacher_x0) / std
    alpha_previous, std_previous = signal_and_noise(previous)
    stepped = alpha_previous * teacher_x0 + std_previous * teacher_noise  # DDIM from t to t - 20
    c_skip_previous, c_out_previous = boundary_scalings(previous)
    student_x0 = alpha_previous * stepped - std_previous * hand_v(student, stepped, previous, conditioning)
    target = c_skip_previous * stepped + c_out_previous * student_x0
    assert loss.item() == pytest.approx(((estimate - target) ** 2).mean().item(), rel=1e-6, abs=1e-7)

    # The gradient with the target held constant: d loss / d v = 2 (estimate - target) / n x c_out x -std.
    along_v = 2 * (estimate - target) / estimate.numel() * c_out * -std
    sizes = 2 * (estimate.abs() + target.abs()) / estimate.numel() * (c_out * std).abs()
    assert_sum(student.weight.grad, along_v * noisy, sizes * noisy.abs())
    assert_sum(student.bias.grad, along_v, sizes)
    # ... which a target with gradient would change (through its student call at 739) far beyond the rounding.
    through_target = -2 * (estimate - target) / estimate.numel() * c_out_previous * -std_previous * stepped
    assert abs(through_target.sum().item()) > 100 * ROUNDING * (sizes * noisy.abs()).sum().item()
    assert teacher.weight.grad is None and teacher.bias.grad is None


@pytest.mark.parametrize("upto", [0, 1, 2])
def test_the_distribution_matching_loss_is_the_hand_computed_one_and_each_half_trains_its_network(upto):
    generator = torch.Generator().manual_seed(1)
    student, fake, teacher = StandIn(0.3, 0.1), StandIn(0.25, -0.05), StandIn(-0.2, 0.05)
    noises = torch.randn((3, *SHAPE), generator=generator)  # the start and the re-noise after steps 0 and 1
    noise, fake_noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    batch = embeddings(generator)
    timesteps, fake_timesteps = [300, 700], [100, 900]
    distillation = Distillation("distribution-matching", 3, GUIDANCE)
    loss = distribution_matching_loss(student, fake, teacher, CONFIG, distillation, noises, upto,
                                      torch.tensor(timesteps), noise, torch.tensor(fake_timesteps), fake_noise, **batch)
    loss.backward()

    conditioning = hand_conditioning(batch)
    lcm = [999, 679, 339]  # 3 of LCM's 50 timesteps 20 (n + 1) - 1, evenly spaced by index from the top: n = 49, 33, 16
    sample = noises[0].double()
    for index in range(upto + 1):
        at = [lcm[index]] * 2
        alpha, std = signal_and_noise(at)
        c_skip, c_out = boundary_scalings(at)
        made = c_skip * sample + c_out * (alpha * sample - std * hand_v(student, sample, at, conditioning))
        made_along_v = c_out * -std  # d x0 / d v at this step: the last one's is the gradient's path
        if index < upto:
            alpha_next, std_next = signal_and_noise([lcm[index + 1]] * 2)
            sample = alpha_next * made + std_next * noises[index + 1].double()
    alpha, std = signal_and_noise(timesteps)
    noisy = alpha * made + std * noise.double()
    real = hand_guided_x0(teacher, noisy, timesteps, conditioning)
    faked = alpha * noisy - std * hand_v(fake, noisy, timesteps, conditioning)
    scale = (made - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)  # per sample
    gradient = (faked - real) / scale
    generator_loss = 0.5 * (gradient**2).mean()  # 0.5 mean (x0 - stop(x0 - g))^2
    fake_alpha, fake_std = signal_and_noise(fake_timesteps)
    fake_noisy = fake_alpha * made + fake_std * fake_noise.double()
    prediction = hand_v(fake, fake_noisy, fake_timesteps, conditioning)
    velocity = fake_alpha * fake_noise.double() - fake_std * made
    fake_loss = ((prediction - velocity) ** 2).mean()
    assert loss.item() == pytest.approx((generator_loss + fake_loss).item(), rel=1e-6, abs=1e-7)

    # The student's gradient: g / n through x0 of step `upto` alone (its input `sample` held), none from the
    # fake's loss; the fake's: its loss's alone, none from the generator's; the teacher's: none.
    along_v = gradient / gradient.numel() * made_along_v
    sizes = (faked.abs() + real.abs()) / scale / gradient.numel() * made_along_v.abs()
    assert_sum(student.weight.grad, along_v * sample, sizes * sample.abs())
    assert_sum(student.bias.grad, along_v, sizes)
    along_prediction = 2 * (prediction - velocity) / prediction.numel()
    sizes = 2 * (prediction.abs() + velocity.abs()) / prediction.numel()
    assert_sum(fake.weight.grad, along_prediction * fake_noisy, sizes * fake_noisy.abs())
    assert_sum(fake.bias.grad, along_prediction, sizes)
    assert teacher.weight.grad is None and teacher.bias.grad is None


# Training runs on the baby: one straight run per method, the others compared with it.

RUNS = {"consistency": dict(distill_method="consistency"),  # all weights, 4 student steps
        "distribution-matching": dict(distill_method="distribution-matching", student_steps=2,
                                      distill_weights="temporal")}
STEPS = dict(distill_steps=4, checkpoint_every=2, ema_decay=0.9)
SNAPSHOT_STEP = 3


def snapshot(stage) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of the distiller's networks' weights: "student", "fake" (or none) and "teacher"."""
    distiller = stage.module
    networks = {"student": distiller.student, "fake": distiller.fake, "teacher": distiller.teacher}
    return {name: copy.deepcopy(network.state_dict()) for name, network in networks.items() if network is not None}


@pytest.fixture(scope="module", params=METHODS)
def straight(request, tmp_path_factory) -> dict:
    """A run of 4 steps of `request.param` (RUNS): its settings, out, pipeline and weights at step 3."""
    settings = {**SMALL, **STEPS, **RUNS[request.param]}
    out = tmp_path_factory.mktemp(request.param) / "straight"
    seen = {}

    def record(stage):
        if stage.step == SNAPSHOT_STEP:
            seen.update(snapshot(stage))

    pipeline = train.train(TrainConfig(out=str(out), **settings), on_step=record)
    return dict(method=request.param, settings=settings, out=out, pipeline=pipeline, weights=seen)


def equal(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def test_two_runs_from_one_seed_are_equal_and_a_stopped_and_resumed_run_equals_one_run(straight, tmp_path):
    settings, seen = straight["settings"], {}

    def stop(stage):
        if stage.step == SNAPSHOT_STEP:  # after the checkpoint of step 2
            seen.update(snapshot(stage))
            raise Interrupted

    with pytest.raises(Interrupted):
        train.train(TrainConfig(out=str(tmp_path / "resumed"), **settings), on_step=stop)
    assert seen.keys() == straight["weights"].keys()
    assert all(equal(seen[name], straight["weights"][name]) for name in seen)  # student, fake: from the seed alone
    train.train(TrainConfig(out=str(tmp_path / "resumed"), **settings))
    assert losses(tmp_path / "resumed", "distill") == losses(straight["out"], "distill")
    assert len(losses(straight["out"], "distill")) == STEPS["distill_steps"]
    assert (tmp_path / "resumed" / "model" / "unet.safetensors").read_bytes() == \
        (straight["out"] / "model" / "unet.safetensors").read_bytes()


def test_only_the_trained_weights_change(straight):
    baby = StableDiffusionXLVideoPipeline.from_pretrained(BABY)
    weights, start = straight["weights"], baby.unet.state_dict()
    assert equal(weights["teacher"], start)
    for part in ("vae", "text_encoder"):
        assert equal(getattr(straight["pipeline"], part).state_dict(), getattr(baby, part).state_dict()), part
    networks = ("student", "fake") if straight["method"] == "distribution-matching" else ("student",)
    assert weights.keys() == {*networks, "teacher"}
    for network in networks:
        changed = {name for name, value in weights[network].items() if not torch.equal(value, start[name])}
        temporal = straight["settings"].get("distill_weights") == "temporal"
        trained = {name for name in start if ".temp_" in name or not temporal}
        assert changed and changed <= trained, network
        assert len(changed) > len(trained) // 2, network  # most of them moved


def test_the_model_samples_in_the_student_s_steps_of_lcm_without_guidance(straight, tmp_path):
    model = straight["out"] / "model"
    written = json.loads((model / "config.json").read_text())["sample_defaults"]
    baby = json.loads((BABY / "config.json").read_text())["sample_defaults"]
    steps = straight["settings"].get("student_steps", 4)
    assert written == {**baby, "steps": steps, "guidance": 1.0, "scheduler": "lcm"}
    video = tmp_path / "video.mp4"
    result = subprocess.run([sys.executable, "sample.py", "--model", str(model), "--chunks", "2", "--threads", "1",
                             "--out", str(video), "--prompt", "a red circle moving left"], cwd=REPOSITORY,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(f"{video}.state.pt", weights_only=True)
    assert {name: state["settings"][name] for name in ("steps", "guidance", "scheduler")} == dict(
        steps=steps, guidance=1.0, scheduler="lcm")
    assert state["state"]["chunk_index"] == 2 and f"step {steps}/{steps}" in result.stderr + result.stdout


# The student's contexts.


def test_the_student_s_context_is_its_own_four_step_chunk_without_gradient(tmp_path, monkeypatch):
    settings = dict(SMALL, distill_steps=2, self_context_probability=1.0, context_drop=0.0,
                    context_noise_probability=0.0, context_shorten=0.0)
    forward, calls = Distiller.forward, []

    def recording(distiller, **batch):
        calls.append(dict(context=batch["context"].detach().clone(), requires_grad=batch["context"].requires_grad,
                          grad_enabled=torch.is_grad_enabled(), guidance=distiller.distillation.guidance,
                          student=copy.deepcopy(distiller.student.state_dict())))
        return forward(distiller, **batch)

    monkeypatch.setattr(Distiller, "forward", recording)
    train.train(TrainConfig(out=str(tmp_path / "run"), **settings))
    call = calls[1]  # step index 1: the student has moved from the teacher once
    assert call["grad_enabled"] and not call["requires_grad"]
    assert call["guidance"] == 3.0  # the baby's sample default
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(BABY)
    assert not equal(call["student"], pipeline.unet.state_dict())
    pipeline.unet.load_state_dict(call["student"])

    k, f = 2, 4  # the baby's context frames and frames: clips of f + k + f frames
    clips = video_data.batch_of(video_data.ShapesData(32, f + k + f, 0), 1, 2, 0, 1)
    generators = [seeded_generator(0, 1, item) for item in range(2)]  # (seed, step index, sample)
    for generator in generators:
        torch.rand(1, generator=generator)  # each sample's first draw: whether its context is the model's
    config = with_sampler(pipeline.scheduler_config, "lcm")
    timesteps, sigmas = make_schedule(config, timesteps=[999, 759, 499, 259])  # LCM's 4 of its 50: n = 49, 37, 24, 12
    with torch.no_grad():
        latents = pipeline.vae.encode_video(clips.video)  # (2, 4, 10, 8, 8)
        text, _, pooled, _ = pipeline.text_encoder.encode_prompt(clips.caption, do_classifier_free_guidance=False)
        noise = randn((2, 4, f, 8, 8), generators, "cpu", torch.float32)
        time_ids = micro_conditioning(2, 32, 32, dtype=text.dtype)
        made = pipeline.denoise(config, timesteps, sigmas, noise, text, pooled, time_ids, latents[:, :, :k], 1.0,
                                generators)  # (2, 4, f, 8, 8)
    assert torch.allclose(call["context"], made[:, :, -k:], rtol=0, atol=1e-6)
    assert not torch.allclose(call["context"], latents[:, :, f:f + k], rtol=0, atol=1e-2)  # not the clip's own


# Options.


@pytest.mark.parametrize("overrides, message", [
    (dict(student_steps=2), "--student-steps applies to mode distill only"),
    (dict(mode="distill", model=str(BABY), unet_steps=10), "--unet-steps does not apply to mode distill"),
    (dict(mode="distill", model=str(BABY), self_context="sampled"), "--self-context does not apply to mode distill"),
    (dict(mode="distill", model=str(BABY), text_drop=0.2), "--text-drop does not apply to mode distill"),
    (dict(mode="distill", model=str(BABY), fsdp=True), "--fsdp with mode distill"),
    (dict(mode="distill", model=str(BABY), student_steps=51), r"--student-steps must be in \[1, 50\], got 51"),
])
def test_settings_mode_distill_cannot_use_are_refused_naming_the_option(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)


def test_a_refused_option_is_one_line_before_torch_is_imported(tmp_path):
    result = run_train("--mode", "distill", "--model", str(BABY), "--out", str(tmp_path / "run"), "--text-drop", "0.2")
    assert result.returncode == 2, result.stderr
    error, marker = result.stderr.splitlines()
    assert error.startswith("error: --text-drop does not apply to mode distill") and marker == "torch not imported"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("guidance", [None, 1.0, 0.5, -2, "abc", [3]])
def test_a_teacher_without_a_guidance_needs_teacher_guidance_before_any_work(tmp_path, capsys, guidance):
    # None: no default at all; 1.0: a model sampled without guidance (a student); the others: not a guidance.
    model = Path(shutil.copytree(BABY, tmp_path / "teacher"))
    values = json.loads((model / "config.json").read_text())
    if guidance is None:
        del values["sample_defaults"]["guidance"]
    else:
        values["sample_defaults"]["guidance"] = guidance
    (model / "config.json").write_text(json.dumps(values))
    status, lines = main_exit(TrainConfig(**{**SMALL, "model": str(model), "out": str(tmp_path / "run")}), capsys)
    assert status == 1 and len(lines) == 1, lines
    assert lines[0] == (f"error: --model {model}: its config.json's sample default guidance is {guidance!r}, not a "
                        f"teacher's (a number above 1, at most 100); give the teacher's as --teacher-guidance")
    assert not (tmp_path / "run").exists()
    given = TrainConfig(**{**SMALL, "model": str(model), "out": str(tmp_path / "run"), "teacher_guidance": 2.0})
    train.check_sampler_steps(given)  # accepted with --teacher-guidance


def test_a_teacher_s_refiner_is_kept_with_its_sample_default(tmp_path):
    common = dict(batch_size=2, validate_every=0, log_every=1000, threads=1)
    train.train(TrainConfig(mode="refiner", model=str(BABY), out=str(tmp_path / "refiner"), refiner_steps=1, **common))
    train.train(TrainConfig(mode="distill", model=str(tmp_path / "refiner" / "model"), out=str(tmp_path / "distill"),
                            distill_steps=1, **common))
    model = tmp_path / "distill" / "model"
    assert json.loads((model / "config.json").read_text())["sample_defaults"]["refiner"] is True
    result = subprocess.run([sys.executable, "sample.py", "--model", str(model), "--chunks", "2", "--threads", "1",
                             "--out", str(tmp_path / "video.mp4"), "--prompt", "a red circle moving left"],
                            cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_shipped_student_is_the_baby_s_with_a_distilled_unet_sampled_in_four_lcm_steps_without_guidance():
    student = REPOSITORY / "models" / "baby-student"
    config = json.loads((student / "config.json").read_text())
    teacher = json.loads((BABY / "config.json").read_text())
    assert config["sample_defaults"] == {**teacher["sample_defaults"], "steps": 4, "guidance": 1.0, "scheduler": "lcm"}
    settings = config["provenance"]["settings"]
    assert (settings["mode"], settings["distill_method"], settings["student_steps"]) == ("distill",
                                                                                        "distribution-matching", 4)
    for part in ("vae.safetensors", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        files = sorted(path.relative_to(BABY) for path in (BABY / part).rglob("*") if path.is_file()) \
            if (BABY / part).is_dir() else [Path(part)]
        assert files and all((student / name).read_bytes() == (BABY / name).read_bytes() for name in files), part
    assert (student / "unet.safetensors").read_bytes() != (BABY / "unet.safetensors").read_bytes()


def test_a_new_out_holding_a_model_folder_is_refused_and_the_folder_kept(tmp_path, capsys):
    out = tmp_path / "run"
    notes = out / "model" / "NOTES.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    with pytest.raises(ValueError, match=r"holds a model folder but no run \(no train_config.json\)"):
        TrainConfig(**{**SMALL, "out": str(out)})
    with pytest.raises(ValueError, match="holds a model folder but no run"):
        TrainConfig(mode="baby", out=str(out))
    assert notes.read_text() == "mine" and sorted(path.name for path in out.iterdir()) == ["model"]
