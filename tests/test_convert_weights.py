"""convert_weights.py on tiny random models: every source layout, the end-to-end images, every error.

- diffusers' folder layout (safetensors, .bin with old transformers names, fp16 variant, shards):
  the converted UNet, VAE and text encoders compute what diffusers computes from the same folder.
- The original single-file layout, built here from a tiny diffusers pipeline: our conversion equals
  diffusers' own single-file conversion (`diffusers.loaders.single_file_utils`) tensor by tensor.
- The original video layout: the fixture of the original code (tests/fixtures/original-video-unet-tiny)
  reproduces the outputs that code computed, and a hand-built video UNet round-trips exactly.
- End to end: folder -> convert -> `StableDiffusionXLVideoPipeline.from_pretrained` makes diffusers' images.
- Bad input raises before anything is written, naming the file or option; --overwrite replaces only a
  checkpoint folder or an empty one; a full disk or a killed run loses nothing and leaves nothing.
"""

import dataclasses
import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import convert_weights
from infra import checkpoint as checkpoint_files
from convert_weights import (
    SDXL_CONFIGS,
    ConversionError,
    LazyTensor,
    check,
    convert,
    key_problems,
    main,
    read_single_file,
    read_video_unet,
)
from model import UNet, UNetConfig
from infra.checkpoint import CHECKPOINT_FORMAT, load_checkpoint_config
from pipeline import StableDiffusionXLVideoPipeline
from scheduler import SchedulerConfig
from test_checkpoint_files import fsync_recorder
from tiny_pipeline import UNET_CONFIG, VAE_CONFIG, diffusers_tiny_pipeline, diffusers_unet, diffusers_vae, perturbed
from tiny_text import tiny_tokenizers

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "original-video-unet-tiny"
PROMPT, NEGATIVE = "a red circle moving left", "blue square"
VIDEO_UNET_CONFIG = UNetConfig.tiny(cross_attention_dim=16, sample_size=8)  # the fixture's spatial shapes


# Sources in diffusers' layout.


def save_with_old_text_encoder_names(pipeline: StableDiffusionXLPipeline, folder: Path) -> None:
    """Pickled .bin weights everywhere; the text encoders as transformers 4 wrote SDXL's
    (`text_model.` keys, a stored `position_ids`), which transformers 5 no longer writes."""
    pipeline.save_pretrained(folder, safe_serialization=False)
    for name in ("text_encoder", "text_encoder_2"):
        state = load_file(folder / name / "model.safetensors")
        state = {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
                 for k, v in state.items()}
        state["text_model.embeddings.position_ids"] = torch.arange(16)[None]
        torch.save(state, folder / name / "pytorch_model.bin")
        (folder / name / "model.safetensors").unlink()


@pytest.fixture(scope="module")
def sdxl_folders(tmp_path_factory):
    """A tiny SDXL pipeline saved by diffusers in four ways; {variant: (folder, diffusers variant)}."""
    root = tmp_path_factory.mktemp("sdxl")
    config = SchedulerConfig.video_model()
    reference = diffusers_tiny_pipeline(root / "tokenizer-files", config)
    reference.save_pretrained(root / "safetensors")
    save_with_old_text_encoder_names(reference, root / "bin")
    reference.save_pretrained(root / "sharded", max_shard_size="100KB")
    half = diffusers_tiny_pipeline(root / "tokenizer-files", config).to(torch.float16)
    half.save_pretrained(root / "fp16", variant="fp16")
    return {name: (root / name, "fp16" if name == "fp16" else None)
            for name in ("safetensors", "bin", "sharded", "fp16")}


def unet_inputs(config: UNetConfig, frames: int = 2, size: int = 8) -> dict:
    generator = torch.Generator().manual_seed(0)
    return dict(
        sample=torch.randn(1, 4, frames, size, size, generator=generator),
        timestep=torch.tensor(417.0),
        encoder_hidden_states=torch.randn(1, 7, config.cross_attention_dim, generator=generator),
        text_embeds=torch.randn(1, config.pooled_text_dim, generator=generator),
        time_ids=torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
    )


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", ["safetensors", "bin", "sharded", "fp16"])
@torch.no_grad()
def test_diffusers_folder_computes_what_diffusers_computes(sdxl_folders, tmp_path, variant):
    folder, diffusers_variant = sdxl_folders[variant]
    convert(folder, tmp_path / "out")
    ours = StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "out")
    reference = StableDiffusionXLPipeline.from_pretrained(folder, variant=diffusers_variant, dtype=torch.float32)
    assert ours.provenance["unet_temporal"].startswith("fresh") and ours.unet.config.groupnorm_scope == "frame"

    inputs = unet_inputs(ours.unet.config)
    added = dict(text_embeds=inputs["text_embeds"], time_ids=inputs["time_ids"])
    for frame in range(2):
        expected = reference.unet(inputs["sample"][:, :, frame], inputs["timestep"], inputs["encoder_hidden_states"],
                                  added_cond_kwargs=added).sample
        assert max_difference(ours.unet(**inputs)[:, :, frame], expected) <= 1e-5

    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert max_difference(ours.vae.encode(images).mean, reference.vae.encode(images).latent_dist.mean) <= 1e-5
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    assert max_difference(ours.vae.decode(latents), reference.vae.decode(latents).sample) <= 1e-5

    expected = reference.encode_prompt(PROMPT, device=torch.device("cpu"), negative_prompt=NEGATIVE)
    for mine, theirs in zip(ours.encode_prompt(PROMPT, NEGATIVE), expected):
        assert max_difference(mine, theirs) <= 1e-5


def test_dtype_sets_the_stored_precision(sdxl_folders, tmp_path):
    folder, _ = sdxl_folders["safetensors"]
    convert(folder, tmp_path / "fp32")
    convert(folder, tmp_path / "bf16", dtype="bf16")
    for name in ("unet.safetensors", "vae.safetensors", "text_encoder/model.safetensors",
                 "text_encoder_2/model.safetensors"):
        full, half = load_file(tmp_path / "fp32" / name), load_file(tmp_path / "bf16" / name)
        assert {v.dtype for v in half.values() if v.is_floating_point()} == {torch.bfloat16}
        assert all(torch.equal(half[k], v.to(half[k].dtype)) for k, v in full.items())


@torch.no_grad()
def test_end_to_end_images_equal_diffusers(sdxl_folders, tmp_path):
    """diffusers saves SDXL, the CLI converts it, our pipeline loads it: the same images, one frame
    with the original SDE sampler, and two frames with a context (temporal modules fresh)."""
    folder, _ = sdxl_folders["safetensors"]
    main([str(folder), str(tmp_path / "out")])
    ours = StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "out")
    assert ours.scheduler_config == SchedulerConfig.video_model()
    assert load_checkpoint_config(tmp_path / "out")["sample_defaults"] == {"frames": 4, "context_frames": 4,
                                                                          "steps": 50, "guidance": 9.0}
    assert ours.unet.config == dataclasses.replace(UNET_CONFIG, conditioner_dim=64, groupnorm_scope="frame")
    ode = dataclasses.replace(SchedulerConfig.sdxl_base(), timestep_spacing="trailing")
    reference = diffusers_tiny_pipeline(tmp_path / "tokenizer-files", ours.scheduler_config)
    latents, context = torch.randn(2, 1, 4, 2, 8, 6, generator=torch.Generator().manual_seed(3))
    arguments = dict(negative_prompt=NEGATIVE, height=64, width=48, num_inference_steps=8, guidance_scale=5.0,
                     output_type="pt")

    for frames, config in [(1, ours.scheduler_config), (2, ode)]:
        ours.scheduler_config = config
        reference.scheduler = DPMSolverMultistepScheduler(**config.to_dict())
        video = ours(PROMPT, num_frames=frames, latents=latents[:, :, :frames], previous_latents=context,
                     generator=torch.Generator().manual_seed(7), **arguments)
        for frame in range(frames):
            expected = reference(PROMPT, latents=latents[:, :, frame], generator=torch.Generator().manual_seed(7),
                                 **arguments).images
            assert max_difference(video[:, :, frame], expected) <= 1e-4


# The original single-file layout, written from diffusers' names independently of convert_weights.py.

RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def original_unet_key(key: str, per_level: int, attention_levels: set[int]) -> str:
    """diffusers' UNet key -> the original's (STYLE.md's table, `per_level` = resnets per level + 1)."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    module, parameter = key.rsplit(".", 1)
    if module in fixed:
        return f"{fixed[module]}.{parameter}"
    if m := re.fullmatch(r"(down|up|mid)_blocks?\.(?:(\d+)\.)?(resnets|attentions)\.(\d+)\.(.+)", module):
        side, level, kind, index, rest = m[1], int(m[2] or 0), m[3], int(m[4]), m[5]
        rest = RESNET_NAMES.get(rest, rest) if kind == "resnets" else rest
        slot = 0 if kind == "resnets" else 1
        block = {"down": f"input_blocks.{1 + per_level * level + index}.{slot}",
                 "up": f"output_blocks.{per_level * level + index}.{slot}",
                 "mid": f"middle_block.{2 * index if kind == 'resnets' else 1}"}[side]
        return f"{block}.{rest}.{parameter}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{per_level * (int(m[1]) + 1)}.0.op.{parameter}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module)
    level = int(m[1])
    return f"output_blocks.{per_level * level + per_level - 1}.{2 if level in attention_levels else 1}.conv.{parameter}"


def original_vae_key(key: str, levels: int) -> str:
    """diffusers' VAE key -> the original's; its decoder numbers levels from the lowest resolution."""
    def up(match: re.Match) -> str:
        return f"decoder.up.{levels - 1 - int(match[1])}."

    module, parameter = key.rsplit(".", 1)
    module = re.sub(r"(coder)\.conv_norm_out", r"\1.norm_out", module)
    module = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", module)
    module = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", module)
    module = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: up(m) + "block.", module)
    module = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: up(m) + "upsample.", module)
    module = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", module)
    module = module.replace("conv_shortcut", "nin_shortcut").replace("mid_block.attentions.0", "mid.attn_1")
    for new, old in VAE_ATTENTION_NAMES.items():
        module = re.sub(rf"mid\.attn_1\.{re.escape(new)}$", f"mid.attn_1.{old}", module)
    return f"{module}.{parameter}"


def open_clip_state(model: CLIPTextModelWithProjection) -> dict:
    """transformers' CLIP -> OpenCLIP: fused q, k, v; text projection transposed."""
    state, out = model.state_dict(), {}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in range(model.config.num_hidden_layers):
        layer = f"text_model.encoder.layers.{i}."
        for new, old in names.items():
            for p in ("weight", "bias"):
                out[f"transformer.resblocks.{i}.{old}.{p}"] = state[f"{layer}{new}.{p}"]
        for p in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat(
                [state[f"{layer}self_attn.{x}_proj.{p}"] for x in "qkv"])
    out["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    for p in ("weight", "bias"):
        out[f"ln_final.{p}"] = state[f"text_model.final_layer_norm.{p}"]
    out["text_projection"] = state["text_projection.weight"].T.contiguous()
    out["logit_scale"] = torch.tensor(4.6)
    return out


def original_single_file(reference: StableDiffusionXLPipeline) -> dict:
    """The state dict of `reference` in the original single-file layout (sd_xl_base_1.0.safetensors)."""
    unet_config = reference.unet.config
    attention_levels = {i for i, name in enumerate(unet_config.up_block_types) if name.startswith("CrossAttn")}
    state = {f"model.diffusion_model.{original_unet_key(k, unet_config.layers_per_block + 1, attention_levels)}": v
             for k, v in reference.unet.state_dict().items()}
    levels = len(reference.vae.config.block_out_channels)
    for key, value in reference.vae.state_dict().items():
        original = original_vae_key(key, levels)
        is_conv = ".mid.attn_1." in original and value.ndim == 2  # 1x1 convs in the original
        state[f"first_stage_model.{original}"] = value[:, :, None, None] if is_conv else value
    clip = "conditioner.embedders.0.transformer.text_model."
    state.update({f"{clip}{k.removeprefix('text_model.')}": v for k, v in reference.text_encoder.state_dict().items()})
    state[f"{clip}embeddings.position_ids"] = torch.arange(16)[None]
    open_clip = open_clip_state(reference.text_encoder_2)
    state.update({f"conditioner.embedders.1.model.{k}": v for k, v in open_clip.items()})
    state["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)
    return state


@pytest.fixture(scope="module")
def single_file(sdxl_folders, tmp_path_factory):
    """The original-layout file, the diffusers pipeline it holds, an SDXL folder for configs and tokenizers."""
    folder, _ = sdxl_folders["safetensors"]
    reference = StableDiffusionXLPipeline.from_pretrained(folder)
    path = tmp_path_factory.mktemp("single") / "tiny_sdxl.safetensors"
    save_file(original_single_file(reference), path)
    return path, reference, folder


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_single_file_equals_diffusers_single_file_conversion(single_file, tmp_path):
    path, reference, folder = single_file
    convert(path, tmp_path / "out", tokenizers=folder, configs=folder)
    original = load_file(path)
    out = tmp_path / "out"

    oracle = {
        "unet": convert_ldm_unet_checkpoint(original, reference.unet.config),
        "vae": convert_ldm_vae_checkpoint(original, reference.vae.config),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(original).items()
                         if not k.endswith("position_ids")},
        "text_encoder_2": convert_open_clip_checkpoint(reference.text_encoder_2, original,
                                                       prefix="conditioner.embedders.1.model."),
    }
    ours = {
        "unet": {k: v for k, v in load_file(out / "unet.safetensors").items() if ".temp_" not in k},
        "vae": load_file(out / "vae.safetensors"),
        "text_encoder": {k.removeprefix("text_model."): v
                         for k, v in load_file(out / "text_encoder/model.safetensors").items()},
        "text_encoder_2": load_file(out / "text_encoder_2/model.safetensors"),
    }
    for name in oracle:
        assert_same_tensors(ours[name], oracle[name])
        source = {k.removeprefix("text_model.") if name == "text_encoder" else k: v
                  for k, v in getattr(reference, name).state_dict().items()}
        assert_same_tensors(ours[name], source)  # and the file held exactly the diffusers model
    provenance = json.loads((out / "config.json").read_text())["provenance"]
    assert provenance["tokenizer"] == str(folder / "tokenizer") and provenance["configs"] == str(folder)


def diffusers_config(name: str) -> dict:
    """SDXL base 1.0's config of one component, as diffusers' constructor takes it."""
    values = json.loads((SDXL_CONFIGS / name / "config.json").read_text())
    return {key: value for key, value in values.items() if not key.startswith("_")}


def meta_weights(state: dict) -> dict:
    return {key: LazyTensor(key, tuple(value.shape), lambda: value) for key, value in state.items()}


def test_sdxl_size_single_file_maps_every_key(monkeypatch):
    """At SDXL's size (configs/sdxl-base-1.0, on the meta device) every key of the original
    single-file layout lands on a parameter of the right shape, and every parameter is covered."""
    with torch.device("meta"):
        reference = SimpleNamespace(
            unet=UNet2DConditionModel(**diffusers_config("unet")), vae=AutoencoderKL(**diffusers_config("vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_CONFIGS / "text_encoder")),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL_CONFIGS / "text_encoder_2")),
        )
    monkeypatch.setattr(convert_weights, "read_weights", lambda path: meta_weights(original_single_file(reference)))
    parts, mapped = read_single_file(Path("sd_xl_base_1.0.safetensors"), SDXL_CONFIGS, None)
    check(parts, mapped.unknown)
    assert len(mapped.dropped) == 3  # position_ids, logit_scale, denoiser.sigmas
    sizes = {name: sum(math.prod(t.shape) for t in part.weights.values()) for name, part in parts.items()}
    assert sizes == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                     "text_encoder_2": 694_659_840}


# The original video layout.


def text_encoders_of_width(tokenizer, width: int, projection: int):
    """Random tiny CLIP text encoders of the given hidden width and pooled projection."""
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=16, num_hidden_layers=2, num_attention_heads=2,
                  hidden_size=width, intermediate_size=2 * width, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return (CLIPTextModel(CLIPTextConfig(**common)),
            CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=projection, **common)))


@pytest.fixture(scope="module")
def video_sdxl_folder(tmp_path_factory):
    """A tiny SDXL folder whose widths fit the fixture (text 8 + 8 = 16, pooled 16), its own random UNet."""
    folder = tmp_path_factory.mktemp("video-sdxl")
    tokenizer, tokenizer_2 = tiny_tokenizers(folder / "tokenizer-files")
    text_encoder, text_encoder_2 = text_encoders_of_width(tokenizer, 8, 16)
    torch.manual_seed(0)
    StableDiffusionXLPipeline(
        vae=perturbed(diffusers_vae(VAE_CONFIG)),
        text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=perturbed(diffusers_unet(VIDEO_UNET_CONFIG)),
        scheduler=DPMSolverMultistepScheduler(**SchedulerConfig.video_model().to_dict()),
    ).save_pretrained(folder / "sdxl")
    return folder / "sdxl"


def assert_fixture_outputs(unet: UNet) -> None:
    io = load_file(FIXTURE / "reference_io.safetensors")
    conditions = (io["timestep"], io["encoder_hidden_states"], io["text_embeds"], io["time_ids"])
    context = io["previous_latents"]
    with torch.no_grad():
        outputs = {"expected_with_context": unet(io["sample"], *conditions, previous_latents=context),
                   "expected_without_context": unet(io["sample"], *conditions),
                   "expected_one_frame": unet(io["one_frame_sample"], *conditions, previous_latents=context)}
    for name, output in outputs.items():
        assert max_difference(output, io[name]) <= 1e-4, name


def release_folder(sdxl: Path, root: Path) -> Path:
    """The original release's layout: an SDXL folder whose unet/ is the video UNet."""
    shutil.copytree(sdxl, root / "release", ignore=shutil.ignore_patterns("unet"))
    shutil.copytree(FIXTURE / "unet", root / "release" / "unet")
    return root / "release"


@pytest.mark.parametrize("layout", ["--video-unet", "release folder"])
def test_original_video_unet_reproduces_the_original_outputs(video_sdxl_folder, tmp_path, layout):
    """The whole UNet comes from the video weights: SRC's own random UNet, which has the same
    shapes, is not used, and the outputs are the original code's."""
    if layout == "--video-unet":
        convert(video_sdxl_folder, tmp_path / "out", video_unet=FIXTURE / "unet")
    else:
        convert(release_folder(video_sdxl_folder, tmp_path), tmp_path / "out")
    ours = StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "out")
    expected = dataclasses.replace(VIDEO_UNET_CONFIG, conditioner_dim=24, groupnorm_scope="chunk")
    assert ours.unet.config == expected
    assert ours.provenance["unet_temporal"].startswith("imported")
    assert ours.provenance["unet"].endswith("diffusion_pytorch_model.bin (original video layout)")
    assert_fixture_outputs(ours.unet)


def original_video_state(unet: UNet) -> dict:
    """Our UNet's state dict under the original video names: every 2-D conv wrapped in `.spatial_conv`."""
    convs = {name for name, module in unet.named_modules() if type(module) is nn.Conv2d}
    return {(f"{module}.spatial_conv.{p}" if module in convs else key): value
            for key, value in unet.state_dict().items() for module, p in [key.rsplit(".", 1)]}


def hand_built_video_unet(spatial: UNetConfig) -> UNet:
    """A video UNet with other temporal settings than the fixture's, which only its weights tell."""
    config = dataclasses.replace(spatial, temporal_layers=1, temporal_double_self_attention=False,
                                 conditioner_layers=2, conditioner_dim=12, groupnorm_scope="chunk")
    torch.manual_seed(0)
    return perturbed(UNet(config))


def write_video_unet(state: dict, config: UNetConfig, folder: Path) -> Path:
    """The weights and the original config.json (its temporal_layers_per_block [2, 2, 2] is not what
    the weights say; the converter reads the weights)."""
    values = json.loads((FIXTURE / "unet" / "config.json").read_text()) | dict(
        cross_attention_dim=config.cross_attention_dim, sample_size=config.sample_size,
        projection_class_embeddings_input_dim=config.pooled_text_dim + 6 * config.addition_time_embed_dim)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(values))
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    return folder


@pytest.mark.parametrize("source", ["SDXL folder", "single file"])
def test_hand_built_original_video_unet_round_trips(video_sdxl_folder, single_file, tmp_path, source):
    """The whole UNet comes from --video-unet, next to either SDXL source, tensor for tensor."""
    path, _, folder = single_file
    spatial, arguments = {"SDXL folder": (VIDEO_UNET_CONFIG, dict(source=video_sdxl_folder)),
                          "single file": (UNET_CONFIG, dict(source=path, tokenizers=folder, configs=folder))}[source]
    unet = hand_built_video_unet(spatial)
    state = original_video_state(unet)
    assert sum(".spatial_conv." in key for key in state) == 2 * sum(type(m) is nn.Conv2d for m in unet.modules())
    convert(**arguments, out=tmp_path / "out", video_unet=write_video_unet(state, unet.config, tmp_path / "video"))
    ours = StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "out")
    assert ours.unet.config == unet.config
    assert_same_tensors(ours.unet.state_dict(), unet.state_dict())


BROKEN_VIDEO_UNETS = {
    "missing temporal key": (lambda s: s.pop("down_blocks.1.temp_attentions.0.proj_in.bias"),
                             "unet: 1 missing keys: down_blocks.1.temp_attentions.0.proj_in.bias"),
    "wrong shape": (lambda s: s.update({"up_blocks.1.resnets.0.conv1.spatial_conv.weight": torch.zeros(32, 64, 1, 1)}),
                    r"unet: 1 shape mismatches: up_blocks.1.resnets.0.conv1.spatial_conv.weight is \(32, 64, 1, 1\), "
                    r"the model needs \(32, 64, 3, 3\)"),
    "unknown key": (lambda s: s.update({"mid_block.temp_attentions.0.extra.weight": torch.zeros(1)}),
                    "unet: 1 unknown keys: mid_block.temp_attentions.0.extra.weight"),
}


@pytest.mark.parametrize("breakage", BROKEN_VIDEO_UNETS)
def test_broken_video_unet_is_refused(video_sdxl_folder, tmp_path, breakage):
    change, message = BROKEN_VIDEO_UNETS[breakage]
    unet = hand_built_video_unet(VIDEO_UNET_CONFIG)
    state = original_video_state(unet)
    change(state)
    video = write_video_unet(state, unet.config, tmp_path / "video")
    with pytest.raises(ConversionError, match=message):
        convert(video_sdxl_folder, tmp_path / "out", video_unet=video)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video"]


def test_sdxl_size_video_unet_maps_every_key(monkeypatch, tmp_path):
    """The original release's UNet at full size: two temporal blocks per slot with a second
    self-attention and a 2,560-wide conditioner are read from the weights, 4.21 B parameters."""
    with torch.device("meta"):
        unet = UNet(UNetConfig.sdxl(groupnorm_scope="chunk"))
    config = json.loads((FIXTURE / "unet" / "config.json").read_text()) | dict(
        block_out_channels=[320, 640, 1280], layers_per_block=2, transformer_layers_per_block=[1, 2, 10],
        attention_head_dim=64, cross_attention_dim=2048, addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32, sample_size=128)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "diffusion_pytorch_model.safetensors").touch()
    monkeypatch.setattr(convert_weights, "read_weights", lambda path: meta_weights(original_video_state(unet)))
    part = read_video_unet(tmp_path)
    assert part.model.config == unet.config and key_problems("unet", part) == []
    assert round(sum(math.prod(t.shape) for t in part.weights.values()) / 1e9, 2) == 4.21


# Errors: reported before anything is written.


def test_problems_are_reported_together_and_nothing_is_written(single_file, tmp_path):
    path, _, folder = single_file
    state = load_file(path)
    state["model.diffusion_model.extra.weight"] = torch.zeros(1)
    for key in [k for k in state if k.startswith("first_stage_model.decoder.")]:
        del state[key]
    state["conditioner.embedders.1.model.text_projection"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(ConversionError) as error:
        convert(tmp_path / "broken.safetensors", tmp_path / "out", tokenizers=folder, configs=folder)
    message = str(error.value)
    assert "1 unknown source keys: model.diffusion_model.extra.weight" in message
    assert re.search(r"vae: \d+ missing keys: (decoder\.\S+, ){5}\.\.\.", message)
    assert "text_encoder_2: 1 shape mismatches: conditioner.embedders.1.model.text_projection is (3, 3)" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors"]


BAD_ARGUMENTS = {  # name: (convert's arguments, from the fixtures' paths; what the error says)
    "single file without --tokenizers": (lambda folder, file: dict(source=file), "--tokenizers DIR"),
    "--tokenizers with a folder SRC": (lambda folder, file: dict(source=folder, tokenizers=folder),
                                       "for a single-file SRC only"),
    "bad --dtype": (lambda folder, file: dict(source=folder, dtype="fp64"), "--dtype must be one of"),
    "missing SRC": (lambda folder, file: dict(source=folder / "nothing"), "does not exist"),
    "SRC not safetensors": (lambda folder, file: dict(source=folder / "model_index.json"), "must be a .safetensors"),
    "OUT is SRC": (lambda folder, file: dict(source=folder, out=folder, overwrite=True), "is one of the inputs"),
}


@pytest.mark.parametrize("name", BAD_ARGUMENTS)
def test_bad_arguments_write_nothing(single_file, tmp_path, name):
    path, _, folder = single_file
    arguments, message = BAD_ARGUMENTS[name]
    with pytest.raises(ConversionError, match=message):
        convert(**{"out": tmp_path / "out", **arguments(folder, path)})
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_exit_with_a_message(single_file, tmp_path, capsys):
    path, _, folder = single_file
    with pytest.raises(SystemExit) as exit_:
        main([str(path), str(tmp_path / "out")])
    assert exit_.value.code == 1 and "error: a single-file SRC has no tokenizers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([str(folder), str(tmp_path / "out"), "--dtype", "fp64"])
    assert exit_.value.code == 2 and "--dtype" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


CONFIG_CHANGES = {
    "use_linear_projection": (False, "use_linear_projection=False \\(only True is supported\\)"),
    "made_up_setting": (1, "unknown key 'made_up_setting'"),
}


@pytest.mark.parametrize("key", CONFIG_CHANGES)
def test_unsupported_unet_config_is_refused(sdxl_folders, tmp_path, key):
    value, message = CONFIG_CHANGES[key]
    source = tmp_path / "sdxl"
    shutil.copytree(sdxl_folders["safetensors"][0], source)
    config = source / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {key: value}))
    with pytest.raises(ConversionError, match=message):
        convert(source, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["sdxl"]


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pickled_code_is_never_run(sdxl_folders, tmp_path):
    source = tmp_path / "sdxl"
    shutil.copytree(sdxl_folders["bin"][0], source)
    weights = source / "vae" / "diffusion_pytorch_model.bin"
    torch.save({**torch.load(weights, weights_only=True), "trap": RunsCodeWhenUnpickled(tmp_path / "ran")}, weights)
    with pytest.raises(ConversionError, match="holds more than tensors, which is not unpickled"):
        convert(source, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["sdxl"]


def test_existing_out_is_kept_unless_overwrite(sdxl_folders, tmp_path):
    """--overwrite replaces a checkpoint folder, or an empty folder, and only once the new one is complete."""
    folder, _ = sdxl_folders["safetensors"]
    out = tmp_path / "out"
    convert(folder, out, dtype="bf16")
    with pytest.raises(ConversionError, match="exists; pass --overwrite"):
        convert(folder, out)
    broken = tmp_path / "broken.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(1)}, broken)
    with pytest.raises(ConversionError, match="missing keys"):
        convert(broken, out, tokenizers=folder, configs=folder, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors", "out"]
    assert load_checkpoint_config(out)["provenance"]["dtype"] == "bfloat16"

    convert(folder, out, overwrite=True)
    assert load_checkpoint_config(out)["provenance"]["dtype"] == "float32"
    (tmp_path / "empty").mkdir()
    convert(folder, tmp_path / "empty", overwrite=True)
    assert (tmp_path / "empty" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors", "empty", "out"]


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` and the content of its files: to check that nothing changed."""
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() and not path.is_symlink() else None
            for path in sorted(folder.rglob("*"))}


PROTECTED_OUTS = {  # name: (arguments built under root from the SDXL folder, what the error says)
    "a user folder": (lambda root, sdxl: dict(source=sdxl, out=make_folder(root / "mine", "notes.txt")),
                      "not a folder that --overwrite may replace"),
    "a checkpoint folder with a user file": (
        lambda root, sdxl: dict(source=sdxl, out=make_folder(root / "mine", "notes.txt", checkpoint=True)),
        r"holds \['notes.txt'\]"),
    "a parent of SRC": (lambda root, sdxl: dict(source=copied(sdxl, root / "models" / "sdxl"), out=root / "models"),
                        "is inside OUT"),
    "a symbolic link to a parent of SRC": (
        lambda root, sdxl: dict(source=copied(sdxl, root / "models" / "sdxl"),
                                out=linked(root / "link", root / "models")),
        "is inside OUT"),
    "inside SRC": (lambda root, sdxl: dict(source=copied(sdxl, root / "sdxl"), out=root / "sdxl" / "converted"),
                   "is inside SRC"),
    "a parent of --video-unet": (
        lambda root, sdxl: dict(source=sdxl, video_unet=copied(FIXTURE / "unet", root / "models" / "unet"),
                                out=root / "models"), "--video-unet .* is inside OUT"),
    "a parent of --tokenizers": (
        lambda root, sdxl: dict(source=sdxl / "unet" / "diffusion_pytorch_model.safetensors",
                                tokenizers=copied(sdxl, root / "models" / "sdxl"), out=root / "models"),
        "--tokenizers .* is inside OUT"),
    "inside --configs": (
        lambda root, sdxl: dict(source=sdxl / "unet" / "diffusion_pytorch_model.safetensors", tokenizers=sdxl,
                                configs=copied(sdxl, root / "configs"), out=root / "configs" / "out"),
        "is inside --configs"),
    "a file": (lambda root, sdxl: dict(source=sdxl, out=make_file(root / "out")), "exists and is not a folder"),
}


def make_folder(folder: Path, name: str, checkpoint: bool = False) -> Path:
    folder.mkdir()
    (folder / name).write_text("keep me")
    if checkpoint:
        (folder / "config.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT}))
    return folder


def make_file(path: Path) -> Path:
    path.write_text("keep me")
    return path


def copied(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def linked(link: Path, target: Path) -> Path:
    link.symlink_to(target, target_is_directory=True)
    return link


@pytest.mark.parametrize("name", PROTECTED_OUTS)
def test_overwrite_never_replaces_what_is_not_a_checkpoint(sdxl_folders, tmp_path, name):
    """--overwrite refuses a user's folder, a folder holding an input, a folder inside an input, a file."""
    folder, _ = sdxl_folders["safetensors"]
    make_arguments, message = PROTECTED_OUTS[name]
    arguments = make_arguments(tmp_path, folder)
    before = tree(tmp_path)
    with pytest.raises(ConversionError, match=message) as error:
        convert(**arguments, overwrite=True)
    assert "\n" not in str(error.value)
    assert tree(tmp_path) == before


def test_converted_files_are_on_disk_before_they_are_moved_into_place(sdxl_folders, tmp_path, monkeypatch):
    """Every file and folder is synced in the staging folder, named with the process id; the parent
    of OUT after the rename."""
    folder, _ = sdxl_folders["safetensors"]
    synced = fsync_recorder(monkeypatch)
    convert(folder, tmp_path / "out")
    staging = tmp_path / f".out.{os.getpid()}.converting"
    in_staging = {staging / path.relative_to(tmp_path / "out") for path in (tmp_path / "out").rglob("*")}
    assert set(synced) >= {*in_staging, staging}
    assert synced[-1] == tmp_path


def finished_process_id() -> int:
    """The id of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_staging_folders_of_killed_conversions_are_removed(sdxl_folders, tmp_path, capsys):
    folder, _ = sdxl_folders["safetensors"]
    dead, alive = finished_process_id(), os.getppid()
    for name in (f".out.{dead}.converting", f".out.{dead}.previous", f".out.{alive}.converting",
                 f".other.{dead}.converting"):
        make_folder(tmp_path / name, "unet.safetensors")
    (tmp_path / "out").mkdir()
    convert(folder, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.{dead}.converting", f".out.{alive}.converting",
                                                            "out"]
    printed = capsys.readouterr().out
    for name in (f".out.{dead}.converting", f".out.{dead}.previous"):
        assert f"removed {tmp_path / name}, left by process {dead}, which is gone" in printed


def test_a_conversion_killed_between_its_renames_gives_out_back(sdxl_folders, tmp_path, capsys):
    """Killed after OUT became `.previous` and before the new folder took its place: the next run
    puts OUT back, and then keeps it unless --overwrite."""
    folder, _ = sdxl_folders["safetensors"]
    dead = finished_process_id()
    make_folder(tmp_path / f".out.{dead}.previous", "notes.txt", checkpoint=True)
    make_folder(tmp_path / f".out.{dead}.converting", "unet.safetensors")
    with pytest.raises(ConversionError, match="exists; pass --overwrite"):
        convert(folder, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"
    assert f"put {tmp_path / f'.out.{dead}.previous'} back as {tmp_path / 'out'}" in capsys.readouterr().out


DISK_FULL = {  # the file being written when the disk fills up: how that write fails
    "vae.safetensors": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    "config.json": OSError(errno.ENOSPC, "No space left on device"),
}


@pytest.mark.parametrize("name", DISK_FULL)
def test_disk_full_names_the_file_and_keeps_out(sdxl_folders, tmp_path, monkeypatch, capsys, name):
    folder, _ = sdxl_folders["safetensors"]
    out = tmp_path / "out"
    convert(folder, out)
    before = tree(tmp_path)
    save_file, write_text = checkpoint_files.save_file, Path.write_text

    def save_file_or_fail(tensors, path, *arguments, **keywords):
        if Path(path).name == name:
            raise DISK_FULL[name]
        return save_file(tensors, path, *arguments, **keywords)

    def write_text_or_fail(path, *arguments, **keywords):
        if path.name == name and path.parent.name.endswith(".converting"):
            raise DISK_FULL[name]
        return write_text(path, *arguments, **keywords)

    monkeypatch.setattr(checkpoint_files, "save_file", save_file_or_fail)
    monkeypatch.setattr(Path, "write_text", write_text_or_fail)
    with pytest.raises(SystemExit) as exit_:
        main([str(folder), str(out), "--overwrite"])
    error = capsys.readouterr().err.splitlines()[-1]  # after transformers' progress bars
    assert exit_.value.code == 1 and f"error: no space left on device while writing {out / name};" in error
    assert tree(tmp_path) == before


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


UNREADABLE_SOURCES = {  # name: (SDXL folder, file, what is done to it)
    "truncated safetensors": ("safetensors", "unet/diffusion_pytorch_model.safetensors", truncate),
    "safetensors header cut": ("safetensors", "vae/diffusion_pytorch_model.safetensors",
                               lambda path: path.write_bytes(path.read_bytes()[:5])),
    "truncated .bin": ("bin", "vae/diffusion_pytorch_model.bin", truncate),
    "truncated text encoder .bin": ("bin", "text_encoder_2/pytorch_model.bin", truncate),
    "shard index not JSON": ("sharded", "unet/diffusion_pytorch_model.safetensors.index.json",
                             lambda path: path.write_text("{")),
    "unet config not JSON": ("safetensors", "unet/config.json", lambda path: path.write_text('{"in_channels": ')),
    "unet config not an object": ("safetensors", "unet/config.json", lambda path: path.write_text("[4]")),
    "unet config wrong type": ("safetensors", "unet/config.json",
                               lambda path: path.write_text(json.dumps(
                                   json.loads(path.read_text()) | {"block_out_channels": "wide"}))),
    "vae config not JSON": ("safetensors", "vae/config.json", lambda path: path.write_text("")),
    "text encoder config not JSON": ("safetensors", "text_encoder/config.json", lambda path: path.write_text("{")),
}


@pytest.mark.parametrize("name", UNREADABLE_SOURCES)
def test_unreadable_source_file_is_named_and_nothing_is_written(sdxl_folders, tmp_path, name):
    variant, relative, change = UNREADABLE_SOURCES[name]
    source = copied(sdxl_folders[variant][0], tmp_path / "sdxl")
    change(source / relative)
    with pytest.raises(ConversionError, match=re.escape(str(source / relative))) as error:
        convert(source, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["sdxl"]


# LoRAs merged at conversion (tests/test_lora.py holds the LoRA formats themselves).


def test_lora_merged_at_conversion_equals_diffusers_fused_and_is_recorded(sdxl_folders, tmp_path):
    from formats.lora_files import file_sha256
    from test_lora import fuse, kohya_state

    folder, _ = sdxl_folders["safetensors"]
    reference = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32)
    lora = tmp_path / "style.safetensors"
    save_file(kohya_state(reference, "sgm", 5, "folded"), lora)  # alphas folded in: diffusers drops kohya's
    main([str(folder), str(tmp_path / "out"), "--lora", f"{lora}:0.6"])
    fuse(reference, lora, 0.6)
    ours = StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "out")
    for theirs, mine in [(reference.unet, ours.unet), (reference.text_encoder, ours.text_encoder.text_encoder),
                         (reference.text_encoder_2, ours.text_encoder.text_encoder_2)]:
        mine_state = mine.state_dict()
        assert max(max_difference(mine_state[key], value) for key, value in theirs.state_dict().items()) <= 1e-5
    assert ours.provenance["loras"] == [{"path": str(lora), "strength": 0.6, "sha256": file_sha256(lora)}]


def test_a_bad_lora_is_refused_before_anything_is_written(sdxl_folders, tmp_path, capsys):
    folder, _ = sdxl_folders["safetensors"]
    lora = tmp_path / "other.safetensors"
    save_file({"lora_unet_nowhere.lora_down.weight": torch.ones(2, 3), "lora_unet_nowhere.lora_up.weight": torch.ones(3, 2)},
              lora)
    refused = [([f"{lora}:0.5"], "2 keys match no module of the model .*lora_unet_nowhere.lora_down.weight"),
               ([f"{lora}:1@3"], "a conversion merges one strength"),
               ([str(tmp_path / "missing.safetensors")], "missing.safetensors: no such file"),
               ([str(tmp_path / "out" / "inside.safetensors")], "--lora .* is inside OUT")]
    for values, message in refused:
        with pytest.raises(SystemExit) as exit_:
            main([str(folder), str(tmp_path / "out"), *(f"--lora={value}" for value in values)])
        error = capsys.readouterr().err
        assert exit_.value.code == 1 and re.search(message, error) and error.count("\n") == 1, error
        assert sorted(p.name for p in tmp_path.iterdir()) == ["other.safetensors"]


def test_a_lora_making_absurd_weights_is_refused_and_nothing_is_written(sdxl_folders, tmp_path, capsys):
    """Issue 22 item 4: strength 1e30 (or 1e308) is beyond -10..10; an alpha of 1e30 makes weights of
    1e26, which no model holds; neither writes a checkpoint."""
    folder, _ = sdxl_folders["safetensors"]
    reference = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32)
    module = next(name for name, layer in reference.unet.named_modules() if name.endswith("attn1.to_k"))
    into = dict(reference.unet.named_modules())[module].weight.shape
    lora = tmp_path / "huge.safetensors"
    name = "lora_unet_" + module.replace(".", "_")
    save_file({f"{name}.lora_down.weight": torch.full((2, into[1]), 0.01),
               f"{name}.lora_up.weight": torch.full((into[0], 2), 0.01), f"{name}.alpha": torch.tensor(1e30)}, lora)
    for value, message in ((f"{lora}:1e30", "strengths must be finite numbers from -10 to 10"),
                           (f"{lora}:1e308", "from -10 to 10"), (f"{lora}:0.5", rf"{lora} at strength 0.5 \(alpha 1e\+30")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main([str(folder), str(tmp_path / "out"), "--lora", value])
        error = capsys.readouterr().err
        assert exit_.value.code == 1 and re.search(message, error) and error.count("\n") == 1, error
        assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.safetensors"]


@pytest.mark.parametrize("how", ["same path", "symbolic link", "hard link"])
def test_a_lora_given_twice_is_refused_as_sample_refuses_it(sdxl_folders, tmp_path, capsys, how):
    """Issue 22 item 5: the same file twice (links resolved) would merge twice; refused before any work."""
    from test_lora import kohya_state

    folder, _ = sdxl_folders["safetensors"]
    lora = tmp_path / "style.safetensors"
    save_file(kohya_state(StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32), "sgm", 5, "folded"), lora)
    again = {"same path": lora, "symbolic link": tmp_path / "link.safetensors", "hard link": tmp_path / "hard.safetensors"}[how]
    if how == "symbolic link":
        again.symlink_to(lora)
    elif how == "hard link":
        os.link(lora, again)
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(folder), str(tmp_path / "out"), "--lora", f"{lora}:0.5", "--lora", f"{again}:0.3"])
    error = capsys.readouterr().err
    assert exit_.value.code == 1 and "is given twice" in error and error.count("\n") == 1, error
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_nan_lora_is_refused_before_the_models_are_built(sdxl_folders, tmp_path, capsys, monkeypatch):
    """Issue 22 item 9: a LoRA holding NaN is named in one line before any model is built."""
    import convert_weights

    def no_building(*args, **kwargs):
        raise AssertionError("the models were built")

    folder, _ = sdxl_folders["safetensors"]
    reference = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32)
    lora = tmp_path / "nan.safetensors"
    state = {key: value.half() for key, value in kohya_state_of(reference).items()}
    first = next(key for key in state if key.endswith("lora_up.weight"))
    state[first][0, 0] = float("nan")
    save_file(state, lora)
    monkeypatch.setattr(convert_weights, "build", no_building)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(folder), str(tmp_path / "out"), "--lora", str(lora)])
    error = capsys.readouterr().err
    assert exit_.value.code == 1 and "non-finite" in error and str(lora) in error and error.count("\n") == 1, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]


def kohya_state_of(reference: StableDiffusionXLPipeline) -> dict:
    from test_lora import kohya_state

    return kohya_state(reference, "sgm", 5, "folded")


# FlowingFrames' refiner/ and the temporal depth per level.

REFINER_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "original-refiner-tiny"


@pytest.mark.parametrize("weights", ["bin", "safetensors"])
def test_release_refiner_converts_loads_and_reproduces_the_original_outputs(video_sdxl_folder, tmp_path, weights):
    """A release folder with the fixture's refiner/ (pickled as released, or as safetensors): the
    checkpoint stores it, the pipeline loads it and it computes what the original code computed; it
    survives a save; a folder without one loads with `pipeline.refiner` None."""
    from refiner import RefinerConfig

    release = release_folder(video_sdxl_folder, tmp_path)
    shutil.copytree(REFINER_FIXTURE / "refiner", release / "refiner")
    if weights == "safetensors":
        pickled = release / "refiner" / "diffusion_pytorch_model.bin"
        save_file(torch.load(pickled, weights_only=True), pickled.with_suffix(".safetensors"))
        pickled.unlink()
    provenance = convert(release, tmp_path / "out")
    assert provenance["refiner"] == str(release / "refiner" / f"diffusion_pytorch_model.{weights}")
    assert (tmp_path / "out" / "refiner.safetensors").is_file()
    ours = StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "out")
    assert ours.refiner.config == RefinerConfig(inner_channels=64, spatial_heads=2, spatial_head_dim=16,
                                                spatial_layers=2, temporal_heads=2, temporal_head_dim=16,
                                                temporal_layers=2)
    io = load_file(REFINER_FIXTURE / "reference_io.safetensors")
    with torch.no_grad():
        assert max_difference(ours.refiner(io["latents"]), io["expected"]) <= 3e-5  # the fixture README's
    ours.save_pretrained(tmp_path / "saved")
    assert_same_tensors(StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "saved").refiner.state_dict(),
                        ours.refiner.state_dict())
    (tmp_path / "saved" / "refiner.safetensors").unlink()
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'saved' / 'refiner.safetensors'} is missing")):
        StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "saved")
    if weights == "bin":
        shutil.rmtree(release / "refiner")
        convert(release, tmp_path / "without")
        assert StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "without").refiner is None
        assert not (tmp_path / "without" / "refiner.safetensors").exists()


def video_unet_with_temporal_depths(depths: list[int], tmp_path: Path) -> tuple[UNet, Path]:
    """A video UNet in the original layout whose temporal transformers have depths[level] blocks
    (the mid block the last entry's), written with `temporal_layers_per_block` = depths."""
    torch.manual_seed(0)
    unet = perturbed(UNet(dataclasses.replace(VIDEO_UNET_CONFIG, temporal_layers=max(depths), groupnorm_scope="chunk")))
    levels = len(depths)
    places = {**{f"down_blocks.{level}.": depths[level] for level in range(levels)},
              **{f"up_blocks.{levels - 1 - level}.": depths[level] for level in range(levels)},
              "mid_block.": depths[-1]}
    state = {key: value for key, value in original_video_state(unet).items()
             if not (match := re.match(r"(\w+\.(?:\d+\.)?)temp_attentions\.\d+\.transformer_blocks\.(\d+)\.", key))
             or int(match[2]) < places[match[1]]}
    folder = write_video_unet(state, unet.config, tmp_path / "video")
    values = json.loads((folder / "config.json").read_text()) | {"temporal_layers_per_block": depths}
    (folder / "config.json").write_text(json.dumps(values))
    return unet, folder


def test_the_release_temporal_depth_per_level_loads(video_sdxl_folder, tmp_path):
    """temporal_layers_per_block [2, 2, 2], the release's: one depth, loaded tensor for tensor."""
    unet, folder = video_unet_with_temporal_depths([2, 2, 2], tmp_path)
    convert(video_sdxl_folder, tmp_path / "out", video_unet=folder)
    ours = StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "out")
    assert ours.unet.config.temporal_layers == 2
    assert_same_tensors(ours.unet.state_dict(), unet.state_dict())


def test_a_temporal_depth_that_differs_per_level_is_refused_in_one_line(video_sdxl_folder, tmp_path, capsys):
    """[2, 1, 2]: level 1 has one block, level 2 and the mid block two; UNetConfig has one depth."""
    _, folder = video_unet_with_temporal_depths([2, 1, 2], tmp_path)
    with pytest.raises(SystemExit):
        main([str(video_sdxl_folder), str(tmp_path / "out"), "--video-unet", str(folder)])
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "missing keys" not in error
    assert (f"{folder / 'diffusion_pytorch_model.safetensors'}: temporal_layers_per_block differs per level, which "
            "is not supported (temporal blocks at level 1: 1, level 2: 2, mid block: 2)") in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video"]


def test_a_release_converts_with_its_own_scheduler_and_samples_with_the_published_recipe(video_sdxl_folder, tmp_path):
    """The release's scheduler config is read (its betas), with the two overrides of its run.py
    (trailing timesteps, SDE DPM-Solver++); with a refiner, the stored defaults are the published
    recipe, which sample.py then runs by default (refiner on, 7 frames skipped, its negative prompt)."""
    import json

    import sample
    from convert_weights import SCHEDULES
    from video_settings import RECIPES

    release = release_folder(video_sdxl_folder, tmp_path)
    shutil.copytree(REFINER_FIXTURE / "refiner", release / "refiner")
    config_file = release / "scheduler" / "scheduler_config.json"
    released = {**json.loads(config_file.read_text()), "beta_start": 0.00085, "beta_end": 0.012,
                "timestep_spacing": "leading", "algorithm_type": "dpmsolver++"}
    config_file.write_text(json.dumps(released))
    provenance = convert(release, tmp_path / "out")
    stored = json.loads((tmp_path / "out" / "config.json").read_text())
    assert SchedulerConfig.from_dict(stored["scheduler"]) == SchedulerConfig(
        beta_start=0.00085, beta_end=0.012, beta_schedule=released["beta_schedule"], algorithm_type="sde-dpmsolver++",
        timestep_spacing="trailing", steps_offset=released["steps_offset"], prediction_type=released["prediction_type"])
    assert provenance["scheduler"] == SCHEDULES["release"]
    assert stored["sample_defaults"] == {name: value for name, value in RECIPES["flowingframes"].items() if value is not None}
    out = tmp_path / "frames"
    sample.main(["--model", str(tmp_path / "out"), "--prompt", "a red circle", "--steps", "1", "--height", "32",
                 "--width", "32", "--chunks", "3", "--out", f"{out}/"])
    settings = torch.load(f"{out}.state.pt", weights_only=True)["settings"]
    assert (settings["refiner"], settings["skip_frames"], settings["frames"], settings["context_frames"],
            settings["guidance"], settings["negative_prompt"]) == (True, 7, 6, 4, 12.0, "low quality, grainy, bad textures")
    assert len(list(out.glob("*.png"))) == 3 * 6 - 7

    config_file.unlink()
    convert(release, tmp_path / "no-scheduler")  # the original video model's schedule, then
    assert json.loads((tmp_path / "no-scheduler" / "config.json").read_text())["scheduler"] == \
        SchedulerConfig.video_model().to_dict()
    with pytest.raises(ConversionError, match=r"--schedule release: .* has no scheduler/scheduler_config.json"):
        convert(release, tmp_path / "refused", schedule="release")


# Review findings: a pickle of no state dict, --schedule release refused before the weights, legacy .bin files.


NOT_STATE_DICTS = {  # what a pickled --unet FILE holds: the one line that names it
    "int keys": ({1: torch.ones(2)}, "it holds 1 (int) -> Tensor"),
    "a list": ([torch.ones(2)], "it holds a list"),
    "a number for a tensor": ({"conv_in.weight": 3}, "it holds 'conv_in.weight' (str) -> int"),
}


@pytest.mark.parametrize("name", NOT_STATE_DICTS)
def test_a_pickle_of_no_state_dict_is_one_line_naming_the_file(sdxl_folders, tmp_path, capsys, name):
    """Review finding 2: `--unet intkeys.bin` ({1: tensor}) ended in a TypeError traceback."""
    folder, _ = sdxl_folders["safetensors"]
    state, reason = NOT_STATE_DICTS[name]
    unet_file = tmp_path / "intkeys.bin"
    torch.save(state, unet_file)
    with pytest.raises(SystemExit) as exit_:
        main([str(folder), str(tmp_path / "out"), "--unet", str(unet_file)])
    error = capsys.readouterr().err
    assert exit_.value.code == 1 and error.count("\n") == 1, error
    assert error.endswith(f"error: {unet_file} is not a state dict (tensors by name): {reason}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["intkeys.bin"]


def no_weights_read(path):
    raise AssertionError(f"weights were read: {path}")


SCHEDULER_BREAKAGES = {  # what is done to the release's scheduler config: the message
    "missing": (lambda path: path.unlink(), "--schedule release: .* has no scheduler/scheduler_config.json"),
    "a setting not implemented": (lambda path: path.write_text(json.dumps(
        json.loads(path.read_text()) | {"use_karras_sigmas": True})), "use_karras_sigmas=True is not supported"),
    "a value of the wrong type": (lambda path: path.write_text(json.dumps(
        json.loads(path.read_text()) | {"beta_start": "low"})), "scheduler_config.json: "),
    "not JSON": (lambda path: path.write_text("{"), "scheduler_config.json is not valid JSON"),
}


@pytest.mark.parametrize("breakage", SCHEDULER_BREAKAGES)
def test_a_release_schedule_that_cannot_be_had_is_refused_before_any_weight_is_read(
        video_sdxl_folder, tmp_path, monkeypatch, breakage):
    """Review finding 14: `--schedule release` without the release's scheduler config, or with one
    that cannot be read, is refused in step 1, before a weight file is opened."""
    change, message = SCHEDULER_BREAKAGES[breakage]
    release = release_folder(video_sdxl_folder, tmp_path)
    change(release / "scheduler" / "scheduler_config.json")
    monkeypatch.setattr(convert_weights, "read_weights", no_weights_read)
    with pytest.raises(ConversionError, match=message) as error:
        convert(release, tmp_path / "out", schedule="release")
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_a_release_whose_own_scheduler_config_is_bad_is_refused_before_the_models_are_built(
        video_sdxl_folder, tmp_path, monkeypatch):
    """The release's schedule by default (a video UNet and a scheduler config): a config it cannot
    read is refused once the weights' names and shapes are checked, before any tensor is read."""
    release = release_folder(video_sdxl_folder, tmp_path)
    config_file = release / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"use_karras_sigmas": True}))
    monkeypatch.setattr(convert_weights, "build", lambda *args: pytest.fail("the models were built"))
    with pytest.raises(ConversionError, match=re.escape(f"{config_file}: use_karras_sigmas=True is not supported")):
        convert(release, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def save_legacy(path: Path) -> dict:
    """Re-save a torch.save zip file in the legacy (non-zip) format, as torch before 1.6 wrote it; its state."""
    state = torch.load(path, weights_only=True)
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert not path.read_bytes().startswith(b"PK")
    return state


def test_a_legacy_non_zip_bin_converts_and_a_broken_one_is_one_line(sdxl_folders, tmp_path):
    """Review finding 15a: torch cannot memory-map the legacy format; such a file is read whole,
    weights_only, and gives the tensors torch.load gives; a truncated one is named in one line."""
    source = copied(sdxl_folders["bin"][0], tmp_path / "sdxl")
    unet = save_legacy(source / "unet" / "diffusion_pytorch_model.bin")
    vae = save_legacy(source / "vae" / "diffusion_pytorch_model.bin")
    convert(source, tmp_path / "out")
    stored_unet = load_file(tmp_path / "out" / "unet.safetensors")
    assert_same_tensors({key: stored_unet[key] for key in unet}, unet)
    assert_same_tensors(load_file(tmp_path / "out" / "vae.safetensors"), vae)

    weights = source / "vae" / "diffusion_pytorch_model.bin"
    truncate(weights)
    with pytest.raises(ConversionError) as error:
        convert(source, tmp_path / "refused")
    assert re.fullmatch(rf"{re.escape(str(weights))} is not in torch.save's zip format, and cannot be read as a "
                        r"legacy \(non-zip\) torch file either \(\w+: [^\n]+\); is it truncated\?", str(error.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sdxl"]


def test_a_legacy_bin_holding_code_is_refused_without_running_it(sdxl_folders, tmp_path):
    source = copied(sdxl_folders["bin"][0], tmp_path / "sdxl")
    weights = source / "vae" / "diffusion_pytorch_model.bin"
    trap = {**torch.load(weights, weights_only=True), "trap": RunsCodeWhenUnpickled(tmp_path / "ran")}
    torch.save(trap, weights, _use_new_zipfile_serialization=False)
    with pytest.raises(ConversionError, match=f"{re.escape(str(weights))} holds more than tensors, which is not "
                                              "unpickled: Unsupported global") as error:
        convert(source, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sdxl"]
