"""shapes/world.py: the vocabulary the baby's tokenizer must take whole (checked with transformers' CLIP
tokenizer on the files the world writes), and scenes of several shapes (drawn as before with one)."""

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

import train
from shapes import world
from shapes.world import BACKGROUND, COLOURS, HELD_OUT, Clip, Scene
from text import clip_tokenizers
from training.data import ShapesData

BABY_TOKENS = 16  # train.py's baby text encoders


def world_tokenizer(folder, words=world.VOCABULARY, max_length=BABY_TOKENS):
    return clip_tokenizers(world.write_tokenizer_files(folder, words), max_length)[0]


def test_every_world_word_is_one_token_and_two_shapes_fit_the_baby(tmp_path):
    tokenizer = world_tokenizer(tmp_path)
    assert {word: tokenizer.tokenize(word) for word in world.VOCABULARY} == {
        word: [word + "</w>"] for word in world.VOCABULARY}
    world.check_vocabulary(tokenizer, shapes=2)
    caption = "a yellow triangle moving right and a green triangle moving right"
    assert world.longest_caption(2) == caption
    assert len(tokenizer(caption).input_ids) == 13  # start, 11 words, end


def test_green_after_red_was_cut_by_red_s_merge_and_is_whole_now(tmp_path):
    # Chains in word order rank "r e" (red) before "g r", "gr e" (green): BPE then made g re e n</w>.
    assert world.splits("red", "green") and not world.splits("green", "red")
    assert world.merge_order(["red", "green"]) == ["green", "red"]
    assert world_tokenizer(tmp_path, ["red", "green"]).tokenize("green") == ["green</w>"]


def test_a_word_added_early_does_not_split_the_others(tmp_path):
    words = ["a", "and", *world.VOCABULARY[1:-1]]  # "a n" of "and" would cut "triangle" into tri an g l e
    assert world.merge_order(words).index("triangle") < world.merge_order(words).index("and")
    world.check_vocabulary(world_tokenizer(tmp_path, words), shapes=2, words=words)


def test_words_that_would_split_each_other_are_refused_naming_the_word(tmp_path):
    words = ["tender", "entered"]  # "t e" is inside "entered", "e n" inside "tender": no order serves both
    with pytest.raises(ValueError, match=r"^the world's word 'entered' is 5 tokens \(en te r e d</w>\)"):
        world.check_vocabulary(world_tokenizer(tmp_path, words), words=words)


def test_a_caption_longer_than_the_text_encoder_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"^the caption 'a yellow triangle .* and a white triangle moving right' is "
                                         r"19 tokens, more than the text encoder's 16$"):
        world.check_vocabulary(world_tokenizer(tmp_path), shapes=3)
    world.check_vocabulary(world_tokenizer(tmp_path / "77", max_length=77), shapes=3)


def test_one_shape_draws_the_clips_it_always_drew():
    def as_before(seed, size, held_out):  # random_clip before scenes, by hand
        rng = random.Random(seed)
        combinations = [(c, s, d) for c in COLOURS for s in world.SHAPES for d in world.DIRECTIONS
                        if ((c, s, d) in HELD_OUT) == held_out]
        return world.placed_clip(*rng.choice(combinations), rng, size)

    for seed in (0, 1, 1_000_003, -7):
        for held_out in (False, True):
            assert world.random_clip(seed, 32, held_out) == world.random_clip(seed, 32, held_out, 1)
            assert world.random_clip(seed, 32, held_out) == as_before(seed, 32, held_out)


def test_a_scene_has_distinct_colours_its_caption_joins_theirs_and_the_last_is_drawn_on_top():
    scenes = [world.random_clip(seed, 32, shapes=2) for seed in range(50)]
    assert all(isinstance(scene, Scene) and len({clip.colour for clip in scene.clips}) == 2 for scene in scenes)
    assert not any((c.colour, c.shape, c.direction) in HELD_OUT for scene in scenes for c in scene.clips)
    held_out = world.random_clip(3, 32, held_out=True, shapes=5)
    assert {(c.colour, c.shape, c.direction) for c in held_out.clips} == HELD_OUT
    with pytest.raises(ValueError, match="shapes must be in"):
        world.random_clip(0, 32, shapes=6)

    under = Clip("red", "square", "left", x=10.0, y=10.0, radius=5.0, speed=0.0)
    over = Clip("blue", "circle", "up", x=14.0, y=10.0, radius=3.0, speed=0.0)
    scene = Scene((under, over))
    assert scene.caption == "a red square moving left and a blue circle moving up"
    pixels = (world.render(scene, 1, 32)[:, 0] + 1) * 127.5  # (3, 32, 32), 0..255
    # (row, column): the square covers columns 6 .. 13, the circle 11 .. 16 of row 10; both cover column 12.
    expected = {(10, 6): COLOURS["red"], (10, 12): COLOURS["blue"], (10, 16): COLOURS["blue"],
                (10, 18): BACKGROUND, (20, 10): BACKGROUND}
    for (row, column), rgb in expected.items():
        assert pixels[:, row, column].round().tolist() == list(rgb), (row, column)
    torch.testing.assert_close(world.render(Scene((under,)), 3, 32, 2), world.render(under, 3, 32, 2), rtol=0, atol=0)


def test_shapes_data_of_two_shapes_gives_scenes_and_of_one_the_clips_it_gave():
    one, two = ShapesData(32, 3, seed=0), ShapesData(32, 3, seed=0, shapes=2)
    clip = world.random_clip(5, 32)
    torch.testing.assert_close(one[5].video, world.render(clip, 3, 32, first_frame=5 * 7919 % 64), rtol=0, atol=0)
    assert one[5].caption == clip.caption
    assert two[5].caption == world.random_clip(5, 32, shapes=2).caption and " and a " in two[5].caption


def test_shapes_is_a_training_setting_and_runs_stored_without_it_resume_with_one(tmp_path):
    with pytest.raises(ValueError, match=r"^--shapes must be in \[1, 2\], got 3$"):
        train.TrainConfig(shapes=3)
    values = dataclasses.asdict(train.TrainConfig(out=str(tmp_path)))
    del values["shapes"]
    (tmp_path / "train_config.json").write_text(json.dumps(values))
    config = train.parse_config(["--out", str(tmp_path)])
    assert config.shapes == 1 and train.resume_changes(config) == []
    with pytest.raises(ValueError, match=r"--shapes 1 -> 2"):
        train.resume_changes(train.parse_config(["--out", str(tmp_path), "--shapes", "2"]))


# The baby's vocabulary by version (train.py --vocabulary). Its text encoders are not checkpointed: a
# resumed baby rebuilds them from the seed, so the version must be the one the run was trained with.
FIXTURE = Path(__file__).parent / "fixtures" / "baby-tokenizer-v1"
BABY = Path(__file__).resolve().parents[1] / "models" / "baby"


def test_version_1_writes_the_first_babies_tokenizer_files_byte_for_byte(tmp_path):
    # The fixture is what 797ca6f's world.py wrote (its README says how it was made).
    folder = world.baby_tokenizer_files(tmp_path / "v1", 1)
    for name in ("vocab.json", "merges.txt"):
        assert (folder / name).read_bytes() == (FIXTURE / name).read_bytes(), name
    v1 = clip_tokenizers(folder, BABY_TOKENS)[0]
    v2 = clip_tokenizers(world.baby_tokenizer_files(tmp_path / "v2", 2), BABY_TOKENS)[0]
    assert (len(v1), len(v2)) == (565, 567)
    assert v1.tokenize("green") == ["g", "re", "e", "n</w>"] and v2.tokenize("green") == ["green</w>"]
    assert world.baby_tokenizer_files(tmp_path / "v2 again", 2).joinpath("merges.txt").read_bytes() == (
        world.write_tokenizer_files(tmp_path / "today", world.VOCABULARY).joinpath("merges.txt").read_bytes())


def test_version_1_with_seed_0_builds_the_shipped_baby_s_text_encoders_bit_for_bit(tmp_path):
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    from training.baby import baby_text_encoder

    encoder = baby_text_encoder(tmp_path, seed=0, vocabulary=1)
    for name, model in (("text_encoder", encoder.text_encoder), ("text_encoder_2", encoder.text_encoder_2)):
        shipped, built = load_file(BABY / name / "model.safetensors"), model.state_dict()
        assert shipped.keys() == built.keys() and all(torch.equal(shipped[key], built[key]) for key in shipped), name
    assert encoder.tokenizer.get_vocab() == CLIPTokenizer.from_pretrained(BABY / "tokenizer").get_vocab()
    assert baby_text_encoder(tmp_path / "v2", seed=0).text_encoder.config.vocab_size == 567  # new babies: 2


def test_version_1_is_not_checked_for_whole_words_but_its_longest_caption_in_tokens_must_fit(tmp_path):
    from training.baby import baby_text_encoder

    baby_text_encoder(tmp_path, seed=0, vocabulary=1)  # "green" is 4 tokens: known, and accepted
    v1 = clip_tokenizers(world.baby_tokenizer_files(tmp_path, 1), 9)[0]
    with pytest.raises(ValueError, match=r"^the world's word 'green' is 4 tokens \(g re e n</w>\)"):
        world.check_vocabulary(v1, words=world.VOCABULARIES[1])
    # The longest caption in tokens, not in letters: green's 4 tokens beat yellow's 1.
    with pytest.raises(ValueError, match=r"^the caption 'a green triangle moving right' is 10 tokens, more than "
                                         r"the text encoder's 9$"):
        world.check_vocabulary(v1, words=())
    assert world.longest_caption(2) == "a yellow triangle moving right and a green triangle moving right"


def test_a_run_stored_without_vocabulary_resumes_with_the_one_it_was_trained_with(tmp_path):
    assert train.TrainConfig().vocabulary == max(world.VOCABULARIES) == 2  # new runs
    values = dataclasses.asdict(train.TrainConfig(out=str(tmp_path)))
    del values["vocabulary"], values["shapes"]  # train_config.json as runs before 5b45222 wrote it
    (tmp_path / "train_config.json").write_text(json.dumps(values))
    config = train.parse_config(["--out", str(tmp_path)])
    assert config.vocabulary == 1 and train.resume_changes(config) == []
    with pytest.raises(ValueError, match=r"--vocabulary 1 -> 2"):
        train.resume_changes(train.parse_config(["--out", str(tmp_path), "--vocabulary", "2"]))
    # 5b45222 brought --shapes and vocabulary 2 together: a run stored with shapes had 2.
    values["shapes"] = 2
    (tmp_path / "train_config.json").write_text(json.dumps(values))
    config = train.parse_config(["--out", str(tmp_path)])
    assert (config.shapes, config.vocabulary) == (2, 2) and train.resume_changes(config) == []


@pytest.mark.parametrize("options, expected", [
    (["--shapes", "2", "--vocabulary", "1"], "--shapes 2 needs --vocabulary 2"),
    (["--vocabulary", "3"], "--vocabulary must be in [1, 2], got 3"),
    (["--vocabulary", "0"], "--vocabulary must be in [1, 2], got 0"), (["--vocabulary", "two"], "--vocabulary")])
def test_a_vocabulary_two_shapes_cannot_use_or_that_does_not_exist_is_one_line(tmp_path, options, expected, capsys):
    with pytest.raises(SystemExit) as exit:
        train.checked_config(["--out", str(tmp_path / "run"), *options])
    error = capsys.readouterr().err
    assert exit.value.code == 2 and len(error.splitlines()) == 1 and expected in error, error
    assert not (tmp_path / "run").exists()
