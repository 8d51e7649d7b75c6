"""W2 of the annealed recipe over seeds, flux with the proposal / normaliser off and on, beside DSM.

    .venv/bin/python tools/recipe_ablation.py [--seeds 0 1 2] [--jobs 2] [--set steps=8000 ...]
        [--configs baseline proposal normaliser both dsm] [--csv runs/ablation.csv]

Every run is exactly what ``fluxbench demo --seed S`` does for one method (``fit_and_score`` of
``fluxbench.demo``: the triangle, 2000 samples, the same reference and sampler seeds), with
``AnnealedRecipe(**overrides)``; ``--set key=value`` changes a recipe field for every config
(values are Python literals). Prints one row per config: W2 per seed, the mean W2, the mean
noise floor, mean W2 minus floor, the mean training seconds (one torch thread per job; the
machine's load changes the seconds, not the W2), and the mean paired difference to the baseline
(flux with proposal and normaliser off) with its standard error over seeds.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

CONFIGS = {
    "baseline": ("flux", {"learn_proposal": False, "normalise": False}),
    "proposal": ("flux", {"learn_proposal": True, "normalise": False}),
    "normaliser": ("flux", {"learn_proposal": False, "normalise": True}),  # the default recipe
    "both": ("flux", {"learn_proposal": True, "normalise": True}),
    "dsm": ("dsm", {}),
}


def _run(job):
    name, method, overrides, seed, target, n = job
    import torch

    torch.set_num_threads(1)
    from fluxbench.demo import fit_and_score, reference_samples, score_samples  # noqa: PLC0415
    from fluxbench.recipes import AnnealedRecipe  # noqa: PLC0415
    from fluxbench.targets import make_target  # noqa: PLC0415

    recipe = AnnealedRecipe(**overrides)
    p = make_target(target)
    reference, floor_sample = reference_samples(p, recipe.sigma_eval, n, seed)
    row, _, _ = fit_and_score(method, p.sample, recipe, reference, seed=seed)
    floor = score_samples(floor_sample, reference)["W2"]
    return {"config": name, "seed": seed, "W2": row["W2"], "floor": floor, "train_s": row["train_s"]}


def _literal(text: str):
    key, _, value = text.partition("=")
    if not key or not value:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--set", type=_literal, action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--target", default="triangle")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--csv", default=None, help="also write the per-run rows here")
    args = parser.parse_args(argv)
    common = dict(args.set)
    jobs = [
        (name, CONFIGS[name][0], {**common, **CONFIGS[name][1]}, seed, args.target, args.samples)
        for name in args.configs
        for seed in args.seeds
    ]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(_run, jobs))
    else:
        rows = [_run(job) for job in jobs]
    import pandas as pd

    runs = pd.DataFrame(rows)
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        runs.to_csv(args.csv, index=False)
    wide = runs.pivot(index="config", columns="seed", values="W2").reindex(args.configs)
    wide.columns = [f"W2 seed {s}" for s in wide.columns]
    summary = runs.groupby("config").agg(W2=("W2", "mean"), floor=("floor", "mean"), train_s=("train_s", "mean"))
    table = wide.join(summary)
    table["W2 - floor"] = table["W2"] - table["floor"]
    if "baseline" in wide.index and len(args.seeds) > 1:
        # paired over seeds (same data, reference and sampler noise): mean difference and its SE
        diff = runs.pivot(index="config", columns="seed", values="W2").reindex(args.configs)
        diff = diff - diff.loc["baseline"]
        table["vs baseline"] = diff.mean(axis=1)
        table["SE"] = diff.std(axis=1, ddof=1) / len(args.seeds) ** 0.5
    print(f"# {args.target}, AnnealedRecipe({', '.join(f'{k}={v!r}' for k, v in common.items())}), seeds {args.seeds}, n={args.samples}")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"# {len(jobs)} runs in {time.perf_counter() - t0:.0f} s ({args.jobs} job(s)); command: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
