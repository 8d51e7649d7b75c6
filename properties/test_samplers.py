"""SPEC sections 3 and 4: samplers keep Gaussian marginals, also for non-score fields.

For linear fields every sampler step is an affine map of the state, so its effect on a
Gaussian law is computed *exactly* by pushing the identity matrix through the sampler:
no sampling error, and the only tolerance is the integrator's own discretisation error.
"""

from __future__ import annotations

import math

import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

from fluxbench import strategies as fst
from fluxbench.samplers import ExactOU, langevin, probability_flow, probability_flow_nll

from ._helpers import F64, Z_ENTRIES, examples, gen


def _eye(d):
    return torch.eye(d, dtype=F64)


def _vp_field(sigma_data, q):
    """f(x, sigma) = -(I + Q) (Sigma + sigma^2 I)^-1 x (SPEC section 4): stationary for p_sigma."""
    d = sigma_data.shape[0]
    lam, vec = torch.linalg.eigh(sigma_data)

    def model(x, sigma):
        prec = (vec / (lam + float(sigma) ** 2)) @ vec.T
        return -x @ ((_eye(d) + q) @ prec).T

    return model


def _linear_map(fn, d):
    """The matrix M of a linear map x -> M x given as a function of (N, d) rows."""
    return fn(_eye(d)).T


@examples(1.0)
@given(
    fst.dims(1, 3).flatmap(lambda d: st.tuples(fst.spd_matrices(d, 10.0), fst.antisymmetric_matrices(d, 2.0))),
    st.floats(0.05, 0.5),
    st.floats(2.0, 10.0),
    st.booleans(),
)
def test_probability_flow_preserves_gaussian_marginals(pair, sigma_lo, sigma_hi, decreasing):
    """The Heun probability-flow map M from sigma_1 to sigma_L carries N(0, Sigma + sigma_1^2 I)
    to N(0, Sigma + sigma_L^2 I) for every antisymmetric Q, up to Heun's O(h^2) error:
    with err(n) = max |M C_1 M^T - C_L| / max |C_L| on n geometric levels,
    err(200) <= 2e-3 and err(200) <= err(100) / 3 (second order: the ratio tends to 4;
    a first-order error would give 2)."""
    sigma_data, q = pair
    d = sigma_data.shape[0]
    model = _vp_field(sigma_data, q)
    errors = []
    for n in (100, 200):
        levels = torch.logspace(math.log10(sigma_hi), math.log10(sigma_lo), n, dtype=F64)
        if not decreasing:
            levels = levels.flip(0)
        m = _linear_map(lambda x: probability_flow(model, x, levels), d)
        c1 = sigma_data + float(levels[0]) ** 2 * _eye(d)
        c_l = sigma_data + float(levels[-1]) ** 2 * _eye(d)
        errors.append(float((m @ c1 @ m.T - c_l).abs().max()) / float(c_l.abs().max()))
    coarse, fine = errors
    assert fine <= 2e-3, errors
    assert fine <= max(coarse / 3, 1e-12), f"not second order: errors {errors}"


@examples(0.5)
@given(
    fst.dims(1, 3).flatmap(lambda d: st.tuples(fst.spd_matrices(d, 10.0), fst.antisymmetric_matrices(d, 2.0))),
    fst.seeds(),
)
def test_probability_flow_nll_is_exact_and_unchanged_by_rotation(pair, seed):
    """-log p_{sigma_1}(x) by the flow with the exact prior N(0, Sigma + sigma_L^2 I) equals the
    Gaussian NLL for Q = 0 and for the drawn Q (div f does not depend on Q), up to Heun's
    O(h^2) error: with err(n) the largest NLL error in nats on n geometric levels from 0.1
    to 5, err(240) <= 2e-3 and err(240) <= err(120) / 3."""
    sigma_data, q = pair
    d = sigma_data.shape[0]
    for qq in (torch.zeros_like(q), q):
        errors = []
        for n in (120, 240):
            levels = torch.logspace(math.log10(0.1), math.log10(5.0), n, dtype=F64)
            c_l = sigma_data + float(levels[-1]) ** 2 * _eye(d)
            c_1 = sigma_data + float(levels[0]) ** 2 * _eye(d)
            prior = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=F64), c_l)
            exact = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=F64), c_1)
            x = torch.randn(6, d, dtype=F64, generator=gen(seed)) @ torch.linalg.cholesky(c_1).T
            nll = probability_flow_nll(_vp_field(sigma_data, qq), x, levels, prior_logp=prior.log_prob)
            errors.append(float((nll + exact.log_prob(x)).abs().max()))
        assert errors[1] <= 2e-3, errors
        assert errors[1] <= max(errors[0] / 3, 1e-12), f"not second order: {errors}"


@examples(1.5)
@given(
    fst.dims(1, 3).flatmap(lambda d: st.tuples(fst.spd_matrices(d, 10.0), fst.antisymmetric_matrices(d, 3.0))),
    st.lists(st.floats(-2, 2), min_size=3, max_size=3),
    st.floats(0.01, 2.0),
    fst.seeds(),
)
def test_exact_ou_step_preserves_gaussian_marginal(pair, mean_entries, t, seed):
    """``ExactOU.step`` is x' = m + E (x - m) + L xi with xi the generator's (N, d) normal draw.
    Stepping two batches with the same seed shares xi, so differences give E exactly, and
    regenerating xi gives the noise factor L (least squares over 8 d rows). The law of
    x' for X ~ N(m, Sigma) is then N(m, E Sigma E^T + L L^T), which must equal N(m, Sigma)
    (1e-9 relative) for the non-score field f = -(I + J) S (x - m); and E = exp(-Bmat t)."""
    s, j = pair
    d = s.shape[0]
    m = torch.tensor(mean_entries[:d], dtype=F64)
    ou = ExactOU.from_precision(s, j, m)
    n = 8 * d
    at_mean = m.expand(n, d).clone()
    basis = torch.cat([_eye(d), torch.zeros(n - d, d, dtype=F64)])
    moved = ou.step(at_mean + basis, t, generator=gen(seed))
    still = ou.step(at_mean, t, generator=gen(seed))
    e = (moved - still)[:d].T
    assert float((e - torch.linalg.matrix_exp(-t * ou.bmat)).abs().max()) <= 1e-9
    xi = torch.randn(n, d, dtype=F64, generator=gen(seed))
    l_t = torch.linalg.lstsq(xi, still - m).solution  # still - m = xi L^T
    sigma = ou.covariance
    law = e @ sigma @ e.T + l_t.T @ l_t
    assert float((law - sigma).abs().max()) <= 1e-9 * float(sigma.abs().max()), (law.tolist(), sigma.tolist())


@examples(1.0)
@given(
    fst.dims(1, 3).flatmap(lambda d: st.tuples(fst.spd_matrices(d, 5.0, scale=(0.5, 1.0)), fst.antisymmetric_matrices(d, 1.0))),
    st.floats(0.005, 0.1),
    fst.seeds(),
)
def test_langevin_step_and_discrete_stationary_law(pair, eps, seed):
    """ULA (SPEC section 3) is x + eps f(x) + sqrt(2 eps) xi draw for draw (same generator),
    and for f = -(I + J) S x its stationary law is N(0, C_eps) with
    C_eps = A C_eps A^T + 2 eps I, A = I - eps (I + J) S (the O(eps) bias, exactly): chains
    started from N(0, C_eps) keep that law after 10 steps, whitened moments within 5 SE."""
    s, j = pair
    d = s.shape[0]
    bmat = (_eye(d) + j) @ s

    def field(x):
        return -x @ bmat.T

    x0 = torch.randn(7, d, dtype=F64, generator=gen(seed))
    one = langevin(field, x0, step_size=eps, n_steps=1, generator=gen(seed + 1))
    xi = torch.randn(7, d, dtype=F64, generator=gen(seed + 1))
    assert float((one - (x0 + eps * field(x0) + math.sqrt(2 * eps) * xi)).abs().max()) <= 1e-13
    a = _eye(d) - eps * bmat
    c_eps = torch.from_numpy(scipy.linalg.solve_discrete_lyapunov(a.numpy(), 2 * eps * _eye(d).numpy()))
    c_eps = 0.5 * (c_eps + c_eps.T)
    chol = torch.linalg.cholesky(c_eps)
    n = 20000
    x = torch.randn(n, d, dtype=F64, generator=gen(seed + 2)) @ chol.T
    x = langevin(field, x, step_size=eps, n_steps=10, generator=gen(seed + 3))
    w = torch.linalg.solve_triangular(chol, x.T, upper=False).T
    assert float(w.mean(0).abs().max()) <= Z_ENTRIES / math.sqrt(n)
    cov = w.T @ w / n
    assert bool(((cov - _eye(d)).abs() <= Z_ENTRIES * torch.sqrt((1 + _eye(d)) / n)).all()), cov.tolist()
