"""Validation shared by the metrics (private)."""

from __future__ import annotations

import torch
from torch import Tensor

from fluxbench._checks import check_points, check_same_space

__all__ = ["flatten_samples", "check_pair", "check_directions"]


def flatten_samples(x: object, y: object) -> tuple[object, object]:
    """Samples of shape (N, *event_shape) and (M, *event_shape) as (N, D) and (M, D) point clouds.

    ``D = prod(event_shape)``: an image sample (N, C, H, W) is compared as N points in
    R^{C H W}. Both samples must have the same event shape (a (N, 3, 8, 8) sample and a
    (M, 3, 4, 16) one have the same D but are not of the same space). Anything that is not
    a tensor of at least 3 dimensions is returned as it is, for :func:`check_pair` to judge.
    """
    if isinstance(x, Tensor) and isinstance(y, Tensor) and max(x.ndim, y.ndim) > 2 and x.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"x has event shape {tuple(x.shape[1:])} but y has event shape {tuple(y.shape[1:])}; "
            "both samples must be of shape (N, *event_shape) with the same event_shape"
        )
    # flatten(1), not reshape(N, -1): an empty batch (0, C, H, W) has no -1 to infer
    return tuple(t.flatten(1) if isinstance(t, Tensor) and t.ndim > 2 else t for t in (x, y))  # type: ignore[return-value]


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
