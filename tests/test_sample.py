"""Endless generation: reproducible, streamed equals one call, flat memory, exact resume, bad input.

A tiny random checkpoint (temporal modules included, so the context matters) is written once;
`sample.main` runs in-process, and in a subprocess for the SIGKILL test.
"""

import gc
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import sample
from infra.checkpoint import load_checkpoint_config
from pipeline import StableDiffusionXLVideoPipeline
from endless import Prompts, VideoState, decoded_chunks, generate_latents, mix_embeddings, prompt_weights, state_path
from video_settings import Settings
from tiny_pipeline import tiny_video_pipeline
from vae import AutoencoderKL

REPOSITORY = Path(__file__).resolve().parents[1]
SIZE = ["--height", "32", "--width", "48"]  # latents 4 x 6
FAST = ["--steps", "3", "--frames", "3", "--context-frames", "2", *SIZE]


def run(model, out, *arguments, on_chunk=None):
    sample.main(["--model", str(model), "--out", str(out), *FAST, *arguments], on_chunk)


def png_frames(folder) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path)) for path in sorted(Path(folder).glob("*.png"))])


def settings(model, **overrides) -> Settings:
    values = dict(timeline=[(0, "a red circle moving left")], model=str(model), height=32, width=48, frames=3,
                  context_frames=2, steps=3)
    return Settings.from_options(**{**values, **overrides})


def test_same_seed_same_frames(model, tmp_path):
    run(model, tmp_path / "a/", "--prompt", "a red circle", "--chunks", "2", "--seed", "5")
    run(model, tmp_path / "b/", "--prompt", "a red circle", "--chunks", "2", "--seed", "5")
    run(model, tmp_path / "c/", "--prompt", "a red circle", "--chunks", "2", "--seed", "6")
    first, second, other = (png_frames(tmp_path / name) for name in "abc")
    assert first.shape == (6, 32, 48, 3)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


def test_streamed_chunks_equal_one_call_with_the_same_context(pipeline, model):
    config = settings(model)
    embeddings = [pipeline.encode_prompt("a red circle moving left")]
    generator = torch.Generator().manual_seed(0)
    state = VideoState()
    chunks = generate_latents(pipeline, config.chunk, config.drift, Prompts([(0, embeddings[0])]), state, generator)
    first = next(chunks)
    random_state = generator.get_state()
    second = next(chunks)
    one_call = pipeline(
        prompt_embeds=embeddings[0], height=32, width=48, num_frames=3, num_inference_steps=3, guidance_scale=9.0,
        generator=torch.Generator().set_state(random_state), previous_latents=first[:, :, -2:], output_type="latent",
    )
    assert torch.equal(second, one_call)
    no_context = pipeline(
        prompt_embeds=embeddings[0], height=32, width=48, num_frames=3, num_inference_steps=3, guidance_scale=9.0,
        generator=torch.Generator().set_state(random_state), output_type="latent",
    )
    assert not torch.allclose(second, no_context)  # the context reaches the output


def test_batch_of_two_equals_two_single_runs(model):
    """In float64, so that batched and single matrix products agree to far below the tolerance. The
    statistics lock keeps each video's own statistics (DriftControls' spans_batch)."""
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(model, dtype=torch.float64)
    config = settings(model, context_noise=0.1, statistics_lock=0.5)
    prompts = ["a red circle moving left", "a blue square moving up"]
    batch = generate_latents(pipeline, config.chunk, config.drift, Prompts([(0, pipeline.encode_prompt(prompts))]),
                             VideoState(), [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    singles = [generate_latents(pipeline, config.chunk, config.drift, Prompts([(0, pipeline.encode_prompt(p))]), VideoState(),
                                torch.Generator().manual_seed(s))
               for p, s in zip(prompts, (1, 2))]
    for _ in range(3):
        together = next(batch)
        alone = torch.cat([next(chunks) for chunks in singles])
        assert (together - alone).abs().max() <= 1e-9 * alone.abs().max()


def test_decoded_chunks_decode_with_the_pipelines_tiles(pipeline, model, monkeypatch):
    """The one way from latents to frames (evaluate, training's samples and validation, bench) goes
    through pipeline.decode_video: its tiling is honoured."""
    config = settings(model)
    prompts = Prompts([(0, pipeline.encode_prompt("a red circle"))])
    latents = next(generate_latents(pipeline, config.chunk, config.drift, prompts, VideoState(), torch.Generator().manual_seed(0)))
    tiled = []
    decode_tiled = AutoencoderKL.decode_tiled
    monkeypatch.setattr(AutoencoderKL, "decode_tiled", lambda self, z: tiled.append(z.shape[0]) or decode_tiled(self, z))
    monkeypatch.setattr(pipeline, "vae_tiles", True)
    frames = next(decoded_chunks(pipeline, config.chunk, config.drift, prompts, VideoState(),
                                 torch.Generator().manual_seed(0), decode_frames=2))
    assert tiled == [2, 1]  # 3 frames, 2 at a time, each in tiles
    video = pipeline.vae.decode_video(latents, tiles=True)[0].detach()  # (3, frames, H, W) in [-1, 1]
    expected = ((video.permute(1, 2, 3, 0).numpy() / 2 + 0.5).clip(0, 1) * 255).round().astype(np.uint8)
    assert len(frames) == 1 and frames[0].dtype == np.uint8 and np.array_equal(frames[0], expected)


def tensor_bytes() -> int:
    """Bytes of every tensor alive in the process."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return sum(t.untyped_storage().nbytes() for t in tensors if t.device.type != "meta")


def test_memory_does_not_grow_with_chunks(pipeline, model):
    config = settings(model, steps=1, anchor_frame=True, context_noise=0.05, renormalize=True)
    chunks = generate_latents(pipeline, config.chunk, config.drift, Prompts([(0, pipeline.encode_prompt("a red circle"))]),
                              VideoState(), torch.Generator().manual_seed(0))
    held = {}
    for index in range(1, 51):
        latents = next(chunks)
        del latents
        if index in (5, 50):
            held[index] = tensor_bytes()
    assert held[5] == held[50]


def wait_for_chunks(state_file: Path, chunks: int, process, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if state_file.exists():
            try:
                if torch.load(state_file, weights_only=True)["state"]["chunk_index"] >= chunks:
                    return
            except (EOFError, RuntimeError):
                pass
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    raise TimeoutError


@pytest.mark.parametrize("out_name", ["frames/", "video.mp4"])
def test_resume_after_sigkill_equals_uninterrupted_run(model, tmp_path, out_name):
    arguments = ["--prompt", "a red circle", "--chunks", "6", "--steps", "6", "--frames", "3", "--context-frames", "2",
                 *SIZE, "--model", str(model), "--fps", "5"]
    killed = tmp_path / "killed" / out_name
    killed.parent.mkdir()
    command = [sys.executable, str(REPOSITORY / "sample.py"), *arguments, "--out", str(killed)]
    process = subprocess.Popen(command, cwd=REPOSITORY, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_chunks(state_path(str(killed)), 3, process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    complete_chunks = torch.load(state_path(str(killed)), weights_only=True)["state"]["frames_written"] // 3
    assert 3 <= complete_chunks < 6

    if out_name == "video.mp4":  # the killed file plays up to its last complete chunk, at the right fps
        with av.open(str(killed)) as container:
            stream = container.streams.video[0]
            decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            assert stream.average_rate == 5
        assert len(decoded) % 3 == 0 and len(decoded) >= 3 * complete_chunks

    sample.main(["--out", str(killed), "--resume", "--chunks", "6"])
    uninterrupted = tmp_path / "uninterrupted" / out_name
    uninterrupted.parent.mkdir()
    sample.main([*arguments, "--out", str(uninterrupted)])
    if out_name == "frames/":
        assert np.array_equal(png_frames(killed), png_frames(uninterrupted))
    else:
        decode = lambda path: np.stack([f.to_ndarray(format="rgb24") for f in av.open(str(path)).decode(video=0)])
        assert np.array_equal(decode(killed), decode(uninterrupted))


def test_extend_starts_from_the_encoded_last_frames(model, pipeline, tmp_path):
    source = tmp_path / "source.mp4"
    run(model, source, "--prompt", "a red circle", "--chunks", "2")
    with av.open(str(source)) as container:  # an independent decoder
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    last_frames = torch.from_numpy(frames[-2:]).permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, 2, H, W)
    expected = pipeline.vae.encode_video(last_frames[None])  # (1, 4, 2, h, w)
    contexts = []
    run(model, tmp_path / "extended/", "--prompt", "a blue square", "--chunks", "1", "--extend", str(source),
        on_chunk=lambda index, context, embeddings: contexts.append(context))
    assert (contexts[0] - expected).abs().max() <= 1e-5


def test_timeline_placed_chunks_get_the_pure_prompts(pipeline):
    timeline = sample.parse_timeline(["a red circle", "a blue square@3", "a green circle@2s"], fps=6, frames=3)
    assert timeline == [(0, "a red circle"), (3, "a blue square"), (4, "a green circle")]
    embeddings = [pipeline.encode_prompt(text) for _, text in timeline]
    for chunk, entry in ((0, 0), (3, 1), (4, 2)):
        mixed = mix_embeddings([(embeddings[e], w) for e, w in prompt_weights(timeline, chunk, transition=2)])
        assert all(torch.equal(a, b) for a, b in zip(mixed, embeddings[entry]))
    assert prompt_weights([(0, "a"), (6, "b")], chunk=5, transition=2) == [(0, pytest.approx(1 / 3)), (1, pytest.approx(2 / 3))]
    assert prompt_weights([(0, "a"), (6, "b")], chunk=3, transition=2) == [(0, 1.0)]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--height", "0"], "--height"),
        (["--width", "50"], "--width"),
        (["--frames", "0"], "--frames"),
        (["--context-frames", "5"], "--context-frames"),
        (["--chunks", "0"], "--chunks"),
        (["--out", "OUT/video.avi"], "--out"),
        (["--out", "OUT/missing-folder/video.mp4"], "--out"),
        (["--image", "OUT/missing.png"], "missing.png"),
        (["--extend", "OUT/missing.mp4"], "missing.mp4"),
        (["--resume"], "--resume"),
        (["--prompt", "text@x"], "--prompt"),
    ],
)
def test_bad_input_fails_before_any_file_is_touched(model, tmp_path, arguments, message):
    arguments = [a.replace("OUT", str(tmp_path)) for a in arguments]
    defaults = ["--prompt", "a red circle", "--model", str(model), "--out", str(tmp_path / "video.mp4"), "--chunks", "1", *SIZE]
    with pytest.raises(ValueError, match=message):
        sample.main(defaults + arguments)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_without_overwrite(model, tmp_path):
    out = tmp_path / "video.mp4"
    out.write_bytes(b"precious")
    with pytest.raises(ValueError, match="--overwrite"):
        run(model, out, "--prompt", "a red circle", "--chunks", "1")
    assert out.read_bytes() == b"precious"


def test_timeline_through_the_command_line(model, pipeline, tmp_path):
    used = []
    run(model, tmp_path / "out/", "--prompt", "a red circle", "--prompt", "a blue square@3", "--transition", "2",
        "--chunks", "4", on_chunk=lambda index, context, embeddings: used.append(embeddings))
    red, blue = pipeline.encode_prompt("a red circle"), pipeline.encode_prompt("a blue square")
    assert all(torch.equal(a, b) for a, b in zip(used[0], red))
    assert all(torch.equal(a, b) for a, b in zip(used[3], blue))
    halfway = used[2].prompt_embeds
    assert torch.allclose(halfway, (red.prompt_embeds + 2 * blue.prompt_embeds) / 3, atol=1e-6)


def test_model_defaults_apply_and_the_command_line_overrides_them(tmp_path):
    folder = tmp_path / "model"
    tiny_video_pipeline(tmp_path / "tokenizer").save_pretrained(
        folder, sample_defaults={"anchor_frame": True, "guidance": 2.0, "steps": 3})
    config = load_checkpoint_config(folder)
    defaults = sample.with_model_defaults(sample.parse_arguments(["--model", str(folder), "--prompt", "a"]), config)
    assert (defaults.drift.anchor_frame, defaults.guidance, defaults.steps, defaults.drift.renormalize) == (True, 2.0, 3, False)
    given = sample.with_model_defaults(sample.parse_arguments(
        ["--model", str(folder), "--prompt", "a", "--no-anchor-frame", "--guidance", "5", "--renormalize"]), config)
    assert (given.drift.anchor_frame, given.guidance, given.drift.renormalize) == (False, 5.0, True)


def test_the_run_builds_no_autograd_graph(model, tmp_path, monkeypatch):
    """Without it the VAE decode kept every activation for a backward pass: 2.7 GB instead of 1 GB at 512x512."""
    grad_enabled = []
    decode = AutoencoderKL.decode_video
    monkeypatch.setattr(AutoencoderKL, "decode_video",
                        lambda self, *a, **kw: grad_enabled.append(torch.is_grad_enabled()) or decode(self, *a, **kw))
    run(model, tmp_path / "video.mp4", "--prompt", "a red circle", "--chunks", "2")
    assert grad_enabled == [False, False]


@pytest.mark.parametrize("position", ["1e308s", "99999999999999999999999", "-1", "inf s"])
def test_a_timeline_position_past_any_chunk_is_one_line(position):
    with pytest.raises(ValueError, match="after the last '@' give a chunk index"):
        sample.main(["--prompt", "a", "--prompt", f"b@{position}", "--chunks", "1", "--out", "unused.gif"])
