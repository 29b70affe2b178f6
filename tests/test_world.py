"""shapes/world.py: the vocabulary the baby's tokenizer must take whole (checked with transformers' CLIP
tokenizer on the files the world writes), and scenes of several shapes (drawn as before with one)."""

import dataclasses
import json
import random

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
