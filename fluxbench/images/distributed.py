"""Multi-process training pieces: process-group set-up and the gathered-batch field.

Launched with ``torchrun`` (environment variables RANK, WORLD_SIZE, LOCAL_RANK),
:func:`setup` starts the default process group (NCCL on CUDA, gloo on CPU) and returns this
process's rank, the world size and its device. Without those variables it is a single
process and nothing is initialised.

Two ways to train Flux Matching on W ranks with B images each:

* per rank (the published code): each rank evaluates the batch-KDE loss on its own B images
  (p_hat is a mixture of B Gaussians) and DistributedDataParallel averages the gradients;
* gathered batch (``gather_batch``): the W batches are all-gathered, every rank evaluates the
  loss on the same W*B images with the same random numbers (p_hat has W*B components, the
  finite-batch bias of SPEC section 7 shrinks), and the network work is split: through
  :class:`GatheredField` each rank evaluates the field on its 1/W of the rows and the outputs
  are all-gathered. Every rank then holds the same loss L, and its parameters' gradient is
  the part of dL/dtheta that flows through its own rows; the full gradient is their *sum*
  over ranks (the training loop multiplies DDP's average by W).

:class:`GatheredField` uses its own gather (forward: all-gather of the row blocks; backward:
this rank's block of the incoming gradient) instead of
``torch.distributed.nn.functional.all_gather``, whose backward sums the incoming gradients over
ranks: right when each rank's loss is a different term, W times too large here, where every
rank computes the same loss (the loss also differentiates the field in its input at the
chain end points, where the factor would not cancel). The two operations below are each
other's adjoint, so the field can be differentiated twice (Flux Matching's
grad_z [eps^T J_f eps + f . s]).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["setup", "teardown", "is_distributed", "GatheredField", "gather_rows"]


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup(device: str | torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; starts the process group under torchrun.

    Under torchrun (WORLD_SIZE > 1) a CUDA ``device`` becomes ``cuda:LOCAL_RANK`` and the
    backend is NCCL; on CPU it is gloo. A group already initialised (e.g. by a test) is used
    as it is.
    """
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return 0, 1, device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this torch build")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def teardown() -> None:
    """Destroy the default process group if this process started one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_rows(x: Tensor, group=None) -> Tensor:
    """Concatenate every rank's (n, ...) tensor along dim 0, in rank order (no gradient)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


class _Gather(torch.autograd.Function):
    """Rank blocks (k, ...) -> all blocks (W k, ...); backward: this rank's block of the gradient."""

    @staticmethod
    def forward(ctx, block: Tensor, group) -> Tensor:
        ctx.group = group
        return gather_rows(block, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _Block.apply(grad, ctx.group), None


class _Block(torch.autograd.Function):
    """All rows (W k, ...) -> this rank's block (k, ...); backward: gather the blocks' gradients."""

    @staticmethod
    def forward(ctx, full: Tensor, group) -> Tensor:
        ctx.group = group
        k = full.shape[0] // dist.get_world_size(group)
        rank = dist.get_rank(group)
        return full[rank * k:(rank + 1) * k]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _Gather.apply(grad.contiguous(), ctx.group), None


class GatheredField(nn.Module):
    """``field(x, sigma)`` evaluated on 1/W of the rows per rank, outputs gathered (see module doc).

    Every rank must call it with the same x (N, ...) and sigma (a number or a 0-d tensor).
    Rows are padded (with copies of the last row) to a multiple of W; rank r evaluates rows
    [r k, (r + 1) k), k = ceil(N / W).

    Args:
        field: a noise-conditioned field ``field(x, sigma)``.
        group: the process group of the gathers (a separate one keeps their collectives apart
            from DDP's gradient all-reduce).
    """

    sigma_conditioned = True

    def __init__(self, field, group=None):
        super().__init__()
        self.field = field
        self.group = group

    def forward(self, x: Tensor, sigma) -> Tensor:
        n = x.shape[0]
        world = dist.get_world_size(self.group)
        k = -(-n // world)
        if k * world != n:
            x = torch.cat([x, x[-1:].expand(k * world - n, *x.shape[1:])])
        out = _Gather.apply(self.field(_Block.apply(x, self.group), sigma), self.group)
        return out[:n]
