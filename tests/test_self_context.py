"""training/self_context.py: the context a training sample's chunk is learnt from, made by the model itself.
Held against the pipeline's own sampling (sampled) and diffusers' DDPMScheduler (one-step); the
loss target is still the ground-truth chunk; no gradient; deterministic by step."""

import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler

from scheduler import denoised_from, make_alphas_cumprod, make_betas, training_coefficients, training_target
from training.self_context import SelfContext
from text import PromptEmbeddings
from tiny_pipeline import tiny_video_pipeline

BATCH, LATENT = 4, 4  # 4x4 latents


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pipeline = tiny_video_pipeline(tmp_path_factory.mktemp("tokenizer"))
    pipeline.unet.train().requires_grad_(True)  # as in training: parameters that want gradients
    return pipeline


def inputs(pipeline, settings: SelfContext, seed: int = 0):
    """Clip latents (b, 4, extra + k + f, h, w) and text of the tiny pipeline's widths."""
    generator = torch.Generator().manual_seed(seed)
    frames = settings.extra_frames + settings.context_frames + settings.frames
    latents = torch.randn((BATCH, 4, frames, LATENT, LATENT), generator=generator)
    embeddings = pipeline.encode_prompt(["a red circle"] * BATCH, do_classifier_free_guidance=False)
    return latents, embeddings.prompt_embeds, embeddings.pooled_prompt_embeds


def settings_of(pipeline, mode: str, **changes) -> SelfContext:
    values = dict(mode=mode, probability=0.5, steps=3, level=0.5, context_frames=2, frames=3,
                  size=LATENT * pipeline.vae_scale_factor, seed=7)
    return SelfContext(**{**values, **changes})


@pytest.mark.parametrize("mode", ["sampled", "one-step"])
@pytest.mark.parametrize("context_frames", [1, 2, 3])
def test_shapes_target_and_which_samples_change(tiny, mode, context_frames):
    settings = settings_of(tiny, mode, context_frames=context_frames)
    assert settings.extra_frames == (settings.frames if mode == "sampled" else 0)
    latents, text, pooled = inputs(tiny, settings)
    context, chunk = settings.split(tiny, latents, text, pooled, index=3)
    assert context.shape == (BATCH, 4, context_frames, LATENT, LATENT)
    assert torch.equal(chunk, latents[:, :, -settings.frames:])  # the loss target's source: the clip's own chunk
    clean = latents[:, :, -(context_frames + settings.frames):-settings.frames]  # (b, 4, k, h, w)
    chosen = [bool(torch.rand(1, generator=g) < settings.probability) for g in settings.generators(3, BATCH)]
    assert 0 < sum(chosen) < BATCH  # this seed and index choose some samples, not all
    for item in range(BATCH):
        assert torch.equal(context[item], clean[item]) != chosen[item]


@pytest.mark.parametrize("mode", ["sampled", "one-step"])
def test_deterministic_by_step_and_without_gradient(tiny, mode):
    settings = settings_of(tiny, mode, probability=1.0)
    latents, text, pooled = inputs(tiny, settings)
    with torch.enable_grad():
        first, _ = settings.split(tiny, latents, text, pooled, index=5)
    again, _ = settings.split(tiny, latents, text, pooled, index=5)
    other, _ = settings.split(tiny, latents, text, pooled, index=6)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not first.requires_grad and first.grad_fn is None
    assert all(parameter.grad is None for parameter in tiny.unet.parameters())


@pytest.mark.parametrize("mode", ["sampled", "one-step"])
def test_the_same_contexts_on_any_number_of_processes(tiny, mode):
    # A DDP run's processes each take their slice of the global batch (offset = rank x batch): the
    # contexts are those of one process with the whole batch. In float64, where a batch of 1 and of 2
    # round alike, exactly (float32 differs by 7e-7 of the values, the batched UNet's rounding).
    settings = settings_of(tiny, mode)
    latents, text, pooled = (tensor.double() for tensor in inputs(tiny, settings))
    tiny.unet.double()
    try:
        whole, _ = settings.split(tiny, latents, text, pooled, index=4)
        half = BATCH // 2
        parts = [dataclasses.replace(settings, offset=start).split(
            tiny, latents[start:start + half], text[start:start + half], pooled[start:start + half], index=4)[0]
            for start in (0, half)]
        other, _ = settings.split(tiny, latents, text, pooled, index=5)
    finally:
        tiny.unet.float()
    assert torch.equal(torch.cat(parts), whole) and not torch.equal(whole, other)


def test_sampled_context_is_the_chunk_the_pipeline_makes_after_the_frames_before_it(tiny):
    settings = settings_of(tiny, "sampled", probability=1.0)
    latents, text, pooled = inputs(tiny, settings)
    context, _ = settings.split(tiny, latents, text, pooled, index=2)
    generator = settings.generators(2, BATCH)
    for each in generator:
        torch.rand(1, generator=each)  # each sample's choice comes first
    chunk = tiny(prompt_embeds=PromptEmbeddings(text, None, pooled, None), height=settings.size, width=settings.size,
                 num_frames=settings.frames, num_inference_steps=settings.steps, guidance_scale=1.0,
                 generator=generator, previous_latents=latents[:, :, :settings.context_frames], output_type="latent")
    torch.testing.assert_close(context, chunk[:, :, -settings.context_frames:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_step_estimate_matches_diffusers(tiny, prediction_type):
    config = dataclasses.replace(tiny.scheduler_config, prediction_type=prediction_type)
    reference = DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_start=config.beta_start,
                              beta_end=config.beta_end, beta_schedule=config.beta_schedule,
                              prediction_type=prediction_type, clip_sample=False)
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn((1, 4, 2, 4, 4), generator=generator)
    prediction = torch.randn((1, 4, 2, 4, 4), generator=generator)
    for timestep in (0, 1, 250, 999):
        expected = reference.step(prediction, timestep, noisy).pred_original_sample
        got = denoised_from(config, prediction, noisy, *training_coefficients(config, torch.tensor([timestep]), noisy))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_one_step_of_a_perfect_model_gives_back_the_clean_context(tiny, monkeypatch):
    settings = settings_of(tiny, "one-step", probability=1.0)
    latents, text, pooled = inputs(tiny, settings)
    clean = latents[:, :, :settings.context_frames]
    alphas_cumprod = make_alphas_cumprod(make_betas(tiny.scheduler_config))
    calls = []

    def perfect(noisy, timesteps, *rest):
        # The noise is what makes `noisy` from the clean context at these timesteps; the model's ideal output.
        alpha = alphas_cumprod[timesteps].sqrt().reshape(-1, 1, 1, 1, 1)
        noise = (noisy - alpha * clean) / (1 - alpha**2).sqrt()
        calls.append((timesteps, rest[-1]))
        return training_target(tiny.scheduler_config, clean, noise, timesteps)

    monkeypatch.setattr(tiny, "unet", perfect)
    context, _ = settings.split(tiny, latents, text, pooled, index=0)
    torch.testing.assert_close(context, clean, rtol=1e-4, atol=1e-4)
    (timesteps, context_of_call), = calls
    assert context_of_call is None and int(timesteps.max()) < settings.level * 1000  # as a first chunk, below the level


def test_off_and_bad_settings(tiny):
    settings = settings_of(tiny, "off")
    latents, text, pooled = inputs(tiny, settings)
    context, chunk = settings.split(tiny, latents, text, pooled, index=0)
    assert torch.equal(context, latents[:, :, :2]) and torch.equal(chunk, latents[:, :, 2:])
    for mode, bad in (("always", {}), ("sampled", dict(probability=1.5)), ("sampled", dict(steps=0)),
                      ("one-step", dict(level=0.0))):
        with pytest.raises(ValueError, match="self-context"):
            settings_of(tiny, mode, **bad)
