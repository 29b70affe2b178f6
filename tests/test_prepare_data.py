"""tools/prepare_data.py and training/data.py: windows reached by a seek are the frames a full decode gives;
shards hold what diffusers' VAE and SDXL text encoding give for those frames and captions; training
from shards equals training from the videos; a killed preparation resumes to the same bytes, also
split over processes; train.py refuses shards made for another run; bad options are one line and
touch nothing. DataLoader workers give the batches the main process gives."""

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import imageio_ffmpeg
import numpy as np
import pytest
import torch

from tools import prepare_data
import train
from training import data as video_data
from pipeline import StableDiffusionXLVideoPipeline
from scheduler import SchedulerConfig
from tiny_pipeline import diffusers_tiny_pipeline, ours_from_diffusers, tiny_video_pipeline
from train import TrainConfig
from infra.video_io import read_video

REPOSITORY = Path(__file__).resolve().parents[1]
SIZE, CONTEXT, FRAMES = 32, 2, 4
# name -> (frames, caption); .gif and .mp4, several lengths; "short" has too few frames for a clip.
VIDEOS = {"a.mp4": (23, "a red circle moving left"), "b.mp4": (13, "a blue square moving up"),
          "c.gif": (9, "a green circle turning"), "short.mp4": (3, "too short")}
SMALL = dict(size=SIZE, context_frames=CONTEXT, frames=FRAMES, batch_size=2, warmup_steps=1, log_every=1000,
             sample_every=1000, threads=1, context_drop=0.0, text_drop=0.3, unet_steps=3)


def write_video(path: Path, num_frames: int, seed: int) -> None:
    """A 40x48 video of a square moving over a gradient, with noise: every frame differs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:40, 0:48]
    frames = []
    for index in range(num_frames):
        frame = np.stack([x * 5, y * 6, np.full_like(x, 40 * seed)], axis=-1).astype(np.float64)
        frame[10:22, 2 + 2 * index:14 + 2 * index] = (250, 30, 90)
        frames.append(np.clip(frame + rng.normal(0, 12, frame.shape), 0, 255).astype(np.uint8))
    if path.suffix == ".gif":
        imageio.mimsave(path, frames, duration=100, loop=0)
        return
    writer = imageio_ffmpeg.write_frames(str(path), (48, 40), fps=24, codec="libx264", macro_block_size=1,
                                         output_params=["-g", "30", "-crf", "18"])
    writer.send(None)
    for frame in frames:
        writer.send(frame.tobytes())
    writer.close()


def video_folder(folder: Path, videos: dict) -> Path:
    """Videos with captions: sidecar .txt files, and metadata.jsonl for the last one."""
    folder.mkdir()
    for seed, (name, (num_frames, caption)) in enumerate(videos.items()):
        write_video(folder / name, num_frames, seed)
        if seed < len(videos) - 1:
            (folder / name).with_suffix(".txt").write_text(caption)
        else:
            (folder / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": caption}) + "\n")
    return folder


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = video_folder(tmp_path_factory.mktemp("data") / "videos", VIDEOS)
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    (folder / "broken.txt").write_text("a broken file")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """diffusers' tiny SDXL pipeline, the oracle, and a checkpoint folder of ours with its weights."""
    pipeline = diffusers_tiny_pipeline(tmp_path_factory.mktemp("tokenizer"), SchedulerConfig.video_model())
    folder = tmp_path_factory.mktemp("model") / "checkpoint"
    ours_from_diffusers(pipeline, SchedulerConfig.video_model()).save_pretrained(folder)
    return pipeline, folder


def prepare(model, data, out, *options):
    prepare_data.main(["--model", str(model), "--data", str(data), "--out", str(out), "--size", str(SIZE),
                       "--context-frames", str(CONTEXT), "--frames", str(FRAMES), "--threads", "1", *options])


def files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def shards(reference, videos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "shards"
    prepare(reference[1], videos, out, "--clips-per-video", "3", "--videos-per-shard", "2")
    return out


def decoded_clip(path: Path, start: int, stride: int = 1) -> torch.Tensor:
    """The clip as a full decode gives it (video_io.read_video): (3, frames, SIZE, SIZE)."""
    video, _ = read_video(str(path), SIZE, SIZE)
    return video[:, ::stride][:, start:start + CONTEXT + FRAMES]


@pytest.mark.parametrize("name", ["a.mp4", "b.mp4", "c.gif"])
@pytest.mark.parametrize("stride", [1, 2])
def test_windows_reached_by_a_seek_are_the_frames_a_full_decode_gives(videos, name, stride):
    num_frames = CONTEXT + FRAMES if stride == 1 else 3
    length = video_data.video_length(videos / name)
    assert length[0] == VIDEOS[name][0]
    strided = -(-length[0] // stride)
    starts = video_data.window_starts(strided, num_frames, 3)
    assert starts[0] == 0 and starts[-1] == strided - num_frames
    windows = video_data.read_windows(videos / name, starts, num_frames, stride, SIZE, length)
    full, _ = read_video(str(videos / name), SIZE, SIZE)
    for start, window in zip(starts, windows):
        assert torch.equal(window, full[:, ::stride][:, start:start + num_frames])


def test_shards_hold_what_diffusers_vae_and_text_encoders_give(reference, videos, shards):
    pipeline, _ = reference
    index = json.loads((shards / "index.json").read_text())
    assert index["settings"]["size"] == SIZE and index["dtype"] == "fp32"
    assert index["latent_shape"] == [4, CONTEXT + FRAMES, SIZE // 8, SIZE // 8]
    assert sorted(name for name, _ in index["skipped"]) == ["broken.mp4", "short.mp4"]
    from safetensors.torch import load_file

    clips = 0
    for shard in index["shards"]:
        tensors = load_file(shards / shard["file"])
        row = 0
        for text_row, (name, count) in enumerate(shard["videos"]):
            frames, caption = VIDEOS[name]
            starts = video_data.window_starts(frames, CONTEXT + FRAMES, 3)
            assert count == len(starts)
            for start in starts:
                clip = decoded_clip(videos / name, start).transpose(0, 1)  # (frames, 3, H, W)
                with torch.no_grad():
                    expected = pipeline.vae.encode(clip).latent_dist.mean * pipeline.vae.config.scaling_factor
                stored = tensors["latents"][row].transpose(0, 1)  # (frames, 4, h, w)
                assert torch.allclose(stored, expected, atol=1e-5, rtol=1e-5)
                row += 1
            with torch.no_grad():
                text, _, pooled, _ = pipeline.encode_prompt(caption, device=torch.device("cpu"),
                                                            do_classifier_free_guidance=False)
            assert torch.allclose(tensors["text"][text_row], text[0], atol=1e-5)
            assert torch.allclose(tensors["pooled"][text_row], pooled[0], atol=1e-5)
        clips += row
    assert clips == index["clips"] == 3 + 3 + 3  # a, b and c: 3 windows each; short and broken: none


def test_training_from_shards_equals_training_from_the_videos(reference, tmp_path):
    # One window per video (each exactly a clip long): both data sets then give the same clip for each sample.
    data = video_folder(tmp_path / "videos", {f"{n}.mp4": (CONTEXT + FRAMES, f"a circle {n}") for n in range(3)})
    model = reference[1]
    prepare(model, data, tmp_path / "shards", "--clips-per-video", "1")
    weights = []
    for name, source, workers in (("videos", data, 0), ("workers", data, 2), ("shards", tmp_path / "shards", 0)):
        config = TrainConfig(mode="temporal", model=str(model), data=str(source), out=str(tmp_path / f"run-{name}"),
                             workers=workers, **SMALL)
        weights.append(train.train(config).unet.state_dict())
    start = StableDiffusionXLVideoPipeline.from_pretrained(model).unet.state_dict()
    assert any(not torch.equal(weights[0][key], start[key]) for key in start)  # it trained
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in start)  # workers: the same batches
    assert max((weights[0][key] - weights[2][key]).abs().max().item() for key in start) <= 1e-6


def test_a_killed_preparation_resumes_to_the_same_bytes(reference, videos, shards, tmp_path, monkeypatch):
    out, made = tmp_path / "shards", []
    make_shard = prepare_data.make_shard

    def killed_after_one(pipeline, args, items, path, *rest):
        if made:  # killed while writing the second shard: its temporary file is left
            path.with_name(path.name + ".99999.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        made.append(path)
        return make_shard(pipeline, args, items, path, *rest)

    monkeypatch.setattr(prepare_data, "make_shard", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        prepare(reference[1], videos, out, "--clips-per-video", "3", "--videos-per-shard", "2")
    assert not (out / "index.json").exists() and len(list(out.glob("shard-*.safetensors"))) == 1
    config = TrainConfig(mode="temporal", model=str(reference[1]), data=str(out), out=str(tmp_path / "run"), **SMALL)
    with pytest.raises(ValueError, match="has not finished"):
        train.train(config)
    monkeypatch.setattr(prepare_data, "make_shard", make_shard)
    prepare(reference[1], videos, out, "--clips-per-video", "3", "--videos-per-shard", "2")
    assert files(out) == files(shards)


def test_each_process_under_torchrun_makes_its_own_shards(reference, videos, shards, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):  # process 1 first: the index waits for the last shard
        monkeypatch.setenv("RANK", rank)
        prepare(reference[1], videos, out, "--clips-per-video", "3", "--videos-per-shard", "2")
        if rank == "1":
            assert sorted(path.name for path in out.glob("shard-*")) == ["shard-00001.safetensors"]
    assert files(out) == files(shards)


def test_train_refuses_shards_made_for_another_run(reference, shards, tmp_path):
    other = tmp_path / "other"
    tiny_video_pipeline(tmp_path / "tokenizer", seed=1).save_pretrained(other)  # another VAE and text encoders
    base = dict(mode="temporal", model=str(reference[1]), data=str(shards), out=str(tmp_path / "run"))
    for overrides, message in [(dict(model=str(other)), "the VAE of"), (dict(size=64), "--size 32; this run has 64"),
                               (dict(frames=3), r"--context-frames \+ --frames 6; this run has 5"),
                               (dict(frame_stride=2), "--frame-stride 1; this run has 2"),
                               (dict(mode="baby", model=""), "mode temporal only")]:
        config = TrainConfig(**{**SMALL, **base, **overrides})
        with pytest.raises(ValueError, match=message):
            train.train(config)
        assert not (tmp_path / "run").exists()  # refused before any work
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in shards.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "shard-00001.safetensors").write_bytes(b"cut")
    with pytest.raises(ValueError, match="shard-00001.safetensors"):
        video_data.make_data(TrainConfig(**{**SMALL, **base, "data": str(broken)}))


def test_resuming_with_other_settings_is_refused(reference, videos, shards, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for path in shards.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    before = files(out)
    with pytest.raises(ValueError, match="--clips-per-video 3 -> 2"):
        prepare(reference[1], videos, out, "--clips-per-video", "2", "--videos-per-shard", "2")
    (videos / "d.mp4").write_bytes((videos / "a.mp4").read_bytes())
    (videos / "d.txt").write_text("a video added since")
    try:
        with pytest.raises(ValueError, match="--data .videos added"):
            prepare(reference[1], videos, out, "--clips-per-video", "3", "--videos-per-shard", "2")
    finally:
        (videos / "d.mp4").unlink()
        (videos / "d.txt").unlink()
    prepare(reference[1], videos, out, "--clips-per-video", "3", "--videos-per-shard", "2")  # done: nothing to make
    assert files(out) == before


@pytest.mark.parametrize("change, message", [
    (dict(data="missing"), "--data missing: not a folder"), (dict(size="0"), "--size must be at least 1, got 0"),
    (dict(frames="-2"), "--frames must be at least 1"), (dict(clips="0"), "--clips-per-video must be at least 1"),
    (dict(per_shard="-1"), "--videos-per-shard must be at least 1"), (dict(size="20"), "--size must be a multiple of 8"),
    (dict(out="DATA"), "is --data"), (dict(out="MODEL"), "is --model"), (dict(out="OTHER"), "holds other files"),
    (dict(out="IN_MODEL"), "is --model"), (dict(out="IN_DATA"), "is --data"),  # issue 22 item 1: inside an input
    (dict(out="FILE"), "is a file"), (dict(model="DATA"), "not a checkpoint folder"),
    (dict(device="gpu"), "--device must be"), (dict(threads="-1"), "--threads must be at least 0"),
    (dict(size="inf"), "argument --size: invalid int value")])
def test_bad_options_are_one_line_and_touch_nothing(reference, videos, tmp_path, change, message):
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("mine too")
    names = {"DATA": str(videos), "MODEL": str(reference[1]), "OTHER": str(other), "FILE": str(tmp_path / "file"),
             "IN_MODEL": str(reference[1] / "shards"), "IN_DATA": str(videos / "shards")}
    values = {"model": str(reference[1]), "data": str(videos), "out": str(tmp_path / "out"), "size": str(SIZE),
              "frames": "4", "clips": "1", "per_shard": "1", "device": "cpu", "threads": "1", **change}
    values = {key: names.get(value, value) for key, value in values.items()}
    before = {folder: files(folder) for folder in (videos, reference[1], other)}
    command = [sys.executable, "tools/prepare_data.py", "--model", values["model"], "--data", values["data"], "--out",
               values["out"], "--size", values["size"], "--frames", values["frames"], "--clips-per-video",
               values["clips"], "--videos-per-shard", values["per_shard"], "--device", values["device"],
               "--threads", values["threads"]]
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert {folder: files(folder) for folder in before} == before
    assert (tmp_path / "file").read_text() == "mine too" and not (tmp_path / "out").exists()
    assert not (reference[1] / "shards").exists() and not (videos / "shards").exists()


def test_a_folder_without_captioned_videos_or_with_bad_metadata_is_refused_before_anything_is_written(
        reference, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "clip.mp4").write_bytes(b"no caption")
    with pytest.raises(ValueError, match="no videos with captions"):
        prepare(reference[1], tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "metadata.jsonl").write_text('{"file_name": "clip.mp4", "text": "fine"}\n{"file_name": 3}\n')
    with pytest.raises(ValueError, match="metadata.jsonl line 2: expected a JSON object with file_name and text"):
        prepare(reference[1], tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_help_and_option_errors_answer_before_torch_is_imported():
    probe = ("import sys\nfrom tools import prepare_data\n"
             "for argv in (['--help'], ['--model', 'm', '--data', 'd', '--out', 'o', '--size', '0']):\n"
             "    try:\n        prepare_data.main(argv)\n    except (SystemExit, ValueError):\n        pass\n"
             "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPOSITORY, capture_output=True, text=True, check=True)
    assert result.stdout.endswith("False\n")


def test_bfloat16_shards_hold_the_float32_values_rounded(reference, videos, shards, tmp_path):
    from safetensors.torch import load_file

    prepare(reference[1], videos, tmp_path / "bf16", "--clips-per-video", "3", "--videos-per-shard", "2",
            "--dtype", "bf16")
    for name in ("shard-00000.safetensors", "shard-00001.safetensors"):
        half, full = load_file(tmp_path / "bf16" / name), load_file(shards / name)
        for key in full:
            assert half[key].dtype == torch.bfloat16 and torch.equal(half[key], full[key].to(torch.bfloat16))


def test_workers_give_the_batches_of_the_main_process_and_report_a_bad_video_in_one_line(tmp_path):
    videos = video_folder(tmp_path / "videos", {name: VIDEOS[name] for name in ("a.mp4", "b.mp4", "c.gif")})
    data = video_data.VideoFolder(str(videos), SIZE, CONTEXT + FRAMES, 1, seed=0)
    here = video_data.Batches(data, 2, 0, 1, workers=0)
    ahead = video_data.Batches(data, 2, 0, 1, workers=2)
    for step in (5, 6, 7, 3, 8):  # 3: out of order, made in the main process
        expected, got = here[step], ahead[step]
        assert got.caption == expected.caption and torch.equal(got.video, expected.video)
    short = video_data.VideoFolder(str(videos), SIZE, 30, 1, seed=0)  # every video is shorter than 30 frames
    with pytest.raises(ValueError, match=r"frames after stride 1; need 30$"):
        video_data.Batches(short, 2, 0, 1, workers=1)[0]


def copied(folder: Path, to: Path) -> Path:
    to.mkdir()
    for path in folder.iterdir():
        (to / path.name).write_bytes(path.read_bytes())
    return to


@pytest.mark.parametrize("key, value, message", [  # issue 22 item 11: valid JSON, damaged index
    ("shards", [1, 2], r"shards\[0\] must be an object"), ("shards", "shard-00000", "shards must be a list"),
    ("shards", [{"file": 3, "videos": []}], r"shards\[0\].file must be"),
    ("shards", [{"file": "../index.json", "videos": []}], r"shards\[0\].file must be"),
    ("shards", [{"file": "shard-00000.safetensors"}], r"shards\[0\].videos must be"),
    ("shards", [{"file": "shard-00000.safetensors", "videos": [["a.mp4", -3]]}], r"shards\[0\].videos\[0\] must be"),
    ("shards", [{"file": "shard-00000.safetensors", "videos": [["a.mp4", 1.5]]}], r"shards\[0\].videos\[0\] must be"),
    ("shards", [{"file": "shard-00000.safetensors", "videos": [["a.mp4", True]]}], r"shards\[0\].videos\[0\] must be"),
    ("shards", [{"file": "shard-00000.safetensors", "videos": [3]}], r"shards\[0\].videos\[0\] must be"),
    ("shards", [{"file": "shard-00000.safetensors", "videos": [], "sha256": 5}], r"shards\[0\].sha256 must be"),
    ("settings", {}, "settings.size must be"), ("settings", None, "settings must be an object"),
    ("settings", {"size": 32, "frame_stride": 1, "context_frames": "2", "frames": 4}, "settings.context_frames must"),
    ("settings", {"size": 32, "frame_stride": 0, "context_frames": 2, "frames": 4}, "settings.frame_stride must"),
    ("fingerprints", None, "fingerprints must be an object"),
    ("fingerprints", {"vae": "x"}, "fingerprints.text_encoders"),
    ("fingerprints", {"vae": 3, "text_encoders": "x"}, "fingerprints.vae must be"), ("model", None, "model must be"),
    ("latent_shape", "4x6x4x4", "latent_shape must be"), ("latent_shape", [4, 6, 4], "latent_shape must be"),
    ("latent_shape", [4, 6, -4, 4], "latent_shape must be"), ("latent_shape", [4, 6, 1e300, 4], "latent_shape must be"),
    ("latent_shape", [4, 7, 4, 4], r"latent_shape\[1\] must be settings.context_frames \+ settings.frames = 6"),
    ("text_shape", None, "text_shape must be"), ("pooled_shape", [[32]], "pooled_shape must be")])
def test_train_refuses_a_damaged_index_in_one_line_naming_it_and_the_key(reference, shards, tmp_path, key, value,
                                                                        message):
    folder = copied(shards, tmp_path / "shards")
    index = json.loads((folder / "index.json").read_text())
    index[key] = value
    (folder / "index.json").write_text(json.dumps(index))
    config = TrainConfig(**{**SMALL, "mode": "temporal", "model": str(reference[1]), "data": str(folder),
                            "out": str(tmp_path / "run")})
    with pytest.raises(ValueError, match=message) as error:
        video_data.make_data(config)
    assert str(error.value).startswith(f"{folder / 'index.json'}: ") and "\n" not in str(error.value)


def test_train_refuses_an_index_of_deep_or_non_object_json_in_one_line(shards, tmp_path):
    folder = copied(shards, tmp_path / "shards")
    for text, message in [("[" * 100_000 + "]" * 100_000, "cannot be read as JSON"), ("[1, 2]", "is not an index"),
                          ('{"format": "sdxl-video-shards/1"}', "is not an index")]:
        (folder / "index.json").write_text(text)
        with pytest.raises(ValueError, match=message) as error:
            video_data.ShardData(str(folder), seed=0)
        assert str(error.value).startswith(str(folder / "index.json")) and "\n" not in str(error.value)


def rewrite_shard(path: Path, change=None, keep_checksum: bool = True) -> None:
    """Write the shard `path` again with its tensors changed by `change` (same shapes and dtypes) and its
    metadata as it was (without its checksum unless `keep_checksum`): what a hostile or broken copy does."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(path, "pt") as file:
        metadata = file.metadata()
    if not keep_checksum:
        metadata.pop("sha256", None)
    tensors = load_file(path)
    if change:
        change(tensors)
    save_file(tensors, path, metadata=metadata)


def test_a_shard_changed_after_indexing_is_refused_in_one_line_naming_it(reference, shards, tmp_path):
    # issue 22 item 7: a shard whose values changed (same shapes) trained to loss nan; its checksum now refuses it.
    index = json.loads((shards / "index.json").read_text())
    assert all(len(shard["sha256"]) == 64 for shard in index["shards"])
    folder = copied(shards, tmp_path / "shards")

    def poison(tensors):
        tensors["latents"][0, 0, 0, 0, 0] = float("nan")

    rewrite_shard(folder / "shard-00001.safetensors", poison)
    data = video_data.ShardData(str(folder), seed=0)
    firsts = {path.name: number for number, (path, *_) in reversed(list(enumerate(data.videos)))}
    data[firsts["shard-00000.safetensors"]]  # the unchanged shard reads
    with pytest.raises(ValueError, match="shard-00001.safetensors: its tensors changed since") as error:
        data[firsts["shard-00001.safetensors"]]
    assert "\n" not in str(error.value)
    config = TrainConfig(**{**SMALL, "mode": "temporal", "model": str(reference[1]), "data": str(folder),
                            "out": str(tmp_path / "run"), "workers": 1})
    with pytest.raises(ValueError, match="shard-00001.safetensors: its tensors changed since"):
        batches = video_data.Batches(video_data.make_data(config), 2, 0, 1, workers=1)
        for step in range(len(data.videos)):
            batches[step]


def test_shards_prepared_before_checksums_still_train(reference, shards, tmp_path):
    # Shards and an index of a preparation from before checksums (no "sha256" anywhere) are read as they are.
    folder = copied(shards, tmp_path / "shards")
    index = json.loads((folder / "index.json").read_text())
    for shard in index["shards"]:
        shard.pop("sha256", None)
        rewrite_shard(folder / shard["file"], keep_checksum=False)
    (folder / "index.json").write_text(json.dumps(index))
    data = video_data.ShardData(str(folder), seed=0)
    for number in range(len(data.videos)):
        assert torch.isfinite(data[number].latents).all()
    config = TrainConfig(**{**SMALL, "mode": "temporal", "model": str(reference[1]), "data": str(folder),
                            "out": str(tmp_path / "run")})
    train.train(config)
    assert (tmp_path / "run").exists()


# Issue 22 item 10: a full disk, sizes too large for memory, a damaged prepare.json, non-UTF-8 captions, two runs.


def prepare_command(model, data, out, *options) -> list[str]:
    return [sys.executable, "tools/prepare_data.py", "--model", str(model), "--data", str(data), "--out", str(out),
            "--size", str(SIZE), "--context-frames", str(CONTEXT), "--frames", str(FRAMES), "--threads", "1",
            "--device", "cpu", *options]


def test_a_full_disk_while_writing_a_shard_is_one_line_naming_it_and_the_run_resumes(reference, videos, shards,
                                                                                    tmp_path):
    import resource
    import signal

    def small_files():  # files of at most 4 KB: prepare.json fits, a shard does not (EFBIG, as ENOSPC would come)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "shards"
    command = prepare_command(reference[1], videos, out, "--clips-per-video", "3", "--videos-per-shard", "2")
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, preexec_fn=small_files)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "shard-00000.safetensors" in result.stderr and "the same command" in result.stderr
    assert sorted(path.name for path in out.iterdir()) == ["prepare.json"]  # no shard, no temporary
    subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, check=True)  # space again: it resumes
    assert files(out) == files(shards)


@pytest.mark.parametrize("options, message", [
    (["--size", "100000"], "--size 100000"), (["--clips-per-video", "1000000000"], "--clips-per-video 1000000000"),
    (["--frames", "10000000"], "--frames 10000000"), (["--threads", "100000"], "--threads must be at most")])
def test_sizes_too_large_for_memory_are_refused_before_any_work(reference, videos, tmp_path, options, message):
    result = subprocess.run(prepare_command(reference[1], videos, tmp_path / "out", *options), cwd=REPOSITORY,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    (lambda plan: [plan], "holds a JSON list"), (lambda plan: {**plan, "settings": []}, "settings must be an object"),
    (lambda plan: {**plan, "settings": {}}, "settings.size"),
    (lambda plan: {**plan, "fingerprints": None}, "fingerprints"),
    (lambda plan: {**plan, "videos": None}, "videos must be"), (lambda plan: {**plan, "model": 3}, "model must be"),
    (lambda plan: {k: v for k, v in plan.items() if k != "videos"}, "videos must be"),
    (lambda plan: "[" * 100_000 + "]" * 100_000, "nested too deeply"), (lambda plan: b"\xff\xfe{}", "not UTF-8")])
def test_a_prepare_json_of_the_wrong_shape_is_one_line_naming_it(reference, videos, shards, tmp_path, change,
                                                                    message):
    out = copied(shards, tmp_path / "shards")
    plan = change(json.loads((out / "prepare.json").read_text()))
    if isinstance(plan, bytes):
        (out / "prepare.json").write_bytes(plan)
    else:
        (out / "prepare.json").write_text(plan if isinstance(plan, str) else json.dumps(plan))
    before = files(out)
    result = subprocess.run(prepare_command(reference[1], videos, out, "--clips-per-video", "3", "--videos-per-shard",
                                            "2"), cwd=REPOSITORY, capture_output=True, text=True)
    assert result.returncode in (1, 2) and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert f"{out / 'prepare.json'}" in result.stderr and message in result.stderr, result.stderr
    assert files(out) == before


@pytest.mark.parametrize("name, content", [("a.txt", b"caf\xe9 latin-1"), ("metadata.jsonl", b'{"file_name": "a.mp4", '
                                                                            b'"text": "caf\xe9"}\n'),
                                           ("metadata.csv", b"file_name,text\na.mp4,caf\xe9\n")])
def test_captions_that_are_not_utf8_name_their_file(reference, tmp_path, name, content):
    data = video_folder(tmp_path / "videos", {"a.mp4": VIDEOS["a.mp4"], "b.mp4": VIDEOS["b.mp4"]})
    (data / name).write_bytes(content)
    for read in (lambda: prepare(reference[1], data, tmp_path / "out"),
                 lambda: video_data.VideoFolder(str(data), SIZE, CONTEXT + FRAMES, 1, seed=0)):
        with pytest.raises(ValueError, match=f"{data / name}.*not UTF-8") as error:
            read()
        assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_two_runs_on_one_out_cannot_run_at_once(reference, videos, tmp_path):
    import fcntl

    out = tmp_path / "shards"
    lock = tmp_path / "shards.prepare-0.lock"  # what a run in progress holds (process 0 of 1, or of a torchrun)
    with open(lock, "w") as file:
        file.write("4242\n")
        file.flush()
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="being written by process 4242"):
            prepare(reference[1], videos, out, "--clips-per-video", "1", "--videos-per-shard", "2")
        assert not out.exists()
    lock.unlink()
    prepare(reference[1], videos, out, "--clips-per-video", "1", "--videos-per-shard", "2")  # unlocked: it runs
    assert (out / "index.json").exists() and not lock.exists()  # and leaves no lock behind


def test_a_size_too_large_for_the_gpu_is_refused_before_the_model_loads(reference, videos, tmp_path, monkeypatch):
    import infra.memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(infra.memory, "available_memory", lambda device: 1000)  # a GPU with 1000 bytes free
    monkeypatch.setattr(StableDiffusionXLVideoPipeline, "from_pretrained", None)  # never reached
    with pytest.raises(ValueError, match="--size 32: the VAE needs at least .* cuda has 0.0 GiB free"):
        prepare(reference[1], videos, tmp_path / "out", "--device", "cuda")
    assert not (tmp_path / "out").exists()


# Issue 22 item 8: variable-frame-rate videos are decoded by time, at their average rate.
VFR_TICKS = [*range(10), *(9 + 15 * k for k in range(1, 11)), *(159 + k for k in range(1, 11))]  # in 1/30 s


def write_vfr_video(path: Path) -> tuple[list[float], float]:
    """Frame i a solid grey of level 8 i, 30 frames: first fast, then 0.5 s each, then fast again (as a phone
    writes when the light changes); .mp4 (H.264, lossless; at VFR_TICKS) or .gif (delays of 40, 500 and 40 ms:
    a GIF's delays are whole centiseconds). Returns the frames' times and the video's duration, in seconds."""
    frames = [np.full((40, 48, 3), 8 * i, np.uint8) for i in range(len(VFR_TICKS))]
    if path.suffix == ".gif":
        delays = [40] * 10 + [500] * 10 + [40] * 10  # ms
        imageio.mimsave(path, frames, duration=delays, loop=0)
        return [sum(delays[:i]) / 1000 for i in range(len(frames))], sum(delays) / 1000
    times = "if(lt(N\\,10)\\,N\\,if(lt(N\\,20)\\,9+15*(N-9)\\,159+(N-19)))/30/TB"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s",
                    "48x40", "-r", "30", "-i", "-", "-vf", f"setpts={times}", "-fps_mode", "vfr", "-c:v", "libx264",
                    "-crf", "0", "-pix_fmt", "yuv444p", str(path)], input=b"".join(f.tobytes() for f in frames),
                   check=True)
    return [tick / 30 for tick in VFR_TICKS], (VFR_TICKS[-1] + 1) / 30


@pytest.mark.parametrize("name", ["vfr.mp4", "vfr.gif"])
def test_variable_frame_rate_videos_are_decoded_by_time(videos, tmp_path, name):
    times, duration = write_vfr_video(tmp_path / name)
    length = video_data.video_length(tmp_path / name)
    assert length.variable and length.frames == len(times)
    assert not any(video_data.video_length(videos / cfr).variable for cfr in ("a.mp4", "c.gif"))
    # Frame k is the frame on screen at time k / rate, rate = frames / duration: the last frame whose time
    # rounds to k or earlier (ffmpeg's fps filter). The frames span the whole video.
    rate = len(times) / duration
    on_screen = [max(i for i, time in enumerate(times) if round(time * rate) <= k) for k in range(len(times))]
    num_frames = CONTEXT + FRAMES
    starts = video_data.window_starts(length.frames, num_frames, 4)
    windows = video_data.read_windows(tmp_path / name, starts, num_frames, 1, SIZE, length)
    for start, window in zip(starts, windows):
        levels = (window[0, :, 0, 0] + 1) * 127.5  # (frames,): each frame is one grey
        expected = torch.tensor([8.0 * on_screen[k] for k in range(start, start + num_frames)])
        assert (levels - expected).abs().max() <= 2, (start, levels.tolist(), expected.tolist())
    assert times[-1] - times[on_screen[-1]] < 1 / rate  # the last window ends at the video's end, not mid-way
    [one] = video_data.read_windows(tmp_path / name, [starts[1]], num_frames, 1, SIZE, length)  # a sample alone
    assert torch.equal(one, windows[1])


# The same families with other values (issue 22's "Done when"): other damaged files, other hostile input.


def test_a_damaged_shard_left_in_out_is_one_line_naming_it_when_the_preparation_resumes(reference, videos, shards,
                                                                                      tmp_path):
    out = copied(shards, tmp_path / "shards")
    (out / "index.json").unlink()
    for damage in (b"not a shard", (shards / "shard-00000.safetensors").read_bytes()[:100]):
        (out / "shard-00000.safetensors").write_bytes(damage)
        with pytest.raises(ValueError, match="shard-00000.safetensors: not a whole shard") as error:
            prepare(reference[1], videos, out, "--clips-per-video", "3", "--videos-per-shard", "2")
        assert "\n" not in str(error.value) and not (out / "index.json").exists()


def test_a_shard_that_goes_missing_while_training_is_one_line_naming_it(shards, tmp_path):
    folder = copied(shards, tmp_path / "shards")
    data = video_data.ShardData(str(folder), seed=0)
    (folder / "shard-00000.safetensors").unlink()
    with pytest.raises(ValueError, match="shard-00000.safetensors: cannot be read") as error:
        data[0]
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("line, message", [
    ("[" * 100_000 + "]" * 100_000, "line 1: expected a JSON object"),
    (json.dumps({"file_name": "/etc/hostname", "text": "outside"}), "line 1: file_name must be a path inside"),
    (json.dumps({"file_name": "../other/a.mp4", "text": "outside"}), "line 1: file_name must be a path inside")])
def test_metadata_rows_that_are_deep_or_point_outside_the_folder_are_one_line(tmp_path, line, message):
    data = tmp_path / "videos"
    data.mkdir()
    (data / "metadata.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=message) as error:
        video_data.captioned_videos(str(data))
    assert "\n" not in str(error.value)
