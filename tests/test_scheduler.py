"""scheduler.py against diffusers' DPMSolverMultistepScheduler (the oracle), on the CPU in float32."""

import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers import DPMSolverMultistepScheduler as DiffusersScheduler

from scheduler import DPMSolverMultistepScheduler, SchedulerConfig

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


def both(config, **diffusers_overrides):
    """Our scheduler and diffusers' one, built from the same settings."""
    return DPMSolverMultistepScheduler(config), DiffusersScheduler(**config.to_dict(), **diffusers_overrides)


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


@pytest.mark.parametrize("preset", [SchedulerConfig.sdxl_base, SchedulerConfig.video_model])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
@pytest.mark.parametrize("num_steps", [1, 7, 25, 50, 1000])
def test_timesteps_and_sigmas_equal_diffusers(preset, spacing, beta_schedule, num_steps):
    config = dataclasses.replace(preset(), timestep_spacing=spacing, beta_schedule=beta_schedule)
    ours, theirs = both(config)
    if num_steps == 1000 and spacing != "trailing":
        with pytest.raises(ValueError, match="num_inference_steps"):  # diffusers repeats a noise level here
            ours.set_timesteps(num_steps)
        return
    ours.set_timesteps(num_steps)
    theirs.set_timesteps(num_steps)
    assert ours.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert torch.equal(ours.sigmas, theirs.sigmas)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert ours.init_noise_sigma == theirs.init_noise_sigma == 1.0


def test_trailing_keeps_exactly_the_requested_steps():
    # np.arange's float stride gives diffusers 62 timesteps (the last one -1) for 61 steps.
    ours, theirs = both(SchedulerConfig.video_model())
    ours.set_timesteps(61)
    theirs.set_timesteps(61)
    assert len(theirs.timesteps) == 62 and int(theirs.timesteps[-1]) == -1
    assert torch.equal(ours.timesteps, theirs.timesteps[:61])
    assert torch.equal(ours.sigmas[:-1], theirs.sigmas[:61])


def run_trajectories(config, num_steps, noise_source, start=0, **diffusers_overrides):
    """Sample with both schedulers from the same start and noise; return the max abs difference."""
    ours, theirs = both(config, **diffusers_overrides)
    ours.set_timesteps(num_steps)
    theirs.set_timesteps(num_steps)
    sample = torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(0))
    ours_sample, theirs_sample = sample.clone(), sample.clone()
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]
    noise_generator = torch.Generator().manual_seed(2)
    worst = 0.0
    for timestep in ours.timesteps[start:]:
        ours_kwargs, theirs_kwargs = {}, {}
        if noise_source == "noise":
            noise = torch.randn(SAMPLE_SHAPE, generator=noise_generator)
            ours_kwargs, theirs_kwargs = {"noise": noise}, {"variance_noise": noise}
        elif noise_source == "generator":
            ours_kwargs, theirs_kwargs = {"generator": generators[0]}, {"generator": generators[1]}
        ours_output, theirs_output = (toy_model(x, timestep, ours.alphas_cumprod, config.prediction_type)
                                      for x in (ours_sample, theirs_sample))
        ours_sample = ours.step(ours_output, timestep, ours_sample, **ours_kwargs)
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


def test_add_noise_equals_diffusers():
    ours, theirs = both(SchedulerConfig.video_model())
    ours.set_timesteps(25)
    theirs.set_timesteps(25)
    original, noise = torch.randn(SAMPLE_SHAPE), torch.randn(SAMPLE_SHAPE)
    timesteps = ours.timesteps[[3, 17]]
    expected = theirs.add_noise(original, noise, timesteps)
    assert (ours.add_noise(original, noise, timesteps) - expected).abs().max() <= 1e-6
    assert (ours.add_noise(original, noise, timesteps[0]) - theirs.add_noise(original, noise, timesteps[:1])
            ).abs().max() <= 1e-6


@pytest.mark.parametrize("preset", [SchedulerConfig.sdxl_base, SchedulerConfig.video_model])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_noise_and_target_equal_diffusers_ddpm(preset, prediction_type):
    """add_noise, velocity and training_target against DDPMScheduler (what diffusers' training
    scripts use), at timesteps over the whole training range, ends included."""
    config = dataclasses.replace(preset(), prediction_type=prediction_type)
    ours, theirs = DPMSolverMultistepScheduler(config), DDPMScheduler.from_config(config.to_dict())
    generator = torch.Generator().manual_seed(0)
    sample, noise = torch.randn(SAMPLE_SHAPE, generator=generator), torch.randn(SAMPLE_SHAPE, generator=generator)
    for timesteps in (torch.tensor([0, 999]), torch.tensor([1, 500]), torch.randint(1000, (2,), generator=generator)):
        noisy, velocity = theirs.add_noise(sample, noise, timesteps), theirs.get_velocity(sample, noise, timesteps)
        assert (ours.add_noise(sample, noise, timesteps) - noisy).abs().max() <= 1e-6
        assert (ours.velocity(sample, noise, timesteps) - velocity).abs().max() <= 1e-6
        expected = noise if prediction_type == "epsilon" else velocity
        assert (ours.training_target(sample, noise, timesteps) - expected).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="timesteps"):
        ours.velocity(sample, noise, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="prediction_type"):
        ours.training_target(sample, noise, torch.tensor([0, 1]), "sample")


def test_returns_the_sample_dtype_and_scale_model_input_is_identity():
    scheduler = DPMSolverMultistepScheduler(SchedulerConfig.video_model())
    scheduler.set_timesteps(4)
    sample = torch.randn(SAMPLE_SHAPE).to(torch.bfloat16)
    timestep = scheduler.timesteps[0]
    assert scheduler.scale_model_input(sample, timestep) is sample
    generator = torch.Generator().manual_seed(0)
    assert scheduler.step(sample, timestep, sample, generator=generator).dtype == torch.bfloat16


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
        DPMSolverMultistepScheduler(SchedulerConfig()).set_timesteps(num_steps)


def test_bad_step_calls_raise():
    sample = torch.randn(SAMPLE_SHAPE)
    scheduler = DPMSolverMultistepScheduler(SchedulerConfig.video_model())
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(sample, 999, sample, generator=torch.Generator())
    scheduler.set_timesteps(10)
    timestep = scheduler.timesteps[0]
    with pytest.raises(ValueError, match="generator or noise"):
        scheduler.step(sample, timestep, sample)
    with pytest.raises(ValueError, match="noise shape"):
        scheduler.step(sample, timestep, sample, noise=torch.randn(1, 4))
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(sample, 500, sample, generator=torch.Generator())
    scheduler.step(sample, timestep, sample, generator=torch.Generator())
    with pytest.raises(ValueError, match="next one is"):
        scheduler.step(sample, timestep, sample, generator=torch.Generator())
    with pytest.raises(ValueError, match="timesteps"):
        scheduler.add_noise(sample, sample, torch.tensor([1000, 3]))
