"""The noise schedule, the training maths, and the samplers: a registry of step functions.

The model is trained on a discrete schedule of `num_train_timesteps` noise levels, where the noisy
sample is `x_t = alpha_t * x_0 + std_t * noise` with `alpha_t**2 + std_t**2 = 1`. We index noise
levels by `sigma = std_t / alpha_t`, so `alpha_t = 1 / sqrt(1 + sigma**2)`, `std_t = sigma * alpha_t`
and the half log signal-to-noise ratio is `lambda = -log(sigma)`.

Training uses the schedule functions (`add_noise`, `training_target`, `denoised_from`). Sampling
runs `make_schedule`'s sigmas down to zero; at each one the model's output gives the denoised
estimate (the clean x_0), and a sampler's step function moves the sample to the next sigma:

    step(sample, denoised, sigma, sigma_next, history, noise) -> the sample at sigma_next

sample, denoised, noise: float32 tensors of one shape, e.g. (batch, channels, frames, height, width);
sigma > sigma_next >= 0, floats (0 at the last step); history: a `History`, which the caller
updates before and after each step; noise: None for deterministic samplers.

`SAMPLERS` names each step function and says whether it takes fresh noise each step (`stochastic`:
the pipeline draws that noise, and only for those). A new sampler is one function and one entry.

    "dpmsolver++"      DPM-Solver++ 2M (Lu et al., 2022, arXiv:2211.01095), midpoint form
    "sde-dpmsolver++"  its SDE form, which adds fresh noise each step
    "euler"            Euler's method on the probability-flow ODE (Karras et al., 2022, arXiv:2206.00364)
    "euler-ancestral"  Euler steps down to below sigma_next, then fresh noise back up to it
    "lcm"              LCM's multistep consistency sampling (Luo et al., 2023, arXiv:2310.04378)
    "tcd"              TCD's strategic stochastic sampling (Zheng et al., 2024, arXiv:2402.19159)

The Euler samplers work in k-diffusion's scaling, `x = x_0 + sigma * noise = sample / alpha_t`.
Schedules, timesteps and results match diffusers' `DPMSolverMultistepScheduler` with the same
settings and its defaults otherwise (no Karras sigmas, a final sigma of zero, midpoint solver); the
Euler steps match its `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler` on our sigmas,
and "lcm" and "tcd" its `LCMScheduler` and `TCDScheduler`, with their own choice of timesteps
(the "lcm" spacing, `OWN_SPACINGS`). LCM's and TCD's maths is in training timesteps: the caller
gives every step function the step's timesteps and the training schedule's sigmas in `History`.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch

BETA_SCHEDULES = ("scaled_linear", "linear")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace", "lcm")
LCM_ORIGINAL_STEPS = 50  # the "lcm" spacing picks among 50 evenly spaced timesteps (diffusers' original_inference_steps)
LCM_TIMESTEP_SCALING, LCM_SIGMA_DATA = 10.0, 0.5  # of LCM's boundary-condition scalings (`consistency_scalings`)
TCD_GAMMA = 0.3  # TCD's gamma (diffusers' `eta`), its paper's and diffusers' default
PREDICTION_TYPES = ("epsilon", "v_prediction")
SOLVER_ORDERS = (1, 2)

# What `from_diffusers_config` does with diffusers' keys other than our fields: the value each key
# must have because we implement only that behaviour, and keys that change nothing here (besides
# diffusers' bookkeeping keys, which start with "_": `_class_name`, `_diffusers_version`, ...).
# `lower_order_final` is inert: with a final sigma of zero diffusers takes a first-order last step
# whatever its value, and with order <= 2 that is the only step the flag could change.
DIFFUSERS_REQUIRED_VALUES = {
    "trained_betas": None, "thresholding": False, "clip_sample": False, "solver_type": "midpoint",
    "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
    "use_lu_lambdas": False, "use_flow_sigmas": False, "use_dynamic_shifting": False,
    "final_sigmas_type": "zero", "euler_at_final": False, "rescale_betas_zero_snr": False,
    "variance_type": None, "lambda_min_clipped": -math.inf, "interpolation_type": "linear",
    "timestep_type": "discrete", "sigma_min": None, "sigma_max": None,
}
DIFFUSERS_INERT_KEYS = {"lower_order_final", "sample_max_value", "dynamic_thresholding_ratio", "clip_sample_range",
                        "set_alpha_to_one", "skip_prk_steps", "flow_shift", "time_shift_type"}
# diffusers' own defaults, used for fields a diffusers config leaves out (as diffusers does).
DIFFUSERS_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "algorithm_type": "dpmsolver++", "timestep_spacing": "linspace", "steps_offset": 0,
    "prediction_type": "epsilon", "solver_order": 2,
}


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Settings of the schedule and the sampler; field names and meanings are diffusers' own, but
    `algorithm_type` names any sampler of `SAMPLERS`."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    algorithm_type: str = "dpmsolver++"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    prediction_type: str = "epsilon"
    solver_order: int = 2

    def __post_init__(self):
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {self.num_train_timesteps!r}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("algorithm_type", self.algorithm_type, SAMPLERS)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("solver_order", self.solver_order, SOLVER_ORDERS)
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ValueError(f"steps_offset must be an int >= 0, got {self.steps_offset!r}")

    @classmethod
    def sdxl_base(cls):
        """SDXL base 1.0's training schedule (its scheduler_config.json), sampled with DPM-Solver++ 2M."""
        return cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   algorithm_type="dpmsolver++", timestep_spacing="leading", steps_offset=1)

    @classmethod
    def video_model(cls):
        """The original video model's inference setup: SDE DPM-Solver++ 2M, trailing timesteps."""
        return cls(beta_start=0.00082, beta_end=0.014, beta_schedule="scaled_linear",
                   algorithm_type="sde-dpmsolver++", timestep_spacing="trailing", steps_offset=1)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Inverse of `to_dict`; an unknown key raises ValueError."""
        unknown = set(values) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown SchedulerConfig keys {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def from_diffusers_config(cls, values):
        """Read a diffusers scheduler config (e.g. SDXL's scheduler_config.json, as a dict).

        Our fields are taken from it, with diffusers' defaults where it leaves them out. Keys listed in
        `DIFFUSERS_INERT_KEYS` or starting with "_" are ignored; a key in `DIFFUSERS_REQUIRED_VALUES` with another value
        (e.g. `use_karras_sigmas: true`), or any other key, raises ValueError.
        """
        for key, value in values.items():
            if key in DIFFUSERS_DEFAULTS or key in DIFFUSERS_INERT_KEYS or key.startswith("_"):
                continue
            if key not in DIFFUSERS_REQUIRED_VALUES:
                raise ValueError(f"unknown diffusers scheduler key {key!r}")
            if value != DIFFUSERS_REQUIRED_VALUES[key]:
                raise ValueError(f"{key}={value!r} is not supported; only {DIFFUSERS_REQUIRED_VALUES[key]!r}")
        return cls(**{key: values.get(key, default) for key, default in DIFFUSERS_DEFAULTS.items()})


def make_betas(config):
    """Per-timestep noise variances, (num_train_timesteps,) float32."""
    steps = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, steps, dtype=torch.float32)
    return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, steps, dtype=torch.float32) ** 2


def make_alphas_cumprod(betas):
    """Signal variance alpha_t**2 at each training timestep, (num_train_timesteps,)."""
    return torch.cumprod(1.0 - betas, dim=0)


def make_training_sigmas(alphas_cumprod):
    """Noise-to-signal ratio sigma = std_t / alpha_t at each training timestep, (num_train_timesteps,)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def make_timesteps(config, num_inference_steps):
    """Descending training timesteps to sample at, (num_inference_steps,) int64 numpy array.

    The three spacings of Lin et al., 2023 (arXiv:2305.08891, table 2), as diffusers computes them,
    and "lcm": diffusers' `LCMScheduler`'s and `TCDScheduler`'s choice (`lcm_timesteps`).
    """
    steps, count = config.num_train_timesteps, num_inference_steps
    if config.timestep_spacing == "lcm":
        return lcm_timesteps(steps, count)
    if config.timestep_spacing == "linspace":
        return np.linspace(0, steps - 1, count + 1).round()[::-1][:-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        stride = steps // (count + 1)
        return (np.arange(count + 1) * stride)[::-1][:-1].astype(np.int64) + config.steps_offset
    # np.arange with a float stride can yield one value too many (e.g. 61 steps): we keep `count`,
    # where diffusers keeps an extra timestep -1.
    return np.arange(steps, 0, -steps / count).round()[:count].astype(np.int64) - 1


def lcm_timesteps(num_train_timesteps, num_inference_steps):
    """LCM's timesteps (Luo et al., 2023, arXiv:2310.04378), as diffusers' `LCMScheduler` picks them:
    of the LCM_ORIGINAL_STEPS timesteps k - 1, 2k - 1, ..., num_train_timesteps - 1 (k = num_train_timesteps
    // LCM_ORIGINAL_STEPS; 19, 39, ..., 999 for SDXL), `num_inference_steps` evenly spaced by index from
    the top; (num_inference_steps,) int64 numpy array. ValueError for more steps than LCM_ORIGINAL_STEPS."""
    stride = num_train_timesteps // LCM_ORIGINAL_STEPS
    if stride < 1 or num_inference_steps > LCM_ORIGINAL_STEPS:
        raise ValueError(f"num_inference_steps={num_inference_steps} with timestep_spacing='lcm' needs at most "
                         f"{LCM_ORIGINAL_STEPS} steps and at least {LCM_ORIGINAL_STEPS} training timesteps")
    original = np.arange(LCM_ORIGINAL_STEPS, 0, -1) * stride - 1  # (LCM_ORIGINAL_STEPS,) descending
    picked = np.floor(np.linspace(0, LCM_ORIGINAL_STEPS, num_inference_steps, endpoint=False)).astype(np.int64)
    return original[picked].astype(np.int64)


def check_timesteps(config, timesteps):
    """ValueError unless `timesteps` (a sequence of ints) are distinct training timesteps in [0,
    num_train_timesteps) in descending order, at least one."""
    steps = config.num_train_timesteps
    values = list(timesteps)
    if not (values and all(type(t) is int and 0 <= t < steps for t in values)
            and all(a > b for a, b in zip(values, values[1:]))):
        raise ValueError(f"timesteps must be distinct ints in [0, {steps}) in descending order, got {values!r}")


def training_sigmas_of(config):
    """The noise level sigma of each training timestep, (num_train_timesteps,) float32."""
    return make_training_sigmas(make_alphas_cumprod(make_betas(config)))


def make_schedule(config, num_inference_steps=None, timesteps=None):
    """What a sampling run steps through: (timesteps (steps,) int64, sigmas (steps + 1,) float32 ending
    in 0), on the CPU; the model is called at timesteps[i], whose noise level is sigmas[i], and step i
    goes from sigmas[i] to sigmas[i + 1]. Give the number of steps (the timesteps are then the config's
    timestep_spacing's) or the timesteps themselves (descending ints, `check_timesteps`), not both.

    ValueError for a step count outside [1, num_train_timesteps], or one that repeats a noise level,
    or bad timesteps.
    """
    steps = config.num_train_timesteps
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError("give num_inference_steps or timesteps, not both")
    if timesteps is not None:
        check_timesteps(config, timesteps)
        timesteps = torch.tensor(list(timesteps), dtype=torch.int64)
    elif type(num_inference_steps) is not int or not 1 <= num_inference_steps <= steps:
        raise ValueError(f"num_inference_steps must be an int in [1, {steps}], got {num_inference_steps!r}")
    else:
        timesteps = torch.from_numpy(make_timesteps(config, num_inference_steps))
    sigmas = training_sigmas_of(config)[timesteps.clamp(0, steps - 1)]  # diffusers interpolates, clamping the ends
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"num_inference_steps={num_inference_steps} with timestep_spacing="
                         f"{config.timestep_spacing!r} repeats a noise level; use fewer steps")
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)])


def vp_coefficients(sigma):
    """(alpha_t, std_t) of the noisy sample x_t = alpha_t * x_0 + std_t * noise at noise level sigma."""
    alpha = 1 / math.sqrt(1 + sigma**2)
    return alpha, sigma * alpha


# Training maths: at training timesteps, one per batch item.


def training_coefficients(config, timesteps, like):
    """(alpha_t, std_t) at each training timestep, shaped (batch, 1, ...) to broadcast over `like`
    and in its device and dtype. timesteps: int tensor (batch,) or scalar, each in
    [0, num_train_timesteps) (ValueError otherwise)."""
    timesteps, steps = torch.as_tensor(timesteps).cpu(), config.num_train_timesteps
    if timesteps.is_floating_point() or timesteps.min() < 0 or timesteps.max() >= steps:
        raise ValueError(f"timesteps must be integers in [0, {steps}), got {timesteps.tolist()}")
    alphas_cumprod = make_alphas_cumprod(make_betas(config))[timesteps]
    alphas_cumprod = alphas_cumprod.reshape(-1, *[1] * (like.dim() - 1))  # (batch, 1, ...)
    alpha = alphas_cumprod.sqrt().to(like.device, like.dtype)
    std = (1 - alphas_cumprod).sqrt().to(like.device, like.dtype)
    return alpha, std


def add_noise(config, original, noise, timesteps):
    """Noise clean samples to training timesteps: alpha_t * original + std_t * noise.

    original, noise: (batch, ...); timesteps as `training_coefficients` takes them. Returns original's
    shape and dtype. Equals diffusers' `DDPMScheduler.add_noise`.
    """
    alpha, std = training_coefficients(config, timesteps, original)
    return alpha * original + std * noise


def velocity(config, sample, noise, timesteps):
    """The v of v-prediction (Salimans & Ho, 2022, arXiv:2202.00512): alpha_t * noise - std_t * sample.

    Arguments as `add_noise`'s (`sample` is the clean sample). Equals diffusers'
    `DDPMScheduler.get_velocity`.
    """
    alpha, std = training_coefficients(config, timesteps, sample)
    return alpha * noise - std * sample


def training_target(config, sample, noise, timesteps):
    """What the model learns to output for `add_noise(config, sample, noise, timesteps)`: the noise
    (epsilon) or `velocity` (v_prediction), as config.prediction_type says."""
    if config.prediction_type == "epsilon":
        return noise
    return velocity(config, sample, noise, timesteps)


def denoised_from(config, model_output, sample, alpha, std):
    """The clean sample x_0 that the model's output (the noise, or v, as config.prediction_type says)
    implies for `sample` = alpha * x_0 + std * noise: (sample - std * noise) / alpha, or
    alpha * sample - std * v. alpha, std: floats (`vp_coefficients`), or tensors that broadcast over
    the sample (`training_coefficients`)."""
    if config.prediction_type == "epsilon":
        return (sample - std * model_output) / alpha
    return alpha * sample - std * model_output


# The samplers: step functions over the denoised estimate.


def first_order_update(sample, denoised, sigma, sigma_next, noise=None):
    """One DPM-Solver++ step of order 1 (DDIM) from sigma to sigma_next; SDE form when noise is given.

    sample, denoised, noise: tensors of one shape, e.g. (batch, channels, frames, height, width).
    """
    if sigma_next == 0:
        return denoised
    alpha_next, std_next = vp_coefficients(sigma_next)
    _, std = vp_coefficients(sigma)
    step = math.log(sigma / sigma_next)  # h = lambda_next - lambda
    if noise is None:
        return (std_next / std) * sample - alpha_next * math.expm1(-step) * denoised
    return ((std_next / std) * math.exp(-step) * sample - alpha_next * math.expm1(-2 * step) * denoised
            + std_next * math.sqrt(-math.expm1(-2 * step)) * noise)


def second_order_update(sample, denoised, previous_denoised, sigma_previous, sigma, sigma_next, noise=None):
    """One multistep DPM-Solver++(2M) step (midpoint form); SDE form when noise is given.

    Extrapolates the denoised estimate linearly in lambda from the previous step's. All tensors share
    the sample's shape. sigma_next must be > 0 (the last step to zero is first order).
    """
    alpha_next, std_next = vp_coefficients(sigma_next)
    _, std = vp_coefficients(sigma)
    step = math.log(sigma / sigma_next)
    ratio = math.log(sigma_previous / sigma) / step  # r = h_previous / h
    extrapolated = denoised + (0.5 / ratio) * (denoised - previous_denoised)
    if noise is None:
        return (std_next / std) * sample - alpha_next * math.expm1(-step) * extrapolated
    return ((std_next / std) * math.exp(-step) * sample - alpha_next * math.expm1(-2 * step) * extrapolated
            + std_next * math.sqrt(-math.expm1(-2 * step)) * noise)


@dataclass
class History:
    """What a sampler knows of its run besides a step's arguments. Multistep samplers keep the last
    step's noise level and denoised estimate (None before the first step; the caller sets them after
    each step) and use at most solver order `order`. Samplers whose maths is in training timesteps
    (LCM, TCD) read the step's timestep and the next one (0 after the last step; the caller sets them
    before each step) and the sigma of every training timestep (`training_sigmas_of`)."""

    order: int = 2
    sigma: float | None = None
    denoised: torch.Tensor | None = None
    training_sigmas: torch.Tensor | None = None  # (num_train_timesteps,)
    timestep: int | None = None
    timestep_next: int | None = None


def dpm_solver_plus_plus(sample, denoised, sigma, sigma_next, history, noise=None):
    """DPM-Solver++(2M): second order over the history's denoised estimate, but first order at the
    first step, at the last one (to sigma 0) and at solver order 1; the SDE form when noise is given."""
    if history.order == 1 or history.denoised is None or sigma_next == 0:
        return first_order_update(sample, denoised, sigma, sigma_next, noise)
    return second_order_update(sample, denoised, history.denoised, history.sigma, sigma, sigma_next, noise)


def euler(sample, denoised, sigma, sigma_next, history, noise=None):
    """One Euler step of the probability-flow ODE dx/dsigma = (x - denoised) / sigma in k-diffusion's
    x = sample / alpha_t = x_0 + sigma * noise, as our latents are variance preserving."""
    alpha, _ = vp_coefficients(sigma)
    alpha_next, _ = vp_coefficients(sigma_next)
    x = sample / alpha
    return alpha_next * (denoised + (sigma_next / sigma) * (x - denoised))


def euler_ancestral(sample, denoised, sigma, sigma_next, history, noise):
    """Euler ancestral (k-diffusion's, eta 1): an Euler step in x = sample / alpha_t down to
    sigma_down = sigma_next**2 / sigma, then fresh noise of std sqrt(sigma_next**2 - sigma_down**2)
    back up to sigma_next."""
    alpha, _ = vp_coefficients(sigma)
    alpha_next, _ = vp_coefficients(sigma_next)
    sigma_down = sigma_next**2 / sigma
    sigma_up = sigma_next * math.sqrt(1 - (sigma_next / sigma) ** 2)
    x = sample / alpha
    return alpha_next * (denoised + (sigma_down / sigma) * (x - denoised) + sigma_up * noise)


def consistency_scalings(timestep):
    """LCM's boundary-condition scalings (c_skip, c_out) at a training timestep, as diffusers'
    `LCMScheduler` computes them: the consistency models' c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    and c_out = s / sqrt(s**2 + sigma_data**2) at s = 10 * timestep, sigma_data = 0.5, so that
    c_skip = 1 and c_out = 0 at timestep 0."""
    scaled, sigma_data = LCM_TIMESTEP_SCALING * timestep, LCM_SIGMA_DATA
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / math.sqrt(scaled**2 + sigma_data**2)


def lcm(sample, denoised, sigma, sigma_next, history, noise):
    """LCM (Luo et al., 2023, arXiv:2310.04378): the consistency function's estimate
    c_skip * sample + c_out * denoised at the step's training timestep (history.timestep), then
    fresh noise to sigma_next; at the last step (sigma_next 0) the estimate itself."""
    c_skip, c_out = consistency_scalings(history.timestep)
    estimate = c_skip * sample + c_out * denoised
    if sigma_next == 0:
        return estimate
    alpha_next, std_next = vp_coefficients(sigma_next)
    return alpha_next * estimate + std_next * noise


def tcd(sample, denoised, sigma, sigma_next, history, noise):
    """TCD (Zheng et al., 2024, arXiv:2402.19159): a DDIM step from the step's timestep down to
    s = floor((1 - TCD_GAMMA) * timestep_next) (history.timestep_next, 0 after the last step), then
    forward noise from s back up to sigma_next; at the last step, the DDIM step to timestep 0 (whose
    sigma is small but not 0: diffusers' `TCDScheduler` ends there). A gamma of 0 would be DDIM."""
    below = int(torch.floor((1 - TCD_GAMMA) * torch.tensor(history.timestep_next)))  # in float32, as diffusers
    alpha, std = vp_coefficients(sigma)
    alpha_below, std_below = vp_coefficients(float(history.training_sigmas[below]))
    noise_estimate = (sample - alpha * denoised) / std
    at_below = alpha_below * denoised + std_below * noise_estimate
    if sigma_next == 0:
        return at_below
    alpha_next, _ = vp_coefficients(sigma_next)
    kept = (alpha_next / alpha_below) ** 2  # the signal variance kept from s to the next timestep
    return math.sqrt(kept) * at_below + math.sqrt(1 - kept) * noise


class Sampler(NamedTuple):
    """An entry of SAMPLERS: the step function, and whether its steps take fresh noise."""

    step: Callable  # step(sample, denoised, sigma, sigma_next, history, noise) -> the sample at sigma_next
    stochastic: bool  # noise: float32 normal noise of the sample's shape for these, None for the others


SAMPLERS = {
    "dpmsolver++": Sampler(dpm_solver_plus_plus, stochastic=False),
    "sde-dpmsolver++": Sampler(dpm_solver_plus_plus, stochastic=True),
    "euler": Sampler(euler, stochastic=False),
    "euler-ancestral": Sampler(euler_ancestral, stochastic=True),
    "lcm": Sampler(lcm, stochastic=True),  # the noise of the last step is not used (diffusers draws none)
    "tcd": Sampler(tcd, stochastic=True),
}
# The samplers that choose their own timesteps unless a spacing is named, as diffusers' schedulers of
# those names do (they ignore timestep_spacing).
OWN_SPACINGS = {"lcm": "lcm", "tcd": "lcm"}


def with_sampler(config, name, timestep_spacing=None):
    """`config` sampling with SAMPLERS[name] (as its algorithm_type; None: the config's own) at
    `timestep_spacing` (None: the sampler's own if OWN_SPACINGS has one, else the config's);
    `config` itself when both are None."""
    changes = {}
    if name is not None:
        changes = {"algorithm_type": name, "timestep_spacing": OWN_SPACINGS.get(name, config.timestep_spacing)}
    if timestep_spacing is not None:
        changes["timestep_spacing"] = timestep_spacing
    return dataclasses.replace(config, **changes) if changes else config
