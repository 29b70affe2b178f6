"""DPM-Solver++ multistep sampler (orders 1 and 2) and its SDE variant, for SDXL-style models.

The model is trained on a discrete schedule of `num_train_timesteps` noise levels, where the noisy
sample is `x_t = alpha_t * x_0 + std_t * noise` with `alpha_t**2 + std_t**2 = 1`. We index noise
levels by `sigma = std_t / alpha_t`, so `alpha_t = 1 / sqrt(1 + sigma**2)`, `std_t = sigma * alpha_t`
and the half log signal-to-noise ratio is `lambda = -log(sigma)`. Each solver step moves from sigma
to the next, smaller sigma using the model's prediction of the clean sample (the "denoised" x_0):
DPM-Solver++ (Lu et al., 2022, arXiv:2211.01095) and its SDE form, which adds fresh noise each step.

Schedules, timesteps and results match diffusers' `DPMSolverMultistepScheduler` with the same
settings and its defaults otherwise (no Karras sigmas, a final sigma of zero, midpoint solver).
"""

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

BETA_SCHEDULES = ("scaled_linear", "linear")
ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
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
    """Settings of the sampler; field names and meanings are diffusers' own."""

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
        _check_choice("algorithm_type", self.algorithm_type, ALGORITHM_TYPES)
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

    The three spacings of Lin et al., 2023 (arXiv:2305.08891, table 2), as diffusers computes them.
    """
    steps, count = config.num_train_timesteps, num_inference_steps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, steps - 1, count + 1).round()[::-1][:-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        stride = steps // (count + 1)
        return (np.arange(count + 1) * stride)[::-1][:-1].astype(np.int64) + config.steps_offset
    # np.arange with a float stride can yield one value too many (e.g. 61 steps): we keep `count`,
    # where diffusers keeps an extra timestep -1.
    return np.arange(steps, 0, -steps / count).round()[:count].astype(np.int64) - 1


def vp_coefficients(sigma):
    """(alpha_t, std_t) of the noisy sample x_t = alpha_t * x_0 + std_t * noise at noise level sigma."""
    alpha = 1 / math.sqrt(1 + sigma**2)
    return alpha, sigma * alpha


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


class DPMSolverMultistepScheduler:
    """Stateful sampler with diffusers' interface: `set_timesteps`, then `step` once per timestep."""

    def __init__(self, config):
        self.config = config
        self.alphas_cumprod = make_alphas_cumprod(make_betas(config))  # (num_train_timesteps,)
        self.timesteps = None  # (num_inference_steps,) int64, after set_timesteps
        self.sigmas = None  # (num_inference_steps + 1,) float32 on the CPU, ending in 0

    @property
    def init_noise_sigma(self):
        """Standard deviation of the starting noise: 1, as the model's inputs are variance preserving."""
        return 1.0

    def set_timesteps(self, num_inference_steps, device=None):
        """Choose the timesteps to sample at and forget the multistep history."""
        steps = self.config.num_train_timesteps
        if type(num_inference_steps) is not int or not 1 <= num_inference_steps <= steps:
            raise ValueError(f"num_inference_steps must be an int in [1, {steps}], got {num_inference_steps!r}")
        timesteps = torch.from_numpy(make_timesteps(self.config, num_inference_steps))
        training_sigmas = make_training_sigmas(self.alphas_cumprod)
        sigmas = training_sigmas[timesteps.clamp(0, steps - 1)]  # diffusers interpolates, clamping the ends
        if not bool((sigmas[1:] < sigmas[:-1]).all()):
            raise ValueError(f"num_inference_steps={num_inference_steps} with timestep_spacing="
                             f"{self.config.timestep_spacing!r} repeats a noise level; use fewer steps")
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        self._timesteps_cpu = timesteps
        self.timesteps = timesteps.to(device)
        self._step_index = None
        self._previous = None  # (sigma, denoised) of the last step taken

    def scale_model_input(self, sample, timestep):
        """The model's input at this timestep: the sample itself for this sampler."""
        return sample

    def _denoised(self, model_output, sample, sigma):
        alpha, std = vp_coefficients(sigma)
        if self.config.prediction_type == "epsilon":
            return (sample - std * model_output) / alpha
        return alpha * sample - std * model_output  # v_prediction

    def _index_of(self, timestep):
        timestep = int(timestep)
        if self._step_index is None:
            matches = (self._timesteps_cpu == timestep).nonzero()
            if len(matches) == 0:
                raise ValueError(f"timestep {timestep} is not in the schedule {self._timesteps_cpu.tolist()}")
            return int(matches[0])
        if self._step_index >= len(self._timesteps_cpu):
            raise ValueError("all timesteps were stepped; call set_timesteps again")
        expected = int(self._timesteps_cpu[self._step_index])
        if timestep != expected:
            raise ValueError(f"timestep {timestep} given where the schedule's next one is {expected}")
        return self._step_index

    def step(self, model_output, timestep, sample, generator=None, noise=None):
        """Take one step from `timestep` to the next one in the schedule, returning the new sample.

        model_output, sample: same shape, e.g. (batch, channels, frames, height, width). The SDE variant
        draws its noise (float32, on the generator's device, as diffusers does) from `generator`, or
        uses `noise` of the sample's shape. Computes in float32, returns the sample's dtype.
        """
        if self.timesteps is None:
            raise ValueError("call set_timesteps before step")
        stochastic = self.config.algorithm_type == "sde-dpmsolver++"
        if stochastic and generator is None and noise is None:
            raise ValueError("the sde-dpmsolver++ step needs a generator or noise")
        if noise is not None and noise.shape != sample.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from sample shape {tuple(sample.shape)}")
        index = self._index_of(timestep)
        sigma, sigma_next = float(self.sigmas[index]), float(self.sigmas[index + 1])
        original_dtype, sample = sample.dtype, sample.float()
        denoised = self._denoised(model_output.float(), sample, sigma)
        if not stochastic:
            noise = None
        elif noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=generator.device, dtype=torch.float32)
        if noise is not None:
            noise = noise.to(device=sample.device, dtype=torch.float32)

        if self.config.solver_order == 1 or self._previous is None or sigma_next == 0:
            new_sample = first_order_update(sample, denoised, sigma, sigma_next, noise)
        else:
            sigma_previous, previous_denoised = self._previous
            new_sample = second_order_update(sample, denoised, previous_denoised, sigma_previous, sigma,
                                             sigma_next, noise)
        self._previous = (sigma, denoised)
        self._step_index = index + 1
        return new_sample.to(original_dtype)

    def _training_coefficients(self, timesteps, like):
        """(alpha_t, std_t) at each training timestep, shaped (batch, 1, ...) to broadcast over `like`
        and in its device and dtype; ValueError for a timestep outside [0, num_train_timesteps)."""
        timesteps, steps = torch.as_tensor(timesteps).cpu(), self.config.num_train_timesteps
        if timesteps.is_floating_point() or timesteps.min() < 0 or timesteps.max() >= steps:
            raise ValueError(f"timesteps must be integers in [0, {steps}), got {timesteps.tolist()}")
        alphas_cumprod = self.alphas_cumprod[timesteps].reshape(-1, *[1] * (like.dim() - 1))  # (batch, 1, ...)
        alpha = alphas_cumprod.sqrt().to(like.device, like.dtype)
        std = (1 - alphas_cumprod).sqrt().to(like.device, like.dtype)
        return alpha, std

    def add_noise(self, original, noise, timesteps):
        """Noise clean samples to training timesteps: alpha_t * original + std_t * noise.

        original, noise: (batch, ...); timesteps: int tensor (batch,) or scalar, each in
        [0, num_train_timesteps). Returns original's shape and dtype. Equals diffusers'
        `DDPMScheduler.add_noise`.
        """
        alpha, std = self._training_coefficients(timesteps, original)
        return alpha * original + std * noise

    def velocity(self, sample, noise, timesteps):
        """The v of v-prediction (Salimans & Ho, 2022, arXiv:2202.00512): alpha_t * noise - std_t * sample.

        Arguments as `add_noise`'s (`sample` is the clean sample). Equals diffusers'
        `DDPMScheduler.get_velocity`.
        """
        alpha, std = self._training_coefficients(timesteps, sample)
        return alpha * noise - std * sample

    def training_target(self, sample, noise, timesteps, prediction_type=None):
        """What the model learns to output for `add_noise(sample, noise, timesteps)`: the noise
        (epsilon) or `velocity` (v_prediction); `prediction_type` defaults to the config's."""
        prediction_type = self.config.prediction_type if prediction_type is None else prediction_type
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if prediction_type == "epsilon":
            return noise
        return self.velocity(sample, noise, timesteps)
