"""Measurements of the Flux Matching estimator itself (SPEC section 7).

Three facts about the batch-KDE loss of SPEC section 2, as functions anyone can rerun:

* :func:`gradient_snr` -- the signal-to-noise ratio |E g|^2 / tr Cov g of the parameter
  gradient g of the batch-mean loss (flux or DSM) at a given model;
* :func:`finite_batch_bias` -- c*, the minimiser over the family f = c s (s the score of
  p_sigma) of the expected flux loss; c* != 1 is the finite-batch bias;
* :func:`loss_mass_by_t` -- how much of the loss comes from small reference times t.

Each returns :class:`Estimate` values (value, standard error, number of draws). All
randomness goes through the caller's ``generator``: the same seed gives the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._checks import check_generator, check_positive, check_positive_int, check_sigma
from .fields import at_sigma
from .objectives import dsm_loss, flux_matching_loss

__all__ = ["Estimate", "gradient_snr", "gradient_snr_from_samples", "finite_batch_bias", "loss_mass_by_t"]

Sampler = Callable[..., Tensor]


class Estimate(NamedTuple):
    """A measured quantity: ``value`` with its standard error ``stderr`` from ``n`` draws."""

    value: float
    stderr: float
    n: int


# ----------------------------------------------------------------------------- SNR
def _snr_from_moments(s: Tensor, q: float, n: int) -> float:
    """SNR from the sum S (P,) of n gradients and the sum Q of their squared norms.

    m = S / n, tr C = (Q - n |m|^2) / (n - 1) (unbiased), signal = |m|^2 - tr C / n
    (unbiased for |E g|^2, since E |m|^2 = |E g|^2 + tr Cov / n); SNR = signal / tr C.
    """
    m2 = float(s.square().sum()) / (n * n)
    tr = (q - n * m2) / (n - 1)
    if not tr > 0:
        raise ValueError("the gradients have zero variance (tr Cov g = 0): the SNR is undefined")
    return (m2 - tr / n) / tr


class _SNRAccumulator:
    """Streaming group sums for the SNR and its jackknife over ``groups`` groups.

    Draw i goes to group i mod G; each group keeps its count, the sum of its gradients
    (P,) and the sum of their squared norms, in float64. Memory O(G P), never O(n P).
    """

    def __init__(self, groups: int):
        self.groups = groups
        self.sums: list[Tensor | None] = [None] * groups
        self.sq = [0.0] * groups
        self.count = [0] * groups
        self.n = 0

    def add(self, g: Tensor) -> None:
        g = g.detach().reshape(-1).to(torch.float64)
        k = self.n % self.groups
        self.sums[k] = g.clone() if self.sums[k] is None else self.sums[k].add_(g)
        self.sq[k] += float(g.square().sum())
        self.count[k] += 1
        self.n += 1

    def estimate(self) -> Estimate:
        if self.n < 3:
            raise ValueError(f"need at least 3 gradient draws for the SNR and its standard error; got {self.n}")
        used = [k for k in range(self.groups) if self.count[k] > 0]
        total = sum(self.sums[k] for k in used)
        q_total = sum(self.sq[k] for k in used)
        value = _snr_from_moments(total, q_total, self.n)
        # delete-a-group jackknife: SE^2 = (G - 1) / G sum_g (theta_{-g} - mean)^2
        loo = [
            _snr_from_moments(total - self.sums[k], q_total - self.sq[k], self.n - self.count[k]) for k in used
        ]
        g = len(loo)
        mean = sum(loo) / g
        se = math.sqrt((g - 1) / g * sum((v - mean) ** 2 for v in loo))
        return Estimate(value, se, self.n)


def gradient_snr_from_samples(grads: Tensor | Iterable[Tensor], *, groups: int = 20) -> Estimate:
    """SNR = |E g|^2 / tr Cov g from independent gradient draws g_1..g_n (SPEC section 7).

    The plug-in |mean|^2 overestimates |E g|^2 by tr Cov / n; the estimator here subtracts
    it: with m the sample mean and C_hat the unbiased sample covariance,

        SNR_hat = (|m|^2 - tr C_hat / n) / tr C_hat,

    whose numerator is unbiased for |E g|^2 (the ratio is consistent, with O(1/n) bias).
    The standard error is the delete-a-group jackknife over ``groups`` groups (draw i in
    group i mod G).

    Args:
        grads: an (n, P) tensor, or an iterable of n tensors with P entries each; n >= 3.
        groups: G, the number of jackknife groups (at most n are used), >= 2.

    Returns:
        ``Estimate(snr, jackknife stderr, n)``.

    Raises:
        ValueError: fewer than 3 draws, mismatched sizes, non-finite entries, or zero variance.
    """
    groups = check_positive_int(groups, "groups", minimum=2)
    acc = _SNRAccumulator(groups)
    size = None
    for i, g in enumerate(grads):
        if not isinstance(g, Tensor) or not g.is_floating_point():
            raise ValueError(f"grads[{i}] must be a floating tensor; got {type(g).__name__}")
        if size is not None and g.numel() != size:
            raise ValueError(f"grads[{i}] has {g.numel()} entries but grads[0] has {size}")
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"grads[{i}] contains NaN or inf")
        size = g.numel()
        acc.add(g)
    return acc.estimate()


def gradient_snr(
    objective: str,
    model: nn.Module,
    sample: Sampler,
    sigma: float,
    *,
    batch_size: int,
    n_draws: int,
    generator: torch.Generator | None,
    groups: int = 20,
    dsm_target: str = "plain",
    **loss_options,
) -> Estimate:
    """Gradient signal-to-noise ratio |E g|^2 / tr Cov g at ``model`` (SPEC section 7).

    g = grad_theta (1/B) sum_i loss_i, the gradient of one training step's batch-mean loss
    with respect to the model's trainable parameters theta (P entries), over fresh data
    batches and the loss's own randomness. An SNR below 1 means one step's gradient is
    mostly noise. Estimated by :func:`gradient_snr_from_samples` (bias-corrected signal,
    jackknife standard error); the gradients are streamed, memory O(groups * P).

    Args:
        objective: ``"flux"`` (:func:`fluxbench.objectives.flux_matching_loss`) or ``"dsm"``
            (:func:`fluxbench.objectives.dsm_loss`).
        model: the network; a sigma-conditioned model is used as ``at_sigma(model, sigma)``.
        sample: ``sample(n, generator=generator) -> (n, d)`` data on the model's device.
        sigma: the noise level (standard deviation), > 0.
        batch_size: B >= 1.
        n_draws: number of gradient draws n >= 3.
        generator: source of every random draw (data, noise, time, probes).
        groups: jackknife groups.
        dsm_target: ``"plain"`` or ``"batch"`` (DSM only).
        **loss_options: passed to the loss (e.g. ``horizon``, ``substeps``, ``divergence``).

    Returns:
        ``Estimate(snr, stderr, n_draws)``.

    Raises:
        ValueError: unknown objective, no trainable parameters, bad sizes or sigma.
    """
    if objective not in ("flux", "dsm"):
        raise ValueError(f"objective must be 'flux' or 'dsm'; got {objective!r}")
    if not callable(sample):
        raise ValueError(f"sample must be callable sample(n, generator=); got {type(sample).__name__}")
    sigma = float(check_sigma(sigma))
    batch_size = check_positive_int(batch_size, "batch_size")
    n_draws = check_positive_int(n_draws, "n_draws", minimum=3)
    groups = check_positive_int(groups, "groups", minimum=2)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    if objective == "dsm" and loss_options:
        raise ValueError(f"options {sorted(loss_options)} apply to the flux loss only")
    field = at_sigma(model, sigma)
    acc = _SNRAccumulator(min(groups, n_draws))
    for _ in range(n_draws):
        x = sample(batch_size, generator=generator)
        check_generator(generator, x.device)
        if objective == "flux":
            loss = flux_matching_loss(field, x, sigma, generator=generator, **loss_options).mean()
        else:
            loss = dsm_loss(field, x, sigma, target=dsm_target, generator=generator).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1) for p, g in zip(params, grads)])
        acc.add(flat)
    return acc.estimate()


# ------------------------------------------------------------------ finite-batch c*
def _quadratic_fit(c_grid: Sequence[float], losses: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares a, b (and e) of L(c) = a c^2 + b c + e per row of ``losses`` (n, m)."""
    c = torch.tensor(c_grid, dtype=torch.float64)
    design = torch.stack([c * c, c, torch.ones_like(c)], 1)  # (m, 3)
    coef = torch.linalg.lstsq(design, losses.T.to(torch.float64)).solution  # (3, n)
    return coef[0], coef[1]


def finite_batch_bias(
    target,
    sigma: float,
    batch_size: int,
    *,
    n_batches: int,
    generator: torch.Generator,
    c_grid: Sequence[float] | None = None,
    horizon: float = 4.0,
    substeps: int = 4,
    divergence: str = "hutchinson",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Estimate:
    """c* = argmin_c E[L(c)], L(c) the batch-mean flux loss of f = c s (SPEC section 7).

    s = grad log p_sigma is the exact smoothed score of ``target`` (``target.smoothed(sigma)``).
    Per batch x (B, d) ~ p and per draw of the loss's random numbers, r_hat and hence g and
    g_hat are affine in f, and the loss -2 (f - s_hat) . g_hat is bilinear, so L(c) is
    exactly a quadratic a c^2 + b c + e. It is evaluated at every c in ``c_grid`` with
    common random numbers (the generator's state restored before each evaluation), a and b
    fitted per batch, and

        c* = -mean(b) / (2 mean(a)),
        SE(c*) = sd_j(b_j + 2 c* a_j) / (2 |mean(a)| sqrt(n))   (delta method over batches).

    c* = 1 would mean the loss is unbiased for the score family; the SPEC measures 1.38 on
    the triangle at sigma 0.1, B 256. For B = 1 and a Gaussian target N(0, tau^2 I) the
    exact value is c* = (1 - e^{-2H})(tau^2 + sigma^2) / ((1 - e^{-2H}) sigma^2 + (1 - e^{-H}) tau^2)
    (from the closed form of SPEC section 2, uniform t on [0, H]).

    Args:
        target: a :class:`fluxbench.targets.Target` (data are exact samples of it).
        sigma: the noise level, > 0.
        batch_size: B >= 1.
        n_batches: n >= 2 batches.
        generator: a ``torch.Generator`` on ``device`` (required: common random numbers
            restore its state).
        c_grid: at least 3 distinct finite values of c (default (0, 1, 2)).
        horizon, substeps, divergence: options of the flux loss.
        device: where data and loss live (default the target's device).
        dtype: data dtype (float64 default: a and b are differences of losses ~1e4).

    Returns:
        ``Estimate(c*, stderr, n_batches)``.

    Raises:
        ValueError: bad arguments, or mean(a) <= 0 (the fitted expected loss is not
            convex in c: too few batches).
    """
    if not hasattr(target, "smoothed") or not hasattr(target, "sample"):
        raise ValueError(f"target must be a fluxbench Target; got {type(target).__name__}")
    sigma = float(check_sigma(sigma))
    batch_size = check_positive_int(batch_size, "batch_size")
    n_batches = check_positive_int(n_batches, "n_batches", minimum=2)
    if not isinstance(generator, torch.Generator):
        raise ValueError("finite_batch_bias needs a torch.Generator (common random numbers restore its state)")
    grid = (0.0, 1.0, 2.0) if c_grid is None else tuple(float(v) for v in c_grid)
    if len(set(grid)) < 3 or not all(math.isfinite(v) for v in grid):
        raise ValueError(f"c_grid needs at least 3 distinct finite values; got {c_grid!r}")
    device = target.device if device is None else torch.device(device)
    check_generator(generator, device)
    score = target.smoothed(sigma).score
    fields = [(lambda x, c=c: c * score(x)) for c in grid]
    opts = dict(horizon=horizon, substeps=substeps, divergence=divergence)
    losses = torch.empty(n_batches, len(grid), dtype=torch.float64)
    with torch.no_grad():
        for j in range(n_batches):
            x = target.sample(batch_size, generator=generator, device=device, dtype=dtype)
            state = generator.get_state()
            for k, f in enumerate(fields):
                generator.set_state(state)
                losses[j, k] = float(flux_matching_loss(f, x, sigma, generator=generator, **opts).mean())
    a, b = _quadratic_fit(grid, losses)
    a_mean = float(a.mean())
    if not a_mean > 0:
        raise ValueError(f"mean quadratic coefficient {a_mean:.3g} <= 0: the loss is not convex in c (more batches)")
    c_star = -float(b.mean()) / (2 * a_mean)
    resid = b + 2 * c_star * a
    se = float(resid.std()) / (2 * a_mean * math.sqrt(n_batches))
    return Estimate(c_star, se, n_batches)


# ------------------------------------------------------------------ loss mass by t
def _band_key(lo: float, hi: float) -> str:
    return f"mean_loss_t[{lo:g},{hi:g})"


def loss_mass_by_t(
    field: Callable[[Tensor], Tensor],
    sample: Sampler,
    sigma: float,
    *,
    batch_size: int,
    n_draws: int,
    generator: torch.Generator | None,
    split: float = 0.5,
    bands: Sequence[float] = (0.0, 0.1, 0.5, 1.0, 2.0, 4.0),
    **loss_options,
) -> dict[str, Estimate]:
    """Where the flux loss's mass lies in the reference time t (SPEC section 7).

    Each draw is one batch-mean loss L = (1/B) sum_i loss_i with its sampled t (one t per
    batch, uniform on [0, H] unless a proposal is passed in ``loss_options``). Returns

    * ``"frac_draws_t<{split}"``: P(t < split) (binomial SE; 0.125 for split 0.5, H 4);
    * ``"frac_abs_loss_t<{split}"``: sum_{t<split} |L| / sum |L| (ratio estimator, delta-method
      SE over draws);
    * ``"mean_loss_t[lo,hi)"`` for consecutive edges of ``bands``: the mean of L over the
      draws with t in [lo, hi) (SE = sd / sqrt(count), n = count; value and stderr NaN when
      a band holds fewer than 2 draws, n tells).

    Args:
        field: the field f, (B, d) -> (B, d) (never differentiated here).
        sample: ``sample(n, generator=generator) -> (n, d)`` data.
        sigma: the noise level, > 0.
        batch_size: B >= 1.
        n_draws: number of batches, >= 2.
        generator: source of every random draw.
        split: the t threshold, > 0.
        bands: increasing band edges, >= 0, at least 2.
        **loss_options: passed to :func:`fluxbench.objectives.flux_matching_loss`.

    Returns:
        A dict of :class:`Estimate` keyed as above.
    """
    if not callable(field) or not callable(sample):
        raise ValueError("field and sample must be callable")
    sigma = float(check_sigma(sigma))
    batch_size = check_positive_int(batch_size, "batch_size")
    n_draws = check_positive_int(n_draws, "n_draws", minimum=2)
    split = check_positive(split, "split")
    edges = [float(e) for e in bands]
    if len(edges) < 2 or any(not math.isfinite(e) or e < 0 for e in edges) or any(
        b <= a for a, b in zip(edges[:-1], edges[1:])
    ):
        raise ValueError(f"bands must be at least 2 increasing finite edges >= 0; got {bands!r}")
    ts, ls = [], []
    with torch.no_grad():
        for _ in range(n_draws):
            x = sample(batch_size, generator=generator)
            check_generator(generator, x.device)
            loss, info = flux_matching_loss(field, x, sigma, generator=generator, return_info=True, **loss_options)
            ts.append(info.t)
            ls.append(float(loss.mean()))
    t = torch.tensor(ts, dtype=torch.float64)
    loss = torch.tensor(ls, dtype=torch.float64)
    n = n_draws
    below = (t < split).to(torch.float64)
    p = float(below.mean())
    out = {f"frac_draws_t<{split:g}": Estimate(p, math.sqrt(p * (1 - p) / n), n)}
    mag = loss.abs()
    mag_mean = float(mag.mean())
    if not mag_mean > 0:
        raise ValueError("every batch loss is 0: the loss mass is undefined")
    ratio = float((mag * below).mean()) / mag_mean
    resid = (mag * below - ratio * mag) / mag_mean
    out[f"frac_abs_loss_t<{split:g}"] = Estimate(ratio, float(resid.std()) / math.sqrt(n), n)
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = loss[(t >= lo) & (t < hi)]
        k = int(sel.numel())
        if k < 2:
            out[_band_key(lo, hi)] = Estimate(float("nan"), float("nan"), k)
        else:
            out[_band_key(lo, hi)] = Estimate(float(sel.mean()), float(sel.std()) / math.sqrt(k), k)
    return out
