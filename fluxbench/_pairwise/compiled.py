"""Compiled CPU kernels for the materialised-block sums (opt-in, ``torch.compile``).

The block strategy of :mod:`.blocks` computes, per block, the log-kernel product, a clamp,
an exponential and a weighted sum: four passes over each (M, rows) block in eager mode.
Compiled by Inductor into one loop, the same sums

    acc[g, c, i] = sum_j 2^max(qa[g, i] . ka[g, :, j], floor2) vt[g, c, j]      (S)

(base-2 log-kernels, as the blocks hold them) take one pass and no block at all: a
4096 x 4096 mean at d = 2 costs 5.6 ms instead of 7.9 ms in eager blocks (thread time, one
torch thread, AMD EPYC). :mod:`.blocks` uses (S) for the means and moment passes, and
twice for a transition sum (the row masses, then (S) with queries and keys swapped: the
augmented product is symmetric). The price is compilation (about 10-15 s per width on
first use; Inductor caches the generated code on disk), so it is off unless a caller
turns it on with :func:`use_compiled` (``fluxbench bench --compile`` does). The value
columns are separate reductions of one loop: written as one broadcast product and a sum,
Inductor emitted a kernel 6x slower.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["use_compiled", "compiled_on", "block_sums"]

_ENABLED = False
_compiled = None
# compilations kept for (S): a few value widths x dtypes x one or several frames
_RECOMPILE_LIMIT = 64


@contextlib.contextmanager
def use_compiled(enabled: bool) -> Iterator[None]:
    """Take the block sums on CPU through the compiled kernel (S) inside the block."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    try:
        yield
    finally:
        _ENABLED = previous


def compiled_on(device: torch.device) -> bool:
    """Whether block sums on ``device`` take the compiled kernel (enabled, and CPU)."""
    return _ENABLED and device.type == "cpu"


def _block_sums(qa: Tensor, ka: Tensor, vt: Tensor, floor2: float) -> Tensor:
    # the product unrolled over its few columns: pointwise, so it fuses into the reduction
    logits = qa[:, :, 0, None] * ka[:, None, 0, :]
    for a in range(1, qa.shape[-1]):
        logits = logits + qa[:, :, a, None] * ka[:, None, a, :]
    w = torch.exp2(torch.clamp(logits, min=floor2))
    return torch.stack([(w * vt[:, c, None, :]).sum(-1) for c in range(vt.shape[1])], 1)


def block_sums(qa: Tensor, ka: Tensor, vt: Tensor, floor2: float) -> Tensor:
    """(S) compiled: qa (G, L, K) augmented queries, ka (G, K, M) augmented keys, vt
    (G, C, M) value rows -> (G, C, L), not differentiable. K and C are compile-time
    constants (one compilation per pair, and per G = 1 or G > 1); L and M are dynamic."""
    global _compiled
    if _compiled is None:
        # Inductor's FX-graph cache does not key its entries on ATen's CPU capability: a graph
        # compiled under ATEN_CPU_CAPABILITY=avx2 and loaded under AVX-512 (or the reverse)
        # gave sums wrong by O(1) (torch 2.14.1, AMD EPYC). Without it the generated C++ is
        # cached by its source and compiler flags, which name the ISA.
        _compiled = torch.compile(_block_sums, dynamic=True, options={"fx_graph_cache": False})
    # one grad mode for every caller (blocks never hold a graph), so inference-mode and
    # normal callers share compilations; value widths (means, moments, masses, transition
    # sums) and single versus several frames each compile once, more than dynamo's
    # default of 8 per function, so its limit is raised for this call only
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        return _compiled(qa, ka, vt, floor2)
