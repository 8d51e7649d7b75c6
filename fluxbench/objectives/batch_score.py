"""The batch score of the smoothed empirical measure and the derivatives Flux Matching needs.

For a batch x_1..x_B and one noise level sigma, p_hat(z) = (1/B) sum_j N(z; x_j, sigma^2 I)
has posterior weights w_j(z) = softmax_j(-|z - x_j|^2 / (2 sigma^2)) and (SPEC eq. (5))

    m(z) = sum_j w_j x_j,           s_hat(z) = (m(z) - z) / sigma^2.

Its derivatives are moments of w, which is why nothing here back-propagates through the
B x B softmax (the double backward that dominates the published code's cost):

    J_s(z)    = (C(z) / sigma^2 - I) / sigma^2,       C = Cov_w(x)           (symmetric)
    d/dz E_w[phi(x)] = Cov_w(phi(x), x) / sigma^2
    grad_z eps^T C eps = E_w[ (eps.(x - m))^2 (x - m) ] / sigma^2              (third central moment)
    grad_z tr C        = E_w[ |x - m|^2 (x - m) ] / sigma^2
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from ..pairwise import Frames, KeyFrame, compute_dtype, kernel_mean

__all__ = ["batch_score", "score_terms", "MOMENT_MAX_DIM"]

# Up to this dimension the moments come from one fused attention call with polynomial
# features (1 + d + d(d+1)/2 + d(d+1)(d+2)/6 columns); above it from dense blocks.
MOMENT_MAX_DIM = 4


def batch_score(z: Tensor, x: Tensor, sigma: float, *, chunk_size: int | None = None) -> Tensor:
    """The exact score of the smoothed empirical measure, SPEC eq. (5).

    Args:
        z: (N, d) query points.
        x: (B, d) the batch (centres of p_hat).
        sigma: the smoothing standard deviation (> 0).
        chunk_size: at most this many queries per fused call.

    Returns:
        (N, d) s_hat(z) = (m(z) - z) / sigma^2 in the compute dtype (>= float32).
    """
    var = sigma * sigma
    m = kernel_mean(z, x, var, chunk_size=chunk_size)
    return (m - z.to(m.dtype)) / var


@lru_cache(maxsize=None)
def _monomials(d: int, device_type: str) -> tuple[Tensor, Tensor]:
    """Index maps from full second/third moment tensors to the unique monomials."""
    quad = [(a, b) for a in range(d) for b in range(a, d)]
    cub = [(a, b, c) for a in range(d) for b in range(a, d) for c in range(b, d)]
    q_index = torch.empty(d, d, dtype=torch.long)
    for k, (a, b) in enumerate(quad):
        q_index[a, b] = q_index[b, a] = k
    c_index = torch.empty(d, d, d, dtype=torch.long)
    for k, (a, b, c) in enumerate(cub):
        for p in {(a, b, c), (a, c, b), (b, a, c), (b, c, a), (c, a, b), (c, b, a)}:
            c_index[p] = k
    return q_index, c_index


def _features(k: Tensor) -> Tensor:
    """Monomials of local coordinates up to degree 3: (..., d) -> (..., d + d2 + d3).

    Order: k_a; k_a k_b (a <= b, row-major); k_a k_b k_c (a <= b <= c, row-major),
    matching the index maps of :func:`_monomials`.
    """
    d = k.shape[-1]
    pairs = [(a, b) for a in range(d) for b in range(a, d)]
    rows = torch.tensor([a for a, _ in pairs], device=k.device)
    cols = torch.tensor([b for _, b in pairs], device=k.device)
    quad = k[..., rows] * k[..., cols]
    cub = [quad[..., j : j + 1] * k[..., b:] for j, (_, b) in enumerate(pairs)]
    return torch.cat([k, quad, *cub], dim=-1)


def _central_moments(y: Tensor, keys: Tensor | KeyFrame, var: float, chunk_size: int | None):
    """(m, C, T3): posterior mean (N, d), covariance (N, d, d), third central moment (N, d, d, d)."""
    d = y.shape[1]
    feats, frame = kernel_mean(y, keys, var, features=_features, chunk_size=chunk_size)
    q_index, c_index = _monomials(d, y.device.type)
    n_q = d * (d + 1) // 2
    mu = feats[:, :d]
    m2 = feats[:, d : d + n_q][:, q_index.to(y.device)]
    m3 = feats[:, d + n_q :][:, c_index.to(y.device)]
    cov = m2 - mu[:, :, None] * mu[:, None, :]
    t3 = (
        m3
        - m2[:, :, :, None] * mu[:, None, None, :]
        - m2[:, :, None, :] * mu[:, None, :, None]
        - m2[:, None, :, :] * mu[:, :, None, None]
        + 2 * mu[:, :, None, None] * mu[:, None, :, None] * mu[:, None, None, :]
    )
    return frame + mu, cov, t3


def score_terms(
    y: Tensor,
    x: Tensor,
    sigma: float,
    f_y: Tensor,
    probe: Tensor | None,
    *,
    keys: KeyFrame | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The batch score at y and the gradient of the score part of the defect estimate.

    The defect estimate of SPEC section 2, step 3, splits as
    r_hat = [eps^T J_f eps + f.s_hat] + [- D_s - |s_hat|^2] with D_s = eps^T J_s eps
    (Hutchinson) or tr J_s (exact). This returns s_hat(y) and the exact gradient of
    everything r_hat contains besides the field's own derivatives:

        g_s = J_s (f - 2 s_hat) - grad D_s

    (the J_s f term comes from the product rule on f.s_hat). The caller adds
    grad_z[eps^T J_f eps + f . stopgrad(s_hat)] from autograd on f.

    Args:
        y: (N, d) points (x_t in the loss).
        x: (B, d) the batch.
        sigma: smoothing standard deviation.
        f_y: (N, d) the field at y (detached).
        probe: (N, d) Rademacher probe eps for Hutchinson, or None for the exact trace.
        keys: optional :class:`fluxbench.pairwise.KeyFrame` of x; y, f_y and probe are
            then in its frame order and so is the result.
        chunk_size: at most this many queries per fused pairwise call.

    Returns:
        (s_hat (N, d), g_s (N, d)) in the compute dtype.
    """
    var = sigma * sigma
    dtype = compute_dtype(y, x, f_y)
    adhoc = keys is None
    if adhoc:
        frames = Frames(y, n_keys=x.shape[0], width=pairwise_width(y.shape[1]))
        keys = KeyFrame(frames, x, var, dtype)
        y, f_y = frames.permute(y), frames.permute(f_y)
        probe = None if probe is None else frames.permute(probe)
    y = y.to(dtype)
    f = f_y.to(dtype)
    eps = None if probe is None else probe.to(dtype)
    if y.shape[1] <= MOMENT_MAX_DIM:
        m, cov, t3 = _central_moments(y, keys, var, chunk_size)
        s = (m - y) / var
        w = f - 2 * s
        cw = torch.einsum("nij,nj->ni", cov, w)
        if eps is None:
            third = torch.einsum("niik->nk", t3)
        else:
            third = torch.einsum("nijk,ni,nj->nk", t3, eps, eps)
    else:
        s, cw, third = _dense_terms(y, x.to(dtype), var, f, eps, keys.frames)
    g_s = (cw / var - (f - 2 * s)) / var - third / var**3
    if adhoc:
        return keys.frames.unpermute(s), keys.frames.unpermute(g_s)
    return s, g_s


def pairwise_width(d: int) -> int:
    """Per-key width of the widest pass: the moment features for small d."""
    if d <= MOMENT_MAX_DIM:
        return d + d * (d + 1) // 2 + d * (d + 1) * (d + 2) // 6
    return d + 1


def _dense_terms(y: Tensor, x: Tensor, var: float, f: Tensor, eps: Tensor | None, frames: Frames):
    """Materialised-block version of the moments in :func:`score_terms`, for large d.

    One block per local frame (so the result does not depend on any chunk size), in
    coordinates centred on the frame.
    """
    s = torch.empty_like(y)
    cw = torch.empty_like(y)
    third = torch.empty_like(y)
    size = frames.size
    for gi in range(frames.n_groups):
        rows = slice(gi * size, (gi + 1) * size)
        centre = frames.centres[gi].to(y.dtype)
        xc = x - centre
        yc = y[rows] - centre
        d2 = (yc.square().sum(1, keepdim=True) + xc.square().sum(1) - 2 * yc @ xc.T).clamp_min_(0)
        w = torch.softmax(d2.mul_(-0.5 / var), dim=1)
        m = w @ xc
        s[rows] = (m - yc) / var
        v = f[rows] - 2 * s[rows]
        # a_ij = v_i . (x_j - m_i): C v = sum_j w_ij a_ij (x_j - m_i)
        a = v @ xc.T - (v * m).sum(1, keepdim=True)
        wa = w * a
        cw[rows] = wa @ xc - wa.sum(1, keepdim=True) * m
        if eps is None:
            b = (m.square().sum(1, keepdim=True) + xc.square().sum(1) - 2 * m @ xc.T).clamp_min_(0)
        else:
            b = (eps[rows] @ xc.T - (eps[rows] * m).sum(1, keepdim=True)).square()
        wb = w * b
        third[rows] = wb @ xc - wb.sum(1, keepdim=True) * m
    return s, cw, third
