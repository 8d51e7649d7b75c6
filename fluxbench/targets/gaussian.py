"""Full-covariance Gaussian target N(m, Sigma) (SPEC section 4, "Gaussian targets")."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .._checks import check_positive, check_positive_int
from ._linalg import (
    as_float64,
    check_finite_parameter,
    cholesky_or_raise,
    factor_like,
    format_tensor,
    gaussian_terms,
    precision_times,
    symmetrize_or_raise,
    work_dtype,
)
from .base import Target

__all__ = ["Gaussian"]


class _GaussianCast(NamedTuple):
    means: Tensor  # (1, d)
    chol: Tensor  # (1, d, d)
    half_logdet: Tensor  # (1,)


class Gaussian(Target):
    """Multivariate normal p = N(m, Sigma) with full covariance (SPEC section 4).

    log p(x) = -(x - m)^T Sigma^{-1} (x - m) / 2 - log det(Sigma) / 2 - d log(2 pi) / 2,
    s(x) = grad log p(x) = -Sigma^{-1} (x - m), both evaluated through the Cholesky
    factor L (Sigma = L L^T) by triangular solves. Sampling: x = m + L z, z ~ N(0, I).
    Smoothing: p * N(0, sigma^2 I) = N(m, Sigma + sigma^2 I).

    Args:
        mean: m, shape (d,) (tensor or sequence of numbers).
        covariance: Sigma, shape (d, d), symmetric positive definite.

    Raises:
        ValueError: on a wrong shape, a NaN/inf entry, a non-symmetric or a
            non-positive-definite covariance (the message gives its smallest eigenvalue).

    Parameters are stored in float64 (on ``mean``'s device if it is a tensor, else cpu);
    ``to`` changes that.
    """

    def __init__(self, mean: Tensor | Sequence[float], covariance: Tensor | Sequence[Sequence[float]]) -> None:
        super().__init__()
        m = as_float64(mean, "mean")
        if m.ndim != 1 or m.shape[0] == 0:
            raise ValueError(f"mean must have shape (d,) with d >= 1; got shape {tuple(m.shape)}")
        check_finite_parameter(m, "mean")
        d = m.shape[0]
        in_dtype = covariance.dtype if isinstance(covariance, Tensor) else torch.float64
        c = as_float64(covariance, "covariance", device=m.device)
        if c.shape != (d, d):
            raise ValueError(f"covariance must have shape (d, d) = ({d}, {d}) to match mean; got shape {tuple(c.shape)}")
        check_finite_parameter(c, "covariance")
        c = symmetrize_or_raise(c, "covariance", in_dtype)
        self._set(m, c, cholesky_or_raise(c, "covariance"))

    def _set(self, mean: Tensor, cov: Tensor, chol: Tensor) -> None:
        self._mean = mean
        self._cov = cov
        self._chol = chol

    @classmethod
    def _from_parts(cls, mean: Tensor, cov: Tensor, chol: Tensor) -> "Gaussian":
        # Internal constructor for already validated parameters (to(), smoothed()):
        # skips the checks and keeps the given dtype instead of promoting to float64.
        obj = cls.__new__(cls)
        Target.__init__(obj)
        obj._set(mean, cov, chol)
        return obj

    @classmethod
    def isotropic(cls, dim: int, std: float = 1.0, mean: Tensor | Sequence[float] | None = None) -> "Gaussian":
        """N(mean, std^2 I) in R^dim.

        Args:
            dim: d >= 1.
            std: standard deviation per coordinate, > 0.
            mean: shape (d,); default the origin.

        Returns:
            The isotropic Gaussian.
        """
        dim = check_positive_int(dim, "dim")
        std = check_positive(std, "std")
        m = torch.zeros(dim, dtype=torch.float64) if mean is None else as_float64(mean, "mean")
        if m.shape != (dim,):
            raise ValueError(f"mean must have shape (dim,) = ({dim},); got shape {tuple(m.shape)}")
        check_finite_parameter(m, "mean")
        cov = torch.eye(dim, dtype=torch.float64, device=m.device) * std**2
        return cls._from_parts(m, cov, torch.eye(dim, dtype=torch.float64, device=m.device) * std)

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return int(self._mean.shape[0])

    @property
    def device(self) -> torch.device:
        return self._mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self._mean.dtype

    @property
    def mean(self) -> Tensor:
        """m, shape (d,)."""
        return self._mean.clone()

    @property
    def covariance(self) -> Tensor:
        """Sigma, shape (d, d)."""
        return self._cov.clone()

    @property
    def precision(self) -> Tensor:
        """Sigma^{-1} = L^{-T} L^{-1}, shape (d, d) (from the Cholesky factor, symmetrised)."""
        p = torch.cholesky_inverse(self._chol)
        return 0.5 * (p + p.transpose(0, 1))

    @property
    def scale_tril(self) -> Tensor:
        """Lower Cholesky factor L with L L^T = Sigma, shape (d, d)."""
        return self._chol.clone()

    # ------------------------------------------------------------------ Target API
    def smoothed(self, sigma: float | Tensor) -> "Gaussian":
        """N(m, Sigma + sigma^2 I), the exact law of X + sigma Z (SPEC section 4).

        Args:
            sigma: noise standard deviation, > 0.

        Returns:
            The smoothed Gaussian, stored in this target's dtype and device.
        """
        s = self._sigma_value(sigma)
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        cov = self._cov + (s * s) * eye
        return Gaussian._from_parts(self._mean, cov, factor_like(cov, "smoothed covariance"))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Gaussian":
        device, dtype = self._resolve_to(self.device, self.dtype, device, dtype)
        return Gaussian._from_parts(
            self._mean.to(device=device, dtype=dtype),
            self._cov.to(device=device, dtype=dtype),
            self._chol.to(device=device, dtype=dtype),
        )

    def _make_cast(self, device: torch.device, dtype: torch.dtype) -> _GaussianCast:
        # log det is taken from the stored (float64 by default) factor before rounding.
        half_logdet = torch.log(torch.diagonal(self._chol)).sum()
        return _GaussianCast(
            means=self._mean.to(device=device, dtype=dtype).unsqueeze(0),
            chol=self._chol.to(device=device, dtype=dtype).unsqueeze(0),
            half_logdet=half_logdet.to(device=device, dtype=dtype).reshape(1),
        )

    def _sample(self, n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
        wd = work_dtype(dtype)
        p = self._cast(device, wd)
        z = torch.randn((n, self.dim), generator=generator, device=device, dtype=wd)
        return (p.means[0] + z @ p.chol[0].transpose(0, 1)).to(dtype)

    def _log_prob(self, x: Tensor) -> Tensor:
        p = self._cast(x.device, x.dtype)
        log_dens, _ = gaussian_terms(x, p.means, p.chol, p.half_logdet)
        return log_dens[0]

    def _score(self, x: Tensor) -> Tensor:
        p = self._cast(x.device, x.dtype)
        _, y = gaussian_terms(x, p.means, p.chol, p.half_logdet)
        return -precision_times(p.chol, y)[0].transpose(0, 1).contiguous()

    def __repr__(self) -> str:
        if self.dim <= 4:
            return f"Gaussian(dim={self.dim}, mean={format_tensor(self._mean)}, covariance={format_tensor(self._cov)})"
        eig = torch.linalg.eigvalsh(self._cov.to(torch.float64))
        return (
            f"Gaussian(dim={self.dim}, |mean|={float(self._mean.norm()):.4g}, "
            f"covariance eigenvalues in [{float(eig[0]):.4g}, {float(eig[-1]):.4g}])"
        )
