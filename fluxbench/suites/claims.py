"""Claims about suite results: parse, evaluate against records, Holm family, gate verdict.

A claim (a ``[[claims]]`` table of a suite file, here a dict) selects records and compares
them with a threshold or with a second selection::

    id = "gmm2d/flux-near-dsm"
    text = "W2(flux) <= W2(dsm) + 0.05 on every target"
    metric = "w2"                      # the records' ``metric``
    where = { objective = "flux", step = "last" }   # filters on record columns; step = "last":
                                       #   each run's last checkpoint
    against = { objective = "dsm" }    # optional relation: the second selection is ``where``
                                       #   updated by ``against``; or against = "noise_floor"
    per = ["target"]                   # one check per group; the claim holds iff every group does
    reduce = "mean"                    # over the rows (seeds) of a group: mean | max | min
    op = "<="                          # <= | >= | in
    value = 0.05                       # threshold, offset of the relation, [lo, hi] for "in",
                                       #   or per tier: value = { quick = 0.1, full = 0.05 }
    tiers = ["quick", "full"]          # tiers the claim applies to (default: all, or value's keys)
    kind = "value"                     # or "p-value" (see below)
    expect = "pass"                    # or "fail" with a `reason`: a known failure
    reason = "..."

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

Verdicts: ``pass``; ``fail``; ``xfail`` (``expect = "fail"`` and it fails); ``xpass``
(``expect = "fail"`` but it holds: the gate notices a change either way).
:func:`gate_exit_code` is 1 iff some verdict is ``fail`` or ``xpass``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fluxbench.suites.records import COLUMNS, FLOAT_COLUMNS

__all__ = [
    "Claim", "ClaimResult", "GroupCheck", "parse_claim", "parse_claims", "evaluate", "holm_adjust",
    "gate_exit_code", "results_frame", "format_results",
]  # fmt: skip

KEYS = ("id", "text", "metric", "where", "against", "per", "reduce", "op", "value", "tiers", "kind",
        "expect", "reason", "suite")  # fmt: skip
OPS = ("<=", ">=", "in")
REDUCES = {"mean": np.mean, "max": np.max, "min": np.min}
KINDS = ("value", "p-value")
EXPECTS = ("pass", "fail")
FILTER_COLUMNS = tuple(c for c in COLUMNS if c not in FLOAT_COLUMNS + ("metric", "tier"))


@dataclass(frozen=True)
class Claim:
    """A validated claim (see the module docstring for the fields' meaning)."""

    id: str
    metric: str
    op: str
    value: float | tuple[float, float] | dict | None
    text: str = ""
    where: dict = field(default_factory=dict)
    against: dict | str | None = None
    per: tuple[str, ...] = ()
    reduce: str = "mean"
    tiers: tuple[str, ...] | None = None
    kind: str = "value"
    expect: str = "pass"
    reason: str = ""
    suite: str | None = None

    def threshold(self, tier: str):
        """The claim's value for ``tier`` (per-tier values resolved; their keys are the claim's tiers)."""
        return self.value[tier] if isinstance(self.value, dict) else self.value


@dataclass(frozen=True)
class GroupCheck:
    """One group's check: measured ``value`` against ``threshold``; ``missing``: no usable data."""

    group: str
    value: float
    threshold: float | tuple[float, float]
    passed: bool
    evidence: str
    missing: bool = False


@dataclass(frozen=True)
class ClaimResult:
    """A claim's outcome. ``group``, ``value``, ``threshold``: the first failing group, else the
    tightest; ``evidence``: one line with measured values, threshold, noise floor, n seeds."""

    id: str
    text: str
    group: str
    value: float
    threshold: float | tuple[float, float]
    passed: bool
    expected: str
    verdict: str
    evidence: str
    kind: str = "value"
    reason: str = ""
    suite: str | None = None
    groups: tuple[GroupCheck, ...] = ()


def _bad(cid, key: str, msg: str) -> ValueError:
    return ValueError(f"claim {cid!r}: {key}: {msg}")


def _choice(cid, key, v, options):
    if v not in options:
        raise _bad(cid, key, f"expected one of {list(options)}, got {v!r}")
    return v


def _number(cid, key, x, *, lo=-math.inf, hi=math.inf) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not (lo <= x <= hi) or math.isnan(x):
        raise _bad(cid, key, f"expected a number in [{lo}, {hi}], got {x!r}")
    return float(x)


def _shape(cid, op, x, kind):
    if kind == "p-value":
        return _number(cid, "value", x, lo=0.0, hi=1.0)
    if op == "in":
        if not isinstance(x, (list, tuple)) or len(x) != 2:
            raise _bad(cid, "value", f'op "in" needs [lo, hi], got {x!r}')
        lo, hi = (_number(cid, "value", v) for v in x)
        if lo > hi:
            raise _bad(cid, "value", f"interval [{lo}, {hi}] has lo > hi")
        return (lo, hi)
    return _number(cid, "value", x)


def _filter(cid, key, f) -> dict:
    if not isinstance(f, Mapping) or not f:
        raise _bad(cid, key, f"expected a non-empty table of record columns, got {f!r}")
    out = {}
    for k, v in f.items():
        if k not in FILTER_COLUMNS:
            raise _bad(cid, key, f"unknown or unfilterable column {k!r} (filter on {list(FILTER_COLUMNS)})")
        vals = list(v) if isinstance(v, (list, tuple)) else [v]
        if not vals or any(isinstance(x, bool) or not isinstance(x, (str, int, float)) for x in vals):
            raise _bad(cid, key, f"{k} must be a value or a non-empty list of values, got {v!r}")
        if "last" in vals and (k != "step" or len(vals) > 1):
            raise _bad(cid, key, f'"last" is only allowed as step = "last", got {k} = {v!r}')
        out[k] = v if isinstance(v, (str, int, float)) else list(v)
    return out


def parse_claim(spec: Mapping, *, suite: str | None = None) -> Claim:
    """Validate a claim dict (a suite file's ``[[claims]]`` entry) into a :class:`Claim`.

    Args:
        spec: the claim's fields (module docstring).
        suite: the suite it belongs to; restricts its selection to that suite's records.

    Raises:
        ValueError: naming the claim id and the field (unknown key, bad op, missing metric, ...).
    """
    if isinstance(spec, Claim):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"a claim must be a table (dict), got {type(spec).__name__}")
    cid = spec.get("id")
    if not isinstance(cid, str) or not cid.strip():
        raise ValueError(f"claim {spec!r}: id: missing or not a non-empty string")
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise _bad(cid, unknown[0], f"unknown key(s) {unknown} (allowed: {list(KEYS)})")
    for key in ("text", "reason", "suite"):
        if key in spec and not isinstance(spec[key], str):
            raise _bad(cid, key, f"expected a string, got {spec[key]!r}")
    metric = spec.get("metric")
    if not isinstance(metric, str) or not metric:
        raise _bad(cid, "metric", "missing or not a non-empty string")
    kind = _choice(cid, "kind", spec.get("kind", "value"), KINDS)
    expect = _choice(cid, "expect", spec.get("expect", "pass"), EXPECTS)
    if expect == "fail" and not spec.get("reason", "").strip():
        raise _bad(cid, "reason", "a claim expected to fail needs a reason (why it fails today)")
    op = _choice(cid, "op", spec.get("op", ">=" if kind == "p-value" else None), OPS)
    reduce = _choice(cid, "reduce", spec.get("reduce", "mean"), REDUCES)
    where = _filter(cid, "where", spec["where"]) if "where" in spec else {}
    against = spec.get("against")
    if against is not None and against != "noise_floor":
        against = _filter(cid, "against", against)
    per = spec.get("per", [])
    if isinstance(per, str) or not isinstance(per, (list, tuple)) or len(set(per)) != len(per):
        raise _bad(cid, "per", f"expected a list of distinct column names, got {per!r}")
    for p in per:
        _choice(cid, "per", p, FILTER_COLUMNS)
    if kind == "p-value":
        if op != ">=":
            raise _bad(cid, "op", f'a p-value claim reads "p >= level"; op must be ">=", got {op!r}')
        for key in ("against", "reduce"):
            if key in spec:
                raise _bad(cid, key, "not allowed in a p-value claim (every seed's p-value is a Holm family member)")
    elif "value" not in spec:
        raise _bad(cid, "value", "missing (the threshold)")
    value, tiers = spec.get("value"), spec.get("tiers")
    if tiers is not None:
        if not isinstance(tiers, (list, tuple)) or not tiers or not all(isinstance(t, str) and t for t in tiers):
            raise _bad(cid, "tiers", f"expected a non-empty list of tier names, got {tiers!r}")
        tiers = tuple(tiers)
    if isinstance(value, Mapping):
        if not value:
            raise _bad(cid, "value", "empty per-tier table")
        if tiers is not None and set(value) != set(tiers):
            raise _bad(cid, "value", f"per-tier values {sorted(value)} do not match tiers {sorted(tiers)}")
        tiers = tiers or tuple(value)
        value = {str(t): _shape(cid, op, v, kind) for t, v in value.items()}
    elif value is not None:
        value = _shape(cid, op, value, kind)
    return Claim(id=cid, metric=metric, op=op, value=value, text=spec.get("text", ""), where=where,
                 against=against, per=tuple(per), reduce=reduce, tiers=tiers, kind=kind, expect=expect,
                 reason=spec.get("reason", ""), suite=spec.get("suite", suite))  # fmt: skip


def parse_claims(specs: Iterable[Mapping], *, suite: str | None = None) -> list[Claim]:
    """:func:`parse_claim` for each spec; ids must be unique within a suite."""
    claims = [parse_claim(s, suite=suite) for s in specs]
    seen = set()
    for c in claims:
        if (c.suite, c.id) in seen:
            raise ValueError(f"claim {c.id!r}: id: duplicate claim id")
        seen.add((c.suite, c.id))
    return claims


def holm_adjust(p_values: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values: ``p~_(k) = max_{j<=k} min(1, (m - j + 1) p_(j))`` (input order).

    Holm's step-down test at level alpha rejects H_(k) iff ``p_(j) <= alpha / (m - j + 1)`` for
    every j <= k, that is iff ``p~_(k) <= alpha``; its family-wise error rate is <= alpha under
    any dependence (Holm 1979). (The claims reject on ``p~ < level`` so that "p >= level" holds
    at equality; fewer rejections, the same bound.)

    Args:
        p_values: (m,) p-values in [0, 1].

    Returns:
        (m,) adjusted p-values, in the order of the input.
    """
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"p_values must lie in [0, 1], got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def _fmt(x) -> str:
    if isinstance(x, tuple):
        return f"[{_fmt(x[0])}, {_fmt(x[1])}]"
    return f"{x:.4g}" if isinstance(x, (float, int, np.floating)) else str(x)


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
    return n + (f", floor {_fmt(float(floor.mean()))}" if len(floor) else "")


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
        lhs = f"{label}: {name} = {_fmt(a)} ({_stats(g)})"
        rhs_base, rhs_text = 0.0, ""
        if b_filt is not None:
            h = b_groups.get(key)
            if h is None:
                problem = problem or f"no records for against {_describe(claim, b_filt, tier)}"
            else:
                problem = problem or _problem(h)
                rhs_base = float(red(h["value"].to_numpy()))
                which = ", ".join(f"{k}={v}" for k, v in claim.against.items())
                rhs_text = f"{name}[{which}] {_fmt(rhs_base)} ({_stats(h)})"
        elif claim.against == "noise_floor":
            floor = g["noise_floor"].dropna().to_numpy()
            if not len(floor):
                problem = problem or "no noise floor recorded"
            else:
                rhs_base = float(red(floor))
                rhs_text = f"{claim.reduce} floor {_fmt(rhs_base)}"
        if problem is not None:
            checks.append(GroupCheck(label, a, value, False, f"{label}: {problem}", True))
            continue
        if claim.op == "in":
            measured = a - rhs_base if rhs_text else a
            thr = value
            ok = thr[0] <= measured <= thr[1]
            shown = f"{lhs} - {rhs_text} = {_fmt(measured)}" if rhs_text else lhs
            ev = f"{shown} {'in' if ok else 'not in'} {_fmt(thr)}"
        else:
            measured, thr = a, rhs_base + value
            ok = measured <= thr if claim.op == "<=" else measured >= thr
            sym = claim.op if ok else {"<=": ">", ">=": "<"}[claim.op]
            ev = f"{lhs} {sym} " + (f"{_fmt(thr)} = {rhs_text} + {_fmt(value)}" if rhs_text else _fmt(thr))
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
        ev = (f"{label}: p = {_fmt(p)}, Holm-adjusted {_fmt(float(adj))} (rank {rank} of m={len(members)}) "
              f"{'>=' if ok else '<'} {_fmt(level)} [{claims[i].metric} = {_fmt(float(row['value']))}]")  # fmt: skip
        checks[i].append(GroupCheck(label, float(adj), level, ok, ev))
    return [_verdict(c, checks[i]) for i, c in enumerate(claims)]


def gate_exit_code(results: Iterable[ClaimResult]) -> int:
    """1 iff some verdict is ``fail`` or ``xpass`` (an unexpected result either way), else 0."""
    return int(any(r.verdict in ("fail", "xpass") for r in results))


def results_frame(results: Sequence[ClaimResult]) -> pd.DataFrame:
    """The claims table: verdict, suite, claim, group, value, threshold, evidence (one row per claim)."""
    rows = []
    for r in results:
        if not isinstance(r, ClaimResult):
            raise ValueError(f"results must be ClaimResult objects, got {type(r).__name__}")
        note = f" [expected to fail: {r.reason}]" if r.expected == "fail" else ""
        rows.append({"verdict": r.verdict.upper(), "suite": r.suite or "", "claim": r.id, "group": r.group,
                     "value": _fmt(r.value), "threshold": _fmt(r.threshold), "evidence": r.evidence + note})
    return pd.DataFrame(rows, columns=["verdict", "suite", "claim", "group", "value", "threshold", "evidence"])


def format_results(results: Sequence[ClaimResult]) -> str:
    """A terminal table of every claim with its evidence, and a count of verdicts."""
    results = list(results)
    table = results_frame(results)
    counts = pd.Series([r.verdict for r in results], dtype=object).value_counts()
    summary = ", ".join(f"{counts.get(v, 0)} {v}" for v in ("pass", "fail", "xfail", "xpass"))
    failed = [r.id for r in results if r.verdict in ("fail", "xpass")]
    tail = f"\nGATE FAILS: {', '.join(failed)}" if failed else "\ngate passes"
    body = table.to_string(index=False, justify="left") if len(table) else "(no claims)"
    return f"{body}\n{len(results)} claims: {summary}{tail}"
