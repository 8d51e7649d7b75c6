"""Long-rollout runs: chains from the data and from a far start (suite long-rollout).

One run = one (target, field, model, seed, start). Fields, all at sigma_eval:
``"exact"`` (the analytic score s of p_{sigma_eval}), ``"rotational"`` (f = (I + A) s with the
suite's ``rotation`` a, A = a J: stationary by SPEC eq. (4); for linear drifts it mixes at
least as fast, SPEC section 4), ``"flux"`` / ``"dsm"`` (a network fitted by
:func:`fluxbench.recipes.fit`; a fitted model is reused by the runs of its other start in
the same process).

Starts: ``data`` -- N fresh samples of p_{sigma_eval} (the chain should stay put);
``far`` -- all N particles at m + far_std sqrt(lambda_max) v_max, far_std standard
deviations along the covariance's top eigenvector (the chain must travel to the target).
Scored at log-spaced checkpoints (W2, sliced W2, MMD^2 with p-value, each beside its noise
floor, on the first ``n_eval`` particles); metrics of the far start are suffixed ``@far``.
Data start also: integrated autocorrelation times ``iat:x0``, ``iat:x1``, ``iat:r2`` (the
first two coordinates and |x - m|^2 of ``trace_chains`` chains, in Langevin steps, with
Sokal's standard error) and their maximum ``iat_max``. Far start also: ``steps_to_floor@far``,
the first checkpoint from which W2 stays within the noise floor's band
(:func:`fluxbench.metrics.autocorr.time_to_floor`; inf if never), the band being
``floor_band`` standard deviations of W2 over the ``floor_repeats`` exact samples. Both: particle-steps per
second of the batched rollout.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fluxbench.fields import RotationalField
from fluxbench.metrics.autocorr import integrated_autocorrelation_time, time_to_floor
from .measure_sampling import _break, checkpoints, fit_run
from .perturb import rotation_matrix
from .runner import RunContext
from .scoring import CloudScorer, safe_rollout

__all__ = ["measure_rollout", "far_start"]

_FIT_CACHE: dict[tuple, Any] = {}


def far_start(target, n: int, far_std: float, *, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """(n, d): every row m + far_std sqrt(lambda_max) v_max (top eigenpair of the covariance)."""
    cov = target.covariance.to(torch.float64).cpu()
    evals, evecs = torch.linalg.eigh(cov)
    point = target.mean.to(torch.float64).cpu() + far_std * evals[-1].clamp_min(0).sqrt() * evecs[:, -1]
    return point.to(device=device, dtype=dtype).expand(n, -1).clone()


def _field(ctx: RunContext, p_s, target):
    run, dim = ctx.run, p_s.dim
    if run.objective == "exact":
        return _break(ctx, p_s.score, None, ctx.sigma_eval, dim)
    if run.objective == "rotational":
        a = float(ctx.config.get("rotation", 1.0))
        model = RotationalField(p_s.score, rotation_matrix(dim, a, device=ctx.device))
        return _break(ctx, model, model, ctx.sigma_eval, dim)
    key = (ctx.suite.name, ctx.suite.suite_hash, run.tier, run.target.name, run.objective, run.model, run.seed, str(ctx.device))
    fitted = _FIT_CACHE.get(key)
    if fitted is None:

        def data(k: int, generator: torch.Generator | None = None) -> Tensor:
            return target.sample(k, generator=generator, device=ctx.device)

        fitted = fit_run(ctx, run.objective, dim, data)
        _FIT_CACHE.clear()  # keep one model: the next run is usually its other start
        _FIT_CACHE[key] = fitted
        ctx.log(f"    {run.key}: {run.objective} {fitted.steps} steps in {fitted.train_seconds:.1f} s")
    return _break(ctx, fitted.field(ctx.sigma_eval), fitted.model, ctx.sigma_eval, dim)


def measure_rollout(ctx: RunContext) -> list[dict[str, Any]]:
    """The rows of one long-rollout run (see the module docstring)."""
    run, b = ctx.run, ctx.budget
    start = run.extra("start")
    target = run.target.build()
    p_s = target.smoothed(ctx.sigma_eval)
    n, n_eval = int(b["particles"]), int(b["n_eval"])
    gen = ctx.generator("reference")
    reference = p_s.sample(n_eval, generator=gen, device=ctx.device)
    floor_samples = [p_s.sample(n_eval, generator=gen, device=ctx.device) for _ in range(int(b["floor_repeats"]))]
    metrics = [m for m in ("w2", "sliced_w2", "mmd") if m in ctx.config.get("metrics", ["w2"])] or ["w2"]
    if "w2" not in metrics:
        metrics.insert(0, "w2")
    scorer = CloudScorer(reference, floor_samples, metrics, n_permutations=int(b["n_permutations"]), seed=run.seed)
    field = _field(ctx, p_s, target)
    if start == "far":
        x0 = far_start(p_s, n, float(b["far_std"]), device=ctx.device)
    else:
        x0 = p_s.sample(n, generator=ctx.generator("start"), device=ctx.device)
    mean = p_s.mean.to(device=ctx.device, dtype=x0.dtype)
    chains = min(n, int(b["trace_chains"]))

    def observe(x: Tensor) -> Tensor:
        y = x[:chains]
        return torch.cat([y[:, :2], (y - mean).square().sum(1, keepdim=True)], 1)

    thin = int(b["trace_every"])
    roll, diverged = safe_rollout(field, x0, step_size=ctx.step_size(), checkpoints=checkpoints(b),
                                  generator=ctx.generator(f"rollout-{start}"),
                                  trace=observe if start == "data" else None, thin=thin)
    suffix = "" if start == "data" else f"@{start}"
    rows: list[dict[str, Any]] = []
    w2_steps, w2_vals = [], []
    for step, state in zip(roll.steps, roll.states):
        for r in scorer.rows(state[:n_eval], step):
            if r["metric"] == "w2":
                w2_steps.append(step)
                w2_vals.append(r["value"])
            r["metric"] += suffix
            rows.append(r)
    rows.append(dict(metric=f"particle_steps_per_s{suffix}", value=roll.particle_steps_per_s, step=roll.steps[-1]))
    rows.append(dict(metric="step_size", value=ctx.step_size()))
    if diverged is not None:
        rows.append(dict(metric=f"diverged_at{suffix}", value=diverged))
    if start == "far":
        floor, sd = scorer.floors["w2"], scorer.floor_sd["w2"]
        band = float(b["floor_band"]) * (sd if math.isfinite(sd) else floor)
        finite = all(math.isfinite(v) for v in w2_vals)
        t = time_to_floor(w2_steps, w2_vals, floor, band=band) if finite else None
        rows.append(dict(metric="steps_to_floor@far", value=math.inf if t is None else t, noise_floor=floor,
                         step=roll.steps[-1]))
    elif diverged is not None or (roll.trace is not None and not bool(torch.isfinite(roll.trace).all())):
        # chains that left for infinity (or overflowed the float32 observables) never decorrelate
        rows += [dict(metric=m, value=math.inf, step=roll.steps[-1]) for m in ("iat:x0", "iat:x1", "iat:r2", "iat_max")]
    elif roll.trace is not None:
        tau, se = integrated_autocorrelation_time(roll.trace.to(torch.float64), return_stderr=True)
        names = ["iat:x0", "iat:x1", "iat:r2"][: tau.numel()]
        for name, t, s in zip(names, tau.tolist(), se.tolist()):
            rows.append(dict(metric=name, value=t * thin, stderr=s * thin, step=roll.steps[-1]))
        k = int(torch.argmax(tau))
        rows.append(dict(metric="iat_max", value=float(tau[k]) * thin, stderr=float(se[k]) * thin, step=roll.steps[-1]))
    return rows
