"""Tests of ``fluxbench.targets`` against closed forms and Monte Carlo (SPEC section 4).

Statistical assertions fix their seeds and use a 4-standard-error band: under the null a
single two-sided comparison fails with probability 6.3e-5 (normal approximation).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from fluxbench.targets import (
    TRIANGLE_STD,
    Gaussian,
    GaussianMixture,
    Target,
    anisotropic_gaussian,
    eight_gaussians,
    list_targets,
    make_target,
    register_target,
    ring,
    standard_gaussian,
    triangle,
)
from fluxbench.targets import registry as registry_module

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_spd(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=F64)
    return a @ a.T / d + 0.3 * torch.eye(d, dtype=F64)


def random_gaussian(d: int, seed: int = 0) -> Gaussian:
    g = gen(seed)
    return Gaussian(torch.randn(d, generator=g, dtype=F64), random_spd(d, g))


def random_mixture(d: int, k: int = 3, seed: int = 0) -> GaussianMixture:
    g = gen(seed)
    weights = torch.rand(k, generator=g, dtype=F64) + 0.2
    means = 2.0 * torch.randn(k, d, generator=g, dtype=F64)
    covs = torch.stack([random_spd(d, g) for _ in range(k)])
    return GaussianMixture(weights, means, covs)


def random_isotropic_mixture(d: int, k: int = 4, seed: int = 0) -> GaussianMixture:
    g = gen(seed)
    weights = torch.rand(k, generator=g, dtype=F64) + 0.2
    means = 2.0 * torch.randn(k, d, generator=g, dtype=F64)
    stds = 0.3 + torch.rand(k, generator=g, dtype=F64)
    return GaussianMixture.isotropic(weights, means, stds)


def build(case: str) -> Target:
    """Targets by name: '<kind>_d<dim>' or a toy name."""
    toys = {"ring": lambda: ring(5, radius=1.5, std=0.3), "eight_gaussians": eight_gaussians, "triangle": triangle}
    if case in toys:
        return toys[case]()
    kind, d = case.rsplit("_d", 1)
    d = int(d)
    if kind == "gaussian":
        return random_gaussian(d)
    if kind == "isotropic":
        return Gaussian.isotropic(d, std=0.7, mean=torch.arange(d, dtype=F64))
    if kind == "anisotropic":
        return anisotropic_gaussian(d, condition_number=1.0 if d == 1 else 20.0, seed=3)
    if kind == "mixture":
        return random_mixture(d)
    if kind == "isomixture":
        return random_isotropic_mixture(d)
    if kind == "smoothedmixture":
        return random_mixture(d).smoothed(0.4)
    raise AssertionError(case)


ALL_CASES = [
    f"{kind}_d{d}"
    for kind in ["gaussian", "isotropic", "anisotropic", "mixture", "isomixture", "smoothedmixture"]
    for d in (1, 2, 5)
] + ["ring", "eight_gaussians", "triangle"]


def test_points(target: Target, seed: int = 1) -> torch.Tensor:
    """Samples of the target plus far-out points (tails, where responsibilities are extreme)."""
    g = gen(seed)
    near = target.sample(64, generator=g, dtype=F64)
    scale = float(target.covariance.diagonal().sqrt().max())
    far = target.mean + 6.0 * scale * torch.randn(16, target.dim, generator=g, dtype=F64)
    return torch.cat([near, far])


test_points.__test__ = False  # a helper, not a test


# --------------------------------------------------------------------- exactness
@pytest.mark.parametrize("case", ALL_CASES)
def test_score_equals_autograd_of_log_prob(case: str) -> None:
    """s = grad log p to 1e-10 relative (absolute floor 1e-12 for components near 0), float64."""
    target = build(case)
    x = test_points(target).requires_grad_(True)
    (grad,) = torch.autograd.grad(target.log_prob(x).sum(), x)
    s = target.score(x.detach())
    assert s.shape == x.shape and s.dtype == F64
    torch.testing.assert_close(s, grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d", [1, 2, 5])
def test_gaussian_log_prob_matches_torch_distributions(d: int) -> None:
    """log_prob of Gaussian and of its smoothing equals MultivariateNormal to 1e-10."""
    target = random_gaussian(d, seed=d)
    x = test_points(target)
    ref = MultivariateNormal(target.mean, covariance_matrix=target.covariance)
    torch.testing.assert_close(target.log_prob(x), ref.log_prob(x), rtol=1e-10, atol=1e-12)
    sigma = 0.7
    ref_s = MultivariateNormal(target.mean, covariance_matrix=target.covariance + sigma**2 * torch.eye(d, dtype=F64))
    torch.testing.assert_close(target.smoothed(sigma).log_prob(x), ref_s.log_prob(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(target.precision @ target.covariance, torch.eye(d, dtype=F64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("d", [1, 2, 5])
def test_mixture_log_prob_matches_mixture_same_family(d: int) -> None:
    """log_prob and responsibilities of GaussianMixture equal MixtureSameFamily to 1e-10."""
    target = random_mixture(d, k=4, seed=10 + d)
    x = test_points(target)
    comps = MultivariateNormal(target.means, covariance_matrix=target.covariances)
    ref = MixtureSameFamily(Categorical(probs=target.weights), comps)
    torch.testing.assert_close(target.log_prob(x), ref.log_prob(x), rtol=1e-10, atol=1e-12)
    sigma = 0.5
    comps_s = MultivariateNormal(target.means, covariance_matrix=target.covariances + sigma**2 * torch.eye(d, dtype=F64))
    ref_s = MixtureSameFamily(Categorical(probs=target.weights), comps_s)
    torch.testing.assert_close(target.smoothed(sigma).log_prob(x), ref_s.log_prob(x), rtol=1e-10, atol=1e-12)
    # r_k = w_k N_k(x) / p(x)
    log_joint = comps.log_prob(x.unsqueeze(1)) + target.weights.log()
    ref_r = torch.softmax(log_joint, dim=1)
    torch.testing.assert_close(target.responsibilities(x), ref_r, rtol=1e-10, atol=1e-14)


def test_mixture_weights_are_normalised_and_isotropic_matches_full() -> None:
    means = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=F64)
    iso = GaussianMixture.isotropic([1.0, 3.0], means, [0.5, 2.0])
    full = GaussianMixture([2.0, 6.0], means, torch.stack([0.25 * torch.eye(2), 4.0 * torch.eye(2)]))
    torch.testing.assert_close(iso.weights, torch.tensor([0.25, 0.75], dtype=F64), rtol=0, atol=1e-15)
    x = test_points(full)
    torch.testing.assert_close(iso.log_prob(x), full.log_prob(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(iso.score(x), full.score(x), rtol=1e-12, atol=1e-12)


def test_single_component_mixture_equals_gaussian() -> None:
    g = random_gaussian(3, seed=4)
    mix = GaussianMixture([1.0], g.mean[None], g.covariance[None])
    x = test_points(g)
    torch.testing.assert_close(mix.log_prob(x), g.log_prob(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mix.score(x), g.score(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mix.covariance, g.covariance, rtol=1e-14, atol=0)


def test_smoothed_score_is_score_of_smoothed_target() -> None:
    target = random_mixture(2, seed=5)
    x = test_points(target)
    torch.testing.assert_close(target.smoothed_score(x, 0.3), target.smoothed(0.3).score(x), rtol=0, atol=0)
    torch.testing.assert_close(target.smoothed_score(x, torch.tensor(0.3, dtype=F64)), target.smoothed(0.3).score(x), rtol=0, atol=0)


# --------------------------------------------------------------------- Monte Carlo
@pytest.mark.parametrize("case", ["gaussian_d2", "mixture_d2", "mixture_d1", "ring", "triangle"])
def test_smoothed_matches_monte_carlo_convolution(case: str) -> None:
    """p_sigma(x) = E_z[p(x - sigma z)], z ~ N(0, I): MC mean of n = 40000 draws within 4 SE.

    SE = sample std of p(x - sigma z) / sqrt(n), computed per point.
    """
    target = build(case)
    sigma = 0.35
    n = 40_000
    x = target.smoothed(sigma).sample(6, generator=gen(20), dtype=F64)
    x = torch.cat([x, target.mean[None] + 0.5])  # plus one point between the modes
    z = torch.randn(n, target.dim, generator=gen(21), dtype=F64)
    shifted = (x[:, None, :] - sigma * z[None, :, :]).reshape(-1, target.dim)
    vals = target.log_prob(shifted).exp().reshape(len(x), n)
    mc = vals.mean(dim=1)
    se = vals.std(dim=1) / math.sqrt(n)
    exact = target.smoothed(sigma).log_prob(x).exp()
    assert bool((se > 0).all())
    z_scores = (mc - exact) / se
    assert bool((z_scores.abs() < 4).all()), f"MC z-scores {z_scores.tolist()}"


MOMENT_CASES = ["gaussian_d5", "anisotropic_d5", "isotropic_d2", "mixture_d5", "isomixture_d2", "ring",
                "eight_gaussians", "triangle"]


@pytest.mark.parametrize("case", MOMENT_CASES)
def test_sample_moments(case: str) -> None:
    """Mean and covariance of n = 20000 samples within 4 standard errors of the exact moments.

    Mean: SE_i = sqrt(Sigma_ii / n). Covariance: the estimator
    S_hat = (1/n) sum (x - m)(x - m)^T with the exact mean m is unbiased with
    Var(S_hat_ij) = Var((x_i - m_i)(x_j - m_j)) / n. For Gaussians that is exactly
    (Sigma_ii Sigma_jj + Sigma_ij^2) / n (Isserlis); for mixtures (not Gaussian) it is
    estimated from the samples (empirical fourth moment).
    """
    target = build(case)
    n = 20_000
    x = target.sample(n, generator=gen(30), dtype=F64)
    assert x.shape == (n, target.dim) and x.dtype == F64
    m, cov = target.mean, target.covariance
    se_mean = (cov.diagonal() / n).sqrt()
    assert bool(((x.mean(0) - m).abs() < 4 * se_mean).all()), ((x.mean(0) - m) / se_mean).tolist()
    c = x - m
    prods = c[:, :, None] * c[:, None, :]  # (n, d, d)
    cov_hat = prods.mean(0)
    if isinstance(target, Gaussian):
        se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    else:
        se_cov = prods.std(0) / math.sqrt(n)
    assert bool(((cov_hat - cov).abs() < 4 * se_cov).all()), ((cov_hat - cov) / se_cov).tolist()


@pytest.mark.parametrize("case", ["mixture_d2", "isomixture_d2", "ring", "triangle"])
def test_mixture_component_frequencies(case: str) -> None:
    """Label counts within 4 binomial SEs sqrt(n w (1 - w)) of n w; labels match the draws."""
    target = build(case)
    n = 20_000
    x, labels = target.sample_with_components(n, generator=gen(40), dtype=F64)
    counts = torch.bincount(labels, minlength=target.n_components).to(F64)
    w = target.weights
    se = (n * w * (1 - w)).sqrt()
    assert bool(((counts - n * w).abs() < 4 * se).all()), ((counts - n * w) / se).tolist()
    # the same generator state gives the same points through sample()
    assert torch.equal(target.sample(n, generator=gen(40), dtype=F64), x)
    # each point comes from its label's Gaussian: whitened residuals are N(0, I), so
    # their squared norms average d (SE sqrt(2 d / n_k) per component)
    for k in range(target.n_components):
        comp = target.component(k)
        xk = x[labels == k]
        y = torch.linalg.solve_triangular(comp.scale_tril, (xk - comp.mean).T, upper=False)
        sq = y.square().sum(0)
        d = target.dim
        assert abs(float(sq.mean()) - d) < 4 * math.sqrt(2 * d / len(xk))


def test_ring_responsibilities_recover_labels() -> None:
    """Well-separated modes: argmax responsibility equals the true label for > 99.9% of draws."""
    target = ring(8, radius=4.0, std=0.2)
    x, labels = target.sample_with_components(5000, generator=gen(41), dtype=F64)
    r = target.responsibilities(x)
    torch.testing.assert_close(r.sum(1), torch.ones(len(x), dtype=F64), rtol=0, atol=1e-12)
    assert float((r.argmax(1) == labels).to(F64).mean()) > 0.999


# --------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("case", ["gaussian_d5", "mixture_d2", "ring", "anisotropic_d5"])
def test_same_seed_same_samples(case: str) -> None:
    target = build(case)
    a = target.sample(500, generator=gen(7))
    b = target.sample(500, generator=gen(7))
    c = target.sample(500, generator=gen(8))
    assert a.dtype == torch.get_default_dtype() and a.device.type == "cpu"
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(target.sample(500, generator=gen(7), dtype=F64), target.sample(500, generator=gen(7), dtype=F64))


def test_anisotropic_gaussian_condition_number_and_seed() -> None:
    for dim, kappa in [(2, 10.0), (5, 100.0), (8, 3.0)]:
        target = anisotropic_gaussian(dim, condition_number=kappa, seed=11)
        eig = torch.linalg.eigvalsh(target.covariance)
        torch.testing.assert_close(eig[-1] / eig[0], torch.tensor(kappa, dtype=F64), rtol=1e-10, atol=0)
        torch.testing.assert_close(eig[-1], torch.tensor(1.0, dtype=F64), rtol=1e-12, atol=0)
        # log-spaced: consecutive eigenvalue ratios are all equal
        ratios = eig[1:] / eig[:-1]
        torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios), rtol=1e-10, atol=0)
    a = anisotropic_gaussian(4, seed=1).covariance
    assert torch.equal(a, anisotropic_gaussian(4, seed=1).covariance)
    assert torch.equal(a, anisotropic_gaussian(4, generator=gen(1)).covariance)
    assert not torch.equal(a, anisotropic_gaussian(4, seed=2).covariance)
    assert not torch.allclose(a, torch.diag(a.diagonal()))  # actually rotated


def test_toy_geometry() -> None:
    tri = triangle()
    angles = torch.rad2deg(torch.atan2(tri.means[:, 1], tri.means[:, 0])) % 360
    torch.testing.assert_close(angles, torch.tensor([90.0, 210.0, 330.0], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(tri.means.norm(dim=1), torch.full((3,), 2.3, dtype=F64), rtol=1e-14, atol=0)
    expected_cov = (0.65**2 + 0.45**2) * torch.eye(2, dtype=F64).expand(3, 2, 2)
    torch.testing.assert_close(tri.covariances, expected_cov, rtol=1e-14, atol=0)
    assert TRIANGLE_STD == pytest.approx(math.sqrt(0.65**2 + 0.45**2), rel=1e-15)
    eg = eight_gaussians()
    angles = torch.rad2deg(torch.atan2(eg.means[:, 1], eg.means[:, 0])) % 360
    torch.testing.assert_close(torch.sort(angles).values, 45.0 * torch.arange(8, dtype=F64), rtol=0, atol=1e-9)
    torch.testing.assert_close(eg.means.norm(dim=1), torch.full((8,), 2.0, dtype=F64), rtol=1e-14, atol=0)
    torch.testing.assert_close(eg.weights, torch.full((8,), 0.125, dtype=F64), rtol=0, atol=0)
    r = ring(6, radius=3.0, std=0.1)
    assert r.n_components == 6 and r.dim == 2
    torch.testing.assert_close(r.mean, torch.zeros(2, dtype=F64), rtol=0, atol=1e-14)
    # law of total covariance for a symmetric ring: (std^2 + radius^2 / 2) I
    torch.testing.assert_close(r.covariance, (0.01 + 4.5) * torch.eye(2, dtype=F64), rtol=1e-13, atol=1e-13)
    sg = standard_gaussian(3)
    torch.testing.assert_close(sg.covariance, torch.eye(3, dtype=F64), rtol=0, atol=0)


# --------------------------------------------------------------------- registry
def test_registry_builds_every_required_name() -> None:
    names = list_targets()
    for required in ["gaussian", "anisotropic_gaussian", "mixture", "ring", "eight_gaussians", "triangle"]:
        assert required in names
    g = make_target("gaussian", dim=3, std=0.5)
    assert isinstance(g, Gaussian)
    torch.testing.assert_close(g.covariance, 0.25 * torch.eye(3, dtype=F64), rtol=0, atol=0)
    assert isinstance(make_target("anisotropic_gaussian", dim=4, condition_number=5.0), Gaussian)
    mix = make_target("mixture", weights=[1, 1], means=[[0.0, 0.0], [1.0, 1.0]], stds=[0.5, 1.0])
    assert isinstance(mix, GaussianMixture) and mix.n_components == 2
    full = make_target("mixture", weights=[1.0], means=[[0.0]], covariances=[[[2.0]]])
    torch.testing.assert_close(full.covariance, torch.tensor([[2.0]], dtype=F64), rtol=0, atol=0)
    assert make_target("ring", n_modes=5).n_components == 5
    assert make_target("eight_gaussians").n_components == 8
    assert make_target("triangle").n_components == 3


def test_register_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    register_target("my_target", lambda scale=1.0: Gaussian.isotropic(2, std=scale))
    assert "my_target" in list_targets()
    assert make_target("my_target", scale=2.0).covariance[0, 0] == 4.0
    with pytest.raises(ValueError, match="'my_target' is already registered"):
        register_target("my_target", standard_gaussian)
    with pytest.raises(ValueError, match="'ring' is already registered"):
        register_target("ring", ring)
    with pytest.raises(ValueError, match="must be callable"):
        register_target("other", 3)


# --------------------------------------------------------------------- dtype / device
@pytest.mark.parametrize("case", ["gaussian_d5", "mixture_d2", "ring", "triangle", "anisotropic_d5"])
def test_float32_agrees_with_float64(case: str) -> None:
    """float32 log_prob within 1e-5 relative of float64 (absolute floor 1e-6 near log p = 0)."""
    target = build(case)
    t32 = target.to(dtype=torch.float32)
    assert t32.dtype == torch.float32 and t32.mean.dtype == torch.float32
    x64 = target.sample(256, generator=gen(50), dtype=F64)
    lp64 = target.log_prob(x64)
    lp32 = t32.log_prob(x64.float())
    assert lp32.dtype == torch.float32
    torch.testing.assert_close(lp32.double(), lp64, rtol=1e-5, atol=1e-6)
    # a float64 target casts on use: float32 input gives a float32 result
    assert target.log_prob(x64.float()).dtype == torch.float32
    torch.testing.assert_close(target.log_prob(x64.float()).double(), lp64, rtol=1e-5, atol=1e-6)
    s32 = t32.score(x64.float())
    assert s32.dtype == torch.float32
    s64 = target.score(x64)
    torch.testing.assert_close(s32.double(), s64, rtol=1e-4, atol=1e-4 * float(s64.abs().max()))
    assert t32.smoothed(0.5).dtype == torch.float32
    assert t32.to(dtype=F64).dtype == F64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_roundtrip() -> None:
    target = random_mixture(3).to(device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = target.sample(1000, generator=g, dtype=F64)
    assert x.device.type == "cuda"
    cpu = random_mixture(3)
    torch.testing.assert_close(target.log_prob(x).cpu(), cpu.log_prob(x.cpu()), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(target.score(x).cpu(), cpu.score(x.cpu()), rtol=1e-10, atol=1e-12)
    # a cpu target evaluates cuda points on cuda
    assert cpu.score(x).device.type == "cuda"
    with pytest.raises(ValueError, match="generator is on device"):
        target.sample(10, generator=gen(0))


# --------------------------------------------------------------------- bad input
def test_bad_points_are_rejected() -> None:
    target = random_mixture(2)
    gauss = random_gaussian(2)
    for t in (target, gauss):
        for fn in (t.log_prob, t.score):
            with pytest.raises(ValueError, match=r"must have d = 2 columns"):
                fn(torch.zeros(4, 3, dtype=F64))
            with pytest.raises(ValueError, match=r"shape \(N, d\)"):
                fn(torch.zeros(4, dtype=F64))
            with pytest.raises(ValueError, match="1 NaN"):
                fn(torch.tensor([[0.0, float("nan")]], dtype=F64))
            with pytest.raises(ValueError, match="empty batch"):
                fn(torch.zeros(0, 2, dtype=F64))
            with pytest.raises(ValueError, match="floating dtype"):
                fn(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="1 NaN"):
        target.responsibilities(torch.tensor([[float("nan"), 0.0]], dtype=F64))


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="positive definite; its smallest eigenvalue is -1"):
        Gaussian([0.0, 0.0], [[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(ValueError, match="covariance must be symmetric"):
        Gaussian([0.0, 0.0], [[1.0, 0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"covariance must have shape \(d, d\) = \(2, 2\)"):
        Gaussian([0.0, 0.0], torch.eye(3))
    with pytest.raises(ValueError, match=r"mean must have shape \(d,\)"):
        Gaussian(torch.zeros(2, 2), torch.eye(2))
    with pytest.raises(ValueError, match="covariance contains NaN"):
        Gaussian([0.0], [[float("nan")]])
    means = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="weights must all be > 0"):
        GaussianMixture([0.5, -0.5], means, torch.eye(2).expand(2, 2, 2))
    with pytest.raises(ValueError, match="weights must all be > 0"):
        GaussianMixture.isotropic([1.0, 0.0], means, 1.0)
    with pytest.raises(ValueError, match=r"positive definite \(component 1\)"):
        GaussianMixture([1.0, 1.0], means, torch.stack([torch.eye(2), -torch.eye(2)]))
    with pytest.raises(ValueError, match=r"means must have shape \(K, d\) with K = 3"):
        GaussianMixture([1.0, 1.0, 1.0], means, torch.eye(2).expand(2, 2, 2))
    with pytest.raises(ValueError, match=r"covariances must have shape \(K, d, d\)"):
        GaussianMixture([1.0, 1.0], means, torch.eye(2))
    with pytest.raises(ValueError, match="stds must all be > 0"):
        GaussianMixture.isotropic([1.0, 1.0], means, [1.0, -1.0])
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        Gaussian.isotropic(2, std=0.0)
    with pytest.raises(ValueError, match="condition_number must be >= 1"):
        anisotropic_gaussian(3, condition_number=0.5)
    with pytest.raises(ValueError, match="must be 1 when dim = 1"):
        anisotropic_gaussian(1, condition_number=4.0)
    with pytest.raises(ValueError, match="either seed or generator"):
        anisotropic_gaussian(3, seed=1, generator=gen(1))


@pytest.mark.parametrize("bad_sigma", [0.0, -1.0, float("nan"), float("inf"), torch.tensor(-0.5)])
def test_bad_sigma_is_rejected(bad_sigma: object) -> None:
    for target in (random_gaussian(2), random_mixture(2)):
        with pytest.raises(ValueError, match="sigma must be a finite standard deviation > 0"):
            target.smoothed(bad_sigma)
        with pytest.raises(ValueError, match="sigma must be a finite standard deviation > 0"):
            target.smoothed_score(torch.zeros(1, 2, dtype=F64), bad_sigma)


def test_bad_sample_arguments_are_rejected() -> None:
    for target in (random_gaussian(2), random_mixture(2)):
        with pytest.raises(ValueError, match="n must be >= 1; got 0"):
            target.sample(0)
        with pytest.raises(ValueError, match="n must be an integer"):
            target.sample(2.5)
        with pytest.raises(ValueError, match="dtype must be a floating"):
            target.sample(3, dtype=torch.int64)
        with pytest.raises(ValueError, match="generator must be a torch.Generator"):
            target.sample(3, generator=0)
    with pytest.raises(ValueError, match="dtype must be a floating"):
        random_gaussian(2).to(dtype=torch.int32)


def test_bad_registry_use_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown target 'moons'; known targets: .*eight_gaussians.*triangle"):
        make_target("moons")
    with pytest.raises(ValueError, match="bad arguments for target 'ring'"):
        make_target("ring", n_mode=3)
    with pytest.raises(ValueError, match="exactly one of stds"):
        make_target("mixture", weights=[1.0], means=[[0.0]])
    with pytest.raises(ValueError, match="exactly one of stds"):
        make_target("mixture", weights=[1.0], means=[[0.0]], stds=1.0, covariances=[[[1.0]]])
    with pytest.raises(ValueError, match="n_modes must be >= 1"):
        make_target("ring", n_modes=0)


def test_repr_is_readable() -> None:
    assert repr(triangle()).startswith("GaussianMixture(K=3, dim=2, weights=[0.3333, 0.3333, 0.3333]")
    assert "stds=[0.7906, 0.7906, 0.7906]" in repr(triangle())
    assert repr(Gaussian.isotropic(2)) == "Gaussian(dim=2, mean=[0, 0], covariance=[[1, 0], [0, 1]])"
    assert "covariance eigenvalues in [0.1, 1]" in repr(anisotropic_gaussian(6))
