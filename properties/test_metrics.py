"""SPEC section 4, Distances: Gaussian W2, sliced W2 and the RBF kernel mean; unbiased MMD."""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

from fluxbench import strategies as fst
from fluxbench.kernels import rbf_kernel
from fluxbench.metrics import gaussian_sliced_w2, gaussian_w2, mmd2_unbiased, rbf_kernel_mean, sliced_w2, w2

from ._helpers import F64, assert_mean, examples, gen


@st.composite
def gaussian_pairs(draw, n: int = 2, min_dim: int = 1, max_dim: int = 4):
    d = draw(fst.dims(min_dim, max_dim))
    out = []
    for _ in range(n):
        m = torch.tensor(draw(st.lists(st.floats(-2, 2), min_size=d, max_size=d)), dtype=F64)
        out.append((m, draw(fst.spd_matrices(d, 20.0, scale=(0.2, 3.0)))))
    return out


def _sqrtm(s):
    return torch.from_numpy(np.real(scipy.linalg.sqrtm(s.numpy())))


def _trace_formula(m1, s1, m2, s2):
    """W2^2 = |dm|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), via scipy's sqrtm (independent)."""
    r1 = _sqrtm(s1)
    cross = _sqrtm(r1 @ s2 @ r1)
    return float(((m1 - m2) ** 2).sum() + torch.trace(s1 + s2 - 2 * cross))


@given(gaussian_pairs(3))
def test_gaussian_w2_is_the_trace_formula_and_a_metric(laws):
    """gaussian_w2^2 equals the SPEC trace formula (scipy sqrtm; 1e-7 relative to the scale
    tr S1 + tr S2 + |dm|^2), and W2 is a metric: W(a, a) = 0, symmetric, triangle inequality."""
    (m1, s1), (m2, s2), (m3, s3) = laws
    w12 = float(gaussian_w2(m1, s1, m2, s2))
    scale = float(torch.trace(s1) + torch.trace(s2) + ((m1 - m2) ** 2).sum())
    assert abs(w12**2 - _trace_formula(m1, s1, m2, s2)) <= 1e-7 * scale
    assert float(gaussian_w2(m1, s1, m1, s1)) <= 1e-7 * math.sqrt(float(torch.trace(s1)))
    assert abs(w12 - float(gaussian_w2(m2, s2, m1, s1))) <= 1e-9 * (1 + w12)
    w13, w23 = float(gaussian_w2(m1, s1, m3, s3)), float(gaussian_w2(m2, s2, m3, s3))
    assert w13 <= w12 + w23 + 1e-9 * (1 + w13)


@given(fst.dims(1, 4), st.data())
def test_gaussian_w2_commuting_case(d, data):
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: W2^2 = |dm|^2 + sum_i (sqrt a_i - sqrt b_i)^2."""
    q = data.draw(fst.orthogonal_matrices(d))
    a = torch.tensor(data.draw(st.lists(st.floats(0.05, 5), min_size=d, max_size=d)), dtype=F64)
    b = torch.tensor(data.draw(st.lists(st.floats(0.05, 5), min_size=d, max_size=d)), dtype=F64)
    dm = torch.tensor(data.draw(st.lists(st.floats(-2, 2), min_size=d, max_size=d)), dtype=F64)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    expected = float((dm**2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    got = float(gaussian_w2(dm, s1, torch.zeros(d, dtype=F64), s2)) ** 2
    assert abs(got - expected) <= 1e-9 * (1 + float(a.sum() + b.sum()))


def _optimal_map(m1, s1, m2, s2):
    """T(x) = m2 + A (x - m1), A = S1^-1/2 (S1^1/2 S2 S1^1/2)^1/2 S1^-1/2 (symmetric PSD)."""
    r1 = _sqrtm(s1)
    r1_inv = torch.linalg.inv(r1)
    a = r1_inv @ _sqrtm(r1 @ s2 @ r1) @ r1_inv
    return 0.5 * (a + a.T)


@examples(1.0)
@given(gaussian_pairs(2, max_dim=3), fst.seeds())
def test_gaussian_w2_against_pot_on_samples(laws, seed):
    """On x ~ N(m1, S1), the optimal Gaussian map T is the gradient of a convex function, so
    the pairing (x_i, T x_i) is optimal for the two empirical measures too: POT's exact
    ``w2(x, T x)`` equals the pairing cost to 1e-9, and that cost (a sample mean of
    |x - T x|^2) is within 4 SE of gaussian_w2^2."""
    (m1, s1), (m2, s2) = laws
    n = 300
    x = m1 + torch.randn(n, m1.shape[0], dtype=F64, generator=gen(seed)) @ torch.linalg.cholesky(s1).T
    y = m2 + (x - m1) @ _optimal_map(m1, s1, m2, s2).T
    costs = ((x - y) ** 2).sum(1)
    pot = w2(x, y)
    assert abs(pot**2 - float(costs.mean())) <= 1e-9 * (1 + float(costs.mean()))
    # slack: rounding when the laws coincide (all costs ~1e-32)
    slack = 1e-10 * float(torch.trace(s1) + torch.trace(s2))
    assert_mean(costs, float(gaussian_w2(m1, s1, m2, s2)) ** 2, "E|X - T X|^2 = W2^2", slack=slack)


@given(gaussian_pairs(3), fst.seeds())
def test_gaussian_sliced_w2_closed_form_and_metric(laws, seed):
    """With fixed directions theta_k, gaussian_sliced_w2^2 = mean_k [(theta.dm)^2 +
    (sqrt(theta^T S1 theta) - sqrt(theta^T S2 theta))^2] (SPEC), it is a metric on the three
    laws (an L2 average of 1-D W2 metrics), it is exact for isotropic laws
    (|sqrt(a) - sqrt(b)| with equal means), and it never exceeds W2."""
    (m1, s1), (m2, s2), (m3, s3) = laws
    d = m1.shape[0]
    theta = torch.randn(64, d, dtype=F64, generator=gen(seed))
    theta = theta / theta.norm(dim=1, keepdim=True)

    def sw(a, b):
        return float(gaussian_sliced_w2(*a, *b, directions=theta))

    per = (theta @ (m1 - m2)) ** 2 + (((theta @ s1) * theta).sum(1).sqrt() - ((theta @ s2) * theta).sum(1).sqrt()) ** 2
    assert abs(sw(laws[0], laws[1]) ** 2 - float(per.mean())) <= 1e-10 * (1 + float(per.mean()))
    assert sw(laws[0], laws[0]) == 0.0
    assert abs(sw(laws[0], laws[1]) - sw(laws[1], laws[0])) <= 1e-12
    assert sw(laws[0], laws[2]) <= sw(laws[0], laws[1]) + sw(laws[1], laws[2]) + 1e-9
    a, b = float(torch.trace(s1)) / d, float(torch.trace(s2)) / d
    eye = torch.eye(d, dtype=F64)
    iso = float(gaussian_sliced_w2(m1, a * eye, m1, b * eye, n_projections=8, generator=gen(seed)))
    assert abs(iso - abs(math.sqrt(a) - math.sqrt(b))) <= 1e-10
    exact_sw = float(gaussian_sliced_w2(m1, s1, m2, s2, n_projections=20000, generator=gen(seed)))
    assert exact_sw <= float(gaussian_w2(m1, s1, m2, s2)) * (1 + 1e-2) + 1e-9


@examples(1.0)
@given(gaussian_pairs(1, max_dim=3), st.floats(0.2, 2.0), st.lists(st.floats(-1, 1), min_size=3, max_size=3), fst.seeds())
def test_sliced_w2_against_pot_on_samples(laws, c, shift, seed):
    """y = m2 + c (x - m1) with c > 0: along every direction the projection of y is an
    increasing affine map of that of x, so the 1-D optimal coupling is the identity
    pairing: POT's ``sliced_w2`` with the same directions equals the pairing cost to 1e-9,
    whose mean is within 4 SE of gaussian_sliced_w2^2 between N(m1, S1) and N(m2, c^2 S1)."""
    ((m1, s1),) = laws
    d = m1.shape[0]
    m2 = m1 + torch.tensor(shift[:d], dtype=F64)
    n = 400
    x = m1 + torch.randn(n, d, dtype=F64, generator=gen(seed)) @ torch.linalg.cholesky(s1).T
    y = m2 + c * (x - m1)
    theta = torch.randn(32, d, dtype=F64, generator=gen(seed + 1))
    theta = theta / theta.norm(dim=1, keepdim=True)
    proj = (x - y) @ theta.T  # (n, K)
    pairing = (proj**2).mean(1)  # per-sample cost averaged over directions
    pot = sliced_w2(x, y, directions=theta)
    assert abs(pot**2 - float(pairing.mean())) <= 1e-9 * (1 + float(pairing.mean()))
    expected = float(gaussian_sliced_w2(m1, s1, m2, c**2 * s1, directions=theta)) ** 2
    assert_mean(pairing, expected, "paired sliced cost vs gaussian_sliced_w2^2", slack=1e-12 * (1 + expected))


@examples(1.0)
@given(gaussian_pairs(2, max_dim=3), st.floats(0.3, 3.0), fst.seeds())
def test_rbf_kernel_mean_against_monte_carlo(laws, ell, seed):
    """E k(X, Y) of SPEC section 4 vs the mean of k(x_i, y_i) over 4000 independent pairs
    (the kernel from fluxbench.kernels.rbf_kernel), within 4 SE."""
    (m1, s1), (m2, s2) = laws
    n, d = 4000, m1.shape[0]
    x = m1 + torch.randn(n, d, dtype=F64, generator=gen(seed)) @ torch.linalg.cholesky(s1).T
    y = m2 + torch.randn(n, d, dtype=F64, generator=gen(seed + 1)) @ torch.linalg.cholesky(s2).T
    k = torch.cat([torch.diagonal(rbf_kernel(x[i : i + 500], y[i : i + 500], ell)) for i in range(0, n, 500)])
    direct = torch.exp(-((x - y) ** 2).sum(1) / (2 * ell**2))
    assert float((k - direct).abs().max()) <= 1e-12
    assert_mean(k, float(rbf_kernel_mean(m1, s1, m2, s2, ell)), "E k(X, Y)")


@examples(1.0)
@given(gaussian_pairs(2, max_dim=2), st.floats(0.5, 2.0), fst.seeds())
def test_mmd2_unbiased_is_unbiased(laws, ell, seed):
    """mmd2_unbiased equals the U-statistic written out (1e-12), and its mean over 40
    independent pairs of samples (N = M = 60) is within 4 SE of the population MMD^2 from
    rbf_kernel_mean (SPEC section 4); for equal laws that population value is 0."""
    (m1, s1), (m2, s2) = laws
    d = m1.shape[0]
    c1, c2 = torch.linalg.cholesky(s1), torch.linalg.cholesky(s2)
    pop = float(rbf_kernel_mean(m1, s1, m1, s1, ell) + rbf_kernel_mean(m2, s2, m2, s2, ell) - 2 * rbf_kernel_mean(m1, s1, m2, s2, ell))
    for same in (True, False):
        mb, cb = (m1, c1) if same else (m2, c2)
        vals = []
        for k in range(40):
            x = m1 + torch.randn(60, d, dtype=F64, generator=gen(seed + 2 * k)) @ c1.T
            y = mb + torch.randn(60, d, dtype=F64, generator=gen(seed + 2 * k + 1)) @ cb.T
            vals.append(mmd2_unbiased(x, y, lengthscale=ell))
            if k == 0:
                kxx, kyy, kxy = (torch.exp(-torch.cdist(a, b) ** 2 / (2 * ell**2)) for a, b in ((x, x), (y, y), (x, y)))
                n = 60
                u = (kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (n * (n - 1)) - 2 * kxy.mean()
                assert abs(float(vals[0]) - float(u)) <= 1e-12
        assert_mean(torch.tensor(vals, dtype=F64), 0.0 if same else pop, f"E[MMD_u^2] ({'equal' if same else 'different'} laws)")
