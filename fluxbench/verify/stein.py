"""Generator kernel Stein discrepancy (SPEC section 5): the Stein kernel, KSD^2 and its bootstrap.

For the Langevin SDE dX = f(X) dt + sqrt(2) dW (SPEC eq. (1)) the generator is
``L_f phi = f . grad phi + Lap phi`` and p is stationary iff ``E_p[L_f phi] = 0`` for every
test function phi (SPEC section 1, "Generator form"). With the RBF kernel
``k(x, y) = exp(-|x - y|^2 / (2 l^2))``, ``a = 1 / l^2``, ``delta = x - y``, ``fx = f(x)``,
``fy = f(y)``, applying ``L_f`` in x and in y to k gives the Stein kernel (SPEC section 5)

    h(x, y) = k [ a fx.fy - a^2 (fx.delta)(fy.delta) + a^2 (a|delta|^2 - d - 2) (fy - fx).delta
                  + (a^2 |delta|^2 - a d)^2 - 4 a^3 |delta|^2 + 2 a^2 d ]

and ``KSD^2 = E_{x, y ~ p} h(x, y) = ||integral k(., y) div(p u)(y) dy||_H^2 >= 0``, zero iff
``div(p (f - s)) = 0`` (the kernel is characteristic). Only f is needed, evaluated once per
sample: no score, no density, no divergence of f.

Implementation notes (all pairwise work is chunked, see :func:`ksd_pass`):

* the inner products come from matrix products, ``fx.delta = fx.x - fx.y`` and
  ``fy.delta = fy.x - fy.y``, after centring x on its mean (distances are unchanged);
* the bracket is evaluated in the factorised form, with ``t = a |delta|^2 - d``,
  ``h = k [a fx.fy + a^2 (c2 - 2 c3 - 2 d + t (c3 + t - 4))]``,
  ``c2 = -(fx.delta)(fy.delta)``, ``c3 = (fy - fx).delta`` (algebraically identical to the
  SPEC form; the shared terms are computed once for all lengthscales);
* sums are accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from fluxbench._checks import check_field_output, check_points, check_positive, check_positive_int, check_same_space
from fluxbench._random import generator_from_seed
from fluxbench._pairwise import median_bandwidth, no_autocast, sq_dists_expanded, working_dtype
from fluxbench.ustat import BlockFn, StandardisedU, UStatPass, u_statistic_pass, wild_bootstrap_max

__all__ = ["stein_kernel", "stein_blocks", "ksd2", "ksd_pass", "ksd_bootstrap", "resolve_lengthscales", "DEFAULT_LENGTHSCALE_FACTORS"]

#: Default lengthscale grid of the KSD test, in units of the median heuristic: the median
#: and two octaves below it (chosen on calibration seeds 1000-1099, see
#: ``results/calibration/ksd-grid/``).
DEFAULT_LENGTHSCALE_FACTORS: tuple[float, ...] = (0.25, 0.5, 1.0)


class _PairTerms(NamedTuple):
    """Lengthscale-free pairwise terms of one (n, m) block."""

    dist2: Tensor  # |delta|^2
    c1: Tensor  # fx . fy
    c2: Tensor  # -(fx . delta)(fy . delta) - 2 (fy - fx) . delta - 2 d
    c3: Tensor  # (fy - fx) . delta


def _pair_terms(x: Tensor, y: Tensor, fx: Tensor, fy: Tensor) -> _PairTerms:
    """Shared terms of one block; x, y already centred and in the working dtype (no checks).

    ``c2 - 2 c3 - 2 d`` is stored in place of c2 (it is all the kernel needs).
    """
    d = x.shape[1]
    dist2 = sq_dists_expanded(x, y)
    c1 = fx @ fy.T
    gx = (fx * x).sum(1, keepdim=True) - fx @ y.T  # fx . (x - y)
    gy = x @ fy.T - (fy * y).sum(1).unsqueeze(0)  # fy . (x - y)
    c3 = gy - gx
    c2 = -(gx * gy) - 2.0 * c3 - 2.0 * d
    return _PairTerms(dist2, c1, c2, c3)


def _stein_from_terms(t: _PairTerms, a: float, d: int, *, inplace: bool = False) -> Tensor:
    """h for one lengthscale (a = 1 / l^2) from the shared terms.

    h = k [a c1 + a^2 (c2' + t (c3 + t - 4))], t = a |delta|^2 - d, c2' = c2 - 2 c3 - 2 d.
    ``inplace`` reuses temporaries (only when no gradient is needed).
    """
    ad2 = t.dist2 * a
    tt = ad2 - d
    if inplace:
        inner = (t.c3 + tt).sub_(4.0).mul_(tt).add_(t.c2)
        bracket = inner.mul_(a * a).add_(t.c1, alpha=a)
        return bracket.mul_(ad2.mul_(-0.5).exp_())
    inner = (t.c3 + tt - 4.0) * tt + t.c2
    return (a * a * inner + a * t.c1) * torch.exp(-0.5 * ad2)


def stein_kernel(x: Tensor, y: Tensor, fx: Tensor, fy: Tensor, lengthscale: float | Tensor) -> Tensor:
    """The Stein kernel block ``H_ij = h(x_i, y_j)`` of SPEC section 5 (``L_f`` in x and y of k).

    ``h(x, y) = k [a fx.fy - a^2 (fx.delta)(fy.delta) + a^2 (a|delta|^2 - d - 2)(fy - fx).delta
    + (a^2|delta|^2 - a d)^2 - 4 a^3 |delta|^2 + 2 a^2 d]`` with
    ``k = exp(-|delta|^2 / (2 l^2))``, ``a = 1 / l^2``, ``delta = x - y``.
    The full (N, M) block is returned: for large clouds use :func:`ksd2`, which is chunked.

    Args:
        x: (N, d) points.
        y: (M, d) points, same d, dtype and device.
        fx: (N, d) field values f(x_i).
        fy: (M, d) field values f(y_j).
        lengthscale: l > 0.

    Returns:
        (N, M) tensor in ``working_dtype(x.dtype)`` (at least float32), autocast disabled.

    Raises:
        ValueError: on bad shapes, NaN, mismatched dtype/device, or ``lengthscale <= 0``.
    """
    check_points(x, "x")
    check_points(y, "y")
    check_same_space(x, y, "x", "y")
    check_field_output(fx, x, "fx")
    check_field_output(fy, y, "fy")
    ell = check_positive(lengthscale, "lengthscale")
    dtype = working_dtype(x.dtype)
    with no_autocast(x.device):
        centre = x.detach().to(dtype).mean(0, keepdim=True)
        xw, yw = x.to(dtype) - centre, y.to(dtype) - centre
        terms = _pair_terms(xw, yw, fx.to(dtype), fy.to(dtype))
        return _stein_from_terms(terms, 1.0 / ell**2, x.shape[1], inplace=not torch.is_grad_enabled())


def stein_blocks(x: Tensor, fx: Tensor, lengthscales: Sequence[float]) -> BlockFn:
    """The Stein kernel's blocks for :func:`fluxbench.ustat.u_statistic_pass` (no checks).

    x, fx (N, d) in any float dtype (work in ``working_dtype``, x centred on its mean);
    the shared pairwise terms of a block are computed once for all L lengthscales and each
    lengthscale's block is produced on demand (in place when no gradient is needed).
    :func:`fluxbench.ustat.u_statistic_pass` evaluates them with autocast off.
    """
    d = x.shape[1]
    dtype = working_dtype(x.dtype)
    xw = x.to(dtype)
    xw = xw - xw.detach().mean(0, keepdim=True)
    fw = fx.to(dtype)
    avals = [1.0 / float(ell) ** 2 for ell in lengthscales]
    inplace = not (torch.is_grad_enabled() and (xw.requires_grad or fw.requires_grad))

    def block(i0: int, i1: int, j0: int, j1: int) -> Iterator[Tensor]:
        terms = _pair_terms(xw[i0:i1], xw[j0:j1], fw[i0:i1], fw[j0:j1])
        for a in avals:
            yield _stein_from_terms(terms, a, d, inplace=inplace)

    return block


def ksd_pass(
    x: Tensor,
    fx: Tensor,
    lengthscales: Sequence[float],
    *,
    multipliers: Tensor | None = None,
    chunk_size: int = 1024,
    bootstrap_dtype: torch.dtype = torch.float32,
) -> UStatPass:
    """One chunked pass over the pairs i != j of the Stein kernel for several lengthscales (no checks).

    :func:`fluxbench.ustat.u_statistic_pass` over :func:`stein_blocks`: only blocks
    (I, J) with I <= J are evaluated; peak memory is a few ``chunk_size^2`` blocks (never
    N x N unless ``chunk_size >= N``) plus the (L, N, B) bootstrap products.

    Args:
        x: (N, d) points (any float dtype; work is done in ``working_dtype``).
        fx: (N, d) field values.
        lengthscales: the L lengthscales.
        multipliers: optional (N, B) bootstrap multipliers W.
        chunk_size: block size.
        bootstrap_dtype: dtype of the ``H @ W`` products.

    Returns:
        :class:`fluxbench.ustat.UStatPass`.
    """
    return u_statistic_pass(
        stein_blocks(x, fx, lengthscales),
        x.shape[0],
        len(lengthscales),
        device=x.device,
        multipliers=multipliers,
        chunk_size=chunk_size,
        bootstrap_dtype=bootstrap_dtype,
    )


def ksd_bootstrap(
    x: Tensor,
    fx: Tensor,
    lengthscales: Sequence[float],
    n_bootstrap: int,
    generator: torch.Generator | None,
    chunk_size: int,
    multipliers: Tensor | None = None,
) -> StandardisedU:
    """The KSD U-statistics of each lengthscale, standardised, with their wild-bootstrap draws (no checks).

    :func:`fluxbench.ustat.wild_bootstrap_max` over :func:`stein_blocks`: x, fx (N, d);
    the (N, B) Rademacher multipliers are ``multipliers`` or drawn from ``generator``, and
    shared by all lengthscales. What :func:`fluxbench.verify.ksd_test` and
    ``tools/ksd_grid.py`` compute.
    """
    return wild_bootstrap_max(
        stein_blocks(x.detach(), fx.detach(), lengthscales),
        x.shape[0],
        len(lengthscales),
        n_bootstrap,
        generator,
        device=x.device,
        chunk_size=chunk_size,
        multipliers=multipliers,
    )


def resolve_lengthscales(
    x: Tensor,
    lengthscales: float | Tensor | Sequence[float] | None,
    *,
    factors: Sequence[float] = (1.0,),
    generator: torch.Generator | None = None,
) -> tuple[list[float], float | None]:
    """Lengthscales to use: the given ones, or ``median_bandwidth(x) * factors``.

    Returns:
        (list of lengthscales, the median heuristic or None when lengthscales were given).
    """
    if lengthscales is None:
        med = median_bandwidth(x.detach(), generator=generator)
        out = [med * check_positive(c, "lengthscale factor") for c in factors]
        return out, med
    if isinstance(lengthscales, Tensor):
        vals = [float(v) for v in lengthscales.detach().reshape(-1).tolist()]
    elif isinstance(lengthscales, (int, float)):
        vals = [float(lengthscales)]
    else:
        vals = [float(v) for v in lengthscales]
    if not vals:
        raise ValueError("lengthscales is empty; give at least one lengthscale or None")
    return [check_positive(v, "lengthscale") for v in vals], None


def ksd2(
    field: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    lengthscales: float | Tensor | Sequence[float] | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Unbiased U-statistic estimate of the generator KSD^2 (SPEC section 5).

    ``KSD_u^2 = 1 / (N (N - 1)) sum_{i != j} h(x_i, x_j)`` with h the Stein kernel of
    :func:`stein_kernel`. f is evaluated once on x. Its expectation is the population
    KSD^2 >= 0, which vanishes iff the law of x is stationary for f; the estimate itself
    can be negative. The sum is taken in ``chunk_size`` blocks (memory ~ chunk_size^2,
    never N x N) in ``working_dtype(x.dtype)`` with float64 accumulation. Differentiable
    with respect to the field's parameters (f is not evaluated under ``no_grad``).

    Args:
        field: callable (N, d) -> (N, d), same dtype and device.
        x: (N, d) samples, N >= 2.
        lengthscales: one lengthscale (float), several (a sequence or 1-D tensor), or None
            for the median heuristic :func:`fluxbench.kernels.median_bandwidth` (computed on
            at most 2000 points; the subsample uses a generator seeded with 0).
        chunk_size: block size of the pairwise sums, >= 1.

    Returns:
        0-d tensor for one lengthscale (a float or None), or (L,) tensor for a sequence, in
        float64 (the accumulation dtype).

    Raises:
        ValueError: on bad points, N < 2, bad lengthscales or a bad field output.
    """
    check_points(x, "x")
    if x.shape[0] < 2:
        raise ValueError(f"x has {x.shape[0]} points; the KSD U-statistic needs at least 2")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    scalar = lengthscales is None or isinstance(lengthscales, (int, float)) or (
        isinstance(lengthscales, Tensor) and lengthscales.ndim == 0
    )
    ells, _ = resolve_lengthscales(x, lengthscales, generator=generator_from_seed(0, x.device))
    fx = check_field_output(field(x), x, "field")
    n = x.shape[0]
    res = ksd_pass(x, fx, ells, chunk_size=chunk_size)
    out = res.sums / (n * (n - 1))
    return out[0] if scalar else out
