"""Learning-rate schedules of the training loop."""

from __future__ import annotations

import math

__all__ = ["LR_SCHEDULES", "lr_factor"]

LR_SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """Learning-rate multiplier of step k = ``step`` (1-based) of ``steps``.

    ``"constant"``: 1. ``"cosine"``: (1 + cos(pi (k - 1) / steps)) / 2, from 1 at the first
    step down towards 0 at the last.
    """
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - 1) / steps))
