"""tools/bench.py itself: its FLOP counting, its CUDA rows on a machine without CUDA, and its endless
child run, and the prepared GPU check (`--quick`) in its CPU smoke mode (no timings here; the
UNet's fast paths are in test_unet_fast_paths.py).

- At full size, counted on the meta device, the parameters and FLOPs per frame are docs/SEED_FORMAT.md's
  (4.21 B against 2.57 B; 3.64, 4.51 and 7.35 TFLOP at 768x768), and diffusers counts the same
  SDXL FLOPs.
"""

import json

import pytest
import torch

from tools import bench


def test_full_size_flops_are_seed_formats():
    row = bench.full_size_flops()
    assert row["parameters_billion"] == {"sdxl": 2.57, "video": 4.21}
    assert row["parameters"]["sdxl"] == 2_567_463_684
    flops = row["tflop_per_frame"]
    assert (round(flops["sdxl"], 2), round(flops["video_without_context"], 2), round(flops["video_with_context"], 2)) == (
        3.64, 4.51, 7.35)
    assert flops["sdxl_diffusers"] == flops["sdxl"]
    assert row["ratio_with_context"] == 2.02
    executed, in_the_loop = row["tflop_per_frame_executed"], row["tflop_per_frame_in_the_loop"]
    assert in_the_loop["video_with_context"] < executed["video_with_context"] < flops["video_with_context"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_rows_skip_cleanly_without_cuda(capsys):
    bench.main(["--device", "cuda"])
    assert json.loads(capsys.readouterr().out) == {"name": "skipped", "reason": "--device cuda: no CUDA device here"}


def test_endless_child_measures_memory():
    row = bench.endless_child(bench.parse_arguments(["--child", "2", "--endless-steps", "1"]))
    assert row["chunks"] == 2 and len(row["seconds"]) == 2 and row["peak_bytes"] >= row["peak_bytes_before_loop"] > 0


def test_quick_check_runs_every_part_on_tiny_models(tmp_path, capsys):
    """`tools/bench.py --device cpu --quick`: each part ran without an error and checked what it checks
    (our UNet equals diffusers' in fp32; the MP4 plays with every frame; offload changes no number),
    the table is printed last and written as JSON."""
    path = tmp_path / "quick.json"
    bench.main(["--device", "cpu", "--quick", "--json", str(path)])
    table = json.loads(path.read_text())
    parts = table["parts"]
    assert set(parts) == {"correctness", "whole_path", "memory_modes", "speed"}
    assert all("error" not in part for part in parts.values()), {name: p.get("error") for name, p in parts.items()}
    assert parts["correctness"]["ours_fp32_vs_diffusers_fp32"] < 1e-5 and parts["correctness"]["ok"]
    assert parts["whole_path"]["frames_decoded"] == parts["whole_path"]["frames_expected"] == 4
    assert parts["memory_modes"]["ok"] and parts["memory_modes"]["tiled_vs_untiled"]["max_abs_difference"] > 0
    assert parts["speed"]["video_seconds_per_frame"] > 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("speed ")


def test_a_failing_part_is_a_row_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(bench, "quick_correctness", broken)
    monkeypatch.setattr(bench, "quick_whole_path", lambda args, folder: {"ok": True})
    monkeypatch.setattr(bench, "quick_memory_modes", lambda args, checkpoint: {"ok": True})
    monkeypatch.setattr(bench, "quick_speed", lambda args: {"video_seconds_per_frame": 1.0})
    bench.main(["--device", "cpu", "--quick", "--json", str(tmp_path / "quick.json")])
    parts = json.loads((tmp_path / "quick.json").read_text())["parts"]
    assert parts["correctness"]["error"] == "RuntimeError: no such kernel" and parts["correctness"]["ok"] is False
    assert parts["speed"]["video_seconds_per_frame"] == 1.0
    assert "no such kernel" in capsys.readouterr().out


def test_json_is_no_input(tmp_path):
    # Issue 22 item 1: --json may not be (nor lie inside) a file the check reads or runs: SDXL's configs,
    # this script, the scripts its whole-path part runs.
    config = bench.SDXL / "unet" / "config.json"
    before = config.read_bytes()
    (tmp_path / "configs").symlink_to(bench.SDXL)
    for path in [config, bench.SDXL / "new.json", tmp_path / "configs" / "new.json", bench.REPOSITORY / "tools" / "bench.py",
                 bench.REPOSITORY / "sample.py", bench.REPOSITORY / "convert_weights.py"]:
        with pytest.raises(ValueError, match="^--json .* is "):
            bench.parse_arguments(["--device", "cpu", "--quick", "--json", str(path)])
    assert config.read_bytes() == before and not (bench.SDXL / "new.json").exists()
