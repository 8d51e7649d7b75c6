"""Training loop for fields and objectives: Adam, EMA, clipping, atomic checkpoints.

``train(model, objective, data, ...) -> TrainResult``; ``ema_decay_at`` and ``lr_factor``
are its EMA warm-up and learning-rate schedule; ``save_checkpoint`` /
``load_checkpoint`` are the atomic file helpers it uses.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .ema import ema_decay_at
from .loop import train
from .result import TrainResult
from .schedule import LR_SCHEDULES, lr_factor

__all__ = ["train", "TrainResult", "save_checkpoint", "load_checkpoint", "ema_decay_at", "lr_factor", "LR_SCHEDULES"]
