"""The device tier: the loss and its gradient, the samplers, the metrics and the stationarity
test on a device against their CPU results (marker ``cuda``; ``nox -s cuda``).

The device is ``FLUXBENCH_TEST_DEVICE`` (default ``cuda``; ``cuda:1``, ``mps``, or ``cpu``
to check that the tier runs); without it the module is skipped with one line.

Two kinds of comparison:

* Deterministic given the inputs (probability flow, W2, sliced W2 with given directions,
  MMD^2 and KSD^2 at a given lengthscale, and the loss and the Langevin samplers fed the
  CPU's random draws): the same input tensors moved to the device must give the CPU's
  result within a rounding bound. A reordered sum of n terms moves by at most
  gamma_n = n u / (1 - n u) of its absolute sum (Higham, Accuracy and Stability, 4.2);
  an exp whose argument a was computed with relative error gamma_k moves by gamma_k |a|
  of its value. Each test states its chain of such steps.
* Random streams that differ between devices (a generator on the device): the two results
  are samples of the same law and a two-sample test with a fixed seed must not reject at
  the stated level.
"""

from __future__ import annotations

import copy
import importlib
import math
import os

import pytest
import torch
from scipy import stats

from fluxbench.fields import MLPField
from fluxbench.metrics import mmd2_unbiased, sliced_w2, w2
from fluxbench.objectives import flux_matching_loss
from fluxbench.samplers import annealed_langevin, langevin, probability_flow
from fluxbench.suites.runner import resolve_device
from fluxbench.targets import Gaussian, GaussianMixture
from fluxbench.verify import ksd2, stationarity_test

DEVICE_ENV = "FLUXBENCH_TEST_DEVICE"
F64 = torch.float64
#: two-sample tests reject at this level (fixed seeds: the outcome is reproducible per device)
LEVEL = 1e-3


def _device() -> torch.device:
    """The device under test; a bad name is an error, an unavailable device skips the module."""
    name = os.environ.get(DEVICE_ENV, "cuda")
    try:
        torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"{DEVICE_ENV}={name!r} is not a torch device ({exc}); use e.g. cuda, cuda:1, cpu") from None
    try:
        return resolve_device(name)
    except ValueError as exc:
        kind = "CUDA" if name.startswith("cuda") else name
        pytest.skip(f"skipped: no {kind} device ({DEVICE_ENV}={name!r}: {exc})", allow_module_level=True)


DEVICE = _device()
pytestmark = pytest.mark.cuda
# the modules whose random draws ``cpu_draws`` replaces (the packages re-export functions of the same names)
flux_module = importlib.import_module("fluxbench.objectives.flux")
langevin_module = importlib.import_module("fluxbench.samplers.langevin")
annealed_module = importlib.import_module("fluxbench.samplers.annealed")


def gen(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def gamma(n: int, dtype: torch.dtype) -> float:
    """gamma_n = n u / (1 - n u): the relative rounding bound of n chained operations."""
    u = torch.finfo(dtype).eps / 2
    assert n * u < 0.5, "bound meaningless at this size"
    return n * u / (1 - n * u)


@pytest.fixture
def f64():
    if DEVICE.type == "mps":
        pytest.skip("MPS has no float64")


@pytest.fixture
def cpu_draws(monkeypatch):
    """``patch(module, seed)``: the module's random draws come from one CPU generator and are
    then moved to the device, so that CPU and device runs consume the same numbers."""

    def patch(module, seed: int) -> None:
        assert hasattr(module, "normal"), f"{module.__name__} no longer draws through normal(): update cpu_draws"
        g = gen(seed)

        def normal(shape, like, generator=None):
            return torch.randn(shape, generator=g, dtype=like.dtype).to(like.device)

        def uniform(shape, like, generator=None):
            return torch.rand(shape, generator=g, dtype=like.dtype).to(like.device)

        def rademacher(shape, like, generator=None):
            return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(like.dtype).to(like.device)

        for name, fn in (("normal", normal), ("uniform", uniform), ("rademacher", rademacher)):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, fn)

    return patch


def on(device, *tensors):
    return tuple(t.to(device) for t in tensors)


def assert_same_law(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Two-sample Kolmogorov-Smirnov test on every coordinate, Bonferroni over coordinates:
    the smallest p-value times d must stay above LEVEL."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    p = min(stats.ks_2samp(a[:, k].numpy(), b[:, k].numpy()).pvalue for k in range(a.shape[1]))
    assert p * a.shape[1] >= LEVEL, f"{what}: device and CPU samples differ (Bonferroni p = {p * a.shape[1]:.2e})"


# ---------------------------------------------------------------- the loss and its gradient


def _loss_and_grad(field, x, sigma, t, backend, device):
    field = copy.deepcopy(field).to(device)
    loss, info = flux_matching_loss(field, x.to(device), sigma, t=t, backend=backend, return_info=True)
    loss.mean().backward()
    grad = torch.cat([p.grad.flatten() for p in field.parameters()])
    return loss.detach().cpu(), grad.cpu(), info


@pytest.mark.parametrize("backend", ["dense", "fused"])
@pytest.mark.parametrize("d, t", [(2, 0.7), (5, None)])
def test_loss_and_gradient_match_cpu_on_the_same_draws(f64, cpu_draws, d, t, backend):
    """float64, the CPU's draws. The loss chains K + 2 passes of B-term softmax sums (K chain
    steps, the anchors' score, the transition sums), each term an MLP layer of width H and
    an exp of -|z - x|^2 / (2 v) computed from |z|^2 + |x|^2 - 2 z.x (relative error
    gamma_{d+2} of |z|^2 + |x|^2, so gamma_{d+2} L of the weight, L = the largest
    (|z|^2 + |x|^2) / (2 v)). Bound: (K + 2) (gamma_{B+H} + gamma_{d+2} L) of the scale,
    for the loss and for the gradient of its mean. (The backend is fixed: both devices
    assign the draws to the same rows.)"""
    batch, sigma, substeps, width = 64, 0.5, 4, 16
    torch.manual_seed(0)
    field = MLPField(d, hidden=(width, width)).double()
    x = torch.randn(batch, d, generator=gen(1), dtype=F64)
    cpu_draws(flux_module, 3)
    l_cpu, g_cpu, info = _loss_and_grad(field, x, sigma, t, backend, "cpu")
    cpu_draws(flux_module, 3)
    l_dev, g_dev, _ = _loss_and_grad(field, x, sigma, t, backend, DEVICE)
    v_min = min(sigma**2, sigma**2 * -math.expm1(-2 * info.t))
    pts = torch.cat([x, info.x0.cpu(), info.x_t.cpu()])
    big = float(pts.square().sum(1).max()) * 2 / (2 * v_min)
    rel = (substeps + 2) * (gamma(batch + width, F64) + gamma(d + 2, F64) * big)
    assert float((l_dev - l_cpu).abs().max()) <= rel * float(l_cpu.abs().max())
    assert float((g_dev - g_cpu).abs().max()) <= rel * float(g_cpu.abs().max())


def test_loss_mean_matches_cpu_with_device_draws():
    """float32, the default backend, a generator on each device, at a fixed reference time
    (a sampled time dominates the variance): 100 batch means per device (the batch shares
    its draws' kernel sums, so batches are the independent units); Welch's z of the
    difference of the means must stay within 3.29 (two-sided p = 1e-3). (Power: a kernel
    4% too wide on one side, sigma 0.52 for 0.5, gives z = -4.1 here.)"""
    torch.manual_seed(0)
    field = MLPField(2, hidden=(32, 32))
    field_dev = copy.deepcopy(field).to(DEVICE)
    x = torch.randn(256, 2, generator=gen(1))
    x_dev = x.to(DEVICE)
    g_cpu, g_dev = gen(10), gen(11, DEVICE)
    reps, sigma, t = 100, 0.5, 0.3
    with torch.no_grad():
        m_cpu = torch.stack([flux_matching_loss(field, x, sigma, t=t, generator=g_cpu).mean() for _ in range(reps)])
        m_dev = torch.stack(
            [flux_matching_loss(field_dev, x_dev, sigma, t=t, generator=g_dev).mean() for _ in range(reps)]
        ).cpu()
    se = math.sqrt(float(m_cpu.var()) / reps + float(m_dev.var()) / reps)
    z = (float(m_dev.mean()) - float(m_cpu.mean())) / se
    means = f"device mean {float(m_dev.mean()):.4g}, CPU {float(m_cpu.mean()):.4g} (se {se:.2g})"
    assert abs(z) <= 3.29, f"z = {z:.2f}: {means}"


# ---------------------------------------------------------------- samplers


def _drift(z):
    # contracting (derivative in [1 - eps, 1 - 0.7 eps] for the step's map): rounding errors do not grow
    return -z + 0.3 * torch.tanh(z)


def test_langevin_matches_cpu_on_the_same_draws(f64, cpu_draws):
    """Each step x + eps f(x) + sqrt(2 eps) xi is at most 8 roundings (tanh within 2 ulp) of
    quantities below M = max(|x|, |xi|) in size, and the step's map contracts, so after K
    steps the two chains differ by at most K 8 u M (u = gamma_1)."""
    x0 = torch.randn(500, 3, generator=gen(0), dtype=F64)
    n_steps = 50
    cpu_draws(langevin_module, 1)
    a = langevin(_drift, x0, step_size=0.05, n_steps=n_steps)
    cpu_draws(langevin_module, 1)
    b = langevin(_drift, x0.to(DEVICE), step_size=0.05, n_steps=n_steps)
    assert b.device.type == DEVICE.type and b.dtype == F64
    bound = n_steps * 8 * gamma(1, F64) * max(float(a.abs().max()), 6.0)  # |xi| < 6 for 25000 draws
    assert float((b.cpu() - a).abs().max()) <= bound


def test_langevin_same_law_with_device_draws():
    """(Power: a drift 0.1 too large on one side gives Bonferroni p = 4e-15 here.)"""
    x0 = torch.zeros(20000, 2)
    a = langevin(_drift, x0, step_size=0.05, n_steps=60, generator=gen(2))
    b = langevin(_drift, x0.to(DEVICE), step_size=0.05, n_steps=60, generator=gen(3, DEVICE))
    assert_same_law(a, b, "langevin")


def _vp_score(x, s):
    # the exact score of N(0, I) * N(0, s^2 I)
    return -x / (1 + s**2)


SIGMAS = torch.logspace(1, -1, 30).tolist()


def test_annealed_langevin_matches_cpu_on_the_same_draws(f64, cpu_draws):
    """Per level: predictor and 2 correctors, each at most 12 roundings of quantities below
    M (the norms in the corrector's step size are d-term sums: gamma_{d+12} per step); the
    model contracts, so the 29 levels add up: 29 3 gamma_{d+12} M."""
    x0 = 10 * torch.randn(500, 2, generator=gen(0), dtype=F64)
    cpu_draws(annealed_module, 4)
    a = annealed_langevin(_vp_score, x0, SIGMAS, corrector_steps=2)
    cpu_draws(annealed_module, 4)
    b = annealed_langevin(_vp_score, x0.to(DEVICE), SIGMAS, corrector_steps=2)
    assert b.device.type == DEVICE.type
    big = max(float(x0.abs().max()), float(a.abs().max()), 6.0)
    assert float((b.cpu() - a).abs().max()) <= 29 * 3 * gamma(2 + 12, F64) * big


def test_annealed_langevin_same_law_with_device_draws():
    """(Power: the model of N(0, 1.2 I) on one side gives Bonferroni p = 1e-7 here.)"""
    x0 = 10 * torch.randn(20000, 2, generator=gen(5))
    a = annealed_langevin(_vp_score, x0, SIGMAS, generator=gen(6), corrector_steps=1)
    b = annealed_langevin(_vp_score, x0.to(DEVICE), SIGMAS, generator=gen(7, DEVICE), corrector_steps=1)
    assert_same_law(a, b, "annealed_langevin")


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_probability_flow_matches_cpu(dtype):
    """Deterministic. A Heun step is at most 10 roundings of quantities below M = max |x|
    and the linear model's flow contracts (toward sigma_L), so L - 1 steps differ by at
    most (L - 1) 10 u M."""
    if dtype == F64 and DEVICE.type == "mps":
        pytest.skip("MPS has no float64")
    x0 = 10 * torch.randn(1000, 3, generator=gen(0), dtype=dtype)
    grid = SIGMAS + [0.0]
    a = probability_flow(_vp_score, x0, grid)
    b = probability_flow(_vp_score, x0.to(DEVICE), grid)
    assert b.device.type == DEVICE.type and b.dtype == dtype
    bound = (len(grid) - 1) * 10 * gamma(1, dtype) * float(x0.abs().max())
    assert float((b.cpu() - a).abs().max()) <= bound


# ---------------------------------------------------------------- metrics


def _clouds(dtype=F64):
    g = gen(0)
    return torch.randn(300, 3, generator=g, dtype=dtype), 1.2 * torch.randn(250, 3, generator=g, dtype=dtype) + 0.3


def test_w2_is_the_cpu_value(f64):
    """POT's exact solver runs on the CPU in float64 whatever the input's device: same bits."""
    x, y = _clouds()
    assert w2(*on(DEVICE, x, y)) == w2(x, y)


def test_sliced_w2_matches_cpu_with_given_directions(f64):
    """The same directions: K projections (d-term dot products of centred points below R),
    1-D sorts (exact), N-term sums of squared differences below (2R)^2, a K-term mean. The
    squares differ by at most 2 gamma_{d + N + K + 4} (2R)^2."""
    x, y = _clouds()
    dirs = torch.randn(64, 3, generator=gen(1), dtype=F64)
    a = sliced_w2(x, y, directions=dirs)
    b = sliced_w2(*on(DEVICE, x, y, dirs)[:2], directions=dirs.to(DEVICE))
    r = float(torch.cat([x, y]).sub(x.mean(0)).norm(dim=1).max())
    assert abs(b**2 - a**2) <= 2 * gamma(3 + 300 + 64 + 4, F64) * (2 * r) ** 2


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_mmd2_matches_cpu_at_a_given_lengthscale(dtype):
    """Kernel values in (0, 1]: exponents |x|^2 + |y|^2 - 2 x.y over 2 l^2 (centred points
    below R; relative error gamma_{d+2}, so an absolute error gamma_{d+2} 4 R^2 / (2 l^2) of
    the exponent and of the kernel value), three sums of up to N^2 terms (gamma_{N^2}), and
    the statistic has 4 in absolute weights (1 + 1 + 2): bound 2 x 4 (gamma_{N^2} +
    gamma_{d+2} (1 + 2 R^2 / l^2)), for both runs."""
    if dtype == F64 and DEVICE.type == "mps":
        pytest.skip("MPS has no float64")
    x, y = _clouds(dtype)
    ell = 1.3
    a = mmd2_unbiased(x, y, lengthscale=ell, chunk_size=128)
    b = mmd2_unbiased(*on(DEVICE, x, y), lengthscale=ell, chunk_size=128)
    r2 = float(torch.cat([x, y]).double().sub(torch.cat([x, y]).double().mean(0)).square().sum(1).max())
    bound = 2 * 4 * (gamma(300 * 300, dtype) + gamma(3 + 2, dtype) * (1 + 2 * r2 / ell**2))
    assert abs(b - a) <= bound


# ---------------------------------------------------------------- the stationarity test


def _mixture():
    return GaussianMixture.isotropic([0.3, 0.7], [[-1.5, 0.0], [1.5, 0.5]], 0.6)


def test_ksd2_matches_cpu_at_given_lengthscales(f64):
    """Deterministic. The Stein kernel h(x, y) = k(x, y) [f(x).f(y) + (f(x) - f(y)).(x - y) / l^2
    + d / l^2 - |x - y|^2 / l^4] is below H = F^2 + 2 F D / l^2 + d / l^2 + D^2 / l^4 (F = max
    |f|, D = the diameter); each term carries gamma_{d+12} plus the exponent's
    gamma_{d+2} D^2 / (2 l^2), the N^2-term sum gamma_{N^2}: both runs within 2 (gamma_{N^2} +
    gamma_{d+12} (1 + D^2 / (2 l^2))) H."""
    p = _mixture()
    x = p.sample(400, generator=gen(0), dtype=F64)
    ells = [0.5, 1.0, 2.0]
    a = ksd2(p.score, x, lengthscales=ells)
    pd = p.to(DEVICE)
    b = ksd2(pd.score, x.to(DEVICE), lengthscales=ells).cpu()
    f = float(p.score(x).norm(dim=1).max())
    diam = float(torch.cdist(x, x).max())
    for k, ell in enumerate(ells):
        h = f**2 + 2 * f * diam / ell**2 + 2 / ell**2 + diam**2 / ell**4
        bound = 2 * (gamma(400 * 400, F64) + gamma(2 + 12, F64) * (1 + diam**2 / (2 * ell**2))) * h
        assert abs(float(b[k]) - float(a[k])) <= bound, (ell, float(a[k]), float(b[k]))


def test_ksd_p_value_matches_cpu_within_bootstrap_error(f64):
    """The statistic is deterministic, the bootstrap multipliers differ between devices: each
    p-value estimates the same bootstrap tail probability p from B draws, so their difference
    has sd sqrt(2 p (1 - p) / B); it must stay within 3.29 sd (p = 1e-3) plus 2 / (B + 1)
    (the estimator's (1 + #) / (1 + B) offset)."""
    p = _mixture()
    x = p.sample(300, generator=gen(1), dtype=F64)
    opts = dict(method="ksd", lengthscales=[0.5, 1.0, 2.0], mode_clusters=(), n_bootstrap=2000, seed=3)
    r_cpu = stationarity_test(p.score, x, **opts)
    r_dev = stationarity_test(p.to(DEVICE).score, x.to(DEVICE), **opts)
    pbar = 0.5 * (r_cpu.p_value + r_dev.p_value)
    sd = math.sqrt(2 * pbar * (1 - pbar) / 2000)
    assert abs(r_dev.p_value - r_cpu.p_value) <= 3.29 * sd + 2 / 2001, (r_cpu.p_value, r_dev.p_value)


def test_stationarity_verdicts_match_cpu():
    """The combined test with its defaults on the device: the mixture's score passes and the
    score plus a constant drift of 1 fails, as on the CPU (the drift is detected with power
    ~1 at N = 400; the score fails at fixed seed with probability alpha = 0.01)."""
    p = _mixture()
    x = p.sample(400, generator=gen(2))
    pd, xd = p.to(DEVICE), x.to(DEVICE)
    for dev_field, cpu_field, expected in ((pd.score, p.score, True),
                                           (lambda z: pd.score(z) + 1.0, lambda z: p.score(z) + 1.0, False)):
        r_cpu = stationarity_test(cpu_field, x, seed=0)
        r_dev = stationarity_test(dev_field, xd, seed=0)
        assert (r_cpu.passed, r_dev.passed) == (expected, expected), (r_cpu.p_value, r_dev.p_value)
