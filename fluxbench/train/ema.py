"""Exponential moving average of model weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["make_ema", "ema_update"]


def make_ema(model: nn.Module) -> nn.Module:
    """A detached deep copy of ``model`` (parameters with ``requires_grad=False``)."""
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """One EMA step, in place: e <- decay * e + (1 - decay) * p for every parameter.

    Computed as ``e.lerp_(p, 1 - decay)`` = e + (1 - decay) (p - e). Floating buffers
    (e.g. normalisation statistics) are copied from the model, not averaged.

    Args:
        ema: the averaged copy (same architecture as ``model``).
        model: the model being trained.
        decay: in [0, 1]; 0 copies the model, 1 freezes the average.
    """
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    if ema_params:
        if decay == 0.0:
            torch._foreach_copy_(ema_params, [p.detach() for p in params])
        else:
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers()):
        eb.copy_(b)
