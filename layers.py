"""Building blocks shared by the UNet (model.py) and the VAE (vae.py).

Spatial layers see frames folded into the batch, `(batch * frames, channels, height, width)`;
temporal layers see positions folded into the batch, `(batch * height * width, frames, channels)`.
The helpers below are the only places where those folds are made and undone. `Conditioning` is
what every UNet block gets besides its input; `ChunkCache` is what the steps of one chunk share.
Module names follow diffusers, so its state dicts load with a strict `load_state_dict`.
"""

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Conditioning(NamedTuple):
    """What every block needs besides its input, with frames folded into the batch."""

    time_embedding: torch.Tensor  # (batch * frames, time_embed_dim)
    text: torch.Tensor  # (batch, tokens, cross_attention_dim), shared by the frames of each video
    num_frames: int
    previous_latents: torch.Tensor | None  # (context_batch, in_channels, context_frames, H, W)
    chunk: "ChunkCache | None" = None  # what the chunk's steps share; None: blocks compute it themselves


def fold_frames(video: torch.Tensor) -> torch.Tensor:
    """(batch, channels, frames, height, width) -> (batch * frames, channels, height, width)."""
    return video.transpose(1, 2).flatten(0, 1)  # (b*f, c, h, w)


def unfold_frames(images: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(batch * frames, channels, height, width) -> (batch, channels, frames, height, width)."""
    return images.unflatten(0, (-1, num_frames)).transpose(1, 2)  # (b, c, f, h, w)


def repeat_per_frame(per_video: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(batch, ...) -> (batch * frames, ...): a per-video condition given to every frame."""
    return per_video.repeat_interleave(num_frames, dim=0)  # (b*f, ...)


def frames_to_tokens(images: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(batch * frames, channels, h, w) -> (batch * h * w, frames, channels): one sequence per position."""
    video = images.unflatten(0, (-1, num_frames))  # (b, f, c, h, w)
    return video.permute(0, 3, 4, 1, 2).flatten(0, 2)  # (b*h*w, f, c)


def tokens_to_frames(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(batch * h * w, frames, channels) -> (batch * frames, channels, h, w): `frames_to_tokens` undone."""
    grid = tokens.unflatten(0, (-1, height, width))  # (b, h, w, f, c)
    return grid.permute(0, 3, 4, 1, 2).flatten(0, 1)  # (b*f, c, h, w)


class GroupNorm(nn.GroupNorm):
    """GroupNorm on frames folded into the batch.

    With `across_frames=False` each frame is normalised alone, as SDXL's image model does. With
    `across_frames=True` the statistics of each group span every frame of the chunk, as in the
    original video model, whose GroupNorms were applied to the 5-D tensor.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float, across_frames: bool = False):
        super().__init__(num_groups, num_channels, eps=eps)
        self.across_frames = across_frames

    def forward(self, x: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        """x: (batch * frames, channels, height, width)."""
        if not self.across_frames or num_frames == 1:
            return super().forward(x)
        video = unfold_frames(x, num_frames)  # (b, c, f, h, w): statistics over (c/g, f, h, w)
        video = F.group_norm(video, self.num_groups, self.weight, self.bias, self.eps)
        return fold_frames(video)  # (b*f, c, h, w)


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv → (+ time embedding) → GroupNorm → SiLU → conv, plus a shortcut.

    `time_embed_dim=None` builds the VAE's variant, which has no time embedding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_embed_dim: int | None,
        num_groups: int,
        eps: float,
        across_frames: bool = False,
    ):
        super().__init__()
        self.norm1 = GroupNorm(num_groups, in_channels, eps, across_frames)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_embed_dim, out_channels) if time_embed_dim else None
        self.norm2 = GroupNorm(num_groups, out_channels, eps, across_frames)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(
        self, x: torch.Tensor, time_embedding: torch.Tensor | None = None, num_frames: int = 1
    ) -> torch.Tensor:
        """x: (batch * frames, in_channels, h, w); time_embedding: (batch * frames, time_embed_dim)."""
        h = self.conv1(F.silu(self.norm1(x, num_frames)))
        if self.time_emb_proj is not None:
            h += self.time_emb_proj(F.silu(time_embedding))[:, :, None, None]  # (b*f, out_channels, 1, 1)
        h = self.conv2(F.silu(self.norm2(h, num_frames)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(shortcut)  # in place on a fresh output (convolutions keep only their inputs for backward)


class KeysValues(NamedTuple):
    """An attention's keys and values, (batch, heads, tokens, head_dim) each."""

    keys: torch.Tensor
    values: torch.Tensor


class CrossKeysValues(NamedTuple):
    """A TransformerBlock's keys and values of the context, for each of its two attentions (None for
    one that attends to its own input, or that the block lacks)."""

    attn1: KeysValues | None
    attn2: KeysValues | None


@dataclass
class ChunkCache:
    """What the steps of one chunk share: everything that depends only on the prompt (text, pooled
    text, time_ids) and the context (previous_latents), never on the noisy sample or the timestep.

    Built once per chunk by `UNet.prepare_chunk`, given to `UNet.forward(..., cache=)` at every step.
    - `added_embedding`: (batch, time_embed_dim), the pooled text and time_ids through `add_embedding`;
    - `text[spatial_transformer]`: per transformer block, its `CrossKeysValues` of the text;
    - `context[conditioner]`: what the conditioner computes from the context alone (its
      `prepare_context`; for `TemporalConditionerTransformer`, each block's `CrossKeysValues` of the
      encoded context); empty without a context;
    - `sizes` and `sources`: the (batch, height, width) and the very tensors (text, pooled text,
      time_ids, context) it was built for, which `check` holds a step's inputs against;
    - `made`: what depends only on the chunk's sizes (the temporal modules' frame-position terms),
      by a key that names it and its sizes, made at the first step that needs it (`kept`).
    """

    added_embedding: torch.Tensor
    text: dict[nn.Module, list[CrossKeysValues]]
    context: dict[nn.Module, Any]
    sizes: tuple[int, int, int]
    sources: tuple[torch.Tensor | None, ...]
    made: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def kept(self, key: tuple, make) -> torch.Tensor:
        """make() at the first call with `key`, the same tensor at the chunk's later steps (never
        write into it). `key` names what `make` makes and every size it depends on."""
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]

    def check(self, sizes: tuple[int, int, int], dtype: torch.dtype, sources: tuple[torch.Tensor | None, ...]) -> None:
        """ValueError unless `sizes` and the sample's `dtype` are the same and `sources` the same
        tensors (not equal ones)."""
        same_sources = all(a is b for a, b in zip(self.sources, sources))
        if self.sizes != sizes or self.added_embedding.dtype != dtype or not same_sources:
            raise ValueError("cache holds what was computed for other text, time_ids, context, sizes or dtype: "
                             "prepare a new one for each chunk")


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention`.

    One class serves spatial self- and cross-attention, temporal attention and the conditioner's
    cross-attention to the context. `context_dim` is the width of the keys' source (the query's own
    width for self-attention); `out_dim` is the output width (the query's width by default).
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        out_dim: int | None = None,
        qkv_bias: bool = False,
    ):
        super().__init__()
        inner_dim = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, out_dim or query_dim), nn.Dropout(0.0)])

    def project(self, x: torch.Tensor, *layers: nn.Linear) -> list[torch.Tensor]:
        """x through some of to_q, to_k, to_v in one matmul of their stacked weights (one large
        product is faster than several small ones), each split into heads: (b, heads, n, head_dim)."""
        stack = lambda tensors: torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        weight = stack([layer.weight for layer in layers])
        bias = None if layers[0].bias is None else stack([layer.bias for layer in layers])
        out = F.linear(x, weight, bias)  # (b, n, len(layers) * inner)
        parts = out.chunk(len(layers), dim=-1)  # (b, n, inner) each
        return [t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in parts]  # (b, heads, n, head_dim) each

    def keys_values(self, context: torch.Tensor) -> KeysValues:
        """context: (batch, context_tokens, context_dim) -> its keys and values, to reuse while it is fixed."""
        return KeysValues(*self.project(context, self.to_k, self.to_v))

    def forward(self, x: torch.Tensor, context: torch.Tensor | KeysValues | None = None) -> torch.Tensor:
        """x: (batch, tokens, query_dim); context: (batch, context_tokens, context_dim), its
        `keys_values`, or None for self-attention.

        A context with fewer items than x (batch / m) is shared by m consecutive items of x (the
        frames of one video share its text): their queries attend to it together, so its keys and
        values are computed once, not once per frame.
        """
        batch, tokens, _ = x.shape
        if context is None:
            q, k, v = self.project(x, self.to_q, self.to_k, self.to_v)
        else:
            k, v = context if isinstance(context, KeysValues) else self.keys_values(context)
            (q,) = self.project(x.reshape(k.shape[0], -1, x.shape[-1]), self.to_q)  # (shared, heads, m * tokens, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (shared, heads, m * tokens, head_dim)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)  # (batch, tokens, inner)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Linear to twice the inner width; one half gated by the GELU of the other."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(hidden)  # in place: one large temporary fewer


class FeedForward(nn.Module):
    """GEGLU feed-forward with inner width `mult` * dim (`net.0.proj`, `net.2` as in diffusers; `net.1`
    is diffusers' dropout of rate 0, kept so that the indices match, and not called)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """LayerNorm → attention → residual, twice, then LayerNorm → GEGLU feed-forward → residual.

    The three uses in the video UNet:
    - spatial (`context_dim` = text width): self-attention, then cross-attention to the text;
    - temporal (`double_self_attention`): self-attention, then optionally a second self-attention;
    - conditioner (`context_dim` = its width, `only_cross_attention`): both attentions attend to
      the context.
    Without `context_dim` and `double_self_attention` there is no second attention (`norm2`,
    `attn2` absent), as in diffusers' `BasicTransformerBlock`. `ff_mult`: the feed-forward's inner
    width in multiples of `dim`.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        ff_mult: int = 4,
    ):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.double_self_attention = context_dim is None and double_self_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, context_dim if only_cross_attention else None)
        self.norm2 = self.attn2 = None
        if context_dim is not None or double_self_attention:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult)

    def cross_keys_values(self, context: torch.Tensor) -> CrossKeysValues:
        """The keys and values of `context` for the attentions that attend to it, for `forward` to
        reuse while the context is fixed (the steps of a chunk)."""
        attends = [self.only_cross_attention, self.attn2 is not None and not self.double_self_attention]
        attentions = [self.attn1, self.attn2]
        return CrossKeysValues(*[a.keys_values(context) if on else None for a, on in zip(attentions, attends)])

    def forward(self, x: torch.Tensor, context: CrossKeysValues | None = None) -> torch.Tensor:
        """x: (batch, tokens, dim); context: `cross_keys_values` of the context, or None for a block
        whose attentions all attend to x. The residual adds go in place into fresh attention and
        feed-forward outputs (linear layers keep only their inputs for backward)."""
        context = context or CrossKeysValues(None, None)
        x = self.attn1(self.norm1(x), context.attn1).add_(x)
        if self.attn2 is not None:
            x = self.attn2(self.norm2(x), context.attn2).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (`conv`).

    `padding=1` pads every side (the UNet); `padding=0` pads only the right and bottom edges by
    one (the VAE's encoder), as the SDXL checkpoints were trained.
    """

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.pad_right_bottom = padding == 0
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_right_bottom:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size` (twice the input by default), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """x: (batch, channels, h, w); size: the output (height, width), e.g. a skip's size."""
        size = size or (2 * x.shape[-2], 2 * x.shape[-1])
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
