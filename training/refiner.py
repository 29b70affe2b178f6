"""Training a refiner (refiner.py) on top of a frozen video model: restore a clean window from a corrupted one.

At sampling time the refiner reworks the last two chunks' latents after every chunk
(endless.through_refiner): a window of 2 x frames latents, the older chunk already refined once, the
newest one just made. What goes wrong in the baby's long videos is drift: colours slide (a mean that
moves, a contrast that fades or grows) and grain builds up. So a clean window of the training clips,
encoded by the model's VAE, is corrupted the way drift corrupts it, and the refiner learns to undo
that, by the mean squared error to the clean window:

    per (video, channel): x -> mean + scale * (x - mean) + shift   (mean: over the corrupted frames)
    then + noise_std * Gaussian noise, with noise_std uniform in [0, noise] per video

over the whole window, or, with probability `newest_only`, over its newest chunk only (the older
one is as a refined one would be: clean). shift ~ N(0, shift^2), log(scale) ~ N(0, scale^2). A
fresh refiner is the identity, so its loss is that of the corrupted window itself.

Every draw of a step is made for the global batch from the step's generator and each process takes
its slice (as train.unet_loss does): a run is the same on any number of processes and resumes
exactly. The validation corrupts held-out clip i with draws of its own generator, the same in every
run.
"""

from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from refiner import RefinerConfig
from training.data import Batches, batch_of, encode_videos, make_data
from training.loop import seeded_generator
from training.validation import VALIDATION_SEED, HeldOutShapes, Picked


def refiner_config(config) -> RefinerConfig:
    """The refiner of a run (`config`: a train.TrainConfig): its --refiner-* sizes, the release's norms."""
    return RefinerConfig(inner_channels=config.refiner_channels, spatial_heads=config.refiner_heads,
                         spatial_head_dim=config.refiner_head_dim, spatial_layers=config.refiner_spatial_layers,
                         temporal_heads=config.refiner_heads, temporal_head_dim=config.refiner_head_dim,
                         temporal_layers=config.refiner_temporal_layers)


# 1. The corruption.


class Draws(NamedTuple):
    """The random numbers that corrupt a batch of windows (b, c, window, h, w)."""

    shift: torch.Tensor  # (b, c)
    scale: torch.Tensor  # (b, c), positive
    noise_std: torch.Tensor  # (b,)
    newest_only: torch.Tensor  # (b,) bool
    noise: torch.Tensor  # (b, c, window, h, w), standard normal

    def take(self, samples) -> "Draws":
        """The draws of `samples` (a slice or indices of the batch)."""
        return Draws(*(values[samples] for values in self))

    def to(self, device) -> "Draws":
        return Draws(*(values.to(device) for values in self))

    @staticmethod
    def cat(parts: list["Draws"]) -> "Draws":
        return Draws(*(torch.cat(values) for values in zip(*parts)))


@dataclass(frozen=True)
class Corruption:
    """How much a window is corrupted (the module docstring); `frames`: latents per chunk, the
    window being 2 x frames, its newest chunk the last `frames`."""

    shift: float
    scale: float
    noise: float
    newest_only: float
    frames: int

    @classmethod
    def of(cls, config) -> "Corruption":
        """The corruption of a run (`config`: a train.TrainConfig)."""
        return cls(config.refiner_shift, config.refiner_scale, config.refiner_noise, config.refiner_newest_only,
                   config.frames)

    def draw(self, shape, generator: torch.Generator) -> Draws:
        """The draws for a batch of windows of `shape` (b, c, window, h, w), on the CPU."""
        batch, channels = shape[:2]
        return Draws(shift=self.shift * torch.randn(batch, channels, generator=generator),
                     scale=torch.exp(self.scale * torch.randn(batch, channels, generator=generator)),
                     noise_std=self.noise * torch.rand(batch, generator=generator),
                     newest_only=torch.rand(batch, generator=generator) < self.newest_only,
                     noise=torch.randn(tuple(shape), generator=generator))


def corrupt(latents: torch.Tensor, draws: Draws, frames: int) -> torch.Tensor:
    """latents: (b, c, window, h, w) clean; draws on their device -> the corrupted window, the same
    shape: the frames corrupted are all of the window, or its last `frames` where draws.newest_only."""
    window = latents.shape[2]
    first = torch.where(draws.newest_only, window - frames, 0)  # (b,) the first frame corrupted
    touched = torch.arange(window, device=latents.device) >= first[:, None]  # (b, window)
    weights = touched.to(latents.dtype)[:, None, :, None, None]  # (b, 1, window, 1, 1)
    count = weights.sum(dim=2, keepdim=True) * latents.shape[3] * latents.shape[4]  # (b, 1, 1, 1, 1)
    mean = (latents * weights).sum(dim=(2, 3, 4), keepdim=True) / count  # (b, c, 1, 1, 1)
    scale, shift = draws.scale[:, :, None, None, None], draws.shift[:, :, None, None, None]  # (b, c, 1, 1, 1)
    drifted = mean + scale * (latents - mean) + shift + draws.noise_std[:, None, None, None, None] * draws.noise
    return torch.where(weights.bool(), drifted, latents)  # (b, c, window, h, w)


def restoration_loss(refiner, clean: torch.Tensor, draws: Draws, frames: int) -> torch.Tensor:
    """The mean squared error, in float32, between refiner(corrupted window) and the clean window
    (b, c, 2 x frames, h, w)."""
    restored = refiner(corrupt(clean, draws, frames))
    return F.mse_loss(restored.float(), clean.float())


# 2. The data: clips of one window, encoded by the model's VAE.


def window_clips(config, **changes):
    """make_data's clips of one window, 2 x frames (`config`: a train.TrainConfig, with `changes`):
    make_data cuts clips of context_frames + frames, so context_frames is frames here."""
    return make_data(SimpleNamespace(**{**asdict(config), **changes, "context_frames": config.frames}))


def validation_windows(config):
    """The held-out windows of the validation: --validation-data's, or the shapes world's own
    (`HeldOutShapes`); None for a run on videos without --validation-data."""
    if config.validation_data:
        return window_clips(config, data=config.validation_data)
    if config.data == "shapes":
        return HeldOutShapes(window_clips(config, clips=0))  # not cycling: -1 - i is never trained on
    return None


def window_latents(pipeline, batch) -> torch.Tensor:
    """A batch of window clips (training.data.VideoClip) -> the VAE's scaled latents (b, c, 2 x
    frames, h, w) in float32 on the pipeline's device."""
    return encode_videos(pipeline, batch.video).float()


# 3. The loss of a training step, and the validation.


def refiner_loss(pipeline, data, config, rank: int, world_size: int):
    """`loss(refiner, index, generator)` of micro-step `index` (training.loop.Stage's): this
    process's `config.batch_size` windows of `data`, corrupted by draws made for the global batch."""
    corruption = Corruption.of(config)
    batches = Batches(data, config.batch_size, rank, world_size, config.workers)
    mine = slice(rank * config.batch_size, (rank + 1) * config.batch_size)  # of the global batch

    def loss(refiner, index, generator):
        clean = window_latents(pipeline, batches[index])  # (b, c, 2f, h, w)
        draws = corruption.draw((clean.shape[0] * world_size, *clean.shape[1:]), generator).take(mine)
        return restoration_loss(refiner, clean, draws.to(clean.device), config.frames)

    return loss


@torch.no_grad()
def validation_losses(refiner, pipeline, windows, config) -> dict[str, float]:
    """Over held-out windows 0 .. validation_clips-1, each corrupted by draws from its own generator
    (VALIDATION_SEED, i): "loss", the mean squared error of the refined window to the clean one, and
    "corrupted_loss", that of the corrupted window itself (what no refiner, the identity, scores)."""
    corruption, count, batch = Corruption.of(config), config.validation_clips, config.batch_size
    was_training = refiner.training
    refiner.eval()
    totals = torch.zeros(2, dtype=torch.float64)  # refined, corrupted
    for first in range(0, count, batch):
        indices = list(range(first, min(first + batch, count)))
        clean = window_latents(pipeline, batch_of(Picked(windows, indices), 0, len(indices), 0, 1))  # (n, c, 2f, h, w)
        draws = Draws.cat([corruption.draw((1, *clean.shape[1:]), seeded_generator(VALIDATION_SEED, i))
                           for i in indices]).to(clean.device)
        corrupted = corrupt(clean, draws, config.frames)
        for row, window in enumerate((refiner(corrupted), corrupted)):
            errors = (window.float() - clean).square().mean(dim=(1, 2, 3, 4))  # (n,)
            totals[row] += errors.double().sum().cpu()
    refiner.train(was_training)
    return {"loss": totals[0].item() / count, "corrupted_loss": totals[1].item() / count}
