"""The batch score of the smoothed empirical measure, and the pairwise work Flux Matching does with it.

For a batch x_1..x_B and one noise level sigma, p_hat(z) = (1/B) sum_j N(z; x_j, sigma^2 I)
has posterior weights w_j(z) = softmax_j(-|z - x_j|^2 / (2 sigma^2)) and (SPEC eq. (5))

    m(z) = sum_j w_j x_j,           s_hat(z) = (m(z) - z) / sigma^2.

Its derivatives are moments of w, which is why nothing here back-propagates through the
B x B softmax (the double backward that dominates the published code's cost):

    J_s(z)    = (C(z) / sigma^2 - I) / sigma^2,       C = Cov_w(x)           (symmetric)
    d/dz E_w[phi(x)] = Cov_w(phi(x), x) / sigma^2
    grad_z eps^T C eps = E_w[ (eps.(x - m))^2 (x - m) ] / sigma^2              (third central moment)
    grad_z tr C        = E_w[ |x - m|^2 (x - m) ] / sigma^2

A :class:`BatchKernel` holds one batch at one sigma and performs the three kinds of
pairwise sums the loss needs (posterior means, the moments above, and the transition
sums of SPEC step 6). Two interchangeable implementations:

* :class:`DenseBatchKernel`: materialised blocks of rows against all B points, one block
  per pass for small batches: the fewest tensor operations. The default for small
  batches on CPU (``make_batch_kernel``).
* :class:`FusedBatchKernel`: the pairwise sums of ``fluxbench._pairwise`` in local
  frames: fused attention kernels, or on CPU 1 MiB materialised blocks where those are
  faster; nothing B x B is stored. The default otherwise.

Both work on rows in a *working order* (``kernel.rows`` / ``kernel.restore``): the fused
kernel sorts rows into spatial frames.

Modules: the interface :mod:`.batch_kernel`, the backends :mod:`.batch_dense` (with the
materialised-block helpers both backends use) and :mod:`.batch_fused`; the generic pairwise
machinery they build on is :mod:`fluxbench._pairwise`. This module holds
:func:`batch_score` and :func:`make_batch_kernel`, and the names of the others.
"""

from __future__ import annotations

from torch import Tensor

from .._pairwise import kernel_mean
from . import batch_kernel
from .batch_dense import DenseBatchKernel
from .batch_fused import MOMENT_MAX_DIM, FusedBatchKernel
from .batch_kernel import BatchKernel

__all__ = [
    "batch_score",
    "BatchKernel",
    "DenseBatchKernel",
    "FusedBatchKernel",
    "make_batch_kernel",
    "MOMENT_MAX_DIM",
]


def batch_score(z: Tensor, x: Tensor, sigma: float, *, chunk_size: int | None = None) -> Tensor:
    """The exact score of the smoothed empirical measure, SPEC eq. (5).

    Args:
        z: (N, d) query points.
        x: (B, d) the batch (centres of p_hat).
        sigma: the smoothing standard deviation (> 0).
        chunk_size: at most this many queries per pairwise block.

    Returns:
        (N, d) s_hat(z) = (m(z) - z) / sigma^2 in the compute dtype (>= float32).
    """
    var = sigma * sigma
    m = kernel_mean(z, x, var, chunk_size=chunk_size)
    return (m - z.to(m.dtype)) / var


def make_batch_kernel(x: Tensor, sigma: float, *, backend: str = "auto", chunk_size: int | None = None) -> BatchKernel:
    """The pairwise backend for one batch: ``"dense"``, ``"fused"``, or ``"auto"``.

    ``"auto"`` is ``"dense"`` on CPU for batches of at most ``batch_kernel.DENSE_PAIRS`` pairs (B <= 256)
    whose own points take its one-product logits (the expanded form's rounding bound
    holds for them): there a step is per-operation overhead, and one materialised block
    per pass has the fewest operations. Otherwise ``"fused"`` (where dense would fall back
    to difference-form distances, e.g. d = 784 at sigma = 0.3, it is ~2x slower). Measured
    with ``python -m fluxbench.bench``. Both compute the same sums and differ only in
    rounding.
    """
    if backend == "auto":
        if x.device.type == "cpu" and x.shape[0] * x.shape[0] <= batch_kernel.DENSE_PAIRS:
            dense = DenseBatchKernel(x, sigma, chunk_size=chunk_size)
            if dense.expanded_on_data:
                return dense
        backend = "fused"
    if backend == "dense":
        return DenseBatchKernel(x, sigma, chunk_size=chunk_size)
    if backend == "fused":
        return FusedBatchKernel(x, sigma, chunk_size=chunk_size)
    raise ValueError(f"backend must be 'auto', 'dense' or 'fused'; got {backend!r}")
