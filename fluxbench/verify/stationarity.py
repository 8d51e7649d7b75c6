"""Sample-based stationarity tests (SPEC section 5): the front door :func:`stationarity_test`.

H0: the law p of the samples is stationary for dX = f(X) dt + sqrt(2) dW (SPEC eq. (1)),
i.e. div(p (f - s)) = 0 (SPEC eq. (2)). The tests live in :mod:`fluxbench.verify.ksd`
(multi-bandwidth KSD with mode test functions) and :mod:`fluxbench.verify.rollout`
(sampler rollout); this module dispatches to them and combines them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import Tensor

from fluxbench._checks import check_seed
from fluxbench.verify._inputs import check_alpha, check_options, check_samples
from fluxbench.verify.ksd import ksd_test
from fluxbench.verify.report import StationarityReport
from fluxbench.verify.rollout import default_eps_factor, rollout_chains, rollout_schedule, rollout_test

__all__ = [
    "stationarity_test",
    "combined_p_value",
    "ksd_test",
    "rollout_test",
    "rollout_schedule",
    "default_eps_factor",
    "METHODS",
    "KSD_OPTIONS",
    "ROLLOUT_OPTIONS",
    "rollout_chains",
]

METHODS = ("ksd", "rollout", "combined")
#: Options accepted by ``method="ksd"``.
KSD_OPTIONS = ("lengthscales", "lengthscale_factors", "mode_clusters", "mode_widths", "n_bootstrap", "chunk_size")
#: Options accepted by ``method="rollout"``.
ROLLOUT_OPTIONS = (
    "step_size",
    "n_steps",
    "design",
    "sampler",
    "n_bootstrap",
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


# --------------------------------------------------------------------------- front door
def combined_p_value(p_ksd: float, p_rollout: float) -> float:
    """The p-value of ``method="combined"``: Bonferroni over the two tests, ``min(1, 2 min(p_ksd, p_rollout))``."""
    return min(1.0, 2.0 * min(p_ksd, p_rollout))


def stationarity_test(
    field: Callable[[Tensor], Tensor],
    samples: Tensor,
    *,
    alpha: float = 0.01,
    method: str = "combined",
    seed: int = 0,
    **options: object,
) -> StationarityReport:
    """Test H0: "the law of ``samples`` is stationary for dX = f dt + sqrt(2) dW" (SPEC section 5).

    Methods:

    * ``"ksd"``: the generator kernel Stein discrepancy, maximum over a lengthscale grid
      of standardised U-statistics and over Stein statistics of the samples' mode
      responsibilities, wild-bootstrap p-value (:func:`ksd_test`). Needs only
      f at the samples (one evaluation each): no score, no density, no divergence, no
      discretisation.
    * ``"rollout"``: Langevin (or a user ``sampler``) from every sample, then a paired MMD
      test of chain ends against chain starts (wild bootstrap), W2 against its noise
      floor (:func:`rollout_test`; ``design="split"`` for the held-out permutation test).
      Sees what a user's sampler does, including slow mass transfer between modes; biased
      by the discretisation (eps is reported).
    * ``"combined"`` (the default, the one to gate on: the two tests see different
      failures): both, each at level alpha/2 with the same seed (Bonferroni); rejects if
      either rejects; ``p_value = min(1, 2 min(p_ksd, p_rollout))``, ``statistic`` the
      smaller sub-test p-value, the sub-reports in ``sub_reports``.

    Args:
        field: callable on (N, d) tensors returning (N, d) with the same dtype and device.
        samples: (N, d) samples, N >= 4, finite.
        alpha: level in (0, 1); ``passed`` is ``p_value >= alpha``.
        method: ``"combined"`` (default), ``"ksd"`` or ``"rollout"``.
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
        >>> import torch
        >>> from fluxbench.targets import Gaussian
        >>> p = Gaussian.isotropic(2)
        >>> x = p.sample(500, generator=torch.Generator().manual_seed(0))
        >>> stationarity_test(p.score, x).passed
        True
        >>> stationarity_test(lambda z: p.score(z) + 1.0, x).passed  # a constant drift
        False
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    x = check_samples(samples)
    alpha = check_alpha(alpha)
    seed = check_seed(seed)
    if not callable(field):
        raise ValueError(f"field must be callable (N, d) -> (N, d); got {type(field).__name__}")
    if method == "ksd":
        check_options(options, KSD_OPTIONS, method)
        return ksd_test(field, x, alpha=alpha, seed=seed, **options)  # type: ignore[arg-type]
    if method == "rollout":
        check_options(options, ROLLOUT_OPTIONS, method)
        return rollout_test(field, x, alpha=alpha, seed=seed, **options)  # type: ignore[arg-type]
    check_options(options, tuple(set(KSD_OPTIONS) | set(ROLLOUT_OPTIONS)), method)
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
