"""EDM's noise schedule and deterministic/stochastic Heun sampler (SPEC section 3).

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models"),
Algorithms 1 and 2, written for a noise-conditioned field f(x, sigma) ~ grad log p_sigma(x)
(with EDM's denoiser D: f = (D(x, sigma) - x) / sigma^2, so (x - D) / sigma = -sigma f).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._checks import check_batch, check_generator, check_positive, check_positive_int
from .._random import normal
from ._common import check_callable, check_sigma_grid, flow_step, raise_if_nonfinite

__all__ = ["edm_sigmas", "edm_heun"]


def edm_sigmas(
    steps: int,
    *,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    final_zero: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """EDM's rho-schedule of noise levels (EDM eq. (5)), decreasing from sigma_max to sigma_min.

        sigma_i = (sigma_max^(1/rho) + i / (S - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
        i = 0, ..., S - 1,

    followed by sigma_S = 0 when ``final_zero`` (EDM's t_N = 0: the last Heun step is an
    Euler step to the data, and the model is never called at sigma = 0). rho = 7 spends
    most steps at small sigma, where the trajectories curve.

    Args:
        steps: S >= 2, the number of positive levels (S sampling steps with ``final_zero``,
            S - 1 without).
        sigma_min: smallest positive level, 0 < sigma_min < sigma_max.
        sigma_max: largest level.
        rho: schedule exponent > 0.
        final_zero: append sigma = 0 (shape (S + 1,)) or not (shape (S,)).
        device: device of the result (default CPU).
        dtype: floating dtype of the result (float64 by default, as EDM's reference code).

    Returns:
        1-D tensor of S + 1 (or S) strictly decreasing levels.
    """
    steps = check_positive_int(steps, "steps", minimum=2)
    sigma_min = check_positive(sigma_min, "sigma_min")
    sigma_max = check_positive(sigma_max, "sigma_max")
    rho = check_positive(rho, "rho")
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not isinstance(final_zero, bool):
        raise TypeError(f"final_zero must be a bool; got {type(final_zero).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype; got {dtype!r}")
    i = torch.arange(steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + i / (steps - 1) * (lo - hi)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact end points (the power rounds)
    if final_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(device=device, dtype=dtype)


def edm_heun(
    model: Callable[[Tensor, Tensor], Tensor],
    x_init: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: torch.Generator | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    progress: bool = False,
) -> Tensor:
    """EDM's Heun sampler of the VE probability-flow ODE dx/dsigma = -sigma f(x, sigma).

    EDM Algorithm 2 (Algorithm 1 when ``s_churn = 0``, the default). For i = 0, ..., N - 1
    on the grid t_0 > t_1 > ... > t_N (N = len(sigmas) - 1, t_N may be 0):

        gamma_i = min(s_churn / N, sqrt(2) - 1) if s_tmin <= t_i <= s_tmax else 0
        t_hat   = (1 + gamma_i) t_i
        x_hat   = x + sqrt(t_hat^2 - t_i^2) s_noise eps,     eps ~ N(0, I)   (churn only)
        d       = -t_hat f(x_hat, t_hat)                     (= (x_hat - D(x_hat, t_hat)) / t_hat)
        x'      = x_hat + (t_{i+1} - t_hat) d                (Euler)
        if t_{i+1} != 0:                                      (2nd-order correction)
            d'  = -t_{i+1} f(x', t_{i+1})
            x'  = x_hat + (t_{i+1} - t_hat) (d + d') / 2
        x       = x'

    With f the exact score of p_sigma = p * N(0, sigma^2 I) and x_init ~ p_{t_0}, the
    output approximates p_{t_N}; the deterministic sampler's error is O(h^2) (second order)
    on grids with final level > 0. Start from x_init = t_0 * z, z ~ N(0, I), when t_0
    dominates the data scale (EDM: t_0 = 80 with :func:`edm_sigmas`).

    Randomness: without churn the map x_init -> output is deterministic and ``generator``
    is unused (draw x_init from your own generator); with churn every eps is one draw of the
    state's shape from ``generator``, in step order, so a seeded generator reproduces the run.

    The model is called as ``model(x, sigma)`` with x of the state's shape (N, *event_shape),
    e.g. images (N, C, H, W), and sigma a 0-d tensor in ``x``'s dtype and device; its output
    is validated (shape, dtype, device, finite) on the first call. Runs under
    ``torch.no_grad()``; the state's finiteness is checked once at the end.

    Args:
        model: noise-conditioned field ``(x, sigma) -> f(x, sigma)``, (N, *event_shape) ->
            (N, *event_shape) (e.g. ``fluxbench.images.EDMField``).
        x_init: (N, *event_shape) states at t_0. Not modified.
        sigmas: strictly decreasing grid t_0 > ... > t_N (N >= 1), all > 0 except possibly
            t_N = 0 (e.g. :func:`edm_sigmas`).
        generator: source of the churn noise (on ``x_init``'s device).
        s_churn: EDM's S_churn >= 0 (total stochasticity; 0: deterministic Algorithm 1).
        s_tmin: churn only at levels t_i >= s_tmin.
        s_tmax: churn only at levels t_i <= s_tmax.
        s_noise: EDM's S_noise >= 0, scale of the churn noise (1: exact noise injection).
        progress: show a tqdm progress bar over the steps.

    Returns:
        (N, *event_shape) states at t_N, ``x_init``'s dtype and device.

    Raises:
        ValueError: bad arguments, a bad model output on the first call, or a state that
            became non-finite.

    Example:
        >>> import torch
        >>> from fluxbench.samplers import edm_heun, edm_sigmas
        >>> score = lambda x, s: -x / (1 + s**2)            # data N(0, I): p_s = N(0, (1 + s^2) I)
        >>> g = torch.Generator().manual_seed(0)
        >>> x0 = 80.0 * torch.randn(4000, 1, 4, 4, generator=g, dtype=torch.float64)
        >>> x = edm_heun(score, x0, edm_sigmas(32))
        >>> x.shape, abs(float(x.var()) - 1.0) < 0.05
        (torch.Size([4000, 1, 4, 4]), True)
    """
    check_callable(model, "model")
    x_init = check_batch(x_init, "x_init")
    levels = check_sigma_grid(sigmas, "sigmas", direction="decreasing", allow_final_zero=True)
    generator = check_generator(generator, x_init.device)
    s_churn = check_positive(s_churn, "s_churn", allow_zero=True)
    s_tmin = check_positive(s_tmin, "s_tmin", allow_zero=True)
    s_noise = check_positive(s_noise, "s_noise", allow_zero=True)
    if isinstance(s_tmax, bool) or not isinstance(s_tmax, (int, float)) or math.isnan(s_tmax) or s_tmax < s_tmin:
        raise ValueError(f"s_tmax must be a number >= s_tmin = {s_tmin} (inf allowed); got {s_tmax!r}")

    n_steps = len(levels) - 1
    gamma_max = min(s_churn / n_steps, math.sqrt(2.0) - 1.0)
    gammas = [gamma_max if s_churn > 0 and s_tmin <= t <= s_tmax else 0.0 for t in levels[:-1]]
    hats = [(1.0 + g) * t for g, t in zip(gammas, levels[:-1])]
    # the model's sigma arguments, built once (no host-to-device copy inside the loop)
    hat_t = torch.tensor(hats, dtype=x_init.dtype, device=x_init.device)
    next_t = torch.tensor(levels[1:], dtype=x_init.dtype, device=x_init.device)

    with torch.no_grad():
        x = x_init.detach().clone()
        for i in tqdm(range(n_steps), disable=not progress, desc="edm heun", leave=False):
            if gammas[i] > 0:
                eps = normal(x.shape, x, generator)
                x = x + (math.sqrt(hats[i] ** 2 - levels[i] ** 2) * s_noise) * eps
            x = flow_step(model, x, hats[i], levels[i + 1], hat_t[i], next_t[i], heun=True, check=i == 0)
        raise_if_nonfinite(x, "edm_heun: the state became non-finite (the model returned NaN/inf?)")
    return x
