"""Tests for fluxbench.testing.parametrize_with_checks (the pytest gate for users' fields)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fluxbench.fields import RotationalField
from fluxbench.targets import Gaussian
from fluxbench.testing import FieldCheck, parametrize_with_checks
from fluxbench.verify import CHECKS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# d = 8: the wrong temperature 0.9 s moves the law by W2 = sqrt(8) (1/sqrt(0.9) - 1) ~ 0.15,
# which the defect and the KSD resolve at n = 2000 and the rollout (a two-sample test on
# two halves) at n = 5000 (calibration: rollout power ~0.35 at n = 2000, d = 20).
# A rollout of 5 relaxation times is enough for a variance error (it relaxes at rate 2).
OPTIONS = dict(n=5000, seed=0, rollout_options=dict(time_factor=5.0))
D = 8
P = Gaussian.isotropic(D)
_A = torch.zeros(D, D, dtype=torch.float64)
_A[0, 1], _A[1, 0] = -1.0, 1.0
GOOD = RotationalField(P.score, _A)


def BAD(z):
    return 0.9 * P.score(z)


def _params(decorator):
    """(id, field, target, check) of every parameter set of a parametrize marker."""
    mark = decorator.mark
    assert mark.name == "parametrize" and mark.args[0] == "field, target, check"
    return [(ps.id, *ps.values) for ps in mark.args[1]]


def test_decorator_parametrizes_every_case_and_check():
    deco = parametrize_with_checks([("good", GOOD, P), ("bad", BAD, P)], n=2000)
    params = _params(deco)
    assert [p[0] for p in params] == [f"{c}-{k}" for c in ("good", "bad") for k in CHECKS]
    assert all(isinstance(p[3], FieldCheck) for p in params)
    # dict form and a subset of checks
    deco = parametrize_with_checks({"good": (GOOD, P)}, checks=["defect"])
    assert [p[0] for p in _params(deco)] == ["good-defect"]
    with pytest.raises(ValueError, match="unknown check"):
        parametrize_with_checks([("good", GOOD, P)], checks=["nope"])
    with pytest.raises(ValueError, match="unknown option"):
        parametrize_with_checks([("good", GOOD, P)], tolerance=1.0)
    with pytest.raises(ValueError, match="unique"):
        parametrize_with_checks([("a", GOOD, P), ("a", BAD, P)])
    with pytest.raises(ValueError, match="triple"):
        parametrize_with_checks([(GOOD, P)])


def test_generated_checks_pass_a_good_field_and_fail_a_wrong_temperature():
    params = _params(parametrize_with_checks([("good", GOOD, P), ("bad", BAD, P)], **OPTIONS))
    failed = {}
    for pid, field, target, check in params:
        try:
            check(field, target)
        except AssertionError as exc:
            failed[pid] = str(exc)
    assert not any(k.startswith("good-") for k in failed), failed
    for name in ("defect", "ksd_stationarity", "rollout_stationarity"):
        assert f"bad-{name}" in failed, (name, failed)
        assert "failed" in failed[f"bad-{name}"] and "threshold" in failed[f"bad-{name}"]
    # a wrong temperature is still a well-formed, pointwise, deterministic field
    for name in ("output_contract", "determinism", "batch_independence"):
        assert f"bad-{name}" not in failed


def test_parametrize_with_checks_in_a_real_pytest_run(tmp_path):
    test_file = tmp_path / "test_user_fields.py"
    test_file.write_text(
        textwrap.dedent(
            """
            import torch
            from fluxbench.targets import Gaussian
            from fluxbench.testing import parametrize_with_checks

            p = Gaussian.isotropic(2)

            def bad(z):
                return 0.5 * p.score(z)

            @parametrize_with_checks([("good", p.score, p), ("bad", bad, p)], n=400,
                                     checks=["output_contract", "defect", "ksd_stationarity"])
            def test_my_fields(field, target, check):
                check(field, target)
            """
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider", "-rA"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 1, out  # some tests failed
    assert "4 passed" in out and "2 failed" in out, out
    assert "FAILED test_user_fields.py::test_my_fields[bad-defect]" in out
    assert "FAILED test_user_fields.py::test_my_fields[bad-ksd_stationarity]" in out
    assert "PASSED test_user_fields.py::test_my_fields[good-ksd_stationarity]" in out
    assert "AssertionError: check 'defect' failed" in out


def test_a_check_that_does_not_apply_is_skipped_not_passed():
    """The defect check needs a score: against a tensor of samples the pytest test is
    skipped (it was reported as passed)."""
    x = P.sample(200, generator=torch.Generator().manual_seed(0))
    with pytest.raises(pytest.skip.Exception, match="defect"):
        FieldCheck("defect", n=200)(P.score, x)
