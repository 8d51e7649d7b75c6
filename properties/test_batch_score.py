"""SPEC eq. (5) and steps 3-6: the batch score and the pairwise sums built on it; DSM targets."""

from __future__ import annotations

import inspect
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from fluxbench import strategies as fst
from fluxbench.objectives import dsm_loss, flux_matching_loss
from fluxbench.objectives.batch_score import batch_score, make_batch_kernel

from ._helpers import F64, assert_mean, copies, examples, gen, spec_batch_score

BACKENDS = st.sampled_from(["dense", "fused"])


def _batch(seed, b, d, spread=1.5):
    return spread * torch.randn(b, d, dtype=F64, generator=gen(seed))


def _log_p_hat(z, x, sigma):
    """log (1/B) sum_j N(z; x_j, sigma^2 I)."""
    b, d = x.shape
    sq = (z[:, None, :] - x[None, :, :]).square().sum(-1)
    return torch.logsumexp(-0.5 * sq / sigma**2, dim=1) - math.log(b) - 0.5 * d * math.log(2 * math.pi * sigma**2)


@given(fst.dims(1, 4), st.integers(1, 40), fst.noise_levels(0.05, 3.0), fst.seeds())
def test_batch_score_is_the_gradient_of_log_p_hat(d, b, sigma, seed):
    """s_hat = (m - z) / sigma^2 (SPEC eq. (5)) equals grad_z log p_hat by autograd, for the
    public batch_score (fused kernels) and both BatchKernel backends' posterior means
    (1e-8 relative to 1 + max |s_hat|; queries near and far from the batch)."""
    x = _batch(seed, b, d)
    z = torch.cat([x + sigma * torch.randn(b, d, dtype=F64, generator=gen(seed + 1)), _batch(seed + 2, 5, d, 4.0)])
    zr = z.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(_log_p_hat(zr, x, sigma).sum(), zr)
    scale = 1 + float(ref.abs().max())
    got = batch_score(z, x, sigma)
    assert float((got - ref).abs().max()) <= 1e-8 * scale
    for backend in ("dense", "fused"):
        # kernels take B query rows in their working order (the fused one sorts them into frames)
        kern = make_batch_kernel(x, sigma, backend=backend)
        zb = z[:b]
        s = (kern.restore(kern.mean(kern.rows(zb))) - zb) / sigma**2
        assert float((s - ref[:b]).abs().max()) <= 1e-8 * scale, backend


@examples(1.0)
@given(fst.dims(1, 3), st.integers(2, 16), fst.noise_levels(0.2, 2.0), st.sampled_from(["hutchinson", "exact"]), BACKENDS, fst.seeds())
def test_loss_with_the_batch_score_is_zero_draw_by_draw(d, b, sigma, divergence, backend, seed):
    """field = s_hat gives u = 0 at every point, so every per-sample loss vanishes: |loss| <=
    1e-8 times the largest |loss| of the same draws for 1.1 s_hat (a temperature error)."""
    x = _batch(seed, b, d)
    kw = dict(divergence=divergence, backend=backend)
    loss = flux_matching_loss(lambda z: batch_score(z, x, sigma), x, sigma, generator=gen(seed + 1), **kw).detach()
    hot = flux_matching_loss(lambda z: 1.1 * batch_score(z, x, sigma), x, sigma, generator=gen(seed + 1), **kw).detach()
    assert float(loss.abs().max()) <= 1e-8 * float(hot.abs().max())


def _transition_sum(kern, mu, y, v, g):
    """kern.transition_sum over all chains (newer kernels take the chain rows, None = all)."""
    if "chains" in inspect.signature(kern.transition_sum).parameters:
        return kern.transition_sum(mu, y, v, g, None)
    return kern.transition_sum(mu, y, v, g)


@given(fst.dims(1, 3), st.integers(1, 30), fst.noise_levels(0.1, 2.0), st.floats(0.01, 4.0), BACKENDS, fst.seeds())
def test_transition_weights_are_normalised_over_anchors(d, b, sigma, t, backend, seed):
    """W_ij = softmax over i of -|mu_i - y_j|^2 / (2 v) (SPEC step 5): transition_sum equals the
    dense formula (1e-9 relative), hence sum_i g_hat_i = sum_j g_j (columns of W sum to 1)."""
    x = _batch(seed, b, d)
    kern = make_batch_kernel(x, sigma, backend=backend)
    rho = math.exp(-t)
    v = sigma**2 * (1 - rho**2)
    x0 = x + sigma * torch.randn(b, d, dtype=F64, generator=gen(seed + 1))
    mu = x0 + (1 - rho) * sigma**2 * batch_score(x0, x, sigma)
    y = rho * x0 + math.sqrt(v) * torch.randn(b, d, dtype=F64, generator=gen(seed + 2))
    g = torch.randn(b, d, dtype=F64, generator=gen(seed + 3))
    out = kern.restore(_transition_sum(kern, kern.rows(mu), kern.rows(y), v, kern.rows(g)))
    w = torch.softmax(-0.5 * (mu[:, None, :] - y[None, :, :]).square().sum(-1) / v, dim=0)
    scale = float(g.abs().sum(0).max())
    assert float((out - w @ g).abs().max()) <= 1e-9 * scale
    assert float((out.sum(0) - g.sum(0)).abs().max()) <= 1e-9 * scale


@given(fst.dims(1, 3), st.integers(1, 20), fst.noise_levels(0.2, 2.0), st.booleans(), BACKENDS, fst.seeds())
def test_score_terms_are_the_autograd_gradient(d, b, sigma, hutchinson, backend, seed):
    """BatchKernel.score_terms' closed-form g_s = J_s (f - 2 s_hat) - grad D_s equals the
    autograd gradient of f0 . s_hat(z) - |s_hat(z)|^2 - D_s(z) with f0 held fixed and
    D_s = eps^T J_s eps (probe) or tr J_s (1e-8 relative)."""
    x = _batch(seed, b, d)
    y = x + sigma * torch.randn(b, d, dtype=F64, generator=gen(seed + 1))
    f0 = torch.randn(b, d, dtype=F64, generator=gen(seed + 2)) / sigma
    eps = (torch.randint(0, 2, (b, d), generator=gen(seed + 3)) * 2 - 1).to(F64) if hutchinson else None
    kern = make_batch_kernel(x, sigma, backend=backend)
    s, g_s = kern.score_terms(kern.rows(y), kern.rows(f0), None if eps is None else kern.rows(eps))
    s, g_s = kern.restore(s), kern.restore(g_s)
    z = y.clone().requires_grad_(True)
    sz = spec_batch_score(z, x, sigma)
    if eps is None:
        ds = sum(torch.autograd.grad(sz[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(d))
    else:
        (vjp,) = torch.autograd.grad(sz, z, eps, create_graph=True)
        ds = (vjp * eps).sum(1)
    psi = (f0 * sz).sum(1) - sz.square().sum(1) - ds
    (ref,) = torch.autograd.grad(psi.sum(), z)
    scale = 1 + float(ref.abs().max())
    assert float((s - sz.detach()).abs().max()) <= 1e-8 * (1 + float(sz.detach().abs().max()))
    assert float((g_s - ref).abs().max()) <= 1e-8 * scale


# ------------------------------------------------------------------ DSM baseline


@given(fst.dims(1, 3), st.integers(1, 8), fst.noise_levels(0.1, 2.0), fst.seeds())
def test_dsm_batch_target_equals_plain_target_for_isolated_points(d, b, sigma, seed):
    """For a batch of far-apart points the batch-posterior target s_hat(x0) is the plain target
    -(x0 - x) / sigma^2 = -xi / sigma, so the two DSM losses agree draw for draw (1e-9)."""
    x = copies(b, d)
    field = lambda z: -0.5 * z  # noqa: E731
    plain = dsm_loss(field, x, sigma, target="plain", generator=gen(seed))
    batch = dsm_loss(field, x, sigma, target="batch", generator=gen(seed))
    assert float((plain - batch).abs().max()) <= 1e-9 * (1 + float(plain.abs().max()))


@examples(1.0)
@given(fst.gaussian_targets(fst.dims(1, 3)), fst.noise_levels(0.2, 1.5), fst.seeds())
def test_dsm_expected_value_at_the_true_score(target, sigma, seed):
    """With f = grad log p_sigma (exact, Gaussian data) the plain DSM loss has mean
    E|s_sigma(x0) + xi / sigma|^2 = d / sigma^2 - tr((Sigma + sigma^2 I)^-1) (Stein's identity
    E[s . xi] = -sigma tr P), within 4 SE over 4000 draws; the same sigma convention is used
    for the target and the field (SPEC section 2, DSM baseline)."""
    d = target.dim
    smooth = target.smoothed(sigma)
    x = target.sample(4000, generator=gen(seed), dtype=F64)
    losses = dsm_loss(smooth.score, x, sigma, generator=gen(seed + 1))
    expected = d / sigma**2 - float(torch.trace(smooth.precision))
    assert_mean(losses, expected, "E[DSM loss at the true score]")
