"""The training loop: Adam, EMA, gradient clipping, seeded batches, atomic checkpoints."""

from __future__ import annotations

import functools
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
from .checkpoint import check_resume, load_checkpoint, save_checkpoint
from .ema import ema_decay_at, ema_update, make_ema
from .schedule import LR_SCHEDULES, lr_factor
from .result import TrainResult

__all__ = ["train"]

BASE_COLUMNS = ("step", "loss", "grad_norm", "lr", "seconds")
AUX_COLUMN = "aux_grad_norm"
# 2: the optimiser has one group for the model and one for the objective's own parameters
_CHECKPOINT_VERSION = 2
_CHECKPOINT_KEYS = ("version", "step", "model", "ema_model", "objective", "optimizer", "generator", "log", "config")


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


def _param_groups(model: nn.Module, objective: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(model parameters, auxiliary parameters): the objective's trainable parameters that are not the model's."""
    model_params = _unique_params(model)
    ids = {id(p) for p in model_params}
    return model_params, [p for p in _unique_params(objective) if id(p) not in ids]


def _describe_objective(objective: nn.Module) -> str:
    """The objective's class and settings, as compared on resume (``ObjectiveClass(noise; extra)``)."""
    noise = getattr(objective, "noise", None)
    extra = objective.extra_repr()
    return f"{type(objective).__name__}({'' if noise is None else repr(noise)}{'; ' + extra if extra else ''})"


def _read_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """The checkpoint at ``path``, or a ValueError saying why it cannot be resumed from."""
    try:
        state = load_checkpoint(path, map_location=device)
    except Exception as exc:  # EOFError (empty), RuntimeError / UnpicklingError (truncated, foreign)
        raise ValueError(
            f"cannot resume from {path}: it is empty, truncated or not a torch checkpoint "
            f"({type(exc).__name__}: {exc}); delete it or pass another checkpoint path"
        ) from exc
    missing = [] if not isinstance(state, dict) else [k for k in _CHECKPOINT_KEYS if k not in state]
    if not isinstance(state, dict) or missing:
        raise ValueError(
            f"cannot resume from {path}: not a fluxbench training checkpoint "
            f"({'not a dict' if not isinstance(state, dict) else 'missing ' + ', '.join(missing)})"
        )
    if state["version"] != _CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format version {state['version']}, this fluxbench writes "
            f"{_CHECKPOINT_VERSION}; start a fresh run"
        )
    return state


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
    ema_warmup: int = 0,
    grad_clip: float | None = 1.0,
    aux_lr: float | None = None,
    aux_grad_clip: float | None = 1.0,
    lr_schedule: str = "constant",
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    log_every: int = 1,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train ``model`` by minimising ``objective`` with Adam, EMA and gradient clipping.

    The parameters form two Adam groups: the model's, and the *auxiliary* ones (the
    objective's own trainable parameters that are not the model's, e.g. the learned time
    proposal and loss normaliser of noise-annealed Flux Matching, SPEC section 2). Their
    gradients live on other scales (the proposal's REINFORCE gradient is ~1e4-1e8 times
    the model's), so each group is clipped on its own: clipping them together scaled the
    model's gradient by that factor (issue 14).

    Each step k = 1, ..., ``steps``:

    1. draw a (batch_size, d) batch: from a data tensor, ``batch_size`` row indices
       uniformly *with replacement* (``torch.randint`` on the run's generator, so no
       epoch state is needed to resume); from a callable, ``data(batch_size,
       generator=g)``;
    2. ``out = objective(model, batch, g)`` (an ``ObjectiveOutput``, see
       ``fluxbench.objectives.base``); backpropagate ``out.loss`` (the model's objective
       plus any surrogate terms that train the auxiliary parameters);
    3. clip the model's gradient norm to ``grad_clip`` and, separately, the auxiliary
       parameters' gradient norm to ``aux_grad_clip`` (``torch.nn.utils.clip_grad_norm_``;
       the logged ``grad_norm`` and ``aux_grad_norm`` are the norms before clipping);
    4. if the loss or a gradient norm is not finite, stop with a ``ValueError`` naming
       the step (the parameters of that step are not updated; with ``checkpoint`` set,
       the state after step k - 1 and the log so far are saved first);
    5. Adam step, learning rate ``lr * lr_factor(lr_schedule, k, steps)`` for the model's
       group and ``aux_lr`` times the same factor for the auxiliary group;
    6. EMA: e <- d_k e + (1 - d_k) p for the model's parameters, starting from e = the
       initial weights, with d_k = ``ema_decay_at(ema_decay, ema_warmup, k)`` =
       min(ema_decay, (1 + k) / (ema_warmup + k)) (``ema_warmup`` = 0: d_k = ema_decay).
       ``TrainResult.ema_model`` is a separate copy.

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
            returning an object with ``.loss`` (0-d tensor, backpropagated), ``.logs``
            (dict of floats or 0-d tensors) and optionally ``.model_loss`` (0-d tensor:
            the model's objective without auxiliary surrogate terms; logged as ``loss``
            when present, see ``fluxbench.objectives.TrainingOutput``); its own
            parameters are optimised in the auxiliary group.
        data: an (N, d) finite tensor, or a callable ``sample(n, generator=...) -> (n, d)``.
        steps: total number of optimiser steps, >= 1 (including those before a resume).
        batch_size: points per step, >= 1.
        lr: Adam learning rate, > 0.
        ema_decay: EMA decay in [0, 1].
        ema_warmup: EMA warm-up constant w (an int >= 0; 0 = none; 10 is the usual value).
        grad_clip: maximum gradient norm of the model's parameters (> 0), or None.
        aux_lr: Adam learning rate of the auxiliary parameters (> 0); None = ``lr``.
        aux_grad_clip: maximum gradient norm of the auxiliary parameters (> 0), or None.
            Default 1: the REINFORCE gradient of a time proposal is heavy-tailed (the
            squared loss of one batch), and one huge batch would otherwise dominate Adam's
            second-moment estimate for thousands of steps.
        lr_schedule: ``"constant"`` or ``"cosine"`` (see :func:`lr_factor`; the schedule
            uses ``steps``, so resume with the same ``steps``).
        seed: seed (>= 0) of the run's generator.
        checkpoint: checkpoint file path, or None.
        resume: continue from ``checkpoint`` if that file exists (needs ``checkpoint``).
        checkpoint_every: also save every this many steps (>= 1), or None (end only).
        log_every: record a log row every this many steps (>= 1) and at the last step.
        progress: show a tqdm progress bar.
        device: training device; None uses the model's (CPU for a parameterless model).

    Returns:
        ``TrainResult(model, ema_model, log, steps_done)``. ``log`` has columns ``step``,
        ``loss`` (``out.model_loss`` if the objective gives one, else ``out.loss``),
        ``grad_norm`` (the model's), ``lr`` (the model group's), ``seconds`` (wall-clock
        seconds of the step), ``aux_grad_norm`` when there are auxiliary parameters, and
        then the objective's log keys (a key that collides with a base column is stored
        as ``"objective/<key>"``).

    Raises:
        ValueError: bad arguments (steps < 1, batch_size < 1, lr <= 0, ema_decay outside
            [0, 1], ema_warmup < 0, grad_clip, aux_grad_clip or aux_lr <= 0, an unknown
            lr_schedule, data with NaN/inf or of the wrong shape, resume
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
    ema_warmup = check_positive_int(ema_warmup, "ema_warmup", minimum=0)
    if grad_clip is not None:
        grad_clip = check_positive(grad_clip, "grad_clip")
    if aux_grad_clip is not None:
        aux_grad_clip = check_positive(aux_grad_clip, "aux_grad_clip")
    aux_lr = lr if aux_lr is None else check_positive(aux_lr, "aux_lr")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}; got {lr_schedule!r}")
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
    if path is not None and path.is_dir():
        raise ValueError(f"checkpoint must be a file path; {path} is a directory (name a file inside it)")

    dev = _resolve_device(model, device)
    model.to(dev)
    objective.to(dev)
    draw = _batch_sampler(data, batch_size, dev)
    generator = torch.Generator(device=dev)
    generator.manual_seed(seed)
    model_params, aux_params = _param_groups(model, objective)
    if not model_params and not aux_params:
        raise ValueError("nothing to optimise: neither the model nor the objective has trainable parameters")
    groups = [{"params": model_params, "lr": lr, "base_lr": lr}] if model_params else []
    if aux_params:
        groups.append({"params": aux_params, "lr": aux_lr, "base_lr": aux_lr})
    optimizer = torch.optim.Adam(groups, lr=lr)
    ema = make_ema(model)
    rows: list[dict[str, Any]] = []
    step = 0
    config = {
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "aux_lr": aux_lr,
        "lr_schedule": lr_schedule,
        "grad_clip": grad_clip,
        "aux_grad_clip": aux_grad_clip,
        "ema_decay": ema_decay,
        "ema_warmup": ema_warmup,
        "model": type(model).__name__,
        "objective": _describe_objective(objective),
    }

    if resume and path.exists():
        state = _read_checkpoint(path, dev)
        check_resume(path, state["config"], config, step=int(state["step"]), steps=steps)
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
            if model_params:
                model_norm = torch.nn.utils.clip_grad_norm_(model_params, grad_clip if grad_clip is not None else math.inf)
            else:
                model_norm = loss.new_zeros(())
            norms = [loss.detach(), model_norm.detach()]
            if aux_params:
                aux_max = aux_grad_clip if aux_grad_clip is not None else math.inf
                norms.append(torch.nn.utils.clip_grad_norm_(aux_params, aux_max).detach())
            model_loss = getattr(out, "model_loss", None)
            if isinstance(model_loss, Tensor):
                norms.append(model_loss.detach().reshape(()))
            logs = dict(getattr(out, "logs", None) or {})
            tensor_keys = [k for k, v in logs.items() if isinstance(v, Tensor)]
            norms += [logs[k].detach().reshape(()) for k in tensor_keys]
            common = functools.reduce(torch.promote_types, [v.dtype for v in norms])
            values = torch.stack([v.to(common) for v in norms]).tolist()  # the step's one host sync
            loss_value, norm_value = values[0], values[1]
            aux_value = values[2] if aux_params else None
            logged_loss = values[2 + bool(aux_params)] if isinstance(model_loss, Tensor) else loss_value
            for k, v in zip(tensor_keys, values[len(values) - len(tensor_keys):]):
                logs[k] = v
            bad = None
            if not math.isfinite(loss_value):
                bad = f"non-finite loss ({loss_value}) at step {step}"
            elif not math.isfinite(norm_value):
                bad = f"non-finite gradient norm ({norm_value}) at step {step} (loss {loss_value:.6g})"
            elif aux_value is not None and not math.isfinite(aux_value):
                bad = f"non-finite gradient norm of the objective's parameters ({aux_value}) at step {step} (loss {loss_value:.6g})"
            if bad is not None:
                message = f"train: {bad}; stopped before updating the weights"
                if path is not None:
                    snapshot(step - 1, gen_state, error=message)
                    message += f" (checkpoint with the {step - 1} completed steps saved to {path})"
                raise ValueError(message + "; lower lr, check the data and the objective")
            factor = lr_factor(lr_schedule, step, steps)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            optimizer.step()
            ema_update(ema, model, ema_decay_at(ema_decay, ema_warmup, step))
            if step % log_every == 0 or step == steps:
                row: dict[str, Any] = {
                    "step": step,
                    "loss": logged_loss,
                    "grad_norm": norm_value,
                    "lr": float(optimizer.param_groups[0]["lr"]) if model_params else lr * factor,
                    "seconds": time.perf_counter() - start,
                }
                if aux_value is not None:
                    row[AUX_COLUMN] = aux_value
                for key, value in logs.items():
                    name = f"objective/{key}" if key in BASE_COLUMNS or key == AUX_COLUMN else str(key)
                    row[name] = float(value)
                rows.append(row)
                bar.set_postfix(loss=f"{logged_loss:.4g}", refresh=False)
            bar.update(1)
            if path is not None and checkpoint_every is not None and step % checkpoint_every == 0 and step < steps:
                snapshot(step, generator.get_state())
    finally:
        bar.close()
    if path is not None:
        snapshot(step, generator.get_state())
    return TrainResult(model=model, ema_model=ema, log=_log_frame(rows), steps_done=step)
