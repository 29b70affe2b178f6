"""infra/files.py's temporaries.

- A temporary is `NAME.<host>.<pid>.tmp`.
- `remove_stale_temporaries` removes, next to the file it is about to write, the temporaries of
  this host's processes that are gone; another host's, a live process's, this process's own and
  every name that is not one of ours are left alone.
"""

import os
import subprocess
from pathlib import Path

from infra import files


def dead_pid() -> int:
    """The id of a process that has ended (and been waited for)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# The names of temporaries


def test_a_temporary_is_named_after_its_file_this_host_and_this_process(monkeypatch):
    monkeypatch.setattr(files.socket, "gethostname", lambda: "node 7.cluster_a/\u00fc")
    path = Path("/somewhere/index.json")
    assert files.temporary_path(path) == path.with_name(f"index.json.node-7-cluster-a--.{os.getpid()}.tmp")


# ---------------------------------------------------------------------------------------------
# Removing the temporaries of processes that are gone


def test_names_that_are_not_ours_are_left_alone_and_huge_ids_are_no_traceback(tmp_path):
    """The hostile names of the review: a process id of 20 digits (OverflowError in os.kill before),
    Unicode digits of a dead process (int() reads them), a leading zero, 0."""
    gone, host = dead_pid(), files.host_name()
    arabic = "".join(chr(0x660 + int(digit)) for digit in str(gone))
    path = tmp_path / "x.gif.state.pt"
    hostile = ["x.gif.state.pt.99999999999999999999.tmp", f"x.gif.state.pt.{host}.99999999999999999999.tmp",
               f"x.gif.state.pt.{arabic}.tmp", f"x.gif.state.pt.{host}.{arabic}.tmp", f"x.gif.state.pt.0{gone}.tmp",
               "x.gif.state.pt.0.tmp", f"x.gif.state.pt.{host}.0.tmp", f"x.gif.state.pt.{gone}.tmp.bak",
               f"x.gif.state.pt.{host}x.{gone}.tmp.bak", f"x.gif.state.pt.{host}_.{gone}.tmp"]
    for name in hostile:
        (tmp_path / name).write_bytes(b"x")
    files.remove_stale_temporaries(path)
    assert names(tmp_path) == sorted(hostile)
    assert files.process_alive(10 ** 20) and files.process_alive(2 ** 64)  # a number no process has: no OverflowError


def test_only_this_hosts_dead_processes_temporaries_are_removed(tmp_path, monkeypatch):
    """Over a shared file system another machine's process ids mean nothing here; this process's own
    temporary may be in use (another thread writing the same file)."""
    monkeypatch.setattr(files.socket, "gethostname", lambda: "node-1.cluster")
    gone, alive = dead_pid(), os.getppid()
    path = tmp_path / "prepare.json"
    ours = [f"prepare.json.node-1-cluster.{gone}.tmp", f"prepare.json.{gone}.tmp"]  # the second: before the host
    kept = [f"prepare.json.node-2-cluster.{gone}.tmp", f"prepare.json.node-1-cluster.{alive}.tmp",
            f"prepare.json.node-1-cluster.{os.getpid()}.tmp", f"prepare.json.node-1.{gone}.tmp",
            f"prepare.json.{alive}.tmp"]
    for name in ours + kept:
        (tmp_path / name).write_bytes(b"x")
    files.remove_stale_temporaries(path)
    assert names(tmp_path) == sorted(kept)
    assert not files.process_alive(gone) and files.process_alive(alive)
