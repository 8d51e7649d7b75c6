"""Run a suite: its tier's runs (one shard of them), skipping what is recorded, appending each finished run.

:func:`run_suite` enumerates the runs of a tier (:meth:`Suite.runs`), keeps shard i of n
(round-robin), drops the run keys that the records file already holds for this commit
and suite hash, and measures the rest one at a time. Each run's rows are appended to the
records atomically as soon as it finishes (:meth:`fluxbench.suites.records.Records.append`),
so an interrupted suite loses nothing it finished and a rerun picks up where it stopped.

What a run measures depends on the suite's kind: :mod:`.measure_sampling` (fit, sample,
Langevin rollouts scored at log-spaced checkpoints, stationarity test),
:mod:`.measure_rollout` (long rollouts from the data and from a far start, time to the
noise floor, integrated autocorrelation times) and :mod:`.measure_estimator` (gradient
SNR, finite-batch bias c*, loss mass by t).
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from .perturb import Perturbation, parse_perturb
from .records import Records
from .spec import Run, Suite, parse_shard, shard_runs

__all__ = ["run_suite", "provenance", "git_commit", "RunContext", "resolve_device", "run_seed"]

_PROVENANCE_CACHE: dict[str, str] = {}


def git_commit(repo: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` of the repository holding fluxbench (or ``repo``).

    "+dirty" is appended when tracked files other than records and reports (``results/``,
    ``runs/``) differ from HEAD; "unknown" outside a git checkout. Computed once per process
    and directory, so that one suite run has one commit even while it writes its records.
    """
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[2]
    key = str(repo)
    if key in _PROVENANCE_CACHE:
        return _PROVENANCE_CACHE[key]
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":(exclude)results", ":(exclude)runs"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()
        commit = head[:12] + ("+dirty" if status else "")
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    _PROVENANCE_CACHE[key] = commit
    return commit


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> cpu; otherwise ``torch.device(device)``, checked to be usable.

    Raises:
        ValueError: an unknown device string or an unavailable CUDA / MPS device.
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available here")
    return dev


def provenance(device: torch.device) -> dict[str, str]:
    """The provenance columns of every row: device, dtype, torch version, git commit."""
    name = str(device)
    if device.type == "cuda":
        name = f"{device}:{torch.cuda.get_device_name(device)}"
    return {"device": name.replace(",", " "), "dtype": "float32", "torch": torch.__version__, "commit": git_commit()}


def run_seed(run: Run, salt: str) -> int:
    """A seed for one random stream of a run: shared by every objective and model of the same
    (target, seed) (so flux and DSM are scored against the same reference samples), and
    independent of the shard and of the order of runs."""
    digest = hashlib.sha256(f"{run.target.name}|{run.seed}|{salt}".encode()).hexdigest()
    return int(digest[:8], 16)


@dataclass
class RunContext:
    """What a measurer gets: the run, the tier's budget, the suite's config, device, perturbation."""

    run: Run
    suite: Suite
    budget: dict[str, Any]
    device: torch.device
    perturbation: Perturbation | None = None
    artifacts_dir: Path | None = None
    log: Callable[[str], None] = field(default=lambda msg: None)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.suite.config)

    @property
    def sigma_eval(self) -> float:
        return float(self.suite.config.get("sigma_eval", self.suite.config.get("recipe", {}).get("sigma_min", 0.02)))

    def step_size(self) -> float:
        if self.run.target.step_size is not None:
            return self.run.target.step_size
        return float(self.suite.config.get("sampler", {}).get("step_size", 0.01))

    def generator(self, salt: str) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(run_seed(self.run, salt))


def _measurer(kind: str) -> Callable[[RunContext], list[dict[str, Any]]]:
    if kind == "sampling":
        from .measure_sampling import measure_sampling

        return measure_sampling
    if kind == "long-rollout":
        from .measure_rollout import measure_rollout

        return measure_rollout
    from .measure_estimator import measure_estimator

    return measure_estimator


def run_suite(
    suite: Suite,
    *,
    tier: str,
    records: Records | str | Path,
    device: str | torch.device | None = None,
    shard: tuple[int, int] | str | None = None,
    artifacts_dir: str | Path | None = None,
    perturb: str | Perturbation | None = None,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Run the missing runs of one shard of a suite's tier; append each finished run's rows.

    Args:
        suite: a :class:`Suite` (:func:`fluxbench.suites.load_suite`).
        tier: "quick" or "full".
        records: the records file (a :class:`Records` or a path).
        device: where tensors live and models train ("cpu", "cuda", "cuda:1", ...).
        shard: (i, n) or "i/n", 1-based: runs i-1, i-1+n, ... of the tier (default all).
        artifacts_dir: where 2-D runs save grid field values and samples for the report.
        perturb: break the field on purpose ("temperature:c", "drop-rotation", "sign:i");
            for tests and ``--perturb`` only: write such records to their own file.
        log: called with one line per run (progress); default silent.

    Returns:
        The rows appended by this call (a records DataFrame; empty if nothing was missing).

    Raises:
        ValueError: bad tier, shard, device or perturbation. Any error inside a run
            propagates after the runs before it were recorded.
    """
    from .records import empty_records

    records = records if isinstance(records, Records) else Records(records)
    dev = resolve_device(device)
    shard = parse_shard(shard)
    perturbation = parse_perturb(perturb)
    runs = shard_runs(suite.runs(tier), shard)
    budget = suite.budget(tier)
    prov = provenance(dev)
    done = records.done(prov["commit"], suite.suite_hash)
    todo = [r for r in runs if _key(r, perturbation) not in done]
    say = log or (lambda msg: None)
    say(f"{suite.name} [{tier}] shard {shard[0]}/{shard[1]}: {len(runs)} runs, {len(runs) - len(todo)} recorded, "
        f"{len(todo)} to run (commit {prov['commit']}, suite {suite.suite_hash})")
    measure = _measurer(suite.kind)
    frames = []
    art = None if artifacts_dir is None else Path(artifacts_dir)
    for i, run in enumerate(todo, 1):
        ctx = RunContext(run, suite, budget, dev, perturbation, art, say)
        start = time.perf_counter()
        rows = measure(ctx)
        wall = time.perf_counter() - start
        key = _key(run, perturbation)
        full = [_complete(row, run, key, suite, prov, wall) for row in rows]
        frames.append(records.append(full))
        say(f"  [{i}/{len(todo)}] {key}: {len(full)} rows, {wall:.1f} s")
    if not frames:
        return empty_records()
    return pd.concat(frames, ignore_index=True)


def _key(run: Run, perturbation: Perturbation | None) -> str:
    return run.key if perturbation is None else f"{run.key}/perturb={perturbation.label}"


def _complete(row: dict[str, Any], run: Run, key: str, suite: Suite, prov: dict[str, str], wall: float) -> dict[str, Any]:
    out = {
        "suite": suite.name,
        "tier": run.tier,
        "run": key,
        "target": run.target.name,
        "model": run.model.name,
        "objective": run.objective,
        "seed": run.seed,
        "step": 0,
        "stderr": math.nan,
        "noise_floor": math.nan,
        "p_value": math.nan,
        **prov,
        "suite_hash": suite.suite_hash,
        "wall_s": wall,
    }
    row = dict(row)
    suffix = row.pop("run_suffix", "")
    out.update(row)
    out["run"] = key + suffix
    for k in ("value", "stderr", "noise_floor", "p_value"):
        v = out.get(k)
        out[k] = math.nan if v is None else float(v)
    out["step"] = int(out["step"])
    return out


def stderr_log(msg: str) -> None:
    """A ``log`` callback printing to stderr."""
    print(msg, file=sys.stderr, flush=True)
