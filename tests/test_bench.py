"""bench.py's FLOP counting, and the UNet's fast paths against its plain ones (no timings here).

- At full size, counted on the meta device, the parameters and FLOPs per frame are SEED_FORMAT.md's
  (4.21 B against 2.57 B; 3.64, 4.51 and 7.35 TFLOP at 768x768), and diffusers counts the same
  SDXL FLOPs.
- The per-chunk cache, the fused projections and channels-last memory give the outputs of the
  plain computation.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import bench
from layers import Attention
from model import UNet, UNetConfig


def test_full_size_flops_are_seed_formats():
    row = bench.full_size_flops()
    assert row["parameters_billion"] == {"sdxl": 2.57, "video": 4.21}
    assert row["parameters"]["sdxl"] == 2_567_463_684
    flops = row["tflop_per_frame"]
    assert (round(flops["sdxl"], 2), round(flops["video_without_context"], 2), round(flops["video_with_context"], 2)) == (
        3.64, 4.51, 7.35)
    assert flops["sdxl_diffusers"] == flops["sdxl"]
    assert row["ratio_with_context"] == 2.02
    executed, in_the_loop = row["tflop_per_frame_executed"], row["tflop_per_frame_in_the_loop"]
    assert in_the_loop["video_with_context"] < executed["video_with_context"] < flops["video_with_context"]


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


@pytest.mark.parametrize("groupnorm_scope", ["frame", "chunk"])
@torch.no_grad()
def test_cached_steps_equal_plain_steps(groupnorm_scope):
    unet = randomised_unet(groupnorm_scope=groupnorm_scope)
    fixed, cache = conditions(unet.config), {}
    for index in range(3):
        cached = unet(**step(index), **fixed, cache=cache)
        assert torch.allclose(cached, unet(**step(index), **fixed), atol=1e-6, rtol=0)
    assert len(cache) > 1  # the sources, the added embedding, keys and values


@torch.no_grad()
def test_a_cache_filled_for_other_inputs_is_refused():
    unet = randomised_unet()
    inputs, cache = {**step(0), **conditions(unet.config)}, {}
    unet(**inputs, cache=cache)
    for name, value in [("previous_latents", inputs["previous_latents"].clone()),
                        ("encoder_hidden_states", inputs["encoder_hidden_states"].clone()),
                        ("sample", torch.randn(2, 4, 3, 8, 16))]:
        with pytest.raises(ValueError, match="new dict for each chunk"):
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
    unet.channels_last = True
    with torch.enable_grad():
        assert not unet.uses_channels_last(torch.device("cpu"))  # never under autograd


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_rows_skip_cleanly_without_cuda(capsys):
    bench.main(["--device", "cuda"])
    assert json.loads(capsys.readouterr().out) == {"name": "skipped", "reason": "--device cuda: no CUDA device here"}


def test_endless_child_measures_memory():
    row = bench.endless_child(bench.parse_arguments(["--child", "2", "--endless-steps", "1"]))
    assert row["chunks"] == 2 and len(row["seconds"]) == 2 and row["peak_bytes"] >= row["peak_bytes_before_loop"] > 0
