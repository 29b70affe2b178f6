"""The refiner (refiner.py) against the outputs the original code computed.

- tests/fixtures/original-refiner-tiny (a copy of ../shared/fixtures): a tiny refiner saved as the
  FlowingFrames release saves it, and what the original code computed with it. Our refiner, sized by
  `config_from_release` and holding those weights, reproduces it within the fixture README's
  tolerances, batch 1 and batch 2, float32 and float64.
- The original design written out here independently (torch.nn.functional and diffusers'
  `BasicTransformerBlock`, which the original code uses), checked against the fixture, is the
  oracle where the fixture has no output: a window of one frame, whose temporal transformer
  passes through.
- Sizes: widths and depths from the weights, heads from the config's keys or the released 8; a
  config that does not fit the weights is refused in one line naming the file.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from safetensors.torch import load_file

from convert_weights import ConversionError, read_refiner
from refiner import Refiner, RefinerConfig, config_from_release

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "original-refiner-tiny"
WEIGHTS = FIXTURE / "refiner" / "diffusion_pytorch_model.bin"
TOLERANCES = {"expected": 3e-5, "expected_b2": 7e-5}  # the fixture README's, float32
FLOAT64_TOLERANCE = 1e-7  # the fixture README's "to about 1e-7"
INPUTS = {"expected": "latents", "expected_b2": "latents_b2"}


def fixture_state() -> dict[str, torch.Tensor]:
    return torch.load(WEIGHTS, map_location="cpu", weights_only=True)


def fixture_values() -> dict:
    return json.loads((FIXTURE / "refiner" / "config.json").read_text())


def shapes_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "reference_io.safetensors")


@pytest.fixture(scope="module")
def refiner() -> Refiner:
    """Our refiner, sized from the fixture's config.json and weights, holding its weights."""
    state = fixture_state()
    model = Refiner(config_from_release(fixture_values(), shapes_of(state), "config.json", WEIGHTS.name))
    model.load_state_dict(state, strict=True)
    return model.eval()


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a - b).abs().max().item()


# The fixture: the original code's outputs.


def test_sizes_are_read_from_the_weights_and_the_config():
    config = config_from_release(fixture_values(), shapes_of(fixture_state()), "config.json", WEIGHTS.name)
    assert config == RefinerConfig(inner_channels=64, spatial_heads=2, spatial_head_dim=16, spatial_layers=2,
                                   temporal_heads=2, temporal_head_dim=16, temporal_layers=2)
    assert sum(p.numel() for p in Refiner(config).parameters()) == 520_004  # the fixture README's count


def test_released_sizes_have_the_released_parameter_count():
    """The README's count for the original class defaults (inner 320, 8 x 64 heads, 6 layers each)."""
    with torch.device("meta"):
        assert sum(p.numel() for p in Refiner(RefinerConfig()).parameters()) == 72_449_156


@pytest.mark.parametrize("name", TOLERANCES)
@torch.no_grad()
def test_float32_reproduces_the_original_outputs(refiner, io, name):
    assert max_difference(refiner(io[INPUTS[name]]), io[name]) <= TOLERANCES[name]


@pytest.mark.parametrize("name", TOLERANCES)
@torch.no_grad()
def test_float64_reproduces_the_original_outputs(refiner, io, name):
    refiner64 = Refiner(refiner.config).double().eval()
    refiner64.load_state_dict(refiner.state_dict())
    output = refiner64(io[INPUTS[name]].double())
    assert max_difference(output, io[f"{name}_float64"]) <= FLOAT64_TOLERANCE


@torch.no_grad()
def test_a_batch_equals_its_items_one_at_a_time(refiner, io):
    batch = io["latents_b2"]
    one_by_one = torch.cat([refiner(batch[i : i + 1]) for i in range(2)])
    assert max_difference(refiner(batch), one_by_one) <= 1e-5


def test_a_fresh_refiner_returns_its_input():
    """conv_out is zero when built, as the release builds it."""
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 3, 4, 4)
    fresh = Refiner(RefinerConfig(inner_channels=32, spatial_heads=2, spatial_head_dim=8, spatial_layers=1,
                                  temporal_heads=2, temporal_head_dim=8, temporal_layers=1))
    with torch.no_grad():
        assert torch.equal(fresh(latents), latents)


# The original design written out independently: the oracle where the fixture has no output.


def diffusers_blocks(state: dict, prefix: str, heads: int) -> list[BasicTransformerBlock]:
    """The transformer blocks under `prefix`, as the original code builds them (diffusers' block,
    a second self-attention), holding the fixture's weights."""
    width = state[f"{prefix}.proj_in.weight"].shape[0]
    blocks = []
    while any(key.startswith(inner := f"{prefix}.transformer_blocks.{len(blocks)}.") for key in state):
        block = BasicTransformerBlock(width, heads, width // heads, double_self_attention=True)
        block.load_state_dict({key.removeprefix(inner): value for key, value in state.items()
                               if key.startswith(inner)})
        blocks.append(block.to(state[f"{prefix}.proj_in.weight"].dtype).eval())
    return blocks


def original_positions(frames: int, width: int) -> torch.Tensor:
    """The fixture README's encoding, float32: cos on even channels, sin on odd ones."""
    rates = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    angles = torch.arange(frames, dtype=torch.float32)[:, None] * rates  # (frames, width / 2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).reshape(frames, width)  # (frames, width)


def original_refiner(state: dict, heads: int = 2):
    """The refiner as the fixture README describes it, a function of the latents."""
    blocks = {name: diffusers_blocks(state, name, heads) for name in ("spatial_attn", "temporal_attn")}

    def conv(name, x, padding):
        return F.conv3d(x, state[f"{name}.weight"], state[f"{name}.bias"], padding=padding)

    def group_norm(name, x, groups, eps):
        return F.group_norm(x, groups, state[f"{name}.weight"], state[f"{name}.bias"], eps)

    def transformer(name, x, tokens_of, video_of, positions):
        tokens = F.linear(tokens_of(group_norm(f"{name}.norm", x, 32, 1e-6)), *linear(f"{name}.proj_in"))
        tokens = tokens + positions(tokens)
        for block in blocks[name]:
            tokens = block(tokens)
        return x + video_of(F.linear(tokens, *linear(f"{name}.proj_out")))

    def linear(name):
        return state[f"{name}.weight"], state[f"{name}.bias"]

    def forward(latents):
        b, _, f, h, w = latents.shape
        x = conv("conv_in", latents, 3)
        for index in (1, 2, 3):
            x = conv(f"conv{index}", F.silu(group_norm(f"norm{index}", x, 32, 1e-5)), 1)
        x = transformer("spatial_attn", x, lambda v: v.permute(0, 2, 3, 4, 1).reshape(b * f, h * w, -1),
                        lambda t: t.reshape(b, f, h, w, -1).permute(0, 4, 1, 2, 3), lambda t: 0)
        if f > 1:
            x = transformer("temporal_attn", x, lambda v: v.permute(0, 3, 4, 2, 1).reshape(b * h * w, f, -1),
                            lambda t: t.reshape(b, h, w, f, -1).permute(0, 4, 3, 1, 2),
                            lambda t: original_positions(f, t.shape[-1]))
        return latents + conv("conv_out", F.silu(group_norm("conv_norm", x, 8, 1e-5)), 1)

    return forward


@torch.no_grad()
def test_the_independent_oracle_reproduces_the_original_outputs(io):
    oracle = original_refiner({key: value.double() for key, value in fixture_state().items()})
    assert max_difference(oracle(io["latents"].double()), io["expected_float64"]) <= FLOAT64_TOLERANCE


@torch.no_grad()
def test_one_frame_passes_the_temporal_transformer_and_equals_the_oracle(refiner, io):
    window = io["latents"][:, :, 5:6]  # (1, 4, 1, 10, 8)
    hidden = torch.randn(1, 64, 1, 10, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(refiner.temporal_attn(hidden), hidden)
    oracle = original_refiner(fixture_state())
    assert max_difference(refiner(window), oracle(window)) <= 1e-5


# Sizes from the release's config.json.


@torch.no_grad()
def test_without_the_head_keys_the_released_eight_heads_are_used(io):
    """The release's config.json has no head keys; its transformers have 8 heads. The fixture's
    have 2, which only its extra keys say: without them, 8 heads of 4, and other outputs."""
    values = {key: value for key, value in fixture_values().items() if "attention" not in key}
    state = fixture_state()
    config = config_from_release(values, shapes_of(state), "config.json", WEIGHTS.name)
    assert (config.spatial_heads, config.spatial_head_dim, config.temporal_heads, config.temporal_head_dim) == (8, 4, 8, 4)
    model = Refiner(config)
    model.load_state_dict(state, strict=True)
    assert max_difference(model.eval()(io["latents"]), io["expected"]) > 0.1


MISFITS = {  # config.json change: what the message says
    "inner_channels": ({"inner_channels": 32}, "inner_channels is 32, the weights have 64"),
    "layers": ({"spatial_num_layers": 3}, "spatial_num_layers is 3, the weights have 2 spatial blocks"),
    "heads": ({"temporal_num_attention_heads": 3}, "temporal_num_attention_heads x temporal_attention_head_dim "
                                                   "is 3 x 16, the weights' temporal attention is 32 wide"),
    "heads not dividing": ({"spatial_num_attention_heads": 5, "spatial_attention_head_dim": None},
                           "is 5 x 6, the weights' spatial attention is 32 wide"),
    "unknown key": ({"double_self_attention": False}, "unknown keys ['double_self_attention'] for a refiner"),
}


@pytest.mark.parametrize("name", MISFITS)
def test_a_config_that_does_not_fit_the_weights_is_refused_in_one_line(tmp_path, name):
    change, says = MISFITS[name]
    folder = tmp_path / "refiner"
    shutil.copytree(FIXTURE / "refiner", folder)
    values = {key: value for key, value in (fixture_values() | change).items() if value is not None}
    (folder / "config.json").write_text(json.dumps(values))
    with pytest.raises(ConversionError) as error:
        read_refiner(folder)
    message = str(error.value)
    assert "\n" not in message and str(folder / "config.json") in message and says in message
