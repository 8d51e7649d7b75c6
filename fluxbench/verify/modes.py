"""Stein test functions learned from the samples: soft responsibilities of their clusters.

Every test function g gives a Stein statistic: under H0, ``E_p[L_f g] = 0`` with
``L_f g = f . grad g + Lap g`` (SPEC section 1, generator form), and the mean of
``L_f g`` over N samples is asymptotically normal. RBF kernels, whose bumps have their
gradient everywhere inside a mode, make poor such functions when f errs only between
separated modes (wrong mixing weights, SPEC section 5's known weakness): there
``E_p[L_f g] = E_p[(f - s_p) . grad g]`` lives on the saddles while ``L_p g`` is noisy
throughout. The responsibilities of the modes,

    r_k(x) = softmax_k(-|x - c_k|^2 / (2 tau^2)),

are flat inside each mode (so ``L_p r_k`` is small there) and change across the saddles,
exactly where the signal is. With ``u_k = -(x - c_k) / tau^2`` and ``u = sum_j r_j u_j``,

    L_f r_k = r_k [ f . (u_k - u) + |u_k - u|^2 - sum_j r_j |u_j - u|^2 ].        (M1)

On ``triangle-weights`` (``tools/stein_blindness.py``, N = 2000) the best of them has
signal-to-noise ratio 5.8 where the best RBF bump has 1.3 and the best combination of 40
bumps a Hotelling noncentrality of 9 (against 34).

The centres are not known: they are k-means centres of the samples (``scipy``'s
``kmeans2``, k-means++ start, seeded) for several K, and tau a multiple of the
within-cluster standard deviation. Choosing g from the same samples costs no validity to
first order: ``E_p[L_f g_theta] = 0`` for *every* theta under H0, so the estimated
centres' error has no first-order effect on the mean (it is asymptotically a fixed g).
For each (K, tau) the K - 1 independent functions (they sum to 1) enter a Hotelling
statistic ``T = N mbar^T S^+ mbar`` (S the covariance of the L_f r_k, S^+ its
pseudo-inverse), asymptotically chi^2 with r = rank(S) degrees of freedom. To join the
KSD's maximum (:func:`fluxbench.verify.ksd_test`) it is put on a normal scale by the
Wilson-Hilferty transform (Wilson and Hilferty, "The distribution of chi-square", PNAS
1931),

    z = ((T / r)^(1/3) - (1 - 2 / (9 r))) / sqrt(2 / (9 r)),                        (M2)

which is ~N(0, 1) for chi^2_r: standardising by ``(T - r) / sqrt(2 r)`` instead leaves
chi^2_1's heavy right tail, whose bootstrap maximum (5.4 against 3.0, on ``iso2-temp09``)
raised the threshold of the whole maximum and halved the kernels' power there. Any
monotone transform keeps the test valid: the bootstrap draws, which use the same
Rademacher multipliers W, ``T*_b = N |(S^+)^(1/2) sum_i W_ib (a_i - abar) / N|^2``, go through
the same transform, so the maximum over both families keeps its joint null law.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from scipy.cluster.vq import kmeans2
from torch import Tensor

__all__ = [
    "DEFAULT_MODE_CLUSTERS",
    "DEFAULT_MODE_WIDTHS",
    "ModeStatistics",
    "responsibility_generator",
    "fit_modes",
    "hotelling",
    "wilson_hilferty",
    "mode_statistics",
]

#: Numbers of clusters K of the mode test functions (a K is used when N >= 10 K).
DEFAULT_MODE_CLUSTERS: tuple[int, ...] = (2, 3, 4, 6)
#: Widths tau of the responsibilities, in units of the within-cluster standard deviation.
DEFAULT_MODE_WIDTHS: tuple[float, ...] = (1.0, 1.41, 2.0)
#: Covariance eigenvalues below this fraction of the largest are dropped (collinear functions).
_RANK_TOL = 1e-10


def responsibility_generator(x: Tensor, fx: Tensor, centres: Tensor, tau: float) -> Tensor:
    """``L_f r_k`` at every point, equation (M1) of this module.

    Args:
        x: (N, d) points; fx: (N, d) the field there; centres: (K, d); tau > 0.

    Returns:
        (N, K) ``L_f r_k(x_i)`` in x's dtype.
    """
    diff = x[:, None, :] - centres[None]
    r = torch.softmax(diff.square().sum(-1) / (-2.0 * tau * tau), 1)
    u = diff / (-tau * tau)
    du = u - (r[:, :, None] * u).sum(1, keepdim=True)
    n2 = du.square().sum(-1)
    return r * ((fx[:, None, :] * du).sum(-1) + n2 - (r * n2).sum(1, keepdim=True))


def fit_modes(x: Tensor, n_clusters: int, seed: int) -> tuple[Tensor, float] | None:
    """k-means centres (K, d) of x (on x's device and dtype) and the within-cluster standard deviation.

    ``scipy.cluster.vq.kmeans2`` with a k-means++ start from ``numpy.random.default_rng(seed)``
    (one host copy of x). The standard deviation is ``sqrt(mean_i |x_i - c(x_i)|^2 / d)``.
    None when x has fewer distinct points than K (k-means++ cannot place the centres) or
    no spread around them: there are then no modes to test.
    """
    data = x.detach().to("cpu", torch.float64).numpy()
    with warnings.catch_warnings():
        # an empty cluster keeps its start: its responsibility is still a valid test function;
        # k-means++ on fewer distinct points than K divides by zero, caught below as NaN centres
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        centres, labels = kmeans2(data, n_clusters, minit="++", rng=np.random.default_rng(seed))
    if not np.isfinite(centres).all():
        return None
    spread = math.sqrt(float(((data - centres[labels]) ** 2).sum(1).mean()) / data.shape[1])
    if not spread > 0:
        return None
    return torch.from_numpy(centres).to(x.device, x.dtype), spread


def wilson_hilferty(t: Tensor, dof: int) -> Tensor:
    """Equation (M2): chi^2_dof statistics t (any shape) mapped to approximately N(0, 1)."""
    return ((t / dof).clamp(min=0.0).pow(1.0 / 3.0) - (1.0 - 2.0 / (9.0 * dof))) / math.sqrt(2.0 / (9.0 * dof))


def hotelling(feats: Tensor, multipliers: Tensor | None = None) -> tuple[Tensor, int, Tensor | None]:
    """Hotelling's ``T = n mbar^T S^+ mbar`` of (n, J) features, rank(S), and bootstrap draws.

    ``S = sum_i (a_i - abar)(a_i - abar)^T / n``; eigenvalues below ``1e-10`` of the largest
    are dropped. With (n, B) ``multipliers`` W also the (B,) draws
    ``T*_b = n |(S^+)^(1/2) sum_i W_ib (a_i - abar) / n|^2``. Under H0 (mean zero) T is
    asymptotically chi^2 with rank(S) degrees of freedom.
    """
    n = feats.shape[0]
    centred = feats - feats.mean(0)
    evals, evecs = torch.linalg.eigh(centred.T @ centred / n)
    keep = evals > _RANK_TOL * evals.max().clamp(min=torch.finfo(evals.dtype).tiny)
    whiten = evecs[:, keep] / evals[keep].sqrt()
    stat = n * (feats.mean(0) @ whiten).square().sum()
    if multipliers is None:
        return stat, int(keep.sum()), None
    boot = (multipliers.T.to(feats.dtype) @ centred @ whiten).square().sum(1) / n
    return stat, int(keep.sum()), boot


class ModeStatistics(NamedTuple):
    """Standardised Hotelling statistics of the mode test functions (:func:`mode_statistics`).

    Attributes:
        z: (M,) float64, the Hotelling statistic T_m of each used (K, tau) on the normal
            scale of equation (M2) (:func:`wilson_hilferty`).
        z_boot: (M, B) float64, the same of the bootstrap draws.
        settings: the M (K, tau) pairs used.
    """

    z: Tensor
    z_boot: Tensor
    settings: tuple[tuple[int, float], ...]


def mode_statistics(
    x: Tensor,
    fx: Tensor,
    multipliers: Tensor,
    *,
    clusters: Sequence[int] = DEFAULT_MODE_CLUSTERS,
    widths: Sequence[float] = DEFAULT_MODE_WIDTHS,
    seed: int = 0,
) -> ModeStatistics:
    """The mode test functions' statistics and bootstrap draws (module docstring; no checks).

    For each K in ``clusters`` with N >= 10 K: :func:`fit_modes` (seed ``seed + K``), then for
    each width c the K - 1 functions ``L_f r_k`` (equation (M1), tau = c x the
    within-cluster standard deviation, in float64) enter :func:`hotelling` with the
    (N, B) ``multipliers``. K with no fit (fewer distinct points than K, or no spread) and
    settings whose covariance has rank 0 are skipped; ``settings`` lists those used.
    """
    n = x.shape[0]
    xd, fd = x.detach().double(), fx.detach().double()
    z, z_boot, used = [], [], []
    for k in clusters:
        if n < 10 * k or k < 2:
            continue
        fit = fit_modes(xd, k, seed + k)
        if fit is None:
            continue
        centres, spread = fit
        for c in widths:
            stat, rank, boot = hotelling(responsibility_generator(xd, fd, centres, c * spread)[:, :-1], multipliers)
            if rank == 0 or boot is None:
                continue
            z.append(wilson_hilferty(stat, rank))
            z_boot.append(wilson_hilferty(boot, rank))
            used.append((k, c))
    if not z:
        empty = xd.new_zeros(0)
        return ModeStatistics(empty, xd.new_zeros(0, multipliers.shape[1]), ())
    return ModeStatistics(torch.stack(z), torch.stack(z_boot), tuple(used))
