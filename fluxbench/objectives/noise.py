"""Distributions of the noise level sigma used during training (SPEC section 2)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_positive
from .._random import normal, uniform

__all__ = ["FixedSigma", "LogUniformSigma", "LogNormalSigma", "as_noise"]


class FixedSigma:
    """One noise level for every batch."""

    def __init__(self, sigma: float):
        self.sigma = check_positive(sigma, "sigma")

    def sample(self, like: Tensor, generator: torch.Generator | None = None) -> float:
        return self.sigma

    def __repr__(self) -> str:
        return f"FixedSigma({self.sigma:g})"


class LogUniformSigma:
    """log sigma ~ Uniform[log lo, log hi] (2-D toys: [0.02, 2])."""

    def __init__(self, lo: float, hi: float):
        self.lo = check_positive(lo, "lo")
        self.hi = check_positive(hi, "hi")
        if self.hi <= self.lo:
            raise ValueError(f"need lo < hi; got lo={lo}, hi={hi}")

    def sample(self, like: Tensor, generator: torch.Generator | None = None) -> float:
        u = float(uniform((), like, generator))
        return math.exp(math.log(self.lo) + u * (math.log(self.hi) - math.log(self.lo)))

    def __repr__(self) -> str:
        return f"LogUniformSigma({self.lo:g}, {self.hi:g})"


class LogNormalSigma:
    """log sigma ~ Normal(mean, std) (EDM images: mean -1.2, std 1.2)."""

    def __init__(self, mean: float = -1.2, std: float = 1.2):
        self.mean = float(mean)
        self.std = check_positive(std, "std")

    def sample(self, like: Tensor, generator: torch.Generator | None = None) -> float:
        return math.exp(self.mean + self.std * float(normal((), like, generator)))

    def __repr__(self) -> str:
        return f"LogNormalSigma({self.mean:g}, {self.std:g})"


def as_noise(spec) -> FixedSigma | LogUniformSigma | LogNormalSigma:
    """A float -> FixedSigma, a (lo, hi) pair -> LogUniformSigma, a sampler -> itself."""
    if hasattr(spec, "sample"):
        return spec
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise ValueError(f"a sigma range must be (lo, hi); got {spec!r}")
        return LogUniformSigma(*spec)
    return FixedSigma(spec)
