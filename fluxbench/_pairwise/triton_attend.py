"""A fused Triton kernel for the softmax-weighted sums of narrow problems (CUDA), forward
and backward (see :mod:`fluxbench._pairwise`).

    out[g, i] = sum_j softmax_j( s_gij ),   s_gij = q[g, i] . k[g, j] + bias[g, j]      (A)

is the attention form of every pairwise sum of the package (:func:`.attention.attend`).
One program per (group, block of ``_BQ`` queries) streams the keys in blocks of ``_BK``
with an online softmax (running maximum m_i and mass l_i, rescaled by exp(m_old - m_new)),
so nothing of size L x M exists anywhere: memory is O(G L (e + ev)) plus the inputs. The
log-partition lse_i = m_i + log l_i is kept for the backward pass, which recomputes the
weights p_ij = exp(s_ij - lse_i) (the flash-attention scheme):

    delta_i = sum_c dout_ic out_ic,     ds_ij = p_ij (dout_i . v_j - delta_i)
    dq_i = sum_j ds_ij k_j,   dk_j = sum_i ds_ij q_i,   dv_j = sum_i p_ij dout_i,   dbias_j = sum_i ds_ij

(one kernel over query blocks for dq, one over key blocks for dk, dv, dbias). Products
use ``tl.dot`` with IEEE precision (never TF32) on widths zero-padded to a power of two
>= 16, which is exact padding; everything runs in the inputs' dtype (float32 or float64,
the package's working dtypes), so its rounding is that of a reordered sum.

Dispatched by :func:`.attention.attend` for CUDA tensors of width at most ``MAX_WIDTH``
(queries) and ``MAX_VALUE_WIDTH`` (values) when Triton is importable. The kernels live in
:mod:`.triton_kernels`, imported on first use (and reloaded when ``TRITON_INTERPRET``
changed), so ``TRITON_INTERPRET=1`` runs them on CPU tensors through Triton's
interpreter (the tests do).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch
from torch import Tensor

__all__ = ["fused_attend", "triton_usable", "interpreting", "MAX_WIDTH", "MAX_VALUE_WIDTH"]

# Query/key and value widths the kernel takes (padded to powers of two >= 16 in registers):
# small d, where a fused kernel beats materialised scores by the most.
MAX_WIDTH = 16
MAX_VALUE_WIDTH = 64
# Queries per program and keys per inner step.
_BQ, _BK = 64, 32


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(*tensors: Tensor) -> bool:
    """Whether :func:`fused_attend` runs for these tensors: Triton importable and all on CUDA
    (or on the CPU with ``TRITON_INTERPRET=1``, Triton's interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    interpret = interpreting()
    return all(t.device.type == "cuda" or (interpret and t.device.type == "cpu") for t in tensors)


def _pad_width(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _kernels():
    """The kernel module, (re)loaded in the interpreter setting now in force."""
    module = importlib.import_module("fluxbench._pairwise.triton_kernels")
    if module.INTERPRET != interpreting():
        module = importlib.reload(module)
    return module


def _launch_args(q: Tensor, k: Tensor, v: Tensor, bias: Tensor):
    """Contiguous inputs and their group strides (0 for keys or values shared by all groups)."""
    q, k, v, bias = (t.contiguous() for t in (q, k, v, bias))
    g, l, e = q.shape
    m, ev = k.shape[1], v.shape[-1]
    strides = (l * e, 0 if k.shape[0] == 1 else m * e, 0 if v.shape[0] == 1 else m * ev, m)
    consts = {"BQ": _BQ, "BK": _BK, "EP": _pad_width(e), "EVP": _pad_width(ev)}
    return (q, k, v, bias), (g, l, m, e, ev), strides, consts


class _FusedAttend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        kern = _kernels()
        (q, k, v, bias), (g, l, m, e, ev), strides, consts = _launch_args(q, k, v, bias)
        out = q.new_empty(g, l, ev)
        lse = q.new_empty(g, l)
        kern.forward[(kern.cdiv(l, _BQ), g)](q, k, v, bias, out, lse, l, m, e, ev, *strides, l * ev, **consts)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        kern = _kernels()
        q, k, v, bias, out, lse = ctx.saved_tensors
        (q, k, v, bias), (g, l, m, e, ev), strides, consts = _launch_args(q, k, v, bias)
        dout = dout.contiguous()
        delta = (dout * out).sum(-1)
        dq = torch.empty_like(q)
        kern.backward_q[(kern.cdiv(l, _BQ), g)](q, k, v, bias, dout, lse, delta, dq, l, m, e, ev, *strides, **consts)
        dk, dv, db = q.new_empty(g, m, e), q.new_empty(g, m, ev), q.new_empty(g, m)
        kern.backward_kv[(kern.cdiv(m, _BK), g)](q, k, v, bias, dout, lse, delta, dk, dv, db, l, m, e, ev, *strides, **consts)
        # keys or values shared by every group collect the gradient of all groups
        dk = dk.sum(0, keepdim=True) if k.shape[0] == 1 and g > 1 else dk
        dv = dv.sum(0, keepdim=True) if v.shape[0] == 1 and g > 1 else dv
        return dq, dk, dv, db


def fused_attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """(A) in one fused Triton kernel, differentiable in every input.

    Shapes: q (G, L, e), k (G or 1, M, e), v (G or 1, M, ev), bias (G, M) -> (G, L, ev),
    e <= ``MAX_WIDTH``, ev <= ``MAX_VALUE_WIDTH``, one dtype (float32 or float64), on CUDA
    (or CPU under ``TRITON_INTERPRET=1``). A row whose scores are all -inf gives NaN, as
    softmax does.

    Raises:
        ValueError: on shapes, widths or dtypes outside these.
    """
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3 or bias.shape != (q.shape[0], k.shape[1]):
        raise ValueError(
            f"fused_attend needs q (G, L, e), k and v (G or 1, M, .), bias (G, M); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(bias.shape)}"
        )
    if k.shape[-1] != q.shape[-1] or v.shape[1] != k.shape[1] or k.shape[0] not in (1, q.shape[0]) or v.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"fused_attend: k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if q.shape[-1] > MAX_WIDTH or v.shape[-1] > MAX_VALUE_WIDTH:
        raise ValueError(f"fused_attend takes widths up to {MAX_WIDTH} (q, k) and {MAX_VALUE_WIDTH} (v); got {q.shape[-1]}, {v.shape[-1]}")
    if len({t.dtype for t in (q, k, v, bias)}) != 1 or q.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"fused_attend needs one dtype, float32 or float64; got {[str(t.dtype) for t in (q, k, v, bias)]}")
    return _FusedAttend.apply(q, k, v, bias)
