"""Compare lengthscale grids of the KSD test (or the rollout's paired MMD) on the calibration cases, on seeds apart from the table's.

    python -m tools.ksd_grid --jobs 2                          # defaults below, about 20 min here
    python -m tools.ksd_grid --test rollout --jobs 2           # the rollout's MMD, seeds 1000-1019
    python -m tools.ksd_grid --cases 'iso2-*' --seeds 1000 1020 --out /tmp/grid
    python -m tools.ksd_grid --render                          # rewrite README.md from rates.csv

Run from the repository root (it imports the calibration's cases, ``tools.calibration``).
For every case and seed the samples are those of ``python -m tools.calibration``
(:func:`tools.calibration.cases.seed_samples`), and one pass of the KSD
(:func:`fluxbench.verify.stein.ksd_bootstrap`, the same code as ``ksd_test``)
gives the standardised statistic z_l and its wild-bootstrap draws z*_{l,b} for every
lengthscale of a fine grid (``FINE_FACTORS`` x the median heuristic), with the
multipliers shared by all lengthscales. The test of any sub-grid G is then exact without
another pass: T = max_{l in G} z_l, p = (1 + #{b : max_{l in G} z*_{l,b} >= T}) / (1 + B),
which is the kernels' part of ``ksd_test(lengthscale_factors=G, seed=s)``
(``details["p_value_kernels"]``; the mode test functions of ``fluxbench.verify.modes``
join that maximum in the full test, and are not compared here).

The grid of ``DEFAULT_LENGTHSCALE_FACTORS`` was chosen from this table on seeds
1000-1099; the calibration table (``results/calibration``, seeds 0-99) is the held-out
evaluation of that choice.

With ``--test rollout`` the same is done for the rollout test's paired MMD: the chains of
``rollout_test`` (:func:`fluxbench.verify.rollout.rollout_chains`, the same draws),
then one wild-bootstrap pass of the paired MMD over the fine grid; a sub-grid's p-value is
``rollout_test(mmd_lengthscale_factors=G, seed=s)``'s. Its default, the median alone, was
chosen from that table on seeds 1000-1019 (``results/calibration/rollout-grid/``).

Writes ``OUT/rates.csv`` (case, family, grid, rejections, rate, se at alpha = 0.01),
``OUT/run.md`` (the command, date and machine) and ``OUT/README.md`` (both, as a table).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from fluxbench.fileio import write_text
from fluxbench._random import generator_from_seed
from fluxbench.kernels import median_bandwidth
from fluxbench.metrics.mmd import paired_mmd_bootstrap
from fluxbench.ustat import default_n_bootstrap, max_p_values
from fluxbench.verify._inputs import evaluate_field
from fluxbench.verify.rollout import rollout_chains
from fluxbench.verify.stein import DEFAULT_LENGTHSCALE_FACTORS, ksd_bootstrap, resolve_lengthscales

from tools.calibration.cases import CASE_BY_NAME, CASES, make_case, seed_samples, select_cases
from tools.calibration.run import map_jobs

FINE_FACTORS = (0.25, 0.35, 0.5, 0.71, 1.0, 1.41, 2.0, 4.0)
GRIDS = {
    "0.25-4 (5)": (0.25, 0.5, 1.0, 2.0, 4.0),
    "0.25-1 (3)": (0.25, 0.5, 1.0),
    "0.5-2 (3)": (0.5, 1.0, 2.0),
    "0.25-2 (4)": (0.25, 0.5, 1.0, 2.0),
    "0.35-1.41 (4)": (0.35, 0.71, 1.0, 1.41),
    "0.25, 1": (0.25, 1.0),
    "0.35, 1": (0.35, 1.0),
    "1 (median)": (1.0,),
    "0.25": (0.25,),
    "2": (2.0,),
    "4": (4.0,),
}
DEFAULT_CASES = tuple(c.name for c in CASES if c.family != "stationary") + (
    "iso2-score", "iso20-score", "triangle-score", "ring-score", "aniso2-rot_scalar",
)
ALPHA = 0.01


def case_draws(name: str, seeds: range, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z (S, L) and z* (S, L, B) of one case over the seeds, L = len(FINE_FACTORS)."""
    target, field, _ = make_case(CASE_BY_NAME[name])
    zs, zbs = [], []
    for s in seeds:
        x = seed_samples(target, s, n)
        gen = generator_from_seed(s, x.device)  # as ksd_test: median subsample, then multipliers
        ells, _ = resolve_lengthscales(x, None, factors=FINE_FACTORS, generator=gen)
        res = ksd_bootstrap(x, evaluate_field(field, x), ells, default_n_bootstrap(n), gen, 1024)
        zs.append(res.z)
        zbs.append(res.z_boot.float())
    return torch.stack(zs), torch.stack(zbs)


def rollout_case_draws(name: str, seeds: range, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`case_draws` for the rollout's paired MMD (``rollout_test``'s default design)."""
    target, field, _ = make_case(CASE_BY_NAME[name])
    zs, zbs = [], []
    for s in seeds:
        x = seed_samples(target, s, n)
        gen = generator_from_seed(s, x.device)  # as rollout_test: chains, median subsample, multipliers
        evaluate_field(field, x)
        end, _, _, _ = rollout_chains(field, x, gen)
        med = median_bandwidth(end, x, generator=gen)
        res = paired_mmd_bootstrap(x, end, [c * med for c in FINE_FACTORS], default_n_bootstrap(n), gen)
        zs.append(res.z)
        zbs.append(res.z_boot.float())
    return torch.stack(zs), torch.stack(zbs)


#: per test: the draws, the default grid of the library, the output folder and the seeds
TESTS = {
    "ksd": (case_draws, tuple(DEFAULT_LENGTHSCALE_FACTORS), "results/calibration/ksd-grid", (1000, 1100)),
    "rollout": (rollout_case_draws, (1.0,), "results/calibration/rollout-grid", (1000, 1020)),
}


def grid_p_values(z: torch.Tensor, zb: torch.Tensor, grid: tuple[float, ...]) -> torch.Tensor:
    """(S,) p-values of the max-over-``grid`` test from the fine pass's z (S, L) and z* (S, L, B)."""
    idx = [FINE_FACTORS.index(c) for c in grid]
    return max_p_values(z[:, idx], zb[:, idx, :])


def grid_rates(name: str, z: torch.Tensor, zb: torch.Tensor) -> list[dict]:
    rows = []
    for label, grid in GRIDS.items():
        p = grid_p_values(z, zb, grid)
        rej = int((p < ALPHA).sum())
        rate = rej / len(p)
        rows.append({"case": name, "family": CASE_BY_NAME[name].family, "grid": label, "n_seeds": len(p),
                     "rejections": rej, "rate": rate, "se": (rate * (1 - rate) / len(p)) ** 0.5})
    return rows


def _job(args: tuple) -> tuple[str, list[dict], float]:
    test, name, seeds, n = args
    torch.set_num_threads(1)
    start = time.perf_counter()
    z, zb = TESTS[test][0](name, seeds, n)
    return name, [{"test": test, **r} for r in grid_rates(name, z, zb)], time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--test", choices=tuple(TESTS), default="ksd")
    parser.add_argument("--cases", default=None, help="comma-separated case names or glob patterns")
    parser.add_argument("--seeds", type=int, nargs=2, default=None, metavar=("START", "STOP"),
                        help="default 1000 1100 (ksd), 1000 1020 (rollout)")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", default=None, help="default results/calibration/{ksd,rollout}-grid")
    parser.add_argument("--render", action="store_true", help="rewrite OUT/README.md from OUT/rates.csv and exit")
    args = parser.parse_args(argv)
    _, _, default_out, default_seeds = TESTS[args.test]
    args.out = args.out or default_out
    if args.render:
        render(Path(args.out))
        return 0
    cases = list(DEFAULT_CASES)
    if args.cases:
        cases = select_cases(args.cases, list(CASE_BY_NAME))
        if not cases:
            parser.error(f"no case matches {args.cases!r}")
    seeds = range(*(args.seeds or default_seeds))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m tools.ksd_grid " + " ".join(argv if argv is not None else sys.argv[1:])
    date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    jobs = [(args.test, c, seeds, args.n) for c in cases]
    rows: list[dict] = []
    seconds = 0.0

    def record(name: str, case_rows: list[dict], secs: float) -> None:
        nonlocal seconds
        rows.extend(case_rows)
        seconds += secs
        write_outputs(out, pd.DataFrame(rows), command, date, seconds, seeds, args.n)
        print(f"{name}: {secs:.0f} s", flush=True)

    for res in map_jobs(_job, jobs, args.jobs):
        record(*res)
    return 0


def write_outputs(out: Path, rates: pd.DataFrame, command: str, date: str, seconds: float, seeds: range, n: int) -> None:
    buf = io.StringIO()
    rates.to_csv(buf, index=False)
    write_text(out / "rates.csv", buf.getvalue())
    header = [
        f"- command: `{command}`",
        f"- date: {date}",
        f"- machine: {platform.platform()}, {platform.machine()}, torch {torch.__version__}, one thread per process",
        f"- N = {n} samples per seed; seeds {seeds.start}-{seeds.stop - 1} (the calibration table uses 0-99);"
        f" CPU seconds summed over cases: {seconds:.0f}",
    ]
    write_text(out / "run.md", "\n".join(header) + "\n")
    render(out)


def render(out: Path) -> None:
    """OUT/README.md from OUT/rates.csv and the run's header in OUT/run.md."""
    rates = pd.read_csv(out / "rates.csv")
    test = str(rates["test"].iloc[0]) if "test" in rates else "ksd"  # tables from before --test are the KSD's
    order = {c: i for i, c in enumerate(CASE_BY_NAME)}
    table = rates.pivot(index="case", columns="grid", values="rate")[[g for g in GRIDS if g in set(rates["grid"])]]
    table = table.loc[sorted(table.index, key=order.get)]
    default = next((g for g, f in GRIDS.items() if f == TESTS[test][1]), None)
    title, function, constant = {
        "ksd": ("KSD", "ksd_test", "DEFAULT_LENGTHSCALE_FACTORS"),
        "rollout": ("Rollout paired-MMD", "rollout_test", "mmd_lengthscale_factors=None"),
    }[test]
    lines = [
        f"# {title} lengthscale grids compared (rejection rate at alpha = 0.01)",
        "",
        "Produced by `tools/ksd_grid.py` (see its docstring for the protocol).",
        "",
        *(out / "run.md").read_text().splitlines(),
        "",
        "Columns are grids in units of the median heuristic (the maximum of standardised statistics over",
        "the grid, wild bootstrap shared across lengthscales). Rows: perturbed cases are detection",
        "rates, stationary cases false-alarm rates; SE = sqrt(rate (1 - rate) / n_seeds) <= 0.05.",
        f"The default of `{function}` (`{constant}`) is the column `{default}`.",
        "",
        "| case | " + " | ".join(table.columns) + " |",
        "|---|" + "---|" * len(table.columns),
    ]
    for case, r in table.iterrows():
        lines.append(f"| {case} | " + " | ".join("" if pd.isna(v) else f"{v:.2f}" for v in r) + " |")
    write_text(out / "README.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
