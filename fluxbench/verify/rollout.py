"""The rollout stationarity test (SPEC section 5): run a sampler from the samples, compare where the chains end.

H0: the law p of the samples is stationary for dX = f(X) dt + sqrt(2) dW (SPEC eq. (1)).
:func:`fluxbench.verify.stationarity_test` with ``method="rollout"`` calls
:func:`rollout_test`; :func:`rollout_schedule` picks its step size and horizon.

Over 400 lines: one test, its schedule and its chains, most of it the docstrings that
state the designs, the schedule's rationale and the measured discretisation bias.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fluxbench import _random
from fluxbench._checks import check_field_output, check_points, check_positive, check_positive_int, check_seed
from fluxbench._random import generator_from_seed
from fluxbench._pairwise import median_bandwidth
from fluxbench.ustat import default_n_bootstrap
from fluxbench.verify._inputs import check_alpha, check_samples, evaluate_field
from fluxbench.verify.report import StationarityReport

__all__ = ["rollout_test", "rollout_schedule", "rollout_chains", "default_eps_factor", "EPS_REFERENCE_N"]


#: Sample size up to which the rollout's step size is not reduced (the calibration's N).
EPS_REFERENCE_N = 2000


def default_eps_factor(n: int) -> float:
    """The rollout's default ``eps_factor`` for n chains: ``0.02 min(1, sqrt(2000 / n))``.

    ULA's relative variance bias is about ``eps_factor / 2``; a bias b moves the test's
    standardised statistic by about ``n b^2``, so ``eps ~ n^-1/2`` keeps that at its size
    at n = 2000, where the calibration measured the false-alarm rate.
    """
    return 0.02 * min(1.0, math.sqrt(EPS_REFERENCE_N / n))


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
    ``eps_factor / 2`` = 1% of the variance with the defaults: below what the rollout's
    MMD test resolves at N = 2000 (the calibration measures it; :func:`rollout_test`
    shrinks eps above that N). T is
    ``time_factor`` relaxation times of the contracting part, long enough for a
    perturbation of the stationary law to show (for separated modes, long enough only if
    the barrier is crossed on that time scale: reported honestly by the calibration).
    If ``max_steps`` clips the steps, the total time is shorter than T.

    Args:
        field: the field.
        x: (N, d) points where the chains start.
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


def _rollout_lengthscales(
    mmd_lengthscale: float | None, mmd_lengthscale_factors: Sequence[float] | None
) -> list[float] | None:
    """Validated lengthscale factors of the rollout's MMD (None: the plain single-lengthscale test)."""
    if mmd_lengthscale_factors is None:
        return None
    if mmd_lengthscale is not None:
        raise ValueError("give mmd_lengthscale or mmd_lengthscale_factors, not both")
    factors = [check_positive(c, "MMD lengthscale factor") for c in mmd_lengthscale_factors]
    if not factors:
        raise ValueError("mmd_lengthscale_factors is empty")
    return factors


def rollout_chains(
    field: Callable[[Tensor], Tensor],
    begin: Tensor,
    gen: torch.Generator | None,
    *,
    sampler: Callable[..., Tensor] | None = None,
    step_size: float | None = None,
    n_steps: int | None = None,
    eps_factor: float | None = None,
    time_factor: float = 20.0,
    max_steps: int = 20000,
    min_steps: int = 500,
    chunk_size: int | None = None,
) -> tuple[Tensor, float | None, int | None, dict]:
    """The chains of :func:`rollout_test` from ``begin`` (n, d): ``(end, eps, n_steps, schedule info)``.

    Langevin with the default schedule (:func:`rollout_schedule`, ``eps_factor`` by
    default :func:`default_eps_factor` of n) or the user's ``sampler``, all draws from
    ``gen`` in the order ``rollout_test`` makes them (``tools/ksd_grid.py --test rollout``
    reuses it to reproduce the test's chains).
    """
    from fluxbench.samplers import langevin

    n_chains, d = begin.shape
    info: dict = {}
    eps: float | None
    steps: int | None
    if sampler is None:
        if step_size is None or n_steps is None:
            eps0, steps0, info = rollout_schedule(
                field,
                begin,
                generator=gen,
                eps_factor=default_eps_factor(n_chains) if eps_factor is None else check_positive(eps_factor, "eps_factor"),
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
        end = langevin(field, begin, step_size=eps, n_steps=steps, generator=gen, chunk_size=chunk_size)
    else:
        eps = None if step_size is None else check_positive(step_size, "step_size")
        steps = None if n_steps is None else check_positive_int(n_steps, "n_steps", minimum=0)
        with torch.no_grad():
            end = sampler(field, begin.clone(), gen)
        check_points(end, "sampler output", dim=d)
        if end.shape[0] != n_chains or end.device != begin.device or end.dtype != begin.dtype:
            raise ValueError(
                f"sampler output must have shape ({n_chains}, {d}), dtype {begin.dtype} and device {begin.device}; "
                f"got shape {tuple(end.shape)}, dtype {end.dtype}, device {end.device}"
            )
    return end.detach(), eps, steps, info


def rollout_test(
    field: Callable[[Tensor], Tensor],
    samples: Tensor,
    *,
    alpha: float = 0.01,
    seed: int = 0,
    design: str = "paired",
    step_size: float | None = None,
    n_steps: int | None = None,
    sampler: Callable[..., Tensor] | None = None,
    n_bootstrap: int | None = None,
    n_permutations: int | None = None,
    mmd_lengthscale: float | None = None,
    mmd_lengthscale_factors: Sequence[float] | None = None,
    compute_w2: bool = True,
    w2_max_points: int = 2000,
    eps_factor: float | None = None,
    time_factor: float = 20.0,
    max_steps: int = 20000,
    min_steps: int = 500,
    chunk_size: int | None = None,
) -> StationarityReport:
    """Rollout test (SPEC section 5): run the sampler from the samples, compare where the chains end.

    Chains run ``fluxbench.samplers.langevin`` (unadjusted Langevin,
    ``x <- x + eps f(x) + sqrt(2 eps) xi``) for ``n_steps`` steps of size ``eps``, or a
    user ``sampler(field, x0, generator) -> x``. Two designs:

    * ``"paired"`` (default): a chain starts at every sample x_i and ends at y_i. The
      pairs (x_i, y_i) are i.i.d. and under H0 (with an exact sampler) y_i has the law of
      x_i, though it depends on it; :func:`fluxbench.metrics.mmd_paired_test` tests
      exactly that (terms i != j only, so only independent points meet; wild bootstrap of
      the degenerate U-statistic). Every sample is used on both sides. The sampler must
      keep rows in order: row i of its output continues row i of its input.
    * ``"split"``: the samples are split at random into a held-in half (floor(N/2)
      points), where the chains start, and a held-out half; end cloud and held-out half
      are independent under H0, so the MMD permutation test
      (:func:`fluxbench.metrics.mmd_permutation_test`, ``n_permutations`` relabellings;
      or :func:`fluxbench.metrics.mmd_aggregated_test` with ``mmd_lengthscale_factors``)
      is exact. Half the points on each side: less power (on the calibration's seeds
      0-99 it misses ``iso20-temp09`` and ``iso2-rot_sym``, which the paired design
      detects), but valid for a sampler that does not keep rows in order.

    The MMD lengthscale is the median heuristic of the pooled end cloud and comparison
    cloud (times ``mmd_lengthscale_factors`` if given; the paired design takes the maximum
    of standardised statistics over them). The paired default is the median alone: on
    tuning seeds 1000-1019 it detected every required calibration case (20/20 each), and
    shorter lengthscales, which see small scale errors better, also resolve the O(eps)
    bias of ULA sooner as N grows. Reported next to the p-value: W2 between chain ends
    and independent samples (paired: the ends of a random half against the other half's
    starts; split: end cloud against held-out half) and its noise floor, the W2 between
    two independent halves of the samples (each cloud subsampled to ``w2_max_points``).

    Discretisation bias: ULA's stationary law is p only up to O(eps). The default
    schedule (:func:`rollout_schedule`) picks eps from a finite-difference estimate of
    the field's Jacobian so that the relative variance bias is about 1% at N <= 2000
    (:func:`default_eps_factor`), and a horizon of 20 relaxation times (at most
    ``max_steps`` = 20000 steps). The calibration (``results/calibration/``, N = 2000)
    measures the false-alarm rate this leaves. A bias b shifts the standardised statistic
    by about N b^2, so above N = 2000 eps shrinks like N^-1/2 to keep that shift at its
    calibrated size (measured with the exact score of N(0, I_64) at N = 20000: with eps
    fixed at its N = 2000 value the standardised statistic averaged 0.96 over 10 seeds,
    4 of them with p < 0.05; with the scaled eps 0.08 over 20 seeds, 2 with p < 0.05;
    ``results/calibration/NOTES.md``). Always report eps with the result (it is in the report).

    Args:
        field: the field.
        samples: (N, d) samples, N >= 4.
        alpha: level.
        seed: seed of the split, the schedule probes, the sampler noise, the bootstrap
            multipliers or permutations and the W2 subsamples.
        design: ``"paired"`` or ``"split"`` (above).
        step_size: eps; default from :func:`rollout_schedule`.
        n_steps: number of steps; default from :func:`rollout_schedule` (if only
            ``step_size`` is given: ceil(horizon / eps), clipped).
        sampler: optional ``sampler(field, x0, generator) -> x_end`` replacing Langevin
            (``step_size`` and ``n_steps`` are then only reported, as given).
        n_bootstrap: paired design: wild-bootstrap draws; default
            :func:`fluxbench.ustat.default_n_bootstrap` (1000 up to N = 5000).
        n_permutations: split design: permutations of the MMD test; default 1000 for
            N <= 5000, then ``max(200, 1000 (5000 / N)^2)`` (200 still resolves
            p < 0.005, the level of each half of ``"combined"`` at alpha = 0.01).
        mmd_lengthscale: the MMD lengthscale; default the median heuristic.
        mmd_lengthscale_factors: several lengthscales, the median heuristic times these
            factors (paired: maximum of standardised statistics, shared multipliers;
            split: min-p over lengthscales calibrated by shared permutations). Short
            lengthscales see scale errors in higher dimension, and also ULA's O(eps)
            bias: with the split design and the default schedule, N = 20000 exact
            samples of N(0, I_64) and the exact score gave p = 1/201 on two seeds with
            ``(0.25, 0.5, 1, 2, 4)`` (fine with ``eps_factor=0.005``).
        compute_w2: compute the W2 and its noise floor (POT, CPU).
        w2_max_points: subsample size cap of each cloud for W2.
        eps_factor: schedule parameter (:func:`rollout_schedule`); default
            :func:`default_eps_factor` of the number of chains.
        time_factor, max_steps, min_steps: schedule parameters (:func:`rollout_schedule`).
        chunk_size: evaluate the field on at most this many chains at a time.

    Returns:
        :class:`StationarityReport` with ``method="rollout"``, ``eps``, ``n_steps``,
        ``total_time``, ``mmd2`` (the unbiased MMD^2 at the median lengthscale, when used),
        ``w2``, ``w2_noise_floor``; ``statistic`` is the largest standardised MMD^2
        (paired), the MMD^2 (split) or the smallest per-lengthscale p-value (split,
        aggregated). ``details`` holds ``design`` and the schedule estimates (``lam``,
        ``lip``, ``horizon``).
    """
    from fluxbench.metrics import mmd_aggregated_test, mmd_paired_test, mmd_permutation_test, w2

    start = time.perf_counter()
    x = check_samples(samples)
    alpha = check_alpha(alpha)
    seed = check_seed(seed)
    if design not in ("paired", "split"):
        raise ValueError(f"unknown rollout design {design!r}; choose 'paired' or 'split'")
    paired = design == "paired"
    if paired and n_permutations is not None:
        raise ValueError("n_permutations belongs to design='split'; the paired design takes n_bootstrap")
    if not paired and n_bootstrap is not None:
        raise ValueError("n_bootstrap belongs to design='paired'; the split design takes n_permutations")
    n_resamples = n_bootstrap if paired else n_permutations
    n_resamples = (
        default_n_bootstrap(x.shape[0]) if n_resamples is None else check_positive_int(n_resamples, "n_bootstrap" if paired else "n_permutations")
    )
    w2_max_points = check_positive_int(w2_max_points, "w2_max_points", minimum=2)
    factors = _rollout_lengthscales(mmd_lengthscale, mmd_lengthscale_factors)
    if not callable(field):
        raise ValueError(f"field must be callable (N, d) -> (N, d); got {type(field).__name__}")
    if sampler is not None and not callable(sampler):
        raise ValueError(f"sampler must be callable (field, x0, generator) -> x; got {type(sampler).__name__}")
    n, d = x.shape
    gen = generator_from_seed(seed, x.device)
    x = x.detach()
    if paired:
        begin, other = x, x
    else:
        perm = torch.randperm(n, generator=gen, device=x.device)
        begin, other = x[perm[: n // 2]], x[perm[n // 2 :]]
    n_chains = begin.shape[0]
    # the field contract is checked once on the samples (clear error before any rollout)
    evaluate_field(field, begin, chunk_size)

    end, eps, steps, info = rollout_chains(
        field,
        begin,
        gen,
        sampler=sampler,
        step_size=step_size,
        n_steps=n_steps,
        eps_factor=eps_factor,
        time_factor=time_factor,
        max_steps=max_steps,
        min_steps=min_steps,
        chunk_size=chunk_size,
    )
    ell = (
        median_bandwidth(end, other, generator=gen)
        if mmd_lengthscale is None
        else check_positive(mmd_lengthscale, "mmd_lengthscale")
    )
    grid = [1.0] if factors is None else factors
    mmd_info: dict = {}
    mmd2: float | None
    if paired:
        res = mmd_paired_test(
            other, end, lengthscales=[c * ell for c in grid], n_bootstrap=n_resamples, generator=gen
        )
        p = res.p_value
        statistic = float(max(res.standardised))
        mmd_info = {"mmd_rule": "max over lengthscales of MMD^2 / sd, shared Rademacher multipliers"}
    elif factors is None:
        perm_res = mmd_permutation_test(end, other, lengthscale=ell, n_permutations=n_resamples, generator=gen)
        p = float(perm_res.p_value)
        mmd2 = statistic = float(perm_res.statistic)
    else:
        res = mmd_aggregated_test(end, other, lengthscales=[c * ell for c in grid], n_permutations=n_resamples, generator=gen)
        p = res.p_value
        statistic = min(res.p_values)
        mmd_info = {"mmd_rule": "min-p over lengthscales, calibrated by the shared permutations"}
    if paired or factors is not None:
        # the MMD^2 is reported at the median lengthscale, when the grid holds it
        mmd2 = float(res.statistics[grid.index(1.0)]) if 1.0 in grid else None
    if factors is not None:
        mmd_info.update(
            mmd_lengthscales=res.lengthscales,
            mmd2_per_lengthscale=tuple(float(v) for v in res.statistics),
            mmd_p_value_per_lengthscale=res.p_values,
        )
    w2_val = floor = None
    if compute_w2:

        def sub(t: Tensor) -> Tensor:
            if t.shape[0] <= w2_max_points:
                return t
            return t[torch.randperm(t.shape[0], generator=gen, device=t.device)[:w2_max_points]]

        if paired:
            # chain ends of one half against the starts of the other: independent under H0
            halves = torch.randperm(n, generator=gen, device=x.device)
            a_idx, b_idx = halves[: n // 2], halves[n // 2 :]
            e_s, o_s, i_s = sub(end[a_idx]), sub(x[b_idx]), sub(x[a_idx])
        else:
            e_s, o_s, i_s = sub(end), sub(other), sub(begin)
        w2_val = w2(e_s, o_s)
        floor = w2(i_s, o_s)
    info = {
        **info,
        **mmd_info,
        "design": design,
        "n_chains": n_chains,
        "sampler": "langevin" if sampler is None else repr(sampler),
    }
    if not paired:
        info.update(n_held_in=n_chains, n_held_out=n - n_chains)
    return StationarityReport(
        method="rollout",
        statistic=statistic,
        p_value=p,
        alpha=alpha,
        passed=p >= alpha,
        n=n,
        d=d,
        seed=seed,
        n_bootstrap=n_resamples if paired else None,
        eps=eps,
        n_steps=steps,
        total_time=None if eps is None or steps is None else eps * steps,
        mmd2=mmd2,
        mmd_lengthscale=ell,
        n_permutations=None if paired else n_resamples,
        w2=w2_val,
        w2_noise_floor=floor,
        details=info,
        elapsed_s=time.perf_counter() - start,
    )

