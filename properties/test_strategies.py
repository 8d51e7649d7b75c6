"""fluxbench.strategies draws what its docstrings promise."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from fluxbench import strategies as fst
from fluxbench.fields import RotationalField
from fluxbench.targets import Gaussian, GaussianMixture

from ._helpers import F64, examples


@given(fst.dims(1, 5).flatmap(lambda d: fst.antisymmetric_matrices(d, max_norm=3.0)))
def test_antisymmetric_matrices(a):
    assert a.dtype == F64 and a.shape[0] == a.shape[1]
    assert torch.equal(a, -a.T)
    assert float(torch.linalg.matrix_norm(a)) <= 3.0 * (1 + 1e-12)


@given(fst.dims(1, 5).flatmap(lambda d: fst.symmetric_matrices(d, max_norm=2.0)))
def test_symmetric_matrices(e):
    assert torch.equal(e, e.T)
    assert float(torch.linalg.matrix_norm(e)) <= 2.0 * (1 + 1e-12)


@given(fst.dims(1, 5).flatmap(fst.orthogonal_matrices))
def test_orthogonal_matrices(q):
    eye = torch.eye(q.shape[0], dtype=F64)
    assert float((q.T @ q - eye).abs().max()) < 1e-13


@given(fst.dims(1, 5), st.floats(1.0, 100.0), st.data())
def test_spd_matrices_condition_bound(d, kappa, data):
    s = data.draw(fst.spd_matrices(d, kappa, scale=(0.5, 2.0)))
    assert torch.equal(s, s.T)
    lam = torch.linalg.eigvalsh(s)
    assert float(lam[0]) > 0
    assert float(lam[-1]) <= 2.0 * (1 + 1e-10)
    assert float(lam[-1] / lam[0]) <= kappa * (1 + 1e-9)


@given(st.floats(0.01, 1.0), st.floats(1.0, 10.0), st.data())
def test_noise_levels_in_range(lo, hi, data):
    sigma = data.draw(fst.noise_levels(lo, hi))
    assert lo <= sigma <= hi


@given(fst.gaussian_targets(fst.dims(1, 4)))
def test_gaussian_targets_are_valid(p):
    assert isinstance(p, Gaussian) and p.dtype == F64
    x = p.sample(5, generator=fst.generator(0), dtype=F64)
    assert torch.isfinite(p.score(x)).all() and torch.isfinite(p.log_prob(x)).all()


@given(fst.mixture_targets(fst.dims(1, 3), max_components=4))
def test_mixture_targets_are_valid(p):
    assert isinstance(p, GaussianMixture) and 1 <= p.n_components <= 4
    assert math.isclose(float(p._weights.sum()), 1.0, rel_tol=1e-12)
    x = p.sample(5, generator=fst.generator(0), dtype=F64)
    assert torch.isfinite(p.score(x)).all()


@examples(1.5)
@given(fst.mixture_targets(fst.dims(1, 3)).flatmap(fst.rotational_fields))
def test_rotational_fields_evaluate_and_describe_themselves(field):
    assert isinstance(field, RotationalField)
    assert "kind=" in repr(field)
    d = field.antisymmetric.dim
    x = torch.randn(7, d, dtype=F64, generator=fst.generator(1))
    f = field(x)
    assert f.shape == x.shape and f.dtype == F64 and torch.isfinite(f).all()
