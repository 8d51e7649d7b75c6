"""fluxbench.verify against SPEC sections 1 and 5 (skipped until fluxbench.verify provides
``defect``, ``current_divergence``, ``stein_kernel`` and ``ksd2``).

* defect / current_divergence: agree with the defect computed from the library's exact
  divergence (``test_stationarity``), vanish for fields of form (4), and satisfy the
  by-parts identity E_p[r phi] = ||E||_F^2 for a symmetric error u = E s (by quadrature);
* stein_kernel: equals the SPEC formula (itself checked against autograd in test_stein);
* ksd2: equals the reference U-statistic, and its population value is unchanged by adding
  a rotation: it is 0 for the score and for score + rotation (mean over 30 independent
  samples within 4 SE of 0), and more than 4 SE above 0 for a symmetric error.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fluxbench import strategies as fst

from ._helpers import F64, Z, assert_mean, examples, gen, ksd_u_statistic, stein_kernel_formula, with_norm_at_least
from .test_stationarity import (
    QUADRATURE_RTOL,
    SMOOTH_TARGETS,
    TARGETS,
    _defect_terms,
    _symmetric_error_field,
    symmetric_error_margin,
)

verify = pytest.importorskip("fluxbench.verify")
_MISSING = [name for name in ("defect", "current_divergence", "stein_kernel", "ksd2") if not hasattr(verify, name)]
if _MISSING:
    pytest.skip(f"fluxbench.verify does not provide {_MISSING} yet", allow_module_level=True)


@examples(1.0)
@given(TARGETS.flatmap(lambda t: st.tuples(st.just(t), fst.rotational_fields(t))), fst.seeds())
def test_defect_and_current_divergence_vanish_for_rotational_fields(target_field, seed):
    """verify.defect and verify.current_divergence: 0 for fields of form (4) (tolerance as in
    test_stationarity: 1e-9 times the scale of the cancelling terms)."""
    target, field = target_field
    x = target.sample(64, generator=gen(seed), dtype=F64)
    r_ref, div_ref, p, scale = _defect_terms(field, target, x)
    r = verify.defect(field, target.score, x)
    div_pu = verify.current_divergence(field, target.log_prob, x)
    assert r.shape == (64,) and div_pu.shape == (64,)
    assert float((r.abs() / scale).max()) <= 1e-9
    assert float((div_pu.abs() / (p * scale)).max()) <= 1e-9


@examples(1.0)
@given(
    SMOOTH_TARGETS.flatmap(lambda t: st.tuples(st.just(t), fst.symmetric_matrices(t.dim, 1.5).map(lambda e: with_norm_at_least(e, 0.5)))),
    fst.seeds(),
)
def test_defect_of_a_symmetric_error(target_e, seed):
    """u = E s: verify.defect equals the reference defect (1e-9 of the scale), div(p u) = p r,
    and with verify.defect inside Gauss-Hermite quadrature E_p[r phi] = ||E||_F^2 (5e-3
    relative) and sqrt(E_p[r^2]) >= ||E||_F^2 / sqrt(E_p[phi^2]) (the margin of
    test_stationarity)."""
    target, e = target_e
    field = _symmetric_error_field(target, e)
    x = target.sample(256, generator=gen(seed), dtype=F64)
    r_ref, div_ref, p, scale = _defect_terms(field, target, x)
    r = verify.defect(field, target.score, x)
    assert float(((r - r_ref).abs() / scale).max()) <= 1e-9
    div_pu = verify.current_divergence(field, target.log_prob, x)
    assert float(((div_pu - p * r_ref).abs() / (p * scale)).max()) <= 1e-9
    norm2 = float((e * e).sum())
    e_rphi, rms_r, rms_phi = symmetric_error_margin(target, e, lambda fld, z: verify.defect(fld, target.score, z))
    assert abs(e_rphi - norm2) <= QUADRATURE_RTOL * norm2, (e_rphi, norm2)
    assert rms_r >= norm2 / rms_phi * (1 - QUADRATURE_RTOL)


@given(fst.dims(1, 4), st.integers(1, 9), st.integers(1, 9), st.floats(0.2, 5.0), fst.seeds())
def test_stein_kernel_is_the_spec_formula(d, n, m, ell, seed):
    """verify.stein_kernel(x, y, fx, fy, l) equals the SPEC section 5 formula (1e-10 relative)."""
    g = gen(seed)
    x, y = torch.randn(n, d, dtype=F64, generator=g), torch.randn(m, d, dtype=F64, generator=g)
    fx, fy = torch.randn(n, d, dtype=F64, generator=g), torch.randn(m, d, dtype=F64, generator=g)
    ref = stein_kernel_formula(x, y, fx, fy, ell)
    got = verify.stein_kernel(x, y, fx, fy, ell)
    assert got.shape == (n, m)
    assert float((got - ref).abs().max()) <= 1e-10 * (1 + float(ref.abs().max()))


@examples(0.75)
@given(TARGETS.flatmap(lambda t: st.tuples(st.just(t), fst.rotational_fields(t, kinds=("constant", "scalar")))), st.floats(0.5, 2.0), fst.seeds())
def test_ksd_population_value_unchanged_by_rotation(target_field, ell_factor, seed):
    """KSD^2 = 0 for the score and for score + rotation: the U-statistic (which must equal the
    reference one, 1e-9) averaged over 30 independent samples of N = 200 is within 4 SE of 0.
    A temperature error (f = 2 s, the law of half the variance) is more than 4 SE above 0 (negative control). The
    lengthscale is fixed (ell_factor times the target's scale), not data-dependent."""
    target, field = target_field
    ell = ell_factor * float(torch.linalg.eigvalsh(target.covariance).max()) ** 0.5
    for name, f in (("score", target.score), ("score + rotation", field), ("2 score", lambda z: 2.0 * target.score(z))):
        vals = []
        for k in range(30):
            x = target.sample(200, generator=gen(seed + k), dtype=F64)
            val = verify.ksd2(f, x, lengthscales=ell)
            if k == 0:
                ref = ksd_u_statistic(f, x, ell)
                assert abs(float(val) - float(ref)) <= 1e-9 * (1 + abs(float(ref)))
            vals.append(torch.as_tensor(val, dtype=F64).detach())
        vals = torch.stack(vals)
        if name == "2 score":
            mean, se = float(vals.mean()), float(vals.std()) / len(vals) ** 0.5
            assert mean > Z * se, f"KSD^2 of a temperature error not detected: mean {mean:.3g}, SE {se:.3g}"
        else:
            assert_mean(vals, 0.0, f"KSD^2 of the {name}")
