"""The refiner in the endless loop: streamed as the published FlowingFrames program uses it.

The reference is the published loop, rewritten here in memory (../shared/fixtures/original-refiner-tiny/
README.md, "How the published system uses it"): every chunk is appended to a stack of all latents; once
the stack holds more than two chunks, its last two chunks' latents are replaced by the refiner's output;
the next context is the stack's last latents, after refining; the video is the stack decoded from
latent 7 on, at the end. Our loop keeps only the refiner's window and writes a frame once it has left it.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from endless import Prompts, VideoState, final_latents, frames_of, generate_latents, state_path, unfinished
from refiner import Refiner, RefinerConfig
from tiny_pipeline import perturbed, tiny_video_pipeline
from video_settings import DriftControls, Settings

FRAMES, CONTEXT, SKIP = 3, 2, 4  # the release: 6, 4 and 7 (a chunk and a frame)
TINY_REFINER = RefinerConfig(inner_channels=16, spatial_heads=2, spatial_head_dim=8, spatial_layers=1,
                             temporal_heads=2, temporal_head_dim=8, temporal_layers=1, norm_num_groups=8,
                             out_norm_num_groups=8)
ARGUMENTS = ["--prompt", "a red circle", "--steps", "2", "--frames", str(FRAMES), "--context-frames", str(CONTEXT),
             "--height", "32", "--width", "48", "--guidance", "3", "--decode-frames", "1"]


@pytest.fixture(scope="module")
def refined_model(tmp_path_factory):
    """A tiny checkpoint with a refiner whose every weight is random (its conv_out too, so it changes
    what it refines)."""
    pipeline = tiny_video_pipeline(tmp_path_factory.mktemp("tokenizer"))
    torch.manual_seed(1)
    pipeline.refiner = perturbed(Refiner(TINY_REFINER), scale=0.2)
    folder = tmp_path_factory.mktemp("refined_model")
    pipeline.save_pretrained(folder, sample_defaults={"refiner": True, "skip_frames": SKIP})
    return folder


def published_loop(pipeline, chunks: int, settings: Settings) -> torch.Tensor:
    """The published program's latents, all of them in memory: (1, 4, chunks * frames, h, w)."""
    generator = torch.Generator().manual_seed(settings.seed)
    embeddings = pipeline.encode_prompt(settings.timeline[0][1], do_classifier_free_guidance=True)
    stack, context = None, None
    for _ in range(chunks):
        latents = pipeline(prompt_embeds=embeddings, height=settings.height, width=settings.width,
                           num_frames=FRAMES, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                           generator=generator, previous_latents=context, output_type="latent")
        stack = latents if stack is None else torch.cat([stack, latents], dim=2)
        if stack.shape[2] > 2 * FRAMES:
            stack[:, :, -2 * FRAMES:] = pipeline.refiner(stack[:, :, -2 * FRAMES:])
        context = stack[:, :, -CONTEXT:]
    return stack


def png_frames(folder) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path)) for path in sorted(folder.glob("*.png"))])


@torch.no_grad()
def test_the_streamed_loop_makes_the_published_loops_latents(refined_model):
    from pipeline import StableDiffusionXLVideoPipeline

    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(refined_model)
    settings = Settings(timeline=[(0, "a red circle")], height=32, width=48, frames=FRAMES, context_frames=CONTEXT,
                        steps=2, guidance=3.0)
    expected = published_loop(pipeline, 5, settings)

    state = VideoState()
    prompts = Prompts([(0, pipeline.encode_prompt("a red circle", do_classifier_free_guidance=True))])
    chunks = generate_latents(pipeline, settings.chunk, DriftControls(), prompts, state,
                              torch.Generator().manual_seed(settings.seed), refine=True)
    streamed = [next(chunks) for _ in range(5)]
    assert [latents.shape[2] for latents in streamed] == [0, 0, 3, 3, 3]  # each leaves the window two chunks late
    assert final_latents(state, FRAMES) == 9 and unfinished(state).shape[2] == 6
    assert torch.equal(torch.cat([*streamed, unfinished(state)], dim=2), expected)
    # the refiner changed what it refined: the loop would pass with an identity refiner only by accident
    assert not torch.allclose(expected[:, :, 3:], published_loop_without_refiner(pipeline, settings)[:, :, 3:])


def published_loop_without_refiner(pipeline, settings: Settings) -> torch.Tensor:
    refiner, pipeline.refiner = pipeline.refiner, (lambda latents: latents)
    try:
        return published_loop(pipeline, 5, settings)
    finally:
        pipeline.refiner = refiner


def test_sample_writes_the_published_video_frame_for_frame(refined_model, tmp_path, capsys):
    """sample.py with the model's recipe (refiner on, 4 frames skipped) writes the stack decoded from
    latent 4 on: 5 chunks of 3 frames, 11 frames, the last 6 of them written at the end."""
    from pipeline import StableDiffusionXLVideoPipeline

    out = tmp_path / "frames"
    sample.main(["--model", str(refined_model), *ARGUMENTS, "--chunks", "5", "--out", f"{out}/"])
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(refined_model)
    settings = Settings(timeline=[(0, "a red circle")], height=32, width=48, frames=FRAMES, context_frames=CONTEXT,
                        steps=2, guidance=3.0)
    with torch.no_grad():
        expected = frames_of(pipeline, published_loop(pipeline, 5, settings)[:, :, SKIP:], decode_frames=1)[0]
    assert np.array_equal(png_frames(out), expected)
    assert f"{out}/: 11 frames" in capsys.readouterr().err  # the window's, written at the end, counted
    saved = torch.load(state_path(f"{out}/"), weights_only=True)
    assert saved["state"]["frames_written"] == 5 and saved["state"]["latents_made"] == 15  # the window's 6 not counted


@pytest.mark.parametrize("out_name", ["frames/", "video.mp4"])
def test_a_run_stopped_inside_a_refined_window_resumes_byte_identical(refined_model, tmp_path, out_name):
    """Stopped after chunk 4 (its window refined twice over), resumed to 7 chunks; the same as one run."""
    def stop_at_chunk_4(index, context, embeddings):
        if index == 4:
            raise KeyboardInterrupt

    stopped, whole = tmp_path / "stopped" / out_name, tmp_path / "whole" / out_name
    stopped.parent.mkdir(), whole.parent.mkdir()
    common = ["--model", str(refined_model), *ARGUMENTS, "--fps", "5"]
    sample.main([*common, "--chunks", "7", "--out", str(stopped)], on_chunk=stop_at_chunk_4)
    assert torch.load(state_path(str(stopped)), weights_only=True)["state"]["chunk_index"] == 4
    sample.main(["--out", str(stopped), "--resume", "--chunks", "7"])
    sample.main([*common, "--chunks", "7", "--out", str(whole)])
    if out_name == "frames/":
        assert len(list(whole.glob("*.png"))) == 7 * FRAMES - SKIP
        assert np.array_equal(png_frames(stopped), png_frames(whole))
    else:
        assert stopped.read_bytes() == whole.read_bytes()


def test_extending_a_finished_run_rewrites_its_last_window(refined_model, tmp_path):
    """The frames of a finished run's window are written at its end; resuming it for more chunks
    writes them again as the later chunks refine them: the same as the longer run made at once."""
    short, long = tmp_path / "short", tmp_path / "long"
    sample.main(["--model", str(refined_model), *ARGUMENTS, "--chunks", "4", "--out", f"{short}/"])
    assert len(list(short.glob("*.png"))) == 4 * FRAMES - SKIP
    sample.main(["--out", f"{short}/", "--resume", "--chunks", "6"])
    sample.main(["--model", str(refined_model), *ARGUMENTS, "--chunks", "6", "--out", f"{long}/"])
    assert np.array_equal(png_frames(short), png_frames(long))


def test_the_refiner_can_be_turned_off_and_is_refused_for_a_model_without_one(refined_model, model, tmp_path, capsys):
    sample.main(["--model", str(refined_model), *ARGUMENTS, "--chunks", "2", "--refiner", "off", "--skip-frames", "0",
                 "--out", f"{tmp_path / 'off'}/"])
    assert len(list((tmp_path / "off").glob("*.png"))) == 2 * FRAMES
    with pytest.raises(ValueError, match="^--refiner on: the model .* has no refiner") as refused:
        sample.main(["--model", str(model), *ARGUMENTS, "--chunks", "2", "--refiner", "on",
                     "--out", f"{tmp_path / 'none'}/"])
    assert "\n" not in str(refused.value) and not (tmp_path / "none").exists()
    with pytest.raises(SystemExit):
        sample.main(["--model", str(refined_model), *ARGUMENTS, "--refiner", "maybe", "--out", f"{tmp_path / 'x'}/"])
    assert "--refiner" in capsys.readouterr().err


@torch.no_grad()
def test_offload_moves_the_refiner_in_when_it_runs_and_changes_no_number(refined_model):
    from pipeline import StableDiffusionXLVideoPipeline

    settings = Settings(timeline=[(0, "a red circle")], height=32, width=48, frames=FRAMES, context_frames=CONTEXT,
                        steps=2, guidance=3.0)
    made = []
    for offload in (None, "model"):
        pipeline = StableDiffusionXLVideoPipeline.from_pretrained(refined_model)
        if offload:
            pipeline.enable_offload(offload, "cpu")
        prompts = Prompts([(0, pipeline.encode_prompt("a red circle", do_classifier_free_guidance=True))])
        state = VideoState()
        chunks = generate_latents(pipeline, settings.chunk, DriftControls(), prompts, state,
                                  torch.Generator().manual_seed(0), refine=True)
        made.append(torch.cat([next(chunks) for _ in range(3)] + [unfinished(state)], dim=2))
    assert torch.equal(made[0], made[1])
    events = pipeline.offload.events
    assert events.index(("refiner", "in")) == events.index(("unet", "out")) + 1  # after the third chunk's steps


def test_a_recipe_by_name_replaces_the_models_defaults_and_options_still_win(refined_model, tmp_path):
    """The model stores the published recipe (refiner on, frames skipped); --recipe seed puts the seed
    text's over it whole; an option given wins over both; --resume refuses a recipe the run did not use."""
    out = tmp_path / "seed"
    sample.main(["--model", str(refined_model), *ARGUMENTS, "--recipe", "seed", "--frames", str(FRAMES),
                 "--context-frames", str(CONTEXT), "--steps", "2", "--chunks", "2", "--out", f"{out}/"])
    stored = torch.load(state_path(f"{out}/"), weights_only=True)["settings"]
    assert (stored["refiner"], stored["skip_frames"], stored["guidance"], stored["negative_prompt"]) == (False, 0, 3.0, "")
    assert len(list(out.glob("*.png"))) == 2 * FRAMES
    with pytest.raises(ValueError, match="--recipe flowingframes"):
        sample.main(["--out", f"{out}/", "--resume", "--chunks", "3", "--recipe", "flowingframes"])


def test_evaluate_scores_the_refined_frames_chunk_by_chunk(refined_model):
    """evaluate.py's chunks with a refiner: each chunk's frames once they are final, two chunks late
    (the last two chunks made are not scored), equal to the published loop's."""
    import evaluate
    from pipeline import StableDiffusionXLVideoPipeline

    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(refined_model)
    settings = Settings(timeline=[(0, "a red circle")], height=32, width=48, frames=FRAMES, context_frames=CONTEXT,
                        steps=2, guidance=3.0, refiner=True, decode_frames=1)
    scored = list(evaluate.made_chunks(pipeline, [settings], 3))
    with torch.no_grad():
        expected = published_loop(pipeline, 5, settings)
    for index, chunk in enumerate(scored):
        latents = expected[:, :, index * FRAMES:(index + 1) * FRAMES]
        assert np.array_equal(chunk[0], frames_of(pipeline, latents, decode_frames=1)[0])


def test_evaluate_takes_the_models_recipe_or_a_named_one(refined_model):
    import evaluate

    with pytest.raises(ValueError, match="its recipe skips 4 frames"):
        evaluate.settings_for(evaluate.parse_arguments(["--model", str(refined_model)]), "a red circle", 0)
    settings = evaluate.settings_for(evaluate.parse_arguments(["--model", str(refined_model), "--recipe", "seed"]),
                                     "a red circle", 0)
    assert (settings.refiner, settings.skip_frames, settings.steps, settings.guidance) == (False, 0, 50, 9.0)


# Regressions of a review: options that were silently ignored or refused late


@pytest.mark.parametrize("extra, named", [(["--skip-frames", "2", "--refiner", "off"], "--skip-frames"),
                                          ([], "--refiner on")])  # the refiner and skip from the model's defaults
def test_drop_first_chunk_with_skipped_frames_or_the_refiner_is_refused_in_one_line(refined_model, tmp_path, extra,
                                                                                    named):
    with pytest.raises(ValueError, match=f"^--drop-first-chunk is not taken with {named} .*--skip-frames {FRAMES} "
                                         r"\(skip-frames = frames\)"):
        sample.main(["--model", str(refined_model), *ARGUMENTS, "--chunks", "2", "--drop-first-chunk", *extra,
                     "--out", f"{tmp_path / 'v'}/"])
    assert not (tmp_path / "v").exists()


def test_skipping_every_frame_is_refused_and_a_run_that_writes_nothing_says_so(refined_model, tmp_path, capsys):
    with pytest.raises(ValueError, match=f"^--skip-frames {SKIP} skips all {FRAMES} frames of --chunks 1: nothing"):
        sample.main(["--model", str(refined_model), *ARGUMENTS, "--chunks", "1", "--out", f"{tmp_path / 'v'}/"])
    assert not (tmp_path / "v").exists()
    sample.main(["--model", str(refined_model), *ARGUMENTS, "--seconds", "0.5", "--out", f"{tmp_path / 's'}/"])
    assert f"nothing was written: the run made {FRAMES} frames, none past --skip-frames {SKIP}" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--scheduler", "lcm", "--steps", "51"], "^--steps 51: the lcm timestep spacing .* takes at most 50 steps"),
    (["--timestep-spacing", "lcm", "--steps", "60"], "^--steps 60: the lcm timestep spacing"),
    (["--steps", "1001"], "^--steps 1001: the model has 1000 training timesteps")])
def test_too_many_steps_are_refused_naming_steps_before_the_weights_load(refined_model, tmp_path, monkeypatch, extra,
                                                                         message):
    from pipeline import StableDiffusionXLVideoPipeline

    monkeypatch.setattr(StableDiffusionXLVideoPipeline, "from_pretrained", None)  # loading would fail
    with pytest.raises(ValueError, match=message):
        sample.main(["--model", str(refined_model), *ARGUMENTS, "--chunks", "3", *extra, "--out", f"{tmp_path / 'v'}/"])


def test_a_refiner_from_a_recipe_names_the_recipe_and_resume_says_on_or_off(refined_model, model, tmp_path):
    with pytest.raises(ValueError, match="^--recipe flowingframes turns the refiner on, but the model .* has no "
                                         "refiner: give --refiner off"):
        sample.main(["--model", str(model), *ARGUMENTS, "--recipe", "flowingframes", "--chunks", "2",
                     "--out", f"{tmp_path / 'none'}/"])
    out = f"{tmp_path / 'off'}/"
    sample.main(["--model", str(refined_model), *ARGUMENTS, "--chunks", "1", "--refiner", "off", "--skip-frames", "0",
                 "--out", out])
    with pytest.raises(ValueError, match=r"--refiner on \(the state file has off\)"):
        sample.main(["--out", out, "--resume", "--chunks", "2", "--refiner", "on"])
