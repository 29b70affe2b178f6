"""train.py --fsdp under torchrun with 2 gloo processes: it ends where one process with the same global
batch ends (float32, within 1e-5, validation loss included), a run interrupted and resumed from its
sharded checkpoint (torch.distributed.checkpoint) ends exactly where the uninterrupted one does, and
the checkpoint resumes on one process too. The shards' sizes are those --plan counts
(infra/memory.py memory_plan). Mode temporal on a tiny checkpoint: frozen spatial weights, trained
temporal ones, a weight average, the default context and text drops."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from tiny_pipeline import tiny_video_pipeline

REPOSITORY = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 4
# Adam divides each update by the gradient's running size, so a weight whose gradient is near zero moves
# by up to the learning rate whatever float32's summation order did to that gradient: at 1e-3 a few
# conditioner weights end 4e-5 apart (the losses within 1e-6); the comparison runs at 1e-4.
SETTINGS = dict(mode="temporal", size=32, unet_steps=4, checkpoint_every=2, warmup_steps=2, learning_rate=1e-4,
                ema_decay=0.9, validate_every=4, validation_clips=3, sample_steps=2, log_every=1000, sample_every=1000,
                threads=1)

# Run under torchrun: `straight` trains 4 steps; `resumed` stops after step 3 (its checkpoint is at 2),
# leaves a copy of its folder then for a later run, and resumes. Rank 0 writes what it measured.
SCRIPT = """
import json, shutil, sys
import torch, torch.distributed as dist
sys.path.insert(0, {repository!r})
import train
from infra import memory

settings, folder, mode = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
measured = {{}}

class Interrupted(Exception):
    pass

def measure(stage):  # at the first step that used every trained weight (the context may be dropped)
    complete = all(p.grad is not None for p in stage.parameters) and len(stage.optimizer.state) == len(stage.parameters)
    if complete and not measured and dist.get_rank() == 0:  # rank 0 holds the largest (padded) shards
        local = lambda tensor: tensor.to_local().numel() * tensor.element_size()
        state = [value for values in stage.optimizer.state.values() for value in values.values()]
        measured.update(weights=sum(local(p) for p in stage.module.parameters()),
                        gradients=sum(local(p.grad) for p in stage.parameters),
                        optimizer=sum(local(v) if hasattr(v, "to_local") else v.numel() * v.element_size()
                                      for v in state))

def interrupt(stage):
    if stage.step == 3:
        raise Interrupted

def config(name, **changes):
    return train.TrainConfig(out=folder + "/" + name, **{{**settings, **changes}})

if mode == "two":
    train.train(config("straight"), on_step=measure)
    try:
        train.train(config("resumed"), on_step=interrupt)
    except Interrupted:
        pass
    if dist.get_rank() == 0:
        shutil.copytree(folder + "/resumed", folder + "/one")
    dist.barrier()
    train.train(config("resumed"))
    if dist.get_rank() == 0:
        with open(folder + "/measured.json", "w") as file:
            json.dump(measured, file)
else:
    train.train(config("one"))
"""


def torchrun(tmp_path: Path, processes: int, settings: dict, mode: str, port: int) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(repository=str(REPOSITORY)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(port), str(script), json.dumps(settings), str(tmp_path), mode]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def unet_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "unet.safetensors")


def log(out: Path) -> tuple[dict[int, float], dict[int, float]]:
    """{step: training loss}, {step: validation loss} (a resumed step replaces the first)."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    training = {r["step"]: r["loss"] for r in records if r["stage"] == "unet"}
    return training, {r["step"]: r["loss"] for r in records if r["stage"] == "validation"}


def close(a: dict, b: dict, tolerance: float) -> bool:
    return a.keys() == b.keys() and all(abs(a[key] - b[key]) <= tolerance for key in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One process (DDP's path, batch 4), then two FSDP processes (batch 2 each) straight and
    interrupted, then the interrupted run's copy resumed on one FSDP process."""
    folder = tmp_path_factory.mktemp("fsdp")
    tiny_video_pipeline(folder / "tokenizer").save_pretrained(folder / "checkpoint")
    settings = {**SETTINGS, "model": str(folder / "checkpoint")}
    train.train(train.TrainConfig(out=str(folder / "single"), batch_size=GLOBAL_BATCH, **settings))
    fsdp = {**settings, "fsdp": True}
    torchrun(folder, 2, {**fsdp, "batch_size": GLOBAL_BATCH // 2}, "two", 29531)
    torchrun(folder, 1, {**fsdp, "batch_size": GLOBAL_BATCH}, "one", 29532)
    return folder


def test_fsdp_on_two_processes_ends_where_one_process_does(runs):
    single, sharded = unet_weights(runs / "single"), unet_weights(runs / "straight")
    assert single.keys() == sharded.keys()
    for name in single:
        assert torch.allclose(single[name], sharded[name], rtol=0, atol=1e-5), name
    (single_loss, single_validation), (sharded_loss, sharded_validation) = log(runs / "single"), log(runs / "straight")
    assert sorted(single_validation) == [4]  # at the end only: each validation also makes the shapes videos
    assert close(single_loss, sharded_loss, 1e-5) and close(single_validation, sharded_validation, 1e-5)
    assert (runs / "straight" / "unet.dcp" / "train_state.json").is_file() and not (runs / "straight" / "unet.pt").exists()
    assert (runs / "straight" / "curves.png").is_file()


def test_a_sharded_checkpoint_resumes_exactly(runs):
    straight, resumed = unet_weights(runs / "straight"), unet_weights(runs / "resumed")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert log(runs / "straight") == log(runs / "resumed")


def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(runs):
    single, one = unet_weights(runs / "single"), unet_weights(runs / "one")
    for name in single:
        assert torch.allclose(single[name], one[name], rtol=0, atol=1e-5), name
    assert close(log(runs / "single")[0], log(runs / "one")[0], 1e-5)


def test_the_shards_are_the_sizes_the_plan_counts(runs):
    from infra.memory import memory_plan, meta_unet, unet_units
    from infra.checkpoint import model_configs

    unet = meta_unet(model_configs(runs / "checkpoint")["unet"], temporal_only=True)
    planned = memory_plan(unet, unet_units(unet), processes=2, compute_dtype=None)["fsdp"]
    measured = json.loads((runs / "measured.json").read_text())
    assert measured == {name: planned[name] for name in ("weights", "gradients", "optimizer")}


def test_fsdp_without_torchrun_is_refused_before_any_work(tmp_path, model):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--fsdp .* torchrun"):
        train.train(train.TrainConfig(out=str(out), fsdp=True, **{**SETTINGS, "model": str(model)}))
    assert not out.exists()


def test_a_checkpoint_of_the_other_kind_is_refused(tmp_path):
    out = tmp_path / "run"
    (out / "unet.dcp").mkdir(parents=True)  # a sharded checkpoint, of a run from before --fsdp was stored
    stored = dataclasses.asdict(train.TrainConfig(out=str(out)))
    del stored["fsdp"]
    (out / "train_config.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"unet.dcp is the checkpoint of a run with --fsdp: resume it with --fsdp"):
        train.train(train.TrainConfig(out=str(out)))
    assert sorted(path.name for path in out.iterdir()) == ["train_config.json", "unet.dcp"]


def test_a_run_resumed_on_another_number_of_processes_keeps_its_global_batch(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    stored = train.TrainConfig(out=str(out), batch_size=2, vae_batch_size=8)
    (out / "train_config.json").write_text(json.dumps({**dataclasses.asdict(stored), "world_size": 2}))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert train.resume_changes(train.TrainConfig(out=str(out), batch_size=4, vae_batch_size=16)) == [
        "--batch-size 2 x 2 processes -> 4 x 1 processes (the same global batch)",
        "--vae-batch-size 8 x 2 processes -> 16 x 1 processes (the same global batch)"]
    with pytest.raises(ValueError, match=r"--batch-size 2 x 2 processes -> 2 x 1 processes \(give --batch-size 4: "):
        train.resume_changes(train.TrainConfig(out=str(out), batch_size=2, vae_batch_size=16))
