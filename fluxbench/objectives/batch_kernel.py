"""The interface of the pairwise work Flux Matching does with one batch at one noise level.

A :class:`BatchKernel` holds one batch at one sigma and performs the three kinds of
pairwise sums the loss needs (posterior means, the moments of the posterior weights, and
the transition sums of SPEC step 6); the math is in :mod:`fluxbench.objectives.batch_score`.
Implementations: :class:`~fluxbench.objectives.batch_dense.DenseBatchKernel` and
:class:`~fluxbench.objectives.batch_fused.FusedBatchKernel`; this module also holds what
both use (the gradient terms, the no-autocast rule, the dense-block size limit).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._pairwise import no_autocast

__all__ = ["BatchKernel", "DENSE_PAIRS", "gradient_terms", "kernel_method"]

# Transition sums up to this many pairs are one materialised block: below it, per-call
# overheads cost more than the B x B arithmetic. (Read as ``batch_kernel.DENSE_PAIRS`` where
# used, so that one assignment changes every use.)
DENSE_PAIRS = 65536


def gradient_terms(s: Tensor, f: Tensor, cw: Tensor, third: Tensor, var: float) -> Tensor:
    """g_s = J_s (f - 2 s) - grad D_s from C (f - 2 s) and the contracted third moment."""
    return torch.add(cw, f - 2 * s, alpha=-var).add_(third, alpha=-1.0 / var).div_(var * var)


def kernel_method(method):
    """Decorate a kernel method to run with autocast off: pairwise sums and moments stay in fp32+."""

    @functools.wraps(method)
    def wrapper(self, first, *args):
        with no_autocast(first.device):
            return method(self, first, *args)

    return wrapper


class BatchKernel:
    """One batch x (B, d) at one noise level: the pairwise sums of the Flux Matching loss.

    Rows are in the kernel's *working order*: ``rows(t)`` converts a (B, ...) tensor to it
    (possibly permuted and padded to P >= B rows), ``restore`` converts back. Chains of
    the reference dynamics run on all working rows or on a subset from
    :meth:`select_chains`; every method taking chain rows accepts either.
    """

    var: float
    dtype: torch.dtype

    def rows(self, t: Tensor) -> Tensor:
        return t

    def restore(self, t: Tensor) -> Tensor:
        return t

    def select_chains(self, n_chains: int | None, generator: torch.Generator | None) -> tuple[Tensor | None, float]:
        """Rows whose chains are run, and the Horvitz-Thompson weight 1 / P(row selected).

        ``None`` (or n_chains >= B) selects all rows with weight 1. Otherwise every row is
        selected with the same probability, so sum_{j in S} weight * W_ij g_j is an
        unbiased estimate of sum_j W_ij g_j.
        """
        raise NotImplementedError

    def mean(self, z: Tensor) -> Tensor:
        """Posterior mean m(z) of SPEC eq. (5) for working rows or chain rows."""
        raise NotImplementedError

    def score_terms(self, y: Tensor, f: Tensor, probe: Tensor | None) -> tuple[Tensor, Tensor]:
        """s_hat(y) and g_s = grad of the batch-score part of the defect estimate.

        The defect estimate of SPEC section 2, step 3, splits as
        r_hat = [eps^T J_f eps + f . s_hat] + [- D_s - |s_hat|^2], D_s = eps^T J_s eps
        (Hutchinson, ``probe`` = eps) or tr J_s (``probe=None``). This returns s_hat(y) and
        the exact gradient of everything besides the field's own derivatives,

            g_s = J_s (f - 2 s_hat) - grad D_s

        (J_s f from the product rule on f . s_hat). The caller adds
        grad_z [eps^T J_f eps + f . stopgrad(s_hat)] from the field (its closed-form
        ``defect_pullback``, or autograd).

        Args:
            y: (C, d) chain points; f: (C, d) the field there (detached); probe: (C, d) or None.

        Returns:
            (s_hat (C, d), g_s (C, d)) in the compute dtype.
        """
        raise NotImplementedError

    def transition_sum(self, mu: Tensor, y: Tensor, v: float, g: Tensor, chains: Tensor | None) -> Tensor:
        """g_hat_i = sum_j W_ij g_j, W_ij = softmax over all anchors i of -|mu_i - y_j|^2 / (2 v).

        SPEC section 2, steps 5-6; j runs over the chains.

        Args:
            mu: (P, d) transition means of all anchors; y: (C, d) chain end points;
            v: kernel variance; g: (C, d); chains: the rows of the chains (None: all).

        Returns:
            (P, d).
        """
        raise NotImplementedError
