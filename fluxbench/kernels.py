"""Pairwise kernel building blocks: RBF kernel, median heuristic, chunked pairwise sums.

The public face of :mod:`fluxbench._pairwise` (:mod:`~fluxbench._pairwise.common`,
:mod:`~fluxbench._pairwise.rbf`, :mod:`~fluxbench._pairwise.chunked`), shared by the MMD
(``fluxbench.metrics.mmd``) and by the kernel Stein discrepancy of SPEC section 5.
Conventions used throughout:

* The RBF kernel is ``k(x, y) = exp(-|x - y|^2 / (2 l^2))`` with lengthscale ``l > 0``
  (SPEC section 5; ``a = 1 / l^2`` in the KSD formula).
* Pairwise ``N x M`` work is done in :func:`working_dtype` (float64 if an input is
  float64, else float32: half and bfloat16 inputs are upcast) with autocast disabled, and
  in blocks of ``chunk_size`` rows and columns so that the full ``N x M`` matrix is never
  materialised.
"""

from fluxbench._pairwise.chunked import chunked_pairwise_matmul, chunked_pairwise_sum
from fluxbench._pairwise.common import no_autocast, working_dtype
from fluxbench._pairwise.rbf import median_bandwidth, rbf_kernel, squared_distances

__all__ = [
    "working_dtype",
    "no_autocast",
    "squared_distances",
    "rbf_kernel",
    "median_bandwidth",
    "chunked_pairwise_sum",
    "chunked_pairwise_matmul",
]
