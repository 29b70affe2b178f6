"""Tiny CLIP tokenizers and text encoders for tests, built offline in a few milliseconds.

The vocabulary is laid out like OpenAI CLIP's (`world.write_tokenizer_files`), with a few merged
words; "!" has id 0, as in SDXL's second tokenizer, which pads with it.
"""

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from shapes import world
from text import clip_tokenizers

WORDS = "a photo of red blue green circle square moving left right slowly".split()


def tiny_tokenizers(folder, max_length=16):
    """Two CLIP tokenizers like SDXL's: the first pads with <|endoftext|>, the second with "!"."""
    return clip_tokenizers(world.write_tokenizer_files(folder, WORDS), max_length)


def tiny_text_encoders(tokenizer, max_length=16, seed=0):
    """Random CLIPTextModel (hidden 32) and CLIPTextModelWithProjection (hidden 24, projection 32)."""
    common = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_length,
        num_hidden_layers=3,
        num_attention_heads=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, **common))
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=24, intermediate_size=48, projection_dim=32, **common)
    )
    return text_encoder.eval(), text_encoder_2.eval()
