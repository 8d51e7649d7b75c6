"""Tests of fluxbench.metrics.autocorr: integrated autocorrelation time and time to the floor.

Exact values: an AR(1) chain x_{t+1} = r x_t + sqrt(1 - r^2) e_t has rho(t) = r^t and
tau = (1 + r) / (1 - r). An exact OU chain sampled every dt (X_{t+1} = E X_t + noise,
E = exp(-Bmat dt), stationary covariance S) has Cov(X_t, X_0) = E^t S, so the observable
x_i has tau_i = 1 + 2 [E (I - E)^{-1} S]_ii / S_ii. Tolerance: 4 of the function's standard
errors, SE = tau sqrt(2 (2M + 1) / (N T)) (Sokal), plus nothing else: the window's truncation
bias (~2 r^(M+1) / (1 - r) < 1e-3 here) and the divide-by-T bias (~2 r / ((1 - r)^2 T) <= 0.04)
are far below it. Chains start from the stationary law, seeds fixed.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from fluxbench.metrics import integrated_autocorrelation_time, time_to_floor
from fluxbench.samplers import ExactOU

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ar1(r: float, t_len: int, n_chains: int, seed: int) -> torch.Tensor:
    e = torch.randn(t_len, n_chains, generator=gen(seed), dtype=DT)
    x = torch.empty_like(e)
    x[0] = e[0]
    c = math.sqrt(1 - r * r)
    for t in range(1, t_len):
        x[t] = r * x[t - 1] + c * e[t]
    return x


@pytest.mark.parametrize("r,seed", [(0.0, 0), (0.5, 1), (0.9, 2), (-0.5, 3)])
def test_ar1_tau_is_exact_within_4_se(r, seed):
    """For r = -0.5 (antithetic, tau = 1/3) the window stops at M = c = 5: the expectation is
    the truncated sum 1 + 2 sum_{t<=5} r^t = 0.3125."""
    tau, se = integrated_autocorrelation_time(ar1(r, 5000, 20, seed), return_stderr=True)
    exact = (1 + r) / (1 - r) if r >= 0 else 1 + 2 * sum(r**t for t in range(1, 6))
    assert tau.shape == () and tau.dtype == DT
    assert abs(float(tau) - exact) <= 4 * float(se), (float(tau), exact, float(se))


def test_stderr_matches_the_spread_of_independent_estimates():
    """24 replicates of an AR(1), r = 0.8 (tau 9): SD of the estimates / rms SE in [0.6, 1.6]
    (the SD of 24 draws has a relative SE of ~15%)."""
    ests = [integrated_autocorrelation_time(ar1(0.8, 2000, 4, 50 + k), return_stderr=True) for k in range(24)]
    taus = torch.stack([t for t, _ in ests])
    rms_se = float(torch.stack([s for _, s in ests]).square().mean().sqrt())
    ratio = float(taus.std()) / rms_se
    assert 0.6 <= ratio <= 1.6, ratio


def test_exact_ou_tau_per_observable():
    """A non-reversible 2-D OU (rotation J), sampled exactly every dt = 0.2: both coordinates'
    tau within 4 SE of 1 + 2 [E (I - E)^{-1} S]_ii / S_ii."""
    prec = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=DT)
    ou = ExactOU.from_precision(prec, torch.tensor([[0.0, 0.5], [-0.5, 0.0]], dtype=DT))
    dt, n, t_len = 0.2, 20, 4000
    e, _ = ou.transition(dt)
    s = ou.covariance
    lagged = e @ torch.linalg.inv(torch.eye(2, dtype=DT) - e) @ s
    exact = 1 + 2 * torch.diagonal(lagged) / torch.diagonal(s)
    x0 = torch.randn(n, 2, generator=gen(0), dtype=DT) @ torch.linalg.cholesky(s).T
    traj = ou.sample(x0, dt, t_len - 1, generator=gen(1), thin=1)  # (T, N, 2)
    tau, se = integrated_autocorrelation_time(traj, return_stderr=True)
    assert tau.shape == (2,)
    assert ((tau - exact).abs() <= 4 * se).all(), (tau, exact, se)
    assert (exact > 5).all()  # a non-trivial case


def test_observables_are_independent_columns():
    a, b = ar1(0.5, 500, 3, 0), ar1(0.9, 500, 3, 1)
    both = integrated_autocorrelation_time(torch.stack([a, b], -1))
    assert torch.allclose(both, torch.stack([integrated_autocorrelation_time(a), integrated_autocorrelation_time(b)]))
    # invariant to an affine change of each observable
    assert torch.allclose(integrated_autocorrelation_time(3 * a + 7), integrated_autocorrelation_time(a))


def test_short_chain_warns_and_bad_input_raises():
    with pytest.warns(RuntimeWarning, match="too short"):
        tau = integrated_autocorrelation_time(ar1(0.99, 50, 2, 0))
    assert torch.isfinite(tau)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        integrated_autocorrelation_time(ar1(0.5, 500, 2, 0))
    with pytest.raises(ValueError, match=r"observable\(s\) \[1\] are constant"):
        integrated_autocorrelation_time(torch.stack([ar1(0.5, 50, 2, 0), torch.ones(50, 2, dtype=DT)], -1))
    with pytest.raises(ValueError, match="NaN"):
        integrated_autocorrelation_time(torch.tensor([[0.0], [1.0], [float("nan")], [2.0]]))
    with pytest.raises(ValueError, match="T >= 4"):
        integrated_autocorrelation_time(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"\(T, N\)"):
        integrated_autocorrelation_time(torch.randn(10))
    with pytest.raises(ValueError, match=r"\(T, N\)"):
        integrated_autocorrelation_time(torch.ones(10, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="c must be"):
        integrated_autocorrelation_time(torch.randn(10, 2), c=0.0)


def test_time_to_floor():
    steps = [0, 10, 100, 1000, 10_000]
    assert time_to_floor(steps, [5.0, 1.0, 3.0, 1.0, 0.9], floor=1.0) == 1000
    assert time_to_floor(steps, [5.0, 1.0, 3.0, 1.0, 0.9], floor=1.0, band=2.0) == 10
    assert time_to_floor(steps, [0.5] * 5, floor=1.0) == 0
    assert time_to_floor(steps, [5.0, 1.0, 1.0, 1.0, 1.1], floor=1.0) is None
    assert time_to_floor([7], [1.0], floor=1.0) == 7  # at the floor counts as within


@pytest.mark.parametrize(
    "args,match",
    [
        (([0, 1], [1.0], 1.0), "equal length"),
        (([], [], 1.0), "non-empty"),
        (([1, 0], [1.0, 1.0], 1.0), "strictly increasing"),
        (([0, 1], [1.0, float("nan")], 1.0), "finite"),
        (([0, 1], [1.0, 1.0], float("inf")), "floor"),
        (([0, 1], [1.0, 1.0], 1.0, -0.1), "band"),
    ],
)
def test_time_to_floor_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        time_to_floor(*args)
