"""train.py --plan and its counts (infra/memory.py): bytes per process against a hand count on a tiny module (FSDP2's
shards of ceil(rows / processes) rows), saved activations against a hand count of an MLP's
backward, the table of the command line against the counts, before any work. The shards of a real
FSDP run: test_train_distributed.py."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from infra import memory
from infra.memory import memory_plan, saved_bytes

REPOSITORY = Path(__file__).resolve().parents[1]


class Tiny(nn.Module):
    """A root Linear(4, 6) (30 parameters) and two units: Linear(6, 10) trained (70), Linear(10, 3) frozen (33)."""

    def __init__(self):
        super().__init__()
        self.first, self.middle, self.last = nn.Linear(4, 6), nn.Linear(6, 10), nn.Linear(10, 3)
        self.last.requires_grad_(False)
        self.first.requires_grad_(False)


def test_bytes_per_process_are_the_hand_count():
    model = Tiny()
    plan = memory_plan(model, [model.middle, model.last], processes=4, compute_dtype=torch.bfloat16)
    # DDP: 133 float32 weights, a bf16 copy of each under autocast; 70 trained: gradients, AdamW's
    # two moments and a float32 step for each of its 2 tensors.
    assert plan["ddp"] == {"weights": 133 * 4, "gathered": 133 * 2, "gradients": 70 * 4, "optimizer": 70 * 8 + 2 * 4}
    # FSDP over 4: rows split in ceil(rows / 4): first.weight (6, 4) -> 2 x 4, first.bias 2; middle.weight
    # (10, 6) -> 3 x 6, middle.bias 3; last.weight (3, 10) -> 1 x 10, last.bias 1: 8 + 2 + 18 + 3 + 10 + 1 = 42.
    # Gathered in bf16: the root (30) and the two largest units (70 + 33); the trained unit's whole
    # float32 gradients (70) while they are reduced.
    assert plan["fsdp"] == {"weights": 42 * 4, "gathered": (30 + 70 + 33) * 2 + 70 * 4, "gradients": (18 + 3) * 4,
                            "optimizer": (18 + 3) * 8 + 2 * 4}
    assert memory_plan(model, [model.middle, model.last], 1, None)["ddp"]["gathered"] == 0  # no autocast, no copy


def test_saved_activations_are_the_hand_count():
    # x (5, 4) -> Linear(4, 8) -> ReLU -> Linear(8, 3), every weight trained: the backward keeps x (for
    # the first weight's gradient; the input needs none) and the ReLU's output (for its own backward and
    # the second weight's gradient), once: (5 * 4 + 5 * 8) float32 = 240 bytes; never the weights.
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    without, with_checkpointing = saved_bytes(model, [], lambda: model(x))
    assert without == with_checkpointing == (5 * 4 + 5 * 8) * 4
    # The second Linear as a checkpointed unit: its input stays (the ReLU's output), and its own saved
    # tensors (that same input) are back while its backward runs.
    assert saved_bytes(model, [model[2]], lambda: model(x)) == (240, 240)


def test_on_meta_the_unet_counts_as_on_the_cpu():
    from model import UNetConfig

    config, sample = UNetConfig.tiny(), memory.Sample(frames=3, context_frames=2, latent_size=4, text_tokens=5)
    counts = {}
    for device in ("meta", "cpu"):
        with torch.device(device):
            unet = memory.UNet(config)
        unet.requires_grad_(False)
        for parameter in unet.temporal_parameters():
            parameter.requires_grad_(True)
        inputs = memory.one_sample_inputs(config, sample, torch.float32, device)
        counts[device] = saved_bytes(unet, memory.unet_units(unet), lambda: unet(**inputs))
    assert counts["meta"] == counts["cpu"] and counts["cpu"][1] < counts["cpu"][0]


def test_the_command_line_prints_the_counts_and_exits(model, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "train.py", "--mode", "temporal", "--model", str(model), "--out", str(out),
                             "--size", "32", "--batch-size", "3", "--processes", "2", "--autocast", "bf16", "--plan"],
                            cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not out.exists()  # no work, no folder
    from infra.checkpoint import model_configs

    unet = memory.meta_unet(model_configs(model)["unet"], temporal_only=True)
    plan = memory_plan(unet, memory.unet_units(unet), 2, torch.bfloat16)
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in result.stdout.splitlines() if line.startswith("| ")}
    unit = next(name.split()[0] for name in rows if name.endswith("per process"))
    assert unit == "MB"
    for name in memory.ROWS:
        assert [float(value) for value in rows[name]] == [round(plan[kind][name] / 1e6, 2) for kind in ("ddp", "fsdp")]
    assert "processes: 2, compute in bfloat16, batch 3 per process" in result.stdout
