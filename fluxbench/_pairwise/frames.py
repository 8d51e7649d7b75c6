"""Local frames: spatially coherent groups of queries, each computed in coordinates
centred on its own mean, so that the expanded form's rounding scales with the group
radius, not with the data radius (see :mod:`fluxbench._pairwise`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Frames", "KeyFrame"]

# Keys are replicated once per frame: at most this many scalars (G * M * width) in all.
_FRAME_BUDGET = 1 << 22
# Fewest queries per frame (the fused kernel loses efficiency below a few dozen).
_MIN_GROUP = 16
# Relative rounding error accepted from the expanded form, for the widest pass (third
# moments): eps * ((r + 4 sigma) / sigma)^3 with r the largest frame radius. A worst-case
# bound, far below the Monte Carlo error of any single loss evaluation.
_ROUNDING_TOL = 1e-3


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
