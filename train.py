"""Train the video model: the temporal modules of a converted SDXL checkpoint, or a baby from scratch.

    python train.py --mode temporal --model CHECKPOINT --data VIDEOS --out runs/temporal
    python train.py --mode baby --out runs/baby          # VAE, then UNet, on the shapes world

Mode `temporal` freezes every spatial weight (and the VAE and text encoders) and trains only the
temporal transformers and conditioners. Mode `baby` builds a small model of the same architecture
and trains its VAE, then its whole UNet; its text encoders are frozen random CLIPs with a tokenizer
of the shapes world's words. Each training sample is a clip cut into context frames (clean; with a
probability noised, with a probability dropped so that the first chunk is in distribution, with a
probability cut to its last frames) and chunk frames, which are noised; the loss is on the chunk's
prediction of the noise or of v.

One process on a CPU, or several under `torchrun --nproc_per_node N train.py ...` (DDP; gloo on
CPU, nccl on GPU). Checkpoints resume exactly: model, optimiser, schedule, data position and
random state.
"""

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import world
from model import UNet, UNetConfig
from pipeline import StableDiffusionXLVideoPipeline
from sample import Settings, VideoState, generate_latents, to_uint8_frames
from scheduler import PREDICTION_TYPES, SchedulerConfig, make_alphas_cumprod, make_betas
from text import TextEncoder
from vae import AutoencoderKL, VAEConfig
from video_io import open_writer, read_video

AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
VIDEO_EXTENSIONS = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")


@dataclass
class TrainConfig:
    """Every setting, typed; each becomes a command-line option (`--context-drop 0.2`)."""

    mode: str = "baby"  # "baby" (everything from scratch) or "temporal" (a checkpoint's temporal modules)
    model: str = ""  # mode temporal: the checkpoint folder to start from
    data: str = "shapes"  # "shapes" (the shapes world) or a folder of videos with captions
    clips: int = 0  # shapes world: cycle over this many clips (e.g. 1 to overfit one); 0: endless
    out: str = "runs/baby"
    size: int = 32  # frame height and width in pixels
    frame_stride: int = 1  # video folders: keep every n-th frame
    context_frames: int = 2
    chunk_frames: int = 4
    context_drop: float = 0.2  # probability that a batch has no context
    context_shorten: float = 0.0  # probability that a batch keeps only its last 1 .. k-1 context frames (--image gives 1)
    context_noise: float = 0.1  # std of the noise added to the context when it is noised
    context_noise_probability: float = 0.3
    text_drop: float = 0.1  # probability that a sample's text is zeroed (trains the unconditional)
    prediction_type: str = "epsilon"  # mode baby: "epsilon" or "v_prediction"; mode temporal keeps its checkpoint's
    batch_size: int = 8
    gradient_accumulation: int = 1
    steps: int = 4000
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    autocast: str = "none"
    gradient_checkpointing: bool = False
    vae_steps: int = 1500  # mode baby: steps of the VAE stage before the UNet stage
    vae_batch_size: int = 32
    vae_learning_rate: float = 2e-3
    log_every: int = 50
    sample_every: int = 1000
    checkpoint_every: int = 500
    seed: int = 0
    threads: int = 0  # CPU threads for torch (0: torch's default); 1 is fastest on a busy machine
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    def __post_init__(self):
        if self.mode not in ("baby", "temporal"):
            raise ValueError(f"--mode must be 'baby' or 'temporal', got {self.mode!r}")
        if self.mode == "temporal" and not Path(self.model, "config.json").is_file():
            raise ValueError(f"--model {self.model!r}: mode temporal needs a checkpoint folder (convert_weights.py)")
        if self.data != "shapes" and not Path(self.data).is_dir():
            raise ValueError(f"--data must be 'shapes' or a folder of videos, got {self.data!r}")
        if self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"--autocast must be one of {list(AUTOCAST_DTYPES)}, got {self.autocast!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"--prediction-type must be one of {list(PREDICTION_TYPES)}, got {self.prediction_type!r}")
        if self.clips < 0:
            raise ValueError(f"--clips must be >= 0, got {self.clips}")
        for name in ("size", "frame_stride", "context_frames", "chunk_frames", "batch_size", "gradient_accumulation",
                     "steps", "log_every", "sample_every", "checkpoint_every", "vae_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("context_drop", "context_shorten", "context_noise_probability", "text_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")


# Data ------------------------------------------------------------------------------------------


class ShapesData:
    """Clips of the shapes world; sample `index` is always the same clip. With `num_clips` > 0
    the samples cycle over that many clips."""

    def __init__(self, size: int, num_frames: int, seed: int, num_clips: int = 0):
        self.size, self.num_frames, self.seed, self.num_clips = size, num_frames, seed, num_clips

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        """(3, frames, size, size) in [-1, 1] and its caption."""
        index = index % self.num_clips if self.num_clips else index
        clip = world.random_clip(self.seed * 1_000_003 + index, self.size)
        start = (index * 7919) % 64  # any stretch of the endless clip
        return world.render(clip, self.num_frames, self.size, first_frame=start), clip.caption


class VideoFolder:
    """Videos with captions: a sidecar `NAME.txt`, or `metadata.jsonl` / `metadata.csv` with
    `file_name` and `text` columns. Sample `index` is a window of `num_frames` frames (every
    `frame_stride`-th), resized to cover and centre-cropped."""

    def __init__(self, folder: str, size: int, num_frames: int, frame_stride: int, seed: int):
        self.size, self.num_frames, self.stride, self.seed = size, num_frames, frame_stride, seed
        self.items = sorted(read_captions(Path(folder)).items())
        if not self.items:
            raise ValueError(f"--data {folder}: no videos with captions found")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path, caption = self.items[index % len(self.items)]
        video, _ = read_video(str(path), self.size, self.size)  # (3, frames, size, size)
        video = video[:, :: self.stride]
        span = self.num_frames
        if video.shape[1] < span:
            raise ValueError(f"{path} has {video.shape[1]} frames after stride {self.stride}; need {span}")
        start = int(np.random.default_rng((self.seed, index)).integers(0, video.shape[1] - span + 1))
        return video[:, start : start + span], caption


def read_captions(folder: Path) -> dict[Path, str]:
    captions = {}
    if (folder / "metadata.jsonl").is_file():
        for line in (folder / "metadata.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                captions[folder / row["file_name"]] = row["text"]
    if (folder / "metadata.csv").is_file():
        import csv

        with open(folder / "metadata.csv", newline="") as file:
            for row in csv.DictReader(file):
                captions[folder / row["file_name"]] = row["text"]
    for video in folder.iterdir():
        if video.suffix.lower() in VIDEO_EXTENSIONS and video.with_suffix(".txt").is_file():
            captions[video] = video.with_suffix(".txt").read_text().strip()
    return captions


def batch_of(data, step: int, batch_size: int, rank: int, world_size: int):
    """The samples of this process at `step`: a fixed slice of the global batch, so that the data
    position is the step alone. Returns (batch, 3, frames, H, W) and a list of captions."""
    first = (step * world_size + rank) * batch_size
    samples = [data[first + i] for i in range(batch_size)]
    return torch.stack([video for video, _ in samples]), [caption for _, caption in samples]


# The baby model ---------------------------------------------------------------------------------


def baby_text_encoder(folder: Path, seed: int) -> TextEncoder:
    """Frozen random CLIP encoders (hidden 32, projection 32) and a tokenizer of the world's words."""
    tokenizer_folder = world.write_tokenizer_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder, model_max_length=16, local_files_only=True)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_folder, model_max_length=16, pad_token="!",
                                                local_files_only=True)
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=16, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=32, **common))
    return TextEncoder(tokenizer, tokenizer_2, text_encoder, text_encoder_2)


def baby_configs(size: int) -> tuple[UNetConfig, VAEConfig]:
    """Three levels each (the VAE downsamples by 4), 3.0 M UNet parameters, 1.3 M of them temporal."""
    vae = VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, force_upcast=False)
    unet = UNetConfig(
        block_out_channels=(32, 64, 64), layers_per_block=1, transformer_layers_per_block=(0, 1, 1), head_dim=16,
        cross_attention_dim=64, pooled_text_dim=32, addition_time_embed_dim=16, norm_num_groups=8,
        sample_size=size // vae.downsample_factor, temporal_layers=1, conditioner_dim=64,
    )
    return unet, vae


# Training ---------------------------------------------------------------------------------------


def learning_rate_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then a cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class Stage:
    """One training loop: a module, the parameters it trains, a loss; checkpoints `out/NAME.pt`."""

    def __init__(self, name, module, parameters, loss, steps, learning_rate, config: TrainConfig, distributed):
        self.name, self.module, self.loss, self.steps, self.config = name, module, loss, steps, config
        self.parameters = list(parameters)
        self.path = Path(config.out) / f"{name}.pt"
        self.optimizer = torch.optim.AdamW(self.parameters, lr=learning_rate, weight_decay=config.weight_decay)
        factor = lambda step: learning_rate_factor(step, config.warmup_steps, steps)  # noqa: E731
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.rank = dist.get_rank() if distributed else 0
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.rank)
        self.step = 0
        self.wrapped = module
        if distributed:
            self.wrapped = DistributedDataParallel(module, find_unused_parameters=True)

    def save(self) -> None:
        """Every process calls it; rank 0 writes every process's random state with the rest."""
        generators = [self.generator.get_state()]
        if dist.is_initialized():
            generators = [None] * dist.get_world_size()
            dist.all_gather_object(generators, self.generator.get_state())
        if self.rank != 0:
            return
        state = {"step": self.step, "module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "generators": generators}
        temporary = self.path.with_suffix(".tmp")
        torch.save(state, temporary)
        os.replace(temporary, self.path)

    def load(self) -> None:
        """Continue from the checkpoint, if there is one (each process reads the same file)."""
        if not self.path.is_file():
            return
        state = torch.load(self.path, weights_only=True, map_location="cpu")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.generator.set_state(state["generators"][self.rank])
        self.step = state["step"]

    def run(self, on_step=None) -> None:
        """Train from the current step to the last, logging, sampling and checkpointing."""
        config = self.config
        autocast = AUTOCAST_DTYPES[config.autocast]
        device_type = torch.device(config.device).type
        started = time.time()
        while self.step < self.steps:
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(config.gradient_accumulation):
                with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
                    loss = self.loss(self.wrapped, self.step * config.gradient_accumulation + micro, self.generator)
                (loss / config.gradient_accumulation).backward()
                total += loss.item() / config.gradient_accumulation
            torch.nn.utils.clip_grad_norm_(self.parameters, config.grad_clip)
            self.optimizer.step()
            self.schedule.step()
            self.step += 1
            if self.rank == 0:
                log_step(self, total, time.time() - started)
            if on_step is not None:
                on_step(self)
            if self.step % config.checkpoint_every == 0 or self.step == self.steps:
                self.save()


def log_step(stage: Stage, loss: float, seconds: float) -> None:
    """Append the step's loss to out/log.jsonl; print every `log_every` steps."""
    record = {"stage": stage.name, "step": stage.step, "loss": loss, "lr": stage.schedule.get_last_lr()[0]}
    with open(Path(stage.config.out) / "log.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")
    if stage.step % stage.config.log_every == 0 or stage.step == stage.steps:
        print(f"{stage.name} step {stage.step}/{stage.steps} loss {loss:.4f} lr {record['lr']:.2e} "
              f"({seconds:.0f} s)", flush=True)


class VAEObjective(torch.nn.Module):
    """Reconstruction (MSE) of images through the VAE plus a small KL term, as one forward (for DDP)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """images: (batch, 3, H, W) in [-1, 1]; noise: (batch, latent_channels, h, w)."""
        posterior = self.vae.encode(images)
        decoded = self.vae.decode(posterior.mean + posterior.std * noise)
        kl = 0.5 * (posterior.mean**2 + posterior.std**2 - 1 - posterior.logvar).mean()
        return F.mse_loss(decoded, images) + 1e-4 * kl


def vae_loss(data, config: TrainConfig, rank: int, world_size: int, latent_shape):
    def loss(objective, index, generator):
        videos, _ = batch_of(data, index, config.vae_batch_size, rank, world_size)
        images = videos[:, :, 0].to(config.device)  # (b, 3, H, W): one frame per clip
        noise = torch.randn((images.shape[0], *latent_shape), generator=generator).to(images)
        return objective(images, noise)

    return loss


def unet_loss(pipeline: StableDiffusionXLVideoPipeline, data, config: TrainConfig, rank: int, world_size: int):
    """The denoising loss on the chunk frames, conditioned on the clean (or noised, or no) context: the
    model predicts the noise, or v = alpha * noise - sigma * latents, as its scheduler's prediction_type says."""
    alphas_cumprod = make_alphas_cumprod(make_betas(pipeline.scheduler_config)).to(config.device)
    train_steps = pipeline.scheduler_config.num_train_timesteps
    k = config.context_frames

    def loss(unet, index, generator):
        videos, captions = batch_of(data, index, config.batch_size, rank, world_size)
        with torch.no_grad():
            latents = pipeline.vae.encode_video(videos.to(config.device))  # (b, 4, k + f, h, w)
            text, _, pooled, _ = pipeline.text_encoder.encode_prompt(captions, do_classifier_free_guidance=False)
        batch = latents.shape[0]
        keep_text = (torch.rand(batch, generator=generator) >= config.text_drop).to(text)  # (b,)
        text, pooled = text * keep_text[:, None, None], pooled * keep_text[:, None]
        context, chunk = latents[:, :, :k], latents[:, :, k:]  # (b, 4, k, h, w), (b, 4, f, h, w)
        draws = torch.rand(3, generator=generator)
        if draws[0] < config.context_drop:
            context = None
        else:
            if draws[2] < config.context_shorten and k > 1:
                context = context[:, :, -int(torch.randint(1, k, (), generator=generator)):]  # (b, 4, 1 .. k-1, h, w)
            if draws[1] < config.context_noise_probability:
                context = context + config.context_noise * torch.randn(context.shape, generator=generator).to(context)
        timesteps = torch.randint(0, train_steps, (batch,), generator=generator)
        noise = torch.randn(chunk.shape, generator=generator).to(chunk)
        alpha = alphas_cumprod[timesteps.to(config.device)].sqrt()[:, None, None, None, None]
        sigma = (1 - alphas_cumprod[timesteps.to(config.device)]).sqrt()[:, None, None, None, None]
        noisy = alpha * chunk + sigma * noise
        target = noise if pipeline.scheduler_config.prediction_type == "epsilon" else alpha * noise - sigma * chunk
        size = config.size
        time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=text.dtype, device=text.device).repeat(batch, 1)
        prediction = unet(noisy, timesteps.to(config.device), text, pooled, time_ids, context)
        return F.mse_loss(prediction.float(), target.float())

    return loss


def write_samples(pipeline, config: TrainConfig, step: int, prompts=("a red circle moving left", "a blue square moving up")):
    """A 4-chunk GIF per prompt in out/samples/, made as sample.py makes videos."""
    folder = Path(config.out) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    settings = Settings(timeline=[(0, "")], height=config.size, width=config.size, frames=config.chunk_frames,
                        context_frames=config.context_frames, steps=20, guidance=4.0)
    was_training = pipeline.unet.training
    pipeline.unet.eval()
    with torch.no_grad():
        for index, prompt in enumerate(prompts):
            chunks = generate_latents(pipeline, settings, [pipeline.encode_prompt(prompt)], VideoState(),
                                      torch.Generator().manual_seed(index))
            with open_writer(str(folder / f"step{step:06d}_{index}.gif"), fps=6) as writer:
                for _ in range(4):
                    writer.write_chunk(to_uint8_frames(pipeline.vae.decode_video(next(chunks))[0]))
    pipeline.unet.train(was_training)


def scaling_factor(vae: AutoencoderKL, data, config: TrainConfig) -> float:
    """1 / std of the VAE's latents over a few batches, so that scaled latents have unit variance."""
    with torch.no_grad():
        videos = torch.cat([batch_of(data, 10_000 + i, config.vae_batch_size, 0, 1)[0][:, :, 0] for i in range(4)])
        return 1.0 / vae.encode(videos.to(config.device)).mean.std().item()


def build_pipeline(config: TrainConfig) -> StableDiffusionXLVideoPipeline:
    if config.mode == "temporal":
        pipeline = StableDiffusionXLVideoPipeline.from_pretrained(config.model, config.device)
        pipeline.unet.requires_grad_(False)
        for parameter in pipeline.unet.temporal_parameters():
            parameter.requires_grad_(True)
        pipeline.vae.requires_grad_(False)
        return pipeline
    unet_config, vae_config = baby_configs(config.size)
    torch.manual_seed(config.seed)
    text_encoder = baby_text_encoder(Path(config.out) / "tokenizer-files", config.seed)
    scheduler_config = dataclasses.replace(SchedulerConfig.video_model(), prediction_type=config.prediction_type)
    pipeline = StableDiffusionXLVideoPipeline(UNet(unet_config), AutoencoderKL(vae_config), text_encoder,
                                              scheduler_config)
    return pipeline.to(config.device)


def train(config: TrainConfig, on_step=None) -> StableDiffusionXLVideoPipeline:
    """Run every stage of `config` (resuming any that has a checkpoint) and write the model to out/model."""
    if config.threads:
        torch.set_num_threads(config.threads)
    distributed = "WORLD_SIZE" in os.environ
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (Path(config.out) / "train_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    pipeline = build_pipeline(config)
    pipeline.unet.gradient_checkpointing = config.gradient_checkpointing
    frames = config.context_frames + config.chunk_frames
    data = (ShapesData(config.size, frames, config.seed, config.clips) if config.data == "shapes"
            else VideoFolder(config.data, config.size, frames, config.frame_stride, config.seed))

    if config.mode == "baby":
        vae = pipeline.vae.train()
        factor = vae.config.downsample_factor
        latent_shape = (vae.config.latent_channels, config.size // factor, config.size // factor)
        stage = Stage("vae", VAEObjective(vae), vae.parameters(), vae_loss(data, config, rank, world_size, latent_shape),
                      config.vae_steps, config.vae_learning_rate, config, distributed)
        stage.load()
        stage.run(on_step)
        vae.config.scaling_factor = scaling_factor(vae, data, config)
        vae.requires_grad_(False).eval()

    unet = pipeline.unet.train()
    trained = [p for p in unet.parameters() if p.requires_grad]
    stage = Stage("unet", unet, trained, unet_loss(pipeline, data, config, rank, world_size), config.steps,
                  config.learning_rate, config, distributed)
    stage.load()

    def every_step(stage):
        if rank == 0 and stage.step % config.sample_every == 0:
            write_samples(pipeline, config, stage.step)
        if on_step is not None:
            on_step(stage)

    stage.run(every_step)
    unet.eval()
    if rank == 0:
        provenance = {"trained_by": "train.py", "mode": config.mode, "data": config.data, "steps": config.steps}
        defaults = {"height": config.size, "width": config.size, "frames": config.chunk_frames,
                    "context_frames": config.context_frames}
        pipeline.save_pretrained(Path(config.out) / "model", provenance=provenance, sample_defaults=defaults)
    if distributed:
        dist.barrier()
    return pipeline


def parse_config(argv=None) -> TrainConfig:
    """A command-line option per TrainConfig field, typed by the field (booleans are flags)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(TrainConfig):
        option = "--" + field.name.replace("_", "-")
        if field.type == "bool" or field.type is bool:
            parser.add_argument(option, action="store_true")
        else:
            kind = {"int": int, "float": float, "str": str}.get(field.type, field.type)
            parser.add_argument(option, type=kind, default=field.default)
    return TrainConfig(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    train(parse_config())
