"""Validation while training: a loss on held-out clips at fixed timesteps and fixed noise, the same in
every run (so that curves compare across runs), the shapes world's metrics (shapes/scoring.py) on a few
prompts, and a PNG plot of the training and validation curves of a run's log.jsonl.

The loss of clip i of `count`: its context frames clean and whole, its caption, timestep
(i + 0.5) * T / count of the T training timesteps, and noise drawn from VALIDATION_SEED + i; the
result is the mean over clips of each clip's mean squared error, whatever the batch or the number of
processes (each takes every world_size-th clip).
"""

import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from endless import Prompts, VideoState, decoded_chunks
from infra.cli import without_nan
from model import micro_conditioning
from scheduler import add_noise, training_target
from shapes.scoring import mean_over, video_score
from training.data import batch_of, encoded_batch
from video_settings import ChunkSpec, DriftControls

VALIDATION_SEED = 1_000_000_007  # of the validation noise, the same in every run
# A combination the baby trains on and one it never sees (world.HELD_OUT), scored over a few chunks.
SHAPES_PROMPTS = ("a red circle moving left", "a red triangle moving up")
SHAPES_CHUNKS = 4


class HeldOutShapes:
    """Clips of a shapes-world data set (video_data.ShapesData, not cycling) that training never
    draws: training takes samples 0, 1, 2, ...; clip i here is sample -1 - i."""

    def __init__(self, data):
        self.data = data

    def __getitem__(self, index: int):
        return self.data[-1 - index]


class Picked:
    """Samples `indices` of a data set, as samples 0, 1, ... (for video_data.batch_of)."""

    def __init__(self, data, indices: list[int]):
        self.data, self.indices = data, indices

    def __getitem__(self, index: int):
        return self.data[self.indices[index]]


def fixed_timesteps(count: int, train_steps: int) -> torch.Tensor:
    """(count,) training timesteps spread evenly over [0, train_steps)."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * train_steps / count).long()


def clip_noise(index: int, shape) -> torch.Tensor:
    """The fixed noise of validation clip `index`: float32 of `shape` on the CPU."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(VALIDATION_SEED + index))


@torch.no_grad()
def validation_loss(unet, pipeline, clips, count: int, config, rank: int = 0, world_size: int = 1) -> float:
    """The mean denoising loss of `unet` over clips 0 .. count-1 of `clips` (a data set of
    video_data: clips of context_frames + frames frames, videos or prepared latents), as the module
    docstring says. `config` gives context_frames, size, batch_size and autocast. Every process calls it and
    gets the same number (each process makes the same number of UNet calls, as FSDP needs)."""
    device = pipeline.device
    scheduler_config = pipeline.scheduler_config
    timesteps = fixed_timesteps(count, scheduler_config.num_train_timesteps)
    k, batch = config.context_frames, config.batch_size
    mine = list(range(rank, count, world_size))
    calls = math.ceil(math.ceil(count / world_size) / batch)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.autocast)
    total = torch.zeros((), dtype=torch.float64)
    was_training = unet.training
    unet.eval()
    for call in range(calls):
        indices = mine[call * batch : (call + 1) * batch]
        weights = [1.0] * len(indices) + [0.0] * (batch - len(indices))
        indices = indices + [0] * (batch - len(indices))  # a process with fewer clips still calls the UNet
        latents, text, pooled = encoded_batch(pipeline, batch_of(Picked(clips, indices), 0, batch, 0, 1))
        context, chunk = latents[:, :, :k], latents[:, :, k:].float()  # (b, 4, k, h, w), (b, 4, f, h, w)
        noise = torch.stack([clip_noise(i, chunk.shape[1:]) for i in indices]).to(chunk)  # (b, 4, f, h, w)
        steps = timesteps[indices]
        noisy = add_noise(scheduler_config, chunk, noise, steps)
        target = training_target(scheduler_config, chunk, noise, steps)
        time_ids = micro_conditioning(batch, config.size, config.size, dtype=text.dtype, device=text.device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            prediction = unet(noisy, steps.to(device), text, pooled, time_ids, context)
        errors = (prediction.float() - target.float()).square().mean(dim=(1, 2, 3, 4))  # (b,)
        total += (errors.double().cpu() * torch.tensor(weights, dtype=torch.float64)).sum()
    unet.train(was_training)
    if world_size > 1:
        total = total.to(device)  # where the process group's backend (nccl) reduces
        torch.distributed.all_reduce(total)
    return total.item() / count


@torch.no_grad()
def shapes_metrics(pipeline, sample_defaults: dict, prompts=SHAPES_PROMPTS, chunks: int = SHAPES_CHUNKS) -> dict:
    """shapes/scoring.py's numbers for a video of each prompt (`chunks` chunks, seed = the prompt's
    index, made as sample.py makes videos with `sample_defaults`): {"all": the means, prompt: its
    numbers}, NaN as None."""
    was_training = pipeline.unet.training
    pipeline.unet.eval()
    scores = {}
    chunk, drift = ChunkSpec.from_options(sample_defaults), DriftControls.from_options(sample_defaults)
    for index, prompt in enumerate(prompts):
        stream = decoded_chunks(pipeline, chunk, drift, Prompts([(0, pipeline.encode_prompt(prompt))]), VideoState(),
                                torch.Generator().manual_seed(index))
        score = video_score(prompt)
        for _ in range(chunks):
            score.add_chunk(next(stream)[0])
        scores[prompt] = score.result()
    pipeline.unet.train(was_training)
    return without_nan({"all": mean_over(list(scores.values())), **scores})


# The plot ---------------------------------------------------------------------------------------

PANEL = (720, 260)  # width, height of one stage's panel
MARGIN = (64, 24, 16, 36)  # left, top, right, bottom
COLOURS = {"training": (150, 180, 225), "average": (30, 80, 180), "validation": (230, 110, 20)}


def curves(log: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{stage: {"training": [(step, loss)], "validation": [(step, loss)]}} of a log.jsonl; a step
    logged twice (a resumed run) keeps its last value. Validation belongs to the stage its record's
    "of" names, else to the unet stage."""
    found: dict[str, dict[str, dict[int, float]]] = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        stage, kind = ((record.get("of", "unet"), "validation") if record.get("stage") == "validation"
                       else (record.get("stage"), "training"))
        if isinstance(record.get("loss"), (int, float)) and math.isfinite(record["loss"]) and record["loss"] > 0:
            found.setdefault(stage, {"training": {}, "validation": {}})[kind][record["step"]] = record["loss"]
    return {stage: {kind: sorted(points.items()) for kind, points in kinds.items()} for stage, kinds in found.items()}


def moving_average(points: list[tuple[int, float]], width: int) -> list[tuple[int, float]]:
    values = [loss for _, loss in points]
    return [(step, sum(values[max(0, i - width + 1) : i + 1]) / (i + 1 - max(0, i - width + 1)))
            for i, (step, _) in enumerate(points)]


def draw_panel(draw: ImageDraw.ImageDraw, top: int, stage: str, lines: dict) -> None:
    """One stage's losses against its steps, the loss on a log scale."""
    left, margin_top, right, bottom = MARGIN
    width, height = PANEL
    points = [point for kind in lines.values() for point in kind]
    steps = [step for step, _ in points]
    logs = [math.log10(loss) for _, loss in points]
    low, high = min(logs), max(logs)
    high = high if high > low else low + 1
    first, last = min(steps), max(max(steps), min(steps) + 1)
    x = lambda step: left + (step - first) / (last - first) * (width - left - right)  # noqa: E731
    y = lambda loss: top + margin_top + (high - math.log10(loss)) / (high - low) * (height - margin_top - bottom)  # noqa: E731
    draw.rectangle([left, top + margin_top, width - right, top + height - bottom], outline=(0, 0, 0))
    draw.text((left, top + 4), f"{stage}: loss (log scale) against step", fill=(0, 0, 0))
    for value in (low, high):
        draw.text((4, y(10**value) - 6), f"{10**value:.3g}", fill=(0, 0, 0))
    for step in (first, last):
        draw.text((x(step) - 10, top + height - bottom + 4), str(step), fill=(0, 0, 0))
    training = lines["training"]
    series = {"training": training, "average": moving_average(training, max(1, len(training) // 50)),
              "validation": lines["validation"]}
    for kind, series_points in series.items():
        xy = [(x(step), y(loss)) for step, loss in series_points]
        if len(xy) > 1:
            draw.line(xy, fill=COLOURS[kind], width=2 if kind != "training" else 1)
        if kind == "validation":
            for px, py in xy:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=COLOURS[kind])
    legend = "training (light), its moving average (dark)" + (", validation (orange)" if lines["validation"] else "")
    draw.text((width - right - 7 * len(legend), top + 4), legend, fill=(0, 0, 0))


def plot_curves(log: Path) -> Image.Image | None:
    """The training and validation curves of a log.jsonl, a panel per stage; None if it has none."""
    stages = curves(log)
    if not stages:
        return None
    image = Image.new("RGB", (PANEL[0], PANEL[1] * len(stages)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.font = ImageFont.load_default_imagefont()  # Pillow's bitmap font: the TrueType default's spaces are 2 px
    for index, (stage, lines) in enumerate(stages.items()):
        draw_panel(draw, index * PANEL[1], stage, lines)
    return image
