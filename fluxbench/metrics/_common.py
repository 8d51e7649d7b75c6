"""Validation shared by the metrics (private)."""

from __future__ import annotations

import torch
from torch import Tensor

from fluxbench._checks import check_points, check_same_space

__all__ = ["check_pair", "check_directions"]


def check_pair(x: object, y: object, *, min_points: int = 1) -> tuple[Tensor, Tensor]:
    """Check two (N, d), (M, d) finite point clouds with the same d, dtype and device."""
    check_points(x, "x")
    check_points(y, "y")
    assert isinstance(x, Tensor) and isinstance(y, Tensor)
    check_same_space(x, y, "x", "y")
    for name, t in (("x", x), ("y", y)):
        if t.shape[0] < min_points:
            raise ValueError(f"{name} has {t.shape[0]} points; this estimate needs at least {min_points}")
    return x, y


def check_directions(directions: object, d: int, *, like: Tensor) -> Tensor:
    """Check a (K, d) tensor of nonzero finite directions; return it row-normalised.

    The result has ``like``'s dtype and device.
    """
    check_points(directions, "directions", dim=d)
    assert isinstance(directions, Tensor)
    if directions.device != like.device:
        raise ValueError(f"directions is on device {directions.device} but the inputs are on {like.device}")
    u = directions.to(like.dtype)
    norms = torch.linalg.vector_norm(u, dim=1, keepdim=True)
    if not bool((norms > 0).all()):
        raise ValueError("directions contains a zero row; every direction must be nonzero")
    return u / norms
