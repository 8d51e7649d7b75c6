"""The command: ``python -m tools.calibration`` (run from the repository root)."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from fluxbench.argtypes import device_arg, positive_int
from fluxbench.fileio import write_text

from .cases import CASE_BY_NAME, CASES, QUICK_CASES, select_cases
from .markdown import write_summary
from .perturbation import perturbation_w2
from .run import ALPHAS, REQUIRED_METHODS, CaseJob, map_jobs, run_job, summarise
from .storage import append_case, in_case_order, read_table

__all__ = ["build_parser", "main"]

PROG = "python -m tools.calibration"
NOTES_FILE = "NOTES.md"
EXAMPLES = f"""examples:
  {PROG} --quick --out /tmp/cal            # 10 seeds of {len(QUICK_CASES)} cases: a smoke run
  {PROG} --jobs 2                          # every case, 100 seeds, into results/calibration
  {PROG} --cases 'iso2-*,triangle-*' --seeds 20 --out /tmp/cal
  {PROG} --rerun-ksd --jobs 2              # after a change to the KSD test: same samples, new KSD p-values
  {PROG} --device cuda --jobs 1 --out runs/calibration-cuda
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m tools.calibration``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Measure the size and power of fluxbench's stationarity tests (SPEC section 5: "
        "measured, never assumed). Resumable: cases already in OUT/calibration.csv with the same N and "
        "number of seeds are skipped.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds", type=positive_int(1), default=100, help="seeds per case (default 100)")
    parser.add_argument("--n", type=positive_int(1), default=2000, help="samples per seed (default 2000)")
    parser.add_argument("--quick", action="store_true",
                        help=f"10 seeds on {len(QUICK_CASES)} cases ({', '.join(QUICK_CASES)}), written to OUT/quick")
    parser.add_argument("--cases", default=None, help="comma-separated case names or glob patterns (see --list)")
    parser.add_argument("--out", default="results/calibration", help="output directory (default results/calibration)")
    parser.add_argument("--device", type=device_arg, default=torch.device("cpu"), help="torch device of the tests, e.g. cpu, cuda, cuda:1 (default "
                        "cpu); the samples are drawn on the CPU, so every device tests the same points")
    parser.add_argument("--jobs", type=positive_int(1), default=1, help="worker processes, one case each (default 1)")
    parser.add_argument("--threads", type=positive_int(1), default=1,
                        help="torch threads per worker process (default 1: JOBS processes of several threads "
                        "each oversubscribe a machine with few cores and run slower than one thread each)")
    parser.add_argument("--progress", action="store_true", help="print every seed")
    parser.add_argument("--w2-n", type=positive_int(1), default=2000, help="points of the W2 estimates of the perturbations")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    rerun = parser.add_mutually_exclusive_group()
    rerun.add_argument("--rerun-rollout", action="store_true",
                       help="recompute the rollout p-values of the cases already in the CSV, reusing their KSD p-values")
    rerun.add_argument("--rerun-ksd", action="store_true",
                       help="recompute the KSD p-values of the cases already in the CSV, reusing their rollout p-values")
    parser.add_argument("--refresh-w2", action="store_true",
                        help="recompute the W2 columns of the cases already in the CSV (seeds are not rerun)")
    return parser


def _meta(args: argparse.Namespace, out: Path, seeds: int, command: str) -> dict:
    """Provenance of this run for the summary; appends the command to ``out/commands.log``."""
    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"Python {platform.python_version()}",
        "device": str(args.device),
        "threads": args.threads,
        "jobs": args.jobs,
        "n": args.n,
        "seeds": seeds,
    }
    history_path = out / "commands.log"
    history = history_path.read_text() if history_path.exists() else ""
    history += f"{meta['date']}  {command}\n"
    write_text(history_path, history)
    meta["history"] = history
    notes = out / NOTES_FILE
    if notes.exists():
        meta["notes"] = notes.read_text()
    return meta


def _refresh_w2(existing: pd.DataFrame, cases: list[str], csv_path: Path, pv_path: Path, args) -> pd.DataFrame:
    """Recompute the W2 columns of the perturbed cases in ``existing`` from the stored p-values."""
    torch.set_num_threads(args.threads)  # this process does the work (the cases set theirs in run_job)
    table = existing
    pv_all = read_table(pv_path)
    for name in dict.fromkeys(existing["case"]):
        case = CASE_BY_NAME.get(name)
        if case is None or case.family == "stationary" or name not in cases:
            continue
        start = time.perf_counter()
        n = int(existing[existing["case"] == name]["n"].iloc[0])
        rows = summarise(case, pv_all[pv_all["case"] == name], perturbation_w2(case, n=args.w2_n, device=args.device), n)
        table = append_case(csv_path, rows, name)
        print(f"refreshed W2 of {name}: {rows['w2'].iloc[0]:.4g} ({rows['w2_source'].iloc[0]}) "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
    return table


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for c in CASES:
            print(f"{c.name:24s} {c.family:10s} {c.description}")
        return 0
    out = Path(args.out)
    seeds = args.seeds
    cases = [c.name for c in CASES]
    if args.quick:
        out = out / "quick"
        seeds = 10 if args.seeds == 100 else args.seeds
        cases = list(QUICK_CASES)
    if args.cases:
        cases = select_cases(args.cases, cases)
        if not cases:
            parser.error(f"no case matches {args.cases!r}; see --list")
    out.mkdir(parents=True, exist_ok=True)
    csv_path, pv_path = out / "calibration.csv", out / "pvalues.csv"
    existing = read_table(csv_path)
    done = set()
    if existing is not None:
        same = existing[(existing["n"] == args.n) & (existing["n_seeds"] == seeds)]
        done = set(same["case"])
    ksd_reuse: dict[str, pd.DataFrame] = {}
    rollout_reuse: dict[str, pd.DataFrame] = {}
    if args.rerun_rollout or args.rerun_ksd:
        old_pv = read_table(pv_path)
        if old_pv is not None:
            kept = {c: old_pv[old_pv["case"] == c] for c in done}
            if args.rerun_rollout:
                ksd_reuse = kept
            else:
                rollout_reuse = kept
        done = set()
    # the perturbed cases first (they decide the design), then the stationary ones
    todo = sorted((c for c in cases if c not in done), key=lambda c: CASE_BY_NAME[c].family == "stationary")
    if args.refresh_w2:
        todo = []
    command = f"{PROG} " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = _meta(args, out, seeds, command)
    print(f"calibration: {len(todo)} case(s) to run ({len(cases) - len(todo)} already in {csv_path}), "
          f"{seeds} seeds, N = {args.n}, device {args.device}", flush=True)
    elapsed: dict[str, float] = {}
    table = existing if existing is not None else pd.DataFrame()
    jobs = [CaseJob(c, args.n, seeds, args.w2_n, str(args.device), args.threads, args.progress, ksd_reuse.get(c),
                    rollout_reuse.get(c)) for c in todo]

    def record(name: str, rows: pd.DataFrame, pv: pd.DataFrame, secs: float) -> None:
        nonlocal table
        table = in_case_order(append_case(csv_path, rows, name))
        append_case(pv_path, pv, name)
        elapsed[name] = secs
        write_summary(out, table, command, elapsed, meta)
        r = rows[(rows["alpha"] == ALPHAS[0])].set_index("method")["rate"]
        print(f"[{len(elapsed)}/{len(todo)}] {name}: " + ", ".join(f"{m} {r[m]:.2f}" for m in REQUIRED_METHODS)
              + f" (alpha {ALPHAS[0]}) in {secs:.0f} s", flush=True)

    if args.refresh_w2 and existing is not None:
        table = _refresh_w2(existing, cases, csv_path, pv_path, args)
    else:
        for res in map_jobs(run_job, jobs, args.jobs):
            record(*res)
    if not table.empty:
        write_summary(out, in_case_order(table), command, elapsed, meta)
    return 0
