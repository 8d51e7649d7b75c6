"""The protocol shared by every training objective."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["ObjectiveOutput", "Objective"]


@dataclass
class ObjectiveOutput:
    """What one objective evaluation hands to the training loop.

    Attributes:
        loss: 0-d tensor to minimise (differentiable w.r.t. the model and the
            objective's own parameters).
        logs: plain floats to record in the per-step log (for example the raw loss
            mean, the noise level, the sampled time).
    """

    loss: Tensor
    logs: dict[str, float] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class: ``objective(model, x, generator=None) -> ObjectiveOutput``.

    ``model`` is the trained network, ``x`` an (B, d) data batch. Objectives are
    modules so that learned helpers (a time proposal, a loss normaliser) are
    parameters the training loop optimises together with the model.
    """

    def forward(self, model: nn.Module, x: Tensor, generator: torch.Generator | None = None) -> ObjectiveOutput:
        raise NotImplementedError
