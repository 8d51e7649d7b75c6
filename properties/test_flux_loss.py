"""SPEC section 2: the Flux Matching loss, its closed forms, and its rotational invariance.

Monte Carlo checks use independent copies of the single-Gaussian problem (B = 1, x_1 = 0)
placed ``SPACING`` apart (their kernel weights on each other are exactly 0 in float64), as in
``tests/test_flux_loss.py``. One time t is shared by a whole batch, so standard errors are
taken over batch means, never over per-sample losses.
"""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from fluxbench import strategies as fst
from fluxbench.fields import MLPField, antisymmetric_basis
from fluxbench.objectives import flux_matching_loss
from fluxbench.objectives.flux import T_MIN
from fluxbench.targets import Gaussian, GaussianMixture

from ._helpers import (
    F64,
    SPACING,
    Z,
    Z_ENTRIES,
    assert_close_se,
    assert_mean,
    closed_form_grads,
    closed_form_loss,
    copies,
    examples,
    gen,
    local,
    on_copies,
    spec_flux_loss,
    t_quadrature,
    with_norm_at_least,
)

DIVERGENCES = st.sampled_from(["hutchinson", "exact"])


def _batch(seed: int, b: int, d: int, spread: float) -> torch.Tensor:
    return spread * torch.randn(b, d, dtype=F64, generator=gen(seed))


# ------------------------------------------------------------------ the estimator itself


@examples(2.0)
@given(
    fst.dims(1, 3),
    st.integers(1, 12),
    fst.noise_levels(0.2, 2.0),
    DIVERGENCES,
    st.one_of(st.none(), st.floats(0.0, 4.0)),
    st.integers(1, 4),
    st.floats(0.5, 6.0),
    fst.seeds(),
)
def test_loss_is_the_spec_estimator_draw_for_draw(d, b, sigma, divergence, t, substeps, horizon, seed):
    """flux_matching_loss equals a literal dense transcription of SPEC section 2, steps 1-7.

    Same generator seed on both sides (the transcription consumes it in the library's
    documented order); dense backend (rows keep their order). Tolerance 1e-7 relative to the
    largest |loss|: at t ~ 0 the transition kernel's variance v = sigma^2 (1 - e^{-2t}) is
    tiny and amplifies rounding differences between the closed-form and autograd paths.
    """
    x = _batch(seed, b, d, 1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        field = MLPField(d, hidden=(8,)).double()
    kw = dict(horizon=horizon, substeps=substeps, divergence=divergence, t=t)
    ours = flux_matching_loss(field, x, sigma, backend="dense", generator=gen(seed + 1), **kw).detach()
    ref = spec_flux_loss(field, x, sigma, generator=gen(seed + 1), **kw).detach()
    scale = float(ref.abs().max()) + 1e-300
    assert float((ours - ref).abs().max()) <= 1e-7 * scale, (ours, ref)


@examples(1.5)
@given(fst.dims(1, 3), st.integers(2, 16), fst.noise_levels(0.3, 1.5), fst.seeds(), st.data())
def test_rotational_fields_of_p_hat_have_zero_loss_draw_by_draw(d, b, sigma, seed, data):
    """f of form (4) for p_hat itself: r = 0 identically, so with the exact divergence the
    defect gradient g, hence every per-sample loss, is 0 up to rounding (any B).

    p_hat = (1/B) sum_j N(x_j, sigma^2 I) is built as a GaussianMixture and the field drawn by
    ``rotational_fields`` for it. "0" means <= 1e-7 times the largest |loss| of the same draws
    for f + 0.1 s_hat (a 10% temperature error, which J_H does see).
    """
    x = _batch(seed, b, d, 1.5)
    p_hat = GaussianMixture.isotropic(torch.full((b,), 1.0 / b, dtype=F64), x, sigma)
    field = data.draw(fst.rotational_fields(p_hat))
    loss = flux_matching_loss(field, x, sigma, divergence="exact", generator=gen(seed)).detach()
    hot = flux_matching_loss(lambda z: field(z) + 0.1 * p_hat.score(z), x, sigma, divergence="exact", generator=gen(seed)).detach()
    scale = float(hot.abs().max())
    assert scale > 0
    assert float(loss.abs().max()) <= 1e-7 * scale, (float(loss.abs().max()), scale)


# ------------------------------------------------------------------ closed forms, single Gaussian


@examples(0.75)
@given(fst.dims(1, 3), fst.noise_levels(0.3, 1.5), DIVERGENCES, fst.seeds(), st.data())
def test_rotational_fields_have_zero_mean_loss(d, sigma, divergence, seed, data):
    """Fields of form (4) for N(0, sigma^2 I) (constant, scalar-bump and learned A), on far-apart
    copies: with the exact divergence every loss is 0 up to rounding (1e-7 of the loss of a
    10% temperature error at the same draws); with the Hutchinson probe the loss is noise
    around 0: E[loss] = integral E[loss | t] dt within 4 SE of 0 (``t_quadrature``, 8 nodes,
    32 copies each)."""
    target = Gaussian.isotropic(d, std=sigma)
    field = data.draw(fst.rotational_fields(target))
    x = copies(32, d)
    if divergence == "exact":
        for k in range(4):
            t = 4.0 * k / 3
            loss = flux_matching_loss(on_copies(field), x, sigma, t=t, divergence="exact", generator=gen(seed + k)).detach()
            hot = flux_matching_loss(on_copies(lambda z: 1.1 * target.score(z)), x, sigma, t=t, divergence="exact", generator=gen(seed + k))
            assert float(loss.abs().max()) <= 1e-7 * float(hot.detach().abs().max())
    else:

        def per_sample(t, s):
            return flux_matching_loss(on_copies(field), x, sigma, t=t, divergence=divergence, generator=gen(s))

        mean, se = t_quadrature(per_sample, nodes=8, seed=seed)
        # slack: the loss of f = s (A = 0) is rounding noise on the scale 2 d / sigma^4
        assert_close_se(mean, se, 0.0, "mean loss of a rotational field", slack=1e-9 * 2 * d / sigma**4)


@examples(0.75)
@given(fst.dims(1, 3), fst.noise_levels(0.3, 1.5), DIVERGENCES, fst.seeds(), st.data())
def test_symmetric_error_has_positive_mean_loss_equal_to_closed_form(d, sigma, divergence, seed, data):
    """f = (I + E) s, E symmetric: f is affine with M_s = -E / sigma^2, so
    E[loss] = 2 (1 - e^{-2H}) ||E||_F^2 / sigma^4 > 0. Estimated as integral_0^H E[loss | t] dt
    by Gauss-Legendre over t with 2 x 32 independent copies per node (``t_quadrature``):
    within 4 SE of the closed form and more than 4 SE above 0."""
    e = with_norm_at_least(data.draw(fst.symmetric_matrices(d, 1.5)), 0.4)
    x = copies(32, d)
    a = -(torch.eye(d, dtype=F64) + e) / sigma**2
    c = torch.zeros(d, dtype=F64)

    def field(z):
        return local(z) @ a.T

    def per_sample(t, s):
        return flux_matching_loss(field, x, sigma, t=t, divergence=divergence, generator=gen(s))

    mean, se = t_quadrature(per_sample, seed=seed, repeats=2)
    expected = closed_form_loss(a, c, sigma)
    assert_close_se(mean, se, expected, "E[loss] of a symmetric error", slack=1e-8 * expected)
    assert float(mean) > Z * float(se), f"mean loss {float(mean):.4g} is not 4 SE ({float(se):.3g}) above 0"


@examples(0.75)
@given(fst.dims(1, 3), fst.noise_levels(0.3, 1.5), st.floats(0.0, 3.0), fst.seeds(), st.data())
def test_conditional_mean_loss_closed_form(d, sigma, t, seed, data):
    """E[loss | t] = 4 e^{-2t} ||M_s||_F^2 + 2 e^{-t} |c|^2 / sigma^2 for f(z) = A z + c
    (SPEC section 2, q(t) = 1 at a fixed t), exact divergence, within 4 SE."""
    a = data.draw(fst.symmetric_matrices(d, 1.0)) + data.draw(fst.antisymmetric_matrices(d, 1.0)) - torch.eye(d, dtype=F64) / sigma**2
    c = torch.tensor(data.draw(st.lists(st.floats(-1, 1), min_size=d, max_size=d)), dtype=F64)
    # the loss clamps t to T_MIN (SPEC hazard: v = 0 at t = 0), so compare at the time it uses
    expected = closed_form_loss(a, c, sigma, t=max(t, T_MIN))
    assume(expected > 1e-3)
    x = copies(64, d)

    def field(z):
        return local(z) @ a.T + c

    losses = torch.cat([flux_matching_loss(field, x, sigma, t=t, divergence="exact", generator=gen(seed + k)).detach() for k in range(4)])
    # t is fixed, so the copies are independent: the SE is over per-sample losses
    assert_mean(losses, expected, f"E[loss | t={t:.3g}]")


# ------------------------------------------------------------------ invariance under added rotation


@examples(0.75)
@given(fst.dims(2, 3), fst.noise_levels(0.4, 1.5), DIVERGENCES, fst.seeds(), st.data())
def test_expectation_and_gradient_unchanged_by_added_rotation(d, sigma, divergence, seed, data):
    """f -> f + Q s_sigma (Q antisymmetric) leaves E[loss] and E[grad] unchanged (SPEC section 2).

    For f(z) = A z + c the closed forms depend on A only through sym(A); Q s = -Q z / sigma^2
    only changes the antisymmetric part. Estimated over t by ``t_quadrature`` (Gauss-Legendre
    nodes, 2 x 32 independent copies each; per-sample gradients from per-copy copies of the
    parameters) with the same generator seeds for both fields (paired): each field's mean
    loss within 4 SE of the closed form, the paired difference within 4 SE of 0, and the
    gradients in (A, c) of both fields within 5 SE per entry of 2 (1 - e^{-2H}) M_s and
    2 (1 - e^{-H}) c / sigma^2.
    """
    a0 = data.draw(fst.symmetric_matrices(d, 1.0)) + data.draw(fst.antisymmetric_matrices(d, 1.0)) - torch.eye(d, dtype=F64) / sigma**2
    c0 = torch.tensor(data.draw(st.lists(st.floats(-1, 1), min_size=d, max_size=d)), dtype=F64)
    q = with_norm_at_least(data.draw(fst.antisymmetric_matrices(d, 3.0)), 0.5, fallback=antisymmetric_basis(d)[0])
    n = 32
    x = copies(n, d)

    def draw(t, s, qq):
        """(n, 1 + d^2 + d): per-sample loss, grad_A, grad_c. Each copy k has its own copy
        (A_k, c_k) of the parameters, picked by the copy a point belongs to, so the gradient of
        the summed loss is per sample whatever rows the loss evaluates the field on."""
        a = a0.expand(n, d, d).clone().requires_grad_(True)
        c = c0.expand(n, d).clone().requires_grad_(True)

        def field(z):
            k = torch.round(z[:, 0].detach() / SPACING).long().clamp(0, n - 1)
            y = local(z)
            return torch.einsum("nij,nj->ni", a[k], y) + c[k] + (-y / sigma**2) @ qq.T

        loss = flux_matching_loss(field, x, sigma, t=t, divergence=divergence, generator=gen(s))
        grad_a, grad_c = torch.autograd.grad(loss.sum(), (a, c))
        return torch.cat([loss.detach()[:, None], grad_a.reshape(n, -1), grad_c], dim=1)

    def both(t, s):
        plain, rotated = draw(t, s, torch.zeros_like(q)), draw(t, s, q)
        return torch.stack([plain, rotated, rotated - plain], dim=1)  # (n, 3, k)

    mean, se = t_quadrature(both, seed=seed, repeats=2)
    expect = closed_form_loss(a0, c0, sigma)
    expect_a, expect_c = closed_form_grads(a0, c0, sigma)
    expected = torch.cat([torch.tensor([expect], dtype=F64), expect_a.reshape(-1), expect_c])
    slack = 1e-8 * (2 * d / sigma**4 + expect)  # quadrature and rounding (expected may be 0)
    for i, name in enumerate(("f", "f + Q s")):
        assert_close_se(mean[i, :1], se[i, :1], expected[:1], f"E[loss] of {name}", slack=slack)
        assert_close_se(mean[i, 1:], se[i, 1:], expected[1:], f"E[grad_A, grad_c] of {name}", z=Z_ENTRIES, slack=slack)
    assert_close_se(mean[2, :1], se[2, :1], torch.zeros(1, dtype=F64), "paired difference of the losses", slack=slack)
    assert math.isfinite(expect)
