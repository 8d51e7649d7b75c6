"""What a claim says: its keys, their validation, and the :class:`Claim` they give.

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
    kind = "value"                     # or "p-value" (see fluxbench.suites.claims)
    expect = "pass"                    # or "fail" with a `reason`: a known failure
    reason = "..."

Evaluation against records, the Holm family of the p-value claims and the verdicts:
:mod:`fluxbench.suites.claims`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fluxbench.suites.records import COLUMNS, FLOAT_COLUMNS

__all__ = ["Claim", "parse_claim", "parse_claims", "KEYS", "OPS", "REDUCES", "KINDS", "EXPECTS", "FILTER_COLUMNS"]

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
