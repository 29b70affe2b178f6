"""LoRA files (formats/lora_files.py, formats/lora.py) against diffusers' own loader, and on the video timeline.

- kohya-ss files in both UNet namings (the original SDXL layout, as sd-scripts trains, and
  diffusers'), LoCon 3x3 convolutions included, and PEFT / diffusers files written by diffusers
  itself: the merged weights and the sampled latents equal diffusers' `load_lora_weights` +
  `fuse_lora` on the same tiny SDXL UNet and text encoders; two LoRAs add as diffusers adds them.
- Strength 0 changes no bit and makes the frames of no LoRA; strengths changed and back, or
  removed, give the original weights bit for bit.
- Bad files (missing, not safetensors, not a LoRA, LoHa/LoKr/DoRA, keys matching no module, shapes
  that do not fit) are refused before the model is loaded, in one line naming what is wrong.
- Strengths on the timeline: pure at their places, blended between, resumed exactly.
"""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

import endless
from formats import lora_files
import sample
from formats.lora import model_layers, pipeline_models
from pipeline import StableDiffusionXLVideoPipeline
from scheduler import SchedulerConfig
from test_convert_weights import original_unet_key
from tiny_pipeline import UNET_CONFIG, diffusers_tiny_pipeline, ours_from_diffusers

SCHEDULER = dataclasses.replace(SchedulerConfig.sdxl_base(), timestep_spacing="trailing")  # no SDE noise
PROMPT, NEGATIVE = "a red circle moving left", "blue square"
HEIGHT, WIDTH = 64, 48  # latents 8 x 6
SIZE = ["--height", "32", "--width", "48"]
FAST = ["--steps", "2", "--frames", "2", "--context-frames", "1", *SIZE]


# Files written here from diffusers' module names, independently of formats/lora_files.py.


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}


def legacy_text_name(name: str) -> str:
    """transformers' CLIP module name as LoRA files write it (with `text_model.`)."""
    return name if name.startswith("text_model.") or name == "text_projection" else "text_model." + name


def kohya_unet_name(name: str, naming: str) -> str:
    if naming == "peft":
        return "unet." + name
    if naming == "diffusers":
        return "lora_unet_" + name.replace(".", "_")
    per_level = UNET_CONFIG.layers_per_block + 1
    attention_levels = {i for i, depth in enumerate(reversed(UNET_CONFIG.transformer_layers_per_block)) if depth}
    return "lora_unet_" + original_unet_key(name + ".weight", per_level, attention_levels).removesuffix(".weight").replace(".", "_")


def kohya_state(reference: StableDiffusionXLPipeline, naming: str, seed: int, alphas: str, rank: int = 3) -> dict:
    """A kohya-ss LoRA of every linear and convolution layer of the UNet (3x3 ones as LoCon) and of
    both text encoders, random. `naming` "sgm" or "diffusers" for the UNet's, or "peft": the same
    LoRA in PEFT's names with `.alpha` keys. `alphas`: "uniform" (1.5 everywhere), "varying" (1 to 5,
    as LoCon's conv_alpha differs from network_alpha) or "folded" (the varying ones multiplied into
    the up weights, alpha = rank: the same LoRA for a loader that ignores per-module alphas)."""
    generator = torch.Generator().manual_seed(seed)
    random = lambda *shape: 0.1 * torch.randn(shape, generator=generator)
    modules = {kohya_unet_name(n, naming): m for n, m in linear_layers(reference.unet).items()
               if naming != "diffusers" or not n.startswith("add_embedding.")}  # diffusers drops lora_unet_add_embedding_*
    for prefix, encoder in (("lora_te1_", reference.text_encoder), ("lora_te2_", reference.text_encoder_2)):
        if naming == "peft":
            prefix = "text_encoder." if prefix == "lora_te1_" else "text_encoder_2."
            modules |= {prefix + legacy_text_name(n): m for n, m in linear_layers(encoder).items()}
        else:
            modules |= {prefix + legacy_text_name(n).replace(".", "_"): m for n, m in linear_layers(encoder).items()}
    down, up = ("lora_A", "lora_B") if naming == "peft" else ("lora_down", "lora_up")
    state = {}
    for name, module in modules.items():
        out, into, *kernel = module.weight.shape
        alpha = 1.5 if alphas == "uniform" else float(1 + len(state) % 5)
        state[f"{name}.{down}.weight"] = random(rank, into, *kernel)  # (rank, in[, kh, kw])
        state[f"{name}.{up}.weight"] = random(out, rank, *([1, 1] if kernel else []))  # (out, rank[, 1, 1])
        if alphas == "folded":
            state[f"{name}.{up}.weight"] *= alpha / rank
        state[f"{name}.alpha"] = torch.tensor(float(rank) if alphas == "folded" else alpha)
    return state


def peft_file(folder: Path, form: str, seed: int) -> Path:
    """A LoRA that diffusers writes itself: PEFT adapters on a diffusers UNet and text encoders with
    alpha != rank, an alpha_pattern and a rank_pattern, saved by `save_lora_weights` in PEFT's names
    (`lora_A`) or in those of diffusers' training scripts (`convert_state_dict_to_diffusers`)."""
    source = diffusers_tiny_pipeline(folder, SCHEDULER, seed=seed)
    torch.manual_seed(seed)
    attention, text_attention = ["to_q", "to_k", "to_v", "to_out.0"], ["q_proj", "k_proj", "v_proj", "out_proj"]
    # diffusers renames only attention layers and loads no file that mixes its names with PEFT's
    others = [] if form == "diffusers" else ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                                             "conv_shortcut", "time_emb_proj"]
    unet_config = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, rank_pattern={"conv1": 2, "to_v": 3},
                             alpha_pattern={"to_k": 3.0}, target_modules=attention + others)
    text_config = LoraConfig(r=2, lora_alpha=5, init_lora_weights=False,
                             target_modules=text_attention + ([] if form == "diffusers" else ["fc1", "fc2"]))
    source.unet.add_adapter(unet_config)
    for encoder in (source.text_encoder, source.text_encoder_2):  # transformers' add_adapter wants peft 0.22
        inject_adapter_in_model(text_config, encoder)
    convert = convert_state_dict_to_diffusers if form == "diffusers" else (lambda state: state)
    layers = {name: convert(get_peft_model_state_dict(model)) for name, model in
              (("unet", source.unet), ("text_encoder", source.text_encoder), ("text_encoder_2", source.text_encoder_2))}
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], weight_name=f"{form}.safetensors",
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict(),
        text_encoder_2_lora_adapter_metadata=text_config.to_dict())
    return folder / f"{form}.safetensors"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    reference = diffusers_tiny_pipeline(folder, SCHEDULER)
    written = {}
    for name, naming, seed, alphas in (("kohya-sgm", "sgm", 1, "varying"), ("kohya-sgm-folded", "sgm", 1, "folded"),
                                       ("kohya-diffusers", "diffusers", 2, "uniform"),
                                       ("peft-alpha-keys", "peft", 1, "varying")):
        written[name] = folder / f"{name}.safetensors"
        save_file(kohya_state(reference, naming, seed, alphas), written[name])
    for form, seed in (("peft", 3), ("diffusers", 4)):
        written[form] = peft_file(folder, form, seed)
    return written


# 1. Against diffusers.


def pipelines(folder: Path, dtype=torch.float32):
    """diffusers' tiny pipeline and ours with the same weights (the text encoders not shared)."""
    reference = diffusers_tiny_pipeline(folder, SCHEDULER)
    for encoder in (reference.text_encoder, reference.text_encoder_2):
        encoder.set_attn_implementation("sdpa")  # as ours (text.ATTENTION)
    ours = ours_from_diffusers(diffusers_tiny_pipeline(folder, SCHEDULER), SCHEDULER)
    return reference.to(dtype), ours.to(dtype=dtype)


def fuse(reference: StableDiffusionXLPipeline, path: Path, strength: float) -> None:
    reference.load_lora_weights(path.parent, weight_name=path.name)
    reference.fuse_lora(lora_scale=strength)
    reference.unload_lora_weights()  # the fused weights stay


def weight_difference(reference: StableDiffusionXLPipeline, ours: StableDiffusionXLVideoPipeline) -> float:
    pairs = [(reference.unet, ours.unet), (reference.text_encoder, ours.text_encoder.text_encoder),
             (reference.text_encoder_2, ours.text_encoder.text_encoder_2)]
    worst = 0.0
    for theirs, mine in pairs:
        mine_state = mine.state_dict()
        for key, value in theirs.state_dict().items():
            worst = max(worst, (mine_state[key] - value).abs().max().item())
    return worst


def sampled_latents(reference, ours, steps: int = 1):
    """Both pipelines' latents (1, 4, 8, 6) for the same prompt, starting latents, steps and noise."""
    latents = torch.randn(1, 4, 1, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(3), dtype=ours.dtype)
    arguments = dict(height=HEIGHT, width=WIDTH, num_inference_steps=steps, guidance_scale=5.0, output_type="latent")
    theirs = reference(PROMPT, negative_prompt=NEGATIVE, latents=latents[:, :, 0], generator=torch.Generator().manual_seed(7),
                       **arguments).images
    mine = ours(PROMPT, NEGATIVE, num_frames=1, latents=latents, generator=torch.Generator().manual_seed(7), **arguments)
    return theirs, mine[:, :, 0]


# diffusers drops the per-module alphas of kohya files (its alpha_pattern keeps the old processor
# names, which peft warns match nothing): it gets the file with the alphas folded into the up weights.
# A PEFT file with `.alpha` keys is kohya-sgm's LoRA in PEFT's names.
@pytest.mark.parametrize("name, theirs", [("kohya-sgm", "kohya-sgm-folded"), ("kohya-diffusers", "kohya-diffusers"),
                                          ("peft", "peft"), ("diffusers", "diffusers"),
                                          ("peft-alpha-keys", "kohya-sgm-folded")])
def test_merged_weights_and_latents_equal_diffusers(files, tmp_path, name, theirs):
    """Weights in float32. Latents in float64, both sides merged in float64, after one step: in float32
    the tiny random model's latents (about 50) differ from diffusers' by 1e-4 without any LoRA, and in
    float64 diffusers' DPM-Solver step still runs in float32, which puts a floor of 3e-6 (one step)
    to 1.5e-5 (three) under the agreement, without a LoRA as with one."""
    reference, ours = pipelines(tmp_path)
    fuse(reference, files[theirs], 0.7)
    ours.load_loras([str(files[name])], [0.7])
    assert weight_difference(reference, ours) <= 1e-5
    reference, ours = pipelines(tmp_path, torch.float64)
    plain, _ = sampled_latents(reference, ours)
    fuse(reference, files[theirs], 0.7)
    ours.load_loras([str(files[name])], [0.7])
    theirs, mine = sampled_latents(reference, ours)
    assert (theirs - mine).abs().max() <= 1e-5
    assert (theirs - plain).abs().max() > 1e-2  # the LoRA changed the latents: the test is not vacuous


def test_two_loras_add_as_in_diffusers(files, tmp_path):
    reference, ours = pipelines(tmp_path)
    fuse(reference, files["kohya-sgm-folded"], 0.6)
    fuse(reference, files["peft"], -0.8)
    ours.load_loras([str(files["kohya-sgm"]), str(files["peft"])], [0.6, -0.8])
    assert weight_difference(reference, ours) <= 1e-5


# 2. Strengths: exact restores.


def state(pipeline: StableDiffusionXLVideoPipeline) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.clone() for name, model in (
        ("unet", pipeline.unet), ("te", pipeline.text_encoder.text_encoder), ("te2", pipeline.text_encoder.text_encoder_2))
        for key, value in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def chunk_latents(pipeline) -> torch.Tensor:
    return pipeline(PROMPT, height=32, width=48, num_frames=2, num_inference_steps=2, output_type="latent",
                    generator=torch.Generator().manual_seed(0))


def test_strength_zero_changes_no_bit_and_every_change_restores_exactly(model, files):
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(model)
    original, plain = state(pipeline), chunk_latents(pipeline)
    loras = pipeline.load_loras([str(files["kohya-sgm"]), str(files["peft"])], [0.0, 0.0])
    assert same(state(pipeline), original) and torch.equal(chunk_latents(pipeline), plain)
    assert loras.set_strengths([0.8, 0.0]) == {"unet", "text_encoder", "text_encoder_2"}
    at_08 = state(pipeline)
    assert not same(at_08, original)
    for strengths in ([-0.8, 0.0], [0.8, 1.3], [0.0, -2.0], [0.8, 0.0]):
        loras.set_strengths(strengths)
    assert same(state(pipeline), at_08)  # the same strengths, the same weights, whatever came before
    loras.set_strengths([0.0, 0.0])
    assert same(state(pipeline), original) and torch.equal(chunk_latents(pipeline), plain)
    loras.set_strengths([0.3, 0.5])
    with pytest.raises(ValueError, match="holds LoRAs already"):
        pipeline.load_loras([str(files["peft"])])
    loras.remove()
    assert same(state(pipeline), original)


def test_fixed_strengths_keep_no_copy_and_cannot_change(model, files):
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(model)
    loras = pipeline.load_loras([str(files["kohya-diffusers"])], [0.5], keep_originals=False)
    assert loras.originals is None
    with pytest.raises(ValueError, match="keep_originals"):
        loras.set_strengths([0.2])


# 3. Bad files, refused before the model is loaded.


def write(path: Path, state: dict) -> Path:
    save_file({key: value.contiguous() for key, value in state.items()}, path)
    return path


def bad_files(folder: Path, model: Path, kohya: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the error must say)."""
    from safetensors.torch import load_file

    good = load_file(kohya)
    first = next(key for key in good if key.endswith("lora_down.weight")).removesuffix(".lora_down.weight")
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(kohya.read_bytes()[:-10])
    (folder / "text.safetensors").write_text("not a LoRA at all")
    unknown = {**good, "lora_unet_nowhere_to_q.lora_down.weight": torch.ones(2, 4),
               "lora_unet_nowhere_to_q.lora_up.weight": torch.ones(4, 2), "bundle_emb.star.string_to_param.*": torch.ones(1)}
    wrong_shape = {**good, f"{first}.lora_down.weight": torch.ones(3, 7, 1, 1)}
    no_up = {key: value for key, value in good.items() if key != f"{first}.lora_up.weight"}
    hada = {f"{first}.hada_w1_a": torch.ones(4, 2), f"{first}.hada_w1_b": torch.ones(2, 4), f"{first}.alpha": torch.ones(())}
    lokr = {f"{first}.lokr_w1": torch.ones(2, 2), f"{first}.lokr_w2": torch.ones(2, 2)}
    dora = {**good, f"{first}.dora_scale": torch.ones(1, 4)}
    return {
        "missing": (folder / "missing.safetensors", "missing.safetensors: no such file"),
        "not safetensors": (folder / "text.safetensors", "text.safetensors is not a .safetensors file"),
        "truncated": (truncated, "truncated.safetensors is truncated"),
        "a model": (model / "unet.safetensors", "unet.safetensors is not a LoRA"),
        "unmatched keys": (write(folder / "unknown.safetensors", unknown), "3 keys match no module of the model .*: "
                           r"bundle_emb\.star\.string_to_param\.\*, lora_unet_nowhere_to_q\.lora_down\.weight, "
                           r"lora_unet_nowhere_to_q\.lora_up\.weight"),
        "wrong shape": (write(folder / "shape.safetensors", wrong_shape), rf"{first}: down \(3, 7, 1, 1\) and up"),
        "no up": (write(folder / "no-up.safetensors", no_up), f"{first} has no up weight"),
        "LoHa": (write(folder / "loha.safetensors", hada), "is a LoHa"),
        "LoKr": (write(folder / "lokr.safetensors", lokr), "is a LoKr"),
        "DoRA": (write(folder / "dora.safetensors", dora), "is a DoRA"),
    }


def test_bad_lora_files_are_refused_before_the_model_is_loaded(model, files, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(StableDiffusionXLVideoPipeline, "from_pretrained", no_loading)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for name, (path, message) in bad_files(inputs, model, files["kohya-sgm"]).items():
        with pytest.raises(ValueError, match=message) as error:
            sample.main(["--model", str(model), "--prompt", PROMPT, "--out", str(outputs / "video.mp4"), "--chunks", "1",
                         *FAST, "--lora", f"{path}:0.5"])
        assert "\n" not in str(error.value), name
        assert list(outputs.iterdir()) == [], name


def test_the_checkpoint_headers_give_the_loaded_model_layers(model):
    """What sample.py checks before loading (the folder's headers) is what the loaded model holds."""
    targets, _ = lora_files.checkpoint_targets(model)
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(model)
    live = {component: {name: tuple(layer.weight.shape) for name, layer in layers.items()}
            for component, layers in model_layers(pipeline_models(pipeline)).items()}
    assert targets == live


@pytest.mark.parametrize("value, message", [
    ("style.safetensors:abc", "'abc' is no strength"), ("style.safetensors:nan", "finite"),
    ("style.safetensors:1@x", "'1@x' is no strength"), ("style.safetensors:1@2,0@2", "two strengths at chunk 2"),
    (":1", "give FILE"),
])
def test_bad_strengths_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        sample.settings_from_arguments(sample.parse_arguments(["--prompt", "a", "--lora", value]))


def test_a_file_given_twice_is_refused(files):
    path = str(files["peft"])
    with pytest.raises(ValueError, match="given twice"):
        sample.settings_from_arguments(sample.parse_arguments(["--prompt", "a", "--lora", path, "--lora", f"{path}:0.2"]))


# 4. The timeline.


def test_timeline_strengths_are_pure_at_their_places_and_blend_between(files):
    arguments = sample.parse_arguments(["--prompt", "a", "--transition", "2", "--fps", "4", "--frames", "2", "--context-frames", "1",
                                        "--lora", f"{files['peft']}:0.5@1,-1@3s,2@9"])
    settings = sample.settings_from_arguments(arguments)
    assert settings.loras[0].strengths == [(0, 0.0), (1, 0.5), (6, -1.0), (9, 2.0)]  # 3 s = chunk 6; off before 1
    strengths = [endless.lora_strengths(settings.loras, chunk, settings.transition)[0] for chunk in range(11)]
    pure = {0: 0.0, 1: 0.5, 2: 0.5, 3: 0.5, 6: -1.0, 9: 2.0, 10: 2.0}  # exactly, at and after each place
    assert {chunk: strengths[chunk] for chunk in pure} == pure
    # over the 2 chunks before a place: 1/3 and 2/3 of the way (none before chunk 1: no room)
    assert strengths[4:6] == [pytest.approx(0.5 - 1.5 / 3), pytest.approx(0.5 - 1.5 * 2 / 3)]
    assert strengths[7:9] == [pytest.approx(-1 + 3 / 3), pytest.approx(-1 + 3 * 2 / 3)]
    plain = sample.settings_from_arguments(sample.parse_arguments(["--prompt", "a", "--lora", str(files["peft"])]))
    assert plain.loras[0].strengths == [(0, 1.0)]


def png_frames(folder) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path)) for path in sorted(Path(folder).glob("*.png"))])


def test_timeline_through_the_command_line_and_an_exact_resume(model, files, tmp_path, monkeypatch):
    loaded = []
    from_pretrained = StableDiffusionXLVideoPipeline.from_pretrained
    monkeypatch.setattr(StableDiffusionXLVideoPipeline, "from_pretrained",
                        lambda *a, **kw: loaded.append(from_pretrained(*a, **kw)) or loaded[-1])
    used = []

    def on_chunk(index, context, embeddings):
        used.append((list(loaded[-1].loras.strengths), state(loaded[-1]), embeddings))

    lora = ["--lora", f"{files['kohya-sgm']}:0@0,1@3", "--transition", "2"]
    base = ["--model", str(model), *FAST, "--prompt", PROMPT]
    sample.main([*base, *lora, "--out", str(tmp_path / "timeline/"), "--chunks", "4"], on_chunk)
    assert [strengths for strengths, _, _ in used] == [[0.0], [1 / 3], [2 / 3], [1.0]]
    reference = from_pretrained(model)
    assert same(used[0][1], state(reference))  # pure at chunk 0: no LoRA
    reference.load_loras([str(files["kohya-sgm"])], [1.0])
    assert same(used[3][1], state(reference))  # pure at chunk 3: the LoRA at 1, its text encoders too
    assert all(torch.equal(a, b) for a, b in zip(used[3][2], reference.encode_prompt(PROMPT, "", True)))
    assert not any(torch.equal(a, b) for a, b in zip(used[2][2][::2], used[3][2][::2]))  # re-encoded as it moved
    sample.main([*base, "--out", str(tmp_path / "none/"), "--chunks", "1"])
    frames = png_frames(tmp_path / "timeline")
    assert np.array_equal(frames[:2], png_frames(tmp_path / "none"))  # chunk 0 at strength 0: no LoRA's frames

    resumed = tmp_path / "resumed/"
    sample.main([*base, *lora, "--out", str(resumed), "--chunks", "2"])
    sample.main(["--out", str(resumed), "--resume", "--chunks", "4"])
    assert np.array_equal(png_frames(resumed), frames)
    with pytest.raises(ValueError, match="--lora .*the state file has"):
        sample.main(["--out", str(resumed), "--resume", "--chunks", "5", "--lora", f"{files['kohya-sgm']}:0@0,1@4"])


def test_resume_refuses_a_changed_lora_file_and_a_damaged_state(model, files, tmp_path):
    path = tmp_path / "mine.safetensors"
    path.write_bytes(files["kohya-diffusers"].read_bytes())
    out = tmp_path / "video/"
    sample.main(["--model", str(model), *FAST, "--prompt", PROMPT, "--lora", f"{path}:0.5", "--out", str(out), "--chunks", "1"])
    saved = torch.load(endless.state_path(str(out)), weights_only=True)
    assert saved["settings"]["loras"] == [{"path": str(path), "strengths": [(0, 0.5)],
                                           "sha256": lora_files.file_sha256(path)}]
    path.write_bytes(files["kohya-sgm"].read_bytes())
    with pytest.raises(ValueError, match="has changed since this video was started"):
        sample.main(["--out", str(out), "--resume", "--chunks", "2"])
    saved["settings"]["loras"][0]["strengths"] = [(0, "0.5")]
    torch.save(saved, endless.state_path(str(out)))
    with pytest.raises(ValueError, match=r"damaged or edited .*loras\[0\]\.strengths"):
        sample.main(["--out", str(out), "--resume", "--chunks", "2"])
    saved["settings"]["loras"][0] = {"path": str(path)}
    torch.save(saved, endless.state_path(str(out)))
    with pytest.raises(ValueError, match=r"damaged or edited .*loras\[0\]\.LoraSetting"):
        sample.main(["--out", str(out), "--resume", "--chunks", "2"])
    assert os.path.exists(out)
