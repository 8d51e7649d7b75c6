"""The batch score of the smoothed empirical measure, and the pairwise work Flux Matching does with it.

For a batch x_1..x_B and one noise level sigma, p_hat(z) = (1/B) sum_j N(z; x_j, sigma^2 I)
has posterior weights w_j(z) = softmax_j(-|z - x_j|^2 / (2 sigma^2)) and (SPEC eq. (5))

    m(z) = sum_j w_j x_j,           s_hat(z) = (m(z) - z) / sigma^2.

Its derivatives are moments of w, which is why nothing here back-propagates through the
B x B softmax (the double backward that dominates the published code's cost):

    J_s(z)    = (C(z) / sigma^2 - I) / sigma^2,       C = Cov_w(x)           (symmetric)
    d/dz E_w[phi(x)] = Cov_w(phi(x), x) / sigma^2
    grad_z eps^T C eps = E_w[ (eps.(x - m))^2 (x - m) ] / sigma^2              (third central moment)
    grad_z tr C        = E_w[ |x - m|^2 (x - m) ] / sigma^2

A :class:`BatchKernel` holds one batch at one sigma and performs the three kinds of
pairwise sums the loss needs (posterior means, the moments above, and the transition
sums of SPEC step 6). Two interchangeable implementations:

* :class:`DenseBatchKernel`: materialised blocks of rows against all B points, one block
  per pass for small batches: the fewest tensor operations. The default for small
  batches on CPU (``make_batch_kernel``).
* :class:`FusedBatchKernel`: the pairwise sums of ``fluxbench._pairwise`` in local
  frames: fused attention kernels, or on CPU 4 MiB materialised blocks where those are
  faster; nothing B x B is stored. The default otherwise.

Both work on rows in a *working order* (``kernel.rows`` / ``kernel.restore``): the fused
kernel sorts rows into spatial frames.

Over 400 lines: one abstraction (:class:`BatchKernel`) with its two implementations and
the dense-block helpers (keys, moments, transition block) both share; the generic
pairwise machinery they build on is :mod:`fluxbench._pairwise`.
"""

from __future__ import annotations

import functools
from functools import lru_cache

import torch
from torch import Tensor

from .._pairwise import Frames, KeyFrame, kernel_mean, kernel_transition_sum, no_autocast, sq_dists_difference, working_dtype
from .._pairwise.blocks import product_dtype, shifted_exp
from .._pairwise.sums import without_dropped

__all__ = [
    "batch_score",
    "BatchKernel",
    "DenseBatchKernel",
    "FusedBatchKernel",
    "make_batch_kernel",
    "MOMENT_MAX_DIM",
]

# Transition sums up to this many pairs are one materialised block: below it, per-call
# overheads cost more than the B x B arithmetic.
_DENSE_PAIRS = 65536
# Up to this dimension the fused kernel takes the moments from one attention call with
# polynomial features (d + d(d+1)/2 + d(d+1)(d+2)/6 columns); above it from dense blocks.
MOMENT_MAX_DIM = 4


def batch_score(z: Tensor, x: Tensor, sigma: float, *, chunk_size: int | None = None) -> Tensor:
    """The exact score of the smoothed empirical measure, SPEC eq. (5).

    Args:
        z: (N, d) query points.
        x: (B, d) the batch (centres of p_hat).
        sigma: the smoothing standard deviation (> 0).
        chunk_size: at most this many queries per pairwise block.

    Returns:
        (N, d) s_hat(z) = (m(z) - z) / sigma^2 in the compute dtype (>= float32).
    """
    var = sigma * sigma
    m = kernel_mean(z, x, var, chunk_size=chunk_size)
    return (m - z.to(m.dtype)) / var


def _gradient_terms(s: Tensor, f: Tensor, cw: Tensor, third: Tensor, var: float) -> Tensor:
    """g_s = J_s (f - 2 s) - grad D_s from C (f - 2 s) and the contracted third moment."""
    return torch.add(cw, f - 2 * s, alpha=-var).add_(third, alpha=-1.0 / var).div_(var * var)


def _no_autocast(method):
    """Run a kernel method with autocast off: pairwise sums and moments stay in fp32+."""

    @functools.wraps(method)
    def wrapper(self, first, *args):
        with no_autocast(first.device):
            return method(self, first, *args)

    return wrapper


class BatchKernel:
    """One batch x (B, d) at one noise level: the pairwise sums of the Flux Matching loss.

    Rows are in the kernel's *working order*: ``rows(t)`` converts a (B, ...) tensor to it
    (possibly permuted and padded to P >= B rows), ``restore`` converts back. Chains of
    the reference dynamics run on all working rows or on a subset from
    :meth:`select_chains`; every method taking chain rows accepts either.
    """

    var: float
    dtype: torch.dtype

    def rows(self, t: Tensor) -> Tensor:
        return t

    def restore(self, t: Tensor) -> Tensor:
        return t

    def select_chains(self, n_chains: int | None, generator: torch.Generator | None) -> tuple[Tensor | None, float]:
        """Rows whose chains are run, and the Horvitz-Thompson weight 1 / P(row selected).

        ``None`` (or n_chains >= B) selects all rows with weight 1. Otherwise every row is
        selected with the same probability, so sum_{j in S} weight * W_ij g_j is an
        unbiased estimate of sum_j W_ij g_j.
        """
        raise NotImplementedError

    def mean(self, z: Tensor) -> Tensor:
        """Posterior mean m(z) of SPEC eq. (5) for working rows or chain rows."""
        raise NotImplementedError

    def score_terms(self, y: Tensor, f: Tensor, probe: Tensor | None) -> tuple[Tensor, Tensor]:
        """s_hat(y) and g_s = grad of the batch-score part of the defect estimate.

        The defect estimate of SPEC section 2, step 3, splits as
        r_hat = [eps^T J_f eps + f . s_hat] + [- D_s - |s_hat|^2], D_s = eps^T J_s eps
        (Hutchinson, ``probe`` = eps) or tr J_s (``probe=None``). This returns s_hat(y) and
        the exact gradient of everything besides the field's own derivatives,

            g_s = J_s (f - 2 s_hat) - grad D_s

        (J_s f from the product rule on f . s_hat). The caller adds
        grad_z [eps^T J_f eps + f . stopgrad(s_hat)] from the field (its closed-form
        ``defect_pullback``, or autograd).

        Args:
            y: (C, d) chain points; f: (C, d) the field there (detached); probe: (C, d) or None.

        Returns:
            (s_hat (C, d), g_s (C, d)) in the compute dtype.
        """
        raise NotImplementedError

    def transition_sum(self, mu: Tensor, y: Tensor, v: float, g: Tensor, chains: Tensor | None) -> Tensor:
        """g_hat_i = sum_j W_ij g_j, W_ij = softmax over all anchors i of -|mu_i - y_j|^2 / (2 v).

        SPEC section 2, steps 5-6; j runs over the chains.

        Args:
            mu: (P, d) transition means of all anchors; y: (C, d) chain end points;
            v: kernel variance; g: (C, d); chains: the rows of the chains (None: all).

        Returns:
            (P, d).
        """
        raise NotImplementedError


# Weights more than e^-80 below their row's maximum are raised to e^-80 of it: invisible
# in any float format (under 1e-34 of the row), and it keeps exp out of the range below
# -87, where CPUs slow down ~50x (measured: exp(-110) costs 50x exp(-50) here).
_LOGIT_FLOOR = 80.0


def _with_ones(x: Tensor) -> Tensor:
    """(n, d) -> (n, d + 1) [x, 1]: a bias or the row mass rides along in one matrix product."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], 1)


def _dense_transition(
    mu: Tensor, y: Tensor, v: float, g: Tensor, chunk: int, anchor_bias: Tensor | None = None
) -> Tensor:
    """sum_j softmax_i(-|mu_i - y_j|^2 / (2 v) + b_i) g_j from materialised blocks of chains.

    Blocks are laid out (chains, anchors) so the normalisation runs over contiguous memory.
    The logits use the expanded form y.mu / v - |mu|^2 / (2 v) (one matrix product, the
    per-chain constant dropped) in coordinates centred on the anchors, unless its
    rounding, eps * R^2 / v for anchors within R of their centre, could exceed 1e-4 (tiny
    t): then distances are taken in difference form.
    """
    centre = mu.mean(0)
    mu_c = mu - centre
    sq = mu_c.square().sum(1)
    expanded = torch.finfo(mu.dtype).eps * float(sq.max()) / v <= 1e-4
    if expanded:
        bias = sq.mul_(-0.5 / v) if anchor_bias is None else sq.mul_(-0.5 / v).add_(anchor_bias)
        keys = _Keys(mu_c, v, bias)
    # accumulated as (d, M): a product with the long side last is ~3x faster than (M, d)
    out_t = mu.new_zeros(mu.shape[1], mu.shape[0])
    for start in range(0, y.shape[0], chunk):
        b = slice(start, start + chunk)
        if expanded:
            logits = keys.logits(y[b] - centre)
        else:
            logits = sq_dists_difference(y[b], mu).mul_(-0.5 / v)
            if anchor_bias is not None:
                logits += anchor_bias
        w = shifted_exp(logits, -_LOGIT_FLOOR)
        out_t.addmm_((g[b] / w.sum(1, keepdim=True)).T, w)
    return out_t.T


class _Keys:
    """Keys (M, d) of a materialised block in the layouts its products need, each built
    once (the sums' layouts on first use: the transition block needs only the logits).

    Sums stay (n, M) x (M, d + 1): the transposed (d + 1, M) x (M, n) is 2-3x faster on
    CPU, but its rounding depends on n, and a query's value must not depend on how the
    queries are chunked.
    """

    def __init__(self, x: Tensor, var: float, bias: Tensor | None = None):
        self.x = x
        if bias is None:  # else given: -|x|^2 / (2 var) already computed, possibly plus a key bias
            bias = x.square().sum(1).mul_(-0.5 / var)
        # (d + 1, M) [x / var; bias]: logits of queries [z, 1] in one product
        self.logit_t = torch.cat([x.T / var, bias[None]])

    @functools.cached_property
    def t(self) -> Tensor:
        """(d, M) the keys transposed, contiguous."""
        return self.x.T.contiguous()

    @functools.cached_property
    def with_mass(self) -> Tensor:
        """(M, d + 1) [x, 1]."""
        return _with_ones(self.x)

    def logits(self, z: Tensor) -> Tensor:
        """(n, M) z.x / var + bias (by default -|x|^2 / (2 var)) for queries z (n, d) (expanded form)."""
        return torch.mm(_with_ones(z), self.logit_t)

    def sums(self, w: Tensor) -> Tensor:
        """(..., d + 1) sum_j w_j [x_j, 1] for weights w (..., M)."""
        return w @ self.with_mass


def _block_moments(
    w: Tensor, keys: _Keys, y: Tensor, f: Tensor, eps: Tensor | None, var: float
) -> tuple[Tensor, Tensor, Tensor]:
    """s_hat, C (f - 2 s_hat) and the contracted third central moment from one weight block.

    w (n, M) unnormalised kernel weights (rows of any positive scale) between queries y
    (n, d) and ``keys``, all in the same coordinates; f, eps (n, d) (eps None: the trace
    form). Returns (s_hat, C v, E_w[a^2 (x - m)]) with v = f - 2 s_hat, a = eps.(x - m),
    or E_w[|x - m|^2 (x - m)] for eps None (see :meth:`BatchKernel.score_terms`).
    """
    d = y.shape[1]
    sums = keys.sums(w)
    mass = sums[:, d:]
    m = sums[:, :d] / mass
    s = (m - y) / var
    v = f - 2 * s
    # c[0] = v.(x - m), c[1] = (eps.(x - m))^2 (or |x - m|^2): both weighted sums in one product
    if eps is None:
        c = torch.stack([torch.mm(v, keys.t), sq_dists_difference(m, keys.x)])
        c[0].sub_((v * m).sum(1, keepdim=True))
    else:
        dirs = torch.stack([v, eps])
        c = torch.matmul(dirs, keys.t).sub_((dirs * m).sum(-1, keepdim=True))
        c[1].square_()
    r = keys.sums(c.mul_(w))  # (2, n, d + 1)
    cw, third = ((r[..., :d] - r[..., d:] * m) / mass).unbind(0)
    return s, cw, third


class DenseBatchKernel(BatchKernel):
    """Materialised blocks of at most ``chunk_size`` rows: the fewest tensor operations per
    pass, which is what small batches cost (``make_batch_kernel`` picks it for them on CPU).

    Coordinates are centred on the batch mean. Logits are in the expanded form
    z.x / var - |x|^2 / (2 var) (one matrix product) while its rounding bound
    (``fluxbench._pairwise.blocks``, ``_EXPANDED_TOL``) holds for the queries, else in difference
    form; weights are exp(logit - row max) floored at e^-80, and every sum is divided by
    its row mass after the product.
    """

    def __init__(self, x: Tensor, sigma: float, *, chunk_size: int | None = None):
        self.dtype = working_dtype(x)
        self.var = sigma * sigma
        self.n = x.shape[0]
        xc = x.to(self.dtype)
        self.centre = xc.mean(0)
        self.keys = _Keys(xc - self.centre, self.var)  # centred once: products below stay small
        self.chunk = chunk_size or max(1, (1 << 20) // max(1, x.shape[0]))
        # whether queries at the data points themselves take the one-product form
        self.expanded_on_data = product_dtype(self.keys.x, self.var) == self.dtype

    def _weights(self, z: Tensor) -> Tensor:
        """(n, B) unnormalised weights for centred queries z (n, d)."""
        if product_dtype(z, self.var) == z.dtype:
            return shifted_exp(self.keys.logits(z), -_LOGIT_FLOOR)
        return shifted_exp(sq_dists_difference(z, self.keys.x).mul_(-0.5 / self.var), -_LOGIT_FLOOR)

    def _blocks(self, n: int):
        for start in range(0, n, self.chunk):
            yield slice(start, min(start + self.chunk, n))

    def select_chains(self, n_chains, generator):
        if n_chains is None or n_chains >= self.n:
            return None, 1.0
        sel = torch.randperm(self.n, generator=generator, device=self.centre.device)[:n_chains].sort().values
        return sel, self.n / n_chains

    @_no_autocast
    def mean(self, z: Tensor) -> Tensor:
        z = z.to(self.dtype) - self.centre
        d = z.shape[1]

        def block(zb: Tensor) -> Tensor:
            sums = self.keys.sums(self._weights(zb))
            return sums[:, :d] / sums[:, d:]

        return self._by_blocks(block, z).add_(self.centre)

    @_no_autocast
    def score_terms(self, y: Tensor, f: Tensor, probe: Tensor | None) -> tuple[Tensor, Tensor]:
        y = y.to(self.dtype) - self.centre
        f = f.to(self.dtype)
        eps = probe if probe is None else probe.to(self.dtype)

        def block(yb: Tensor, fb: Tensor, eb: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
            return _block_moments(self._weights(yb), self.keys, yb, fb, eb, self.var)

        s, cw, third = self._by_blocks(block, y, f) if eps is None else self._by_blocks(block, y, f, eps)
        return s, _gradient_terms(s, f, cw, third, self.var)

    def _by_blocks(self, fn, *rows: Tensor) -> Tensor | tuple[Tensor, ...]:
        """fn over row blocks of at most ``chunk`` rows, concatenated (one call for small inputs);
        fn returns a tensor or a tuple of tensors."""
        n = rows[0].shape[0]
        if n <= self.chunk:
            return fn(*rows)
        parts = [fn(*(t[b] for t in rows)) for b in self._blocks(n)]
        return tuple(map(torch.cat, zip(*parts))) if isinstance(parts[0], tuple) else torch.cat(parts)

    @_no_autocast
    def transition_sum(self, mu, y, v, g, chains):
        return _dense_transition(mu.to(self.dtype), y.to(self.dtype), v, g.to(self.dtype), self.chunk)


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

    @_no_autocast
    def mean(self, z: Tensor) -> Tensor:
        return kernel_mean(z, self.x_keys, self.var, chunk_size=self.chunk)

    @_no_autocast
    def score_terms(self, y: Tensor, f: Tensor, probe: Tensor | None) -> tuple[Tensor, Tensor]:
        y = y.to(self.dtype)
        f = f.to(self.dtype)
        eps = None if probe is None else probe.to(self.dtype)
        if self.monomials is None:
            s, cw, third = self._frame_blocks(y, f, eps)
            return s, _gradient_terms(s, f, cw, third, self.var)
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
        return s, _gradient_terms(s, f, cw, third, self.var)

    def _frame_blocks(self, y: Tensor, f: Tensor, eps: Tensor | None):
        """The moments as materialised blocks, one per local frame (large d)."""
        frames, var = self.frames, self.var
        per = y.shape[0] // frames.n_groups
        s, cw, third = torch.empty_like(y), torch.empty_like(y), torch.empty_like(y)
        for gi in range(frames.n_groups):
            rows = slice(gi * per, (gi + 1) * per)
            keys = _Keys(self.x_keys.k[gi], var, self.x_keys.bias[gi])  # in this frame's coordinates
            yc = y[rows] - frames.centres[gi].to(y.dtype)
            w = shifted_exp(keys.logits(yc), -_LOGIT_FLOOR)
            s[rows], cw[rows], third[rows] = _block_moments(w, keys, yc, f[rows], None if eps is None else eps[rows], var)
        return s, cw, third

    @_no_autocast
    def transition_sum(self, mu, y, v, g, chains):
        frames = self.frames
        padding = frames.key_bias
        chain_bias = None if padding is None else (padding if chains is None else padding[chains])
        if mu.shape[0] * y.shape[0] <= _DENSE_PAIRS:
            # small problems: one materialised block has the fewest tensor operations
            g = without_dropped(g.to(self.dtype), chain_bias)
            return _dense_transition(mu.to(self.dtype), y.to(self.dtype), v, g, y.shape[0], padding)
        own = frames.own if chains is None else frames.own[chains]
        return kernel_transition_sum(
            mu, y, v, g, own, frames=frames, anchor_bias=padding, chain_bias=chain_bias, chunk_size=self.chunk
        )


def make_batch_kernel(x: Tensor, sigma: float, *, backend: str = "auto", chunk_size: int | None = None) -> BatchKernel:
    """The pairwise backend for one batch: ``"dense"``, ``"fused"``, or ``"auto"``.

    ``"auto"`` is ``"dense"`` on CPU for batches of at most ``_DENSE_PAIRS`` pairs (B <= 256)
    whose own points take its one-product logits (the expanded form's rounding bound
    holds for them): there a step is per-operation overhead, and one materialised block
    per pass has the fewest operations. Otherwise ``"fused"`` (where dense would fall back
    to difference-form distances, e.g. d = 784 at sigma = 0.3, it is ~2x slower). Measured
    with ``python -m fluxbench.bench``. Both compute the same sums and differ only in
    rounding.
    """
    if backend == "auto":
        if x.device.type == "cpu" and x.shape[0] * x.shape[0] <= _DENSE_PAIRS:
            dense = DenseBatchKernel(x, sigma, chunk_size=chunk_size)
            if dense.expanded_on_data:
                return dense
        backend = "fused"
    if backend == "dense":
        return DenseBatchKernel(x, sigma, chunk_size=chunk_size)
    if backend == "fused":
        return FusedBatchKernel(x, sigma, chunk_size=chunk_size)
    raise ValueError(f"backend must be 'auto', 'dense' or 'fused'; got {backend!r}")
