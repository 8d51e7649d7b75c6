"""Long batched Langevin rollouts with checkpoints (SPEC section 3; issue 14 long-rollout suite).

:func:`langevin_rollout` runs the unadjusted Langevin chain of SPEC eq. (1) for all
particles at once on ``x0``'s device and keeps the state at chosen steps (typically
:func:`log_spaced` ones) and, optionally, a thinned trace of scalar observables for
integrated autocorrelation times (:func:`fluxbench.metrics.integrated_autocorrelation_time`).
Its random stream is exactly that of :func:`fluxbench.samplers.langevin`: with the same
generator state both produce the same states, draw for draw.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_generator, check_points, check_positive, check_positive_int
from .._random import normal
from ._common import check_callable, check_chunk_size, evaluate_chunked, raise_if_nonfinite

__all__ = ["Rollout", "langevin_rollout", "log_spaced"]


class Rollout(NamedTuple):
    """The result of :func:`langevin_rollout`.

    Attributes:
        steps: the checkpoint steps, sorted and unique.
        states: the (N, d) state after each checkpoint step (step 0 is a copy of x0).
        seconds: wall time of the loop (device synchronised at the end).
        particle_steps_per_s: N * n_steps / seconds.
        trace: (T, N', k) observables at steps 0, thin, 2 thin, ..., (T = n_steps // thin + 1),
            or None without ``trace``.
        trace_steps: the steps of the trace's rows, or None.
    """

    steps: list[int]
    states: list[Tensor]
    seconds: float
    particle_steps_per_s: float
    trace: Tensor | None = None
    trace_steps: list[int] | None = None


def log_spaced(n_max: int, per_decade: int = 4) -> list[int]:
    """Checkpoint steps 0, 1, ..., n_max spaced evenly in log10, ``per_decade`` per decade.

    The integers round(10^(j / per_decade)) for j = 0, 1, ... below n_max, deduplicated,
    with 0 first and n_max last: ``log_spaced(100, 4) == [0, 1, 2, 3, 6, 10, 18, 32, 56, 100]``.

    Args:
        n_max: the last step, >= 0.
        per_decade: points per factor of 10, >= 1.

    Returns:
        A strictly increasing list of ints starting at 0 and ending at n_max.
    """
    n_max = check_positive_int(n_max, "n_max", minimum=0)
    per_decade = check_positive_int(per_decade, "per_decade")
    out = {0, n_max}
    j = 0
    while True:
        v = int(round(10 ** (j / per_decade)))
        if v >= n_max:
            break
        out.add(v)
        j += 1
    return sorted(out)


def _check_checkpoints(checkpoints: object) -> list[int]:
    if isinstance(checkpoints, (str, bytes)) or not isinstance(checkpoints, (Sequence, Tensor, range)):
        raise ValueError(f"checkpoints must be a sequence of integer steps; got {type(checkpoints).__name__}")
    steps = [check_positive_int(s, f"checkpoints[{i}]", minimum=0) for i, s in enumerate(checkpoints)]
    if not steps:
        raise ValueError("checkpoints is empty; give at least one step")
    return sorted(set(steps))


def langevin_rollout(
    field: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    step_size: float,
    checkpoints: Sequence[int],
    generator: torch.Generator | None,
    trace: Callable[[Tensor], Tensor] | None = None,
    thin: int = 1,
    chunk_size: int | None = None,
) -> Rollout:
    """Unadjusted Langevin for ``field`` from ``x0``, keeping the states at ``checkpoints``.

    x_{k+1} = x_k + eps f(x_k) + sqrt(2 eps) xi_k, xi_k ~ N(0, I_d), one (N, d) draw per
    step from ``generator`` before the field is evaluated (SPEC eq. (1), section 3) --
    the stream of :func:`fluxbench.samplers.langevin`, so the state at step k equals
    ``langevin(field, x0, step_size=eps, n_steps=k, generator=...)`` for the same
    starting generator state.

    The loop runs until max(checkpoints) under ``torch.no_grad()`` on ``x0``'s device and
    never waits for the device except to validate the field's output on the first step
    and to check the state is finite at each checkpoint (one sync each). States are
    copies; the trace is preallocated on the device and written in place.

    Args:
        field: ``x -> f(x)``, (n, d) -> (n, d) with x's dtype and device.
        x0: (N, d) starting points, finite. Not modified.
        step_size: eps > 0.
        checkpoints: steps >= 0 at which to keep the state (sorted and deduplicated).
        generator: source of the noise (on x0's device), or None for the global one.
        trace: optional observables ``x (N, d) -> (N', k)`` or ``(N',)`` (e.g.
            ``lambda x: x[:256]``), recorded at steps 0, thin, 2 thin, ...
        thin: record the trace every ``thin`` steps, >= 1.
        chunk_size: evaluate the field on at most this many particles at a time.

    Returns:
        A :class:`Rollout`; ``trace`` has shape (n_steps // thin + 1, N', k).

    Raises:
        ValueError: bad arguments, a field or observable output of the wrong shape, dtype
            or device, or a chain that became non-finite (names the checkpoint).
    """
    check_callable(field, "field")
    x0 = check_points(x0, "x0")
    eps = check_positive(step_size, "step_size")
    steps = _check_checkpoints(checkpoints)
    generator = check_generator(generator, x0.device)
    thin = check_positive_int(thin, "thin")
    chunk = check_chunk_size(chunk_size, x0.shape[0])
    if trace is not None:
        check_callable(trace, "trace")
    n_steps = steps[-1]
    noise_scale = math.sqrt(2.0 * eps)

    def observe(x: Tensor) -> Tensor:
        y = trace(x)
        if not isinstance(y, Tensor) or y.ndim not in (1, 2) or y.device != x.device:
            raise ValueError(f"trace must return an (N', k) or (N',) tensor on {x.device}; got {y!r:.80}")
        return y.reshape(y.shape[0], -1)

    states: list[Tensor] = []
    trace_buf = None
    sync = x0.device.type == "cuda"
    with torch.no_grad():
        x = x0.detach().clone()
        if trace is not None:
            first = observe(x)
            trace_buf = first.new_empty((n_steps // thin + 1, *first.shape))
            trace_buf[0] = first
        if steps[0] == 0:
            states.append(x.clone())
        nxt = 1 if steps[0] == 0 else 0
        drift = torch.empty_like(x)
        if sync:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        for k in range(1, n_steps + 1):
            noise = normal(x.shape, x, generator)
            evaluate_chunked(field, x, drift, chunk, check=(k == 1), name="field")
            x.add_(drift, alpha=eps).add_(noise, alpha=noise_scale)
            if trace_buf is not None and k % thin == 0:
                trace_buf[k // thin] = observe(x)
            if nxt < len(steps) and k == steps[nxt]:
                raise_if_nonfinite(
                    x,
                    f"langevin_rollout: the chain became non-finite by step {k} (step_size={eps:g}); "
                    "lower step_size (ULA is stable only below about 2 / Lipschitz(field))",
                )
                states.append(x.clone())
                nxt += 1
        if sync:
            torch.cuda.synchronize(x.device)
        seconds = time.perf_counter() - start
    rate = x0.shape[0] * n_steps / seconds if n_steps and seconds > 0 else 0.0
    trace_steps = None if trace_buf is None else list(range(0, n_steps + 1, thin))
    return Rollout(steps, states, seconds, rate, trace_buf, trace_steps)
