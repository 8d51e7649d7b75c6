"""Training an EDM image field by noise-annealed Flux Matching or DSM, on one or many ranks.

:func:`train_images` is the image counterpart of :func:`fluxbench.train.train` (same Adam
groups, clipping, EMA and atomic checkpoints, from :mod:`fluxbench.train`), with what image
training on several GPUs needs on top:

* image batches (B, C, H, W) through :class:`fluxbench.images.flatten.ImageObjective`: the
  package's objectives, unchanged, with EDM's log-normal sigma (SPEC section 2);
* ``torchrun``: the field and the objective's own parameters are wrapped together in
  DistributedDataParallel (one DDP forward per step, however often the loss calls the
  field); per-rank batch-KDE losses (the published estimator), or ``gather_batch``: one loss
  on the all-gathered batch (see :mod:`fluxbench.images.distributed`);
* ``precision="bf16"``: the objective runs under bf16 autocast; the pairwise parts of the loss
  (batch score, transition weights) and the U-Net's attention softmax stay in float32, and the
  field's output is float32 (EDMField casts);
* randomness per step from seeds derived from (seed, step, stream), so a run resumed from a
  checkpoint on any number of ranks draws exactly what the uninterrupted run would have drawn,
  with no generator state to save. Streams: "data/<rank>" for the batch indices,
  "objective/<rank>" for the objective's draws ("objective" on every rank with
  ``gather_batch``: every rank must evaluate the same loss).

The checkpoint (rank 0 writes it) is described in :mod:`fluxbench.images.checkpoint`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._checks import all_finite, check_positive, check_positive_int
from ..train import LR_SCHEDULES, TrainResult, ema_decay_at, lr_factor
from ..train.checkpoint import check_resume
from ..train.ema import ema_update, make_ema
from .checkpoint import read_checkpoint, save_checkpoint
from .distributed import GatheredField, gather_rows, is_distributed
from .flatten import METHODS, image_objective
from .precond import EDMField

__all__ = ["train_images", "step_seed", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16")
# settings a resumed run must share with the run that wrote the checkpoint
_RESUME_KEYS = ("method", "batch_size", "world_size", "gather_batch", "lr", "lr_schedule", "seed", "ema_decay",
                "unet", "sigma_data", "objective")


def step_seed(seed: int, step: int, stream: str) -> int:
    """A 63-bit seed for ``stream`` at ``step`` of a run seeded ``seed`` (BLAKE2b of the three)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class _Trainee(nn.Module):
    """The field and the objective as one module: DDP syncs both parameter sets in one forward."""

    def __init__(self, field: nn.Module, objective: nn.Module):
        super().__init__()
        self.field = field
        self.objective = objective

    def forward(self, batch: Tensor, generator: torch.Generator):
        return self.objective(self.field, batch, generator)


def _check_images(data: object) -> Tensor:
    if not isinstance(data, Tensor) or data.ndim != 4 or data.shape[0] == 0:
        shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"data must be an (N, C, H, W) tensor of images with N >= 1; got {shape}")
    if not data.is_floating_point() or not all_finite(data):
        raise ValueError(f"data must be finite floating-point images; got dtype {data.dtype}")
    return data


def train_images(
    field: EDMField,
    data: Tensor,
    *,
    method: str = "flux",
    steps: int,
    batch_size: int,
    lr: float = 1e-4,
    lr_schedule: str = "constant",
    ema_decay: float = 0.9993,
    ema_warmup: int = 10,
    grad_clip: float | None = 1.0,
    aux_lr: float | None = None,
    aux_grad_clip: float | None = 1.0,
    precision: str = "fp32",
    gather_batch: bool = False,
    objective_options: dict[str, Any] | None = None,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    log_every: int = 10,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train ``field`` on ``data`` with ``method`` ("flux" or "dsm"); returns a ``TrainResult``.

    Each step k: draw ``batch_size`` images per rank uniformly with replacement; (with
    ``gather_batch``) all-gather them; evaluate the objective (one sigma per batch, log sigma ~
    N(-1.2, 1.2^2) unless ``objective_options`` say otherwise); backpropagate (DDP averages the
    gradients over ranks); clip the field's and the objective's gradient norms separately;
    stop with a ValueError on a non-finite loss or gradient; Adam step at ``lr`` times
    :func:`fluxbench.train.lr_factor`; EMA update with decay min(ema_decay, (1 + k) / (ema_warmup + k)).

    Args:
        field: the EDMField to train (in place; moved to ``device``). Under torchrun, the same
            initial weights on every rank (DDP broadcasts rank 0's at wrapping).
        data: (N, C, H, W) images (on any device; moved to ``device``).
        method: "flux" (noise-annealed Flux Matching with time proposal and loss normaliser)
            or "dsm" (EDM-weighted denoising score matching).
        steps: total optimiser steps (including those before a resume).
        batch_size: images per rank per step.
        lr, lr_schedule, ema_decay, ema_warmup, grad_clip, aux_lr, aux_grad_clip: as in
            :func:`fluxbench.train.train`.
        precision: "fp32" or "bf16" (autocast; pairwise parts in fp32).
        gather_batch: one loss on the all-gathered batch instead of per-rank losses.
        objective_options: keyword arguments of :func:`fluxbench.images.flatten.image_objective`.
        seed: seed of every random draw (see the module docstring).
        checkpoint: file written by rank 0 every ``checkpoint_every`` steps and at the end.
        resume: continue from ``checkpoint`` when it exists (on every rank).
        log_every: a log row every this many steps and at the last one.
        progress: a tqdm bar on rank 0.
        device: the device (under torchrun, the rank's device from
            :func:`fluxbench.images.distributed.setup`).

    Raises:
        ValueError: bad arguments, a checkpoint of other settings, a non-finite loss or gradient.
    """
    if not isinstance(field, EDMField):
        raise TypeError(f"field must be a fluxbench.images.EDMField; got {type(field).__name__}")
    data = _check_images(data)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    steps = check_positive_int(steps, "steps")
    batch_size = check_positive_int(batch_size, "batch_size")
    lr = check_positive(lr, "lr")
    aux_lr = lr if aux_lr is None else check_positive(aux_lr, "aux_lr")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}; got {lr_schedule!r}")
    if not 0.0 <= float(ema_decay) <= 1.0:
        raise ValueError(f"ema_decay must be in [0, 1]; got {ema_decay}")
    ema_warmup = check_positive_int(ema_warmup, "ema_warmup", minimum=0)
    grad_clip = math.inf if grad_clip is None else check_positive(grad_clip, "grad_clip")
    aux_grad_clip = math.inf if aux_grad_clip is None else check_positive(aux_grad_clip, "aux_grad_clip")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    log_every = check_positive_int(log_every, "log_every")
    if checkpoint_every is not None:
        checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
    if (resume or checkpoint_every is not None) and checkpoint is None:
        raise ValueError("resume and checkpoint_every need a checkpoint path")
    path = None if checkpoint is None else Path(checkpoint)
    if path is not None and path.is_dir():
        raise ValueError(f"checkpoint must be a file path; {path} is a directory")

    distributed = is_distributed()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if gather_batch and not distributed:
        gather_batch = False  # one rank: the gathered batch is the batch
    dev = torch.device(device)
    field.to(dev)
    data = data.to(dev)
    # the objective's own parameters (loss normaliser, time proposal) in float64: at EDM's small
    # sigmas the raw flux loss reaches ~1e10, the proposal's REINFORCE gradient (L exp(-c))^2 ~1e20
    # until the normaliser has adapted, and the square in its norm would overflow float32
    objective = image_objective(method, sigma_data=field.sigma_data, **(objective_options or {})).to(dev, torch.float64)
    trainee = _Trainee(GatheredField(field, dist.new_group()) if gather_batch else field, objective)
    if distributed:
        ids = [dev.index] if dev.type == "cuda" else None
        trainee = nn.parallel.DistributedDataParallel(trainee, device_ids=ids)
    model_params = [p for p in field.parameters() if p.requires_grad]
    aux_params = [p for p in objective.parameters() if p.requires_grad]
    groups = [{"params": model_params, "lr": lr, "base_lr": lr}]
    if aux_params:
        groups.append({"params": aux_params, "lr": aux_lr, "base_lr": aux_lr})
    optimizer = torch.optim.Adam(groups, lr=lr)
    ema = make_ema(field)
    config = {
        "unet": dict(field.unet.config),
        "sigma_data": field.sigma_data,
        "method": method,
        "objective": repr(objective),
        "batch_size": batch_size,
        "world_size": world,
        "gather_batch": gather_batch,
        "lr": lr,
        "lr_schedule": lr_schedule,
        "ema_decay": float(ema_decay),
        "ema_warmup": ema_warmup,
        "precision": precision,
        "seed": seed,
        "steps": steps,
        "image_shape": list(data.shape[1:]),
    }
    rows: list[dict[str, Any]] = []
    start_step = 0
    if resume and path.exists():
        state = read_checkpoint(path, device=dev)
        resumed = {k: config[k] for k in _RESUME_KEYS}
        check_resume(path, state["config"], resumed, step=int(state["step"]), steps=steps)
        field.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        rows, start_step = list(state["log"]), int(state["step"])

    def snapshot(step: int) -> None:
        if rank == 0:
            save_checkpoint(path, field, ema, optimizer, step, config, objective=objective, log=rows)
        if distributed:
            dist.barrier()

    data_gen = torch.Generator(device=dev)
    obj_gen = torch.Generator(device=dev)
    obj_stream = "objective" if gather_batch else f"objective/{rank}"
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    trainee.train()
    bar = tqdm(total=steps, initial=start_step, disable=not progress or rank != 0, desc=f"train {method}", leave=False)
    try:
        for step in range(start_step + 1, steps + 1):
            start = time.perf_counter()
            data_gen.manual_seed(step_seed(seed, step, f"data/{rank}"))
            obj_gen.manual_seed(step_seed(seed, step, obj_stream))
            batch = data[torch.randint(0, data.shape[0], (batch_size,), generator=data_gen, device=dev)]
            if gather_batch:
                batch = gather_rows(batch)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                out = trainee(batch, obj_gen)
            out.loss.backward()
            if gather_batch:
                # DDP averaged per-rank parts of one loss's gradient: their sum is the gradient
                torch._foreach_mul_([p.grad for p in model_params if p.grad is not None], float(world))
            norms = [out.loss.detach(), torch.nn.utils.clip_grad_norm_(model_params, grad_clip)]
            if aux_params:
                norms.append(torch.nn.utils.clip_grad_norm_(aux_params, aux_grad_clip))
            model_loss = out.model_loss if out.model_loss is not None else out.loss
            logs = {k: v for k, v in out.logs.items()}
            tensor_keys = [k for k, v in logs.items() if isinstance(v, Tensor)]
            scalars = norms + [model_loss] + [logs[k] for k in tensor_keys]
            values = torch.stack([v.detach().double().reshape(()) for v in scalars]).tolist()  # the step's one sync
            logs.update(zip(tensor_keys, values[len(norms) + 1:]))
            if not all(math.isfinite(v) for v in values[: len(norms)]):
                raise ValueError(
                    f"train_images: non-finite loss or gradient norm at step {step} (loss {values[0]}, gradient norms "
                    f"{values[1:len(norms)]}); stopped before updating the weights: lower lr or check the data"
                )
            factor = lr_factor(lr_schedule, step, steps)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            optimizer.step()
            ema_update(ema, field, ema_decay_at(float(ema_decay), ema_warmup, step))
            if step % log_every == 0 or step == steps:
                row = {"step": step, "loss": values[len(norms)], "grad_norm": values[1], "lr": lr * factor,
                       "seconds": time.perf_counter() - start}
                if aux_params:
                    row["aux_grad_norm"] = values[2]
                row.update({k: float(v) for k, v in logs.items() if k not in row})
                rows.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)
            bar.update(1)
            if path is not None and checkpoint_every is not None and step % checkpoint_every == 0 and step < steps:
                snapshot(step)
    finally:
        bar.close()
    if path is not None:
        snapshot(steps)
    ema.eval()
    return TrainResult(model=field, ema_model=ema, log=pd.DataFrame(rows), steps_done=steps)
