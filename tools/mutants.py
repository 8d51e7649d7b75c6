"""Mutation check: does the test suite notice deliberate faults in the library?

Each mutant is one exact text substitution in one library file. For every mutant the
repository is copied to a fresh temporary directory (the working tree is never touched),
the substitution is applied to the copy, and the unit tests (``tests/``) and the property
suite (``properties/``) run there with ``pytest -x``, the copy first on PYTHONPATH. A mutant
is *caught* when a suite reports failing tests (pytest exit code 1); any other non-zero exit
code (collection or usage error) is an error of the check itself and aborts it.

The working tree (tracked and untracked, non-ignored files) is snapshotted once at the
start, so every mutant sees the same code even if the tree changes during the run.

The check verifies that the copy is what gets imported: before the suites run, a
subprocess with the same environment imports the mutated module and must find it under the
copy with the substitution in its source, and every pytest process (controller and xdist
workers) records where it imported ``fluxbench`` from via a small plugin written into the
copy (``-p _mutant_guard``); a record outside the copy aborts the check. The property
suite additionally refuses to start unless ``fluxbench`` comes from FLUXBENCH_EXPECT_ROOT.

Every substitution must match exactly once in its file (checked for all mutants before
anything runs), so the list fails loudly when the library changes under it. A baseline run
on the unmutated copy must pass first (``--no-baseline`` skips it).

Usage::

    python tools/mutants.py                     # all mutants, both suites
    python tools/mutants.py -k flux -k ou       # mutants whose name contains a pattern
    python tools/mutants.py --suites properties # one suite only
    python tools/mutants.py --list
    python tools/mutants.py --exclude 'tests/test_wip.py'  # leave an unfinished file out

Writes ``results/mutants.csv`` (mutant, file, description, caught, suite, seconds,
first_failure) and prints a table; exits non-zero unless every mutant is caught.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fluxbench.fileio import atomic_write

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("properties", "tests")


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    old: str
    new: str
    description: str

    @property
    def module(self) -> str:
        return self.file[: -len(".py")].replace("/", ".")


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "rotational_sign",
        "fluxbench/fields/rotational.py",
        "return s + self.antisymmetric.apply(x, s) + self.antisymmetric.divergence",
        "return s - self.antisymmetric.apply(x, s) + self.antisymmetric.divergence",
        "sign of the rotational term A s in f = s + A s + div A",
    ),
    Mutant(
        "scalar_antisymmetric_transposed",
        "fluxbench/fields/rotational.py",
        "return ga @ self._j(x).T",
        "return ga @ self._j(x)",
        "div A = J grad a with J transposed (ScalarAntisymmetric)",
    ),
    Mutant(
        "langevin_noise_factor_2",
        "fluxbench/samplers/langevin.py",
        "noise_scale = math.sqrt(2.0 * eps)",
        "noise_scale = math.sqrt(eps)",
        "Langevin noise sqrt(eps) instead of sqrt(2 eps)",
    ),
    Mutant(
        "flux_sigma_for_variance",
        "fluxbench/objectives/flux.py",
        "    var = sig * sig\n",
        "    var = sig\n",
        "sigma used for sigma^2 in the Flux Matching loss",
    ),
    Mutant(
        "flux_probe_shared",
        "fluxbench/objectives/flux.py",
        "rademacher((c, d), xc, generator)",
        "rademacher((1, d), xc, generator).expand(c, d)",
        "one Hutchinson probe row broadcast to every sample",
    ),
    Mutant(
        "flux_missing_rho",
        "fluxbench/objectives/flux.py",
        "weight = rho * inv_q * chain_weight",
        "weight = inv_q * chain_weight",
        "missing rho = exp(-t) factor in g_hat",
    ),
    Mutant(
        "flux_substeps_off_by_one",
        "fluxbench/objectives/flux.py",
        "    for k in range(substeps):",
        "    for k in range(substeps - 1):",
        "one sub-step too few in the reference chain",
    ),
    Mutant(
        "transition_softmax_axis",
        "fluxbench/objectives/batch_dense.py",
        "out_t.addmm_((g[b] / w.sum(1, keepdim=True)).T, w)",
        "out_t.addmm_(g[b].T, w / w.sum(0, keepdim=True))",
        "transition weights normalised over chains instead of anchors (dense transition block)",
    ),
    Mutant(
        "blocks_transition_unnormalised",
        "fluxbench/_pairwise/blocks.py",
        "coef = (values[gs, rs] / s).reshape(-1, e).T.contiguous()",
        "coef = values[gs, rs].reshape(-1, e).T.contiguous()",
        "materialised-block transition sums not normalised over the anchors",
    ),
    Mutant(
        "blocks_far_rows_kept",
        "fluxbench/_pairwise/blocks.py",
        "low = acc[:, e] < kern.low_mass",
        "low = acc[:, e] < 0",
        "materialised-block means keep rows whose every log-kernel was clamped (no recomputation)",
    ),
    Mutant(
        "blocks_exp_floor",
        "fluxbench/_pairwise/blocks.py",
        "return (-700.0, 40.0) if dtype == torch.float64 else (-80.0, 21.0)",
        "return (-8.0, 40.0) if dtype == torch.float64 else (-8.0, 21.0)",
        "materialised blocks clamp log-kernels at -8 (far keys get weight e^-8)",
    ),
    Mutant(
        "mlp_pullback_drops_curvature",
        "fluxbench/fields/mlp.py",
        "ab = curvature.mul_(hb_tangent).addcmul_(hb, first)",
        "ab = hb * first",
        "closed-form Hutchinson pullback of the MLP without its second-derivative term",
    ),
    Mutant(
        "transition_narrow_to_attention",
        "fluxbench/_pairwise/sums.py",
        "if escalate or blocks_on(",
        "if not escalate and blocks_on(",
        "transition sums of a narrow kernel (small t) left to attention's float32 expanded form",
    ),
    Mutant(
        "third_moment_sign",
        "fluxbench/objectives/batch_kernel.py",
        ".add_(third, alpha=-1.0 / var)",
        ".add_(third, alpha=1.0 / var)",
        "sign of the third-moment term in grad D_s",
    ),
    Mutant(
        "stein_kernel_constant",
        "fluxbench/verify/stein.py",
        "inner = (t.c3 + tt).sub_(4.0)",
        "inner = (t.c3 + tt).sub_(2.0)",
        "the -4 a^3 |delta|^2 term of the Stein kernel halved in the chunked KSD pass",
    ),
    Mutant(
        "dsm_target_sign",
        "fluxbench/objectives/dsm.py",
        "s_target = -xi / sig",
        "s_target = xi / sig",
        "sign of the plain DSM target",
    ),
    Mutant(
        "proposal_normaliser_sign",
        "fluxbench/objectives/proposal.py",
        "- torch.log(-torch.expm1(-lam * self.horizon))",
        "+ torch.log(-torch.expm1(-lam * self.horizon))",
        "sign of the truncation normaliser in log q(t)",
    ),
    Mutant(
        "ou_covariance_transposed",
        "fluxbench/samplers/ou.py",
        "c = self._c64 - e @ self._c64 @ e.T",
        "c = self._c64 - e.T @ self._c64 @ e",
        "exact OU transition covariance with E transposed",
    ),
    Mutant(
        "heun_wrong_sigma",
        "fluxbench/samplers/_common.py",
        "return x + (0.5 * h) * (d_cur - s_next * f_next)",
        "return x + (0.5 * h) * (d_cur - s * f_next)",
        "Heun corrector of the probability-flow ODE (and EDM Heun) weighted by the old sigma",
    ),
    Mutant(
        "mixture_responsibilities_axis",
        "fluxbench/targets/mixture.py",
        "resp = torch.softmax(log_joint, dim=0)",
        "resp = torch.softmax(log_joint, dim=1)",
        "mixture responsibilities normalised over points instead of components",
    ),
    Mutant(
        "mmd_diagonal_kept",
        "fluxbench/metrics/mmd.py",
        "sxx = chunked_pairwise_sum(block, xw, xw, chunk_size=chunk_size, exclude_diagonal=True)",
        "sxx = chunked_pairwise_sum(block, xw, xw, chunk_size=chunk_size, exclude_diagonal=False)",
        "MMD U-statistic keeps the diagonal k(x_i, x_i)",
    ),
    Mutant(
        "paired_mmd_cross_term",
        "fluxbench/metrics/mmd.py",
        "sq_dists_expanded(xi, yj), sq_dists_expanded(yi, xj)",
        "sq_dists_expanded(xi, yj), sq_dists_expanded(xi, yj)",
        "the paired MMD kernel takes k(x_i, y_j) twice instead of k(x_i, y_j) + k(y_i, x_j)",
    ),
    Mutant(
        "ustat_transposed_block_dropped",
        "fluxbench/ustat.py",
        "hw[li, j0:j1] += hb.T @ wb[i0:i1]",
        "hw[li, j0:j1] += 0.0 * (hb.T @ wb[i0:i1])",
        "the wild bootstrap's products miss the lower triangle of off-diagonal blocks",
    ),
    Mutant(
        "w2_rotation_transposed",
        "fluxbench/metrics/gaussian.py",
        "U = P @ Qh",
        "U = Qh.T @ P.T",
        "Gaussian W2: Procrustes rotation transposed",
    ),
    Mutant(
        "rbf_mean_logdet_factor_2",
        "fluxbench/metrics/gaussian.py",
        "logdet = 2.0 * torch.log(torch.diagonal(L)).sum()",
        "logdet = torch.log(torch.diagonal(L)).sum()",
        "RBF kernel mean: log det missing its factor 2",
    ),
    Mutant(
        "sliced_w2_no_sqrt",
        "fluxbench/metrics/gaussian.py",
        "(v1.sqrt() - v2.sqrt()).pow(2)",
        "(v1 - v2).pow(2)",
        "Gaussian sliced W2: variances used for standard deviations",
    ),
    Mutant(
        "mode_laplacian_term_dropped",
        "fluxbench/verify/modes.py",
        "return r * ((fx[:, None, :] * du).sum(-1) + n2 - (r * n2).sum(1, keepdim=True))",
        "return r * ((fx[:, None, :] * du).sum(-1) + n2)",
        "mode test functions: L_f r_k missing the -sum_j r_j |u_j - u|^2 part of the Laplacian",
    ),
    Mutant(
        "ksd_max_without_modes",
        "fluxbench/verify/ksd.py",
        "p = max_p_value(z, z_boot)",
        "p = res.p_value()",
        "ksd_test: p-value from the kernels alone, the mode statistics left out of the maximum",
    ),
    Mutant(
        "hotelling_bootstrap_unscaled",
        "fluxbench/verify/modes.py",
        "boot = (multipliers.T.to(feats.dtype) @ centred @ whiten).square().sum(1) / n",
        "boot = (multipliers.T.to(feats.dtype) @ centred @ whiten).square().sum(1) / n**0.5",
        "Hotelling bootstrap draws scaled by 1/sqrt(n) instead of 1/n",
    ),
)

GUARD = '''"""Written by tools/mutants.py: record where each pytest process imports fluxbench from."""
import os


def pytest_configure(config):
    import fluxbench

    with open(os.environ["FLUXBENCH_MUTANT_IMPORT_LOG"], "a") as fh:
        fh.write(os.path.realpath(fluxbench.__file__) + "\\n")
'''


def repo_files(root: Path, exclude: list[str]) -> list[str]:
    """Tracked and untracked, non-ignored files of the working tree (what a copy needs),
    minus those matching an ``exclude`` glob (e.g. someone's unfinished test file)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.decode()
    files = [f for f in out.split("\0") if f and (root / f).is_file()]
    return [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in exclude)]


def check_mutants(mutants: tuple[Mutant, ...], root: Path) -> None:
    """Every substitution must match exactly once; raise listing every mismatch."""
    problems = []
    names = set()
    for m in mutants:
        if m.name in names:
            problems.append(f"{m.name}: duplicate name")
        names.add(m.name)
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.name}: {m.file} does not exist")
            continue
        count = path.read_text().count(m.old)
        if count != 1:
            problems.append(f"{m.name}: {m.old!r} occurs {count} times in {m.file} (need exactly 1)")
    if problems:
        raise SystemExit("mutant list out of sync with the code:\n  " + "\n  ".join(problems))


def snapshot(files: list[str], dest: Path) -> None:
    """Copy the files once: every mutant starts from the same state of the working tree,
    even if the tree changes while the check runs."""
    for f in files:
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, target)


def make_copy(base: Path, dest: Path) -> None:
    shutil.copytree(base, dest)
    (dest / "_mutant_guard.py").write_text(GUARD)


def env_for(copy: Path, log: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        PYTHONDONTWRITEBYTECODE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        FLUXBENCH_HYPOTHESIS_PROFILE=os.environ.get("FLUXBENCH_MUTANT_PROFILE", "mutants"),
        FLUXBENCH_EXPECT_ROOT=str(copy),
        FLUXBENCH_MUTANT_IMPORT_LOG=str(log),
    )
    return env


def verify_import(copy: Path, env: dict[str, str], mutant: Mutant | None) -> None:
    """The mutated module is imported from the copy and carries the substitution."""
    probe = (
        "import importlib, inspect, sys\n"
        f"mod = importlib.import_module({(mutant.module if mutant else 'fluxbench')!r})\n"
        "print(inspect.getsourcefile(mod))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"cannot import the library from the copy:\n{out.stderr}")
    path = Path(out.stdout.strip()).resolve()
    if copy.resolve() not in path.parents:
        raise SystemExit(f"the copy is not what gets imported: {path} is outside {copy}")
    if mutant is not None and mutant.new not in path.read_text():
        raise SystemExit(f"{mutant.name}: the imported {path} does not contain the mutation")


def run_suite(suite: str, copy: Path, env: dict[str, str], workers: str, log: Path) -> tuple[int, str, float]:
    """pytest -x on one suite in the copy: (exit code, first failing test id, seconds)."""
    cmd = [sys.executable, "-m", "pytest", suite, "-x", "-q", "-rf", "-p", "no:cacheprovider", "-p", "_mutant_guard"]
    if workers != "0":
        cmd += ["-n", workers]
    start = time.monotonic()
    out = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    imported = [Path(p).resolve() for p in log.read_text().split()] if log.exists() else []
    if not imported or any(copy.resolve() not in p.parents for p in imported):
        raise SystemExit(f"{suite}: fluxbench was imported from {imported}, not from the copy {copy}")
    first = ""
    match = re.search(r"^FAILED (\S+)", out.stdout, re.MULTILINE)
    if match:
        first = match.group(1)
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (failed|passed|errors?)\b", out.stdout.splitlines()[-1] if out.stdout else ""))
    failed = counts.get("failed", 0)
    # exit code 1: tests failed; with xdist, -x ends the session as "interrupted" (2) after
    # the first failure. Anything else (collection/usage errors) is a problem of the check.
    if out.returncode == 0 and not failed:
        return 0, "", seconds
    if out.returncode in (1, 2) and failed and not (counts.get("error", 0) or counts.get("errors", 0)):
        return 1, first, seconds
    tail = "\n".join((out.stdout + out.stderr).splitlines()[-30:])
    raise SystemExit(f"{suite}: pytest exited with code {out.returncode} without a clean test failure:\n{tail}")


def evaluate(mutant: Mutant | None, base: Path, suites: tuple[str, ...], workers: str, all_suites: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="fluxbench-mutant-") as tmp:
        copy = Path(tmp) / "repo"
        make_copy(base, copy)
        if mutant is not None:
            path = copy / mutant.file
            text = path.read_text()
            assert text.count(mutant.old) == 1
            path.write_text(text.replace(mutant.old, mutant.new))
        caught_by, first_failure, seconds = [], "", 0.0
        for suite in suites:
            log = copy / f".imports-{suite}.log"
            env = env_for(copy, log)
            verify_import(copy, env, mutant)
            rc, first, secs = run_suite(suite, copy, env, workers, log)
            seconds += secs
            if rc == 1:
                caught_by.append(suite)
                first_failure = first_failure or first
                if not all_suites:
                    break
        return {"caught_by": caught_by, "first_failure": first_failure, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="patterns", action="append", default=[], help="run mutants whose name contains this")
    parser.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES))
    parser.add_argument("--workers", default=os.environ.get("FLUXBENCH_WORKERS", "2"), help="pytest-xdist workers (0: none)")
    parser.add_argument("--first-suite-only", action="store_true", help="stop at the first suite that catches a mutant")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unmutated copy")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="leave matching files out of the copy")
    parser.add_argument("--out", default=str(ROOT / "results" / "mutants.csv"))
    args = parser.parse_args(argv)

    mutants = tuple(m for m in MUTANTS if not args.patterns or any(p in m.name for p in args.patterns))
    if args.list:
        for m in mutants:
            print(f"{m.name:34s} {m.file:38s} {m.description}")
        return 0
    if not mutants:
        raise SystemExit(f"no mutant matches {args.patterns}")
    suites = tuple(args.suites)
    with tempfile.TemporaryDirectory(prefix="fluxbench-snapshot-") as tmp:
        base = Path(tmp) / "repo"
        snapshot(repo_files(ROOT, args.exclude), base)
        check_mutants(MUTANTS, base)
        return _run(mutants, base, suites, args)


def _run(mutants: tuple[Mutant, ...], base: Path, suites: tuple[str, ...], args: argparse.Namespace) -> int:
    if not args.no_baseline:
        baseline = evaluate(None, base, suites, args.workers, all_suites=True)
        if baseline["caught_by"]:
            raise SystemExit(
                f"baseline fails on the unmutated copy ({baseline['caught_by']}: {baseline['first_failure']}); "
                "fix that first (or --exclude an unfinished file)"
            )
        print(f"baseline: all suites pass on the unmutated copy ({baseline['seconds']:.0f} s)", flush=True)

    rows = []
    for i, m in enumerate(mutants, 1):
        res = evaluate(m, base, suites, args.workers, all_suites=not args.first_suite_only)
        row = {
            "mutant": m.name,
            "file": m.file,
            "description": m.description,
            "caught": bool(res["caught_by"]),
            "suite": "+".join(res["caught_by"]) if res["caught_by"] else "-",
            "seconds": round(res["seconds"], 1),
            "first_failure": res["first_failure"],
        }
        rows.append(row)
        print(f"[{i}/{len(mutants)}] {m.name}: {'caught by ' + row['suite'] if row['caught'] else 'NOT CAUGHT'} ({row['seconds']} s)", flush=True)

    out = Path(args.out)

    def write(fh) -> None:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    # atomically: an interrupted write never leaves a truncated table behind
    atomic_write(out, write)
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in ("mutant", "file", "caught", "suite", "seconds")}
    header = "  ".join(k.ljust(widths[k]) for k in widths) + "  first failure"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print("  ".join(str(r[k]).ljust(widths[k]) for k in widths) + "  " + r["first_failure"])
    n_caught = sum(r["caught"] for r in rows)
    print(f"\ncaught {n_caught}/{len(rows)} mutants; table written to {out}")
    return 0 if n_caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
