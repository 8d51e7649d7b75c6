"""Samplers on image-shaped states and EDM's Heun sampler, on a Gaussian where the answer is exact.

Data N(mu, s^2 I) of image shape (1, 4, 4): the exact noise-conditioned field is the score of
p_sigma = N(mu, (s^2 + sigma^2) I),

    f(x, sigma) = -(x - mu) / (s^2 + sigma^2),

linear, so every sampler acts on x - mu by a scalar recursion the tests compute independently:
the Heun/Euler step multiplies it by a number, an Euler-Maruyama or Langevin step maps its
variance v to A^2 v + noise. Statistical checks pool the 16 i.i.d. pixels of n images (n * 16
draws) and compare the sample mean and variance of x - mu with their exact values within
4 standard errors (two-sided p ~ 6e-5): SE(mean) = sqrt(v / m), SE(var) = v sqrt(2 / m) for
m Gaussian draws. The discretisation bias is computed exactly by the recursion, added to the
tolerance and itself asserted to be small. All seeds are fixed.
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from fluxbench.samplers import annealed_langevin, edm_heun, edm_sigmas, langevin, probability_flow
from fluxbench.samplers import edm as edm_module

DT = torch.float64
S2 = 0.25  # data variance s^2 per pixel
SHAPE = (1, 4, 4)
MU = torch.linspace(-0.6, 0.9, 16, dtype=DT).reshape(SHAPE)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact score of N(MU, (S2 + sigma^2) I) for (N, 1, 4, 4) states; sigma a 0-d tensor."""
    assert x.shape[1:] == SHAPE and sigma.ndim == 0
    return -(x - MU) / (S2 + sigma**2)


def noisy_data(n: int, sigma: float, seed: int) -> torch.Tensor:
    """n samples of p_sigma = N(MU, (S2 + sigma^2) I), shape (n, 1, 4, 4)."""
    return MU + math.sqrt(S2 + sigma**2) * torch.randn(n, *SHAPE, generator=_gen(seed), dtype=DT)


def assert_gaussian(x: torch.Tensor, var: float, *, bias: float = 0.0, n_se: float = 4.0) -> None:
    """Pooled pixels of x - MU: mean 0 and variance ``var`` within n_se SE (+ ``bias`` on the variance)."""
    r = (x - MU).reshape(-1)
    m = r.numel()
    mean_err = abs(float(r.mean()))
    var_err = abs(float(r.var()) - var)
    assert mean_err < n_se * math.sqrt(var / m), (mean_err, n_se * math.sqrt(var / m))
    assert var_err < n_se * var * math.sqrt(2 / m) + bias, (var_err, n_se * var * math.sqrt(2 / m), bias)


def flow_factor(levels: list[float], *, heun: bool = True, hats: list[float] | None = None) -> list[float]:
    """Per-step factors a_i with x_{i+1} - MU = a_i (x_hat_i - MU) for the linear field:
    d(x, t) = k(t) (x - MU), k(t) = t / (S2 + t^2); Euler 1 + h k(t); Heun
    1 + h/2 (k(t) + k(t')) + h^2/2 k(t) k(t'), h = t' - t (Euler when t' = 0)."""
    hats = levels[:-1] if hats is None else hats
    out = []
    for t, t_next in zip(hats, levels[1:]):
        h, k = t_next - t, t / (S2 + t * t)
        if not heun or t_next == 0:
            out.append(1 + h * k)
        else:
            k_next = t_next / (S2 + t_next**2)
            out.append(1 + 0.5 * h * (k + k_next) + 0.5 * h * h * k * k_next)
    return out


# ------------------------------------------------------------------------ edm_sigmas
def test_edm_sigmas_is_the_rho_schedule():
    s = edm_sigmas(18)
    assert s.shape == (19,) and s.dtype == DT and float(s[-1]) == 0.0
    assert float(s[0]) == 80.0 and float(s[-2]) == 0.002
    i = torch.arange(18, dtype=DT)
    expected = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(s[:-1], expected, rtol=1e-14, atol=0)
    assert bool((s[1:] < s[:-1]).all())
    # rho = 1 is the linear grid
    lin = edm_sigmas(5, sigma_min=1.0, sigma_max=5.0, rho=1.0, final_zero=False, dtype=torch.float32)
    torch.testing.assert_close(lin, torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 1}, "steps must be >= 2"),
        ({"steps": 4, "sigma_min": 0.0}, "sigma_min"),
        ({"steps": 4, "sigma_min": 90.0}, "sigma_min must be < sigma_max"),
        ({"steps": 4, "rho": -1.0}, "rho"),
    ],
)
def test_edm_sigmas_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        edm_sigmas(**kwargs)


# ------------------------------------------------------------------------ edm_heun
def test_edm_heun_is_the_heun_recursion_on_a_linear_field():
    levels = edm_sigmas(12).tolist()
    x_init = noisy_data(20, 80.0, seed=1)
    out = edm_heun(score, x_init, levels)
    a = math.prod(flow_factor(levels))
    torch.testing.assert_close(out, MU + a * (x_init - MU), rtol=0, atol=1e-10)
    # the deterministic sampler is the probability-flow ODE with Heun steps
    torch.testing.assert_close(out, probability_flow(score, x_init, levels), rtol=0, atol=0)


def test_edm_heun_maps_p_sigma_max_to_the_data():
    levels = edm_sigmas(64).tolist()
    a = math.prod(flow_factor(levels))
    target = S2  # sampling down to sigma = 0 gives the data law N(MU, S2 I)
    bias = abs(a * a * (S2 + 80.0**2) - target)
    assert bias < 0.01 * target, bias  # 64 steps: discretisation error under 1 % of the variance
    x = edm_heun(score, noisy_data(4000, 80.0, seed=2), levels)
    assert x.shape == (4000, *SHAPE)
    assert_gaussian(x, target, bias=bias)


def _heun_scale_error(steps: int, heun: bool) -> float:
    """|a / a_exact - 1| measured on the sampler's output, grid sigma_max -> sigma_min (no 0)."""
    levels = edm_sigmas(steps, final_zero=False).tolist()
    x_init = MU + 80.0 * torch.ones(1, *SHAPE, dtype=DT)
    if heun:
        out = edm_heun(score, x_init, levels)
    else:
        out = probability_flow(score, x_init, levels, method="euler")
    a = float(((out - MU) / (x_init - MU)).mean())
    exact = math.sqrt((S2 + 0.002**2) / (S2 + 80.0**2))  # exact flow: x - MU scales by sd ratio
    return abs(a / exact - 1)


def test_edm_heun_is_second_order():
    # deterministic: the error ratio when the number of steps doubles tends to 2^p (p = order);
    # Heun's ratios here are 4.28, 4.13, 4.06 and Euler's 1.99, 1.99, 1.98 (exact recursion):
    # the bands [3.5, 4.5] and [1.8, 2.2] separate the two orders
    heun = [_heun_scale_error(s, heun=True) for s in (32, 64, 128, 256)]
    euler = [_heun_scale_error(s, heun=False) for s in (32, 64, 128, 256)]
    for e, e_next in zip(heun[:-1], heun[1:]):
        assert 3.5 < e / e_next < 4.5, heun
    for e, e_next in zip(euler[:-1], euler[1:]):
        assert 1.8 < e / e_next < 2.2, euler
    assert heun[-1] < 1e-3


def test_edm_heun_with_churn_keeps_the_marginals_and_is_reproducible():
    levels = edm_sigmas(128, final_zero=False).tolist()
    kwargs = dict(s_churn=10.0, s_tmin=0.05, s_tmax=50.0)
    # variance recursion with churn: v_hat = v + t_hat^2 - t^2 (exact noise), v' = a^2 v_hat
    gamma = min(10.0 / 127, math.sqrt(2) - 1)  # s_churn / number of steps
    hats = [(1 + gamma) * t if 0.05 <= t <= 50.0 else t for t in levels[:-1]]
    assert sum(h != t for h, t in zip(hats, levels)) > 60  # churn is active on most steps
    v = S2 + 80.0**2
    for t, t_hat, a in zip(levels[:-1], hats, flow_factor(levels, hats=hats)):
        v = a * a * (v + t_hat**2 - t**2)
    target = S2 + 0.002**2
    bias = abs(v - target)
    assert bias < 0.01 * target, bias  # 0.5 % at 127 steps
    x_init = noisy_data(4000, 80.0, seed=3)
    x = edm_heun(score, x_init, levels, generator=_gen(4), **kwargs)
    assert_gaussian(x, target, bias=bias)
    torch.testing.assert_close(x, edm_heun(score, x_init, levels, generator=_gen(4), **kwargs), rtol=0, atol=0)
    assert not torch.equal(x, edm_heun(score, x_init, levels, generator=_gen(5), **kwargs))


def test_edm_heun_never_calls_the_model_at_zero_and_validates():
    calls = []

    def recording(x, s):
        calls.append(float(s))
        return score(x, s)

    x = noisy_data(3, 2.0, seed=6)
    edm_heun(recording, x, [2.0, 1.0, 0.0])
    assert calls == [2.0, 1.0, 1.0]  # Heun 2 -> 1 (two calls), Euler 1 -> 0
    with pytest.raises(ValueError, match="sigmas"):
        edm_heun(score, x, [1.0, 2.0])
    with pytest.raises(ValueError, match="s_churn"):
        edm_heun(score, x, [2.0, 1.0], s_churn=-1.0)
    with pytest.raises(ValueError, match="s_tmax"):
        edm_heun(score, x, [2.0, 1.0], s_tmin=1.0, s_tmax=0.5)
    with pytest.raises(ValueError, match="shape"):
        edm_heun(lambda x, s: x[:, :, :2], x, [2.0, 1.0])
    with pytest.raises(ValueError, match="event_shape"):
        edm_heun(score, torch.zeros(5, dtype=DT), [2.0, 1.0])
    with pytest.raises(ValueError, match="empty batch"):
        edm_heun(score, torch.zeros(0, *SHAPE, dtype=DT), [2.0, 1.0])
    with pytest.raises(ValueError, match="generator"):
        edm_heun(score, x, [2.0, 1.0], generator=1)


def test_edm_docstring_example_runs():
    result = doctest.testmod(edm_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------ the other samplers on images
def _flat_score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return score(x.reshape(-1, *SHAPE), sigma).reshape(x.shape[0], -1)


@pytest.mark.parametrize("corrector_steps", [0, 2])
def test_annealed_langevin_on_images_equals_the_flattened_run(corrector_steps):
    # same draws in the same order, norms over all event dimensions: bit for bit the (N, d) run
    levels = torch.logspace(1, -1, 30, dtype=DT).tolist()
    x_init = noisy_data(50, 10.0, seed=7)
    img = annealed_langevin(score, x_init, levels, generator=_gen(8), corrector_steps=corrector_steps)
    flat = annealed_langevin(
        _flat_score, x_init.reshape(50, -1), levels, generator=_gen(8), corrector_steps=corrector_steps
    )
    assert img.shape == x_init.shape
    torch.testing.assert_close(img.reshape(50, -1), flat, rtol=0, atol=0)


def test_probability_flow_and_langevin_on_images_equal_the_flattened_runs():
    x_init = noisy_data(40, 5.0, seed=9)
    levels = [5.0, 2.0, 1.0, 0.5]
    img = probability_flow(score, x_init, levels)
    torch.testing.assert_close(img.reshape(40, -1), probability_flow(_flat_score, x_init.reshape(40, -1), levels))
    one = torch.tensor(1.0, dtype=DT)
    img = langevin(lambda x: score(x, one), x_init, step_size=0.05, n_steps=20, generator=_gen(10), chunk_size=7)
    flat = langevin(
        lambda x: _flat_score(x, one), x_init.reshape(40, -1), step_size=0.05, n_steps=20, generator=_gen(10)
    )
    assert img.shape == x_init.shape
    torch.testing.assert_close(img.reshape(40, -1), flat, rtol=0, atol=0)


def _em_variance(levels: list[float], *, corrector_steps: int = 0, snr: float = 0.16) -> float:
    """Variance of x - MU after the reverse-VE Euler-Maruyama chain from p_{levels[0]} (+ corrector).

    Predictor: v <- (1 - delta / (S2 + t^2))^2 v + delta. Corrector at t' with the exact
    isotropic score: mean_n |z_n| / mean_n |g_n| -> (S2 + t'^2) / sqrt(v) as n grows (both
    norms are chi_d-distributed up to the scale), so eps = 2 snr^2 (S2 + t'^2)^2 / v and
    v <- (1 - eps / (S2 + t'^2))^2 v + 2 eps.
    """
    v = S2 + levels[0] ** 2
    for t, t_next in zip(levels[:-1], levels[1:]):
        delta = t * t - t_next * t_next
        v = (1 - delta / (S2 + t * t)) ** 2 * v + delta
        for _ in range(corrector_steps):
            eps = 2 * snr**2 * (S2 + t_next**2) ** 2 / v
            v = (1 - eps / (S2 + t_next**2)) ** 2 * v + 2 * eps
    return v


@pytest.mark.parametrize("corrector_steps", [0, 1])
def test_annealed_langevin_and_predictor_corrector_reach_p_sigma_min_on_images(corrector_steps):
    levels = torch.logspace(1, math.log10(0.02), 500, dtype=DT).tolist()
    target = S2 + 0.02**2
    v = _em_variance(levels, corrector_steps=corrector_steps)
    # exact bias: the predictor's O(delta) bias is 1.25 % here (0.62 % on 1000 levels); with the
    # corrector it is 2.56 %, about ULA's inflation snr^2 / (1 - snr^2) = 2.6 %, which finer
    # grids keep (it shrinks with snr, not with delta)
    bias = abs(v - target)
    assert bias < (0.02 if corrector_steps == 0 else 0.03) * target, bias
    x = annealed_langevin(
        score, noisy_data(4000, 10.0, seed=11), levels, generator=_gen(12), corrector_steps=corrector_steps
    )
    assert_gaussian(x, v)  # the chain's exact variance, within 4 SE
    assert_gaussian(x, target, bias=bias)


def test_annealed_langevin_bias_is_visible_on_a_coarse_grid():
    # negative control: 12 levels inflate the variance far beyond the SE, and the sample shows it
    levels = torch.logspace(1, math.log10(0.02), 12, dtype=DT).tolist()
    v = _em_variance(levels)
    target = S2 + 0.02**2
    x = annealed_langevin(score, noisy_data(4000, 10.0, seed=13), levels, generator=_gen(14))
    assert abs(v - target) > 10 * target * math.sqrt(2 / (4000 * 16))
    assert_gaussian(x, v)
    with pytest.raises(AssertionError):
        assert_gaussian(x, target)


def test_samplers_reject_states_without_an_event_dimension():
    for run in (
        lambda: annealed_langevin(score, torch.zeros(4, dtype=DT), [2.0, 1.0]),
        lambda: probability_flow(score, torch.zeros(4, dtype=DT), [2.0, 1.0]),
        lambda: langevin(lambda x: -x, torch.zeros(4, dtype=DT), step_size=0.1, n_steps=2),
    ):
        with pytest.raises(ValueError, match=r"\(N, \*event_shape\)"):
            run()
    with pytest.raises(ValueError, match="size 0"):
        probability_flow(score, torch.zeros(3, 1, 0, 4, dtype=DT), [2.0, 1.0])
