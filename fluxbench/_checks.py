"""Input validation shared by every public function.

Every public entry point validates its tensors here so that bad input fails with a
``ValueError`` that names the argument and the problem (shape, dtype, device, NaN,
a non-positive sigma, an empty batch) instead of propagating a silent NaN.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

__all__ = [
    "all_finite",
    "check_seed",
    "check_points",
    "check_batch",
    "check_sigma",
    "check_field_output",
    "check_generator",
    "check_positive",
    "check_positive_int",
    "check_same_space",
]


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def all_finite(t: Tensor) -> bool:
    """Whether every entry of a floating tensor is finite.

    NaN and inf propagate through a sum, so a finite sum proves it with one reduction; a
    non-finite sum (which finite entries can also give, by overflow) is settled entry by
    entry.
    """
    t = t.detach()
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def check_points(x: object, name: str = "x", *, dim: int | None = None, finite: bool = True) -> Tensor:
    """Check that ``x`` is a floating (N, d) tensor with N >= 1, d >= 1 and finite entries.

    Args:
        x: the candidate tensor.
        name: the argument name used in error messages.
        dim: if given, the required d.
        finite: also reject NaN and inf.

    Returns:
        ``x`` itself (no copy).
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, d); got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, d); got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); need at least one point")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has dimension d = 0 (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype; got {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have d = {dim} columns; got shape {tuple(x.shape)}")
    return _check_finite(x, name, finite)


def check_batch(x: object, name: str = "x", *, finite: bool = True) -> Tensor:
    """Check that ``x`` is a floating batch of shape (N, *event_shape) with N >= 1.

    The shape-generic counterpart of :func:`check_points` for code that treats each of
    the N rows as one state of any event shape (a vector (d,), an image (C, H, W)):
    at least one event dimension, no empty dimension, finite entries.

    Args:
        x: the candidate tensor.
        name: the argument name used in error messages.
        finite: also reject NaN and inf.

    Returns:
        ``x`` itself (no copy).
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, *event_shape); got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have shape (N, *event_shape) with at least one event dimension, e.g. (N, d) or "
            f"(N, C, H, W); got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); need at least one point")
    if 0 in x.shape[1:]:
        raise ValueError(f"{name} has an event dimension of size 0 (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype; got {x.dtype}")
    return _check_finite(x, name, finite)


def _check_finite(x: Tensor, name: str, finite: bool) -> Tensor:
    if finite and not all_finite(x):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name} contains {n_nan} NaN and {n_inf} inf entries; all entries must be finite")
    return x


def check_sigma(sigma: object, like: Tensor | None = None, name: str = "sigma") -> Tensor:
    """Validate one noise level (a standard deviation) and return it as a 0-d tensor.

    Accepts a Python number, a 0-d tensor, or a tensor whose entries are all equal
    (a per-sample sigma column that happens to be constant). A tensor with several
    distinct values is rejected: the objectives here assume one sigma per call.

    Args:
        sigma: the noise level, > 0 and finite.
        like: if given, the result takes its device and dtype.
        name: the argument name used in error messages.

    Returns:
        A 0-d tensor on ``like``'s device and dtype (float64 on CPU without ``like``).
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (Real, Tensor)):
        raise ValueError(f"{name} must be a positive number or a 0-d tensor; got {type(sigma).__name__}")
    if isinstance(sigma, Tensor):
        if sigma.numel() == 0:
            raise ValueError(f"{name} is an empty tensor")
        if like is not None and sigma.device != like.device:
            raise ValueError(f"{name} is on device {sigma.device} but the points are on {like.device}")
        flat = sigma.detach().reshape(-1)
        first = flat[0]
        if flat.numel() > 1 and not bool((flat == first).all()):
            n_distinct = int(torch.unique(flat).numel())
            raise ValueError(
                f"{name} has {n_distinct} distinct values in one call; this function takes one noise "
                "level per call (split the batch by sigma, or loop over the levels)"
            )
        value = first
        if not bool(torch.isfinite(value)) or not bool(value > 0):
            raise ValueError(f"{name} must be a finite standard deviation > 0; got {float(value)}")
        if like is not None:
            value = value.to(dtype=like.dtype)
        return value
    value = float(sigma)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite standard deviation > 0; got {value}")
    if like is None:
        return torch.tensor(value, dtype=torch.float64)
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def check_field_output(out: object, x: Tensor, name: str = "field") -> Tensor:
    """Check that a field's output matches its input point by point.

    The output must be a tensor with the shape, dtype and device of ``x`` and finite
    entries; anything else raises a ``ValueError`` naming the mismatch.
    """
    if not isinstance(out, Tensor):
        raise ValueError(f"{name} must return a torch.Tensor; got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"{name} output has shape {tuple(out.shape)} but its input has shape {tuple(x.shape)}")
    if out.device != x.device:
        raise ValueError(f"{name} output is on device {out.device} but its input is on {x.device}")
    if out.dtype != x.dtype:
        raise ValueError(f"{name} output has dtype {out.dtype} but its input has dtype {x.dtype}")
    if not all_finite(out):
        raise ValueError(f"{name} output contains NaN or inf ({_describe(out)})")
    return out


def check_generator(generator: object, device: torch.device | str) -> torch.Generator | None:
    """Check that ``generator`` is ``None`` or a ``torch.Generator`` on ``device``."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    device = torch.device(device)
    if generator.device.type != device.type:
        raise ValueError(f"generator is on device {generator.device} but the tensors are on {device}")
    return generator


def check_positive(value: object, name: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float after checking it is finite and > 0 (or >= 0)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar; got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number; got {type(value).__name__}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not math.isfinite(value) or not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}; got {value}")
    return value


def check_positive_int(value: object, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` as an int after checking it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, Tensor)) or (
        isinstance(value, Tensor) and (value.numel() != 1 or value.is_floating_point())
    ):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def check_seed(seed: object, name: str = "seed") -> int:
    """Return ``seed`` as an int after checking it is an integer in [0, 2^64 - 1].

    One rule for every seed in fluxbench (``torch.Generator.manual_seed`` would wrap a
    negative seed silently, so two different seeds could give the same stream).
    """
    seed = check_positive_int(seed, name, minimum=0)
    if seed >= 2**64:
        raise ValueError(f"{name} must be < 2**64; got {seed}")
    return seed


def check_same_space(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Check that two point clouds share d, dtype and device (N may differ)."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} has d = {a.shape[1]} but {name_b} has d = {b.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"{name_a} is on device {a.device} but {name_b} is on {b.device}")
    if a.dtype != b.dtype:
        raise ValueError(f"{name_a} has dtype {a.dtype} but {name_b} has dtype {b.dtype}")
