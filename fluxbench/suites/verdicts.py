"""The outcome of claims: per-group checks, claim results, Holm's adjustment, the gate's code and tables.

Verdicts: ``pass``; ``fail``; ``xfail`` (``expect = "fail"`` and it fails); ``xpass``
(``expect = "fail"`` but it holds: the gate notices a change either way).
:func:`gate_exit_code` is 1 iff some verdict is ``fail`` or ``xpass``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["GroupCheck", "ClaimResult", "holm_adjust", "gate_exit_code", "results_frame", "format_results", "fmt_number"]


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


def fmt_number(x) -> str:
    """A value or an interval for evidence and tables: 4 significant digits."""
    if isinstance(x, tuple):
        return f"[{fmt_number(x[0])}, {fmt_number(x[1])}]"
    return f"{x:.4g}" if isinstance(x, (float, int, np.floating)) else str(x)


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
                     "value": fmt_number(r.value), "threshold": fmt_number(r.threshold), "evidence": r.evidence + note})
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
