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
from fluxbench.targets import Gaussian, GaussianMixture

from ._helpers import (
    F64,
    Z,
    Z_ENTRIES,
    assert_mean,
    assert_mean_entries,
    closed_form_grads,
    closed_form_loss,
    copies,
    examples,
    gen,
    local,
    on_copies,
    spec_flux_loss,
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
    copies: the batch-mean loss averages to 0 within 4 SE (with the Hutchinson probe the
    per-draw loss is noise around 0; with the exact divergence it is 0 up to rounding)."""
    target = Gaussian.isotropic(d, std=sigma)
    field = data.draw(fst.rotational_fields(target))
    x = copies(32, d)
    means = torch.stack(
        [flux_matching_loss(on_copies(field), x, sigma, divergence=divergence, generator=gen(seed + k)).detach().mean() for k in range(24)]
    )
    if divergence == "exact":
        sym = torch.stack(
            [flux_matching_loss(on_copies(lambda z: 1.1 * target.score(z)), x, sigma, divergence="exact", generator=gen(seed + k)).detach().mean() for k in range(2)]
        )
        assert float(means.abs().max()) <= 1e-7 * float(sym.abs().max())
    else:
        assert_mean(means, 0.0, "mean loss of a rotational field")


@examples(0.75)
@given(fst.dims(1, 3), fst.noise_levels(0.3, 1.5), DIVERGENCES, fst.seeds(), st.data())
def test_symmetric_error_has_positive_mean_loss_equal_to_closed_form(d, sigma, divergence, seed, data):
    """f = (I + E) s, E symmetric: f is affine with M_s = -E / sigma^2, so
    E[loss] = 2 (1 - e^{-2H}) ||E||_F^2 / sigma^4 > 0: the batch-mean loss is within 4 SE of it
    and more than 4 SE above 0 (96 batches: the coefficient of variation of one batch mean
    is about 1.7, dominated by the shared t)."""
    e = with_norm_at_least(data.draw(fst.symmetric_matrices(d, 1.5)), 0.4)
    x = copies(32, d)
    a = -(torch.eye(d, dtype=F64) + e) / sigma**2
    c = torch.zeros(d, dtype=F64)

    def field(z):
        return local(z) @ a.T

    means = torch.stack([flux_matching_loss(field, x, sigma, divergence=divergence, generator=gen(seed + k)).detach().mean() for k in range(96)])
    expected = closed_form_loss(a, c, sigma)
    m, se = assert_mean(means, expected, "E[loss] of a symmetric error")
    assert m > Z * se, f"mean loss {m:.4g} is not 4 SE ({se:.3g}) above 0"


@examples(0.75)
@given(fst.dims(1, 3), fst.noise_levels(0.3, 1.5), st.floats(0.0, 3.0), fst.seeds(), st.data())
def test_conditional_mean_loss_closed_form(d, sigma, t, seed, data):
    """E[loss | t] = 4 e^{-2t} ||M_s||_F^2 + 2 e^{-t} |c|^2 / sigma^2 for f(z) = A z + c
    (SPEC section 2, q(t) = 1 at a fixed t), exact divergence, within 4 SE."""
    a = data.draw(fst.symmetric_matrices(d, 1.0)) + data.draw(fst.antisymmetric_matrices(d, 1.0)) - torch.eye(d, dtype=F64) / sigma**2
    c = torch.tensor(data.draw(st.lists(st.floats(-1, 1), min_size=d, max_size=d)), dtype=F64)
    expected = closed_form_loss(a, c, sigma, t=t)
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
    only changes the antisymmetric part. Checked three ways with the same generator seeds
    for both fields (paired): each field's batch-mean loss within 4 SE of the closed form,
    the paired difference within 4 SE of 0, and the gradients in (A, c) of both fields
    within 5 SE per entry of 2 (1 - e^{-2H}) M_s and 2 (1 - e^{-H}) c / sigma^2.
    """
    a0 = data.draw(fst.symmetric_matrices(d, 1.0)) + data.draw(fst.antisymmetric_matrices(d, 1.0)) - torch.eye(d, dtype=F64) / sigma**2
    c0 = torch.tensor(data.draw(st.lists(st.floats(-1, 1), min_size=d, max_size=d)), dtype=F64)
    q = with_norm_at_least(data.draw(fst.antisymmetric_matrices(d, 3.0)), 0.5, fallback=antisymmetric_basis(d)[0])
    x = copies(32, d)
    results = {}
    for name, qq in (("f", torch.zeros_like(q)), ("f + Q s", q)):
        means, ga, gc = [], [], []
        for k in range(40):
            a = a0.clone().requires_grad_(True)
            c = c0.clone().requires_grad_(True)

            def field(z, a=a, c=c, qq=qq):
                y = local(z)
                return y @ a.T + c + (-y / sigma**2) @ qq.T

            loss = flux_matching_loss(field, x, sigma, divergence=divergence, generator=gen(seed + k)).mean()
            grad_a, grad_c = torch.autograd.grad(loss, (a, c))
            means.append(loss.detach())
            ga.append(grad_a)
            gc.append(grad_c)
        results[name] = (torch.stack(means), torch.stack(ga), torch.stack(gc))
    expect = closed_form_loss(a0, c0, sigma)
    expect_a, expect_c = closed_form_grads(a0, c0, sigma)
    for name, (means, ga, gc) in results.items():
        assert_mean(means, expect, f"E[loss] of {name}")
        assert_mean_entries(ga, expect_a, f"E[grad_A] of {name}", z=Z_ENTRIES)
        assert_mean_entries(gc, expect_c, f"E[grad_c] of {name}", z=Z_ENTRIES)
    assert_mean(results["f + Q s"][0] - results["f"][0], 0.0, "paired difference of the batch-mean losses")
    assert math.isfinite(expect)
