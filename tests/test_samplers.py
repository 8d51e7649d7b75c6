"""Tests of fluxbench.samplers: ULA, exact OU, annealed Langevin, probability flow.

Statistical assertions compare sample moments with their exact values within 4 standard
errors (two-sided p ~ 6e-5 per entry), all seeds fixed. For an (N, d) Gaussian sample with
covariance S: SE(mean_i) = sqrt(S_ii / n), SE(cov_ij) = sqrt((S_ii S_jj + S_ij^2) / n).
Discretisation biases are computed exactly (linear-Gaussian recursions) and added to the
tolerance; each such bias is itself asserted to be small.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from fluxbench.samplers import ExactOU, annealed_langevin, langevin, probability_flow, probability_flow_nll

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tests run thousands of small tensor ops; on a small, shared machine intra-op
    # threads cost more in synchronisation than they gain. Restored after the module.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def random_spd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=_gen(seed), dtype=DT)
    return a @ a.T / d + 0.5 * torch.eye(d, dtype=DT)


def random_antisymmetric(d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    k = torch.randn(d, d, generator=_gen(seed), dtype=DT)
    return scale * (k - k.T)


def gaussian_samples(n: int, cov: torch.Tensor, seed: int, mean: torch.Tensor | None = None) -> torch.Tensor:
    z = torch.randn(n, cov.shape[0], generator=_gen(seed), dtype=DT)
    x = z @ torch.linalg.cholesky(cov).T
    return x if mean is None else x + mean


def assert_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, *, n_se: float = 4.0, bias: float = 0.0):
    """Sample mean/cov of x (n, d) within n_se standard errors (+ a stated bias) of (mean, cov)."""
    n = x.shape[0]
    mean_hat = x.mean(0)
    cov_hat = torch.cov(x.T).reshape(cov.shape)
    se_mean = (torch.diagonal(cov) / n).sqrt()
    diag = torch.diagonal(cov)
    se_cov = ((diag[:, None] * diag[None, :] + cov**2) / n).sqrt()
    err_mean = (mean_hat - mean).abs()
    err_cov = (cov_hat - cov).abs()
    assert bool((err_mean <= n_se * se_mean + bias).all()), f"mean {mean_hat} vs {mean} (SE {se_mean})"
    assert bool((err_cov <= n_se * se_cov + bias).all()), f"cov {cov_hat} vs {cov} (SE {se_cov})"


# ------------------------------------------------------------------------ exact OU
@pytest.mark.parametrize("d", [2, 5])
def test_exact_ou_keeps_gaussian_stationary(d):
    sigma = random_spd(d, seed=10 + d)
    j = random_antisymmetric(d, seed=20 + d)
    ou = ExactOU.from_precision(torch.linalg.inv(sigma), j)
    x0 = gaussian_samples(20000, sigma, seed=30 + d)
    x = ou.sample(x0, 0.3, 5, generator=_gen(40 + d))
    assert x.shape == x0.shape
    assert_moments(x, torch.zeros(d, dtype=DT), sigma)


@pytest.mark.parametrize("d", [2, 5])
def test_exact_ou_conditional_matches_scipy_expm(d):
    sigma = random_spd(d, seed=50 + d)
    j = random_antisymmetric(d, seed=60 + d)
    mean = torch.linspace(-1.0, 2.0, d, dtype=DT)
    ou = ExactOU.from_precision(torch.linalg.inv(sigma), j, mean=mean)
    t = 0.7
    s_np, j_np, sig_np, m_np = (a.numpy() for a in (torch.linalg.inv(sigma), j, sigma, mean))
    bmat = (np.eye(d) + j_np) @ s_np
    e = scipy.linalg.expm(-bmat * t)
    c = sig_np - e @ sig_np @ e.T
    x0 = torch.randn(7, d, generator=_gen(1), dtype=DT)
    cond_mean, cond_cov = ou.conditional(x0, t)
    np.testing.assert_allclose(cond_mean.numpy(), m_np + (x0.numpy() - m_np) @ e.T, rtol=0, atol=1e-10)
    np.testing.assert_allclose(cond_cov.numpy(), c, rtol=0, atol=1e-10)
    e_t, c_t = ou.transition(t)
    np.testing.assert_allclose(e_t.numpy(), e, rtol=0, atol=1e-10)
    np.testing.assert_allclose(c_t.numpy(), c, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ou.bmat.numpy(), bmat, rtol=0, atol=1e-12)
    # step(): the deterministic part is m + E (x0 - m) exactly (same noise for both calls)
    a = ou.step(x0, t, generator=_gen(2))
    b = ou.step(mean.expand(7, d).clone(), t, generator=_gen(2))
    np.testing.assert_allclose((a - b).numpy(), (x0.numpy() - m_np) @ e.T, rtol=0, atol=1e-10)


def test_exact_ou_step_conditional_law():
    d = 3
    sigma = random_spd(d, seed=70)
    ou = ExactOU.from_precision(torch.linalg.inv(sigma), random_antisymmetric(d, seed=71), mean=torch.ones(d, dtype=DT))
    start = torch.tensor([[2.0, -1.0, 0.5]], dtype=DT)
    x = ou.step(start.expand(20000, d).clone(), 0.4, generator=_gen(72))
    cond_mean, cond_cov = ou.conditional(start, 0.4)
    assert_moments(x, cond_mean[0], cond_cov)


def test_exact_ou_tiny_and_zero_time():
    d = 4
    ou = ExactOU.from_precision(torch.linalg.inv(random_spd(d, seed=80)), random_antisymmetric(d, seed=81))
    x = torch.randn(50, d, generator=_gen(82), dtype=DT)
    assert torch.equal(ou.step(x, 0.0, generator=_gen(0)), x)
    y = ou.step(x, 1e-14, generator=_gen(0))  # transition covariance ~ 2e-14 I: eigh fallback
    assert bool(torch.isfinite(y).all())
    assert float((y - x).abs().max()) < 1e-5
    traj = ou.sample(x, 0.1, 7, generator=_gen(0), thin=2)
    assert traj.shape == (4, 50, d) and torch.equal(traj[0], x)


def test_exact_ou_drift_is_linear_field():
    d = 3
    sigma = random_spd(d, seed=90)
    j = random_antisymmetric(d, seed=91)
    m = torch.tensor([0.5, -0.5, 1.0], dtype=DT)
    ou = ExactOU.from_precision(torch.linalg.inv(sigma), j, mean=m)
    x = torch.randn(6, d, generator=_gen(92), dtype=DT)
    expected = -(x - m) @ ((torch.eye(d, dtype=DT) + j) @ torch.linalg.inv(sigma)).T
    torch.testing.assert_close(ou.drift(x), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ou(x), expected, rtol=1e-10, atol=1e-12)


def test_exact_ou_rejects_non_stationary_bmat():
    d = 3
    sigma = random_spd(d, seed=100)
    s = torch.linalg.inv(sigma)
    k = torch.randn(d, d, generator=_gen(101), dtype=DT)
    j_sym = k + k.T
    with pytest.raises(ValueError, match="not stationary"):
        ExactOU((torch.eye(d, dtype=DT) + j_sym) @ s, sigma)
    with pytest.raises(ValueError, match="antisymmetric"):
        ExactOU.from_precision(s, j_sym)
    with pytest.raises(ValueError, match="positive definite"):
        ExactOU(torch.eye(d, dtype=DT), -sigma)
    with pytest.raises(ValueError, match="square"):
        ExactOU(torch.ones(2, 3, dtype=DT), sigma)
    # the reversible and the non-reversible choices are both accepted
    ExactOU(s, sigma)
    ExactOU((torch.eye(d, dtype=DT) + random_antisymmetric(d, seed=102)) @ s, sigma)


# ------------------------------------------------------------------------------ ULA
def _ula_variance(eps: float, seed: int, n: int) -> float:
    # from N(0, 1) the variance error contracts by (1 - eps)^2 per step; ceil(12 / eps)
    # steps leave at most 0.2 * exp(-24) of it
    x0 = torch.randn(n, 1, generator=_gen(seed), dtype=DT)
    x = langevin(lambda x: -x, x0, step_size=eps, n_steps=math.ceil(12 / eps), generator=_gen(seed + 1))
    return float(x.var())


def test_ula_stationary_variance_bias():
    # f = -x: x' = (1 - eps) x + sqrt(2 eps) xi, so v = (1 - eps)^2 v + 2 eps, i.e.
    # v = 2 eps / (2 eps - eps^2) = 1 / (1 - eps / 2). SE of a sample variance:
    # v sqrt(2 / (n - 1)) = 0.0067 at eps = 0.1, where v - 1 = 0.053 (8 SE: an exact
    # sampler would fail).
    n = 50_000
    variances = []
    for eps, seed in [(0.4, 1), (0.1, 3), (0.02, 5)]:
        v_exact = 1.0 / (1.0 - eps / 2.0)
        v_hat = _ula_variance(eps, seed, n=n)
        se = v_exact * math.sqrt(2.0 / (n - 1))
        assert abs(v_hat - v_exact) <= 4 * se, (eps, v_hat, v_exact, se)
        variances.append(v_hat)
    # the bias shrinks to 0 with eps: 1.25 > 1.053 > 1.010 -> 1 (neighbours are >= 4.5 SE apart)
    assert variances[0] > variances[1] > variances[2]
    assert abs(variances[2] - 1.0) < abs(variances[1] - 1.0) < abs(variances[0] - 1.0)


def _pointwise_field(x):
    return -x - 0.5 * torch.tanh(3 * x) + 0.1 * torch.sin(x) ** 2


def test_langevin_seed_and_chunk_size_bit_identical():
    x0 = torch.randn(300, 3, generator=_gen(7))
    kwargs = dict(step_size=0.05, n_steps=30)
    a = langevin(_pointwise_field, x0, generator=_gen(11), **kwargs)
    b = langevin(_pointwise_field, x0, generator=_gen(11), **kwargs)
    assert torch.equal(a, b)
    for chunk in (1, 7, 128, 300, 5000):
        c = langevin(_pointwise_field, x0, generator=_gen(11), chunk_size=chunk, **kwargs)
        assert torch.equal(a, c), chunk
    d = langevin(_pointwise_field, x0, generator=_gen(12), **kwargs)
    assert not torch.equal(a, d)
    assert torch.equal(x0, torch.randn(300, 3, generator=_gen(7)))  # x0 untouched


def test_langevin_chunks_bound_field_calls():
    sizes = []

    def field(x):
        sizes.append(x.shape[0])
        return -x

    langevin(field, torch.zeros(10, 2), step_size=0.1, n_steps=2, chunk_size=4, generator=_gen(0))
    assert sizes == [4, 4, 2, 4, 4, 2]


def test_langevin_thin_returns_documented_states():
    x0 = torch.randn(20, 2, generator=_gen(3), dtype=DT)
    run = lambda n, **kw: langevin(_pointwise_field, x0, step_size=0.1, n_steps=n, generator=_gen(4), **kw)  # noqa: E731
    traj = run(10, thin=3)  # states x_0, x_3, x_6, x_9
    assert traj.shape == (4, 20, 2)
    assert torch.equal(traj[0], x0)
    assert torch.equal(traj[1], run(3))
    assert torch.equal(traj[3], run(9))
    assert run(10, thin=1).shape == (11, 20, 2)
    assert run(5, thin=5)[-1].equal(run(5))
    assert run(4, thin=9).shape == (1, 20, 2)
    y = run(0)
    assert torch.equal(y, x0) and y is not x0
    assert run(0, thin=2).shape == (1, 20, 2)


def test_langevin_divergence_and_bad_fields_raise():
    x0 = torch.randn(100, 2, generator=_gen(5))
    with pytest.raises(ValueError, match="step_size"):
        langevin(lambda x: -x, x0, step_size=1000.0, n_steps=200, generator=_gen(6))
    with pytest.raises(ValueError, match="shape"):
        langevin(lambda x: x[:, :1], x0, step_size=0.1, n_steps=3)
    with pytest.raises(ValueError, match="dtype"):
        langevin(lambda x: x.double(), x0, step_size=0.1, n_steps=3)
    with pytest.raises(ValueError, match="NaN"):
        langevin(lambda x: x * float("nan"), x0, step_size=0.1, n_steps=3)
    with pytest.raises(ValueError, match="step_size"):
        langevin(lambda x: -x, x0, step_size=0.0, n_steps=3)
    with pytest.raises(ValueError, match="n_steps"):
        langevin(lambda x: -x, x0, step_size=0.1, n_steps=-1)
    with pytest.raises(ValueError, match="thin"):
        langevin(lambda x: -x, x0, step_size=0.1, n_steps=3, thin=0)
    with pytest.raises(ValueError, match="chunk_size"):
        langevin(lambda x: -x, x0, step_size=0.1, n_steps=3, chunk_size=0)
    with pytest.raises(ValueError, match="x0"):
        langevin(lambda x: -x, x0[:, 0], step_size=0.1, n_steps=3)
    bad = x0.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="x0"):
        langevin(lambda x: -x, bad, step_size=0.1, n_steps=3)


# ------------------------------------------------------------- annealed / flow: helpers
SIG_MAX, SIG_MIN = 5.0, 0.05


def _gaussian_problem():
    """Anisotropic 2-D data covariance (eigenvalues 0.26 and 1.34) and the identity."""
    sigma = torch.tensor([[1.0, 0.5], [0.5, 0.6]], dtype=DT)
    return sigma, torch.eye(2, dtype=DT)


def _field(sigma: torch.Tensor, q: torch.Tensor):
    """f(x, s) = -(I + Q)(Sigma + s^2 I)^-1 x (the exact score when Q = 0)."""
    eye = torch.eye(sigma.shape[0], dtype=DT)

    def model(x, s):
        k = (eye + q) @ torch.linalg.inv(sigma + s**2 * eye)
        return -x @ k.T

    return model


def _geometric(n: int, lo: float = SIG_MIN, hi: float = SIG_MAX) -> list[float]:
    return np.geomspace(hi, lo, n).tolist()


def _em_covariance(sigma_np: np.ndarray, levels: list[float]) -> np.ndarray:
    """Exact covariance of the reverse-VE Euler-Maruyama chain from N(0, Sigma + s_1^2 I):
    C <- A C A^T + delta I, A = I - delta (Sigma + s_i^2 I)^-1 (linear-Gaussian recursion)."""
    eye = np.eye(sigma_np.shape[0])
    c = sigma_np + levels[0] ** 2 * eye
    for s, s_next in zip(levels[:-1], levels[1:]):
        delta = s**2 - s_next**2
        a = eye - delta * np.linalg.inv(sigma_np + s**2 * eye)
        c = a @ c @ a.T + delta * eye
    return c


# ------------------------------------------------------------------- annealed Langevin
def test_annealed_langevin_reaches_smoothed_gaussian():
    sigma, eye = _gaussian_problem()
    levels = _geometric(1000)
    target = sigma + SIG_MIN**2 * eye
    # discretisation bias of the EM chain (exact): each step adds delta^2 (Sigma + s^2 I)^-1,
    # then contracts; on this grid it is 0.005, stated bound 0.01 (about 1 SE of a covariance entry)
    bias = float(np.abs(_em_covariance(sigma.numpy(), levels) - target.numpy()).max())
    assert bias < 1e-2, bias
    x_init = gaussian_samples(20000, sigma + SIG_MAX**2 * eye, seed=200)
    x = annealed_langevin(_field(sigma, 0 * eye), x_init, levels, generator=_gen(201))
    assert_moments(x, torch.zeros(2, dtype=DT), target, bias=bias)


def test_annealed_langevin_bias_is_detected_on_coarse_grid():
    # negative control for the recursion used above: on a 20-level grid the EM chain's
    # covariance is visibly inflated and the sample shows it.
    sigma, eye = _gaussian_problem()
    levels = _geometric(20)
    em_cov = torch.from_numpy(_em_covariance(sigma.numpy(), levels))
    target = sigma + SIG_MIN**2 * eye
    assert float((em_cov - target).abs().max()) > 0.1
    x_init = gaussian_samples(20000, sigma + SIG_MAX**2 * eye, seed=210)
    x = annealed_langevin(_field(sigma, 0 * eye), x_init, levels, generator=_gen(211))
    assert_moments(x, torch.zeros(2, dtype=DT), em_cov)


def test_annealed_langevin_with_corrector_reaches_smoothed_gaussian():
    # corrector = ULA at the exact score with eps/(2 v_k) ~ snr^2 d / (v_k tr V^-1) <= snr^2 d,
    # so its stationary covariance is inflated by at most snr^2 d / (1 - snr^2 d) = 5.4 %
    # (d = 2, snr = 0.16): stated tolerance 4 SE + EM bias + 6 % of max |target|.
    sigma, eye = _gaussian_problem()
    levels = _geometric(300)
    target = sigma + SIG_MIN**2 * eye
    em_bias = float(np.abs(_em_covariance(sigma.numpy(), levels) - target.numpy()).max())
    x_init = gaussian_samples(20000, sigma + SIG_MAX**2 * eye, seed=220)
    x = annealed_langevin(_field(sigma, 0 * eye), x_init, levels, generator=_gen(221), corrector_steps=1)
    assert_moments(x, torch.zeros(2, dtype=DT), target, bias=em_bias + 0.06 * float(target.abs().max()))


def test_annealed_langevin_one_pc_step_by_hand():
    sigma, eye = _gaussian_problem()
    model = _field(sigma, random_antisymmetric(2, seed=5))
    calls = []

    def recording(x, s):
        calls.append(float(s))
        return model(x, s)

    x = torch.randn(6, 2, generator=_gen(230), dtype=DT)
    out = annealed_langevin(recording, x, [1.5, 0.7], generator=_gen(231), corrector_steps=2, snr=0.3)
    assert calls == [1.5, 0.7, 0.7]
    g = _gen(231)
    delta = 1.5**2 - 0.7**2
    xi = torch.randn(6, 2, generator=g, dtype=DT)
    y = x + delta * model(x, torch.tensor(1.5, dtype=DT)) + math.sqrt(delta) * xi
    for _ in range(2):
        z = torch.randn(6, 2, generator=g, dtype=DT)
        f = model(y, torch.tensor(0.7, dtype=DT))
        eps = 2 * (0.3 * z.norm(dim=1).mean() / f.norm(dim=1).mean()) ** 2
        y = y + eps * f + torch.sqrt(2 * eps) * z
    torch.testing.assert_close(out, y, rtol=1e-12, atol=1e-12)


def test_annealed_langevin_validates():
    x = torch.zeros(5, 2, dtype=DT)
    model = lambda x, s: -x  # noqa: E731
    for bad in ([1.0], [1.0, 1.0], [0.5, 1.0], [1.0, 0.0], [1.0, -0.5], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="sigmas"):
            annealed_langevin(model, x, bad)
    with pytest.raises(ValueError, match="shape"):
        annealed_langevin(lambda x, s: x[:, :1], x, [1.0, 0.5])
    with pytest.raises(ValueError, match="corrector_steps"):
        annealed_langevin(model, x, [1.0, 0.5], corrector_steps=-1)
    with pytest.raises(ValueError, match="snr"):
        annealed_langevin(model, x, [1.0, 0.5], snr=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        annealed_langevin(lambda x, s: 1e300 * (x + 1), x + 1, torch.tensor([10.0, 5.0, 1.0], dtype=DT))


# ------------------------------------------------------------------ probability flow
def _heun_map(sigma_np: np.ndarray, q_np: np.ndarray, levels: list[float], method: str = "heun") -> np.ndarray:
    """The flow of a linear field is linear: x_L = M x_1; M from the Euler/Heun recursion."""
    eye = np.eye(sigma_np.shape[0])
    m = eye.copy()
    for s, s_next in zip(levels[:-1], levels[1:]):
        h = s_next - s
        k_cur = s * (eye + q_np) @ np.linalg.inv(sigma_np + s**2 * eye)  # d(x, s) = k_cur x
        euler = eye + h * k_cur
        if method == "euler":
            step = euler
        else:
            k_next = s_next * (eye + q_np) @ np.linalg.inv(sigma_np + s_next**2 * eye)
            step = eye + 0.5 * h * (k_cur + k_next @ euler)
        m = step @ m
    return m


@pytest.mark.parametrize("q_scale", [0.0, 1.5])
def test_probability_flow_preserves_gaussian_marginals(q_scale):
    sigma, eye = _gaussian_problem()
    q = q_scale * torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=DT)
    levels = _geometric(400)
    v_init = sigma + SIG_MAX**2 * eye
    target = sigma + SIG_MIN**2 * eye
    m = _heun_map(sigma.numpy(), q.numpy(), levels)
    # Heun discretisation bias on the covariance (exact for this linear flow), stated bound 1e-3
    bias = float(np.abs(m @ v_init.numpy() @ m.T - target.numpy()).max())
    assert bias < 1e-3, bias
    x_init = gaussian_samples(20000, v_init, seed=300)
    x = probability_flow(_field(sigma, q), x_init, levels)
    np.testing.assert_allclose(x.numpy(), x_init.numpy() @ m.T, rtol=0, atol=1e-8)
    assert_moments(x, torch.zeros(2, dtype=DT), target, bias=bias)


def test_probability_flow_euler_and_final_zero():
    sigma, eye = _gaussian_problem()
    q = torch.tensor([[0.0, 0.8], [-0.8, 0.0]], dtype=DT)
    levels = _geometric(100)
    x_init = gaussian_samples(50, sigma + SIG_MAX**2 * eye, seed=310)
    x = probability_flow(_field(sigma, q), x_init, levels, method="euler")
    m = _heun_map(sigma.numpy(), q.numpy(), levels, method="euler")
    np.testing.assert_allclose(x.numpy(), x_init.numpy() @ m.T, rtol=0, atol=1e-8)
    # Heun converges faster than Euler (second vs first order)
    v_init, target = (sigma + SIG_MAX**2 * eye).numpy(), (sigma + SIG_MIN**2 * eye).numpy()
    m_heun = _heun_map(sigma.numpy(), q.numpy(), levels)
    err_euler = np.abs(m @ v_init @ m.T - target).max()
    err_heun = np.abs(m_heun @ v_init @ m_heun.T - target).max()
    assert err_heun < 0.1 * err_euler
    # a final sigma = 0 is allowed (Euler last step, the model is never called at 0)
    calls = []
    model = _field(sigma, q)

    def recording(x, s):
        calls.append(float(s))
        return model(x, s)

    probability_flow(recording, x_init, [2.0, 1.0, 0.0])
    assert 0.0 not in calls
    with pytest.raises(ValueError, match="method"):
        probability_flow(model, x_init, levels, method="rk4")
    with pytest.raises(ValueError, match="sigmas"):
        probability_flow(model, x_init, [1.0, 2.0, 1.5])


def _gauss_logp(cov: torch.Tensor):
    dist = torch.distributions.MultivariateNormal(torch.zeros(cov.shape[0], dtype=DT), covariance_matrix=cov)
    return dist.log_prob


@pytest.mark.parametrize("q_scale", [0.0, 1.5])
def test_probability_flow_nll_exact_and_unchanged_by_rotation(q_scale):
    sigma, eye = _gaussian_problem()
    q = q_scale * torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=DT)
    levels = _geometric(400)[::-1]  # increasing: data -> noise
    v_min, v_max = sigma + SIG_MIN**2 * eye, sigma + SIG_MAX**2 * eye
    x = gaussian_samples(200, v_min, seed=400)
    nll = probability_flow_nll(_field(sigma, q), x, levels, prior_logp=_gauss_logp(v_max))
    exact = -_gauss_logp(v_min)(x)
    assert nll.shape == (200,)
    # Heun error on this grid (measured 1.5e-4 for Q = 0, 1.2e-3 for Q = 1.5 J): stated bound
    # 2.5e-3 nats per point
    assert float((nll - exact).abs().max()) < 2.5e-3


def test_probability_flow_nll_hutchinson_unbiased():
    sigma, eye = _gaussian_problem()
    q = 1.5 * torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=DT)
    levels = _geometric(60)[::-1]
    v_min, v_max = sigma + SIG_MIN**2 * eye, sigma + SIG_MAX**2 * eye
    x = gaussian_samples(2000, v_min, seed=410)
    model = _field(sigma, q)
    exact = probability_flow_nll(model, x, levels, prior_logp=_gauss_logp(v_max))
    hutch = probability_flow_nll(model, x, levels, prior_logp=_gauss_logp(v_max), n_probes=1, generator=_gen(411))
    diff = hutch - exact
    assert float(diff.abs().max()) > 1e-3  # the probe noise is really there
    se = float(diff.std()) / math.sqrt(diff.numel())
    assert abs(float(diff.mean())) <= 4 * se, (float(diff.mean()), se)
    with pytest.raises(ValueError, match="increasing"):
        probability_flow_nll(model, x, levels[::-1])


def _shape_changes_after(calls: int):
    """A field that is fine for its first ``calls`` calls (its first step), then drops a column."""
    count = [0]

    def field(x, sigma=None):
        count[0] += 1
        return -x if count[0] <= calls else -x[:, :1]

    return field


@pytest.mark.parametrize(
    "run,first_step_calls",
    [
        (lambda f: langevin(f, torch.randn(5, 2), step_size=0.1, n_steps=3), 1),
        (lambda f: langevin(f, torch.randn(5, 2), step_size=0.1, n_steps=3, chunk_size=2), 3),
        (lambda f: annealed_langevin(f, torch.randn(5, 2), [1.0, 0.5, 0.2]), 1),
        (lambda f: annealed_langevin(f, torch.randn(5, 2), [1.0, 0.5, 0.2], corrector_steps=1), 2),
        (lambda f: probability_flow(f, torch.randn(5, 2), [1.0, 0.5, 0.2]), 2),
    ],
    ids=["langevin", "langevin-chunked", "annealed", "annealed-corrector", "probability-flow"],
)
def test_a_field_that_changes_shape_on_a_later_step_is_refused(run, first_step_calls):
    """Only the first step's output was validated; a (N, 1) output on a later step was
    broadcast into the (N, d) state silently."""
    with pytest.raises(ValueError, match=r"on a later step\) output has shape \(\d, 1\)"):
        run(_shape_changes_after(first_step_calls))
