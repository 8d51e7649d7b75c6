"""Task runner. All sessions share the project's one environment (.venv): run nox from it.

    python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[dev]'
    .venv/bin/nox -s tests          # unit tests (tests/)
    .venv/bin/nox -s verify         # Hypothesis property suite (properties/), ci profile
    .venv/bin/nox -s verify -- --thorough
    .venv/bin/nox -s mutants        # mutation check of tests/ and properties/ (tools/mutants.py)
    .venv/bin/nox -s suites         # quick tier of suites/*.toml, then the gate of their claims
    .venv/bin/nox -s suites -- --tier full --device cuda
    .venv/bin/nox -s demo           # fluxbench demo
    .venv/bin/nox -s bench          # fluxbench bench

Sessions use ``venv_backend="none"``: nox runs them with the interpreter it was started
from, so torch is installed once (a nox-managed venv per session would install several GB
of wheels per session).
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
    """Time one training step of Flux Matching against DSM."""
    _require_env(session)
    session.run(PY, "-m", "fluxbench.cli", "bench", *session.posargs)
