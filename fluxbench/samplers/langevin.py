"""Unadjusted Langevin algorithm (Euler-Maruyama of the Langevin SDE, SPEC section 3)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._checks import check_batch, check_generator, check_positive, check_positive_int
from .._random import normal
from ._common import (
    check_callable,
    check_chunk_size,
    check_thin,
    evaluate_chunked,
    n_saved_states,
    raise_if_nonfinite,
)

__all__ = ["langevin"]


def langevin(
    field: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    step_size: float,
    n_steps: int,
    generator: torch.Generator | None = None,
    thin: int | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Run unadjusted Langevin dynamics for ``field`` from ``x0``.

    Euler-Maruyama discretisation of SPEC eq. (1), ``dX = f(X) dt + sqrt(2) dW``
    (SPEC section 3):

        x_{k+1} = x_k + eps f(x_k) + sqrt(2 eps) xi_k,   xi_k ~ N(0, I).

    The chain's stationary law is the target of ``f`` only up to an O(eps) bias (for
    ``f(x) = -x`` in 1-D it is N(0, 1 / (1 - eps/2))).

    States may have any event shape, (N, d) or images (N, C, H, W); the field is called
    with the state's shape. The noise of a step is drawn for all N particles at once (one
    draw of the state's shape per step from ``generator``), and the field is then evaluated ``chunk_size`` rows at a
    time, so the result does not depend on ``chunk_size`` (bit for bit for a pointwise
    field) while activation memory is bounded by one chunk. The loop runs under
    ``torch.no_grad()``: the field is never differentiated.

    The field's output is validated (shape, dtype, device, finite) on the first step
    only. Finiteness of the state is checked once, after the last step (no device round
    trip inside the loop).

    Args:
        field: callable ``x -> f(x)`` mapping an (n, *event_shape) tensor to one of the
            same shape, dtype and device (n <= chunk_size).
        x0: (N, *event_shape) initial particles, finite. Not modified.
        step_size: eps > 0.
        n_steps: number of steps K >= 0; ``n_steps = 0`` returns a copy of ``x0`` (or a
            trajectory holding only ``x0``).
        generator: source of the Gaussian noise (on ``x0``'s device), or None for the
            global generator.
        thin: if given (an integer k >= 1), return the trajectory of the states
            x_0, x_k, x_{2k}, ..., x_{floor(K/k) k}: ``K // k + 1`` states including x_0.
            The final state x_K is included only when k divides K.
        chunk_size: evaluate the field on at most this many particles at a time
            (None: all N at once).
        progress: show a tqdm progress bar over the steps.

    Returns:
        The end state x_K, shape (N, *event_shape), or with ``thin`` the trajectory, shape
        (K // thin + 1, N, *event_shape). Same dtype and device as ``x0``.

    Raises:
        ValueError: bad arguments; a field output of the wrong shape, dtype or device, or
            non-finite on the first step; or a state that became non-finite during the
            run (divergence: lower ``step_size``).

    Example:
        >>> import torch
        >>> x = langevin(lambda z: -z, torch.zeros(2000, 1), step_size=0.1, n_steps=200,
        ...              generator=torch.Generator().manual_seed(0))
        >>> x.shape
        torch.Size([2000, 1])
        >>> abs(float(x.var()) - 1 / (1 - 0.1 / 2)) < 0.1  # N(0, 1 / (1 - eps/2)), biased by eps
        True
    """
    check_callable(field, "field")
    x0 = check_batch(x0, "x0")
    eps = check_positive(step_size, "step_size")
    n_steps = check_positive_int(n_steps, "n_steps", minimum=0)
    thin = check_thin(thin)
    chunk = check_chunk_size(chunk_size, x0.shape[0])
    generator = check_generator(generator, x0.device)
    noise_scale = math.sqrt(2.0 * eps)

    with torch.no_grad():
        x = x0.detach().clone()
        traj = None
        if thin is not None:
            traj = x.new_empty((n_saved_states(n_steps, thin), *x.shape))
            traj[0] = x
        drift = torch.empty_like(x)
        for k in tqdm(range(1, n_steps + 1), disable=not progress, desc="langevin", leave=False):
            noise = normal(x.shape, x, generator)
            evaluate_chunked(field, x, drift, chunk, check=(k == 1), name="field")
            x.add_(drift, alpha=eps).add_(noise, alpha=noise_scale)
            if traj is not None and k % thin == 0:
                traj[k // thin] = x
        raise_if_nonfinite(
            x,
            f"langevin: the chain became non-finite within {n_steps} steps of step_size={eps:g} "
            "(the discretisation diverged, or the field returned NaN/inf on a later step); "
            "lower step_size (ULA is stable only for step_size below about 2 / Lipschitz(field))",
        )
    return traj if traj is not None else x
