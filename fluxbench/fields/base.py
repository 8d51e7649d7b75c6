"""What a field is, and how a noise-conditioned model becomes one.

A *field* is any callable ``f(x) -> Tensor`` mapping (N, d) points to (N, d) vectors with
x's dtype and device (SPEC section 1). A noise-conditioned model is called
``model(x, sigma)``; :func:`at_sigma` fixes sigma and returns a plain field.

Optional fast path. A field may also define ``defect_pullback(x, probe)`` (a
noise-conditioned model ``defect_pullback(x, probe, sigma)``) returning either None or a
pair ``(f(x), pullback)`` with

    pullback(s) = grad_x [s . f(x) + probe^T J_f(x) probe]      (s, probe held fixed),

all (N, d). The Flux Matching loss needs exactly this at its chain end points (the field
part of grad r_hat, SPEC section 2, steps 3-4); without the method it is autograd's
double backward. :class:`fluxbench.fields.MLPField` implements it in closed form. The loss
calls both the method and the pullback inside ``torch.inference_mode()``: they must
compute without autograd.
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

    def defect_pullback(self, x: Tensor, probe: Tensor):
        method = getattr(self.model, "defect_pullback", None)
        return None if method is None else method(x, probe, check_sigma(self.sigma, like=x))

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
