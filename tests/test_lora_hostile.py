"""LoRA files and strengths as a hostile user gives them (issue 22 items 2, 4 and 9): each is refused
in one line naming the file (and the key, strength or alpha), before the model is loaded where the
header tells, and never hangs, overflows into black frames or ends in a traceback.

- PEFT metadata (`alpha_pattern`, `rank_pattern`) is data: its keys are matched as literal
  module-name suffixes, as PEFT writes them; a key that is no module name is refused (item 2).
- Merged weights are finite and of a size a model can hold; strengths lie in -10..10 (item 4).
- A file given twice under two names (a hard link) is one file (item 5's rule, sample.py's too).
- Rank 0, nested JSON, metadata of the wrong JSON types, tensors of integers, booleans or fp8, and
  a folder, FIFO or link loop given as the file (item 9).
- Found trying other values: keys of 400,000 characters or with line breaks, 1e308 seconds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sample
from formats import lora_files
from formats.lora_files import LoraError
from pipeline import StableDiffusionXLVideoPipeline

ROOT = Path(__file__).resolve().parent.parent
TO_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"  # (32, 32) in the tiny model
TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
TO_V = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"
FAST = ["--steps", "1", "--frames", "2", "--context-frames", "1", "--height", "32", "--width", "48", "--chunks", "1"]


def peft_lora(path: Path, metadata=None, modules=(TO_K, TO_Q, TO_V), rank: int = 2, dtype=torch.float32,
              value: float = 0.01) -> Path:
    """A PEFT LoRA of the tiny UNet's `modules` (32 x 32), its `lora_adapter_metadata` the JSON of
    `metadata` (a str is written as it is)."""
    state = {}
    for module in modules:
        state[f"unet.{module}.lora_A.weight"] = torch.full((rank, 32), value).to(dtype)  # (rank, in)
        state[f"unet.{module}.lora_B.weight"] = torch.full((32, rank), value).to(dtype)  # (out, rank)
    text = metadata if isinstance(metadata, str) or metadata is None else json.dumps(metadata)
    save_file(state, path, metadata=None if text is None else {"lora_adapter_metadata": text})
    return path


def kohya_lora(path: Path, down, up, alpha=None) -> Path:
    """A kohya-ss LoRA of TO_K from the given tensors (down (rank, 32), up (32, rank))."""
    name = "lora_unet_" + TO_K.replace(".", "_")
    state = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    if alpha is not None:
        state[f"{name}.alpha"] = alpha
    save_file(state, path)
    return path


def read(path: Path, model: Path) -> lora_files.LoraFile:
    targets, unet_config = lora_files.checkpoint_targets(model)
    return lora_files.read_lora_file(path, targets, unet_config)


def refused_before_loading(model: Path, tmp_path: Path, monkeypatch, lora: str) -> str:
    """sample.py's one-line error for `--lora lora`, raised before the model is loaded, with nothing
    written."""
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(StableDiffusionXLVideoPipeline, "from_pretrained", no_loading)
    outputs = tmp_path / "outputs"
    outputs.mkdir(exist_ok=True)
    with pytest.raises(ValueError) as error:
        sample.main(["--model", str(model), "--prompt", "a", "--out", str(outputs / "video.mp4"), *FAST, "--lora", lora])
    assert "\n" not in str(error.value) and len(str(error.value)) < 1000, str(error.value)
    assert list(outputs.iterdir()) == []
    return str(error.value)


# Item 2: PEFT's patterns are module-name suffixes, not regular expressions.


def test_alpha_pattern_keys_are_literal_module_name_suffixes(model, tmp_path):
    metadata = {"unet.lora_alpha": 6, "unet.alpha_pattern": {"attn1.to_k": 3.0, "o_q": 9, "to_q": 5,
                                                              "transformer_blocks.0.attn1.to_q": 7}}
    alphas = {module.module: module.alpha for module in read(peft_lora(tmp_path / "a.safetensors", metadata), model).modules}
    # the first key that ends the name at a dot, in the file's order (as PEFT picks); "o_q" ends no name at a dot
    assert alphas == {TO_K: 3.0, TO_Q: 5.0, TO_V: 6.0}


@pytest.mark.parametrize("key", ["[", "(to_k|to_q)", "to_.", ".*to_k", "attn1..to_k", ".to_k", "to k", ""])
@pytest.mark.parametrize("field", ["alpha_pattern", "rank_pattern"])
def test_a_pattern_that_is_no_module_name_is_refused_naming_the_file_and_the_key(model, tmp_path, monkeypatch, field, key):
    value = 2 if field == "rank_pattern" else 3.0
    path = peft_lora(tmp_path / "pattern.safetensors", {"unet.lora_alpha": 6, f"unet.{field}": {key: value}})
    message = refused_before_loading(model, tmp_path, monkeypatch, str(path))
    assert str(path) in message and f"unet.{field}" in message and json.dumps(key) in message, message


def read_in_a_child(model, path, hang: str) -> subprocess.CompletedProcess:
    """Read the LoRA file at `path` for `model` in a child process (its refusal printed); fail with
    `hang` if it takes more than 60 s."""
    code = ("import sys; from formats import lora_files as f; t, c = f.checkpoint_targets(sys.argv[1])\n"
            "try: f.read_lora_file(sys.argv[2], t, c)\nexcept f.LoraError as e: print(e)")
    try:
        return subprocess.run([sys.executable, "-c", code, str(model), str(path)], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(hang)


def test_a_backtracking_pattern_does_not_hang(model, tmp_path):
    """(.*)*Z backtracks through about 2^58 ways on a 58-character module name (51 s for 28 characters):
    as a regular expression it runs for ages; as data it is refused at once."""
    path = peft_lora(tmp_path / "hostile.safetensors", {"unet.alpha_pattern": {"(.*)*Z": 1.0}})
    done = read_in_a_child(model, path, "reading the file's alpha_pattern hangs")
    assert "unet.alpha_pattern" in done.stdout and done.returncode == 0, done.stdout + done.stderr


# Item 4: strengths in a range users mean; merged weights finite and of a size a model holds.


@pytest.mark.parametrize("value", ["style.safetensors:11", "style.safetensors:-10.5", "style.safetensors:1e308",
                                   "style.safetensors:1e30", "style.safetensors:0.5@0,20@3", "style.safetensors:-1e-400@0,99@1"])
def test_strengths_beyond_ten_are_refused(value):
    with pytest.raises(ValueError, match=r"--lora .*strengths must be finite numbers from -10 to 10") as error:
        sample.settings_from_arguments(sample.parse_arguments(["--prompt", "a", "--lora", value]))
    assert "\n" not in str(error.value)


def test_strengths_of_ten_are_taken_and_the_help_says_the_range(capsys):
    settings = sample.settings_from_arguments(sample.parse_arguments(
        ["--prompt", "a", "--lora", "style.safetensors:-10@0,10@2"]))
    assert settings.loras[0].strengths == [(0, -10.0), (2, 10.0)]
    with pytest.raises(SystemExit):
        sample.parse_arguments(["--help"])
    assert "-10 to 10" in " ".join(capsys.readouterr().out.split())


def test_a_state_file_strength_beyond_ten_is_refused():
    from video_settings import LoraSetting, check_lora_values

    with pytest.raises(ValueError, match="from -10 to 10"):
        check_lora_values([LoraSetting("style.safetensors", [(0, 0.5), (4, 1e30)])])


def test_a_strength_beyond_ten_is_refused_by_the_pipeline(model, tmp_path):
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(model)
    loras = pipeline.load_loras([str(peft_lora(tmp_path / "a.safetensors"))], [0.5])
    for strength in (1e30, 1e308, -11.0):
        with pytest.raises(ValueError, match="from -10 to 10"):
            loras.set_strengths([strength])


# (down, up, alpha) of a LoRA of TO_K: an alpha that overflows float32 (1e38 / rank 2 * 2e-4 is finite,
# 1e34: absurd), finite factors whose product overflows, and a product that is finite but absurd.
OVERFLOWING = {
    "alpha 1e38": (torch.full((2, 32), 0.01), torch.full((32, 2), 0.01), torch.tensor(1e38)),
    "factors 1e20": (torch.full((2, 32), 1e20), torch.full((32, 2), 1e20), torch.tensor(2.0)),
    "factors 1e3": (torch.full((2, 32), 1e3), torch.full((32, 2), 1e3), None),
}


@pytest.mark.parametrize("name", OVERFLOWING)
def test_weights_a_model_cannot_hold_are_refused_in_one_line(model, tmp_path, name):
    path = kohya_lora(tmp_path / "huge.safetensors", *OVERFLOWING[name])
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with pytest.raises(ValueError) as error:
        sample.main(["--model", str(model), "--prompt", "a", "--out", str(outputs / "video.mp4"), *FAST,
                     "--lora", f"{path}:1"])
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "strength 1" in message and "alpha" in message, message
    assert TO_K in message, message
    assert not (outputs / "video.mp4").exists()


def test_a_refused_strength_change_leaves_the_weights_as_they_were(model, tmp_path):
    """With a timeline the strengths change during a run: a change that would make weights no model
    holds is refused whole, the weights kept at the strengths they had."""
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(model)
    good = peft_lora(tmp_path / "good.safetensors")
    bad = kohya_lora(tmp_path / "bad.safetensors", *OVERFLOWING["factors 1e3"])
    loras = pipeline.load_loras([str(good), str(bad)], [0.5, 0.0])
    before = {key: value.clone() for key, value in pipeline.unet.state_dict().items()}
    with pytest.raises(LoraError, match="bad.safetensors at strength 1"):
        loras.set_strengths([0.8, 1.0])
    assert loras.strengths == [0.5, 0.0]
    after = pipeline.unet.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in before.items())


# Item 5's rule, kept by sample.py too: a file given twice under two names (a hard link) is one file.


def test_a_hard_link_to_a_lora_given_is_the_same_file(tmp_path):
    path = peft_lora(tmp_path / "a.safetensors")
    os.link(path, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="given twice"):
        sample.settings_from_arguments(sample.parse_arguments(
            ["--prompt", "a", "--lora", str(path), "--lora", f"{tmp_path / 'b.safetensors'}:0.2"]))


# Item 9: what a LoRA never is, refused in one line before the model is loaded.


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def raw_safetensors(path: Path, header: str) -> Path:
    """A file of an 8-byte length and `header`, no tensors."""
    data = header.encode()
    path.write_bytes(len(data).to_bytes(8, "little") + data)
    return path


def hostile_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the error must say)."""
    name = "lora_unet_" + TO_K.replace(".", "_")
    rank0 = kohya_lora(folder / "rank0.safetensors", torch.zeros(0, 32), torch.zeros(32, 0))
    files = {
        "rank 0": (rank0, f"rank0.safetensors does not fit the model: {name} has rank 0"),
        "nested header": (raw_safetensors(folder / "nested.safetensors", '{"a": ' + nested(100_000) + "}"),
                          "nested.safetensors is not a .safetensors file: its header is JSON nested too deep"),
        "nested metadata": (peft_lora(folder / "nested-metadata.safetensors", '{"unet.lora_alpha": ' + nested(100_000) + "}"),
                            "nested-metadata.safetensors: its lora_adapter_metadata is JSON nested too deep"),
    }
    for field, value, expected in (("lora_alpha", [4], "a finite number"), ("lora_alpha", True, "a finite number"),
                                   ("lora_alpha", "8", "a finite number"), ("lora_alpha", 1e400, "a finite number"),
                                   ("lora_alpha", 10**400, "a finite number"),
                                   ("alpha_pattern", [TO_K], "an object of module names"),
                                   ("alpha_pattern", {"to_k": [1]}, "a finite number"),
                                   ("alpha_pattern", {"to_k": None}, "a finite number"),
                                   ("rank_pattern", {"to_k": 2.5}, "a positive integer"),
                                   ("rank_pattern", {"to_k": 0}, "a positive integer"),
                                   ("use_rslora", "yes", "true or false"), ("use_dora", 1, "true or false")):
        tag = f"{field} {json.dumps(value)[:12]}"
        text = '{"unet.%s": %s}' % (field, "1e400" if value == 1e400 else json.dumps(value))
        path = peft_lora(folder / f"metadata-{len(files)}.safetensors", text)
        files[tag] = (path, rf"{path.name}: its lora_adapter_metadata's unet\.{field} .*expected {expected}")
    digits = peft_lora(folder / "digits.safetensors", '{"unet.lora_alpha": 1%s}' % ("0" * 5000))  # over int()'s limit
    files["lora_alpha of 5001 digits"] = (digits, "digits.safetensors: its lora_adapter_metadata holds an integer of over 4300 digits")
    header = '{"a": {"dtype": "F32", "shape": [1%s], "data_offsets": [0, 0]}}' % ("0" * 5000)
    files["a shape of 5001 digits"] = (raw_safetensors(folder / "shape.safetensors", header),
                                       "shape.safetensors is not a .safetensors file: it has no valid safetensors header")
    nan_metadata = peft_lora(folder / "nan-metadata.safetensors", '{"unet.lora_alpha": NaN}')
    files["lora_alpha NaN"] = (nan_metadata, "unet.lora_alpha is NaN, expected a finite number")
    for dtype, tag in ((torch.int32, "I32"), (torch.bool, "BOOL"), (torch.float8_e4m3fn, "F8_E4M3"), (torch.uint8, "U8")):
        path = peft_lora(folder / f"{tag}.safetensors", dtype=dtype)
        files[f"{tag} weights"] = (path, rf"{tag}.safetensors: unet\.{TO_K}\.lora_A\.weight holds {tag}, "
                                         "which no LoRA weight is")
    bool_alpha = kohya_lora(folder / "bool-alpha.safetensors", torch.ones(2, 32), torch.ones(32, 2), torch.tensor(True))
    files["BOOL alpha"] = (bool_alpha, rf"{name}\.alpha holds BOOL, which no LoRA alpha is")
    (folder / "folder.safetensors").mkdir()
    files["a folder"] = (folder / "folder.safetensors", "folder.safetensors is a folder, not a file")
    os.mkfifo(folder / "fifo.safetensors")
    files["a FIFO"] = (folder / "fifo.safetensors", r"fifo.safetensors is a FIFO \(named pipe\), not a file")
    (folder / "loop-a.safetensors").symlink_to(folder / "loop-b.safetensors")
    (folder / "loop-b.safetensors").symlink_to(folder / "loop-a.safetensors")
    files["a link loop"] = (folder / "loop-a.safetensors", "loop-a.safetensors is a loop of symbolic links")
    (folder / "dangling.safetensors").symlink_to(folder / "gone.safetensors")
    files["a dangling link"] = (folder / "dangling.safetensors",
                                "dangling.safetensors is a symbolic link to .*gone.safetensors, which does not exist")
    return files


def test_what_no_lora_is_is_refused_in_one_line_before_the_model_is_loaded(model, tmp_path, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    failed = {}
    for name, (path, expected) in hostile_files(inputs).items():
        try:
            message = refused_before_loading(model, tmp_path, monkeypatch, str(path))
        except BaseException as error:  # noqa: BLE001 - the cases' failures reported together
            failed[name] = f"{type(error).__name__}: {str(error)[:300]}"
            continue
        if not __import__("re").search(expected, message):
            failed[name] = message
    assert not failed, "\n".join(f"{name}: {message}" for name, message in failed.items())


def test_an_integer_alpha_is_a_number(model, tmp_path):
    path = kohya_lora(tmp_path / "int-alpha.safetensors", torch.ones(2, 32), torch.ones(32, 2), torch.tensor(4))
    assert read(path, model).modules[0].alpha.endswith(".alpha")


# Found trying other values: keys that are long or hold line breaks.


def test_a_long_key_neither_hangs_nor_floods_the_message(model, tmp_path):
    """The keys were split by regular expressions whose time grows with the square of a key's length
    (13 s for 16,000 characters; a header may hold 100 MB); now by their ends. Keys in messages are
    cut short and their control characters escaped: the message stays one short line."""
    name = "lora_unet_" + TO_K.replace(".", "_")
    long_key = "a." * 200_000 + "b"
    state = {f"{name}.lora_down.weight": torch.ones(2, 32), f"{name}.lora_up.weight": torch.ones(32, 2),
             long_key: torch.ones(1), "x.y\nz.lora_A.weight": torch.ones(1)}
    path = tmp_path / "long.safetensors"
    save_file(state, path)
    done = read_in_a_child(model, path, "splitting a long key hangs")
    message = done.stdout.strip()
    assert "\n" not in message and len(message) < 1000 and "x.y\\nz.lora_A.weight" in message, message


def test_keys_split_as_the_regular_expressions_split_them():
    """split_key gives, for every short key of LoRA-ish parts, what the regular expressions gave."""
    import itertools
    import re

    kohya = re.compile(r"(?P<module>[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)")
    peft = re.compile(r"(?P<module>.+\..+)\.(?P<part>lora_[AB]\.weight|(lora|lora_linear_layer)\.(down|up)\.weight|alpha)")
    tokens = ["a", "", "\n", "lora_A", "lora_B", "weight", "lora", "down", "up", "alpha", "lora_down", "lora_linear_layer"]
    keys = {".".join(parts) for n in range(1, 6) for parts in itertools.product(tokens, repeat=n)}
    for key in keys:
        match = kohya.fullmatch(key) or peft.fullmatch(key)
        expected = None if match is None else (
            "kohya" if match.re is kohya else "peft", match["module"], lora_files.PARTS[match["part"]])
        assert lora_files.split_key(key) == expected, key


def test_a_position_of_1e308_seconds_is_no_position():
    """Found trying other values: 1e308 seconds overflowed into a traceback while placing the strength."""
    with pytest.raises(ValueError, match="'1@1e308s' is no strength"):
        sample.settings_from_arguments(sample.parse_arguments(["--prompt", "a", "--lora", "style.safetensors:1@1e308s"]))
