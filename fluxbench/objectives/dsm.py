"""Denoising score matching, the baseline (SPEC section 2, "DSM baseline")."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import check_field_output, check_generator, check_points, check_sigma
from .._random import normal
from .batch_score import batch_score

__all__ = ["dsm_loss"]


def dsm_loss(
    field: Callable[[Tensor], Tensor],
    x: Tensor,
    sigma: float | Tensor,
    *,
    target: str = "plain",
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample denoising score matching loss |f(x0) - s_target|^2, x0 = x + sigma xi.

    Targets (SPEC section 2):

    * ``"plain"``: s_target = -(x0 - x) / sigma^2 = -xi / sigma (Vincent 2011);
    * ``"batch"``: the batch-posterior score s_hat(x0) of SPEC eq. (5), a lower-variance
      target with the same minimiser as B grows.

    The field must be queried with the same sigma convention at sampling time (sigma a
    standard deviation, the field approximating grad log (p * N(0, sigma^2 I))).

    Args:
        field: (B, d) -> (B, d), e.g. ``at_sigma(model, sigma)``.
        x: (B, d) data batch.
        sigma: one noise level (standard deviation), > 0.
        target: ``"plain"`` or ``"batch"``.
        chunk_size: for the batch target's pairwise pass.
        generator: the source of the noise.

    Returns:
        (B,) per-sample squared errors.
    """
    check_points(x, "x")
    sig = check_sigma(sigma, like=x)
    check_generator(generator, x.device)
    if target not in ("plain", "batch"):
        raise ValueError(f"target must be 'plain' or 'batch'; got {target!r}")
    xi = normal(tuple(x.shape), x, generator)
    x0 = x + sig * xi
    if target == "plain":
        s_target = -xi / sig
    else:
        s_target = batch_score(x0, x, float(sig), chunk_size=chunk_size).to(x.dtype)
    f0 = check_field_output(field(x0), x0, "field")
    return (f0 - s_target).square().sum(1)
