"""A battery of checks for a generative field, in the spirit of scikit-learn's ``check_estimator``.

:func:`check_field` runs every check that applies to a (field, target) pair and returns
one row per check; :func:`run_check` runs one of them and raises ``AssertionError`` on
failure (what :func:`fluxbench.testing.parametrize_with_checks` calls from pytest).
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from fluxbench._checks import check_field_output, check_points, check_positive, check_positive_int
from fluxbench._random import generator_from_seed
from fluxbench.verify.defect import defect
from fluxbench.verify.stationarity import stationarity_test

__all__ = ["check_field", "run_check", "CHECKS", "COLUMNS", "STATUSES", "DEFAULT_OPTIONS"]

#: Columns of the table returned by :func:`check_field`.
COLUMNS = ("check", "status", "passed", "value", "threshold", "detail")

#: The values of the ``status`` column.
STATUSES = ("passed", "failed", "skipped")

#: Defaults of the options of :func:`check_field` (and of :func:`run_check`).
DEFAULT_OPTIONS: dict[str, Any] = {
    "n": 2000,
    "alpha": 0.01,
    "seed": 0,
    "defect_tol": 0.01,
    "defect_points": 500,
    "exact_divergence_max_dim": 10,
    "hutchinson_probes": 8,
    "batch_rows": 5,
    "batch_rtol": 1e-4,
    "ksd_options": None,
    "rollout_options": None,
}


class _Context:
    """Samples and field values shared by the checks of one (field, target) pair (lazy)."""

    def __init__(self, field: Callable[[Tensor], Tensor], target: object, options: dict[str, Any]):
        if not callable(field):
            raise ValueError(f"field must be callable (N, d) -> (N, d); got {type(field).__name__}")
        self.field = field
        self.target = target
        self.opt = options
        self._x: Tensor | None = None

    @property
    def x(self) -> Tensor:
        if self._x is None:
            n = self.opt["n"]
            if isinstance(self.target, Tensor):
                x = check_points(self.target, "target samples")
                if x.shape[0] > n:
                    gen = generator_from_seed(self.opt["seed"], x.device)
                    x = x[torch.randperm(x.shape[0], generator=gen, device=x.device)[:n]]
            else:
                sample = getattr(self.target, "sample", None)
                if not callable(sample):
                    raise ValueError(
                        "target must be a (N, d) tensor of samples or have a sample(n, generator=...) method; "
                        f"got {type(self.target).__name__}"
                    )
                device = getattr(self.target, "device", torch.device("cpu"))
                x = sample(n, generator=generator_from_seed(self.opt["seed"], device))
                check_points(x, "target.sample(n)")
            self._x = x.detach()
        return self._x

    @property
    def score(self) -> Callable[[Tensor], Tensor] | None:
        s = getattr(self.target, "score", None)
        return s if callable(s) and not isinstance(self.target, Tensor) else None


def _row(check: str, passed: bool | None, value: float, threshold: float, detail: str) -> dict[str, Any]:
    """One row; ``passed=None`` marks a check that did not apply (status "skipped", passed NA)."""
    status = "skipped" if passed is None else ("passed" if passed else "failed")
    return {
        "check": check,
        "status": status,
        "passed": pd.NA if passed is None else bool(passed),
        "value": float(value),
        "threshold": float(threshold),
        "detail": detail,
    }


def _check_output_contract(ctx: _Context) -> dict[str, Any]:
    x = ctx.x
    with torch.no_grad():
        out = ctx.field(x)
    try:
        check_field_output(out, x, "field")
    except ValueError as exc:
        frac = float(torch.isfinite(out).float().mean()) if isinstance(out, Tensor) and out.is_floating_point() else 0.0
        return _row("output_contract", False, frac, 1.0, str(exc))
    return _row(
        "output_contract",
        True,
        1.0,
        1.0,
        f"f(x) has shape {tuple(out.shape)}, dtype {out.dtype}, device {out.device}, all finite (value: finite fraction)",
    )


def _check_determinism(ctx: _Context) -> dict[str, Any]:
    x = ctx.x
    with torch.no_grad():
        a = check_field_output(ctx.field(x), x, "field")
        b = check_field_output(ctx.field(x), x, "field")
    diff = float((a - b).abs().max())
    same = bool(torch.equal(a, b))
    return _row("determinism", same, diff, 0.0, "two calls on the same input must agree bit for bit (value: max |f1 - f2|)")


def _check_batch_independence(ctx: _Context) -> dict[str, Any]:
    x = ctx.x
    k = min(ctx.opt["batch_rows"], x.shape[0])
    with torch.no_grad():
        batch = check_field_output(ctx.field(x), x, "field")[:k]
        rows = torch.cat([check_field_output(ctx.field(x[i : i + 1]), x[i : i + 1], "field") for i in range(k)])
    diff = float((batch - rows).abs().max())
    tol = ctx.opt["batch_rtol"] * (1.0 + float(batch.abs().max()))
    return _row(
        "batch_independence",
        diff <= tol,
        diff,
        tol,
        f"f on the full batch vs f row by row on {k} rows (value: max abs difference; "
        f"threshold batch_rtol * (1 + max|f|))",
    )


def _check_defect(ctx: _Context) -> dict[str, Any]:
    score = ctx.score
    tol = ctx.opt["defect_tol"]
    if score is None:
        return _row("defect", None, math.nan, tol, "skipped: the target has no score (pass a Target, not samples)")
    x = ctx.x[: ctx.opt["defect_points"]]
    d = x.shape[1]
    with torch.no_grad():
        s = check_field_output(score(x), x, "target.score")
    fisher = float(s.double().pow(2).sum(1).mean())  # E|s|^2 = -E div s, the natural 1/length^2 scale
    if d <= ctx.opt["exact_divergence_max_dim"]:
        r = defect(ctx.field, score, x, divergence="exact").double()
        ms = float(r.pow(2).mean())
        how = "exact divergence"
    else:
        gen = generator_from_seed(ctx.opt["seed"], x.device)
        k = ctx.opt["hutchinson_probes"]
        r1 = defect(ctx.field, score, x, divergence="hutchinson", generator=gen, n_probes=k).double()
        r2 = defect(ctx.field, score, x, divergence="hutchinson", generator=gen, n_probes=k).double()
        # two independent probe averages: E[r1 r2] = r^2 exactly, so the probe noise does not bias the RMS
        ms = max(float((r1 * r2).mean()), 0.0)
        how = f"Hutchinson, 2 x {k} Rademacher probes, unbiased E[r^2] = mean(r1 r2)"
    rel = math.sqrt(ms) / max(fisher, 1e-300)
    return _row(
        "defect",
        rel <= tol,
        rel,
        tol,
        f"RMS r / E|s|^2 with r = div u + u.s, u = f - s (SPEC eq. (3)) on {x.shape[0]} target samples, {how}; "
        f"RMS r = {math.sqrt(ms):.3g}, E|s|^2 = {fisher:.3g}",
    )


def _stat_row(ctx: _Context, method: str, name: str) -> dict[str, Any]:
    opts = ctx.opt.get(f"{method}_options") or {}
    rep = stationarity_test(ctx.field, ctx.x, alpha=ctx.opt["alpha"], method=method, seed=ctx.opt["seed"], **opts)
    if method == "ksd":
        extra = f"lengthscales {', '.join(f'{v:.3g}' for v in rep.lengthscales or ())}, {rep.n_bootstrap} bootstrap draws"
    else:
        extra = (
            f"eps {rep.eps:.3g}, n_steps {rep.n_steps}, W2 {rep.w2:.3g} vs noise floor {rep.w2_noise_floor:.3g}"
            if rep.eps is not None and rep.w2 is not None and rep.w2_noise_floor is not None
            else f"eps {rep.eps}, n_steps {rep.n_steps}"
        )
    return _row(
        name,
        rep.passed,
        rep.p_value,
        ctx.opt["alpha"],
        f"{method} stationarity test on N = {rep.n}: p = {rep.p_value:.3g} (value: p-value, reject if < alpha); {extra}",
    )


def _check_ksd(ctx: _Context) -> dict[str, Any]:
    return _stat_row(ctx, "ksd", "ksd_stationarity")


def _check_rollout(ctx: _Context) -> dict[str, Any]:
    return _stat_row(ctx, "rollout", "rollout_stationarity")


#: name -> check function (context -> row), in the order :func:`check_field` runs them.
CHECKS: dict[str, Callable[[_Context], dict[str, Any]]] = {
    "output_contract": _check_output_contract,
    "determinism": _check_determinism,
    "batch_independence": _check_batch_independence,
    "defect": _check_defect,
    "ksd_stationarity": _check_ksd,
    "rollout_stationarity": _check_rollout,
}


def resolve_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options of :func:`check_field`, defaults filled in and validated (ValueError on a bad one)."""
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(DEFAULT_OPTIONS)}")
    opt = {**DEFAULT_OPTIONS, **options}
    opt["n"] = check_positive_int(opt["n"], "n", minimum=4)
    alpha = opt["alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < float(alpha) < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha!r}")
    if isinstance(opt["seed"], bool) or not isinstance(opt["seed"], int):
        raise ValueError(f"seed must be an int; got {opt['seed']!r}")
    opt["defect_tol"] = check_positive(opt["defect_tol"], "defect_tol")
    opt["batch_rtol"] = check_positive(opt["batch_rtol"], "batch_rtol", allow_zero=True)
    opt["defect_points"] = check_positive_int(opt["defect_points"], "defect_points")
    opt["batch_rows"] = check_positive_int(opt["batch_rows"], "batch_rows")
    opt["hutchinson_probes"] = check_positive_int(opt["hutchinson_probes"], "hutchinson_probes")
    return opt


def _run(ctx: _Context, name: str) -> dict[str, Any]:
    try:
        return CHECKS[name](ctx)
    except Exception as exc:  # a crashing check is a failed check, with the reason
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return _row(name, False, math.nan, math.nan, f"raised {last}")


def check_field(
    field: Callable[[Tensor], Tensor],
    target: object,
    *,
    checks: Sequence[str] | None = None,
    raise_on_failure: bool = False,
    **options: Any,
) -> pd.DataFrame:
    """Run the battery of checks on ``field`` against ``target``; one row per check.

    Checks (in this order; ``checks=`` selects a subset by name, see :data:`CHECKS`):

    * ``output_contract``: f on n target samples returns their shape, dtype and device,
      all finite (value: the finite fraction).
    * ``determinism``: two calls on the same input agree bit for bit (value: max difference).
    * ``batch_independence``: f on the batch equals f row by row on ``batch_rows`` rows,
      within ``batch_rtol * (1 + max|f|)`` (catches batch coupling, e.g. batch statistics).
    * ``defect``: where the target has a ``score``: ``RMS r / E|s|^2`` on ``defect_points``
      samples, with r = div u + u . s (SPEC eq. (3)), at most ``defect_tol`` (default 0.01).
      The exact divergence for d <= ``exact_divergence_max_dim`` (10), else a Hutchinson
      estimate with two independent averages of ``hutchinson_probes`` probes whose
      product is an unbiased estimate of r^2 (so probe noise does not inflate the RMS).
      Skipped (status "skipped", ``passed`` NA: it neither passes nor fails) when the
      target is a tensor of samples.
    * ``ksd_stationarity``: :func:`fluxbench.verify.stationarity_test` with method
      ``"ksd"`` (value: p-value; passes if p >= alpha).
    * ``rollout_stationarity``: the same with ``"rollout"``.

    A check that raises is reported as failed with the exception in ``detail``. All
    randomness comes from ``seed``: the same call gives the same table. The two
    statistical checks each reject a stationary field with probability about alpha (for a
    fixed seed the outcome is deterministic).

    Args:
        field: callable (N, d) -> (N, d).
        target: a :class:`fluxbench.targets.Target` (or any object with
            ``sample(n, generator=...)`` and optionally ``score``), or an (N, d) tensor of
            samples.
        checks: names of the checks to run (default all).
        raise_on_failure: raise ``AssertionError`` listing the failed checks.
        **options: ``n`` (samples, default 2000), ``alpha`` (0.01), ``seed`` (0),
            ``defect_tol`` (0.01), ``defect_points`` (500), ``exact_divergence_max_dim``
            (10), ``hutchinson_probes`` (8), ``batch_rows`` (5), ``batch_rtol`` (1e-4),
            ``ksd_options`` / ``rollout_options`` (dicts passed to the tests).

    Returns:
        ``pandas.DataFrame`` with columns ``check, status, passed, value, threshold,
        detail``; ``status`` is "passed", "failed" or "skipped", ``passed`` a nullable
        boolean (NA for a skipped check).

    Raises:
        ValueError: an unknown check name or option, or a bad option value.
        AssertionError: with ``raise_on_failure=True``, if a check failed (skipped
            checks do not count).

    Example:
        >>> from fluxbench.targets import Gaussian
        >>> p = Gaussian.isotropic(2)
        >>> table = check_field(p.score, p, n=500, checks=["output_contract", "defect", "ksd_stationarity"])
        >>> table["status"].tolist()
        ['passed', 'passed', 'passed']
        >>> check_field(lambda z: p.score(z) + 0.5, p, n=500, checks=["defect"])["status"].tolist()
        ['failed']
    """
    opt = resolve_options(options)
    names = list(CHECKS) if checks is None else list(checks)
    unknown = [c for c in names if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    ctx = _Context(field, target, opt)
    rows = [_run(ctx, name) for name in names]
    table = pd.DataFrame(rows, columns=list(COLUMNS)).astype({"passed": "boolean"})
    failed = table[table["status"] == "failed"]
    if raise_on_failure and len(failed):
        lines = [f"  {r.check}: value {r.value:.4g} vs threshold {r.threshold:.4g}: {r.detail}" for r in failed.itertuples()]
        raise AssertionError("field failed check(s):\n" + "\n".join(lines))
    return table


def run_check(name: str, field: Callable[[Tensor], Tensor], target: object, **options: Any) -> dict[str, Any]:
    """Run the single check ``name``; raise ``AssertionError`` with its row if it fails.

    Returns:
        The row (a dict with the :data:`COLUMNS` keys) when the check passes or was
        skipped (``row["status"] == "skipped"``: the check does not apply to this target).
    """
    if name not in CHECKS:
        raise ValueError(f"unknown check {name!r}; known: {', '.join(CHECKS)}")
    opt = resolve_options(options)
    row = _run(_Context(field, target, opt), name)
    if row["status"] == "failed":
        raise AssertionError(
            f"check {name!r} failed: value {row['value']:.4g} vs threshold {row['threshold']:.4g}: {row['detail']}"
        )
    return row
