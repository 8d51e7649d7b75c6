"""Mixing diagnostics of long chains: integrated autocorrelation time, time to the noise floor.

* :func:`integrated_autocorrelation_time` -- tau = 1 + 2 sum_{t >= 1} rho(t) of scalar
  observables of N parallel chains, with Sokal's automatic window (SPEC section 6's
  "mixing speed (inverse integrated autocorrelation time)").
* :func:`time_to_floor` -- the first rollout checkpoint from which a metric stays within
  its noise floor (plus a band).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

from .._checks import check_positive

__all__ = ["integrated_autocorrelation_time", "time_to_floor"]


def _autocorrelation(x: Tensor) -> Tensor:
    """Chain-averaged normalised autocorrelation rho(t), t = 0..T-1, of x (T, N, k) -> (T, k).

    Centred at the pooled mean over time and chains (all chains are taken to sample one
    stationary law); the autocovariance of each chain is the biased (divide-by-T) FFT
    estimate gamma(t) = (1/T) sum_s x_s x_{s+t}, zero-padded to a power of two >= 2T.
    """
    t_len = x.shape[0]
    xc = x - x.mean(dim=(0, 1), keepdim=True)
    n_fft = 1 << (2 * t_len - 1).bit_length()
    spec = torch.fft.rfft(xc, n=n_fft, dim=0)
    acov = torch.fft.irfft(spec * spec.conj(), n=n_fft, dim=0)[:t_len] / t_len  # (T, N, k)
    acov = acov.mean(dim=1)  # (T, k)
    return acov / acov[:1]


def integrated_autocorrelation_time(
    trace: Tensor, *, c: float = 5.0, return_stderr: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Integrated autocorrelation time of each observable, Sokal's automatic window.

        tau = 1 + 2 sum_{t=1}^{M} rho(t),   M = the smallest window with M >= c max(tau(M), 1),

    with rho the autocorrelation averaged over the N chains (FFT, ``torch.fft``). tau is
    the factor by which a chain's variance of the mean exceeds that of independent draws
    (for an AR(1) process with coefficient r, tau = (1 + r) / (1 - r)); time in trace rows.
    Standard error (Sokal 1997, Madras-Sokal): SE(tau) ~= tau sqrt(2 (2M + 1) / (N T)).
    The floor of 1 in the window rule keeps M >= c for antithetic chains (rho(1) < 0, tau < 1),
    where Sokal's rule would stop at M = 1; their estimate is truncated at lag ~c (for an
    AR(1) with r = -0.5 and c = 5 it estimates 1 + 2 sum_{t<=5} r^t = 0.3125 for 1/3).

    The chains should be stationary (discard burn-in first): the pooled mean is used. When
    no window M < T satisfies M >= c tau(M) the chain is too short for a reliable estimate:
    a ``RuntimeWarning`` is issued and the estimate at M = T - 1 returned.

    Args:
        trace: (T, N) or (T, N, k) values of k scalar observables along N chains, T >= 4.
        c: the window constant (5 is Sokal's; larger for slowly decaying rho), > 0.
        return_stderr: also return the standard errors.

    Returns:
        tau, shape () for a (T, N) trace or (k,), float64 on the trace's device; with
        ``return_stderr`` a pair (tau, stderr).

    Raises:
        ValueError: wrong shape, T < 4, non-finite values, or an observable constant over
            all chains and times (tau undefined).
    """
    if not isinstance(trace, Tensor) or trace.ndim not in (2, 3) or not trace.is_floating_point():
        got = tuple(trace.shape) if isinstance(trace, Tensor) else type(trace).__name__
        raise ValueError(f"trace must be a floating (T, N) or (T, N, k) tensor; got {got}")
    c = check_positive(c, "c")
    squeeze = trace.ndim == 2
    x = trace.detach().to(torch.float64)
    if squeeze:
        x = x.unsqueeze(-1)
    t_len, n_chains, k = x.shape
    if t_len < 4 or n_chains < 1 or k < 1:
        raise ValueError(f"trace needs T >= 4 steps, N >= 1 chains and k >= 1 observables; got shape {tuple(trace.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("trace contains NaN or inf")
    const = (x.amax(dim=(0, 1)) == x.amin(dim=(0, 1))).nonzero().flatten().tolist()
    if const:
        raise ValueError(f"observable(s) {const} are constant over all chains and times: tau is undefined")
    rho = _autocorrelation(x)  # (T, k)
    taus = 2 * torch.cumsum(rho, dim=0) - 1  # taus[M] = 1 + 2 sum_{t=1}^M rho(t)
    lags = torch.arange(t_len, device=x.device, dtype=x.dtype).unsqueeze(1)
    ok = lags >= c * taus.clamp_min(1.0)
    ok[0] = False
    found = ok.any(dim=0)
    window = torch.where(found, ok.to(torch.int8).argmax(dim=0), torch.full_like(found, t_len - 1, dtype=torch.long))
    if not bool(found.all()):
        bad = (~found).nonzero().flatten().tolist()
        warnings.warn(
            f"integrated_autocorrelation_time: the trace (T = {t_len}) is too short for Sokal's window "
            f"(c = {c:g}) for observable(s) {bad}; the estimate at M = T - 1 is unreliable: run longer chains",
            RuntimeWarning,
            stacklevel=2,
        )
    tau = taus.gather(0, window.unsqueeze(0)).squeeze(0)
    se = tau * torch.sqrt(2 * (2 * window.to(x.dtype) + 1) / (n_chains * t_len))
    if squeeze:
        tau, se = tau[0], se[0]
    return (tau, se) if return_stderr else tau


def time_to_floor(steps: Sequence[int], values: Sequence[float], floor: float, band: float = 0.0) -> int | None:
    """The first checkpoint from which a metric stays at or below ``floor + band``.

    For a metric that decays to its noise floor along a rollout (W2 or MMD^2 against the
    target, scored at checkpoints): the smallest ``steps[i]`` with values[j] <= floor + band
    for every j >= i, or None when the last value is still above.

    Args:
        steps: strictly increasing checkpoint steps, at least one.
        values: the metric at each step (same length), finite.
        floor: the noise floor (finite).
        band: tolerance above the floor, >= 0 (e.g. two standard errors of the floor).

    Returns:
        A step from ``steps``, or None.

    Raises:
        ValueError: mismatched lengths, unsorted steps, or non-finite numbers.
    """
    steps = [int(s) for s in steps]
    vals = [float(v) for v in values]
    if not steps or len(steps) != len(vals):
        raise ValueError(f"steps and values must be non-empty and of equal length; got {len(steps)} and {len(vals)}")
    if any(b <= a for a, b in zip(steps[:-1], steps[1:])):
        raise ValueError(f"steps must be strictly increasing; got {steps}")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"values must be finite; got {vals}")
    if isinstance(floor, bool) or not isinstance(floor, Real) or not math.isfinite(float(floor)):
        raise ValueError(f"floor must be a finite number; got {floor!r}")
    band = check_positive(band, "band", allow_zero=True)
    limit = float(floor) + band
    first = None
    for s, v in zip(reversed(steps), reversed(vals)):
        if v > limit:
            break
        first = s
    return first
