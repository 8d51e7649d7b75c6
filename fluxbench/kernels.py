"""Pairwise kernel building blocks: RBF kernel, median heuristic, chunked pairwise sums.

Shared by the MMD (``fluxbench.metrics.mmd``) and by the kernel Stein discrepancy of
SPEC section 5. Conventions used throughout:

* The RBF kernel is ``k(x, y) = exp(-|x - y|^2 / (2 l^2))`` with lengthscale ``l > 0``
  (SPEC section 5; ``a = 1 / l^2`` in the KSD formula).
* Pairwise ``N x M`` work is done in at least float32 (half and bfloat16 inputs are
  upcast) with autocast disabled, and in blocks of ``chunk_size`` rows and columns so
  that the full ``N x M`` matrix is never materialised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from fluxbench._checks import (
    check_generator,
    check_points,
    check_positive,
    check_positive_int,
    check_same_space,
)

__all__ = [
    "working_dtype",
    "no_autocast",
    "squared_distances",
    "rbf_kernel",
    "median_bandwidth",
    "chunked_pairwise_sum",
    "chunked_pairwise_matmul",
]


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype pairwise work is done in: ``dtype`` itself, but at least float32.

    float16 and bfloat16 map to float32; float32 and float64 are kept.
    """
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def no_autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Disable autocast for ``device``'s type inside the block (pairwise work stays in fp32+).

    A no-op context when autocast is not active (the common case, and a hot path).
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def _upcast(x: Tensor) -> Tensor:
    return x.to(working_dtype(x.dtype))


def _sq_dists(x: Tensor, y: Tensor) -> Tensor:
    """|x_i - y_j|^2 via |x|^2 + |y|^2 - 2 x.y, clamped at 0; no checks (hot-loop helper).

    Callers disable autocast and upcast before calling.
    """
    xx = x.pow(2).sum(dim=1, keepdim=True)  # (n, 1)
    yy = y.pow(2).sum(dim=1).unsqueeze(0)  # (1, m)
    return torch.addmm(xx + yy, x, y.T, beta=1.0, alpha=-2.0).clamp_min(0.0)


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances ``D_ij = |x_i - y_j|^2``, clamped at 0.

    Computed as ``|x_i|^2 + |y_j|^2 - 2 x_i . y_j`` in at least float32 with autocast
    disabled. Only shapes are checked (no NaN scan, no host sync), so this is safe to call
    inside a chunked loop. The formula loses relative accuracy for points far from the
    origin compared with their spread; centre the points first (as the public metrics do).

    Args:
        x: (N, d) points.
        y: (M, d) points, same d and device.

    Returns:
        (N, M) tensor in ``working_dtype(x.dtype)``.

    Raises:
        ValueError: if the shapes are not (N, d) and (M, d) with the same d.
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.ndim != 2 or y.ndim != 2:
        raise ValueError("x and y must be tensors of shape (N, d) and (M, d)")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has d = {x.shape[1]} but y has d = {y.shape[1]}")
    with no_autocast(x.device):
        dtype = torch.promote_types(working_dtype(x.dtype), working_dtype(y.dtype))
        return _sq_dists(x.to(dtype), y.to(dtype))


def _rbf_block(x: Tensor, y: Tensor, inv_two_l2: float) -> Tensor:
    """exp(-|x_i - y_j|^2 / (2 l^2)) for one block; no checks (hot-loop helper)."""
    with no_autocast(x.device):
        d2 = _sq_dists(_upcast(x), _upcast(y))
        return torch.exp(d2 * (-inv_two_l2))


def rbf_kernel(x: Tensor, y: Tensor, lengthscale: float | Tensor) -> Tensor:
    """RBF (Gaussian) kernel matrix ``K_ij = exp(-|x_i - y_j|^2 / (2 l^2))`` (SPEC section 5).

    Squared distances are computed as ``|x|^2 + |y|^2 - 2 x.y`` (after centring both clouds
    on the mean of ``x``, which leaves distances unchanged) clamped at 0, in at least
    float32 (half and bfloat16 inputs are upcast to float32) with autocast disabled, so the
    result is the same inside and outside ``torch.autocast``. The whole ``N x M`` matrix is
    returned: for large clouds use :func:`chunked_pairwise_sum` instead.

    Args:
        x: (N, d) points, finite.
        y: (M, d) points, same d, dtype and device as ``x``.
        lengthscale: l > 0, a float or a 1-element tensor.

    Returns:
        (N, M) tensor in ``working_dtype(x.dtype)`` on ``x.device``.

    Raises:
        ValueError: on a bad shape, NaN/inf, mismatched d/dtype/device or ``lengthscale <= 0``.
    """
    check_points(x, "x")
    check_points(y, "y")
    check_same_space(x, y, "x", "y")
    ell = check_positive(lengthscale, "lengthscale")
    # distances are translation invariant: centring on x's mean keeps the expansion
    # |x|^2 + |y|^2 - 2 x.y accurate for clouds far from the origin
    with no_autocast(x.device):
        x, y = _upcast(x), _upcast(y)
        centre = x.mean(dim=0, keepdim=True)
        return _rbf_block(x - centre, y - centre, 0.5 / ell**2)


def median_bandwidth(
    x: Tensor,
    y: Tensor | None = None,
    *,
    max_points: int = 2000,
    generator: torch.Generator | None = None,
) -> float:
    """Median heuristic lengthscale ``l`` for ``k(x, y) = exp(-|x - y|^2 / (2 l^2))``.

    ``l = median{ |z_i - z_j| : i < j }``, the median of the Euclidean *distances* (not of
    the squared distances) over all distinct pairs of the pooled sample ``z = [x; y]``
    (Gretton et al., "A kernel two-sample test", JMLR 2012, section 8; Garreau et al.,
    "Large sample analysis of the median heuristic", 2017). The median of an even number
    of pairs is the mean of the two middle values. When the pooled sample has more than
    ``max_points`` points, a uniform subsample of ``max_points`` of them (without
    replacement, drawn with ``generator``; torch's global RNG when ``generator`` is None)
    is used, so that the cost stays O(max_points^2).

    Args:
        x: (N, d) points, finite.
        y: optional (M, d) points, same d, dtype and device; pooled with ``x``.
        max_points: subsample size cap, >= 2.
        generator: random source for the subsample (on ``x.device``).

    Returns:
        The lengthscale ``l`` as a Python float (> 0).

    Raises:
        ValueError: on bad points, fewer than 2 pooled points, or a zero median distance
            (more than half of the pairs coincide: pass a lengthscale explicitly).
    """
    check_points(x, "x")
    if y is not None:
        check_points(y, "y")
        check_same_space(x, y, "x", "y")
    max_points = check_positive_int(max_points, "max_points", minimum=2)
    check_generator(generator, x.device)
    with torch.no_grad():
        z = x.detach() if y is None else torch.cat([x.detach(), y.detach()], dim=0)
        n = z.shape[0]
        if n < 2:
            raise ValueError("median_bandwidth needs at least 2 points in total (x and y pooled)")
        if n > max_points:
            idx = torch.randperm(n, generator=generator, device=z.device)[:max_points]
            z = z[idx]
            n = max_points
        z = _upcast(z)
        z = z - z.mean(dim=0, keepdim=True)
        with no_autocast(z.device):
            d2 = _sq_dists(z, z)
        iu = torch.triu_indices(n, n, offset=1, device=z.device)
        dists = d2[iu[0], iu[1]].sqrt_()
        k = dists.numel()
        # selection, not a sort: O(n^2) instead of O(n^2 log n)
        lo = torch.kthvalue(dists, (k - 1) // 2 + 1).values
        hi = torch.kthvalue(dists, k // 2 + 1).values
        value = float(0.5 * (lo + hi))
    if not value > 0:
        raise ValueError(
            "median pairwise distance is 0 (more than half of the pairs of points coincide); "
            "pass an explicit lengthscale"
        )
    return value


def _blocks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


def _check_chunk_args(x: Tensor, y: Tensor, chunk_size: int, exclude_diagonal: bool) -> int:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor) or t.ndim < 1 or t.shape[0] == 0:
            raise ValueError(f"{name} must be a tensor with at least one row (dim 0 indexes the points)")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    if exclude_diagonal and x.shape[0] != y.shape[0]:
        raise ValueError(
            f"exclude_diagonal needs x and y with the same number of rows; got {x.shape[0]} and {y.shape[0]}"
        )
    return chunk_size


def _eval_block(fn: Callable[[Tensor, Tensor], Tensor], xb: Tensor, yb: Tensor, diag: bool) -> Tensor:
    block = fn(xb, yb)
    if not isinstance(block, Tensor) or block.shape != (xb.shape[0], yb.shape[0]):
        shape = tuple(block.shape) if isinstance(block, Tensor) else type(block).__name__
        raise ValueError(f"fn must return an ({xb.shape[0]}, {yb.shape[0]}) tensor for one block; got {shape}")
    if diag:
        eye = torch.eye(block.shape[0], dtype=torch.bool, device=block.device)
        block = block.masked_fill(eye, 0.0)
    return block


def chunked_pairwise_sum(
    fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    chunk_size: int = 1024,
    exclude_diagonal: bool = False,
) -> Tensor:
    """``S = sum_{i, j} fn(x, y)_ij`` block by block, never materialising the N x M matrix.

    The generic building block of V- and U-statistics: with ``exclude_diagonal=True`` the
    terms ``i == j`` are left out (``S = sum_{i != j} h(x_i, x_j)``, pass ``y = x``), which
    is what an unbiased U-statistic needs. ``fn(x_block, y_block)`` receives row slices
    ``x[i0:i1]`` and ``y[j0:j1]`` (at most ``chunk_size`` rows each) and must return the
    ``(i1 - i0, j1 - j0)`` block of values; it is responsible for its own dtype policy
    (the RBF helpers here upcast to float32 and disable autocast). Diagonal terms are
    masked to 0 (not subtracted), so a large ``h(x_i, x_i)`` cannot cancel badly.
    Gradients flow through ``fn`` as usual.

    ``x`` and ``y`` only need a leading points dimension, so a caller can pack extra
    per-point data (for example ``torch.cat([x, f(x)], dim=1)`` for a Stein kernel) and
    unpack it inside ``fn``.

    Args:
        fn: block function ``(n, ...) x (m, ...) -> (n, m)``.
        x: (N, ...) tensor, N >= 1.
        y: (M, ...) tensor, M >= 1; with ``exclude_diagonal`` M must equal N.
        chunk_size: rows per block, >= 1. Peak memory is about chunk_size^2 values of fn.
        exclude_diagonal: drop the ``i == j`` terms.

    Returns:
        0-d tensor, the sum, in the dtype of ``fn``'s blocks.

    Raises:
        ValueError: on empty inputs, ``chunk_size < 1``, mismatched N with
            ``exclude_diagonal``, or a block of the wrong shape.
    """
    chunk_size = _check_chunk_args(x, y, chunk_size, exclude_diagonal)
    total: Tensor | None = None
    for i0, i1 in _blocks(x.shape[0], chunk_size):
        xb = x[i0:i1]
        for j0, j1 in _blocks(y.shape[0], chunk_size):
            block = _eval_block(fn, xb, y[j0:j1], exclude_diagonal and i0 == j0)
            s = block.sum()
            total = s if total is None else total + s
    assert total is not None
    return total


def chunked_pairwise_matmul(
    fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    v: Tensor,
    *,
    chunk_size: int = 1024,
    exclude_diagonal: bool = False,
) -> Tensor:
    """``H @ v`` with ``H_ij = fn(x, y)_ij``, block by block, never materialising H.

    With ``v`` holding P weight vectors as columns, ``v[:, p] @ (H @ v)[:, p]`` gives all P
    quadratic forms ``w^T H w`` for one pass over the pairs: the workhorse of permutation
    tests (indicator vectors, see ``fluxbench.metrics.mmd_permutation_test``) and of
    multiplier bootstraps of degenerate U-statistics (Rademacher weights). With
    ``exclude_diagonal=True`` the ``i == j`` entries of H are treated as 0.

    Args:
        fn: block function ``(n, ...) x (m, ...) -> (n, m)`` (see :func:`chunked_pairwise_sum`).
        x: (N, ...) tensor.
        y: (M, ...) tensor; with ``exclude_diagonal`` M must equal N.
        v: (M, P) or (M,) tensor; cast to the dtype of ``fn``'s blocks.
        chunk_size: rows per block, >= 1.
        exclude_diagonal: drop the ``i == j`` entries of H.

    Returns:
        (N, P) tensor (or (N,) when ``v`` is 1-D) in the dtype of ``fn``'s blocks.

    Raises:
        ValueError: on bad shapes or ``chunk_size < 1``.
    """
    chunk_size = _check_chunk_args(x, y, chunk_size, exclude_diagonal)
    if not isinstance(v, Tensor) or v.ndim not in (1, 2) or v.shape[0] != y.shape[0]:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"v must have shape (M,) or (M, P) with M = {y.shape[0]}; got {shape}")
    squeeze = v.ndim == 1
    v2 = v.unsqueeze(1) if squeeze else v
    rows = []
    for i0, i1 in _blocks(x.shape[0], chunk_size):
        xb = x[i0:i1]
        acc: Tensor | None = None
        for j0, j1 in _blocks(y.shape[0], chunk_size):
            block = _eval_block(fn, xb, y[j0:j1], exclude_diagonal and i0 == j0)
            with no_autocast(block.device):
                part = block @ v2[j0:j1].to(block.dtype)
            acc = part if acc is None else acc + part
        assert acc is not None
        rows.append(acc)
    out = torch.cat(rows, dim=0)
    return out.squeeze(1) if squeeze else out
