"""The machinery of a run around the chunk loop: the output's lock, the device, threads and progress.

sample.py holds `OutputLock` for a whole run; sample.py, evaluate.py and train.py pick their device
with `resolve_device`; `default_threads` and `Progress` serve sample.py and evaluate.py alike.
torch-free at import: `resolve_device` imports it when called.
"""

import fcntl
import os
import re
import sys
import time
from pathlib import Path


# The output's lock: one run per output at a time.


class OutputLock:
    """An exclusive lock on an output for a whole run, as a context manager: the file
    `OUT.sample.lock`, locked with flock and holding its owner's process id.

    The kernel releases a flock when its process ends, however it ends, so the lock of a killed run
    never blocks the next one; the file is removed when the lock is released. A file of that name
    that holds anything but a process id is someone else's: it is refused, never overwritten.
    """

    def __init__(self, out: str):
        self.out = out
        self.path = Path(str(out).rstrip("/") + ".sample.lock")
        self.descriptor = None

    def __enter__(self) -> "OutputLock":
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not os.pread(descriptor, 64, 0).strip().isdigit() and os.fstat(descriptor).st_size:
                os.close(descriptor)
                raise ValueError(f"--out {self.out}: {self.path} exists and is not a lock of sample.py "
                                 f"(it holds no process id); move it away")
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "another process"
                os.close(descriptor)
                raise ValueError(f"--out {self.out} is being written by process {holder} (it holds {self.path}); "
                                 f"wait for that run to end or stop it") from None
            try:  # the last owner may have removed the file between our open and our lock
                if os.stat(self.path).st_ino == os.fstat(descriptor).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(descriptor)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self.descriptor = descriptor
        return self

    def __exit__(self, *exception) -> None:
        self.path.unlink(missing_ok=True)  # while the lock is still held
        os.close(self.descriptor)


# The device, before a model is loaded (infra/memory.py estimates the memory a chunk needs).


def resolve_device(name: str | None) -> str:
    """The device to run on: `name`; None or "auto": cuda if there is one, else cpu; "cuda" under
    torchrun: the process's own GPU, cuda:LOCAL_RANK, mapped before it is checked like any other.
    ValueError naming --device (and LOCAL_RANK) if it is not there."""
    import torch

    where = f"--device {name or 'auto'}"
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    rank, mapped = os.environ.get("LOCAL_RANK"), False
    if name == "cuda" and rank is not None:
        if not re.fullmatch(r"[0-9]+", rank):
            raise ValueError(f"{where}: LOCAL_RANK={rank!r} is not a GPU index (torchrun sets it to 0, 1, ...)")
        name, mapped = f"cuda:{int(rank)}", True
        where = f"{where} under LOCAL_RANK={rank} is {name}"
    kind, _, index = name.partition(":")
    if kind == "cuda" and index and not re.fullmatch(r"[0-9]+", index):
        raise ValueError(f"--device {name!r}: expected cpu, cuda, cuda:N (N a GPU index) or auto")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where}: torch sees no CUDA GPU on this machine; use --device cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        hint = f"; start at most {torch.cuda.device_count()} processes per machine" if mapped else ""
        raise ValueError(f"{where}: this machine has {torch.cuda.device_count()} CUDA GPU(s){hint}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{where}: MPS is not available on this machine; use --device cpu")
    return name


# Running: threads and progress (sample.py and evaluate.py).


def default_threads() -> int:
    """Half the cores this process may use, fewer when the machine is busy (its load average), at
    least 1: torch's default (every core) spins threads against other work and ran the quick start
    10 times slower on a busy 2-core machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    idle = cores - round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else cores
    return max(1, min(cores // 2, idle))


class Progress:
    """Progress on stderr: a live line (chunk, step, seconds per chunk, ETA, and with
    `video_seconds_per_chunk` how fast the video is made against its own time) in a terminal, else a
    line per chunk."""

    def __init__(self, total_chunks: int | None, first_chunk: int, live: bool | None = None,
                 video_seconds_per_chunk: float | None = None):
        self.total, self.first, self.start = total_chunks, first_chunk, time.time()
        self.chunk = first_chunk
        self.live = sys.stderr.isatty() if live is None else live
        self.video_seconds_per_chunk = video_seconds_per_chunk

    def line(self, step: int, steps: int) -> str:
        done = self.chunk - self.first
        elapsed = time.time() - self.start
        per_chunk = elapsed / (done + step / steps) if done or step else 0.0
        total = f"/{self.total}" if self.total else ""
        eta = f" | ETA {format_seconds(per_chunk * (self.total - self.chunk - step / steps))}" if self.total else ""
        speed = ""
        if self.video_seconds_per_chunk and per_chunk > 0:  # above 1x, the video plays while it is made
            speed = f" | {self.video_seconds_per_chunk / per_chunk:.2g}x real time"
        return f"chunk {self.chunk + 1}{total} step {step}/{steps} | {per_chunk:.1f} s/chunk{speed}{eta}"

    def step(self, step: int, steps: int) -> None:
        if self.live:
            print(f"\r{self.line(step, steps)}   ", end="", file=sys.stderr, flush=True)
        elif step == steps:
            print(self.line(step, steps), file=sys.stderr, flush=True)


def format_seconds(seconds: float) -> str:
    """"3m07s" for 187.4 seconds."""
    minutes, seconds = divmod(int(max(seconds, 0)), 60)
    return f"{minutes}m{seconds:02d}s"
