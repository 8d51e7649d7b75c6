"""Task runner. All sessions share the project's one environment (.venv): run nox from it.

    python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[dev]'
    .venv/bin/nox -s tests          # unit tests (tests/)
    .venv/bin/nox -s verify         # Hypothesis property suite (properties/), ci profile
    .venv/bin/nox -s verify -- --thorough
    .venv/bin/nox -s mutants        # mutation check of tests/ and properties/ (tools/mutants.py)
    .venv/bin/nox -s suites         # quick tier of suites/*.toml, then the gate of their claims
    .venv/bin/nox -s suites -- --tier full --device cuda
    .venv/bin/nox -s demo           # fluxbench demo
    .venv/bin/nox -s bench          # asv benchmarks, each once (quick, unsaved)
    .venv/bin/nox -s step_table     # fluxbench bench
    .venv/bin/nox -s cuda           # the device tier (tests/test_cuda.py) on FLUXBENCH_TEST_DEVICE (cuda)
    FLUXBENCH_TEST_DEVICE=cpu .venv/bin/nox -s cuda   # the same tier on the CPU: checks that it runs
    .venv/bin/nox -s torch_oldest   # unit tests against the oldest declared torch (own venv)
    .venv/bin/nox -s images         # image smoke run: digits, Flux Matching and DSM, sample, FID (runs/images/smoke)

Sessions use ``venv_backend="none"``: nox runs them with the interpreter it was started
from, so torch is installed once (a nox-managed venv per session would install several GB
of wheels per session). The exception is ``torch_oldest``, which exists to test another
torch: it builds .nox/torch_oldest (1.5 GB with torch's CPU wheel; ``-r`` reuses it).
"""

from __future__ import annotations

import os
import sys

import nox

nox.options.sessions = ["tests", "verify"]
nox.options.default_venv_backend = "none"

PY = sys.executable
# torch-heavy tests run best with one torch thread per xdist worker on few cores
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _require_env(session: nox.Session) -> None:
    try:
        import fluxbench  # noqa: F401
    except ImportError:
        session.error(
            "fluxbench is not importable from this interpreter; run nox from the project venv: "
            "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[dev]' && .venv/bin/nox ..."
        )


def _workers() -> str:
    return os.environ.get("FLUXBENCH_WORKERS", str(max(1, min(4, os.cpu_count() or 1))))


@nox.session
def tests(session: nox.Session) -> None:
    """Unit tests (tests/), in parallel with one torch thread per worker, then the docstring
    examples of the main public functions (the modules are listed, not collected from the
    whole package, so that no optional heavy module is imported by accident)."""
    _require_env(session)
    session.run(PY, "-m", "pytest", "tests", "-n", _workers(), "-q", *session.posargs, env=ONE_THREAD)
    doctest_modules = (
        "fluxbench/objectives/flux.py",
        "fluxbench/samplers/langevin.py",
        "fluxbench/metrics/wasserstein.py",
        "fluxbench/metrics/mmd.py",
        "fluxbench/verify/stationarity.py",
        "fluxbench/verify/checks.py",
    )
    session.run(PY, "-m", "pytest", "--doctest-modules", *doctest_modules, "-q", "-p", "no:cacheprovider", env=ONE_THREAD)


@nox.session
def verify(session: nox.Session) -> None:
    """Hypothesis property tests (properties/), ci profile. Pass -- --thorough for the long profile.

    The profile is chosen by FLUXBENCH_HYPOTHESIS_PROFILE (see properties/conftest.py):
    ``ci`` (default, derandomized, about 20 s on 2 cores) or ``thorough`` (10x the examples).
    Other arguments go to pytest.
    """
    _require_env(session)
    args = list(session.posargs)
    profile = "thorough" if "--thorough" in args else os.environ.get("FLUXBENCH_HYPOTHESIS_PROFILE", "ci")
    args = [a for a in args if a != "--thorough"]
    env = {**ONE_THREAD, "FLUXBENCH_HYPOTHESIS_PROFILE": profile}
    session.run(PY, "-m", "pytest", "properties", "-n", _workers(), "-q", "-p", "no:cacheprovider", *args, env=env)


@nox.session
def mutants(session: nox.Session) -> None:
    """Mutation check: deliberate faults in a temporary copy must fail tests/ or properties/.

    Runs tools/mutants.py (writes results/mutants.csv; fails unless every mutant is caught).
    Arguments go to the tool, e.g. ``nox -s mutants -- -k flux --suites properties``.
    """
    _require_env(session)
    session.run(PY, "tools/mutants.py", "--workers", _workers(), *session.posargs, env=ONE_THREAD)


@nox.session
def suites(session: nox.Session) -> None:
    """Run the stationarity suites (suites/*.toml) and gate their claims: ``fluxbench gate``.

    Default: the quick tier of every suite, outputs under runs/suites (ignored by git);
    arguments replace the default, e.g. ``nox -s suites -- --tier full --device cuda`` or
    ``nox -s suites -- --tier quick --out results/suites`` (the committed records).
    """
    _require_env(session)
    args = session.posargs or ["--tier", "quick"]
    session.run(PY, "-m", "fluxbench.cli", "gate", *args, env=ONE_THREAD)


@nox.session
def demo(session: nox.Session) -> None:
    """Train Flux Matching and DSM on a 2-D mixture, sample, score and plot (runs/demo)."""
    _require_env(session)
    session.run(PY, "-m", "fluxbench.cli", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The asv benchmarks (benchmarks/) once each, on the working tree: ``asv check``, then
    ``asv run --python=same --quick --dry-run`` (asv's ``asv dev``).

    Quick and unsaved on purpose: it runs the installed (editable) working tree, which may
    differ from any commit, so its figures are not recorded under a commit hash. Record with
    ``asv run`` (builds each commit in .asv/env; see the README). Arguments go to ``asv run``,
    e.g. ``nox -s bench -- --bench StepRatio``. Fails if any benchmark fails (asv's exit 2).
    """
    _require_env(session)
    import json

    # asv rewrites results_dir/benchmarks.json on every run; a copy of the config that points
    # results_dir into the ignored .asv/ keeps the committed results/asv/ as recorded
    with open("asv.conf.json") as fh:  # asv's JSON allows // comment lines
        config = json.loads("".join(line for line in fh if not line.lstrip().startswith("//")))
    # asv resolves a config's paths against the config's folder
    here = os.getcwd()
    for key in ("benchmark_dir", "env_dir", "html_dir"):
        config[key] = os.path.join(here, config[key])
    config.update(results_dir=os.path.join(here, ".asv", "results-check"), repo=here)
    os.makedirs(".asv", exist_ok=True)
    conf = os.path.join(".asv", "asv.check.conf.json")
    with open(conf, "w") as fh:
        json.dump(config, fh, indent=4)
    asv = (PY, "-m", "asv", "--config", conf)
    session.run(*asv, "machine", "--yes")  # asv asks for the machine's name once; take the defaults
    session.run(*asv, "check", "--python=same", env=ONE_THREAD)
    # forkserver: each benchmark is forked from a process that imported torch once (spawn,
    # asv's default, imports it again for each of the ~200 parameter sets)
    session.run(*asv, "run", "--python=same", "--quick", "--dry-run", "--show-stderr",
                "--launch-method", "forkserver", *session.posargs, env=ONE_THREAD)


@nox.session
def images(session: nox.Session) -> None:
    """Smoke run of the image pipeline on the 8x8 digits, outputs under runs/images/smoke: train a
    small U-Net by Flux Matching and by DSM (300 steps each), sample 500 images with EDM Heun,
    score them (FID/KID, digit extractor). Arguments go to every command, e.g. ``-- --device cuda``.
    """
    _require_env(session)
    out = "runs/images/smoke"
    cmd = (PY, "-m", "fluxbench.cli", "images")
    for method in ("flux", "dsm"):
        run = f"{out}/{method}"
        chains = ["--chains", "16"] if method == "flux" else []
        session.run(*cmd, "train", "--method", method, *chains, "--steps", "300", "--batch-size", "64", "--channels", "16",
                    "--lr", "1e-3", "--ema-decay", "0.99", "--out", run, "--no-progress", *session.posargs, env=ONE_THREAD)
        session.run(*cmd, "sample", "--checkpoint", f"{run}/checkpoint.pt", "--n", "500", "--out", f"{run}/samples",
                    "--no-progress", *session.posargs, env=ONE_THREAD)
        session.run(*cmd, "fid", "--real", "digits", "--fake", f"{run}/samples/samples.pt", "--out", f"{run}/fid",
                    *session.posargs, env=ONE_THREAD)


@nox.session
def step_table(session: nox.Session) -> None:
    """Time one training step of Flux Matching against DSM (``fluxbench bench``, a table)."""
    _require_env(session)
    session.run(PY, "-m", "fluxbench.cli", "bench", *session.posargs)


# The oldest torch that pyproject.toml declares; torch_oldest installs exactly this release.
OLDEST_TORCH = "2.13.0"


@nox.session(venv_backend="venv")
def torch_oldest(session: nox.Session) -> None:
    """Unit tests (tests/) against the oldest declared torch, in a fresh nox-managed venv.

    Installs torch==OLDEST_TORCH from the package index (CPU build where a local wheel is
    found, e.g. ``PIP_FIND_LINKS``), then the project without the ``[images]`` extra
    (torchvision from the index does not import beside a CPU-only torch; the image tests
    skip) and the test tools, every other version pinned by constraints.txt less its torch
    line. Fails if the declared lower bound in pyproject.toml is not OLDEST_TORCH's release.
    """
    import re

    declared = re.search(r'"torch>=([0-9.]+)', open("pyproject.toml").read())
    if declared is None or OLDEST_TORCH.split(".")[: declared.group(1).count(".") + 1] != declared.group(1).split("."):
        session.error(f"pyproject.toml declares {declared and declared.group(0)!r}; OLDEST_TORCH is {OLDEST_TORCH}")
    # constraints.txt pins the newest tested torch; drop the torch-version-bound lines
    pinned_elsewhere = ("torch==", "torchvision==", "torch_fidelity==", "triton==")
    lines = [ln for ln in open("constraints.txt") if not ln.startswith(pinned_elsewhere)]
    # in the venv, not session.create_tmp(): that sets TMPDIR inside the checkout, and tests
    # that need a directory outside any git checkout (tmp_path) would find one inside it
    constraints = os.path.join(session.virtualenv.location, "constraints-torch-oldest.txt")
    with open(constraints, "w") as fh:
        fh.writelines(lines)
    session.install(f"torch=={OLDEST_TORCH}")
    session.install("-c", constraints, "-e", ".", "hypothesis", "pytest", "pytest-xdist")
    check = f"import torch; assert torch.__version__.split('+')[0] == {OLDEST_TORCH!r}, torch.__version__"
    session.run("python", "-c", f"{check}; print('torch', torch.__version__)")
    session.run("python", "-m", "pytest", "tests", "-n", _workers(), "-q", "-p", "no:cacheprovider", *session.posargs,
                env=ONE_THREAD)


@nox.session
def cuda(session: nox.Session) -> None:
    """The device tier (tests/test_cuda.py, marker ``cuda``): loss, gradient, samplers, metrics
    and the stationarity test on a device against their CPU results.

    The device is FLUXBENCH_TEST_DEVICE (default ``cuda``; ``cuda:1``, or ``cpu`` to check that
    the tier runs); the tests skip when it is unavailable. Arguments go to pytest.
    """
    _require_env(session)
    from fluxbench.suites.runner import resolve_device

    device = os.environ.get("FLUXBENCH_TEST_DEVICE", "cuda")
    try:
        resolve_device(device)
    except ValueError as exc:
        session.skip(f"no device to test: {exc}")
    env = {**ONE_THREAD, "FLUXBENCH_TEST_DEVICE": device}
    session.run(PY, "-m", "pytest", "tests/test_cuda.py", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                *session.posargs, env=env)
