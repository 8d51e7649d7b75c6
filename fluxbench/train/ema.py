"""Exponential moving average of model weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["make_ema", "ema_update", "ema_decay_at"]


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


def ema_decay_at(ema_decay: float, ema_warmup: int, step: int) -> float:
    """EMA decay used after step k = ``step`` (1-based): min(ema_decay, (1 + k) / (ema_warmup + k)).

    ``ema_warmup`` = 0 turns the warm-up off (the decay is ``ema_decay`` from the first step).
    With w = ``ema_warmup`` > 1 the average forgets the random initialisation quickly: early on
    1 - decay_k = (w - 1) / (w + k), so the EMA is roughly a running mean over the last
    (w + k) / (w - 1) steps until that reaches 1 / (1 - ema_decay) steps (w = 10, ema_decay = 0.999:
    after about 9000 steps). The initial weights keep weight prod_k decay_k ~ k^-(w - 1) instead of
    ema_decay^k.
    """
    if ema_warmup == 0:
        return ema_decay
    return min(ema_decay, (1.0 + step) / (ema_warmup + step))
