"""The drift controls (video_settings.DriftControls): one field each, the options and checks made
from the fields, the order of the steps, the state file, and the statistics lock."""

import argparse
from dataclasses import asdict, field, fields, make_dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import endless
import evaluate
import sample
from endless import Prompts, VideoState, generate_latents, load_state, state_path
from video_settings import (DRIFT_NAMES, SETTING_NAMES, ChunkSpec, DriftControls, Settings, add_chunk_options,
                            settings_from_dict)

FAST = ["--steps", "2", "--frames", "3", "--context-frames", "2", "--height", "32", "--width", "48"]
CHUNK = ChunkSpec(height=16, width=16, frames=3, context_frames=3, steps=1, guidance=1.0)  # the unit tests' chunks


def channel_statistics(latents: torch.Tensor) -> torch.Tensor:
    """(b, 4, f, h, w) -> (2, b, 4): each channel's mean and std over frames and pixels."""
    return torch.stack([latents.mean(dim=(2, 3, 4)), latents.std(dim=(2, 3, 4))])


# ---------------------------------------------------------------------------------------------
# Options and checks come from the fields


def test_every_control_is_an_option_of_sample_and_evaluate_with_the_fields_help_and_default():
    parser = argparse.ArgumentParser()
    add_chunk_options(parser)
    for f in fields(DriftControls):
        action = next(a for a in parser._actions if a.dest == f.name)
        assert action.help.startswith(f.metadata["help"])
        assert action.default is None  # unset: the model's default, then the field's
        default = ("on" if f.default else "off") if f.type is bool else f"{f.default:g}"
        assert action.help.endswith(f"else {default})")
    assert set(DRIFT_NAMES) <= set(SETTING_NAMES)
    for f in fields(DriftControls):  # every control reaches Settings.drift from either command line
        option = "--" + f.name.replace("_", "-")
        value, expected = ([option], True) if f.type is bool else ([option, "0.25"], 0.25)
        args = sample.parse_arguments(["--prompt", "a", *value])
        assert getattr(sample.settings_from_arguments(args).drift, f.name) == expected
        arguments = evaluate.parse_arguments(value)
        assert vars(arguments)[f.name] == expected


def test_every_control_defaults_to_off():
    assert all(not getattr(DriftControls(), name) for name in DRIFT_NAMES)
    assert Settings(timeline=[(0, "a")]).drift == DriftControls()


@pytest.mark.parametrize("arguments, message", [
    (["--statistics-lock", "1.5"], r"--statistics-lock must be a finite number in \[0, 1\], got 1.5"),
    (["--statistics-lock", "-0.1"], "--statistics-lock"),
    (["--context-noise", "-1"], "--context-noise must be a finite number at least 0"),
])
def test_a_control_out_of_its_range_is_refused_naming_its_option(arguments, message):
    with pytest.raises(ValueError, match=message):
        sample.settings_from_arguments(sample.parse_arguments(["--prompt", "a", *arguments]))


def test_flat_options_and_settings_round_trip():
    settings = Settings.from_options(timeline=[(0, "a")], steps=3, anchor_frame=True, statistics_lock=0.5)
    assert settings.drift == DriftControls(anchor_frame=True, statistics_lock=0.5) and settings.steps == 3
    assert Settings.from_options(**settings.options()) == settings
    assert settings_from_dict(asdict(settings)) == settings


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["drift"].update(statistics_lock="0.5"), "drift.statistics_lock"),
    (lambda d: d["drift"].update(unknown=1.0), "drift.DriftControls"),
    (lambda d: d.update(drift=[0.0]), "drift.DriftControls"),
    (lambda d: d.update(anchor_frame=True), "Settings"),  # the old, flat layout
])
def test_the_state_files_drift_controls_are_checked(edit, message):
    values = asdict(Settings(timeline=[(0, "a")]))
    edit(values)
    with pytest.raises(TypeError, match=message):
        settings_from_dict(values)


def test_a_state_file_from_before_a_control_existed_loads_with_it_off():
    settings = Settings.from_options(timeline=[(0, "a")], anchor_frame=True)
    values = asdict(settings)
    del values["drift"]["empty_restart"]
    assert settings_from_dict(values) == settings and settings.drift.empty_restart == 0


# ---------------------------------------------------------------------------------------------
# The order of the steps


def test_the_context_is_anchored_then_noised():
    controls = DriftControls(anchor_frame=True, context_noise=0.5)
    state = VideoState(context=torch.zeros(1, 4, 3, 2, 2), anchor=torch.full((1, 4, 1, 2, 2), 2.0))
    context = controls.next_context(state, lambda shape: torch.ones(shape), CHUNK)
    assert torch.equal(context[:, :, 0], torch.full((1, 4, 2, 2), 2.5))  # the anchor, noised too
    assert torch.equal(context[:, :, 1:], torch.full((1, 4, 2, 2, 2), 0.5))
    assert torch.equal(state.context, torch.zeros(1, 4, 3, 2, 2))  # the state is not changed
    assert controls.next_context(VideoState(), None, CHUNK) is None


def test_a_finished_chunk_is_renormalised_then_locked_then_anchored():
    controls = DriftControls(renormalize=True, statistics_lock=1.0, anchor_frame=True)
    state = VideoState()
    generator = torch.Generator().manual_seed(0)
    first = controls.finish_chunk(torch.randn(1, 4, 3, 4, 4, generator=generator) * 3 + 1, state, CHUNK)
    assert torch.equal(state.anchor, first[:, :, :1])  # the anchor is the post-processed first frame
    assert torch.allclose(state.reference_statistics.flatten(1), channel_statistics(first).flatten(1))
    second = controls.finish_chunk(torch.randn(1, 4, 3, 4, 4, generator=generator) * 5 - 2, state, CHUNK)
    assert torch.allclose(channel_statistics(second), channel_statistics(first), atol=1e-5)  # locked last


# ---------------------------------------------------------------------------------------------
# The statistics lock


def test_the_statistics_lock_pulls_each_channel_toward_the_first_chunks_by_its_strength():
    generator = torch.Generator().manual_seed(1)
    first, drifted = torch.randn(2, 4, 3, 4, 4, generator=generator), torch.randn(2, 4, 3, 4, 4, generator=generator) * 2 + 3
    results = {}
    for strength in (0.0, 0.5, 1.0):
        state = VideoState()
        controls = DriftControls(statistics_lock=strength)
        assert torch.equal(controls.finish_chunk(first, state, CHUNK), first)  # the first chunk is the reference
        results[strength] = controls.finish_chunk(drifted, state, CHUNK)
    assert torch.equal(results[0.0], drifted)  # 0 is off
    assert torch.allclose(channel_statistics(results[1.0]), channel_statistics(first), atol=1e-5)
    assert torch.allclose(results[0.5], (drifted + results[1.0]) / 2, atol=1e-6)


def test_the_lock_reaches_the_next_context_and_each_chunk_keeps_the_first_chunks_statistics(pipeline, model):
    settings = Settings.from_options(timeline=[(0, "a red circle")], model=str(model), height=32, width=48, frames=3,
                                     context_frames=2, steps=2, statistics_lock=1.0)
    contexts = []
    prompts = Prompts([(0, pipeline.encode_prompt("a red circle"))])
    chunks = generate_latents(pipeline, settings.chunk, settings.drift, prompts, VideoState(),
                              torch.Generator().manual_seed(0), on_chunk=lambda i, context, e: contexts.append(context))
    made = [next(chunks) for _ in range(3)]
    for latents in made[1:]:
        assert torch.allclose(channel_statistics(latents), channel_statistics(made[0]), atol=1e-4)
    assert contexts[0] is None and torch.equal(contexts[2], made[1][:, :, -2:])  # the locked chunk is the context
    unlocked = generate_latents(pipeline, settings.chunk, DriftControls(statistics_lock=0.0), prompts, VideoState(),
                                torch.Generator().manual_seed(0))
    assert torch.equal(next(unlocked), made[0]) and not torch.equal(next(unlocked), made[1])


def test_a_locked_run_resumes_exactly_and_its_state_keeps_the_reference(model, tmp_path):
    arguments = ["--model", str(model), *FAST, "--prompt", "a red circle", "--statistics-lock", "0.7"]
    sample.main([*arguments, "--out", str(tmp_path / "resumed/"), "--chunks", "2"])
    settings, state, _ = load_state(state_path(str(tmp_path / "resumed/")))
    assert settings.drift.statistics_lock == 0.7 and state.reference_statistics.shape == (2, 1, 4, 1, 1, 1)
    sample.main(["--out", str(tmp_path / "resumed/"), "--resume", "--chunks", "4"])
    sample.main([*arguments, "--out", str(tmp_path / "whole/"), "--chunks", "4"])
    frames = lambda folder: np.stack([np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("*.png"))])
    assert np.array_equal(frames(tmp_path / "resumed"), frames(tmp_path / "whole"))
    with pytest.raises(ValueError, match="--statistics-lock 0.5 \\(the state file has 0.7\\)"):
        sample.main(["--out", str(tmp_path / "resumed/"), "--resume", "--chunks", "5", "--statistics-lock", "0.5"])


def test_evaluate_takes_the_lock_and_reports_every_control(model, capsys):
    report = evaluate.main(["--model", str(model), "--prompts", "a red circle moving left", "--seeds", "1",
                            "--chunks", "2", *FAST, "--statistics-lock", "0.5"])
    assert {name: report[name] for name in DRIFT_NAMES} == asdict(DriftControls(statistics_lock=0.5))


def test_evaluate_refuses_a_batch_only_for_the_controls_whose_statistics_span_it(model):
    assert [f.name for f in fields(DriftControls) if f.metadata["spans_batch"]] == ["renormalize"]
    assert DriftControls(renormalize=True, statistics_lock=0.5).spanning_batch() == ["renormalize"]
    with pytest.raises(ValueError, match="--batch must be 1 with --renormalize, whose statistics span the batch"):
        evaluate.main(["--model", str(model), "--prompts", "a red circle moving left", "--seeds", "2", "--batch", "2",
                       "--chunks", "1", *FAST, "--renormalize"])


# ---------------------------------------------------------------------------------------------
# The state the controls keep, and the geometry they see


def test_the_controls_see_each_chunks_geometry(pipeline, model):
    seen = []

    class Recording(DriftControls):
        def next_context(self, state, noise, chunk):
            seen.append(("next_context", chunk))
            return super().next_context(state, noise, chunk)

        def finish_chunk(self, latents, state, chunk):
            seen.append(("finish_chunk", chunk, latents.shape[2]))
            return super().finish_chunk(latents, state, chunk)

    settings = Settings.from_options(timeline=[(0, "a red circle")], model=str(model), height=32, width=48, frames=3,
                                     context_frames=2, steps=1)
    chunks = generate_latents(pipeline, settings.chunk, Recording(), Prompts([(0, pipeline.encode_prompt("a"))]),
                              VideoState(), torch.Generator().manual_seed(0))
    next(chunks), next(chunks)
    assert seen == [("next_context", settings.chunk), ("finish_chunk", settings.chunk, 3)] * 2
    assert settings.chunk == ChunkSpec(height=32, width=48, frames=3, context_frames=2, steps=1, guidance=9.0)


def test_a_new_tensor_field_of_the_state_is_found_moved_and_optional_in_older_state_files(monkeypatch):
    """A drift control's new state is one field: the state's tensors, its move to the device and the
    state file's check find it, and a state file written before it existed loads with its default."""
    older = vars(VideoState(chunk_index=2, frames_written=6, context=torch.zeros(1, 4, 2, 2, 2),
                            generator_state=torch.Generator().get_state()))
    Later = make_dataclass("Later", [("first_context", torch.Tensor | None, field(default=None))], bases=(VideoState,))
    monkeypatch.setattr(endless, "VideoState", Later)
    state = endless.state_from_dict(dict(older))
    assert isinstance(state, Later) and state.first_context is None and state.chunk_index == 2
    assert list(state.tensors()) == ["context", "anchor", "reference_statistics", "generator_state", "refiner_window",
                                     "matched_context", "latent_moments", "first_context"]
    state.first_context = torch.ones(1, 4, 2, 2, 2)
    state.to("cpu", torch.float64)
    assert state.first_context.dtype == torch.float64 and state.context.dtype == torch.float64
    assert state.generator_state.dtype == torch.uint8  # the generator's state stays bytes
    with pytest.raises(TypeError, match="first_context"):
        endless.state_from_dict({**older, "first_context": [1.0]})
    with pytest.raises(TypeError, match=r"unknown ones \['unknown'\]"):
        endless.state_from_dict({**older, "unknown": None})
    with pytest.raises(TypeError, match=r"lacks the fields \['anchor'\]"):
        endless.state_from_dict({name: value for name, value in older.items() if name != "anchor"})


def test_an_empty_newest_frame_restarts_that_video_from_its_first_frame():
    """Video 0's newest context frame is flat (spatial std 0: empty), video 1's has the anchor's
    spread: with empty_restart 0.5 only video 0's context becomes its first frame, every frame."""
    generator = torch.Generator().manual_seed(0)
    anchor = torch.randn(2, 4, 1, 3, 3, generator=generator)  # (b, 4, 1, h, w)
    context = torch.randn(2, 4, 2, 3, 3, generator=generator)
    context[0, :, 1] = 0.7  # flat
    state = VideoState(context=context, anchor=anchor)
    restarted = DriftControls(empty_restart=0.5).next_context(state, None, CHUNK)
    assert torch.equal(restarted[0], anchor[0].expand(4, 2, 3, 3))
    assert torch.equal(restarted[1], context[1])
    assert torch.equal(state.context, context)  # the state is not changed
    assert torch.equal(DriftControls().next_context(state, None, CHUNK), context)


def test_empty_restart_keeps_the_first_frame_without_the_anchor_frame_control():
    latents = torch.randn(1, 4, 3, 2, 2)
    state = VideoState()
    DriftControls(empty_restart=0.4).finish_chunk(latents, state, CHUNK)
    assert torch.equal(state.anchor, latents[:, :, :1])


def test_context_matching_is_the_earlier_releases_over_the_whole_stack(pipeline):
    """FluxDiff (the release's earlier version) matched each new chunk's per-channel mean and std to
    those of every latent made so far, clipped it to [-1, 1], and took its context from that; its
    frames kept their own latents. Rewritten here over the whole stack, in memory."""
    settings = Settings.from_options(timeline=[(0, "a red circle")], height=32, width=48, frames=3, context_frames=2,
                                     steps=2, context_matching=True)
    contexts = []
    chunks = generate_latents(pipeline, settings.chunk, settings.drift,
                              Prompts([(0, pipeline.encode_prompt("a red circle"))]), VideoState(),
                              torch.Generator().manual_seed(0), on_chunk=lambda index, context, _: contexts.append(context))
    made = [next(chunks) for _ in range(4)]
    for index in range(1, 4):
        stack, chunk = torch.cat(made[:index], dim=2), made[index - 1]
        axes = (0, 2, 3, 4)
        matched = ((chunk - chunk.mean(axes, keepdim=True)) * (stack.std(axes, keepdim=True)
                   / (chunk.std(axes, keepdim=True) + 1e-8)) + stack.mean(axes, keepdim=True)).clip(-1, 1)
        assert torch.allclose(contexts[index], matched[:, :, -2:], atol=1e-6)
    assert not torch.allclose(contexts[2], made[1][:, :, -2:])  # it does change the context


def test_with_context_matching_the_anchor_frame_and_empty_restart_apply_on_the_matched_context():
    """Matching comes first: the anchor replaces the matched context's oldest frame; an empty newest
    matched frame restarts from the first frame; then the noise."""
    matched, anchor = torch.full((1, 4, 3, 2, 2), 0.25), torch.full((1, 4, 1, 2, 2), 2.0)
    state = VideoState(context=torch.zeros(1, 4, 3, 2, 2), matched_context=matched, anchor=anchor)
    controls = DriftControls(context_matching=True, anchor_frame=True, context_noise=0.5)
    context = controls.next_context(state, lambda shape: torch.ones(shape), CHUNK)
    assert torch.equal(context[:, :, 0], torch.full((1, 4, 2, 2), 2.5))  # the anchor, noised
    assert torch.equal(context[:, :, 1:], torch.full((1, 4, 2, 2, 2), 0.75))  # the matched context, noised
    assert torch.equal(state.matched_context, torch.full((1, 4, 3, 2, 2), 0.25))  # the state is not changed
    anchor = torch.randn(1, 4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    state = VideoState(context=torch.randn(1, 4, 3, 2, 2), matched_context=matched, anchor=anchor)  # matched: flat
    restarted = DriftControls(context_matching=True, empty_restart=0.5).next_context(state, None, CHUNK)
    assert torch.equal(restarted, anchor.expand(1, 4, 3, 2, 2))
