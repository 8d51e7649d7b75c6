"""A literal, slow transcription of the reference estimator of SPEC section 2.

Dense B x B softmaxes and full autograd through the batch score (the double backward
the library avoids). Used only to check ``flux_matching_loss`` draw for draw: it
consumes the generator in the same order (anchor noise, time, chain noise, probe).

Squared distances are explicit differences, |a_i - b_j|^2 = sum_k (a_ik - b_jk)^2, not
``torch.cdist``: the loss is differentiated twice through the batch score, and torch 2.13 and
older have no derivative for ``_cdist_backward`` (seen with 2.11 and 2.13).
"""

from __future__ import annotations

import math

import torch


def sq_dist(a, b):
    """|a_i - b_j|^2 for a (n, d), b (m, d): (n, m), by explicit differences (twice differentiable)."""
    return (a[:, None, :] - b[None, :, :]).square().sum(-1)


def reference_flux_loss(field, x, sigma, *, horizon=4.0, substeps=4, divergence="hutchinson", t=None, generator=None):
    b, d = x.shape
    var = sigma * sigma

    def s_hat(z):
        w = torch.softmax(-0.5 * sq_dist(z, x) / var, dim=1)
        return (w @ x - z) / var

    x0 = x + sigma * torch.randn((b, d), generator=generator, dtype=x.dtype)
    if t is None:
        t = float(torch.rand((), generator=generator, dtype=x.dtype)) * horizon
        inv_q = horizon
    else:
        inv_q = 1.0
    t = max(t, 1e-6)
    h = t / substeps
    rho_h = math.exp(-h)
    z = x0
    for _ in range(substeps):
        m = z + var * s_hat(z)
        z = rho_h * z + (1 - rho_h) * m + sigma * math.sqrt(1 - rho_h**2) * torch.randn(
            (b, d), generator=generator, dtype=x.dtype
        )
    y = z.detach().requires_grad_(True)
    u = field(y) - s_hat(y)
    if divergence == "hutchinson":
        eps = torch.randint(0, 2, (b, d), generator=generator).to(x.dtype) * 2 - 1
        (vjp,) = torch.autograd.grad(u, y, eps, create_graph=True)
        div = (vjp * eps).sum(1)
    else:
        div = sum(torch.autograd.grad(u[:, i].sum(), y, create_graph=True)[0][:, i] for i in range(d))
    r = div + (u * s_hat(y)).sum(1)
    (g,) = torch.autograd.grad(r.sum(), y)
    rho = math.exp(-t)
    v = var * (1 - rho**2)
    mu = x0 + (1 - rho) * var * s_hat(x0)
    w_t = torch.softmax(-0.5 * sq_dist(mu, y.detach()) / v, dim=0)
    g_hat = rho * inv_q * (w_t @ g)
    return -2 * ((field(x0) - s_hat(x0)) * g_hat).sum(1)
