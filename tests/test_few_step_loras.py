"""Few-step SDXL models (issue 24): their LoRA files and UNet-alone files against diffusers.

Each file is written here, small and random, in the key layout it is published in
(docs/convert.md, "Few-step SDXL models", names the sources):
- LCM-LoRA SDXL and DMD2's LoRA: kohya-ss keys with diffusers' module names
  (`lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight`, `.lora_up.weight`, `.alpha` = 8,
  PEFT's default lora_alpha), float16 throughout, the UNet only, over the 14 module kinds their
  training scripts adapt: 3x3 convolutions, down- and upsamplers and time_emb_proj included;
- the layouts the other few-step LoRAs (SDXL-Lightning's, Hyper-SD's) may hold, which we could not
  read here: kohya-ss keys with the original layout's names (sd-scripts',
  `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), with and without alphas (without:
  alpha = rank), and PEFT's (`unet.<module>.lora_A.weight`) without alphas or metadata, as diffusers'
  training scripts saved LCM-LoRAs;
- UNet-alone files: SDXL-Lightning's (`sdxl_lightning_4step_unet.safetensors`, a
  UNet2DConditionModel's state dict, float16 here), DMD2's (`dmd2_sdxl_4step_unet_fp16.bin`, the
  same through torch.save), and the original layout's names, with and without `model.diffusion_model.`.

The oracle is diffusers' StableDiffusionXLPipeline as the models' cards run it: the LoRA loaded with
`load_lora_weights` and fused, or the UNet loaded with `load_state_dict`; SDXL's own scheduler config
with EulerDiscreteScheduler at trailing timesteps, 4 steps, guidance 0 (one pass; SDXL-Lightning's),
LCMScheduler at 4 steps, guidance 1.5 (LCM-LoRA's) or at 999, 749, 499, 249, guidance 0 (DMD2's),
and DDIMScheduler at trailing timesteps (Hyper-SD's N-step LoRAs). Our side samples with the
schedule `convert_weights.py --schedule sdxl` stores. Then `--unet` files that do not fit are
refused in one line.
"""

import dataclasses
import json

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, StableDiffusionXLPipeline
from diffusers.schedulers import scheduling_lcm
from safetensors.torch import load_file, save_file
from torch import nn

from convert_weights import SDXL_CONFIGS, ConversionError, convert, main, stored_schedule
from infra.checkpoint import load_checkpoint_config
from pipeline import StableDiffusionXLVideoPipeline
from scheduler import SchedulerConfig, vp_coefficients
from test_convert_weights import original_unet_key
from tiny_pipeline import UNET_CONFIG, diffusers_tiny_pipeline, diffusers_unet, ours_from_diffusers, perturbed

PROMPT = "a red circle moving left"
HEIGHT, WIDTH = 64, 48  # latents 8 x 6
STEPS = 4  # trailing: timesteps 999, 749, 499, 249, as DMD2's card gives them
BUILD_CONFIG = dataclasses.replace(SchedulerConfig.sdxl_base(), timestep_spacing="trailing")  # builds the pipelines
# The modules LCM-LoRA's and DMD2's training scripts adapt (PEFT's target_modules: a module whose
# name ends with one of these at a dot).
DISTILLATION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                        "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
RANK = 4


def diffusers_euler_trailing() -> EulerDiscreteScheduler:
    """SDXL-Lightning's card: SDXL's own scheduler config, Euler, trailing timesteps."""
    config = json.loads((SDXL_CONFIGS / "scheduler" / "scheduler_config.json").read_text())
    return EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")


def diffusers_lcm() -> LCMScheduler:
    """LCM-LoRA's and DMD2's cards: LCMScheduler from SDXL's own scheduler config."""
    config = json.loads((SDXL_CONFIGS / "scheduler" / "scheduler_config.json").read_text())
    return LCMScheduler.from_config(config)


@pytest.fixture
def float32_noise(monkeypatch):
    """diffusers' LCMScheduler draws its noise as our pipeline does: in float32 from the generator,
    then cast (in float64 it would draw other numbers)."""
    def draw(shape, generator=None, device=None, dtype=None, **_):
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)

    monkeypatch.setattr(scheduling_lcm, "randn_tensor", draw)


def latents_both_ways(reference: StableDiffusionXLPipeline, ours: StableDiffusionXLVideoPipeline, sampler=None,
                      guidance: float = 0.0, timesteps: list[int] | None = None):
    """Both pipelines' latents (1, 4, 8, 6) after STEPS steps (or at `timesteps`) from the same start
    and noise, diffusers' with the scheduler it holds, ours with `sampler` (None: its config's).
    Our latents are variance preserving, x / sqrt(1 + sigma**2) in k-diffusion's x, where diffusers'
    Euler works; it scales given latents by its init_noise_sigma, which with trailing spacing is
    sigma_max alone (a shortcut of diffusers'), so it is given ours times sqrt(1 + sigma_max**2) /
    sigma_max: the same x. LCM works on variance-preserving latents, as ours."""
    start = torch.randn(1, 4, 1, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(3), dtype=ours.dtype)
    steps = None if timesteps else STEPS
    theirs_start = start[:, :, 0]
    if isinstance(reference.scheduler, EulerDiscreteScheduler):
        reference.scheduler.set_timesteps(steps, timesteps=timesteps)
        sigma_max = float(reference.scheduler.sigmas[0])
        theirs_start = theirs_start / vp_coefficients(sigma_max)[0] / sigma_max
    arguments = dict(height=HEIGHT, width=WIDTH, num_inference_steps=steps, timesteps=timesteps,
                     guidance_scale=guidance, output_type="latent")
    theirs = reference(PROMPT, latents=theirs_start, generator=torch.Generator().manual_seed(7), **arguments).images
    mine = ours(PROMPT, num_frames=1, latents=start, generator=torch.Generator().manual_seed(7), sampler=sampler,
                **arguments)
    return theirs, mine[:, :, 0]


def assert_close(theirs: torch.Tensor, mine: torch.Tensor) -> None:
    """Within 1e-6 of the latents' size (about 50 here): in float64 our sampler steps still run in
    float32, and so do diffusers' Euler steps, which leaves up to 1.9e-7."""
    assert (theirs - mine).abs().max() <= 1e-6 * theirs.abs().max()


# 1. LoRA files, written from diffusers' module names independently of formats/lora_files.py.


def adapted_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """The UNet's layers that DISTILLATION_TARGETS name: linear layers, 1x1 and 3x3 convolutions."""
    return {name: layer for name, layer in unet.named_modules() if isinstance(layer, (nn.Linear, nn.Conv2d))
            and any(name == target or name.endswith("." + target) for target in DISTILLATION_TARGETS)}


def original_name(key: str) -> str:
    """A key of the tiny UNet in diffusers' names -> the original layout's (test_convert_weights')."""
    per_level = UNET_CONFIG.layers_per_block + 1
    attention_levels = {i for i, depth in enumerate(reversed(UNET_CONFIG.transformer_layers_per_block)) if depth}
    return original_unet_key(key, per_level, attention_levels)


def kohya_name(module: str, naming: str) -> str:
    """`lora_unet_` and the module's dotted name with underscores, in diffusers' or the original names."""
    name = module if naming == "diffusers" else original_name(module + ".weight").removesuffix(".weight")
    return "lora_unet_" + name.replace(".", "_")


def lora_file(unet: nn.Module, layout: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A random LoRA of the adapted layers in `layout`: "kohya-diffusers", "kohya-sgm" (alpha 8, as
    LCM-LoRA's and DMD2's), "kohya-sgm-no-alpha" or "peft-no-alpha" (alpha = rank)."""
    generator = torch.Generator().manual_seed(11)
    state = {}
    for module, layer in adapted_layers(unet).items():
        out, into, *kernel = layer.weight.shape
        down = 0.1 * torch.randn(RANK, into, *kernel, generator=generator)  # (rank, in[, kh, kw])
        up = 0.1 * torch.randn(out, RANK, *([1, 1] if kernel else []), generator=generator)  # (out, rank[, 1, 1])
        if layout == "peft-no-alpha":
            state |= {f"unet.{module}.lora_A.weight": down, f"unet.{module}.lora_B.weight": up}
            continue
        name = kohya_name(module, "diffusers" if layout == "kohya-diffusers" else "sgm")
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        if not layout.endswith("no-alpha"):
            state[f"{name}.alpha"] = torch.tensor(8.0)
    return {key: value.to(dtype) for key, value in state.items()}


LORA_LAYOUTS = {  # name: (layout, dtype)
    "lcm-lora-sdxl and dmd2 (kohya-ss, diffusers' names, float16)": ("kohya-diffusers", torch.float16),
    "kohya-ss, the original names": ("kohya-sgm", torch.float16),
    "kohya-ss, the original names, no alphas": ("kohya-sgm-no-alpha", torch.float32),
    "PEFT, no alphas": ("peft-no-alpha", torch.float32),
}


def pipelines(folder):
    """diffusers' tiny SDXL with the Euler of the cards, and ours with the same weights, in float64."""
    reference = diffusers_tiny_pipeline(folder, BUILD_CONFIG)
    reference.scheduler = diffusers_euler_trailing()
    for encoder in (reference.text_encoder, reference.text_encoder_2):
        encoder.set_attn_implementation("sdpa")  # as ours (text.ATTENTION)
    ours = ours_from_diffusers(diffusers_tiny_pipeline(folder, BUILD_CONFIG), stored_schedule("sdxl"))
    return reference.to(torch.float64), ours.to(dtype=torch.float64)


def load_in_both(reference: StableDiffusionXLPipeline, ours: StableDiffusionXLVideoPipeline, state: dict,
                 folder) -> None:
    """The LoRA `state`, saved in `folder`, fused into diffusers' pipeline and merged into ours at strength 1."""
    save_file(state, folder / "lora.safetensors")
    reference.load_lora_weights(folder, weight_name="lora.safetensors")
    reference.fuse_lora()
    reference.unload_lora_weights()  # the fused weights stay
    ours.load_loras([str(folder / "lora.safetensors")], [1.0])


@pytest.mark.parametrize("name", LORA_LAYOUTS)
def test_lora_layouts_sample_as_diffusers_in_four_steps(tmp_path, name):
    layout, dtype = LORA_LAYOUTS[name]
    reference, ours = pipelines(tmp_path)
    plain, _ = latents_both_ways(reference, ours)
    load_in_both(reference, ours, lora_file(reference.unet, layout, dtype), tmp_path)
    loaded = ours.loras.updates[0]
    assert len(loaded) == len(adapted_layers(reference.unet)) and {c for c, _ in loaded} == {"unet"}
    mine = ours.unet.state_dict()
    assert max((mine[key] - value).abs().max().item() for key, value in reference.unet.state_dict().items()) <= 1e-6
    theirs, mine = latents_both_ways(reference, ours)
    assert_close(theirs, mine)
    assert (theirs - plain).abs().max() > 1e-2  # the LoRA changed the latents: the test is not vacuous


@pytest.mark.parametrize("guidance, timesteps", [
    (1.5, None),  # LCM-LoRA's card: LCM, 4 steps, guidance 1 to 2 (two passes above 1)
    (0.0, [999, 749, 499, 249]),  # DMD2's LoRA card: LCM at these timesteps, guidance 0
])
def test_lcm_and_dmd2_loras_sample_as_diffusers_with_lcm(tmp_path, float32_noise, guidance, timesteps):
    reference, ours = pipelines(tmp_path)
    reference.scheduler = diffusers_lcm()
    plain, _ = latents_both_ways(reference, ours, "lcm", guidance, timesteps)
    load_in_both(reference, ours, lora_file(reference.unet, "kohya-diffusers", torch.float16), tmp_path)
    theirs, mine = latents_both_ways(reference, ours, "lcm", guidance, timesteps)
    assert_close(theirs, mine)
    assert (theirs - plain).abs().max() > 1e-2


def test_euler_at_trailing_timesteps_is_the_ddim_of_hyper_sds_cards(tmp_path):
    """Hyper-SD's N-step LoRAs run with DDIM at trailing timesteps, guidance 0. A deterministic DDIM
    step is an Euler step in x = sample / alpha_t, so ours equals it to the last step, where DDIM
    with SDXL's set_alpha_to_one false stops at timestep 0's noise level (sigma 0.029), not at 0:
    with set_alpha_to_one true the two runs agree."""
    reference, ours = pipelines(tmp_path)
    config = json.loads((SDXL_CONFIGS / "scheduler" / "scheduler_config.json").read_text())
    reference.scheduler = DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True)
    load_in_both(reference, ours, lora_file(reference.unet, "kohya-sgm", torch.float16), tmp_path)
    theirs, mine = latents_both_ways(reference, ours, "euler")  # Hyper-SDXL-4steps-lora's run
    assert_close(theirs, mine)


# 2. UNet-alone files, through convert_weights.py.


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """An SDXL folder saved by diffusers, and a second ("distilled") UNet of its config in every
    UNet-alone layout: {layout: path}, and the UNet's state dict in float16."""
    root = tmp_path_factory.mktemp("few-step")
    diffusers_tiny_pipeline(root / "tokenizer-files", BUILD_CONFIG).save_pretrained(root / "sdxl")
    torch.manual_seed(5)
    state = {key: value.half() for key, value in perturbed(diffusers_unet(UNET_CONFIG), scale=0.1).state_dict().items()}
    original = {original_name(key): value for key, value in state.items()}
    files = {"lightning": root / "sdxl_lightning_4step_unet.safetensors",
             "dmd2": root / "dmd2_sdxl_4step_unet_fp16.bin", "original": root / "unet-original.safetensors",
             "original-bare": root / "unet-comfyui.safetensors"}
    save_file(state, files["lightning"])
    torch.save(state, files["dmd2"])
    save_file({f"model.diffusion_model.{key}": value for key, value in original.items()}, files["original"])
    save_file(original, files["original-bare"])
    return root / "sdxl", files, state


@pytest.mark.parametrize("layout", ["lightning", "dmd2", "original", "original-bare"])
def test_a_unet_alone_replaces_the_sources_unet(sources, tmp_path, layout):
    sdxl, files, state = sources
    provenance = convert(sdxl, tmp_path / "out", unet_file=files[layout], schedule="sdxl")
    ours = StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "out")
    converted = ours.unet.state_dict()
    assert all(torch.equal(converted[key], value.float()) for key, value in state.items())
    assert {key for key in converted if key not in state} == {key for key in converted if ".temp_" in key}
    assert provenance["unet"].startswith(str(files[layout])) and provenance["unet_temporal"].startswith("fresh")
    assert ours.scheduler_config == stored_schedule("sdxl")
    assert load_checkpoint_config(tmp_path / "out")["provenance"]["scheduler"].startswith("SDXL base 1.0's schedule")


@pytest.mark.parametrize("layout", ["lightning", "dmd2"])
@torch.no_grad()
def test_a_converted_few_step_unet_samples_as_diffusers_in_four_steps(sources, tmp_path, float32_noise, layout):
    """The cards' runs: the UNet loaded into SDXL with `load_state_dict`, then SDXL-Lightning's Euler,
    trailing, 4 steps, or DMD2's LCM at 999, 749, 499, 249; guidance 0."""
    sdxl, files, _ = sources
    main([str(sdxl), str(tmp_path / "out"), "--unet", str(files[layout]), "--schedule", "sdxl"])
    ours = StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "out").to(dtype=torch.float64)
    reference = StableDiffusionXLPipeline.from_pretrained(sdxl, dtype=torch.float32)
    state = load_file(files[layout]) if layout == "lightning" else torch.load(files[layout], weights_only=True)
    reference.unet.load_state_dict(state)
    reference.scheduler = diffusers_euler_trailing() if layout == "lightning" else diffusers_lcm()
    for encoder in (reference.text_encoder, reference.text_encoder_2):
        encoder.set_attn_implementation("sdpa")
    recipe = dict(sampler="lcm", timesteps=[999, 749, 499, 249]) if layout == "dmd2" else {}
    theirs, mine = latents_both_ways(reference.to(torch.float64), ours, **recipe)
    assert_close(theirs, mine)


# 3. Bad input: one line naming the option, nothing written.


def written(folder, name: str, state: dict) -> str:
    save_file(state, folder / name)
    return str(folder / name)


def lora_alone(files: dict, folder) -> str:
    return written(folder, "lora.safetensors", {"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
                                                "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1)})


def whole_checkpoint(files: dict, folder) -> str:
    vae_key = {"first_stage_model.encoder.conv_in.weight": torch.zeros(1)}
    return written(folder, "whole.safetensors", {**load_file(files["original"]), **vae_key})


def video_unet(files: dict, folder) -> str:
    temporal_key = {"down_blocks.1.temp_attentions.0.proj_in.weight": torch.zeros(1)}
    return written(folder, "video.safetensors", {**load_file(files["lightning"]), **temporal_key})


BAD_UNETS = {  # name: (arguments after SRC OUT, from the sources' files and a folder; what the error says)
    "missing": (lambda files, folder: ["--unet", str(folder / "none.safetensors")], "none.safetensors is not a file"),
    "not a weight file": (lambda files, folder: ["--unet", str(SDXL_CONFIGS / "README.md")], "must be a .safetensors"),
    "with --video-unet": (lambda files, folder: ["--unet", str(files["lightning"]), "--video-unet", str(folder)],
                          "--unet and --video-unet each give the whole UNet"),
    "a LoRA": (lambda files, folder: ["--unet", lora_alone(files, folder)], "holds no SDXL UNet"),
    "a whole checkpoint": (lambda files, folder: ["--unet", whole_checkpoint(files, folder)],
                           "is a whole single-file checkpoint"),
    "a video UNet": (lambda files, folder: ["--unet", video_unet(files, folder)], "give its folder with --video-unet"),
}


@pytest.mark.parametrize("name", BAD_UNETS)
def test_a_bad_unet_file_is_refused_in_one_line_and_nothing_is_written(sources, tmp_path, capsys, name):
    sdxl, files, _ = sources
    arguments, message = BAD_UNETS[name]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    with pytest.raises(SystemExit) as exit_:
        main([str(sdxl), str(tmp_path / "out"), *arguments(files, inputs)])
    error = capsys.readouterr().err
    assert exit_.value.code == 1 and message in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_unet_of_another_size_is_refused_naming_its_keys(sources, tmp_path):
    sdxl, files, state = sources
    state = {**state, "conv_in.weight": torch.zeros(7, 4, 3, 3)}
    save_file(state, tmp_path / "other.safetensors")
    with pytest.raises(ConversionError, match=r"unet: 1 shape mismatches: conv_in.weight is \(7, 4, 3, 3\)"):
        convert(sdxl, tmp_path / "out", unet_file=tmp_path / "other.safetensors")
    assert not (tmp_path / "out").exists()
