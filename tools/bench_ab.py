"""Compare the training step of a git revision with the working tree, in one process.

    python tools/bench_ab.py --base 628fc66              # B = 256, d = 2, 600 rounds
    python tools/bench_ab.py --base HEAD --batch 4096 --rounds 100

The machine is shared and its speed drifts by 5 to 10% between runs, more than most
single changes are worth. Here both versions of ``fluxbench`` are imported side by side
(the base as ``fluxbench_base`` from ``git archive``, the working tree as
``fluxbench_work``), and each round runs the base's flux step, the working tree's flux
step and the base's DSM step once each, in an order shuffled by a fixed seed: drift hits
both versions alike. Prints the median step times, both flux/dsm ratios and the mean
paired difference (work - base) with its standard error.
"""

from __future__ import annotations

import argparse
import importlib
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def missing_precondition(root: Path = ROOT) -> str | None:
    """Why this tool cannot run here, or None: it archives a revision with git, so it
    needs git on PATH and ``root`` inside a git checkout with a commit."""
    if shutil.which("git") is None:
        return "tools/bench_ab.py needs git on PATH"
    probe = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "HEAD"], capture_output=True)
    if probe.returncode != 0:
        return f"tools/bench_ab.py needs a git checkout with a commit at {root}"
    return None


def _import_as(source: Path, name: str, into: Path):
    """Copy the package directory ``source`` to ``into/name`` and import its bench module."""
    shutil.copytree(source, into / name)
    return importlib.import_module(f"{name}.bench")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="git revision to compare against (default HEAD)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args(argv)
    reason = missing_precondition()
    if reason is not None:
        parser.error(reason)
    for name in [m for m in sys.modules if m.split(".")[0] in ("fluxbench_base", "fluxbench_work")]:
        del sys.modules[name]  # a previous call's copies
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base, "fluxbench"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        sys.path.insert(0, tmp)
        try:
            base = _import_as(tmp_path / "fluxbench", "fluxbench_base", tmp_path)
            work = _import_as(ROOT / "fluxbench", "fluxbench_work", tmp_path)
        finally:
            sys.path.remove(tmp)
        base_steps = base.step_functions(args.batch, args.dim)
        steps = {
            "flux_base": base_steps["flux"],
            "flux_work": work.step_functions(args.batch, args.dim)["flux"],
            "dsm": base_steps["dsm"],
        }
        for _ in range(args.warmup):
            for fn in steps.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in steps}
        order, rng = list(steps), random.Random(0)
        for _ in range(args.rounds):
            rng.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    diff = [w - b for b, w in zip(times["flux_base"], times["flux_work"])]
    se = statistics.stdev(diff) / len(diff) ** 0.5
    print(
        f"B={args.batch} d={args.dim}, {args.rounds} rounds, base {args.base}: "
        f"flux base {1e3 * med['flux_base']:.3f} ms, work {1e3 * med['flux_work']:.3f} ms, dsm {1e3 * med['dsm']:.3f} ms; "
        f"flux/dsm base {med['flux_base'] / med['dsm']:.3f}, work {med['flux_work'] / med['dsm']:.3f}; "
        f"work - base {1e6 * statistics.mean(diff):.0f} +- {1e6 * se:.0f} us per step"
    )
    return med


if __name__ == "__main__":
    main()
