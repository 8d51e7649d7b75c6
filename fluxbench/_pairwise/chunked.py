"""Chunked pairwise sums and matrix products: V- and U-statistics without N x M memory.

Shared by the MMD (:mod:`fluxbench.metrics.mmd`), the kernel Stein discrepancy
(:mod:`fluxbench.verify.stein`) and the U-statistic passes of :mod:`fluxbench.ustat`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fluxbench._checks import check_positive_int
from fluxbench._pairwise.common import no_autocast

__all__ = ["chunk_bounds", "chunked_pairwise_sum", "chunked_pairwise_matmul"]


def chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(0, c), (c, 2c), ...] covering range(n) in blocks of ``chunk_size``."""
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
    for i0, i1 in chunk_bounds(x.shape[0], chunk_size):
        xb = x[i0:i1]
        for j0, j1 in chunk_bounds(y.shape[0], chunk_size):
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
    for i0, i1 in chunk_bounds(x.shape[0], chunk_size):
        xb = x[i0:i1]
        acc: Tensor | None = None
        for j0, j1 in chunk_bounds(y.shape[0], chunk_size):
            block = _eval_block(fn, xb, y[j0:j1], exclude_diagonal and i0 == j0)
            with no_autocast(block.device):
                part = block @ v2[j0:j1].to(block.dtype)
            acc = part if acc is None else acc + part
        assert acc is not None
        rows.append(acc)
    out = torch.cat(rows, dim=0)
    return out.squeeze(1) if squeeze else out
