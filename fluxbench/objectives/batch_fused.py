"""The fused backend of the batch kernel: pairwise sums in local frames, nothing B x B stored.

The sums of :mod:`fluxbench._pairwise` (fused attention kernels, or on CPU 1 MiB
materialised blocks where those are faster) in local frames of the batch. Up to
:data:`MOMENT_MAX_DIM` dimensions the moments of the posterior weights come from one pass
with polynomial features of the local coordinates (degree <= 3); above it from
materialised blocks per frame (:func:`~fluxbench.objectives.batch_dense.block_moments`).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from .._pairwise import Frames, KeyFrame, block_rows, kernel_mean, kernel_transition_sum, working_dtype
from .._pairwise.blocks import shifted_exp2
from .._pairwise.sums import without_dropped
from . import batch_kernel
from .batch_dense import LOGIT_FLOOR, BlockKeys, block_moments, dense_transition
from .batch_kernel import BatchKernel, gradient_terms, kernel_method

__all__ = ["FusedBatchKernel", "MOMENT_MAX_DIM", "moment_width"]

# Up to this dimension the fused kernel takes the moments from one attention call with
# polynomial features (d + d(d+1)/2 + d(d+1)(d+2)/6 columns); above it from dense blocks.
MOMENT_MAX_DIM = 4


@lru_cache(maxsize=None)
def _monomial_maps(d: int) -> tuple[tuple[int, ...], ...]:
    """Index lists for the degree-2 and degree-3 monomials and for rebuilding full tensors."""
    pairs = [(a, b) for a in range(d) for b in range(a, d)]
    triples = [(a, b, c) for a in range(d) for b in range(a, d) for c in range(b, d)]
    pair_of = {p: k for k, p in enumerate(pairs)}
    triple_of = {t: k for k, t in enumerate(triples)}
    q_full = [pair_of[tuple(sorted((a, b)))] for a in range(d) for b in range(d)]
    c_full = [triple_of[tuple(sorted((a, b, c)))] for a in range(d) for b in range(d) for c in range(d)]
    return (
        tuple(a for a, _ in pairs),
        tuple(b for _, b in pairs),
        tuple(pair_of[(a, b)] for a, b, _ in triples),
        tuple(c for _, _, c in triples),
        tuple(q_full),
        tuple(c_full),
    )


def moment_width(d: int) -> int:
    """Per-key width of the moment pass: d + d(d+1)/2 + d(d+1)(d+2)/6."""
    return d + d * (d + 1) // 2 + d * (d + 1) * (d + 2) // 6


@lru_cache(maxsize=None)
def _monomials(d: int, device: torch.device) -> _Monomials:
    with torch.inference_mode(False):  # cached: usable in and outside inference mode
        return _Monomials(d, device)


class _Monomials:
    """Monomials of local coordinates up to degree 3 and the central moments they give."""

    def __init__(self, d: int, device: torch.device):
        maps = [torch.tensor(m, dtype=torch.long, device=device) for m in _monomial_maps(d)]
        self.d = d
        self.qa, self.qb, self.cq, self.cc, self.q_full, self.c_full = maps
        self.n_quad = self.qa.numel()

    def features(self, k: Tensor) -> Tensor:
        """(..., d) -> (..., d + d2 + d3): k_a; k_a k_b (a <= b); k_a k_b k_c (a <= b <= c)."""
        out = k.new_empty(*k.shape[:-1], moment_width(self.d))
        d, nq = self.d, self.n_quad
        out[..., :d] = k
        quad = out[..., d : d + nq]
        torch.mul(k[..., self.qa], k[..., self.qb], out=quad)
        torch.mul(quad[..., self.cq], k[..., self.cc], out=out[..., d + nq :])
        return out

    def central(self, feats: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Feature means (C, k) -> (mu (C, d), M2 (C, d, d), Cov (C, d, d), M3 (C, d, d, d))."""
        d, n = self.d, feats.shape[0]
        mu = feats[:, :d]
        m2 = feats[:, d : d + self.n_quad][:, self.q_full].view(n, d, d)
        m3 = feats[:, d + self.n_quad :][:, self.c_full].view(n, d, d, d)
        return mu, m2, m2 - mu[:, :, None] * mu[:, None, :], m3


class FusedBatchKernel(BatchKernel):
    """Pairwise sums in local frames (``fluxbench.pairwise``); nothing B x B is stored."""

    def __init__(self, x: Tensor, sigma: float, *, chunk_size: int | None = None):
        b, d = x.shape
        self.dtype = working_dtype(x)
        self.var = sigma * sigma
        self.chunk = chunk_size
        xc = x.to(self.dtype)
        # one grouping of the batch serves every pass: anchors, chain states and
        # transition means stay near their own data point
        width = moment_width(d) if d <= MOMENT_MAX_DIM else d + 1
        self.frames = Frames(xc, n_keys=b, width=width, scale=sigma)
        self.x_keys = KeyFrame(self.frames, xc, self.var, self.dtype)
        self.monomials = _monomials(d, x.device) if d <= MOMENT_MAX_DIM else None

    def rows(self, t: Tensor) -> Tensor:
        return self.frames.permute(t)

    def restore(self, t: Tensor) -> Tensor:
        return self.frames.unpermute(t)

    def select_chains(self, n_chains, generator):
        size = self.frames.size
        if n_chains is None or n_chains >= self.frames.n:
            return None, 1.0
        per = min(size, max(1, -(-n_chains // self.frames.n_groups)))
        if per == size:
            return None, 1.0
        return self.frames.sample_rows(per, generator), size / per

    @kernel_method
    def mean(self, z: Tensor) -> Tensor:
        return kernel_mean(z, self.x_keys, self.var, chunk_size=self.chunk)

    @kernel_method
    def score_terms(self, y: Tensor, f: Tensor, probe: Tensor | None) -> tuple[Tensor, Tensor]:
        y = y.to(self.dtype)
        f = f.to(self.dtype)
        eps = None if probe is None else probe.to(self.dtype)
        if self.monomials is None:
            s, cw, third = self._frame_blocks(y, f, eps)
            return s, gradient_terms(s, f, cw, third, self.var)
        feats, centre = kernel_mean(y, self.x_keys, self.var, features=self.monomials.features, chunk_size=self.chunk)
        mu, m2, cov, m3 = self.monomials.central(feats)
        s = (centre + mu - y) / self.var
        # small batched contractions as broadcasts: einsum's dispatch dominates at d <= 4
        cw = (cov * (f - 2 * s)[:, None, :]).sum(-1)
        # contracted third central moment T3_abc = M3_abc - (M2 x mu)_sym3 + 2 mu_a mu_b mu_c
        if eps is None:
            tr = m2.diagonal(dim1=1, dim2=2).sum(1, keepdim=True)
            third = (
                m3.diagonal(dim1=1, dim2=2).sum(-1)
                - tr * mu
                - 2 * (m2 * mu[:, :, None]).sum(1)
                + 2 * (mu * mu).sum(1, keepdim=True) * mu
            )
        else:
            m2e = (m2 * eps[:, None, :]).sum(-1)
            e_mu = (eps * mu).sum(1, keepdim=True)
            third = (
                (m3 * (eps[:, :, None] * eps[:, None, :])[..., None]).sum((1, 2))
                - (eps * m2e).sum(1, keepdim=True) * mu
                - 2 * e_mu * m2e
                + 2 * e_mu * e_mu * mu
            )
        return s, gradient_terms(s, f, cw, third, self.var)

    def _frame_blocks(self, y: Tensor, f: Tensor, eps: Tensor | None):
        """The moments as materialised blocks, one per local frame (large d)."""
        frames, var = self.frames, self.var
        per = y.shape[0] // frames.n_groups
        s, cw, third = torch.empty_like(y), torch.empty_like(y), torch.empty_like(y)
        step = block_rows(self.x_keys.k.shape[1], self.chunk)  # (step, M) blocks: memory linear in B
        for gi in range(frames.n_groups):
            keys = BlockKeys(self.x_keys.k[gi], var, self.x_keys.bias[gi])  # in this frame's coordinates
            for r0 in range(gi * per, (gi + 1) * per, step):
                rows = slice(r0, min(r0 + step, (gi + 1) * per))
                yc = y[rows] - frames.centres[gi].to(y.dtype)
                w = shifted_exp2(keys.logits(yc), -LOGIT_FLOOR)
                s[rows], cw[rows], third[rows] = block_moments(w, keys, yc, f[rows], None if eps is None else eps[rows], var)
        return s, cw, third

    @kernel_method
    def transition_sum(self, mu, y, v, g, chains):
        frames = self.frames
        padding = frames.key_bias
        chain_bias = None if padding is None else (padding if chains is None else padding[chains])
        if mu.shape[0] * y.shape[0] <= batch_kernel.DENSE_PAIRS:
            # small problems: one materialised block has the fewest tensor operations
            g = without_dropped(g.to(self.dtype), chain_bias)
            return dense_transition(mu.to(self.dtype), y.to(self.dtype), v, g, y.shape[0], padding)
        own = frames.own if chains is None else frames.own[chains]
        return kernel_transition_sum(
            mu, y, v, g, own, frames=frames, anchor_bias=padding, chain_bias=chain_bias, chunk_size=self.chunk
        )
