"""Learned helpers of the noise-annealed objective (SPEC section 2, "Noise annealing")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive
from .._random import uniform

__all__ = ["ExponentialTimeProposal", "LossNormaliser"]


class ExponentialTimeProposal(nn.Module):
    """Truncated exponential time proposal on [0, H] with a noise-dependent rate.

        lambda(sigma) = 1 + softplus(a log sigma + b)
        q(t) = lambda exp(-lambda t) / (1 - exp(-lambda H))
        t = -log(1 - u (1 - exp(-lambda H))) / lambda,  u ~ Uniform[0, 1)   (inverse CDF)

    E_q[loss / q] does not depend on q (the loss carries the weight 1 / q(t)), so the
    proposal only changes the variance. It is trained by REINFORCE on the second moment of
    the importance-weighted loss: :meth:`reinforce` returns -stopgrad(target) log q(t)
    with target = (weighted loss)^2, whose gradient in (a, b) is the gradient of that
    second moment, i.e. of the estimator's variance. With a :class:`LossNormaliser` the
    weighted loss is the normalised one, L exp(-c(sigma)) (as in the published annealed
    example; see :class:`fluxbench.objectives.FluxMatching`).

    Args:
        horizon: H (> 0).
        a, b: initial parameters (a = b = 0 gives lambda = 1 + log 2).
    """

    def __init__(self, horizon: float = 4.0, a: float = 0.0, b: float = 0.0):
        super().__init__()
        self.horizon = check_positive(horizon, "horizon")
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(torch.tensor(float(b)))

    def rate(self, sigma: float | Tensor) -> Tensor:
        """lambda(sigma), a 0-d tensor (differentiable in a, b)."""
        log_sigma = torch.log(torch.as_tensor(sigma, dtype=self.a.dtype, device=self.a.device))
        return 1 + F.softplus(self.a * log_sigma + self.b)

    def log_prob(self, t: Tensor, sigma: float | Tensor) -> Tensor:
        """log q(t) = log lambda - lambda t - log(1 - exp(-lambda H))."""
        lam = self.rate(sigma)
        return torch.log(lam) - lam * t - torch.log(-torch.expm1(-lam * self.horizon))

    def sample(self, sigma: float | Tensor, like: Tensor, generator: torch.Generator | None = None):
        """Draw t ~ q by inverse CDF.

        Returns:
            (t, log_q): t a 0-d tensor (detached), log_q a 0-d tensor differentiable in
            the proposal's parameters (for REINFORCE).
        """
        u = uniform((), like, generator).to(self.a.dtype)
        with torch.no_grad():
            lam = self.rate(sigma)
            t = -torch.log1p(-u * (-torch.expm1(-lam * self.horizon))) / lam
        return t, self.log_prob(t, sigma)

    @staticmethod
    def reinforce(weighted_loss_mean: Tensor, log_q: Tensor) -> Tensor:
        """The REINFORCE surrogate -stopgrad(L^2) log q(t) for the batch-mean weighted loss L
        (normalised by the loss normaliser when there is one); 0-d tensors in and out."""
        return -(weighted_loss_mean.detach() ** 2) * log_q


class LossNormaliser(nn.Module):
    """Per-noise-level loss scale c(sigma) = a log sigma + b (SPEC section 2).

    total = loss * exp(-c) + c, whose minimiser in c satisfies exp(c) = E[loss | sigma],
    so every noise level contributes O(1) to the total. c is clamped to [-c_max, c_max]
    because a single noisy batch with negative mean loss would otherwise drive c to -inf.
    """

    def __init__(self, c_max: float = 30.0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.0))
        self.b = nn.Parameter(torch.tensor(0.0))
        self.c_max = check_positive(c_max, "c_max")

    def forward(self, sigma: float | Tensor) -> Tensor:
        """c(sigma), a 0-d tensor."""
        log_sigma = math.log(float(sigma))
        return (self.a * log_sigma + self.b).clamp(-self.c_max, self.c_max)

    def total(self, loss_mean: Tensor, sigma: float | Tensor) -> Tensor:
        """loss * exp(-c) + c for the batch-mean loss."""
        c = self(sigma)
        return loss_mean * torch.exp(-c) + c
