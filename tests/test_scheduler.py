"""scheduler.py against diffusers (the oracle), on the CPU in float32: the schedule and the DPM-Solver++
steps against DPMSolverMultistepScheduler, the Euler steps against EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler, the training maths against DDPMScheduler. diffusers' schedulers
compute their steps in float32 (they upcast the sample to it), so float32 is as far as they go."""

import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers import DPMSolverMultistepScheduler as DiffusersScheduler
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffusers.schedulers import scheduling_euler_ancestral_discrete

import evaluate
import sample
from scheduler import (SAMPLERS, History, SchedulerConfig, add_noise, denoised_from, make_alphas_cumprod, make_betas,
                       make_schedule, training_target, velocity, vp_coefficients, with_sampler)
from video_settings import SAMPLER_NAMES

# sdxl-base-1.0/scheduler/scheduler_config.json, as shipped with the model.
SDXL_SCHEDULER_JSON = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "trained_betas": None, "use_karras_sigmas": False,
}
SAMPLE_SHAPE = (2, 4, 3, 8, 8)  # (batch, channels, frames, height, width)
TOLERANCE = 1e-5
EULER_ORACLES = {"euler": EulerDiscreteScheduler, "euler-ancestral": EulerAncestralDiscreteScheduler}
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                 "timestep_spacing", "steps_offset")  # what diffusers' Euler schedulers share with our config


def alphas_cumprod_of(config):
    return make_alphas_cumprod(make_betas(config))


def toy_model(sample, timestep, alphas_cumprod, prediction_type):
    """A fixed nonlinear guess of the clean sample, returned as the model's prediction type.

    The guess stays of order one, as a trained model's does, so that absolute differences mean what
    they say (a raw `0.3 * tanh(x)` taken as epsilon drives samples to about 40 and leaves only
    float32 rounding, about 1e-6 relative, between diffusers, us and a float64 reference).
    """
    alpha, std = alphas_cumprod[timestep].sqrt(), (1 - alphas_cumprod[timestep]).sqrt()
    clean = 0.5 * torch.tanh(sample) + 0.001 * float(timestep) * sample.mean()
    epsilon = (sample - alpha * clean) / std
    return epsilon if prediction_type == "epsilon" else alpha * epsilon - std * clean


def our_step(config, history, model_output, sample, sigma, sigma_next, noise):
    """One step of the config's sampler as pipeline.denoise takes it: the denoised estimate in
    float32, the registry's step function, the history kept."""
    step, stochastic = SAMPLERS[config.algorithm_type]
    denoised = denoised_from(config, model_output.float(), sample.float(), *vp_coefficients(sigma))
    new_sample = step(sample.float(), denoised, sigma, sigma_next, history, noise if stochastic else None)
    history.sigma, history.denoised = sigma, denoised
    return new_sample.to(sample.dtype)


@pytest.mark.parametrize("preset", [SchedulerConfig.sdxl_base, SchedulerConfig.video_model])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
@pytest.mark.parametrize("num_steps", [1, 7, 25, 50, 1000])
def test_timesteps_and_sigmas_equal_diffusers(preset, spacing, beta_schedule, num_steps):
    config = dataclasses.replace(preset(), timestep_spacing=spacing, beta_schedule=beta_schedule)
    theirs = DiffusersScheduler(**config.to_dict())
    if num_steps == 1000 and spacing != "trailing":
        with pytest.raises(ValueError, match="num_inference_steps"):  # diffusers repeats a noise level here
            make_schedule(config, num_steps)
        return
    timesteps, sigmas = make_schedule(config, num_steps)
    theirs.set_timesteps(num_steps)
    assert timesteps.dtype == torch.int64
    assert torch.equal(timesteps, theirs.timesteps)
    assert torch.equal(sigmas, theirs.sigmas)
    assert torch.equal(alphas_cumprod_of(config), theirs.alphas_cumprod)
    assert theirs.init_noise_sigma == 1.0  # diffusers starts from plain noise too


def test_trailing_keeps_exactly_the_requested_steps():
    # np.arange's float stride gives diffusers 62 timesteps (the last one -1) for 61 steps.
    config = SchedulerConfig.video_model()
    theirs = DiffusersScheduler(**config.to_dict())
    timesteps, sigmas = make_schedule(config, 61)
    theirs.set_timesteps(61)
    assert len(theirs.timesteps) == 62 and int(theirs.timesteps[-1]) == -1
    assert torch.equal(timesteps, theirs.timesteps[:61])
    assert torch.equal(sigmas[:-1], theirs.sigmas[:61])


def run_trajectories(config, num_steps, noise_source, start=0, **diffusers_overrides):
    """Sample with our step functions and diffusers' DPMSolverMultistepScheduler from the same start
    and noise, from step `start` on; return the max abs difference over the steps."""
    theirs = DiffusersScheduler(**config.to_dict(), **diffusers_overrides)
    timesteps, sigmas = make_schedule(config, num_steps)
    theirs.set_timesteps(num_steps)
    alphas_cumprod = alphas_cumprod_of(config)
    sample = torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(0))
    ours_sample, theirs_sample = sample.clone(), sample.clone()
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]
    noise_generator = torch.Generator().manual_seed(2)
    history, worst = History(config.solver_order), 0.0
    for index in range(start, num_steps):
        timestep = timesteps[index]
        noise, theirs_kwargs = None, {}
        if noise_source == "noise":
            noise = torch.randn(SAMPLE_SHAPE, generator=noise_generator)
            theirs_kwargs = {"variance_noise": noise}
        elif noise_source == "generator":  # drawn as pipeline.randn draws it
            noise = torch.randn(SAMPLE_SHAPE, generator=generators[0], dtype=torch.float32)
            theirs_kwargs = {"generator": generators[1]}
        ours_output, theirs_output = (toy_model(x, timestep, alphas_cumprod, config.prediction_type)
                                      for x in (ours_sample, theirs_sample))
        ours_sample = our_step(config, history, ours_output, ours_sample, float(sigmas[index]),
                               float(sigmas[index + 1]), noise)
        theirs_sample = theirs.step(theirs_output, timestep, theirs_sample, **theirs_kwargs).prev_sample
        worst = max(worst, (ours_sample - theirs_sample).abs().max().item())
    assert torch.isfinite(ours_sample).all() and ours_sample.abs().max() < 3
    return worst


@pytest.mark.parametrize("num_steps", [25, 5])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("algorithm_type, noise_source", [
    ("dpmsolver++", None), ("sde-dpmsolver++", "noise"), ("sde-dpmsolver++", "generator")])
@pytest.mark.parametrize("preset", [SchedulerConfig.sdxl_base, SchedulerConfig.video_model])
def test_trajectory_equals_diffusers(preset, algorithm_type, noise_source, prediction_type, num_steps):
    config = dataclasses.replace(preset(), algorithm_type=algorithm_type, prediction_type=prediction_type)
    assert run_trajectories(config, num_steps, noise_source) <= TOLERANCE


@pytest.mark.parametrize("algorithm_type, noise_source", [("dpmsolver++", None), ("sde-dpmsolver++", "noise")])
def test_first_order_and_mid_schedule_start_equal_diffusers(algorithm_type, noise_source):
    config = dataclasses.replace(SchedulerConfig.video_model(), algorithm_type=algorithm_type)
    assert run_trajectories(dataclasses.replace(config, solver_order=1), 10, noise_source) <= TOLERANCE
    assert run_trajectories(config, 20, noise_source, start=8) <= TOLERANCE


@pytest.mark.parametrize("num_steps", [5, 25])
def test_lower_order_final_changes_nothing_at_order_two(num_steps):
    config = SchedulerConfig.sdxl_base()
    assert run_trajectories(config, num_steps, None, lower_order_final=False) <= TOLERANCE


@pytest.mark.parametrize("num_steps", [25, 5])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["euler", "euler-ancestral"])
@pytest.mark.parametrize("preset", [SchedulerConfig.sdxl_base, SchedulerConfig.video_model])
def test_euler_trajectory_equals_diffusers(preset, name, prediction_type, num_steps, monkeypatch):
    """A whole run of "euler" / "euler-ancestral" against diffusers' Euler schedulers with the same
    model and noise. diffusers works in k-diffusion's scaling, x = x_0 + sigma * noise: it scales
    the model's input by 1 / sqrt(1 + sigma**2) (scale_model_input) and returns x at the next
    sigma; our latents are variance preserving, sample = x / sqrt(1 + sigma**2), and so is the
    starting noise (diffusers' init_noise_sigma, sqrt(1 + sigma_max**2), is that factor with
    "leading" spacing; with "trailing" it is sigma_max alone, a shortcut of diffusers', so the start
    is converted here by the exact factor). Its "leading" spacing picks other timesteps than
    DPM-Solver's (which ours are, for every sampler): there it is given our schedule."""
    config = dataclasses.replace(preset(), algorithm_type=name, prediction_type=prediction_type)
    theirs = EULER_ORACLES[name](**{key: getattr(config, key) for key in SCHEDULE_KEYS})
    timesteps, sigmas = make_schedule(config, num_steps)
    theirs.set_timesteps(num_steps)
    if config.timestep_spacing == "trailing":
        assert torch.equal(theirs.timesteps, timesteps.float()) and torch.equal(theirs.sigmas, sigmas)
    else:
        theirs.timesteps, theirs.sigmas = timesteps.float(), sigmas.clone()
    noises = [torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(10 + i)) for i in range(num_steps)]
    their_noises = iter(noises)
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda *_, **__: next(their_noises))
    alphas_cumprod = alphas_cumprod_of(config)
    ours_sample = torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(0))
    to_k_diffusion = 1 / vp_coefficients(float(sigmas[0]))[0]  # x = sample / alpha at the first sigma
    if config.timestep_spacing == "leading":
        assert float(theirs.init_noise_sigma) == pytest.approx(to_k_diffusion, rel=1e-6)
    theirs_sample = ours_sample * to_k_diffusion
    history, worst = History(config.solver_order), 0.0
    for index, timestep in enumerate(timesteps):
        theirs_input = theirs.scale_model_input(theirs_sample, theirs.timesteps[index])
        assert (theirs_input - ours_sample).abs().max() <= TOLERANCE  # both the variance-preserving sample
        ours_output, theirs_output = (toy_model(x, timestep, alphas_cumprod, prediction_type)
                                      for x in (ours_sample, theirs_input))
        sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
        ours_sample = our_step(config, history, ours_output, ours_sample, sigma, sigma_next, noises[index])
        theirs_sample = theirs.step(theirs_output, theirs.timesteps[index], theirs_sample).prev_sample
        alpha_next, _ = vp_coefficients(sigma_next)
        worst = max(worst, (ours_sample - alpha_next * theirs_sample.double()).abs().max().item())
    if SAMPLERS[name].stochastic:
        assert next(their_noises, None) is None  # diffusers drew a noise at every step, as the pipeline does
    assert torch.isfinite(ours_sample).all() and ours_sample.abs().max() < 3
    assert worst <= TOLERANCE


def test_the_registry_names_its_samplers_and_their_noise():
    assert tuple(SAMPLERS) == SAMPLER_NAMES  # --help lists them without importing torch
    assert {name: sampler.stochastic for name, sampler in SAMPLERS.items()} == {
        "dpmsolver++": False, "sde-dpmsolver++": True, "euler": False, "euler-ancestral": True, "lcm": True, "tcd": True}
    config = SchedulerConfig.video_model()
    assert with_sampler(config, None) is config
    assert with_sampler(config, "euler") == dataclasses.replace(config, algorithm_type="euler")
    with pytest.raises(ValueError, match="algorithm_type='dpmsolver'"):
        with_sampler(config, "dpmsolver")


def test_the_scheduler_option_is_offered_and_checked_by_sample_and_evaluate(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_arguments(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--scheduler SAMPLER" in help_text and ", ".join(SAMPLER_NAMES) in help_text
    assert sample.parse_arguments(["--prompt", "a", "--scheduler", "euler"]).scheduler == "euler"
    expected = f"--scheduler 'nope' is not a sampler; choose one of {', '.join(SAMPLER_NAMES)}"
    with pytest.raises(ValueError, match=f"^{expected}$".replace("+", r"\+")):
        sample.main(["--prompt", "a", "--scheduler", "nope", "--out", str(tmp_path / "video.mp4")])
    with pytest.raises(ValueError, match="--scheduler 'nope'"):
        evaluate.main(["--scheduler", "nope", "--chunks", "1"])
    assert list(tmp_path.iterdir()) == []  # refused before any output


def test_add_noise_equals_diffusers():
    config = SchedulerConfig.video_model()
    theirs = DiffusersScheduler(**config.to_dict())
    timesteps, _ = make_schedule(config, 25)
    theirs.set_timesteps(25)  # its add_noise works from the sampling schedule's sigmas
    original, noise = torch.randn(SAMPLE_SHAPE), torch.randn(SAMPLE_SHAPE)
    timesteps = timesteps[[3, 17]]
    expected = theirs.add_noise(original, noise, timesteps)
    assert (add_noise(config, original, noise, timesteps) - expected).abs().max() <= 1e-6
    assert (add_noise(config, original, noise, timesteps[0]) - theirs.add_noise(original, noise, timesteps[:1])
            ).abs().max() <= 1e-6


@pytest.mark.parametrize("preset", [SchedulerConfig.sdxl_base, SchedulerConfig.video_model])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_noise_and_target_equal_diffusers_ddpm(preset, prediction_type):
    """add_noise, velocity and training_target against DDPMScheduler (what diffusers' training
    scripts use), at timesteps over the whole training range, ends included."""
    config = dataclasses.replace(preset(), prediction_type=prediction_type)
    theirs = DDPMScheduler.from_config(config.to_dict())
    generator = torch.Generator().manual_seed(0)
    sample, noise = torch.randn(SAMPLE_SHAPE, generator=generator), torch.randn(SAMPLE_SHAPE, generator=generator)
    for timesteps in (torch.tensor([0, 999]), torch.tensor([1, 500]), torch.randint(1000, (2,), generator=generator)):
        noisy, expected_velocity = theirs.add_noise(sample, noise, timesteps), theirs.get_velocity(sample, noise, timesteps)
        assert (add_noise(config, sample, noise, timesteps) - noisy).abs().max() <= 1e-6
        assert (velocity(config, sample, noise, timesteps) - expected_velocity).abs().max() <= 1e-6
        expected = noise if prediction_type == "epsilon" else expected_velocity
        assert (training_target(config, sample, noise, timesteps) - expected).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="timesteps"):
        velocity(config, sample, noise, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="timesteps"):
        add_noise(config, sample, sample, torch.tensor([1000, 3]))


def test_config_round_trips_and_reads_diffusers_configs():
    config = SchedulerConfig.video_model()
    assert SchedulerConfig.from_dict(config.to_dict()) == config
    assert SchedulerConfig.from_diffusers_config(SDXL_SCHEDULER_JSON) == SchedulerConfig.sdxl_base()
    assert SchedulerConfig.from_diffusers_config(dict(DiffusersScheduler(**config.to_dict()).config)) == config
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        SchedulerConfig.from_diffusers_config({**SDXL_SCHEDULER_JSON, "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="mystery_key"):
        SchedulerConfig.from_diffusers_config({**SDXL_SCHEDULER_JSON, "mystery_key": 1})
    with pytest.raises(ValueError, match="_class_name"):
        SchedulerConfig.from_dict(SDXL_SCHEDULER_JSON)


@pytest.mark.parametrize("field, value", [
    ("beta_schedule", "squaredcos_cap_v2"), ("algorithm_type", "dpmsolver"), ("timestep_spacing", "karras"),
    ("prediction_type", "sample"), ("solver_order", 3)])
def test_unknown_config_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{field: value})


@pytest.mark.parametrize("num_steps", [0, -3, 1001, 2.5, True])
def test_bad_step_counts_raise(num_steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_schedule(SchedulerConfig(), num_steps)
