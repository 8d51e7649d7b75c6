"""The speed harness: ``python -m fluxbench.bench`` and ``tools/bench_ab.py`` time real steps."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from fluxbench.bench import main, step_functions, time_steps

from .conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]


def test_each_step_function_trains_its_own_model():
    """A step is loss, backward and an Adam update: every closure moves its model's weights."""
    steps = step_functions(32, 2)
    assert set(steps) == {"flux", "flux_quarter", "dsm", "dsm_batch"}
    for name, step in steps.items():
        model = step.__defaults__[0]
        before = [p.detach().clone() for p in model.parameters()]
        step()
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), name


def test_table_ratios_are_the_timed_steps():
    table = main(["--batch", "16", "--dim", "2", "--repeats", "3"])
    assert list(table["B"]) == [16] and list(table["d"]) == [2]
    row = table.iloc[0]
    assert row["flux_ms"] > 0 and row["dsm_ms"] > 0
    assert row["flux/dsm"] == pytest.approx(row["flux_ms"] / row["dsm_ms"])
    assert row["flux_B/4/dsm"] == pytest.approx(row["flux_B/4_ms"] / row["dsm_ms"])


def test_time_steps_reports_a_median_per_closure():
    calls = {"a": 0, "b": 0}

    def bump(name):
        def fn():
            calls[name] += 1

        return fn

    times = time_steps({"a": bump("a"), "b": bump("b")}, repeats=5, warmup=2)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert calls == {"a": 7, "b": 7}


@pytest.mark.skipif(
    subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0,
    reason="needs a git checkout",
)
def test_ab_tool_times_both_revisions_in_one_process(capsys):
    med = load_tool("bench_ab").main(["--base", "HEAD", "--batch", "16", "--rounds", "3", "--warmup", "1"])
    assert set(med) == {"flux_base", "flux_work", "dsm"} and all(t > 0 for t in med.values())
    assert "flux/dsm base" in capsys.readouterr().out


def test_bench_names_itself_and_refuses_a_bad_device_with_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: fluxbench bench")
    with pytest.raises(SystemExit) as exc:
        main(["--device", "no-such-device"])
    assert exc.value.code == 2 and "--device 'no-such-device' is not usable" in capsys.readouterr().err


def test_step_functions_run_on_the_device_they_are_given():
    steps = step_functions(16, 2, device="cpu")
    steps["flux"]()
    assert time_steps(steps, repeats=1, warmup=0, device=torch.device("cpu")).keys() == steps.keys()
