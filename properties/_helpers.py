"""Shared helpers of the property suite: example budgets, standard errors, oracles.

Statistical assertions here compare a Monte Carlo mean with its expected value within
``Z`` standard errors, with the standard error measured from the same draws (two-sided
false-alarm probability 6.3e-5 per check at Z = 4 for a normal mean). Every random draw
comes from a ``torch.Generator`` seeded from a Hypothesis-drawn seed, and the ci profile is
derandomized, so a passing run is reproducible bit for bit on the same build.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from hypothesis import settings
from torch import Tensor

F64 = torch.float64

#: Standard errors allowed for one scalar Monte Carlo comparison.
Z = 4.0
#: Standard errors allowed per entry when a vector or matrix is compared entry by entry
#: (Bonferroni for up to ~20 entries at the same family-wise rate as one 4-SE check).
Z_ENTRIES = 5.0


def examples(fraction: float, minimum: int = 2) -> settings:
    """``settings`` with ``fraction`` of the profile's max_examples (at least ``minimum``)."""
    return settings(max_examples=max(minimum, int(round(settings.default.max_examples * fraction))))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def mean_se(values: Tensor) -> tuple[float, float]:
    """Sample mean and its standard error std / sqrt(n) of a 1-D tensor (n >= 2)."""
    v = values.detach().to(F64).reshape(-1)
    return float(v.mean()), float(v.std() / math.sqrt(v.numel()))


def assert_mean(values: Tensor, expected: float, what: str, z: float = Z, slack: float = 0.0) -> tuple[float, float]:
    """|mean(values) - expected| <= z SE + slack + 1e-12 (|expected| + mean |values|); returns (mean, se).

    The last term is float64 rounding: when every draw gives the same value (e.g. t = 0,
    or a field with no error) the SE is 0 and the comparison must not be bit-exact. Pass
    ``slack`` for an absolute rounding scale when the expected value is 0.
    """
    m, se = mean_se(values)
    slack = slack + 1e-12 * (abs(expected) + float(values.detach().abs().mean()))
    assert abs(m - expected) <= z * se + slack, f"{what}: mean {m:.6g} vs expected {expected:.6g}, SE {se:.3g} (z = {(m - expected) / max(se, 1e-300):.2f})"
    return m, se


# ------------------------------------------------------------------ single-Gaussian copies

#: Copies of the single-Gaussian problem (B = 1, x_1 = 0) placed this far apart along the
#: first axis: cross-copy kernel weights are exp(-SPACING^2 / (2 sigma^2 ...)) = 0 exactly.
SPACING = 1e4


def copies(n: int, d: int) -> Tensor:
    """(n, d) batch: n independent copies of the B = 1 problem, x_k = k SPACING e_1."""
    x = torch.zeros(n, d, dtype=F64)
    x[:, 0] = SPACING * torch.arange(n, dtype=F64)
    return x


def local(z: Tensor) -> Tensor:
    """z minus the nearest copy's centre: the coordinates of the single-Gaussian problem."""
    offset = torch.zeros_like(z)
    offset[:, 0] = SPACING * torch.round(z[:, 0].detach() / SPACING)
    return z - offset


def on_copies(field: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The field of each copy: z -> field(local(z)) (fields are translation-covariant here)."""
    return lambda z: field(local(z))


def closed_form_loss(a: Tensor, c: Tensor, sigma: float, horizon: float = 4.0, t: float | None = None) -> float:
    """E[loss] (or E[loss | t]) of f(z) = A z + c for B = 1, x_1 = 0 (SPEC section 2)."""
    d = a.shape[0]
    ms = 0.5 * (a + a.T) + torch.eye(d, dtype=F64) / sigma**2
    ms2, c2 = float((ms**2).sum()), float((c**2).sum())
    if t is not None:
        return 4 * math.exp(-2 * t) * ms2 + 2 * math.exp(-t) * c2 / sigma**2
    return 2 * (1 - math.exp(-2 * horizon)) * ms2 + 2 * (1 - math.exp(-horizon)) * c2 / sigma**2


def closed_form_grads(a: Tensor, c: Tensor, sigma: float, horizon: float = 4.0) -> tuple[Tensor, Tensor]:
    """E[grad_A loss], E[grad_c loss] = 2 (1 - e^{-2H}) M_s, 2 (1 - e^{-H}) c / sigma^2."""
    d = a.shape[0]
    ms = 0.5 * (a + a.T) + torch.eye(d, dtype=F64) / sigma**2
    return 2 * (1 - math.exp(-2 * horizon)) * ms, 2 * (1 - math.exp(-horizon)) * c / sigma**2


# ------------------------------------------------------------------ expectations over t


def t_quadrature(per_sample: Callable[[float, int], Tensor], horizon: float = 4.0, nodes: int = 12, seed: int = 0, repeats: int = 1) -> tuple[Tensor, Tensor]:
    """E[loss] = integral_0^H E[loss | t] dt (q = Uniform[0, H], weight H) without sampling t.

    Gauss-Legendre quadrature over t (``nodes`` nodes; the integrands here are sums of
    e^{-t} and e^{-2t}, integrated to ~1e-12 relative), and at each node the *fixed-t*
    loss (``t=``, weight 1), whose per-sample values on far-apart copies are independent:
    ``per_sample(t, seed)`` returns (n, ...) per-sample values, called ``repeats`` times per
    node with distinct seeds. Returns (sum_i w_i mean_i, sqrt(sum_i w_i^2 var_i / n_i)):
    the standard error of a sum of independent means over hundreds of draws, reliable
    at 4 SE. (Sampling t, one per batch, makes the batch means a skewed function of t whose
    small-t tail a few dozen batches often miss, so their SE is unreliable.)
    """
    import numpy as np

    xs, ws = np.polynomial.legendre.leggauss(nodes)
    mean, var = 0.0, 0.0
    for i, (xi, wi) in enumerate(zip(xs, ws)):
        t = 0.5 * horizon * (float(xi) + 1.0)
        w = 0.5 * horizon * float(wi)
        vals = torch.cat([per_sample(t, seed + 1000 * i + k).detach().to(F64) for k in range(repeats)])
        mean = mean + w * vals.mean(0)
        var = var + w**2 * vals.var(0) / vals.shape[0]
    return torch.as_tensor(mean, dtype=F64), torch.as_tensor(var, dtype=F64).sqrt()


def assert_close_se(mean: Tensor, se: Tensor, expected, what: str, z: float = Z, slack: float = 0.0) -> None:
    """|mean - expected| <= z se + slack + 1e-12 |expected| entry-wise (se from the caller)."""
    expected = torch.as_tensor(expected, dtype=F64)
    err = (mean - expected).abs()
    bad = err > z * se + slack + 1e-12 * expected.abs()
    assert not bool(bad.any()), f"{what}: {mean.tolist()} vs expected {expected.tolist()}, SE {se.tolist()}"


# ------------------------------------------------------------------ SPEC section 2, literally


def spec_batch_score(z: Tensor, x: Tensor, sigma: float) -> Tensor:
    """s_hat(z) = (m(z) - z) / sigma^2 with dense softmax weights (SPEC eq. (5)), differentiable."""
    logits = -0.5 * (z[:, None, :] - x[None, :, :]).square().sum(-1) / sigma**2
    w = torch.softmax(logits, dim=1)
    return (w @ x - z) / sigma**2


def spec_flux_loss(
    field: Callable[[Tensor], Tensor],
    x: Tensor,
    sigma: float,
    *,
    horizon: float = 4.0,
    substeps: int = 4,
    divergence: str = "hutchinson",
    t: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The seven steps of SPEC section 2, transcribed densely (autograd through s_hat).

    Consumes ``generator`` in the library's documented order (anchor noise, time, chain
    noise per sub-step, probe), so with the dense backend it must agree draw for draw with
    :func:`fluxbench.objectives.flux_matching_loss`.
    """
    b, d = x.shape
    var = sigma * sigma
    x0 = x + sigma * torch.randn((b, d), generator=generator, dtype=x.dtype)
    if t is None:
        t = float(torch.rand((), generator=generator, dtype=x.dtype)) * horizon
        inv_q = horizon
    else:
        inv_q = 1.0
    t = max(t, 1e-6)
    rho_h = math.exp(-t / substeps)
    z = x0
    for _ in range(substeps):
        m = z + var * spec_batch_score(z, x, sigma)
        z = rho_h * z + (1 - rho_h) * m + sigma * math.sqrt(1 - rho_h**2) * torch.randn((b, d), generator=generator, dtype=x.dtype)
    y = z.detach().requires_grad_(True)
    s_y = spec_batch_score(y, x, sigma)
    u = field(y) - s_y
    if divergence == "hutchinson":
        eps = torch.randint(0, 2, (b, d), generator=generator).to(x.dtype) * 2 - 1
        (vjp,) = torch.autograd.grad(u, y, eps, create_graph=True)
        div = (vjp * eps).sum(1)
    else:
        div = sum(torch.autograd.grad(u[:, i].sum(), y, create_graph=True)[0][:, i] for i in range(d))
    r = div + (u * s_y).sum(1)
    (g,) = torch.autograd.grad(r.sum(), y)
    rho = math.exp(-t)
    v = var * (1 - rho**2)
    s0 = spec_batch_score(x0, x, sigma)
    mu = x0 + (1 - rho) * var * s0
    w_t = torch.softmax(-0.5 * (mu[:, None, :] - y.detach()[None, :, :]).square().sum(-1) / v, dim=0)  # over i
    g_hat = rho * inv_q * (w_t @ g)
    return -2 * ((field(x0) - s0) * g_hat).sum(1)


# ------------------------------------------------------------------ SPEC section 5 Stein kernel


def stein_kernel_formula(x: Tensor, y: Tensor, fx: Tensor, fy: Tensor, lengthscale: float) -> Tensor:
    """h(x_i, y_j) of SPEC section 5 for all pairs, shape (N, M), as the SPEC writes it."""
    a = 1.0 / lengthscale**2
    d = x.shape[1]
    delta = x[:, None, :] - y[None, :, :]
    r2 = delta.square().sum(-1)
    k = torch.exp(-0.5 * a * r2)
    fxd = (fx[:, None, :] * delta).sum(-1)
    fyd = (fy[None, :, :] * delta).sum(-1)
    return k * (
        a * (fx @ fy.T)
        - a**2 * fxd * fyd
        + a**2 * (a * r2 - d - 2) * (fyd - fxd)
        + (a**2 * r2 - a * d) ** 2
        - 4 * a**3 * r2
        + 2 * a**2 * d
    )


def generator_l(field: Callable[[Tensor], Tensor], phi: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """(L_f phi)(z) = f(z) . grad phi(z) + Lap phi(z) by autograd, rows independent, graph kept."""
    with torch.enable_grad():
        val = phi(z)
        (grad,) = torch.autograd.grad(val.sum(), z, create_graph=True)
        lap = sum(torch.autograd.grad(grad[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(z.shape[1]))
        return (field(z) * grad).sum(1) + lap


def stein_kernel_autograd(field: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, lengthscale: float) -> Tensor:
    """h(x_n, y_n) = L_f^x L_f^y k(x, y) for paired rows, shape (N,), by autograd."""
    xr = x.detach().clone().requires_grad_(True)
    yr = y.detach().clone().requires_grad_(True)

    def ly_k(xx: Tensor) -> Tensor:
        # L^y k(xx, y), as a function of xx (the y-derivatives taken at yr)
        def k_xy(yy: Tensor) -> Tensor:
            return torch.exp(-0.5 * (xx - yy).square().sum(1) / lengthscale**2)

        return generator_l(field, k_xy, yr)

    return generator_l(field, ly_k, xr).detach()


def ksd_u_statistic(field: Callable[[Tensor], Tensor], x: Tensor, lengthscale: float) -> Tensor:
    """mean over i != j of h(x_i, x_j) (SPEC section 5), the reference U-statistic."""
    with torch.no_grad():
        fx = field(x)
    h = stein_kernel_formula(x, x, fx, fx, lengthscale)
    n = x.shape[0]
    return (h.sum() - h.diagonal().sum()) / (n * (n - 1))


# ------------------------------------------------------------------ derivatives


def divergence_exact(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """div fn(x), shape (N,), exact by d reverse passes (graph not kept)."""
    with torch.enable_grad():
        xr = x.detach().clone().requires_grad_(True)
        f = fn(xr)
        return sum(torch.autograd.grad(f[:, i].sum(), xr, retain_graph=True)[0][:, i] for i in range(x.shape[1])).detach()


def with_norm_at_least(m: Tensor, floor: float, fallback: Tensor | None = None) -> Tensor:
    """``m`` rescaled up to Frobenius norm ``floor`` if smaller.

    The zero matrix becomes ``fallback`` (default I) scaled to norm ``floor``. A
    deterministic map, so strategies composed with it still shrink to readable examples.
    """
    norm = float(torch.linalg.matrix_norm(m))
    if norm >= floor:
        return m
    if norm < 1e-6 * floor:  # zero or subnormal: rescaling would overflow or amplify noise
        m = torch.eye(m.shape[0], dtype=m.dtype) if fallback is None else fallback.to(m.dtype)
        norm = float(torch.linalg.matrix_norm(m))
    return m * (floor / norm)


# ------------------------------------------------------------------ deterministic expectations


def gauss_hermite_expectation(target, g: Callable[[Tensor], Tensor], nodes: int = 24) -> float:
    """E_p[g(X)] for a Gaussian or Gaussian-mixture target by tensor-product Gauss-Hermite
    quadrature (``nodes`` per dimension, per component): exact for polynomials of degree
    < 2 nodes, and fast-converging for the smooth integrands used here. Deterministic: no
    Monte Carlo error, so assertions on it cannot be statistical flukes."""
    import numpy as np

    z1, w1 = np.polynomial.hermite_e.hermegauss(nodes)
    w1 = w1 / math.sqrt(2 * math.pi)
    d = target.dim
    grids = torch.meshgrid(*([torch.tensor(z1, dtype=F64)] * d), indexing="ij")
    z = torch.stack([gr.reshape(-1) for gr in grids], dim=1)
    wgrids = torch.meshgrid(*([torch.tensor(w1, dtype=F64)] * d), indexing="ij")
    w = torch.ones(z.shape[0], dtype=F64)
    for wg in wgrids:
        w = w * wg.reshape(-1)
    if hasattr(target, "n_components"):
        comps = [(float(target._weights[k]), target._means[k], target._chol[k]) for k in range(target.n_components)]
    else:
        comps = [(1.0, target.mean, target.scale_tril)]
    total = 0.0
    for weight, mean, chol in comps:
        x = mean.to(F64) + z @ chol.to(F64).T
        total += weight * float((w * g(x)).sum())
    return total
