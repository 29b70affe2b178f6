"""vae.py against diffusers' AutoencoderKL: tiny random models in float32 on a CPU, no downloads."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from tiny_pipeline import diffusers_vae
from vae import AutoencoderKL, VAEConfig

REPOSITORY = Path(__file__).resolve().parents[1]
SDXL_VAE_CONFIG = {
    key: value
    for key, value in json.loads((REPOSITORY / "configs/sdxl-base-1.0/vae/config.json").read_text()).items()
    if not key.startswith("_")
}

CONFIGS = {
    "tiny": VAEConfig.tiny(),
    "two-levels": VAEConfig(block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=8),
}


def build_pair(config: VAEConfig):
    """A diffusers VAE with perturbed random weights (GroupNorms and biases off their 1/0 init) and
    ours loaded from its state dict with strict=True."""
    torch.manual_seed(0)
    reference = diffusers_vae(config).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    ours = AutoencoderKL(config).eval()
    result = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ours, reference


@pytest.fixture(scope="module")
def tiny_pair():
    return build_pair(VAEConfig.tiny())


@pytest.mark.parametrize("name,size", [("tiny", (32, 32)), ("tiny", (24, 40)), ("two-levels", (24, 40))])
def test_matches_diffusers(name, size):
    ours, reference = build_pair(CONFIGS[name])
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = reference.encode(images).latent_dist
        posterior = ours.encode(images)
        latents = torch.randn(expected.mean.shape, generator=torch.Generator().manual_seed(2))
        expected_images = reference.decode(latents).sample
        decoded = ours.decode(latents)
    factor = ours.config.downsample_factor
    assert posterior.mean.shape == (2, 4, size[0] // factor, size[1] // factor)
    assert expected.mean.abs().max() > 0.1 and expected_images.abs().max() > 0.1  # not trivially near zero
    torch.testing.assert_close(posterior.mean, expected.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(posterior.logvar, expected.logvar, atol=1e-5, rtol=0)
    torch.testing.assert_close(decoded, expected_images, atol=1e-5, rtol=0)


def test_sdxl_preset_matches_reference_config():
    config = VAEConfig.sdxl()
    for field in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups",
                  "scaling_factor", "force_upcast"):
        assert getattr(config, field) == SDXL_VAE_CONFIG[field], field
    assert list(config.block_out_channels) == SDXL_VAE_CONFIG["block_out_channels"]


def test_sdxl_preset_has_diffusers_keys_and_parameter_count():
    with torch.device("meta"):
        reference = DiffusersAutoencoderKL(**SDXL_VAE_CONFIG)
        ours = AutoencoderKL(VAEConfig.sdxl())
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in ours.state_dict().items()} == expected
    count = sum(parameter.numel() for parameter in ours.parameters())
    assert count == sum(parameter.numel() for parameter in reference.parameters()) == 83_653_863


@pytest.mark.parametrize("frames_per_batch", [1, 2, 5])
def test_decode_video_in_chunks_equals_all_at_once(tiny_pair, frames_per_batch):
    ours, _ = tiny_pair
    latents = torch.randn(2, 4, 5, 3, 4, generator=torch.Generator().manual_seed(3))  # (b, c, f, h, w)
    with torch.no_grad():
        video = ours.decode_video(latents, frames_per_batch=frames_per_batch)
        all_at_once = ours.decode_video(latents, frames_per_batch=10)
    assert video.shape == (2, 3, 5, 24, 32)
    # CPU conv kernels depend on the batch size: differences of about 3e-6, not 0.
    torch.testing.assert_close(video, all_at_once, atol=1e-5, rtol=0)


def test_video_helpers_scale_and_fold_frames(tiny_pair):
    ours, _ = tiny_pair
    scale = ours.config.scaling_factor
    video = torch.rand(2, 3, 3, 16, 24, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        latents = ours.encode_video(video, frames_per_batch=2)
        assert latents.shape == (2, 4, 3, 2, 3)
        for frame in range(3):
            torch.testing.assert_close(latents[:, :, frame], ours.encode(video[:, :, frame]).mean * scale)
        decoded = ours.decode_video(latents)
        assert decoded.shape == video.shape
        for frame in range(3):
            torch.testing.assert_close(decoded[:, :, frame], ours.decode(latents[:, :, frame] / scale))


def test_sample_is_mean_plus_std_times_generator_noise(tiny_pair):
    ours, _ = tiny_pair
    video = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        first = ours.encode_video(video, generator=torch.Generator().manual_seed(6))
        second = ours.encode_video(video, generator=torch.Generator().manual_seed(6))
        posterior = ours.encode(video.permute(0, 2, 1, 3, 4).flatten(0, 1))  # (b*f, c, H, W)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(6))  # (b*f, c, h, w)
    expected = (posterior.mean + posterior.std * noise) * ours.config.scaling_factor  # (b*f, c, h, w)
    torch.testing.assert_close(first, expected.unflatten(0, (2, 3)).permute(0, 2, 1, 3, 4))
    assert not torch.allclose(first, ours.encode_video(video))  # the sample is not the mean


def test_upcast_runs_float16_weights_in_float32(tiny_pair):
    """With float16 weights and upcast on, the output equals a float32 model holding the same
    (float16-rounded) weights, rounded once to float16 at the end: so the decoder ran in float32.
    Without upcast the float16 run differs, so the test would notice if upcasting did nothing."""
    ours, _ = tiny_pair
    half = AutoencoderKL(ours.config).eval()
    half.load_state_dict(ours.state_dict())
    half.half()
    full = AutoencoderKL(ours.config).eval()
    full.load_state_dict(half.state_dict())  # float16-rounded weights, held in float32
    latents = torch.randn(1, 4, 2, 3, 4, generator=torch.Generator().manual_seed(7)).half()
    video = torch.rand(1, 3, 2, 16, 16, generator=torch.Generator().manual_seed(8)).half() * 2 - 1
    before = {key: value.clone() for key, value in half.state_dict().items()}
    with torch.no_grad():
        decoded = half.decode_video(latents)  # config.force_upcast is True
        encoded = half.encode_video(video)
        assert decoded.dtype == encoded.dtype == torch.float16
        torch.testing.assert_close(decoded, full.decode_video(latents.float()).half(), atol=0, rtol=0)
        torch.testing.assert_close(encoded, full.encode_video(video.float()).half(), atol=0, rtol=0)
        assert not torch.equal(half.decode_video(latents, upcast=False), decoded)
    after = half.state_dict()
    assert all(after[key].dtype == torch.float16 and torch.equal(after[key], before[key]) for key in before)


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda vae: vae.encode(torch.zeros(1, 3, 16)), "images"),
        (lambda vae: vae.encode(torch.zeros(1, 4, 16, 16)), "images"),
        (lambda vae: vae.decode(torch.zeros(1, 3, 2, 2)), "latents"),
        (lambda vae: vae.encode_video(torch.zeros(1, 3, 16, 16)), "video"),
        (lambda vae: vae.encode_video(torch.zeros(1, 1, 2, 16, 16)), "video"),
        (lambda vae: vae.decode_video(torch.zeros(1, 4, 2, 2)), "latents"),
        (lambda vae: vae.decode_video(torch.zeros(1, 8, 1, 2, 2)), "latents"),
        (lambda vae: vae.decode_video(torch.zeros(1, 4, 1, 2, 2), frames_per_batch=0), "frames_per_batch"),
    ],
)
def test_bad_input_names_the_argument(tiny_pair, call, name):
    with pytest.raises(ValueError, match=name):
        call(tiny_pair[0])


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(block_out_channels=()), "block_out_channels"),
        (dict(block_out_channels=(8, 12), norm_num_groups=8), "block_out_channels"),
        (dict(norm_num_groups=0), "norm_num_groups"),
        (dict(layers_per_block=0), "layers_per_block"),
        (dict(latent_channels=0), "latent_channels"),
        (dict(scaling_factor=0.0), "scaling_factor"),
    ],
)
def test_config_rejects_impossible_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        VAEConfig(**kwargs)
