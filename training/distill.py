"""Few-step students: a video model's teacher (N steps with classifier-free guidance) distilled into a
student that makes a chunk in `steps` steps (made for 1 to 4) of the LCM sampler, without guidance
(train.py --mode distill). The student starts as a copy of the teacher; the teacher stays frozen.

Two methods, each one loss of a batch of chunks, their contexts, texts and draws:

    "consistency"            (LCM: Luo et al., 2023, arXiv:2310.04378) the student's consistency
        function f(x_t, t) = c_skip(t) x_t + c_out(t) x0_student(x_t, t) at a timestep t of LCM's
        grid of 50 is pulled towards f at the grid point below, t - 20, evaluated (without gradient)
        on the teacher's DDIM step from x_t to t - 20 under guidance. The guidance is folded in: the
        student learns the guided trajectories and samples with none. The target is the student
        itself without gradient (as improved consistency training does), not an average of it.
    "distribution-matching"  (DMD2: Yin et al., 2024, arXiv:2405.14867) the student makes a chunk
        from noise in its own `steps` LCM steps (the first i without gradient, i drawn, the
        gradient through step i's estimate x0); x0 is noised again to a random t, and the
        difference between a "fake" denoiser's estimate (a copy of the teacher, trained at the same
        time on the student's chunks) and the guided teacher's, normalised by the mean distance to
        the teacher's, is the gradient pushed into x0. No GAN term and no regression term; the fake
        denoiser takes one step per student step (DMD2 takes five), in one optimiser.

The data's chunk is the consistency loss's x0; the distribution-matching loss uses only the data's
contexts and texts. Every draw is made for the global batch from the step's generator and each
process takes its slice [mine], so a run is the same on any number of processes and resumes exactly.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scheduler import (LCM_ORIGINAL_STEPS, add_noise, consistency_scalings, denoised_from, lcm_timesteps,
                       training_coefficients, training_target)

METHODS = ("consistency", "distribution-matching")
SAMPLER = "lcm"  # the student's sampler (scheduler.SAMPLERS), whatever the teacher's
DMD_TIMESTEPS = (0.02, 0.98)  # distribution matching noises x0 to a timestep in this share of the training ones


@dataclass(frozen=True)
class Distillation:
    """What a distillation run does: `method` (METHODS), the student's sampling `steps` and the
    teacher's classifier-free `guidance` scale."""

    method: str
    steps: int
    guidance: float

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"distillation method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not 1 <= self.steps <= LCM_ORIGINAL_STEPS:
            raise ValueError(f"the student's steps must be in [1, {LCM_ORIGINAL_STEPS}], got {self.steps}")


def scalings(timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's (c_skip, c_out) at each of `timesteps` (b,), shaped (b, 1, ...) like `like`: the sampler's
    own numbers (scheduler.consistency_scalings)."""
    pairs = torch.tensor([consistency_scalings(t) for t in timesteps.tolist()], dtype=torch.float64)  # (b, 2)
    shape = (-1, *[1] * (like.dim() - 1))
    return tuple(pairs[:, i].reshape(shape).to(like.device, like.dtype) for i in range(2))


def denoiser(unet, config, noisy, timesteps, text, pooled, time_ids, context) -> torch.Tensor:
    """x0 estimate (b, 4, f, h, w) in float32 of `unet` at `noisy` (b, 4, f, h, w) and `timesteps` (b,)."""
    prediction = unet(noisy, timesteps.to(noisy.device), text, pooled, time_ids, context)
    return denoised_from(config, prediction.float(), noisy.float(), *training_coefficients(config, timesteps, noisy))


def consistency_function(unet, config, noisy, timesteps, text, pooled, time_ids, context) -> torch.Tensor:
    """The student's f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t), (b, 4, f, h, w) float32."""
    c_skip, c_out = scalings(timesteps, noisy)
    return c_skip * noisy.float() + c_out * denoiser(unet, config, noisy, timesteps, text, pooled, time_ids, context)


@torch.no_grad()
def guided_denoiser(teacher, config, noisy, timesteps, text, pooled, time_ids, context, guidance):
    """The teacher's x0 and noise estimates (each (b, 4, f, h, w) float32) at `noisy` under
    classifier-free guidance `guidance`, the unconditional half with zero text (as sample.py's
    empty negative prompt): uncond + guidance * (cond - uncond) on the model's output."""
    double = lambda tensor: None if tensor is None else torch.cat([tensor, tensor])  # noqa: E731
    output = teacher(double(noisy), double(timesteps).to(noisy.device), torch.cat([torch.zeros_like(text), text]),
                     torch.cat([torch.zeros_like(pooled), pooled]), double(time_ids), double(context))
    unconditional, conditional = output.float().chunk(2)
    guided = unconditional + guidance * (conditional - unconditional)
    alpha, std = training_coefficients(config, timesteps, noisy)
    denoised = denoised_from(config, guided, noisy.float(), alpha, std)
    return denoised, (noisy.float() - alpha * denoised) / std


def consistency_loss(student, teacher, config, guidance, chunk, noise, grid, text, pooled, time_ids, context):
    """chunk, noise: (b, 4, f, h, w); grid: (b,) indices into LCM's 50 timesteps (0: the lowest, 19).
    The mean squared distance between the student's f at t = 20 (grid + 1) - 1 and its f, without
    gradient, at the teacher's guided DDIM step from there to t - 20 (to 0 below the grid)."""
    stride = config.num_train_timesteps // LCM_ORIGINAL_STEPS
    timesteps = (grid + 1) * stride - 1  # (b,)
    previous = (timesteps - stride).clamp(min=0)  # (b,)
    noisy = add_noise(config, chunk.float(), noise.float(), timesteps)
    estimate = consistency_function(student, config, noisy, timesteps, text, pooled, time_ids, context)
    denoised, noise_estimate = guided_denoiser(teacher, config, noisy, timesteps, text, pooled, time_ids, context,
                                               guidance)
    alpha, std = training_coefficients(config, previous, noisy)
    stepped = alpha * denoised + std * noise_estimate  # (b, 4, f, h, w): the DDIM step to `previous`
    with torch.no_grad():
        target = consistency_function(student, config, stepped, previous, text, pooled, time_ids, context)
    return F.mse_loss(estimate, target)


def student_chunk(student, config, steps, noises, upto, text, pooled, time_ids, context) -> torch.Tensor:
    """The student's estimate x0 (b, 4, f, h, w) at step `upto` of its `steps`-step LCM sampling from
    noises[0] (the start; noises[i + 1] re-noise after step i): steps before `upto` without gradient."""
    timesteps = lcm_timesteps(config.num_train_timesteps, steps).tolist()
    batch = noises.shape[1]
    sample = noises[0].float()
    for index in range(upto + 1):
        at = torch.full((batch,), timesteps[index], dtype=torch.long)
        with torch.set_grad_enabled(index == upto and torch.is_grad_enabled()):
            estimate = consistency_function(student, config, sample.to(noises.dtype), at, text, pooled, time_ids,
                                            context)
        if index < upto:
            alpha, std = training_coefficients(config, torch.full((batch,), timesteps[index + 1]), sample)
            sample = alpha * estimate + std * noises[index + 1].float()
    return estimate


def distribution_matching_loss(student, fake, teacher, config, distillation, noises, upto, timesteps, noise,
                               fake_timesteps, fake_noise, text, pooled, time_ids, context):
    """noises: (steps, b, 4, f, h, w), the student's start and re-noise; upto: the step whose estimate
    x0 takes the gradient; timesteps, noise: (b,), (b, 4, f, h, w) the noising of x0 for the
    teacher and the fake; fake_timesteps, fake_noise: those of the fake's denoising loss on x0.
    The generator's loss 0.5 * |x0 - stop_grad(x0 - g)|^2 (mean), g = (fake - teacher) / mean|x0 -
    teacher| per sample, plus the fake's denoising loss on x0 without gradient."""
    made = student_chunk(student, config, distillation.steps, noises, upto, text, pooled, time_ids, context)
    noisy = add_noise(config, made.detach(), noise.float(), timesteps)
    real, _ = guided_denoiser(teacher, config, noisy, timesteps, text, pooled, time_ids, context,
                              distillation.guidance)
    with torch.no_grad():
        faked = denoiser(fake, config, noisy, timesteps, text, pooled, time_ids, context)
        scale = (made - real).abs().mean(dim=tuple(range(1, made.dim())), keepdim=True)  # (b, 1, 1, 1, 1)
        gradient = torch.nan_to_num((faked - real) / scale)
    generator_loss = 0.5 * F.mse_loss(made, (made - gradient).detach())
    clean = made.detach()
    fake_noisy = add_noise(config, clean, fake_noise.float(), fake_timesteps)
    prediction = fake(fake_noisy, fake_timesteps.to(clean.device), text, pooled, time_ids, context)
    fake_loss = F.mse_loss(prediction.float(), training_target(config, clean, fake_noise.float(), fake_timesteps))
    return generator_loss + fake_loss


class Distiller(nn.Module):
    """The trained networks of a distillation (the student, and for distribution matching the fake
    denoiser) as one module whose forward is the loss (one DDP forward a step); the frozen teacher
    is held outside its parameters and state."""

    def __init__(self, student: nn.Module, teacher: nn.Module, scheduler_config, distillation: Distillation):
        super().__init__()
        self.student = student
        self.fake = copy.deepcopy(teacher) if distillation.method == "distribution-matching" else None
        self.__dict__["teacher"] = teacher  # not a submodule: frozen, in no checkpoint
        self.scheduler_config, self.distillation = scheduler_config, distillation

    def forward(self, **batch) -> torch.Tensor:
        """The method's loss of `batch` (the keyword arguments of `consistency_loss` or
        `distribution_matching_loss` after the networks and settings)."""
        config, distillation = self.scheduler_config, self.distillation
        if distillation.method == "consistency":
            return consistency_loss(self.student, self.teacher, config, distillation.guidance, **batch)
        return distribution_matching_loss(self.student, self.fake, self.teacher, config, distillation, **batch)


def draws(method: str, steps: int, chunk_shape, every: int, mine: slice, num_train_timesteps: int,
          generator: torch.Generator) -> dict:
    """The random inputs of one micro-step's loss, drawn for the global batch of `every` chunks of
    `chunk_shape` (4, f, h, w) and sliced to this process's `mine`."""
    if method == "consistency":
        grid = torch.randint(0, LCM_ORIGINAL_STEPS, (every,), generator=generator)[mine]
        noise = torch.randn((every, *chunk_shape), generator=generator)[mine]
        return {"grid": grid, "noise": noise}
    low, high = (int(share * num_train_timesteps) for share in DMD_TIMESTEPS)
    return {"noises": torch.randn((steps, every, *chunk_shape), generator=generator)[:, mine],
            "upto": int(torch.randint(0, steps, (), generator=generator)),
            "timesteps": torch.randint(low, high, (every,), generator=generator)[mine],
            "noise": torch.randn((every, *chunk_shape), generator=generator)[mine],
            "fake_timesteps": torch.randint(0, num_train_timesteps, (every,), generator=generator)[mine],
            "fake_noise": torch.randn((every, *chunk_shape), generator=generator)[mine]}
