"""The SDXL UNet with a temporal transformer and a temporal conditioner transformer.

Latents are `(batch, channels, frames, height, width)`. The UNet folds frames into the batch once
at the start (`fold_frames`) and unfolds them once at the end; spatial layers then work frame by
frame, and the two temporal modules of temporal.py, which follow every spatial transformer, fold
positions into the batch to look across the chunk's frames and at the context.
Spatial module names are diffusers', so an SDXL UNet state dict loads with a strict
`load_state_dict`; a freshly built model has zero output projections in its temporal modules and
so computes exactly what SDXL computes frame by frame (with per-frame GroupNorm).
What depends only on the prompt and the context is made once per chunk by `UNet.prepare_chunk`
(a `ChunkCache`, layers.py) and given to every step's `forward(..., cache=)`.
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from layers import (
    ChunkCache,
    Conditioning,
    CrossKeysValues,
    Downsample,
    GroupNorm,
    ResnetBlock,
    TransformerBlock,
    Upsample,
    fold_frames,
    repeat_per_frame,
    unfold_frames,
)
from temporal import CONDITIONERS, TemporalTransformer, make_conditioner

GROUPNORM_SCOPES = ("frame", "chunk")
NUM_TIME_IDS = 6  # original height and width, crop top and left, target height and width


@dataclass
class UNetConfig:
    """Everything that shapes the UNet. `sdxl()` and `tiny()` are the presets.

    `head_dim` is the number of channels per attention head everywhere (spatial, temporal and
    conditioner attention): SDXL's "[5, 10, 20] heads" are 64 channels each.
    `transformer_layers_per_block[level]` is the spatial transformer depth; 0 means no attention
    (and no temporal modules) at that level. The mid block uses the last level's depth.
    `temporal_layers` is the number of transformer blocks in each temporal transformer (0 builds
    no temporal modules at all: plain SDXL); `conditioner` names the conditioner's class in
    temporal.CONDITIONERS ("transformer": the original one, the default for configs saved before
    the field), and `conditioner_layers` and `conditioner_dim` (D) shape each conditioner.
    `groupnorm_scope` is "frame" (SDXL exact) or "chunk" (statistics across the chunk's frames,
    as the original video weights were trained).
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    layers_per_block: int = 2
    transformer_layers_per_block: tuple[int, ...] = (0, 2, 10)
    head_dim: int = 64
    cross_attention_dim: int = 2048
    pooled_text_dim: int = 1280
    addition_time_embed_dim: int = 256
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    sample_size: int = 128
    temporal_layers: int = 2
    temporal_double_self_attention: bool = True
    conditioner_layers: int = 1
    conditioner_dim: int = 2560
    conditioner: str = "transformer"
    groupnorm_scope: str = "frame"

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.transformer_layers_per_block = tuple(self.transformer_layers_per_block)
        for field in fields(self):
            value = getattr(self, field.name)
            numbers = value if isinstance(value, tuple) else (value,)
            if field.type in (int, tuple[int, ...]) and any(
                not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in numbers
            ):
                raise ValueError(f"UNetConfig.{field.name} must hold non-negative integers, got {value!r}")
        if self.groupnorm_scope not in GROUPNORM_SCOPES:
            raise ValueError(f"UNetConfig.groupnorm_scope must be one of {GROUPNORM_SCOPES}, got {self.groupnorm_scope!r}")
        if self.conditioner not in CONDITIONERS:
            raise ValueError(f"UNetConfig.conditioner must be one of {tuple(CONDITIONERS)}, got {self.conditioner!r}")
        if not self.block_out_channels or 0 in self.block_out_channels:
            raise ValueError(f"UNetConfig.block_out_channels must be positive widths, got {self.block_out_channels}")
        if len(self.transformer_layers_per_block) != len(self.block_out_channels):
            raise ValueError(
                f"UNetConfig.transformer_layers_per_block must have {len(self.block_out_channels)} entries "
                f"(one per level of block_out_channels), got {self.transformer_layers_per_block}"
            )
        for name in ("in_channels", "out_channels", "layers_per_block", "head_dim", "norm_num_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"UNetConfig.{name} must be at least 1, got {getattr(self, name)}")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups or channels % self.head_dim:
                raise ValueError(
                    f"UNetConfig.block_out_channels entries must be multiples of norm_num_groups "
                    f"({self.norm_num_groups}) and head_dim ({self.head_dim}), got {channels}"
                )
        if self.block_out_channels[0] % 2 or self.addition_time_embed_dim % 2:
            raise ValueError("UNetConfig.block_out_channels[0] and addition_time_embed_dim must be even")
        if self.temporal_layers and self.conditioner_dim < 1:
            raise ValueError(f"UNetConfig.conditioner_dim must be at least 1, got {self.conditioner_dim}")

    @classmethod
    def sdxl(cls, **overrides) -> "UNetConfig":
        """SDXL base 1.0 (configs/sdxl-base-1.0/unet/config.json) with the original temporal modules."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "UNetConfig":
        """A few-hundred-thousand-parameter model with every path of the full one, for tests."""
        settings = dict(
            block_out_channels=(16, 32, 32),
            transformer_layers_per_block=(0, 1, 2),
            head_dim=8,
            cross_attention_dim=24,
            pooled_text_dim=16,
            addition_time_embed_dim=8,
            norm_num_groups=8,
            sample_size=16,
            layers_per_block=1,
            conditioner_dim=24,
        )
        return cls(**{**settings, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def groupnorm_across_frames(self) -> bool:
        """Whether the GroupNorms take statistics across the chunk's frames (`groupnorm_scope` "chunk")."""
        return self.groupnorm_scope == "chunk"


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (batch,) numbers -> (batch, dim), cosines first (SDXL's layout)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * frequencies[None]  # (batch, half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def micro_conditioning(batch_size: int, height: int, width: int, original_size: tuple[int, int] | None = None,
                       crop_top_left: tuple[int, int] = (0, 0), dtype=torch.float32, device=None) -> torch.Tensor:
    """SDXL's micro-conditioning (diffusers' `add_time_ids`), the UNet's `time_ids` input, the same
    in training and sampling: (original height, original width, crop top, crop left, target height,
    target width) for frames of height x width pixels, by default neither resized (original =
    target) nor cropped. Returns (batch_size, NUM_TIME_IDS) in `dtype` on `device`."""
    original_height, original_width = (height, width) if original_size is None else original_size
    values = torch.tensor([original_height, original_width, *crop_top_left, height, width], dtype=dtype, device=device)
    return values.repeat(batch_size, 1)  # (batch, 6)


class TimestepEmbedding(nn.Module):
    """Linear → SiLU → Linear (`linear_1`, `linear_2`)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class SpatialTransformer(nn.Module):
    """Per-frame transformer over the h*w tokens: self-attention and cross-attention to the text."""

    def __init__(self, channels: int, depth: int, config: UNetConfig):
        super().__init__()
        self.norm = GroupNorm(config.norm_num_groups, channels, 1e-6, config.groupnorm_across_frames)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, channels // config.head_dim, config.head_dim, config.cross_attention_dim)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x: (batch * frames, channels, h, w)."""
        height, width = x.shape[-2:]
        tokens = self.norm(x, cond.num_frames).permute(0, 2, 3, 1).flatten(1, 2)  # (b*f, h*w, c)
        tokens = self.proj_in(tokens)
        text = self.text_keys_values(cond.text) if cond.chunk is None else cond.chunk.text[self]
        for block, keys_values in zip(self.transformer_blocks, text):
            tokens = block(tokens, keys_values)
        tokens = self.proj_out(tokens)
        return x + tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2)  # (b*f, c, h, w) in x's memory format

    def text_keys_values(self, text: torch.Tensor) -> list[CrossKeysValues]:
        """text: (batch, tokens, cross_attention_dim) -> every block's keys and values of it."""
        return [block.cross_keys_values(text) for block in self.transformer_blocks]


# The temporal modules that follow every spatial transformer: list name -> factory(channels, config).
TEMPORAL_MODULES = {"temp_attentions": TemporalTransformer, "temp_cond_attentions": make_conditioner}


def make_temporal_modules(channels: int, config: UNetConfig) -> dict[str, nn.Module]:
    """Fresh temporal modules that follow one spatial transformer, keyed by list name (none
    without `config.temporal_layers`)."""
    if not config.temporal_layers:
        return {}
    return {name: make(channels, config) for name, make in TEMPORAL_MODULES.items()}


class UNetLevel(nn.Module):
    """One resolution level of the encoder or the decoder.

    Each resnet is followed, at attention levels, by spatial transformer → temporal transformer →
    conditioner. An encoder level ends with a stride-2 downsampler (all but the lowest level); a
    decoder level takes a skip before every resnet and ends with an upsampler (all but the
    highest level).
    """

    def __init__(self, in_channels: list[int], out_channels: int, depth: int, sampler: str | None, config: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(channels, out_channels, config.time_embed_dim, config.norm_num_groups, config.norm_eps,
                        config.groupnorm_across_frames)
            for channels in in_channels
        )
        # One entry per resnet at an attention level (depth > 0), empty lists elsewhere.
        self.attentions = nn.ModuleList()  # SpatialTransformer
        self.temp_attentions = nn.ModuleList()  # TemporalTransformer
        self.temp_cond_attentions = nn.ModuleList()  # the conditioner
        for _ in in_channels if depth else ():
            self.attentions.append(SpatialTransformer(out_channels, depth, config))
            for name, module in make_temporal_modules(out_channels, config).items():
                getattr(self, name).append(module)
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if sampler == "down" else None
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if sampler == "up" else None

    def attention_modules(self, index: int) -> list[nn.Module]:
        """What follows resnet `index`: spatial transformer, temporal transformer, conditioner (those there are)."""
        lists = (self.attentions, self.temp_attentions, self.temp_cond_attentions)
        return [modules[index] for modules in lists if len(modules)]

    def forward(self, x, cond: Conditioning, skips: tuple[torch.Tensor, ...] = (), upsample_size=None):
        """x: (batch * frames, channels, h, w); `skips`: a decoder level's skips, one per resnet,
        nearest first; `upsample_size`: the (h, w) the upsampler makes. Returns x and the
        outputs an encoder level leaves as skips."""
        made = []
        for index, resnet in enumerate(self.resnets):
            if skips:
                x = torch.cat([x, skips[index]], dim=1)  # (b*f, c + skip_c, h, w)
            x = resnet(x, cond.time_embedding, cond.num_frames)
            for module in self.attention_modules(index):
                x = module(x, cond)
            made.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            made.append(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x, made


class UNetMidBlock(nn.Module):
    """resnet 0, then conditioner → temporal transformer → spatial transformer → resnet 1."""

    def __init__(self, channels: int, depth: int, config: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(channels, channels, config.time_embed_dim, config.norm_num_groups, config.norm_eps,
                        config.groupnorm_across_frames)
            for _ in range(2)
        )
        self.attentions = nn.ModuleList([SpatialTransformer(channels, depth, config)])
        self.temp_attentions = nn.ModuleList()  # one TemporalTransformer, or none without temporal layers
        self.temp_cond_attentions = nn.ModuleList()  # one conditioner, or none
        for name, module in make_temporal_modules(channels, config).items():
            getattr(self, name).append(module)

    def forward(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x = self.resnets[0](x, cond.time_embedding, cond.num_frames)
        if len(self.temp_cond_attentions):
            x = self.temp_cond_attentions[0](x, cond)
            x = self.temp_attentions[0](x, cond)
        x = self.attentions[0](x, cond)
        return self.resnets[1](x, cond.time_embedding, cond.num_frames)


class UNet(nn.Module):
    """SDXL's UNet on video latents, with temporal modules after every spatial transformer."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        # Spatial activations in channels-last memory, without autograd only: convolutions run
        # faster and the folds around every transformer are views, not copies. None: on a CPU,
        # where tools/bench.py measured it; True or False to choose.
        self.channels_last: bool | None = None
        widths, depths = config.block_out_channels, config.transformer_layers_per_block
        num_levels = len(widths)

        self.time_embedding = TimestepEmbedding(widths[0], config.time_embed_dim)
        added_dim = config.pooled_text_dim + NUM_TIME_IDS * config.addition_time_embed_dim
        self.add_embedding = TimestepEmbedding(added_dim, config.time_embed_dim)
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)

        # Encoder: track the width of every skip it pushes, so the decoder can pop them.
        skip_widths = [widths[0]]
        self.down_blocks = nn.ModuleList()
        for level, (width, depth) in enumerate(zip(widths, depths)):
            in_widths = [skip_widths[-1]] + [width] * (config.layers_per_block - 1)
            last = level == num_levels - 1
            self.down_blocks.append(UNetLevel(in_widths, width, depth, None if last else "down", config))
            skip_widths += [width] * (config.layers_per_block + (0 if last else 1))

        self.mid_block = UNetMidBlock(widths[-1], depths[-1], config)

        self.up_blocks = nn.ModuleList()
        previous_width = widths[-1]
        for level in reversed(range(num_levels)):
            skips = [skip_widths.pop() for _ in range(config.layers_per_block + 1)]
            in_widths = [w + s for w, s in zip([previous_width] + [widths[level]] * config.layers_per_block, skips)]
            sampler = "up" if level > 0 else None
            self.up_blocks.append(UNetLevel(in_widths, widths[level], depths[level], sampler, config))
            previous_width = widths[level]

        self.conv_norm_out = GroupNorm(config.norm_num_groups, widths[0], config.norm_eps,
                                       config.groupnorm_across_frames)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)

    def levels(self) -> list[tuple[nn.Module, int]]:
        """Every level with the index of its resolution (0: the input's), in module order:
        the encoder's, the mid block, the decoder's."""
        top = len(self.down_blocks) - 1
        return [*((block, level) for level, block in enumerate(self.down_blocks)), (self.mid_block, top),
                *((block, top - index) for index, block in enumerate(self.up_blocks))]

    def add_fresh_temporal_modules(self, dtype: torch.dtype | None = None) -> None:
        """Freshly built temporal modules (zero output projections) in place of the present ones,
        made in module order by the factories __init__ uses (TEMPORAL_MODULES)."""
        for block, level in self.levels():
            for name, make in TEMPORAL_MODULES.items():
                modules = getattr(block, name)
                for index in range(len(modules)):
                    modules[index] = make(self.config.block_out_channels[level], self.config).to(dtype)

    def temporal_parameters(self) -> list[nn.Parameter]:
        """The parameters of the temporal modules (what video training trains)."""
        return [p for name, p in self.named_parameters() if ".temp_" in name]

    def check_inputs(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, previous_latents):
        """Raise ValueError naming the first argument whose shape is not what the model takes."""
        config = self.config
        if sample.ndim != 5 or sample.shape[1] != config.in_channels:
            raise ValueError(
                f"sample must be (batch, {config.in_channels}, frames, height, width), got {tuple(sample.shape)}"
            )
        batch = sample.shape[0]
        expected = {
            "encoder_hidden_states": (encoder_hidden_states, (batch, None, config.cross_attention_dim)),
            "text_embeds": (text_embeds, (batch, config.pooled_text_dim)),
            "time_ids": (time_ids, (batch, NUM_TIME_IDS)),
        }
        for name, (tensor, shape) in expected.items():
            if tensor.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, tensor.shape)):
                wanted = tuple("tokens" if s is None else s for s in shape)
                raise ValueError(f"{name} must have shape {wanted}, got {tuple(tensor.shape)}")
        timestep = torch.as_tensor(timestep)
        if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] not in (1, batch)):
            raise ValueError(f"timestep must be a number or have shape ({batch},), got {tuple(timestep.shape)}")
        if previous_latents is not None:
            shape = tuple(previous_latents.shape)
            if previous_latents.ndim != 5 or shape[1] != config.in_channels or shape[2] < 1:
                raise ValueError(
                    f"previous_latents must be (batch, {config.in_channels}, frames, height, width), got {shape}"
                )
            if batch % shape[0]:
                raise ValueError(f"previous_latents batch must divide the sample batch {batch}, got {shape[0]}")

    def embed_time(self, timestep, batch: int, dtype, device) -> torch.Tensor:
        """The timestep -> (batch, time_embed_dim)."""
        timesteps = torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)  # (batch,)
        return self.time_embedding(timestep_embedding(timesteps, self.config.block_out_channels[0]).to(dtype))

    def embed_added(self, text_embeds, time_ids, dtype) -> torch.Tensor:
        """Pooled text and micro-conditioning -> (batch, time_embed_dim): the same at every step."""
        time_ids_embedding = timestep_embedding(time_ids.reshape(-1), self.config.addition_time_embed_dim)  # (b*6, d)
        time_ids_embedding = time_ids_embedding.reshape(time_ids.shape[0], -1)  # (b, 6 * addition_time_embed_dim)
        added = torch.cat([text_embeds, time_ids_embedding.to(text_embeds.dtype)], dim=-1).to(dtype)
        return self.add_embedding(added)

    def uses_channels_last(self, device: torch.device) -> bool:
        """Never under autograd: PyTorch 2.13's CPU GroupNorm backward crashes (segfault) on a
        channels-last input that needs no gradient while its weight does (temporal training)."""
        wanted = device.type == "cpu" if self.channels_last is None else self.channels_last
        return wanted and not torch.is_grad_enabled()

    def level_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The (h, w) of every resolution level for an input of (height, width): stride-2, padding-1
        downsamplers make ceil(h / 2), and the decoder returns to the encoder's sizes."""
        sizes = [(height, width)]
        for _ in self.down_blocks[1:]:
            sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
        return sizes

    def prepare_chunk(
        self,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        previous_latents: torch.Tensor | None,
        height: int,
        width: int,
        dtype: torch.dtype,
    ) -> ChunkCache:
        """What every step of a chunk of (height, width) latents in `dtype` shares, for `forward`'s
        `cache`: the added embedding, the keys and values of every attention to the text and of
        every conditioner's attention to the encoded context. The inputs are `forward`'s; give the
        same tensors at every step of the chunk."""
        batch = encoder_hidden_states.shape[0]
        text = {m: m.text_keys_values(encoder_hidden_states) for m in self.modules() if isinstance(m, SpatialTransformer)}
        context = {}
        if previous_latents is not None:
            sizes = self.level_sizes(height, width)
            for block, level in self.levels():
                for conditioner in block.temp_cond_attentions:
                    context[conditioner] = conditioner.prepare_context(previous_latents, batch, *sizes[level])
        return ChunkCache(
            added_embedding=self.embed_added(text_embeds, time_ids, dtype),
            text=text,
            context=context,
            sizes=(batch, height, width),
            sources=(encoder_hidden_states, text_embeds, time_ids, previous_latents),
        )

    def checkpointed(self, module: nn.Module, *args):
        """module(*args), through gradient checkpointing when it is on and autograd is recording."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        previous_latents: torch.Tensor | None = None,
        cache: ChunkCache | None = None,
    ) -> torch.Tensor:
        """Predict the noise of a chunk of video latents.

        sample: (batch, in_channels, frames, h, w); timestep: a number or (batch,);
        encoder_hidden_states: (batch, tokens, cross_attention_dim); text_embeds: (batch,
        pooled_text_dim); time_ids: (batch, 6); previous_latents: the context, (batch or a
        divisor of it, in_channels, context_frames, H, W), or None.
        cache: what `prepare_chunk` made for these text, pooled text, time_ids and context tensors
        and sizes, to reuse at every step of a chunk (other inputs raise ValueError); None: computed
        here.
        Returns (batch, out_channels, frames, h, w).
        """
        self.check_inputs(sample, timestep, encoder_hidden_states, text_embeds, time_ids, previous_latents)
        batch, _, num_frames, height, width = sample.shape
        if cache is not None:
            cache.check((batch, height, width), sample.dtype, (encoder_hidden_states, text_embeds, time_ids, previous_latents))
        if cache is None:
            added = self.embed_added(text_embeds, time_ids, sample.dtype)
        else:
            added = cache.added_embedding
        time_embedding = self.embed_time(timestep, batch, sample.dtype, sample.device) + added  # (b, time_dim)
        time_embedding = repeat_per_frame(time_embedding, num_frames)  # (b*f, time_embed_dim)
        cond = Conditioning(time_embedding, encoder_hidden_states, num_frames, previous_latents, cache)

        x = fold_frames(sample)  # (b*f, c, h, w)
        if self.uses_channels_last(x.device):
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.conv_in(x)  # (b*f, c0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, made = self.checkpointed(block, x, cond)
            skips += made
        x = self.checkpointed(self.mid_block, x, cond)
        for block in self.up_blocks:
            count = len(block.resnets)
            block_skips, skips = tuple(skips[-count:][::-1]), skips[:-count]  # nearest skip first
            upsample_size = tuple(skips[-1].shape[-2:]) if skips else None  # forced when h, w are odd
            x, _ = self.checkpointed(block, x, cond, block_skips, upsample_size)
        x = self.conv_out(F.silu(self.conv_norm_out(x, num_frames)))
        return unfold_frames(x, num_frames)  # (b, out_channels, f, h, w)
