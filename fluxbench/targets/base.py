"""The ``Target`` protocol: an analytic distribution on R^d (SPEC section 4).

A target gives exact samples, its log density log p, its score s = grad log p (the
reference field of SPEC eq. (2)) and its exact Gaussian smoothing p * N(0, sigma^2 I),
so that every estimator in fluxbench can be checked against closed-form ground truth.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor

from .._checks import check_generator, check_points, check_positive_int, check_sigma
from ._linalg import check_dtype, work_dtype

__all__ = ["Target"]


class Target(abc.ABC):
    """Abstract analytic distribution p on R^d with exact sampling, density and score.

    Subclasses store their parameters as tensors (float64 unless moved with :meth:`to`)
    and implement ``_sample``, ``_log_prob``, ``_score``, ``_make_cast``, ``smoothed``,
    ``to`` and the moment properties. The public methods here validate the inputs
    (``fluxbench._checks``) and run the computation in the dtype and device of the
    input points, with the parameters cast once per (device, dtype) and cached.
    """

    def __init__(self) -> None:
        self._cast_cache: dict[tuple[torch.device, torch.dtype], Any] = {}

    # ------------------------------------------------------------------ properties
    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """The dimension d of the space R^d."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Device of the stored parameters (the default device of :meth:`sample`)."""

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype:
        """Dtype of the stored parameters (float64 unless moved with :meth:`to`)."""

    @property
    @abc.abstractmethod
    def mean(self) -> Tensor:
        """Exact mean E_p[X], shape (d,), in the stored dtype."""

    @property
    @abc.abstractmethod
    def covariance(self) -> Tensor:
        """Exact covariance Cov_p[X], shape (d, d), in the stored dtype."""

    # ------------------------------------------------------------------ public API
    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draw ``n`` exact, independent samples X ~ p.

        Every random number comes from ``generator`` (same seed, same samples, bit for
        bit on one device).

        Args:
            n: number of samples, >= 1.
            generator: optional ``torch.Generator`` on ``device``.
            device: output device; default the target's device (cpu unless moved).
            dtype: output floating dtype; default ``torch.get_default_dtype()``.

        Returns:
            Samples, shape (n, d).

        Raises:
            ValueError: if ``n < 1``, ``dtype`` is not floating, or the generator is on
                another device type.
        """
        n, device, dtype = self._check_sample_args(n, generator, device, dtype)
        return self._sample(n, generator, device, dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density log p(x) at each point.

        Args:
            x: points, shape (N, d), floating and finite.

        Returns:
            log p(x), shape (N,), with x's dtype and device (half-precision inputs are
            computed in float32 and cast back).

        Raises:
            ValueError: if ``x`` is not a finite floating (N, d) tensor with d = ``dim``.
        """
        x = check_points(x, "x", dim=self.dim)
        xw = x.to(work_dtype(x.dtype))
        return self._log_prob(xw).to(x.dtype)

    def score(self, x: Tensor) -> Tensor:
        """Score s(x) = grad_x log p(x) (SPEC eq. (2)), a field: same shape, dtype, device as x.

        Args:
            x: points, shape (N, d), floating and finite.

        Returns:
            s(x), shape (N, d).

        Raises:
            ValueError: if ``x`` is not a finite floating (N, d) tensor with d = ``dim``.
        """
        x = check_points(x, "x", dim=self.dim)
        xw = x.to(work_dtype(x.dtype))
        return self._score(xw).to(x.dtype)

    @abc.abstractmethod
    def smoothed(self, sigma: float | Tensor) -> "Target":
        """The exact convolution p_sigma = p * N(0, sigma^2 I) (SPEC section 4).

        Args:
            sigma: noise standard deviation (not a variance), > 0.

        Returns:
            A target of the same family.
        """

    def smoothed_score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Exact noise-conditioned score grad log p_sigma(x): the oracle ``model(x, sigma)``.

        Args:
            x: points, shape (N, d).
            sigma: noise standard deviation, > 0 (one level per call).

        Returns:
            grad log (p * N(0, sigma^2 I))(x), shape (N, d).
        """
        return self.smoothed(sigma).score(x)

    @abc.abstractmethod
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Target":
        """A copy with parameters stored on ``device`` / in ``dtype`` (None keeps the current one)."""

    # ------------------------------------------------------------------ helpers
    @abc.abstractmethod
    def _sample(self, n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Draw (n, d) samples; arguments already validated."""

    @abc.abstractmethod
    def _log_prob(self, x: Tensor) -> Tensor:
        """(N,) log density of validated (N, d) points in float32/float64."""

    @abc.abstractmethod
    def _score(self, x: Tensor) -> Tensor:
        """(N, d) score of validated (N, d) points in float32/float64."""

    @abc.abstractmethod
    def _make_cast(self, device: torch.device, dtype: torch.dtype) -> Any:
        """The parameters needed at evaluation time, cast to ``device`` / ``dtype``."""

    def _cast(self, device: torch.device, dtype: torch.dtype) -> Any:
        # Casting a (K, d, d) factor on every call would dominate small batches, and the
        # parameters never change after construction, so one cast per key is enough.
        key = (torch.device(device), dtype)
        cached = self._cast_cache.get(key)
        if cached is None:
            cached = self._make_cast(key[0], dtype)
            self._cast_cache[key] = cached
        return cached

    def _check_sample_args(
        self, n: object, generator: object, device: object, dtype: object
    ) -> tuple[int, torch.device, torch.dtype]:
        n = check_positive_int(n, "n")
        device = self.device if device is None else torch.device(device)
        dtype = torch.get_default_dtype() if dtype is None else check_dtype(dtype)
        check_generator(generator, device)
        return n, device, dtype

    @staticmethod
    def _sigma_value(sigma: object) -> float:
        """Validate sigma (a standard deviation > 0) and return it as a Python float."""
        return float(check_sigma(sigma))

    @staticmethod
    def _resolve_to(current_device: torch.device, current_dtype: torch.dtype, device: object, dtype: object):
        device = current_device if device is None else torch.device(device)
        dtype = current_dtype if dtype is None else check_dtype(dtype)
        return device, dtype
