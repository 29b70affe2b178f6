"""The baby model: a small UNet and VAE of the video architecture, and frozen random CLIP text
encoders with a tokenizer of the shapes world's words. train.py trains it (mode baby); tools/bench.py
builds it with random weights."""

from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from model import UNetConfig
from shapes import world
from text import TextEncoder, clip_tokenizers
from training.baby_sizes import BABY_VAE_CHANNELS
from vae import VAEConfig


def baby_text_encoder(folder: Path, seed: int, shapes: int = 1,
                      vocabulary: int = max(world.VOCABULARIES)) -> TextEncoder:
    """Frozen random CLIP encoders (hidden 32, projection 32), drawn from `seed`, and a tokenizer of the
    world's words in version `vocabulary` (world.VOCABULARIES), that takes captions of `shapes` shapes
    (world.check_vocabulary). Words are checked to be one token from version 2 on: version 1, the
    first babies', is known to cut "green" into 4, and only its longest caption is checked."""
    tokenizer, tokenizer_2 = clip_tokenizers(world.baby_tokenizer_files(folder, vocabulary), 16)
    world.check_vocabulary(tokenizer, shapes, world.VOCABULARIES[vocabulary] if vocabulary >= 2 else ())
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=16, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=32, **common))
    return TextEncoder(tokenizer, tokenizer_2, text_encoder, text_encoder_2)


def baby_configs(size: int, conditioner: str = "transformer", vae_downsampling: int = 4) -> tuple[UNetConfig, VAEConfig]:
    """The UNet in three levels, 3.0 M parameters, 1.3 M of them temporal (with the transformer
    conditioner); the VAE in three levels (downsampling by 4, the shipped baby's, 0.24 M parameters)
    or four (by 8, 0.25 M). size: the frames' side in pixels."""
    vae = VAEConfig(block_out_channels=BABY_VAE_CHANNELS[vae_downsampling], layers_per_block=1, norm_num_groups=8,
                    force_upcast=False)
    unet = UNetConfig(
        block_out_channels=(32, 64, 64), layers_per_block=1, transformer_layers_per_block=(0, 1, 1), head_dim=16,
        cross_attention_dim=64, pooled_text_dim=32, addition_time_embed_dim=16, norm_num_groups=8,
        sample_size=size // vae.downsample_factor, temporal_layers=1, conditioner_dim=64, conditioner=conditioner,
    )
    return unet, vae
