"""Does the video do what the prompt says, and does it drift? Scores videos of the shapes world.

    python evaluate.py --model models/baby --chunks 100 --seeds 2            # the HELD_OUT prompts
    python evaluate.py --prompts "a red circle moving left" train --context-noise 0.1 --anchor-frame
    python evaluate.py --statistics-lock 0.5      # any drift control of video_settings.DriftControls

Each (prompt, seed) video is made as `python sample.py --prompt PROMPT --seed SEED` makes it (the
same `Settings`, `generate_latents` and decoding), chunk after chunk. Each chunk's frames go
through a detector and only running tallies survive, so memory does not grow with --chunks.
Prints a markdown table (a row per prompt, the mean over its seeds; a last row, the mean over all
videos), the survival table (shapes/survival.py: the fraction of videos still right at chunks 1, 10, 25,
.., and colour and size drift against chunk 1), the failure table (shapes/failures.py: at 30, 100
and 1,000 chunks the share of videos that went blank, that are lost for good, and survival, each
with its 95 % interval) and one JSON line with every number. --scores
streams a row per video per chunk (found, colour, shape, direction, right, alive, drift), --curves
and --plot write the curves against chunk index, --compare puts several settings' curves in one
table and plot. --batch N makes N videos at once (each from its own generator; equal to float
rounding, 2.4x faster on a CPU at 10).

    python evaluate.py --chunks 1000 --batch 10 --scores s.csv --curves anchor.csv --plot anchor.png
    python evaluate.py --compare "anchor=anchor.csv" "none=none.csv" --plot both.png
    python evaluate.py --seeds 1000-1009 --chunks 100 --batch 10   # 50 videos on seeds no choice was made on
    python evaluate.py --failures s.csv          # the failure table of a --scores file
    python evaluate.py --ground-truth --chunks 1000 --batch 10   # the world's own clips through the VAE

--ground-truth makes no video: it scores what a model that made the ground truth would get, the
world's clips of the same prompts encoded and decoded by the model's VAE (the yardstick's floor:
the VAE alone moves colours by a few of 255).

The detector and the numbers of one video are shapes/scoring.py's.
"""

import argparse
import csv
import json
import os
import random
import sys
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch

from endless import Prompts, VideoState, frames_of, generate_latents
from infra import memory
from infra.checkpoint import DTYPES, load_checkpoint_config
from infra.cli import OneLineParser, check_device_name, option_name, without_nan
from infra.files import check_not_an_input, check_writable, writing
from infra.run_state import Progress, default_threads, resolve_device
from pipeline import StableDiffusionXLVideoPipeline, vae_dtype_name
from scheduler import SAMPLERS
from shapes.scoring import METRICS, SCORE_COLUMNS, caption, mean_over, parse_scene, video_score
from shapes.failures import Blanks, failure_rows, failure_table, read_scores
from shapes.survival import Curves, checkpoints, plot, read_curves, summary_table, write_curves
from video_settings import DEFAULT_MODEL, RECIPES, SETTING_NAMES, Settings, add_chunk_options, check_sampler, check_settings
from shapes.world import COLOURS, DIRECTIONS, HELD_OUT, SHAPES, placed_scene, render


def resolve_prompts(values: list[str]) -> list[tuple]:
    """--prompts values ("held-out", "train", or captions of one shape or several) -> (colour, shape,
    direction) for a prompt of one shape, a tuple of them for one of several, in order, once each."""
    every = [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]
    groups = {"held-out": [c for c in every if c in HELD_OUT], "train": [c for c in every if c not in HELD_OUT]}

    def combination(text: str) -> tuple:
        scene = parse_scene(text)
        return scene[0] if len(scene) == 1 else scene

    try:
        combinations = [c for value in values for c in groups.get(value) or [combination(value)]]
    except ValueError as error:
        raise ValueError(f"--prompts: give held-out, train, or captions; {error}") from None
    return list(dict.fromkeys(combinations))


@torch.no_grad()
def made_chunks(pipeline, videos: list[Settings], chunks: int):
    """The videos of `videos` (one prompt and seed each, every other setting the same) as sample.py
    makes them, as one batch: yields each chunk's frames, a list of each video's, numpy uint8
    (frames, H, W, 3). Item i draws its numbers from its own generator (seed i), as a run of it
    alone does."""
    texts = [settings.timeline[0][1] for settings in videos]
    parts = [pipeline.encode_prompt(text, videos[0].negative_prompt, videos[0].guidance > 1) for text in texts]
    embeddings = type(parts[0])(*(None if part[0] is None else torch.cat(part) for part in zip(*parts)))  # (n, ...)
    generators = [torch.Generator().manual_seed(settings.seed) for settings in videos]
    generator = generators[0] if len(videos) == 1 else generators
    progress = Progress(chunks, 0)
    first = videos[0]
    stream = generate_latents(pipeline, first.chunk, first.drift, Prompts([(0, embeddings)]), VideoState(), generator,
                              callback=progress.step, refine=first.refiner)
    scored = 0
    while scored < chunks:
        latents = next(stream)  # with a refiner, the frames of two chunks before, once they left its window
        if latents.shape[2]:
            yield frames_of(pipeline, latents, first.decode_frames)
            scored = progress.chunk = scored + 1
    print(file=sys.stderr)


@torch.no_grad()
def ground_truth_chunks(pipeline, videos: list[Settings], chunks: int):
    """The world's own clips of the videos' prompts (place, size and speed drawn as training clips
    are, from the prompt and the seed), encoded and decoded by the model's VAE: yields each chunk as
    made_chunks does. What the yardstick gives a model that makes the ground truth: its floor."""
    first = videos[0]
    texts = [video.timeline[0][1] for video in videos]
    scenes = [placed_scene(parse_scene(text), random.Random(f"{text}/{video.seed}"), first.height)
              for text, video in zip(texts, videos)]
    progress = Progress(chunks, 0)
    for index in range(chunks):
        truth = torch.stack([render(scene, first.frames, first.height, index * first.frames) for scene in scenes])
        truth = truth.to(pipeline.device, pipeline.dtype)  # (n, 3, frames, H, W)
        latents = pipeline.vae.encode_video(truth, frames_per_batch=first.decode_frames)  # the posterior's mean
        yield frames_of(pipeline, latents, first.decode_frames)
        progress.step(1, 1)
        progress.chunk = index + 1
    print(file=sys.stderr)


@torch.no_grad()
def score_videos(videos: list[Settings], stream, window: int, on_record=None) -> list[dict[str, float]]:
    """Score the videos of `videos` (one prompt and seed each), chunk after chunk of `stream`
    (made_chunks or ground_truth_chunks); on_record(settings, record) after each chunk of each
    video (VideoScore.add_chunk's record)."""
    scores = [video_score(settings.timeline[0][1], window) for settings in videos]
    for video in stream:  # [uint8 (frames, H, W, 3)] per video
        for settings, score, frames in zip(videos, scores, video):
            record = score.add_chunk(frames)
            if on_record is not None:
                on_record(settings, record)
    return [score.result() for score in scores]


MOST_SEEDS = 100_000
MOST_VIDEOS = 100_000  # prompts x seeds
MOST_CHUNKS = 1_000_000
MOST_FRAMES = 256  # frames per chunk: a chunk's frames attend to each other, and sample.py's estimate decodes them all


def seed_list(text: str) -> list[int]:
    """--seeds: "N" -> [0 .. N-1]; "A-B" -> [A .. B]; a comma list of seeds and ranges ("7,11-13")
    -> those, in order, once each. ValueError naming the option for anything else, or for more than
    MOST_SEEDS seeds."""
    shown = repr(text if len(text) <= 60 else text[:57] + "...")
    parts = [part.strip().partition("-") for part in text.split(",")]
    digits = lambda text: text.isascii() and text.isdigit()
    if any(not digits(first) or (dash and not digits(last)) for first, dash, last in parts):
        raise ValueError(f"--seeds {shown}: give a count N, a range A-B, or a comma list of seeds and ranges")
    below = f"--seeds {shown}: give at least one and at most {MOST_SEEDS:,} seeds, below 2**63, each range A-B with A <= B"
    # Leading zeros go before int(), and more digits than 2**63 has are refused before it: Python will
    # not read an int of more than 4,300 digits (an error naming no option).
    parts = [(first.lstrip("0") or "0", dash, last.lstrip("0") or "0") for first, dash, last in parts]
    if any(len(number) > len(str(2**63)) for first, _, last in parts for number in (first, last)):
        raise ValueError(below)
    if len(parts) == 1 and not parts[0][1]:
        parts = [("0", "-", str(int(parts[0][0]) - 1))]
    seeds = []
    for first, dash, last in parts:
        first, last = int(first), int(last if dash else first)
        if last < first or last >= 2**63 or len(seeds) + last - first + 1 > MOST_SEEDS:
            raise ValueError(below)
        seeds += range(first, last + 1)
    return list(dict.fromkeys(seeds))


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """{row name: {metric: value}} -> a markdown table, a row per name."""
    lines = ["| prompt | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{row[m]:.3f}" for m in METRICS) + " |" for name, row in rows.items()]
    return "\n".join(lines)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", nargs="+", default=["held-out"],
                        help='"held-out" (world.HELD_OUT), "train" (every other combination), or captions like "a red circle moving left" '
                             'or, of two shapes, "a red circle moving left and a blue square moving up"')
    parser.add_argument("--seeds", default="2",
                        help="the seeds of each prompt's videos: a count N (seeds 0 .. N-1), a range A-B "
                             "(A to B, both in), or a comma list of seeds and ranges such as 7,11-13 (default: 2); "
                             f"at most {MOST_VIDEOS:,} videos in all (prompts x seeds)")
    parser.add_argument("--chunks", type=int, default=100, help=f"chunks per video (at most {MOST_CHUNKS:,})")
    parser.add_argument("--batch", type=int, default=1,
                        help="videos made at once (the same numbers per video, up to float rounding; faster on a CPU)")
    parser.add_argument("--survival-window", type=int, default=3,
                        help="a video is lost at the end of this many consecutive wrong chunks (shapes/survival.py)")
    parser.add_argument("--scores", help="CSV: a row per video per chunk, written as the chunks are made")
    parser.add_argument("--curves", help="CSV: survival and drift per chunk index over the videos")
    parser.add_argument("--plot", help="PNG: survival and drift against chunk index (of --compare's curves, if given)")
    parser.add_argument("--name", help="the setting's name in the survival table and the plot (default: its drift controls)")
    parser.add_argument("--compare", nargs="+", metavar="NAME=CURVES",
                        help="make no video: the survival table (and --plot) of curves files written by --curves")
    parser.add_argument("--failures", nargs="+", metavar="SCORES",
                        help="make no video: the failure table (shapes/failures.py) of scores files written by --scores")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --scores, --curves, --plot files")
    parser.add_argument("--ground-truth", action="store_true",
                        help="make no video: score the world's own clips of the prompts through the model's VAE "
                             "(the yardstick's floor; the drift controls and sampling options play no part)")
    add_chunk_options(parser)
    return parser.parse_args(argv)


def check_outputs(args: argparse.Namespace) -> None:
    """ValueError naming the option, before any work, for an output that is an input or lies inside
    one (the --model folder a run reads, --compare's or --failures' files; infra/files.py), that
    would replace a file (without --overwrite), lies in a missing folder, is a folder or is given twice."""
    outputs = {name: getattr(args, name) for name in ("scores", "curves", "plot") if getattr(args, name)}
    inputs = [("--compare", value.split("=", 1)[-1]) for value in args.compare or []]
    inputs += [("--failures", value) for value in args.failures or []]
    if not (args.compare or args.failures):  # a run that makes videos reads the model
        inputs.append(("--model", args.model or str(DEFAULT_MODEL)))
    seen = {}
    for name, value in outputs.items():
        path = Path(value)
        if name == "plot" and path.suffix.lower() != ".png":
            raise ValueError(f"--plot {value}: give a .png file")
        check_not_an_input(f"--{name}", value, inputs)
        with writing(f"--{name}", value):
            if path.is_dir() or not path.parent.is_dir():
                raise ValueError(f"--{name} {value}: give a file in an existing folder")
            if os.path.lexists(path) and not args.overwrite:
                raise ValueError(f"--{name} {value} exists; give --overwrite to replace it")
            resolved = str(path.resolve())
        if resolved in seen:
            raise ValueError(f"--{name} {value} is also --{seen[resolved]}")
        seen[resolved] = name
        check_writable(f"--{name}", value)


def check_inputs(args: argparse.Namespace) -> None:
    """ValueError naming the option for a --compare or --failures file that is there but is no
    regular file: a FIFO would wait for a writer for ever, a device such as /dev/zero never end."""
    inputs = [("--compare", value.split("=", 1)[-1]) for value in args.compare or []]
    for option, path in inputs + [("--failures", value) for value in args.failures or []]:
        if os.path.exists(path) and not os.path.isfile(path):
            raise ValueError(f"{option} {path} is not a regular file: give a file evaluate.py wrote")


def compare(args: argparse.Namespace) -> dict:
    """--compare: the survival table of curves files (and their plot); returns {name: rows}."""
    settings = {}
    for value in args.compare:
        name, separator, path = value.partition("=")
        if not separator or not name or not path:
            raise ValueError(f"--compare {value!r}: give NAME=CURVES.csv")
        settings[name] = read_curves(path)
    print(summary_table(settings))
    if args.plot:
        with writing("--plot", args.plot):
            plot(settings, args.plot)
    return settings


def refuse_unused(args: argparse.Namespace, mode: str, used: set[str]) -> None:
    """ValueError naming the options given with --compare or --failures (which make no video) that
    they would ignore."""
    defaults = vars(parse_arguments([]))
    unused = [option_name(name) for name, value in vars(args).items() if name not in used and value != defaults[name]]
    if unused:
        raise ValueError(f"--{mode} makes no video and would ignore {', '.join(unused)}: leave them out")


def failures(args: argparse.Namespace) -> dict:
    """--failures: the failure table of scores files, each apart; returns {file: failure_rows}."""
    tables = {}
    for path in args.failures:
        videos, alive = read_scores(path)
        tables[path] = failure_rows(list(videos.values()), alive)
        print(f"{path}: {len(videos)} videos\n{failure_table(tables[path])}")
    return tables


def chunk_memory(settings: Settings, batch: int, ground_truth: bool) -> memory.MemoryEstimate:
    """sample.py's estimate of a chunk's memory (infra/memory.py, no offload, the VAE in the dtype
    sample.py gives it) for `batch` videos made at once: a step's and a decode's activations times
    the batch (each prompt is encoded alone). With `ground_truth` no step runs: the VAE's encoding
    of a chunk is counted as its decoding."""
    config = load_checkpoint_config(settings.model)
    found = memory.estimate(config, settings.model, height=settings.height, width=settings.width, frames=settings.frames,
                            context_frames=settings.context_frames, guidance=settings.guidance,
                            decode_frames=min(settings.decode_frames, settings.frames), dtype=settings.dtype,
                            vae_dtype=vae_dtype_name(settings.dtype, None, config["vae"].get("force_upcast", True)))
    if ground_truth:
        found = replace(found, activations={**found.activations, "step": found.activations["decode"]})
    return batched(found, batch)


def batched(one: memory.MemoryEstimate, batch: int) -> memory.MemoryEstimate:
    """The estimate of one video at once, for `batch` videos at once."""
    activations = one.activations
    return replace(one, activations={**activations, "step": activations["step"] * batch, "decode": activations["decode"] * batch})


def check_memory(settings: Settings, device: str, batch: int, ground_truth: bool) -> None:
    """ValueError, before any work, if `batch` videos at once need more memory than `device` has
    free (`chunk_memory`), with the --batch that would fit. The decoded frames of a chunk alone
    (float32) are checked first: sizes past what any device holds never reach the estimate, which
    would fail on them or take minutes."""
    sizes = f"--batch {batch} --frames {settings.frames} --height {settings.height} --width {settings.width}"
    free = memory.available_memory(device)
    frames_bytes = batch * settings.frames * 3 * settings.height * settings.width * 4
    if frames_bytes > free:
        raise ValueError(f"{sizes}: a chunk needs more than {memory.gib(frames_bytes)} (its decoded frames alone) and "
                         f"{device} has {memory.gib(free)} free; fewer --frames, a smaller --height/--width"
                         f"{' or --batch' if batch > 1 else ''} would need less")
    one = chunk_memory(settings, 1, ground_truth)
    if (found := batched(one, batch)).peak() <= free:
        return
    fits, low, high = None, 1, batch - 1  # the most videos at once that fit (the peak grows with the batch)
    while low <= high:
        middle = (low + high) // 2
        if batched(one, middle).peak() <= free:
            fits, low = middle, middle + 1
        else:
            high = middle - 1
    remedy = (f"--batch {fits} would fit" if fits else
              "fewer --frames, a smaller --height/--width, --decode-frames 1 or --dtype bf16 would need less")
    raise ValueError(f"{sizes}: a chunk needs {found.describe()} and {device} has {memory.gib(free)} free; {remedy}")


def settings_for(args: argparse.Namespace, text: str, seed: int) -> Settings:
    """sample.py's Settings for one video; options not given take the model's or sample.py's defaults."""
    model = args.model or str(DEFAULT_MODEL)
    config = load_checkpoint_config(model)
    given = {name: value for name, value in vars(args).items() if name in SETTING_NAMES and value is not None}
    recipe = RECIPES[args.recipe] if args.recipe else {}
    values = {**config.get("sample_defaults", {}), **recipe, **given, "model": model}
    settings = Settings.from_options(timeline=[(0, text)], seed=seed, **values)
    check_settings(settings, config)
    check_sampler(settings, SAMPLERS)
    if settings.skip_frames:
        raise ValueError(f"--model {model}: its recipe skips {settings.skip_frames} frames; evaluate.py scores every "
                         f"chunk from the first (give --recipe seed, or a model without skipped frames)")
    return settings


def setting_name(settings: Settings) -> str:
    """The drift controls that are on, as their options say ("anchor frame, context noise 0.1"), or "no drift control"."""
    on = [f"{name.replace('_', ' ')}" + ("" if value is True else f" {value:g}")
          for name, value in asdict(settings.drift).items() if value]
    return ", ".join(on) or "no drift control"


def main(argv=None) -> dict:
    """Score every (prompt, seed) video; print the tables and the JSON line; return what the JSON says."""
    args = parse_arguments(argv)
    check_outputs(args)
    check_inputs(args)
    if args.compare:
        refuse_unused(args, "compare", {"compare", "plot", "overwrite"})
    if args.failures:
        refuse_unused(args, "failures", {"failures"})
    if args.compare:
        return compare(args)
    if args.failures:
        return failures(args)
    combinations = resolve_prompts(args.prompts)
    args.seeds = seed_list(args.seeds)
    if len(combinations) * len(args.seeds) > MOST_VIDEOS:
        raise ValueError(f"--prompts and --seeds: {len(combinations):,} prompts x {len(args.seeds):,} seeds are "
                         f"{len(combinations) * len(args.seeds):,} videos; give at most {MOST_VIDEOS:,}")
    for name in ("chunks", "batch", "survival_window"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.chunks > MOST_CHUNKS:
        raise ValueError(f"--chunks must be at most {MOST_CHUNKS:,}, got {args.chunks:,}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.threads is not None and args.threads > os.cpu_count():
        raise ValueError(f"--threads must be at most {os.cpu_count()} (this machine's cores), got {args.threads}")
    # One prompt's videos differ in their seed only: each prompt's Settings are made and checked once.
    settings = [[replace(prompt, seed=seed) for seed in args.seeds]
                for prompt in (settings_for(args, caption(c), args.seeds[0]) for c in combinations)]
    first = settings[0][0]
    if first.frames > MOST_FRAMES:
        raise ValueError(f"--frames must be at most {MOST_FRAMES} (frames per chunk), got {first.frames}")
    if args.batch > 1 and not args.ground_truth and (spanning := first.drift.spanning_batch()):
        options = " or ".join(option_name(name) for name in spanning)
        raise ValueError(f"--batch must be 1 with {options}, whose statistics span the batch")
    if args.ground_truth and first.height != first.width:
        raise ValueError(f"--ground-truth: the world's frames are square; got --height {first.height} --width {first.width}")
    check_device_name(args.device)
    device = resolve_device(args.device)
    check_memory(first, device, min(args.batch, len(combinations) * len(args.seeds)), args.ground_truth)
    torch.set_num_threads(args.threads or default_threads())
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(first.model, device, DTYPES[first.dtype])
    videos = [video for prompt_videos in settings for video in prompt_videos]
    curves, results, blanks, alive = Curves(), [], {}, {}
    with writing("--scores", args.scores):
        scores_file = open(args.scores, "w", newline="") if args.scores else None
        writer = csv.DictWriter(scores_file, ["prompt", "seed", *SCORE_COLUMNS]) if scores_file else None
        if writer:
            writer.writeheader()

    def on_record(video: Settings, record: dict) -> None:
        curves.add(record["chunk"], record["alive"], record["right"], record["colour_drift"], record["size_ratio"])
        blanks.setdefault((video.timeline[0][1], video.seed), Blanks()).add(record["found"])
        alive[record["chunk"]] = alive.get(record["chunk"], 0) + record["alive"]
        if writer:
            with writing("--scores", args.scores):  # a full disk, say: one line, not a traceback
                writer.writerow({"prompt": video.timeline[0][1], "seed": video.seed, **record})
                scores_file.flush()

    make = ground_truth_chunks if args.ground_truth else made_chunks
    try:
        for start in range(0, len(videos), args.batch):
            batch = videos[start:start + args.batch]
            names = ", ".join(f"{v.timeline[0][1]} (seed {v.seed})" for v in batch)
            print(f"[videos {start + 1}..{start + len(batch)} of {len(videos)}] {names}", file=sys.stderr)
            results += score_videos(batch, make(pipeline, batch, args.chunks), args.survival_window, on_record)
    finally:
        if scores_file:
            with writing("--scores", args.scores):
                scores_file.close()
    per_prompt = {prompt_videos[0].timeline[0][1]: mean_over(results[i * len(args.seeds):(i + 1) * len(args.seeds)])
                  for i, prompt_videos in enumerate(settings)}
    overall = mean_over(results)
    name = args.name or ("ground truth through the VAE" if args.ground_truth else setting_name(first))
    rows = curves.rows()
    print(markdown_table({**per_prompt, "all": overall}))
    print(summary_table({name: rows}))
    failed = failure_rows(list(blanks.values()), alive)
    print(failure_table(failed))
    if args.curves:
        with writing("--curves", args.curves):
            write_curves(args.curves, rows)
    if args.plot:
        with writing("--plot", args.plot):
            plot({name: rows}, args.plot)
    marks = checkpoints(args.chunks)
    sampling = {} if args.ground_truth else {"context_frames": first.context_frames, "steps": first.steps,
                                             "guidance": first.guidance, **asdict(first.drift),
                                             "scheduler": first.scheduler or pipeline.scheduler_config.algorithm_type}
    report = {"model": first.model, "chunks": args.chunks, "seeds": args.seeds, "frames": first.frames,
              "height": first.height, "width": first.width, **sampling, "name": name,
              "survival_window": args.survival_window, "ground_truth": args.ground_truth,
              "all": overall, "prompts": per_prompt, "failures": failed,
              "blank_videos": [{"prompt": prompt, "seed": seed, "first_blank": video.first_blank, "blank_from": video.blank_from}
                               for (prompt, seed), video in blanks.items() if video.first_blank is not None],
              "curves": {str(row["chunk"]): row for row in rows if row["chunk"] in marks}}
    print(json.dumps(without_nan(report)))
    return report


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
