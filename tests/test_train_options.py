"""train.py's options: help, defaults and choices generated from TrainConfig; every bad option as one
line before torch is even imported; a run resumed in the same --out keeps its stored settings and
refuses changes that would alter what it trains. No training here: runs' settings are written as
the train_config.json a run leaves."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import train
from train import TrainConfig

REPOSITORY = Path(__file__).resolve().parents[1]
# Runs train.py as `python train.py ...` does, then says whether torch was imported by then.
RUN_TRAIN = """import runpy, sys
sys.argv = ["train.py", *sys.argv[1:]]
try:
    runpy.run_path("train.py", run_name="__main__")
finally:
    print("torch imported" if "torch" in sys.modules else "torch not imported", file=sys.stderr)
"""


def run_train(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_TRAIN, *options], cwd=REPOSITORY, capture_output=True, text=True,
                          timeout=120)


def store_run(out: Path, **settings) -> TrainConfig:
    """A run's folder as train.py leaves it before its first checkpoint: only train_config.json."""
    config = TrainConfig(out=str(out), **settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(config)))
    return config


def flat(text: str) -> str:
    return " ".join(text.split())


def test_help_shows_each_settings_help_default_and_choices_from_the_dataclass():
    result = run_train("--help")
    assert result.returncode == 0 and result.stderr.strip() == "torch not imported", result.stderr
    text = flat(result.stdout)
    for field in dataclasses.fields(TrainConfig):
        assert flat(f"{field.metadata['help']} (default: {train.shown(field.default)})") in text, field.name
        assert train.option_name(field.name) in text
        if train.literal_choices(field):
            assert "{" + ",".join(train.literal_choices(field)) + "}" in text, field.name
    assert "--no-sample-anchor-frame" in text and "cosine decay to 10%" in text


def test_every_setting_has_help_and_says_what_a_resumed_run_may_do_with_it():
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata.get("help"), field.name
        assert field.metadata.get("resume") in (train.FIXED, train.EXTEND, train.FREE), field.name


def test_the_defaults_are_the_recipe_of_the_shipped_baby():
    # docs/baby.md; --threads 1 there suits that busy machine, not every one.
    recipe = dict(mode="baby", batch_size=16, unet_steps=9000, vae_steps=1500, prediction_type="v_prediction",
                  context_drop=0.3, context_shorten=0.5, sample_every=3000, checkpoint_every=250, log_every=100)
    assert {name: getattr(TrainConfig(), name) for name in recipe} == recipe
    baby = json.loads((REPOSITORY / "models" / "baby" / "config.json").read_text())["sample_defaults"]
    assert train.sample_defaults(TrainConfig()) == baby


def test_the_choices_are_those_the_modules_take():
    from scheduler import PREDICTION_TYPES

    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    assert train.literal_choices(fields["prediction_type"]) == PREDICTION_TYPES
    assert train.literal_choices(fields["autocast"]) == tuple(train.AUTOCAST_DTYPES)


@pytest.mark.parametrize("options, option", [
    (["--grad-clip", "0"], "--grad-clip"), (["--grad-clip", "-1"], "--grad-clip"),
    (["--learning-rate", "0"], "--learning-rate"), (["--learning-rate", "nan"], "--learning-rate"),
    (["--vae-learning-rate", "inf"], "--vae-learning-rate"), (["--context-noise", "nan"], "--context-noise"),
    (["--weight-decay", "-inf"], "--weight-decay"), (["--size", "18"], "--size"),
    (["--unet-steps", "0"], "--unet-steps"),
    (["--vae-steps", "0"], "--vae-steps"), (["--batch-size", "-2"], "--batch-size"), (["--clips", "-1"], "--clips"),
    (["--warmup-steps", "-1"], "--warmup-steps"), (["--sample-steps", "0"], "--sample-steps"),
    (["--sample-guidance", "-1"], "--sample-guidance"), (["--text-drop", "1.5"], "--text-drop"),
    (["--steps", "seven"], "--steps"), (["--mode", "video"], "--mode"), (["--device", "gpu"], "--device"),
    (["--mode", "temporal", "--model", "missing"], "--model"),
    # Issue 22, hostile values: 0, negative, nan, and those too large to mean anything.
    (["--shapes", "0"], "--shapes"), (["--shapes", "3"], "--shapes"), (["--shapes", "nan"], "--shapes"),
    (["--ema-decay", "nan"], "--ema-decay"), (["--ema-decay", "1"], "--ema-decay"),
    (["--validate-every", "-1"], "--validate-every"), (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--sample-every", "0"], "--sample-every"), (["--log-every", "0"], "--log-every"),
    (["--batch-size", "0"], "--batch-size"), (["--steps", "1e12"], "--steps"), (["--steps", "inf"], "--steps"),
    (["--seed", str(2**64)], "--seed"), (["--threads", "100000"], "--threads"), (["--workers", "100000"], "--workers"),
    (["--learning-rate", "1e300"], "--learning-rate"), (["--vae-learning-rate", "2"], "--vae-learning-rate"),
    (["--weight-decay", "1e300"], "--weight-decay"), (["--weight-decay", "1000"], "--weight-decay"),
    (["--context-noise", "1e30"], "--context-noise"), (["--validation-clips", "1000000000"], "--validation-clips"),
])
def test_a_bad_option_is_one_line_before_anything_is_imported_or_written(tmp_path, options, option):
    result = run_train("--out", str(tmp_path / "run"), *options)
    assert result.returncode == 2, result.stderr
    error, marker = result.stderr.splitlines()
    assert error.startswith("error: ") and option in error and marker == "torch not imported", result.stderr
    assert not (tmp_path / "run").exists()


def test_size_must_fit_the_vae_of_the_checkpoint_in_mode_temporal(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vae": {"block_out_channels": [128, 256, 512, 512]}}))
    TrainConfig(mode="temporal", model=str(tmp_path), size=64)
    with pytest.raises(ValueError, match=r"--size must be a multiple of 8 .* got 36"):
        TrainConfig(mode="temporal", model=str(tmp_path), size=36)


def test_the_baby_s_vae_downsamples_by_8_and_its_unet_sees_8x8_latents_at_64_pixels():
    unet, vae = train.baby_configs(64, vae_downsampling=8)
    assert (vae.downsample_factor, unet.sample_size) == (8, 8)
    assert vae.block_out_channels == (8, 16, 32, 32)  # SDXL's (128, 256, 512, 512) over 16
    unet, vae = train.baby_configs(32, vae_downsampling=4)
    assert (vae.downsample_factor, unet.sample_size) == (4, 8)  # the first baby's
    with pytest.raises(ValueError, match=r"--size must be a multiple of 8 \(the VAE's downsampling\), got 36"):
        TrainConfig(size=36, vae_downsampling=8)


def test_a_run_stored_before_vae_downsampling_was_a_setting_resumes_with_the_vae_it_had(tmp_path):
    values = dataclasses.asdict(TrainConfig(out=str(tmp_path), size=32, vae_downsampling=4))
    del values["vae_downsampling"]
    (tmp_path / "train_config.json").write_text(json.dumps(values))
    config = train.parse_config(["--out", str(tmp_path)])
    assert (config.size, config.vae_downsampling) == (32, 4) and train.resume_changes(config) == []
    with pytest.raises(ValueError, match=r"--vae-downsampling 4 -> 8"):
        train.resume_changes(train.parse_config(["--out", str(tmp_path), "--vae-downsampling", "8"]))


def test_the_conditioner_is_a_setting_and_an_unknown_one_is_refused_before_any_file(tmp_path):
    from temporal import CONDITIONERS

    assert TrainConfig().conditioner in CONDITIONERS
    assert train.baby_configs(32, "transformer")[0].conditioner == "transformer"
    with pytest.raises(ValueError, match="--conditioner cheap: .*must be one of"):
        train.train(TrainConfig(out=str(tmp_path / "run"), conditioner="cheap", size=16, vae_downsampling=4))
    assert not (tmp_path / "run").exists()


def test_options_not_given_take_the_values_of_the_run_in_out(tmp_path):
    stored = store_run(tmp_path, prediction_type="epsilon", context_drop=0.1, context_shorten=0.0, unet_steps=7,
                       sample_guidance=5.0, gradient_checkpointing=True)
    assert train.parse_config(["--out", str(tmp_path)]) == stored  # resumes as it was started, not as the defaults
    given = train.parse_config(["--out", str(tmp_path), "--unet-steps", "9"])
    assert given == dataclasses.replace(stored, unet_steps=9)
    assert train.parse_config(["--out", str(tmp_path / "new")]).prediction_type == "v_prediction"


def test_old_names_of_settings_work_as_options_and_in_old_runs(tmp_path):
    new_run = train.parse_config(["--out", str(tmp_path / "new"), "--steps", "9", "--chunk-frames", "3"])
    assert (new_run.unet_steps, new_run.frames) == (9, 3)
    stored = store_run(tmp_path, size=16, vae_downsampling=4, unet_steps=7, frames=3)
    values = json.loads((tmp_path / "train_config.json").read_text())
    for old, new in train.RENAMED_SETTINGS.items():  # train_config.json as runs before the renames wrote it
        values[old] = values.pop(new)
    (tmp_path / "train_config.json").write_text(json.dumps(values))
    assert train.parse_config(["--out", str(tmp_path)]) == stored
    assert train.resume_changes(train.parse_config(["--out", str(tmp_path), "--steps", "9"])) == ["--unet-steps 7 -> 9"]
    with pytest.raises(ValueError, match=r"--frames 3 -> 4, --unet-steps 7 -> 6 \(it may only increase\)"):
        train.resume_changes(dataclasses.replace(stored, frames=4, unet_steps=6))


def test_a_resumed_run_accepts_only_changes_that_extend_it(tmp_path):
    stored = store_run(tmp_path, size=16, vae_downsampling=4, unet_steps=10, vae_steps=5)
    extended = dataclasses.replace(stored, unet_steps=20, vae_steps=6, log_every=7, threads=2, device="cpu",
                                   gradient_checkpointing=True, sample_guidance=4.0)
    assert train.resume_changes(extended) == [
        "--unet-steps 10 -> 20", "--gradient-checkpointing off -> on", "--vae-steps 5 -> 6", "--log-every 100 -> 7",
        "--threads 0 -> 2", "--device auto -> cpu", "--sample-guidance 3.0 -> 4.0"]
    refused = dict(size=32, learning_rate=0.01, prediction_type="epsilon", context_shorten=0.0, seed=1,
                   batch_size=4, autocast="bf16", unet_steps=9)
    with pytest.raises(ValueError) as error:
        train.resume_changes(dataclasses.replace(stored, **refused))
    message = str(error.value)
    for change in ("--size 16 -> 32", "--learning-rate 0.001 -> 0.01", "--prediction-type v_prediction -> epsilon",
                   "--context-shorten 0.5 -> 0.0", "--seed 0 -> 1", "--batch-size 16 -> 4", "--autocast none -> bf16",
                   "--unet-steps 10 -> 9 (it may only increase)"):
        assert change in message
    assert "\n" not in message
    (tmp_path / "unet.pt").touch()  # the UNet stage has begun on the VAE of step 5
    with pytest.raises(ValueError, match=r"--vae-steps 5 -> 6 \(the UNet stage has begun\)"):
        train.resume_changes(dataclasses.replace(stored, vae_steps=6))


def test_the_command_line_refuses_to_change_a_run_before_importing_torch(tmp_path):
    store_run(tmp_path, size=16, vae_downsampling=4, unet_steps=1, vae_steps=1)
    before = (tmp_path / "train_config.json").read_text()
    result = run_train("--out", str(tmp_path), "--size", "32", "--learning-rate", "0.01", "--steps", "1",
                       "--vae-steps", "1", "--threads", "1")
    assert result.returncode == 2, result.stderr
    error, marker = result.stderr.splitlines()
    assert "--size 16 -> 32" in error and "--learning-rate 0.001 -> 0.01" in error and marker == "torch not imported"
    assert (tmp_path / "train_config.json").read_text() == before and sorted(tmp_path.iterdir()) == [
        tmp_path / "train_config.json"]


def a_checkpoint_folder(folder: Path) -> Path:
    """Enough of a converted checkpoint for the option checks of mode temporal: its config.json."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"vae": {"block_out_channels": [8, 16, 32]}}))
    return folder


@pytest.mark.parametrize("case", ["out is model", "out inside model", "out is data", "out inside data",
                                  "data inside out", "validation data inside out", "out links to model"])
def test_an_output_that_is_or_holds_an_input_is_refused_before_anything_is_imported(tmp_path, case):
    # Issue 22 item 1: train.py wrote OUT/model, OUT/samples, checkpoints into the folder it read.
    model = a_checkpoint_folder(tmp_path / "checkpoint")
    data, out = tmp_path / "videos", tmp_path / "run"
    data.mkdir()
    options = {"out is model": (["--mode", "temporal", "--model", str(model), "--out", str(model)], "--model"),
               "out inside model": (["--mode", "temporal", "--model", str(model), "--out", str(model / "run")],
                                    "--model"),
               "out is data": (["--data", str(data), "--out", str(data)], "--data"),
               "out inside data": (["--data", str(data), "--out", str(data / "run")], "--data"),
               "data inside out": (["--data", str(out / "videos"), "--out", str(out)], "--data"),
               "validation data inside out": (["--validation-data", str(out / "held-out"), "--out", str(out)],
                                              "--validation-data"),
               "out links to model": (["--mode", "temporal", "--model", str(model), "--out", str(tmp_path / "link")],
                                      "--model")}
    arguments, input_option = options[case]
    if case in ("data inside out", "validation data inside out"):
        (out / arguments[1].rsplit("/", 1)[1]).mkdir(parents=True)  # a run folder that holds the data
    if case == "out links to model":
        (tmp_path / "link").symlink_to(model, target_is_directory=True)
    before = sorted(str(path) for path in tmp_path.rglob("*"))
    result = run_train(*arguments, "--size", "16", "--vae-downsampling", "4")
    assert result.returncode == 2, result.stderr
    error, marker = result.stderr.splitlines()
    assert error.startswith("error: --out ") and input_option in error and marker == "torch not imported", error
    assert sorted(str(path) for path in tmp_path.rglob("*")) == before


def test_an_output_beside_its_inputs_is_accepted(tmp_path):
    model = a_checkpoint_folder(tmp_path / "checkpoint")
    (tmp_path / "videos").mkdir()
    TrainConfig(mode="temporal", model=str(model), data=str(tmp_path / "videos"), out=str(tmp_path / "checkpoint-run"),
                size=16)
    TrainConfig(out=str(tmp_path / "shapes"))  # --data shapes is the shapes world, not a folder


@pytest.mark.parametrize("settings, option", [(dict(out=""), "--out"), (dict(out="  "), "--out"),
                                              (dict(data=""), "--data"), (dict(mode="temporal", model=""), "--model")])
def test_an_empty_path_is_refused_not_taken_as_the_current_folder(tmp_path, monkeypatch, settings, option):
    # --out "" trained into the current folder (and replaced a ./model there); --data "" read it as videos.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vae": {"block_out_channels": [8, 16, 32]}}))
    with pytest.raises(ValueError, match=f"^{option} "):
        TrainConfig(**{"out": str(tmp_path / "run"), **settings})


@pytest.mark.parametrize("damage, named", [
    (dict(unet_steps="9"), "--unet-steps"), (dict(seed=None), "--seed"), (dict(learning_rate=1e300), "--learning-rate"),
    (dict(mode="video"), "--mode"), (dict(world_size="2"), "world_size"), (dict(world_size=None), "world_size"),
    (dict(world_size=0), "world_size"), (dict(world_size=True), "world_size"), ("nested", "nested")])
def test_a_damaged_train_config_json_is_named_in_one_line_before_anything_is_imported(tmp_path, damage, named):
    # Issue 22's other damaged JSON: valid JSON of the wrong types was blamed on an option not given, or a traceback.
    store_run(tmp_path, size=16, vae_downsampling=4)
    path = tmp_path / "train_config.json"
    if damage == "nested":
        path.write_text("[" * 100_000 + "]" * 100_000)
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), **damage}))
    before = path.read_bytes()
    result = run_train("--out", str(tmp_path))
    assert result.returncode == 2, result.stderr
    error, marker = result.stderr.splitlines()
    assert error.startswith(f"error: {path}") and named in error and marker == "torch not imported", error
    assert path.read_bytes() == before


def test_a_global_batch_that_the_processes_cannot_share_says_so(tmp_path, monkeypatch):
    stored = store_run(tmp_path, size=16, vae_downsampling=4, batch_size=1, vae_batch_size=3)
    values = json.loads((tmp_path / "train_config.json").read_text())
    (tmp_path / "train_config.json").write_text(json.dumps({**values, "world_size": 3}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError) as error:
        train.resume_changes(dataclasses.replace(stored, batch_size=2, vae_batch_size=5))
    assert ("--batch-size 1 x 3 processes -> 2 x 2 processes (the global batch is 3, which 2 processes cannot share "
            "evenly)") in str(error.value)
    assert ("--vae-batch-size 3 x 3 processes -> 5 x 2 processes (the global batch is 9, which 2 processes cannot "
            "share evenly)") in str(error.value)


@pytest.mark.parametrize("inside", ["", "run"])
def test_an_output_that_is_or_lies_inside_a_model_folder_is_refused_in_mode_baby_too(tmp_path, inside):
    # A model folder is no run's folder: --out models/baby put checkpoints, logs and samples among its files.
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"format": "sdxl-video-checkpoint/1"}))
    result = run_train("--out", str(model / inside), "--size", "16", "--vae-downsampling", "4", "--steps", "1",
                       "--vae-steps", "1", "--batch-size", "2", "--vae-batch-size", "2", "--threads", "1")
    assert result.returncode == 2, result.stderr
    error, marker = result.stderr.splitlines()
    assert error == (f"error: --out {model / inside} is or lies inside the model folder {model} (it holds a "
                     f"checkpoint's config.json); give a run's folder outside it"), error
    assert sorted(model.rglob("*")) == [model / "config.json"]
