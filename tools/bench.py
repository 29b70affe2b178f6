"""Speed and memory of the video UNet and of endless generation: one JSON object per line.

    python tools/bench.py                         # CPU, one thread, under 5 minutes
    python tools/bench.py --threads 2 --rows unet_vs_diffusers,temporal_overhead
    python tools/bench.py --device cuda           # full SDXL sizes in bf16 (written for an H100, untested)
    python tools/bench.py --device cuda --quick --json quick.json   # the prepared GPU check, under 8 minutes

`--quick` is one run on a GPU that checks what the CPU cannot: our UNet against diffusers' in bf16
at 768x768, the video UNet in bf16 against fp32, the whole path (a random full-size diffusers
folder, convert_weights.py, sample.py for 2 chunks, a playable MP4), the memory modes (offload
outputs and peaks against infra/memory.py's estimate, tiled decoding) and the speed of the denoising loop
(seconds per frame, MFU, peak memory); it prints a table last. `--device cpu --quick` runs the same
code on tiny models (tests/test_bench.py).

Rows (`--rows` picks some):
- full_size_flops: parameters and model FLOPs per frame of SDXL and of the original video
  architecture at 768x768, counted on the meta device (no time, no memory);
- unet_vs_diffusers: our UNet without temporal modules against diffusers' UNet2DConditionModel,
  same config, weights and frames (diffusers gets the frames as a batch of images);
- temporal_overhead: the same UNet with and without its temporal modules, with a context, in
  time and in FLOPs (torch.utils.flop_counter);
- sdpa_backends (GPU rows): a denoising step under each scaled_dot_product_attention backend;
- chunk: one whole chunk per frame: text encoding, denoising with guidance, VAE decode;
- vae_decode: the VAE decode in float32 and in bfloat16;
- baby: the shipped baby (models/baby) as the quick start runs it, this checkout's model code
  against BASELINE_REVISION's (before the chunk's overhead was cut), interleaved: a UNet pass of a
  step (ms, GFLOP/s), a whole chunk (seconds), and the largest difference of their outputs;
- student: a few-step student (`--student`, default models/baby-student; skipped where missing)
  against its teacher, the baby, each making a video as sample.py does with its own sample_defaults,
  interleaved: seconds per chunk (denoising and decode), frames per second, their ratio (issue 28);
- endless / peak_memory: chunk after chunk as sample.py makes them, each run in a fresh process:
  throughput, and peak memory (RSS on CPU, max_memory_allocated on GPU) at 5 and at 50 chunks.

Times are medians over `--repeats` runs after `--warmup` runs; ours and diffusers are interleaved
in one process so that a busy machine slows both alike. "In the loop" is a denoising step after
the first of a chunk, when what depends only on the text and the context is cached. On the CPU the models are SDXL's block
structure at a fifth of its widths (`bench_unet_config`); on a GPU they are SDXL's own sizes from
configs/sdxl-base-1.0 with random weights.
"""

import argparse
import importlib
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/NAME.py`: the modules are at the repository's root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from shapes import world
from infra.files import check_writable
from infra.checkpoint import DTYPES
from infra.cli import OneLineParser
from infra.files import atomic_file, check_not_an_input
from infra.memory import TEXT_TOKENS, unet_inputs
from model import UNet, UNetConfig, micro_conditioning
from pipeline import StableDiffusionXLVideoPipeline
from scheduler import SchedulerConfig
from text import TextEncoder, clip_tokenizers
from training.baby import baby_configs, baby_text_encoder
from vae import TILE, TILE_OVERLAP, AutoencoderKL, VAEConfig

try:  # the reference, a test-only dependency: needed only by the rows and parts that compare with diffusers
    from diffusers import UNet2DConditionModel

    from tools.diffusers_models import diffusers_unet, diffusers_vae
except ImportError:
    UNet2DConditionModel = diffusers_unet = diffusers_vae = None

REPOSITORY = Path(__file__).resolve().parents[1]
SDXL = REPOSITORY / "configs" / "sdxl-base-1.0"
CPU_ROWS = ("full_size_flops", "unet_vs_diffusers", "temporal_overhead", "chunk", "vae_decode", "baby", "student",
            "endless")
GPU_ROWS = ("full_size_flops", "unet_vs_diffusers", "temporal_overhead", "sdpa_backends", "chunk", "endless")
PROMPT = "a red circle moving left"
SCRIPTS = ("convert_weights.py", "sample.py")  # what `--quick`'s whole path runs (`run_script`)
BABY = REPOSITORY / "models" / "baby"
# The baby row's "before": the last commit whose model code (MODEL_FILES) had the per-step overhead
# that issue 24 measured; its files are read with `git show`, so the row needs the repository's history.
BASELINE_REVISION = "ff59651"
MODEL_FILES = ("model.py", "layers.py", "temporal.py")
STUDENT = REPOSITORY / "models" / "baby-student"  # the student row's default: train.py --mode distill's student of the baby
CHUNKS_PER_CALL = 5  # chunks per timed call in the student row (a student's chunk is a tenth of a second on a CPU)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--rows", help=f"comma-separated rows (default CPU: {','.join(CPU_ROWS)})")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default fp32 on CPU, bf16 on GPU")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (default 5 on CPU, 3 on GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNets (both sides in unet_vs_diffusers)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)")
    parser.add_argument("--chunk-steps", type=int, help="denoising steps in the chunk row (default 2 on CPU, 25 on GPU)")
    parser.add_argument("--endless-steps", type=int, help="steps per chunk in endless/peak_memory (default 25 on CPU, 2 on GPU)")
    parser.add_argument("--endless-chunks", default="5,50", help="chunk counts of the peak_memory runs; the last is the endless row")
    parser.add_argument("--quick", action="store_true",
                        help="the prepared GPU check (correctness, the whole path, memory modes, speed; a table last, "
                             "under 8 minutes on an H100/H200); with --device cpu a smoke run of tiny models")
    parser.add_argument("--json", help="with --quick: also write the table as JSON to this file")
    parser.add_argument("--student", metavar="FOLDER", default=str(STUDENT),
                        help="the student row's few-step model (train.py --mode distill); none there: the row is skipped")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one endless run in this process
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.rows = args.rows.split(",") if args.rows else list(GPU_ROWS if cuda else CPU_ROWS)
    unknown = set(args.rows) - set(CPU_ROWS) - set(GPU_ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {sorted(set(CPU_ROWS + GPU_ROWS))}")
    if args.json and not args.quick:
        raise ValueError("--json is written by --quick only: give --quick, or leave --json out")
    if args.json:  # written at the end of a run of minutes: never over what the check reads or runs, and writable
        check_not_an_input("--json", args.json, [("SDXL's configs", SDXL), ("the script", Path(__file__)),
                                                  *(("the script it runs", REPOSITORY / name) for name in SCRIPTS)])
        check_writable("--json", args.json)
    args.dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    args.repeats = (3 if cuda else 5) if args.repeats is None else args.repeats
    args.chunk_steps = (25 if cuda else 2) if args.chunk_steps is None else args.chunk_steps
    args.endless_steps = (2 if cuda else 25) if args.endless_steps is None else args.endless_steps
    check_numbers(args)
    return args


MOST_RUNS = 1000  # --repeats, --warmup, --chunk-steps, --endless-steps
MOST_CHUNKS = 10_000  # each of --endless-chunks
MOST_TFLOPS = 100_000  # --peak-tflops: 100 PFLOP/s, past any one accelerator's dense peak


def check_numbers(args: argparse.Namespace) -> None:
    """ValueError naming the option, before any work, for a device or a number the runs cannot use:
    no timed run, a negative count, a peak that would make every MFU 0, infinite or NaN."""
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", args.device):
        raise ValueError(f"--device {args.device!r}: give cpu, cuda or cuda:N")
    counts = {"--repeats": (args.repeats, 1, MOST_RUNS), "--warmup": (args.warmup, 0, MOST_RUNS),
              "--chunk-steps": (args.chunk_steps, 1, MOST_RUNS), "--endless-steps": (args.endless_steps, 1, MOST_RUNS),
              "--threads": (args.threads, 1, os.cpu_count()), "--child": (args.child, 1, MOST_CHUNKS)}
    for option, (value, low, high) in counts.items():
        if value is not None and not low <= value <= high:
            raise ValueError(f"{option} must be an integer in {low} .. {high}, got {value}")
    if not (math.isfinite(args.peak_tflops) and 0 < args.peak_tflops <= MOST_TFLOPS):
        raise ValueError(f"--peak-tflops must be a finite number in (0, {MOST_TFLOPS}], got {args.peak_tflops:g}")
    text = args.endless_chunks
    shown = repr(text if len(text) <= 40 else text[:37] + "...")
    digits = [part.strip().lstrip("0") for part in text.split(",")]  # no int() of thousands of digits
    if not all(d.isascii() and d.isdigit() and int(d[:6]) <= MOST_CHUNKS and len(d) <= 6 for d in digits):
        raise ValueError(f"--endless-chunks {shown}: give chunk counts from 1 to {MOST_CHUNKS:,}, separated by commas")
    if max(int(d) for d in digits) < 2:
        raise ValueError(f"--endless-chunks {shown}: the largest count makes the endless row and must be at least 2 "
                         "(its first chunk warms up)")


# Models ----------------------------------------------------------------------------------------


def bench_unet_config(**overrides) -> UNetConfig:
    """SDXL's UNet at a fifth of its widths: the same levels, depths (0, 2, 10), 64-channel heads,
    two temporal blocks per slot and a conditioner twice as wide as the widest level. At 48x48
    latents its levels hold the same token-to-width balance as SDXL's at 768x768 (96x96)."""
    settings = dict(block_out_channels=(64, 128, 256), cross_attention_dim=384, pooled_text_dim=256,
                    addition_time_embed_dim=64, conditioner_dim=512, sample_size=48)
    return UNetConfig(**{**settings, **overrides})


def bench_vae_config() -> VAEConfig:
    """SDXL's VAE at a quarter of its widths (GroupNorm needs multiples of 32)."""
    return VAEConfig(block_out_channels=(32, 64, 128, 128))


def tokenizers(folder: Path) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's pair of CLIP tokenizers (77 tokens; the second pads with "!") of the world's words."""
    return clip_tokenizers(world.write_tokenizer_files(folder), 77)


def text_encoder(widths: tuple[int, int], layers: tuple[int, int], projection: int, folder: Path) -> TextEncoder:
    """Two random CLIP text encoders (77 tokens, 64-channel heads) and a tokenizer of the world's words."""
    tokenizer, tokenizer_2 = tokenizers(folder)
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    encoders = [
        model_class(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                                   num_attention_heads=width // 64, projection_dim=projection, **common))
        for model_class, width, depth in zip((CLIPTextModel, CLIPTextModelWithProjection), widths, layers)
    ]
    return TextEncoder(tokenizer, tokenizer_2, *encoders)


def sdxl_text_encoder(folder: Path) -> TextEncoder:
    """SDXL's two text encoders from configs/sdxl-base-1.0 with random weights (our tokenizer)."""
    tokenizer, tokenizer_2 = tokenizers(folder)
    configs = [CLIPTextConfig.from_pretrained(SDXL / name) for name in ("text_encoder", "text_encoder_2")]
    return TextEncoder(tokenizer, tokenizer_2, CLIPTextModel(configs[0]), CLIPTextModelWithProjection(configs[1]))


def build_pipeline(args, folder: Path, scale: str) -> StableDiffusionXLVideoPipeline:
    """"sdxl" (full size, GPU), "bench" (a fifth of SDXL's widths) or "baby" (the first baby's
    architecture: 32x32 frames, a VAE downsampling by 4, as BENCHMARKS.md's rows were measured),
    random weights, built on the device."""
    torch.manual_seed(0)
    with torch.device(args.device):
        if scale == "sdxl":
            unet_config, vae_config = UNetConfig.sdxl(), VAEConfig.sdxl()
            encoder = sdxl_text_encoder(folder)
        elif scale == "bench":
            unet_config, vae_config = bench_unet_config(), bench_vae_config()
            encoder = text_encoder((128, 256), (12, 32), 256, folder)
        else:
            unet_config, vae_config = baby_configs(32, vae_downsampling=4)
            encoder = baby_text_encoder(folder, seed=0)
        unet, vae = randomise_temporal(UNet(unet_config)), AutoencoderKL(vae_config)
    pipeline = StableDiffusionXLVideoPipeline(unet.eval(), vae.eval(), encoder, SchedulerConfig.video_model())
    return pipeline.to(args.device, args.dtype)


@torch.no_grad()
def randomise_temporal(unet: UNet) -> UNet:
    """Non-zero temporal output projections, so the temporal modules change what they return."""
    for name, parameter in unet.named_parameters():
        if ".temp_" in name and "proj_out" in name:
            parameter.normal_(0.0, 0.02)
    return unet


def as_images(inputs: dict) -> tuple:
    """The same call for diffusers: frames folded into the batch, text and conditions per frame."""
    sample = inputs["sample"]
    frames = sample.shape[2]
    images = sample.transpose(1, 2).flatten(0, 1)  # (b*f, c, h, w)
    per_frame = lambda t: t.repeat_interleave(frames, dim=0)
    added = dict(text_embeds=per_frame(inputs["text_embeds"]), time_ids=per_frame(inputs["time_ids"]))
    return images, inputs["timestep"], per_frame(inputs["encoder_hidden_states"]), added


# Measuring -------------------------------------------------------------------------------------


def synchronize(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(functions: dict, warmup: int, repeats: int, device, clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each of `functions` on `clock` (wall time by default), called in turn, `repeats`
    times after `warmup` rounds."""
    times = {name: [] for name in functions}
    for round_ in range(warmup + repeats):
        for name, function in functions.items():
            synchronize(device)
            start = clock()
            function()
            synchronize(device)
            if round_ >= warmup:
                times[name].append(clock() - start)
    return times


def timed(function, device):
    """function() and the seconds it took."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def rounded(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]


def count_flops(function) -> int:
    """Model FLOPs of one call (matmuls, convolutions, attention), with torch.utils.flop_counter."""
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def meta_decode_flops(config: VAEConfig, frames: int, height: int, width: int) -> int:
    """FLOPs of decoding `frames` latents of height x width, counted on the meta device."""
    with torch.device("meta"):
        vae = AutoencoderKL(config)
        latents = torch.randn(1, config.latent_channels, frames, height, width)
    with torch.no_grad():
        return count_flops(lambda: vae.decode_video(latents))


def in_the_loop(unet, inputs: dict):
    """A call as at every step of a chunk: with the chunk's cache, made once by `prepare_chunk`."""
    cache = prepared_chunk(unet, inputs)
    return lambda: unet(**inputs, cache=cache)


def prepared_chunk(unet, inputs: dict):
    """`unet.prepare_chunk` for the text, pooled text, time ids and context of a UNet call's inputs."""
    sample = inputs["sample"]
    return unet.prepare_chunk(inputs["encoder_hidden_states"], inputs["text_embeds"], inputs["time_ids"],
                              inputs["previous_latents"], *sample.shape[-2:], sample.dtype)


def meta_flops(config: UNetConfig, batch: int, frames: int, height: int, width: int, context_frames: int,
               cached: bool = False, text_tokens: int = TEXT_TOKENS) -> int:
    """FLOPs of one forward (`cached`: of a step after the first of a chunk), counted on the meta
    device: free, whatever the size."""
    with torch.device("meta"):
        unet = UNet(config)
    inputs = unet_inputs(config, batch, frames, height, width, context_frames, "meta", torch.float32, text_tokens)
    with torch.no_grad():
        return count_flops(in_the_loop(unet, inputs) if cached else lambda: unet(**inputs))


def with_channels_last(unet: UNet, function):
    """function() with the UNet's spatial activations forced into channels-last memory."""
    setting, unet.channels_last = unet.channels_last, True
    try:
        return function()
    finally:
        unet.channels_last = setting


def maybe_compile(module, args):
    return torch.compile(module) if args.compile else module


def peak_memory(device) -> int:
    """Peak bytes so far: max_memory_allocated on a GPU, the process's peak RSS on a CPU.

    The RSS peak is VmHWM from /proc (Linux): unlike getrusage's ru_maxrss it is not inherited
    across fork and exec from the parent that started this process.
    """
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def current_rss() -> int:
    """Resident bytes now (Linux), 0 where /proc is missing."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def describe_device(args) -> dict:
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return {"device": args.device, "device_name": name, "threads": torch.get_num_threads(),
            "dtype": str(args.dtype).removeprefix("torch."), "torch": torch.__version__}


# Rows ------------------------------------------------------------------------------------------


def full_size_flops(args=None) -> dict:
    """docs/SEED_FORMAT.md's figures: 4.21 B parameters against 2.57 B; per frame at 768x768 (8 frames,
    4 context frames), 3.64 TFLOP for SDXL, 4.51 without a context, 7.35 with one.

    Those count the architecture as written, every frame computing the keys and values of its own
    copy of the text (as diffusers and the original code do). Our forward shares them among the
    frames of a video, and in the denoising loop it also reuses what depends only on the text and
    the context; both are counted too ("executed", "in_the_loop")."""
    batch, frames, height, width, context_frames = 1, 8, 96, 96, 4
    image, video = UNetConfig.sdxl(temporal_layers=0), UNetConfig.sdxl()
    with torch.device("meta"):
        parameters = {"sdxl": sum(p.numel() for p in UNet(image).parameters()),
                      "video": sum(p.numel() for p in UNet(video).parameters())}
    sizes = (batch, frames, height, width)
    executed = {"sdxl": meta_flops(image, *sizes, 0), "video_without_context": meta_flops(video, *sizes, 0),
                "video_with_context": meta_flops(video, *sizes, context_frames)}
    in_the_loop = {"sdxl": meta_flops(image, *sizes, 0, cached=True),
                   "video_with_context": meta_flops(video, *sizes, context_frames, cached=True)}
    frame_by_frame = meta_flops(image, batch * frames, 1, height, width, 0)  # every frame an image with its text
    as_written = {name: flops + frame_by_frame - executed["sdxl"] for name, flops in executed.items()}
    per_frame = lambda counts: {name: round(flops / batch / frames / 1e12, 3) for name, flops in counts.items()}
    row = {
        "name": "full_size_flops", "config": "UNetConfig.sdxl(): SDXL + two temporal blocks per slot, conditioner 2560",
        "shapes": {"batch": batch, "frames": frames, "latent": [height, width], "context_frames": context_frames},
        "device": "meta", "parameters_billion": {name: round(count / 1e9, 2) for name, count in parameters.items()},
        "parameters": parameters,
        "tflop_per_frame": per_frame(as_written),
        "ratio_with_context": round(as_written["video_with_context"] / as_written["sdxl"], 3),
        "tflop_per_frame_executed": per_frame(executed),
        "tflop_per_frame_in_the_loop": per_frame(in_the_loop),
        "ratio_in_the_loop": round(in_the_loop["video_with_context"] / in_the_loop["sdxl"], 3),
    }
    if UNet2DConditionModel is not None:  # the reference's own count of SDXL
        with torch.device("meta"):
            reference = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL / "unet"))
        images = as_images(unet_inputs(image, batch, frames, height, width, 0, "meta", torch.float32))
        with torch.no_grad():
            flops = count_flops(lambda: reference(*images[:3], added_cond_kwargs=images[3]))
        row["tflop_per_frame"]["sdxl_diffusers"] = round(flops / batch / frames / 1e12, 3)
    return row


@torch.no_grad()
def unet_vs_diffusers(args) -> dict:
    if UNet2DConditionModel is None:
        return {"name": "unet_vs_diffusers", "skipped": "diffusers is not installed"}
    cuda = args.device.startswith("cuda")
    config = UNetConfig.sdxl(temporal_layers=0) if cuda else bench_unet_config(temporal_layers=0)
    sizes = [(2, 8, 96, 96), (2, 8, 72, 128)] if cuda else [(1, 4, 48, 48)]
    torch.manual_seed(0)
    with torch.device(args.device):
        reference = diffusers_unet(config) if not cuda else UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(SDXL / "unet"))
    reference = (reference if args.dtype == torch.float32 else reference.to(dtype=args.dtype)).eval()
    with torch.device(args.device):
        ours = UNet(config)
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours = ours.to(dtype=args.dtype).eval()
    run_ours, run_reference = maybe_compile(ours, args), maybe_compile(reference, args)
    rows = []
    for batch, frames, height, width in sizes:
        inputs = unet_inputs(config, batch, frames, height, width, 0, args.device, args.dtype)
        images = as_images(inputs)
        functions = {"ours": lambda: run_ours(**inputs),
                     "diffusers": lambda: run_reference(*images[:3], added_cond_kwargs=images[3]),
                     "ours_in_the_loop": in_the_loop(run_ours, inputs)}
        if cuda:  # channels-last is on by default only on CPUs, where it was measured
            functions["ours_channels_last"] = lambda: with_channels_last(ours, lambda: run_ours(**inputs))
        times = interleaved(functions, args.warmup, args.repeats, args.device)
        expected = reference(*images[:3], added_cond_kwargs=images[3]).sample  # (b*f, c, h, w)
        difference = (ours(**inputs).transpose(1, 2).flatten(0, 1) - expected).abs().max()
        ours_s, reference_s = median(times["ours"]), median(times["diffusers"])
        row = {
            "name": "unet_vs_diffusers", "ratio": round(ours_s / reference_s, 3),
            "ratio_in_the_loop": round(median(times["ours_in_the_loop"]) / reference_s, 3),
            "config": "sdxl" if cuda else "bench (SDXL / 5)", "unet": config.to_dict(),
            "shapes": {"batch": batch, "frames": frames, "latent": [height, width], "text_tokens": 77},
            **describe_device(args), "compile": args.compile,
            "seconds_per_frame": {name: round(median(values) / batch / frames, 4) for name, values in times.items()},
            "times": {name: rounded(values) for name, values in times.items()},
            "max_abs_difference": float(difference),
        }
        if cuda:  # MFU: the FLOPs each call executes (counted on meta) / seconds / the card's peak
            with torch.device("meta"):
                meta_reference = UNet2DConditionModel.from_config(reference.config)
            meta_images = as_images(unet_inputs(config, batch, frames, height, width, 0, "meta", torch.float32))
            flops = {"ours": meta_flops(config, batch, frames, height, width, 0),
                     "diffusers": count_flops(lambda: meta_reference(*meta_images[:3], added_cond_kwargs=meta_images[3]))}
            row["tflop_per_forward"] = {name: round(value / 1e12, 2) for name, value in flops.items()}
            row["mfu"] = {name: round(flops[name] / median(times[name]) / 1e12 / args.peak_tflops, 3) for name in flops}
            row["peak_tflops"] = args.peak_tflops
        rows.append(row)
    return rows


def bench_video_unet(args):
    """The video UNet of the temporal rows, with random temporal weights: its config, the shapes
    (batch, frames, height, width, context_frames) and the model. SDXL at 2 x 8 frames of 96x96
    latents on CUDA, SDXL at a fifth of its widths at 1 x 4 frames of 48x48 on CPU."""
    cuda = args.device.startswith("cuda")
    config = UNetConfig.sdxl() if cuda else bench_unet_config()
    torch.manual_seed(0)
    with torch.device(args.device):
        unet = randomise_temporal(UNet(config))
    return config, (2, 8, 96, 96, 4) if cuda else (1, 4, 48, 48, 4), unet


@torch.no_grad()
def temporal_overhead(args) -> dict:
    cuda = args.device.startswith("cuda")
    config, (batch, frames, height, width, context_frames), video = bench_video_unet(args)
    with torch.device(args.device):
        image = UNet(replace(config, temporal_layers=0))
    image.load_state_dict({k: v for k, v in video.state_dict().items() if ".temp_" not in k}, strict=True)
    video, image = video.to(dtype=args.dtype).eval(), image.to(dtype=args.dtype).eval()
    inputs = unet_inputs(config, batch, frames, height, width, context_frames, args.device, args.dtype)
    run_video, run_image = maybe_compile(video, args), maybe_compile(image, args)
    times = interleaved({"with": in_the_loop(run_video, inputs), "without": in_the_loop(run_image, inputs)},
                        args.warmup, args.repeats, args.device)
    sizes = (batch, frames, height, width, context_frames)
    flops = {"with": meta_flops(config, *sizes, cached=True),
             "without": meta_flops(replace(config, temporal_layers=0), *sizes, cached=True)}
    first_step = {"with": meta_flops(config, *sizes), "without": meta_flops(replace(config, temporal_layers=0), *sizes)}
    ratio = median(times["with"]) / median(times["without"])
    flop_ratio = flops["with"] / flops["without"]
    return {
        "name": "temporal_overhead", "ratio": round(ratio, 3), "flop_ratio": round(flop_ratio, 3),
        "ratio_over_flop_ratio": round(ratio / flop_ratio, 3),
        "config": "sdxl" if cuda else "bench (SDXL / 5)", "unet": config.to_dict(),
        "shapes": {"batch": batch, "frames": frames, "latent": [height, width], "context_frames": context_frames},
        **describe_device(args), "compile": args.compile,
        "seconds_per_frame": {name: round(median(values) / batch / frames, 4) for name, values in times.items()},
        "gflop_per_frame": {name: round(value / batch / frames / 1e9, 2) for name, value in flops.items()},
        "gflop_per_frame_first_step": {name: round(value / batch / frames / 1e9, 2) for name, value in first_step.items()},
        "times": {name: rounded(values) for name, values in times.items()},
        "note": "times and FLOPs of a step after the first of a chunk (text and context work cached)",
    }


@torch.no_grad()
def sdpa_backends(args) -> dict:
    """A step of the video UNet (in the loop, with a context) under each attention backend that
    the device has; "default" is PyTorch's own choice, which the model uses."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = args.device.startswith("cuda")
    config, (batch, frames, height, width, context_frames), unet = bench_video_unet(args)
    unet = maybe_compile(unet.to(dtype=args.dtype).eval(), args)
    step = in_the_loop(unet, unet_inputs(config, batch, frames, height, width, context_frames, args.device, args.dtype))
    names = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"] if cuda else ["FLASH_ATTENTION", "MATH"]
    functions, unavailable = {"default": step}, {}
    for name in names:
        def run(backend=getattr(SDPBackend, name)):
            with sdpa_kernel(backend):
                return step()
        try:
            run()
            functions[name.lower()] = run
        except RuntimeError as error:  # a backend that cannot take these shapes or this dtype
            unavailable[name.lower()] = str(error).splitlines()[0][:200]
    times = interleaved(functions, args.warmup, args.repeats, args.device)
    return {
        "name": "sdpa_backends", "config": "sdxl" if cuda else "bench (SDXL / 5)",
        "shapes": {"batch": batch, "frames": frames, "latent": [height, width], "context_frames": context_frames},
        **describe_device(args), "compile": args.compile,
        "seconds": {name: round(median(values), 4) for name, values in times.items()},
        "fastest": min(times, key=lambda name: median(times[name])), "unavailable": unavailable,
        "times": {name: rounded(values) for name, values in times.items()},
    }


@torch.no_grad()
def chunk(args) -> list[dict]:
    """A whole chunk in the middle of a video: prompt, denoising with guidance and a context, decode."""
    cuda = args.device.startswith("cuda")
    settings = [(768, 768, 8), (768, 768, 16), (576, 1024, 8), (576, 1024, 16)] if cuda else [(384, 384, 4)]
    with tempfile.TemporaryDirectory() as folder:
        pipeline = build_pipeline(args, Path(folder), "sdxl" if cuda else "bench")
    pipeline.unet = maybe_compile(pipeline.unet, args)
    config = pipeline.unet.config
    rows = []
    for height, width, frames in settings:
        context = torch.randn(1, 4, 4, height // 8, width // 8).to(args.device, args.dtype)
        parts = {"text": [], "denoise": [], "decode": []}
        for round_ in range(args.warmup + (args.repeats if cuda else 1)):  # a CPU chunk is long: one timed
            embeddings, text_s = timed(lambda: pipeline.encode_prompt(PROMPT, ""), args.device)
            latents, denoise_s = timed(lambda: pipeline(
                prompt_embeds=embeddings, height=height, width=width, num_frames=frames,
                num_inference_steps=args.chunk_steps, guidance_scale=9.0, generator=torch.Generator().manual_seed(0),
                previous_latents=context, output_type="latent"), args.device)
            _, decode_s = timed(lambda: pipeline.vae.decode_video(latents), args.device)
            if round_ >= args.warmup:
                for part, seconds in zip(parts, (text_s, denoise_s, decode_s)):
                    parts[part].append(seconds)
        seconds = {part: median(values) for part, values in parts.items()}
        total = sum(seconds.values())
        row = {
            "name": "chunk", "seconds_per_frame": round(total / frames, 4),
            "config": "sdxl" if cuda else "bench (SDXL / 5, VAE / 4)", "unet": config.to_dict(),
            "shapes": {"height": height, "width": width, "frames": frames, "context_frames": 4,
                       "steps": args.chunk_steps, "guidance": 9.0},
            **describe_device(args), "compile": args.compile,
            "seconds": {part: round(value, 4) for part, value in seconds.items()},
            "seconds_per_step": round(seconds["denoise"] / args.chunk_steps, 4),
            "seconds_per_frame_at_25_steps": round((total + (25 - args.chunk_steps) * seconds["denoise"] / args.chunk_steps) / frames, 3),
            "times": {part: rounded(values) for part, values in parts.items()},
        }
        # FLOPs on meta: the first step, the later (cached) ones (guidance doubles the batch), the decode
        sizes = (2, frames, height // 8, width // 8, 4)
        first, later = meta_flops(config, *sizes), meta_flops(config, *sizes, cached=True)
        denoise = first + (args.chunk_steps - 1) * later
        decode = meta_decode_flops(pipeline.vae.config, frames, height // 8, width // 8)
        row["tflop"] = {"unet_first_step": round(first / 1e12, 2), "unet_later_steps": round(later / 1e12, 2),
                        "denoise": round(denoise / 1e12, 2), "decode": round(decode / 1e12, 2)}
        if cuda:  # model FLOPs counted above (text encoders not counted) / seconds / the card's peak
            row["mfu"] = {"denoise": round(denoise / seconds["denoise"] / 1e12 / args.peak_tflops, 3),
                          "decode": round(decode / seconds["decode"] / 1e12 / args.peak_tflops, 3),
                          "chunk": round((denoise + decode) / total / 1e12 / args.peak_tflops, 3)}
            row["peak_tflops"] = args.peak_tflops
        rows.append(row)
    return rows


@torch.no_grad()
def vae_decode(args) -> dict:
    """Decoding in bfloat16 against float32: time, and the difference in 8-bit levels."""
    torch.manual_seed(0)
    vae = AutoencoderKL(bench_vae_config()).eval()
    latents = torch.randn(1, 4, 2, 48, 48)
    vae_bf16 = AutoencoderKL(bench_vae_config()).eval()
    vae_bf16.load_state_dict(vae.state_dict())
    vae_bf16.to(torch.bfloat16)
    times = interleaved({"fp32": lambda: vae.decode_video(latents), "bf16": lambda: vae_bf16.decode_video(latents)},
                        args.warmup, args.repeats, args.device)
    to_levels = lambda video: ((video.float() / 2 + 0.5).clamp(0, 1) * 255).round()
    difference = (to_levels(vae.decode_video(latents)) - to_levels(vae_bf16.decode_video(latents))).abs()
    return {
        "name": "vae_decode", "ratio": round(median(times["bf16"]) / median(times["fp32"]), 3),
        "config": "bench VAE (SDXL / 4), random weights", "shapes": {"frames": 2, "latent": [48, 48]},
        **describe_device(args),
        "seconds_per_frame": {name: round(median(values) / 2, 4) for name, values in times.items()},
        "bf16_minus_fp32_levels": {"max": float(difference.max()), "mean": round(float(difference.mean()), 4)},
        "times": {name: rounded(values) for name, values in times.items()},
    }


def model_code_at(revision: str, folder: Path):
    """model.py as it was at `revision` of this repository (with that revision's layers.py and
    temporal.py), imported from `folder` beside this checkout's modules; None where git or the
    revision is missing. The import swaps the modules' names in `sys.modules` for its duration only."""
    for name in MODEL_FILES:
        try:
            shown = subprocess.run(["git", "show", f"{revision}:{name}"], cwd=REPOSITORY, capture_output=True)
        except OSError:  # no git
            return None
        if shown.returncode:
            return None
        (folder / name).write_bytes(shown.stdout)
    names = [Path(name).stem for name in MODEL_FILES]
    current = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module("model")
    finally:
        sys.path.remove(str(folder))
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(current)


@torch.no_grad()
def baby(args) -> dict:
    """The shipped baby as the quick start runs it (its sample_defaults: guidance 3, so a UNet batch
    of 2, 4 frames of 8x8 latents, 2 context frames, 25 steps), with this checkout's model code
    ("after") and BASELINE_REVISION's ("before"), the same weights: a UNet pass of a step after the
    first (text and context cached, as in the loop) and a whole chunk's denoising (`pipeline(...)`,
    latents out, no decode), interleaved. On one CPU thread the clock is the process's CPU time,
    which the other processes of a shared machine do not stretch; wall time otherwise."""
    config = json.loads((BABY / "config.json").read_text())
    defaults = config["sample_defaults"]
    with tempfile.TemporaryDirectory() as folder:
        before_code = model_code_at(BASELINE_REVISION, Path(folder))
    if before_code is None:
        return {"name": "baby", "skipped": f"git cannot show {BASELINE_REVISION}:{{{','.join(MODEL_FILES)}}} here"}
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(BABY, args.device, args.dtype)
    before = before_code.UNet(before_code.UNetConfig(**config["unet"]))
    before.load_state_dict(pipeline.unet.state_dict(), strict=True)
    unets = {"before": maybe_compile(before.to(args.device, args.dtype).eval(), args),
             "after": maybe_compile(pipeline.unet, args)}
    embeddings = pipeline.encode_prompt(PROMPT, "", True)
    _, text, pooled = pipeline.guidance_batch(None, None, embeddings, True)
    batch, frames, context_frames = text.shape[0], defaults["frames"], defaults["context_frames"]
    latent = (defaults["height"] // pipeline.vae_scale_factor, defaults["width"] // pipeline.vae_scale_factor)
    generator = torch.Generator().manual_seed(0)
    draw = lambda *shape: torch.randn(shape, generator=generator).to(args.device, args.dtype)
    channels = pipeline.unet.config.in_channels
    inputs = dict(sample=draw(batch, channels, frames, *latent), timestep=torch.tensor(500.0, device=args.device),
                  encoder_hidden_states=text, text_embeds=pooled,
                  time_ids=micro_conditioning(batch, defaults["height"], defaults["width"], dtype=args.dtype,
                                              device=args.device),
                  previous_latents=draw(1, channels, context_frames, *latent))
    passes = 10  # UNet passes per timed call: one pass is milliseconds
    steps = {name: in_the_loop(unet, inputs) for name, unet in unets.items()}
    context = inputs["previous_latents"]

    def chunk_with(unet):
        pipeline.unet = unet
        return pipeline(prompt_embeds=embeddings, height=defaults["height"], width=defaults["width"],
                        num_frames=frames, num_inference_steps=defaults["steps"], guidance_scale=defaults["guidance"],
                        generator=torch.Generator().manual_seed(0), previous_latents=context, output_type="latent")

    cpu_clock = not args.device.startswith("cuda") and torch.get_num_threads() == 1
    clock = time.process_time if cpu_clock else time.perf_counter
    functions = {**{f"pass_{name}": lambda step=step: [step() for _ in range(passes)] for name, step in steps.items()},
                 **{f"chunk_{name}": lambda unet=unet: chunk_with(unet) for name, unet in unets.items()}}
    times = interleaved(functions, args.warmup, args.repeats, args.device, clock)
    pass_seconds = {name: median(times[f"pass_{name}"]) / passes for name in unets}
    chunk_seconds = {name: median(times[f"chunk_{name}"]) for name in unets}
    flops = meta_flops(pipeline.unet.config, batch, frames, *latent, context_frames, cached=True,
                       text_tokens=text.shape[1])
    return {
        "name": "baby", "config": "models/baby (the shipped baby)",
        "before": f"{BASELINE_REVISION}'s {', '.join(MODEL_FILES)}", "after": "this checkout's",
        **describe_device(args), "compile": args.compile,
        "clock": "process CPU time" if cpu_clock else "wall time",
        "shapes": {"batch": batch, "frames": frames, "latent": list(latent), "context_frames": context_frames,
                   "text_tokens": text.shape[1], "steps": defaults["steps"], "guidance": defaults["guidance"]},
        "unet_pass_ms": {name: round(1e3 * seconds, 2) for name, seconds in pass_seconds.items()},
        "unet_pass_speedup": round(pass_seconds["before"] / pass_seconds["after"], 3),
        "gflop_per_pass": round(flops / 1e9, 3),
        "gflop_per_second": {name: round(flops / seconds / 1e9, 2) for name, seconds in pass_seconds.items()},
        "seconds_per_chunk": {name: round(seconds, 3) for name, seconds in chunk_seconds.items()},
        "chunk_speedup": round(chunk_seconds["before"] / chunk_seconds["after"], 3),
        "max_abs_difference": {
            "unet_pass": float((steps["after"]() - steps["before"]()).abs().max()),
            "chunk_latents": float((chunk_with(unets["after"]) - chunk_with(unets["before"])).abs().max())},
        "times": {name: rounded(values) for name, values in times.items()},
        "command": f"python tools/bench.py --rows baby --threads {torch.get_num_threads()}",
    }


def video_of(args, folder: Path):
    """The model in `folder` making a video as sample.py makes one with no options but a prompt: its
    sample_defaults over Settings' defaults, the prompt encoded once, a seeded generator, each chunk
    decoded. Returns the chunks' ChunkSpec, the name of their sampler and an endless iterator of
    decoded chunks (each a list of one video's frames, numpy uint8 (frames, H, W, 3))."""
    from endless import Prompts, VideoState, decoded_chunks
    from video_settings import Settings, check_settings

    config = json.loads((folder / "config.json").read_text())
    settings = Settings.from_options(timeline=[(0, PROMPT)], **{**config.get("sample_defaults", {}), "model": str(folder)})
    check_settings(settings, config)  # a None height and width become the model's
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(folder, args.device, args.dtype)
    pipeline.set_vae_dtype(None, {v: k for k, v in DTYPES.items()}[args.dtype])  # sample.py's VAE dtype for --dtype
    pipeline.unet = maybe_compile(pipeline.unet, args)
    chunk = settings.chunk
    embeddings = pipeline.encode_prompts([PROMPT], settings.negative_prompt, chunk.guidance > 1)[0]
    chunks = decoded_chunks(pipeline, chunk, settings.drift, Prompts([(0, embeddings)]), VideoState(),
                            torch.Generator().manual_seed(settings.seed), settings.decode_frames)
    return chunk, chunk.scheduler or pipeline.scheduler_config.algorithm_type, chunks


@torch.no_grad()
def student(args) -> dict:
    """Issue 28: the few-step student (`--student`, train.py's mode distill) against its teacher, the
    shipped baby, each making a video as sample.py does with its own sample_defaults: whole chunks,
    denoising and VAE decode, CHUNKS_PER_CALL per timed call, interleaved. Frames per second are
    frames per chunk over seconds per chunk; on one CPU thread the clock is the process's CPU time
    (as in the baby row), wall time otherwise. Skipped where the student's folder has no config.json."""
    folder = Path(args.student)
    if not (folder / "config.json").is_file():
        return {"name": "student", "skipped": f"--student {folder}: no model folder there (train.py --mode distill "
                                              f"writes one)"}
    videos = {"teacher": video_of(args, BABY), "student": video_of(args, folder)}
    cpu_clock = not args.device.startswith("cuda") and torch.get_num_threads() == 1
    functions = {name: lambda chunks=chunks: [next(chunks) for _ in range(CHUNKS_PER_CALL)]
                 for name, (_, _, chunks) in videos.items()}
    times = interleaved(functions, args.warmup, args.repeats, args.device,
                        time.process_time if cpu_clock else time.perf_counter)
    seconds = {name: median(times[name]) / CHUNKS_PER_CALL for name in videos}
    fps = {name: videos[name][0].frames / seconds[name] for name in videos}
    return {
        "name": "student", "teacher": str(BABY.relative_to(REPOSITORY)), "student": str(folder),
        **describe_device(args), "compile": args.compile, "clock": "process CPU time" if cpu_clock else "wall time",
        "chunks_per_call": CHUNKS_PER_CALL,
        "settings": {name: {"steps": chunk.steps, "guidance": chunk.guidance, "scheduler": sampler,
                            "frames": chunk.frames, "context_frames": chunk.context_frames,
                            "size": [chunk.height, chunk.width]} for name, (chunk, sampler, _) in videos.items()},
        "seconds_per_chunk": {name: round(value, 4) for name, value in seconds.items()},
        "frames_per_second": {name: round(value, 3) for name, value in fps.items()},
        "fps_ratio": round(fps["student"] / fps["teacher"], 3),
        "times": {name: rounded(values) for name, values in times.items()},
        "command": f"python tools/bench.py --rows student --student {folder} --threads {torch.get_num_threads()}",
    }


@torch.no_grad()
def endless_child(args) -> dict:
    """`args.child` chunks as sample.py makes them (prompt once, context between chunks, decode
    each chunk), in this fresh process; peak memory at the end."""
    from dataclasses import asdict

    from endless import Prompts, VideoState, decoded_chunks
    from video_settings import ChunkSpec, DriftControls

    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as folder:
        pipeline = build_pipeline(args, Path(folder), "sdxl" if cuda else "baby")
    size = (768, 768) if cuda else (32, 32)
    chunk = ChunkSpec(height=size[0], width=size[1], frames=8 if cuda else 4, context_frames=4 if cuda else 2,
                      steps=args.endless_steps, guidance=9.0)
    prompts = Prompts([(0, pipeline.encode_prompt(PROMPT, "", True))])
    generator = torch.Generator().manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = peak_memory(args.device)
    chunks = decoded_chunks(pipeline, chunk, DriftControls(), prompts, VideoState(), generator, decode_frames=2)
    seconds, resident = [], []
    for _ in range(args.child):
        synchronize(args.device)
        start = time.perf_counter()
        frames = next(chunks)[0]
        synchronize(args.device)
        seconds.append(time.perf_counter() - start)
        resident.append(current_rss())
    return {
        "chunks": args.child, "frames": args.child * chunk.frames, "seconds": rounded(seconds),
        "peak_bytes": peak_memory(args.device), "peak_bytes_before_loop": before, "rss_after_each_chunk": resident,
        "settings": {**asdict(chunk), "shape": list(frames.shape)},
    }


def endless(args) -> list[dict]:
    """Run each chunk count in a fresh process, so that each peak is its own."""
    runs = {}
    for count in (int(n) for n in args.endless_chunks.split(",")):
        command = [sys.executable, __file__, "--child", str(count), "--device", args.device,
                   "--threads", str(args.threads), "--dtype", {v: k for k, v in DTYPES.items()}[args.dtype],
                   "--endless-steps", str(args.endless_steps)] + (["--compile"] if args.compile else [])
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        runs[count] = json.loads(result.stdout.strip().splitlines()[-1])
    counts = sorted(runs)
    longest = runs[counts[-1]]
    per_chunk = longest["seconds"][1:]  # the first chunk also warms up
    baby = "baby (training.baby.baby_configs(32, vae_downsampling=4), random weights)"
    config = "sdxl" if args.device.startswith("cuda") else baby
    memory_unit = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    return [
        {
            "name": "endless", "config": config, "settings": longest["settings"], **describe_device(args),
            "chunks": longest["chunks"], "seconds_per_chunk": round(median(per_chunk), 4),
            "frames_per_second": round(longest["settings"]["frames"] / median(per_chunk), 3),
            "seconds_first_and_last_5": [rounded(longest["seconds"][1:6]), rounded(longest["seconds"][-5:])],
            "times": longest["seconds"],
        },
        {
            "name": "peak_memory", "measure": memory_unit, "config": config, "settings": longest["settings"],
            **describe_device(args),
            "peak_mib": {str(count): round(runs[count]["peak_bytes"] / 2**20, 1) for count in counts},
            "ratio": round(runs[counts[-1]]["peak_bytes"] / runs[counts[0]]["peak_bytes"], 4),
            "peak_mib_before_loop": {str(c): round(runs[c]["peak_bytes_before_loop"] / 2**20, 1) for c in counts},
            "loop_mib": {str(c): round((runs[c]["peak_bytes"] - runs[c]["peak_bytes_before_loop"]) / 2**20, 1)
                         for c in counts},
            "rss_mib_after_chunk": {str(c): [round(r / 2**20, 1) for r in runs[c]["rss_after_each_chunk"]][:: max(c // 10, 1)]
                                    for c in counts},
        },
    ]


# The prepared GPU check (--quick) ---------------------------------------------------------------
#
# One run on a GPU, sized to finish in under 8 minutes on an H100/H200 with random full-size SDXL
# weights (configs/sdxl-base-1.0), with time to run it again after a fix; every part in its own
# try block, so a failure is a row of the table and the other parts still run. With --device cpu
# the same code runs on tiny models in seconds (tests/test_bench.py).


def quick_shapes(cuda: bool) -> dict:
    """The check's chunk: 768x768, 8 frames, 4 context frames, 25 steps with guidance (tiny on a CPU)."""
    if cuda:
        return dict(height=768, width=768, frames=8, context_frames=4, steps=25, guidance=9.0)
    return dict(height=64, width=64, frames=2, context_frames=1, steps=2, guidance=9.0)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference||, in float32."""
    value, reference = value.float(), reference.float()
    return float((value - reference).norm() / reference.norm())


def free_accelerator() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if str(device).startswith("cuda") else None


def diffusers_sdxl_unet(args, config: UNetConfig):
    """diffusers' UNet: SDXL's from configs/ on a GPU, the tiny one of `config` on a CPU, random weights."""
    torch.manual_seed(0)
    with torch.device(args.device):
        if args.device.startswith("cuda"):
            return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL / "unet")).eval()
        return diffusers_unet(config).eval()


@torch.no_grad()
def quick_correctness(args) -> dict:
    """Our UNet and diffusers' on the same random weights at 768x768: fp32 against fp32, and each
    in bf16 against the fp32 reference; the video UNet with a context in bf16 against fp32."""
    cuda = args.device.startswith("cuda")
    shapes = quick_shapes(cuda)
    config = UNetConfig.sdxl(temporal_layers=0) if cuda else UNetConfig.tiny(temporal_layers=0)
    reference = diffusers_sdxl_unet(args, config)
    with torch.device(args.device):
        ours = UNet(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    latent = (shapes["height"] // 8, shapes["width"] // 8)
    inputs = unet_inputs(config, 2, 2, *latent, 0, args.device, torch.float32)
    images = as_images(inputs)
    expected = reference(*images[:3], added_cond_kwargs=images[3]).sample  # (b*f, c, h, w)
    as_frames = lambda video: video.transpose(1, 2).flatten(0, 1)  # (b, c, f, h, w) -> (b*f, c, h, w)
    row = {"shapes": {"batch": 2, "frames": 2, "latent": list(latent)},
           "ours_fp32_vs_diffusers_fp32": relative_error(as_frames(ours(**inputs)), expected)}
    half = {name: value.to(torch.bfloat16) if value is not None and value.is_floating_point() else value
            for name, value in inputs.items()}
    reference.to(torch.bfloat16)
    ours.to(torch.bfloat16)
    half_images = as_images(half)
    row["diffusers_bf16_vs_fp32"] = relative_error(reference(*half_images[:3], added_cond_kwargs=half_images[3]).sample, expected)
    row["ours_bf16_vs_fp32"] = relative_error(as_frames(ours(**half)), expected)
    del reference, ours, expected
    free_accelerator()
    video_config = UNetConfig.sdxl() if cuda else UNetConfig.tiny()
    torch.manual_seed(0)
    with torch.device(args.device):
        video = randomise_temporal(UNet(video_config)).eval()
    inputs = unet_inputs(video_config, 2, shapes["frames"], *latent, shapes["context_frames"], args.device, torch.float32)
    expected = video(**inputs)
    video.to(torch.bfloat16)
    half = {name: value.to(torch.bfloat16) if value is not None and value.is_floating_point() else value
            for name, value in inputs.items()}
    row["video_unet_with_context_bf16_vs_fp32"] = relative_error(video(**half), expected)
    row["video_shapes"] = {"batch": 2, "frames": shapes["frames"], "context_frames": shapes["context_frames"]}
    row["ok"] = (row["ours_fp32_vs_diffusers_fp32"] < 1e-4
                 and row["ours_bf16_vs_fp32"] <= 1.5 * row["diffusers_bf16_vs_fp32"] + 1e-3)
    return row


def random_diffusers_folder(args, folder: Path) -> Path:
    """A diffusers SDXL folder with random weights: SDXL's components from configs/ (fp16) on a
    GPU, tiny ones on a CPU; a tokenizer of the world's words (no download)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    cuda = args.device.startswith("cuda")
    encoder = sdxl_text_encoder(folder / "tokenizer-files") if cuda else baby_text_encoder(folder / "tokenizer-files", 0)
    unet_config = UNetConfig.tiny(cross_attention_dim=64, pooled_text_dim=32, temporal_layers=0)
    torch.manual_seed(0)
    with torch.device(args.device):
        unet = diffusers_sdxl_unet(args, unet_config)
        vae = (DiffusersAutoencoderKL.from_config(DiffusersAutoencoderKL.load_config(SDXL / "vae")) if cuda
               else diffusers_vae(VAEConfig.tiny()))
    scheduler = DPMSolverMultistepScheduler.from_config(DPMSolverMultistepScheduler.load_config(SDXL / "scheduler"))
    pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=encoder.text_encoder, text_encoder_2=encoder.text_encoder_2,
                                         tokenizer=encoder.tokenizer, tokenizer_2=encoder.tokenizer_2, unet=unet,
                                         scheduler=scheduler)
    if cuda:
        pipeline.to(torch.float16)
    pipeline.save_pretrained(folder / "sdxl-diffusers")
    return folder / "sdxl-diffusers"


def run_script(command: list[str], seconds: dict, name: str) -> None:
    """Run one of the repository's command lines; RuntimeError with the end of its output if it fails."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *command], cwd=REPOSITORY, capture_output=True, text=True)
    seconds[name] = round(time.perf_counter() - start, 1)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command[:1])} failed ({result.returncode}): {(result.stderr or result.stdout)[-600:]}")


def quick_whole_path(args, folder: Path) -> dict:
    """A random diffusers SDXL folder -> convert_weights.py -> sample.py, 2 chunks at 768x768 in bf16
    (tiny and fp32 on a CPU), written as an MP4 that PyAV decodes to every frame."""
    cuda = args.device.startswith("cuda")
    shapes, seconds = quick_shapes(cuda), {}
    start = time.perf_counter()
    source = random_diffusers_folder(args, folder)
    seconds["build_diffusers_folder"] = round(time.perf_counter() - start, 1)
    dtype = "bf16" if cuda else "fp32"
    checkpoint, video = folder / "checkpoint", folder / "video.mp4"
    run_script(["convert_weights.py", str(source), str(checkpoint), "--dtype", dtype], seconds, "convert_weights")
    shutil.rmtree(source)  # the disk holds one full-size copy at a time
    sample_options = ["--steps", "2", "--frames", "2", "--context-frames", "1"] if not cuda else []
    run_script(["sample.py", "--model", str(checkpoint), "--prompt", PROMPT, "--chunks", "2", "--height",
                str(shapes["height"]), "--width", str(shapes["width"]), "--dtype", dtype, "--device", args.device,
                "--threads", str(args.threads), "--out", str(video), *sample_options], seconds, "sample")
    import av  # test-only dependency: the check that the file plays

    with av.open(str(video)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    frames_per_chunk = json.loads((checkpoint / "config.json").read_text())["sample_defaults"].get("frames", 4)
    expected = 2 * (2 if not cuda else frames_per_chunk)
    return {"seconds": seconds, "frames_decoded": len(frames), "frames_expected": expected,
            "frame_shape": list(frames[0].shape) if frames else None, "video_bytes": video.stat().st_size,
            "ok": len(frames) == expected and frames[0].shape == (shapes["height"], shapes["width"], 3)}


@torch.no_grad()
def quick_memory_modes(args, checkpoint: Path) -> dict:
    """One chunk (2 steps) of the converted checkpoint with each offload mode: the decoded frames
    against no offload, peak memory against infra/memory.py's estimate; then tiled against untiled
    decoding of a frame twice the chunk's side."""
    from infra import memory

    cuda = args.device.startswith("cuda")
    shapes = quick_shapes(cuda)
    dtype = "bf16" if cuda else "fp32"
    config = json.loads((checkpoint / "config.json").read_text())
    row, reference = {}, None
    for mode in ("none", "model", "sequential"):
        free_accelerator()
        pipeline = StableDiffusionXLVideoPipeline.from_pretrained(checkpoint, "cpu", DTYPES[dtype])
        if mode == "none":
            pipeline.to(args.device)
        else:
            pipeline.enable_offload(mode, args.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        embeddings = pipeline.encode_prompts([PROMPT], "", True)[0]
        context = torch.randn(1, 4, shapes["context_frames"], shapes["height"] // 8, shapes["width"] // 8,
                              generator=torch.Generator().manual_seed(0)).to(args.device, DTYPES[dtype])
        latents = pipeline(prompt_embeds=embeddings, height=shapes["height"], width=shapes["width"],
                           num_frames=shapes["frames"], num_inference_steps=2, guidance_scale=shapes["guidance"],
                           generator=torch.Generator().manual_seed(0), previous_latents=context, output_type="latent")
        decoded = pipeline.decode_video(latents, frames_per_batch=2).float().cpu()
        synchronize(args.device)
        estimate = memory.estimate(config, checkpoint, shapes["height"], shapes["width"], shapes["frames"],
                                   shapes["context_frames"], shapes["guidance"], 2, dtype, dtype, mode)
        reference = decoded if reference is None else reference
        row[mode] = {"seconds": round(time.perf_counter() - start, 2), "peak_gib": peak_gib(args.device),
                     "estimate_gib": round(estimate.peak() / 2**30, 2),
                     "max_abs_difference_to_none": float((decoded - reference).abs().max())}
        if cuda:
            row[mode]["measured_over_estimate"] = round(torch.cuda.max_memory_allocated() / estimate.peak(), 3)
        del pipeline
    vae = StableDiffusionXLVideoPipeline.from_pretrained(checkpoint, args.device, DTYPES[dtype]).vae
    side, tile, overlap = (2 * shapes["height"] // 8, TILE, TILE_OVERLAP) if cuda else (16, 8, 2)
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1)).to(args.device, DTYPES[dtype])
    decoded = {}
    for tiles in (False, True):
        free_accelerator()
        counted = memory.LiveBytes()
        with counted:
            decoded[tiles] = (vae.decode_tiled(latents, tile, overlap) if tiles else vae.decode(latents)).float()
        row[f"decode_{'tiled' if tiles else 'untiled'}"] = {"counted_gib": round(counted.peak / 2**30, 3),
                                                            "peak_gib": peak_gib(args.device)}
    difference = (decoded[True] - decoded[False]).abs()
    row["tiled_vs_untiled"] = {"pixels": [8 * side, 8 * side], "tile": tile, "overlap": overlap,
                               "max_abs_difference": float(difference.max()),
                               "mean_abs_difference": float(difference.mean()), "range": "[-1, 1]"}
    row["ok"] = all(row[mode]["max_abs_difference_to_none"] == 0 for mode in ("model", "sequential"))
    return row


@torch.no_grad()
def quick_speed(args) -> dict:
    """The denoising loop of a chunk (25 steps, guidance, 8 frames, 4 context frames, 768x768, bf16):
    seconds per frame and MFU of our video UNet, and of our spatial UNet and diffusers' on the
    same work (the 25 guidance-doubled UNet calls on the chunk's frames); peak memory."""
    cuda = args.device.startswith("cuda")
    shapes = quick_shapes(cuda)
    dtype = DTYPES["bf16"] if cuda else torch.float32
    steps, frames, context_frames = shapes["steps"], shapes["frames"], shapes["context_frames"]
    with tempfile.TemporaryDirectory() as folder:
        pipeline = build_pipeline(argparse.Namespace(device=args.device, dtype=dtype), Path(folder),
                                  "sdxl" if cuda else "baby")
    latent = (shapes["height"] // pipeline.vae_scale_factor, shapes["width"] // pipeline.vae_scale_factor)
    embeddings = pipeline.encode_prompt(PROMPT, "")
    context = torch.randn(1, 4, context_frames, *latent).to(args.device, dtype)
    run = lambda count: pipeline(prompt_embeds=embeddings, height=shapes["height"], width=shapes["width"],
                                 num_frames=frames, num_inference_steps=count, guidance_scale=shapes["guidance"],
                                 generator=torch.Generator().manual_seed(0), previous_latents=context, output_type="latent")
    run(2)  # warm-up
    free_accelerator()
    _, seconds = timed(lambda: run(steps), args.device)
    row = {"shapes": shapes, "video_seconds_per_frame": round(seconds / frames, 4), "video_peak_gib": peak_gib(args.device)}
    config = pipeline.unet.config
    sizes = (2, frames, *latent, context_frames)
    flops = meta_flops(config, *sizes) + (steps - 1) * meta_flops(config, *sizes, cached=True)
    row["video_tflop"] = round(flops / 1e12, 1)
    del pipeline
    free_accelerator()
    spatial = replace(config, temporal_layers=0) if not cuda else UNetConfig.sdxl(temporal_layers=0)
    reference = diffusers_sdxl_unet(args, spatial).to(dtype)
    with torch.device(args.device):
        ours = UNet(spatial).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.to(dtype)
    inputs = unet_inputs(spatial, 2, frames, *latent, 0, args.device, dtype)
    images = as_images(inputs)
    loop = in_the_loop(ours, inputs)
    functions = {"ours": lambda: [loop() for _ in range(steps)],
                 "diffusers": lambda: [reference(*images[:3], added_cond_kwargs=images[3]) for _ in range(steps)]}
    times = interleaved(functions, 1, 1, args.device)
    spatial_flops = {"ours": steps * meta_flops(spatial, 2, frames, *latent, 0, cached=True)}
    with torch.device("meta"):
        meta_reference = UNet2DConditionModel.from_config(reference.config)
    meta_images = as_images(unet_inputs(spatial, 2, frames, *latent, 0, "meta", torch.float32))
    spatial_flops["diffusers"] = steps * count_flops(lambda: meta_reference(*meta_images[:3], added_cond_kwargs=meta_images[3]))
    for name in functions:
        row[f"{name}_spatial_seconds_per_frame"] = round(median(times[name]) / frames, 4)
    if cuda:
        row["video_mfu"] = round(flops / seconds / 1e12 / args.peak_tflops, 3)
        for name in functions:
            row[f"{name}_spatial_mfu"] = round(spatial_flops[name] / median(times[name]) / 1e12 / args.peak_tflops, 3)
        row["peak_tflops"] = args.peak_tflops
    row["spatial_peak_gib"] = peak_gib(args.device)
    return row


def quick(args) -> None:
    """Run every part of the check, each on its own (an error becomes its row), and print the table
    last; `args.json`: the table as JSON too."""
    table = {"device": describe_device(args), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "parts": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as folder:
        parts = {"correctness": lambda: quick_correctness(args),
                 "whole_path": lambda: quick_whole_path(args, Path(folder)),
                 "memory_modes": lambda: quick_memory_modes(args, Path(folder) / "checkpoint"),
                 "speed": lambda: quick_speed(args)}
        for name, part in parts.items():
            start = time.perf_counter()
            try:
                table["parts"][name] = part()
            except Exception as error:  # the table keeps the error and the other parts still run
                table["parts"][name] = {"ok": False, "error": f"{type(error).__name__}: {str(error)[-800:]}"}
            table["parts"][name]["bench_seconds"] = round(time.perf_counter() - start, 1)
            free_accelerator()
            print(json.dumps({"name": f"quick.{name}", **table["parts"][name]}), flush=True)
    table["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        with atomic_file(args.json) as file:  # whole or not at all; the table is printed below either way
            file.write((json.dumps(table, indent=2) + "\n").encode())
    print(format_table(table), flush=True)


def format_table(table: dict) -> str:
    """The check as lines of `part  metric  value`, the errors in full."""
    lines = [f"tools/bench.py --quick on {table['device']['device_name']} ({table['device']['device']}), "
             f"{table['date']}, {table['seconds']} s"]
    for part, values in table["parts"].items():
        for key, value in flatten(values):
            lines.append(f"{part:<14} {key:<44} {value}")
    return "\n".join(lines)


def flatten(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", round(value, 6) if isinstance(value, float) else value


ROWS = {"full_size_flops": full_size_flops, "unet_vs_diffusers": unet_vs_diffusers,
        "temporal_overhead": temporal_overhead, "sdpa_backends": sdpa_backends, "chunk": chunk,
        "vae_decode": vae_decode, "baby": baby, "student": student, "endless": endless}


def main(argv=None) -> None:
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"name": "skipped", "reason": f"--device {args.device}: no CUDA device here"}), flush=True)
        return
    if args.child:
        print(json.dumps(endless_child(args)), flush=True)
        return
    if args.quick:
        quick(args)
        return
    started = time.perf_counter()
    for name in args.rows:
        start = time.perf_counter()
        rows = ROWS[name](args)
        for row in rows if isinstance(rows, list) else [rows]:
            row["bench_seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps(row), flush=True)
    print(json.dumps({"name": "total", "seconds": round(time.perf_counter() - started, 1), **describe_device(args)}),
          flush=True)


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # an option refused before any work: one line, as the other scripts say it
        sys.exit(f"error: {error}")
