"""The command lines answer --help and option errors before torch (seconds to import) is loaded."""

import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
PROBE = """
import sys
import {module}
try:
    {module}.main({argv!r})
except SystemExit:
    pass
except ValueError as error:
    print("error:", error)
print("torch imported:", "torch" in sys.modules)
"""


def probe(module: str, argv: list[str]) -> str:
    command = [sys.executable, "-c", PROBE.format(module=module, argv=argv)]
    return subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("argv", [["--help"], ["--prompt", "a", "--guidance", "nan"], ["--prompt", "a@-1s"],
                                  ["--prompt", "a", "--seed", "-1"], ["--prompt", "a", "--threads", "0"]])
def test_sample_answers_without_importing_torch(argv):
    output = probe("sample", argv)
    assert output.endswith("torch imported: False\n")
    if argv != ["--help"]:
        assert output.startswith("error: --")


def test_an_option_error_is_one_line_without_a_traceback():
    result = subprocess.run([sys.executable, "sample.py", "--prompt", "a", "--guidance", "inf"], cwd=REPOSITORY,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == "error: --guidance must be a finite number at least 0, got inf\n"


@pytest.mark.parametrize("script", ["sample.py", "evaluate.py", "train.py", "tools/prepare_data.py", "convert_weights.py",
                                    "tools/bench.py"])
def test_a_usage_error_is_one_line_naming_the_option(script):
    """argparse's own refusals (an unknown option, a choice not offered) print one line, not the usage."""
    for argv in (["--no-such-option"], ["--dtype", "fp64"]):
        result = subprocess.run([sys.executable, script, *argv], cwd=REPOSITORY, capture_output=True, text=True)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
        if argv == ["--dtype", "fp64"]:
            assert "--dtype" in result.stderr
