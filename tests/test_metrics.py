"""Tests for fluxbench.kernels and fluxbench.metrics (SPEC sections 4 and 5).

Statistical assertions state their standard error (SE) or bound next to the assertion
and use fixed seeds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from fluxbench.kernels import (
    chunked_pairwise_matmul,
    chunked_pairwise_sum,
    median_bandwidth,
    rbf_kernel,
    squared_distances,
)
from fluxbench.metrics import (
    MMDTestResult,
    NoiseFloor,
    gaussian_sliced_w2,
    gaussian_w2,
    mmd2_unbiased,
    mmd_aggregated_test,
    mmd_paired_test,
    mmd_permutation_test,
    noise_floor,
    rbf_kernel_mean,
    sliced_w2,
    w2,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_sample(n: int, m: torch.Tensor, L: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """n draws of N(m, L L^T)."""
    return torch.randn(n, m.shape[0], generator=g, dtype=m.dtype) @ L.T + m


def moment_matched_sample(n: int, m: torch.Tensor, L: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """n Gaussian draws standardised so the empirical mean is m and the empirical covariance
    (1/n normalisation) is L L^T exactly."""
    z = torch.randn(n, m.shape[0], generator=g, dtype=m.dtype)
    z = z - z.mean(dim=0)
    chol = torch.linalg.cholesky(z.T @ z / n)
    z = torch.linalg.solve_triangular(chol, z.T, upper=False).T
    return z @ L.T + m


# Two non-commuting 2-D and 3-D covariances used below.
L2A = torch.tensor([[1.0, 0.0], [0.5, 0.8]], dtype=F64)
L2B = torch.tensor([[1.3, 0.0], [-0.4, 0.6]], dtype=F64)
M2A = torch.zeros(2, dtype=F64)
M2B = torch.tensor([1.0, -0.5], dtype=F64)
L3A = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [0.2, -0.3, 0.5]], dtype=F64)
L3B = torch.tensor([[1.3, 0.0, 0.0], [-0.4, 0.6, 0.0], [0.1, 0.2, 1.1]], dtype=F64)
M3A = torch.zeros(3, dtype=F64)
M3B = torch.tensor([1.0, -0.5, 0.3], dtype=F64)


# --------------------------------------------------------------------------- kernels


def test_squared_distances_and_rbf_match_direct_formula():
    g = gen(0)
    x = torch.randn(13, 4, generator=g, dtype=F64) + 100.0  # far from the origin
    y = torch.randn(9, 4, generator=g, dtype=F64) + 100.0
    direct = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(squared_distances(x, y), direct, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rbf_kernel(x, y, 1.7), torch.exp(-direct / (2 * 1.7**2)), rtol=1e-12, atol=1e-12)
    assert bool((squared_distances(x, x) >= 0).all())


def test_rbf_kernel_upcasts_half_and_ignores_autocast():
    g = gen(1)
    x = torch.randn(20, 3, generator=g)
    y = torch.randn(15, 3, generator=g)
    ref = rbf_kernel(x, y, 1.0)
    assert ref.dtype == torch.float32
    assert rbf_kernel(x.bfloat16(), y.bfloat16(), 1.0).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rbf_kernel(x, y, 1.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_median_bandwidth_is_median_of_distances():
    # pairwise distances of 0, 1, 3 on a line: 1, 2, 3 -> median 2
    x = torch.tensor([[0.0], [1.0]], dtype=F64)
    y = torch.tensor([[3.0]], dtype=F64)
    assert median_bandwidth(x, y) == pytest.approx(2.0, abs=1e-12)
    # 4 points 0, 1, 3, 7: distances 1, 3, 7, 2, 6, 4 -> sorted 1 2 3 4 6 7 -> median 3.5
    # (mean of the two middle values), and 6 pairs need no subsample
    z = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=F64)
    assert median_bandwidth(z) == pytest.approx(3.5, abs=1e-12)
    # distances, not squared distances: 2-D points at unit spacing on a square
    sq = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64)
    assert median_bandwidth(sq) == pytest.approx(1.0, abs=1e-12)  # 4 sides of 1, 2 diagonals
    # subsampled: reproducible with a generator, close to the full-sample median (~ sqrt(2) * 0.954 * sqrt(2))
    big = torch.randn(5000, 2, generator=gen(2), dtype=F64)
    a = median_bandwidth(big, max_points=500, generator=gen(3))
    b = median_bandwidth(big, max_points=500, generator=gen(3))
    assert a == b
    # median |X - X'| for X, X' ~ N(0, I_2): |X - X'|^2 / 2 ~ chi2_2, median 2 ln 2 -> 2 sqrt(ln 2)
    assert a == pytest.approx(2 * math.sqrt(math.log(2)), rel=0.05)


def test_chunked_pairwise_sum_matches_dense_sum():
    g = gen(4)
    x = torch.randn(23, 3, generator=g, dtype=F64)
    y = torch.randn(17, 3, generator=g, dtype=F64)

    def h(a, b):  # an asymmetric block function with a nonzero diagonal
        return (a @ b.T) ** 2 + a[:, :1] - 2 * b[:, 1].unsqueeze(0)

    dense = h(x, y).sum()
    for c in (1, 5, 23, 100):
        torch.testing.assert_close(chunked_pairwise_sum(h, x, y, chunk_size=c), dense, rtol=1e-12, atol=1e-12)
    hxx = h(x, x)
    off_diag = hxx.sum() - hxx.diagonal().sum()
    for c in (1, 4, 7, 23, 100):
        got = chunked_pairwise_sum(h, x, x, chunk_size=c, exclude_diagonal=True)
        torch.testing.assert_close(got, off_diag, rtol=1e-12, atol=1e-12)
    assert got.ndim == 0


def test_chunked_pairwise_matmul_matches_dense_product():
    g = gen(5)
    x = torch.randn(31, 2, generator=g, dtype=F64)
    v = torch.randn(31, 4, generator=g, dtype=F64)

    def h(a, b):
        return torch.exp(-squared_distances(a, b)) + 3.0

    H = h(x, x)
    H0 = H - torch.diag(H.diagonal())
    for c in (1, 6, 31, 64):
        torch.testing.assert_close(chunked_pairwise_matmul(h, x, x, v, chunk_size=c), H @ v, rtol=1e-12, atol=1e-12)
        got = chunked_pairwise_matmul(h, x, x, v[:, 0], chunk_size=c, exclude_diagonal=True)
        torch.testing.assert_close(got, H0 @ v[:, 0], rtol=1e-12, atol=1e-12)


def test_chunked_helpers_reject_bad_input():
    x = torch.randn(5, 2)

    def h(a, b):
        return a @ b.T

    with pytest.raises(ValueError, match="chunk_size"):
        chunked_pairwise_sum(h, x, x, chunk_size=0)
    with pytest.raises(ValueError, match="same number of rows"):
        chunked_pairwise_sum(h, x, x[:3], exclude_diagonal=True)
    with pytest.raises(ValueError, match="fn must return"):
        chunked_pairwise_sum(lambda a, b: a.sum(1), x, x)
    with pytest.raises(ValueError, match="v must have shape"):
        chunked_pairwise_matmul(h, x, x, torch.ones(4, 2))


# --------------------------------------------------------------------------- Wasserstein


def test_w2_self_zero_and_translation():
    x = torch.randn(300, 3, generator=gen(6), dtype=F64)
    assert w2(x, x) == pytest.approx(0.0, abs=1e-10)
    t = torch.tensor([0.3, -1.2, 2.0], dtype=F64)
    # a translation is the optimal map (gradient of a convex function), so W2 = |t| exactly
    assert w2(x, x + t) == pytest.approx(float(t.norm()), abs=1e-8)
    # the point order must not matter
    perm = torch.randperm(300, generator=gen(7))
    assert w2(x, x[perm] + t) == pytest.approx(float(t.norm()), abs=1e-8)


def test_w2_weights():
    # two atoms each: x = {0, 1}, y = {0, 1} with weights a = (0.75, 0.25), b = (0.25, 0.75):
    # 0.5 mass moves distance 1 -> W2 = sqrt(0.5)
    x = torch.tensor([[0.0], [1.0]], dtype=F64)
    a = torch.tensor([0.75, 0.25], dtype=F64)
    b = torch.tensor([0.25, 0.75], dtype=F64)
    assert w2(x, x, a=a, b=b) == pytest.approx(math.sqrt(0.5), abs=1e-12)
    with pytest.raises(ValueError, match="sum to 1"):
        w2(x, x, a=torch.tensor([0.5, 0.6], dtype=F64))
    with pytest.raises(ValueError, match="negative"):
        w2(x, x, b=torch.tensor([1.5, -0.5], dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        w2(x, x, a=torch.tensor([1.0], dtype=F64))


def test_w2_brenier_map_is_exact_against_gaussian_w2():
    # Y = T X with T the optimal affine map between N(m1, S1) and N(m2, S2): T is symmetric
    # positive definite (gradient of a convex function), so the coupling (x_i, T x_i) is
    # optimal for the empirical measures too, and with the empirical moments of X matched
    # exactly its cost is the Gaussian W2^2. Exact up to round-off: tolerance 1e-8.
    S1, S2 = L2A @ L2A.T, L2B @ L2B.T
    r1 = torch.from_numpy(scipy.linalg.sqrtm(S1.numpy()).real)
    r1_inv = torch.linalg.inv(r1)
    T = r1_inv @ torch.from_numpy(scipy.linalg.sqrtm((r1 @ S2 @ r1).numpy()).real) @ r1_inv
    x = moment_matched_sample(500, M2A, L2A, gen(8))
    y = (x - M2A) @ T.T + M2B
    assert w2(x, y) == pytest.approx(float(gaussian_w2(M2A, S1, M2B, S2)), abs=1e-8)


def test_w2_matches_gaussian_w2_on_samples():
    # Independent raw samples, n = 2000, d = 2, non-commuting covariances, exact W2 = 1.398.
    # Measured over 20 seeds: mean error +0.003 (the empirical bias, ~ sqrt(log n / n) scale
    # in d = 2 with a small constant here) and sd 0.028 (sample means/covariances fluctuate
    # like n^{-1/2}); tolerance 0.15 ~ 5 sd + bias.
    S1, S2 = L2A @ L2A.T, L2B @ L2B.T
    exact = float(gaussian_w2(M2A, S1, M2B, S2))
    g = gen(9)
    x = gaussian_sample(2000, M2A, L2A, g)
    y = gaussian_sample(2000, M2B, L2B, g)
    assert abs(w2(x, y) - exact) < 0.15


def test_w2_gelbrich_bound_on_moment_matched_samples():
    # With the empirical means and covariances matched exactly, the Gelbrich bound gives
    # w2(x, y) >= gaussian_w2 for any two clouds (up to round-off, 1e-9), and the excess is
    # the non-Gaussian shape of the finite samples, at most ||S2^{1/2}|| W2(Z, Z') with Z, Z'
    # two standardised samples, O(sqrt(log n / n)) in d = 2; measured 0.005-0.007 over 10
    # seeds at n = 2000, so 0.03 bounds it with room while catching any error of order 2%.
    S1, S2 = L2A @ L2A.T, L2B @ L2B.T
    exact = float(gaussian_w2(M2A, S1, M2B, S2))
    g = gen(10)
    x = moment_matched_sample(2000, M2A, L2A, g)
    y = moment_matched_sample(2000, M2B, L2B, g)
    excess = w2(x, y) - exact
    assert -1e-9 <= excess < 0.03


def test_w2_refuses_too_large_problems():
    x = torch.zeros(5001, 1)
    y = torch.zeros(5000, 1)
    with pytest.raises(ValueError, match="max_pairs"):
        w2(x, y)
    with pytest.raises(ValueError, match="max_pairs"):
        w2(x[:10], y[:10], max_pairs=99)


def test_sliced_w2_basic_properties():
    g = gen(11)
    x = torch.randn(400, 3, generator=g, dtype=F64)
    assert sliced_w2(x, x, n_projections=32) == pytest.approx(0.0, abs=1e-12)
    # translation by t: every projection shifts by theta.t, so SW2^2 = mean (theta.t)^2
    t = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    dirs = torch.randn(64, 3, generator=g, dtype=F64)
    u = dirs / dirs.norm(dim=1, keepdim=True)
    assert sliced_w2(x, x + t, directions=dirs) == pytest.approx(float((u @ t).pow(2).mean().sqrt()), abs=1e-10)
    # reproducible seed, different seeds give different directions
    y = x + torch.randn(400, 3, generator=g, dtype=F64) * 0.5
    assert sliced_w2(x, y, n_projections=32, seed=3) == sliced_w2(x, y, n_projections=32, seed=3)
    assert sliced_w2(x, y, n_projections=32, seed=3) != sliced_w2(x, y, n_projections=32, seed=4)
    # float32 input, same directions: same value to float32 accuracy
    ref = sliced_w2(x, y, n_projections=32, seed=3)
    assert sliced_w2(x.float(), y.float(), n_projections=32, seed=3) == pytest.approx(ref, rel=1e-5)


# --------------------------------------------------------------------------- Gaussian closed forms


def test_gaussian_w2_one_dimensional_formula():
    for m1, s1, m2, s2 in [(0.0, 1.0, 0.0, 1.0), (1.0, 2.0, -0.5, 0.3), (3.0, 0.0, 1.0, 1.5)]:
        got = gaussian_w2(
            torch.tensor([m1], dtype=F64),
            torch.tensor([[s1**2]], dtype=F64),
            torch.tensor([m2], dtype=F64),
            torch.tensor([[s2**2]], dtype=F64),
        )
        assert float(got) == pytest.approx(math.sqrt((m1 - m2) ** 2 + (s1 - s2) ** 2), abs=1e-12)


def _random_spd(d: int, g: torch.Generator) -> torch.Tensor:
    A = torch.randn(d, d, generator=g, dtype=F64)
    return A @ A.T + 0.1 * torch.eye(d, dtype=F64)


def test_gaussian_w2_symmetric_zero_and_trace_formula():
    g = gen(12)
    d = 4
    S1, S2 = _random_spd(d, g), _random_spd(d, g)
    m1, m2 = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    a = float(gaussian_w2(m1, S1, m2, S2))
    assert a == pytest.approx(float(gaussian_w2(m2, S2, m1, S1)), abs=1e-12)
    assert float(gaussian_w2(m1, S1, m1, S1)) == pytest.approx(0.0, abs=1e-10)
    # SPEC trace formula with scipy's matrix square roots
    r1 = scipy.linalg.sqrtm(S1.numpy()).real
    cross = scipy.linalg.sqrtm(r1 @ S2.numpy() @ r1).real
    ref = float(((m1 - m2) ** 2).sum()) + np.trace(S1.numpy() + S2.numpy() - 2 * cross)
    assert a**2 == pytest.approx(ref, rel=1e-9)
    # a singular (PSD, not PD) covariance is allowed: N(0, 0) to N(0, I) is sqrt(d)
    zero = torch.zeros(d, d, dtype=F64)
    assert float(gaussian_w2(m1, zero, m1, torch.eye(d, dtype=F64))) == pytest.approx(math.sqrt(d), abs=1e-12)


def test_gaussian_w2_commuting_covariances():
    # S1 = Q D1 Q^T, S2 = Q D2 Q^T commute: W2^2 = |dm|^2 + ||S1^{1/2} - S2^{1/2}||_F^2
    g = gen(13)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=F64))
    D1 = torch.tensor([0.5, 1.0, 4.0], dtype=F64)
    D2 = torch.tensor([2.0, 0.1, 1.0], dtype=F64)
    S1, S2 = Q @ torch.diag(D1) @ Q.T, Q @ torch.diag(D2) @ Q.T
    R1, R2 = Q @ torch.diag(D1.sqrt()) @ Q.T, Q @ torch.diag(D2.sqrt()) @ Q.T
    m1, m2 = torch.randn(3, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    expected = float(((m1 - m2) ** 2).sum() + ((R1 - R2) ** 2).sum())
    assert float(gaussian_w2(m1, S1, m2, S2)) ** 2 == pytest.approx(expected, rel=1e-10)


def test_gaussian_sliced_w2_isotropic_is_exact():
    a, b, d = 2.0, 0.5, 3
    eye = torch.eye(d, dtype=F64)
    m = torch.tensor([0.2, -1.0, 0.7], dtype=F64)
    # equal means: every direction gives (sqrt(a) - sqrt(b))^2, so any K is exact
    for k in (1, 7):
        got = gaussian_sliced_w2(m, a * eye, m, b * eye, n_projections=k, generator=gen(k))
        assert float(got) == pytest.approx(abs(math.sqrt(a) - math.sqrt(b)), abs=1e-12)
    # different means: E (theta.dm)^2 = |dm|^2 / d; theta_1^2 ~ Beta(1/2, (d-1)/2) has
    # variance 2 (d - 1) / (d^2 (d + 2)), so the SE of the K-direction mean of SW2^2 is
    # |dm|^2 sqrt(that / K); assert within 4 SE
    dm = torch.tensor([1.0, 2.0, -1.0], dtype=F64)
    k = 2000
    got2 = float(gaussian_sliced_w2(m, a * eye, m + dm, b * eye, n_projections=k, generator=gen(14))) ** 2
    exact2 = float(dm @ dm) / d + (math.sqrt(a) - math.sqrt(b)) ** 2
    se = float(dm @ dm) * math.sqrt(2 * (d - 1) / (d**2 * (d + 2)) / k)
    assert abs(got2 - exact2) < 4 * se


def test_gaussian_sliced_w2_matches_sliced_w2_on_samples():
    # Raw samples, n = 5000, d = 3, independent directions (POT seed vs our generator).
    # Error sources (sd of the SW2 estimate, measured over 20 seeds): 4096 Gaussian-formula
    # directions 0.0059; 256 POT directions 0.0059 * sqrt(4096 / 256) = 0.024; sampling at
    # n = 5000 0.014 (measured with shared directions). Tolerance: 4 x their root sum of squares.
    S1, S2 = L3A @ L3A.T, L3B @ L3B.T
    g = gen(15)
    x = gaussian_sample(5000, M3A, L3A, g)
    y = gaussian_sample(5000, M3B, L3B, g)
    exact = float(gaussian_sliced_w2(M3A, S1, M3B, S2, n_projections=4096, generator=gen(16)))
    tol = 4 * math.sqrt(0.0059**2 + 0.024**2 + 0.014**2)
    assert abs(sliced_w2(x, y, n_projections=256, seed=0) - exact) < tol


def test_gaussian_sliced_w2_paired_directions_gelbrich():
    # Same directions for both, moment-matched samples: along every direction the projected
    # clouds have exactly the Gaussian means and variances, so the 1-D Gelbrich bound makes
    # the empirical value >= the closed form (round-off 1e-9), and the excess is the 1-D
    # shape term, 1e-4 measured at n = 20000 (bounded by 1e-3 here at n = 2000).
    S1, S2 = L3A @ L3A.T, L3B @ L3B.T
    g = gen(17)
    x = moment_matched_sample(2000, M3A, L3A, g)
    y = moment_matched_sample(2000, M3B, L3B, g)
    dirs = torch.randn(200, 3, generator=g, dtype=F64)
    excess = sliced_w2(x, y, directions=dirs) - float(gaussian_sliced_w2(M3A, S1, M3B, S2, directions=dirs))
    assert -1e-9 <= excess < 1e-3


def test_rbf_kernel_mean_matches_monte_carlo():
    # 20000 independent pairs (X_i, Y_i); SE = sample sd / sqrt(20000); assert within 4 SE.
    S1, S2 = L3A @ L3A.T, L3B @ L3B.T
    ell = 1.3
    g = gen(18)
    vals = []
    for _ in range(20):
        xb = gaussian_sample(1000, M3A, L3A, g)
        yb = gaussian_sample(1000, M3B, L3B, g)
        vals.append(rbf_kernel(xb, yb, ell).diagonal())
    k = torch.cat(vals)
    se = float(k.std()) / math.sqrt(k.numel())
    exact = float(rbf_kernel_mean(M3A, S1, M3B, S2, ell))
    assert abs(float(k.mean()) - exact) < 4 * se
    # and the d = 1 closed form by hand: N(0, s^2) vs N(mu, t^2)
    s, t, mu = 0.7, 1.1, 0.4
    one = rbf_kernel_mean(
        torch.zeros(1, dtype=F64), torch.tensor([[s**2]], dtype=F64),
        torch.tensor([mu], dtype=F64), torch.tensor([[t**2]], dtype=F64), ell,
    )
    v = ell**2 + s**2 + t**2
    assert float(one) == pytest.approx(math.sqrt(ell**2 / v) * math.exp(-(mu**2) / (2 * v)), rel=1e-12)


# --------------------------------------------------------------------------- MMD


def test_mmd2_chunked_equals_unchunked():
    g = gen(19)
    x = torch.randn(150, 3, generator=g, dtype=F64)
    y = torch.randn(130, 3, generator=g, dtype=F64) + 0.3
    a = mmd2_unbiased(x, y, lengthscale=1.1, chunk_size=7)
    b = mmd2_unbiased(x, y, lengthscale=1.1, chunk_size=10000)
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    # and against a dense evaluation of the formula
    kxx, kyy, kxy = rbf_kernel(x, x, 1.1), rbf_kernel(y, y, 1.1), rbf_kernel(x, y, 1.1)
    n, m = 150, 130
    dense = (kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.mean()
    assert float(a) == pytest.approx(float(dense), rel=1e-9)


def test_mmd2_unbiased_under_null():
    # x, y ~ N(0, I_2), N = M = 40, l = 1, 200 seeds: the mean must be within 4 SE of 0
    # (SE = sd / sqrt(200)). A biased V-statistic would sit at (1/N + 1/M)(1 - E k(X, X'))
    # = 0.05 * (1 - 1/3) = 0.033, many SE away.
    vals = []
    for s in range(200):
        g = gen(1000 + s)
        x = torch.randn(40, 2, generator=g, dtype=F64)
        y = torch.randn(40, 2, generator=g, dtype=F64)
        vals.append(float(mmd2_unbiased(x, y, lengthscale=1.0)))
    v = np.array(vals)
    se = v.std(ddof=1) / math.sqrt(len(v))
    assert abs(v.mean()) < 4 * se


def test_mmd2_positive_for_shifted_laws_and_matches_population_value():
    # x ~ N(mA, SA), y ~ N(mB, SB) in d = 3, N = M = 100, l = 1.5, 100 seeds; population
    # MMD^2 from rbf_kernel_mean; the mean estimate must be within 4 SE (SE = sd / sqrt(100)).
    ell = 1.5
    SA, SB = L3A @ L3A.T, L3B @ L3B.T
    pop = float(
        rbf_kernel_mean(M3A, SA, M3A, SA, ell)
        + rbf_kernel_mean(M3B, SB, M3B, SB, ell)
        - 2 * rbf_kernel_mean(M3A, SA, M3B, SB, ell)
    )
    assert pop > 0.05
    vals = []
    for s in range(100):
        g = gen(2000 + s)
        x = gaussian_sample(100, M3A, L3A, g)
        y = gaussian_sample(100, M3B, L3B, g)
        vals.append(float(mmd2_unbiased(x, y, lengthscale=ell)))
    v = np.array(vals)
    assert (v > 0).all()
    se = v.std(ddof=1) / math.sqrt(len(v))
    assert abs(v.mean() - pop) < 4 * se


def test_mmd2_median_heuristic_default_and_autocast():
    g = gen(20)
    x = torch.randn(300, 5, generator=g)
    y = torch.randn(280, 5, generator=g) + 0.2
    ell = median_bandwidth(x, y)
    plain = mmd2_unbiased(x, y)
    torch.testing.assert_close(plain, mmd2_unbiased(x, y, lengthscale=ell))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = mmd2_unbiased(x, y, chunk_size=128)
    assert float(auto) == pytest.approx(float(mmd2_unbiased(x, y, chunk_size=128)), abs=1e-5)
    # bfloat16 inputs are upcast: same as the float32 MMD of the rounded points
    xb, yb = x.bfloat16(), y.bfloat16()
    torch.testing.assert_close(
        mmd2_unbiased(xb, yb, lengthscale=ell), mmd2_unbiased(xb.float(), yb.float(), lengthscale=ell)
    )


SCORES = {
    "w2": lambda x, y: w2(x, y),
    "sliced_w2": lambda x, y: sliced_w2(x, y, seed=0),
    "mmd2_unbiased": lambda x, y: mmd2_unbiased(x, y, lengthscale=1.0),
}


@pytest.mark.parametrize("name", list(SCORES))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_scores_return_python_floats(name, dtype):
    """mmd2_unbiased returned a 0-d tensor where w2 and sliced_w2 return floats: one kind
    of value for the scores that go into records and tables (also for inputs that require
    grad: a float carries no graph)."""
    g = gen(21)
    x = torch.randn(30, 2, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randn(25, 2, generator=g, dtype=dtype)
    assert type(SCORES[name](x, y)) is float


@pytest.mark.parametrize("name", list(SCORES))
def test_scores_take_samples_of_any_event_shape(name):
    """(N, C, H, W) images are scored as (N, C H W) points, bit for bit; samples of
    different event shapes (even of the same size D) are refused."""
    g = gen(22)
    x = torch.randn(40, 3, 2, 2, generator=g, dtype=F64)
    y = torch.randn(30, 3, 2, 2, generator=g, dtype=F64) + 0.5
    assert SCORES[name](x, y) == SCORES[name](x.reshape(40, 12), y.reshape(30, 12))
    with pytest.raises(ValueError, match=r"event shape \(3, 2, 2\) but y has event shape \(3, 4\)"):
        SCORES[name](x, y.reshape(30, 3, 4))
    with pytest.raises(ValueError, match=r"event shape \(12,\) but y has event shape \(3, 2, 2\)"):
        SCORES[name](x.reshape(40, 12), y)


def test_permutation_test_statistic_and_chunking():
    g = gen(22)
    x = torch.randn(60, 2, generator=g, dtype=F64)
    y = torch.randn(45, 2, generator=g, dtype=F64) + 0.4
    res = mmd_permutation_test(x, y, lengthscale=1.0, n_permutations=50, generator=gen(5))
    assert isinstance(res, MMDTestResult)
    stat, p = res
    assert float(stat) == pytest.approx(float(mmd2_unbiased(x, y, lengthscale=1.0)), rel=1e-9)
    # blocks of 16 (pooled matrix never held whole) give the same p-value and statistic
    res16 = mmd_permutation_test(x, y, lengthscale=1.0, n_permutations=50, generator=gen(5), chunk_size=16)
    assert res16.p_value == p
    assert float(res16.statistic) == pytest.approx(float(stat), rel=1e-9)
    assert 1 / 51 <= p <= 1


def test_permutation_test_matches_exact_permutation_distribution():
    # N = M = 3: only C(6, 3) = 20 label splits, so the exact permutation p-value
    # p_exact = #{splits with T >= T_obs} / 20 can be enumerated with mmd2_unbiased. With
    # B = 20000 random permutations the test's p-value is (1 + Binomial(B, p_exact)) / (1 + B):
    # within 4 binomial SE, sqrt(p (1 - p) / B) (<= 0.0036), of p_exact.
    import itertools

    x = torch.tensor([[0.0, 0.1], [0.5, -0.3], [1.2, 0.4]], dtype=F64)
    y = torch.tensor([[0.9, 0.8], [2.0, 0.2], [1.6, 1.1]], dtype=F64)
    z = torch.cat([x, y])
    observed = float(mmd2_unbiased(x, y, lengthscale=0.8))
    stats = []
    for idx in itertools.combinations(range(6), 3):
        rest = [i for i in range(6) if i not in idx]
        stats.append(float(mmd2_unbiased(z[list(idx)], z[rest], lengthscale=0.8)))
    p_exact = float(np.mean(np.array(stats) >= observed - 1e-12))
    b = 20000
    res = mmd_permutation_test(x, y, lengthscale=0.8, n_permutations=b, generator=gen(26))
    assert float(res.statistic) == pytest.approx(observed, rel=1e-9)
    assert abs(res.p_value - p_exact) < 4 * math.sqrt(p_exact * (1 - p_exact) / b) + 1e-4


def test_aggregated_test_with_one_lengthscale_is_the_permutation_test():
    g = gen(7)
    x, y = torch.randn(60, 3, generator=g), 1.1 * torch.randn(50, 3, generator=g)
    single = mmd_permutation_test(x, y, lengthscale=1.3, n_permutations=300, generator=gen(8))
    agg = mmd_aggregated_test(x, y, lengthscales=[1.3], n_permutations=300, generator=gen(8))
    assert agg.p_value == pytest.approx(single.p_value, abs=1e-12)
    assert agg.p_values[0] == pytest.approx(single.p_value, abs=1e-12)
    assert float(agg.statistics[0]) == pytest.approx(float(single.statistic), rel=1e-6)
    # the default grid is the median heuristic times the factors
    agg = mmd_aggregated_test(x, y, n_permutations=20, generator=gen(8), factors=(0.5, 1.0))
    med = median_bandwidth(x, y, generator=gen(8))
    assert agg.lengthscales == pytest.approx((0.5 * med, med))
    for bad in ([], [1.0, -1.0]):
        with pytest.raises(ValueError, match="lengthscale"):
            mmd_aggregated_test(x, y, lengthscales=bad)


@pytest.mark.parametrize(
    "name, seed0",
    [("permutation", 3000), ("aggregated", 5000)],
)
def test_mmd_tests_size_under_null(name, seed0):
    # H0 true (both N(0, I_2)), N = M = 100, 100 seeds: rejection rate at alpha = 0.05 must be
    # <= 0.05 + 3 binomial SE = 0.05 + 3 sqrt(0.05 * 0.95 / 100) = 0.115. The aggregated
    # test's min-p over 5 lengthscales is calibrated by the same permutations (the
    # uncalibrated min of the 5 p-values rejects 0.12 here).
    rejections = 0
    for s in range(100):
        g = gen(seed0 + s)
        x = torch.randn(100, 2, generator=g)
        y = torch.randn(100, 2, generator=g)
        if name == "permutation":
            p = mmd_permutation_test(x, y, n_permutations=200, generator=g).p_value
        else:
            p = mmd_aggregated_test(x, y, n_permutations=200, generator=g).p_value
        rejections += p <= 0.05
    assert rejections / 100 <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 100)


def test_aggregated_test_sees_a_change_of_scale_in_high_dimension():
    # y is 10% wider than x in d = 20 (N = M = 500); the short lengthscales resolve it.
    # Fixed seeds; measured p = 1/201 or 2/201 (the median lengthscale alone: up to 4/201).
    for s in range(3):
        g = gen(6000 + s)
        x = torch.randn(500, 20, generator=g)
        y = 1.1 * torch.randn(500, 20, generator=g)
        res = mmd_aggregated_test(x, y, n_permutations=200, generator=g)
        assert res.p_value <= 0.01
        assert min(res.p_values[:2]) <= 0.01


def _paired_u(x: torch.Tensor, y: torch.Tensor, ell: float) -> float:
    """The paired MMD^2 U-statistic written out densely (independent of the chunked pass)."""
    h = rbf_kernel(x, x, ell) + rbf_kernel(y, y, ell) - rbf_kernel(x, y, ell) - rbf_kernel(y, x, ell)
    n = x.shape[0]
    return float((h.sum() - h.diagonal().sum()) / (n * (n - 1)))


def test_paired_test_statistic_is_the_u_statistic_in_any_chunking():
    g = gen(31)
    x = torch.randn(150, 3, generator=g, dtype=F64)
    y = 0.5 * x + torch.randn(150, 3, generator=g, dtype=F64)
    whole = mmd_paired_test(x, y, lengthscales=[0.7, 1.5], n_bootstrap=300, generator=gen(2))
    parts = mmd_paired_test(x, y, lengthscales=[0.7, 1.5], n_bootstrap=300, generator=gen(2), chunk_size=37)
    for li, ell in enumerate((0.7, 1.5)):
        assert float(whole.statistics[li]) == pytest.approx(_paired_u(x, y, ell), rel=1e-10)
    torch.testing.assert_close(parts.statistics, whole.statistics, rtol=1e-10, atol=0.0)
    # the bootstrap products are float32 GEMMs summed in another order: same p-values up to ties
    assert parts.p_values == pytest.approx(whole.p_values, abs=2 / 301)
    # one lengthscale alone: its p-value is the maximum's
    # autocast does not reach the distances and kernels (fp32+ work)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = mmd_paired_test(x.float(), y.float(), lengthscales=[0.7, 1.5], n_bootstrap=300, generator=gen(2))
    plain = mmd_paired_test(x.float(), y.float(), lengthscales=[0.7, 1.5], n_bootstrap=300, generator=gen(2))
    assert cast.statistics.dtype == torch.float32 and torch.equal(cast.statistics, plain.statistics)
    one = mmd_paired_test(x, y, lengthscales=[1.5], n_bootstrap=300, generator=gen(2))
    assert one.p_value == one.p_values[0] and one.standardised[0] == pytest.approx(whole.standardised[1])
    med = median_bandwidth(x, y, generator=gen(4))
    default = mmd_paired_test(x, y, n_bootstrap=10, generator=gen(4))
    assert default.lengthscales == pytest.approx((med,))
    with pytest.raises(ValueError, match="same shape"):
        mmd_paired_test(x, y[:-1])
    with pytest.raises(ValueError, match="lengthscale"):
        mmd_paired_test(x, y, lengthscales=[])
    with pytest.raises(ValueError, match="n_bootstrap"):
        mmd_paired_test(x, y, n_bootstrap=0)


def test_paired_statistic_is_unbiased_however_the_pairs_depend():
    # y_i = x_i + 0.5 e_1 exactly: a pair's two points are as dependent as can be, but the
    # U-statistic meets only independent points (i != j), so its mean is the population
    # MMD^2 between N(0, I) and N(0.5 e_1, I) (closed form, rbf_kernel_mean). A version
    # that pairs x_i with its own y_i in the cross term is biased by 2 E k(x, x + 0.5 e_1) / N.
    m0, eye = torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)
    shift = torch.tensor([0.5, 0.0], dtype=F64)
    ell = 1.0
    exact = float(2 * rbf_kernel_mean(m0, eye, m0, eye, ell) - 2 * rbf_kernel_mean(m0, eye, shift, eye, ell))
    vals = []
    for s in range(40):
        x = torch.randn(100, 2, generator=gen(7000 + s), dtype=F64)
        vals.append(float(mmd_paired_test(x, x + shift, lengthscales=[ell], n_bootstrap=1, generator=gen(s)).statistics[0]))
    v = torch.tensor(vals)
    se = float(v.std() / math.sqrt(len(v)))
    # within 4 SE of the closed form (SE over 40 seeds)
    assert abs(float(v.mean()) - exact) < 4 * se, (float(v.mean()), exact, se)


def test_paired_test_size_under_null_and_power():
    # H0: y_i an exact AR(1) step from x_i ~ N(0, I_2) (dependent pairs, same marginal):
    # 100 seeds, N = 100, rejection rate at 0.05 <= 0.05 + 3 SE = 0.115. H1: the step
    # ends in N(0, 1.5^2 I): rejected on every one of 20 seeds.
    rejections = 0
    for s in range(100):
        g = gen(8000 + s)
        x = torch.randn(100, 2, generator=g)
        y = 0.6 * x + 0.8 * torch.randn(100, 2, generator=g)
        rejections += mmd_paired_test(x, y, n_bootstrap=200, generator=g).p_value <= 0.05
    assert rejections / 100 <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 100)
    for s in range(20):
        g = gen(9000 + s)
        x = torch.randn(100, 2, generator=g)
        y = 1.5 * (0.6 * x + 0.8 * torch.randn(100, 2, generator=g))
        assert mmd_paired_test(x, y, n_bootstrap=200, generator=g).p_value <= 0.01


def test_permutation_test_power_one_sigma_shift():
    # H1: y's first coordinate shifted by one standard deviation, n = 200: rejects every time
    # (20 seeds; measured p = 1/201 on all of 50 seeds).
    for s in range(20):
        g = gen(4000 + s)
        x = torch.randn(200, 2, generator=g)
        y = torch.randn(200, 2, generator=g)
        y[:, 0] += 1.0
        _, p = mmd_permutation_test(x, y, n_permutations=200, generator=g)
        assert p <= 0.05


# --------------------------------------------------------------------------- noise floor


class _Gaussian:
    def __init__(self, d: int):
        self.d = d

    def sample(self, n, generator=None):
        return torch.randn(n, self.d, generator=generator, dtype=F64)


def test_noise_floor():
    def metric(x, y):
        return (x.mean(0) - y.mean(0)).norm()

    one = noise_floor(_Gaussian(2), 50, metric, generator=gen(23))
    assert isinstance(one, NoiseFloor) and one.std is None and len(one.values) == 1
    # same generator state, same value; a plain callable works too
    again = noise_floor(lambda n, generator=None: _Gaussian(2).sample(n, generator), 50, metric, generator=gen(23))
    assert again.mean == one.mean
    # |mean difference| of two size-n samples in d = 2: E|.|^2 = 2 d / n, so E|.| = sqrt(pi / n)
    # (Rayleigh with scale sqrt(2/n)); 400 repeats: within 4 SE of it
    many = noise_floor(_Gaussian(2), 50, metric, n_repeats=400, generator=gen(24))
    assert many.std is not None and many.std > 0
    assert abs(many.mean - math.sqrt(math.pi / 50)) < 4 * many.std / math.sqrt(400)
    # a real metric: W2 floor decreases with n
    small = noise_floor(_Gaussian(2), 50, w2, n_repeats=3, generator=gen(25)).mean
    large = noise_floor(_Gaussian(2), 400, w2, n_repeats=3, generator=gen(25)).mean
    assert large < small
    with pytest.raises(ValueError, match="sample"):
        noise_floor(object(), 10, metric)
    with pytest.raises(ValueError, match="n_repeats"):
        noise_floor(_Gaussian(2), 10, metric, n_repeats=0)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call",
    [
        lambda x, y: w2(x, y),
        lambda x, y: sliced_w2(x, y),
        lambda x, y: mmd2_unbiased(x, y),
        lambda x, y: mmd_permutation_test(x, y, n_permutations=5),
        lambda x, y: rbf_kernel(x, y, 1.0),
        lambda x, y: median_bandwidth(x, y),
    ],
    ids=["w2", "sliced_w2", "mmd2", "perm_test", "rbf_kernel", "median_bandwidth"],
)
def test_point_cloud_validation(call):
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="d = 2 but y has d = 3"):
        call(x, torch.randn(10, 3))
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="x contains 1 NaN"):
        call(bad, x)
    with pytest.raises(ValueError, match="y is an empty batch"):
        call(x, torch.randn(0, 2))
    with pytest.raises(ValueError, match="dtype"):
        call(x, x.double())
    with pytest.raises(ValueError, match=r"shape \(N, d\)"):
        call(x[0], x)


def test_parameter_validation():
    x = torch.randn(10, 2)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lengthscale"):
            mmd2_unbiased(x, x, lengthscale=bad)
        with pytest.raises(ValueError, match="lengthscale"):
            rbf_kernel(x, x, bad)
        with pytest.raises(ValueError, match="lengthscale"):
            rbf_kernel_mean(torch.zeros(2), torch.eye(2), torch.zeros(2), torch.eye(2), bad)
    with pytest.raises(ValueError, match="at least 2"):
        mmd2_unbiased(x[:1], x)
    with pytest.raises(ValueError, match="n_projections"):
        sliced_w2(x, x, n_projections=0)
    with pytest.raises(ValueError, match="n_projections"):
        gaussian_sliced_w2(torch.zeros(2), torch.eye(2), torch.zeros(2), torch.eye(2), n_projections=0)
    with pytest.raises(ValueError, match="n_permutations"):
        mmd_permutation_test(x, x, n_permutations=0)
    with pytest.raises(ValueError, match="seed"):
        sliced_w2(x, x, seed=1.5)
    with pytest.raises(ValueError, match="median pairwise distance is 0"):
        median_bandwidth(torch.zeros(5, 2))
    with pytest.raises(ValueError, match="zero row"):
        sliced_w2(x, x, directions=torch.zeros(3, 2))


def test_gaussian_parameter_validation():
    m, S = torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)
    with pytest.raises(ValueError, match="m1 has d = 2 but m2 has d = 3"):
        gaussian_w2(m, S, torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match=r"S2 must have shape \(2, 2\)"):
        gaussian_w2(m, S, m, torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match="not symmetric"):
        gaussian_w2(m, S, m, torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=F64))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        gaussian_w2(m, S, m, torch.tensor([[1.0, 0.0], [0.0, -0.5]], dtype=F64))
    with pytest.raises(ValueError, match="NaN"):
        rbf_kernel_mean(torch.tensor([0.0, float("nan")], dtype=F64), S, m, S, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        gaussian_sliced_w2(m, S, m.float(), S.float())


@pytest.mark.parametrize("scale", [1e20, 1e-20, 3.0])
def test_mmd_statistics_are_scale_free_at_extreme_scales(scale):
    """With the median lengthscale every RBF-MMD statistic is invariant under x -> a x. In
    float32, data scaled by 1e20 overflowed the squared distances (NaN) and 1e-20
    underflowed them (0); the statistics and p-values must be those of the unscaled data,
    to float32 rounding (the power-of-two unit makes them equal bit for bit here)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 2, generator=g), torch.randn(100, 2, generator=g) + 0.5

    def stats(a, b):
        perm = mmd_permutation_test(a, b, generator=torch.Generator().manual_seed(1))
        agg = mmd_aggregated_test(a, b, generator=torch.Generator().manual_seed(1))
        paired = mmd_paired_test(a, b, generator=torch.Generator().manual_seed(1))
        return [float(mmd2_unbiased(a, b)), float(perm.statistic), perm.p_value, agg.p_value, paired.p_value], paired

    base, base_paired = stats(x, y)
    scaled, scaled_paired = stats(x * scale, y * scale)
    assert all(math.isfinite(v) for v in scaled)
    assert scaled == pytest.approx(base, rel=1e-5)
    assert scaled_paired.lengthscales[0] == pytest.approx(base_paired.lengthscales[0] * scale, rel=1e-5)
