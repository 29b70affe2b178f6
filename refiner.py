"""The FlowingFrames refiner: a small video model that reworks a window of clean latents.

Latents in, latents out, `(batch, channels, frames, height, width)`:

    conv_in (7x7x7) -> 3 x [GroupNorm -> SiLU -> Conv3d 3x3x3]
    -> spatial transformer (the positions of each frame attend to each other)
    -> temporal transformer (the frames of each position attend to each other)
    -> GroupNorm -> SiLU -> conv_out (3x3x3) -> + the input

Every GroupNorm takes its statistics over the whole window (frames x height x width). The two
transformers work at their own attention width (`proj_in` from the convolutions' channels), and
their blocks have a second self-attention in place of a text cross-attention. The published
program (run.py of motexture/FlowingFrames) applies it after every chunk to the last 12 latents.

Module names are the release's (`refiner/diffusion_pytorch_model.bin`), so its state dict loads
with a strict `load_state_dict`; `config_from_release` reads the sizes from its config.json and
weights. A freshly built refiner has a zero `conv_out`, so it returns its input, as released.
"""

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from layers import TransformerBlock

IN_KERNEL = 7  # conv_in's kernel (padding 3); every other convolution is 3x3x3 (padding 1)
RELEASED_HEADS = 8  # the release hard-codes 8 heads in both transformers and keeps no record of it


@dataclass
class RefinerConfig:
    """Everything that shapes the refiner; the defaults are the release's (72.4 M parameters).

    `inner_channels`: the convolutions' width. `spatial_heads` x `spatial_head_dim` is the spatial
    transformer's attention width, `spatial_layers` its depth; the same for `temporal_`.
    `norm_num_groups` and `norm_eps` are the GroupNorms' between the convolutions,
    `transformer_norm_eps` the transformers' own GroupNorm's (with `norm_num_groups` groups),
    `out_norm_num_groups` the GroupNorm's before `conv_out` (eps `norm_eps`). The blocks' LayerNorms
    have eps 1e-5 (layers.TransformerBlock's).
    """

    in_channels: int = 4
    out_channels: int = 4
    inner_channels: int = 320
    spatial_heads: int = 8
    spatial_head_dim: int = 64
    spatial_layers: int = 6
    temporal_heads: int = 8
    temporal_head_dim: int = 64
    temporal_layers: int = 6
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    transformer_norm_eps: float = 1e-6
    out_norm_num_groups: int = 8

    def __post_init__(self):
        counts = {name: value for name, value in asdict(self).items() if not name.endswith("_eps")}
        for name, value in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RefinerConfig.{name} must be a positive integer, got {value!r}")
        if self.in_channels != self.out_channels:
            raise ValueError(f"RefinerConfig.out_channels must equal in_channels ({self.in_channels}): the "
                             f"refiner adds its output to its input, got {self.out_channels}")
        for name in ("norm_num_groups", "out_norm_num_groups"):
            if self.inner_channels % getattr(self, name):
                raise ValueError(f"RefinerConfig.inner_channels ({self.inner_channels}) must be a multiple of "
                                 f"{name} ({getattr(self, name)})")

    def to_dict(self) -> dict:
        return asdict(self)


# 1. The two transformers: GroupNorm over the window, tokens, proj_in, blocks, proj_out, residual.


def frame_positions(num_frames: int, width: int) -> torch.Tensor:
    """(frames, width) in float32: cos(p * r_i) at channel 2i and sin(p * r_i) at 2i + 1 for frame p,
    r_i = exp(-2i ln(10000) / width), computed as the release computes it (always in float32)."""
    positions = torch.arange(num_frames, dtype=torch.float32)[:, None]  # (frames, 1)
    rates = torch.exp(torch.arange(0, width, 2).float() * (-math.log(10000.0) / width))  # (ceil(width / 2),)
    encoding = torch.zeros(num_frames, width)
    encoding[:, 0::2] = torch.cos(positions * rates)
    encoding[:, 1::2] = torch.sin(positions * rates[: width // 2])
    return encoding


class WindowTransformer(nn.Module):
    """GroupNorm over the window (eps `transformer_norm_eps`), tokens (`to_tokens`), `proj_in` to
    heads x head_dim channels, transformer blocks (self-attention twice, GEGLU), `proj_out` back,
    residual. Subclasses say which tokens attend to each other."""

    def __init__(self, config: RefinerConfig, heads: int, head_dim: int, layers: int):
        super().__init__()
        channels, width = config.inner_channels, heads * head_dim
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=config.transformer_norm_eps)
        self.proj_in = nn.Linear(channels, width)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(width, heads, head_dim, double_self_attention=True) for _ in range(layers)
        )
        self.proj_out = nn.Linear(width, channels)

    def to_tokens(self, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def from_tokens(self, tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video: (batch, channels, frames, height, width) -> the same shape."""
        tokens = self.proj_in(self.to_tokens(self.norm(video)))  # (sequences, tokens, width)
        tokens = self.add_positions(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens)
        return video + self.from_tokens(self.proj_out(tokens), video.shape)

    def add_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


class SpatialWindowTransformer(WindowTransformer):
    """One sequence per (batch, frame) of its height x width positions, row-major, no positions added."""

    def __init__(self, config: RefinerConfig):
        super().__init__(config, config.spatial_heads, config.spatial_head_dim, config.spatial_layers)

    def to_tokens(self, video: torch.Tensor) -> torch.Tensor:
        return rearrange(video, "b c f h w -> (b f) (h w) c")  # (b*f, h*w, c)

    def from_tokens(self, tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return rearrange(tokens, "(b f) (h w) c -> b c f h w", b=shape[0], h=shape[3])  # (b, c, f, h, w)


class TemporalWindowTransformer(WindowTransformer):
    """One sequence per (batch, row, column) of its frames, with `frame_positions` added after
    `proj_in`. A window of one frame is returned unchanged."""

    def __init__(self, config: RefinerConfig):
        super().__init__(config, config.temporal_heads, config.temporal_head_dim, config.temporal_layers)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video: (batch, channels, frames, height, width) -> the same shape."""
        return video if video.shape[2] <= 1 else super().forward(video)

    def to_tokens(self, video: torch.Tensor) -> torch.Tensor:
        return rearrange(video, "b c f h w -> (b h w) f c")  # (b*h*w, f, c)

    def from_tokens(self, tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return rearrange(tokens, "(b h w) f c -> b c f h w", b=shape[0], h=shape[3])  # (b, c, f, h, w)

    def add_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (sequences, frames, width), plus the float32 positions (frames, width)."""
        positions = frame_positions(tokens.shape[1], tokens.shape[2]).to(tokens.device, tokens.dtype)
        return tokens + positions


# 2. The refiner.


class Refiner(nn.Module):
    """Refines a window of clean latents: `refiner(latents)` has the shape of `latents`."""

    def __init__(self, config: RefinerConfig):
        super().__init__()
        self.config = config
        channels, groups, eps = config.inner_channels, config.norm_num_groups, config.norm_eps
        self.conv_in = nn.Conv3d(config.in_channels, channels, IN_KERNEL, padding=IN_KERNEL // 2)
        self.norm1 = nn.GroupNorm(groups, channels, eps=eps)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels, eps=eps)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm3 = nn.GroupNorm(groups, channels, eps=eps)
        self.conv3 = nn.Conv3d(channels, channels, 3, padding=1)
        self.spatial_attn = SpatialWindowTransformer(config)
        self.temporal_attn = TemporalWindowTransformer(config)
        self.conv_norm = nn.GroupNorm(config.out_norm_num_groups, channels, eps=eps)
        self.conv_out = nn.Conv3d(channels, config.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: (batch, in_channels, frames, height, width), clean (scaled) latents -> the same shape."""
        hidden = self.conv_in(latents)  # (b, inner, f, h, w)
        for norm, conv in ((self.norm1, self.conv1), (self.norm2, self.conv2), (self.norm3, self.conv3)):
            hidden = conv(F.silu(norm(hidden)))
        hidden = self.temporal_attn(self.spatial_attn(hidden))
        return latents + self.conv_out(F.silu(self.conv_norm(hidden)))


# 3. The release's refiner/ folder: its config.json and weight shapes into a RefinerConfig.

RELEASE_CONFIG_KEYS = ("in_channels", "inner_channels", "out_channels")
# Written by the tiny fixture, not by the release: transformer -> (heads, head width, depth) keys.
RELEASE_TRANSFORMER_KEYS = {kind: tuple(f"{kind}_{key}" for key in ("num_attention_heads", "attention_head_dim",
                                                                       "num_layers"))
                            for kind in ("spatial", "temporal")}


def count_blocks(shapes: dict[str, tuple[int, ...]], module: str) -> int:
    """How many `module.transformer_blocks.N` the weights hold."""
    pattern = rf"{module}\.transformer_blocks\.(\d+)\."
    return 1 + max((int(match[1]) for key in shapes if (match := re.match(pattern, key))), default=-1)


def config_from_release(values: dict, shapes: dict[str, tuple[int, ...]], config_name: str,
                        weights_name: str) -> RefinerConfig:
    """The RefinerConfig of a release's refiner/: `values` from its config.json (`config_name`),
    `shapes` of its weights (`weights_name`, names as ours). Widths and depths come from the
    weights; heads from the config's `{spatial,temporal}_num_attention_heads` when present, else
    the released 8 (the weights cannot tell how the attention width splits into heads).
    ValueError in one line naming the files when the config does not fit the weights."""
    known = {*RELEASE_CONFIG_KEYS, *(key for keys in RELEASE_TRANSFORMER_KEYS.values() for key in keys)}
    if unknown := sorted(key for key in values if key not in known and not key.startswith("_")):
        raise ValueError(f"{config_name}: unknown keys {unknown} for a refiner")
    needed = ("conv_in.weight", "conv_out.weight", "spatial_attn.proj_in.weight", "temporal_attn.proj_in.weight")
    if missing := [key for key in needed if key not in shapes]:
        raise ValueError(f"{weights_name} holds no {', '.join(missing)} of a refiner")
    inner, in_channels = shapes["conv_in.weight"][:2]
    read = dict(in_channels=in_channels, inner_channels=inner, out_channels=shapes["conv_out.weight"][0])
    sizes = dict(read)
    problems = [f"{key} is {values[key]!r}, the weights have {read[key]}"
                for key in RELEASE_CONFIG_KEYS if key in values and values[key] != read[key]]
    for kind, (heads_key, head_dim_key, layers_key) in RELEASE_TRANSFORMER_KEYS.items():
        width, layers = shapes[f"{kind}_attn.proj_in.weight"][0], count_blocks(shapes, f"{kind}_attn")
        heads = values.get(heads_key, RELEASED_HEADS)
        head_dim = values.get(head_dim_key, width // heads if isinstance(heads, int) and heads > 0 else 0)
        if not isinstance(heads, int) or not isinstance(head_dim, int) or heads * head_dim != width:
            problems.append(f"{heads_key} x {head_dim_key} is {heads!r} x {head_dim!r}, the weights' {kind} "
                            f"attention is {width} wide")
        if values.get(layers_key, layers) != layers:
            problems.append(f"{layers_key} is {values[layers_key]!r}, the weights have {layers} {kind} blocks")
        sizes.update({f"{kind}_heads": heads, f"{kind}_head_dim": head_dim, f"{kind}_layers": layers})
    if problems:
        raise ValueError(f"{config_name} does not fit {weights_name}: " + "; ".join(problems))
    try:
        return RefinerConfig(**sizes)
    except ValueError as error:
        raise ValueError(f"{config_name} and {weights_name}: {error}") from error
