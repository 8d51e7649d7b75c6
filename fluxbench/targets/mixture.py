"""Gaussian mixture target sum_k w_k N(m_k, Sigma_k) (SPEC section 4, "Gaussian mixtures")."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .._checks import check_points
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
from .gaussian import Gaussian

__all__ = ["GaussianMixture"]


class _MixtureCast(NamedTuple):
    log_weights: Tensor  # (K,)
    means: Tensor  # (K, d)
    chol: Tensor  # (K, d, d)
    half_logdet: Tensor  # (K,)


def _check_weights(weights: object, device: torch.device | None = None) -> Tensor:
    w = as_float64(weights, "weights", device=device)
    if w.ndim != 1 or w.shape[0] == 0:
        raise ValueError(f"weights must have shape (K,) with K >= 1; got shape {tuple(w.shape)}")
    check_finite_parameter(w, "weights")
    if bool((w <= 0).any()):
        raise ValueError(f"weights must all be > 0 (negative or zero weights are not allowed); got {w.tolist()}")
    return w / w.sum()


def _check_means(means: object, n_components: int, device: torch.device) -> Tensor:
    m = as_float64(means, "means", device=device)
    if m.ndim != 2 or m.shape[0] != n_components or m.shape[1] == 0:
        raise ValueError(
            f"means must have shape (K, d) with K = {n_components} (the number of weights) and d >= 1; "
            f"got shape {tuple(m.shape)}"
        )
    check_finite_parameter(m, "means")
    return m


class GaussianMixture(Target):
    """Mixture p(x) = sum_k w_k N(x; m_k, Sigma_k) with full covariances (SPEC section 4).

    log p(x) = logsumexp_k [log w_k + log N(x; m_k, Sigma_k)] and
    s(x) = sum_k r_k(x) (-Sigma_k^{-1} (x - m_k)) with responsibilities
    r_k(x) = w_k N(x; m_k, Sigma_k) / p(x). Each component is evaluated through its
    Cholesky factor by triangular solves. Smoothing adds sigma^2 I to every Sigma_k.
    Moments: mean = sum_k w_k m_k, covariance (law of total covariance)
    = sum_k w_k Sigma_k + sum_k w_k (m_k - mean)(m_k - mean)^T.

    Args:
        weights: shape (K,), every entry > 0; they are normalised to sum to 1
            internally, so ``[1, 1, 2]`` means ``[0.25, 0.25, 0.5]``.
        means: m_k, shape (K, d).
        covariances: Sigma_k, shape (K, d, d), each symmetric positive definite.
            Isotropic components: use :meth:`isotropic`.

    Raises:
        ValueError: on wrong shapes, NaN/inf entries, a weight <= 0, or a
            non-symmetric / non-positive-definite covariance (the message names the
            component and its smallest eigenvalue).

    Parameters are stored in float64 on ``means``'s device (cpu for non-tensors).
    """

    def __init__(
        self,
        weights: Tensor | Sequence[float],
        means: Tensor | Sequence[Sequence[float]],
        covariances: Tensor | Sequence[Sequence[Sequence[float]]],
    ) -> None:
        super().__init__()
        device = means.device if isinstance(means, Tensor) else None
        w = _check_weights(weights, device)
        m = _check_means(means, w.shape[0], w.device)
        k, d = m.shape
        in_dtype = covariances.dtype if isinstance(covariances, Tensor) else torch.float64
        c = as_float64(covariances, "covariances", device=m.device)
        if c.shape != (k, d, d):
            raise ValueError(
                f"covariances must have shape (K, d, d) = ({k}, {d}, {d}) to match weights and means; "
                f"got shape {tuple(c.shape)}"
            )
        check_finite_parameter(c, "covariances")
        c = symmetrize_or_raise(c, "covariances", in_dtype)
        self._set(w, m, c, cholesky_or_raise(c, "covariances"))

    def _set(self, weights: Tensor, means: Tensor, covs: Tensor, chol: Tensor) -> None:
        self._weights = weights
        self._means = means
        self._covs = covs
        self._chol = chol

    @classmethod
    def _from_parts(cls, weights: Tensor, means: Tensor, covs: Tensor, chol: Tensor) -> "GaussianMixture":
        # Internal constructor for validated parameters (to(), smoothed(), isotropic()).
        obj = cls.__new__(cls)
        Target.__init__(obj)
        obj._set(weights, means, covs, chol)
        return obj

    @classmethod
    def isotropic(
        cls,
        weights: Tensor | Sequence[float],
        means: Tensor | Sequence[Sequence[float]],
        stds: Tensor | Sequence[float] | float,
    ) -> "GaussianMixture":
        """Mixture of isotropic components: Sigma_k = stds_k^2 I.

        Args:
            weights: shape (K,), entries > 0 (normalised internally).
            means: shape (K, d).
            stds: per-component standard deviations, shape (K,), or one number for all.

        Returns:
            The mixture.
        """
        device = means.device if isinstance(means, Tensor) else None
        w = _check_weights(weights, device)
        m = _check_means(means, w.shape[0], w.device)
        k, d = m.shape
        s = as_float64(stds, "stds", device=m.device)
        if s.ndim == 0:
            s = s.expand(k)
        if s.shape != (k,):
            raise ValueError(f"stds must be a number or have shape (K,) = ({k},); got shape {tuple(s.shape)}")
        check_finite_parameter(s, "stds")
        if bool((s <= 0).any()):
            raise ValueError(f"stds must all be > 0; got {s.tolist()}")
        eye = torch.eye(d, dtype=torch.float64, device=m.device)
        covs = (s * s)[:, None, None] * eye
        chol = s[:, None, None] * eye
        return cls._from_parts(w, m, covs, chol)

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return int(self._means.shape[1])

    @property
    def n_components(self) -> int:
        """K, the number of components."""
        return int(self._means.shape[0])

    @property
    def device(self) -> torch.device:
        return self._means.device

    @property
    def dtype(self) -> torch.dtype:
        return self._means.dtype

    @property
    def weights(self) -> Tensor:
        """Normalised weights w_k, shape (K,), summing to 1."""
        return self._weights.clone()

    @property
    def means(self) -> Tensor:
        """Component means m_k, shape (K, d)."""
        return self._means.clone()

    @property
    def covariances(self) -> Tensor:
        """Component covariances Sigma_k, shape (K, d, d)."""
        return self._covs.clone()

    @property
    def mean(self) -> Tensor:
        """sum_k w_k m_k, shape (d,)."""
        return self._weights @ self._means

    @property
    def covariance(self) -> Tensor:
        """Law of total covariance sum_k w_k (Sigma_k + (m_k - mean)(m_k - mean)^T), shape (d, d)."""
        # Centring the means first avoids the cancellation in E[X X^T] - mean mean^T.
        centred = self._means - self.mean
        within = torch.einsum("k,kij->ij", self._weights, self._covs)
        between = torch.einsum("k,ki,kj->ij", self._weights, centred, centred)
        return within + between

    def component(self, k: int) -> Gaussian:
        """Component k as a :class:`Gaussian` N(m_k, Sigma_k) (its weight is dropped)."""
        if isinstance(k, bool) or not isinstance(k, int) or not -self.n_components <= k < self.n_components:
            raise ValueError(f"k must be an integer in [0, {self.n_components}); got {k!r}")
        return Gaussian._from_parts(self._means[k], self._covs[k], self._chol[k])

    # ------------------------------------------------------------------ Target API
    def responsibilities(self, x: Tensor) -> Tensor:
        """Posterior component probabilities r_k(x) = w_k N(x; m_k, Sigma_k) / p(x).

        Args:
            x: points, shape (N, d).

        Returns:
            r, shape (N, K), rows summing to 1, in x's dtype and device.
        """
        x = check_points(x, "x", dim=self.dim)
        xw = x.to(work_dtype(x.dtype))
        log_joint, _ = self._log_joint(xw)
        return torch.softmax(log_joint, dim=0).transpose(0, 1).to(x.dtype)

    def sample_with_components(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Exact samples together with the component each was drawn from.

        Draws the labels k ~ Categorical(w) with ``torch.multinomial``, then
        x = m_k + L_k z with z ~ N(0, I), both from ``generator`` in that order;
        :meth:`sample` returns the same x for the same seed.

        Args:
            n: number of samples, >= 1.
            generator: optional ``torch.Generator`` on ``device``.
            device: output device; default the target's device.
            dtype: output floating dtype; default ``torch.get_default_dtype()``.

        Returns:
            ``(x, k)``: samples (n, d) and int64 labels (n,).
        """
        n, device, dtype = self._check_sample_args(n, generator, device, dtype)
        return self._sample_with_components(n, generator, device, dtype)

    def smoothed(self, sigma: float | Tensor) -> "GaussianMixture":
        """sum_k w_k N(m_k, Sigma_k + sigma^2 I), the exact law of X + sigma Z (SPEC section 4).

        Args:
            sigma: noise standard deviation, > 0.

        Returns:
            The smoothed mixture, stored in this target's dtype and device.
        """
        s = self._sigma_value(sigma)
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        covs = self._covs + (s * s) * eye
        return GaussianMixture._from_parts(self._weights, self._means, covs, factor_like(covs, "smoothed covariances"))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "GaussianMixture":
        device, dtype = self._resolve_to(self.device, self.dtype, device, dtype)
        return GaussianMixture._from_parts(
            *(t.to(device=device, dtype=dtype) for t in (self._weights, self._means, self._covs, self._chol))
        )

    def _make_cast(self, device: torch.device, dtype: torch.dtype) -> _MixtureCast:
        # Logs are taken in the stored dtype, before rounding to the evaluation dtype.
        half_logdet = torch.log(torch.diagonal(self._chol, dim1=-2, dim2=-1)).sum(-1)
        return _MixtureCast(
            log_weights=torch.log(self._weights).to(device=device, dtype=dtype),
            means=self._means.to(device=device, dtype=dtype),
            chol=self._chol.to(device=device, dtype=dtype),
            half_logdet=half_logdet.to(device=device, dtype=dtype),
        )

    def _log_joint(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """log w_k + log N(x; m_k, Sigma_k), shape (K, N), and whitened residuals (K, d, N)."""
        p = self._cast(x.device, x.dtype)
        log_dens, y = gaussian_terms(x, p.means, p.chol, p.half_logdet)
        return log_dens + p.log_weights.unsqueeze(1), y

    def _log_prob(self, x: Tensor) -> Tensor:
        log_joint, _ = self._log_joint(x)
        return torch.logsumexp(log_joint, dim=0)

    def _score(self, x: Tensor) -> Tensor:
        p = self._cast(x.device, x.dtype)
        log_joint, y = self._log_joint(x)
        # softmax over components = responsibilities, stable for points far from all modes
        resp = torch.softmax(log_joint, dim=0)  # (K, N)
        comp_scores = precision_times(p.chol, y)  # (K, d, N): Sigma_k^{-1} (x - m_k)
        return -(resp.unsqueeze(1) * comp_scores).sum(dim=0).transpose(0, 1).contiguous()

    def _sample(self, n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
        return self._sample_with_components(n, generator, device, dtype)[0]

    def _sample_with_components(
        self, n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        wd = work_dtype(dtype)
        p = self._cast(device, wd)
        # Labels use the stored-precision weights so that they do not depend on ``dtype``.
        labels = torch.multinomial(self._weights.to(device), n, replacement=True, generator=generator)
        z = torch.randn((n, self.dim), generator=generator, device=device, dtype=wd)
        x = torch.empty_like(z)
        for k in range(self.n_components):
            idx = (labels == k).nonzero().squeeze(1)
            x[idx] = p.means[k] + z[idx] @ p.chol[k].transpose(0, 1)
        return x.to(dtype), labels

    def __repr__(self) -> str:
        k, d = self.n_components, self.dim
        if k > 8 or d > 4:
            return f"GaussianMixture(K={k}, dim={d})"
        variances = torch.diagonal(self._covs, dim1=-2, dim2=-1)  # (K, d)
        eye = torch.eye(d, dtype=self.dtype, device=self.device)
        if bool(torch.equal(self._covs, variances[:, :1, None] * eye)):
            spread = f"stds={format_tensor(variances[:, 0].sqrt())}"
        else:
            spread = f"covariances={format_tensor(self._covs)}"
        return (
            f"GaussianMixture(K={k}, dim={d}, weights={format_tensor(self._weights)}, "
            f"means={format_tensor(self._means)}, {spread})"
        )
