"""Validation and bookkeeping shared by the samplers (private)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real

import torch
from torch import Tensor

from .._checks import check_field_output, check_positive_int

__all__ = [
    "check_callable",
    "check_thin",
    "n_saved_states",
    "check_chunk_size",
    "check_sigma_grid",
    "check_step_output",
    "evaluate_chunked",
    "raise_if_nonfinite",
    "flow_step",
    "event_norms",
]


def check_callable(fn: object, name: str) -> Callable:
    """Check that ``fn`` is callable."""
    if not callable(fn):
        raise ValueError(f"{name} must be callable; got {type(fn).__name__}")
    return fn


def check_thin(thin: object) -> int | None:
    """``None`` (return the end state only) or an integer >= 1."""
    if thin is None:
        return None
    return check_positive_int(thin, "thin", minimum=1)


def n_saved_states(n_steps: int, thin: int) -> int:
    """Number of states a thinned trajectory holds: x_0, x_thin, x_{2 thin}, ... -> n_steps // thin + 1."""
    return n_steps // thin + 1


def check_chunk_size(chunk_size: object, n: int) -> int:
    """``None`` (one chunk of all ``n`` points) or an integer >= 1; returns the chunk length."""
    if chunk_size is None:
        return n
    return check_positive_int(chunk_size, "chunk_size", minimum=1)


def check_sigma_grid(
    sigmas: object,
    name: str = "sigmas",
    *,
    direction: str = "decreasing",
    allow_final_zero: bool = False,
) -> list[float]:
    """Validate a grid of noise levels (standard deviations) and return it as Python floats.

    Args:
        sigmas: a 1-D tensor or a sequence of numbers, at least two entries.
        name: the argument name used in error messages.
        direction: ``"decreasing"``, ``"increasing"`` or ``"either"`` (strictly monotone).
        allow_final_zero: accept 0 as the last entry of a decreasing grid (every other
            entry must be > 0).

    Returns:
        The grid as a list of floats (read once, before any loop, so the loops below make
        no device round trips for the step sizes).
    """
    if isinstance(sigmas, Tensor):
        if sigmas.ndim != 1:
            raise ValueError(f"{name} must be a 1-D tensor; got shape {tuple(sigmas.shape)}")
        values = [float(v) for v in sigmas.detach().to("cpu", torch.float64).tolist()]
    elif isinstance(sigmas, Sequence) and not isinstance(sigmas, (str, bytes)):
        values = []
        for i, v in enumerate(sigmas):
            if isinstance(v, Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, Real):
                raise ValueError(f"{name}[{i}] must be a number; got {type(v).__name__}")
            values.append(float(v))
    else:
        raise ValueError(f"{name} must be a 1-D tensor or a sequence of numbers; got {type(sigmas).__name__}")
    if len(values) < 2:
        raise ValueError(f"{name} needs at least two noise levels; got {len(values)}")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ValueError(f"{name}[{i}] = {v} is not finite")
        last = i == len(values) - 1
        if v > 0 or (v == 0 and allow_final_zero and last):
            continue
        need = "> 0 (0 is allowed only as the last entry)" if allow_final_zero else "> 0"
        raise ValueError(f"{name}[{i}] = {v}; every noise level must be {need}")
    diffs = [b - a for a, b in zip(values[:-1], values[1:])]
    decreasing = all(d < 0 for d in diffs)
    increasing = all(d > 0 for d in diffs)
    if direction == "decreasing" and not decreasing:
        raise ValueError(f"{name} must be strictly decreasing (sigma_1 > sigma_2 > ...); got {values}")
    if direction == "increasing" and not increasing:
        raise ValueError(f"{name} must be strictly increasing; got {values}")
    if direction == "either" and not (decreasing or increasing):
        raise ValueError(f"{name} must be strictly monotone; got {values}")
    return values


def check_step_output(out: object, x: Tensor, name: str, *, full: bool) -> None:
    """Validate a field's output inside a sampler loop.

    ``full``: everything ``check_field_output`` checks, finiteness included (one device
    synchronisation, so only on the first step). Otherwise shape, dtype and device only,
    which costs no synchronisation: a field whose output changes shape on a later step
    would else be broadcast into the state.
    """
    if full:
        check_field_output(out, x, name)
    elif not isinstance(out, Tensor) or out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        check_field_output(out, x, f"{name} (on a later step)")


def evaluate_chunked(
    field: Callable[[Tensor], Tensor], x: Tensor, out: Tensor, chunk: int, *, check: bool, name: str
) -> Tensor:
    """Write ``field(x)`` into ``out`` (both (N, *event_shape)), evaluating ``chunk`` rows at a time.

    With ``check`` each chunk's output is validated by ``check_field_output`` (shape,
    device, dtype, finite; this synchronises with the device, so do it once); shape,
    dtype and device are compared on every call (:func:`check_step_output`).
    """
    n = x.shape[0]
    for start in range(0, n, chunk):
        xs = x[start : start + chunk]
        fs = field(xs)
        check_step_output(fs, xs, name, full=check)
        out[start : start + chunk] = fs
    return out


def raise_if_nonfinite(x: Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` if ``x`` holds NaN or inf (one device sync)."""
    if not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{message} ({n_bad} of {x.numel()} entries are NaN or inf)")


def flow_step(
    model: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    s: float,
    s_next: float,
    s_t: Tensor,
    s_next_t: Tensor,
    *,
    heun: bool,
    check: bool,
) -> Tensor:
    """One step of the VE probability-flow ODE dx/dsigma = -sigma f(x, sigma), from s to s_next.

    With h = s_next - s and d(x, s) = -s f(x, s) (EDM's (x - D(x, s)) / s):

        Euler:  x_e = x + h d(x, s)
        Heun:   x <- x + h/2 (d(x, s) + d(x_e, s_next)),   or x_e when s_next = 0

    (EDM's Algorithm 1 step: the model is never called at sigma = 0.) ``s``/``s_next``
    are the levels as floats (for the arithmetic, no device round trip), ``s_t``/``s_next_t``
    the same levels as 0-d tensors in ``x``'s dtype and device (the model's argument).
    ``check``: validate the first model output in full (one device synchronisation).

    Returns:
        The state at s_next, ``x``'s shape (N, *event_shape).
    """
    h = s_next - s
    f = model(x, s_t)
    check_step_output(f, x, "model", full=check)
    d_cur = -s * f
    x_euler = x + h * d_cur
    if not heun or s_next == 0:
        return x_euler
    f_next = model(x_euler, s_next_t)
    check_step_output(f_next, x_euler, "model", full=False)
    return x + (0.5 * h) * (d_cur - s_next * f_next)


def event_norms(x: Tensor) -> Tensor:
    """Euclidean norm of each state of an (N, *event_shape) batch over its event dimensions: (N,)."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)
