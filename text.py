"""SDXL's two CLIP text encoders and prompt encoding, through transformers.

SDXL conditions its UNet on two CLIP text encoders: OpenAI CLIP ViT-L (`text_encoder`) and
OpenCLIP ViT-bigG (`text_encoder_2`). A prompt becomes
  - prompt embeddings: the penultimate hidden states of both encoders, concatenated on the
    feature dimension, (batch, tokens, 768 + 1280) for SDXL, the UNet's cross-attention context;
  - pooled prompt embeddings: the projected end-of-text state of the second encoder,
    (batch, 1280) for SDXL, part of the UNet's "text_time" added embedding.
"""

import contextlib
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.utils import logging as transformers_logging

SUBFOLDERS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
# One attention implementation for every text encoder, however it was made: transformers picks its
# own default when a model is built from a config and again, independently, when one is loaded from
# a folder, and eager and SDPA attention differ by about 5e-7, which sampling grows to 1e-4.
ATTENTION = "sdpa"


class PromptEmbeddings(NamedTuple):
    """What `TextEncoder.encode_prompt` returns; unpacks in the order of diffusers' `encode_prompt`.

    The negative fields are None without classifier-free guidance.
    """

    prompt_embeds: torch.Tensor  # (batch, tokens, dim1 + dim2)
    negative_prompt_embeds: torch.Tensor | None  # (batch, tokens, dim1 + dim2)
    pooled_prompt_embeds: torch.Tensor  # (batch, projection_dim)
    negative_pooled_prompt_embeds: torch.Tensor | None  # (batch, projection_dim)


def as_prompt_list(prompt, name):
    """A str or a non-empty list of str, as a list of str; anything else is a ValueError naming `name`."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(text, str) for text in prompt):
        return prompt
    raise ValueError(f"{name} must be a str or a non-empty list of str, got {prompt!r}")


def clip_tokenizers(folder, max_length: int) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's pair of CLIP tokenizers from one folder of vocab.json and merges.txt, offline: the
    first pads with <|endoftext|>, the second with "!", as SDXL's do."""
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=max_length, local_files_only=True)
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder, model_max_length=max_length, pad_token="!",
                                                local_files_only=True)
    return tokenizer, tokenizer_2


def tokenize(tokenizer, prompts):
    """Token ids (batch, model_max_length), padded with the tokenizer's own pad token.

    Prompts longer than the tokenizer takes are cut, with a warning that quotes the part cut off.
    """
    max_length = tokenizer.model_max_length
    for ids in tokenizer(prompts, verbose=False).input_ids:
        if len(ids) > max_length:  # keep the first max_length - 1 tokens, then end-of-text
            cut = tokenizer.decode(ids[max_length - 1 : -1])
            warnings.warn(f"CLIP takes at most {max_length} tokens; this part of a prompt was cut: {cut!r}")
    padded = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return padded.input_ids


@contextlib.contextmanager
def quiet_transformers():
    """No "Loading weights" or "Writing model shards" progress bars from transformers inside."""
    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def unknown_words(tokenizer, text: str) -> list[str]:
    """The words of `text` that `tokenizer` knows only letter by letter (every token one character)."""
    unknown = []
    for word in text.split():
        tokens = [token.removesuffix("</w>") for token in tokenizer.tokenize(word)]
        if len(tokens) > 1 and all(len(token) == 1 for token in tokens):
            unknown.append(word)
    return unknown


def known_words(tokenizer, limit: int = 200) -> list[str] | None:
    """The whole words of a small vocabulary, sorted (None if it has more than `limit`, as CLIP's)."""
    words = sorted(token.removesuffix("</w>") for token in tokenizer.get_vocab()
                   if token.endswith("</w>") and len(token) > len("a</w>") and token[:-4].isalpha())
    return words if len(words) <= limit else None


class TextEncoder(torch.nn.Module):
    """SDXL's two tokenizers and two CLIP text encoders, frozen.

    The encoders' parameters do not require grad, so `encode_prompt` builds no autograd graph in
    any grad mode; call `requires_grad_(True)` to train them. Move and cast with `.to(...)`.
    """

    def __init__(self, tokenizer, tokenizer_2, text_encoder, text_encoder_2):
        super().__init__()
        self.tokenizer = tokenizer  # CLIPTokenizer, pads with <|endoftext|>
        self.tokenizer_2 = tokenizer_2  # CLIPTokenizer, pads with "!" in SDXL
        self.text_encoder = text_encoder  # CLIPTextModel
        self.text_encoder_2 = text_encoder_2  # CLIPTextModelWithProjection
        for model in (text_encoder, text_encoder_2):
            if model.config._attn_implementation != ATTENTION:
                model.set_attn_implementation(ATTENTION)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, folder):
        """Load from the tokenizer*/ and text_encoder*/ subfolders of a diffusers-layout SDXL folder, offline."""
        folder = Path(folder)
        missing = [name for name in SUBFOLDERS if not (folder / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks the subfolders {missing} of a diffusers-layout SDXL model")
        with quiet_transformers():
            return cls(
                CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True),
                CLIPTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True),
                CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True,
                                              attn_implementation=ATTENTION),
                CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", local_files_only=True,
                                                            attn_implementation=ATTENTION),
            )

    def save_pretrained(self, folder):
        """Write the four parts into the subfolders that `from_pretrained` reads (weights as safetensors)."""
        with quiet_transformers():
            for name in SUBFOLDERS:
                getattr(self, name).save_pretrained(Path(folder) / name)

    def encode(self, prompts):
        """Embeddings (batch, tokens, dim1 + dim2) and pooled embeddings (batch, projection_dim) of a list of str."""
        device, dtype = self.text_encoder_2.device, self.text_encoder_2.dtype
        hidden_states = []
        for tokenizer, text_encoder in [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]:
            ids = tokenize(tokenizer, prompts).to(text_encoder.device)  # (batch, tokens)
            output = text_encoder(ids, output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2].to(device, dtype))  # (batch, tokens, dim)
        return torch.cat(hidden_states, dim=-1), output.text_embeds  # (batch, tokens, dim1 + dim2), (batch, proj)

    def encode_prompt(self, prompt, negative_prompt=None, do_classifier_free_guidance=True):
        """Encode prompts for the SDXL UNet, with the negatives for classifier-free guidance.

        prompt: a str or a list of str (batch = its length). negative_prompt: None, a str for every
        prompt, or a list of the same length. As in SDXL (`force_zeros_for_empty_prompt`), a
        negative prompt that is None or all "" gives zero negative embeddings; note that diffusers
        zeroes only None and encodes "". Prompts longer than the tokenizers take are cut with a warning.

        Returns PromptEmbeddings on text_encoder_2's device and dtype: prompt_embeds and
        negative_prompt_embeds (batch, tokens, dim1 + dim2), pooled_prompt_embeds and
        negative_pooled_prompt_embeds (batch, projection_dim); negatives are None without guidance.
        """
        prompts = as_prompt_list(prompt, "prompt")
        if negative_prompt is None or isinstance(negative_prompt, str):
            negative_prompts = [negative_prompt or ""] * len(prompts)
        else:
            negative_prompts = as_prompt_list(negative_prompt, "negative_prompt")
        if len(negative_prompts) != len(prompts):
            raise ValueError(
                f"negative_prompt has {len(negative_prompts)} entries; expected {len(prompts)}, one per prompt"
            )

        prompt_embeds, pooled_prompt_embeds = self.encode(prompts)
        if not do_classifier_free_guidance:
            return PromptEmbeddings(prompt_embeds, None, pooled_prompt_embeds, None)
        if all(text == "" for text in negative_prompts):
            negative_prompt_embeds = torch.zeros_like(prompt_embeds)
            negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
        else:
            negative_prompt_embeds, negative_pooled_prompt_embeds = self.encode(negative_prompts)
        return PromptEmbeddings(
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds
        )
