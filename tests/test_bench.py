"""tools/bench.py itself: its FLOP counting, its CUDA rows on a machine without CUDA, and its endless
child run, and the prepared GPU check (`--quick`) in its CPU smoke mode (no timings here; the
UNet's fast paths are in test_unet_fast_paths.py).

- At full size, counted on the meta device, the parameters and FLOPs per frame are docs/SEED_FORMAT.md's
  (4.21 B against 2.57 B; 3.64, 4.51 and 7.35 TFLOP at 768x768), and diffusers counts the same
  SDXL FLOPs.
- The baby row runs the shipped baby with the model code before issue 24's cuts and with this
  checkout's, and their UNet passes agree within 1e-5 (issue 24's bound; they are equal bit for bit
  since no cut changed the maths).
- The student row runs the teacher and a student each with its own sample_defaults: the UNet is
  called once a step, as many steps as each model's defaults say.
"""

import json
import re
import shutil
from pathlib import Path

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


def test_numeric_options_are_checked_at_start():
    # Issue 22 item 13: --repeats -1 failed after 33 s (the median of no times); --repeats 0 (and the
    # step counts 0) silently became the default; --warmup -1 and --peak-tflops nan, 0, inf were accepted.
    for arguments, message in [
        (["--repeats", "-1"], "^--repeats must be an integer in 1 .. 1000, got -1"),
        (["--repeats", "0"], "^--repeats must be an integer in 1 .. 1000, got 0"),
        (["--repeats", str(10**9)], "^--repeats must be"),
        (["--warmup", "-1"], "^--warmup must be an integer in 0 .. 1000, got -1"),
        (["--warmup", str(10**12)], "^--warmup must be"),
        (["--chunk-steps", "0"], "^--chunk-steps must be"),
        (["--endless-steps", "-3"], "^--endless-steps must be"),
        (["--threads", "0"], "^--threads must be"),
        (["--threads", str(10**9)], "^--threads must be"),
        (["--child", "0"], "^--child must be"),
        (["--endless-chunks", "5,x"], "^--endless-chunks '5,x': give chunk counts"),
        (["--endless-chunks", ""], "^--endless-chunks '': give chunk counts"),
        (["--endless-chunks", "0,5"], "^--endless-chunks '0,5': give chunk counts"),
        (["--endless-chunks", "1"], "^--endless-chunks '1': .* at least 2"),
        (["--endless-chunks", "5," + "9" * 5000], "^--endless-chunks '5,999.*\\.\\.\\.': give chunk counts"),
        (["--device", "tpu"], "^--device 'tpu': give cpu, cuda or cuda:N"),
        (["--device", "cudafoo"], "^--device 'cudafoo'"),
    ] + [([f"--peak-tflops={value}"], f"^--peak-tflops must be a finite number in \\(0, 100000\\], got {re.escape(f'{float(value):g}')}")
         for value in ("nan", "0", "inf", "-inf", "-989", "1e300")]:
        with pytest.raises(ValueError, match=message):
            bench.parse_arguments(arguments)
    # What is left alone keeps its defaults; a --repeats or a step count given is kept.
    args = bench.parse_arguments(["--repeats", "1", "--warmup", "0", "--chunk-steps", "1", "--peak-tflops", "312"])
    assert (args.repeats, args.warmup, args.chunk_steps, args.endless_steps, args.peak_tflops) == (1, 0, 1, 25, 312.0)


def test_a_refused_option_is_one_line_before_any_work():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "tools/bench.py", "--repeats", "-1"], cwd=bench.REPOSITORY,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "error: --repeats must be an integer in 1 .. 1000, got -1\n"


def test_json_is_checked_writable_at_start_and_only_with_quick(tmp_path):
    # The table comes after minutes on a GPU: a --json that cannot be written is refused before them,
    # and without --quick (which alone writes it) --json is not silently ignored.
    for arguments, message in [
        (["--quick", "--json", str(tmp_path / "missing" / "quick.json")], "^--json .* cannot be written"),
        (["--quick", "--json", str(tmp_path / ("x" * 300 + ".json"))], "^--json .* cannot be written"),
        (["--json", str(tmp_path / "quick.json")], "^--json is written by --quick only"),
    ]:
        with pytest.raises(ValueError, match=message):
            bench.parse_arguments(arguments)
    assert list(tmp_path.iterdir()) == []


def test_baby_row_compares_the_code_before_with_this_checkouts():
    row = bench.baby(bench.parse_arguments(["--rows", "baby", "--repeats", "1", "--warmup", "0"]))
    if "skipped" in row:
        pytest.skip(row["skipped"])
    assert row["shapes"] == {"batch": 2, "frames": 4, "latent": [8, 8], "context_frames": 2, "text_tokens": 16,
                             "steps": 25, "guidance": 3.0}
    assert row["max_abs_difference"]["unet_pass"] <= 1e-5
    assert all(row[key]["before"] > 0 and row[key]["after"] > 0 for key in ("unet_pass_ms", "seconds_per_chunk"))
    assert 0.45 < row["gflop_per_pass"] < 0.55  # issue 24: 497 MFLOP; the meta count adds the attention products


def test_student_row_runs_teacher_and_student_with_their_own_defaults(tmp_path, monkeypatch):
    # Issue 28: the student (here the baby's weights with a student's sample_defaults: 4 LCM steps, no
    # guidance) and its teacher make their videos with their own defaults; counted UNet calls show the steps.
    student = tmp_path / "student"
    shutil.copytree(bench.BABY, student)
    config = json.loads((student / "config.json").read_text())
    config["sample_defaults"].update(steps=4, guidance=1.0, scheduler="lcm")
    (student / "config.json").write_text(json.dumps(config))
    calls = {}
    load = bench.StableDiffusionXLVideoPipeline.from_pretrained

    def counting(folder, device=None, dtype=None):
        pipeline = load(folder, device, dtype)
        name = "student" if Path(folder) == student else "teacher"
        calls[name] = 0
        pipeline.unet.register_forward_hook(lambda *_: calls.__setitem__(name, calls[name] + 1))
        return pipeline

    monkeypatch.setattr(bench.StableDiffusionXLVideoPipeline, "from_pretrained", staticmethod(counting))
    row = bench.student(bench.parse_arguments(["--rows", "student", "--repeats", "1", "--warmup", "0",
                                               "--student", str(student)]))
    chunks = bench.CHUNKS_PER_CALL  # one timed call, no warm-up
    assert calls == {"teacher": 25 * chunks, "student": 4 * chunks}  # one UNet call a step (guidance batches)
    assert ({key: row["settings"]["student"][key] for key in ("steps", "guidance", "scheduler")}
            == {"steps": 4, "guidance": 1.0, "scheduler": "lcm"})
    assert {key: row["settings"]["teacher"][key] for key in ("steps", "guidance")} == {"steps": 25, "guidance": 3.0}
    assert set(row["seconds_per_chunk"]) == set(row["frames_per_second"]) == {"teacher", "student"}
    assert all(value > 0 for value in row["frames_per_second"].values()) and row["fps_ratio"] > 0
    assert row["command"].startswith("python tools/bench.py --rows student --student ")


def test_student_row_is_skipped_without_a_student(tmp_path):
    row = bench.student(bench.parse_arguments(["--rows", "student", "--student", str(tmp_path / "missing")]))
    assert set(row) == {"name", "skipped"} and row["skipped"].startswith(f"--student {tmp_path / 'missing'}: ")
