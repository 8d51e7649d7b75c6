"""What a field is, and how a noise-conditioned model becomes one.

A *field* is any callable ``f(x) -> Tensor`` mapping (N, d) points to (N, d) vectors with
x's dtype and device (SPEC section 1). A noise-conditioned model is called
``model(x, sigma)``; :func:`at_sigma` fixes sigma and returns a plain field.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .._checks import check_sigma

__all__ = ["Field", "at_sigma", "is_sigma_conditioned"]

Field = Callable[[Tensor], Tensor]


def is_sigma_conditioned(model: object) -> bool:
    """Whether ``model`` is called as ``model(x, sigma)`` (its ``sigma_conditioned`` attribute)."""
    return bool(getattr(model, "sigma_conditioned", False))


class _AtSigma:
    def __init__(self, model: Callable[[Tensor, Tensor], Tensor], sigma: float | Tensor):
        self.model = model
        self.sigma = sigma

    def __call__(self, x: Tensor) -> Tensor:
        return self.model(x, check_sigma(self.sigma, like=x))

    def __repr__(self) -> str:
        return f"at_sigma({self.model!r}, sigma={float(self.sigma):g})"


def at_sigma(model: Callable[..., Tensor], sigma: float | Tensor) -> Field:
    """The plain field ``x -> model(x, sigma)`` of a noise-conditioned model.

    Models that are not noise-conditioned (``is_sigma_conditioned(model)`` is False) are
    returned unchanged, so callers can write ``at_sigma(model, sigma)`` for either kind.

    Args:
        model: ``model(x, sigma)`` with x (N, d) and sigma a 0-d tensor.
        sigma: the noise level (a standard deviation, > 0).
    """
    check_sigma(sigma)
    if not is_sigma_conditioned(model):
        return model
    return _AtSigma(model, sigma)
