"""Training loop for fields and objectives: Adam, EMA, clipping, atomic checkpoints.

``train(model, objective, data, ...) -> TrainResult``; ``save_checkpoint`` /
``load_checkpoint`` are the atomic file helpers it uses.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .loop import train
from .result import TrainResult

__all__ = ["train", "TrainResult", "save_checkpoint", "load_checkpoint"]
