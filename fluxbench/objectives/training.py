"""Objectives as modules for :func:`fluxbench.train.train` (one sigma per batch)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_positive, check_positive_int
from ..fields.base import at_sigma
from .base import Objective, ObjectiveOutput
from .dsm import dsm_loss
from .flux import flux_matching_loss
from .noise import as_noise
from .proposal import ExponentialTimeProposal, LossNormaliser

__all__ = ["FluxMatching", "DenoisingScoreMatching"]


class FluxMatching(Objective):
    """The Flux Matching objective of SPEC section 2 for a (noise-conditioned) model.

    Each call draws one sigma from ``noise``, evaluates :func:`flux_matching_loss` on
    ``at_sigma(model, sigma)`` and returns the batch mean, optionally rescaled by a
    learned :class:`LossNormaliser` and with the REINFORCE term of a learned
    :class:`ExponentialTimeProposal`.

    Args:
        noise: a float (fixed sigma), a (lo, hi) log-uniform range, or a sampler.
        horizon, substeps, divergence, chains, chunk_size: passed to the loss.
        learn_proposal: train an exponential time proposal (else Uniform[0, H]).
        normalise: train a loss normaliser c(sigma).
    """

    def __init__(
        self,
        noise=0.1,
        *,
        horizon: float = 4.0,
        substeps: int = 4,
        divergence: str = "hutchinson",
        learn_proposal: bool = False,
        normalise: bool = False,
        chains: int | None = None,
        chunk_size: int | None = None,
    ):
        super().__init__()
        self.noise = as_noise(noise)
        self.chains = chains
        self.horizon = check_positive(horizon, "horizon")
        self.substeps = check_positive_int(substeps, "substeps")
        self.divergence = divergence
        self.chunk_size = chunk_size
        self.proposal = ExponentialTimeProposal(self.horizon) if learn_proposal else None
        self.normaliser = LossNormaliser() if normalise else None

    def forward(self, model: nn.Module, x: Tensor, generator: torch.Generator | None = None) -> ObjectiveOutput:
        sigma = self.noise.sample(x, generator)
        loss, info = flux_matching_loss(
            at_sigma(model, sigma),
            x,
            sigma,
            horizon=self.horizon,
            substeps=self.substeps,
            proposal=self.proposal,
            divergence=self.divergence,
            chains=self.chains,
            chunk_size=self.chunk_size,
            generator=generator,
            return_info=True,
        )
        mean = loss.mean()
        total = mean if self.normaliser is None else self.normaliser.total(mean, sigma)
        if self.proposal is not None:
            total = total + ExponentialTimeProposal.reinforce(mean, info.log_q)
        return ObjectiveOutput(total, {"flux_loss": float(mean.detach()), "sigma": sigma, "t": info.t})


class DenoisingScoreMatching(Objective):
    """Denoising score matching (the baseline), weighted by sigma^2 so levels are comparable.

    Args:
        noise: a float (fixed sigma), a (lo, hi) log-uniform range, or a sampler.
        target: ``"plain"`` or ``"batch"`` (see :func:`dsm_loss`).
        chunk_size: for the batch target.
    """

    def __init__(self, noise=0.1, *, target: str = "plain", chunk_size: int | None = None):
        super().__init__()
        self.noise = as_noise(noise)
        self.target = target
        self.chunk_size = chunk_size

    def forward(self, model: nn.Module, x: Tensor, generator: torch.Generator | None = None) -> ObjectiveOutput:
        sigma = self.noise.sample(x, generator)
        loss = dsm_loss(at_sigma(model, sigma), x, sigma, target=self.target, chunk_size=self.chunk_size, generator=generator)
        mean = loss.mean()
        return ObjectiveOutput(sigma * sigma * mean, {"dsm_loss": float(mean.detach()), "sigma": sigma})
