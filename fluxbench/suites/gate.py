"""The gate: run what is missing, evaluate every claim as one family, say what failed.

Layout of an output directory (default ``runs/suites``; committed results:
``results/suites``)::

    OUT/records/NAME.csv                      records of suite NAME (all tiers, all commits)
    OUT/records/NAME.shard-I-of-N.csv         records written by ``--shard I/N``
    OUT/records/NAME+perturb=LABEL.csv        records of a deliberately broken run (--perturb)
    OUT/artifacts/RUN.pt                      grid field values and samples of 2-D runs
    OUT/report/report.md, report.html, *.png  ``fluxbench report``

:func:`gate` evaluates the claims on the records of the current commit and suite hash
only, so a result never outlives the code and the suite file that produced it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from .claims import ClaimResult, evaluate, parse_claims
from .perturb import Perturbation, parse_perturb
from .records import KEY, Records, empty_records
from .runner import git_commit, run_suite
from .spec import Suite

__all__ = ["records_path", "records_files", "load_records", "suite_claims", "gate", "current_records"]


def records_path(out: str | Path, suite: str, *, shard: tuple[int, int] | None = None,
                 perturb: str | Perturbation | None = None) -> Path:
    """The records file of ``suite`` under ``out`` (see the module docstring)."""
    name = suite
    p = parse_perturb(perturb)
    if p is not None:
        name += "+perturb=" + re.sub(r"[^A-Za-z0-9._-]", "_", p.label)
    if shard is not None and shard != (1, 1):
        name += f".shard-{shard[0]}-of-{shard[1]}"
    return Path(out) / "records" / f"{name}.csv"


def records_files(out: str | Path, suite: str, *, perturb: str | Perturbation | None = None) -> list[Path]:
    """The records files of ``suite`` under ``out``: the main file and its shards."""
    main = records_path(out, suite, perturb=perturb)
    files = [main] if main.exists() else []
    files += sorted(main.parent.glob(f"{main.stem}.shard-*-of-*.csv"))
    return files


def load_records(out: str | Path, suites: Sequence[str] | None = None, *,
                 perturb: str | Perturbation | None = None) -> pd.DataFrame:
    """Every record of the given suites (default: all found) under ``out``, duplicates dropped.

    Raises:
        RecordsError: a damaged or foreign records file (names the file and line).
    """
    rec_dir = Path(out) / "records"
    if suites is None:
        names = sorted({p.name.split(".")[0].split("+")[0] for p in rec_dir.glob("*.csv")}) if rec_dir.is_dir() else []
    else:
        names = list(suites)
    frames = [Records(f).load() for n in names for f in records_files(out, n, perturb=perturb)]
    frames = [f for f in frames if len(f)]
    if not frames:
        return empty_records()
    df = pd.concat(frames, ignore_index=True)
    return df.drop_duplicates(subset=list(KEY), keep="first").reset_index(drop=True)


def current_records(df: pd.DataFrame, suites: Sequence[Suite], commit: str | None = None) -> pd.DataFrame:
    """The rows of ``df`` from each suite's current hash and ``commit`` (default: this checkout's)."""
    commit = git_commit() if commit is None else commit
    keep = pd.Series(False, index=df.index)
    for s in suites:
        keep |= (df["suite"] == s.name) & (df["suite_hash"] == s.suite_hash) & (df["commit"] == commit)
    return df[keep].reset_index(drop=True)


def latest_records(df: pd.DataFrame) -> pd.DataFrame:
    """Per suite and tier, the rows of the (commit, suite_hash) recorded last (for reports)."""
    if not len(df):
        return df
    parts = []
    for _, g in df.groupby(["suite", "tier"], sort=True):
        last = g.sort_values("recorded_at").iloc[-1]
        parts.append(g[(g["commit"] == last["commit"]) & (g["suite_hash"] == last["suite_hash"])])
    return pd.concat(parts, ignore_index=True)


def suite_claims(suite: Suite) -> list:
    """The suite's claims, parsed, each tied to the suite (its selection sees only its records)."""
    return parse_claims(list(suite.claims), suite=suite.name)


def gate(
    suites: Sequence[Suite],
    *,
    tier: str = "quick",
    out: str | Path = "runs/suites",
    device: str | None = None,
    alpha: float = 0.05,
    perturb: str | Perturbation | None = None,
    run_missing: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[list[ClaimResult], pd.DataFrame]:
    """Run the missing runs of each suite's tier, then evaluate every claim in one Holm family.

    Args:
        suites: the suites to gate.
        tier: "quick" or "full".
        out: output directory (records under ``out/records``).
        device: where to run.
        alpha: family-wise error rate of the p-value claims (Holm).
        perturb: break the fields on purpose (records go to their own files).
        run_missing: False evaluates what is recorded without running anything.
        log: progress callback.

    Returns:
        (claim results in suite order, the records they were evaluated on).
    """
    out = Path(out)
    for s in suites:
        if run_missing:
            run_suite(s, tier=tier, records=records_path(out, s.name, perturb=perturb), device=device,
                      artifacts_dir=out / "artifacts" if perturb is None else None, perturb=perturb, log=log)
    df = current_records(load_records(out, [s.name for s in suites], perturb=perturb), suites)
    claims = [c for s in suites for c in suite_claims(s)]
    return evaluate(claims, df, tier, alpha_family=alpha), df
