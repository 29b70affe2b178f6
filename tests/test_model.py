"""The UNet against diffusers' UNet2DConditionModel, and the temporal modules against their maths.

- A freshly built video UNet (zero temporal output projections, per-frame GroupNorm) equals
  diffusers applied frame by frame, for several batch shapes and an odd latent size.
- The SDXL preset covers every key of diffusers' SDXL UNet, with the same shapes.
- A chunk prepared once (`UNet.prepare_chunk`) gives every step exactly the uncached output; the
  conditioner is the class `UNetConfig.conditioner` names in temporal.CONDITIONERS.
- The temporal modules compute what docs/SEED_FORMAT.md says, written out here independently with
  explicit softmax, and the whole UNet reproduces the outputs the original code computed for the
  tiny model in tests/fixtures/original-video-unet-tiny (a copy of ../shared/fixtures).
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from einops import rearrange
from safetensors.torch import load_file

from layers import Conditioning, FeedForward
from model import UNet, UNetConfig
import temporal
from temporal import TemporalConditionerTransformer, TemporalTransformer
from tiny_pipeline import diffusers_unet, perturbed

REPOSITORY = Path(__file__).resolve().parents[1]
SDXL_UNET_CONFIG = REPOSITORY / "configs" / "sdxl-base-1.0" / "unet" / "config.json"
FIXTURE = REPOSITORY / "tests" / "fixtures" / "original-video-unet-tiny"
TOLERANCE = 1e-5


def diffusers_tiny_unet(config: UNetConfig) -> UNet2DConditionModel:
    """diffusers' SDXL-style UNet with the widths of `config`, weights perturbed away from init."""
    torch.manual_seed(0)
    return perturbed(diffusers_unet(config))


@pytest.fixture(scope="module")
def reference_and_ours():
    config = UNetConfig.tiny()
    reference = diffusers_tiny_unet(config)
    ours = UNet(config).eval()
    result = ours.load_state_dict(reference.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".temp_" in key for key in result.missing_keys)
    assert set(result.missing_keys) == {n for n, _ in ours.named_parameters() if ".temp_" in n}
    return reference, ours


def random_inputs(config: UNetConfig, batch: int, frames: int, height: int, width: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, config.in_channels, frames, height, width, generator=generator),
        timestep=torch.tensor(417.0),
        encoder_hidden_states=torch.randn(batch, 7, config.cross_attention_dim, generator=generator),
        text_embeds=torch.randn(batch, config.pooled_text_dim, generator=generator),
        time_ids=torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 768.0]]).repeat(batch, 1),
    )


def frame_by_frame(reference: UNet2DConditionModel, inputs: dict) -> torch.Tensor:
    sample = inputs["sample"]
    added = dict(text_embeds=inputs["text_embeds"], time_ids=inputs["time_ids"])
    frames = [
        reference(sample[:, :, i], inputs["timestep"], inputs["encoder_hidden_states"], added_cond_kwargs=added).sample
        for i in range(sample.shape[2])
    ]
    return torch.stack(frames, dim=2)


@pytest.mark.parametrize(
    "batch, frames, height, width",
    [(1, 3, 16, 16), (2, 4, 16, 8), (1, 2, 13, 11)],  # 13x11: not a multiple of the total downsampling
)
@torch.no_grad()
def test_fresh_video_unet_equals_diffusers_frame_by_frame(reference_and_ours, batch, frames, height, width):
    reference, ours = reference_and_ours
    inputs = random_inputs(ours.config, batch, frames, height, width)
    context = torch.randn(1, 4, 2, height, width)
    expected = frame_by_frame(reference, inputs)
    assert (ours(**inputs) - expected).abs().max() <= TOLERANCE
    assert (ours(**inputs, previous_latents=context) - expected).abs().max() <= TOLERANCE


@torch.no_grad()
def test_guidance_doubled_batch_equals_diffusers(reference_and_ours):
    reference, ours = reference_and_ours
    inputs = random_inputs(ours.config, 2, 3, 16, 16)
    inputs["sample"] = torch.cat([inputs["sample"][:1]] * 2)  # unconditional and conditional copies
    inputs["encoder_hidden_states"][0] = 0.0  # SDXL's zeroed negative prompt
    inputs["text_embeds"][0] = 0.0
    inputs["timestep"] = torch.tensor([801.0, 801.0])
    expected = frame_by_frame(reference, inputs)
    output = ours(**inputs, previous_latents=torch.randn(1, 4, 4, 16, 16))
    assert (output - expected).abs().max() <= TOLERANCE


def test_sdxl_preset_covers_diffusers_sdxl_unet():
    config = {k: v for k, v in json.loads(SDXL_UNET_CONFIG.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        reference = UNet2DConditionModel(**config)
        image_only = UNet(UNetConfig.sdxl(temporal_layers=0))
        video = UNet(UNetConfig.sdxl())
    count = lambda module: sum(p.numel() for p in module.parameters())
    assert count(reference) == count(image_only) == 2_567_463_684
    assert round(count(video) / 1e9, 2) == 4.21  # docs/SEED_FORMAT.md: two temporal blocks, D = 2560
    reference_shapes = {k: v.shape for k, v in reference.state_dict().items()}
    ours = {k: v.shape for k, v in video.state_dict().items()}
    assert len(reference_shapes) == 1680
    missing = set(reference_shapes) - set(ours)
    unexpected = {k for k in set(ours) - set(reference_shapes) if ".temp_" not in k}
    assert (len(missing), len(unexpected)) == (0, 0)
    assert all(ours[k] == shape for k, shape in reference_shapes.items())
    assert {k: v.shape for k, v in image_only.state_dict().items()} == reference_shapes


def test_original_fixture_outputs():
    """The tiny model of the original code, its `.spatial_conv` wrappers stripped, reproduces the
    outputs the original code computed (with context, without, and for one frame)."""
    state = torch.load(FIXTURE / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    state = {key.replace(".spatial_conv", ""): value for key, value in state.items()}
    unet = UNet(UNetConfig.tiny(cross_attention_dim=16, groupnorm_scope="chunk")).eval()
    unet.load_state_dict(state, strict=True)
    io = load_file(FIXTURE / "reference_io.safetensors")
    conditions = (io["timestep"], io["encoder_hidden_states"], io["text_embeds"], io["time_ids"])
    with torch.no_grad():
        with_context = unet(io["sample"], *conditions, previous_latents=io["previous_latents"])
        without_context = unet(io["sample"], *conditions)
        one_frame = unet(io["one_frame_sample"], *conditions, previous_latents=io["previous_latents"])
    assert (with_context - io["expected_with_context"]).abs().max() <= 1e-4
    assert (without_context - io["expected_without_context"]).abs().max() <= 1e-4
    assert (one_frame - io["expected_one_frame"]).abs().max() <= 1e-4
    assert (with_context - without_context).abs().max() > 1e-2  # the context path is exercised


# The temporal modules' maths, written out independently of temporal.py and layers.py.


def linear(x, layer):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def layer_norm(x, layer):
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + layer.eps) * layer.weight + layer.bias


def attention(x, context, attn, heads):
    q, k, v = linear(x, attn.to_q), linear(context, attn.to_k), linear(context, attn.to_v)
    q, k, v = (rearrange(t, "n l (h d) -> n h l d", h=heads) for t in (q, k, v))
    scores = torch.einsum("nhid,nhjd->nhij", q, k) / math.sqrt(q.shape[-1])
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    out = rearrange(torch.einsum("nhij,nhjd->nhid", weights, v), "n h l d -> n l (h d)")
    return linear(out, attn.to_out[0])


def feed_forward(x, ff):
    hidden, gate = linear(x, ff.net[0].proj).chunk(2, dim=-1)
    gelu = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
    return linear(hidden * gelu, ff.net[2])


def block(x, module, heads, context=None):
    """Both attentions are self-attention without a context, cross-attention to it with one."""
    normed = layer_norm(x, module.norm1)
    x = x + attention(normed, normed if context is None else context, module.attn1, heads)
    if module.attn2 is not None:
        normed = layer_norm(x, module.norm2)
        x = x + attention(normed, normed if context is None else context, module.attn2, heads)
    return x + feed_forward(layer_norm(x, module.norm3), module.ff)


def group_norm_5d(video, norm):
    b, c, f, h, w = video.shape
    grouped = video.reshape(b, norm.num_groups, -1)
    mean = grouped.mean(-1, keepdim=True)
    variance = grouped.var(-1, unbiased=False, keepdim=True)
    normed = ((grouped - mean) / torch.sqrt(variance + norm.eps)).reshape(b, c, f, h, w)
    return normed * norm.weight[:, None, None, None] + norm.bias[:, None, None, None]


def expected_temporal_transformer(video, module, heads):
    b, c, f, h, w = video.shape
    tokens = rearrange(group_norm_5d(video, module.norm), "b c f h w -> (b h w) f c")
    tokens = linear(tokens, module.proj_in)
    position = torch.zeros(f, c)
    for p in range(f):
        for i in range(c // 2):
            angle = p / 10000 ** (2 * i / c)
            position[p, 2 * i], position[p, 2 * i + 1] = math.cos(angle), math.sin(angle)
    tokens = tokens + position
    for transformer_block in module.transformer_blocks:
        tokens = block(tokens, transformer_block, heads)
    out = rearrange(linear(tokens, module.proj_out), "(b h w) f c -> b c f h w", b=b, h=h, w=w)
    return video + out


def expected_conditioner(video, context_latents, module, heads):
    b, c, f, h, w = video.shape
    k = context_latents.shape[2]
    context = F.interpolate(context_latents, size=(k, h, w), mode="trilinear", align_corners=False)
    context = torch.cat([context] * (b // context.shape[0]))
    conv = module.conv_in
    context = torch.einsum("bikhw,oi->bokhw", context, conv.weight[:, :, 0, 0, 0]) + conv.bias[:, None, None, None]
    context = rearrange(context, "b d k h w -> (b h w) k d") + torch.exp(torch.arange(k) / k)[:, None]
    tokens = rearrange(video, "b c f h w -> (b h w) f c")
    tokens = linear(layer_norm(tokens, module.ln), module.proj_in) + torch.exp(-torch.arange(f) / f)[:, None]
    for transformer_block in module.transformer_blocks:
        tokens = block(tokens, transformer_block, heads, context)
    out = rearrange(linear(tokens, module.proj_out), "(b h w) f c -> b c f h w", b=b, h=h, w=w)
    return video + out


def randomise(module: torch.nn.Module, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(parameter.shape[-1]))
    return module


def conditioning(num_frames, previous_latents=None):
    return Conditioning(time_embedding=None, text=None, num_frames=num_frames, previous_latents=previous_latents)


def fold(video):
    return rearrange(video, "b c f h w -> (b f) c h w")


def unfold(images, frames):
    return rearrange(images, "(b f) c h w -> b c f h w", f=frames)


@pytest.mark.parametrize("double_self_attention", [True, False])
@torch.no_grad()
def test_temporal_transformer_computes_its_maths(double_self_attention):
    config = UNetConfig.tiny(temporal_double_self_attention=double_self_attention)
    module = randomise(TemporalTransformer(32, config))
    assert (module.transformer_blocks[0].attn2 is not None) == double_self_attention
    video = torch.randn(2, 32, 5, 3, 4)
    output = unfold(module(fold(video), conditioning(5)), 5)
    assert (output - expected_temporal_transformer(video, module, heads=32 // 8)).abs().max() <= TOLERANCE


@pytest.mark.parametrize("context_batch", [1, 2])
@torch.no_grad()
def test_conditioner_computes_its_maths(context_batch):
    module = randomise(TemporalConditionerTransformer(32, UNetConfig.tiny(conditioner_layers=2)))
    video = torch.randn(2, 32, 4, 3, 5)
    context = torch.randn(context_batch, 4, 3, 12, 20)  # latent resolution: resized to the block's 3x5
    output = unfold(module(fold(video), conditioning(4, context)), 4)
    assert (output - expected_conditioner(video, context, module, heads=32 // 8)).abs().max() <= TOLERANCE


@torch.no_grad()
def test_temporal_modules_are_identities_without_frames_or_context():
    config = UNetConfig.tiny()
    temporal = randomise(TemporalTransformer(32, config))
    conditioner = randomise(TemporalConditionerTransformer(32, config))
    one_frame = torch.randn(2, 32, 3, 3)
    context = torch.randn(1, 4, 2, 3, 3)
    assert torch.equal(temporal(one_frame, conditioning(1)), one_frame)
    assert torch.equal(conditioner(one_frame, conditioning(1, context)), one_frame)
    frames = torch.randn(2 * 4, 32, 3, 3)
    assert torch.equal(conditioner(frames, conditioning(4, None)), frames)
    assert not torch.allclose(conditioner(frames, conditioning(4, context)), frames)


@torch.no_grad()
def test_fresh_temporal_modules_output_their_input():
    config = UNetConfig.tiny()
    frames = torch.randn(2 * 4, 32, 3, 3)
    context = torch.randn(1, 4, 2, 3, 3)
    assert torch.equal(TemporalTransformer(32, config)(frames, conditioning(4)), frames)
    assert torch.equal(TemporalConditionerTransformer(32, config)(frames, conditioning(4, context)), frames)


@torch.no_grad()
def test_moving_a_frame_changes_temporal_attention():
    """Frame positions are encoded: swapping two frames does not just swap their outputs."""
    module = randomise(TemporalTransformer(32, UNetConfig.tiny()))
    video = torch.randn(1, 32, 4, 3, 3)
    swapped = video[:, :, [1, 0, 2, 3]]
    output = unfold(module(fold(video), conditioning(4)), 4)
    output_swapped = unfold(module(fold(swapped), conditioning(4)), 4)
    assert (output_swapped[:, :, [1, 0, 2, 3]] - output).abs().max() > 1e-3


@torch.no_grad()
def test_groupnorm_scope_chunk_differs_from_frame_on_different_frames():
    frame_config, chunk_config = UNetConfig.tiny(), UNetConfig.tiny(groupnorm_scope="chunk")
    per_frame, across = UNet(frame_config).eval(), UNet(chunk_config).eval()
    across.load_state_dict(per_frame.state_dict())
    inputs = random_inputs(frame_config, 1, 3, 8, 8)
    inputs["sample"][:, :, 1] *= 3.0
    assert (per_frame(**inputs) - across(**inputs)).abs().max() > 1e-3
    inputs["sample"] = inputs["sample"][:, :, :1].repeat(1, 1, 3, 1, 1)  # identical frames: same statistics
    assert (per_frame(**inputs) - across(**inputs)).abs().max() <= TOLERANCE


def test_gradient_checkpointing_gives_the_same_gradients():
    unet = UNet(UNetConfig.tiny())
    randomise(unet)
    inputs = random_inputs(unet.config, 1, 2, 8, 8)
    context = torch.randn(1, 4, 2, 8, 8)
    gradients = []
    for enabled in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = enabled
        unet(**inputs, previous_latents=context).square().mean().backward()
        gradients.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    assert (gradients[0] - gradients[1]).abs().max() <= 1e-6


def test_temporal_parameters_are_the_temporal_modules():
    unet = UNet(UNetConfig.tiny())
    temporal = {id(p) for p in unet.temporal_parameters()}
    for name, parameter in unet.named_parameters():
        assert (id(parameter) in temporal) == ("temp_attentions" in name or "temp_cond_attentions" in name)


@pytest.mark.parametrize(
    "change, argument",
    [
        (dict(sample=torch.randn(1, 4, 8, 8)), "sample"),
        (dict(sample=torch.randn(1, 3, 2, 8, 8)), "sample"),
        (dict(encoder_hidden_states=torch.randn(2, 7, 24)), "encoder_hidden_states"),
        (dict(encoder_hidden_states=torch.randn(1, 7, 23)), "encoder_hidden_states"),
        (dict(text_embeds=torch.randn(1, 15)), "text_embeds"),
        (dict(time_ids=torch.randn(1, 5)), "time_ids"),
        (dict(timestep=torch.tensor([1.0, 2.0, 3.0])), "timestep"),
        (dict(previous_latents=torch.randn(1, 3, 2, 8, 8)), "previous_latents"),
        (dict(previous_latents=torch.randn(1, 4, 8, 8)), "previous_latents"),
        (dict(previous_latents=torch.randn(2, 4, 2, 8, 8)), "previous_latents"),
    ],
)
def test_bad_inputs_name_the_argument(change, argument):
    unet = UNet(UNetConfig.tiny())
    inputs = {**random_inputs(unet.config, 1, 2, 8, 8), **change}
    with pytest.raises(ValueError, match=argument):
        unet(**inputs)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(groupnorm_scope="video"), "groupnorm_scope"),
        (dict(transformer_layers_per_block=(0, 1)), "transformer_layers_per_block"),
        (dict(block_out_channels=(16, 30, 32)), "block_out_channels"),
        (dict(head_dim=0), "head_dim"),
        (dict(temporal_layers=-1), "temporal_layers"),
        (dict(layers_per_block=1.5), "layers_per_block"),
        (dict(conditioner="linear"), "conditioner"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        UNetConfig.tiny(**overrides)


@pytest.mark.parametrize("context_batch", [None, 1, 2])
@torch.no_grad()
def test_a_prepared_chunk_gives_the_uncached_outputs(context_batch):
    unet = UNet(UNetConfig.tiny(groupnorm_scope="chunk"))
    randomise(unet)
    inputs = random_inputs(unet.config, 2, 3, 13, 11)  # odd sizes: the decoder's levels are forced
    context = None if context_batch is None else torch.randn(context_batch, 4, 2, 13, 11)
    fixed = {name: inputs[name] for name in ("encoder_hidden_states", "text_embeds", "time_ids")}
    chunk = unet.prepare_chunk(**fixed, previous_latents=context, height=13, width=11, dtype=torch.float32)
    assert len(chunk.text) == 1 + 1 + 1 + 2 + 2  # spatial transformers: down at levels 1, 2, mid, up at 2, 1
    assert len(chunk.context) == (0 if context is None else len(chunk.text))
    for timestep in (900.0, 500.0):
        step = {**inputs, "timestep": torch.tensor(timestep), "previous_latents": context}
        assert torch.equal(unet(**step, cache=chunk), unet(**step))
    with pytest.raises(ValueError, match="cache holds what was computed for other"):
        unet(**{**inputs, "text_embeds": inputs["text_embeds"].clone()}, previous_latents=context, cache=chunk)


def test_levels_declare_their_module_lists():
    unet = UNet(UNetConfig.tiny())
    top = unet.down_blocks[0]  # no attention at level 0: empty lists, no key in the state dict
    assert len(top.attentions) == len(top.temp_attentions) == len(top.temp_cond_attentions) == 0
    assert top.upsamplers is None and top.downsamplers is not None
    assert unet.down_blocks[-1].downsamplers is None and unet.up_blocks[-1].upsamplers is None
    assert not any(key.startswith("down_blocks.0.attentions") for key in unet.state_dict())
    image = UNet(UNetConfig.tiny(temporal_layers=0))
    assert not any(".temp_" in key for key in image.state_dict())


class CheaperConditioner(torch.nn.Module):
    """A conditioner with nothing to prepare: its input plus a learnt bias, given a context."""

    def __init__(self, channels, config):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(channels))

    def prepare_context(self, previous_latents, batch, height, width):
        return None

    def forward(self, x, cond):
        return x if cond.previous_latents is None else x + self.bias[:, None, None]


@torch.no_grad()
def test_the_conditioner_is_the_class_the_config_names(monkeypatch):
    monkeypatch.setitem(temporal.CONDITIONERS, "cheaper", CheaperConditioner)
    unet = UNet(UNetConfig.tiny(conditioner="cheaper"))
    conditioners = [m for block, _ in unet.levels() for m in block.temp_cond_attentions]
    assert len(conditioners) == 7 and all(isinstance(m, CheaperConditioner) for m in conditioners)
    inputs = random_inputs(unet.config, 1, 2, 8, 8)
    unet(**inputs, previous_latents=torch.randn(1, 4, 2, 8, 8))
    unet.add_fresh_temporal_modules()  # what convert_weights.py builds fresh, through the same factory
    assert all(isinstance(m, CheaperConditioner) for block, _ in unet.levels() for m in block.temp_cond_attentions)
    saved = UNetConfig.tiny().to_dict()
    del saved["conditioner"]  # a config saved before the field existed
    assert UNetConfig(**saved).conditioner == "transformer"


class NarrowConditioner(TemporalConditionerTransformer):
    """The review's fork experiment: the conditioner with a feed-forward of inner width D, not 4 D."""

    ff_mult = 1


@torch.no_grad()
def test_a_narrower_conditioner_is_a_subclass_setting_ff_mult(monkeypatch):
    monkeypatch.setitem(temporal.CONDITIONERS, "narrow", NarrowConditioner)
    unet = UNet(UNetConfig.tiny(conditioner="narrow", conditioner_layers=2))
    conditioner = next(m for block, _ in unet.levels() for m in block.temp_cond_attentions)
    feed_forwards = [m for m in conditioner.modules() if isinstance(m, FeedForward)]
    assert len(feed_forwards) == 2 and all(  # GEGLU: D -> 2 x inner, inner = D
        ff.net[0].proj.out_features == 2 * ff.net[0].proj.in_features == 2 * ff.net[2].in_features for ff in feed_forwards)
    frames, context = torch.randn(2 * 4, 32, 3, 3), torch.randn(1, 4, 2, 3, 3)
    assert torch.equal(NarrowConditioner(32, UNetConfig.tiny())(frames, conditioning(4, context)), frames)
    module = randomise(NarrowConditioner(32, UNetConfig.tiny(conditioner_layers=2)))
    video, context = torch.randn(2, 32, 4, 3, 5), torch.randn(1, 4, 3, 12, 20)
    output = unfold(module(fold(video), conditioning(4, context)), 4)
    assert (output - expected_conditioner(video, context, module, heads=32 // 8)).abs().max() <= TOLERANCE
