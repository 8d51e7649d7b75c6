"""Objectives as modules for :func:`fluxbench.train.train` (one sigma per batch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import check_positive, check_positive_int
from ..fields.base import at_sigma
from .base import Objective, ObjectiveOutput
from .dsm import dsm_loss
from .flux import flux_matching_loss
from .noise import as_noise
from .proposal import ExponentialTimeProposal, LossNormaliser

__all__ = ["FluxMatching", "DenoisingScoreMatching", "TrainingOutput"]


@dataclass
class TrainingOutput(ObjectiveOutput):
    """An :class:`ObjectiveOutput` that also names the model's own objective.

    Attributes:
        loss: what is backpropagated: the model's objective (possibly rescaled by a loss
            normaliser) plus surrogate terms that only train the objective's auxiliary
            parameters (normaliser, time proposal).
        logs: values to record; 0-d tensors are converted by the training loop in the
            step's single host synchronisation.
        model_loss: 0-d tensor, the model's objective without surrogate terms (for Flux
            Matching the batch-mean flux loss, an estimate of 2 J_H, SPEC eq. (7));
            :func:`fluxbench.train.train` logs it as ``loss``.
    """

    model_loss: Tensor | None = None


class FluxMatching(Objective):
    """The Flux Matching objective of SPEC section 2 for a (noise-conditioned) model.

    Each call draws one sigma from ``noise``, evaluates :func:`flux_matching_loss` on
    ``at_sigma(model, sigma)`` and returns the batch mean, optionally rescaled by a
    learned :class:`LossNormaliser` and with the REINFORCE term of a learned
    :class:`ExponentialTimeProposal`.

    With L the batch-mean flux loss, c = c(sigma) the normaliser and log q(t) the proposal's
    log density of the drawn t (SPEC section 2, "Noise annealing"), the backpropagated total is

        total = L exp(-c) + c            (normaliser on; else L)
              - stopgrad(T^2) log q(t)   (proposal on),  T = L exp(-c) (normaliser on; else L).

    The REINFORCE target uses the *normalised* loss, as the published annealed example does:
    the raw L spans ~1e8 between sigma = 0.02 and 2, so its square would make the proposal
    follow the smallest sigmas only. The model receives exp(-c) grad L; the surrogate terms
    train only the normaliser and the proposal (their parameters form the training loop's
    auxiliary group, clipped on their own).

    The output is a :class:`TrainingOutput` with ``model_loss`` = L and logs ``sigma``, ``t``,
    and, when on, ``normaliser`` (L exp(-c) + c), ``normaliser_c`` (c) and ``reinforce``
    (-T^2 log q(t)).

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

    def forward(self, model: nn.Module, x: Tensor, generator: torch.Generator | None = None) -> TrainingOutput:
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
        logs: dict[str, float | Tensor] = {"sigma": sigma, "t": info.t}
        total, target = mean, mean
        if self.normaliser is not None:
            c = self.normaliser(sigma)
            target = mean * torch.exp(-c.detach())
            total = mean * torch.exp(-c) + c  # LossNormaliser.total
            logs["normaliser"] = total.detach()
            logs["normaliser_c"] = c.detach()
        if self.proposal is not None:
            reinforce = ExponentialTimeProposal.reinforce(target, info.log_q)
            total = total + reinforce
            logs["reinforce"] = reinforce.detach()
        return TrainingOutput(total, logs, model_loss=mean.detach())


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

    def forward(self, model: nn.Module, x: Tensor, generator: torch.Generator | None = None) -> TrainingOutput:
        sigma = self.noise.sample(x, generator)
        loss = dsm_loss(at_sigma(model, sigma), x, sigma, target=self.target, chunk_size=self.chunk_size, generator=generator)
        mean = loss.mean()
        weighted = sigma * sigma * mean
        return TrainingOutput(weighted, {"dsm_loss": mean.detach(), "sigma": sigma}, model_loss=weighted.detach())
