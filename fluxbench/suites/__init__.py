"""Stationarity suites, result records, claims and the gate (issue 14).

A *suite* (``suites/NAME.toml``) declares targets, objectives, models, a recipe, sampler
step sizes, quick and full budgets, metrics and claims. :func:`run_suite` measures its runs
and appends one finished run at a time to a :class:`Records` file; :func:`evaluate` checks
the claims (p-value claims as one Holm family); :func:`render_report` writes Markdown and
HTML with plots. The command line: ``fluxbench suite list|run|merge``, ``fluxbench report``,
``fluxbench gate``.

    >>> from fluxbench.suites import find_suite, run_suite, Records, evaluate, format_results
    >>> suite = find_suite("gmm2d")                                  # doctest: +SKIP
    >>> run_suite(suite, tier="quick", records=Records("runs/suites/records/gmm2d.csv"))  # doctest: +SKIP
    >>> print(format_results(evaluate(suite_claims(suite), Records(...).load(), "quick")))  # doctest: +SKIP
"""

from .claims import (
    Claim,
    ClaimResult,
    GroupCheck,
    evaluate,
    format_results,
    gate_exit_code,
    holm_adjust,
    parse_claim,
    parse_claims,
    results_frame,
)
from .gate import gate, load_records, records_path, suite_claims
from .perturb import Perturbation, RotationalModel, parse_perturb, perturb_field, rotation_matrix
from .records import COLUMNS, Records, RecordsError, empty_records, merge
from .runner import git_commit, provenance, run_suite
from .spec import (
    KINDS,
    TIERS,
    ModelSpec,
    Run,
    Suite,
    TargetSpec,
    find_suite,
    list_suites,
    load_suite,
    parse_shard,
    shard_runs,
)

__all__ = [
    # spec
    "Suite", "Run", "TargetSpec", "ModelSpec", "KINDS", "TIERS", "load_suite", "list_suites", "find_suite",
    "parse_shard", "shard_runs",
    # runner
    "run_suite", "provenance", "git_commit",
    "Perturbation", "parse_perturb", "perturb_field", "RotationalModel", "rotation_matrix",
    # records
    "Records", "RecordsError", "COLUMNS", "merge", "empty_records",
    # claims
    "Claim", "ClaimResult", "GroupCheck", "parse_claim", "parse_claims", "evaluate", "holm_adjust",
    "gate_exit_code", "results_frame", "format_results",
    # report
    "render_report",
    # gate
    "gate", "load_records", "records_path", "suite_claims",
]  # fmt: skip


def __getattr__(name: str):
    # the report pulls in matplotlib: imported on first use, not with the package
    if name == "render_report":
        from .report import render_report

        return render_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
