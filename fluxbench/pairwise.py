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
* **Local frames.** The expanded form z.c / var - |c|^2 / (2 var) cancels catastrophically
  when |c| >> sqrt(var). Queries are sorted into spatially coherent groups
  (:class:`Frames`, a k-d bisection) and each group is computed in coordinates centred
  on its own mean, so rounding scales with the group radius, not the data radius.
* **Log-partition by a reference key.** Attention is normalised per query, which hides
  the partition function. One extra key whose logit equals that of a known term
  recovers it: Z_i = exp(l_ref) * (mass on the real keys) / (mass on the reference key),
  both masses sums of positive terms (no cancellation). Rows where a mass underflows
  are recomputed densely.

Queries are passed in *frame order* (``frames.permute(z)``), so consecutive rows form
the groups and no gather or scatter is needed per call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "compute_dtype",
    "spatial_groups",
    "Frames",
    "KeyFrame",
    "kernel_mean",
    "kernel_logsumexp",
    "kernel_transpose_sum",
    "dense_weights",
]

# Keys are replicated once per frame: at most this many scalars (G * M * width) in all.
_FRAME_BUDGET = 1 << 22
# Fewest queries per frame: smaller frames are more accurate (rounding scales with the
# frame radius), but the fused kernel loses efficiency below a few dozen queries.
_MIN_GROUP = 16


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype pairwise work runs in: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _tiny(dtype: torch.dtype) -> float:
    # a mass below this has lost relative precision to underflow
    return 1e-300 if dtype == torch.float64 else 1e-30


def spatial_groups(z: Tensor, n_groups: int) -> Tensor:
    """Order the rows of ``z`` into ``n_groups`` spatially coherent groups of equal size.

    A k-d bisection: ``log2(n_groups)`` times, each group is split at its median along
    its coordinate of largest range.

    Args:
        z: (N, d) points, N a multiple of ``n_groups``.
        n_groups: a power of two.

    Returns:
        (n_groups, N / n_groups) long tensor of row indices into ``z``.
    """
    groups = torch.arange(z.shape[0], device=z.device).view(1, -1)
    while groups.shape[0] < n_groups:
        pts = z[groups]  # (g, s, d)
        axis = (pts.amax(1) - pts.amin(1)).argmax(1)
        key = pts.gather(2, axis.view(-1, 1, 1).expand(-1, pts.shape[1], 1)).squeeze(2)
        order = key.argsort(dim=1, stable=True)
        groups = groups.gather(1, order).reshape(groups.shape[0] * 2, -1)
    return groups


class Frames:
    """A grouping of N rows into G spatially coherent groups of L rows (local frames).

    Rows are permuted into *frame order* (group after group) and padded to P = G * L by
    repeating the last row; pairwise kernels take queries in that order.

    Args:
        points: (N, d) the rows to group (or points close to them: the grouping only
            needs to be coherent, e.g. the data a chain started from).
        n_groups: G, rounded down to a power of two. Default: as many as the frame
            budget allows for ``n_keys`` keys of ``width`` features, with at least
            ``_MIN_GROUP`` rows per group.
        n_keys, width: used for the default G.
    """

    def __init__(self, points: Tensor, n_groups: int | None = None, *, n_keys: int | None = None, width: int = 1):
        n, d = points.shape
        if n_groups is None:
            want = max(1, n // _MIN_GROUP)
            afford = max(1, _FRAME_BUDGET // max(1, (n_keys or n) * width))
            n_groups = min(want, afford)
        n_groups = 1 << (max(1, int(n_groups)).bit_length() - 1)
        size = -(-n // n_groups)
        padded = self._pad_rows(points, n_groups * size - n)
        self.n, self.n_groups, self.size = n, n_groups, size
        self.order = spatial_groups(padded, n_groups).reshape(-1)  # (P,)
        # positions (in frame order) of the real rows, and the inverse permutation
        self._real = None if n_groups * size == n else (self.order < n).nonzero().squeeze(1)
        inverse = torch.empty_like(self.order)
        inverse[self.order] = torch.arange(self.order.numel(), device=points.device)
        self._inverse = inverse[:n]
        self.centres = padded[self.order].view(n_groups, size, d).mean(1)  # (G, d)

    @staticmethod
    def _pad_rows(t: Tensor, extra: int) -> Tensor:
        return t if extra == 0 else torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])

    @property
    def padded(self) -> int:
        """P = G * L."""
        return self.n_groups * self.size

    def permute(self, t: Tensor) -> Tensor:
        """(N, ...) in the original order -> (P, ...) in frame order."""
        return self._pad_rows(t, self.padded - self.n)[self.order]

    def unpermute(self, t: Tensor) -> Tensor:
        """(P, ...) in frame order -> (N, ...) in the original order (padding dropped)."""
        return t[self._inverse]

    def real(self, t: Tensor) -> Tensor:
        """The rows of a frame-ordered (P, ...) tensor that are not padding, as keys."""
        return t if self._real is None else t[self._real]

    def own_index(self) -> Tensor:
        """(P,) for each frame-ordered row, its index among :meth:`real` rows (0 for padding)."""
        if self._real is None:
            return torch.arange(self.padded, device=self.order.device)
        is_real = self.order < self.n
        return (torch.cumsum(is_real.long(), 0) - 1).clamp_min(0)

    def row_centres(self, dtype: torch.dtype) -> Tensor:
        """(P, d) the centre of each row's frame."""
        return self.centres.to(dtype).repeat_interleave(self.size, dim=0)

    def local(self, z: Tensor) -> Tensor:
        """(P, d) frame-ordered points -> (G, L, d) local coordinates."""
        return z.view(self.n_groups, self.size, -1) - self.centres.to(z.dtype)[:, None]


class KeyFrame:
    """Keys expressed in every local frame, with their kernel bias; reusable across calls.

    Args:
        frames: the query grouping.
        keys: (M, d) key points (any order).
        var: kernel variance.
        dtype: compute dtype.

    Attributes:
        k: (G, M, d) keys minus each frame centre.
        bias: (G, M) -|k|^2 / (2 var).
    """

    def __init__(self, frames: Frames, keys: Tensor, var: float, dtype: torch.dtype):
        self.frames = frames
        self.var = var
        self.k = keys.to(dtype)[None] - frames.centres.to(dtype)[:, None]
        self.bias = self.k.square().sum(-1).mul_(-0.5 / var)


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """Batched softmax attention with scale 1.

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
    mask = bias[:, None, None, :].expand(q.shape[0], 1, q.shape[1], k.shape[1])
    out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=mask, scale=1.0)
    return out[:, 0, :, :ev]


def _attend_chunked(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, chunk_size: int | None) -> Tensor:
    """:func:`_attend` over slices of groups holding at most ``chunk_size`` queries."""
    per = max(1, (chunk_size or q.shape[0] * q.shape[1]) // q.shape[1])
    if per >= q.shape[0]:
        return _attend(q, k, v, bias)

    def part(t: Tensor, sl: slice) -> Tensor:
        return t[sl] if t.shape[0] > 1 else t

    return torch.cat(
        [_attend(q[sl], part(k, sl), part(v, sl), part(bias, sl)) for sl in _slices(q.shape[0], per)]
    )


def _slices(n: int, step: int) -> Iterator[slice]:
    for start in range(0, n, step):
        yield slice(start, start + step)


def _in_frames(queries: Tensor, keys: Tensor, frames: Frames | None, width: int):
    """Frames for an ad-hoc call: build them from the queries when none are given."""
    if frames is not None:
        if queries.shape[0] != frames.padded:
            raise ValueError(
                f"queries must be in frame order with {frames.padded} rows (use frames.permute); "
                f"got {queries.shape[0]}"
            )
        return frames, queries, False
    frames = Frames(queries, n_keys=keys.shape[0], width=width)
    return frames, frames.permute(queries), True


def kernel_mean(
    queries: Tensor,
    keys: Tensor | KeyFrame,
    var: float,
    features: Callable[[Tensor], Tensor] | None = None,
    *,
    frames: Frames | None = None,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax-weighted means under a Gaussian kernel (SPEC eq. (5)).

        w_ij = softmax_j( -|z_i - c_j|^2 / (2 var) ),   out_i = sum_j w_ij phi(c_j - a_i)

    with a_i the centre of query i's local frame. With ``features=None``, phi is the
    identity and the frame is added back: ``out_i = sum_j w_ij c_j`` is the posterior
    mean m(z_i) of the smoothed empirical measure.

    Args:
        queries: (N, d) points z; in frame order ((P, d), ``frames.permute(z)``) when
            ``frames`` is given.
        keys: (M, d) centres c, or a :class:`KeyFrame` of them (reused across calls; its
            frames are then used and ``frames`` is ignored).
        var: kernel variance (sigma^2, not sigma), > 0.
        features: optional map (..., d) -> (..., k) applied to keys in local coordinates.
        frames: the query grouping; built from the queries when omitted (then the result
            is in the original row order).
        chunk_size: at most this many queries per fused call.

    Returns:
        (rows, d) posterior means, or with ``features`` a pair ((rows, k) feature means,
        (rows, d) frame centre of each query); rows = P in frame order when ``frames``
        was given, else N.
    """
    with torch.autocast(queries.device.type, enabled=False):
        if isinstance(keys, KeyFrame):
            kf = keys
            dtype = kf.k.dtype
            frames, zq, adhoc = _in_frames(queries, kf.k, kf.frames, kf.k.shape[-1])
        else:
            dtype = compute_dtype(queries, keys)
            frames, zq, adhoc = _in_frames(queries, keys, frames, keys.shape[-1])
            kf = KeyFrame(frames, keys, var, dtype)
        q = frames.local(zq.to(dtype)).mul_(1.0 / var)
        v = kf.k if features is None else features(kf.k)
        out = _attend_chunked(q, kf.k, v, kf.bias, chunk_size).reshape(frames.padded, -1)
        if features is None:
            out = out + frames.row_centres(dtype)
            return frames.unpermute(out) if adhoc else out
        centre = frames.row_centres(dtype)
        return (frames.unpermute(out), frames.unpermute(centre)) if adhoc else (out, centre)


def _dense_logsumexp(queries: Tensor, keys: Tensor, var: float, chunk_size: int) -> Tensor:
    out = []
    for sl in _slices(queries.shape[0], chunk_size):
        d2 = torch.cdist(queries[sl], keys, compute_mode="donot_use_mm_for_euclid_dist").square()
        out.append(torch.logsumexp(-0.5 * d2 / var, dim=1))
    return torch.cat(out)


def kernel_logsumexp(
    queries: Tensor,
    keys: Tensor,
    var: float,
    reference: Tensor,
    *,
    frames: Frames | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Log-partition functions of the Gaussian kernel, one per query.

        out_i = log sum_j exp( -|z_i - c_j|^2 / (2 var) )

    in one fused attention call: a reference key whose logit equals that of key
    ``reference[i]`` is appended, and out_i = l_{i,ref} + log(mass on the real keys / mass
    on the reference key). Rows where a mass underflows (the reference term more than
    ~80 nats below the maximum, or above it) are recomputed densely.

    Args:
        queries: (N, d) points z (frame order, (P, d), when ``frames`` is given).
        keys: (M, d) centres c.
        var: kernel variance, > 0.
        reference: (rows,) long, for each query the index of a key with a large logit
            (in Flux Matching, the anchor the chain started from), aligned with queries.
        frames, chunk_size: as in :func:`kernel_mean`.

    Returns:
        (rows,) log-partition values in the compute dtype.
    """
    dtype = compute_dtype(queries, keys)
    with torch.autocast(queries.device.type, enabled=False):
        c = keys.to(dtype)
        d = c.shape[1]
        frames, zq, adhoc = _in_frames(queries, c, frames, d + 1)
        ref = frames.permute(reference) if adhoc else reference
        zq = zq.to(dtype)
        kf = KeyFrame(frames, c, var, dtype)
        q = frames.local(zq).mul_(1.0 / var)  # (G, L, d)
        g, size = frames.n_groups, frames.size
        ref_g = ref.view(g, size)
        k_ref = kf.k.gather(1, ref_g.unsqueeze(-1).expand(-1, -1, d))
        # the reference logit in the same expanded form the kernel evaluates
        l_ref = (q * k_ref).sum(-1) + kf.bias.gather(1, ref_g)
        q_aug = torch.cat([q, l_ref.unsqueeze(-1)], -1)
        k_aug = torch.cat([F.pad(kf.k, (0, 1)), F.pad(kf.k.new_ones(g, 1, 1), (d, 0))], 1)
        bias_aug = F.pad(kf.bias, (0, 1))
        v = torch.zeros(1, c.shape[0] + 1, 2, dtype=dtype, device=c.device)
        v[0, :-1, 0] = 1
        v[0, -1, 1] = 1
        masses = _attend_chunked(q_aug, k_aug, v.expand(g, -1, -1), bias_aug, chunk_size).reshape(-1, 2)
        real_mass, ref_mass = masses[:, 0], masses[:, 1]
        exact_ref = (zq - c[ref]).square().sum(-1).mul_(-0.5 / var)
        out = exact_ref + torch.log(real_mass) - torch.log(ref_mass)
        bad = (real_mass < _tiny(dtype)) | (ref_mass < _tiny(dtype)) | ~torch.isfinite(out)
        if bool(bad.any()):
            rows = bad.nonzero().squeeze(1)
            out[rows] = _dense_logsumexp(zq[rows], c, var, chunk_size or 1024)
    return frames.unpermute(out) if adhoc else out


def kernel_transpose_sum(
    queries: Tensor,
    keys: Tensor,
    var: float,
    key_logz: Tensor,
    values: Tensor,
    *,
    frames: Frames | None = None,
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
        queries: (N, d) the points a_i (frame order, (P, d), when ``frames`` is given).
        keys: (M, d) the points y_j.
        var: kernel variance, > 0.
        key_logz: (M,) log Z_j.
        values: (M, k) the g_j.
        frames, chunk_size: as in :func:`kernel_mean`.

    Returns:
        (rows, k) in the compute dtype.
    """
    dtype = compute_dtype(queries, keys, values)
    with torch.autocast(queries.device.type, enabled=False):
        y = keys.to(dtype)
        d, kdim = y.shape[1], values.shape[1]
        frames, aq, adhoc = _in_frames(queries, y, frames, max(d + 1, kdim + 1))
        kf = KeyFrame(frames, y, var, dtype)
        g = frames.n_groups
        q = frames.local(aq.to(dtype))  # (G, L, d)
        q_aug = torch.cat([q * (1.0 / var), q.square().sum(-1, keepdim=True).mul_(-0.5 / var)], -1)
        k_aug = torch.cat([F.pad(kf.k, (0, 1), value=1.0), kf.k.new_zeros(g, 1, d + 1)], 1)
        bias = torch.cat([kf.bias - key_logz.to(dtype), kf.bias.new_zeros(g, 1)], 1)
        v = torch.zeros(y.shape[0] + 1, kdim + 1, dtype=dtype, device=y.device)
        v[:-1, :kdim] = values.to(dtype)
        v[-1, kdim] = 1
        res = _attend_chunked(q_aug, k_aug, v.expand(g, -1, -1), bias, chunk_size).reshape(-1, kdim + 1)
        out = res[:, :kdim] / res[:, kdim:]
    return frames.unpermute(out) if adhoc else out


def dense_weights(
    queries: Tensor, keys: Tensor, var: float, *, chunk_size: int = 1024
) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """Materialised kernel softmax weights in blocks of rows, for tests and large d.

    Yields ``(rows, W, centre)``: W[i, j] = softmax_j( -|z_i - c_j|^2 / (2 var) ) for the
    queries in ``rows`` (a (len(rows), M) block in the compute dtype), and the centre of
    the block's local frame (distances are computed in coordinates centred on it).
    """
    dtype = compute_dtype(queries, keys)
    z = queries.to(dtype)
    c = keys.to(dtype)
    with torch.autocast(z.device.type, enabled=False):
        for rows in _slices(z.shape[0], chunk_size):
            centre = z[rows].mean(0)
            d2 = torch.cdist(z[rows] - centre, c - centre).square()
            yield rows, torch.softmax(-0.5 * d2 / var, dim=1), centre
