"""Annealed reverse-VE Euler-Maruyama with optional Langevin corrector (SPEC section 3)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._checks import check_batch, check_generator, check_positive, check_positive_int
from .._random import normal
from ._common import check_callable, check_sigma_grid, check_step_output, event_norms, raise_if_nonfinite

__all__ = ["annealed_langevin"]


def annealed_langevin(
    model: Callable[[Tensor, Tensor], Tensor],
    x_init: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: torch.Generator | None = None,
    corrector_steps: int = 0,
    snr: float = 0.16,
    progress: bool = False,
) -> Tensor:
    """Sample by annealing a noise-conditioned field from sigma_1 down to sigma_L.

    Predictor (SPEC section 3, reverse-VE Euler-Maruyama), for i = 1, ..., L - 1 with
    delta_i = sigma_i^2 - sigma_{i+1}^2:

        x <- x + delta_i f(x, sigma_i) + sqrt(delta_i) xi,    xi ~ N(0, I).

    Corrector (predictor-corrector, SPEC section 3): after each predictor step,
    ``corrector_steps`` Langevin steps at sigma_{i+1},

        g = f(x, sigma_{i+1}),  z ~ N(0, I_d),
        eps = 2 (snr * mean_n |z_n| / mean_n |g_n|)^2,     (batch means of each state's
                                                             Euclidean norm over its event dims)
        x <- x + eps g + sqrt(2 eps) z.

    Per step the predictor noise is drawn first, then the corrector noises in order,
    each one draw of the state's shape from ``generator``. With ``f`` the exact score of
    p_sigma = p * N(0, sigma^2 I) and ``x_init ~ p_{sigma_1}``, the output approximates
    p_{sigma_L} (no final denoising step), up to an O(max delta) discretisation bias.

    The model is called as ``model(x, sigma)`` with x of the state's shape (N, *event_shape):
    (N, d) vectors or (N, C, H, W) images, and sigma a 0-d tensor (``x``'s dtype and
    device); its output is validated on the first predictor and the first corrector call. The loop runs under ``torch.no_grad()``; the state's
    finiteness is checked once at the end.

    Args:
        model: noise-conditioned field ``(x, sigma) -> f(x, sigma)``, (N, *event_shape) ->
            (N, *event_shape).
        x_init: (N, *event_shape) starting points, typically samples of p_{sigma_1}
            (approximately N(0, sigma_1^2 I) when sigma_1 dominates the data scale).
        sigmas: strictly decreasing positive noise levels sigma_1 > ... > sigma_L, L >= 2
            (1-D tensor or sequence of floats; standard deviations).
        generator: source of all Gaussian draws (on ``x_init``'s device).
        corrector_steps: Langevin corrector steps per level, >= 0.
        snr: corrector signal-to-noise ratio, > 0.
        progress: show a tqdm progress bar over the levels.

    Returns:
        (N, *event_shape) samples at noise level sigma_L, ``x_init``'s dtype and device.

    Raises:
        ValueError: bad arguments, a model output of the wrong shape/dtype/device or
            non-finite on its first call, or a state that became non-finite (lower the
            step sizes: use a finer sigma grid or a smaller snr).
    """
    check_callable(model, "model")
    x_init = check_batch(x_init, "x_init")
    levels = check_sigma_grid(sigmas, "sigmas", direction="decreasing")
    corrector_steps = check_positive_int(corrector_steps, "corrector_steps", minimum=0)
    snr = check_positive(snr, "snr")
    generator = check_generator(generator, x_init.device)
    sig_t = torch.tensor(levels, dtype=x_init.dtype, device=x_init.device)
    tiny = torch.finfo(x_init.dtype).tiny

    with torch.no_grad():
        x = x_init.detach().clone()
        for i in tqdm(range(len(levels) - 1), disable=not progress, desc="annealed langevin", leave=False):
            delta = levels[i] ** 2 - levels[i + 1] ** 2
            xi = normal(x.shape, x, generator)
            f = model(x, sig_t[i])
            check_step_output(f, x, "model", full=i == 0)
            x = x + delta * f + math.sqrt(delta) * xi
            for c in range(corrector_steps):
                z = normal(x.shape, x, generator)
                g = model(x, sig_t[i + 1])
                check_step_output(g, x, "model", full=i == 0 and c == 0)
                z_norm = event_norms(z).mean()
                g_norm = event_norms(g).mean().clamp_min(tiny)
                eps = 2 * (snr * z_norm / g_norm) ** 2
                x = x + eps * g + torch.sqrt(2 * eps) * z
        raise_if_nonfinite(
            x,
            "annealed_langevin: the state became non-finite (the discretisation diverged or the model "
            "returned NaN/inf); use a finer sigmas grid or a smaller snr",
        )
    return x
