"""convert_weights.py SRC by its hub name (formats/hub.py), fully offline.

A tiny SDXL folder saved by diffusers is laid out as huggingface_hub's cache lays out a download
(models--owner--name/refs/main, snapshots/<commit>/..., blobs/): converting the hub name equals
converting the folder; a missing file, a missing repository, a bad name are one line naming them;
a local folder named like a repository wins. Which files are fetched is checked against listings of
real releases written out by hand, and against a hub whose answers are stood in for.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import filter_repo_objects

import formats.hub as hub
from convert_weights import WEIGHT_NAMES, convert, main
from formats.hub import SDXL_FOLDER, VIDEO_UNET, selection, weight_order
from scheduler import SchedulerConfig
from tiny_pipeline import diffusers_tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent
REPO = "owner/tiny-sdxl"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
STORAGE = "models--owner--tiny-sdxl"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny SDXL pipeline saved by diffusers, whole and with its weights in shards; and the
    conversion of the whole folder, the reference."""
    root = tmp_path_factory.mktemp("hub")
    pipeline = diffusers_tiny_pipeline(root / "tokenizer-files", SchedulerConfig.video_model())
    pipeline.save_pretrained(root / "plain")
    pipeline.save_pretrained(root / "sharded", max_shard_size="100KB")
    convert(root / "plain", root / "converted")
    return SimpleNamespace(plain=root / "plain", sharded=root / "sharded", converted=root / "converted")


def cache_repository(cache: Path, folder: Path, repo_id: str = REPO, commit: str = COMMIT) -> Path:
    """`folder`'s files in huggingface_hub's cache layout: each file a blob named by its hash, linked
    from snapshots/<commit>/ by a relative link; refs/main names the commit. Returns the snapshot."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for file in sorted(path for path in folder.rglob("*") if path.is_file()):
        blob = storage / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty hub cache in tmp_path and HF_HUB_OFFLINE=1, as the environment sets them
    (huggingface_hub reads both once, when imported: its constants follow)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, value, constant in (("HF_HUB_CACHE", str(cache), str(cache)), ("HF_HUB_OFFLINE", "1", True)):
        monkeypatch.setenv(name, value)
        monkeypatch.setattr(constants, name, constant)
    return cache


def assert_same_conversion(ours: Path, reference: Path) -> None:
    """Every file byte for byte; config.json's values but the provenance (where the files were read)."""
    files = sorted(path.relative_to(reference) for path in reference.rglob("*") if path.is_file())
    assert sorted(path.relative_to(ours) for path in ours.rglob("*") if path.is_file()) == files
    for name in files:
        if name == Path("config.json"):
            mine, theirs = (json.loads((folder / name).read_text()) for folder in (ours, reference))
            assert {**mine, "provenance": None} == {**theirs, "provenance": None}
        else:
            assert (ours / name).read_bytes() == (reference / name).read_bytes(), name


def one_line_error(capsys, *arguments: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(arguments))
    error = capsys.readouterr().err
    assert exit_.value.code == 1 and error.count("\n") == 1, error
    return error


# Converting by the hub name.


def test_hub_name_converts_as_the_folder(folders, tmp_path):
    """The CLI in a process of its own, HF_HOME and HF_HUB_OFFLINE set as a user sets them."""
    home = tmp_path / "home"
    snapshot = cache_repository(home / "hub", folders.plain)
    environment = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    environment.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), REPO, str(tmp_path / "out")],
                          cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"HF_HUB_OFFLINE is set): using the cached copy of {REPO}, {snapshot}" in done.stdout
    assert_same_conversion(tmp_path / "out", folders.converted)
    provenance = json.loads((tmp_path / "out" / "config.json").read_text())["provenance"]
    assert provenance["source"] == str(snapshot)


def test_an_unreachable_hub_falls_back_to_the_cache(folders, tmp_path, monkeypatch, capsys):
    """No HF_HUB_OFFLINE, but nothing answers at the hub's address (a closed port on this machine)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cache_repository(tmp_path / "cache", folders.plain)
    main([REPO, str(tmp_path / "out")])
    assert "the hub cannot be reached (no network: " in capsys.readouterr().out
    assert_same_conversion(tmp_path / "out", folders.converted)


def test_a_local_folder_named_like_a_repository_wins(folders, offline, tmp_path, monkeypatch):
    """The cache holds another model under the same name; the local folder is converted."""
    other = diffusers_tiny_pipeline(tmp_path / "tokenizer-files", SchedulerConfig.video_model(), seed=1)
    other.save_pretrained(tmp_path / "other")
    cache_repository(offline, tmp_path / "other")
    shutil.copytree(folders.plain, tmp_path / REPO)
    monkeypatch.chdir(tmp_path)
    main([REPO, "out"])
    assert_same_conversion(tmp_path / "out", folders.converted)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["provenance"]["source"] == REPO


# One line for what cannot be had.


@pytest.mark.parametrize("breakage", ["file never fetched", "blob gone", "shard never fetched"])
def test_a_file_missing_offline_is_one_line_naming_it(folders, offline, tmp_path, capsys, breakage):
    snapshot = cache_repository(offline, folders.sharded if breakage.startswith("shard") else folders.plain)
    name = {"file never fetched": "vae/diffusion_pytorch_model.safetensors",
            "blob gone": "text_encoder_2/model.safetensors",
            "shard never fetched": "vae/diffusion_pytorch_model-00002-of-00003.safetensors"}[breakage]
    assert (snapshot / name).is_file()
    (snapshot / name).resolve().unlink() if breakage == "blob gone" else (snapshot / name).unlink()
    error = one_line_error(capsys, REPO, str(tmp_path / "out"))
    assert f"error: SRC {REPO}: the hub cannot be reached (HF_HUB_OFFLINE is set)" in error
    assert f"and its cached copy {snapshot} lacks 1 files: {name}\n" in error
    assert not (tmp_path / "out").exists()


def test_a_repository_not_in_the_cache_is_one_line(offline, tmp_path, capsys):
    error = one_line_error(capsys, REPO, str(tmp_path / "out"))
    assert error.endswith(f"error: SRC {REPO}: no such local folder or file, and the hub cannot be reached "
                          f"(HF_HUB_OFFLINE is set) and the cache {offline} holds no copy of it\n")
    (tmp_path / "sd_xl.safetensors").write_bytes(b"")
    error = one_line_error(capsys, str(tmp_path / "sd_xl.safetensors"), str(tmp_path / "out"), "--tokenizers", REPO)
    assert (f"error: --tokenizers {REPO}: no such local folder or file, and the hub cannot be reached "
            "(HF_HUB_OFFLINE is set) and the cache") in error


@pytest.mark.parametrize("name", ["no/such/folder", "missing-folder", "./missing", "owner/bad--name"])
def test_a_name_neither_path_nor_repository_is_one_line(offline, tmp_path, capsys, name):
    error = one_line_error(capsys, name, str(tmp_path / "out"))
    assert error.endswith(f"error: SRC {name} does not exist, and is no hub repository name (owner/name) either\n")
    error = one_line_error(capsys, str(tmp_path), str(tmp_path / "out"), "--video-unet", name)
    assert f"error: --video-unet {name} does not exist, and is no hub repository name" in error


def test_revision_is_for_a_hub_source_and_out_is_checked_before_fetching(folders, offline, tmp_path, capsys):
    error = one_line_error(capsys, str(folders.plain), str(tmp_path / "out"), "--revision", "v1")
    assert "error: --revision is for a SRC given by its hub name; SRC" in error
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("kept")
    error = one_line_error(capsys, REPO, str(tmp_path / "out"))
    assert f"error: OUT {tmp_path / 'out'} exists; pass --overwrite to replace it\n" in error


def test_a_revision_is_read_from_its_ref(folders, offline, tmp_path, capsys):
    snapshot = cache_repository(offline, folders.plain, commit="f" * 40)
    (offline / STORAGE / "refs" / "v1").write_text("f" * 40)
    (offline / STORAGE / "refs" / "main").write_text(COMMIT)  # a commit not in the cache
    error = one_line_error(capsys, REPO, str(tmp_path / "out"))
    assert "holds no copy of it" in error
    main([REPO, str(tmp_path / "out"), "--revision", "v1"])
    assert f"using the cached copy of {REPO}, {snapshot}" in capsys.readouterr().out
    assert_same_conversion(tmp_path / "out", folders.converted)


HUB_ANSWERS = {  # what the hub answers repo_info with: the error it raises, the line we print
    "no such repository": (RepositoryNotFoundError, 404, f"error: SRC {REPO} is no local path, and the hub has no "
                           f"repository {REPO} that you may read (a private or gated one needs `hf auth login`)"),
    "no such revision": (RevisionNotFoundError, 404,
                         f"error: --revision v1: the hub's {REPO} has no such branch, tag or commit"),
    "hub down": (HfHubHTTPError, 503, f"error: SRC {REPO} at revision v1: no such local folder or file, and the hub "
                 "cannot be reached (it answered HTTP 503) and the cache"),
}


@pytest.mark.parametrize("answer", HUB_ANSWERS)
def test_what_the_hub_refuses_is_one_line(tmp_path, monkeypatch, capsys, answer):
    error_class, status, line = HUB_ANSWERS[answer]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))

    def repo_info(self, repo_id, revision=None, files_metadata=False):
        request = httpx2.Request("GET", f"{constants.ENDPOINT}/api/models/{repo_id}/revision/{revision}")
        raise error_class(f"{status} answered", response=httpx2.Response(status, request=request))

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    assert line in one_line_error(capsys, REPO, str(tmp_path / "out"), "--revision", "v1")


# Which files: listings of real releases, by hand.

SDXL_BASE_FILES = """
.gitattributes LICENSE.md README.md 01.png comparison.png pipeline.png model_index.json
scheduler/scheduler_config.json sd_xl_base_1.0.safetensors sd_xl_base_1.0_0.9vae.safetensors
sd_xl_offset_example-lora_1.0.safetensors
text_encoder/config.json text_encoder/flax_model.msgpack text_encoder/model.fp16.safetensors text_encoder/model.onnx
text_encoder/model.safetensors text_encoder/openvino_model.bin text_encoder/openvino_model.xml
text_encoder_2/config.json text_encoder_2/flax_model.msgpack text_encoder_2/model.fp16.safetensors
text_encoder_2/model.onnx text_encoder_2/model.onnx_data text_encoder_2/model.safetensors
text_encoder_2/openvino_model.bin text_encoder_2/openvino_model.xml
tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json
tokenizer_2/merges.txt tokenizer_2/special_tokens_map.json tokenizer_2/tokenizer_config.json tokenizer_2/vocab.json
unet/config.json unet/diffusion_flax_model.msgpack unet/diffusion_pytorch_model.fp16.safetensors
unet/diffusion_pytorch_model.safetensors unet/model.onnx unet/model.onnx_data unet/openvino_model.bin
unet/openvino_model.xml vae/config.json vae/diffusion_flax_model.msgpack vae/diffusion_pytorch_model.fp16.safetensors
vae/diffusion_pytorch_model.safetensors vae_1_0/config.json vae_1_0/diffusion_pytorch_model.safetensors
vae_decoder/config.json vae_decoder/model.onnx vae_encoder/config.json vae_encoder/model.onnx
""".split()
COMMON = """model_index.json scheduler/scheduler_config.json text_encoder/config.json text_encoder_2/config.json
tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json
tokenizer_2/merges.txt tokenizer_2/special_tokens_map.json tokenizer_2/tokenizer_config.json tokenizer_2/vocab.json
unet/config.json vae/config.json""".split()
SDXL_FULL = """text_encoder/model.safetensors text_encoder_2/model.safetensors unet/diffusion_pytorch_model.safetensors
vae/diffusion_pytorch_model.safetensors""".split()
SDXL_HALF = """text_encoder/model.fp16.safetensors text_encoder_2/model.fp16.safetensors
unet/diffusion_pytorch_model.fp16.safetensors vae/diffusion_pytorch_model.fp16.safetensors""".split()
# The video release: SDXL's folders, its UNet and refiner pickled as the original code saved them.
RELEASE_FILES = [name for name in SDXL_BASE_FILES if not name.startswith(("unet/", "sd_xl"))] + [
    "unet/config.json", "unet/diffusion_pytorch_model.bin", "refiner/config.json",
    "refiner/diffusion_pytorch_model.bin",
    "refiner/diffusion_pytorch_model.fp16.safetensors"]


def test_weight_order_takes_full_precision_first_unless_fp16_is_asked():
    full = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
            "model.safetensors", "model.safetensors.index.json", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    half = ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors.index.fp16.json",
            "model.fp16.safetensors", "model.safetensors.index.fp16.json", "diffusion_pytorch_model.fp16.bin",
            "diffusion_pytorch_model.bin.index.fp16.json", "pytorch_model.fp16.bin",
            "pytorch_model.bin.index.fp16.json")
    assert weight_order(WEIGHT_NAMES, fp16=False) == full + half
    assert weight_order(WEIGHT_NAMES, fp16=True) == half + full


@pytest.mark.parametrize("case", ["sdxl", "sdxl fp16", "sdxl with --video-unet", "release", "release fp16",
                                  "video unet", "only fp16 vae", "only fp16 vae fp16"])
def test_selection_takes_one_weight_file_per_component(case):
    names = set(RELEASE_FILES if case.startswith("release") else SDXL_BASE_FILES)
    if case.startswith("only fp16 vae"):
        names.discard("vae/diffusion_pytorch_model.safetensors")
    wanted = {"sdxl with --video-unet": hub.replace(SDXL_FOLDER, models=hub.MODELS[1:], configs=("unet",)),
              "video unet": VIDEO_UNET}.get(case, SDXL_FOLDER)
    files, missing = selection(names, wanted, weight_order(WEIGHT_NAMES, fp16=case.endswith("fp16")))
    release_full = [name for name in SDXL_FULL if not name.startswith("unet/")] + [
        "unet/diffusion_pytorch_model.bin", "refiner/config.json", "refiner/diffusion_pytorch_model.bin"]
    expected = {
        "sdxl": COMMON + SDXL_FULL,
        "sdxl fp16": COMMON + SDXL_HALF,
        "sdxl with --video-unet": [name for name in COMMON + SDXL_FULL
                                   if name != "unet/diffusion_pytorch_model.safetensors"],
        "release": COMMON + release_full,
        "release fp16": COMMON + [name for name in SDXL_HALF if not name.startswith("unet/")] + [
            "unet/diffusion_pytorch_model.bin", "refiner/config.json",
            "refiner/diffusion_pytorch_model.fp16.safetensors"],
        "video unet": ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"],
        "only fp16 vae": COMMON + [name for name in SDXL_FULL if not name.startswith("vae/")] + [
            "vae/diffusion_pytorch_model.fp16.safetensors"],
        "only fp16 vae fp16": COMMON + SDXL_HALF,
    }[case]
    assert missing == [] and sorted(files) == sorted(expected)


def test_selection_takes_a_shard_set_and_names_what_is_missing():
    names = {"unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.json",
             "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
             "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
             "unet/diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
             "text_encoder/config.json", "tokenizer/vocab.json", "tokenizer_2/tokenizer.json"}
    files, missing = selection(names, SDXL_FOLDER, WEIGHT_NAMES)
    assert sorted(files) == sorted(name for name in names if ".fp16" not in name)
    assert missing == ["vae/config.json", "text_encoder_2/config.json", "vae/diffusion_pytorch_model.safetensors",
                       "text_encoder/model.safetensors", "text_encoder_2/model.safetensors", "tokenizer/merges.txt"]
    _, missing = selection(names, SDXL_FOLDER, weight_order(WEIGHT_NAMES, fp16=True))
    assert {"text_encoder/model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"} <= set(missing)


# Online, with the hub's two answers stood in for: its listing, and snapshot_download itself.


def test_online_only_the_selection_is_fetched(folders, tmp_path, monkeypatch, capsys):
    remote = tmp_path / "remote"
    shutil.copytree(folders.plain, remote)
    extras = ["unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.bin",
              "unet/model.onnx", "sd_xl_base_1.0.safetensors", "vae_1_0/config.json"]
    for name in extras:
        (remote / name).parent.mkdir(parents=True, exist_ok=True)
        (remote / name).write_bytes(b"not to be fetched")
    names = sorted(path.relative_to(remote).as_posix() for path in remote.rglob("*") if path.is_file())
    cache, asked = tmp_path / "cache", []
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def repo_info(self, repo_id, revision=None, files_metadata=False):
        assert (repo_id, revision, files_metadata) == (REPO, None, True)
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=name, size=(remote / name).stat().st_size)
                                         for name in names])

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        asked.append(allow_patterns)
        fetched = tmp_path / "fetched"
        for name in filter_repo_objects(names, allow_patterns=allow_patterns):
            (fetched / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(remote / name, fetched / name)
        return str(cache_repository(cache, fetched))

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    main([REPO, str(tmp_path / "out")])
    fetched = sorted(path.relative_to(tmp_path / "fetched").as_posix()
                     for path in (tmp_path / "fetched").rglob("*") if path.is_file())
    assert fetched == [name for name in names if name not in extras] and len(asked) == 1
    assert f"fetching {len(fetched)} files of {REPO} (" in capsys.readouterr().out
    assert_same_conversion(tmp_path / "out", folders.converted)


def test_a_mistyped_local_path_offline_says_both_that_no_such_path_exists_and_why_the_hub_does_not_answer(
        offline, tmp_path, capsys, monkeypatch):
    """Review finding 15b: `sdxx/unet` (meant: a local sdxl/unet) is no path, but reads as owner/name;
    offline, the one line says that no such local folder exists, not only that the hub is unreachable."""
    (tmp_path / "sdxl" / "unet").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    error = one_line_error(capsys, "sdxx", "out")  # a bare name is a path: refused without the hub
    assert error.endswith("error: SRC sdxx does not exist, and is no hub repository name (owner/name) either\n")
    error = one_line_error(capsys, str(tmp_path / "sdxl"), "out", "--video-unet", "sdxx/unet")
    assert error.endswith("error: --video-unet sdxx/unet: no such local folder or file, and the hub cannot be "
                          f"reached (HF_HUB_OFFLINE is set) and the cache {offline} holds no copy of it\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache", "sdxl"]
