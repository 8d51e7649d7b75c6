"""Closed-form distances and kernel means between Gaussian laws (SPEC section 4, Distances).

Ground truth for the sample-based metrics: :func:`gaussian_w2` for
:func:`fluxbench.metrics.w2`, :func:`gaussian_sliced_w2` for
:func:`fluxbench.metrics.sliced_w2`, and :func:`rbf_kernel_mean` for the population
MMD^2 = E k(X, X') + E k(Y, Y') - 2 E k(X, Y) behind
:func:`fluxbench.metrics.mmd2_unbiased`.

Every function takes means of shape (d,) and covariances of shape (d, d) (symmetric
positive semi-definite; positive definite is not required), all with the same d, dtype
and device, and computes in that dtype promoted to at least float32 (pass float64 for
reference accuracy).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fluxbench import _random
from fluxbench._checks import all_finite, check_generator, check_positive, check_positive_int
from fluxbench._pairwise import working_dtype
from fluxbench.metrics._common import check_directions

__all__ = ["gaussian_w2", "gaussian_sliced_w2", "rbf_kernel_mean"]


def _check_mean(m: object, name: str) -> Tensor:
    if not isinstance(m, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (d,); got {type(m).__name__}")
    if m.ndim != 1 or m.shape[0] == 0:
        raise ValueError(f"{name} must have shape (d,) with d >= 1; got shape {tuple(m.shape)}")
    if not m.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype; got {m.dtype}")
    if not all_finite(m):
        raise ValueError(f"{name} contains NaN or inf entries")
    return m


def _check_cov(S: object, name: str, d: int, like: Tensor) -> Tensor:
    if not isinstance(S, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape ({d}, {d}); got {type(S).__name__}")
    if S.shape != (d, d):
        raise ValueError(f"{name} must have shape ({d}, {d}) to match the mean; got shape {tuple(S.shape)}")
    if S.device != like.device:
        raise ValueError(f"{name} is on device {S.device} but the means are on {like.device}")
    if S.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {S.dtype} but the means have dtype {like.dtype}")
    if not all_finite(S):
        raise ValueError(f"{name} contains NaN or inf entries")
    scale = float(S.abs().max())
    tol = 1e-6 * max(scale, 1e-30) if working_dtype(S.dtype) == torch.float64 else 1e-4 * max(scale, 1e-30)
    asym = float((S - S.T).abs().max())
    if asym > tol:
        raise ValueError(f"{name} is not symmetric (max |S - S^T| = {asym:.3g}); a covariance must be")
    return S


def _check_gaussians(m1: object, S1: object, m2: object, S2: object) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    m1 = _check_mean(m1, "m1")
    m2 = _check_mean(m2, "m2")
    if m1.shape != m2.shape:
        raise ValueError(f"m1 has d = {m1.shape[0]} but m2 has d = {m2.shape[0]}")
    if m1.device != m2.device:
        raise ValueError(f"m1 is on device {m1.device} but m2 is on {m2.device}")
    if m1.dtype != m2.dtype:
        raise ValueError(f"m1 has dtype {m1.dtype} but m2 has dtype {m2.dtype}")
    d = m1.shape[0]
    S1 = _check_cov(S1, "S1", d, m1)
    S2 = _check_cov(S2, "S2", d, m1)
    dtype = working_dtype(m1.dtype)
    return tuple(t.to(dtype) for t in (m1, 0.5 * (S1 + S1.T), m2, 0.5 * (S2 + S2.T)))  # type: ignore[return-value]


def _psd_eigh(S: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric S with round-off negatives clamped to 0."""
    evals, evecs = torch.linalg.eigh(S)
    scale = max(float(evals.abs().max()), 1e-30)
    tol = (1e-10 if S.dtype == torch.float64 else 1e-5) * scale * S.shape[0]
    lowest = float(evals.min())
    if lowest < -tol:
        raise ValueError(f"{name} is not positive semi-definite (smallest eigenvalue {lowest:.3g})")
    return evals.clamp_min(0.0), evecs


def _psd_sqrt(S: Tensor, name: str) -> Tensor:
    """Symmetric square root S^{1/2} = V diag(sqrt(max(lambda, 0))) V^T."""
    evals, evecs = _psd_eigh(S, name)
    return (evecs * evals.sqrt()) @ evecs.T


def gaussian_w2(m1: Tensor, S1: Tensor, m2: Tensor, S2: Tensor) -> Tensor:
    """2-Wasserstein distance between N(m1, S1) and N(m2, S2) (SPEC section 4), not squared.

    ``W2^2 = |m1 - m2|^2 + tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2})``.

    The covariance (Bures) term is evaluated in the equivalent Procrustes form
    ``min_{U orthogonal} ||S1^{1/2} - S2^{1/2} U||_F^2`` (Bhatia, Jain and Lim, "On the
    Bures-Wasserstein distance between positive definite matrices", Expo. Math. 2019,
    Theorem 1), with the optimal U = P Q^T from the SVD S2^{1/2} S1^{1/2} = P diag Q^T.
    It is a sum of squares, so it does not suffer the cancellation of the trace form when
    S1 is close to S2 (the distance of a Gaussian to itself comes out ~1e-15 in float64,
    not ~1e-8). Symmetric square roots come from an eigendecomposition with round-off
    negative eigenvalues clamped to 0. For commuting S1, S2 (in particular in 1-D) this
    reduces to ``|m1 - m2|^2 + ||S1^{1/2} - S2^{1/2}||_F^2``.

    Args:
        m1: (d,) mean of the first law.
        S1: (d, d) symmetric PSD covariance of the first law.
        m2: (d,) mean of the second law.
        S2: (d, d) symmetric PSD covariance of the second law.

    Returns:
        0-d tensor, W2 >= 0, in ``m1``'s dtype promoted to at least float32.

    Raises:
        ValueError: on bad shapes, NaN, mismatched d/dtype/device, or a covariance that
            is not symmetric positive semi-definite.
    """
    m1, S1, m2, S2 = _check_gaussians(m1, S1, m2, S2)
    r1 = _psd_sqrt(S1, "S1")
    r2 = _psd_sqrt(S2, "S2")
    P, _, Qh = torch.linalg.svd(r2 @ r1)
    U = P @ Qh
    cov_term = (r1 - r2 @ U).pow(2).sum()
    mean_term = (m1 - m2).pow(2).sum()
    return (mean_term + cov_term).clamp_min(0.0).sqrt()


def gaussian_sliced_w2(
    m1: Tensor,
    S1: Tensor,
    m2: Tensor,
    S2: Tensor,
    *,
    n_projections: int = 4096,
    generator: torch.Generator | None = None,
    directions: Tensor | None = None,
) -> Tensor:
    """Sliced 2-Wasserstein distance between N(m1, S1) and N(m2, S2) (SPEC section 4).

    ``SW2^2 = E_theta[ (theta . (m1 - m2))^2 + (sqrt(theta^T S1 theta) - sqrt(theta^T S2 theta))^2 ]``
    with theta uniform on the unit sphere S^{d-1}: along each direction the projected laws
    are 1-D Gaussians, whose W2^2 is exact. The expectation over theta is a Monte Carlo
    integral over ``n_projections`` directions (normalised standard normal draws with
    ``generator``), or an average over the given ``directions``; the estimate of SW2^2 is
    unbiased with standard error std_theta / sqrt(K). The integral is exact (theta
    independent) when the per-direction value is constant, e.g. for equal means and
    isotropic S1 = a I, S2 = b I: SW2 = |sqrt(a) - sqrt(b)|. Returns the root (Bonneel et
    al. 2015), the same convention as :func:`fluxbench.metrics.sliced_w2`.

    Args:
        m1: (d,) mean of the first law.
        S1: (d, d) symmetric PSD covariance of the first law.
        m2: (d,) mean of the second law.
        S2: (d, d) symmetric PSD covariance of the second law.
        n_projections: number K of random directions, >= 1 (ignored with ``directions``).
        generator: random source of the directions (on the means' device).
        directions: optional (K, d) nonzero directions (rows are normalised), e.g. to pair
            the Monte Carlo error with :func:`fluxbench.metrics.sliced_w2`.

    Returns:
        0-d tensor, SW2 >= 0, in ``m1``'s dtype promoted to at least float32.

    Raises:
        ValueError: on bad Gaussian parameters, ``n_projections < 1`` or bad directions.
    """
    m1, S1, m2, S2 = _check_gaussians(m1, S1, m2, S2)
    _psd_eigh(S1, "S1")
    _psd_eigh(S2, "S2")
    d = m1.shape[0]
    if directions is None:
        n_projections = check_positive_int(n_projections, "n_projections")
        check_generator(generator, m1.device)
        theta = _random.normal((n_projections, d), like=m1, generator=generator)
        theta = theta / torch.linalg.vector_norm(theta, dim=1, keepdim=True).clamp_min(1e-30)
    else:
        theta = check_directions(directions, d, like=m1)
    mean_part = (theta @ (m1 - m2)).pow(2)
    v1 = ((theta @ S1) * theta).sum(dim=1).clamp_min(0.0)
    v2 = ((theta @ S2) * theta).sum(dim=1).clamp_min(0.0)
    per_direction = mean_part + (v1.sqrt() - v2.sqrt()).pow(2)
    return per_direction.mean().sqrt()


def rbf_kernel_mean(m1: Tensor, S1: Tensor, m2: Tensor, S2: Tensor, lengthscale: float | Tensor) -> Tensor:
    """Mean of the RBF kernel between independent Gaussians (SPEC section 4).

    For X ~ N(m1, S1), Y ~ N(m2, S2) independent and k(x, y) = exp(-|x - y|^2 / (2 l^2)):
    ``E k(X, Y) = det(I + (S1 + S2) / l^2)^{-1/2} exp(-dm^T (l^2 I + S1 + S2)^{-1} dm / 2)``
    with dm = m1 - m2. Hence the population MMD^2 between N(m1, S1) and N(m2, S2) is
    ``rbf_kernel_mean(m1, S1, m1, S1, l) + rbf_kernel_mean(m2, S2, m2, S2, l)
    - 2 rbf_kernel_mean(m1, S1, m2, S2, l)`` (X, X' independent copies).

    Args:
        m1: (d,) mean of X.
        S1: (d, d) symmetric PSD covariance of X.
        m2: (d,) mean of Y.
        S2: (d, d) symmetric PSD covariance of Y.
        lengthscale: l > 0.

    Returns:
        0-d tensor in (0, 1], in ``m1``'s dtype promoted to at least float32.

    Raises:
        ValueError: on bad Gaussian parameters or ``lengthscale <= 0``.
    """
    m1, S1, m2, S2 = _check_gaussians(m1, S1, m2, S2)
    _psd_eigh(S1, "S1")
    _psd_eigh(S2, "S2")
    ell = check_positive(lengthscale, "lengthscale")
    d = m1.shape[0]
    eye = torch.eye(d, dtype=m1.dtype, device=m1.device)
    A = ell**2 * eye + S1 + S2  # symmetric positive definite
    L = torch.linalg.cholesky(A)
    dm = (m1 - m2).unsqueeze(1)
    w = torch.linalg.solve_triangular(L, dm, upper=False)
    quad = w.pow(2).sum()
    # log det(I + (S1 + S2) / l^2) = log det A - d log l^2
    logdet = 2.0 * torch.log(torch.diagonal(L)).sum() - 2.0 * d * math.log(ell)
    return torch.exp(-0.5 * logdet - 0.5 * quad)
