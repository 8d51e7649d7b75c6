"""The rules every pairwise computation follows: its working dtype, autocast off, and the
two ways to compute squared distances (named for their numerics).

* :func:`working_dtype`: pairwise work runs in float64 if any input is float64, else in
  float32 (half precision and bfloat16 are promoted). The one dtype rule of the package.
* :func:`no_autocast`: pairwise work is done with autocast disabled.
* :func:`sq_dists_expanded`: ``|x|^2 + |y|^2 - 2 x.y`` (one matrix product, fast;
  loses relative accuracy far from the origin: centre the points first).
* :func:`sq_dists_difference`: ``sum_k (a_ik - b_jk)^2`` (no cancellation; for narrow
  kernels and points far from the origin).
* ``LOG2E``: materialised blocks hold base-2 log-kernels and exponentiate with exp2;
  :func:`log2_kernel_difference` is such a log-kernel from difference-form distances.
* :func:`block_rows`: how many query rows one block of an N x M computation may hold, so
  that memory grows like N + M (at most ``MAX_BLOCK_ENTRIES`` entries per block), never
  like N x M.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = [
    "working_dtype",
    "no_autocast",
    "sq_dists_expanded",
    "sq_dists_difference",
    "block_rows",
    "MAX_BLOCK_ENTRIES",
    "LOG2E",
    "log2_kernel_difference",
]

# log2(e). Materialised blocks carry their log-kernels in base 2 (the scale folded into
# the product that makes them) and exponentiate with exp2: on x86 CPUs torch's float32
# exp2 costs a quarter to a half of exp (11.6 against 42 us per 65536 floats on the
# AVX-512 AMD EPYC here, 19.7 against 42.7 with ATEN_CPU_CAPABILITY=avx2), float64 a third,
# and both are accurate to within one eps relative (measured over [-126, 10]: 0.59 eps
# float32, 0.99 eps float64), the rounding the kernel values carry anyway.
LOG2E = 1.4426950408889634

# Entries of one (rows, M) block of any pairwise pass on any device (128 MiB in float32):
# large enough that a fused call amortises its launch, small enough that peak memory at
# B = 65536 stays far below 1 GB.
MAX_BLOCK_ENTRIES = 1 << 25


def working_dtype(*args: torch.dtype | Tensor) -> torch.dtype:
    """The dtype pairwise work runs in: float64 if any argument is float64, else float32.

    Arguments are dtypes or tensors (their dtype counts). float16, bfloat16 and float32
    map to float32.
    """
    return torch.float64 if any((a if isinstance(a, torch.dtype) else a.dtype) == torch.float64 for a in args) else torch.float32


def no_autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Disable autocast for ``device``'s type inside the block (pairwise work stays in fp32+).

    A no-op context when autocast is not active (the common case, and a hot path).
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def sq_dists_expanded(x: Tensor, y: Tensor) -> Tensor:
    """|x_i - y_j|^2 via |x|^2 + |y|^2 - 2 x.y, clamped at 0; no checks (hot-loop helper).

    Callers disable autocast and convert to the working dtype before calling.
    """
    xx = x.pow(2).sum(dim=1, keepdim=True)  # (n, 1)
    yy = y.pow(2).sum(dim=1).unsqueeze(0)  # (1, m)
    return torch.addmm(xx + yy, x, y.T, beta=1.0, alpha=-2.0).clamp_min(0.0)


def sq_dists_difference(a: Tensor, b: Tensor, *, max_sum_dim: int = 4) -> Tensor:
    """|a_i - b_j|^2 in difference form (no cancellation): (N, d), (M, d) -> (N, M); no checks.

    Batched (G, N, d), (G, M, d) -> (G, N, M) inputs take the ``cdist`` branch.

    Up to ``max_sum_dim`` coordinates as a sum of squared coordinate differences (the
    fewest operations for small d), above through ``torch.cdist`` in its difference mode,
    squared. The materialised-block kernels of :mod:`.blocks` and :mod:`.sums` pass
    ``max_sum_dim=0`` (always ``cdist``), the dense batch kernels the default.
    """
    if a.shape[-1] > max_sum_dim or a.ndim != 2:
        d = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
        return d.square() if d.requires_grad else d.square_()  # cdist's backward needs d
    out = (a[:, :1] - b[:, 0]).square_()
    for k in range(1, a.shape[1]):
        out.add_((a[:, k : k + 1] - b[:, k]).square_())
    return out


def log2_kernel_difference(a: Tensor, b: Tensor, var: float, *, max_sum_dim: int = 4) -> Tensor:
    """Base-2 log-kernels -|a_i - b_j|^2 / (2 var) * LOG2E from :func:`sq_dists_difference`
    (same shapes and ``max_sum_dim``); no checks."""
    return sq_dists_difference(a, b, max_sum_dim=max_sum_dim).mul_(-0.5 * LOG2E / var)


def block_rows(cols: int, chunk_size: int | None = None) -> int:
    """Query rows per block of a (rows, ``cols``) pairwise computation: at most
    ``chunk_size`` (when given) and at most ``MAX_BLOCK_ENTRIES // cols``, at least 1.

    Every pairwise pass takes its rows in blocks of this many, so the largest
    intermediate holds max(cols, MAX_BLOCK_ENTRIES) entries: linear in the batch.
    """
    rows = max(1, MAX_BLOCK_ENTRIES // max(1, cols))
    return rows if chunk_size is None else max(1, min(rows, chunk_size))
