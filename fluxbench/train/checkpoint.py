"""Atomic checkpoint files for the training loop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` with ``torch.save`` atomically.

    See :func:`fluxbench._io.atomic_write`: an interrupted write leaves the previous
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
