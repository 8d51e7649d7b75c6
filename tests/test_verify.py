"""Tests for fluxbench.verify: Stein kernel, KSD, stationarity tests, defect, check_field (SPEC sections 1, 5).

Statistical assertions state their threshold (a p-value level or a number of standard
errors, SE) next to the assertion and use fixed seeds.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from fluxbench.fields import ConstantAntisymmetric, RotationalField, ScalarAntisymmetric
from fluxbench.samplers import ExactOU
from fluxbench.targets import Gaussian, GaussianMixture
from fluxbench.verify import (
    StationarityReport,
    check_field,
    current_divergence,
    default_eps_factor,
    defect,
    ksd2,
    ksd_test,
    run_check,
    stationarity_test,
    stein_kernel,
)
from fluxbench.verify.modes import hotelling, responsibility_generator, wilson_hilferty
from fluxbench.verify.stein import DEFAULT_LENGTHSCALE_FACTORS, ksd_pass

from tools.calibration.cases import CASE_BY_NAME, make_case, seed_samples

from .conftest import load_tool

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")



def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen(seed), dtype=F64)
    return a @ a.T / d + 0.5 * torch.eye(d, dtype=F64)


def _antisym(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen(seed), dtype=F64)
    return a - a.T


def _gaussian(d: int = 3, seed: int = 0) -> Gaussian:
    return Gaussian(torch.randn(d, generator=gen(seed), dtype=F64), _spd(d, seed + 1))


def _mixture() -> GaussianMixture:
    return GaussianMixture.isotropic(
        torch.tensor([0.2, 0.5, 0.3], dtype=F64),
        torch.tensor([[0.0, 2.0], [-1.7, -1.0], [1.7, -1.0]], dtype=F64),
        torch.tensor([0.6, 0.8, 0.7], dtype=F64),
    )


def _scalar_rotation(d: int, seed: int, closed_form: bool) -> ScalarAntisymmetric:
    def a(x):
        return torch.exp(-(x * x).sum(1) / 8)

    def grad(x):
        return -x / 4 * a(x)[:, None]

    return ScalarAntisymmetric(a, _antisym(d, seed), grad=grad if closed_form else None)


# --------------------------------------------------------------------------- Stein kernel
def _nested_autograd_h(x, y, field, ell):
    """L_f^x L_f^y k(x, y) for one pair by nested autograd (second derivatives), k the RBF kernel."""
    d = x.shape[0]
    a = 1.0 / ell**2

    def generator_of(val, z):
        """(L_f g)(z) = f(z) . grad g + Lap g for the scalar val = g(z), keeping the graph."""
        (g,) = torch.autograd.grad(val, z, create_graph=True)
        lap = sum(torch.autograd.grad(g[i], z, create_graph=True)[0][i] for i in range(d))
        return field(z[None])[0] @ g + lap

    xr = x.clone().requires_grad_(True)
    yr = y.clone().requires_grad_(True)
    k = torch.exp(-0.5 * a * ((xr - yr) ** 2).sum())
    ly_k = generator_of(k, yr)  # a function of x through the graph
    return generator_of(ly_k, xr).detach()


@pytest.mark.parametrize("ell", [0.6, 1.7])
def test_stein_kernel_equals_generator_applied_twice_by_autograd(ell):
    # f(z) = A z + c is a field, so L_f^x L_f^y k can be differentiated exactly (SPEC section 5)
    d = 3
    g = gen(0)
    A = torch.randn(d, d, generator=g, dtype=F64)
    c = torch.randn(d, generator=g, dtype=F64)

    def field(z):
        return z @ A.T + c

    x = torch.randn(4, d, generator=g, dtype=F64)
    y = torch.randn(5, d, generator=g, dtype=F64)
    H = stein_kernel(x, y, field(x), field(y), ell)
    ref = torch.stack([torch.stack([_nested_autograd_h(x[i], y[j], field, ell) for j in range(5)]) for i in range(4)])
    assert H.shape == (4, 5)
    torch.testing.assert_close(H, ref, rtol=1e-10, atol=1e-10)


def test_stein_kernel_matches_spec_formula_on_random_field_values():
    d = 4
    g = gen(1)
    x, y = torch.randn(6, d, generator=g, dtype=F64), torch.randn(7, d, generator=g, dtype=F64)
    fx, fy = 3 * torch.randn(6, d, generator=g, dtype=F64), 3 * torch.randn(7, d, generator=g, dtype=F64)
    ell = 0.8
    a = 1 / ell**2
    delta = x[:, None] - y[None]
    D = (delta**2).sum(-1)
    fxd = (fx[:, None] * delta).sum(-1)
    fyd = (fy[None] * delta).sum(-1)
    spec = torch.exp(-D * a / 2) * (
        a * fx @ fy.T - a**2 * fxd * fyd + a**2 * (a * D - d - 2) * (fyd - fxd)
        + (a**2 * D - a * d) ** 2 - 4 * a**3 * D + 2 * a**2 * d
    )
    torch.testing.assert_close(stein_kernel(x, y, fx, fy, ell), spec, rtol=1e-12, atol=1e-12)
    # symmetric: h(x, y) = h(y, x)
    torch.testing.assert_close(stein_kernel(y, x, fy, fx, ell), spec.T, rtol=1e-12, atol=1e-12)


def test_ksd2_is_the_u_statistic_explicit_double_sum():
    p = _gaussian(2, seed=3)
    x = p.sample(25, generator=gen(2), dtype=F64)

    def field(z):
        return 0.7 * p.score(z) + 0.1

    fx = field(x)
    ells = [0.5, 1.3]
    total = torch.zeros(2, dtype=F64)
    for i in range(25):
        for j in range(25):
            if i != j:
                for k, ell in enumerate(ells):
                    total[k] += stein_kernel(x[i : i + 1], x[j : j + 1], fx[i : i + 1], fx[j : j + 1], ell)[0, 0]
    expected = total / (25 * 24)
    torch.testing.assert_close(ksd2(field, x, lengthscales=ells), expected, rtol=1e-12, atol=1e-14)
    assert ksd2(field, x, lengthscales=0.5).shape == ()


def test_ksd_ignores_autocast():
    """The Stein kernel's distances and products stay in fp32 under bf16 autocast (the
    shared U-statistic pass turns autocast off), in the statistic and its bootstrap."""
    p = _gaussian(2, seed=3)
    x = p.sample(300, generator=gen(2))

    def field(z):
        return 0.7 * p.score(z)

    plain = ksd_test(field, x, seed=5, n_bootstrap=200, mode_clusters=())
    plain_u = ksd2(field, x, lengthscales=[0.5, 1.3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = ksd_test(field, x, seed=5, n_bootstrap=200, mode_clusters=())
        cast_u = ksd2(field, x, lengthscales=[0.5, 1.3])
    assert cast.ksd2 == plain.ksd2 and (cast.statistic, cast.p_value) == (plain.statistic, plain.p_value)
    assert torch.equal(cast_u, plain_u)


def test_chunked_and_unchunked_ksd_agree():
    p = _gaussian(4, seed=5)
    x = p.sample(400, generator=gen(3), dtype=F64)

    def field(z):
        return 0.9 * p.score(z)

    ells = [0.4, 1.0, 3.0]
    whole = ksd2(field, x, lengthscales=ells, chunk_size=4096)
    chunked = ksd2(field, x, lengthscales=ells, chunk_size=97)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0.0)
    # the bootstrap products too (float32 GEMMs): relative 1e-4
    w = torch.randint(0, 2, (400, 8), generator=gen(4)).double() * 2 - 1
    r1 = ksd_pass(x, field(x), ells, multipliers=w, chunk_size=4096)
    r2 = ksd_pass(x, field(x), ells, multipliers=w, chunk_size=97)
    torch.testing.assert_close(r2.sq_sums, r1.sq_sums, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(r2.hw, r1.hw, rtol=1e-4, atol=1e-4 * float(r1.hw.abs().max()))
    # and the test's p-value and statistic
    a = stationarity_test(field, x, seed=1, chunk_size=4096, n_bootstrap=50, method="ksd")
    b = stationarity_test(field, x, seed=1, chunk_size=97, n_bootstrap=50, method="ksd")
    assert b.statistic == pytest.approx(a.statistic, rel=1e-6)


def test_ksd2_mean_is_zero_for_the_score_and_positive_for_a_wrong_temperature():
    p = Gaussian.isotropic(2)
    vals_exact, vals_wrong = [], []
    for s in range(40):
        x = p.sample(200, generator=gen(100 + s), dtype=F64)
        vals_exact.append(float(ksd2(p.score, x, lengthscales=1.0)))
        vals_wrong.append(float(ksd2(lambda z: 0.5 * p.score(z), x, lengthscales=1.0)))
    e = torch.tensor(vals_exact)
    w = torch.tensor(vals_wrong)
    se_e = float(e.std() / math.sqrt(len(e)))
    se_w = float(w.std() / math.sqrt(len(w)))
    # unbiased U-statistic: E = KSD^2 = 0 under stationarity (within 4 SE over 40 seeds)
    assert abs(float(e.mean())) < 4 * se_e
    # wrong temperature: KSD^2 > 0 (mean more than 4 SE above 0)
    assert float(w.mean()) > 4 * se_w


# --------------------------------------------------------------------------- stationarity_test
def test_ksd_p_values_are_uniform_under_h0():
    p = Gaussian.isotropic(2)
    pv = []
    for s in range(50):
        x = p.sample(300, generator=gen(1000 + s))
        pv.append(stationarity_test(p.score, x, seed=s, n_bootstrap=200, method="ksd").p_value)
    pv_t = torch.tensor(pv)
    n = len(pv)
    for level in (0.1, 0.5):
        rate = float((pv_t < level).float().mean())
        se = math.sqrt(level * (1 - level) / n)
        # rejection rate at level alpha within alpha +- 3 SE (SE of a Binomial(50, alpha) rate)
        assert rate <= level + 3 * se, (level, rate)
        assert rate >= level - 3 * se, (level, rate)


def test_ksd_and_rollout_reject_half_the_score():
    p = Gaussian.isotropic(2)
    x = p.sample(500, generator=gen(7))

    def half(z):
        return 0.5 * p.score(z)

    r_ksd = stationarity_test(half, x, method="ksd", seed=0)
    r_roll = stationarity_test(half, x, method="rollout", seed=0)
    # a law off by W2 ~ 0.59: both p-values far below 0.01
    assert r_ksd.p_value < 0.01 and not r_ksd.passed
    assert r_roll.p_value < 0.01 and not r_roll.passed
    assert r_roll.w2 > r_roll.w2_noise_floor


def test_report_fields_str_and_reproducibility():
    p = Gaussian.isotropic(3)
    x = p.sample(400, generator=gen(8))
    rep = stationarity_test(p.score, x, seed=5, method="ksd")
    assert isinstance(rep, StationarityReport)
    assert rep.method == "ksd" and rep.n == 400 and rep.d == 3 and rep.alpha == 0.01
    assert 0 < rep.p_value <= 1 and rep.passed == (rep.p_value >= rep.alpha)
    n_ells = len(DEFAULT_LENGTHSCALE_FACTORS)
    assert len(rep.lengthscales) == n_ells and rep.median_lengthscale > 0 and rep.n_bootstrap == 1000
    assert len(rep.ksd2) == n_ells and all(s > 0 for s in rep.ksd2_sd)
    assert rep.statistic == pytest.approx(max(rep.details["standardised"] + rep.details["standardised_modes"]))
    assert len(rep.details["standardised_modes"]) == len(rep.details["mode_settings"]) == 12  # 4 K x 3 widths
    text = str(rep)
    assert "p-value" in text and "ksd" in text and "lengthscales" in text and "PASS" in text
    again = stationarity_test(p.score, x, seed=5, method="ksd")
    assert again.p_value == rep.p_value and again.statistic == rep.statistic
    other = stationarity_test(p.score, x, seed=6, method="ksd")
    # the kernels' statistics do not depend on the seed here (N < 2000: no median subsample)
    assert other.details["standardised"] == rep.details["standardised"]
    d = rep.to_dict()
    assert d["method"] == "ksd" and d["p_value"] == rep.p_value


def test_rollout_mmd_is_aggregated_over_lengthscales_on_request():
    p = Gaussian.isotropic(2)
    x = p.sample(300, generator=gen(9))
    opts = dict(method="rollout", design="split", step_size=0.01, n_steps=100, seed=1, n_permutations=200)
    plain = stationarity_test(p.score, x, **opts)
    assert "mmd_lengthscales" not in plain.details and plain.statistic == plain.mmd2
    factors = (0.25, 0.5, 1.0, 2.0, 4.0)
    rep = stationarity_test(p.score, x, mmd_lengthscale_factors=factors, **opts)
    ells = rep.details["mmd_lengthscales"]
    assert ells == pytest.approx(tuple(c * plain.mmd_lengthscale for c in factors))
    assert rep.mmd_lengthscale == plain.mmd_lengthscale and rep.mmd2 == pytest.approx(plain.mmd2)
    assert rep.statistic == min(rep.details["mmd_p_value_per_lengthscale"])
    assert rep.p_value >= rep.statistic  # the min-p is calibrated upwards, never below
    assert "min-p over lengthscales" in str(rep)
    # without the median in the grid there is no MMD^2 at mmd_lengthscale to report
    off = stationarity_test(p.score, x, mmd_lengthscale_factors=(0.5, 2.0), **opts)
    assert off.mmd2 is None and off.mmd_lengthscale == plain.mmd_lengthscale and "n/a" in str(off)
    with pytest.raises(ValueError, match="mmd_lengthscale_factors is empty"):
        stationarity_test(p.score, x, mmd_lengthscale_factors=(), **opts)
    with pytest.raises(ValueError, match="not both"):
        stationarity_test(p.score, x, mmd_lengthscale_factors=factors, mmd_lengthscale=1.0, **opts)


def test_paired_rollout_takes_the_maximum_over_lengthscales():
    p = Gaussian.isotropic(2)
    x = p.sample(300, generator=gen(9))
    opts = dict(method="rollout", step_size=0.01, n_steps=100, seed=1, n_bootstrap=200)
    plain = stationarity_test(p.score, x, **opts)
    assert plain.details["design"] == "paired" and plain.n_bootstrap == 200 and plain.n_permutations is None
    factors = (0.5, 1.0, 2.0)
    rep = stationarity_test(p.score, x, mmd_lengthscale_factors=factors, **opts)
    assert rep.details["mmd_lengthscales"] == pytest.approx(tuple(c * plain.mmd_lengthscale for c in factors))
    # same chains, same median, same multipliers: the median's MMD^2 and p-value are the plain test's
    assert rep.mmd2 == pytest.approx(plain.mmd2, rel=1e-6)
    assert rep.details["mmd_p_value_per_lengthscale"][1] == plain.p_value
    assert rep.statistic >= plain.statistic  # the maximum includes the median's standardised statistic
    assert "max over lengthscales" in str(rep) and "wild-bootstrap draws" in str(rep)
    with pytest.raises(ValueError, match="n_permutations belongs to design='split'"):
        stationarity_test(p.score, x, method="rollout", n_permutations=100)
    with pytest.raises(ValueError, match="n_bootstrap belongs to design='paired'"):
        stationarity_test(p.score, x, method="rollout", design="split", n_bootstrap=100)
    with pytest.raises(ValueError, match="unknown rollout design 'pairs'"):
        stationarity_test(p.score, x, method="rollout", design="pairs")


@pytest.mark.parametrize("time", [0.3, 2.0])
def test_paired_rollout_is_valid_for_a_non_reversible_field(time):
    # a strong rotation, sampled exactly (no discretisation bias): start and end of a
    # chain are dependent and not exchangeable (a swap test would be invalid), yet the
    # paired test's p-values must be uniform under H0
    p = Gaussian.isotropic(2)
    ou = ExactOU(torch.eye(2) + torch.tensor([[0.0, -4.0], [4.0, 0.0]]), torch.eye(2))

    def sampler(field, x0, generator):
        return ou.step(x0, time, generator=generator)

    pv = []
    for s in range(50):
        x = p.sample(300, generator=gen(2000 + s))
        rep = stationarity_test(ou.drift, x, method="rollout", sampler=sampler, seed=s, n_bootstrap=200, compute_w2=False)
        pv.append(rep.p_value)
    pv_t = torch.tensor(pv)
    for level in (0.1, 0.5):
        rate = float((pv_t < level).float().mean())
        se = math.sqrt(level * (1 - level) / len(pv))
        # within level +- 3 SE (SE of a Binomial(50, level) rate)
        assert level - 3 * se <= rate <= level + 3 * se, (level, rate)


def test_rollout_step_size_shrinks_with_n_above_the_calibrated_n():
    # the ULA bias's shift of the statistic grows like N eps^2: eps ~ N^-1/2 above N = 2000
    assert default_eps_factor(500) == default_eps_factor(2000) == 0.02
    assert default_eps_factor(8000) == pytest.approx(0.01, rel=1e-12)
    p = Gaussian.isotropic(2)
    eps = {}
    for n in (2000, 8000):
        x = p.sample(n, generator=gen(10))
        rep = stationarity_test(p.score, x, method="rollout", n_steps=5, seed=1, n_bootstrap=20, compute_w2=False)
        eps[n] = rep.eps
    # N(0, I): eps = eps_factor lam / lip^2 with lam = lip = 1 up to the finite differences
    assert eps[2000] == pytest.approx(0.02, rel=0.05) and eps[8000] == pytest.approx(eps[2000] / 2, rel=0.05)


def test_rollout_report_carries_eps_and_n_steps():
    p = Gaussian.isotropic(2)
    x = p.sample(300, generator=gen(9))
    rep = stationarity_test(p.score, x, method="rollout", step_size=0.01, n_steps=200, seed=1)
    assert rep.eps == 0.01 and rep.n_steps == 200 and rep.total_time == pytest.approx(2.0)
    assert rep.w2 is not None and rep.w2_noise_floor is not None and rep.n_bootstrap == 1000
    assert "eps = 0.01" in str(rep) and "n_steps = 200" in str(rep)
    default = stationarity_test(p.score, x, method="rollout", seed=1)
    # default schedule for N(0, I): eps ~ 0.02 (1% variance bias), 20 relaxation times
    assert 0.01 < default.eps < 0.04 and default.n_steps >= 500
    assert default.details["lam"] == pytest.approx(1.0, rel=0.05)
    again = stationarity_test(p.score, x, method="rollout", seed=1)
    assert again.p_value == default.p_value and again.w2 == default.w2

    calls = []

    def sampler(field, x0, generator):
        calls.append(x0.shape)
        return x0 + 0.0 * field(x0)

    custom = stationarity_test(p.score, x, method="rollout", sampler=sampler, seed=1, step_size=0.1, n_steps=3)
    # paired design: a chain from every sample
    assert calls == [(300, 2)] and custom.eps == 0.1 and custom.n_steps == 3
    # the identity "sampler" leaves every chain where it started: not rejected
    assert custom.passed
    split = stationarity_test(p.score, x, method="rollout", design="split", sampler=sampler, seed=1)
    assert calls[-1] == (150, 2) and split.passed and split.n_permutations == 1000


def test_combined_is_bonferroni_of_the_two_subtests():
    p = Gaussian.isotropic(2)
    x = p.sample(300, generator=gen(10))

    def field(z):
        return 0.8 * p.score(z)

    comb = stationarity_test(field, x, method="combined", seed=3, alpha=0.05)
    k = stationarity_test(field, x, method="ksd", seed=3)
    r = stationarity_test(field, x, method="rollout", seed=3)
    assert comb.p_value == pytest.approx(min(1.0, 2 * min(k.p_value, r.p_value)))
    assert set(comb.sub_reports) == {"ksd", "rollout"}
    assert comb.sub_reports["ksd"].alpha == 0.025 and comb.sub_reports["rollout"].alpha == 0.025
    assert comb.passed == (comb.sub_reports["ksd"].passed and comb.sub_reports["rollout"].passed)
    assert comb.eps == r.eps and comb.n_steps == r.n_steps
    assert "Bonferroni" in str(comb)


def test_bad_inputs_raise_clear_value_errors():
    p = Gaussian.isotropic(2)
    x = p.sample(50, generator=gen(11))
    cases = [
        (dict(samples=x[:, 0]), "shape"),
        (dict(samples=torch.cat([x, torch.tensor([[float("nan"), 0.0]])])), "NaN"),
        (dict(samples=x[:3]), "N >= 4"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.0), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(method="mcmc"), "unknown method"),
        (dict(bandwidth=1.0), "unknown option"),
        (dict(method="ksd", step_size=0.1), "unknown option"),
        (dict(field=lambda z: z[:, :1]), "shape"),
        (dict(field=lambda z: z.double()), "dtype"),
        (dict(field=lambda z: z * float("nan")), "NaN"),
        (dict(field=3.0), "callable"),
        (dict(seed=1.5), "seed"),
    ]
    for kwargs, match in cases:
        args = {"field": p.score, "samples": x, **kwargs}
        field, samples = args.pop("field"), args.pop("samples")
        with pytest.raises(ValueError, match=match):
            stationarity_test(field, samples, **args)
    with pytest.raises(ValueError, match="shape"):
        stationarity_test(lambda z: z[:, :1], x, method="rollout")


# --------------------------------------------------------------------------- defect
def _stationary_fields(target):
    d = target.dim
    s = target.score
    return {
        "score": s,
        "constant A": RotationalField(s, ConstantAntisymmetric(_antisym(d, 20))),
        "scalar A (autograd grad)": RotationalField(s, _scalar_rotation(d, 21, closed_form=False)),
        "scalar A (closed-form grad)": RotationalField(s, _scalar_rotation(d, 22, closed_form=True)),
    }


@pytest.mark.parametrize("which", ["gaussian", "mixture"])
def test_defect_vanishes_for_stationary_fields(which):
    target = _gaussian(3, seed=12) if which == "gaussian" else _mixture()
    x = target.sample(64, generator=gen(13), dtype=F64)
    for name, field in _stationary_fields(target).items():
        r = defect(field, target.score, x)
        assert r.shape == (64,) and r.dtype == F64
        assert float(r.abs().max()) < 1e-10, name
        cd = current_divergence(field, target.log_prob, x)
        assert float(cd.abs().max()) < 1e-10, name


def test_defect_of_a_wrong_temperature_is_the_closed_form():
    p = _gaussian(3, seed=14)
    x = p.sample(32, generator=gen(15), dtype=F64)

    def field(z):
        return 0.9 * p.score(z)

    r = defect(field, p.score, x)
    # u = -0.1 s: r = -0.1 (div s + |s|^2) = 0.1 (tr P - |s|^2)
    s = p.score(x)
    expected = 0.1 * (torch.trace(p.precision) - (s * s).sum(1))
    torch.testing.assert_close(r, expected, rtol=1e-10, atol=1e-12)
    assert float(r.abs().max()) > 0.01
    # div(p u) = p r
    torch.testing.assert_close(current_divergence(field, p.log_prob, x), torch.exp(p.log_prob(x)) * r, rtol=1e-10, atol=1e-14)


def test_defect_hutchinson_is_unbiased():
    p = _gaussian(4, seed=16)
    x = p.sample(8, generator=gen(17), dtype=F64)
    field = RotationalField(lambda z: 0.8 * p.score(z), ConstantAntisymmetric(_antisym(4, 18)))
    exact = defect(field, p.score, x)
    est = defect(field, p.score, x, divergence="hutchinson", generator=gen(19), n_probes=4000)
    single = torch.stack([defect(field, p.score, x, divergence="hutchinson", generator=gen(100 + k)) for k in range(30)])
    se = single.std(0) / math.sqrt(4000)
    # 4000-probe average within 5 SE (per-probe SD from 30 single-probe draws)
    assert bool(((est - exact).abs() <= 5 * se + 1e-12).all())
    with pytest.raises(ValueError, match="divergence"):
        defect(field, p.score, x, divergence="trace")


# --------------------------------------------------------------------------- check_field
def test_check_field_table_good_and_bad():
    p = Gaussian.isotropic(3)
    good = RotationalField(p.score, ConstantAntisymmetric(_antisym(3, 23) / 4))
    table = check_field(good, p, n=600, seed=0)
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns) == ["check", "status", "passed", "value", "threshold", "detail"]
    assert list(table["check"]) == [
        "output_contract", "determinism", "batch_independence", "defect", "ksd_stationarity", "rollout_stationarity",
    ]
    assert table["passed"].dtype == "boolean" and bool(table["passed"].all()), table.to_string()
    assert set(table["status"]) == {"passed"}

    def bad(z):
        return 0.5 * p.score(z)

    tb = check_field(bad, p, n=600, seed=0).set_index("check")
    assert not tb.loc["defect", "passed"] and tb.loc["defect", "value"] > tb.loc["defect", "threshold"]
    assert not tb.loc["ksd_stationarity", "passed"] and tb.loc["ksd_stationarity", "value"] < 0.01
    assert tb.loc["output_contract", "passed"] and tb.loc["batch_independence", "passed"]
    with pytest.raises(AssertionError, match="defect"):
        check_field(bad, p, n=600, checks=["defect", "ksd_stationarity"], raise_on_failure=True)


def test_check_field_catches_contract_batch_and_determinism_failures():
    p = Gaussian.isotropic(2)

    def coupled(z):  # uses a batch statistic: not a pointwise field
        return p.score(z) + z.mean(0, keepdim=True)

    def noisy(z):
        return p.score(z) + 1e-3 * torch.randn_like(z)

    def wrong_dtype(z):
        return p.score(z).double()

    opts = dict(n=200, checks=["output_contract", "determinism", "batch_independence"])
    t = check_field(coupled, p, **opts).set_index("check")
    assert not t.loc["batch_independence", "passed"] and t.loc["determinism", "passed"]
    t = check_field(noisy, p, **opts).set_index("check")
    assert not t.loc["determinism", "passed"]
    t = check_field(wrong_dtype, p, **opts).set_index("check")
    assert not t.loc["output_contract", "passed"] and "dtype" in t.loc["output_contract", "detail"]
    # a tensor of samples as target: the defect check is skipped, the tests run
    x = p.sample(300, generator=gen(24))
    t = check_field(p.score, x, checks=["defect", "ksd_stationarity"], n=300).set_index("check")
    assert t.loc["defect", "detail"].startswith("skipped") and t.loc["ksd_stationarity", "passed"]
    # skipped is neither passed nor failed (it was reported as passed)
    assert t.loc["defect", "status"] == "skipped" and pd.isna(t.loc["defect", "passed"])
    check_field(p.score, x, checks=["defect", "ksd_stationarity"], n=300, raise_on_failure=True)
    assert run_check("defect", p.score, x, n=300)["status"] == "skipped"
    with pytest.raises(ValueError, match="unknown check"):
        check_field(p.score, p, checks=["nope"])
    with pytest.raises(ValueError, match="unknown option"):
        check_field(p.score, p, tolerance=0.1)


def test_check_field_hutchinson_defect_in_high_dimension():
    p = Gaussian.isotropic(12)
    field = RotationalField(p.score, ConstantAntisymmetric(_antisym(12, 25) / 8))
    t = check_field(field, p, n=300, checks=["defect"]).set_index("check")
    assert t.loc["defect", "passed"] and "Hutchinson" in t.loc["defect", "detail"]
    t = check_field(lambda z: 0.9 * p.score(z), p, n=300, checks=["defect"]).set_index("check")
    # u = -0.1 s: RMS r / E|s|^2 = 0.1 sqrt(2 d) / d ~ 0.041 > 0.01
    assert not t.loc["defect", "passed"] and t.loc["defect", "value"] == pytest.approx(0.1 * math.sqrt(24) / 12, rel=0.3)


def test_ksd_grid_tool_gives_ksd_test_p_values(tmp_path):
    """tools/ksd_grid.py: a sub-grid's p-value from the fine pass is ksd_test's with that grid."""

    tool = load_tool("ksd_grid")
    name, seeds, n = "iso2-rot_sym", range(1000, 1003), 300
    z, zb = tool.case_draws(name, seeds, n)
    rows = {r["grid"]: r for r in tool.grid_rates(name, z, zb)}
    assert set(rows) == set(tool.GRIDS)
    target, field, _ = make_case(CASE_BY_NAME[name])
    for factors in (tool.GRIDS["0.25-4 (5)"], tool.GRIDS["0.35, 1"], DEFAULT_LENGTHSCALE_FACTORS):
        p = tool.grid_p_values(z, zb, tuple(factors))
        for k, s in enumerate(seeds):
            rep = stationarity_test(field, seed_samples(target, s, n), seed=s, lengthscale_factors=factors, method="ksd")
            assert float(p[k]) == pytest.approx(rep.details["p_value_kernels"], rel=1e-12)
        assert rows[next(g for g, f in tool.GRIDS.items() if f == tuple(factors))]["rejections"] == int((p < 0.01).sum())
    assert tool.main(["--cases", name, "--seeds", "1000", "1002", "--n", "200", "--out", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "0.25-1 (3)" in readme and "iso2-rot_sym" in readme and (tmp_path / "rates.csv").exists()
    assert "`ksd_test` (`DEFAULT_LENGTHSCALE_FACTORS`)" in readme


def test_grid_tool_gives_rollout_test_p_values(tmp_path):
    """tools/ksd_grid.py --test rollout: a sub-grid's p-value is rollout_test's with that grid."""

    tool = load_tool("ksd_grid")
    name, seeds, n = "iso2-drift", range(1000, 1002), 200
    z, zb = tool.rollout_case_draws(name, seeds, n)
    target, field, _ = make_case(CASE_BY_NAME[name])
    for factors in (tool.GRIDS["1 (median)"], tool.GRIDS["0.25-4 (5)"]):
        p = tool.grid_p_values(z, zb, tuple(factors))
        for k, s in enumerate(seeds):
            opts = {} if factors == (1.0,) else {"mmd_lengthscale_factors": factors}
            rep = stationarity_test(field, seed_samples(target, s, n), method="rollout", seed=s, compute_w2=False, **opts)
            assert float(p[k]) == pytest.approx(rep.p_value, rel=1e-12)
    args = ["--test", "rollout", "--cases", name, "--seeds", "1000", "1001", "--n", "100", "--out", str(tmp_path)]
    assert tool.main(args) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "Rollout paired-MMD" in readme and "`rollout_test`" in readme and "`1 (median)`" in readme


def _generator_by_autograd(g, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """L_f g = f . grad g + Lap g at x (N, d) by autograd, for a scalar function g (N, d) -> (N,)."""
    xr = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(g(xr).sum(), xr, create_graph=True)[0]
    lap = sum(torch.autograd.grad(grad[:, i].sum(), xr, retain_graph=True)[0][:, i] for i in range(x.shape[1]))
    return (f * grad).sum(1) + lap


def test_mode_test_functions_match_autograd():
    """fluxbench.verify.modes, eq. (M1): L_f r_k in closed form equals autograd's f . grad r_k + Lap r_k."""
    g = gen(3)
    x, f = torch.randn(50, 3, generator=g, dtype=torch.float64), torch.randn(50, 3, generator=g, dtype=torch.float64)
    centres = torch.randn(4, 3, generator=g, dtype=torch.float64)
    closed = responsibility_generator(x, f, centres, 0.7)
    for k in range(4):
        resp = lambda z, k=k: torch.softmax(-(z[:, None] - centres[None]).square().sum(-1) / (2 * 0.7**2), 1)[:, k]
        assert torch.allclose(closed[:, k], _generator_by_autograd(resp, x, f), atol=1e-10)


def test_hotelling_is_chi2_under_h0_with_a_consistent_bootstrap():
    """Mean-zero features: n mbar^T S^-1 mbar ~ chi^2_J (mean J, sd sqrt(2 J)), and the
    multiplier bootstrap draws have the same law; collinear columns lower the rank."""
    g = gen(4)
    feats = torch.randn(400, 200, 3, generator=g, dtype=torch.float64)
    stats = torch.stack([hotelling(a)[0] for a in feats])
    # mean 3 within 4 SE (sqrt(6 / 400)), plus the O(J^2 / n) small-sample bias of Hotelling's T^2
    assert abs(float(stats.mean()) - 3.0) < 4 * math.sqrt(6.0 / 400) + 0.1
    w = torch.randint(0, 2, (200, 2000), generator=g).double() * 2 - 1
    _, rank, boot = hotelling(feats[0], w)
    assert rank == 3 and abs(float(boot.mean()) - 3.0) < 4 * math.sqrt(6.0 / 2000) + 0.1
    collinear = torch.cat([feats[0], feats[0][:, :1] * 2.0], 1)
    assert hotelling(collinear)[1] == 3


def test_wilson_hilferty_puts_chi2_on_the_normal_scale():
    """Eq. (M2): the upper tail of chi^2_r maps onto N(0, 1)'s (what a maximum uses): the
    0.99 and 0.999 quantiles of 20000 draws are 2.326 and 3.090 within 4 SE (0.026 and
    0.066, from the quantiles' asymptotic variance)."""
    g = gen(6)
    for r in (1, 2, 3, 5):
        t = torch.randn(20000, r, generator=g, dtype=torch.float64).square().sum(1)
        z = wilson_hilferty(t, r)
        assert abs(float(torch.quantile(z, 0.99)) - 2.326) < 4 * 0.026
        assert abs(float(torch.quantile(z, 0.999)) - 3.090) < 4 * 0.066


def test_mode_test_functions_see_wrong_mixing_weights_that_kernels_miss():
    """triangle-weights (calibration samples, N = 2000): the kernels alone do not reject on
    these seeds, the mode test functions and hence ksd_test do (calibration: 1.00 over
    seeds 0-99, kernels alone 0.02); the same samples under the true score pass."""

    target, wrong, _ = make_case(CASE_BY_NAME["triangle-weights"])
    for s in (0, 1):
        x = seed_samples(target, s, 2000)
        rep = ksd_test(wrong, x, seed=s)
        assert rep.details["p_value_kernels"] > 0.05 and rep.details["p_value_modes"] < 0.005 and rep.p_value < 0.005
        assert ksd_test(target.score, x, seed=s).passed
    plain = ksd_test(wrong, x, seed=1, mode_clusters=())
    assert plain.p_value == rep.details["p_value_kernels"] and "p_value_modes" not in plain.details


def test_mode_options_are_checked_and_small_samples_skip_modes():
    p = Gaussian.isotropic(2)
    x = p.sample(30, generator=gen(5))
    for bad in ({"mode_clusters": [1]}, {"mode_clusters": [2.5]}, {"mode_widths": [0.0]}, {"mode_widths": []}):
        with pytest.raises(ValueError, match="mode"):
            stationarity_test(p.score, x, **bad, method="ksd")
    rep = stationarity_test(p.score, x, method="ksd")  # N = 30: only K = 2 and 3 have N >= 10 K
    assert {k for k, _ in rep.details["mode_settings"]} == {2, 3}
    # two distinct points: no clustering has spread, or k-means++ cannot place K > 2
    # centres; the modes are skipped, quietly and without NaN, and the kernels still test
    two = torch.zeros(100, 2)
    two[50:] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = stationarity_test(lambda z: -z, two, method="ksd")
    assert rep.details["mode_settings"] == () and "p_value_modes" not in rep.details
    assert math.isfinite(rep.p_value) and rep.p_value == rep.details["p_value_kernels"]


def test_stein_blindness_tool_bumps_match_autograd():
    """tools/stein_blindness.py: its closed form of L_f k(., v) for RBF bumps equals autograd's."""
    tool = load_tool("stein_blindness")
    g = gen(3)
    x, f = torch.randn(50, 3, generator=g, dtype=torch.float64), torch.randn(50, 3, generator=g, dtype=torch.float64)
    centres = torch.randn(4, 3, generator=g, dtype=torch.float64)
    for k in range(4):
        bump = lambda z, k=k: torch.exp(-(z - centres[k]).square().sum(1) / (2 * 1.3**2))
        assert torch.allclose(tool.bump_features(x, f, centres, 1.3)[:, k], _generator_by_autograd(bump, x, f), atol=1e-10)


@pytest.mark.parametrize("method", ["ksd", "rollout", "combined"])
@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True])
def test_stationarity_test_rejects_bad_seeds_like_train_does(method, seed):
    """seed=-1 was accepted here and rejected by train(): one rule for every seed."""
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="seed must be"):
        stationarity_test(lambda z: -z, x, method=method, seed=seed)


def test_default_method_is_the_combined_test_the_readme_gates_on():
    p = Gaussian.isotropic(2)
    x = p.sample(200, generator=gen(3))
    rep = stationarity_test(p.score, x, seed=0, n_steps=50, step_size=0.01)
    assert rep.method == "combined" and set(rep.sub_reports) == {"ksd", "rollout"}
