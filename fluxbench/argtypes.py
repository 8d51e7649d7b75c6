"""Argument types of the command lines (``fluxbench demo``, the tools): bad values are usage errors.

Each is an ``argparse`` ``type=``: it returns the parsed value or raises
``argparse.ArgumentTypeError``, which argparse reports as ``error: argument --name: ...``
with the usage line and exit status 2 (not a traceback).

    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="demo")
    >>> _ = parser.add_argument("--steps", type=positive_int(1))
    >>> parser.parse_args(["--steps", "3"]).steps
    3
"""

from __future__ import annotations

import argparse

import torch

__all__ = ["positive_int", "positive_float", "device_arg"]


def positive_int(minimum: int = 1):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def device_arg(text: str) -> torch.device:
    """An argparse type: a torch device that exists on this machine (cpu, cuda, cuda:1, ...)."""
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    return dev
