"""Scores of a point cloud against a target, each beside its noise floor (SPEC section 5).

Every sampling and rollout run scores its particles with the same functions, so that the
records of all suites mean the same thing:

* ``w2`` -- exact W2 (POT) of at most ``w2_max`` points against as many reference points;
* ``sliced_w2`` -- sliced W2 (POT, 256 directions);
* ``mmd`` -- the unbiased MMD^2 (median-heuristic RBF) with its permutation p-value;
* ``gauss_w2`` -- the closed-form W2 between the cloud's fitted Gaussian (sample mean and
  covariance) and the exact mean and covariance of the target (SPEC section 4);

each with the noise floor: the same metric between an independent exact sample of the same
size and the same reference sample, averaged over the floor samples given (SPEC section 5). ``stationarity`` is :func:`fluxbench.verify.stationarity_test`
(``method="combined"``) of the field on reference samples.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from fluxbench.metrics import gaussian_w2, mmd2_unbiased, mmd_permutation_test, sliced_w2, w2
from fluxbench.samplers.rollout import Rollout, langevin_rollout
from fluxbench.verify import stationarity_test

__all__ = ["CloudScorer", "stationarity_rows", "field_rel_l2", "rotation_coef", "safe_rollout", "is_divergence"]

CLOUD_METRICS = ("w2", "sliced_w2", "mmd", "gauss_w2")


def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.detach().to(torch.float64).cpu()
    m = x.mean(0)
    c = x - m
    return m, c.T @ c / max(x.shape[0] - 1, 1)


class CloudScorer:
    """Scores clouds against one reference sample; the floors are computed once.

    Args:
        reference: (n, d) samples of the target (the law the cloud should follow).
        floor_samples: one or more (n, d) exact samples of the same law, independent of the
            reference; each metric's floor is its mean over them against the reference.
        metrics: names from ``("w2", "sliced_w2", "mmd", "gauss_w2")``.
        mean, covariance: the target's exact moments (for ``gauss_w2``).
        n_permutations: permutations of the MMD test.
        w2_max: at most this many points enter the exact W2 (the first ones).
        seed: seed of the MMD permutations and of the sliced directions.
    """

    def __init__(
        self,
        reference: Tensor,
        floor_samples: Tensor | list[Tensor],
        metrics: tuple[str, ...] | list[str],
        *,
        mean: Tensor | None = None,
        covariance: Tensor | None = None,
        n_permutations: int = 200,
        w2_max: int = 2000,
        seed: int = 0,
    ):
        unknown = [m for m in metrics if m not in CLOUD_METRICS]
        if unknown:
            raise ValueError(f"unknown cloud metrics {unknown}; known: {', '.join(CLOUD_METRICS)}")
        if "gauss_w2" in metrics and (mean is None or covariance is None):
            raise ValueError("gauss_w2 needs the target's mean and covariance")
        self.reference = reference
        self.metrics = tuple(metrics)
        self.mean = None if mean is None else mean.detach().to(torch.float64).cpu()
        self.cov = None if covariance is None else covariance.detach().to(torch.float64).cpu()
        self.n_permutations = n_permutations
        self.w2_max = w2_max
        self.seed = seed
        if isinstance(floor_samples, Tensor):
            floor_samples = [floor_samples]
        scores = [self._score(y, with_p=False) for y in floor_samples]
        k = len(scores)
        self.floors = {m: sum(sc[i][1] for sc in scores) / k for i, m in enumerate(self.metrics)}
        self.floor_sd = {
            m: math.sqrt(sum((sc[i][1] - self.floors[m]) ** 2 for sc in scores) / (k - 1)) if k > 1 else math.nan
            for i, m in enumerate(self.metrics)
        }

    def _score(self, x: Tensor, with_p: bool = True) -> list[tuple[str, float, float]]:
        out = []
        ref = self.reference
        for m in self.metrics:
            p = math.nan
            if m == "w2":
                k = min(self.w2_max, x.shape[0], ref.shape[0])
                v = w2(x[:k], ref[:k])
            elif m == "sliced_w2":
                v = sliced_w2(x, ref, seed=self.seed)
            elif m == "mmd" and not with_p:
                v = mmd2_unbiased(x, ref)
            elif m == "mmd":
                g = torch.Generator(device=x.device).manual_seed(self.seed)
                res = mmd_permutation_test(x, ref, n_permutations=self.n_permutations, generator=g)
                v, p = float(res.statistic), float(res.p_value)
            else:
                mx, cx = _moments(x)
                v = float(gaussian_w2(mx, cx, self.mean, self.cov))
            out.append((m, float(v), p))
        return out

    def rows(self, x: Tensor, step: int) -> list[dict[str, Any]]:
        """One row per metric for the cloud ``x`` (n, d) at rollout step ``step``."""
        if not bool(torch.isfinite(x).all()):
            return [dict(step=step, metric=m, value=math.inf, noise_floor=self.floors[m]) for m in self.metrics]
        return [
            dict(step=step, metric=m, value=v, noise_floor=self.floors[m], p_value=p) for m, v, p in self._score(x)
        ]


def is_divergence(exc: BaseException) -> bool:
    """Whether ``exc`` is a sampler's or field's report of NaN / inf (a diverged chain)."""
    msg = str(exc)
    return isinstance(exc, ValueError) and ("non-finite" in msg or "NaN" in msg or " inf" in msg)


def safe_rollout(field, x0: Tensor, *, step_size: float, checkpoints: list[int], generator: torch.Generator,
                 trace=None, thin: int = 1) -> tuple[Rollout, int | None]:
    """:func:`langevin_rollout`, but a chain that becomes non-finite is a result, not an error.

    Returns ``(rollout, diverged_at)``: on divergence the rollout is rerun checkpoint by
    checkpoint from the same generator state (the same random stream), the states from the
    first non-finite checkpoint on are filled with inf, the trace is None, and
    ``diverged_at`` is that checkpoint (else None).
    """
    state = generator.get_state()
    try:
        if not bool(torch.isfinite(x0).all()):
            raise ValueError("the starting points are non-finite")
        return langevin_rollout(field, x0, step_size=step_size, checkpoints=checkpoints, generator=generator,
                                trace=trace, thin=thin), None
    except ValueError as exc:
        if not is_divergence(exc):
            raise
    generator.set_state(state)
    steps, states, seconds, x, prev, diverged = [], [], 0.0, x0, 0, None
    for c in sorted(set(checkpoints)):
        if diverged is None:
            try:
                if not bool(torch.isfinite(x).all()):
                    raise ValueError("non-finite state")
                if c > prev:
                    r = langevin_rollout(field, x, step_size=step_size, checkpoints=[c - prev], generator=generator)
                    x, seconds = r.states[-1], seconds + r.seconds
            except ValueError as exc:
                if not is_divergence(exc):
                    raise
                diverged = c
        steps.append(c)
        states.append(x.clone() if diverged is None else torch.full_like(x0, math.inf))
        prev = c
    rate = x0.shape[0] * max(steps) / seconds if seconds > 0 else 0.0
    return Rollout(steps, states, seconds, rate), diverged


def stationarity_rows(field: Callable[[Tensor], Tensor], samples: Tensor, *, seed: int, step: int = 0,
                      n_bootstrap: int | None = None) -> list[dict[str, Any]]:
    """The combined stationarity test of ``field`` on ``samples`` as records.

    Rows: ``stationarity`` (value and p_value: the Bonferroni-combined p-value),
    ``stationarity_ksd`` and ``stationarity_rollout`` (their sub-test p-values, for the
    evidence), ``stationarity_w2`` (the rollout's W2 of chain ends to held-out samples, beside
    its noise floor). A field whose values or test rollout become non-finite on the samples
    is recorded with p = 0 (its chains leave every bounded set: not stationary) and the
    metric ``stationarity_diverged`` = 1. ``n_bootstrap`` (both sub-tests; default theirs,
    1000) bounds the smallest p-value, 2 / (n_bootstrap + 1): with m p-value claims in a
    Holm family a rejection needs m * p < alpha.
    """
    opts = {} if n_bootstrap is None else {"n_bootstrap": int(n_bootstrap)}
    try:
        rep = stationarity_test(field, samples, method="combined", alpha=0.01, seed=seed, **opts)
    except ValueError as exc:
        if not is_divergence(exc):
            raise
        return [dict(step=step, metric="stationarity", value=0.0, p_value=0.0),
                dict(step=step, metric="stationarity_diverged", value=1.0)]
    rows = [dict(step=step, metric="stationarity", value=rep.p_value, p_value=rep.p_value)]
    for name, sub in (rep.sub_reports or {}).items():
        rows.append(dict(step=step, metric=f"stationarity_{name}", value=sub.p_value, p_value=sub.p_value))
    if rep.w2 is not None:
        rows.append(
            dict(step=step, metric="stationarity_w2", value=rep.w2,
                 noise_floor=math.nan if rep.w2_noise_floor is None else rep.w2_noise_floor)
        )
    return rows


def field_rel_l2(field: Callable[[Tensor], Tensor], score: Callable[[Tensor], Tensor], x: Tensor) -> float:
    """sqrt(E|f - s|^2 / E|s|^2) over the points x (N, d): the field's relative L2 error to the score s."""
    with torch.no_grad():
        f, s = field(x).to(torch.float64), score(x).to(torch.float64)
        return float(((f - s).square().sum() / s.square().sum()).sqrt())


def rotation_coef(field: Callable[[Tensor], Tensor], score: Callable[[Tensor], Tensor], A: Tensor, x: Tensor) -> float:
    """E[(f - s) . A s] / E|A s|^2 over x (N, d): how much of the prescribed rotation A s the field carries.

    1 for f = (I + A) s, 0 for f = s (SPEC eq. (4)).
    """
    with torch.no_grad():
        f, s = field(x).to(torch.float64), score(x).to(torch.float64)
        As = s @ A.to(device=s.device, dtype=torch.float64).T
        return float(((f - s) * As).sum() / As.square().sum())

