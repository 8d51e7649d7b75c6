"""The calibration's summary, ``README.md``, rendered from its table (``calibration.csv``)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch

from fluxbench.fileio import write_text
from fluxbench.verify import DEFAULT_LENGTHSCALE_FACTORS

from .run import ALPHAS, METHODS, POWER_TARGET, W2_THRESHOLD

__all__ = ["write_summary"]

FAMILY_TITLES = (
    ("stationary", "False-alarm rate (stationary cases)"),
    ("perturbed", "Detection rate (perturbed cases)"),
    ("limit", "Detection rate (documented limit, outside the required set)"),
)


def _fmt_rate(r: pd.Series) -> str:
    mark = " **FAIL**" if r["meets"] == "no" else ""
    return f"{r['rate']:.2f} ± {r['se']:.2f}{mark}"


def _fmt_w2(w: float) -> str:
    return "inf" if math.isinf(w) else f"{w:.3f}"


def _header(command: str, elapsed: dict[str, float], meta: dict) -> list[str]:
    factors = ", ".join(f"{c:g}" for c in DEFAULT_LENGTHSCALE_FACTORS)
    history = [ln.strip() for ln in meta.get("history", "").splitlines() if ln.strip()]
    return [
        "# Calibration of the stationarity tests: size and power",
        "",
        "Produced by `python -m tools.calibration` (the protocol is in the docstrings of `tools/calibration/`).",
        "",
        f"- command: `{command}`",
        *([f"- all runs into this directory (`commands.log`): " + "; ".join(f"`{ln}`" for ln in history)]
          if history else []),
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- torch {torch.__version__}, device {meta['device']}, torch threads per process: {meta['threads']}, "
        f"processes: {meta['jobs']}",
        f"- N = {meta['n']} samples per seed; seeds per case: {meta['seeds']}",
        f"- wall time of the cases listed (sum over cases, seconds): {sum(elapsed.values()):.0f}"
        if elapsed else "- wall time: (cases computed in earlier runs)",
        "",
        "Each entry is the rejection rate ± its SE, sqrt(rate (1 - rate) / n_seeds), over the seeds.",
        "Requirements: stationary cases (false alarms) `rate <= alpha + 2 SE`; perturbed cases with",
        f"W2 >= {W2_THRESHOLD} (detections) `rate >= {POWER_TARGET}`. **FAIL** marks an entry that misses its",
        f"requirement. `ksd` (maximum over the lengthscales {factors} x the median and the mode",
        "test functions), `rollout` and `combined` (the default, both with Bonferroni) are the methods of",
        "`stationarity_test`;",
        "`ksd_kernels` (the lengthscales alone, without the mode test functions), `ksd_median` (the",
        "median lengthscale alone) and `ksd_sum` (sum of the kernels' standardised statistics) are",
        "diagnostics computed from the same pass.",
        "",
    ]


def _rates(table: pd.DataFrame) -> list[str]:
    lines: list[str] = []
    for alpha in ALPHAS:
        sub = table[table["alpha"] == alpha]
        for family, title in FAMILY_TITLES:
            fam = sub[sub["family"] == family]
            if fam.empty:
                continue
            lines += [f"## {title}, alpha = {alpha}", ""]
            head = "| case | d | " + ("W2 | " if family != "stationary" else "") + " | ".join(METHODS) + " |"
            lines += [head, "|" + "---|" * (head.count("|") - 1)]
            for case in dict.fromkeys(fam["case"]):
                rows = fam[fam["case"] == case].set_index("method")
                first = rows.iloc[0]
                cells = [case, str(int(first["d"]))]
                if family != "stationary":
                    cells.append(_fmt_w2(first["w2"]))
                # "-": a method added after this case was last computed (rerun it to fill it in)
                cells += [_fmt_rate(rows.loc[m]) if m in rows.index else "-" for m in METHODS]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def _requirements_met(table: pd.DataFrame) -> list[str]:
    req = table[table["meets"] != "not required"]
    lines = ["## Which method meets which requirement", "",
             f"| alpha | method | stationary cases met | perturbed cases (W2 >= {W2_THRESHOLD}) met | cases missed |",
             "|---|---|---|---|---|"]
    for alpha in ALPHAS:
        for m in METHODS:
            sub = req[(req["alpha"] == alpha) & (req["method"] == m)]
            st = sub[sub["family"] == "stationary"]
            pe = sub[sub["family"] == "perturbed"]
            missed = ", ".join(sub[sub["meets"] == "no"]["case"]) or "none"
            lines.append(f"| {alpha} | {m} | {int((st['meets'] == 'yes').sum())}/{len(st)} | "
                         f"{int((pe['meets'] == 'yes').sum())}/{len(pe)} | {missed} |")
    return lines + [""]


def _perturbations(table: pd.DataFrame) -> list[str]:
    pert = table[(table["family"] != "stationary") & (table["method"] == "ksd") & (table["alpha"] == ALPHAS[0])]
    if pert.empty:
        return []
    lines = ["## W2 of the perturbations", "",
             "W2 used: the value the requirement is judged by (see `tools/calibration/perturbation.py`). "
             "W2 rollout: exact W2 between target samples (2000 unless `--w2-n`) after a long Langevin run of "
             "the perturbed field and as many fresh target samples, next to its noise floor (two independent "
             "target samples).",
             "",
             "| case | W2 used | lower bound | source | W2 rollout | noise floor | rollout time | description |",
             "|---|---|---|---|---|---|---|---|"]
    for r in pert.itertuples():
        lo = getattr(r, "w2_lower", math.nan)
        lo = "" if lo != lo else _fmt_w2(lo)
        lines.append(f"| {r.case} | {_fmt_w2(r.w2)} | {lo} | {r.w2_source} | {r.w2_rollout:.3f} | {r.w2_floor:.3f} | "
                     f"{r.w2_rollout_time:.1f} | {r.description} |")
    return lines + [""]


def _schedules(table: pd.DataFrame) -> list[str]:
    st = table[(table["method"] == "rollout") & (table["alpha"] == ALPHAS[0])]
    lines = ["## Rollout schedules and cost", "",
             "| case | mean eps | mean n_steps | mean seconds per seed (ksd + rollout) | description |",
             "|---|---|---|---|---|"]
    for r in st.itertuples():
        lines.append(f"| {r.case} | {r.mean_eps:.2e} | {r.mean_n_steps:.0f} | {r.mean_seconds:.2f} | {r.description} |")
    return lines + [""]


def write_summary(out: Path, table: pd.DataFrame, command: str, elapsed: dict[str, float], meta: dict) -> None:
    """Regenerate ``out/README.md`` from the table (rows of :func:`~.run.summarise`).

    ``meta`` holds ``date``, ``machine``, ``device``, ``threads``, ``jobs``, ``n``, ``seeds``
    and optionally ``history`` (the lines of ``commands.log``) and ``notes`` (``NOTES.md``,
    appended as a section). ``elapsed`` maps the cases run now to their seconds.
    """
    lines = _header(command, elapsed, meta) + _rates(table) + _requirements_met(table)
    lines += _perturbations(table) + _schedules(table)
    if meta.get("notes"):
        lines += ["## Notes", "", meta["notes"], ""]
    write_text(out / "README.md", "\n".join(lines))
