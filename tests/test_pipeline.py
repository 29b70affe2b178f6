"""The whole chunk pipeline against diffusers' StableDiffusionXLPipeline, and the checkpoint folder.

With fresh temporal modules and per-frame GroupNorm our video pipeline must make the images SDXL
makes, frame by frame, for the same prompt, starting latents, sampler settings and noise.
"""

import dataclasses

import pytest
import torch

from model import micro_conditioning
from pipeline import StableDiffusionXLVideoPipeline
from scheduler import SchedulerConfig
from tiny_pipeline import diffusers_tiny_pipeline, ours_from_diffusers

HEIGHT, WIDTH = 64, 48  # latents 8 x 6
PROMPT, NEGATIVE = "a red circle moving left", "blue square"


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    configs = {
        "sde": SchedulerConfig.video_model(),
        "ode": dataclasses.replace(SchedulerConfig.sdxl_base(), timestep_spacing="trailing"),
    }
    return {name: (diffusers_tiny_pipeline(folder, config), ours_from_diffusers(diffusers_tiny_pipeline(folder, config), config))
            for name, config in configs.items()}


def diffusers_images(reference, latents, seed, steps, guidance, negative=NEGATIVE):
    """diffusers' output in [0, 1], (batch, 3, H, W), from 4-D starting latents."""
    return reference(
        PROMPT, negative_prompt=negative, height=HEIGHT, width=WIDTH, num_inference_steps=steps,
        guidance_scale=guidance, latents=latents, generator=torch.Generator().manual_seed(seed), output_type="pt",
    ).images


@pytest.mark.parametrize("name", ["sde", "ode"])
@pytest.mark.parametrize("guidance, negative", [(5.0, NEGATIVE), (5.0, None), (1.0, None)])
def test_one_frame_equals_diffusers(pipelines, name, guidance, negative):
    reference, ours = pipelines[name]
    latents = torch.randn(1, 4, 1, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(3))
    expected = diffusers_images(reference, latents[:, :, 0], 7, 12, guidance, negative)
    video = ours(PROMPT, negative, HEIGHT, WIDTH, num_frames=1, num_inference_steps=12, guidance_scale=guidance,
                 latents=latents, generator=torch.Generator().manual_seed(7), output_type="pt")
    assert (video[:, :, 0] - expected).abs().max() <= 1e-4


def test_frames_equal_diffusers_frame_by_frame_with_a_context(pipelines):
    reference, ours = pipelines["ode"]
    latents = torch.randn(1, 4, 3, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(4))
    context = torch.randn(1, 4, 2, HEIGHT // 8, WIDTH // 8)
    video = ours(PROMPT, NEGATIVE, HEIGHT, WIDTH, num_frames=3, num_inference_steps=8, guidance_scale=4.0,
                 latents=latents, previous_latents=context, output_type="pt")
    for frame in range(3):
        expected = diffusers_images(reference, latents[:, :, frame], 0, 8, 4.0)
        assert (video[:, :, frame] - expected).abs().max() <= 1e-4


def test_checkpoint_folder_round_trip(pipelines, tmp_path):
    _, ours = pipelines["sde"]
    ours.save_pretrained(tmp_path / "checkpoint", provenance={"unet": "test"})
    loaded = StableDiffusionXLVideoPipeline.from_pretrained(tmp_path / "checkpoint")
    assert loaded.provenance == {"unet": "test"} and loaded.scheduler_config == ours.scheduler_config
    arguments = dict(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_frames=2, num_inference_steps=4,
                     output_type="latent", previous_latents=torch.randn(1, 4, 2, 8, 6))
    first = ours(**arguments, generator=torch.Generator().manual_seed(1))
    second = loaded(**arguments, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(ours.encode_prompt(PROMPT)[:2], loaded.encode_prompt(PROMPT)[:2])), "text"
    for name in ("unet", "vae"):
        saved, read = getattr(ours, name).state_dict(), getattr(loaded, name).state_dict()
        assert saved.keys() == read.keys() and all(torch.equal(saved[key], read[key]) for key in saved)
    # The weights are bit-equal; the outputs agree to float rounding, not bit for bit: on some CPUs
    # the BLAS kernel chosen depends on where a weight lies in memory (mmapped safetensors here).
    # 1e-5 of the latents' scale (about 90 here) after four SDE steps.
    torch.testing.assert_close(second, first, rtol=0, atol=1e-5 * first.abs().max().item())


def test_prompt_embeddings_given_equal_text(pipelines):
    _, ours = pipelines["sde"]
    arguments = dict(height=HEIGHT, width=WIDTH, num_frames=2, num_inference_steps=3, output_type="latent")
    from_text = ours(PROMPT, NEGATIVE, generator=torch.Generator().manual_seed(2), **arguments)
    embeddings = ours.encode_prompt(PROMPT, NEGATIVE)
    from_embeddings = ours(prompt_embeds=embeddings, generator=torch.Generator().manual_seed(2), **arguments)
    assert torch.equal(from_text, from_embeddings)


def test_conditioning_strength(pipelines):
    _, ours = pipelines["sde"]
    image = torch.randn(1, 4, 1, HEIGHT // 8, WIDTH // 8)
    arguments = dict(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_frames=2, num_inference_steps=5, output_type="latent")
    kept = ours(**arguments, latent_image=image, conditioning_strength=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kept, image.expand_as(kept))
    ignored = ours(**arguments, latent_image=image, conditioning_strength=0.0, generator=torch.Generator().manual_seed(0))
    plain = ours(**arguments, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ignored, plain)
    partway = ours(**arguments, latent_image=image, conditioning_strength=0.6, generator=torch.Generator().manual_seed(0))
    assert (partway - image).abs().mean() < (plain - image).abs().mean()


@pytest.mark.parametrize(
    "arguments, name",
    [
        (dict(height=60), "height"),
        (dict(width=0), "width"),
        (dict(num_frames=0), "num_frames"),
        (dict(output_type="gif"), "output_type"),
        (dict(conditioning_strength=1.5), "conditioning_strength"),
        (dict(latents=torch.randn(1, 4, 3, 8, 8)), "latents"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    ],
)
def test_bad_input_names_the_argument(pipelines, arguments, name):
    _, ours = pipelines["sde"]
    defaults = dict(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_frames=2, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=name):
        ours(**{**defaults, **arguments})


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        StableDiffusionXLVideoPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("original_size, crop_top_left", [(None, (0, 0)), ((128, 96), (8, 0))])
def test_micro_conditioning_equals_diffusers_add_time_ids(pipelines, original_size, crop_top_left):
    reference, _ = pipelines["sde"]
    expected = reference._get_add_time_ids(
        original_size or (HEIGHT, WIDTH), crop_top_left, (HEIGHT, WIDTH), dtype=torch.float32,
        text_encoder_projection_dim=reference.text_encoder_2.config.projection_dim).repeat(3, 1)  # (3, 6)
    ours = micro_conditioning(3, HEIGHT, WIDTH, original_size=original_size, crop_top_left=crop_top_left)
    assert ours.dtype == torch.float32 and torch.equal(ours, expected)
