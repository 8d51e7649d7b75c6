"""Hypothesis strategies for fluxbench objects (like ``hypothesis.extra.numpy``).

Property tests of SPEC.md (``properties/``, run by ``nox -s verify``) draw their inputs
from these strategies, and users can compose them in their own tests::

    from hypothesis import given
    from fluxbench import strategies as fst

    @given(fst.gaussian_targets(fst.dims(2, 4)).flatmap(fst.rotational_fields))
    def test_my_sampler_keeps_p(field): ...

One module over 400 lines on purpose: like ``hypothesis.extra.numpy``, users import one
namespace of strategies, and the strategies share the float-assembly rules below.

**How tensors are built.** Every tensor is assembled from *drawn Python floats*
(``hypothesis.strategies.floats`` in bounded ranges, never NaN or inf) and then
transformed deterministically: an antisymmetric matrix from its strict upper triangle, an
orthogonal matrix from the QR factorisation of a drawn matrix, eigenvalues from drawn
exponents. No torch random generator is involved, so a failing example prints as, and
shrinks to, a handful of small numbers: the zero matrix, the identity rotation, unit
eigenvalues, the origin. Where a property needs randomness inside the test (samples,
Monte Carlo), it draws an integer with :func:`seeds` and feeds it to a
``torch.Generator`` (see :func:`generator`), so the test stays reproducible from the
printed seed.

Everything is float64 on the CPU by default (``dtype=`` changes it). Dimension-like
arguments accept either an ``int`` or a strategy of ints (for example :func:`dims`).

Strategies (what each draws):

* :func:`dims`: an integer dimension d.
* :func:`seeds`: an integer seed for ``torch.Generator.manual_seed``.
* :func:`noise_levels`: a noise standard deviation sigma, log-uniform in a range.
* :func:`antisymmetric_matrices`: A with A^T = -A and ||A||_F <= max_norm.
* :func:`symmetric_matrices`: E = E^T with ||E||_F <= max_norm.
* :func:`orthogonal_matrices`: Q with Q^T Q = I (rotations and reflections).
* :func:`spd_matrices`: S = Q diag(lambda) Q^T with cond(S) <= max_condition.
* :func:`gaussian_targets`: :class:`fluxbench.targets.Gaussian` N(m, Sigma).
* :func:`mixture_targets`: :class:`fluxbench.targets.GaussianMixture`.
* :func:`rotational_fields`: :class:`fluxbench.fields.RotationalField`
  f = s + A s + div A (SPEC eq. (4)) for a given target, with constant A, A(x) = a(x) J
  (:class:`~fluxbench.fields.ScalarAntisymmetric`) or a small learned A(x)
  (:class:`~fluxbench.fields.LearnedAntisymmetric`).
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from hypothesis import strategies as st
from torch import Tensor

from fluxbench.fields import ConstantAntisymmetric, LearnedAntisymmetric, RotationalField, ScalarAntisymmetric
from fluxbench.targets import Gaussian, GaussianMixture, Target

__all__ = [
    "dims",
    "seeds",
    "generator",
    "noise_levels",
    "antisymmetric_matrices",
    "symmetric_matrices",
    "orthogonal_matrices",
    "spd_matrices",
    "gaussian_targets",
    "mixture_targets",
    "rotational_fields",
    "ROTATION_KINDS",
]

F64 = torch.float64

#: The kinds of antisymmetric matrix field :func:`rotational_fields` can draw.
ROTATION_KINDS = ("constant", "scalar", "learned")

_SEED_MAX = 2**31 - 1


def _int_or_strategy(value: int | st.SearchStrategy[int], name: str) -> st.SearchStrategy[int]:
    if isinstance(value, st.SearchStrategy):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1 or a strategy of ints; got {value!r}")
    return st.just(value)


def _unit_floats() -> st.SearchStrategy[float]:
    """Floats in [-1, 1] (shrink towards 0)."""
    return st.floats(-1.0, 1.0, allow_nan=False, allow_infinity=False)


def _check_positive(value: float, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return value


# --------------------------------------------------------------------------- scalars


def dims(min_dim: int = 1, max_dim: int = 4) -> st.SearchStrategy[int]:
    """An integer dimension d with ``min_dim <= d <= max_dim`` (shrinks towards ``min_dim``).

    Args:
        min_dim: smallest d, >= 1.
        max_dim: largest d, >= min_dim.
    """
    if min_dim < 1 or max_dim < min_dim:
        raise ValueError(f"need 1 <= min_dim <= max_dim; got {min_dim}, {max_dim}")
    return st.integers(min_dim, max_dim)


def seeds() -> st.SearchStrategy[int]:
    """An integer seed in [0, 2^31 - 1] for ``torch.Generator().manual_seed`` (shrinks to 0)."""
    return st.integers(0, _SEED_MAX)


def generator(seed: int) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded with ``seed`` (a drawn :func:`seeds` value)."""
    return torch.Generator().manual_seed(int(seed))


def noise_levels(min_sigma: float = 0.05, max_sigma: float = 2.0) -> st.SearchStrategy[float]:
    """A noise standard deviation sigma, log-uniform in [min_sigma, max_sigma].

    Draws u = log sigma uniformly (a float in [log min, log max]) and returns exp(u), a
    Python float. Shrinks towards sigma = 1 when 1 is in range (log sigma -> 0), else
    towards the nearer end.

    Args:
        min_sigma: smallest sigma, > 0.
        max_sigma: largest sigma, >= min_sigma.
    """
    lo = math.log(_check_positive(min_sigma, "min_sigma"))
    hi = math.log(_check_positive(max_sigma, "max_sigma"))
    if hi < lo:
        raise ValueError(f"need min_sigma <= max_sigma; got {min_sigma}, {max_sigma}")
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False).map(lambda u: min(max(math.exp(u), min_sigma), max_sigma))


# --------------------------------------------------------------------------- matrices


@st.composite
def antisymmetric_matrices(
    draw, dim: int | st.SearchStrategy[int], max_norm: float = 2.0, *, dtype: torch.dtype = F64
) -> Tensor:
    """An antisymmetric matrix A (A^T = -A), shape (d, d), with ||A||_F <= max_norm.

    Draws the d(d-1)/2 strict-upper-triangle entries as floats in [-c, c] with
    c = max_norm / sqrt(d (d - 1)), so that ||A||_F = sqrt(2 sum a_k^2) <= max_norm, and
    sets A_ba = -A_ab. For d = 1 the only antisymmetric matrix is 0. Shrinks towards the
    zero matrix.

    Args:
        dim: d, an int or a strategy of ints.
        max_norm: bound on the Frobenius norm, >= 0.
        dtype: floating dtype of the result.
    """
    d = draw(_int_or_strategy(dim, "dim"))
    if max_norm < 0:
        raise ValueError(f"max_norm must be >= 0; got {max_norm}")
    a = torch.zeros(d, d, dtype=F64)
    k = d * (d - 1) // 2
    if k and max_norm > 0:
        c = max_norm / math.sqrt(d * (d - 1))
        entries = draw(st.lists(_unit_floats(), min_size=k, max_size=k))
        rows, cols = torch.triu_indices(d, d, offset=1)
        vals = c * torch.tensor(entries, dtype=F64)
        a[rows, cols] = vals
        a[cols, rows] = -vals
    return a.to(dtype)


@st.composite
def symmetric_matrices(
    draw, dim: int | st.SearchStrategy[int], max_norm: float = 2.0, *, dtype: torch.dtype = F64
) -> Tensor:
    """A symmetric matrix E (E^T = E), shape (d, d), with ||E||_F <= max_norm.

    Draws the d(d+1)/2 upper-triangle entries as floats in [-c, c] with c = max_norm / d
    (so ||E||_F <= d c = max_norm) and mirrors them. Shrinks towards the zero matrix; to
    exclude it, filter (``.filter(lambda e: e.norm() > ...)``) or add a multiple of I.

    Args:
        dim: d, an int or a strategy of ints.
        max_norm: bound on the Frobenius norm, >= 0.
        dtype: floating dtype of the result.
    """
    d = draw(_int_or_strategy(dim, "dim"))
    if max_norm < 0:
        raise ValueError(f"max_norm must be >= 0; got {max_norm}")
    k = d * (d + 1) // 2
    entries = draw(st.lists(_unit_floats(), min_size=k, max_size=k))
    rows, cols = torch.triu_indices(d, d, offset=0)
    e = torch.zeros(d, d, dtype=F64)
    vals = (max_norm / d) * torch.tensor(entries, dtype=F64)
    e[rows, cols] = vals
    e[cols, rows] = vals
    return e.to(dtype)


@st.composite
def orthogonal_matrices(draw, dim: int | st.SearchStrategy[int], *, dtype: torch.dtype = F64) -> Tensor:
    """An orthogonal matrix Q (Q^T Q = I to float64 rounding), shape (d, d).

    Draws a d x d matrix G of floats in [-1, 1] and returns the Q factor of its
    Householder QR decomposition with the column signs fixed by sign(diag R) (0 counts as
    +1). Householder QR gives an orthogonal Q for every G, singular ones included, so the
    zero matrix (where shrinking goes) yields the identity: counterexamples shrink to
    axis-aligned frames. Rotations and reflections both occur.

    Args:
        dim: d, an int or a strategy of ints.
        dtype: floating dtype of the result.
    """
    d = draw(_int_or_strategy(dim, "dim"))
    entries = draw(st.lists(_unit_floats(), min_size=d * d, max_size=d * d))
    g = torch.tensor(entries, dtype=F64).reshape(d, d)
    if float(g.abs().max()) == 0.0:
        return torch.eye(d, dtype=dtype)
    q, r = torch.linalg.qr(g)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).to(dtype)


@st.composite
def spd_matrices(
    draw,
    dim: int | st.SearchStrategy[int],
    max_condition: float = 10.0,
    *,
    scale: tuple[float, float] = (0.5, 2.0),
    dtype: torch.dtype = F64,
) -> Tensor:
    """A symmetric positive definite matrix S = Q diag(lambda) Q^T with cond(S) <= max_condition.

    Q is drawn by :func:`orthogonal_matrices`; the eigenvalues are log-spaced within
    bounds: lambda_i = c * kappa^(-u_i) with u_i floats in [0, 1], kappa = max_condition,
    and the overall scale c a float in ``scale`` (so every eigenvalue lies in
    [c / kappa, c] and lambda_max / lambda_min <= kappa). The result is symmetrised
    exactly. Shrinks towards c * I (u -> 0, Q -> I), with c -> 1 if 1 is in ``scale``.

    Args:
        dim: d, an int or a strategy of ints.
        max_condition: kappa >= 1.
        scale: (lo, hi), the range of the largest possible eigenvalue c, 0 < lo <= hi.
        dtype: floating dtype of the result.
    """
    d = draw(_int_or_strategy(dim, "dim"))
    kappa = float(max_condition)
    if not kappa >= 1:
        raise ValueError(f"max_condition must be >= 1; got {max_condition}")
    lo, hi = (_check_positive(s, "scale") for s in scale)
    c = draw(st.floats(lo, hi, allow_nan=False, allow_infinity=False))
    u = draw(st.lists(st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False), min_size=d, max_size=d))
    q = draw(orthogonal_matrices(d))
    lam = c * kappa ** (-torch.tensor(u, dtype=F64))
    s = (q * lam) @ q.T
    return (0.5 * (s + s.T)).to(dtype)


# --------------------------------------------------------------------------- targets


def _vector(draw, d: int, bound: float) -> Tensor:
    entries = draw(st.lists(st.floats(-bound, bound, allow_nan=False, allow_infinity=False), min_size=d, max_size=d))
    return torch.tensor(entries, dtype=F64)


@st.composite
def gaussian_targets(
    draw,
    dims: int | st.SearchStrategy[int] = 2,  # noqa: F811 (the strategy of the same name is a valid value)
    *,
    max_condition: float = 10.0,
    scale: tuple[float, float] = (0.5, 2.0),
    mean_bound: float = 2.0,
) -> Gaussian:
    """A Gaussian target N(m, Sigma) (:class:`fluxbench.targets.Gaussian`, float64).

    Draws d from ``dims``, the mean m with entries floats in [-mean_bound, mean_bound], and
    Sigma from :func:`spd_matrices` (condition number <= ``max_condition``, largest
    eigenvalue bound in ``scale``). Shrinks towards N(0, I).

    Args:
        dims: d, an int or a strategy of ints (e.g. ``dims(1, 4)``).
        max_condition: bound on cond(Sigma), >= 1.
        scale: range of Sigma's largest possible eigenvalue.
        mean_bound: bound on |m_i|, >= 0.
    """
    d = draw(_int_or_strategy(dims, "dims"))
    mean = _vector(draw, d, mean_bound)
    cov = draw(spd_matrices(d, max_condition, scale=scale))
    return Gaussian(mean, cov)


@st.composite
def mixture_targets(
    draw,
    dims: int | st.SearchStrategy[int] = 2,  # noqa: F811
    max_components: int = 3,
    *,
    min_components: int = 1,
    max_condition: float = 4.0,
    scale: tuple[float, float] = (0.2, 1.0),
    mean_bound: float = 3.0,
    min_weight: float = 0.1,
) -> GaussianMixture:
    """A Gaussian mixture sum_k w_k N(m_k, Sigma_k) (:class:`fluxbench.targets.GaussianMixture`).

    Draws d from ``dims``, K in [min_components, max_components], unnormalised weights as
    floats in [min_weight, 1] (normalised by the target), means with entries in
    [-mean_bound, mean_bound], and each Sigma_k from :func:`spd_matrices`. Components may
    overlap or be well separated. Shrinks towards one N(0, I)-like component.

    Args:
        dims: d, an int or a strategy of ints.
        max_components: largest K, >= min_components.
        min_components: smallest K, >= 1.
        max_condition: bound on each cond(Sigma_k).
        scale: range of each Sigma_k's largest possible eigenvalue.
        mean_bound: bound on the mean entries.
        min_weight: smallest unnormalised weight, in (0, 1].
    """
    if not 1 <= min_components <= max_components:
        raise ValueError(f"need 1 <= min_components <= max_components; got {min_components}, {max_components}")
    d = draw(_int_or_strategy(dims, "dims"))
    k = draw(st.integers(min_components, max_components))
    weights = draw(st.lists(st.floats(min_weight, 1.0, allow_nan=False), min_size=k, max_size=k))
    means = torch.stack([_vector(draw, d, mean_bound) for _ in range(k)])
    covs = torch.stack([draw(spd_matrices(d, max_condition, scale=scale)) for _ in range(k)])
    return GaussianMixture(torch.tensor(weights, dtype=F64), means, covs)


# --------------------------------------------------------------------------- fields


class _Bump:
    """a(x) = amplitude * exp(-|x - c|^2 / (2 w^2)) > 0, and its gradient -a (x - c) / w^2."""

    def __init__(self, amplitude: float, centre: Tensor, width: float):
        self.amplitude, self.centre, self.width = float(amplitude), centre, float(width)

    def __call__(self, x: Tensor) -> Tensor:
        c = self.centre.to(dtype=x.dtype, device=x.device)
        return self.amplitude * torch.exp(-(x - c).square().sum(1) / (2 * self.width**2))

    def grad(self, x: Tensor) -> Tensor:
        c = self.centre.to(dtype=x.dtype, device=x.device)
        return -self(x)[:, None] * (x - c) / self.width**2

    def __repr__(self) -> str:
        return f"{self.amplitude:.4g} * exp(-|x - {self.centre.tolist()}|^2 / (2 * {self.width:.4g}^2))"


def _describe(module: torch.nn.Module, text: str) -> torch.nn.Module:
    # nn.Module.__repr__ calls self.extra_repr(): an instance attribute makes the drawn
    # parameters visible in Hypothesis' falsifying-example report
    module.extra_repr = lambda: text  # type: ignore[method-assign]
    return module


@st.composite
def _rotational_fields(
    draw,
    target: Target,
    kinds: Sequence[str],
    max_norm: float,
    amplitude: tuple[float, float],
    width: tuple[float, float],
) -> RotationalField:
    d = target.dim
    kind = draw(st.sampled_from(list(kinds)))
    score = target.score
    if kind == "constant":
        a = draw(antisymmetric_matrices(d, max_norm))
        field = RotationalField(score, ConstantAntisymmetric(a))
        return _describe(field, f"kind=constant, A={a.tolist()}")
    if kind == "scalar":
        j = draw(antisymmetric_matrices(d, max_norm))
        amp = draw(st.floats(*amplitude, allow_nan=False))
        w = draw(st.floats(*width, allow_nan=False))
        centre = target.mean.to(F64) + _vector(draw, d, 1.0)
        bump = _Bump(amp, centre, w)
        closed_form = draw(st.booleans())
        anti = ScalarAntisymmetric(bump, j, grad=bump.grad if closed_form else None)
        grad_kind = "closed-form" if closed_form else "autograd"
        return _describe(RotationalField(score, anti), f"kind=scalar, a(x)={bump!r}, J={j.tolist()}, grad a by {grad_kind}")
    if kind == "learned":
        seed = draw(seeds())
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # d = 1 has no antisymmetric basis: torch warns about the empty output layer
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            torch.manual_seed(seed)
            anti = LearnedAntisymmetric(d, hidden=(8,)).to(F64)
        return _describe(RotationalField(score, anti), f"kind=learned, LearnedAntisymmetric(d={d}, hidden=(8,)) init seed={seed}")
    raise ValueError(f"unknown rotation kind {kind!r}; known: {ROTATION_KINDS}")


def rotational_fields(
    target: Target | st.SearchStrategy[Target],
    *,
    kinds: Sequence[str] = ROTATION_KINDS,
    max_norm: float = 2.0,
    amplitude: tuple[float, float] = (0.1, 2.0),
    width: tuple[float, float] = (0.5, 3.0),
) -> st.SearchStrategy[RotationalField]:
    """A stationary field f = s + A s + div A of SPEC eq. (4) for ``target`` (a RotationalField).

    s is ``target.score``. A is antisymmetric and drawn by kind (``kinds``):

    * ``"constant"``: A from :func:`antisymmetric_matrices` (div A = 0, f = (I + A) s);
    * ``"scalar"``: A(x) = a(x) J with J from :func:`antisymmetric_matrices` and the smooth
      positive bump a(x) = amplitude exp(-|x - c|^2 / (2 w^2)), amplitude and w floats in
      the given ranges and c = target.mean + a vector in [-1, 1]^d
      (:class:`~fluxbench.fields.ScalarAntisymmetric`; grad a in closed form or by
      autograd, drawn);
    * ``"learned"``: :class:`~fluxbench.fields.LearnedAntisymmetric` (an MLP with 8 hidden
      units) initialised from a drawn seed, float64.

    Every such field leaves the target stationary: r = div(p (f - s)) / p = 0. Its repr
    names the kind and the drawn parameters.

    Args:
        target: a :class:`fluxbench.targets.Target`, or a strategy of targets (then the
            strategy draws the target first: ``gaussian_targets(2).flatmap(rotational_fields)``
            is equivalent).
        kinds: a subset of :data:`ROTATION_KINDS`.
        max_norm: Frobenius bound of the constant A and of J.
        amplitude: (lo, hi) range of the bump amplitude, lo > 0.
        width: (lo, hi) range of the bump width w, lo > 0.
    """
    kinds = tuple(kinds)
    if not kinds or any(k not in ROTATION_KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {ROTATION_KINDS}; got {kinds}")
    _check_positive(amplitude[0], "amplitude[0]")
    _check_positive(width[0], "width[0]")
    if isinstance(target, st.SearchStrategy):
        return target.flatmap(lambda t: _rotational_fields(t, kinds, max_norm, amplitude, width))
    if not isinstance(target, Target):
        raise ValueError(f"target must be a fluxbench Target or a strategy of targets; got {type(target).__name__}")
    return _rotational_fields(target, kinds, max_norm, amplitude, width)
