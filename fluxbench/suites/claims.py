"""Claims about suite results: evaluate against records, Holm family, gate verdict.

A claim (a suite file's ``[[claims]]`` table; its keys: :mod:`fluxbench.suites.claim_spec`)
selects records and compares them with a threshold or with a second selection. This module
evaluates claims; the names of the claims' whole life (parse, evaluate, report, gate) are
importable from here.

Checks, with ``a`` the reduced value of a group and ``b`` that of ``against``:
``a op value`` (no relation), ``a op b + value`` (``<=``, ``>=``), ``a - b in [lo, hi]`` (``in``).
A group has one row per run (use ``step = "last"``, a step filter or ``per = ["step"]``
when runs have several checkpoints), else the claim fails as ambiguous. A selection without
records, or with a NaN value, fails the claim ("no records for ...") whatever ``expect`` says.

**p-value claims** (``kind = "p-value"``: "stationarity p >= alpha") use the records'
``p_value`` column; every selected row (each group, each seed) is one null hypothesis
(e.g. "the field is stationary for this target and seed"). All p-value rows of one
:func:`evaluate` call form one family, controlled by **Holm's step-down procedure** at
``alpha_family``: with the m p-values sorted, p_(1) <= ... <= p_(m), the Holm-adjusted
p-values are ``p~_(k) = max_{j<=k} min(1, (m - j + 1) p_(j))`` (:func:`holm_adjust`) and a
row is rejected when ``p~ < level``, ``level = min(value, alpha_family)`` (``value`` is
optional, default ``alpha_family``). Holm controls the family-wise error rate under any
dependence between the tests, so **a correct model (every null true, valid p-values) fails
one or more p-value claims with probability <= alpha_family** (default 0.05). Holm rejects
everything Bonferroni (``m p < alpha``) rejects, and sometimes more.

Verdicts and the gate's exit code: :mod:`fluxbench.suites.verdicts`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from fluxbench.suites.claim_spec import REDUCES, Claim, parse_claim, parse_claims
from fluxbench.suites.records import COLUMNS
from fluxbench.suites.verdicts import (
    ClaimResult,
    GroupCheck,
    fmt_number,
    format_results,
    gate_exit_code,
    holm_adjust,
    results_frame,
)

__all__ = [
    "Claim", "ClaimResult", "GroupCheck", "parse_claim", "parse_claims", "evaluate", "holm_adjust",
    "gate_exit_code", "results_frame", "format_results",
]  # fmt: skip


def _select(claim: Claim, df: pd.DataFrame, filt: Mapping) -> pd.DataFrame:
    sel = df[df["metric"] == claim.metric]
    if claim.suite is not None:
        sel = sel[sel["suite"] == claim.suite]
    for k, v in filt.items():
        if not (k == "step" and v == "last"):
            sel = sel[sel[k].isin(v if isinstance(v, list) else [v])]
    if filt.get("step") == "last" and len(sel):
        sel = sel[sel["step"] == sel.groupby(["suite", "run"])["step"].transform("max")]
    return sel


def _describe(claim: Claim, filt, tier) -> str:
    where = ", ".join(f"{k}={v!r}" for k, v in filt.items())
    suite = f", suite {claim.suite!r}" if claim.suite else ""
    return f"metric {claim.metric!r}" + (f" where {where}" if where else "") + f" (tier {tier!r}{suite})"


def _groups(sel: pd.DataFrame, per) -> dict[tuple, pd.DataFrame]:
    if not per:
        return {(): sel} if len(sel) else {}
    return {(k if isinstance(k, tuple) else (k,)): g for k, g in sel.groupby(list(per), sort=True)}


def _label(per, key) -> str:
    return ", ".join(f"{p}={k}" for p, k in zip(per, key)) or "all"


def _problem(g: pd.DataFrame, column="value") -> str | None:
    """Why a group's rows cannot be reduced (several rows per run, NaN), or None."""
    dup = g[g.duplicated(["suite", "run"], keep=False)]
    if len(dup):
        run = dup["run"].iloc[0]
        steps = sorted(dup.loc[dup["run"] == run, "step"].unique().tolist())
        return (f"ambiguous: run {run!r} has {int((dup['run'] == run).sum())} rows (steps {steps}); "
                "add where step = 'last', a step filter or per = ['step']")  # fmt: skip
    bad = g[g[column].isna()]
    if len(bad):
        return f"NaN {column} in run {bad['run'].iloc[0]!r}"
    return None


def _stats(g: pd.DataFrame) -> str:
    seeds = g["seed"].nunique()
    n = f"n={seeds} seeds" if seeds == len(g) else f"n={len(g)} runs, {seeds} seeds"
    floor = g["noise_floor"].dropna()
    return n + (f", floor {fmt_number(float(floor.mean()))}" if len(floor) else "")


def _margin(op, v, thr) -> float:
    if op == "in":
        return min(v - thr[0], thr[1] - v)
    return thr - v if op == "<=" else v - thr


def _value_checks(claim: Claim, df: pd.DataFrame, tier: str) -> list[GroupCheck]:
    value = claim.threshold(tier)
    a_sel = _select(claim, df, claim.where)
    b_filt = {**claim.where, **claim.against} if isinstance(claim.against, dict) else None
    b_sel = _select(claim, df, b_filt) if b_filt is not None else None
    a_groups = _groups(a_sel, claim.per)
    b_groups = _groups(b_sel, claim.per) if b_sel is not None else {}
    if not a_groups:
        return [GroupCheck("all", math.nan, value, False, f"no records for {_describe(claim, claim.where, tier)}", True)]
    checks, red, name = [], REDUCES[claim.reduce], f"{claim.reduce} {claim.metric}"
    for key in sorted(set(a_groups) | set(b_groups)):
        label = _label(claim.per, key)
        g = a_groups.get(key)
        if g is None:
            checks.append(GroupCheck(label, math.nan, value, False, f"{label}: no records for "
                                     f"{_describe(claim, claim.where, tier)} (only for against)", True))  # fmt: skip
            continue
        problem = _problem(g)
        a = float(red(g["value"].to_numpy())) if problem is None else math.nan
        lhs = f"{label}: {name} = {fmt_number(a)} ({_stats(g)})"
        rhs_base, rhs_text = 0.0, ""
        if b_filt is not None:
            h = b_groups.get(key)
            if h is None:
                problem = problem or f"no records for against {_describe(claim, b_filt, tier)}"
            else:
                problem = problem or _problem(h)
                rhs_base = float(red(h["value"].to_numpy()))
                which = ", ".join(f"{k}={v}" for k, v in claim.against.items())
                rhs_text = f"{name}[{which}] {fmt_number(rhs_base)} ({_stats(h)})"
        elif claim.against == "noise_floor":
            floor = g["noise_floor"].dropna().to_numpy()
            if not len(floor):
                problem = problem or "no noise floor recorded"
            else:
                rhs_base = float(red(floor))
                rhs_text = f"{claim.reduce} floor {fmt_number(rhs_base)}"
        if problem is not None:
            checks.append(GroupCheck(label, a, value, False, f"{label}: {problem}", True))
            continue
        if claim.op == "in":
            measured = a - rhs_base if rhs_text else a
            thr = value
            ok = thr[0] <= measured <= thr[1]
            shown = f"{lhs} - {rhs_text} = {fmt_number(measured)}" if rhs_text else lhs
            ev = f"{shown} {'in' if ok else 'not in'} {fmt_number(thr)}"
        else:
            measured, thr = a, rhs_base + value
            ok = measured <= thr if claim.op == "<=" else measured >= thr
            sym = claim.op if ok else {"<=": ">", ">=": "<"}[claim.op]
            ev = f"{lhs} {sym} " + (f"{fmt_number(thr)} = {rhs_text} + {fmt_number(value)}" if rhs_text else fmt_number(thr))
        checks.append(GroupCheck(label, measured, thr, bool(ok), ev))
    return checks


def _p_members(claim: Claim, df: pd.DataFrame, tier: str) -> list[tuple[str, pd.Series | None, str]]:
    """(label, row, problem) per family member of a p-value claim."""
    sel = _select(claim, df, claim.where)
    if not len(sel):
        return [("all", None, f"no records for {_describe(claim, claim.where, tier)}")]
    out = []
    for key, g in _groups(sel, claim.per).items():
        label = _label(claim.per, key)
        problem = _problem(g, "p_value")
        for _, row in g.sort_values(["run", "step"]).iterrows():
            out.append((f"{label}, {row['run']}" if claim.per else row["run"], row, problem))
    return out


def _verdict(claim: Claim, checks: list[GroupCheck]) -> ClaimResult:
    passed = all(c.passed for c in checks)
    missing = any(c.missing for c in checks)
    fails = [c for c in checks if not c.passed]
    if fails:
        head = fails[0]
        ev = "; ".join(c.evidence for c in fails) + f" ({len(fails)}/{len(checks)} groups fail)"
    else:
        head = min(checks, key=lambda c: _margin(">=" if claim.kind == "p-value" else claim.op, c.value, c.threshold))
        ev = head.evidence + (f" (all {len(checks)} groups hold)" if len(checks) > 1 else "")
    if missing or not passed:
        verdict = "fail" if missing or claim.expect == "pass" else "xfail"
    else:
        verdict = "pass" if claim.expect == "pass" else "xpass"
    return ClaimResult(id=claim.id, text=claim.text, group=head.group, value=head.value, threshold=head.threshold,
                       passed=passed, expected=claim.expect, verdict=verdict, evidence=ev, kind=claim.kind,
                       reason=claim.reason, suite=claim.suite, groups=tuple(checks))  # fmt: skip


def evaluate(
    claims: Iterable[Mapping | Claim], records_df: pd.DataFrame, tier: str, alpha_family: float = 0.05
) -> list[ClaimResult]:
    """Evaluate claims on the records of ``tier``; one :class:`ClaimResult` per applicable claim.

    Claims whose ``tiers`` exclude ``tier`` are skipped. The p-value claims of this call form
    one Holm family at ``alpha_family`` (module docstring): a correct model fails the family
    with probability <= ``alpha_family``. Pass every claim of a gate run in one call (each
    with its ``suite``) so that the guarantee covers the whole gate.

    Args:
        claims: claim dicts or :class:`Claim` objects.
        records_df: records (:meth:`fluxbench.suites.records.Records.load`) of one commit and
            suite hash per suite; rows of other tiers are ignored.
        tier: e.g. ``"quick"`` or ``"full"``.
        alpha_family: family-wise error rate of the p-value claims, in (0, 1).

    Returns:
        Results in the order of ``claims``.

    Raises:
        ValueError: a bad claim (naming its id and field), records without the record
            columns, or ``alpha_family`` outside (0, 1).
    """
    if not isinstance(records_df, pd.DataFrame):
        raise ValueError(f"records_df must be a pandas DataFrame, got {type(records_df).__name__}")
    missing = [c for c in COLUMNS if c not in records_df.columns]
    if missing:
        raise ValueError(f"records_df lacks the record column(s) {missing}")
    if not isinstance(tier, str) or not tier:
        raise ValueError(f"tier must be a non-empty string, got {tier!r}")
    if isinstance(alpha_family, bool) or not isinstance(alpha_family, (int, float)) or not 0 < alpha_family < 1:
        raise ValueError(f"alpha_family must lie in (0, 1), got {alpha_family!r}")
    claims = [c for c in parse_claims(claims) if c.tiers is None or tier in c.tiers]
    df = records_df[records_df["tier"] == tier]
    checks: dict[int, list[GroupCheck]] = {}
    members = []  # (claim index, label, p, level, row)
    for i, c in enumerate(claims):
        if c.kind == "value":
            checks[i] = _value_checks(c, df, tier)
            continue
        level = min(c.threshold(tier) if c.value is not None else alpha_family, alpha_family)
        checks[i] = []
        for label, row, problem in _p_members(c, df, tier):
            if problem is None and not 0 <= row["p_value"] <= 1:
                problem = f"p_value {row['p_value']!r} outside [0, 1] in run {row['run']!r}"
            if problem is not None:
                checks[i].append(GroupCheck(label, math.nan, level, False, f"{label}: {problem}", True))
            else:
                members.append((i, label, float(row["p_value"]), level, row))
    adjusted = holm_adjust([m[2] for m in members]) if members else []
    ranks = np.argsort(np.argsort([m[2] for m in members], kind="stable"), kind="stable") + 1
    for (i, label, p, level, row), adj, rank in zip(members, adjusted, ranks):
        ok = bool(adj >= level)
        ev = (f"{label}: p = {fmt_number(p)}, Holm-adjusted {fmt_number(float(adj))} (rank {rank} of m={len(members)}) "
              f"{'>=' if ok else '<'} {fmt_number(level)} [{claims[i].metric} = {fmt_number(float(row['value']))}]")  # fmt: skip
        checks[i].append(GroupCheck(label, float(adj), level, ok, ev))
    return [_verdict(c, checks[i]) for i, c in enumerate(claims)]
