"""The training loop and what it keeps: a stage (a module, the parameters of it that require grad, a
loss, AdamW with warm-up and cosine decay), its data-parallel wrapping (DDP, or FSDP2's
`fully_shard`), the exponential moving average of its trained weights, its checkpoints, throughput,
progress lines and Ctrl-C.

Every random draw of a step comes from a generator seeded by (seed, stage, micro-step), the same in
every process; the losses take each process's slice of draws made for the global batch. So a
checkpoint holds no random state, and a run resumed on another number of processes draws what the
uninterrupted run would have drawn.

Checkpoints: one file, OUT/NAME.pt, under DDP or in one process (rank 0 writes the whole state);
a folder, OUT/NAME.dcp, under FSDP: `torch.distributed.checkpoint` writes each process's shards of
the trained weights, their optimiser state and their average as safetensors (no pickle), and
train_state.json holds the step, the schedule and the optimiser's settings. A sharded checkpoint
loads on any number of processes (DCP reshards). Frozen weights are not in it: they come from the
model the run started from.
"""

import json
import math
import os
import pickle
import shutil
import signal
import sys
import threading
import time
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from infra.files import atomic_file, fsync, fsync_tree, naming

AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # TrainConfig.autocast's choices
CHECKPOINT_KEYS = {"step", "module", "optimizer", "schedule"}  # of a NAME.pt (older ones also hold "generators")
SHARDED_STATE = "train_state.json"  # in a NAME.dcp folder: step, schedule and optimiser settings


# Files ------------------------------------------------------------------------------------------


def replace_folder(temporary: Path, folder: Path) -> None:
    """Put the complete folder `temporary` (fsynced) at `folder`. A folder cannot be replaced in one
    rename: the old one goes to NAME.old first, so that a kill between the two leaves it there,
    never a half-written NAME."""
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(temporary, folder)
    fsync(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(path: Path, mmap: bool = False) -> dict | None:
    """A stage's checkpoint, or None when there is none; ValueError naming a file that is not a
    whole checkpoint (truncated, or something else). With `mmap` the tensors stay on disk: a cheap
    check of the file before any work. A sharded checkpoint (a NAME.dcp folder) gives its
    train_state.json, without the tensors."""
    if path.suffix == ".dcp":
        return read_sharded_checkpoint(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except PermissionError:
        raise
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError):  # what torch.load raises for a broken file
        state = None
    if not (isinstance(state, dict) and CHECKPOINT_KEYS <= state.keys()):
        raise ValueError(f"{path} is not a complete checkpoint (truncated or corrupted); move it away to train "
                         f"its stage from the start")
    return state


def read_sharded_checkpoint(path: Path) -> dict | None:
    """train_state.json of a sharded checkpoint folder, or None when there is none; ValueError
    naming a folder without it or without shards."""
    if not path.exists():
        return None
    try:
        state = json.loads((path / SHARDED_STATE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        state = None
    if not (isinstance(state, dict) and {"step", "schedule", "param_groups"} <= state.keys()
            and any(path.glob("*.safetensors"))):
        raise ValueError(f"{path} is not a complete sharded checkpoint; move it away to train its stage from the start")
    return state


# Pieces of a stage ------------------------------------------------------------------------------


class Stopped(Exception):
    """A stage stopped on Ctrl-C after checkpointing; the message says where and how to resume."""


class Diverged(ValueError):
    """A stage stopped at a loss, gradient or weights that are not finite numbers: the weights are
    never written, its last checkpoint (and the model) stay as they were."""


def all_finite(tensors, distributed: bool = False) -> bool:
    """Whether every element of `tensors` is finite; `distributed`: in every process (a sharded
    module's DTensors are checked by their local shards)."""
    flags = [torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all() for t in tensors]
    if not flags:
        return True
    finite = torch.stack(flags).all().int()
    if distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def learning_rate_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then a cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def seeded_generator(*numbers: int) -> torch.Generator:
    """A generator seeded by a tuple of non-negative integers (any size), through numpy's SeedSequence:
    distinct tuples give unrelated streams."""
    state = np.random.SeedSequence(list(numbers)).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def step_generator(seed: int, stage: str, index: int) -> torch.Generator:
    """The generator of every draw of micro-step `index` of `stage`: the same in every process."""
    return seeded_generator(seed, zlib.crc32(stage.encode()), index)


def duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def rates_text(rates: dict) -> str:
    """" | 12.5 samples/s, 50.0 frames/s, MFU 41%" for a step's rates (`Stage.rates`)."""
    if not rates:
        return ""
    text = f" | {rates['samples_per_second']:.3g} samples/s, {rates['frames_per_second']:.3g} frames/s"
    return text + (f", MFU {rates['mfu']:.1%}" if "mfu" in rates else "")


class Progress:
    """A stage's progress: step, loss, learning rate, throughput, time spent and left. In a terminal a
    live line, rewritten every step and kept every `every` steps; otherwise a line every `every` steps."""

    def __init__(self, name: str, first_step: int, steps: int, every: int, stream=None):
        self.name, self.first, self.steps, self.every = name, first_step, steps, every
        self.stream = stream or sys.stdout
        self.live, self.open_line, self.width = self.stream.isatty(), False, 0
        self.started = time.time()

    def update(self, step: int, loss: float, learning_rate: float, rates: dict | None = None) -> None:
        spent = time.time() - self.started
        left = spent / (step - self.first) * (self.steps - step)
        line = (f"{self.name} step {step}/{self.steps} loss {loss:.4f} lr {learning_rate:.2e}{rates_text(rates)} | "
                f"{duration(spent)} spent, {duration(left)} left")
        keep = step % self.every == 0 or step == self.steps
        if self.live:
            self.width = max(self.width, len(line))
            print("\r" + line.ljust(self.width), end="\n" if keep else "", file=self.stream, flush=True)
            self.open_line = not keep
        elif keep:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """End a live line left open (the stage stopped between two kept lines)."""
        if self.open_line:
            print(file=self.stream, flush=True)


@contextmanager
def stop_requests(enabled: bool):
    """While a stage trains, the first Ctrl-C only asks it to stop after the step in progress (the
    yielded list gets an entry); a second one interrupts at once. Off under torchrun, whose
    processes would each stop at another step."""
    requests = []
    enabled = enabled and threading.current_thread() is threading.main_thread()

    def request(signum, frame):
        requests.append(signum)
        signal.signal(signal.SIGINT, previous)
        print("\nstopping after this step, with a checkpoint (Ctrl-C again: at once, without)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, request) if enabled else None
    try:
        yield requests
    finally:
        if enabled:
            signal.signal(signal.SIGINT, previous)


class EMA:
    """The exponential moving average of trained weights: after every optimiser step, average <-
    decay * average + (1 - decay) * weight, in float32 (sharded as the weights are, under FSDP)."""

    def __init__(self, weights: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.averages = {name: weight.detach().float().clone() for name, weight in weights.items()}

    @torch.no_grad()
    def update(self, weights: dict[str, torch.Tensor]) -> None:
        for name, weight in weights.items():
            self.averages[name].lerp_(weight.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, weights: dict[str, torch.Tensor]) -> None:
        """Put the averages in the place of the weights."""
        for name, weight in weights.items():
            weight.copy_(self.averages[name])

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.averages.keys():
            raise ValueError("the checkpoint's weight averages are not those of the trained weights")
        for name, average in self.averages.items():
            average.copy_(state[name])


def shard(module: torch.nn.Module, units: list[torch.nn.Module], param_dtype: torch.dtype | None, device) -> None:
    """FSDP2: `fully_shard` each unit, then the whole module, over every process. With `param_dtype`
    the weights are gathered in it for the forward and backward, and gradients are reduced in
    float32; the sharded weights and the optimiser's state stay float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    # The UNet returns a view (unfold_frames); no caller writes into it in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)


@contextmanager
def gathered(module: torch.nn.Module):
    """Under FSDP, every process calls it: in its body the module's weights are whole (in FSDP's
    param dtype) on every process, for methods other than forward to use (sampling's
    `prepare_chunk`), and forward gathers nothing. A module that is not sharded is left as it is."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    module.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not module, recurse=False)  # as fully_shard left them


# The stage --------------------------------------------------------------------------------------


class Stage:
    """One training loop: a module, the parameters of it that require grad, a loss; checkpoints
    out/NAME.pt, or out/NAME.dcp when the module is `sharded` (by `shard`, under torchrun).

    `loss(module, index, generator)` is the loss of micro-step `index`. `ema_decay` > 0 keeps an
    `EMA` of the trained weights. `batch_size` (per process and micro-step), `frames_per_sample`
    and `flops_per_sample` (a forward and backward, counted on the meta device) give the throughput
    and, on a GPU, the model FLOPs utilisation against `config.peak_tflops`."""

    def __init__(self, name, module, loss, steps, learning_rate, config, *, batch_size: int,
                 frames_per_sample: int = 1, sharded: bool = False, ema_decay: float = 0.0,
                 flops_per_sample: int | None = None):
        self.name, self.module, self.loss, self.steps, self.config = name, module, loss, steps, config
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        self.sharded = sharded
        self.trained = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.parameters = list(self.trained.values())
        self.path = Path(config.out) / f"{name}.{'dcp' if self.sharded else 'pt'}"
        self.optimizer = torch.optim.AdamW(self.parameters, lr=learning_rate, weight_decay=config.weight_decay)
        factor = lambda step: learning_rate_factor(step, config.warmup_steps, steps)  # noqa: E731
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.ema = EMA(self.trained, ema_decay) if ema_decay > 0 else None
        self.batch_size, self.frames_per_sample, self.flops_per_sample = batch_size, frames_per_sample, flops_per_sample
        self.step = 0
        self.saved_step = None  # the step of the checkpoint in self.path, once one is loaded or written
        self.wrapped = module
        if self.distributed and not self.sharded:
            self.wrapped = DistributedDataParallel(module, find_unused_parameters=True, gradient_as_bucket_view=True)

    # Checkpoints

    def weights_and_averages(self) -> list[torch.Tensor]:
        return [*self.trained.values(), *(self.ema.averages.values() if self.ema is not None else ())]

    def diverged(self, step: int, what: str) -> Diverged:
        """The one line of a stage stopped in `step` because `what`."""
        kept = (f"{self.path} keeps step {self.saved_step}" if self.saved_step is not None
                else f"no checkpoint of the {self.name} stage was written")
        return Diverged(f"{self.name} step {step}/{self.steps}: {what}; training stopped without writing them: "
                        f"{kept} and the model is not written. Damaged data (a file changed after it was prepared) "
                        f"or too high a learning rate do this")

    def check_finite(self, loss: float, gradient_norm: float) -> None:
        """Diverged, naming the step in progress, if its loss or gradient norm is not finite: the
        weights it made are never written (no checkpoint, no model follows)."""
        if not math.isfinite(loss):
            raise self.diverged(self.step + 1, f"the loss is {loss}, not a finite number")
        if not math.isfinite(gradient_norm):
            raise self.diverged(self.step + 1, f"the gradient norm is {gradient_norm}, not a finite number (the loss "
                                               f"{loss:.4g})")

    def save(self) -> None:
        """Every process calls it. One file: rank 0 writes it atomically (`atomic_file`). Sharded:
        every process writes its shards into NAME.dcp.tmp, then rank 0 adds train_state.json and puts
        the folder in the place of the old one (`replace_folder`). Weights (or averages) that are
        not finite are never written: Diverged, the last checkpoint kept."""
        if not all_finite(self.weights_and_averages(), self.sharded):
            raise self.diverged(self.step, "the trained weights (or their average) are not all finite numbers")
        if self.sharded:
            self.save_sharded()
        elif self.rank == 0:
            state = {"step": self.step, "module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "schedule": self.schedule.state_dict()}
            if self.ema is not None:
                state["ema"] = self.ema.averages
            with atomic_file(self.path) as file:
                torch.save(state, file)
        self.saved_step = self.step

    def sharded_state(self) -> tuple[dict, list]:
        """What DCP saves: the trained weights, their optimiser state and their averages (DTensors,
        keyed by parameter name; a weight that has had no gradient yet has no optimiser state); and
        the optimiser's param_groups."""
        optimizer = {name: dict(self.optimizer.state[p]) for name, p in self.trained.items() if p in self.optimizer.state}
        state = {"model": dict(self.trained), "optimizer": optimizer}
        if self.ema is not None:
            state["ema"] = self.ema.averages
        return state, self.optimizer.state_dict()["param_groups"]

    def save_sharded(self) -> None:
        import torch.distributed.checkpoint as dcp

        temporary = self.path.with_name(self.path.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)  # left by a save that was killed
        dist.barrier()
        tensors, param_groups = self.sharded_state()
        with naming(self.path):
            dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(temporary), save_distributed=True))
        if self.rank == 0:
            try:
                state = {"step": self.step, "schedule": self.schedule.state_dict(), "param_groups": param_groups}
                with atomic_file(temporary / SHARDED_STATE) as file:
                    file.write((json.dumps(state, indent=1) + "\n").encode())
                with naming(self.path):
                    fsync_tree(temporary)
                    replace_folder(temporary, self.path)
            finally:
                shutil.rmtree(temporary, ignore_errors=True)
        dist.barrier()

    def load(self) -> None:
        """Continue from the checkpoint, if there is one (each process reads the same file, or its
        part of the shards)."""
        state = read_checkpoint(self.path)
        if state is None:
            return
        if self.sharded:
            self.load_sharded(state)
            return
        try:
            self.module.load_state_dict(state["module"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:  # another model's, or damaged
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{self.path} does not fit this run's model ({message}); it is another model's or "
                             f"damaged: move it away to train its stage from the start") from None
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError(f"{self.path} holds no weight averages (--ema-decay)")
            self.ema.load_state_dict(state["ema"])
        if not all_finite(self.weights_and_averages()):
            raise ValueError(f"{self.path} holds weights that are not finite numbers (a run that diverged before "
                             f"train.py checked for it): move it away to train its stage from the start")
        self.step = self.saved_step = state["step"]

    def load_sharded(self, saved: dict) -> None:
        """Load a sharded checkpoint in place: into the weights and averages, and into optimiser
        state made for the entries the checkpoint holds (sharded as their weights), which then
        becomes the optimiser's."""
        import torch.distributed.checkpoint as dcp

        try:
            stored = dcp.HuggingFaceStorageReader(str(self.path)).read_metadata().state_dict_metadata
            optimizer = {}
            for name, weight in self.trained.items():
                prefix = f"optimizer.{name}."
                entries = {key[len(prefix):]: stored[key] for key in stored
                           if key.startswith(prefix) and "." not in key[len(prefix):]}
                optimizer[name] = {key: torch.zeros_like(weight) if tuple(entry.size) == tuple(weight.shape) and key != "step"
                                   else torch.zeros(entry.size, dtype=entry.properties.dtype)
                                   for key, entry in entries.items()}
            tensors = {"model": dict(self.trained), "optimizer": {k: v for k, v in optimizer.items() if v}}
            if self.ema is not None:
                tensors["ema"] = self.ema.averages
            dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(self.path)))
        except Exception as error:  # DCP wraps every rank's failure (a missing shard, a missing key)
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{self.path} cannot be loaded into this run ({message}); move it away to train its "
                             f"stage from the start") from error
        index = {name: position for position, name in enumerate(self.trained)}  # the optimiser's order
        self.optimizer.load_state_dict({"state": {index[name]: values for name, values in tensors["optimizer"].items()},
                                        "param_groups": saved["param_groups"]})
        self.schedule.load_state_dict(saved["schedule"])
        if not all_finite(self.weights_and_averages(), distributed=True):
            raise ValueError(f"{self.path} holds weights that are not finite numbers (a run that diverged before "
                             f"train.py checked for it): move it away to train its stage from the start")
        self.step = self.saved_step = saved["step"]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every process calls it: the module's whole state on the CPU, on rank 0 ({} elsewhere
        under FSDP)."""
        if not self.sharded:
            return {name: value.cpu() for name, value in self.module.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    # The loop

    def mean_over_processes(self, value: torch.Tensor) -> float:
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value.item()

    def rates(self, seconds: float) -> dict:
        """Samples and frames per second over every process, and (on a GPU) the model FLOPs
        utilisation of a process."""
        samples = self.batch_size * self.config.gradient_accumulation
        rates = {"samples_per_second": samples * self.world_size / seconds,
                 "frames_per_second": samples * self.world_size * self.frames_per_sample / seconds}
        if self.flops_per_sample and self.parameters[0].device.type == "cuda":
            rates["mfu"] = self.flops_per_sample * samples / seconds / (self.config.peak_tflops * 1e12)
        return rates

    def run(self, on_step=None) -> None:
        """Train from the current step to the last, logging, calling `on_step(stage)` and
        checkpointing. Ctrl-C (one process) stops it after the step in progress, with a checkpoint:
        Stopped."""
        config = self.config
        autocast = AUTOCAST_DTYPES[config.autocast]
        device = self.parameters[0].device
        accumulation = config.gradient_accumulation
        progress = Progress(self.name, self.step, self.steps, config.log_every)
        with stop_requests(enabled=not self.distributed) as stop:
            try:
                while self.step < self.steps:
                    started = time.perf_counter()
                    self.optimizer.zero_grad(set_to_none=True)
                    total = torch.zeros((), device=device)
                    for micro in range(accumulation):
                        index = self.step * accumulation + micro
                        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                            loss = self.loss(self.wrapped, index, step_generator(config.seed, self.name, index))
                        (loss / accumulation).backward()
                        total += loss.detach().float() / accumulation
                    norm = torch.nn.utils.clip_grad_norm_(self.parameters, config.grad_clip)
                    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
                    self.optimizer.step()
                    self.schedule.step()
                    if self.ema is not None:
                        self.ema.update(self.trained)
                    loss_value = self.mean_over_processes(total)  # the same in every process
                    self.check_finite(loss_value, norm.item())  # the gradients are averaged (DDP) or reduced (FSDP)
                    self.step += 1
                    rates = self.rates(time.perf_counter() - started)
                    if self.rank == 0:
                        progress.update(self.step, loss_value, log_step(self, loss_value, rates), rates)
                    if on_step is not None:
                        on_step(self)
                    if stop or self.step % config.checkpoint_every == 0 or self.step == self.steps:
                        self.save()
                    if stop:
                        raise Stopped(f"stopped at {self.name} step {self.step}/{self.steps}, saved in {self.path}; "
                                      f"run the same command to resume")
            finally:
                progress.close()


def append_log(out, record: dict) -> None:
    """One JSON line in out/log.jsonl."""
    path = Path(out) / "log.jsonl"
    with naming(path), open(path, "a") as log:
        log.write(json.dumps(record) + "\n")


def log_step(stage: Stage, loss: float, rates: dict) -> float:
    """Append the step's loss (the mean over processes), learning rate and throughput to
    out/log.jsonl; returns the learning rate."""
    record = {"stage": stage.name, "step": stage.step, "loss": loss, "lr": stage.schedule.get_last_lr()[0], **rates}
    append_log(stage.config.out, record)
    return record["lr"]
