"""The choice of strategy (fused attention or materialised blocks) and the fused
attention kernels (see :mod:`fluxbench._pairwise`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

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

    Shapes: q (G, L, e), k (G, M, e), v (G, M, ev), bias (G, M) -> (G, L, ev). Widths are
    zero-padded to a common size so that the fused kernels (equal head sizes) apply.
    """
    width = max(q.shape[-1], v.shape[-1])
    if q.shape[-1] < width:
        q = F.pad(q, (0, width - q.shape[-1]))
        k = F.pad(k, (0, width - k.shape[-1]))
    ev = v.shape[-1]
    if ev < width:
        v = F.pad(v, (0, width - ev))
    if chunk_size is None or chunk_size >= q.shape[0] * q.shape[1]:
        return _sdpa(q, k, v, bias)[..., :ev]
    per = max(1, chunk_size // q.shape[1])
    outs = []
    for start in range(0, q.shape[0], per):
        sl = slice(start, start + per)
        ks = k[sl] if k.shape[0] > 1 else k
        vs = v[sl] if v.shape[0] > 1 else v
        outs.append(_sdpa(q[sl], ks, vs, bias[sl])[..., :ev])
    return torch.cat(outs)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    g, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]
    mask = bias[:, None, None, :].expand(g, 1, n_q, n_k)
    out = F.scaled_dot_product_attention(
        q[:, None], k.expand(g, -1, -1)[:, None], v.expand(g, -1, -1)[:, None], attn_mask=mask, scale=1.0
    )
    return out[:, 0]
