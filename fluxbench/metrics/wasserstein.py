"""Exact and sliced 2-Wasserstein distances between point clouds (POT solvers).

SPEC section 5 (rollout test: W2 against the noise floor) and section 6 (exact W2 by
assignment). The transport itself is always POT's: the exact network simplex
``ot.emd2`` and ``ot.sliced_wasserstein_distance``.
"""

from __future__ import annotations

import numpy as np
import ot
import torch
from torch import Tensor

from fluxbench._checks import check_positive_int
from fluxbench.metrics._common import check_directions, check_pair, flatten_samples

__all__ = ["W2_MAX_PAIRS", "W2_NUM_ITER_MAX", "w2", "sliced_w2"]

#: Default cap on N * M for :func:`w2`: the dense float64 cost matrix alone takes
#: 8 N M bytes (200 MB at the cap) and the network simplex time grows quickly
#: (about 1 s at N = M = 2000 and about 10 s at N = M = 5000 on one CPU core).
W2_MAX_PAIRS = 25_000_000

#: Iteration cap passed to ``ot.emd2``; POT's default (1e5) is too small for N = M = 5000.
#: The solver stops as soon as it is optimal, so this only bounds pathological cases.
W2_NUM_ITER_MAX = 100_000_000


def _weights(w: object, n: int, name: str) -> np.ndarray | None:
    if w is None:
        return None
    if not isinstance(w, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape ({n},) or None; got {type(w).__name__}")
    if w.ndim != 1 or w.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},); got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype; got {w.dtype}")
    arr = w.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf entries")
    if (arr < 0).any():
        raise ValueError(f"{name} has negative entries (min {arr.min()}); weights must be >= 0")
    total = arr.sum()
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1 (within 1e-6); got sum {total}")
    return arr / total


def w2(
    x: Tensor,
    y: Tensor,
    *,
    a: Tensor | None = None,
    b: Tensor | None = None,
    max_pairs: int = W2_MAX_PAIRS,
) -> float:
    """Exact 2-Wasserstein distance between two weighted point clouds (not squared).

    ``W2(mu, nu) = ( min_{P in U(a, b)} sum_ij P_ij |x_i - y_j|^2 )^{1/2}`` with
    ``mu = sum_i a_i delta_{x_i}``, ``nu = sum_j b_j delta_{y_j}`` and U(a, b) the
    couplings with marginals a and b (SPEC sections 5 and 6). Solved exactly by POT's
    network simplex ``ot.emd2`` on the squared Euclidean cost
    ``ot.dist(x, y, metric="sqeuclidean", backend="scipy")`` (coordinate differences, so
    coincident points cost exactly 0). POT's
    exact solver runs on the CPU, so the inputs are copied to CPU float64 (whatever their
    device and dtype) and the result is a Python float; not differentiable. Cost: a dense
    N x M float64 matrix and a super-quadratic solve, hence the ``max_pairs`` cap.

    For two samples of size n from the same law in dimension d the empirical W2 does not
    vanish: it decays like n^{-1/d} for d >= 3 (about sqrt(log n / n) in d = 2), so report
    it next to :func:`fluxbench.metrics.noise_floor`.

    Args:
        x: (N, d) points, finite; a sample of shape (N, *event_shape), for example images
            (N, C, H, W), is compared as (N, D) points, D = prod(event_shape).
        y: (M, d) points (or (M, *event_shape), the same event shape), same dtype and device.
        a: optional (N,) nonnegative weights of x summing to 1 (uniform 1/N by default).
        b: optional (M,) nonnegative weights of y summing to 1 (uniform 1/M by default).
        max_pairs: refuse problems with N * M above this (default :data:`W2_MAX_PAIRS`
            = 25e6, i.e. N = M = 5000) instead of running for a very long time.

    Returns:
        W2 as a float >= 0.

    Raises:
        ValueError: on bad points or weights, different event shapes, or N * M > ``max_pairs``.
        RuntimeError: if the solver does not report an optimal solution (for example
            :data:`W2_NUM_ITER_MAX` reached).

    Example:
        >>> import torch
        >>> x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> round(w2(x, x + torch.tensor([3.0, 4.0], dtype=torch.float64)), 6)  # a translation by (3, 4)
        5.0
    """
    x, y = check_pair(*flatten_samples(x, y))
    max_pairs = check_positive_int(max_pairs, "max_pairs")
    n, m = x.shape[0], y.shape[0]
    if n * m > max_pairs:
        raise ValueError(
            f"w2 on N = {n} and M = {m} points needs an N*M = {n * m} cost matrix, above max_pairs = "
            f"{max_pairs}; subsample the clouds, use sliced_w2, or raise max_pairs knowingly"
        )
    wa = _weights(a, n, "a")
    wb = _weights(b, m, "b")
    xs = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    ys = y.detach().to(device="cpu", dtype=torch.float64).numpy()
    # scipy's cdist sums squared coordinate differences: exact zeros for coincident points
    # (the |x|^2 + |y|^2 - 2 x.y expansion leaves ~1e-16 |x|^2, i.e. W2(x, x) ~ 1e-8)
    cost = ot.dist(xs, ys, metric="sqeuclidean", backend="scipy")
    empty = np.empty(0, dtype=np.float64)
    value, log = ot.emd2(
        empty if wa is None else wa,
        empty if wb is None else wb,
        cost,
        numItermax=W2_NUM_ITER_MAX,
        log=True,
    )
    if int(log["result_code"]) != 1:
        raise RuntimeError(f"ot.emd2 did not reach an optimal solution: {log['warning']}")
    return float(np.sqrt(max(float(value), 0.0)))


def sliced_w2(
    x: Tensor,
    y: Tensor,
    *,
    n_projections: int = 256,
    seed: int | None = 0,
    directions: Tensor | None = None,
) -> float:
    """Sliced 2-Wasserstein distance (Monte Carlo over directions), via POT.

    ``SW2(mu, nu) = ( E_{theta ~ U(S^{d-1})} W2^2(theta#mu, theta#nu) )^{1/2}``
    (Bonneel et al., "Sliced and Radon Wasserstein barycenters of measures", JMIV 2015),
    estimated by ``ot.sliced_wasserstein_distance(x, y, n_projections=..., p=2, seed=...)``
    as the root of the average over ``n_projections`` random directions of the exact 1-D
    W2^2 between the projected clouds (uniform weights). Computed on the inputs' device
    (POT's torch backend) in float64 (float32 on MPS, which has no float64); the
    directions come from POT's own backend generator seeded with ``seed``, so the same
    seed gives the same directions on the same device, and the global torch RNG is left
    untouched. Pass ``directions`` to use given directions instead (for example the same
    ones as :func:`fluxbench.metrics.gaussian_sliced_w2`, for a paired comparison).

    Args:
        x: (N, d) points, finite, or a sample (N, *event_shape) compared as (N, D) points.
        y: (M, d) points (or (M, *event_shape), the same event shape), same dtype and device.
        n_projections: number K of random directions, >= 1 (ignored with ``directions``).
        seed: integer seed of the directions; None draws from POT's unseeded backend
            generator (not reproducible).
        directions: optional (K, d) nonzero directions (rows are normalised).

    Returns:
        SW2 as a float >= 0.

    Raises:
        ValueError: on bad points, different event shapes, ``n_projections < 1``, a
            non-integer seed or bad directions.
    """
    x, y = check_pair(*flatten_samples(x, y))
    n_projections = check_positive_int(n_projections, "n_projections")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"seed must be an int or None; got {seed!r}")
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    xs = x.detach().to(dtype)
    ys = y.detach().to(dtype)
    centre = xs.mean(dim=0, keepdim=True)
    xs, ys = xs - centre, ys - centre
    projections = None
    if directions is not None:
        projections = check_directions(directions, x.shape[1], like=xs).T.contiguous()
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        value = ot.sliced_wasserstein_distance(
            xs,
            ys,
            n_projections=n_projections,
            p=2,
            projections=projections,
            seed=None if seed is None else int(seed),
        )
    return float(value)
