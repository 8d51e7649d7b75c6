"""Gaussian-kernel sums over all pairs of two point clouds, without N x M memory.

Everything Flux Matching does with a batch reduces to sums of the form

    out_i = sum_j softmax_j( -|z_i - c_j|^2 / (2 var) ) v_j                  (P1)

(posterior means and moments of the smoothed empirical measure, SPEC eq. (5)), their
log-partition functions log sum_j exp(-|z_i - c_j|^2 / (2 var)), and transposed sums
sum_j W_ij g_j of a kernel matrix normalised over its *first* index (SPEC section 2,
step 6).

(P1) is attention with queries z / var, keys c and a per-key bias -|c_j|^2 / (2 var), so
PyTorch's fused ``scaled_dot_product_attention`` kernels do the work on every device
without materialising the N x M matrix. Three details make this exact and accurate:

* **fp32 or better.** Autocast is disabled inside and half precision is promoted to
  float32 (SPEC section 2, known hazards); float64 inputs stay float64.
* **Local frames.** The expanded form z.c / var - |c|^2 / (2 var) cancels when
  |c| >> sqrt(var). Queries are sorted into spatially coherent groups (:class:`Frames`,
  a k-d bisection) and each group is computed in coordinates centred on its own mean, so
  rounding scales with the group radius, not the data radius. The bisection stops as
  soon as the rounding bound is met, so well-conditioned batches use a single frame.
* **Log-partition by a reference key.** Attention is normalised per query, which hides
  the partition function. One extra key whose logit equals that of a known term
  recovers it: Z_i = exp(l_ref) * (mass on the real keys) / (mass on the reference key),
  both masses sums of positive terms (no cancellation). Rows where a mass underflows
  are recomputed densely.

**Two evaluation strategies, the same sums.** Fused attention kernels never hold an
N x M block. Materialised blocks of at most ``_BLOCK`` entries (4 MiB, reused) take the
exponential, the dominant cost, once per pair: their logits are the exact log-kernels
-|z - c|^2 / (2 var) <= 0 (no running maximum, no rescaling), clamped at a floor above
the subnormal range (rows of tiny mass are recomputed relative to their maximum), and a
transposed sum of step 6 takes one pass instead of a log-partition pass plus a sum pass.
On CPU, where they are faster (``python -m fluxbench.bench``: the transition sums at
B = 4096, d = 2 take about half the time), blocks do the transposed sums and the means
with at most ``_NARROW`` value columns over at least ``_BLOCKS_MIN_PAIRS`` pairs;
attention does the rest, everything on other devices, and every sum whose inputs require
gradients (blocks write into reused buffers). One exception on every device: a transition
kernel much narrower than the frames were sized for (small t) is beyond the expanded
form's float32 rounding, so its sums always take blocks, with float64 products or
distances in difference form (see ``_EXPANDED_TOL``). :func:`use_attention` forces
either strategy elsewhere (the tests run both).

Queries are passed in *frame order* (``frames.permute(z)``, or any subset with the same
number of rows in every group, group after group), so no gather or scatter is needed.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import no_autocast

__all__ = [
    "compute_dtype",
    "Frames",
    "KeyFrame",
    "kernel_mean",
    "kernel_logsumexp",
    "kernel_transpose_sum",
    "kernel_transition_sum",
    "use_attention",
]

# Keys are replicated once per frame: at most this many scalars (G * M * width) in all.
_FRAME_BUDGET = 1 << 22
# Fewest queries per frame (the fused kernel loses efficiency below a few dozen).
_MIN_GROUP = 16
# Relative rounding error accepted from the expanded form, for the widest pass (third
# moments): eps * ((r + 4 sigma) / sigma)^3 with r the largest frame radius. A worst-case
# bound, far below the Monte Carlo error of any single loss evaluation.
_ROUNDING_TOL = 1e-3


# Materialised blocks (CPU strategy) hold at most this many kernel entries (4 MiB in float32).
_BLOCK = 1 << 20
# Expanded-form logits are used while their rounding, eps (R + 6 sqrt(var))^2 / var for
# queries within R of their frame centre, stays below this (the attention strategy's
# bound, _ROUNDING_TOL); in float64 when the inputs' dtype misses it; else difference form.
_EXPANDED_TOL = 1e-3
# Blocks pay for their weighted sum with a product whose cost grows with the number of
# value columns, where attention kernels fuse it: wider sums (moments) use attention
# (measured with python -m fluxbench.bench).
_NARROW = 4
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


def _needs_grad(*inputs: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def _blocks_on(device: torch.device, pairs: int, *inputs: Tensor, min_pairs: int = _BLOCKS_MIN_PAIRS) -> bool:
    if _needs_grad(*inputs):
        return False  # blocks write into reused buffers: only attention is differentiable
    if _ATTENTION is not None:
        return not _ATTENTION
    return device.type == "cpu" and pairs >= min_pairs


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype pairwise work runs in: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _tiny(dtype: torch.dtype) -> float:
    # a mass below this has lost relative precision to underflow
    return 1e-300 if dtype == torch.float64 else 1e-30


def _bisect(points: Tensor, groups: Tensor) -> Tensor:
    """Split every group (G, s) at its median along its coordinate of largest range -> (2G, s/2)."""
    pts = points[groups]  # (G, s, d)
    axis = (pts.amax(1) - pts.amin(1)).argmax(1)
    key = pts.gather(2, axis.view(-1, 1, 1).expand(-1, pts.shape[1], 1)).squeeze(2)
    return groups.gather(1, key.argsort(dim=1, stable=True)).reshape(groups.shape[0] * 2, -1)


def _radius(points: Tensor, groups: Tensor) -> float:
    pts = points.detach()[groups]
    return float((pts - pts.mean(1, keepdim=True)).square().sum(-1).amax().sqrt())


class Frames:
    """A grouping of N rows into G spatially coherent groups of L rows (local frames).

    Rows are permuted into *frame order* (group after group) and padded to P = G * L by
    repeating the last row. Padding rows may be used freely as queries; as keys they
    carry the bias :attr:`key_bias` (-inf), so they never contribute.

    Args:
        points: (N, d) the rows to group (or points close to them: the grouping only
            needs to be coherent, e.g. the data a chain started from).
        n_keys, width: size of the key sets the frames will be used with; the number of
            groups is at most what ``_FRAME_BUDGET`` allows for them, and at most
            N / ``_MIN_GROUP``.
        scale: the kernel's standard deviation. The k-d bisection stops at the first
            level whose rounding bound eps * ((r + 4 scale) / scale)^3 is below
            ``_ROUNDING_TOL`` (r the largest frame radius). Without it, the maximum
            number of groups is used.
    """

    def __init__(self, points: Tensor, *, n_keys: int | None = None, width: int = 1, scale: float | None = None):
        n, d = points.shape
        afford = max(1, _FRAME_BUDGET // max(1, (n_keys or n) * width))
        g_max = 1 << (max(1, min(n // _MIN_GROUP, afford)).bit_length() - 1)
        size = -(-n // g_max)
        padded = self._pad_rows(points, g_max * size - n)
        groups = torch.arange(padded.shape[0], device=points.device).view(1, -1)
        eps = torch.finfo(points.dtype).eps
        while groups.shape[0] < g_max:
            if scale is not None and eps * ((_radius(padded, groups) + 4 * scale) / scale) ** 3 <= _ROUNDING_TOL:
                break
            groups = _bisect(padded, groups)
        self.n, self.n_groups, self.size = n, groups.shape[0], groups.shape[1]
        if self.n_groups == 1:
            # one frame: rows keep their order and nothing is padded
            self.order = self._inverse = self.own = groups[0, :n]
            self.centres = points.mean(0, keepdim=True)
            self.key_bias = None
            self.size = n
            return
        self.order = groups.reshape(-1)  # (P,) frame position -> row
        inverse = torch.empty_like(self.order)
        inverse[self.order] = torch.arange(self.order.numel(), device=points.device)
        self._inverse = inverse[:n]
        self.centres = padded[groups].mean(1)  # (G, d)
        padding = self.order >= n
        self.key_bias = None
        # each row's own position, padding rows pointing at the real row they repeat
        self.own = torch.where(padding, inverse[n - 1], torch.arange(self.padded, device=points.device))
        if bool(padding.any()):
            self.key_bias = torch.zeros(self.padded, dtype=points.dtype, device=points.device)
            self.key_bias[padding] = float("-inf")

    @staticmethod
    def _pad_rows(t: Tensor, extra: int) -> Tensor:
        return t if extra == 0 else torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])

    @property
    def padded(self) -> int:
        """P = G * L."""
        return self.n_groups * self.size

    def permute(self, t: Tensor) -> Tensor:
        """(N, ...) in the original order -> (P, ...) in frame order."""
        if self.n_groups == 1:
            return t
        return self._pad_rows(t, self.padded - self.n)[self.order]

    def unpermute(self, t: Tensor) -> Tensor:
        """(P, ...) in frame order -> (N, ...) in the original order (padding dropped)."""
        return t if self.n_groups == 1 else t[self._inverse]

    def local(self, z: Tensor) -> Tensor:
        """(G * l, d) group-major points -> (G, l, d) coordinates in their frames."""
        return z.view(self.n_groups, -1, z.shape[-1]) - self.centres.to(z.dtype)[:, None]

    def add_centres(self, out: Tensor) -> Tensor:
        """(G * l, d) group-major local coordinates -> global ones."""
        g = self.n_groups
        return (out.view(g, -1, out.shape[-1]) + self.centres.to(out.dtype)[:, None]).view(out.shape)

    def row_centres(self, rows: int, dtype: torch.dtype) -> Tensor:
        """(rows, d) the frame centre of each of ``rows`` group-major rows."""
        return self.centres.to(dtype).repeat_interleave(rows // self.n_groups, dim=0)

    def sample_rows(self, per_group: int, generator: torch.Generator | None = None) -> Tensor:
        """Positions of ``per_group`` rows drawn uniformly without replacement in every group.

        Every row is drawn with probability per_group / L (stratified sampling).

        Returns:
            (G * per_group,) long tensor of frame positions, group-major.
        """
        u = torch.rand(self.n_groups, self.size, generator=generator, device=self.order.device)
        pick = u.argsort(dim=1)[:, :per_group].sort(dim=1).values
        offsets = torch.arange(self.n_groups, device=pick.device)[:, None] * self.size
        return (pick + offsets).reshape(-1)


class KeyFrame:
    """Keys expressed in every local frame, with their kernel bias; reusable across calls.

    Args:
        frames: the query grouping.
        keys: (M, d) key points (any order).
        var: kernel variance.
        dtype: compute dtype.
        key_bias: optional (M,) added to every logit of a key (e.g. -inf for padding).

    Attributes:
        k: (G, M, d) keys minus each frame centre.
        bias: (G, M) -|k|^2 / (2 var) (+ key_bias).
        mask: (M,) 1 for keys with a finite key_bias, 0 for excluded ones; None without
            key_bias. The materialised-block strategy accepts key biases of 0 or -inf only.
    """

    def __init__(self, frames: Frames, keys: Tensor, var: float, dtype: torch.dtype, key_bias: Tensor | None = None):
        self.frames = frames
        self.var = var
        self.k = keys.to(dtype)[None] - frames.centres.to(dtype)[:, None]
        self.bias = self.k.square().sum(-1).mul_(-0.5 / var)
        self.mask = None
        if key_bias is not None:
            key_bias = key_bias.to(dtype)
            self.bias = self.bias + key_bias
            self.mask = torch.isfinite(key_bias).to(dtype)
        self._cache: dict[object, Tensor] = {}

    def augmented(self, dtype: torch.dtype) -> Tensor:
        """(G, d + 2, M) [k; 1; -|k|^2 / (2 var)] in ``dtype``: with queries
        [q / var, -|q|^2 / (2 var), 1] one batched product gives the log-kernel
        -|q - k|^2 / (2 var) (expanded form). Computed once per dtype."""
        key = ("augmented", dtype)
        if key not in self._cache:
            k = self.k.to(dtype)
            bias = k.square().sum(-1, keepdim=True).mul_(-0.5 / self.var)
            self._cache[key] = torch.cat([k, torch.ones_like(bias), bias], -1).transpose(1, 2).contiguous()
        return self._cache[key]

    def masked_values(self, v: Tensor, name: object) -> Tensor:
        """(Gv, M, e) values -> (Gv, e + 1, M): [v * mask; mask] transposed (mask 1 without key_bias).

        The extra row yields each query's kernel mass over the included keys in the same
        product as the weighted sum. Computed once per ``name``.
        """
        key = ("masked", name)
        if key not in self._cache:
            ones = torch.ones_like(v[..., :1]) if self.mask is None else self.mask[None, :, None].expand(v.shape[0], -1, 1)
            vals = v if self.mask is None else v * ones
            self._cache[key] = torch.cat([vals, ones], -1).transpose(1, 2).contiguous()
        return self._cache[key]

    def features(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """fn(k), computed once per feature map."""
        if fn not in self._cache:
            self._cache[fn] = fn(self.k)
        return self._cache[fn]

    def padded(self, width: int) -> Tensor:
        """k zero-padded to ``width`` columns, computed once per width."""
        if width == self.k.shape[-1]:
            return self.k
        if width not in self._cache:
            self._cache[width] = F.pad(self.k, (0, width - self.k.shape[-1]))
        return self._cache[width]


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, chunk_size: int | None = None) -> Tensor:
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


def _exp_limits(dtype: torch.dtype) -> tuple[float, float]:
    """(floor, margin): log-kernels are clamped at ``floor`` (exp stays a normal number:
    subnormals slow CPUs down several-fold), and a row whose kernel mass is below
    M exp(floor + margin) is recomputed relative to its maximum, so that the clamped
    entries (each at most exp(floor)) change no row by more than exp(-margin) relative."""
    return (-700.0, 40.0) if dtype == torch.float64 else (-80.0, 21.0)


def _row_blocks(groups: int, rows: int, cols: int, chunk_size: int | None) -> Iterator[tuple[slice, slice]]:
    """(group slice, row slice) pairs covering a (groups, rows) query grid, each block
    holding at most ``_BLOCK`` kernel entries (and ``chunk_size`` query rows)."""
    per = max(1, _BLOCK // max(1, cols))
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


def _product_dtype(q: Tensor, var: float) -> torch.dtype | None:
    """The dtype of the expanded-form log-kernel product for local queries q (..., d):
    q's own while its rounding eps (R + 6 sqrt(var))^2 / var (R the largest |q|) is within
    ``_EXPANDED_TOL``, else float64 if that is, else None (difference form)."""
    reach = float(torch.linalg.vector_norm(q.detach(), dim=-1).amax()) + 6 * math.sqrt(var)
    return next((dt for dt in (q.dtype, torch.float64) if torch.finfo(dt).eps * reach * reach / var <= _EXPANDED_TOL), None)


def _shifted_exp(logits: Tensor, floor: float) -> Tensor:
    """exp(logits - max over the last axis), in place, raised to at least exp(floor).

    A positive multiple of each softmax row with its largest entry exactly 1 (so the row
    mass is >= 1); the floor keeps exp out of the slow range below about -87.
    """
    return logits.sub_(logits.amax(-1, keepdim=True)).clamp_(min=floor).exp_()


class _BlockKernel:
    """Materialised blocks of the Gaussian kernel between local queries and a KeyFrame.

    exp(-|q_i - k_j|^2 / (2 var)), the log-kernel <= 0 so exp never overflows, in the
    expanded form (one batched product) when its rounding is below ``_EXPANDED_TOL`` in
    the inputs' dtype or else in float64, otherwise in difference form (``torch.cdist``).
    Blocks are views of a reused buffer: each is consumed before the next is computed.
    """

    def __init__(self, q: Tensor, kf: KeyFrame, product_dtype: torch.dtype | None):
        self.q, self.kf, self.var = q, kf, kf.var
        self.floor, margin = _exp_limits(q.dtype)
        self.n_keys = kf.k.shape[1]
        self.low_mass = self.n_keys * math.exp(self.floor + margin)
        self.product_dtype = product_dtype  # from _product_dtype(q, var)
        self._aug: tuple[Tensor, Tensor] | None = None  # built on first use

    @property
    def expanded(self) -> bool:
        return self.product_dtype is not None

    def _augmented(self) -> tuple[Tensor, Tensor]:
        if self._aug is None:
            qp = self.q.to(self.product_dtype)
            norm = qp.square().sum(-1, keepdim=True).mul_(-0.5 / self.var)
            q_aug = torch.cat([qp * (1.0 / self.var), norm, torch.ones_like(norm)], -1)
            self._aug = (q_aug, self.kf.augmented(self.product_dtype))
        return self._aug

    def _log_kernel(self, gs: slice, rs: slice) -> Tensor:
        if self.expanded:
            q_aug, k_aug = self._augmented()
            qa, ka = q_aug[gs, rs], k_aug[gs]
            shape = (qa.shape[0], qa.shape[1], ka.shape[2])
            out = _block_buffer(math.prod(shape), qa.dtype, qa.device).view(shape)
            torch.bmm(qa, ka, out=out)
            if out.dtype == self.q.dtype:
                return out
            return _block_buffer(out.numel(), self.q.dtype, qa.device, slot=1).view(shape).copy_(out)
        d2 = torch.cdist(self.q[gs, rs], self.kf.k[gs], compute_mode="donot_use_mm_for_euclid_dist")
        return d2.square_().mul_(-0.5 / self.var)

    def weights(self, gs: slice, rs: slice) -> Tensor:
        """(g, r, M) kernel entries, exp(max(log-kernel, floor)); valid for every row whose
        mass over the included keys is at least ``low_mass``."""
        return self._log_kernel(gs, rs).clamp_(min=self.floor).exp_()

    def shifted_weights(self, gs: slice, rs: slice) -> Tensor:
        """The block recomputed relative to each row's maximum: a positive multiple of the
        kernel row, the same after normalisation (queries far from every key)."""
        logits = self._log_kernel(gs, rs)
        if self.kf.mask is not None:
            logits.masked_fill_(self.kf.mask == 0, float("-inf"))
        return _shifted_exp(logits, self.floor)

    def block(self, gs: slice, rs: slice, low: Tensor | None = None) -> Tensor:
        """:meth:`weights`, or :meth:`shifted_weights` where ``low`` (G, l) marks a row of the block."""
        if low is not None and bool(low[gs, rs].any()):
            return self.shifted_weights(gs, rs)
        return self.weights(gs, rs)

    def mass(self, w: Tensor) -> Tensor:
        """(g, r, 1) row sums of w over the included keys."""
        mask = self.kf.mask
        return w.sum(-1, keepdim=True) if mask is None else torch.matmul(w, mask[:, None])


def _blocks_mean(q: Tensor, kf: KeyFrame, v: Tensor, name: object, chunk_size: int | None) -> Tensor:
    """out[g, i] = sum_j w_gij v[g, j] / sum_j w_gij over included keys; q (G, l, d) local,
    v (G or 1, M, e) -> (G, l, e).

    Every block's sums and masses land in one (G, e + 1, l) tensor; the masses are checked
    once at the end (fewest operations per block) and blocks holding a row of tiny mass
    are recomputed relative to each row's maximum.
    """
    kern = _BlockKernel(q, kf, _product_dtype(q, kf.var))
    vt = kf.masked_values(v, name)  # (Gv, e + 1, M), the last row the mask
    g_all, rows = q.shape[:2]
    e = v.shape[-1]
    acc = q.new_empty(g_all, e + 1, rows)
    blocks = list(_row_blocks(g_all, rows, kern.n_keys, chunk_size))

    def fill(low: Tensor | None) -> None:
        for gs, rs in blocks:
            if low is None or bool(low[gs, rs].any()):
                w = kern.weights(gs, rs) if low is None else kern.shifted_weights(gs, rs)
                vg = vt[gs] if vt.shape[0] > 1 else vt.expand(w.shape[0], -1, -1)
                # (e+1, M) x (M, r): the long dimension inside, which BLAS streams best
                acc[gs, :, rs] = torch.bmm(vg, w.transpose(1, 2))

    fill(None)
    low = acc[:, e] < kern.low_mass
    if bool(low.any()):
        fill(low)
    return (acc[:, :e] / acc[:, e:]).transpose(1, 2)


def _blocks_transpose_sum(kern: _BlockKernel, values: Tensor, chunk_size: int | None) -> Tensor:
    """out_j = sum_{g, i} w_gij values_gi / s_gi, s_gi = sum over included keys j of w_gij.

    Queries (G, l, d) of ``kern``, values (G, l, e) -> (M, e): a kernel normalised over
    its keys, summed over its queries, in one pass. The masses are checked once at the
    end; if any row's is tiny, the sum is taken again with those blocks recomputed
    relative to each row's maximum.
    """
    q = kern.q
    e = values.shape[-1]
    blocks = list(_row_blocks(q.shape[0], q.shape[1], kern.n_keys, chunk_size))
    masses = q.new_empty(q.shape[:2])

    def accumulate(low: Tensor | None) -> Tensor:
        out = q.new_zeros(e, kern.n_keys)
        for gs, rs in blocks:
            w = kern.block(gs, rs, low)
            s = kern.mass(w)
            if low is None:
                masses[gs, rs] = s[..., 0]
            coef = (values[gs, rs] / s).reshape(-1, e).T.contiguous()
            out.addmm_(coef, w.reshape(-1, kern.n_keys))
        return out

    out = accumulate(None)
    low = masses < kern.low_mass
    if bool(low.any()):
        out = accumulate(low)
    return out.T


def _adhoc(queries: Tensor, n_keys: int, width: int, var: float) -> Frames:
    # as few frames as the rounding bound allows: well-conditioned problems use one
    return Frames(queries, n_keys=n_keys, width=width, scale=math.sqrt(var))


def kernel_mean(
    queries: Tensor,
    keys: Tensor | KeyFrame,
    var: float,
    features: Callable[[Tensor], Tensor] | None = None,
    *,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax-weighted means under a Gaussian kernel (SPEC eq. (5)).

        w_ij = softmax_j( -|z_i - c_j|^2 / (2 var) ),   out_i = sum_j w_ij phi(c_j - a_i)

    with a_i the centre of query i's local frame. With ``features=None``, phi is the
    identity and the frame is added back: ``out_i = sum_j w_ij c_j`` is the posterior
    mean m(z_i) of the smoothed empirical measure. Materialised blocks or fused
    attention, as the module docstring says; the two agree to rounding.

    Args:
        queries: (Q, d) points z. With a :class:`KeyFrame`, they are group-major in its
            frames (``frames.permute(z)`` or a ``sample_rows`` subset); with plain keys,
            in any order (frames are built for the call).
        keys: (M, d) centres c, or a :class:`KeyFrame` of them (reused across calls).
        var: kernel variance (sigma^2, not sigma), > 0.
        features: optional map (..., d) -> (..., k) applied to keys in local coordinates.
        chunk_size: at most this many queries per fused call or block.

    Returns:
        (Q, d) posterior means, or with ``features`` a pair ((Q, k) feature means,
        (Q, d) frame centre of each query).
    """
    adhoc = not isinstance(keys, KeyFrame)
    with no_autocast(queries.device):
        if adhoc:
            dtype = compute_dtype(queries, keys)
            frames = _adhoc(queries, keys.shape[0], keys.shape[1], var)
            kf = KeyFrame(frames, keys, var, dtype)
            zq = frames.permute(queries)
        else:
            kf, frames, zq = keys, keys.frames, queries
            dtype = kf.k.dtype
        q = frames.local(zq.to(dtype))
        v = kf.k if features is None else kf.features(features)
        if v.shape[-1] <= _NARROW and _blocks_on(q.device, q.shape[0] * q.shape[1] * kf.k.shape[1], q, kf.k):
            out = _blocks_mean(q, kf, v, features, chunk_size).reshape(zq.shape[0], -1)
        else:
            k = kf.padded(max(q.shape[-1], v.shape[-1]))
            out = _attend(q.mul_(1.0 / var), k, v, kf.bias, chunk_size).reshape(zq.shape[0], -1)
        if features is None:
            out = frames.add_centres(out)
            return frames.unpermute(out) if adhoc else out
        centre = frames.row_centres(zq.shape[0], dtype)
        return (frames.unpermute(out), frames.unpermute(centre)) if adhoc else (out, centre)


def _dense_logsumexp(queries: Tensor, keys: Tensor, var: float, key_bias: Tensor | None) -> Tensor:
    d2 = torch.cdist(queries, keys, compute_mode="donot_use_mm_for_euclid_dist").square()
    logits = -0.5 * d2 / var
    return torch.logsumexp(logits if key_bias is None else logits + key_bias, dim=1)


def kernel_logsumexp(
    queries: Tensor,
    keys: Tensor,
    var: float,
    reference: Tensor,
    *,
    frames: Frames | None = None,
    key_bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Log-partition functions of the Gaussian kernel, one per query.

        out_i = log sum_j exp( -|z_i - c_j|^2 / (2 var) + b_j )

    in one fused attention call: a reference key whose logit equals that of key
    ``reference[i]`` is appended, and out_i = l_{i,ref} + log(mass on the real keys / mass
    on the reference key). Rows where a mass underflows (the reference term more than
    ~80 nats from the maximum) are recomputed densely.

    Args:
        queries: (Q, d) points z (group-major in ``frames`` when given).
        keys: (M, d) centres c.
        var: kernel variance, > 0.
        reference: (Q,) long, for each query the index of a key with a large, finite
            logit (in Flux Matching, the anchor the chain started from).
        frames: the query grouping; built for the call when omitted.
        key_bias: optional (M,) per-key bias b_j (-inf excludes a key).
        chunk_size: at most this many queries per fused call.

    Returns:
        (Q,) log-partition values in the compute dtype.
    """
    dtype = compute_dtype(queries, keys)
    adhoc = frames is None
    with no_autocast(queries.device):
        c = keys.to(dtype)
        d = c.shape[1]
        if adhoc:
            frames = _adhoc(queries, c.shape[0], d + 1, var)
            zq, ref = frames.permute(queries).to(dtype), frames.permute(reference)
        else:
            zq, ref = queries.to(dtype), reference
        kf = KeyFrame(frames, c, var, dtype, key_bias)
        q = frames.local(zq).mul_(1.0 / var)  # (G, l, d)
        g = frames.n_groups
        ref_g = ref.view(g, -1)
        k_ref = kf.k.gather(1, ref_g.unsqueeze(-1).expand(-1, -1, d))
        # the reference logit in the same expanded form the kernel evaluates
        l_ref = (q * k_ref).sum(-1) + kf.bias.gather(1, ref_g)
        q_aug = torch.cat([q, l_ref.unsqueeze(-1)], -1)
        k_aug = torch.cat([F.pad(kf.k, (0, 1)), F.pad(kf.k.new_ones(g, 1, 1), (d, 0))], 1)
        bias_aug = F.pad(kf.bias, (0, 1))
        v = torch.zeros(1, c.shape[0] + 1, 2, dtype=dtype, device=c.device)
        v[0, :-1, 0] = 1
        v[0, -1, 1] = 1
        masses = _attend(q_aug, k_aug, v, bias_aug, chunk_size).reshape(-1, 2)
        real_mass, ref_mass = masses[:, 0], masses[:, 1]
        exact_ref = (zq - c[ref]).square().sum(-1).mul_(-0.5 / var)
        if key_bias is not None:
            exact_ref = exact_ref + key_bias.to(dtype)[ref]
        out = exact_ref + torch.log(real_mass) - torch.log(ref_mass)
        bad = (real_mass < _tiny(dtype)) | (ref_mass < _tiny(dtype)) | ~torch.isfinite(out)
        if bool(bad.any()):
            rows = bad.nonzero().squeeze(1)
            out[rows] = _dense_logsumexp(zq[rows], c, var, None if key_bias is None else key_bias.to(dtype))
    return frames.unpermute(out) if adhoc else out


def kernel_transpose_sum(
    queries: Tensor,
    keys: Tensor,
    var: float,
    key_logz: Tensor,
    values: Tensor,
    *,
    frames: Frames | None = None,
    key_bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Sums against a kernel matrix normalised over its first index (SPEC section 2, step 6).

        W_ij = exp(-|a_i - y_j|^2 / (2 var)) / Z_j,   Z_j = sum_i exp(-|a_i - y_j|^2 / (2 var))
        out_i = sum_j W_ij g_j

    With ``key_logz = log Z`` (from :func:`kernel_logsumexp` with the roles swapped) every
    logit l_ij - log Z_j is <= 0, so a reference key with logit 0 makes the attention
    normaliser 1 + S_i, S_i = sum_j W_ij, and dividing by the reference mass 1 / (1 + S_i)
    undoes it. The reference mass is >= 1 / (1 + M): it never underflows.

    Args:
        queries: (Q, d) the points a_i (group-major in ``frames`` when given).
        keys: (M, d) the points y_j.
        var: kernel variance, > 0.
        key_logz: (M,) log Z_j.
        values: (M, k) the g_j.
        frames: the query grouping; built for the call when omitted.
        key_bias: optional (M,) per-key bias (-inf excludes a key).
        chunk_size: at most this many queries per fused call.

    Returns:
        (Q, k) in the compute dtype.
    """
    dtype = compute_dtype(queries, keys, values)
    adhoc = frames is None
    with no_autocast(queries.device):
        y = keys.to(dtype)
        d, kdim = y.shape[1], values.shape[1]
        if adhoc:
            frames = _adhoc(queries, y.shape[0], max(d, kdim) + 1, var)
        aq = (frames.permute(queries) if adhoc else queries).to(dtype)
        bias_j = -key_logz.to(dtype)
        if key_bias is not None:
            bias_j = bias_j + key_bias.to(dtype)
        kf = KeyFrame(frames, y, var, dtype, bias_j)
        g = frames.n_groups
        q = frames.local(aq)  # (G, l, d)
        q_aug = torch.cat([q * (1.0 / var), q.square().sum(-1, keepdim=True).mul_(-0.5 / var)], -1)
        k_aug = torch.cat([F.pad(kf.k, (0, 1), value=1.0), kf.k.new_zeros(g, 1, d + 1)], 1)
        bias = F.pad(kf.bias, (0, 1))
        v = torch.zeros(1, y.shape[0] + 1, kdim + 1, dtype=dtype, device=y.device)
        v[0, :-1, :kdim] = values.to(dtype)
        v[0, -1, kdim] = 1
        res = _attend(q_aug, k_aug, v, bias, chunk_size).reshape(-1, kdim + 1)
        out = res[:, :kdim] / res[:, kdim:]
    return frames.unpermute(out) if adhoc else out


def _without_dropped(values: Tensor, bias: Tensor | None) -> Tensor:
    """(C, e) values with the rows whose bias is -inf (dropped chains) set to 0."""
    return values if bias is None else values.masked_fill(torch.isinf(bias)[:, None], 0.0)


def kernel_transition_sum(
    anchors: Tensor,
    chains: Tensor,
    var: float,
    values: Tensor,
    reference: Tensor,
    *,
    frames: Frames,
    anchor_bias: Tensor | None = None,
    chain_bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Transition sums of SPEC section 2, steps 5-6, normalised over the anchors.

        out_i = sum_j W_ij g_j,   W_ij = exp(-|a_i - y_j|^2 / (2 var)) / sum_i' exp(-|a_i' - y_j|^2 / (2 var))

    Materialised blocks (CPU) take it in one pass over the pairs, chains as rows; fused
    attention kernels in two (:func:`kernel_logsumexp`, then :func:`kernel_transpose_sum`).
    A kernel too narrow for the expanded form's rounding in the inputs' dtype on these
    frames (small var: small t in Flux Matching) takes blocks on every device, with float64
    products or distances in difference form.

    Args:
        anchors: (P, d) the a_i, in the frame order of ``frames``.
        chains: (C, d) the y_j, group-major in ``frames`` (all P rows, or the same number
            from every group as from :meth:`Frames.sample_rows`).
        var: kernel variance, > 0.
        values: (C, e) the g_j.
        reference: (C,) long, for each chain an anchor with a large logit (its own).
        frames: the grouping of both.
        anchor_bias: optional (P,) of 0 or -inf; -inf excludes an anchor from every sum.
        chain_bias: optional (C,) of 0 or -inf; -inf drops a chain's term.
        chunk_size: at most this many rows per block or fused call.

    Returns:
        (P, e) in the compute dtype.

    Raises:
        ValueError: for a kernel that narrow when an input requires gradients (blocks are
            not differentiable).
    """
    dtype = compute_dtype(anchors, chains, values)
    with no_autocast(anchors.device):
        q = frames.local(chains.to(dtype))
        product_dtype = _product_dtype(q, var)
        # The frames are sized for the data's kernel; a transition kernel is narrower (var
        # -> 0 as t -> 0), and the expanded form attention evaluates then loses the weights
        # (at t = 1e-4, d = 64 it errs by more than the sum itself): there only blocks, with
        # float64 products or distances in difference form, are exact. Elsewhere one block
        # pass against two attention passes: blocks wherever _blocks_on chooses them.
        escalate = product_dtype != dtype
        if escalate and _needs_grad(anchors, chains, values):
            raise ValueError(
                f"kernel_transition_sum: var={var:g} is too narrow for the expanded form in {dtype} on these frames "
                "(rounding bound above _EXPANDED_TOL), and the exact block strategy is not differentiable; "
                "detach the inputs or pass float64 ones with frames built for this var"
            )
        if escalate or _blocks_on(anchors.device, anchors.shape[0] * chains.shape[0], anchors, chains, values, min_pairs=0):
            kern = _BlockKernel(q, KeyFrame(frames, anchors.to(dtype), var, dtype, anchor_bias), product_dtype)
            g = _without_dropped(values.to(dtype), chain_bias)
            return _blocks_transpose_sum(kern, g.view(*q.shape[:2], -1), chunk_size)
        logz = kernel_logsumexp(chains, anchors, var, reference, frames=frames, key_bias=anchor_bias, chunk_size=chunk_size)
        return kernel_transpose_sum(anchors, chains, var, logz, values, frames=frames, key_bias=chain_bias, chunk_size=chunk_size)
