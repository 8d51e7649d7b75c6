"""Validation and Cholesky helpers shared by the Gaussian and mixture targets.

Parameters are converted to float64 and factorised once; densities and scores then
use triangular solves against the Cholesky factor (never an explicit inverse), which
keeps ``log_prob`` and ``score`` accurate to a few ulps in float64 (SPEC section 4).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import all_finite

__all__ = [
    "LOG_2PI",
    "as_float64",
    "check_dtype",
    "check_finite_parameter",
    "cholesky_or_raise",
    "factor_like",
    "format_tensor",
    "gaussian_terms",
    "precision_times",
    "symmetrize_or_raise",
    "work_dtype",
]

LOG_2PI = math.log(2.0 * math.pi)


def as_float64(value: object, name: str, device: torch.device | str | None = None) -> Tensor:
    """Convert a tensor / sequence / number to a float64 tensor (the storage dtype).

    A tensor keeps its device unless ``device`` is given; anything else goes to ``device``
    (cpu by default).
    """
    if isinstance(value, Tensor):
        if value.is_complex():
            raise ValueError(f"{name} must be real; got dtype {value.dtype}")
        if device is None:
            device = value.device
        return value.detach().to(device=device, dtype=torch.float64)
    try:
        return torch.as_tensor(value, dtype=torch.float64, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be a tensor or a nested sequence of numbers; got {value!r}") from exc


def check_finite_parameter(t: Tensor, name: str) -> None:
    """Raise ``ValueError`` if the parameter tensor ``t`` has a NaN or inf entry."""
    if not all_finite(t):
        raise ValueError(f"{name} contains NaN or inf entries (shape {tuple(t.shape)})")


def check_dtype(dtype: object, name: str = "dtype") -> torch.dtype:
    """Check that ``dtype`` is a floating ``torch.dtype``."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating torch.dtype; got {dtype!r}")
    return dtype


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which linear algebra runs for inputs of ``dtype``.

    Triangular solves are not implemented for half types on every backend, and half
    precision would lose the density anyway, so float16/bfloat16 inputs are promoted
    to float32 (results are cast back to the input dtype).
    """
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def symmetrize_or_raise(cov: Tensor, name: str, input_dtype: torch.dtype) -> Tensor:
    """Check that the (..., d, d) matrices ``cov`` are symmetric and return (C + C^T) / 2.

    The tolerance is sqrt(eps) of the dtype the caller supplied (``input_dtype``) times
    the largest entry: rounding noise from building C as A A^T passes, a genuinely
    non-symmetric matrix does not.
    """
    eps = torch.finfo(input_dtype).eps if input_dtype.is_floating_point else torch.finfo(torch.float64).eps
    asym = (cov - cov.transpose(-1, -2)).abs().amax(dim=(-1, -2))
    scale = cov.abs().amax(dim=(-1, -2))
    bad = asym > math.sqrt(eps) * scale
    if bool(bad.any()):
        where = "" if cov.ndim == 2 else f" (component {int(bad.reshape(-1).nonzero()[0])})"
        raise ValueError(
            f"{name} must be symmetric{where}; max |C - C^T| = {float(asym.max()):.3g} "
            f"for max |C| = {float(scale.max()):.3g}"
        )
    return 0.5 * (cov + cov.transpose(-1, -2))


def cholesky_or_raise(cov: Tensor, name: str) -> Tensor:
    """Lower Cholesky factor L (L L^T = C) of the symmetric (..., d, d) matrices ``cov``.

    Raises:
        ValueError: if a matrix is not positive definite; the message gives its
            smallest eigenvalue.
    """
    chol, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):
        flat_info = info.reshape(-1)
        k = int((flat_info != 0).nonzero()[0])
        bad = cov.reshape(-1, cov.shape[-2], cov.shape[-1])[k]
        lam_min = float(torch.linalg.eigvalsh(bad)[0])
        where = "" if cov.ndim == 2 else f" (component {k})"
        raise ValueError(
            f"{name} must be positive definite{where}; its smallest eigenvalue is {lam_min:.6g}"
        )
    return chol


def gaussian_terms(
    x: Tensor, means: Tensor, chol: Tensor, half_logdet: Tensor
) -> tuple[Tensor, Tensor]:
    """Log densities and whitened residuals of K Gaussians at N points.

    log N(x; m_k, C_k) = -|y_k|^2 / 2 - log det L_k - d log(2 pi) / 2, with
    y_k = L_k^{-1} (x - m_k) from one batched triangular solve.

    Args:
        x: (N, d) points.
        means: (K, d) component means.
        chol: (K, d, d) lower Cholesky factors of the covariances.
        half_logdet: (K,) sum_i log L_k,ii = log det(C_k) / 2.

    Returns:
        ``(log_dens, y)`` with log_dens (K, N) and y (K, d, N).
    """
    d = x.shape[1]
    diff = (x.unsqueeze(0) - means.unsqueeze(1)).transpose(1, 2)  # (K, d, N)
    y = torch.linalg.solve_triangular(chol, diff, upper=False)
    log_dens = -0.5 * y.square().sum(dim=1) - half_logdet.unsqueeze(1) - 0.5 * d * LOG_2PI
    return log_dens, y


def precision_times(chol: Tensor, y: Tensor) -> Tensor:
    """C^{-1} (x - m) = L^{-T} y for (K, d, d) factors and (K, d, N) whitened residuals y."""
    return torch.linalg.solve_triangular(chol.transpose(-1, -2), y, upper=True)


def factor_like(cov: Tensor, name: str) -> Tensor:
    """Cholesky factor of ``cov`` computed in float64 and returned in ``cov``'s dtype.

    Used when a target stored in float32 is smoothed: factorising in float64 and then
    rounding keeps the factor as accurate as the storage dtype allows.
    """
    return cholesky_or_raise(cov.to(torch.float64), name).to(cov.dtype)


def format_tensor(t: Tensor) -> str:
    """A short nested-list rendering of a small tensor with 4 significant digits."""

    def fmt(v: object) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(fmt(u) for u in v) + "]"
        return f"{v:.4g}"

    t = t.detach().cpu().to(torch.float64)
    # cos(pi/2) = 6e-17 and the like: print the rounding noise as 0
    scale = float(t.abs().max()) if t.numel() else 0.0
    t = torch.where(t.abs() <= 1e-12 * scale, torch.zeros_like(t), t)
    return fmt(t.tolist())
