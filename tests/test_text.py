"""text.py against diffusers' StableDiffusionXLPipeline.encode_prompt, on tiny random CLIP encoders."""

import copy

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from tests.tiny_text import tiny_text_encoders, tiny_tokenizers
from text import TextEncoder, known_words, unknown_words

MAX_LENGTH = 16
PROMPTS = ["a red circle moving left", "a photo of a green square moving right slowly"]
NEGATIVES = ["blue", "a circle moving"]
# 15 tokens fit before <|endoftext|>: <|startoftext|>, nine merged words, "then" as four characters, "a".
LONG_PROMPT = "a photo of a red circle moving left slowly then a blue square moving right"
CUT_TEXT = "blue square moving right"


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Our TextEncoder and diffusers' pipeline, sharing the same tokenizers and encoders."""
    tokenizer, tokenizer_2 = tiny_tokenizers(tmp_path_factory.mktemp("tokenizer"), MAX_LENGTH)
    text_encoder, text_encoder_2 = tiny_text_encoders(tokenizer, MAX_LENGTH)
    ours = TextEncoder(tokenizer, tokenizer_2, text_encoder, text_encoder_2)
    # encode_prompt uses neither the UNet, the VAE nor the scheduler; the constructor accepts None for them.
    reference = StableDiffusionXLPipeline(
        vae=None, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=None, scheduler=None, add_watermarker=False,
    )
    return ours, reference


def diffusers_encode(reference, prompt, negative_prompt=None, do_classifier_free_guidance=True):
    with torch.no_grad():
        return reference.encode_prompt(
            prompt, device=torch.device("cpu"), negative_prompt=negative_prompt,
            do_classifier_free_guidance=do_classifier_free_guidance,
        )


def assert_matches_diffusers(ours, reference, prompt, negative_prompt=None):
    """Compare the four embeddings; return the largest absolute difference."""
    expected = diffusers_encode(reference, prompt, negative_prompt)
    actual = ours.encode_prompt(prompt, negative_prompt)
    largest = 0.0
    for name, mine, theirs in zip(actual._fields, actual, expected):
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype, name
        largest = max(largest, (mine - theirs).abs().max().item())
    assert largest <= 1e-6
    return largest


def test_single_prompt_matches_diffusers(encoders):
    ours, reference = encoders
    assert_matches_diffusers(ours, reference, PROMPTS[0], NEGATIVES[0])
    embeddings = ours.encode_prompt(PROMPTS[0], NEGATIVES[0])
    assert embeddings.prompt_embeds.shape == (1, MAX_LENGTH, 32 + 24)
    assert embeddings.negative_prompt_embeds.shape == (1, MAX_LENGTH, 32 + 24)
    assert embeddings.pooled_prompt_embeds.shape == (1, 32)
    assert embeddings.negative_pooled_prompt_embeds.shape == (1, 32)
    assert embeddings.negative_prompt_embeds.abs().sum() > 0


def test_batch_with_negatives_matches_diffusers(encoders):
    ours, reference = encoders
    assert_matches_diffusers(ours, reference, PROMPTS, NEGATIVES)
    assert_matches_diffusers(ours, reference, PROMPTS, "blue")  # one negative for every prompt


def test_batch_rows_equal_single_prompts(encoders):
    ours, _ = encoders
    batch = ours.encode_prompt(PROMPTS, NEGATIVES)
    for index, (prompt, negative) in enumerate(zip(PROMPTS, NEGATIVES)):
        single = ours.encode_prompt(prompt, negative)
        for name, row, alone in zip(batch._fields, batch, single):
            torch.testing.assert_close(row[index : index + 1], alone, rtol=0, atol=1e-6, msg=name)


def test_no_negative_gives_zeros_like_diffusers(encoders):
    ours, reference = encoders
    assert_matches_diffusers(ours, reference, PROMPTS, None)
    embeddings = ours.encode_prompt(PROMPTS)
    assert not embeddings.negative_prompt_embeds.any() and not embeddings.negative_pooled_prompt_embeds.any()


@pytest.mark.parametrize("negative_prompt", ["", ["", ""]])
def test_empty_negative_gives_zeros(encoders, negative_prompt):
    # SDXL's rule; diffusers zeroes only None and would encode "".
    ours, _ = encoders
    embeddings = ours.encode_prompt(PROMPTS, negative_prompt)
    assert not embeddings.negative_prompt_embeds.any() and not embeddings.negative_pooled_prompt_embeds.any()
    assert embeddings.negative_prompt_embeds.shape == embeddings.prompt_embeds.shape


def test_some_empty_negatives_are_encoded_like_diffusers(encoders):
    ours, reference = encoders
    assert_matches_diffusers(ours, reference, PROMPTS, ["", "blue"])


def test_without_guidance_there_are_no_negatives(encoders):
    ours, reference = encoders
    expected = diffusers_encode(reference, PROMPTS, do_classifier_free_guidance=False)
    actual = ours.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert actual.negative_prompt_embeds is None and actual.negative_pooled_prompt_embeds is None
    torch.testing.assert_close(actual.prompt_embeds, expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(actual.pooled_prompt_embeds, expected[2], rtol=0, atol=1e-6)


def test_long_prompt_is_cut_with_a_warning_like_diffusers(encoders):
    ours, reference = encoders
    with pytest.warns(UserWarning, match=f"'{CUT_TEXT}'"):
        assert_matches_diffusers(ours, reference, [LONG_PROMPT, PROMPTS[0]], [NEGATIVES[0], LONG_PROMPT])


def test_no_warning_for_prompts_that_fit(encoders, recwarn):
    ours, _ = encoders
    ours.encode_prompt(PROMPTS, NEGATIVES)
    assert not [warning for warning in recwarn if "was cut" in str(warning.message)]


def test_no_autograd_graph_and_follows_dtype(encoders):
    ours, _ = encoders
    with torch.enable_grad():
        embeddings = ours.encode_prompt(PROMPTS, NEGATIVES)
    assert not any(tensor.requires_grad for tensor in embeddings)
    double = copy.deepcopy(ours).to(torch.float64).encode_prompt(PROMPTS, NEGATIVES)
    for name, single, wide in zip(embeddings._fields, embeddings, double):
        assert wide.dtype == torch.float64, name
        torch.testing.assert_close(wide.float(), single, rtol=1e-4, atol=1e-4, msg=name)


def test_save_and_load_round_trip(encoders, tmp_path):
    ours, _ = encoders
    ours.save_pretrained(tmp_path)
    for weights in ["text_encoder/model.safetensors", "text_encoder_2/model.safetensors"]:
        assert (tmp_path / weights).is_file()
    loaded = TextEncoder.from_pretrained(tmp_path)
    assert loaded.tokenizer_2.pad_token == "!" and loaded.tokenizer.pad_token == "<|endoftext|>"
    assert loaded.tokenizer.model_max_length == MAX_LENGTH
    before, after = ours.encode_prompt(PROMPTS, NEGATIVES), loaded.encode_prompt(PROMPTS, NEGATIVES)
    for name, tensor_before, tensor_after in zip(before._fields, before, after):
        assert torch.equal(tensor_before, tensor_after), name


@pytest.mark.parametrize("built_with", ["eager", "sdpa"])
def test_round_trip_is_exact_whatever_attention_the_encoders_were_built_with(tmp_path, built_with):
    """transformers chooses an attention implementation when a model is built from a config and
    again when one is loaded; eager and SDPA differ by about 5e-7, so the saved and the loaded
    encoders computed different embeddings when the two choices differed."""
    tokenizer, tokenizer_2 = tiny_tokenizers(tmp_path / "tokenizer", MAX_LENGTH)
    built = [type(model)(config_asking_for(model.config, built_with)) for model in tiny_text_encoders(tokenizer, MAX_LENGTH)]
    for model, reference in zip(built, tiny_text_encoders(tokenizer, MAX_LENGTH)):
        model.load_state_dict(reference.state_dict())
        assert model.config._attn_implementation == built_with
    ours = TextEncoder(tokenizer, tokenizer_2, *built)
    ours.save_pretrained(tmp_path / "saved")
    loaded = TextEncoder.from_pretrained(tmp_path / "saved")
    before, after = ours.encode_prompt(PROMPTS, NEGATIVES), loaded.encode_prompt(PROMPTS, NEGATIVES)
    for name, tensor_before, tensor_after in zip(before._fields, before, after):
        assert torch.equal(tensor_before, tensor_after), name


def config_asking_for(config, attention):
    """A copy of a transformers config asking for the given attention implementation."""
    config = copy.deepcopy(config)
    config._attn_implementation = attention
    return config


def test_loading_a_folder_without_the_subfolders_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_2"):
        TextEncoder.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "prompt, negative_prompt, named",
    [
        (None, None, "prompt"),
        ([], None, "prompt"),
        (["a red circle", 3], None, "prompt"),
        (("a red circle",), None, "prompt"),
        ("a red circle", 3, "negative_prompt"),
        ("a red circle", [], "negative_prompt"),
        (PROMPTS, ["blue"], "negative_prompt has 1 entries; expected 2"),
        ("a red circle", NEGATIVES, "negative_prompt has 2 entries; expected 1"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(encoders, prompt, negative_prompt, named):
    ours, _ = encoders
    with pytest.raises(ValueError, match=named):
        ours.encode_prompt(prompt, negative_prompt)


def test_words_the_tokenizer_spells_letter_by_letter_are_named(encoders):
    ours, _ = encoders
    assert unknown_words(ours.tokenizer, "a cat playing left slowly") == ["cat", "playing"]
    assert unknown_words(ours.tokenizer, "a red circle moving left") == []
    assert known_words(ours.tokenizer) == sorted("of photo red blue green circle square moving left right slowly".split())
    assert known_words(ours.tokenizer, limit=3) is None
