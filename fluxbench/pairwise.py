"""Gaussian-kernel sums over all pairs of two point clouds, without N x M memory.

The public face of :mod:`fluxbench._pairwise` (its module docstring describes the two
evaluation strategies, fused attention and materialised blocks, and the local frames):
posterior means (SPEC eq. (5)), log-partition functions and the transition sums of Flux
Matching (SPEC section 2, step 6). :func:`compute_dtype` is the package's one dtype rule,
:func:`fluxbench._pairwise.common.working_dtype`.
"""

from fluxbench._pairwise.attention import use_attention
from fluxbench._pairwise.common import working_dtype as compute_dtype
from fluxbench._pairwise.frames import Frames, KeyFrame
from fluxbench._pairwise.sums import kernel_logsumexp, kernel_mean, kernel_transition_sum, kernel_transpose_sum

__all__ = [
    "compute_dtype",
    "Frames",
    "KeyFrame",
    "kernel_mean",
    "kernel_logsumexp",
    "kernel_transpose_sum",
    "kernel_transition_sum",
    "use_attention",
]
