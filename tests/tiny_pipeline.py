"""A tiny SDXL pipeline in diffusers and the same weights in ours, built offline in a second.

The diffusers side is the oracle: `diffusers_tiny_pipeline` builds a `StableDiffusionXLPipeline`
with random (perturbed) weights (its UNet and VAE from diffusers_oracle.py), and `ours_from_diffusers`
loads its state dicts into our modules.
"""

import dataclasses

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

# re-exported: test_model, test_vae and test_convert_weights import the oracles from here
from diffusers_oracle import diffusers_unet, diffusers_vae  # noqa: F401
from model import UNet, UNetConfig
from pipeline import StableDiffusionXLVideoPipeline
from scheduler import SchedulerConfig
from text import TextEncoder
from tiny_text import tiny_text_encoders, tiny_tokenizers
from vae import AutoencoderKL, VAEConfig

UNET_CONFIG = UNetConfig.tiny(cross_attention_dim=32 + 24, pooled_text_dim=32)
VAE_CONFIG = VAEConfig.tiny()


def perturbed(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Move every weight off its initial value so that no path is trivially zero."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return module.eval()


def diffusers_tiny_pipeline(folder, scheduler_config: SchedulerConfig, seed: int = 0) -> StableDiffusionXLPipeline:
    """diffusers' SDXL pipeline with tiny random components; tokenizer files are written to `folder`."""
    tokenizer, tokenizer_2 = tiny_tokenizers(folder)
    text_encoder, text_encoder_2 = tiny_text_encoders(tokenizer, seed=seed)
    torch.manual_seed(seed)
    return StableDiffusionXLPipeline(
        vae=perturbed(diffusers_vae(VAE_CONFIG)),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=perturbed(diffusers_unet(UNET_CONFIG)),
        scheduler=DPMSolverMultistepScheduler(**scheduler_config.to_dict()),
    )


def ours_from_diffusers(reference: StableDiffusionXLPipeline, scheduler_config: SchedulerConfig):
    """Our pipeline holding the weights of `reference`, with fresh temporal modules."""
    unet = UNet(UNET_CONFIG)
    loaded = unet.load_state_dict(reference.unet.state_dict(), strict=False)
    assert not loaded.unexpected_keys and all(".temp_" in key for key in loaded.missing_keys)
    vae = AutoencoderKL(VAE_CONFIG)
    vae.load_state_dict(reference.vae.state_dict(), strict=True)
    text_encoder = TextEncoder(reference.tokenizer, reference.tokenizer_2, reference.text_encoder, reference.text_encoder_2)
    return StableDiffusionXLVideoPipeline(unet.eval(), vae.eval(), text_encoder, scheduler_config)


def tiny_video_pipeline(folder, seed: int = 0, groupnorm_scope: str = "chunk") -> StableDiffusionXLVideoPipeline:
    """Our pipeline with tiny random weights everywhere, temporal modules included (so the context
    and the frame order matter), the original sampler settings; tokenizer files go to `folder`."""
    tokenizer, tokenizer_2 = tiny_tokenizers(folder)
    text_encoder, text_encoder_2 = tiny_text_encoders(tokenizer, seed=seed)
    torch.manual_seed(seed)
    unet = perturbed(UNet(dataclasses.replace(UNET_CONFIG, groupnorm_scope=groupnorm_scope)), scale=0.1)
    vae = perturbed(AutoencoderKL(VAE_CONFIG))
    text_encoder = TextEncoder(tokenizer, tokenizer_2, text_encoder, text_encoder_2)
    return StableDiffusionXLVideoPipeline(unet, vae, text_encoder, SchedulerConfig.video_model())
