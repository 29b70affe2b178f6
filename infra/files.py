"""Durable writes and the small file helpers every script shares; torch-free.

- `fsync`, `fsync_tree`: put a file, a folder's names, or a whole tree on disk.
- `naming`: an OSError (or safetensors' I/O error) raised inside names the file being written.
- `atomic_file`: write a file whole or not at all, even across a crash, a power loss or a full disk;
  `remove_stale_temporaries`: what it (or an earlier version) left behind in processes that were
  killed; `temporary_of`: whether a file name is one of those.
- `read_json_object`, `listing`: a JSON object read with its path in every error; "3 missing keys: a, b, c".
"""

import json
import os
import re
import socket
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NamedTuple

from safetensors import SafetensorError  # the Rust extension only, not torch


def fsync(path) -> None:
    """Flush one file or folder (its list of names) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder) -> None:
    """Flush every file and folder under `folder`, `folder` itself and its parent (which holds its
    name) to disk: what was written there then survives a crash or a power loss."""
    folder = Path(folder)
    for path in [*folder.rglob("*"), folder, folder.parent]:
        fsync(path)


@contextmanager
def naming(path, always: bool = False):
    """Raise an OSError from inside again naming `path`. One that names a file already keeps that
    name (a file inside a folder being written, a caller's own file) unless `always`: then it names
    `path` whatever file failed (a hidden temporary that the user never gave: `atomic_file`,
    infra/video_io.py). An error marked `from_caller` (a callback's, about its own file) passes
    as it is. safetensors reports an I/O error as a SafetensorError ending in "(os error N)", which
    becomes an OSError of errno N naming `path`."""
    try:
        yield path
    except OSError as error:
        if getattr(error, "from_caller", False):
            raise
        named = error.filename if error.filename and not always else str(path)
        raise OSError(error.errno, error.strerror or str(error), named) from error
    except SafetensorError as error:
        if not (match := re.search(r"\(os error (\d+)\)", str(error))):
            raise
        raise OSError(int(match[1]), os.strerror(int(match[1])), str(path)) from error


# A process id as our file names write it: ASCII digits, no leading zero, at most 9 of them (Linux's
# largest is 4194304). A name with anything else in its place (Unicode digits, 20 digits) is not ours.
PROCESS_ID = r"[1-9][0-9]{0,8}"


def process_alive(pid: int) -> bool:
    """Whether process `pid` may be running on this machine (signal 0 checks without sending
    anything; another user's runs too). A number that no process has (0 or less, which would
    signal a process group, or too large for an id) counts as running: what is named with it is
    not ours to remove."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def host_name() -> str:
    """This machine's name as temporaries carry it: [A-Za-z0-9-] only (any other character becomes
    "-"), at most 63 characters."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def temporary_path(path: Path) -> Path:
    """This process's temporary for `path`: `NAME.<host>.<pid>.tmp` in the same folder (so that the
    rename stays on one file system, and two processes writing the same file never share one: under
    torchrun, on several machines over a shared file system, in containers whose pids collide)."""
    return path.with_name(f"{path.name}.{host_name()}.{os.getpid()}.tmp")


class Temporary(NamedTuple):
    """What a temporary's name says: its host (None: a name from before the host was in it) and
    its process id (None: the fixed `NAME.tmp` of earlier versions)."""
    host: str | None
    pid: int | None


def temporary_of(name: str, candidate: str) -> Temporary | None:
    """Whether the file name `candidate` is a temporary of a file named `name`: `NAME.<host>.<pid>.tmp`
    (`temporary_path`), or as earlier versions named them, `NAME.<pid>.tmp`, prepare_data's
    `NAME.tmp-<pid>` and training's `NAME.tmp`. Its Temporary, or None for any other name (a process
    id not written as ours are, `PROCESS_ID`, included)."""
    match = re.fullmatch(re.escape(name) + rf"\.(?:(?:(?P<host>[A-Za-z0-9-]{{1,63}})\.)?(?P<pid>{PROCESS_ID})\.tmp"
                                           rf"|tmp-(?P<old>{PROCESS_ID})|tmp)", candidate)
    if match is None:
        return None
    pid = match["pid"] or match["old"]
    return Temporary(match["host"], int(pid) if pid else None)


def remove_stale_temporaries(path) -> None:
    """Remove the temporaries of `path` (`temporary_of`, files only) that a killed process left:
    those of this host (another machine's pids mean nothing here) or without a host (earlier
    versions') whose process is gone, and the fixed `NAME.tmp` of earlier versions. This process's
    own pid counts as running (another thread may be writing `path`; a temporary left by an earlier
    process of the same id is overwritten by ours). Nothing else next to `path` is touched."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    here = host_name()
    with os.scandir(path.parent) as entries:
        for entry in entries:
            temporary = temporary_of(path.name, entry.name) if entry.name.startswith(path.name + ".") else None
            if temporary is None or temporary.host not in (None, here) or not entry.is_file(follow_symlinks=False):
                continue
            if temporary.pid is None or (temporary.pid != os.getpid() and not process_alive(temporary.pid)):
                Path(entry.path).unlink(missing_ok=True)


@contextmanager
def atomic_file(path):
    """Open `temporary_path(path)` for binary writing and yield the file; when the body is done,
    flush and fsync it, rename it to `path` and fsync the folder (the rename, durable). A crash, a
    kill or a full disk leaves the old file or the new one, never part of one; an error removes the
    temporary and is an OSError naming `path`, never the temporary (`naming`), and the temporaries
    of killed processes go at the next write (`remove_stale_temporaries`). A writer that takes a path rather than a
    file writes to `file.name`: the fsync of `file` puts its bytes on disk all the same."""
    path = Path(path)
    remove_stale_temporaries(path)
    temporary = temporary_path(path)
    try:
        with naming(path, always=True), open(temporary, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
            os.replace(temporary, path)
            fsync(path.parent)
    finally:
        with suppress(OSError):  # a failure to remove it must not hide the error that stopped the write
            temporary.unlink(missing_ok=True)


def read_json_object(path) -> dict:
    """A JSON object from a file; ValueError naming the file if it is missing, unreadable, not JSON
    or not an object."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    try:
        values = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"{path} cannot be read ({error.strerror or error})") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); is it truncated?") from error
    except (RecursionError, ValueError) as error:  # nested too deeply; an integer of too many digits
        raise ValueError(f"{path} is not JSON this program reads ({type(error).__name__}): "
                         "nested too deeply or a number too long") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a JSON {type(values).__name__}, expected an object")
    return values


def listing(what: str, names: list[str], shown: int) -> str:
    """"2 missing keys: a, b": the count, then the first `shown` of `names` in their order."""
    return f"{len(names)} {what}: " + ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def check_not_an_input(option: str, output, inputs: list[tuple[str, object]]) -> None:
    """ValueError, naming both options, if the output (a file or folder a command writes) is one of
    its inputs, holds one, or lies inside one (a model folder, say), links resolved.

    option: the output's option ("--out"); inputs: (option, path) pairs, None paths skipped.
    """
    target = os.path.realpath(output)
    for name, path in inputs:
        if path is None:
            continue
        source = os.path.realpath(path)
        inside = os.path.commonpath([target, source]) in (target, source)
        if inside or (os.path.exists(output) and os.path.exists(path) and os.path.samefile(output, path)):
            raise ValueError(f"{option} {output} is {name} {path} (or contains it, or lies inside it): "
                             f"give another {option}, so that the input is not overwritten")


@contextmanager
def writing(option: str, path):
    """An OSError inside (writing `path`, or looking at it) becomes a ValueError naming the option."""
    try:
        yield
    except OSError as error:
        raise ValueError(f"{option} {path} cannot be written ({error.strerror or error})") from None


def check_writable(option: str, path) -> None:
    """ValueError naming the option unless the file `path` can be written, found before any work and
    without changing what is there: a file that exists must be a regular file (not a FIFO that would
    wait for a reader, nor a device) that opens for appending, nothing appended; a new one is made,
    exclusively (never a file that appeared meanwhile), and removed."""
    with writing(option, path):
        if os.path.lexists(path):
            if not os.path.isfile(path):
                raise ValueError(f"{option} {path} is not a regular file: give a file to write")
            with open(path, "ab"):
                pass
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            os.unlink(path)
