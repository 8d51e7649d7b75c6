"""The choice of strategy (fused attention or materialised blocks) and the fused
attention kernels: PyTorch's ``scaled_dot_product_attention`` in bounded chunks, or on
CUDA for narrow problems the Triton kernel of :mod:`.triton_attend` (see
:mod:`fluxbench._pairwise`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from fluxbench._pairwise.common import block_rows
from fluxbench._pairwise.triton_attend import MAX_VALUE_WIDTH, MAX_WIDTH, fused_attend, triton_usable

__all__ = ["use_attention", "needs_grad", "blocks_on", "attend"]

# Below this many pairs a softmax mean costs more in per-call overhead (a block pass is
# ~2x the tensor operations of one attention call) than the single exp pass saves.
_BLOCKS_MIN_PAIRS = 1 << 18
# None: attention kernels except on CPU; True / False force them (see use_attention).
_ATTENTION: bool | None = None


@contextlib.contextmanager
def use_attention(enabled: bool | None) -> Iterator[None]:
    """Force fused attention kernels (True), materialised blocks (False), or the default
    (None: blocks on CPU, attention elsewhere) inside the block. Both compute the same sums;
    transition sums too narrow for attention's rounding take blocks under every setting."""
    global _ATTENTION
    previous, _ATTENTION = _ATTENTION, enabled
    try:
        yield
    finally:
        _ATTENTION = previous


def needs_grad(*inputs: Tensor) -> bool:
    """Whether autograd records an operation on these inputs."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def blocks_on(device: torch.device, pairs: int, *inputs: Tensor, min_pairs: int = _BLOCKS_MIN_PAIRS) -> bool:
    """Whether a sum over ``pairs`` pairs takes materialised blocks (else fused attention)."""
    if needs_grad(*inputs):
        return False  # blocks write into reused buffers: only attention is differentiable
    if _ATTENTION is not None:
        return not _ATTENTION
    return device.type == "cpu" and pairs >= min_pairs


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, chunk_size: int | None = None) -> Tensor:
    """Batched softmax attention with scale 1, optionally over slices of groups.

        out[g, i] = sum_j softmax_j( q[g, i] . k[g, j] + bias[g, j] ) v[g, j]

    Shapes: q (G, L, e), k (G or 1, M, e), v (G or 1, M, ev), bias (G, M) -> (G, L, ev).
    Widths are zero-padded to a common size so that the fused kernels (equal head sizes)
    apply. Each call takes at most ``block_rows(M, chunk_size)`` queries (whole groups, or
    row slices of one group), so no call holds more than ``MAX_BLOCK_ENTRIES`` pairs.

    On CUDA with Triton importable, narrow problems (q width <= ``MAX_WIDTH``, v width <=
    ``MAX_VALUE_WIDTH``) take the fused kernel of :mod:`.triton_attend` instead, in one
    call (it holds no score block at all).
    """
    if _takes_triton(q, k, v, bias):
        # k may be zero-padded wider than q (for SDPA's equal widths): q's columns suffice
        return fused_attend(q, k[..., : q.shape[-1]], v, bias)
    width = max(q.shape[-1], v.shape[-1])
    if q.shape[-1] < width:
        q = F.pad(q, (0, width - q.shape[-1]))
        k = F.pad(k, (0, width - k.shape[-1]))
    ev = v.shape[-1]
    if ev < width:
        v = F.pad(v, (0, width - ev))
    g, rows = q.shape[0], q.shape[1]
    # queries per call: the caller's chunk and the memory budget (a kernel may hold a
    # (queries, M) mask or score block), so that memory grows like the batch, not its square
    per = block_rows(k.shape[1], chunk_size)
    if per >= g * rows:
        return _sdpa(q, k, v, bias)[..., :ev]
    outs = []
    if per >= rows:  # whole groups per call
        step = per // rows
        for start in range(0, g, step):
            sl = slice(start, start + step)
            outs.append(_sdpa(q[sl], _groups(k, sl), _groups(v, sl), bias[sl])[..., :ev])
        return torch.cat(outs)
    for gi in range(g):  # row slices of one group per call
        gs = slice(gi, gi + 1)
        ks, vs = _groups(k, gs), _groups(v, gs)
        parts = [_sdpa(q[gs, r0 : r0 + per], ks, vs, bias[gs])[..., :ev] for r0 in range(0, rows, per)]
        outs.append(torch.cat(parts, 1))
    return torch.cat(outs)


def _groups(t: Tensor, sl: slice) -> Tensor:
    """The groups ``sl`` of a (G or 1, ...) tensor (one shared group stays as it is)."""
    return t[sl] if t.shape[0] > 1 else t


def _takes_triton(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> bool:
    """Whether attend takes the fused Triton kernel: CUDA, narrow, one dtype, Triton importable."""
    return (
        q.device.type == "cuda"
        and q.shape[-1] <= MAX_WIDTH
        and v.shape[-1] <= MAX_VALUE_WIDTH
        and len({q.dtype, k.dtype, v.dtype, bias.dtype}) == 1
        and triton_usable(q)
    )


def _sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    g, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]
    mask = bias[:, None, None, :].expand(g, 1, n_q, n_k)
    out = F.scaled_dot_product_attention(
        q[:, None], k.expand(g, -1, -1)[:, None], v.expand(g, -1, -1)[:, None], attn_mask=mask, scale=1.0
    )
    return out[:, 0]
