"""Softmax-weighted Gaussian-kernel sums: posterior means, log-partition functions and
the transition sums of Flux Matching (SPEC eq. (5), section 2 steps 5-6), by fused
attention or materialised blocks (see :mod:`fluxbench._pairwise`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fluxbench._pairwise.attention import attend, blocks_on, needs_grad
from fluxbench._pairwise.blocks import BlockKernel, blocks_mean, blocks_transpose_sum, product_dtype
from fluxbench._pairwise.chunked import chunk_bounds
from fluxbench._pairwise.common import block_rows, no_autocast, sq_dists_difference, working_dtype
from fluxbench._pairwise.compiled import compiled_on
from fluxbench._pairwise.frames import Frames, KeyFrame

__all__ = ["kernel_mean", "kernel_logsumexp", "kernel_transpose_sum", "kernel_transition_sum", "without_dropped"]

# Blocks pay for their weighted sum with a product whose cost grows with the number of
# value columns, where attention kernels fuse it. One pass at B = 4096, one thread of the
# AMD EPYC here, attention against keys-major blocks: means 23.8 against 7.8 ms at d = 2,
# 15.6 against 16.0 at d = 16, 28.8 against 27.7 at d = 34, 42.7 against 49.0 at d = 64;
# the moment pass at d = 4 (34 columns) 31.0 against 20.3. Blocks up to 34 columns.
_NARROW = 34


def _tiny(dtype: torch.dtype) -> float:
    # a mass below this has lost relative precision to underflow
    return 1e-300 if dtype == torch.float64 else 1e-30


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
            dtype = working_dtype(queries, keys)
            frames = _adhoc(queries, keys.shape[0], keys.shape[1], var)
            kf = KeyFrame(frames, keys, var, dtype)
            zq = frames.permute(queries)
        else:
            kf, frames, zq = keys, keys.frames, queries
            dtype = kf.k.dtype
        q = frames.local(zq.to(dtype))
        v = kf.k if features is None else kf.features(features)
        # compiled block sums fuse the product too: any width takes blocks then
        narrow = v.shape[-1] <= _NARROW or compiled_on(q.device)
        if narrow and blocks_on(q.device, q.shape[0] * q.shape[1] * kf.k.shape[1], q, kf.k):
            out = blocks_mean(q, kf, v, features, chunk_size).reshape(zq.shape[0], -1)
        else:
            k = kf.padded(max(q.shape[-1], v.shape[-1]))
            out = attend(q.mul_(1.0 / var), k, v, kf.bias, chunk_size).reshape(zq.shape[0], -1)
        if features is None:
            out = frames.add_centres(out)
            return frames.unpermute(out) if adhoc else out
        centre = frames.row_centres(zq.shape[0], dtype)
        return (frames.unpermute(out), frames.unpermute(centre)) if adhoc else (out, centre)


def _dense_logsumexp(
    queries: Tensor, keys: Tensor, var: float, key_bias: Tensor | None, chunk_size: int | None
) -> Tensor:
    """Difference-form log-partition functions, in blocks of ``block_rows`` queries."""
    out = []
    for r0, r1 in chunk_bounds(queries.shape[0], block_rows(keys.shape[0], chunk_size)):
        logits = sq_dists_difference(queries[r0:r1], keys, max_sum_dim=0).mul_(-0.5 / var)
        out.append(torch.logsumexp(logits if key_bias is None else logits.add_(key_bias), dim=1))
    return torch.cat(out)


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
    dtype = working_dtype(queries, keys)
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
        masses = attend(q_aug, k_aug, v, bias_aug, chunk_size).reshape(-1, 2)
        real_mass, ref_mass = masses[:, 0], masses[:, 1]
        exact_ref = (zq - c[ref]).square().sum(-1).mul_(-0.5 / var)
        if key_bias is not None:
            exact_ref = exact_ref + key_bias.to(dtype)[ref]
        out = exact_ref + torch.log(real_mass) - torch.log(ref_mass)
        bad = (real_mass < _tiny(dtype)) | (ref_mass < _tiny(dtype)) | ~torch.isfinite(out)
        if bool(bad.any()):
            rows = bad.nonzero().squeeze(1)
            out[rows] = _dense_logsumexp(zq[rows], c, var, None if key_bias is None else key_bias.to(dtype), chunk_size)
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
    dtype = working_dtype(queries, keys, values)
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
        res = attend(q_aug, k_aug, v, bias, chunk_size).reshape(-1, kdim + 1)
        out = res[:, :kdim] / res[:, kdim:]
    return frames.unpermute(out) if adhoc else out


def without_dropped(values: Tensor, bias: Tensor | None) -> Tensor:
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
    dtype = working_dtype(anchors, chains, values)
    with no_autocast(anchors.device):
        q = frames.local(chains.to(dtype))
        prod_dtype = product_dtype(q, var)
        # The frames are sized for the data's kernel; a transition kernel is narrower (var
        # -> 0 as t -> 0), and the expanded form attention evaluates then loses the weights
        # (at t = 1e-4, d = 64 it errs by more than the sum itself): there only blocks, with
        # float64 products or distances in difference form, are exact. Elsewhere one block
        # pass against two attention passes: blocks wherever _blocks_on chooses them.
        escalate = prod_dtype != dtype
        if escalate and needs_grad(anchors, chains, values):
            raise ValueError(
                f"kernel_transition_sum: var={var:g} is too narrow for the expanded form in {dtype} on these frames "
                "(rounding bound above _EXPANDED_TOL), and the exact block strategy is not differentiable; "
                "detach the inputs or pass float64 ones with frames built for this var"
            )
        if escalate or blocks_on(anchors.device, anchors.shape[0] * chains.shape[0], anchors, chains, values, min_pairs=0):
            kern = BlockKernel(q, KeyFrame(frames, anchors.to(dtype), var, dtype, anchor_bias), prod_dtype)
            g = without_dropped(values.to(dtype), chain_bias)
            return blocks_transpose_sum(kern, g.view(*q.shape[:2], -1), chunk_size)
        logz = kernel_logsumexp(chains, anchors, var, reference, frames=frames, key_bias=anchor_bias, chunk_size=chunk_size)
        return kernel_transpose_sum(anchors, chains, var, logz, values, frames=frames, key_bias=chain_bias, chunk_size=chunk_size)
