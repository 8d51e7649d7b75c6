"""Degenerate U-statistics of symmetric pair kernels and their wild bootstrap.

Both stationarity tests of SPEC section 5 reduce to U-statistics of i.i.d. points z_i,

    U = sum_{i != j} h(z_i, z_j) / (N (N - 1)),

with a symmetric kernel h that is *degenerate* under H0 (``E h(z, Z') = 0`` for every z):
the generator KSD (z = x, h the Stein kernel, ``fluxbench.verify.stein``) and the paired
MMD of the rollout (z = (x, y), a start point and the end of its chain,
:func:`fluxbench.metrics.mmd_paired_test`). For such statistics the Rademacher wild
bootstrap

    U*_b = sum_{i != j} W_ib W_jb h(z_i, z_j) / (N (N - 1)),   W_ib = +-1 independent,

reproduces the limiting null law (Arcones and Gine, "On the bootstrap of U and V
statistics", Ann. Statist. 1992; Chwialkowski, Strathmann and Gretton, "A kernel test of
goodness of fit", ICML 2016), and with several kernels h_l the same multipliers for
every l keep their joint law, so the maximum of standardised statistics
``T = max_l U_l / sd_l`` is calibrated without a multiple-testing correction (Schrab,
Guedj and Gretton, "KSD aggregated goodness-of-fit test", NeurIPS 2022). ``sd_l`` is the
exact standard deviation of ``U*_l``, ``sqrt(2 sum_{i != j} h_l^2) / (N (N - 1))``.

:func:`u_statistic_pass` does the one chunked pass over the pairs that all of this
needs; :func:`wild_bootstrap_max` turns it into standardised statistics and bootstrap
draws, and :class:`StandardisedU` into p-values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from fluxbench import _random
from fluxbench._pairwise import chunk_bounds, no_autocast

__all__ = [
    "UStatPass",
    "StandardisedU",
    "u_statistic_pass",
    "wild_bootstrap_max",
    "bootstrap_null_sd",
    "bootstrap_p_values",
    "max_p_value",
    "max_p_values",
    "tie_tolerance",
    "default_n_bootstrap",
    "rademacher_multipliers",
]

#: ``block(i0, i1, j0, j1)`` yields, for each of the L kernels, the (i1 - i0, j1 - j0)
#: block ``h_l(z_i, z_j)``, i in [i0, i1), j in [j0, j1).
BlockFn = Callable[[int, int, int, int], Iterable[Tensor]]


class UStatPass(NamedTuple):
    """Result of :func:`u_statistic_pass` (one chunked pass over all pairs i != j).

    Attributes:
        sums: (L,) float64, ``sum_{i != j} h_l(z_i, z_j)``.
        sq_sums: (L,) float64, ``sum_{i != j} h_l(z_i, z_j)^2``.
        hw: (L, N, B) products ``H_l @ W`` with the diagonal of H_l zeroed (None without
            multipliers), in the pass's ``bootstrap_dtype``.
    """

    sums: Tensor
    sq_sums: Tensor
    hw: Tensor | None


def u_statistic_pass(
    block: BlockFn,
    n: int,
    n_kernels: int,
    *,
    device: torch.device,
    multipliers: Tensor | None = None,
    chunk_size: int = 1024,
    bootstrap_dtype: torch.dtype = torch.float32,
) -> UStatPass:
    """Sums, squared sums and bootstrap products of L symmetric kernels in one chunked pass (no checks).

    Only blocks (I, J) with I <= J are evaluated (h is symmetric): an off-diagonal block
    counts twice in the sums and contributes ``H_IJ @ W_J`` to rows I and ``H_IJ^T @ W_I``
    to rows J of the bootstrap products; the diagonal i = j is masked to 0. Peak memory is
    the caller's per-block work (a few ``chunk_size^2`` values; never N x N unless
    ``chunk_size >= N``) plus the (L, N, B) products. ``sums`` keeps the blocks' autograd
    graph (``fluxbench.verify.ksd2`` differentiates it); everything else is detached.
    Blocks are evaluated with autocast off.

    Args:
        block: the kernel blocks, see :data:`BlockFn`; called once per block pair (I, J).
        n: number N of points.
        n_kernels: number L of kernels ``block`` yields.
        device: device of the sums.
        multipliers: optional (N, B) bootstrap multipliers W.
        chunk_size: block size.
        bootstrap_dtype: dtype of the ``H @ W`` products (float32 by default: bootstrap
            quantiles need a few digits, and float32 GEMMs are twice as fast).

    Returns:
        :class:`UStatPass`.
    """
    # autocast off: the kernel blocks are distances and exponentials, kept in fp32 or better
    with no_autocast(device):
        sums = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(n_kernels)]
        sq = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(n_kernels)]
        hw = wb = None
        if multipliers is not None:
            wb = multipliers.to(bootstrap_dtype)
            hw = torch.zeros((n_kernels, n, wb.shape[1]), dtype=bootstrap_dtype, device=device)
        blocks = chunk_bounds(n, chunk_size)
        for bi, (i0, i1) in enumerate(blocks):
            for j0, j1 in blocks[bi:]:
                diag = i0 == j0
                eye = torch.eye(i1 - i0, dtype=torch.bool, device=device) if diag else None
                weight = 1.0 if diag else 2.0
                for li, h in enumerate(block(i0, i1, j0, j1)):
                    if eye is not None:
                        h = h.masked_fill(eye, 0.0)
                    sums[li] = sums[li] + weight * h.sum(dtype=torch.float64)
                    sq[li] = sq[li] + weight * h.detach().pow(2).sum(dtype=torch.float64)
                    if hw is not None and wb is not None:
                        hb = h.detach().to(bootstrap_dtype)
                        hw[li, i0:i1] += hb @ wb[j0:j1]
                        if not diag:
                            hw[li, j0:j1] += hb.T @ wb[i0:i1]
        return UStatPass(torch.stack(sums), torch.stack(sq), hw)


def bootstrap_null_sd(sq_sums: Tensor, n: int) -> Tensor:
    """Standard deviation of the Rademacher wild-bootstrap statistic, exactly.

    For ``U* = sum_{i != j} w_i w_j h_ij / (N (N - 1))`` with independent signs,
    ``Var(U*) = 2 sum_{i != j} h_ij^2 / (N (N - 1))^2``.
    """
    return torch.sqrt(2.0 * sq_sums) / (n * (n - 1))


def default_n_bootstrap(n: int) -> int:
    """Default number of wild-bootstrap draws: 1000 for N <= 5000, then 1000 (5000/N)^2, at least 200."""
    if n <= 5000:
        return 1000
    return max(200, int(math.ceil(1000 * (5000 / n) ** 2)))


def tie_tolerance(z: Tensor) -> Tensor:
    """``1e-9 max(1, max_l |z_l|)`` over the last axis: bootstrap draws within it of the
    statistic count as exceedances (conservative under round-off)."""
    return 1e-9 * z.abs().amax(-1).clamp(min=1.0)


def bootstrap_p_values(stat: Tensor, null: Tensor, tol: Tensor | float = 0.0) -> Tensor:
    """``p = (1 + #{b : null_b >= stat - tol}) / (1 + B)`` in float64; stat (...), null (..., B)."""
    return (1 + (null >= (stat - tol)[..., None]).sum(-1)).double() / (1 + null.shape[-1])


def max_p_values(z: Tensor, z_boot: Tensor, tol: Tensor | None = None) -> Tensor:
    """p-values of ``max_l z_l`` against the draws' ``max_l z*_{l,b}``: z (..., L), z_boot (..., L, B) -> (...).

    The statistics must share their bootstrap draws (the same multipliers), so the
    maximum's null law is theirs jointly. ``tol`` defaults to :func:`tie_tolerance` of z.
    """
    tol = tie_tolerance(z) if tol is None else tol
    return bootstrap_p_values(z.amax(-1), z_boot.amax(-2), tol)


def max_p_value(z: Tensor, z_boot: Tensor, tol: Tensor | None = None) -> float:
    """:func:`max_p_values` of one family, z (L,) and z_boot (L, B), as a float."""
    return float(max_p_values(z, z_boot, tol))


class StandardisedU(NamedTuple):
    """Standardised U-statistics and their wild-bootstrap draws (:func:`wild_bootstrap_max`).

    Attributes:
        u: (L,) float64, the U-statistics U_l.
        sd: (L,) float64, the bootstrap null standard deviations sd_l.
        z: (L,) float64, ``U_l / sd_l`` (0 where sd_l = 0).
        z_boot: (L, B) float64, ``U*_{l,b} / sd_l``.
    """

    u: Tensor
    sd: Tensor
    z: Tensor
    z_boot: Tensor

    def p_value(self, kernels: Sequence[int] | None = None) -> float:
        """p-value of ``max_l z_l`` over ``kernels`` (all by default), calibrated by the shared draws."""
        idx = list(range(self.z.shape[0])) if kernels is None else list(kernels)
        return max_p_value(self.z[idx], self.z_boot[idx], tie_tolerance(self.z))

    def p_value_sum(self) -> float:
        """p-value of ``sum_l z_l`` (the alternative to the maximum), from the same draws."""
        return float(bootstrap_p_values(self.z.sum(), self.z_boot.sum(0), tie_tolerance(self.z)))


def rademacher_multipliers(n: int, n_bootstrap: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(N, B) independent Rademacher signs (float32) from ``generator``: the wild bootstrap's W."""
    return _random.rademacher((n, n_bootstrap), torch.empty(0, dtype=torch.float32, device=device), generator)


def wild_bootstrap_max(
    block: BlockFn,
    n: int,
    n_kernels: int,
    n_bootstrap: int,
    generator: torch.Generator | None,
    *,
    device: torch.device,
    chunk_size: int = 1024,
    multipliers: Tensor | None = None,
) -> StandardisedU:
    """U_l, sd_l, z_l = U_l / sd_l and the bootstrap draws z*_{l,b} of L degenerate U-statistics.

    One :func:`u_statistic_pass` with an (N, B) matrix of Rademacher signs drawn from
    ``generator`` (:func:`rademacher_multipliers`) or given, shared by all kernels (and by
    whatever else the caller calibrates jointly with them). Runs under ``torch.no_grad``.

    Args:
        block: the kernel blocks (:data:`BlockFn`).
        n: number N >= 2 of points.
        n_kernels: number L of kernels.
        n_bootstrap: number B of bootstrap draws.
        generator: random source of the signs (on ``device``); None uses torch's global RNG.
        device: device of the work.
        chunk_size: block size of the pass.
        multipliers: (N, B) signs to use instead of drawing them (``generator`` unused).

    Returns:
        :class:`StandardisedU`.
    """
    with torch.no_grad():
        w = rademacher_multipliers(n, n_bootstrap, generator, device) if multipliers is None else multipliers
        res = u_statistic_pass(block, n, n_kernels, device=device, multipliers=w, chunk_size=chunk_size)
        assert res.hw is not None
        norm = float(n * (n - 1))
        u = res.sums / norm
        sd = bootstrap_null_sd(res.sq_sums, n)
        boot = torch.stack([(w * res.hw[li]).sum(0, dtype=torch.float64) for li in range(n_kernels)]) / norm
        safe = torch.where(sd > 0, sd, torch.full_like(sd, math.inf))
        return StandardisedU(u, sd, u / safe, boot / safe[:, None])
