"""The value returned by ``fluxbench.train.train``."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from torch import nn

__all__ = ["TrainResult"]


@dataclass
class TrainResult:
    """Outcome of a training run.

    Attributes:
        model: the trained model (the object passed in, trained in place).
        ema_model: a separate copy holding the exponential moving average of the
            model's parameters (buffers are copied from the model).
        log: per-step DataFrame with columns ``step``, ``loss``, ``grad_norm``, ``lr``,
            ``seconds`` and the objective's log keys (one row every ``log_every`` steps
            and at the last step; rows from before a resume are kept).
        steps_done: optimiser steps completed in total (including those before a resume).
    """

    model: nn.Module
    ema_model: nn.Module
    log: pd.DataFrame
    steps_done: int
