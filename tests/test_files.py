"""infra/files.py's temporaries and errors, and infra/run_state.resolve_device.

- A temporary is `NAME.<host>.<pid>.tmp`; `temporary_of` also knows the names earlier versions
  wrote (`NAME.<pid>.tmp`, prepare_data's `NAME.tmp-<pid>`, training's fixed `NAME.tmp`), and
  nothing else: prepare_data's "holds other files" check and `remove_stale_temporaries` both use it.
- `remove_stale_temporaries` removes, next to the file it is about to write and under those names
  only, the files of this host's processes that are gone (and earlier versions' `NAME.tmp`);
  another host's, a live process's, this process's own, a folder and every name that is not one
  of ours are left alone.
- An error inside `atomic_file` names the file being written, not its temporary (`naming` with
  `always`).
- `resolve_device` maps "cuda" to cuda:LOCAL_RANK before it checks that the GPU is there.
"""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infra import files
from infra.run_state import resolve_device
from tools import prepare_data

ROOT = Path(__file__).resolve().parents[1]


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
    assert files.temporary_of("index.json", files.temporary_path(path).name) == ("node-7-cluster-a--", os.getpid())


@pytest.mark.parametrize("name, expected", [
    ("prepare.json.vm.123.tmp", ("vm", 123)),
    ("prepare.json.a-b-9.123456789.tmp", ("a-b-9", 123456789)),
    ("prepare.json.123.tmp", (None, 123)),  # before the host was in the name
    ("prepare.json.tmp-123", (None, 123)),  # prepare_data before infra/files.py
    ("prepare.json.tmp", (None, None)),  # training's atomic_file before infra/files.py
    ("prepare.json", None),
    ("prepare.json.bak", None),
    ("prepare.jsonx.vm.123.tmp", None),
    ("other.json.vm.123.tmp", None),
    ("prepare.json.tmp-", None),
    ("prepare.json.tmp-12x", None),
    ("prepare.json.tmp-123.tmp", None),
    ("prepare.json.vm.1234567890.tmp", None),  # no process id has 10 digits
    ("prepare.json.vm.99999999999999999999.tmp", None),
    ("prepare.json.vm.0.tmp", None),
    ("prepare.json.vm.0123.tmp", None),  # we never write a leading zero
    ("prepare.json.vm.\u0661\u0662\u0663.tmp", None),  # Arabic-Indic digits: str.isdigit() says yes
    ("prepare.json.tmp-\u0661\u0662\u0663", None),
    ("prepare.json.v_m.123.tmp", None),
    ("prepare.json.vm.123.tmp\n", None),
    ("prepare.json..123.tmp", None),
])
def test_temporary_of_knows_our_names_only(name, expected):
    assert files.temporary_of("prepare.json", name) == expected


def test_a_preparation_killed_while_writing_its_first_prepare_json_can_start_again(tmp_path):
    """A kill during the first write of prepare.json leaves its temporary: the folder is still one to
    start in (not "holds other files"); any other file still makes it refused."""
    model, data, out = tmp_path / "model", tmp_path / "videos", tmp_path / "shards"
    model.mkdir(), data.mkdir(), out.mkdir()
    (model / "config.json").write_text('{"vae": {"block_out_channels": [4, 8]}}')
    killed = subprocess.run([sys.executable, "-c", "import os, sys\nfrom infra.files import atomic_file\n"
                             f"with atomic_file({str(out / 'prepare.json')!r}) as file:\n"
                             "    file.write(b'{')\n    file.flush()\n    os.kill(os.getpid(), 9)"], cwd=ROOT)
    assert killed.returncode == -9 and len(names(out)) == 1  # the temporary, of this host and a dead pid
    arguments = ["--model", str(model), "--data", str(data), "--out", str(out), "--size", "16"]
    for left in ("prepare.json.tmp-1234", "prepare.json.tmp", f"prepare.json.{dead_pid()}.tmp"):
        (out / left).write_bytes(b"{")  # what earlier versions leave
        prepare_data.parse_arguments(arguments)
    (out / "prepare.json.bak").write_bytes(b"mine")
    with pytest.raises(ValueError, match="holds other files"):
        prepare_data.parse_arguments(arguments)


# ---------------------------------------------------------------------------------------------
# Removing the temporaries of processes that are gone


def test_the_temporaries_of_earlier_versions_are_removed_when_their_file_is_written(tmp_path):
    gone, alive = dead_pid(), os.getppid()
    path = tmp_path / "index.json"
    for name in ("index.json.tmp", f"index.json.tmp-{gone}", f"index.json.{gone}.tmp",
                 f"index.json.tmp-{alive}", f"index.json.{alive}.tmp",  # a live process's
                 f"other.json.tmp-{gone}", "other.json.tmp", f"index.json.tmp-{gone}x", "index.json.tmpx",
                 "index.json.tmp.bak", f"index.jsonx.tmp-{gone}"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "model.tmp").mkdir()  # a folder of that form is not one of atomic_file's: never removed
    with files.atomic_file(path) as file:
        file.write(b"{}")
    files.remove_stale_temporaries(tmp_path / "model")
    assert names(tmp_path) == sorted(["index.json", f"index.json.tmp-{alive}", f"index.json.{alive}.tmp",
                                      f"other.json.tmp-{gone}", "other.json.tmp", f"index.json.tmp-{gone}x",
                                      "index.json.tmpx", "index.json.tmp.bak", f"index.jsonx.tmp-{gone}", "model.tmp"])
    assert path.read_bytes() == b"{}"


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


# ---------------------------------------------------------------------------------------------
# Errors name the file the user knows


def test_an_error_in_atomic_file_names_the_file_not_its_temporary(tmp_path):
    """A name that fits but whose temporary's does not (255 bytes a name): the error names the file."""
    path = tmp_path / ("a" * 248 + ".json")  # 253 bytes
    with pytest.raises(OSError) as error:
        with files.atomic_file(path) as file:
            file.write(b"{}")
    assert error.value.errno == errno.ENAMETOOLONG and error.value.filename == str(path)
    assert not list(tmp_path.iterdir())


def test_naming_keeps_a_files_name_unless_always_and_a_callers_error_as_it_is(tmp_path):
    def failing(name, from_caller=False):
        error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        if from_caller:
            error.from_caller = True
        raise error
    for always, inner, named in ((False, None, "out"), (False, "out/inside", "out/inside"), (True, ".out.1.partial", "out")):
        with pytest.raises(OSError) as error:
            with files.naming("out", always=always):
                failing(inner)
        assert (error.value.errno, error.value.filename) == (errno.ENOSPC, named)
    with pytest.raises(OSError) as error:
        with files.naming("out", always=True):
            failing("state.pt", from_caller=True)
    assert error.value.filename == "state.pt"


# ---------------------------------------------------------------------------------------------
# resolve_device


@pytest.fixture
def one_gpu(monkeypatch):
    """torch sees one CUDA GPU (none is touched: resolve_device only counts)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return monkeypatch


def test_cuda_under_torchrun_is_the_process_own_gpu_checked_after_mapping(one_gpu):
    assert resolve_device("cuda") == "cuda" and resolve_device("auto") == "cuda"
    one_gpu.setenv("LOCAL_RANK", "0")
    assert resolve_device("cuda") == "cuda:0" and resolve_device(None) == "cuda:0"
    assert resolve_device("cuda:0") == "cuda:0" and resolve_device("cpu") == "cpu"
    one_gpu.setenv("LOCAL_RANK", "3")
    for name in ("cuda", "auto"):
        with pytest.raises(ValueError, match=r"^--device \w+ under LOCAL_RANK=3 is cuda:3: this machine has 1 CUDA GPU"):
            resolve_device(name)
    assert resolve_device("cuda:0") == "cuda:0"  # an explicit index is taken as given


@pytest.mark.parametrize("name, rank, message", [
    ("cuda", "x", "LOCAL_RANK='x' is not a GPU index"),
    ("cuda", "-1", "LOCAL_RANK='-1' is not a GPU index"),
    ("cuda", "99999999999999999999", "this machine has 1 CUDA GPU"),
    ("cuda:x", None, "--device 'cuda:x': expected cpu, cuda, cuda:N"),
    ("cuda:-1", None, "--device 'cuda:-1': expected"),
    ("cuda:\u0661", None, "--device 'cuda:\u0661': expected"),
    ("cuda:1", None, "--device cuda:1: this machine has 1 CUDA GPU"),
])
def test_a_device_that_is_not_there_is_one_line_naming_it(one_gpu, name, rank, message):
    if rank is not None:
        one_gpu.setenv("LOCAL_RANK", rank)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as error:
        resolve_device(name)
    assert "\n" not in str(error.value)


def test_json_nested_too_deeply_or_with_huge_numbers_is_one_line_naming_the_file(tmp_path):
    from infra.files import read_json_object

    for name, text in (("deep.json", "[" * 100_000 + "]" * 100_000), ("long.json", '{"a": ' + "9" * 5000 + "}")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"{name} is not JSON this program reads"):
            read_json_object(tmp_path / name)
