"""Running one calibration case: the p-values of every seed, and the rows of the table.

For every seed, N exact samples of the target (:func:`~.cases.seed_samples`) are tested
with ``method="ksd"`` and ``method="rollout"`` (default options, ``seed`` = the seed).
``"combined"`` is derived from the same two p-values by
:func:`fluxbench.verify.combined_p_value`, which is exactly what
``stationarity_test(method="combined", seed=seed)`` computes (it runs the two sub-tests with
the same seed and options). Three diagnostic variants of the KSD come from the same pass:
``ksd_kernels`` (the lengthscale grid alone, without the mode test functions),
``ksd_median`` (the median-heuristic lengthscale alone) and ``ksd_sum`` (the sum of the
kernels' standardised statistics instead of their maximum).

Requirements: stationary cases, ``rate <= alpha + 2 se`` with
``se = sqrt(rate (1 - rate) / n_seeds)``; perturbed cases with W2 >= 0.1, ``rate >= 0.9``.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pandas as pd
import torch

from fluxbench.verify import combined_p_value, ksd_test, rollout_test

from .cases import CASE_BY_NAME, Case, make_case, seed_samples
from .perturbation import perturbation_w2

__all__ = [
    "ALPHAS", "METHODS", "REQUIRED_METHODS", "W2_THRESHOLD", "POWER_TARGET", "CaseJob", "run_case", "summarise",
    "run_job", "map_jobs",
]  # fmt: skip

ALPHAS = (0.01, 0.05)
METHODS = ("ksd", "rollout", "combined", "ksd_kernels", "ksd_median", "ksd_sum")
REQUIRED_METHODS = ("ksd", "rollout", "combined")
W2_THRESHOLD = 0.1
POWER_TARGET = 0.9
KSD_COLUMNS = ("p_ksd", "p_ksd_kernels", "p_ksd_median", "p_ksd_sum", "ksd_seconds")
ROLLOUT_COLUMNS = ("p_rollout", "rollout_seconds", "eps", "n_steps")


def run_case(case: Case, *, n: int, n_seeds: int, seed_offset: int = 0, progress: bool = False,
             ksd_rows: pd.DataFrame | None = None, rollout_rows: pd.DataFrame | None = None,
             device: torch.device | str = "cpu") -> pd.DataFrame:
    """All seeds of one case: a DataFrame of p-values (one row per seed).

    ``ksd_rows`` / ``rollout_rows`` (earlier p-values of the case, one row per seed) skip
    that test for the seeds they hold and reuse its columns: the samples of a seed are the
    same in every run, so only the other test is recomputed (``--rerun-rollout``,
    ``--rerun-ksd``). The tests run on ``device``.
    """

    def by_seed(rows: pd.DataFrame | None) -> dict:
        return {} if rows is None else {int(r["seed"]): r for _, r in rows.iterrows()}

    target, field, _ = make_case(case)
    ksd_reuse, rollout_reuse = by_seed(ksd_rows), by_seed(rollout_rows)
    rows = []
    for s in range(seed_offset, seed_offset + n_seeds):
        x = seed_samples(target, s, n, device)
        t0 = time.perf_counter()
        if s in ksd_reuse:
            ksd = {k: float(ksd_reuse[s][k]) for k in KSD_COLUMNS}
        else:
            rk = ksd_test(field, x, seed=s)
            ksd = {"p_ksd": rk.p_value, "p_ksd_kernels": rk.details["p_value_kernels"],
                   "p_ksd_median": rk.details.get("p_value_median", math.nan),
                   "p_ksd_sum": rk.details["p_value_sum"], "ksd_seconds": time.perf_counter() - t0}
        t1 = time.perf_counter()
        if s in rollout_reuse:
            roll = {k: rollout_reuse[s][k] for k in ROLLOUT_COLUMNS}
        else:
            rr = rollout_test(field, x, seed=s, compute_w2=False)
            roll = {"p_rollout": rr.p_value, "rollout_seconds": time.perf_counter() - t1, "eps": rr.eps,
                    "n_steps": rr.n_steps}
        rows.append(
            {
                "case": case.name,
                "seed": s,
                "p_ksd": ksd["p_ksd"],
                "p_ksd_kernels": ksd["p_ksd_kernels"],
                "p_ksd_median": ksd["p_ksd_median"],
                "p_ksd_sum": ksd["p_ksd_sum"],
                "p_rollout": float(roll["p_rollout"]),
                "p_combined": combined_p_value(ksd["p_ksd"], float(roll["p_rollout"])),
                "ksd_seconds": ksd["ksd_seconds"],
                "rollout_seconds": float(roll["rollout_seconds"]),
                "eps": float(roll["eps"]),
                "n_steps": int(roll["n_steps"]),
            }
        )
        if progress:
            print(f"  {case.name} seed {s}: p_ksd {ksd['p_ksd']:.3f} p_rollout {float(roll['p_rollout']):.3f} "
                  f"({ksd['ksd_seconds']:.2f} s + {float(roll['rollout_seconds']):.2f} s)", flush=True)
    return pd.DataFrame(rows)


def _requirement(case: Case, rate: float, se: float, alpha: float, w2v: float) -> tuple[str, str]:
    """(requirement, "yes" / "no" / "not required") of one rate."""
    if case.family == "stationary":
        return "rate <= alpha + 2 se", "yes" if rate <= alpha + 2 * se + 1e-12 else "no"
    if case.family == "limit":
        return "none (documented limit, outside the required set)", "not required"
    if w2v >= W2_THRESHOLD:
        return f"rate >= {POWER_TARGET}", "yes" if rate >= POWER_TARGET else "no"
    return f"none (W2 < {W2_THRESHOLD})", "not required"


def summarise(case: Case, pv: pd.DataFrame, w2info: dict | None, n: int) -> pd.DataFrame:
    """Rows of calibration.csv for one case: one per method x alpha."""
    rows = []
    n_seeds = len(pv)
    info = w2info or {}
    w2v = info.get("w2", math.nan)
    for method in METHODS:
        for alpha in ALPHAS:
            rej = int((pv[f"p_{method}"] < alpha).sum())
            rate = rej / n_seeds
            se = math.sqrt(rate * (1 - rate) / n_seeds)
            req, meets = _requirement(case, rate, se, alpha, w2v)
            rows.append(
                {
                    "case": case.name,
                    "family": case.family,
                    "target": case.target,
                    "d": case.d,
                    "field": case.field,
                    "method": method,
                    "alpha": alpha,
                    "n": n,
                    "n_seeds": n_seeds,
                    "rejections": rej,
                    "rate": rate,
                    "se": se,
                    "w2": w2v,
                    "w2_lower": info.get("w2_lower", math.nan),
                    "w2_source": info.get("w2_source", ""),
                    "w2_rollout": info.get("w2_rollout", math.nan),
                    "w2_floor": info.get("w2_floor", math.nan),
                    "w2_rollout_time": info.get("w2_rollout_time", math.nan),
                    "requirement": req,
                    "meets": meets,
                    "mean_seconds": float(pv["ksd_seconds"].mean() + pv["rollout_seconds"].mean()),
                    "mean_eps": float(pv["eps"].mean()),
                    "mean_n_steps": float(pv["n_steps"].mean()),
                    "description": case.description,
                }
            )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class CaseJob:
    """One case to run in a worker process (picklable: the pool sends it by value)."""

    name: str
    n: int
    n_seeds: int
    w2_n: int
    device: str = "cpu"
    threads: int = 1
    progress: bool = False
    ksd_rows: pd.DataFrame | None = None
    rollout_rows: pd.DataFrame | None = None


def run_job(job: CaseJob) -> tuple[str, pd.DataFrame, pd.DataFrame, float]:
    """``(name, table rows, p-values, seconds)`` of one case, in ``job.threads`` torch threads."""
    # set in every worker: a spawned process starts with torch's default (all cores)
    torch.set_num_threads(job.threads)
    case = CASE_BY_NAME[job.name]
    start = time.perf_counter()
    pv = run_case(case, n=job.n, n_seeds=job.n_seeds, progress=job.progress, ksd_rows=job.ksd_rows,
                  rollout_rows=job.rollout_rows, device=job.device)
    w2info = perturbation_w2(case, n=job.w2_n, device=job.device) if case.family != "stationary" else None
    return job.name, summarise(case, pv, w2info, job.n), pv, time.perf_counter() - start


def map_jobs(fn: Callable, jobs: Iterable, processes: int) -> Iterator:
    """``fn(job)`` for every job, in this process (``processes`` <= 1) or in a pool of that many
    worker processes; results in the order they finish. ``fn`` must be importable by name."""
    if processes <= 1:
        yield from map(fn, jobs)
        return
    # spawn: a forked child would inherit torch's thread pools (and a CUDA context)
    with mp.get_context("spawn").Pool(processes) as pool:
        yield from pool.imap_unordered(fn, jobs)
