"""Noise floor of a sample-based metric (SPEC section 5, rollout test).

A sample metric between two finite clouds does not vanish even when both come from the
same law (the empirical W2 between two samples of size n decays like n^{-1/d} for
d >= 3). Results are only meaningful next to that floor: the metric between two
independent reference samples of the same size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from fluxbench._checks import check_points, check_positive_int, check_same_space

__all__ = ["NoiseFloor", "noise_floor"]


class NoiseFloor(NamedTuple):
    """Result of :func:`noise_floor`.

    Attributes:
        mean: mean of the metric over the repeats.
        std: sample standard deviation over the repeats (ddof = 1), or None when
            ``n_repeats == 1``.
        values: the metric value of each repeat.
    """

    mean: float
    std: float | None
    values: tuple[float, ...]


def _draw(target: object, n: int, generator: torch.Generator | None, name: str) -> Tensor:
    sample = getattr(target, "sample", None)
    if callable(sample):
        out = sample(n, generator=generator)
    elif callable(target):
        out = target(n, generator=generator)
    else:
        raise ValueError(
            "target must have a sample(n, generator=...) method or be a callable (n, generator=...) -> (n, d); "
            f"got {type(target).__name__}"
        )
    check_points(out, name)
    if out.shape[0] != n:
        raise ValueError(f"{name} has {out.shape[0]} points but n = {n} were requested")
    return out


def noise_floor(
    target: object,
    n: int,
    metric: Callable[[Tensor, Tensor], float | Tensor],
    *,
    n_repeats: int = 1,
    generator: torch.Generator | None = None,
) -> NoiseFloor:
    """The value of ``metric`` between two independent size-n samples of the same law.

    ``floor = metric(X, X')`` with X, X' two independent samples of size ``n`` from
    ``target`` (SPEC section 5: "report W2 against the noise floor (W2 between two
    independent reference samples of the same size)"). Use the same n (and the same
    metric settings) as the result it accompanies. With ``n_repeats > 1`` the pair is
    redrawn that many times and the mean and sample standard deviation are returned.

    Args:
        target: an object with ``sample(n, generator=...) -> (n, d)`` (a fluxbench target),
            or a callable ``(n, generator=...) -> (n, d)``.
        n: sample size of each of the two clouds, >= 1 (>= 2 for the MMD).
        metric: ``(x, y) -> float or 0-d tensor``, e.g. :func:`fluxbench.metrics.w2` or
            ``functools.partial(fluxbench.metrics.mmd2_unbiased, lengthscale=1.0)``.
        n_repeats: number of independent pairs, >= 1.
        generator: random source passed to every ``sample`` call.

    Returns:
        ``NoiseFloor(mean, std, values)``; ``std`` is None when ``n_repeats == 1``.

    Raises:
        ValueError: on ``n < 1``, ``n_repeats < 1``, a target that cannot be sampled, a
            sample that is not a finite (n, d) tensor, or a non-finite metric value.
    """
    n = check_positive_int(n, "n")
    n_repeats = check_positive_int(n_repeats, "n_repeats")
    if not callable(metric):
        raise ValueError(f"metric must be a callable (x, y) -> float; got {type(metric).__name__}")
    values = []
    for _ in range(n_repeats):
        x = _draw(target, n, generator, "first sample")
        y = _draw(target, n, generator, "second sample")
        check_same_space(x, y, "first sample", "second sample")
        value = metric(x, y)
        value = float(value.detach()) if isinstance(value, Tensor) else float(value)
        if not math.isfinite(value):
            raise ValueError(f"metric returned a non-finite value {value}")
        values.append(value)
    mean = sum(values) / n_repeats
    std = None
    if n_repeats > 1:
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n_repeats - 1))
    return NoiseFloor(mean=mean, std=std, values=tuple(values))
