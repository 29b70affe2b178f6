"""What every command line shares; the standard library only, so that `--help` and option errors
answer before torch is imported.
"""

import argparse
import math
import types
import typing


class OneLineParser(argparse.ArgumentParser):
    """argparse for every script: a usage error is one line (`error: ...`, exit status 2), not the
    whole usage."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def option_name(name: str) -> str:
    """A setting's command-line option: "context_frames" -> "--context-frames"."""
    return "--" + name.replace("_", "-")


def of_type(value, annotation) -> bool:
    """Whether `value` is of the annotation (`int`, `float`, `str`, `bool`, another class, or a union
    such as `X | None`): an int is a float too, a bool is nothing but a bool."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if isinstance(value, bool):
        return bool in options
    return any(value is None if option is type(None) else isinstance(value, (int, float) if option is float else option)
               for option in options)


def without_nan(value):
    """A copy of nested dicts of numbers with NaN as None (null in JSON)."""
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


DEVICE_KINDS = ("cpu", "cuda", "mps")


def check_device_name(device: str | None) -> None:
    """ValueError unless `device` is a device name torch knows (availability is checked later)."""
    if device is None:
        return
    kind, _, index = device.partition(":")
    if kind not in DEVICE_KINDS or (index and not (kind == "cuda" and index.isdigit())):
        raise ValueError(f"--device {device!r}: expected one of cpu, cuda, cuda:N, mps")


def on_off(text: str) -> bool:
    """An on|off option's value (argparse type)."""
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"give on or off, not {text!r}")
    return text == "on"
