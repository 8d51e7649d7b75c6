"""Hypothesis profiles of the property suite, selected by FLUXBENCH_HYPOTHESIS_PROFILE.

* ``ci`` (default; ``nox -s verify``): derandomized (the examples are a fixed function of
  the test, so a green run stays green), no example database, no deadline, few examples.
  The whole suite runs in about 20 s with 2 workers on a 2-core machine.
* ``thorough`` (``nox -s verify -- --thorough``): the same, with 10x the examples.
* ``mutants`` (``nox -s mutants``): the ci examples without the shrink phase; a mutant only
  has to be detected, and shrinking a failure can take longer than the whole run.
* ``explore``: not derandomized (new examples on every run, still no database), for
  looking for new counterexamples by hand; statistical checks then have their nominal
  false-alarm rates (about 6e-5 per 4-SE check) instead of being fixed.

Tests scale their number of examples relative to the profile with
``properties._helpers.examples`` so that expensive (Monte Carlo) properties stay cheap in
``ci`` and grow together with the cheap ones in ``thorough``.

If FLUXBENCH_EXPECT_ROOT is set (the mutation runner sets it to its temporary copy), the
session refuses to start unless ``fluxbench`` was imported from that directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

_COMMON = dict(
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("ci", derandomize=True, max_examples=20, **_COMMON)
settings.register_profile("thorough", derandomize=True, max_examples=200, **_COMMON)
settings.register_profile(
    "mutants", derandomize=True, max_examples=20, phases=[Phase.explicit, Phase.generate], **_COMMON
)
settings.register_profile("explore", derandomize=False, max_examples=50, **_COMMON)

PROFILE = os.environ.get("FLUXBENCH_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def pytest_report_header(config):
    import fluxbench

    return [f"hypothesis profile: {PROFILE} (max_examples={settings.default.max_examples})", f"fluxbench: {fluxbench.__file__}"]


def pytest_sessionstart(session):
    expected = os.environ.get("FLUXBENCH_EXPECT_ROOT")
    if expected:
        import fluxbench

        got = Path(fluxbench.__file__).resolve()
        if Path(expected).resolve() not in got.parents:
            raise pytest.UsageError(f"fluxbench imported from {got}, expected it under {expected}")


@pytest.fixture(autouse=True, scope="session")
def _float64_and_one_thread():
    # properties run thousands of tiny tensor ops: one intra-op thread per xdist worker
    torch.set_num_threads(1)
    yield
