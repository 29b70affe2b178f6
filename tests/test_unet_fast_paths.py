"""The UNet's and the attention's fast paths give the outputs of their plain computations.

- The per-chunk cache: later steps equal uncached ones, do less work, and a cache filled for other
  inputs is refused.
- Channels-last memory equals contiguous memory, in the forward and in a temporal training step.
- The fused query/key/value projections equal separate ones, and frames that share one text (or
  its precomputed keys and values) equal frames that each get a copy.
- Issue 24's cuts from every step, bit for bit: the folds between frames, tokens and positions equal
  einops' `rearrange` of the same pattern (which they replace); the temporal modules' frame-position
  terms equal their formulas computed by hand, and with a chunk's cache they are made at its first
  step only, the cached steps equal to uncached ones.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.flop_counter import FlopCounterMode

import temporal
from layers import Attention, fold_frames, frames_to_tokens, tokens_to_frames, unfold_frames
from model import UNet, UNetConfig


def randomised_unet(**overrides) -> UNet:
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny(**overrides)).eval()
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.copy_(torch.randn_like(parameter) / math.sqrt(parameter.shape[-1]))
    return unet


def conditions(config: UNetConfig) -> dict:
    """What stays the same over the steps of a chunk: guidance-doubled text, pooled text and
    time_ids, and a context of batch 1."""
    generator = torch.Generator().manual_seed(0)
    return dict(
        encoder_hidden_states=torch.randn(2, 7, config.cross_attention_dim, generator=generator),
        text_embeds=torch.randn(2, config.pooled_text_dim, generator=generator),
        time_ids=torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(2, 1),
        previous_latents=torch.randn(1, 4, 2, 8, 8, generator=generator),
    )


def step(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed + 1)
    return dict(sample=torch.randn(2, 4, 3, 8, 8, generator=generator), timestep=torch.tensor(900.0 - 100 * seed))


def prepared(unet: UNet, inputs: dict):
    """The chunk cache of a call's text, pooled text, time ids and context."""
    return unet.prepare_chunk(inputs["encoder_hidden_states"], inputs["text_embeds"], inputs["time_ids"],
                              inputs["previous_latents"], *inputs["sample"].shape[-2:], inputs["sample"].dtype)


def count_flops(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


@pytest.mark.parametrize("groupnorm_scope", ["frame", "chunk"])
@torch.no_grad()
def test_cached_steps_equal_plain_steps(groupnorm_scope):
    unet = randomised_unet(groupnorm_scope=groupnorm_scope)
    fixed = conditions(unet.config)
    cache = prepared(unet, {**step(0), **fixed})
    for index in range(3):
        cached = unet(**step(index), **fixed, cache=cache)
        assert torch.allclose(cached, unet(**step(index), **fixed), atol=1e-6, rtol=0)
    # the filled cache is used: the keys and values of the text and context are not computed again
    assert count_flops(lambda: unet(**step(3), **fixed, cache=cache)) < count_flops(lambda: unet(**step(3), **fixed))


@torch.no_grad()
def test_a_cache_filled_for_other_inputs_is_refused():
    unet = randomised_unet()
    inputs = {**step(0), **conditions(unet.config)}
    cache = prepared(unet, inputs)
    unet(**inputs, cache=cache)
    for name, value in [("previous_latents", inputs["previous_latents"].clone()),
                        ("encoder_hidden_states", inputs["encoder_hidden_states"].clone()),
                        ("sample", torch.randn(2, 4, 3, 8, 16))]:
        with pytest.raises(ValueError, match="cache holds what was computed for other"):
            unet(**{**inputs, name: value}, cache=cache)


@torch.no_grad()
def test_channels_last_equals_contiguous():
    unet = randomised_unet(groupnorm_scope="chunk")
    inputs = {**step(1), **conditions(unet.config)}
    outputs = {}
    for setting in (True, False):
        unet.channels_last = setting
        outputs[setting] = unet(**inputs)
    assert torch.allclose(outputs[True], outputs[False], atol=1e-5, rtol=0)  # convolutions sum in another order


def test_channels_last_trains_temporal_modules_like_contiguous():
    """A temporal training step (spatial weights frozen) under channels_last=True runs and gives the
    gradients of contiguous memory: PyTorch's CPU GroupNorm backward crashes on a channels-last
    input that needs no gradient while its weight does, so the UNet must not use it under autograd."""
    unet = randomised_unet(groupnorm_scope="chunk").requires_grad_(False)
    for parameter in unet.temporal_parameters():
        parameter.requires_grad_(True)
    inputs = {**step(1), **conditions(unet.config)}
    gradients = {}
    for setting in (True, False):
        unet.channels_last = setting
        unet.zero_grad(set_to_none=True)
        unet(**inputs).square().mean().backward()
        gradients[setting] = [parameter.grad.clone() for parameter in unet.temporal_parameters()]
    assert all(torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(gradients[True], gradients[False]))


@pytest.mark.parametrize("bias", [False, True])
def test_fused_projections_equal_separate_ones(bias):
    torch.manual_seed(0)
    attention = Attention(32, heads=4, head_dim=8, qkv_bias=bias)
    x = torch.randn(3, 5, 32)
    split = lambda t: t.unflatten(-1, (4, 8)).transpose(1, 2)  # (b, heads, n, d)
    q, k, v = (split(layer(x)) for layer in (attention.to_q, attention.to_k, attention.to_v))
    expected = attention.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
    assert torch.allclose(attention(x), expected, atol=1e-6, rtol=0)


def test_frames_sharing_a_context_equal_a_context_per_frame():
    torch.manual_seed(0)
    attention = Attention(32, heads=4, head_dim=8, context_dim=24)
    frames, text = torch.randn(2 * 3, 5, 32), torch.randn(2, 7, 24)  # 2 videos of 3 frames
    per_frame = attention(frames, text.repeat_interleave(3, dim=0))
    assert torch.allclose(attention(frames, text), per_frame, atol=1e-6, rtol=0)
    assert torch.allclose(attention(frames, attention.keys_values(text)), per_frame, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_folds_equal_einops(channels_last):
    batch, channels, frames, height, width = 2, 5, 3, 4, 6
    video = torch.randn(batch, channels, frames, height, width)
    images = rearrange(video, "b c f h w -> (b f) c h w")
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    tokens = rearrange(images, "(b f) c h w -> (b h w) f c", f=frames)
    assert torch.equal(fold_frames(video), rearrange(video, "b c f h w -> (b f) c h w"))
    assert torch.equal(unfold_frames(images, frames), rearrange(images, "(b f) c h w -> b c f h w", f=frames))
    assert torch.equal(frames_to_tokens(images, frames), tokens)
    assert torch.equal(tokens_to_frames(tokens, height, width),
                       rearrange(tokens, "(b h w) f c -> (b f) c h w", h=height, w=width))


def test_frame_position_terms_equal_their_formulas():
    frames, dim = 5, 6
    angle = lambda p, i: p / 10000 ** ((i - i % 2) / dim)  # channels 2i and 2i + 1 share an angle
    by_hand = torch.tensor([[(math.cos if i % 2 == 0 else math.sin)(angle(p, i)) for i in range(dim)]
                            for p in range(frames)])
    assert torch.allclose(temporal.frame_position_encoding(frames, dim), by_hand, atol=1e-6, rtol=0)
    positions = temporal.chunk_frame_positions(frames, "cpu", torch.float32)
    assert positions.shape == (frames, 1)
    by_hand = torch.tensor([math.exp(-p / frames) for p in range(frames)])
    assert torch.allclose(positions[:, 0], by_hand, atol=1e-7, rtol=0)


@torch.no_grad()
def test_frame_position_terms_are_made_once_per_chunk(monkeypatch):
    unet = randomised_unet()
    fixed = conditions(unet.config)
    calls = []
    for name in ("frame_position_encoding", "chunk_frame_positions"):
        function = getattr(temporal, name)
        counted = lambda *args, function=function, name=name: calls.append(name) or function(*args)
        monkeypatch.setattr(temporal, name, counted)
    uncached = [unet(**step(index), **fixed) for index in range(3)]
    kinds = (temporal.TemporalTransformer, temporal.TemporalConditionerTransformer)
    modules = [m for m in unet.modules() if isinstance(m, kinds)]
    assert len(calls) == 3 * len(modules)  # without a cache: each module, each step
    calls.clear()
    cache = prepared(unet, {**step(0), **fixed})
    cached = [unet(**step(index), **fixed, cache=cache) for index in range(3)]
    assert sorted(calls) == ["chunk_frame_positions", "frame_position_encoding"]  # the tiny UNet's levels are one width
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached))
