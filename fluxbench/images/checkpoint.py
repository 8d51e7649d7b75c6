"""Checkpoints of image models: write (atomically, rank 0), read for resuming, load a field.

A checkpoint is a ``torch.save`` dict (read back with ``weights_only=True``):

    version    format version (1)
    step       optimiser steps completed
    model      EDMField state dict (the trained weights)
    ema        EDMField state dict (the exponential moving average)
    optimizer  Adam state dict
    objective  state dict of the objective's own parameters (time proposal, normaliser)
    config     plain dict: "unet" (the UNet's keyword arguments), "sigma_data", and the
               training settings (method, batch size, learning rate, ...)
    log        list of per-step log rows
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..train import load_checkpoint, save_checkpoint as _atomic_save
from .precond import EDMField
from .unet import UNet

__all__ = ["save_checkpoint", "read_checkpoint", "load_field", "build_field", "CHECKPOINT_VERSION"]

CHECKPOINT_VERSION = 1
_KEYS = ("version", "step", "model", "ema", "optimizer", "objective", "config", "log")


def build_field(config: dict[str, Any]) -> EDMField:
    """A fresh ``EDMField(UNet(**config["unet"]), sigma_data=config["sigma_data"])``."""
    try:
        unet = dict(config["unet"])
        sigma_data = float(config["sigma_data"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"an image-model config needs 'unet' (UNet keyword arguments) and 'sigma_data'; got {config!r}") from exc
    in_channels = unet.pop("in_channels")
    unet["multipliers"] = tuple(unet["multipliers"])
    unet["attention_resolutions"] = tuple(unet["attention_resolutions"])
    return EDMField(UNet(in_channels, **unet), sigma_data=sigma_data)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: dict[str, Any],
    *,
    objective: nn.Module | None = None,
    log: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file, then rename); returns its path.

    ``model`` and ``ema`` are EDMFields (unwrapped from DistributedDataParallel); ``config``
    must hold "unet" and "sigma_data" (see :func:`build_field`). Call it on one rank only.
    """
    if "unet" not in config or "sigma_data" not in config:
        raise ValueError("config must hold 'unet' (the UNet's keyword arguments) and 'sigma_data'")
    state = {
        "version": CHECKPOINT_VERSION,
        "step": int(step),
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "objective": {} if objective is None else objective.state_dict(),
        "config": config,
        "log": list(log or []),
    }
    return _atomic_save(state, path)


def read_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict at ``path``, or an error naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (train one with 'fluxbench images train --out DIR')")
    try:
        state = load_checkpoint(path, map_location=device)
    except Exception as exc:  # EOFError (empty), RuntimeError / UnpicklingError (truncated, foreign)
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in _KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not a fluxbench image checkpoint (missing {', '.join(missing)})")
    if state["version"] != CHECKPOINT_VERSION:
        raise ValueError(f"{path} has image-checkpoint version {state['version']}; this fluxbench reads {CHECKPOINT_VERSION}")
    return state


def load_field(path: str | os.PathLike, *, device: str | torch.device = "cpu", ema: bool = True) -> tuple[EDMField, dict[str, Any]]:
    """(field, config): the EDMField of a checkpoint (its EMA weights unless ``ema=False``), in eval mode."""
    state = read_checkpoint(path, device=device)
    field = build_field(state["config"])
    field.load_state_dict(state["ema" if ema else "model"])
    return field.to(device).eval(), state["config"]
