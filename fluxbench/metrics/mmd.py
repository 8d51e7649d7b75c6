"""Maximum mean discrepancy with an RBF kernel: unbiased estimate, permutation and paired tests.

SPEC section 5 (rollout test: compare where a sampler's chains end with where they
started, :func:`mmd_paired_test`, or with held-out samples, :func:`mmd_permutation_test`).
Reference: Gretton, Borgwardt, Rasch, Schoelkopf and Smola, "A kernel two-sample test",
JMLR 13 (2012).

One module over 400 lines on purpose: the estimate and its three tests share one rule for
the kernel's lengthscales and one pooled centring, which a split would have to export as
public API or duplicate.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import math

import torch
from torch import Tensor

from fluxbench import _random
from fluxbench._checks import check_generator, check_positive, check_positive_int
from fluxbench._pairwise import (
    chunked_pairwise_matmul,
    chunked_pairwise_sum,
    median_bandwidth,
    no_autocast,
    sq_dists_expanded,
    working_dtype,
)
from fluxbench._pairwise.rbf import rbf_block
from fluxbench.metrics._common import check_pair, flatten_samples
from fluxbench.ustat import BlockFn, StandardisedU, default_n_bootstrap, wild_bootstrap_max

__all__ = [
    "MMDTestResult",
    "MMDAggregatedResult",
    "mmd2_unbiased",
    "mmd_permutation_test",
    "mmd_aggregated_test",
    "mmd_paired_test",
    "MMDPairedResult",
]


class MMDTestResult(NamedTuple):
    """Result of :func:`mmd_permutation_test`; unpacks as ``statistic, p_value``.

    Attributes:
        statistic: 0-d tensor, the observed unbiased MMD^2 estimate.
        p_value: ``(1 + #{permuted statistic >= observed}) / (1 + n_permutations)``.
    """

    statistic: Tensor
    p_value: float


def _unit_scale(x: Tensor, y: Tensor) -> float:
    """A power of two near the clouds' extent, the unit every MMD computation works in.

    Squared distances of data scaled by 1e20 overflow float32 and those of data scaled by
    1e-20 underflow it, so the statistic came out NaN or 0; the RBF statistics with a
    median lengthscale are scale-free, and dividing by a power of two is exact, so
    working in this unit changes no bit of the result for data of ordinary scale.
    """
    extent = float(torch.maximum(x.detach().abs().amax(), y.detach().abs().amax()))
    if extent == 0.0:
        return 1.0
    return 2.0 ** math.floor(math.log2(extent))


def _lengthscale(x: Tensor, y: Tensor, lengthscale: object, generator: torch.Generator | None, unit: float) -> float:
    """The lengthscale in units of ``unit`` (x and y already divided by it)."""
    if lengthscale is None:
        return median_bandwidth(x, y, generator=generator)
    return check_positive(lengthscale, "lengthscale") / unit


def _lengthscale_grid(
    x: Tensor, y: Tensor, lengthscales: object, factors: tuple[float, ...], generator: torch.Generator | None,
    unit: float,
) -> list[float]:
    """The given lengthscales (each > 0), or the median heuristic of the pooled sample times
    ``factors``, in units of ``unit`` (x and y already divided by it)."""
    if lengthscales is None:
        if not factors:
            raise ValueError("factors is empty; give at least one multiple of the median heuristic")
        med = median_bandwidth(x, y, generator=generator)
        return [med * check_positive(c, "lengthscale factor") for c in factors]
    ells = [check_positive(v, "lengthscale") / unit for v in lengthscales]  # type: ignore[attr-defined]
    if not ells:
        raise ValueError("lengthscales is empty; give at least one lengthscale or None")
    return ells


def _centred_pool(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """x and y in the working dtype, both shifted by the pooled mean (distances unchanged)."""
    dtype = working_dtype(x.dtype)
    with no_autocast(x.device):
        xw, yw = x.to(dtype), y.to(dtype)
        n, m = xw.shape[0], yw.shape[0]
        centre = (xw.detach().sum(dim=0) + yw.detach().sum(dim=0)) / (n + m)
        return xw - centre, yw - centre


def mmd2_unbiased(
    x: Tensor,
    y: Tensor,
    *,
    lengthscale: float | Tensor | None = None,
    chunk_size: int = 1024,
    generator: torch.Generator | None = None,
) -> float:
    """Unbiased U-statistic estimate of MMD^2 with the RBF kernel (Gretton et al. 2012, Lemma 6).

    ``MMD_u^2 = 1/(N(N-1)) sum_{i != j} k(x_i, x_j) + 1/(M(M-1)) sum_{i != j} k(y_i, y_j)
    - 2/(N M) sum_{i, j} k(x_i, y_j)``, with ``k(x, y) = exp(-|x - y|^2 / (2 l^2))``.
    For a fixed l its expectation is the population MMD^2 = E k(X, X') + E k(Y, Y')
    - 2 E k(X, Y), which is 0 iff the laws agree (the RBF kernel is characteristic); the
    estimate itself can be negative. With ``lengthscale=None`` l is the median heuristic
    :func:`fluxbench.kernels.median_bandwidth` on the pooled sample (then the estimate is
    only approximately unbiased, since l depends on the data; when N + M > 2000 the
    heuristic subsamples with ``generator``: pass a generator or a lengthscale for
    reproducible values). The three sums are taken by
    :func:`fluxbench.kernels.chunked_pairwise_sum` in blocks of ``chunk_size``, in at least
    float32 with autocast disabled and without autograd. A score, like :func:`~fluxbench.metrics.w2` and
    :func:`~fluxbench.metrics.sliced_w2`: the result is a Python float (one value for records and tables; the
    tests' statistics, which feed further computation, stay tensors).

    Args:
        x: (N, d) points, N >= 2, finite; a sample of shape (N, *event_shape), for example
            images (N, C, H, W), is compared as (N, D) points, D = prod(event_shape).
        y: (M, d) points, M >= 2 (or (M, *event_shape), the same event shape), same dtype
            and device.
        lengthscale: l > 0, or None for the median heuristic.
        chunk_size: block size of the pairwise sums, >= 1.
        generator: random source of the median-heuristic subsample (on ``x.device``).

    Returns:
        MMD_u^2 as a float, computed in ``working_dtype(x.dtype)`` (float32 for
        half/bfloat16 inputs); it can be negative.

    Raises:
        ValueError: on bad points (NaN, empty, mismatched d/dtype/device, different event
            shapes), fewer than 2 points in x or y, ``lengthscale <= 0`` or ``chunk_size < 1``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g)
        >>> bool(abs(mmd2_unbiased(x, y)) < 0.01), mmd2_unbiased(x, y + 1.0) > 0.1
        (True, True)
        >>> type(mmd2_unbiased(x, y)).__name__
        'float'
    """
    x, y = check_pair(*flatten_samples(x, y), min_points=2)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    check_generator(generator, x.device)
    unit = _unit_scale(x, y)
    x, y = x.detach() / unit, y.detach() / unit
    ell = _lengthscale(x, y, lengthscale, generator, unit)
    inv_two_l2 = 0.5 / ell**2

    def block(a: Tensor, b: Tensor) -> Tensor:
        return rbf_block(a, b, inv_two_l2)

    xw, yw = _centred_pool(x, y)
    n, m = xw.shape[0], yw.shape[0]
    with torch.no_grad():
        sxx = chunked_pairwise_sum(block, xw, xw, chunk_size=chunk_size, exclude_diagonal=True)
        syy = chunked_pairwise_sum(block, yw, yw, chunk_size=chunk_size, exclude_diagonal=True)
        sxy = chunked_pairwise_sum(block, xw, yw, chunk_size=chunk_size)
    return float(sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2.0 * sxy / (n * m))


def mmd_permutation_test(
    x: Tensor,
    y: Tensor,
    *,
    lengthscale: float | Tensor | None = None,
    n_permutations: int = 200,
    generator: torch.Generator | None = None,
    chunk_size: int = 4096,
) -> MMDTestResult:
    """Two-sample permutation test of H0: law(x) = law(y) with the unbiased MMD^2 statistic.

    The statistic is :func:`mmd2_unbiased` (Gretton et al. 2012). Under H0 the pooled
    sample is exchangeable, so the statistic is recomputed on ``n_permutations`` random
    relabellings (uniform permutations drawn with ``generator``) and the p-value is

        p = (1 + #{b : T_b >= T_obs}) / (1 + n_permutations),

    which is valid at every level: P(p <= alpha) <= alpha under H0 (Phipson and Smyth,
    "Permutation p-values should never be zero", 2010); the smallest attainable p is
    1 / (1 + n_permutations). Permuted statistics within round-off of the observed one
    (100 ulps of the working dtype times the mean kernel value) count as ties (>=), so
    exact ties such as the x <-> y swap when N = M never make the test anti-conservative. The lengthscale (median heuristic on the pooled sample when
    None) is fixed before permuting and is a function of the pooled sample only.

    Every statistic is a quadratic form in the label indicator e (e_i = 1 for points
    labelled x) of the pooled kernel matrix K with zero diagonal: with r = K 1, T = 1^T r,
    S_xx = e^T K e, S_xy = e^T r - S_xx, S_yy = T - 2 e^T r + S_xx. All of them come from
    one product K [1, e_obs, e_1, ..., e_B] by
    :func:`fluxbench.kernels.chunked_pairwise_matmul`, so each kernel entry is computed
    once: when N + M <= ``chunk_size`` the pooled (N + M)^2 kernel matrix is built once in
    a single block, otherwise it is processed in chunk_size^2 blocks and never held
    whole. Cost O((N + M)^2 (d + n_permutations)).

    Args:
        x: (N, d) points, N >= 2, finite.
        y: (M, d) points, M >= 2, same d, dtype and device.
        lengthscale: l > 0, or None for the median heuristic on the pooled sample.
        n_permutations: number B of random relabellings, >= 1.
        generator: random source of the permutations and of the median-heuristic
            subsample (on ``x.device``); None uses torch's global RNG.
        chunk_size: block size of the pooled kernel matrix, >= 1 (memory ~ chunk_size^2).

    Returns:
        ``MMDTestResult(statistic, p_value)``: the observed statistic as a 0-d tensor in
        ``working_dtype(x.dtype)`` (it equals ``mmd2_unbiased(x, y, lengthscale=l)`` up
        to round-off) and the p-value as a float in (0, 1].

    Raises:
        ValueError: on bad points, fewer than 2 points in x or y, ``lengthscale <= 0``,
            ``n_permutations < 1`` or ``chunk_size < 1``.
    """
    check_pair(x, y, min_points=2)
    n_permutations = check_positive_int(n_permutations, "n_permutations")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    check_generator(generator, x.device)
    unit = _unit_scale(x, y)
    x, y = x / unit, y / unit
    ell = _lengthscale(x, y, lengthscale, generator, unit)
    stats, tie_tol, dtype = _permutation_statistics(x, y, [ell], n_permutations, generator, chunk_size)
    observed = stats[0, 0]
    exceed = int((stats[0, 1:] >= observed - tie_tol[0]).sum())
    p_value = (1 + exceed) / (1 + n_permutations)
    return MMDTestResult(statistic=observed.to(dtype), p_value=p_value)


def _permutation_statistics(
    x: Tensor,
    y: Tensor,
    lengthscales: list[float],
    n_permutations: int,
    generator: torch.Generator | None,
    chunk_size: int,
) -> tuple[Tensor, Tensor, torch.dtype]:
    """MMD^2 of the observed split and of ``n_permutations`` shared relabellings, per lengthscale.

    Returns:
        stats: (L, 1 + B) float64 (float32 on MPS); column 0 is the observed split.
        tie_tol: (L,) round-off tolerance of each row (100 ulps at the kernel scale).
        dtype: the working dtype.
    """
    with torch.no_grad():
        xw, yw = _centred_pool(x.detach(), y.detach())
        n, m = xw.shape[0], yw.shape[0]
        z = torch.cat([xw, yw], dim=0)
        total = n + m
        # label indicators: column 0 the observed split, columns 1.. random relabellings
        perms = _random.uniform((n_permutations, total), like=z, generator=generator).argsort(dim=1)
        labels = torch.zeros(n_permutations + 1, total, dtype=z.dtype, device=z.device)
        labels[0, :n] = 1.0
        labels[1:].scatter_(1, perms[:, :n], 1.0)
        ones = torch.ones(total, 1, dtype=z.dtype, device=z.device)
        weights = torch.cat([ones, labels.T], dim=1)  # (total, 1 + 1 + B)
        # the quadratic-form algebra cancels large sums: do it in float64 where available
        acc = torch.float32 if z.device.type == "mps" else torch.float64
        e = labels.T.to(acc)  # (total, 1 + B)
        rows, tols = [], []
        for ell in lengthscales:
            inv_two_l2 = 0.5 / ell**2

            def block(a: Tensor, b: Tensor, inv_two_l2: float = inv_two_l2) -> Tensor:
                return rbf_block(a, b, inv_two_l2)

            ke = chunked_pairwise_matmul(block, z, z, weights, chunk_size=chunk_size, exclude_diagonal=True).to(acc)
            r = ke[:, 0]
            t = r.sum()
            sxx = (e * ke[:, 1:]).sum(dim=0)
            rx = e.T @ r
            sxy = rx - sxx
            syy = t - 2.0 * rx + sxx
            rows.append(sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2.0 * sxy / (n * m))
            # relabellings with the same statistic (e.g. x <-> y swapped when N = M) must
            # count as ties despite round-off
            tols.append(100 * torch.finfo(z.dtype).eps * float(t.abs()) / (total * (total - 1)))
        return torch.stack(rows), torch.tensor(tols, dtype=acc, device=z.device), z.dtype


class MMDAggregatedResult(NamedTuple):
    """Result of :func:`mmd_aggregated_test`.

    Attributes:
        statistics: (L,) tensor, the observed unbiased MMD^2 at each lengthscale.
        p_value: the permutation p-value of the min-p statistic, in (0, 1].
        p_values: (L,) tuple, the permutation p-value of each lengthscale alone.
        lengthscales: (L,) tuple of the lengthscales used.
    """

    statistics: Tensor
    p_value: float
    p_values: tuple[float, ...]
    lengthscales: tuple[float, ...]


def mmd_aggregated_test(
    x: Tensor,
    y: Tensor,
    *,
    lengthscales: list[float] | tuple[float, ...] | None = None,
    factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0),
    n_permutations: int = 200,
    generator: torch.Generator | None = None,
    chunk_size: int = 4096,
) -> MMDAggregatedResult:
    """Two-sample permutation test of H0: law(x) = law(y) over several RBF lengthscales at once.

    A single lengthscale sees differences at its own scale only (a 5% change of scale in
    d = 20 is nearly invisible at the median distance and obvious at half of it). For each
    lengthscale l the unbiased MMD^2 of :func:`mmd2_unbiased` is computed on the observed
    split (b = 0) and on B relabellings shared by all lengthscales (b = 1..B). Each
    statistic gets its permutation p-value ``p_lb = #{b' : T_lb' >= T_lb} / (B + 1)``
    (b' over all B + 1 splits) and the test statistic is the smallest of them over the
    lengthscales, ``m_b = min_l p_lb``, calibrated by the same permutations (Westfall and
    Young 1993; the MMDAgg construction of Schrab et al., JMLR 24, 2023, with a min-p in
    place of its level adjustment):

        p = #{b : m_b <= m_0} / (B + 1).

    Under H0 the B + 1 splits are exchangeable, so P(p <= alpha) <= alpha at every level.

    Args:
        x: (N, d) points, N >= 2, finite.
        y: (M, d) points, M >= 2, same d, dtype and device.
        lengthscales: explicit lengthscales (each > 0); default the median heuristic of
            the pooled sample times ``factors``.
        factors: multiples of the median heuristic used when ``lengthscales`` is None.
        n_permutations: B >= 1.
        generator: random source of the relabellings and of the median subsample.
        chunk_size: block size of the pooled kernel matrices.

    Returns:
        :class:`MMDAggregatedResult`.

    Raises:
        ValueError: on bad points, an empty or non-positive lengthscale list, or bad counts.
    """
    check_pair(x, y, min_points=2)
    n_permutations = check_positive_int(n_permutations, "n_permutations")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    check_generator(generator, x.device)
    unit = _unit_scale(x, y)
    x, y = x / unit, y / unit
    ells = _lengthscale_grid(x, y, lengthscales, factors, generator, unit)
    stats, tie_tol, _ = _permutation_statistics(x, y, ells, n_permutations, generator, chunk_size)
    size = n_permutations + 1
    # p_lb = #{b' : T_lb' >= T_lb - tol} / (B + 1), by a sorted search per lengthscale
    srt = stats.sort(dim=1).values
    below = torch.searchsorted(srt.contiguous(), (stats - tie_tol[:, None]).contiguous(), side="left")
    p_lb = (size - below).to(stats.dtype) / size  # (L, B + 1)
    m = p_lb.min(dim=0).values
    p_value = float((m <= m[0]).sum()) / size
    return MMDAggregatedResult(
        statistics=stats[:, 0],
        p_value=p_value,
        p_values=tuple(float(v) for v in p_lb[:, 0]),
        lengthscales=tuple(ell * unit for ell in ells),
    )


class MMDPairedResult(NamedTuple):
    """Result of :func:`mmd_paired_test`.

    Attributes:
        statistics: (L,) tensor, the unbiased MMD^2 estimate U_l at each lengthscale.
        standardised: (L,) tuple, ``U_l / sd_l`` (sd_l the bootstrap null standard deviation).
        p_value: the wild-bootstrap p-value of ``max_l U_l / sd_l``, in (0, 1].
        p_values: (L,) tuple, the p-value of each lengthscale alone.
        lengthscales: (L,) tuple of the lengthscales used.
    """

    statistics: Tensor
    standardised: tuple[float, ...]
    p_value: float
    p_values: tuple[float, ...]
    lengthscales: tuple[float, ...]


def _paired_blocks(x: Tensor, y: Tensor, lengthscales: list[float]) -> BlockFn:
    """Blocks of ``h_l((x_i, y_i), (x_j, y_j)) = k_l(x_i, x_j) + k_l(y_i, y_j) - k_l(x_i, y_j) - k_l(y_i, x_j)``.

    x, y already centred on a common point and in the working dtype (no checks).
    """
    coefs = [-0.5 / ell**2 for ell in lengthscales]

    def block(i0: int, i1: int, j0: int, j1: int) -> Iterator[Tensor]:
        xi, yi, xj, yj = x[i0:i1], y[i0:i1], x[j0:j1], y[j0:j1]
        dxx, dyy, dxy, dyx = sq_dists_expanded(xi, xj), sq_dists_expanded(yi, yj), sq_dists_expanded(xi, yj), sq_dists_expanded(yi, xj)
        for c in coefs:
            yield (dxx * c).exp_().add_((dyy * c).exp_()).sub_((dxy * c).exp_()).sub_((dyx * c).exp_())

    return block


def paired_mmd_bootstrap(
    x: Tensor, y: Tensor, lengthscales: list[float], n_bootstrap: int, generator: torch.Generator | None,
    chunk_size: int = 1024,
) -> StandardisedU:
    """The paired MMD^2 U-statistic of each lengthscale, standardised, with its wild-bootstrap draws (no checks).

    x, y (N, d), row i paired with row i; both are centred on their pooled mean first.
    What :func:`mmd_paired_test` and ``tools/ksd_grid.py --test rollout`` compute.
    """
    xw, yw = _centred_pool(x.detach(), y.detach())
    return wild_bootstrap_max(
        _paired_blocks(xw, yw, lengthscales),
        x.shape[0],
        len(lengthscales),
        n_bootstrap,
        generator,
        device=x.device,
        chunk_size=chunk_size,
    )


def mmd_paired_test(
    x: Tensor,
    y: Tensor,
    *,
    lengthscales: list[float] | tuple[float, ...] | None = None,
    factors: tuple[float, ...] = (1.0,),
    n_bootstrap: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
) -> MMDPairedResult:
    """Test of H0: law(x_i) = law(y_i) from N i.i.d. *pairs* (x_i, y_i), which may depend on each other.

    The use case is a Markov chain started at x_i and ended at y_i (the rollout test of
    SPEC section 5): the pairs are i.i.d. but y_i is not independent of x_i, so a
    permutation test is invalid (swapping x_i and y_i is exact only for reversible chains).
    With ``z_i = (x_i, y_i)`` and, for each lengthscale l,

        h_l(z_i, z_j) = k_l(x_i, x_j) + k_l(y_i, y_j) - k_l(x_i, y_j) - k_l(y_i, x_j),
        U_l = sum_{i != j} h_l(z_i, z_j) / (N (N - 1)),

    only independent points meet in each term (i != j), so ``E U_l = MMD_l^2(law x, law y)``
    whatever the dependence within a pair, and under H0 h_l is degenerate
    (``E h_l(z, Z') = mu(x) + mu(y) - mu(x) - mu(y) = 0``, mu the kernel mean embedding).
    The test is the maximum over lengthscales of ``U_l / sd_l`` with the Rademacher wild
    bootstrap of :mod:`fluxbench.ustat` (shared multipliers across lengthscales): valid
    asymptotically for any dependence within pairs, and with all N points on each side
    (a split into independent halves would use N / 2 against N / 2). Reference for the
    paired statistic: Gretton et al., JMLR 13 (2012), section 6 (the linear-time MMD uses
    the same h on disjoint pairs).

    Args:
        x: (N, d) points, N >= 2, finite.
        y: (N, d) points, row i paired with row i of x; same d, dtype and device.
        lengthscales: explicit lengthscales (each > 0); default the median heuristic of
            the pooled sample times ``factors``.
        factors: multiples of the median heuristic (default the median alone).
        n_bootstrap: number B of bootstrap draws; default
            :func:`fluxbench.ustat.default_n_bootstrap` (1000 up to N = 5000).
        generator: random source of the median subsample and of the multipliers (on
            ``x.device``); None uses torch's global RNG.
        chunk_size: block size of the pass over pairs (memory ~ 4 chunk_size^2 values).

    Returns:
        :class:`MMDPairedResult`.

    Raises:
        ValueError: on bad points, x and y of different shapes, an empty or non-positive
            lengthscale list, or bad counts.
    """
    check_pair(x, y, min_points=2)
    if x.shape != y.shape:
        raise ValueError(f"paired samples need x and y of the same shape; got {tuple(x.shape)} and {tuple(y.shape)}")
    n = x.shape[0]
    n_boot = default_n_bootstrap(n) if n_bootstrap is None else check_positive_int(n_bootstrap, "n_bootstrap")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    check_generator(generator, x.device)
    unit = _unit_scale(x, y)
    x, y = x / unit, y / unit
    ells = _lengthscale_grid(x, y, lengthscales, factors, generator, unit)
    res = paired_mmd_bootstrap(x, y, ells, n_boot, generator, chunk_size)
    return MMDPairedResult(
        statistics=res.u.to(working_dtype(x.dtype)),
        standardised=tuple(float(v) for v in res.z),
        p_value=res.p_value(),
        p_values=tuple(res.p_value([li]) for li in range(len(ells))),
        lengthscales=tuple(ell * unit for ell in ells),
    )
