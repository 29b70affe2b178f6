"""The seed's two temporal modules, which turn SDXL's image UNet into a chunk-by-chunk video model.

Both follow every spatial transformer of the UNet (model.py) and see positions folded into the
batch, `(batch * height * width, frames, channels)`:
- `TemporalTransformer` (`temp_attentions.N`): the chunk's frames attend to each other;
- `TemporalConditionerTransformer` (`temp_cond_attentions.N`): the chunk's frames cross-attend to
  the context, the clean latents of the last frames already made (`previous_latents`).
Built fresh, each has a zero output projection, so it returns its input until trained.
docs/SEED_FORMAT.md has the maths each one follows.

The conditioner is chosen by `UNetConfig.conditioner`, a name in `CONDITIONERS`. Another one is a
class here plus an entry there: built as `cls(channels, config)`, it has `forward(x, cond)` and
`prepare_context(previous_latents, batch, height, width)`, what it computes from the context alone,
which `UNet.prepare_chunk` keeps for a chunk's steps in `cond.chunk.context[module]`.
"""

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from layers import Conditioning, CrossKeysValues, GroupNorm, TransformerBlock, frames_to_tokens, tokens_to_frames

if TYPE_CHECKING:
    from model import UNetConfig


def zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """A linear layer built as usual (the same random draws), then zeroed: a temporal module's
    `proj_out`, so that a freshly built module returns its input."""
    linear = nn.Linear(in_features, out_features)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


def frame_position_encoding(num_frames: int, dim: int, device=None) -> torch.Tensor:
    """(frames, dim): cos(p / 10000^(2i/dim)) at channel 2i and sin(...) at 2i+1, for frame p."""
    positions = torch.arange(num_frames, device=device, dtype=torch.float32)[:, None]  # (frames, 1)
    even_channels = torch.arange(0, dim, 2, device=device, dtype=torch.float32)
    angles = positions / 10000 ** (even_channels / dim)  # (frames, ceil(dim/2))
    encoding = torch.zeros(num_frames, dim, device=device)
    encoding[:, 0::2] = angles.cos()
    encoding[:, 1::2] = angles[:, : dim // 2].sin()
    return encoding


def chunk_frame_positions(num_frames: int, device, dtype: torch.dtype) -> torch.Tensor:
    """(frames, 1): exp(-p / frames) for chunk frame p, what the conditioner adds to its chunk's tokens."""
    positions = torch.arange(num_frames, device=device, dtype=dtype)
    return torch.exp(-positions / num_frames)[:, None]  # (f, 1)


def per_chunk(cond: Conditioning, key: tuple, make) -> torch.Tensor:
    """make(), a tensor that depends only on the chunk's sizes: with the chunk's cache, made at its
    first step and kept for the others (`ChunkCache.kept`); without, made at every call."""
    return make() if cond.chunk is None else cond.chunk.kept(key, make)


class TemporalTransformer(nn.Module):
    """Frames of a chunk attend to each other at every spatial position.

    GroupNorm across the chunk's frames, `proj_in`, plus a sinusoidal frame-position encoding,
    transformer blocks (self-attention, optionally a second self-attention, GEGLU), `proj_out`
    (zero when built fresh), residual. With one frame it returns its input.
    """

    def __init__(self, channels: int, config: "UNetConfig"):
        super().__init__()
        self.norm = GroupNorm(config.norm_num_groups, channels, 1e-6, across_frames=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(
                channels,
                channels // config.head_dim,
                config.head_dim,
                double_self_attention=config.temporal_double_self_attention,
            )
            for _ in range(config.temporal_layers)
        )
        self.proj_out = zero_linear(channels, channels)

    def forward(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x: (batch * frames, channels, h, w)."""
        if cond.num_frames == 1:
            return x
        height, width = x.shape[-2:]
        tokens = frames_to_tokens(self.norm(x, cond.num_frames), cond.num_frames)  # (b*h*w, f, c)
        tokens = self.proj_in(tokens)
        encode = lambda: frame_position_encoding(cond.num_frames, tokens.shape[-1], x.device).to(x.dtype)
        tokens.add_(per_chunk(cond, ("frame_position_encoding", cond.num_frames, tokens.shape[-1]), encode))
        for block in self.transformer_blocks:
            tokens = block(tokens)
        return x + tokens_to_frames(self.proj_out(tokens), height, width)  # (b*f, c, h, w)


class TemporalConditionerTransformer(nn.Module):
    """Frames of a chunk cross-attend to the context (the last frames already made).

    The context latents are resized to the block's (context_frames, h, w), repeated along the
    batch when guidance doubled it, and projected to width D by `conv_in`; the chunk is normalised
    by `ln` and projected to D by `proj_in`. Frame positions add exp(p / k) to context frame p and
    exp(-p / f) to chunk frame p. Transformer blocks of width D cross-attend to the context in
    both attentions, then `proj_out` (zero when built fresh) returns to the block's width.
    Without a context, or with one frame, it returns its input.
    A cheaper conditioner can be a subclass that sets a smaller `ff_mult`.
    """

    ff_mult = 4  # the feed-forward's inner width in the transformer blocks, in multiples of D

    def __init__(self, channels: int, config: "UNetConfig"):
        super().__init__()
        width = config.conditioner_dim
        self.conv_in = nn.Conv3d(config.in_channels, width, kernel_size=1)
        self.ln = nn.LayerNorm(channels)
        self.proj_in = nn.Linear(channels, width)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(
                width,
                channels // config.head_dim,
                config.head_dim,
                context_dim=width,
                only_cross_attention=True,
                ff_mult=self.ff_mult,
            )
            for _ in range(config.conditioner_layers)
        )
        self.proj_out = zero_linear(width, channels)

    def encode_context(self, previous_latents: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
        """(context_batch, in_channels, k, H, W) -> (batch * height * width, k, D)."""
        context_frames = previous_latents.shape[2]
        context = F.interpolate(
            previous_latents.to(self.conv_in.weight.dtype),
            size=(context_frames, height, width),
            mode="trilinear",
            align_corners=False,
        )  # (context_batch, c, k, h, w)
        context = context.repeat(batch // context.shape[0], 1, 1, 1, 1)  # (b, c, k, h, w)
        tokens = self.conv_in(context).permute(0, 3, 4, 2, 1).flatten(0, 2)  # (b*h*w, k, D)
        positions = torch.arange(context_frames, device=tokens.device, dtype=tokens.dtype)
        return tokens + torch.exp(positions / context_frames)[:, None]  # (k, 1) over (b*h*w, k, D)

    def forward(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x: (batch * frames, channels, h, w)."""
        if cond.previous_latents is None or cond.num_frames == 1:
            return x
        height, width = x.shape[-2:]
        batch = x.shape[0] // cond.num_frames
        if cond.chunk is None:
            context = self.prepare_context(cond.previous_latents, batch, height, width)
        else:
            context = cond.chunk.context[self]
        tokens = self.proj_in(self.ln(frames_to_tokens(x, cond.num_frames)))  # (b*h*w, f, D)
        positions = lambda: chunk_frame_positions(cond.num_frames, x.device, tokens.dtype)
        tokens.add_(per_chunk(cond, ("chunk_frame_positions", cond.num_frames), positions))  # (f, 1) over (b*h*w, f, D)
        for block, keys_values in zip(self.transformer_blocks, context):
            assert keys_values.attn1.keys.shape[0] == tokens.shape[0], "context prepared for other sizes"
            tokens = block(tokens, keys_values)
        return x + tokens_to_frames(self.proj_out(tokens), height, width)  # (b*f, c, h, w)

    def prepare_context(self, previous_latents: torch.Tensor, batch: int, height: int, width: int) -> list[CrossKeysValues]:
        """Every block's keys and values of the encoded context: what the conditioner computes
        from the context alone, once per chunk."""
        context = self.encode_context(previous_latents, batch, height, width)  # (b*h*w, k, D)
        return [block.cross_keys_values(context) for block in self.transformer_blocks]


CONDITIONERS = {"transformer": TemporalConditionerTransformer}  # UNetConfig.conditioner -> class


def make_conditioner(channels: int, config: "UNetConfig") -> nn.Module:
    """The conditioner that `config.conditioner` names, for a level of `channels` channels."""
    return CONDITIONERS[config.conditioner](channels, config)
