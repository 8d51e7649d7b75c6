"""The training loop: Adam, EMA, gradient clipping, seeded batches, atomic checkpoints."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._checks import check_points, check_positive, check_positive_int
from .checkpoint import load_checkpoint, save_checkpoint
from .ema import ema_update, make_ema
from .result import TrainResult

__all__ = ["train"]

BASE_COLUMNS = ("step", "loss", "grad_norm", "lr", "seconds")
_CHECKPOINT_VERSION = 1


def _resolve_device(model: nn.Module, device: object) -> torch.device:
    if device is not None:
        try:
            return torch.device(device)
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"device must be a torch.device or a device string; got {device!r}") from exc
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _batch_sampler(data: object, batch_size: int, device: torch.device) -> Callable[[torch.Generator], Tensor]:
    """Return ``draw(generator) -> (batch_size, d)`` for a data tensor or a sampler callable."""
    if isinstance(data, Tensor):
        data = check_points(data, "data").detach().to(device)
        n = data.shape[0]

        def draw(generator: torch.Generator) -> Tensor:
            idx = torch.randint(0, n, (batch_size,), generator=generator, device=device)
            return data[idx]

        return draw
    if callable(data):
        first = [True]

        def draw(generator: torch.Generator) -> Tensor:
            batch = data(batch_size, generator=generator)
            batch = check_points(batch, "data batch", finite=first[0])
            if batch.shape[0] != batch_size:
                raise ValueError(f"data(n={batch_size}) returned {batch.shape[0]} points")
            if batch.device != device:
                raise ValueError(f"data batch is on {batch.device} but training runs on {device}")
            first[0] = False
            return batch

        return draw
    raise ValueError(
        "data must be an (N, d) tensor or a callable sample(n, generator=...) -> (n, d); "
        f"got {type(data).__name__}"
    )


def _unique_params(*modules: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _log_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame(columns=list(BASE_COLUMNS))
    frame = pd.DataFrame(rows)
    extra = [c for c in frame.columns if c not in BASE_COLUMNS]
    frame = frame[list(BASE_COLUMNS) + extra]
    frame["step"] = frame["step"].astype("int64")
    return frame


def train(
    model: nn.Module,
    objective: nn.Module,
    data: Tensor | Callable[..., Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    log_every: int = 1,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train ``model`` by minimising ``objective`` with Adam, EMA and gradient clipping.

    Each step k = 1, ..., ``steps``:

    1. draw a (batch_size, d) batch: from a data tensor, ``batch_size`` row indices
       uniformly *with replacement* (``torch.randint`` on the run's generator, so no
       epoch state is needed to resume); from a callable, ``data(batch_size,
       generator=g)``;
    2. ``out = objective(model, batch, g)`` (an ``ObjectiveOutput``, see
       ``fluxbench.objectives.base``); backpropagate ``out.loss``;
    3. clip the global gradient norm of the model's and the objective's parameters to
       ``grad_clip`` (``torch.nn.utils.clip_grad_norm_``; the logged ``grad_norm`` is the
       norm before clipping);
    4. if the loss or the gradient norm is not finite, stop with a ``ValueError`` naming
       the step (the parameters of that step are not updated; with ``checkpoint`` set,
       the state after step k - 1 and the log so far are saved first);
    5. Adam step on the model's and the objective's parameters (one group, constant lr);
    6. EMA: e <- ema_decay * e + (1 - ema_decay) * p for the model's parameters, starting
       from e = the initial weights (``TrainResult.ema_model`` is a separate copy).

    All randomness (batches, and whatever the objective draws) comes from one
    ``torch.Generator`` on the training device seeded with ``seed``: the same seed, model
    initialisation and data give bit-identical weights and logs on CPU (except the
    ``seconds`` column, which is wall-clock time).

    Checkpoints (``checkpoint`` set) are written atomically (temporary file, then
    ``os.replace``) every ``checkpoint_every`` steps, at the end, and on failure. They hold
    the model, the EMA copy, the optimiser, the objective's state dict, the generator
    state, the completed step count and the log so far. With ``resume=True`` an existing
    checkpoint is loaded and training continues to ``steps`` total; the result is bit-
    identical to an uninterrupted run (a missing checkpoint file starts a fresh run).

    Args:
        model: the network (trained in place, moved to ``device``).
        objective: an ``nn.Module`` called as ``objective(model, x_batch, generator)``
            returning an object with ``.loss`` (0-d tensor) and ``.logs`` (dict of
            floats); its parameters are optimised together with the model's.
        data: an (N, d) finite tensor, or a callable ``sample(n, generator=...) -> (n, d)``.
        steps: total number of optimiser steps, >= 1 (including those before a resume).
        batch_size: points per step, >= 1.
        lr: Adam learning rate, > 0.
        ema_decay: EMA decay in [0, 1].
        grad_clip: maximum global gradient norm (> 0), or None for no clipping.
        seed: seed (>= 0) of the run's generator.
        checkpoint: checkpoint file path, or None.
        resume: continue from ``checkpoint`` if that file exists (needs ``checkpoint``).
        checkpoint_every: also save every this many steps (>= 1), or None (end only).
        log_every: record a log row every this many steps (>= 1) and at the last step.
        progress: show a tqdm progress bar.
        device: training device; None uses the model's (CPU for a parameterless model).

    Returns:
        ``TrainResult(model, ema_model, log, steps_done)``. ``log`` has columns ``step``,
        ``loss``, ``grad_norm``, ``lr``, ``seconds`` (wall-clock seconds of the step) and
        then the objective's log keys (a key that collides with a base column is stored
        as ``"objective/<key>"``).

    Raises:
        ValueError: bad arguments (steps < 1, batch_size < 1, lr <= 0, ema_decay outside
            [0, 1], grad_clip <= 0, data with NaN/inf or of the wrong shape, resume
            without a checkpoint path, a checkpoint from a different seed/batch size or
            past ``steps``), nothing to optimise, a loss that is not a 0-d tensor, or a
            non-finite loss or gradient (the message names the step).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(objective, nn.Module):
        raise ValueError(f"objective must be a torch.nn.Module (an Objective); got {type(objective).__name__}")
    steps = check_positive_int(steps, "steps", minimum=1)
    batch_size = check_positive_int(batch_size, "batch_size", minimum=1)
    lr = check_positive(lr, "lr")
    ema_decay = check_positive(ema_decay, "ema_decay", allow_zero=True)
    if ema_decay > 1:
        raise ValueError(f"ema_decay must be in [0, 1]; got {ema_decay}")
    if grad_clip is not None:
        grad_clip = check_positive(grad_clip, "grad_clip")
    seed = check_positive_int(seed, "seed", minimum=0)
    log_every = check_positive_int(log_every, "log_every", minimum=1)
    if checkpoint_every is not None:
        checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every", minimum=1)
        if checkpoint is None:
            raise ValueError("checkpoint_every needs a checkpoint path")
    if not isinstance(resume, bool):
        raise ValueError(f"resume must be a bool; got {resume!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    path = Path(checkpoint) if checkpoint is not None else None

    dev = _resolve_device(model, device)
    model.to(dev)
    objective.to(dev)
    draw = _batch_sampler(data, batch_size, dev)
    generator = torch.Generator(device=dev)
    generator.manual_seed(seed)
    params = _unique_params(model, objective)
    if not params:
        raise ValueError("nothing to optimise: neither the model nor the objective has trainable parameters")
    optimizer = torch.optim.Adam(params, lr=lr)
    ema = make_ema(model)
    rows: list[dict[str, Any]] = []
    step = 0
    config = {"seed": seed, "batch_size": batch_size}

    if resume and path.exists():
        state = load_checkpoint(path, map_location=dev)
        for key in ("seed", "batch_size"):
            if state["config"][key] != config[key]:
                raise ValueError(
                    f"checkpoint {path} was written with {key}={state['config'][key]} but this run has "
                    f"{key}={config[key]}; a resumed run must use the same {key}"
                )
        if state["step"] > steps:
            raise ValueError(f"checkpoint {path} is at step {state['step']}, past steps={steps}")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema_model"])
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"].cpu())  # generator states are CPU byte tensors
        rows = list(state["log"])
        step = int(state["step"])

    def snapshot(completed: int, generator_state: Tensor, error: str | None = None) -> None:
        save_checkpoint(
            {
                "version": _CHECKPOINT_VERSION,
                "step": completed,
                "model": model.state_dict(),
                "ema_model": ema.state_dict(),
                "objective": objective.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator_state,
                "log": rows,
                "config": config,
                "error": error,
            },
            path,
        )

    model.train()
    objective.train()
    bar = tqdm(total=steps, initial=step, disable=not progress, desc="train", leave=False)
    try:
        while step < steps:
            start = time.perf_counter()
            step += 1
            gen_state = generator.get_state() if path is not None else None
            batch = draw(generator)
            optimizer.zero_grad(set_to_none=True)
            out = objective(model, batch, generator)
            loss = getattr(out, "loss", None)
            if not isinstance(loss, Tensor) or loss.ndim != 0:
                raise ValueError(
                    f"objective must return an ObjectiveOutput whose .loss is a 0-d tensor; got {loss!r} at step {step}"
                )
            if not loss.requires_grad:
                raise ValueError(f"the loss at step {step} does not depend on any trainable parameter")
            loss.backward()
            max_norm = grad_clip if grad_clip is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            common = torch.promote_types(loss.dtype, grad_norm.dtype)
            loss_value, norm_value = torch.stack([loss.detach().to(common), grad_norm.detach().to(common)]).tolist()
            bad = None
            if not math.isfinite(loss_value):
                bad = f"non-finite loss ({loss_value}) at step {step}"
            elif not math.isfinite(norm_value):
                bad = f"non-finite gradient norm ({norm_value}) at step {step} (loss {loss_value:.6g})"
            if bad is not None:
                message = f"train: {bad}; stopped before updating the weights"
                if path is not None:
                    snapshot(step - 1, gen_state, error=message)
                    message += f" (checkpoint with the {step - 1} completed steps saved to {path})"
                raise ValueError(message + "; lower lr, check the data and the objective")
            optimizer.step()
            ema_update(ema, model, ema_decay)
            if step % log_every == 0 or step == steps:
                row: dict[str, Any] = {
                    "step": step,
                    "loss": loss_value,
                    "grad_norm": norm_value,
                    "lr": float(optimizer.param_groups[0]["lr"]),
                    "seconds": time.perf_counter() - start,
                }
                for key, value in (getattr(out, "logs", None) or {}).items():
                    name = f"objective/{key}" if key in BASE_COLUMNS else str(key)
                    row[name] = float(value)
                rows.append(row)
                bar.set_postfix(loss=f"{loss_value:.4g}", refresh=False)
            bar.update(1)
            if path is not None and checkpoint_every is not None and step % checkpoint_every == 0 and step < steps:
                snapshot(step, generator.get_state())
    finally:
        bar.close()
    if path is not None:
        snapshot(step, generator.get_state())
    return TrainResult(model=model, ema_model=ema, log=_log_frame(rows), steps_done=step)
