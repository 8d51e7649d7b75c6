"""Atomic checkpoint files for the training loop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "check_resume"]


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` with ``torch.save`` atomically.

    See :func:`fluxbench.fileio.atomic_write`: an interrupted write leaves the previous
    checkpoint intact.

    Args:
        state: a dict of tensors, state dicts and plain Python values.
        path: destination file; its directory is created if needed.

    Returns:
        The destination as a ``Path``.
    """
    return atomic_write(path, lambda fh: torch.save(state, fh), binary=True)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = None) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (``weights_only=True``: no pickled code)."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)


def check_resume(path: str | os.PathLike, saved: dict[str, Any], config: dict[str, Any], *, step: int, steps: int) -> None:
    """Refuse to resume from ``path`` a run that is not the run that wrote it.

    A changed setting would apply from the middle of the run on, silently; so every key of
    ``config`` that the checkpoint's ``saved`` configuration also holds must be equal, and
    the checkpoint's ``step`` must not be past the run's ``steps``.

    Raises:
        ValueError: naming each changed setting (saved and new value), or the step.
    """
    changed = [k for k in config if k in saved and saved[k] != config[k]]
    if changed:
        was = ", ".join(f"{k}={saved[k]!r}" for k in changed)
        now = ", ".join(f"{k}={config[k]!r}" for k in changed)
        raise ValueError(
            f"checkpoint {path} was written with {was} but this run has {now}; a resumed run must use "
            "the same settings (start a fresh run, or another checkpoint path, to change them)"
        )
    if step > steps:
        raise ValueError(f"checkpoint {path} is at step {step}, past steps={steps}")
