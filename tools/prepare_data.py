"""Prepare a folder of captioned videos for training, once: VAE latents and text embeddings in shards.

    python tools/prepare_data.py --model CHECKPOINT --data VIDEOS --out SHARDS --size 512 --context-frames 2 --frames 8
    torchrun --nproc_per_node 8 tools/prepare_data.py ...          # each process makes its own shards
    python train.py --mode temporal --model CHECKPOINT --data SHARDS ...

Each video is decoded once, only where its clips are: up to --clips-per-video windows of
--context-frames + --frames frames (every --frame-stride-th), evenly spaced from its start to its
end, each reached by a seek (a video of variable frame rate, found from its timestamps, is decoded
by time at its average rate, from its start), resized to cover --size and centre-cropped as
train.py does. The clips are encoded with the checkpoint's VAE (the posterior mean, scaled: what
train.py takes from the same frames) and the captions with its two text encoders, then written in shards of
--videos-per-shard videos (training/data.py describes them), each to a temporary name and renamed
when complete, and last the index (SHARDS/index.json), which train.py recognises them by and
checks against the run: the same VAE and text encoders (their fingerprints), --size,
--frame-stride and frames per clip.

The same command resumes a preparation that stopped: shards on disk are kept and the others made,
the same bytes an uninterrupted run writes. Under torchrun process r makes shards r, r + N, ...
Videos too short for one window, or that cannot be decoded, are skipped and listed in the index.
Every option is checked before torch is imported; SHARDS must be new, empty, or a preparation
begun with the same settings, and nothing in it that this script did not write is ever removed;
it is no input: neither VIDEOS nor CHECKPOINT, nor inside or around either.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/NAME.py`: the modules are at the repository's root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from infra.cli import OneLineParser
from infra.files import atomic_file, check_not_an_input, temporary_of
from infra.run_state import OutputLock
from video_settings import DTYPE_NAMES

PREPARE_FILE = "prepare.json"  # written first: the settings, checked when the preparation resumes
PREPARE_FORMAT = "sdxl-video-prepare/1"
POSITIVE = ("size", "frame_stride", "context_frames", "frames", "clips_per_video", "videos_per_shard")


def make_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (convert_weights.py) whose VAE and text "
                                                       "encoders encode the data")
    parser.add_argument("--data", required=True, help="folder of videos with captions (NAME.txt, metadata.jsonl or "
                                                      "metadata.csv), as train.py reads")
    parser.add_argument("--out", required=True, help="folder of the shards: new, empty, or one to resume")
    parser.add_argument("--size", type=int, default=32, help="frame height and width in pixels (train.py's --size; "
                                                             "default: 32)")
    parser.add_argument("--frame-stride", type=int, default=1, help="keep every n-th frame (default: 1)")
    parser.add_argument("--context-frames", type=int, default=2, help="context frames of each clip (default: 2)")
    parser.add_argument("--frames", type=int, default=4, help="chunk frames of each clip, after its context "
                                                              "(default: 4)")
    parser.add_argument("--clips-per-video", type=int, default=4, help="windows cut from each video, evenly "
                                                                       "spaced (default: 4)")
    parser.add_argument("--videos-per-shard", type=int, default=64, help="videos per shard file (default: 64)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32",
                        help="of the stored latents and embeddings; fp32 trains exactly as the videos do "
                             "(default: fp32)")
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if there is a GPU, else cpu), cpu, "
                                                         "cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return parser


def check_options(args) -> None:
    """ValueError, one line naming the option, for a value the preparation cannot use; reads only
    small files (the checkpoint's config.json, --out's prepare.json)."""
    for name in POSITIVE:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.threads < 0:
        raise ValueError(f"--threads must be at least 0, got {args.threads}")
    if args.threads > (cpus := os.cpu_count() or 1):  # more threads than CPUs: no faster; 100000 crash OpenMP
        raise ValueError(f"--threads must be at most {cpus} (the CPUs of this machine), got {args.threads}")
    if args.device not in ("auto", "cpu", "cuda") and not (args.device.startswith("cuda:")
                                                           and args.device[5:].isdigit()):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N; got {args.device!r}")
    model, data, out = Path(args.model), Path(args.data), Path(args.out)
    if not (model / "config.json").is_file():
        raise ValueError(f"--model {model}: not a checkpoint folder (it has no config.json; convert_weights.py "
                         f"makes one)")
    if not data.is_dir():
        raise ValueError(f"--data {data}: not a folder of videos")
    # The shards are no input: not --data or --model, nor inside them (inside --model they would change the
    # model's fingerprint, or its files), nor holding them.
    check_not_an_input("--out", out, [("--data", data), ("--model", model)])
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a new folder for the shards")
    # Another process under torchrun may be writing prepare.json (under a temporary name) right now.
    others = [path for path in out.iterdir() if temporary_of(PREPARE_FILE, path.name) is None] if out.is_dir() else []
    if others and not (out / PREPARE_FILE).is_file():
        raise ValueError(f"--out {out} holds other files (no {PREPARE_FILE}): give a new or empty folder, or the "
                         f"folder of a preparation to resume")
    try:
        channels = json.loads((model / "config.json").read_text())["vae"]["block_out_channels"]
        factor = 2 ** (len(channels) - 1)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--model {model}: its config.json has no vae.block_out_channels ({error!r})") from None
    if args.size % factor:
        raise ValueError(f"--size must be a multiple of {factor} (the VAE's downsampling), got {args.size}")
    check_memory(args, channels[0])
    if (out / PREPARE_FILE).is_file():
        read_prepare(out / PREPARE_FILE)


def memory_needed(args, width: int) -> dict[str, int]:
    """Bytes that one video takes while it is prepared, at least: `frames`, its --clips-per-video windows
    of --context-frames + --frames frames as float32 (3, size, size), twice (the windows and their stack);
    `vae`, the VAE encoder's first level on 8 frames at a time (float32, about four tensors of its `width`
    channels alive at once). The decoded source frames and the shard's latents come on top."""
    clip_frames = args.context_frames + args.frames
    return {"frames": 2 * args.clips_per_video * clip_frames * 3 * args.size**2 * 4,
            "vae": 4 * width * min(8, args.clips_per_video * clip_frames) * args.size**2 * 4}


def free_memory() -> int:
    """Bytes of memory free for this run: MemAvailable of /proc/meminfo, else all of it."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gigabytes(count: int) -> str:
    return f"{count / 2**30:,.1f} GiB"


def check_memory(args, width: int) -> None:
    """ValueError, naming the options, if one video's frames (and, with --device cpu, the VAE's work on
    them) need more memory than this machine has free: refused before anything is decoded or written."""
    needed, free = memory_needed(args, width), free_memory()
    total = needed["frames"] + (needed["vae"] if args.device == "cpu" else 0)
    if total > free:
        raise ValueError(f"--size {args.size} --clips-per-video {args.clips_per_video} --context-frames "
                         f"{args.context_frames} --frames {args.frames}: each video needs at least "
                         f"{gigabytes(total)} and this machine has {gigabytes(free)} free; give a smaller --size, "
                         f"fewer --clips-per-video or fewer frames")


def read_prepare(path: Path) -> dict:
    """The PREPARE_FILE of a preparation; ValueError, one line naming it (and the key), unless it is
    one as this script writes it."""
    stored = read_json(path)
    if not isinstance(stored, dict):
        raise ValueError(f"{path} holds a JSON {type(stored).__name__}, not a preparation's object; give a new --out")
    if stored.get("format") != PREPARE_FORMAT:
        raise ValueError(f"{path} is not a preparation's ({PREPARE_FORMAT}); give a new --out")
    shapes = {"model": (str, "the path of a checkpoint folder"), "settings": (dict, "an object"),
              "fingerprints": (dict, "an object"), "videos": (list, "a list of the video names")}
    for key, (kind, expected) in shapes.items():
        if not isinstance(stored.get(key), kind):
            raise ValueError(f"{path}: {key} must be {expected}, got {json.dumps(stored.get(key))[:80]}; give a new "
                             f"--out")
    for key in ("size", "frame_stride", "context_frames", "frames", "clips_per_video", "videos_per_shard", "dtype"):
        if key not in stored["settings"]:
            raise ValueError(f"{path}: settings.{key} is missing; give a new --out")
    return stored


def read_json(path: Path):
    """The JSON value of a file; ValueError naming it if it is not UTF-8, not JSON or nested too deeply."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at {error.start}); give "
                         f"a new --out") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); give a new --out") from None
    except RecursionError:
        raise ValueError(f"{path} is JSON nested too deeply to be a preparation's; give a new --out") from None


def parse_arguments(argv=None):
    """The checked options (ValueError for a bad one), before torch is imported."""
    args = make_parser().parse_args(argv)
    check_options(args)
    return args


def main(argv=None) -> None:
    """Run the command line `argv`."""
    args = parse_arguments(argv)
    prepare(args)


# Everything below runs once the options are checked.


def settings_of(args) -> dict:
    """The settings that decide what the shards hold (stored in prepare.json and the index)."""
    return {"size": args.size, "frame_stride": args.frame_stride, "context_frames": args.context_frames,
            "frames": args.frames, "clips_per_video": args.clips_per_video,
            "videos_per_shard": args.videos_per_shard, "dtype": args.dtype}


def write_json(path: Path, values: dict) -> None:
    """Write `values` to `path` whole or not at all (`atomic_file`: each process its own temporary,
    since two processes may write the same index)."""
    with atomic_file(path) as file:
        file.write((json.dumps(values, indent=2) + "\n").encode())


def check_resume(out: Path, plan: dict) -> bool:
    """Whether --out holds a preparation in progress (or done); ValueError unless it was begun with
    the same settings, checkpoint (fingerprints) and videos as `plan`."""
    path = out / PREPARE_FILE
    if not path.exists():
        return False
    stored = read_prepare(path)
    changed = [f"--{name.replace('_', '-')} {stored['settings'].get(name)} -> {value}"
               for name, value in plan["settings"].items() if stored["settings"].get(name) != value]
    if stored["fingerprints"] != plan["fingerprints"]:
        changed.append(f"--model (another VAE or text encoders than {stored['model']}'s)")
    if stored["videos"] != plan["videos"]:
        changed.append("--data (videos added, removed or renamed since)")
    if changed:
        raise ValueError(f"--out {out} holds a preparation with other settings: {', '.join(changed)}; resume with "
                         f"the same ones or give a new --out")
    return True


def prepare_video(pipeline, args, path: Path, torch_dtype):
    """The clips of one video encoded, (clips, c, frames, h, w) in `torch_dtype`; or a reason to skip it."""
    import torch

    from training.data import encode_videos, read_windows, video_length, window_starts

    clip_frames = args.context_frames + args.frames
    try:
        length = video_length(path)
        strided = math.ceil(length[0] / args.frame_stride)
        starts = window_starts(strided, clip_frames, args.clips_per_video)
        if not starts:
            return f"{strided} frames after stride {args.frame_stride}; a clip needs {clip_frames}"
        windows = read_windows(path, starts, clip_frames, args.frame_stride, args.size, length)
    except ValueError as error:
        return str(error)
    return encode_videos(pipeline, torch.stack(windows)).to(torch_dtype)  # (clips, c, frames, h, w)


def make_shard(pipeline, args, items, path: Path, folder: Path, shapes: dict) -> tuple[int, int]:
    """Encode the videos `items` [(path, caption)] into the shard `path`; returns (clips, skipped)."""
    import torch

    from infra.checkpoint import DTYPES
    from training.data import encode_captions

    dtype = DTYPES[args.dtype]
    latents, used, skipped = [], [], []
    for video, caption in items:
        name = str(video.relative_to(folder))
        clips = prepare_video(pipeline, args, video, dtype)
        if isinstance(clips, str):
            print(f"skipped {name}: {clips}", flush=True)
            skipped.append([name, clips])
            continue
        latents.append(clips.cpu())
        used.append((name, caption, clips.shape[0]))
    if used:
        text, pooled = encode_captions(pipeline, [caption for _, caption, _ in used])
    else:
        text, pooled = torch.zeros(0, *shapes["text_shape"]), torch.zeros(0, *shapes["pooled_shape"])
    tensors = {"latents": torch.cat(latents) if latents else torch.zeros(0, *shapes["latent_shape"]),
               "text": text, "pooled": pooled}  # (clips, c, f, h, w), (videos, tokens, dim), (videos, p)
    tensors = {key: value.to("cpu", dtype).contiguous() for key, value in tensors.items()}
    contents = {"videos": [[name, clips] for name, _, clips in used], "skipped": skipped}
    header, data = shard_bytes(tensors, {"contents": json.dumps(contents)})
    with atomic_file(path) as file:
        file.write(header)
        file.write(data)
    return tensors["latents"].shape[0], len(skipped)


def shard_bytes(tensors: dict, metadata: dict[str, str]) -> tuple[bytes, memoryview]:
    """A safetensors file of `tensors` as (header, data), its metadata `metadata` and `sha256`: the
    SHA-256 of its data (the bytes after the header, training/data.shard_checksum), which train.py
    checks once per shard. The header's offsets count from the data's start, so the checksum's entry
    changes no offset; the header is padded with spaces to 8 bytes, as safetensors pads it."""
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    length = int.from_bytes(blob[:8], "little")
    header, data = json.loads(blob[8:8 + length]), memoryview(blob)[8 + length:]
    header["__metadata__"]["sha256"] = hashlib.sha256(data).hexdigest()
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, data


def write_index(out: Path, plan: dict, names: list[str], shapes: dict) -> None:
    """index.json, from the shards' own record of what they hold."""
    from safetensors import SafetensorError, safe_open

    from training.data import INDEX_FILE, INDEX_FORMAT

    shards, skipped = [], []
    for name in names:
        try:  # a shard on disk from before a resume may be anyone's
            with safe_open(out / name, "pt") as file:
                metadata = file.metadata()
            contents = json.loads(metadata["contents"])
            lists = isinstance(contents, dict) and all(isinstance(contents.get(k), list) for k in ("videos", "skipped"))
            if not lists:
                raise TypeError("its contents are not lists of videos and skipped ones")
        except (SafetensorError, OSError, TypeError, KeyError, ValueError, RecursionError) as error:
            raise ValueError(f"{out / name}: not a whole shard of this preparation ({type(error).__name__}: "
                             f"{str(error)[:100]}); remove it and run the same command again to make it anew") from None
        checksum = {"sha256": metadata["sha256"]} if "sha256" in metadata else {}  # a shard of an older run has none
        shards.append({"file": name, "videos": contents["videos"], **checksum})
        skipped += contents["skipped"]
    clips = sum(count for shard in shards for _, count in shard["videos"])
    index = {"format": INDEX_FORMAT, "clips": clips, "videos": sum(len(s["videos"]) for s in shards),
             "skipped": skipped, **shapes, "dtype": plan["settings"]["dtype"], "model": plan["model"],
             "fingerprints": plan["fingerprints"], "settings": plan["settings"], "shards": shards}
    write_json(out / INDEX_FILE, index)


class PreparationLock(OutputLock):
    """`OutputLock` (infra/run_state.py) on --out for process `rank`: the file `OUT.prepare-RANK.lock`
    next to it. Two runs on one --out would each make the shards the other makes (or, begun with
    other settings at once, mix them); the processes of one torchrun run each hold their own."""

    def __init__(self, out: Path, rank: int):
        super().__init__(str(out))
        self.path = Path(f"{str(out).rstrip('/')}.prepare-{rank}.lock")


def prepare(args) -> None:
    """Make the shards of this process (all, or its slice under torchrun) that are not on disk yet,
    then the index once every shard is, holding this process's `PreparationLock` on --out."""
    try:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise ValueError(f"RANK and WORLD_SIZE must be whole numbers (torchrun sets them), got "
                         f"{os.environ.get('RANK')!r} and {os.environ.get('WORLD_SIZE')!r}") from None
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK must be from 0 to WORLD_SIZE - 1, got RANK {rank}, WORLD_SIZE {world_size}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with PreparationLock(out, rank):
        prepare_locked(args, rank, world_size)


def prepare_locked(args, rank: int, world_size: int) -> None:
    """The work of `prepare`, its lock held."""
    import torch

    from infra.memory import available_memory
    from pipeline import StableDiffusionXLVideoPipeline
    from training.data import captioned_videos, checkpoint_fingerprints, encode_captions

    out, folder = Path(args.out), Path(args.data)
    items = captioned_videos(args.data)
    plan = {"format": PREPARE_FORMAT, "model": str(Path(args.model).resolve()),
            "fingerprints": checkpoint_fingerprints(args.model), "settings": settings_of(args),
            "videos": [str(path.relative_to(folder)) for path, _ in items]}
    device = args.device
    if device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device (give --device auto or cpu)")
    if device.startswith("cuda"):  # on a CPU, check_options counted the VAE's work with the frames
        width = json.loads((Path(args.model) / "config.json").read_text())["vae"]["block_out_channels"][0]
        if (needed := memory_needed(args, width)["vae"]) > (free := available_memory(device)):
            raise ValueError(f"--size {args.size}: the VAE needs at least {gigabytes(needed)} to encode 8 frames and "
                             f"{device} has {gigabytes(free)} free; give a smaller --size, or --device cpu")
    resuming = check_resume(out, plan)
    pipeline = StableDiffusionXLVideoPipeline.from_pretrained(args.model, device)
    if not resuming:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / PREPARE_FILE, plan)
    if args.threads:
        torch.set_num_threads(args.threads)
    factor = pipeline.vae_scale_factor
    text, pooled = encode_captions(pipeline, [""])
    shapes = {"latent_shape": [pipeline.vae.config.latent_channels, args.context_frames + args.frames,
                               args.size // factor, args.size // factor],
              "text_shape": list(text.shape[1:]), "pooled_shape": list(pooled.shape[1:])}
    count = math.ceil(len(items) / args.videos_per_shard)
    names = [f"shard-{number:05d}.safetensors" for number in range(count)]
    mine = [number for number in range(rank, count, world_size) if not (out / names[number]).exists()]
    who = f"process {rank}/{world_size}: " if world_size > 1 else ""
    print(f"{who}{len(items)} videos in {count} shards; {len(mine)} to make in {out}", flush=True)
    began = time.monotonic()
    for done, number in enumerate(mine, start=1):
        videos = items[number * args.videos_per_shard:(number + 1) * args.videos_per_shard]
        clips, skipped = make_shard(pipeline, args, videos, out / names[number], folder, shapes)
        left = (time.monotonic() - began) / done * (len(mine) - done)
        print(f"{who}{names[number]}: {len(videos) - skipped} videos, {clips} clips ({skipped} skipped); "
              f"{done}/{len(mine)}, {left:.0f} s left", flush=True)
    if all((out / name).exists() for name in names):
        write_index(out, plan, names, shapes)
        print(f"{who}wrote {out / 'index.json'}: train with --data {out}", flush=True)
    else:
        print(f"{who}done; the index is written by the process that finishes last", flush=True)


if __name__ == "__main__":
    try:
        ARGUMENTS = parse_arguments()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        prepare(ARGUMENTS)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except OSError as error:  # a full disk, say: the shards made so far are whole, and kept
        print(f"error: {error.strerror or error} ({error.filename}); the shards already made are kept: run the same "
              f"command again to resume", file=sys.stderr)
        sys.exit(1)
