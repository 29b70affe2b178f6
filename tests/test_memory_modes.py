"""The memory modes: offload (outputs unchanged, hooks in the documented order), the text encoders
leaving the device, tiled VAE decoding (blending exact where it can be, its difference and its
bytes), the VAE's dtype under fp16, and the memory estimate (its byte counter against hand
counts, meta against real tensors, its phases, and the refusal that names what would fit).

Devices are CPU to CPU here: a move is then a no-op, so the order and the residency of the moves
are checked from the hooks' record; `tools/bench.py --quick` checks the same modes on a GPU.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from infra import memory
import sample
from infra.offload import Offload
from infra.checkpoint import safetensors_header
from pipeline import StableDiffusionXLVideoPipeline, vae_dtype_name
from vae import AutoencoderKL, blend_tiles

HEIGHT, WIDTH, FRAMES = 64, 48, 3  # latents 8 x 6


@pytest.fixture()
def fresh(pipeline, model):
    """A pipeline of its own (offload hooks stay on the one they are attached to)."""
    return StableDiffusionXLVideoPipeline.from_pretrained(model)


def one_chunk(pipeline, seed=0, output_type="pt"):
    """A chunk with a context and guidance, decoded: (batch, 3, frames, H, W)."""
    embeddings = pipeline.encode_prompts(["a red circle"], "blue square", True)[0]
    context = torch.randn(1, 4, 2, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(seed))
    return pipeline(prompt_embeds=embeddings, height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=3,
                    guidance_scale=4.0, generator=torch.Generator().manual_seed(seed), previous_latents=context,
                    output_type=output_type)


# ---------------------------------------------------------------------------------------------
# Offload


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_changes_no_number(pipeline, fresh, mode):
    expected = one_chunk(pipeline)
    fresh.enable_offload(mode, "cpu")
    assert torch.equal(one_chunk(fresh), expected)
    assert torch.equal(one_chunk(fresh, seed=1), one_chunk(pipeline, seed=1))  # a second chunk: the hooks again


def test_model_offload_moves_in_the_documented_order(fresh):
    fresh.enable_offload("model", "cpu")
    one_chunk(fresh)
    one_chunk(fresh)
    chunk = [("text_encoders", "out"), ("unet", "in"), ("unet", "out"), ("vae", "in")]
    again = [("vae", "out"), ("text_encoders", "in"), *chunk]  # the next chunk's prompt is encoded again here
    assert fresh.offload.events == [("text_encoders", "in"), *chunk, *again]


def test_sequential_offload_moves_each_level_in_turn(fresh):
    fresh.enable_offload("sequential", "cpu")
    one_chunk(fresh)
    unet, events = fresh.unet, fresh.offload.events
    names = {module: name for name, module in unet.named_modules()}
    prepared = [names[m] for m in unet.modules() if hasattr(m, "text_keys_values")]
    prepared += [names[c] for block, _ in unet.levels() for c in block.temp_cond_attentions]
    levels = [names[block] for block, _ in unet.levels()]
    assert levels[0] == "down_blocks.0" and levels[len(unet.down_blocks)] == "mid_block"
    per_step = [(name, direction) for name in levels for direction in ("in", "out")]
    expected = [("text_encoders", "in"), ("text_encoders", "out"), ("unet", "in"),
                *[(name, direction) for name in prepared for direction in ("in", "out")],
                *per_step * 3, ("unet", "out"), ("vae", "in")]
    assert events == expected
    # at most one part of the UNet is on the device besides its stem, at any time
    resident = set()
    for name, direction in events:
        if name not in ("text_encoders", "unet", "vae"):
            (resident.add if direction == "in" else resident.remove)(name)
            assert len(resident) <= 1


def test_the_command_line_offload_gives_the_same_frames(model, tmp_path):
    from PIL import Image

    frames = {}
    for mode in ("none", "sequential"):
        out = tmp_path / mode
        sample.main(["--model", str(model), "--prompt", "a red circle", "--chunks", "2", "--steps", "2",
                     "--threads", "1", "--out", str(out), "--offload", mode])
        frames[mode] = [Image.open(path).tobytes() for path in sorted(out.glob("frame_*.png"))]
    assert len(frames["none"]) == 8 and frames["none"] == frames["sequential"]


def test_bad_offload_mode_is_named(fresh):
    with pytest.raises(ValueError, match="--offload"):
        Offload(fresh, "everything", "cpu")


def test_text_encoders_leave_the_device_once_every_prompt_is_encoded(fresh, monkeypatch):
    calls = []
    encode, move = fresh.encode_prompt, fresh.text_encoder.to
    monkeypatch.setattr(fresh, "encode_prompt", lambda prompt, *a: calls.append(prompt) or encode(prompt, *a))
    monkeypatch.setattr(fresh.text_encoder, "to", lambda *a, **kw: calls.append(("to", a, kw)) or move(*a, **kw))
    embeddings = fresh.encode_prompts(["a red circle", "a blue square", "a green circle"], None, True)
    # onto the device first (where they were moved off after an earlier encoding), then off it
    assert calls == [("to", (fresh.device,), {}), "a red circle", "a blue square", "a green circle", ("to", ("cpu",), {})]
    assert len(embeddings) == 3 and all(p.device.type == "cpu" for p in fresh.text_encoder.parameters())


# ---------------------------------------------------------------------------------------------
# Tiled decoding


def pointwise_decoder(latents):
    """A decoder that sees only each pixel's own latent: a channel mix, then 8x nearest upsampling."""
    mix = torch.linspace(-1, 1, 3 * latents.shape[1]).reshape(3, -1, 1, 1)
    return F.interpolate(F.conv2d(latents, mix), scale_factor=8, mode="nearest")


@pytest.mark.parametrize("tile, overlap", [(16, 5), (8, 7), (10, 0), (64, 16)])
def test_blending_is_exact_for_a_pointwise_decoder(tile, overlap):
    latents = torch.randn(2, 4, 37, 53, generator=torch.Generator().manual_seed(0))  # sides no tile divides
    tiled = blend_tiles(pointwise_decoder, latents, 8, tile, overlap)
    # float32 rounding only: a pixel sums at most (tile / (tile - overlap))^2 weighted tiles
    terms = math.ceil(tile / (tile - overlap)) ** 2
    torch.testing.assert_close(tiled, pointwise_decoder(latents), atol=1e-6, rtol=terms * torch.finfo(torch.float32).eps)


def test_blend_tiles_rejects_bad_tiles():
    for tile, overlap in ((0, 0), (8, 8), (8, -1)):
        with pytest.raises(ValueError, match="tile"):
            blend_tiles(pointwise_decoder, torch.zeros(1, 4, 8, 8), 8, tile, overlap)


@pytest.fixture(scope="module")
def vae(pipeline):
    return pipeline.vae


def test_tiled_vae_decoding_against_untiled(vae):
    """A tile as large as the frame is the untiled decode exactly. Smaller tiles differ (the
    decoder's GroupNorm statistics and mid-block attention see one tile, not the frame); blending
    the overlaps keeps that difference below cutting the tiles edge to edge."""
    latents = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        untiled = vae.decode(latents)
        assert torch.equal(vae.decode_tiled(latents, tile=40, overlap=8), untiled)
        blended = (vae.decode_tiled(latents, tile=16, overlap=8) - untiled).abs()
        cut = (vae.decode_tiled(latents, tile=16, overlap=0) - untiled).abs()
    assert 0 < blended.max() < cut.max() and blended.mean() < cut.mean()


def test_decode_video_tiles_above_the_threshold(vae, monkeypatch):
    import vae as vae_module

    calls = []
    monkeypatch.setattr(AutoencoderKL, "decode_tiled", lambda self, z: calls.append(tuple(z.shape)) or self.decode(z))
    latents = torch.randn(1, 4, 2, 8, 6)
    with torch.no_grad():
        vae.decode_video(latents)
        monkeypatch.setattr(vae_module, "TILES_ABOVE", 8 * 6 - 1)
        vae.decode_video(latents)
        vae.decode_video(latents, tiles=False)
    assert calls == [(2, 4, 8, 6)]


def test_tiled_decoding_needs_one_tile_s_memory(vae):
    """Bytes counted (memory.LiveBytes): tiled, the peak is at most one tile's untiled decode plus
    the float32 image and weight accumulators and the frame's output; far below the untiled peak."""
    side, tile, overlap, factor = 64, 16, 4, vae.config.downsample_factor
    latents = torch.randn(1, 4, side, side)
    untiled = memory.peak_bytes(lambda: vae.decode(latents))
    tiled = memory.peak_bytes(lambda: vae.decode_tiled(latents, tile, overlap))
    one_tile = memory.peak_bytes(lambda: vae.decode(latents[..., :tile, :tile]))
    pixels = (side * factor) ** 2
    accumulators = (3 + 1) * pixels * 4  # image (1, 3, H, W) and total weight (H, W), float32
    weights = 2 * (tile * factor) ** 2 * 4  # a tile's weights: the separable product and its copy
    assert tiled <= one_tile + accumulators + weights + 3 * pixels * 4  # + the returned frame
    assert tiled < untiled / 4


# ---------------------------------------------------------------------------------------------
# The VAE's dtype


def test_vae_dtype_names():
    assert vae_dtype_name("fp16", None, True) == "fp32"  # SDXL's VAE overflows in float16
    assert vae_dtype_name("fp16", None, False) == "fp16"
    assert vae_dtype_name("bf16", None, True) == "bf16"  # float32's range
    assert vae_dtype_name("fp32", None, True) == "fp32"
    assert vae_dtype_name("fp16", "fp16", True) == "fp16"  # asked for


def test_fp16_inference_keeps_the_vae_in_fp32(fresh):
    """With --dtype fp16 the VAE holds float32 weights (the float16-rounded ones, cast once) and
    decodes float16 latents in float32; an explicit --vae-dtype fp16 runs it in float16."""
    fresh.to(dtype=torch.float16)
    half_weights = {key: value.clone() for key, value in fresh.vae.state_dict().items()}
    assert fresh.set_vae_dtype(None, "fp16") == "fp32"
    assert all(p.dtype == torch.float32 for p in fresh.vae.parameters())
    assert all(torch.equal(fresh.vae.state_dict()[key].half(), value) for key, value in half_weights.items())
    latents = torch.randn(1, 4, 2, 8, 6, generator=torch.Generator().manual_seed(2)).half()
    with torch.no_grad():
        video = fresh.decode_video(latents)
        assert video.dtype == torch.float16
        assert torch.equal(video, fresh.vae.decode_video(latents.float()).half())
        assert fresh.set_vae_dtype("fp16", "fp16") == "fp16" and fresh.vae_upcast is False
        in_half = fresh.decode_video(latents)
        assert torch.equal(in_half, fresh.vae.decode_video(latents, upcast=False)) and not torch.equal(in_half, video)


# ---------------------------------------------------------------------------------------------
# The memory estimate


def test_live_bytes_against_a_hand_count():
    """x (n, 8) -> Linear(8, 32) -> GELU -> Linear(32, 8), float32: the peak is x and two (n, 32)
    activations alive at once (the GELU's input and output); views add nothing, frees count."""
    n = 100
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))

    def run():
        x = torch.randn(n, 8)
        network(x).reshape(10, -1).t()

    assert memory.peak_bytes(run) == (n * 8 + 2 * n * 32) * 4
    counter = memory.LiveBytes()
    with counter:
        a = torch.ones(1000)
        b = a.view(10, 100)
        b.mul_(2)
        del a
        assert counter.live == 4000
        del b
        assert counter.live == 0


def test_meta_counts_what_real_tensors_count(pipeline):
    """The estimate runs the step on the meta device; real tensors on the CPU give the same bytes."""
    config, dtype = pipeline.unet.config, torch.float32
    counted = memory.step_activations(config, 2, FRAMES, 2, HEIGHT // 8, WIDTH // 8, dtype)

    def step():
        draw = lambda *shape: torch.randn(shape, dtype=dtype)
        latents, text = draw(2, 4, FRAMES, 8, 6), draw(2, memory.TEXT_TOKENS, config.cross_attention_dim)
        pooled, context = draw(2, config.pooled_text_dim), draw(1, 4, 2, 8, 6)
        time_ids = memory.micro_conditioning(2, HEIGHT, WIDTH, dtype=dtype)
        cache = pipeline.unet.prepare_chunk(text, pooled, time_ids, context, 8, 6, dtype)
        pipeline.unet(latents, torch.tensor(500.0), text, pooled, time_ids, context, cache=cache)

    pipeline.unet.channels_last = False  # as on a GPU and on meta (a CPU run defaults to channels-last)
    try:
        assert counted == memory.peak_bytes(step) > 0
    finally:
        pipeline.unet.channels_last = None


def test_estimate_against_a_hand_count(model):
    """Weights: the stored tensors' elements (safetensors headers) at the run's dtype; each mode's
    phases: the weights on the device then plus that phase's counted activations."""
    config = json.loads((model / "config.json").read_text())
    found = memory.estimate(config, model, HEIGHT, WIDTH, FRAMES, 2, 4.0, 2, "bf16", "fp32")
    elements = lambda path: sum(math.prod(entry["shape"]) for entry in safetensors_header(path).values())
    unet, vae = elements(model / "unet.safetensors"), elements(model / "vae.safetensors")
    text = elements(model / "text_encoder/model.safetensors") + elements(model / "text_encoder_2/model.safetensors")
    w = found.weights
    assert (w["unet"], w["vae"], w["text_encoders"]) == (2 * unet, 4 * vae, 2 * text)
    a = found.activations
    assert a["step"] == memory.step_activations(memory.UNetConfig(**config["unet"]), 2, FRAMES, 2, 8, 6, torch.bfloat16)
    assert found.phases() == {"text": 2 * (unet + text) + 4 * vae + a["text"], "step": 2 * unet + 4 * vae + a["step"],
                              "decode": 2 * unet + 4 * vae + a["decode"]}
    assert found.with_offload("model").phases() == {"text": 2 * text + a["text"], "step": 2 * unet + a["step"],
                                                    "decode": 4 * vae + a["decode"]}
    stem, level = memory.largest_level_parameters(memory.UNetConfig(**config["unet"]))
    assert found.with_offload("sequential").phases()["step"] == 2 * (stem + level) + a["step"] < 2 * unet + a["step"]
    assert found.peak() == int(max(found.phases().values()) * memory.ALLOCATOR_MARGIN)


def test_a_run_that_cannot_fit_is_refused_with_the_option_that_fits(model, monkeypatch):
    config = json.loads((model / "config.json").read_text())
    settings = dict(height=HEIGHT, width=WIDTH, frames=FRAMES, context_frames=2, guidance=4.0, decode_frames=2,
                    dtype="fp32", vae_dtype="fp32")
    found = memory.estimate(config, model, **settings)
    free = (found.peak() + found.with_offload("model").peak()) // 2
    assert found.with_offload("model").peak() < free < found.peak()
    monkeypatch.setattr(memory, "available_memory", lambda device: free)
    with pytest.raises(ValueError, match=r"--height 64 --width 48 --frames 3: a chunk needs about .*"
                                         r"--offload model would make it fit"):
        memory.check_memory(config, model, "cuda", **settings)
    assert memory.check_memory(config, model, "cuda", **settings, offload="model") == found.with_offload("model")
    monkeypatch.setattr(memory, "available_memory", lambda device: 1)
    with pytest.raises(ValueError, match="would not fit: use a smaller --height/--width"):
        memory.check_memory(config, model, "cuda", **settings)


def test_sample_refuses_before_touching_a_file(model, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 1000)
    out = tmp_path / "video.mp4"
    with pytest.raises(ValueError, match="a chunk needs about"):
        sample.main(["--model", str(model), "--prompt", "a", "--chunks", "1", "--threads", "1", "--out", str(out)])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sample_s_offload_choices_are_offload_s_modes():
    from infra import offload

    assert sample.OFFLOAD_MODES == ("none", *offload.MODES)
