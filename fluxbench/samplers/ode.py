"""Probability-flow ODE of the VE family and its likelihood (SPEC sections 3 and 4)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._checks import check_batch, check_generator, check_points, check_positive_int
from .._random import rademacher
from ._common import check_callable, check_sigma_grid, check_step_output, flow_step, raise_if_nonfinite

__all__ = ["probability_flow", "probability_flow_nll"]

_METHODS = ("euler", "heun")


def _check_method(method: object) -> str:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}")
    return method


def probability_flow(
    model: Callable[[Tensor, Tensor], Tensor],
    x_init: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    method: str = "heun",
    progress: bool = False,
) -> Tensor:
    """Integrate the VE probability-flow ODE dx/dsigma = -sigma f(x, sigma) along a sigma grid.

    SPEC section 3: for the VE family p_sigma = p * N(0, sigma^2 I) and any field f that
    satisfies the stationarity equation (2) for p_sigma at every sigma (the score, or the
    score plus a divergence-free current, e.g. f = -(I + Q)(Sigma + sigma^2 I)^-1 x for
    Gaussian data and Q antisymmetric, SPEC section 4), the flow maps p_{sigma_1} to
    p_{sigma_L}. With h = sigma_{i+1} - sigma_i and d(x, s) = -s f(x, s):

        Euler:  x <- x + h d(x, sigma_i)
        Heun:   x_e = x + h d(x, sigma_i);
                x <- x + h/2 (d(x, sigma_i) + d(x_e, sigma_{i+1}))

    (Heun is second order; as in EDM it falls back to the Euler step when
    sigma_{i+1} = 0, so the model is never called at sigma = 0.)

    The grid may be decreasing (sampling: noise -> data, a final 0 allowed) or increasing
    (encoding: data -> noise, all > 0). The model is called as ``model(x, sigma)`` with
    sigma a 0-d tensor in ``x``'s dtype and device; its output is validated on the first
    call. Runs under ``torch.no_grad()``. States of any event shape are accepted (vectors
    (N, d), images (N, C, H, W)); the model is called with the state's shape.

    Args:
        model: noise-conditioned field ``(x, sigma) -> f(x, sigma)``, (N, *event_shape) ->
            (N, *event_shape).
        x_init: (N, *event_shape) points at sigma_1.
        sigmas: strictly monotone grid sigma_1, ..., sigma_L (L >= 2), standard deviations.
        method: ``"heun"`` (default) or ``"euler"``.
        progress: show a tqdm progress bar.

    Returns:
        (N, *event_shape) points at sigma_L.

    Raises:
        ValueError: bad arguments, a bad model output on the first call, or a state that
            became non-finite (use a finer grid).
    """
    check_callable(model, "model")
    x_init = check_batch(x_init, "x_init")
    levels = _check_grid(sigmas)
    method = _check_method(method)
    sig_t = torch.tensor(levels, dtype=x_init.dtype, device=x_init.device)

    with torch.no_grad():
        x = x_init.detach().clone()
        for i in tqdm(range(len(levels) - 1), disable=not progress, desc="probability flow", leave=False):
            x = flow_step(
                model, x, levels[i], levels[i + 1], sig_t[i], sig_t[i + 1], heun=method == "heun", check=i == 0
            )
        raise_if_nonfinite(x, "probability_flow: the state became non-finite; use a finer sigmas grid")
    return x


def _check_grid(sigmas: object) -> list[float]:
    # strictly monotone, all > 0 except a final 0 (which can only end a decreasing grid)
    return check_sigma_grid(sigmas, "sigmas", direction="either", allow_final_zero=True)


def _gaussian_prior_logp(sigma: float) -> Callable[[Tensor], Tensor]:
    def logp(z: Tensor) -> Tensor:
        d = z.shape[1]
        return -0.5 * (z * z).sum(dim=1) / sigma**2 - 0.5 * d * math.log(2 * math.pi * sigma**2)

    return logp


def _drift_and_divergence(
    model: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigma: Tensor, probes: Tensor | None, check: bool
) -> tuple[Tensor, Tensor]:
    """f(x, sigma), shape (N, d), and div_x f(x, sigma), shape (N,), by autograd."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        f = model(xr, sigma)
        check_step_output(f, xr, "model", full=check)
        if not f.requires_grad:
            raise ValueError("model output does not depend on x through autograd; cannot compute its divergence")
        if probes is None:  # exact trace: d backward passes
            d = x.shape[1]
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for k in range(d):
                (g,) = torch.autograd.grad(f[:, k].sum(), xr, retain_graph=k < d - 1)
                div = div + g[:, k]
        else:  # Hutchinson: E[eps^T (df/dx) eps] = div f (SPEC section 4)
            n_probes = probes.shape[0]
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for j in range(n_probes):
                (g,) = torch.autograd.grad((f * probes[j]).sum(), xr, retain_graph=j < n_probes - 1)
                div = div + (g * probes[j]).sum(dim=1)
            div = div / n_probes
    return f.detach(), div.detach()


def probability_flow_nll(
    model: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    prior_logp: Callable[[Tensor], Tensor] | None = None,
    method: str = "heun",
    n_probes: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Negative log-likelihood of ``x`` under p_{sigma_1} by the probability-flow ODE.

    SPEC section 3 (instantaneous change of variables). Integrate, from sigma_1 up to
    sigma_L, the flow dx/dsigma = v(x, sigma) = -sigma f(x, sigma) together with

        d/dsigma log p_sigma(x(sigma)) = -div v = sigma div_x f(x(sigma), sigma),

    so that

        -log p_{sigma_1}(x) = -log p_{sigma_L}(x(sigma_L)) + int_{sigma_1}^{sigma_L} sigma div f dsigma.

    The same Euler or Heun scheme as ``probability_flow`` integrates the joint state.
    For Gaussian data and f = -(I + Q)(Sigma + sigma^2 I)^-1 x the divergence does not
    depend on the antisymmetric Q, so the NLL is unchanged by Q (SPEC section 4).

    The divergence is exact (d backward passes; assumes the model treats rows
    independently, e.g. no batch-statistics normalisation) when ``n_probes`` is None, or
    a Hutchinson estimate with ``n_probes`` Rademacher probes per point, drawn once from
    ``generator`` and held fixed along the trajectory (unbiased for the NLL).

    Args:
        model: noise-conditioned field ``(x, sigma) -> f(x, sigma)``, differentiable in x.
        x: (N, d) points whose NLL under p_{sigma_1} is wanted.
        sigmas: strictly increasing positive grid sigma_1 < ... < sigma_L (L >= 2).
        prior_logp: callable (N, d) -> (N,) giving log p_{sigma_L}; default the VE prior
            log N(0, sigma_L^2 I) (accurate when sigma_L dominates the data scale).
        method: ``"heun"`` (default) or ``"euler"``.
        n_probes: None for the exact divergence, or the number of Hutchinson probes >= 1.
        generator: source of the Rademacher probes.
        progress: show a tqdm progress bar.

    Returns:
        (N,) tensor of NLLs in nats (``x``'s dtype and device), detached.

    Raises:
        ValueError: bad arguments, a bad model output on the first call, or a non-finite
            result.
    """
    check_callable(model, "model")
    x = check_points(x, "x")
    levels = check_sigma_grid(sigmas, "sigmas", direction="increasing")
    method = _check_method(method)
    if n_probes is not None:
        n_probes = check_positive_int(n_probes, "n_probes", minimum=1)
    generator = check_generator(generator, x.device)
    if prior_logp is None:
        prior_logp = _gaussian_prior_logp(levels[-1])
    check_callable(prior_logp, "prior_logp")
    probes = None if n_probes is None else rademacher((n_probes, *x.shape), x, generator)
    sig_t = torch.tensor(levels, dtype=x.dtype, device=x.device)

    z = x.detach().clone()
    integral = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    f, div = _drift_and_divergence(model, z, sig_t[0], probes, check=True)
    for i in tqdm(range(len(levels) - 1), disable=not progress, desc="probability flow NLL", leave=False):
        h = levels[i + 1] - levels[i]
        v_cur, l_cur = -levels[i] * f, levels[i] * div
        if method == "euler":
            z = z + h * v_cur
            integral = integral + h * l_cur
        else:
            f_next, div_next = _drift_and_divergence(model, z + h * v_cur, sig_t[i + 1], probes, check=False)
            z = z + (0.5 * h) * (v_cur - levels[i + 1] * f_next)
            integral = integral + (0.5 * h) * (l_cur + levels[i + 1] * div_next)
        if i < len(levels) - 2:
            f, div = _drift_and_divergence(model, z, sig_t[i + 1], probes, check=False)
    with torch.no_grad():
        logp_end = prior_logp(z)
        if not isinstance(logp_end, Tensor) or logp_end.shape != (x.shape[0],):
            raise ValueError(f"prior_logp must return a tensor of shape ({x.shape[0]},)")
        nll = -logp_end + integral
    raise_if_nonfinite(nll, "probability_flow_nll: the NLL is non-finite; use a finer sigmas grid")
    return nll.detach()
