"""Verification of stationarity: does the law p stay put under dX = f dt + sqrt(2) dW? (SPEC sections 1, 5)

* :func:`stationarity_test` -- sample-based tests of H0 "p is stationary for f": the
  multi-bandwidth generator kernel Stein discrepancy, with Stein statistics of the
  samples' mode responsibilities (:mod:`fluxbench.verify.modes`) in the same maximum
  (``method="ksd"``), a sampler rollout with a paired MMD test of chain ends against
  chain starts (``"rollout"``), or both (``"combined"``).
* :func:`stein_kernel`, :func:`ksd2` -- the Stein kernel h(x, y) of SPEC section 5 and the
  KSD^2 U-statistic.
* :func:`defect`, :func:`current_divergence` -- the stationarity defect r = div u + u . s
  (SPEC eq. (3)) and div(p u) = p r, when the score or log density is known.
* :func:`check_field` -- a battery of checks returning a pandas table (like scikit-learn's
  ``check_estimator``); :mod:`fluxbench.testing` turns it into pytest parametrisations.
* :func:`combined_p_value` -- the ``"combined"`` p-value of a KSD and a rollout p-value
  run separately (Bonferroni).

The size and power of the tests are measured by ``python -m tools.calibration`` (a tool of
the repository, outside the package; ``results/calibration/``).
"""

from fluxbench.verify.checks import CHECKS, check_field, run_check
from fluxbench.verify.defect import current_divergence, defect
from fluxbench.verify.report import StationarityReport
from fluxbench.verify.stationarity import (
    KSD_OPTIONS,
    METHODS,
    ROLLOUT_OPTIONS,
    combined_p_value,
    default_eps_factor,
    ksd_test,
    rollout_schedule,
    rollout_test,
    stationarity_test,
)
from fluxbench.verify.stein import DEFAULT_LENGTHSCALE_FACTORS, ksd2, stein_kernel

__all__ = [
    "stationarity_test",
    "StationarityReport",
    "ksd_test",
    "rollout_test",
    "combined_p_value",
    "rollout_schedule",
    "default_eps_factor",
    "METHODS",
    "KSD_OPTIONS",
    "ROLLOUT_OPTIONS",
    "stein_kernel",
    "ksd2",
    "DEFAULT_LENGTHSCALE_FACTORS",
    "defect",
    "current_divergence",
    "check_field",
    "run_check",
    "CHECKS",
]
