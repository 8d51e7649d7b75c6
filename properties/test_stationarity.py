"""SPEC section 1: fields of form (4) leave p stationary; a symmetric score error does not.

The defect r = div u + u . s (u = f - s, SPEC eq. (3)) and the current divergence
div(p u) are computed here with the library's exact divergence
(:func:`fluxbench.divergence.divergence`), in float64 at exact samples of the target.
``properties/test_verify.py`` checks the same statements through ``fluxbench.verify``.

Tolerance for "vanishes": |r(x)| <= 1e-9 * scale(x) with
scale = 1 + |s|^2 + |f| |s| + |div f| + |div s|, the size of the terms that cancel
(float64 rounding is ~1e-16 relative; the margin covers the d autograd passes and the
Cholesky solves of a condition-number-10 covariance). div(p u) is compared with p times
the same scale.

"Does not vanish" is quantified by an identity that holds for every target: for
u = E s with E symmetric and phi(x) = (x - m)^T E (x - m) / 2, integration by parts gives

    E_p[r phi] = integral div(p u) phi = -E_p[u . grad phi] = -E_p[s . E^2 (x - m)]
               = E_p[div(E^2 (x - m))] = ||E||_F^2 > 0,

and by Cauchy-Schwarz sqrt(E_p[r^2]) >= ||E||_F^2 / sqrt(E_p[phi^2]): the defect is bounded
away from 0 by that margin. Both expectations are computed by Gauss-Hermite quadrature over
the components (deterministic, accurate to ~2e-3 relative on the targets used), not by Monte Carlo, so the
check has no false-alarm rate (an earlier Monte Carlo version had heavy-tailed r phi).
"""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from fluxbench import strategies as fst
from fluxbench.divergence import divergence

from ._helpers import F64, Z, assert_mean, examples, gauss_hermite_expectation, gen, mean_se, with_norm_at_least

TARGETS = st.one_of(
    fst.gaussian_targets(fst.dims(1, 3)),
    fst.mixture_targets(fst.dims(1, 3), max_components=3),
)
# For the quadrature margins: Gauss-Hermite per component converges fast when the
# components have comparable widths (ratio of variances <= 1 / 0.7 * 1.5 ~ 2) and are not
# too far apart (|m_i| <= 1.25): measured error <= 2e-3 relative at 24 nodes per dimension.
SMOOTH_TARGETS = st.one_of(
    fst.gaussian_targets(fst.dims(1, 3), scale=(0.5, 2.0), max_condition=4.0),
    fst.mixture_targets(fst.dims(1, 3), max_components=3, scale=(0.7, 1.0), max_condition=1.5, mean_bound=1.25),
)
QUADRATURE_RTOL = 5e-3


def _defect(field, target, x):
    """The reference defect r = div u + u . s, u = f - s (SPEC eq. (3)), exact divergence."""
    s = target.score(x)
    div_u = divergence(lambda z: field(z) - target.score(z), x, method="exact")
    return div_u + ((field(x).detach() - s) * s).sum(1)


def _symmetric_error_field(target, e):
    """f = s + E s: a score error with the symmetric part E."""

    def field(z):
        s = target.score(z)
        return s + s @ e.T

    return field


def _defect_terms(field, target, x):
    """r, div(p u), and the per-point scale of the cancelling terms."""
    s = target.score(x)
    f = field(x).detach()
    r = _defect(field, target, x)
    p = target.log_prob(x).exp()

    def current(z):
        return target.log_prob(z).exp()[:, None] * (field(z) - target.score(z))

    div_pu = divergence(current, x, method="exact")
    div_f = divergence(field, x, method="exact")
    div_s = divergence(target.score, x, method="exact")
    scale = 1 + s.square().sum(1) + f.norm(dim=1) * s.norm(dim=1) + div_f.abs() + div_s.abs()
    return r, div_pu, p, scale


@examples(2.0)
@given(TARGETS.flatmap(lambda t: st.tuples(st.just(t), fst.rotational_fields(t))), fst.seeds())
def test_rotational_fields_have_zero_defect_and_divergence_free_current(target_field, seed):
    target, field = target_field
    x = target.sample(64, generator=gen(seed), dtype=F64)
    r, div_pu, p, scale = _defect_terms(field, target, x)
    assert float((r.abs() / scale).max()) <= 1e-9, f"max |r| / scale = {float((r.abs() / scale).max()):.3g}"
    assert float((div_pu.abs() / (p * scale)).max()) <= 1e-9


def symmetric_error_margin(target, e, defect_fn) -> tuple[float, float, float]:
    """(E_p[r phi], sqrt(E_p[r^2]), sqrt(E_p[phi^2])) for u = E s by Gauss-Hermite quadrature.

    ``defect_fn(field, x)`` computes r; phi = (x - m)^T E (x - m) / 2 with m the target mean.
    """
    m = target.mean
    field = _symmetric_error_field(target, e)

    def phi(x):
        return 0.5 * (((x - m) @ e) * (x - m)).sum(1)

    def r_phi(x):
        return defect_fn(field, x) * phi(x)

    e_rphi = gauss_hermite_expectation(target, r_phi)
    rms_r = gauss_hermite_expectation(target, lambda x: defect_fn(field, x) ** 2) ** 0.5
    rms_phi = gauss_hermite_expectation(target, lambda x: phi(x) ** 2) ** 0.5
    return e_rphi, rms_r, rms_phi


@examples(1.0)
@given(
    SMOOTH_TARGETS.flatmap(lambda t: st.tuples(st.just(t), fst.symmetric_matrices(t.dim, max_norm=1.5).map(lambda e: with_norm_at_least(e, 0.5)))),
    fst.seeds(),
)
def test_symmetric_score_error_has_a_defect_bounded_away_from_zero(target_e, seed):
    """u = E s (E symmetric, ||E||_F >= 0.5): div(p u) = p r pointwise at samples, and by
    Gauss-Hermite quadrature (deterministic, 24 nodes per dimension and component)
    E_p[r phi] = ||E||_F^2 within 5e-3 relative (the quadrature error), so that
    sqrt(E_p[r^2]) >= ||E||_F^2 / sqrt(E_p[phi^2]) > 0 (Cauchy-Schwarz): the stated margin,
    checked to the same 5e-3."""
    target, e = target_e
    field = _symmetric_error_field(target, e)
    x = target.sample(256, generator=gen(seed), dtype=F64)
    r, div_pu, p, scale = _defect_terms(field, target, x)
    assert float(((div_pu - p * r).abs() / (p * scale)).max()) <= 1e-9
    norm2 = float((e * e).sum())
    e_rphi, rms_r, rms_phi = symmetric_error_margin(target, e, lambda fld, z: _defect(fld, target, z))
    assert abs(e_rphi - norm2) <= QUADRATURE_RTOL * norm2, (e_rphi, norm2)
    margin = norm2 / rms_phi
    assert rms_r >= margin * (1 - QUADRATURE_RTOL), f"rms r = {rms_r:.4g} below the margin ||E||^2 / rms(phi) = {margin:.4g}"


@examples(1.5)
@given(fst.gaussian_targets(fst.dims(1, 4)), st.data())
def test_gaussian_defect_closed_form(target, data):
    """p = N(m, Sigma), S = Sigma^-1, f = s + M (x - m) with M = (E + J) S: r in closed form.

    With s = -S (x - m) and u = M (x - m): r = div u + u . s = tr M - (x - m)^T M^T S (x - m),
    pointwise. For E = 0 (M = J S, J antisymmetric) both terms vanish: tr(J S) = 0 and
    y^T S J^T S y = 0, so r = 0 (f = s + J^T s is of form (4)).
    """
    d = target.dim
    sym = data.draw(fst.symmetric_matrices(d, 1.0))
    anti = data.draw(fst.antisymmetric_matrices(d, 1.0))
    big_s = target.precision
    m = target.mean
    mat = (sym + anti) @ big_s

    def field(z):
        return target.score(z) + (z - m) @ mat.T

    x = target.sample(32, generator=gen(data.draw(fst.seeds())), dtype=F64)
    r, _, _, scale = _defect_terms(field, target, x)
    y = x - m
    expected = torch.trace(mat) - ((y @ mat.T) * (y @ big_s)).sum(1)
    assert float(((r - expected).abs() / scale).max()) <= 1e-9
    if float(sym.abs().max()) == 0.0:  # purely rotational: r = 0
        assert float((r.abs() / scale).max()) <= 1e-9


@examples(1.5)
@given(TARGETS.flatmap(lambda t: st.tuples(st.just(t), fst.rotational_fields(t))), fst.seeds())
def test_generator_form_zero_mean_for_rotational_fields(target_field, seed):
    """E_p[L_f phi] = E_p[f . grad phi + Lap phi] = 0 (SPEC section 1, generator form).

    Test functions phi(x) = exp(-|x - c|^2 / 2) for two centres c; samples and f only.
    """
    target, field = target_field
    x = target.sample(2000, generator=gen(seed), dtype=F64)
    f = field(x).detach()
    d = target.dim
    for c in (target.mean, target.mean + 0.5):
        y = x - c
        phi = torch.exp(-0.5 * y.square().sum(1))
        grad = -y * phi[:, None]
        lap = (y.square().sum(1) - d) * phi
        assert_mean((f * grad).sum(1) + lap, 0.0, "E_p[L_f phi]")


def test_se_helper_is_honest():
    """mean_se of N(0,1) draws: the SE shrinks like 1 / sqrt(n) (guards the helper itself)."""
    v = torch.randn(10_000, dtype=F64, generator=gen(0))
    m, se = mean_se(v)
    assert abs(se - 0.01) < 0.001 and abs(m) < Z * se
    assert math.isfinite(m)
