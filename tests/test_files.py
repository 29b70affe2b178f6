"""infra/files.py's temporaries.

- `remove_stale_temporaries` removes, next to the file it is about to write, the temporaries of
  processes that are gone; every name that is not one of ours is left alone.
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
# Removing the temporaries of processes that are gone


def test_names_that_are_not_ours_are_left_alone_and_huge_ids_are_no_traceback(tmp_path):
    """The hostile names of the review: a process id of 20 digits (OverflowError in os.kill before),
    Unicode digits of a dead process (int() reads them), a leading zero, 0."""
    gone = dead_pid()
    arabic = "".join(chr(0x660 + int(digit)) for digit in str(gone))
    path = tmp_path / "x.gif.state.pt"
    hostile = ["x.gif.state.pt.99999999999999999999.tmp", f"x.gif.state.pt.{arabic}.tmp",
               f"x.gif.state.pt.0{gone}.tmp", "x.gif.state.pt.0.tmp", f"x.gif.state.pt.{gone}.tmp.bak"]
    for name in hostile:
        (tmp_path / name).write_bytes(b"x")
    files.remove_stale_temporaries(path)
    assert names(tmp_path) == sorted(hostile)
    assert files.process_alive(10 ** 20) and files.process_alive(2 ** 64)  # a number no process has: no OverflowError
