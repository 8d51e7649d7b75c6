"""SPEC section 4: Gaussian ground truth (Lyapunov identity, exact OU, mixing rate, Hutchinson)."""

from __future__ import annotations

import itertools
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from fluxbench import strategies as fst
from fluxbench.divergence import divergence
from fluxbench.samplers import ExactOU

from ._helpers import F64, Z, Z_ENTRIES, assert_mean, examples, gen

SPD = fst.dims(1, 5).flatmap(lambda d: st.tuples(fst.spd_matrices(d, 20.0), fst.antisymmetric_matrices(d, 3.0)))


def _eye(d):
    return torch.eye(d, dtype=F64)


# ------------------------------------------------------------------ Lyapunov identity


@given(SPD)
def test_lyapunov_identity(pair):
    """Bmat Sigma + Sigma Bmat^T = 2 I for Bmat = (I + J) S, S = Sigma^-1 (to 1e-10 relative),
    and ExactOU.from_precision builds exactly that drift."""
    s, j = pair
    d = s.shape[0]
    sigma = torch.linalg.inv(s)
    bmat = (_eye(d) + j) @ s
    resid = bmat @ sigma + sigma @ bmat.T - 2 * _eye(d)
    scale = float(torch.linalg.matrix_norm(bmat) * torch.linalg.matrix_norm(sigma))
    assert float(resid.abs().max()) <= 1e-10 * max(1.0, scale)
    ou = ExactOU.from_precision(s, j)
    assert torch.allclose(ou.bmat, bmat, rtol=1e-12, atol=1e-12 * float(bmat.abs().max()))
    x = torch.randn(5, d, dtype=F64, generator=gen(0))
    assert torch.allclose(ou.drift(x), -x @ bmat.T, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ exact OU


def _van_loan_covariance(bmat: torch.Tensor, t: float) -> torch.Tensor:
    """C_t = integral_0^t e^{-B u} 2 I e^{-B^T u} du, independently of any stationarity
    assumption: exp(t [[-B, 2I], [0, B^T]]) = [[F11, F12], [0, F22]] and C_t = F12 F11^T."""
    d = bmat.shape[0]
    block = torch.zeros(2 * d, 2 * d, dtype=F64)
    block[:d, :d] = -bmat
    block[:d, d:] = 2 * _eye(d)
    block[d:, d:] = bmat.T
    f = torch.linalg.matrix_exp(t * block)
    return f[:d, d:] @ f[:d, :d].T


@examples(1.5)
@given(SPD, st.floats(0.0, 3.0), st.lists(st.floats(-2, 2), min_size=5, max_size=5))
def test_exact_ou_transition_keeps_gaussian_exactly(pair, t, mean_entries):
    """One exact OU step maps N(m, Sigma) to N(m, Sigma), computed without sampling:
    the transition (E, C) has E = exp(-Bmat t), C equals the SDE's transition covariance
    integral_0^t e^{-Bs} 2 e^{-B^T s} ds (Van Loan), so mean m + E (m - m) = m and
    covariance E Sigma E^T + C = Sigma; ``conditional`` applies them; the semigroup law
    holds (two steps of t/2 = one step of t). Tolerance 1e-9 relative to ||Sigma||."""
    s, j = pair
    d = s.shape[0]
    m = torch.tensor(mean_entries[:d], dtype=F64)
    ou = ExactOU.from_precision(s, j, m)
    sigma = ou.covariance
    e, c = ou.transition(t)
    tol = 1e-9 * float(sigma.abs().max())
    assert float((e - torch.linalg.matrix_exp(-t * ou.bmat)).abs().max()) <= 1e-9
    assert float((c - _van_loan_covariance(ou.bmat, t)).abs().max()) <= tol
    assert float((e @ sigma @ e.T + c - sigma).abs().max()) <= tol
    x0 = torch.randn(4, d, dtype=F64, generator=gen(1))
    mean, cov = ou.conditional(x0, t)
    assert torch.allclose(mean, m + (x0 - m) @ e.T, atol=1e-12, rtol=1e-12) and torch.equal(cov, c)
    e2, c2 = ou.transition(t / 2)
    assert float((e2 @ e2 - e).abs().max()) <= 1e-9
    assert float((e2 @ c2 @ e2.T + c2 - c).abs().max()) <= tol


@examples(1.0)
@given(SPD, st.floats(0.05, 2.0), fst.seeds())
def test_exact_ou_step_sampled(pair, t, seed):
    """Sampled check of ``ExactOU.step``: from exact samples of N(0, Sigma), one step leaves
    the whitened sample w = L^-1 x' with mean 0 and covariance I: each entry within 5 SE
    (SE 1/sqrt(n) for means, sqrt((1 + delta_ij) / n) for covariances, n = 20000); and the
    step's conditional law: x' - E x0 whitened by C's factor has covariance I."""
    s, j = pair
    d = s.shape[0]
    ou = ExactOU.from_precision(s, j)
    n = 20000
    chol = torch.linalg.cholesky(ou.covariance)
    x0 = torch.randn(n, d, dtype=F64, generator=gen(seed)) @ chol.T
    x1 = ou.step(x0, t, generator=gen(seed + 1))
    w = torch.linalg.solve_triangular(chol, x1.T, upper=False).T
    _assert_standard(w, "whitened x'")
    e, c = ou.transition(t)
    noise = x1 - x0 @ e.T
    _assert_standard(torch.linalg.solve_triangular(torch.linalg.cholesky(c), noise.T, upper=False).T, "whitened step noise")


def _assert_standard(w, what):
    n, d = w.shape
    assert float(w.mean(0).abs().max()) <= Z_ENTRIES / math.sqrt(n), f"{what}: mean {w.mean(0).tolist()}"
    cov = w.T @ w / n
    se = torch.sqrt((1 + _eye(d)) / n)
    assert bool(((cov - _eye(d)).abs() <= Z_ENTRIES * se).all()), f"{what}: covariance {cov.tolist()}"


# ------------------------------------------------------------------ mixing rate


def _gap(s, j):
    return float(torch.linalg.eigvals((_eye(s.shape[0]) + j) @ s).real.min())


@given(SPD)
def test_spectral_gap_trace_bound(pair):
    """min Re eig((I + J) S) <= tr(S) / d for every antisymmetric J; the eigenvalues sum to
    tr S because tr(J S) = 0 (1e-9 relative)."""
    s, j = pair
    d = s.shape[0]
    eig = torch.linalg.eigvals((_eye(d) + j) @ s)
    tr = float(torch.trace(s))
    assert abs(float(eig.sum().real) - tr) <= 1e-9 * tr
    assert abs(float(torch.trace(j @ s))) <= 1e-12 * tr * (1 + float(j.abs().max()))
    assert _gap(s, j) <= tr / d * (1 + 1e-9)
    # reversible: the gap is lambda_min(S)
    assert abs(_gap(s, torch.zeros_like(j)) - float(torch.linalg.eigvalsh(s)[0])) <= 1e-9 * tr


@st.composite
def _commuting_pairs(draw):
    """S with eigenvalues in pairs (each pair shared) and J rotating inside each eigen-pair."""
    k = draw(st.integers(1, 2))
    d = 2 * k + draw(st.integers(0, 1))
    q = draw(fst.orthogonal_matrices(d))
    lam = draw(st.lists(st.floats(0.2, 5.0), min_size=k + 1, max_size=k + 1))
    rates = draw(st.lists(st.floats(-3.0, 3.0), min_size=k, max_size=k))
    diag = torch.tensor([lam[i // 2] for i in range(2 * k)] + ([lam[k]] if d % 2 else []), dtype=F64)
    jb = torch.zeros(d, d, dtype=F64)
    for i, rate in enumerate(rates):
        jb[2 * i, 2 * i + 1], jb[2 * i + 1, 2 * i] = -rate, rate
    return (q * diag) @ q.T, q @ jb @ q.T


@given(_commuting_pairs())
def test_commuting_j_changes_nothing(pair):
    """Negative control: J commuting with S (rotation inside eigenspaces of S) leaves the
    real parts of the spectrum, hence the gap, at those of S (1e-9 relative)."""
    s, j = pair
    assert float((j @ s - s @ j).abs().max()) <= 1e-9 * float(s.abs().max())
    re = torch.sort(torch.linalg.eigvals((_eye(s.shape[0]) + j) @ s).real).values
    lam = torch.linalg.eigvalsh(s)
    assert float((re - lam).abs().max()) <= 1e-9 * float(lam.max())


@given(fst.dims(1, 5), st.floats(0.1, 10.0), st.data())
def test_isotropic_s_admits_no_speed_up(d, c, data):
    """Negative control: S = c I gives gap c = tr(S) / d for every J (no speed-up)."""
    j = data.draw(fst.antisymmetric_matrices(d, 5.0))
    assert abs(_gap(c * _eye(d), j) - c) <= 1e-9 * c


@given(fst.spd_matrices(2, 50.0), st.floats(1.0, 3.0))
def test_optimal_j_attains_trace_bound_in_2d(s, overshoot):
    """d = 2, S with eigenvalues l1, l2: J = a [[0, -1], [1, 0]] gives eigenvalues with
    trace tr S and determinant (1 + a^2) l1 l2; they share the real part tr(S) / 2 iff
    a >= a* = |l1 - l2| / (2 sqrt(l1 l2)). At a = a* the matrix is defective (a double
    eigenvalue), so real parts are compared with tolerance sqrt(eps) ~ 1e-7 relative
    (SPEC: errors grow like eps^(1/d)); above a*, to 1e-9. The speed-up over the
    reversible gap is mean eig(S) / min eig(S)."""
    lam = torch.linalg.eigvalsh(s)
    l1, l2 = float(lam[0]), float(lam[1])
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=F64)
    a_star = abs(l2 - l1) / (2 * math.sqrt(l1 * l2))
    tr = l1 + l2
    for a, tol in ((a_star, 1e-7), (a_star * overshoot + 1e-3, 1e-9)):
        re = torch.linalg.eigvals((_eye(2) + a * rot) @ s).real
        assert float((re - tr / 2).abs().max()) <= tol * tr, (a, re.tolist(), tr / 2)
    speed_up = _gap(s, a_star * rot) / _gap(s, torch.zeros(2, 2, dtype=F64))
    assert abs(speed_up - (tr / 2) / l1) <= 1e-6 * speed_up
    # below a*, the real parts split and the gap is strictly below the bound
    if a_star > 1e-3:
        assert _gap(s, 0.5 * a_star * rot) < tr / 2 * (1 - 1e-9)


# ------------------------------------------------------------------ Hutchinson


@given(fst.dims(1, 6).flatmap(lambda d: st.lists(st.floats(-3, 3), min_size=d * d, max_size=d * d)))
def test_hutchinson_mean_and_variance_by_exact_enumeration(entries):
    """Over all 2^d Rademacher vectors eps (equally likely): E[eps^T M eps] = tr M and
    Var = 2 (||sym M||_F^2 - sum_i M_ii^2), to float64 rounding; no Monte Carlo."""
    d = int(round(math.sqrt(len(entries))))
    mat = torch.tensor(entries, dtype=F64).reshape(d, d)
    eps = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=F64)
    vals = ((eps @ mat) * eps).sum(1)
    sym = 0.5 * (mat + mat.T)
    var = 2 * (float((sym**2).sum()) - float((torch.diagonal(mat) ** 2).sum()))
    scale = 1 + float((mat**2).sum())
    assert abs(float(vals.mean()) - float(torch.trace(mat))) <= 1e-12 * scale
    assert abs(float(vals.var(unbiased=False)) - var) <= 1e-12 * scale


@examples(1.0)
@given(fst.dims(2, 4).flatmap(lambda d: st.lists(st.floats(-2, 2), min_size=d * d, max_size=d * d)), fst.seeds())
def test_library_hutchinson_divergence_is_unbiased_with_exact_variance(entries, seed):
    """fluxbench.divergence.divergence(method="hutchinson") on the linear field x -> M x:
    every value is eps^T M eps for a Rademacher eps, and the mean over N = 4000 rows is
    within 4 SE of tr M with the exact SE sqrt(Var / N) from the enumeration formula."""
    d = int(round(math.sqrt(len(entries))))
    mat = torch.tensor(entries, dtype=F64).reshape(d, d)
    n = 4000
    x = torch.randn(n, d, dtype=F64, generator=gen(seed))
    est = divergence(lambda z: z @ mat.T, x, method="hutchinson", generator=gen(seed + 1))
    sym = 0.5 * (mat + mat.T)
    var = 2 * (float((sym**2).sum()) - float((torch.diagonal(mat) ** 2).sum()))
    eps = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=F64)
    support = torch.unique(((eps @ mat) * eps).sum(1))
    assert bool((est[:, None] - support[None, :]).abs().min(1).values.max() <= 1e-12 * (1 + float(mat.abs().max())))
    se = math.sqrt(var / n)
    assert abs(float(est.mean()) - float(torch.trace(mat))) <= Z * se + 1e-12
    if var > 1e-6:  # the sample variance matches the formula (4 SE of a variance, kurtosis-bounded)
        assert_mean((est - float(torch.trace(mat))) ** 2, var, "Hutchinson variance", slack=1e-9)
