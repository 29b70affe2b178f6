"""The checkpoint folder's files: checked before anything heavy is loaded, written durably.

- `check_checkpoint_files` reads only config.json and the safetensors headers, names the first broken
  file, and returns the bytes of the UNet's and the VAE's weights.
- `StableDiffusionXLVideoPipeline.from_pretrained` names the broken file too, and a weight file whose
  keys or shapes do not fit config.json.
- `save_pretrained` puts every file on disk (fsync) before it writes config.json, which comes last:
  a folder whose writing stopped part way has no config.json; a write error names the file.
"""

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from infra import checkpoint as checkpoint_files
from infra.checkpoint import check_checkpoint_files, load_checkpoint_config
from pipeline import StableDiffusionXLVideoPipeline
from tiny_pipeline import tiny_video_pipeline


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint") / "model"
    tiny_video_pipeline(tmp_path_factory.mktemp("tokenizer")).save_pretrained(folder)
    return folder


@pytest.fixture
def copy(checkpoint, tmp_path):
    shutil.copytree(checkpoint, tmp_path / "model")
    return tmp_path / "model"


def cut(fraction: float):
    """Truncate a file to `fraction` of its size, as an interrupted copy or download leaves it."""
    def change(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
    return change


def edit_config(section: str, **values):
    def change(path: Path) -> None:
        config = json.loads(path.read_text())
        config[section] |= values
        path.write_text(json.dumps(config))
    return change


BROKEN = {  # name: (file, what is done to it)
    "config.json not JSON": ("config.json", lambda path: path.write_text('{"format": ')),
    "config.json not an object": ("config.json", lambda path: path.write_text("[1, 2]")),
    "config.json wrong type": ("config.json", edit_config("unet", in_channels="four")),
    "unet missing": ("unet.safetensors", Path.unlink),
    "unet truncated": ("unet.safetensors", cut(0.5)),
    "unet header cut": ("unet.safetensors", cut(0.00001)),
    "vae one byte short": ("vae.safetensors", lambda path: path.write_bytes(path.read_bytes()[:-1])),
    "vae longer than its header says": ("vae.safetensors", lambda path: path.write_bytes(path.read_bytes() + b"\0")),
    "text encoder missing": ("text_encoder/model.safetensors", Path.unlink),
    "text encoder truncated": ("text_encoder_2/model.safetensors", cut(0.5)),
    "text encoder config not JSON": ("text_encoder/config.json", lambda path: path.write_text("{")),
    "tokenizer file missing": ("tokenizer/tokenizer.json", Path.unlink),
    "tokenizer folder missing": ("tokenizer_2", shutil.rmtree),
}


@pytest.mark.parametrize("load", [check_checkpoint_files, StableDiffusionXLVideoPipeline.from_pretrained],
                         ids=["check_checkpoint_files", "from_pretrained"])
@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_file_is_named(copy, load, name):
    relative, change = BROKEN[name]
    change(copy / relative)
    with pytest.raises(ValueError, match=re.escape(str(copy / relative))) as error:
        load(copy)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("content", ['{"format": ', "[1, 2]"])
def test_load_checkpoint_config_names_a_bad_config_json(copy, content):
    (copy / "config.json").write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(copy / "config.json"))):
        load_checkpoint_config(copy)


def test_check_checkpoint_files_returns_the_weight_bytes(checkpoint):
    sizes = [tensor.numel() * tensor.element_size()
             for name in ("unet.safetensors", "vae.safetensors") for tensor in load_file(checkpoint / name).values()]
    assert check_checkpoint_files(checkpoint) == sum(sizes)


WRONG_WEIGHTS = {  # name: (file, change of its state dict, what the message names)
    "missing key": ("unet.safetensors", lambda state: state.pop("conv_in.bias"), "conv_in.bias"),
    "unknown key": ("vae.safetensors", lambda state: state.update(extra=torch.zeros(1)), "extra"),
    "wrong shape": ("vae.safetensors", lambda state: state.update({"quant_conv.bias": torch.zeros(3)}),
                    "quant_conv.bias"),
}


@pytest.mark.parametrize("name", WRONG_WEIGHTS)
def test_from_pretrained_names_weights_that_do_not_fit(copy, name):
    relative, change, key = WRONG_WEIGHTS[name]
    state = load_file(copy / relative)
    change(state)
    save_file(state, copy / relative)
    with pytest.raises(ValueError, match=rf"{re.escape(str(copy / relative))}.*{re.escape(key)}") as error:
        StableDiffusionXLVideoPipeline.from_pretrained(copy)
    assert "\n" not in str(error.value)


def fsync_recorder(monkeypatch) -> list[Path]:
    """The paths os.fsync is called on, in order."""
    synced, fsync = [], os.fsync

    def record(descriptor):
        synced.append(Path(os.readlink(f"/proc/self/fd/{descriptor}")))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", record)
    return synced


def test_save_pretrained_syncs_everything_and_writes_config_json_last(tmp_path, monkeypatch):
    ours = tiny_video_pipeline(tmp_path / "tokenizer")
    synced = fsync_recorder(monkeypatch)
    folder = tmp_path / "model"
    ours.save_pretrained(folder)
    assert set(synced) >= {*folder.rglob("*"), folder, tmp_path}
    config = synced.index(folder / "config.json")
    assert all(path == folder for path in synced[config + 1:])
    assert all(path.stat().st_mtime_ns <= (folder / "config.json").stat().st_mtime_ns for path in folder.rglob("*")
               if path.is_file())


def test_a_failed_save_leaves_no_config_json_and_names_the_file(checkpoint, tmp_path, monkeypatch):
    """Saving over a checkpoint folder that then fails part way does not leave the old config.json
    describing half-new weights; safetensors' I/O error becomes an OSError naming the file."""
    shutil.copytree(checkpoint, tmp_path / "model")
    ours = tiny_video_pipeline(tmp_path / "tokenizer")

    def disk_full_at_vae(tensors, path, *arguments, **keywords):
        if Path(path).name == "vae.safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        save_file(tensors, path, *arguments, **keywords)

    monkeypatch.setattr(checkpoint_files, "save_file", disk_full_at_vae)
    with pytest.raises(OSError) as error:
        ours.save_pretrained(tmp_path / "model")
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(tmp_path / "model" / "vae.safetensors")
    assert not (tmp_path / "model" / "config.json").exists()
