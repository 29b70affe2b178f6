"""bench.py itself: its FLOP counting, its CUDA rows on a machine without CUDA, and its endless
child run (no timings here; the UNet's fast paths are in test_unet_fast_paths.py).

- At full size, counted on the meta device, the parameters and FLOPs per frame are SEED_FORMAT.md's
  (4.21 B against 2.57 B; 3.64, 4.51 and 7.35 TFLOP at 768x768), and diffusers counts the same
  SDXL FLOPs.
"""

import json

import pytest
import torch

import bench


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
