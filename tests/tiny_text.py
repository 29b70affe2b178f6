"""Tiny CLIP tokenizers and text encoders for tests, built offline in a few milliseconds.

The vocabulary is laid out like OpenAI CLIP's: the 256 byte-level characters, the same characters
with the end-of-word suffix "</w>", a few merged words, then <|startoftext|> and <|endoftext|>.
So "!" has id 0, as in SDXL's second tokenizer, which pads with it.
"""

import json
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

WORDS = "a photo of red blue green circle square moving left right slowly".split()


def byte_characters():
    """The 256 printable characters that byte-level BPE uses for the bytes 0..255, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + index) for index in range(len(others))]


def write_tokenizer_files(folder):
    """Write vocab.json and merges.txt of a tiny CLIP BPE tokenizer into folder; return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    characters = byte_characters()
    tokens = characters + [character + "</w>" for character in characters]
    merges = []
    for word in WORDS:  # merge each word left to right: "r e" -> "re", "re d</w>" -> "red</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in tokens:
                tokens.append(pieces[0])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def tiny_tokenizers(folder, max_length=16):
    """Two CLIP tokenizers like SDXL's: the first pads with <|endoftext|>, the second with "!"."""
    folder = write_tokenizer_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=max_length, local_files_only=True)
    tokenizer_2 = CLIPTokenizer.from_pretrained(
        folder, model_max_length=max_length, pad_token="!", local_files_only=True
    )
    return tokenizer, tokenizer_2


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
