"""SPEC section 4, Gaussian mixtures: closed-form density, score and smoothing."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from fluxbench import strategies as fst

from ._helpers import F64, Z_ENTRIES, examples, gen

TARGETS = st.one_of(fst.gaussian_targets(fst.dims(1, 4)), fst.mixture_targets(fst.dims(1, 3), max_components=4))


@given(TARGETS, fst.seeds())
def test_score_is_the_gradient_of_log_prob(target, seed):
    """s = grad log p by autograd of log_prob, at exact samples and at far-away points
    (1e-9 relative to 1 + max |s|)."""
    x = torch.cat([target.sample(32, generator=gen(seed), dtype=F64), 6 * torch.randn(4, target.dim, dtype=F64, generator=gen(seed + 1))])
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(target.log_prob(xr).sum(), xr)
    got = target.score(x)
    assert float((got - ref).abs().max()) <= 1e-9 * (1 + float(ref.abs().max()))


@examples(1.0)
@given(TARGETS, fst.noise_levels(0.05, 2.0), fst.seeds())
def test_smoothed_target_is_the_law_of_x_plus_sigma_z(target, sigma, seed):
    """p_sigma = p * N(0, sigma^2 I) adds sigma^2 I to the covariance (exact moments) and its
    samples' moments agree with X + sigma Z (each entry within 5 SE, n = 20000)."""
    d = target.dim
    smooth = target.smoothed(sigma)
    eye = torch.eye(d, dtype=F64)
    assert torch.allclose(smooth.mean, target.mean, atol=1e-12)
    assert torch.allclose(smooth.covariance, target.covariance + sigma**2 * eye, rtol=1e-10, atol=1e-12)
    n = 20000
    y = target.sample(n, generator=gen(seed), dtype=F64) + sigma * torch.randn(n, d, dtype=F64, generator=gen(seed + 1))
    cov = smooth.covariance
    se_mean = (torch.diagonal(cov) / n).sqrt()
    assert bool(((y.mean(0) - smooth.mean).abs() <= Z_ENTRIES * se_mean).all())
    # covariance entries: SE from the sample's own fourth moments (mixtures are not Gaussian)
    c = y - smooth.mean
    prods = c[:, :, None] * c[:, None, :]
    se_cov = prods.std(0) / n**0.5
    assert bool(((prods.mean(0) - cov).abs() <= Z_ENTRIES * se_cov + 1e-12).all())
