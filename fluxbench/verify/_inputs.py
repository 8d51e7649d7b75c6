"""Input checks shared by the stationarity tests (:mod:`.ksd`, :mod:`.rollout`, :mod:`.stationarity`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real

import torch
from torch import Tensor

from fluxbench._checks import check_field_output, check_points

__all__ = ["check_alpha", "check_samples", "check_options", "evaluate_field"]


def check_alpha(alpha: object) -> float:
    """The level alpha as a float in (0, 1); ValueError otherwise."""
    if isinstance(alpha, bool) or not isinstance(alpha, (Real, Tensor)):
        raise ValueError(f"alpha must be a number in (0, 1); got {alpha!r}")
    value = float(alpha)
    if not (0.0 < value < 1.0) or not math.isfinite(value):
        raise ValueError(f"alpha must be in (0, 1); got {value}")
    return value


def check_samples(samples: object, min_points: int = 4) -> Tensor:
    """The (N, d) samples of a stationarity test, finite, N >= ``min_points``; ValueError otherwise."""
    x = check_points(samples, "samples")
    if x.shape[0] < min_points:
        raise ValueError(f"samples has N = {x.shape[0]} points; a stationarity test needs N >= {min_points}")
    return x


def check_options(options: dict, allowed: Sequence[str], method: str) -> None:
    """ValueError naming every option of ``method`` not in ``allowed``."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for method={method!r}; allowed: {', '.join(allowed)}"
        )


def evaluate_field(field: Callable[[Tensor], Tensor], x: Tensor, chunk: int | None = None) -> Tensor:
    """f(x) under no_grad, validated (shape, dtype, device, finite)."""
    if not callable(field):
        raise ValueError(f"field must be callable (N, d) -> (N, d); got {type(field).__name__}")
    with torch.no_grad():
        if chunk is None or chunk >= x.shape[0]:
            return check_field_output(field(x), x, "field").detach()
        parts = []
        for i in range(0, x.shape[0], chunk):
            xs = x[i : i + chunk]
            parts.append(check_field_output(field(xs), xs, "field").detach())
        return torch.cat(parts, 0)

