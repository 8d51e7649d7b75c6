"""Materialised blocks of the Gaussian kernel: the CPU strategy of :mod:`fluxbench._pairwise`.

Keys-major blocks of at most ``_BLOCK`` entries (1 MiB in float32, reused) take the exponential
once per pair: their logits are the exact log-kernels -|z - c|^2 / (2 var) <= 0, held in
base 2 (times ``LOG2E``, folded into the product that makes them; exp2 is the cheaper
exponential, see :mod:`.common`), clamped at a floor above the subnormal range (rows of
tiny mass are recomputed relative to their maximum). Under :func:`.compiled.use_compiled` the means and transition sums take fused
compiled loops instead (CPU).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from fluxbench._pairwise.common import LOG2E, log2_kernel_difference
from fluxbench._pairwise.compiled import block_sums, compiled_on
from fluxbench._pairwise.frames import KeyFrame

__all__ = ["BlockKernel", "blocks_mean", "blocks_transpose_sum", "product_dtype", "shifted_exp2"]

# Materialised blocks (CPU strategy) hold at most this many kernel entries (1 MiB in
# float32, the L2 of a core of the AMD EPYC here): keys-major (M, rows) blocks pass
# through a product, clamp, exp2 and a product; at M = 4096, d = 2 a mean pass takes
# 7.6 ms in blocks of 64 rows, 9.2 ms in blocks of 16 (more calls) and 16 ms in blocks of
# 1024 (out of cache), thread time on one torch thread.
_BLOCK = 1 << 18
# Expanded-form logits are used while their rounding, eps (R + 6 sqrt(var))^2 / var for
# queries within R of their frame centre, stays below this (the attention strategy's
# bound, _ROUNDING_TOL); in float64 when the inputs' dtype misses it; else difference form.
_EXPANDED_TOL = 1e-3


def _exp_limits(dtype: torch.dtype) -> tuple[float, float]:
    """(floor, margin): log-kernels are clamped at ``floor`` (exp stays a normal number:
    subnormals slow CPUs down several-fold), and a row whose kernel mass is below
    M exp(floor + margin) is recomputed relative to its maximum, so that the clamped
    entries (each at most exp(floor)) change no row by more than exp(-margin) relative."""
    return (-700.0, 40.0) if dtype == torch.float64 else (-80.0, 21.0)


def _row_blocks(groups: int, rows: int, cols: int, chunk_size: int | None) -> Iterator[tuple[slice, slice]]:
    """(group slice, row slice) pairs covering a (groups, rows) query grid, each block
    holding at most ``_BLOCK`` kernel entries (and ``chunk_size`` query rows)."""
    # each torch thread's share of a block stays _BLOCK: with more threads, fewer and larger
    # parallel regions (each a barrier, costly on shared machines)
    per = max(1, _BLOCK * torch.get_num_threads() // max(1, cols))
    if chunk_size is not None:
        per = min(per, chunk_size)
    if per >= rows:
        step = per // rows
        for g0 in range(0, groups, step):
            yield slice(g0, g0 + step), slice(None)
        return
    for g in range(groups):
        for r0 in range(0, rows, per):
            yield slice(g, g + 1), slice(r0, r0 + per)


_workspace = threading.local()


def _block_buffer(n: int, dtype: torch.dtype, device: torch.device, slot: int = 0) -> Tensor:
    """A flat buffer of n entries reused across blocks and calls (one per thread, dtype and
    device): a fresh multi-MiB tensor per block is page-faulted in every time, which
    costs more than the block's arithmetic."""
    buffers = getattr(_workspace, "buffers", None)
    if buffers is None:
        buffers = _workspace.buffers = {}
    key = (dtype, device, slot)
    buf = buffers.get(key)
    if buf is None or buf.numel() < n:
        # a normal tensor even when first needed in inference mode: callers outside it write to it
        with torch.inference_mode(False):
            buf = buffers[key] = torch.empty(max(n, _BLOCK), dtype=dtype, device=device)
    return buf[:n]


def product_dtype(q: Tensor, var: float) -> torch.dtype | None:
    """The dtype of the expanded-form log-kernel product for local queries q (..., d):
    q's own while its rounding eps (R + 6 sqrt(var))^2 / var (R the largest |q|) is within
    ``_EXPANDED_TOL``, else float64 if that is, else None (difference form)."""
    reach = float(torch.linalg.vector_norm(q.detach(), dim=-1).amax()) + 6 * math.sqrt(var)
    return next((dt for dt in (q.dtype, torch.float64) if torch.finfo(dt).eps * reach * reach / var <= _EXPANDED_TOL), None)


def shifted_exp2(logits2: Tensor, floor: float, dim: int = -1) -> Tensor:
    """2^(logits2 - max over ``dim``), in place, raised to at least e^floor.

    ``logits2`` are base-2 logits (natural ones times ``LOG2E``); ``floor`` is natural.
    A positive multiple of each softmax row (along ``dim``) with its largest entry exactly
    1 (so the row mass is >= 1); the floor keeps the exponential out of the slow
    subnormal range.
    """
    return logits2.sub_(logits2.amax(dim, keepdim=True)).clamp_(min=floor * LOG2E).exp2_()


class BlockKernel:
    """Materialised blocks of the Gaussian kernel between local queries and a KeyFrame.

    exp(-|q_i - k_j|^2 / (2 var)), the log-kernel <= 0 so exp never overflows (held in
    base 2 and exponentiated by exp2), in the expanded form (one batched product) when
    its rounding is below ``_EXPANDED_TOL`` in the inputs' dtype or else in float64,
    otherwise in difference form (``torch.cdist``). Blocks are keys-major, (n, M, c) for
    the r = n c / g query rows of g frames: both products of a pass then have a short side
    of c, not of a handful of value columns, which BLAS serves far better (see
    ``_BLOCK``). A block of one frame is split into n = one sub-block per torch thread, so
    that its products run as parallel batches (MKL runs a single skinny product on one
    thread: the mean sums of a 4096 x 128 block take 75 us on two threads, two 4096 x 64
    halves 39 us). Blocks are views of a reused buffer: each is consumed before the next is
    computed.
    """

    def __init__(self, q: Tensor, kf: KeyFrame, product_dtype: torch.dtype | None):
        self.q, self.kf, self.var = q, kf, kf.var
        self.floor, margin = _exp_limits(q.dtype)
        self.floor2 = self.floor * LOG2E  # the same clamp for base-2 log-kernels
        self.n_keys = kf.k.shape[1]
        self.low_mass = self.n_keys * math.exp(self.floor + margin)
        self.product_dtype = product_dtype  # from product_dtype(q, var)
        self._aug: tuple[Tensor, Tensor] | None = None  # built on first use

    @property
    def expanded(self) -> bool:
        return self.product_dtype is not None

    def _augmented(self) -> tuple[Tensor, Tensor]:
        if self._aug is None:
            # [q / var, -|q|^2 / (2 var), 1] times LOG2E: the product is the base-2 log-kernel
            qp = self.q.to(self.product_dtype)
            norm = qp.square().sum(-1, keepdim=True).mul_(-0.5 * LOG2E / self.var)
            q_aug = torch.cat([qp * (LOG2E / self.var), norm, torch.full_like(norm, LOG2E)], -1)
            self._aug = (q_aug, self.kf.augmented(self.product_dtype))
        return self._aug

    def _log_kernel(self, gs: slice, rs: slice) -> Tensor:
        """(n, M, c) base-2 log-kernels of the queries ``q[gs, rs]`` (see the class docstring)."""
        if self.expanded:
            q_aug, k_aug = self._augmented()
            qa = _sub_blocks(q_aug[gs, rs])
            ka = k_aug[gs].expand(qa.shape[0], -1, -1)
            shape = (qa.shape[0], ka.shape[2], qa.shape[1])
            out = _block_buffer(math.prod(shape), qa.dtype, qa.device).view(shape)
            torch.bmm(ka.transpose(1, 2), qa.transpose(1, 2), out=out)
            if out.dtype == self.q.dtype:
                return out
            return _block_buffer(out.numel(), self.q.dtype, qa.device, slot=1).view(shape).copy_(out)
        q = _sub_blocks(self.q[gs, rs])
        k = self.kf.k[gs].expand(q.shape[0], -1, -1)
        return log2_kernel_difference(k, q, self.var, max_sum_dim=0)

    def weights(self, gs: slice, rs: slice) -> Tensor:
        """(n, M, c) kernel entries, exp(max(log-kernel, floor)); valid for every query whose
        mass over the included keys is at least ``low_mass``."""
        return self._log_kernel(gs, rs).clamp_(min=self.floor2).exp2_()

    def shifted_weights(self, gs: slice, rs: slice) -> Tensor:
        """The block recomputed relative to each query's maximum: a positive multiple of the
        kernel column, the same after normalisation (queries far from every key)."""
        logits = self._log_kernel(gs, rs)
        if self.kf.mask is not None:
            logits.masked_fill_(self.kf.mask[:, None] == 0, float("-inf"))
        return shifted_exp2(logits, self.floor, dim=1)

    def block(self, gs: slice, rs: slice, low: Tensor | None = None) -> Tensor:
        """:meth:`weights`, or :meth:`shifted_weights` where ``low`` (G, l) marks a row of the block."""
        if low is not None and bool(low[gs, rs].any()):
            return self.shifted_weights(gs, rs)
        return self.weights(gs, rs)

    def mass(self, w: Tensor) -> Tensor:
        """(n, c) sums of a block w (n, M, c) over the included keys."""
        mask = self.kf.mask
        return w.sum(1) if mask is None else torch.matmul(mask, w)


def _sub_blocks(rows: Tensor) -> Tensor:
    """(g, r, k) block rows as (n, c, k): one frame's rows split into one sub-block per
    torch thread (when they divide evenly), else unchanged; sub-blocks are row-major, so
    (n, ..., c) results reshape back to (g, ..., r) with :func:`_join`."""
    threads = torch.get_num_threads()
    if rows.shape[0] == 1 and threads > 1 and rows.shape[1] % threads == 0:
        return rows.view(threads, -1, rows.shape[-1])
    return rows


def _join(x: Tensor, g: int) -> Tensor:
    """(n, e, c) per-sub-block results -> (g, e, r), r = n c / g."""
    n, e, c = x.shape
    return x.view(g, n // g, e, c).transpose(1, 2).reshape(g, e, -1)


def blocks_mean(q: Tensor, kf: KeyFrame, v: Tensor, name: object, chunk_size: int | None) -> Tensor:
    """out[g, i] = sum_j w_gij v[g, j] / sum_j w_gij over included keys; q (G, l, d) local,
    v (G or 1, M, e) -> (G, l, e).

    Every block's sums and masses land in one (G, e + 1, l) tensor; the masses are checked
    once at the end (fewest operations per block) and blocks holding a row of tiny mass
    are recomputed relative to each row's maximum.
    """
    kern = BlockKernel(q, kf, product_dtype(q, kf.var))
    vt = kf.masked_values(v, name)  # (Gv, e + 1, M), the last row the mask
    g_all, rows = q.shape[:2]
    e = v.shape[-1]
    acc = q.new_empty(g_all, e + 1, rows)
    blocks = list(_row_blocks(g_all, rows, kern.n_keys, chunk_size))

    def fill(low: Tensor | None) -> None:
        for gs, rs in blocks:
            if low is None or bool(low[gs, rs].any()):
                w = kern.weights(gs, rs) if low is None else kern.shifted_weights(gs, rs)
                vg = (vt[gs] if vt.shape[0] > 1 else vt).expand(w.shape[0], -1, -1)
                target = acc[gs, :, rs]
                target.copy_(_join(torch.bmm(vg, w), target.shape[0]))  # (e + 1, M) x (M, c)

    if compiled_on(q.device) and kern.product_dtype == q.dtype:
        # one fused pass instead of four per block (see .compiled); low-mass rows below as usual
        q_aug, k_aug = kern._augmented()
        acc = block_sums(q_aug, k_aug, vt.expand(g_all, -1, -1), kern.floor2)
    else:
        fill(None)
    low = acc[:, e] < kern.low_mass
    if bool(low.any()):
        fill(low)
    return (acc[:, :e] / acc[:, e:]).transpose(1, 2)


def blocks_transpose_sum(kern: BlockKernel, values: Tensor, chunk_size: int | None) -> Tensor:
    """out_j = sum_{g, i} w_gij values_gi / s_gi, s_gi = sum over included keys j of w_gij.

    Queries (G, l, d) of ``kern``, values (G, l, e) -> (M, e): a kernel normalised over
    its keys, summed over its queries, in one pass. The masses are checked once at the
    end; if any row's is tiny, the sum is taken again with those blocks recomputed
    relative to each row's maximum.
    """
    q = kern.q
    e = values.shape[-1]
    if compiled_on(q.device) and kern.product_dtype == q.dtype:
        out = _compiled_transpose_sum(kern, values)
        if out is not None:
            return out
    blocks = list(_row_blocks(q.shape[0], q.shape[1], kern.n_keys, chunk_size))
    masses = q.new_empty(q.shape[:2])

    def accumulate(low: Tensor | None) -> Tensor:
        out = q.new_zeros(e, kern.n_keys)
        for gs, rs in blocks:
            w = kern.block(gs, rs, low)  # (n, M, c)
            s = kern.mass(w)  # (n, c), row-major in the block's rows
            if low is None:
                rows = masses[gs, rs]
                rows.copy_(s.view(rows.shape))
            # contiguous (n, e, c): MKL takes 2.5x longer with both operands transposed
            coef = (values[gs, rs].reshape(*s.shape, e) / s[..., None]).transpose(1, 2).contiguous()
            if w.shape[0] == 1:  # accumulated in place, without an (n, e, M) temporary
                out.addmm_(coef[0], w[0].T)  # (e, c) x (c, M)
            else:
                out += torch.bmm(coef, w.transpose(1, 2)).sum(0)
        return out

    out = accumulate(None)
    low = masses < kern.low_mass
    if bool(low.any()):
        out = accumulate(low)
    return out.T


def _compiled_transpose_sum(kern: BlockKernel, values: Tensor) -> Tensor | None:
    """:func:`blocks_transpose_sum` in two compiled passes (see .compiled): the row masses
    s_gi, then out_j = sum_{g, i} w_gij values_gi / s_gi with queries and keys swapped (the
    augmented product is symmetric). None when a row's mass is tiny: the caller's blocks
    then recompute those rows relative to their maximum."""
    q_aug, k_aug = kern._augmented()
    g = q_aug.shape[0]
    mask = kern.kf.mask
    ones = k_aug.new_ones(1, 1, kern.n_keys) if mask is None else mask.view(1, 1, -1)
    masses = block_sums(q_aug, k_aug, ones.expand(g, -1, -1), kern.floor2)[:, 0]  # (G, l)
    if bool((masses < kern.low_mass).any()):
        return None
    # contiguous operands: the compiled loop streams its reduction axis
    coef = (values / masses[..., None]).transpose(1, 2).contiguous()  # (G, e, l)
    keys_as_queries = k_aug.transpose(1, 2).contiguous()  # (G, M, K)
    queries_as_keys = q_aug.transpose(1, 2).contiguous()  # (G, K, l)
    return block_sums(keys_as_queries, queries_as_keys, coef, kern.floor2).sum(0).T  # (M, e)
