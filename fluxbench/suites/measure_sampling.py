"""Sampling runs: fit, sample, roll out, score (suites gmm2d, gaussian-nd, rotational).

One run = one (target, objective, model, seed):

1. the field: ``"exact"`` is the target's analytic smoothed score at sigma_eval (times
   (I + A) for a rotational model; no training); ``"flux"`` / ``"dsm"`` are fitted with
   :func:`fluxbench.recipes.fit` at the tier's budget (``steps``), the network a
   sigma-conditioned MLP or a :class:`~fluxbench.suites.perturb.RotationalModel`;
2. n samples: exact draws of p_{sigma_eval} for "exact", the recipe's annealed sampler
   (:meth:`Fitted.sample`) otherwise;
3. unadjusted Langevin from those samples with the field at sigma_eval
   (:func:`fluxbench.samplers.langevin_rollout`), scored at log-spaced checkpoints (step 0
   is the sampler's output) against reference samples of p_{sigma_eval}: W2, sliced W2,
   MMD^2 with its p-value, the fitted Gaussian's W2 where asked, each beside its noise floor;
4. the combined stationarity test of the field on reference samples; the field's relative
   L2 error to the exact score; for rotational models the coefficient of A s in f - s.

With ``equal_wallclock = true`` a flux run also trains DSM for flux's measured training
time (objective ``"dsm-wallclock"``; its step count is recorded as ``train_steps``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from fluxbench.samplers.rollout import log_spaced

from .perturb import RotationalModel, perturb_field, rotation_matrix, strip_rotation
from .runner import RunContext
from .scoring import CloudScorer, field_rel_l2, rotation_coef, safe_rollout, stationarity_rows

__all__ = ["measure_sampling", "make_recipe", "artifact_path", "fit_run", "checkpoints"]


def checkpoints(budget: dict[str, Any]) -> list[int]:
    """The tier's explicit ``checkpoints``, else ``log_spaced(rollout_steps, per_decade)``."""
    if "checkpoints" in budget:
        return sorted(set(int(c) for c in budget["checkpoints"]))
    return log_spaced(int(budget["rollout_steps"]), int(budget["per_decade"]))


def artifact_path(artifacts_dir: Path, suite: str, run_key: str) -> Path:
    """``artifacts_dir/<suite>/<artifact_name(run_key)>`` (:func:`fluxbench.suites.report.artifact_name`)."""
    from .report import artifact_name

    return Path(artifacts_dir) / suite / artifact_name(run_key)


def make_recipe(ctx: RunContext, steps: int | None = None):
    """The suite's :class:`fluxbench.recipes.AnnealedRecipe` at the tier's budget."""
    from fluxbench.recipes import AnnealedRecipe

    b = ctx.budget
    kw = dict(ctx.config.get("recipe", {}))
    kw.setdefault("sigma_min", ctx.sigma_eval)
    if not math.isclose(kw["sigma_min"], ctx.sigma_eval, rel_tol=1e-9):
        raise ValueError(
            f"{ctx.suite.path}: recipe.sigma_min = {kw['sigma_min']} differs from sigma_eval = {ctx.sigma_eval}: "
            "the annealed sampler ends at sigma_min, so the two must agree"
        )
    kw["steps"] = int(steps if steps is not None else b["steps"])
    kw["batch_size"] = int(b["batch_size"])
    kw["hidden"] = tuple(ctx.run.model.hidden)
    if "sample_levels" in b:
        kw["sample_levels"] = int(b["sample_levels"])
    return AnnealedRecipe(**kw)


def rotation_of(ctx: RunContext) -> float:
    """The rotation a of the run's rotational model: the target's ``rotation``, else the model's."""
    t = ctx.run.target.rotation
    return float(t) if t is not None else float(ctx.run.model.rotation)


def _network(ctx: RunContext, dim: int) -> torch.nn.Module | None:
    m = ctx.run.model
    if m.kind == "rotational":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.run.seed)
            return RotationalModel(dim, rotation_of(ctx), hidden=m.hidden).to(ctx.device)
    return None  # fit builds the recipe's sigma-conditioned MLP from the seed


def fit_run(ctx: RunContext, objective: str, dim: int, data: Callable, steps: int | None = None):
    """:func:`fluxbench.recipes.fit` of ``objective`` for this run (seeded by the run's seed)."""
    from fluxbench.recipes import fit

    return fit(objective, data, make_recipe(ctx, steps), seed=ctx.run.seed, device=ctx.device, model=_network(ctx, dim))


class _Built:
    """A field ready to score: the (possibly perturbed) field, its samples, training facts."""

    def __init__(self, field, samples, train_seconds=0.0, train_steps=0, model=None):
        self.field, self.samples = field, samples
        self.train_seconds, self.train_steps, self.model = train_seconds, train_steps, model


def _break(ctx: RunContext, field, model, sigma: float, dim: int):
    """Apply the run's perturbation to ``field`` (drop-rotation needs the model)."""
    p = ctx.perturbation
    if p is not None and p.kind == "drop-rotation":
        base = strip_rotation(model)
        if base is not None:
            from fluxbench.fields import at_sigma

            field = at_sigma(base, sigma) if isinstance(model, RotationalModel) else base
    return perturb_field(field, p, dim=dim)


def _exact(ctx: RunContext, p_s, dim: int, n: int) -> _Built:
    gen = ctx.generator("exact-samples")
    samples = p_s.sample(n, generator=gen, device=ctx.device)
    field, model = p_s.score, None
    if ctx.run.model.kind == "rotational":
        from fluxbench.fields import RotationalField

        model = RotationalField(p_s.score, rotation_matrix(dim, rotation_of(ctx), device=ctx.device))
        field = model
    return _Built(_break(ctx, field, model, ctx.sigma_eval, dim), samples)


def _fitted(ctx: RunContext, fitted, n: int, dim: int) -> _Built:
    if not math.isclose(fitted.sigma_eval, ctx.sigma_eval, rel_tol=1e-6):
        raise ValueError(f"fitted.sigma_eval = {fitted.sigma_eval} differs from the suite's sigma_eval = {ctx.sigma_eval}")
    samples = fitted.sample(n, generator=ctx.generator(f"sample-{fitted.method}"), device=ctx.device)
    field = _break(ctx, fitted.field(ctx.sigma_eval), fitted.model, ctx.sigma_eval, dim)
    return _Built(field, samples, fitted.train_seconds, fitted.steps, fitted.model)


def _score(ctx: RunContext, built: _Built, objective: str, scorer: CloudScorer, p_s, reference: Tensor) -> list[dict[str, Any]]:
    b = ctx.budget
    rows: list[dict[str, Any]] = [
        dict(metric="train_seconds", value=built.train_seconds),
        dict(metric="train_steps", value=built.train_steps),
    ]
    eps = ctx.step_size()
    roll, diverged = safe_rollout(built.field, built.samples, step_size=eps, checkpoints=checkpoints(b),
                                  generator=ctx.generator(f"rollout-{objective}"))
    for step, state in zip(roll.steps, roll.states):
        rows += scorer.rows(state, step)
    rows.append(dict(metric="particle_steps_per_s", value=roll.particle_steps_per_s, step=roll.steps[-1]))
    if diverged is not None:
        rows.append(dict(metric="diverged_at", value=diverged))
    rows.append(dict(metric="step_size", value=eps))
    metrics = ctx.config.get("metrics", [])
    x_test = reference[: int(b["stationarity_n"])]
    if "stationarity" in metrics:
        rows += stationarity_rows(built.field, x_test, seed=ctx.run.seed, n_bootstrap=b.get("stationarity_bootstrap"))
    if "field_rel_l2" in metrics:
        rows.append(dict(metric="field_rel_l2", value=field_rel_l2(built.field, p_s.score, x_test)))
    if "rotation_coef" in metrics and ctx.run.model.kind == "rotational":
        A = rotation_matrix(p_s.dim, rotation_of(ctx), device=ctx.device)
        rows.append(dict(metric="rotation_coef", value=rotation_coef(built.field, p_s.score, A, x_test)))
    for r in rows:
        r.setdefault("objective", objective)
        if objective != ctx.run.objective:  # rows of a second field in the same run (dsm-wallclock)
            r["run_suffix"] = f"/{objective}"
    _save_artifact(ctx, built, objective, reference, roll.states[-1])
    return rows


def _save_artifact(ctx: RunContext, built: _Built, objective: str, reference: Tensor, last: Tensor) -> None:
    g = int(ctx.budget.get("artifacts_grid", 0))
    if ctx.artifacts_dir is None or g <= 0 or reference.shape[1] != 2:
        return
    ref = reference.detach().cpu()
    lo, hi = ref.min(0).values, ref.max(0).values
    pad = 0.15 * (hi - lo)
    gx = torch.linspace(float(lo[0] - pad[0]), float(hi[0] + pad[0]), g)
    gy = torch.linspace(float(lo[1] - pad[1]), float(hi[1] + pad[1]), g)
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")  # (G, G): [row = y, column = x], as streamplot wants
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1).to(ctx.device, reference.dtype)
    with torch.no_grad():
        f = built.field(pts).detach().cpu().reshape(g, g, 2)
    if not bool(torch.isfinite(f).all()):
        ctx.log(f"    {ctx.run.key}: no field artifact for {objective} (non-finite field values on the grid)")
        return
    key = ctx.run.key if objective == ctx.run.objective else f"{ctx.run.key}/{objective}"
    if ctx.perturbation is not None:
        key = f"{key}/perturb={ctx.perturbation.label}"
    path = artifact_path(ctx.artifacts_dir, ctx.suite.name, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"grid_x": gx, "grid_y": gy, "field": f, "samples": built.samples.detach().cpu(),
                "rollout_end": last.detach().cpu(), "reference": ref, "run": key}, tmp)
    tmp.replace(path)


def measure_sampling(ctx: RunContext) -> list[dict[str, Any]]:
    """The rows of one sampling run (see the module docstring)."""
    run, b = ctx.run, ctx.budget
    target = run.target.build()
    p_s = target.smoothed(ctx.sigma_eval)
    dim = target.dim
    n = int(b["n_samples"])
    gen = ctx.generator("reference")
    reference = p_s.sample(max(n, int(b["stationarity_n"])), generator=gen, device=ctx.device)
    floor_samples = [p_s.sample(n, generator=gen, device=ctx.device) for _ in range(int(b["floor_repeats"]))]
    metrics = [m for m in ("w2", "sliced_w2", "mmd", "gauss_w2") if m in ctx.config.get("metrics", ["w2"])]
    scorer = CloudScorer(reference[:n], floor_samples, metrics, mean=p_s.mean, covariance=p_s.covariance,
                         n_permutations=int(b["n_permutations"]), w2_max=int(b["w2_max"]), seed=run.seed)
    if run.objective == "exact":
        ctx.log(f"    {run.key}: exact field, no training")
        return _score(ctx, _exact(ctx, p_s, dim, n), "exact", scorer, p_s, reference)

    def data(k: int, generator: torch.Generator | None = None) -> Tensor:
        return target.sample(k, generator=generator, device=ctx.device)

    fitted = fit_run(ctx, run.objective, dim, data)
    ctx.log(f"    {run.key}: {run.objective} {fitted.steps} steps in {fitted.train_seconds:.1f} s")
    rows = _score(ctx, _fitted(ctx, fitted, n, dim), run.objective, scorer, p_s, reference)
    if run.objective == "flux" and b.get("equal_wallclock"):
        calib_steps = max(2, min(200, int(b["steps"])))
        calib = fit_run(ctx, "dsm", dim, data, steps=calib_steps)
        per_step = calib.train_seconds / max(calib.steps, 1)
        steps = max(1, int(round(fitted.train_seconds / per_step)))
        dsm = fit_run(ctx, "dsm", dim, data, steps=steps)
        ctx.log(f"    {run.key}: dsm at flux's wall clock: {dsm.steps} steps in {dsm.train_seconds:.1f} s "
                f"(flux {fitted.train_seconds:.1f} s)")
        rows += _score(ctx, _fitted(ctx, dsm, n, dim), "dsm-wallclock", scorer, p_s, reference)
    return rows
