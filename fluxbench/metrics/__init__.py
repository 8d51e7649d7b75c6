"""Sample-based distances between point clouds and their Gaussian closed forms.

All sample metrics take two point clouds ``x`` of shape (N, d) and ``y`` of shape (M, d)
with the same d, dtype and device, validate them (finite, non-empty), and follow the
same keyword conventions (``lengthscale``, ``chunk_size``, ``generator``/``seed``). The
three scores :func:`w2`, :func:`sliced_w2` and :func:`mmd2_unbiased` return a Python
float and also take samples of shape (N, *event_shape), for example images (N, C, H, W),
compared as (N, D) points with D = prod(event_shape).

* :func:`w2`, :func:`sliced_w2` -- exact (POT network simplex, CPU float64) and sliced
  2-Wasserstein distances (``wasserstein.py``).
* :func:`mmd2_unbiased`, :func:`mmd_permutation_test`, :func:`mmd_aggregated_test`,
  :func:`mmd_paired_test` -- RBF-kernel MMD^2 U-statistic, its permutation test, the test
  aggregated over several lengthscales, and the test for dependent pairs (a chain's start
  and end; wild bootstrap) (``mmd.py``).
* :func:`gaussian_w2`, :func:`gaussian_sliced_w2`, :func:`rbf_kernel_mean` -- closed
  forms between Gaussians, SPEC section 4 (``gaussian.py``).
* :func:`noise_floor` -- a metric between two independent samples of the same law
  (``floor.py``).
* :func:`integrated_autocorrelation_time`, :func:`time_to_floor` -- mixing of long chains
  (``autocorr.py``).
"""

from fluxbench.metrics.autocorr import integrated_autocorrelation_time, time_to_floor
from fluxbench.metrics.floor import NoiseFloor, noise_floor
from fluxbench.metrics.gaussian import gaussian_sliced_w2, gaussian_w2, rbf_kernel_mean
from fluxbench.metrics.mmd import (
    MMDAggregatedResult,
    MMDPairedResult,
    MMDTestResult,
    mmd2_unbiased,
    mmd_aggregated_test,
    mmd_paired_test,
    mmd_permutation_test,
)
from fluxbench.metrics.wasserstein import W2_MAX_PAIRS, W2_NUM_ITER_MAX, sliced_w2, w2

__all__ = [
    "w2",
    "sliced_w2",
    "W2_MAX_PAIRS",
    "W2_NUM_ITER_MAX",
    "mmd2_unbiased",
    "mmd_permutation_test",
    "mmd_aggregated_test",
    "mmd_paired_test",
    "MMDAggregatedResult",
    "MMDPairedResult",
    "MMDTestResult",
    "gaussian_w2",
    "gaussian_sliced_w2",
    "rbf_kernel_mean",
    "noise_floor",
    "NoiseFloor",
    "integrated_autocorrelation_time",
    "time_to_floor",
]
