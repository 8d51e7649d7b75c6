"""Plot asv results against commits: a step time and a sample-quality benchmark (README figure).

    python tools/asv_plot.py                         # results/asv -> results/asv/dashboard.png
    python tools/asv_plot.py --results results/asv --out runs/dashboard.png --machine vm

Reads the JSON files ``asv run`` writes (``results_dir`` of asv.conf.json: one folder per
machine, one file per commit and environment), flattens them into a pandas table (one row
per benchmark, parameter set and commit) and draws, in main's commit order,

* left: ``TrainingStep.time_step`` of flux and DSM (``--network``, ``--batch``, ``--dim``, CPU);
* right: ``AnnealedQuality.track_w2`` of flux and DSM on ``--target`` beside its noise floor.

The same figures are on the dashboard ``asv publish`` builds (.asv/html); this is a static copy
of two of its graphs for the README. Missing values (a benchmark skipped or failed at a
commit, or not run there) are gaps.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
from pathlib import Path

import pandas as pd

__all__ = ["load_results", "main"]


def load_results(results_dir: str | Path, machine: str | None = None) -> pd.DataFrame:
    """One row per (commit, environment, benchmark, parameter set) with its value.

    Columns: commit, date, env, benchmark, value, and one column per parameter name
    (from the suite's ``benchmarks.json``), as strings, as asv stores them.

    Raises:
        ValueError: no results folder, no machine folder, or a result file asv did not write.
    """
    root = Path(results_dir)
    meta_path = root / "benchmarks.json"
    if not meta_path.is_file():
        raise ValueError(f"{meta_path} not found: run `asv run` first (results_dir of asv.conf.json)")
    meta = json.loads(meta_path.read_text())
    machines = sorted(p for p in root.iterdir() if p.is_dir() and (machine is None or p.name == machine))
    if not machines:
        raise ValueError(f"no machine folder{'' if machine is None else f' named {machine!r}'} under {root}")
    rows = []
    for folder in machines:
        for path in sorted(folder.glob("*.json")):
            if path.name == "machine.json":
                continue
            data = json.loads(path.read_text())
            if "result_columns" not in data or "results" not in data:
                raise ValueError(f"{path} is not an asv result file (no result_columns/results)")
            col = {name: i for i, name in enumerate(data["result_columns"])}
            for name, entry in data["results"].items():
                names = meta.get(name, {}).get("param_names", [])
                values = entry[col["result"]]
                params = entry[col["params"]] if "params" in col and len(entry) > col["params"] else []
                if not names:
                    values, params = [values] if not isinstance(values, list) else values, []
                combos = list(itertools.product(*params)) if params else [()]
                if values is None:  # the whole benchmark failed at this commit
                    values = [None] * len(combos)
                for combo, value in zip(combos, values):
                    rows.append(
                        {
                            "machine": folder.name,
                            "commit": data["commit_hash"],
                            "date": pd.to_datetime(data["date"], unit="ms"),
                            "env": data.get("env_name", ""),
                            "benchmark": name,
                            "value": float("nan") if value is None else float(value),
                            **{n: str(v).strip("'") for n, v in zip(names, combo)},
                        }
                    )
    return pd.DataFrame(rows)


def main_order(commits: list[str], branch: str = "main") -> list[str]:
    """``commits`` sorted by their position on ``branch`` (oldest first); others dropped."""
    order = subprocess.run(["git", "rev-list", "--reverse", branch], capture_output=True, text=True, check=True).stdout.split()
    wanted = set(commits)
    return [c for c in order if c in wanted]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results/asv", help="asv results_dir (default results/asv)")
    parser.add_argument("--out", default="results/asv/dashboard.png", help="PNG to write")
    parser.add_argument("--machine", default=None, help="asv machine name (default: every machine folder)")
    parser.add_argument("--network", default="mlp", choices=["mlp", "sequential"])
    parser.add_argument("--batch", default="4096")
    parser.add_argument("--dim", default="2")
    parser.add_argument("--target", default="mixture2d", choices=["mixture2d", "anisotropic8d"])
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = load_results(args.results, args.machine)
    commits = main_order(table["commit"].unique().tolist())
    if not commits:
        parser.error("none of the results' commits is on main")
    pos = {c: i for i, c in enumerate(commits)}
    table = table[table["commit"].isin(pos)].assign(x=lambda t: t["commit"].map(pos))

    fig, (ax_t, ax_q) = plt.subplots(1, 2, figsize=(11, 4))
    steps = table[
        (table["benchmark"] == "bench_objectives.TrainingStep.time_step")
        & (table["device"] == "cpu")
        & (table["network"] == args.network)
        & (table["B"] == args.batch)
        & (table["d"] == args.dim)
    ]
    for method, part in steps.groupby("method"):
        part = part.sort_values("x")
        ax_t.plot(part["x"], 1e3 * part["value"], "o-", label=method)
    ax_t.set(yscale="log", ylabel="ms per training step", title=f"one step, {args.network}, B={args.batch}, d={args.dim}, CPU")
    quality = table[
        table["benchmark"].str.startswith("bench_quality.AnnealedQuality.track_w2")
        & (table["device"] == "cpu")
        & (table["target"] == args.target)
    ]
    for (bench, method), part in quality.groupby(["benchmark", "method"]):
        if bench.endswith("noise_floor") and method != "flux":
            continue  # the floor does not depend on the method: draw it once
        label = "noise floor" if bench.endswith("noise_floor") else method
        part = part.sort_values("x")
        ax_q.plot(part["x"], part["value"], "s--" if label == "noise floor" else "o-", label=label)
    ax_q.set(ylabel="W2 to the target", title=f"annealed recipe at a fixed budget, {args.target}, CPU")
    for ax in (ax_t, ax_q):
        ax.set_xticks(range(len(commits)), [c[:7] for c in commits], rotation=60, fontsize=7)
        ax.set_xlim(-0.5, len(commits) - 0.5)
        ax.set_xlabel("commit on main (oldest left)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out} ({len(commits)} commits, {len(table)} values)")
    return out


if __name__ == "__main__":
    main()
