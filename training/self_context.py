"""Self-generated context for training: the chunk is learnt from a context the current model made.

At sampling time every chunk after the first continues frames the model made itself, with its own
errors; a model trained only on clean ground-truth contexts has never seen such errors and lets
them grow (exposure bias). With `SelfContext`, a fraction of the samples of each batch get, in
place of the clip's clean context, what the model makes of it, without gradient:

    "sampled"   the clip is longer by one chunk: the model makes that chunk (`frames` frames) from
                the `context_frames` clean frames before it, as sample.py makes the next chunk
                (the sampler of the model's scheduler config or `sampler`, `steps` steps, the
                sample's text, no guidance); its last `context_frames` frames are the context
    "one-step"  the clean context is noised to a random training timestep in [0, level * T) and
                denoised by the model in one call (as a first chunk: no context of its own)

The loss target is unchanged: the ground-truth chunk after the context. Every draw of a sample
(whether its context is the model's, and that context's noise and timestep) comes from its own
generator, seeded by (seed, step index, the sample's place in the global batch): a sample's context
is a function of the step alone, the same on any number of processes, and a resumed run makes the
same contexts.
"""

from dataclasses import dataclass

import torch

from model import micro_conditioning
from pipeline import randn
from scheduler import add_noise, denoised_from, make_schedule, training_coefficients, with_sampler
from training.loop import seeded_generator

MODES = ("off", "sampled", "one-step")


@dataclass(frozen=True)
class SelfContext:
    """How the contexts of a training batch are made (the module docstring); "off": always clean."""

    mode: str
    probability: float  # per sample, the chance that its context is the model's
    steps: int  # "sampled": sampler steps
    level: float  # "one-step": the noise level is a timestep in [0, level * num_train_timesteps)
    context_frames: int
    frames: int
    size: int  # frame height and width in pixels
    seed: int
    offset: int = 0  # this process's first sample in the global batch (rank x per-process batch)
    sampler: str | None = None  # "sampled": a name of scheduler.SAMPLERS; None: the scheduler config's own

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"self-context mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if not 0 <= self.probability <= 1 or self.steps < 1 or not 0 < self.level <= 1:
            raise ValueError(f"self-context needs probability in [0, 1], steps >= 1 and level in (0, 1]; got "
                             f"{self.probability}, {self.steps}, {self.level}")

    @property
    def extra_frames(self) -> int:
        """Frames a clip needs before its context, beyond context_frames + frames: the chunk the
        "sampled" context is made as (its first context_frames clip frames are what it continues)."""
        return self.frames if self.mode == "sampled" else 0

    def generators(self, index: int, batch: int) -> list[torch.Generator]:
        """The generator of every draw of each of this process's `batch` samples of step `index`."""
        return [seeded_generator(self.seed, index, self.offset + item) for item in range(batch)]

    def chosen(self, generators: list[torch.Generator]) -> torch.Tensor:
        """(n,) the indices of the samples whose context is the model's: each sample's first draw."""
        draws = torch.cat([torch.rand(1, generator=generator) for generator in generators])  # (b,)
        return (draws < self.probability).nonzero()[:, 0]

    @torch.no_grad()
    def split(self, pipeline, latents, text, pooled, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """latents: (b, 4, extra_frames + context_frames + frames, h, w) clean clip latents; text
        (b, tokens, dim) and pooled (b, pooled_dim) the samples' embeddings. Returns the context
        (b, 4, context_frames, h, w), the model's for the chosen samples and the clip's for the others,
        and the chunk (b, 4, frames, h, w), the clip's last frames (the loss target's source)."""
        k, f = self.context_frames, self.frames
        context, chunk = latents[:, :, -(k + f):-f], latents[:, :, -f:]  # (b, 4, k, h, w), (b, 4, f, h, w)
        if self.mode == "off" or self.probability == 0:
            return context, chunk
        generators = self.generators(index, latents.shape[0])
        chosen = self.chosen(generators)  # (n,)
        if len(chosen) == 0:
            return context, chunk
        generators = [generators[item] for item in chosen.tolist()]
        if self.mode == "sampled":
            history = latents[chosen, :, :k]  # (n, 4, k, h, w): the frames before the generated chunk
            made = self.sampled(pipeline, history, text[chosen], pooled[chosen], generators)[:, :, -k:]
        else:
            made = self.one_step(pipeline, context[chosen], text[chosen], pooled[chosen], generators)
        context = context.clone()
        context[chosen] = made.to(context.dtype)  # (b, 4, k, h, w)
        return context, chunk

    def sampled(self, pipeline, history, text, pooled, generators) -> torch.Tensor:
        """history: (n, 4, k, h, w) -> the chunk (n, 4, frames, h, w) the model makes after it in
        `steps` steps without guidance, each sample drawing its noise from its own of `generators`."""
        config = with_sampler(pipeline.scheduler_config, self.sampler)
        timesteps, sigmas = make_schedule(config, self.steps)
        shape = (history.shape[0], history.shape[1], self.frames, *history.shape[-2:])
        noise = randn(shape, generators, history.device, history.dtype)
        time_ids = micro_conditioning(shape[0], self.size, self.size, dtype=text.dtype, device=text.device)
        return pipeline.denoise(config, timesteps.to(history.device), sigmas, noise, text, pooled, time_ids, history,
                                1.0, generators)

    def one_step(self, pipeline, context, text, pooled, generators) -> torch.Tensor:
        """context: (n, 4, k, h, w) clean -> noised to a random timestep each and denoised in one
        model call: the model's estimate of the clean latents (n, 4, k, h, w); sample i draws from
        generators[i]."""
        config = pipeline.scheduler_config
        top = max(1, int(self.level * config.num_train_timesteps))
        timesteps = torch.cat([torch.randint(0, top, (1,), generator=generator) for generator in generators])  # (n,)
        noise = randn(context.shape, generators, context.device, torch.float32)
        noisy = add_noise(config, context.float(), noise, timesteps)  # (n, 4, k, h, w)
        time_ids = micro_conditioning(context.shape[0], self.size, self.size, dtype=text.dtype, device=text.device)
        prediction = pipeline.unet(noisy.to(context.dtype), timesteps.to(context.device), text, pooled, time_ids, None)
        return denoised_from(config, prediction.float(), noisy, *training_coefficients(config, timesteps, noisy))


def augmented_context(context, config, every: int, mine: slice, generator: torch.Generator):
    """A batch's context (b, 4, k, h, w) as the loss sees it, from the draws of `generator` (made for
    the global batch of `every` samples, this process's `mine`): dropped (None: a first chunk) with
    probability config.context_drop, else cut to its last 1 .. k-1 frames with probability
    config.context_shorten and noised (std config.context_noise) with config.context_noise_probability."""
    draws = torch.rand(3, generator=generator)
    if draws[0] < config.context_drop:
        return None
    k = context.shape[2]
    if draws[2] < config.context_shorten and k > 1:
        context = context[:, :, -int(torch.randint(1, k, (), generator=generator)):]  # (b, 4, 1 .. k-1, h, w)
    if draws[1] < config.context_noise_probability:
        context_noise = torch.randn((every, *context.shape[1:]), generator=generator)[mine]
        context = context + config.context_noise * context_noise.to(context)
    return context
