"""Fields: the stationary family of SPEC eq. (4), neural fields, divergences."""

from __future__ import annotations

import pytest
import torch

from fluxbench.divergence import divergence, jacobian, matrix_divergence
from fluxbench.fields import (
    ConservativeField,
    ConstantAntisymmetric,
    LearnedAntisymmetric,
    MLPField,
    RotationalField,
    ScalarAntisymmetric,
    antisymmetric_basis,
    at_sigma,
)
from fluxbench.targets import Gaussian, GaussianMixture

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _defect(field, score, x):
    """r = div u + u . s (SPEC eq. (3)) by brute-force autograd."""
    u = lambda z: field(z) - score(z)  # noqa: E731
    return divergence(u, x) + (u(x) * score(x)).sum(1)


def _gaussian(d, seed):
    g = gen(seed)
    a = torch.randn(d, d, generator=g, dtype=F64)
    return Gaussian(torch.randn(d, generator=g, dtype=F64), a @ a.T + 0.5 * torch.eye(d, dtype=F64))


def _mixture(seed):
    g = gen(seed)
    return GaussianMixture.isotropic(
        torch.tensor([0.2, 0.5, 0.3], dtype=F64), 2 * torch.randn(3, 2, generator=g, dtype=F64), torch.tensor([0.5, 0.8, 0.6], dtype=F64)
    )


def _antisymmetric(d, seed):
    a = torch.randn(d, d, generator=gen(seed), dtype=F64)
    return a - a.T


@pytest.mark.parametrize("d", [2, 3, 5])
def test_constant_rotation_is_stationary(d):
    target = _gaussian(d, d)
    field = RotationalField(target.score, _antisymmetric(d, 1))
    x = target.sample(50, generator=gen(2), dtype=F64)
    assert float(_defect(field, target.score, x).detach().abs().max()) < 1e-9


@pytest.mark.parametrize("target_fn", [lambda: _gaussian(2, 0), lambda: _mixture(1)])
def test_nonconstant_rotation_is_stationary(target_fn):
    target = target_fn()
    j = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=F64)
    a = ScalarAntisymmetric(lambda z: 2.0 * torch.exp(-0.5 * z.square().sum(1)), j)
    field = RotationalField(target.score, a)
    x = target.sample(60, generator=gen(3), dtype=F64)
    r = _defect(field, target.score, x)
    assert float(r.abs().max()) < 1e-9
    # without the div A term the field is not stationary: the check can fail
    broken = lambda z: target.score(z) + a.apply(z, target.score(z))  # noqa: E731
    assert float(_defect(broken, target.score, x).abs().max()) > 1e-2


def test_learned_antisymmetric_is_stationary_and_divergence_exact():
    torch.manual_seed(0)
    target = _gaussian(3, 4)
    a = LearnedAntisymmetric(3, hidden=(16,)).double()
    x = target.sample(20, generator=gen(5), dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda z: a(z).sum(0), x)  # (3, 3, N, 3)
    brute = torch.stack([sum(jac[i, j, :, j] for j in range(3)) for i in range(3)], dim=1)
    assert torch.allclose(a.divergence(x), brute, atol=1e-12)
    assert torch.allclose(matrix_divergence(a, x), brute, atol=1e-12)
    field = RotationalField(target.score, a)
    assert float(_defect(field, target.score, x).detach().abs().max()) < 1e-9
    matrices = a(x)
    assert torch.allclose(matrices, -matrices.transpose(1, 2))


def test_learned_rotation_trains_through_div_a():
    a = LearnedAntisymmetric(2, hidden=(8,)).double()
    target = _gaussian(2, 6)
    field = RotationalField(target.score, a)
    x = target.sample(10, generator=gen(7), dtype=F64)
    field(x).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in a.parameters())


def test_symmetric_error_is_not_stationary():
    target = _gaussian(2, 8)
    x = target.sample(100, generator=gen(9), dtype=F64)
    r = _defect(lambda z: 0.9 * target.score(z), target.score, x)
    assert float(r.square().mean().sqrt()) > 0.05


def test_antisymmetric_validation_and_basis():
    with pytest.raises(ValueError, match="not antisymmetric"):
        ConstantAntisymmetric(torch.eye(2))
    with pytest.raises(ValueError, match="square"):
        ConstantAntisymmetric(torch.zeros(2, 3))
    basis = antisymmetric_basis(4)
    assert basis.shape == (6, 4, 4)
    assert torch.equal(basis, -basis.transpose(1, 2))
    learnable = ConstantAntisymmetric(_antisymmetric(3, 0), learnable=True)
    m = learnable.matrix(torch.zeros(1, 3, dtype=F64))
    assert torch.allclose(m, _antisymmetric(3, 0).to(m.dtype))


def test_conservative_field_has_symmetric_jacobian():
    torch.manual_seed(1)
    field = ConservativeField(3, hidden=(16,)).double()
    x = torch.randn(7, 3, dtype=F64)
    jac = jacobian(field, x)
    assert torch.allclose(jac, jac.transpose(1, 2), atol=1e-12)


def test_mlp_field_shapes_and_sigma_conditioning():
    f = MLPField(3)
    x = torch.randn(5, 3)
    assert f(x).shape == (5, 3)
    fc = MLPField(3, sigma_conditioned=True)
    assert fc(x, 0.5).shape == (5, 3)
    assert at_sigma(fc, 0.5)(x).shape == (5, 3)
    assert torch.equal(at_sigma(fc, 0.5)(x), fc(x, torch.tensor(0.5)))
    assert at_sigma(f, 0.5) is f  # unconditioned models pass through
    # the conditioned output is net(x, log sigma) / sigma: scaling sigma rescales the output
    with torch.no_grad():
        ratio = fc(x, 0.25) * 0.25 / (fc.net(torch.cat([x, torch.full((5, 1), 0.25).log()], 1)))
    assert torch.allclose(ratio, torch.ones_like(ratio))
    with pytest.raises(ValueError, match="sigma-conditioned"):
        fc(x)
    with pytest.raises(ValueError, match="d = 3"):
        f(torch.randn(5, 2))
    with pytest.raises(ValueError, match="sigma"):
        at_sigma(fc, -1.0)


def test_divergence_methods_agree_in_expectation():
    torch.manual_seed(2)
    f = MLPField(4, hidden=(16,)).double()
    x = torch.randn(3, 4, dtype=F64)
    exact = divergence(f, x)
    jac = jacobian(f, x)
    assert torch.allclose(exact, jac.diagonal(dim1=1, dim2=2).sum(1))
    g = gen(3)
    est = torch.stack([divergence(f, x, method="hutchinson", generator=g) for _ in range(4000)])
    se = est.std(0) / 4000**0.5
    assert ((est.mean(0) - exact).abs() < 4 * se + 1e-12).all()
    with pytest.raises(ValueError, match="method"):
        divergence(f, x, method="nope")


def _autograd_pullback(field, x, probe, s):
    """grad_x [s . f(x) + probe^T J_f(x) probe] by double backward (the generic path)."""
    x = x.detach().requires_grad_(True)
    f = field(x)
    (vjp,) = torch.autograd.grad(f, x, probe, create_graph=True)
    (g,) = torch.autograd.grad((f * s).sum() + (vjp * probe).sum(), x)
    return f.detach(), g


@pytest.mark.parametrize("activation", [torch.nn.SiLU, torch.nn.Tanh])
@pytest.mark.parametrize("hidden", [(), (16,), (16, 8, 12)])
@pytest.mark.parametrize("conditioned", [False, True])
def test_mlp_defect_pullback_matches_double_backward(activation, hidden, conditioned):
    """The closed-form pullback of MLPField (SPEC section 2, steps 3-4) is autograd's double
    backward to float64 rounding, for every depth, both activations, with and without sigma."""
    torch.manual_seed(0)
    model = MLPField(3, hidden=hidden, activation=activation, sigma_conditioned=conditioned).double()
    field = at_sigma(model, 0.7)
    g = gen(1)
    x = torch.randn(40, 3, generator=g, dtype=F64)
    probe = torch.randint(0, 2, (40, 3), generator=g).to(F64) * 2 - 1
    s = torch.randn(40, 3, generator=g, dtype=F64)
    f_ref, g_ref = _autograd_pullback(field, x, probe, s)
    with torch.no_grad():
        f, pullback = field.defect_pullback(x, probe)
        out = pullback(s)
    assert torch.allclose(f, f_ref, rtol=1e-12, atol=1e-12)
    assert float((out - g_ref).abs().max()) <= 1e-12 * float(g_ref.abs().max())


def test_mlp_defect_pullback_declines_what_it_does_not_cover():
    """Other activations, an overridden forward or a forward hook: None (callers use autograd)."""
    x, probe = torch.randn(5, 2), torch.ones(5, 2)
    assert MLPField(2, activation=torch.nn.ReLU).defect_pullback(x, probe) is None

    class Shifted(MLPField):
        def forward(self, x, sigma=None):
            return super().forward(x, sigma) + 1

    assert Shifted(2).defect_pullback(x, probe) is None
    hooked = MLPField(2)
    hooked.net[0].register_forward_hook(lambda mod, inp, out: out * 2)
    assert hooked.defect_pullback(x, probe) is None
    # a plain callable or a model without the method: at_sigma says None too
    assert at_sigma(ConservativeField(2, sigma_conditioned=True), 0.5).defect_pullback(x, probe) is None


def test_mlp_defect_pullback_is_used_once():
    model = MLPField(2)
    x, probe = torch.randn(5, 2), torch.ones(5, 2)
    with torch.no_grad():
        _, pullback = model.defect_pullback(x, probe)
        pullback(torch.ones(5, 2))
        with pytest.raises(RuntimeError, match="already used"):
            pullback(torch.ones(5, 2))
