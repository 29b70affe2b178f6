"""SDXL's variational autoencoder (diffusers' `AutoencoderKL`) in plain PyTorch.

`encode` and `decode` work on images `(batch, 3, H, W)` in [-1, 1] and unscaled latents
`(batch, 4, H/8, W/8)`. `encode_video` and `decode_video` work on videos `(batch, channels, frames,
height, width)` and on latents multiplied by `scaling_factor`, as the UNet sees them; they process a
few frames at a time and honour `force_upcast`. Module names follow diffusers, so its state dicts load
with a strict `load_state_dict`.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from layers import Attention, Downsample, ResnetBlock, Upsample, fold_frames, unfold_frames

EPS = 1e-6  # of every GroupNorm in the VAE
TILE, TILE_OVERLAP = 64, 16  # latent pixels of a tile of `decode_tiled` (512 image pixels) and their overlap
TILES_ABOVE = 128 * 128  # latent pixels of a frame above which `decode_video` tiles by default (1024 x 1024 images)


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025
    force_upcast: bool = True  # encode_video/decode_video run float16 weights in float32

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        widths = self.block_out_channels
        if not widths or any(w < 1 or w % self.norm_num_groups for w in widths):
            raise ValueError(
                f"block_out_channels must be a non-empty tuple of positive multiples of "
                f"norm_num_groups={self.norm_num_groups}, got {widths}"
            )
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sdxl(cls) -> "VAEConfig":
        """The values of sdxl-base-1.0/vae/config.json."""
        return cls()

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """SDXL's structure (downsampling by 8) at widths that run on a CPU in milliseconds."""
        return cls(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)


class MidBlockAttention(Attention):
    """GroupNorm, then one attention head of width `channels` across the pixels, plus a residual."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True)
        self.group_norm = nn.GroupNorm(num_groups, channels, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, channels, h, w)."""
        h, w = x.shape[-2:]
        tokens = rearrange(self.group_norm(x), "b c h w -> b (h w) c")  # (b, h*w, c)
        return x + rearrange(super().forward(tokens), "b (h w) c -> b c h w", h=h, w=w)  # (b, c, h, w)


class MidBlock(nn.Module):
    """Resnet, attention, resnet at the lowest resolution (`resnets.0`, `attentions.0`, `resnets.1`)."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, None, num_groups, EPS) for _ in range(2))
        self.attentions = nn.ModuleList([MidBlockAttention(channels, num_groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class VAELevel(nn.Module):
    """One resolution level of the encoder (diffusers' `DownEncoderBlock2D`) or the decoder
    (`UpDecoderBlock2D`): `num_layers` resnets, then, at all but the last level, a stride-2 conv
    padded right and bottom (`sampler="down"`) or nearest-neighbour upsampling by 2 and a conv
    (`sampler="up"`)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, sampler: str | None):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_layers
        self.resnets = nn.ModuleList(ResnetBlock(i, o, None, groups, EPS) for i, o in zip(channels, channels[1:]))
        self.downsamplers = nn.ModuleList([Downsample(out_channels, padding=0)]) if sampler == "down" else None
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if sampler == "up" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, in_channels, h, w) -> (batch, out_channels, h, w), halved by a downsampler,
        doubled by an upsampler."""
        for layer in [*self.resnets, *(self.downsamplers or []), *(self.upsamplers or [])]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """(batch, in_channels, H, W) -> (batch, 2 * latent_channels, H / factor, W / factor)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            VAELevel(widths[max(i - 1, 0)], w, config.layers_per_block, groups, "down" if i < last else None)
            for i, w in enumerate(widths)
        )
        self.mid_block = MidBlock(widths[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """(batch, latent_channels, h, w) -> (batch, out_channels, h * factor, w * factor)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels[::-1], config.norm_num_groups
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups)
        self.up_blocks = nn.ModuleList(
            VAELevel(widths[max(i - 1, 0)], w, config.layers_per_block + 1, groups, "up" if i < last else None)
            for i, w in enumerate(widths)
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The posterior of `moments` (batch, 2 * latent_channels, h, w): `mean`, `logvar` (clamped to
    [-30, 20] as diffusers does) and `std`, each (batch, latent_channels, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """mean + std * noise, noise shaped like the mean, drawn in float32 on the generator's device."""
        noise = torch.randn(self.mean.shape, generator=generator, device=generator.device)
        return self.mean + self.std * noise.to(self.mean)


def check_shape(x: torch.Tensor, name: str, layout: str, channels: int) -> None:
    """ValueError naming `name` unless x has as many dims as `layout` names and `channels` in dim 1."""
    if x.ndim != len(layout.split()) or x.shape[1] != channels:
        raise ValueError(f"{name} must have shape ({layout}) with {channels} channels, got {tuple(x.shape)}")


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images: (batch, in_channels, H, W) in [-1, 1] -> posterior over unscaled latents
        (batch, latent_channels, H / factor, W / factor); runs in the weights' dtype."""
        check_shape(images, "images", "batch in_channels H W", self.config.in_channels)
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: unscaled (batch, latent_channels, h, w) -> images (batch, out_channels, h * factor,
        w * factor); runs in the weights' dtype."""
        check_shape(latents, "latents", "batch latent_channels h w", self.config.latent_channels)
        return self.decoder(self.post_quant_conv(latents))

    @contextmanager
    def upcast(self, *modules: nn.Module, enabled: bool | None):
        """Holds `modules` in float32 while inside if their weights are float16 and `enabled` (None:
        `config.force_upcast`; SDXL's VAE overflows in float16), then back in float16, exactly as
        they were (float16 -> float32 -> float16 is lossless). Yields the dtype they run in."""
        dtype = next(modules[0].parameters()).dtype
        enabled = (self.config.force_upcast if enabled is None else enabled) and dtype == torch.float16
        try:
            for module in modules if enabled else ():
                module.float()
            yield torch.float32 if enabled else dtype
        finally:
            for module in modules if enabled else ():
                module.to(dtype)

    def encode_video(self, video: torch.Tensor, generator: torch.Generator | None = None,
                     frames_per_batch: int = 8, upcast: bool | None = None) -> torch.Tensor:
        """video: (batch, in_channels, frames, H, W) in [-1, 1] -> scaled latents (batch,
        latent_channels, frames, H / factor, W / factor) in the video's dtype: a sample drawn from
        `generator` (noise shaped (batch * frames, latent_channels, h, w)), or the mean without one.
        Encodes `frames_per_batch` frames at a time; `upcast` as in `AutoencoderKL.upcast`."""
        check_shape(video, "video", "batch in_channels frames H W", self.config.in_channels)
        check_frames_per_batch(frames_per_batch)
        with self.upcast(self.encoder, self.quant_conv, enabled=upcast) as dtype:
            images = fold_frames(video).to(dtype)  # (b*f, c, H, W)
            moments = torch.cat([self.quant_conv(self.encoder(x)) for x in images.split(frames_per_batch)])
        posterior = DiagonalGaussian(moments)
        latents = posterior.mean if generator is None else posterior.sample(generator)  # (b*f, c, h, w)
        latents = unfold_frames(latents, video.shape[2]) * self.config.scaling_factor  # (b, c, f, h, w)
        return latents.to(video.dtype)

    def decode_video(self, latents: torch.Tensor, frames_per_batch: int = 8,
                     upcast: bool | None = None, tiles: bool | None = None) -> torch.Tensor:
        """latents: scaled (batch, latent_channels, frames, h, w) -> video (batch, out_channels,
        frames, h * factor, w * factor) in the latents' dtype. Decodes `frames_per_batch` frames at a
        time, which equals decoding all at once; `upcast` as in `AutoencoderKL.upcast`. tiles: decode
        each frame in overlapping tiles (`decode_tiled`); None: when a frame has more than
        TILES_ABOVE latent pixels."""
        check_shape(latents, "latents", "batch latent_channels frames h w", self.config.latent_channels)
        check_frames_per_batch(frames_per_batch)
        with self.upcast(self.post_quant_conv, self.decoder, enabled=upcast) as dtype:
            return self.decode_frames(latents, frames_per_batch, tiles, dtype)

    def decode_frames(self, latents: torch.Tensor, frames_per_batch: int, tiles: bool | None,
                      dtype: torch.dtype) -> torch.Tensor:
        """The work of `decode_video` (without its checks and upcast), the decoder running in `dtype`."""
        tiles = latents.shape[-2] * latents.shape[-1] > TILES_ABOVE if tiles is None else tiles
        decode = self.decode_tiled if tiles else self.decode
        frames = fold_frames(latents).to(dtype) / self.config.scaling_factor  # (b*f, c, h, w)
        images = [decode(z).to(latents.dtype) for z in frames.split(frames_per_batch)]
        return unfold_frames(torch.cat(images), latents.shape[2])  # (b, c, f, H, W)

    def decode_tiled(self, latents: torch.Tensor, tile: int = TILE, overlap: int = TILE_OVERLAP) -> torch.Tensor:
        """`decode` in tiles of tile x tile latent pixels that overlap by `overlap`: memory for one
        tile's activations and the output instead of the whole frame's. See `blend_tiles`."""
        return blend_tiles(self.decode, latents, self.config.downsample_factor, tile, overlap)


def check_frames_per_batch(frames_per_batch: int) -> None:
    if frames_per_batch < 1:
        raise ValueError(f"frames_per_batch must be at least 1, got {frames_per_batch}")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles along one side of `length` latent pixels start: every tile - overlap, the
    last moved back to end at the border (so it may overlap its neighbour by more)."""
    if length <= tile:
        return [0]
    return sorted(set(range(0, length - tile, tile - overlap)) | {length - tile})


def ramp(size: int, start: int, length: int, overlap: int, factor: int) -> torch.Tensor:
    """Blending weights (size,) over the image pixels of a tile starting at latent `start` along a
    side of `length`: rising linearly in (0, 1) over the first `overlap * factor` pixels unless the
    tile starts at the border, falling over the last ones unless it ends there, 1 elsewhere."""
    weights = torch.ones(size)
    edge = min(overlap * factor, size // 2)
    rise = (torch.arange(edge) + 0.5) / edge
    if start > 0:
        weights[:edge] = rise
    if start * factor + size < length * factor:
        weights[size - edge:] = rise.flip(0)
    return weights


def blend_tiles(decode, latents: torch.Tensor, factor: int, tile: int, overlap: int) -> torch.Tensor:
    """decode(latents) computed tile by tile: latents (n, c, h, w) -> images (n, C, h * factor,
    w * factor). Each tile of tile x tile latents (fewer at a small side) is decoded alone; where
    tiles overlap, their images are averaged with weights that ramp linearly across the overlap
    (`ramp`, separable), so no seam shows. A decoder that sees only each pixel's own latent gives
    exactly its untiled result; SDXL's (GroupNorm statistics and attention over the whole frame)
    gives a small difference, measured by tools/bench.py and tests/test_memory_modes.py."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tiles need tile >= 1 and 0 <= overlap < tile, got tile {tile}, overlap {overlap}")
    height, width = latents.shape[-2:]
    image, total = None, None
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            part = decode(latents[..., top:top + tile, left:left + tile])  # (n, C, th * factor, tw * factor)
            rows, columns = part.shape[-2:]
            weight = (ramp(rows, top, height, overlap, factor)[:, None]
                      * ramp(columns, left, width, overlap, factor)[None, :]).to(part.device)  # (th*f, tw*f)
            if image is None:
                image = part.new_zeros((*part.shape[:2], height * factor, width * factor), dtype=torch.float32)
                total = part.new_zeros((height * factor, width * factor), dtype=torch.float32)
            where = (..., slice(top * factor, top * factor + rows), slice(left * factor, left * factor + columns))
            image[where] += part.float() * weight
            total[where[1:]] += weight
            del part
    return image.div_(total).to(latents.dtype)
