"""Materialised blocks of the batch kernel: the dense backend and the block helpers the fused one reuses.

Coordinates are centred; logits take the expanded form z.x / var - |x|^2 / (2 var) (one
matrix product) while its rounding bound holds, else the difference form; weights are
exp(logit - row max) floored at e^-80, and every sum is divided by its row mass after the
product (logits in base 2, exponentiated by exp2: see ``fluxbench._pairwise.common``).
:func:`block_moments` gives s_hat, C (f - 2 s_hat) and the contracted third
central moment from one weight block (the moments of SPEC eq. (5)'s derivatives, see
:mod:`fluxbench.objectives.batch_score`); :func:`dense_transition` the transition sums.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._pairwise import LOG2E, log2_kernel_difference, sq_dists_difference, working_dtype
from .._pairwise.blocks import product_dtype, shifted_exp2
from .batch_kernel import BatchKernel, gradient_terms, kernel_method

__all__ = ["DenseBatchKernel", "BlockKeys", "block_moments", "dense_transition", "LOGIT_FLOOR"]

# Weights more than e^-80 below their row's maximum are raised to e^-80 of it: invisible
# in any float format (under 1e-34 of the row), and it keeps exp out of the range below
# -87, where CPUs slow down ~50x (measured: exp(-110) costs 50x exp(-50) here).
LOGIT_FLOOR = 80.0


def _with_ones(x: Tensor) -> Tensor:
    """(n, d) -> (n, d + 1) [x, 1]: a bias or the row mass rides along in one matrix product."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], 1)


def dense_transition(
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
        keys = BlockKeys(mu_c, v, bias)
    # accumulated as (d, M): a product with the long side last is ~3x faster than (M, d)
    out_t = mu.new_zeros(mu.shape[1], mu.shape[0])
    for start in range(0, y.shape[0], chunk):
        b = slice(start, start + chunk)
        if expanded:
            logits = keys.logits(y[b] - centre)
        else:
            logits = log2_kernel_difference(y[b], mu, v)
            if anchor_bias is not None:
                logits.add_(anchor_bias, alpha=LOG2E)
        w = shifted_exp2(logits, -LOGIT_FLOOR)
        out_t.addmm_((g[b] / w.sum(1, keepdim=True)).T, w)
    return out_t.T


class BlockKeys:
    """Keys (M, d) of a materialised block in the layouts its products need, each built
    once (the sums' layouts on first use: the transition block needs only the logits).

    Sums are taken transposed, (d + 1, M) x (M, n): BLAS libraries serve a product with
    a handful of output columns poorly (MKL on an AMD EPYC: (256, 256) x (256, 3) takes
    52 us, the transposed product 10 us), and the moment block, two such sums, takes
    19 us instead of 106. The reduction order over M may then change with n, so a
    query's value moves with the chunking within rounding (the bound the chunking tests
    state), never more.
    """

    def __init__(self, x: Tensor, var: float, bias: Tensor | None = None):
        self.x = x
        if bias is None:  # else given: -|x|^2 / (2 var) already computed, possibly plus a key bias
            bias = x.square().sum(1).mul_(-0.5 / var)
        # x / var and the bias in base 2: logits of queries z in one addmm
        self.scaled_t = x.T.mul(LOG2E / var)  # (d, M)
        self.bias2 = bias.mul(LOG2E)  # (M,)

    @functools.cached_property
    def t(self) -> Tensor:
        """(d, M) the keys transposed, contiguous."""
        return self.x.T.contiguous()

    @functools.cached_property
    def with_mass_t(self) -> Tensor:
        """(d + 1, M) [x, 1] transposed, contiguous."""
        return _with_ones(self.x).T.contiguous()

    def logits(self, z: Tensor) -> Tensor:
        """(n, M) (z.x / var + bias) LOG2E (by default bias = -|x|^2 / (2 var)) for queries z (n, d):
        the expanded-form logits in base 2."""
        return torch.addmm(self.bias2, z, self.scaled_t)

    def sums(self, w: Tensor) -> Tensor:
        """(..., d + 1) sum_j w_j [x_j, 1] for weights w (..., M) (a transposed view)."""
        return torch.matmul(self.with_mass_t, w.mT).mT


def block_moments(
    w: Tensor, keys: BlockKeys, y: Tensor, f: Tensor, eps: Tensor | None, var: float
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
        self.keys = BlockKeys(xc - self.centre, self.var)  # centred once: products below stay small
        self.chunk = chunk_size or max(1, (1 << 20) // max(1, x.shape[0]))
        # whether queries at the data points themselves take the one-product form
        self.expanded_on_data = product_dtype(self.keys.x, self.var) == self.dtype

    def _weights(self, z: Tensor) -> Tensor:
        """(n, B) unnormalised weights for centred queries z (n, d)."""
        if product_dtype(z, self.var) == z.dtype:
            return shifted_exp2(self.keys.logits(z), -LOGIT_FLOOR)
        return shifted_exp2(log2_kernel_difference(z, self.keys.x, self.var), -LOGIT_FLOOR)

    def _blocks(self, n: int):
        for start in range(0, n, self.chunk):
            yield slice(start, min(start + self.chunk, n))

    def select_chains(self, n_chains, generator):
        if n_chains is None or n_chains >= self.n:
            return None, 1.0
        sel = torch.randperm(self.n, generator=generator, device=self.centre.device)[:n_chains].sort().values
        return sel, self.n / n_chains

    @kernel_method
    def mean(self, z: Tensor) -> Tensor:
        z = z.to(self.dtype) - self.centre
        d = z.shape[1]

        def block(zb: Tensor) -> Tensor:
            sums = self.keys.sums(self._weights(zb))
            return sums[:, :d] / sums[:, d:]

        return self._by_blocks(block, z).add_(self.centre)

    @kernel_method
    def score_terms(self, y: Tensor, f: Tensor, probe: Tensor | None) -> tuple[Tensor, Tensor]:
        y = y.to(self.dtype) - self.centre
        f = f.to(self.dtype)
        eps = probe if probe is None else probe.to(self.dtype)

        def block(yb: Tensor, fb: Tensor, eb: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
            return block_moments(self._weights(yb), self.keys, yb, fb, eb, self.var)

        s, cw, third = self._by_blocks(block, y, f) if eps is None else self._by_blocks(block, y, f, eps)
        return s, gradient_terms(s, f, cw, third, self.var)

    def _by_blocks(self, fn, *rows: Tensor) -> Tensor | tuple[Tensor, ...]:
        """fn over row blocks of at most ``chunk`` rows, concatenated (one call for small inputs);
        fn returns a tensor or a tuple of tensors."""
        n = rows[0].shape[0]
        if n <= self.chunk:
            return fn(*rows)
        parts = [fn(*(t[b] for t in rows)) for b in self._blocks(n)]
        return tuple(map(torch.cat, zip(*parts))) if isinstance(parts[0], tuple) else torch.cat(parts)

    @kernel_method
    def transition_sum(self, mu, y, v, g, chains):
        return dense_transition(mu.to(self.dtype), y.to(self.dtype), v, g.to(self.dtype), self.chunk)
