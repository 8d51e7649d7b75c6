"""Sample-based stationarity tests (SPEC section 5): multi-bandwidth KSD, rollout, combined.

H0: the law p of the samples is stationary for dX = f(X) dt + sqrt(2) dW (SPEC eq. (1)),
i.e. div(p (f - s)) = 0 (SPEC eq. (2)).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from numbers import Real

import torch
from torch import Tensor

from fluxbench import _random
from fluxbench._checks import check_field_output, check_points, check_positive, check_positive_int
from fluxbench._random import generator_from_seed
from fluxbench.verify.report import StationarityReport
from fluxbench.verify.stein import (
    DEFAULT_LENGTHSCALE_FACTORS,
    bootstrap_null_sd,
    default_n_bootstrap,
    ksd_pass,
    median_distance,
    resolve_lengthscales,
)

__all__ = [
    "stationarity_test",
    "combined_p_value",
    "ksd_test",
    "rollout_test",
    "rollout_schedule",
    "METHODS",
    "KSD_OPTIONS",
    "ROLLOUT_OPTIONS",
]

METHODS = ("ksd", "rollout", "combined")
#: Options accepted by ``method="ksd"``.
KSD_OPTIONS = ("lengthscales", "lengthscale_factors", "n_bootstrap", "chunk_size")
#: Options accepted by ``method="rollout"``.
ROLLOUT_OPTIONS = (
    "step_size",
    "n_steps",
    "sampler",
    "n_permutations",
    "mmd_lengthscale",
    "mmd_lengthscale_factors",
    "compute_w2",
    "w2_max_points",
    "eps_factor",
    "time_factor",
    "max_steps",
    "min_steps",
    "chunk_size",
)


# --------------------------------------------------------------------------- validation
def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (Real, Tensor)):
        raise ValueError(f"alpha must be a number in (0, 1); got {alpha!r}")
    value = float(alpha)
    if not (0.0 < value < 1.0) or not math.isfinite(value):
        raise ValueError(f"alpha must be in (0, 1); got {value}")
    return value


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}")
    return int(seed)


def _check_samples(samples: object, min_points: int = 4) -> Tensor:
    x = check_points(samples, "samples")
    if x.shape[0] < min_points:
        raise ValueError(f"samples has N = {x.shape[0]} points; a stationarity test needs N >= {min_points}")
    return x


def _check_options(options: dict, allowed: Sequence[str], method: str) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for method={method!r}; allowed: {', '.join(allowed)}"
        )


def _evaluate(field: Callable[[Tensor], Tensor], x: Tensor, chunk: int | None = None) -> Tensor:
    """f(x) under no_grad, validated (shape, dtype, device, finite)."""
    if not callable(field):
        raise ValueError(f"field must be callable (N, d) -> (N, d); got {type(field).__name__}")
    with torch.no_grad():
        if chunk is None or chunk >= x.shape[0]:
            return check_field_output(field(x), x, "field").detach()
        parts = []
        for i in range(0, x.shape[0], chunk):
            xs = x[i : i + chunk]
            parts.append(check_field_output(field(xs), xs, "field").detach())
        return torch.cat(parts, 0)


# --------------------------------------------------------------------------- KSD
def _standardised_ksd(
    x: Tensor, fx: Tensor, ells: Sequence[float], n_boot: int, gen: torch.Generator, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """U_l, sd_l, z_l = U_l / sd_l (each (L,)) and the bootstrap draws z*_{l,b} (L, B) of :func:`ksd_test`.

    x, fx (N, d); the (N, B) Rademacher multipliers are drawn from ``gen``, shared by all
    lengthscales.
    """
    n = x.shape[0]
    with torch.no_grad():
        w = _random.rademacher((n, n_boot), torch.empty(0, dtype=torch.float32, device=x.device), gen)
        res = ksd_pass(x.detach(), fx, ells, multipliers=w, chunk_size=chunk_size)
        assert res.hw is not None
        norm = float(n * (n - 1))
        u = res.sums / norm  # (L,) float64
        sd = bootstrap_null_sd(res.sq_sums, n)  # (L,)
        boot = torch.stack([(w * res.hw[li]).sum(0, dtype=torch.float64) for li in range(len(ells))]) / norm  # (L, B)
        safe = torch.where(sd > 0, sd, torch.full_like(sd, math.inf))
        return u, sd, u / safe, boot / safe[:, None]


def _tie_tolerance(z: Tensor) -> Tensor:
    """1e-9 max(1, max_l |z_l|) over the last axis: bootstrap draws within it of the
    statistic count as exceedances (conservative under round-off)."""
    return 1e-9 * z.abs().amax(-1).clamp(min=1.0)


def _bootstrap_p_values(stat: Tensor, null: Tensor, tol: Tensor | float = 0.0) -> Tensor:
    """p = (1 + #{b : null_b >= stat - tol}) / (1 + B) in float64; stat (...), null (..., B)."""
    return (1 + (null >= (stat - tol)[..., None]).sum(-1)).double() / (1 + null.shape[-1])


def ksd_test(
    field: Callable[[Tensor], Tensor],
    samples: Tensor,
    *,
    alpha: float = 0.01,
    seed: int = 0,
    lengthscales: float | Sequence[float] | Tensor | None = None,
    lengthscale_factors: Sequence[float] = DEFAULT_LENGTHSCALE_FACTORS,
    n_bootstrap: int | None = None,
    chunk_size: int = 1024,
) -> StationarityReport:
    """Multi-bandwidth generator-KSD test with a Rademacher wild bootstrap (SPEC section 5).

    Statistic. For each lengthscale l in the grid (by default the median heuristic times
    0.25, 0.5 and 1; the median is computed on at most 2000 points) the U-statistic
    ``U_l = sum_{i != j} h_l(x_i, x_j) / (N (N - 1))`` with h_l the Stein kernel of
    :func:`fluxbench.verify.stein_kernel`. Each is standardised by its exact wild-bootstrap
    null standard deviation ``sd_l = sqrt(2 sum_{i != j} h_l^2) / (N (N - 1))`` and the
    statistic is ``T = max_l U_l / sd_l``.

    Null distribution. ``W`` is an (N, B) matrix of independent Rademacher signs, the
    *same* for every lengthscale; ``U*_{l,b} = sum_{i != j} W_ib W_jb h_l(x_i, x_j) / (N (N-1))``
    and ``T*_b = max_l U*_{l,b} / sd_l``. Under H0 the U-statistics are degenerate and the
    wild bootstrap reproduces their joint limiting law (Arcones and Gine 1992; Chwialkowski,
    Strathmann and Gretton, ICML 2016; Schrab, Guedj and Gretton, "KSD Aggregated
    goodness-of-fit test", NeurIPS 2022), so the maximum is calibrated without any
    multiple-testing correction: ``p = (1 + #{b : T*_b >= T}) / (1 + B)``.

    Why a maximum over a grid, and why this one. A single median-heuristic bandwidth is
    blind to perturbations living at shorter scales (SPEC section 5: between separated
    modes the field differs from the score only on the saddles, which only lengthscales
    that resolve them see: on calibration seeds 1000-1099, ``ring-temp07`` is detected 0.45
    of the time at the median alone, 1.00 with the grid). Taking the maximum of standardised
    statistics spends power on the lengthscale that sees the perturbation, and sharing the
    multipliers keeps the correlation between lengthscales in the null law (a Bonferroni
    correction over the grid would be valid but conservative). Each extra lengthscale
    still raises the null maximum. Lengthscales above the median (an earlier grid ran
    from 0.25 to 4) were needed by no required calibration case (drifts and temperature
    errors, also in d = 20, are seen at the median) and cost power where the median is
    what sees the error: on seeds 1000-1099, ``iso2-rot_sym`` (a symmetric error under a
    rotation) 0.88 with the wide grid, 0.95 with this one. The price is a little power
    on small temperature errors in d = 2, which longer lengthscales see slightly better
    (``iso2-temp09``, W2 0.076: 0.74 against 0.71). ``tools/ksd_grid.py`` compares grids;
    pass ``lengthscale_factors`` for other scales. A sum of kernels was the alternative; it is
    dominated by whichever lengthscale has the largest null spread and averages the signal
    of one lengthscale with the noise of the others. The calibration
    (``python -m fluxbench.verify.calibrate``, ``results/calibration/``) measures the max
    against the plain median-bandwidth test and against the sum of standardised
    statistics; both are recorded in ``details`` (``p_value_median``, ``p_value_sum``) from
    the same pass at no extra cost.

    Cost. One chunked pass over the pairs i < j (blocks of ``chunk_size``; memory a few
    ``chunk_size^2`` values per lengthscale, never N x N) computes every U_l, sd_l and
    the products ``H_l W`` (float32 GEMMs). The number of bootstrap draws is ``n_bootstrap``
    or by default 1000 for N <= 5000 and ``max(200, 1000 (5000 / N)^2)`` above (200 at
    N = 20000; the p-value is exact for any B, only its resolution 1 / (B + 1) changes).
    Time is O(N^2 L (d + B)).

    Args:
        field: callable (N, d) -> (N, d); evaluated once on the samples, under no_grad.
        samples: (N, d) samples claimed stationary for ``field``, N >= 4.
        alpha: level in (0, 1).
        seed: seed of the multipliers and of the median-heuristic subsample.
        lengthscales: explicit lengthscale(s) instead of the grid.
        lengthscale_factors: the grid in units of the median heuristic.
        n_bootstrap: B; default as above.
        chunk_size: block size of the pairwise pass.

    Returns:
        :class:`StationarityReport` with ``method="ksd"``; ``details`` holds
        ``standardised`` (U_l / sd_l), ``p_value_per_lengthscale`` (each lengthscale
        alone), ``p_value_median`` (the factor-1 lengthscale alone, when in the grid) and
        ``p_value_sum`` (sum of the standardised statistics).
    """
    start = time.perf_counter()
    x = _check_samples(samples)
    alpha = _check_alpha(alpha)
    seed = _check_seed(seed)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    n, d = x.shape
    gen = generator_from_seed(seed, x.device)
    factors = [check_positive(c, "lengthscale factor") for c in lengthscale_factors]
    if not factors:
        raise ValueError("lengthscale_factors is empty")
    ells, med = resolve_lengthscales(x, lengthscales, factors=factors, generator=gen)
    n_boot = default_n_bootstrap(n) if n_bootstrap is None else check_positive_int(n_bootstrap, "n_bootstrap")
    u, sd, z, zb = _standardised_ksd(x, _evaluate(field, x), ells, n_boot, gen, chunk_size)
    tol = _tie_tolerance(z)

    def pval(obs: Tensor, null: Tensor) -> float:
        return float(_bootstrap_p_values(obs, null, tol))

    stat = z.max()
    p = pval(stat, zb.max(0).values)
    per_l = [pval(z[li], zb[li]) for li in range(len(ells))]
    p_sum = pval(z.sum(), zb.sum(0))
    details: dict = {
        "standardised": tuple(float(v) for v in z),
        "p_value_per_lengthscale": tuple(per_l),
        "p_value_sum": p_sum,
        "statistic_rule": "max over lengthscales of U_l / sd_l, shared Rademacher multipliers",
    }
    if med is not None and 1.0 in factors:
        details["p_value_median"] = per_l[factors.index(1.0)]
    return StationarityReport(
        method="ksd",
        statistic=float(stat),
        p_value=p,
        alpha=alpha,
        passed=p >= alpha,
        n=n,
        d=d,
        seed=seed,
        lengthscales=tuple(ells),
        median_lengthscale=med,
        n_bootstrap=n_boot,
        ksd2=tuple(float(v) for v in u),
        ksd2_sd=tuple(float(v) for v in sd),
        details=details,
        elapsed_s=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------- rollout
def default_n_permutations(n: int) -> int:
    """Default permutations of the rollout's MMD test: as :func:`default_n_bootstrap` (1000 up to N = 5000)."""
    return default_n_bootstrap(n)


def rollout_schedule(
    field: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    generator: torch.Generator | None = None,
    eps_factor: float = 0.02,
    time_factor: float = 20.0,
    max_steps: int = 20000,
    min_steps: int = 500,
    n_probe: int = 256,
) -> tuple[float, int, dict]:
    """Default step size and number of steps of the rollout test, from the field's Jacobian.

    Central finite differences along random unit directions v at (at most) ``n_probe``
    sample points estimate ``lam = mean(-v^T J v)`` (the contraction rate: for
    f = (I + Q) s with s = -S x it is mean eig(S), independent of Q) and
    ``lip^2 = mean |J v|^2`` (it includes the rotation). Then

        eps = eps_factor * lam_eff / lip^2,     T = time_factor / lam_eff,
        n_steps = clip(ceil(T / eps), min_steps, max_steps),

    with ``lam_eff = max(lam, lip / 10)`` (fields that do not contract on average, e.g. a
    pure rotation, still get a finite horizon). Rationale: for a linear field
    f = -(I + Q) S x the ULA stationary covariance is Sigma + eps Delta with
    (I+Q)S Delta + Delta S(I-Q) = (I+Q)S S^-1 S(I-Q), whose size relative to Sigma is about
    eps (lam + omega^2 / lam) / 2 with omega the rotation rate, i.e. about
    ``eps_factor / 2`` = 1% of the variance with the defaults: well below what an MMD
    test on N = 1000 + 1000 points resolves (the calibration measures it). T is
    ``time_factor`` relaxation times of the contracting part, long enough for a
    perturbation of the stationary law to show (for separated modes, long enough only if
    the barrier is crossed on that time scale: reported honestly by the calibration).
    If ``max_steps`` clips the steps, the total time is shorter than T.

    Args:
        field: the field.
        x: (N, d) points (the held-in half).
        generator: random source of the probe points and directions.
        eps_factor: relative ULA variance bias budget (about 2x the bias).
        time_factor: horizon in relaxation times.
        max_steps, min_steps: bounds on the number of steps.
        n_probe: probe points.

    Returns:
        ``(eps, n_steps, info)`` with ``info`` holding ``lam``, ``lip``, ``horizon``.
    """
    n, d = x.shape
    m = min(n, n_probe)
    idx = torch.randperm(n, generator=generator, device=x.device)[:m]
    xs = x[idx]
    v = _random.normal((m, d), xs, generator)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    scale = float(x.detach().var(dim=0).mean().sqrt()) if n > 1 else 1.0
    scale = scale if scale > 0 else 1.0
    rel = 1e-4 if x.dtype == torch.float64 else 1e-2
    h = rel * scale
    with torch.no_grad():
        fp = check_field_output(field(xs + h * v), xs, "field")
        fm = check_field_output(field(xs - h * v), xs, "field")
        jv = ((fp - fm) / (2 * h)).double()
    vd = v.double()
    lam = float(-(vd * jv).sum(1).mean())
    lip = float(jv.pow(2).sum(1).mean().sqrt())
    lip = max(lip, 1e-3 / scale**2)
    lam_eff = max(lam, lip / 10.0)
    eps = eps_factor * lam_eff / lip**2
    horizon = time_factor / lam_eff
    n_steps = int(min(max(math.ceil(horizon / eps), min_steps), max_steps))
    return eps, n_steps, {"lam": lam, "lip": lip, "horizon": horizon, "clipped": n_steps * eps < horizon * (1 - 1e-9)}


def rollout_test(
    field: Callable[[Tensor], Tensor],
    samples: Tensor,
    *,
    alpha: float = 0.01,
    seed: int = 0,
    step_size: float | None = None,
    n_steps: int | None = None,
    sampler: Callable[..., Tensor] | None = None,
    n_permutations: int | None = None,
    mmd_lengthscale: float | None = None,
    mmd_lengthscale_factors: Sequence[float] | None = None,
    compute_w2: bool = True,
    w2_max_points: int = 2000,
    eps_factor: float = 0.02,
    time_factor: float = 20.0,
    max_steps: int = 20000,
    min_steps: int = 500,
    chunk_size: int | None = None,
) -> StationarityReport:
    """Rollout test (SPEC section 5): run the sampler from held-in samples, compare with held-out.

    The samples are split at random into a held-in half (floor(N/2) points) and a held-out
    half. Chains start at the held-in points and run ``fluxbench.samplers.langevin``
    (unadjusted Langevin, ``x <- x + eps f(x) + sqrt(2 eps) xi``) for ``n_steps`` steps of
    size ``eps`` (or a user ``sampler(field, x0, generator) -> x``). Under H0 with an exact
    sampler the end cloud has law p and is independent of the held-out half, so a
    permutation test of end cloud vs held-out is exact: the MMD permutation test
    (:func:`fluxbench.metrics.mmd_permutation_test`, median-heuristic lengthscale on the
    pooled clouds, ``n_permutations`` relabellings; or, opt-in, aggregated over several
    lengthscales); its p-value is the test's p-value. Reported next to it: W2 between
    end cloud and held-out (:func:`fluxbench.metrics.w2`) against its noise floor, the W2
    between the held-in and held-out halves (each cloud subsampled to ``w2_max_points``).

    Discretisation bias: ULA's stationary law is p only up to O(eps). The default
    schedule (:func:`rollout_schedule`) picks eps from a finite-difference estimate of
    the field's Jacobian so that the relative variance bias is about 1%, and a horizon
    of 20 relaxation times (at most ``max_steps`` = 20000 steps). The calibration
    (``results/calibration/``) measures the false-alarm rate this leaves. Always report
    eps with the result (it is in the report).

    Args:
        field: the field.
        samples: (N, d) samples, N >= 4.
        alpha: level.
        seed: seed of the split, the schedule probes, the sampler noise, the permutations
            and the W2 subsamples.
        step_size: eps; default from :func:`rollout_schedule`.
        n_steps: number of steps; default from :func:`rollout_schedule` (if only
            ``step_size`` is given: ceil(horizon / eps), clipped).
        sampler: optional ``sampler(field, x0, generator) -> x_end`` replacing Langevin
            (``step_size`` and ``n_steps`` are then only reported, as given).
        n_permutations: permutations of the MMD test; default 1000 for N <= 5000, then
            ``max(200, 1000 (5000 / N)^2)`` (the permutation test costs O(N^2 B); 200 still
            resolves p < 0.005, the level of each half of ``"combined"`` at alpha = 0.01).
        mmd_lengthscale: the MMD lengthscale; default the median heuristic of the pooled
            clouds.
        mmd_lengthscale_factors: opt-in: instead of one lengthscale, the aggregated test
            of :func:`fluxbench.metrics.mmd_aggregated_test` over the median heuristic
            times these factors (e.g. ``(0.25, 0.5, 1, 2, 4)``; min-p, calibrated by the
            shared permutations). More power against changes of scale in higher
            dimension, but its short lengthscales also resolve the O(eps) bias of ULA:
            measured here with the default schedule, N = 20000 in d = 64 with the exact
            score gave p = 1/201 on two seeds (eps 0.02; fine with ``eps_factor=0.005``).
            Not part of the calibrated default.
        compute_w2: compute the W2 and its noise floor (POT, CPU).
        w2_max_points: subsample size cap of each cloud for W2.
        eps_factor, time_factor, max_steps, min_steps: schedule parameters
            (:func:`rollout_schedule`).
        chunk_size: evaluate the field on at most this many chains at a time.

    Returns:
        :class:`StationarityReport` with ``method="rollout"``, ``eps``, ``n_steps``,
        ``total_time``, ``mmd2``, ``w2``, ``w2_noise_floor``; ``details`` holds the
        schedule estimates (``lam``, ``lip``, ``horizon``).
    """
    from fluxbench.metrics import mmd_aggregated_test, mmd_permutation_test, w2
    from fluxbench.samplers import langevin

    start = time.perf_counter()
    x = _check_samples(samples)
    alpha = _check_alpha(alpha)
    seed = _check_seed(seed)
    n_permutations = (
        default_n_permutations(x.shape[0]) if n_permutations is None else check_positive_int(n_permutations, "n_permutations")
    )
    w2_max_points = check_positive_int(w2_max_points, "w2_max_points", minimum=2)
    if not callable(field):
        raise ValueError(f"field must be callable (N, d) -> (N, d); got {type(field).__name__}")
    if sampler is not None and not callable(sampler):
        raise ValueError(f"sampler must be callable (field, x0, generator) -> x; got {type(sampler).__name__}")
    n, d = x.shape
    gen = generator_from_seed(seed, x.device)
    x = x.detach()
    perm = torch.randperm(n, generator=gen, device=x.device)
    n_in = n // 2
    held_in, held_out = x[perm[:n_in]], x[perm[n_in:]]
    # the field contract is checked once on the samples (clear error before any rollout)
    _evaluate(field, held_in, chunk_size)

    info: dict = {}
    eps: float | None
    if sampler is None:
        if step_size is None or n_steps is None:
            eps0, steps0, info = rollout_schedule(
                field,
                held_in,
                generator=gen,
                eps_factor=check_positive(eps_factor, "eps_factor"),
                time_factor=check_positive(time_factor, "time_factor"),
                max_steps=check_positive_int(max_steps, "max_steps"),
                min_steps=check_positive_int(min_steps, "min_steps"),
            )
        eps = check_positive(step_size, "step_size") if step_size is not None else eps0
        if n_steps is not None:
            steps = check_positive_int(n_steps, "n_steps")
        elif step_size is not None:
            steps = int(min(max(math.ceil(info["horizon"] / eps), min_steps), max_steps))
        else:
            steps = steps0
        end = langevin(field, held_in, step_size=eps, n_steps=steps, generator=gen, chunk_size=chunk_size)
    else:
        eps = None if step_size is None else check_positive(step_size, "step_size")
        steps = None if n_steps is None else check_positive_int(n_steps, "n_steps", minimum=0)
        with torch.no_grad():
            end = sampler(field, held_in.clone(), gen)
        check_points(end, "sampler output", dim=d)
        if end.shape[0] != n_in or end.device != x.device or end.dtype != x.dtype:
            raise ValueError(
                f"sampler output must have shape ({n_in}, {d}), dtype {x.dtype} and device {x.device}; "
                f"got shape {tuple(end.shape)}, dtype {end.dtype}, device {end.device}"
            )
    end = end.detach()
    mmd_info: dict = {}
    if mmd_lengthscale_factors is not None:
        if mmd_lengthscale is not None:
            raise ValueError("give mmd_lengthscale or mmd_lengthscale_factors, not both")
        factors = [check_positive(c, "MMD lengthscale factor") for c in mmd_lengthscale_factors]
        if not factors:
            raise ValueError("mmd_lengthscale_factors is empty")
    ell = median_distance(torch.cat([end, held_out]), generator=gen) if mmd_lengthscale is None else check_positive(
        mmd_lengthscale, "mmd_lengthscale"
    )
    if mmd_lengthscale_factors is not None:
        agg = mmd_aggregated_test(
            end, held_out, lengthscales=[c * ell for c in factors], n_permutations=n_permutations, generator=gen
        )
        p = agg.p_value
        # mmd2 is reported at mmd_lengthscale (the median): only when the grid contains it
        mmd2 = float(agg.statistics[factors.index(1.0)]) if 1.0 in factors else None
        statistic = min(agg.p_values)
        mmd_info = {
            "mmd_rule": "min-p over lengthscales, calibrated by the shared permutations",
            "mmd_lengthscales": agg.lengthscales,
            "mmd2_per_lengthscale": tuple(float(v) for v in agg.statistics),
            "mmd_p_value_per_lengthscale": agg.p_values,
        }
    else:
        res = mmd_permutation_test(end, held_out, lengthscale=ell, n_permutations=n_permutations, generator=gen)
        p = float(res.p_value)
        mmd2 = statistic = float(res.statistic)
    w2_val = floor = None
    if compute_w2:

        def sub(t: Tensor) -> Tensor:
            if t.shape[0] <= w2_max_points:
                return t
            return t[torch.randperm(t.shape[0], generator=gen, device=t.device)[:w2_max_points]]

        e_s, o_s, i_s = sub(end), sub(held_out), sub(held_in)
        w2_val = w2(e_s, o_s)
        floor = w2(i_s, o_s)
    info = {**info, **mmd_info, "n_held_in": n_in, "n_held_out": n - n_in, "sampler": "langevin" if sampler is None else repr(sampler)}
    return StationarityReport(
        method="rollout",
        statistic=statistic,
        p_value=p,
        alpha=alpha,
        passed=p >= alpha,
        n=n,
        d=d,
        seed=seed,
        eps=eps,
        n_steps=steps,
        total_time=None if eps is None or steps is None else eps * steps,
        mmd2=mmd2,
        mmd_lengthscale=ell,
        n_permutations=n_permutations,
        w2=w2_val,
        w2_noise_floor=floor,
        details=info,
        elapsed_s=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------- front door
def combined_p_value(p_ksd: float, p_rollout: float) -> float:
    """The p-value of ``method="combined"``: Bonferroni over the two tests, ``min(1, 2 min(p_ksd, p_rollout))``."""
    return min(1.0, 2.0 * min(p_ksd, p_rollout))


def stationarity_test(
    field: Callable[[Tensor], Tensor],
    samples: Tensor,
    *,
    alpha: float = 0.01,
    method: str = "ksd",
    seed: int = 0,
    **options: object,
) -> StationarityReport:
    """Test H0: "the law of ``samples`` is stationary for dX = f dt + sqrt(2) dW" (SPEC section 5).

    Methods:

    * ``"ksd"``: the generator kernel Stein discrepancy, maximum over a lengthscale grid
      of standardised U-statistics, wild-bootstrap p-value (:func:`ksd_test`). Needs only
      f at the samples (one evaluation each): no score, no density, no divergence, no
      discretisation.
    * ``"rollout"``: Langevin (or a user ``sampler``) from a held-in half, MMD permutation
      test against the held-out half, W2 against its noise floor (:func:`rollout_test`).
      Sees what a user's sampler does, including slow mass transfer between modes; biased
      by the discretisation (eps is reported).
    * ``"combined"``: both, each at level alpha/2 with the same seed (Bonferroni); rejects if
      either rejects; ``p_value = min(1, 2 min(p_ksd, p_rollout))``, ``statistic`` the
      smaller sub-test p-value, the sub-reports in ``sub_reports``.

    Args:
        field: callable on (N, d) tensors returning (N, d) with the same dtype and device.
        samples: (N, d) samples, N >= 4, finite.
        alpha: level in (0, 1); ``passed`` is ``p_value >= alpha``.
        method: ``"ksd"``, ``"rollout"`` or ``"combined"``.
        seed: all randomness of the test comes from this seed (same seed, same p-value).
        **options: method options (:data:`KSD_OPTIONS`, :data:`ROLLOUT_OPTIONS`; combined
            takes both, ``chunk_size`` going to both).

    Returns:
        :class:`StationarityReport`.

    Raises:
        ValueError: bad samples (shape, NaN, N < 4), alpha not in (0, 1), an unknown
            method or option, or a field output of the wrong shape, dtype or device or
            with NaN.

    Example:
        >>> from fluxbench.targets import Gaussian
        >>> p = Gaussian.isotropic(2)
        >>> x = p.sample(500, generator=torch.Generator().manual_seed(0))
        >>> stationarity_test(p.score, x).passed
        True
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    x = _check_samples(samples)
    alpha = _check_alpha(alpha)
    seed = _check_seed(seed)
    if not callable(field):
        raise ValueError(f"field must be callable (N, d) -> (N, d); got {type(field).__name__}")
    if method == "ksd":
        _check_options(options, KSD_OPTIONS, method)
        return ksd_test(field, x, alpha=alpha, seed=seed, **options)  # type: ignore[arg-type]
    if method == "rollout":
        _check_options(options, ROLLOUT_OPTIONS, method)
        return rollout_test(field, x, alpha=alpha, seed=seed, **options)  # type: ignore[arg-type]
    _check_options(options, tuple(set(KSD_OPTIONS) | set(ROLLOUT_OPTIONS)), method)
    start = time.perf_counter()
    ksd_opts = {k: v for k, v in options.items() if k in KSD_OPTIONS}
    roll_opts = {k: v for k, v in options.items() if k in ROLLOUT_OPTIONS}
    r_ksd = ksd_test(field, x, alpha=alpha / 2, seed=seed, **ksd_opts)  # type: ignore[arg-type]
    r_roll = rollout_test(field, x, alpha=alpha / 2, seed=seed, **roll_opts)  # type: ignore[arg-type]
    p_min = min(r_ksd.p_value, r_roll.p_value)
    p = combined_p_value(r_ksd.p_value, r_roll.p_value)
    return StationarityReport(
        method="combined",
        statistic=p_min,
        p_value=p,
        alpha=alpha,
        passed=r_ksd.passed and r_roll.passed,
        n=x.shape[0],
        d=x.shape[1],
        seed=seed,
        lengthscales=r_ksd.lengthscales,
        median_lengthscale=r_ksd.median_lengthscale,
        n_bootstrap=r_ksd.n_bootstrap,
        ksd2=r_ksd.ksd2,
        ksd2_sd=r_ksd.ksd2_sd,
        eps=r_roll.eps,
        n_steps=r_roll.n_steps,
        total_time=r_roll.total_time,
        mmd2=r_roll.mmd2,
        mmd_lengthscale=r_roll.mmd_lengthscale,
        n_permutations=r_roll.n_permutations,
        w2=r_roll.w2,
        w2_noise_floor=r_roll.w2_noise_floor,
        sub_reports={"ksd": r_ksd, "rollout": r_roll},
        details={"rule": "Bonferroni: each sub-test at alpha/2, reject if either rejects"},
        elapsed_s=time.perf_counter() - start,
    )
