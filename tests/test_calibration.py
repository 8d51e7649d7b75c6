"""Tests of the calibration runner, ``tools/calibration`` (``python -m tools.calibration``)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tools.calibration import cli
from tools.calibration.cases import CASE_BY_NAME, CASES, make_case, seed_samples
from tools.calibration.run import ALPHAS, METHODS, CaseJob, run_job

ROOT = Path(__file__).parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_calibrate_tiny_case_writes_and_resumes(tmp_path, capsys):
    out = tmp_path / "cal"
    args = ["--cases", "iso2-score,iso2-drift", "--seeds", "2", "--n", "100", "--w2-n", "200", "--out", str(out)]
    assert cli.main(args) == 0
    table = pd.read_csv(out / "calibration.csv")
    assert set(table["case"]) == {"iso2-score", "iso2-drift"}
    assert {"case", "family", "target", "d", "method", "n_seeds", "rejections", "rate", "se", "w2", "meets"} <= set(
        table.columns
    )
    assert len(table) == 2 * len(METHODS) * len(ALPHAS)
    drift = table[table["case"] == "iso2-drift"].iloc[0]
    assert drift["w2"] == pytest.approx(0.3, rel=1e-6)  # closed form: N(Sigma b, Sigma), |b| = 0.3
    readme = (out / "README.md").read_text()
    assert "command" in readme and "torch" in readme and "iso2-drift" in readme
    assert "python -m tools.calibration --cases" in readme and "device cpu, torch threads per process: 1" in readme
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "0 case(s) to run" in capsys.readouterr().out
    # --refresh-w2 recomputes the W2 columns of the perturbed cases only, from the stored p-values
    assert cli.main(args + ["--refresh-w2"]) == 0
    printed = capsys.readouterr().out
    assert "refreshed W2 of iso2-drift: 0.3 (closed form (Gaussian))" in printed and "iso2-score" not in printed
    # --rerun-rollout recomputes the rollout on the same samples and keeps the KSD p-values
    before = pd.read_csv(out / "pvalues.csv").sort_values(["case", "seed"]).reset_index(drop=True)
    pv = before.copy()
    pv["p_ksd_sum"] = -1.0  # a marker: reused columns are read back, not recomputed
    pv.to_csv(out / "pvalues.csv", index=False)
    assert cli.main(args + ["--rerun-rollout"]) == 0
    after = pd.read_csv(out / "pvalues.csv").sort_values(["case", "seed"]).reset_index(drop=True)
    assert (after["p_ksd_sum"] == -1.0).all()
    assert after["p_ksd"].tolist() == before["p_ksd"].tolist()
    assert after["p_rollout"].tolist() == before["p_rollout"].tolist()
    # --rerun-ksd is the converse: KSD recomputed, rollout columns read back
    pv = after.copy()
    pv["rollout_seconds"] = -1.0
    pv.to_csv(out / "pvalues.csv", index=False)
    assert cli.main(args + ["--rerun-ksd"]) == 0
    again = pd.read_csv(out / "pvalues.csv").sort_values(["case", "seed"]).reset_index(drop=True)
    assert (again["rollout_seconds"] == -1.0).all() and (again["p_ksd_sum"] != -1.0).all()
    assert again["p_ksd"].tolist() == before["p_ksd"].tolist()
    assert again["p_rollout"].tolist() == before["p_rollout"].tolist()


@pytest.mark.parametrize("damage", ["cut-mid-row", "short-row", "foreign"])
def test_calibration_refuses_a_truncated_or_foreign_table(tmp_path, damage):
    """A calibration.csv cut mid-row was read with NaN padding and resumed from as if complete."""
    out = tmp_path / "cal"
    out.mkdir()
    good = (
        "case,seed,p_ksd,p_rollout\n"
        "iso2-score,0,0.5,0.4\n"
        "iso2-score,1,0.3,0.2\n"
    )
    text = {
        "cut-mid-row": good[:-6],
        "short-row": good + "iso2-score,2\n",
        "foreign": "a,b,c\n1,2,3\n",
    }[damage]
    (out / "pvalues.csv").write_text(text)
    args = ["--cases", "iso2-score", "--seeds", "2", "--n", "100", "--out", str(out)]
    with pytest.raises(ValueError, match="truncated|corrupted|not a calibration table"):
        cli.main(args)


def test_threads_option_sets_the_workers_torch_threads(tmp_path):
    """--threads reaches the process that runs a case (a spawned worker starts with torch's
    default, all cores), and the summary says so."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        name, rows, pv, _ = run_job(CaseJob("iso2-score", n=50, n_seeds=1, w2_n=50, threads=2))
        assert torch.get_num_threads() == 2 and name == "iso2-score" and len(pv) == 1
        assert cli.main(["--cases", "iso2-score", "--seeds", "1", "--n", "50", "--threads", "3", "--out", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert "device cpu, torch threads per process: 3, processes: 1" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--threads", "0"], "--threads"), (["--jobs", "-1"], "--jobs"), (["--device", "nonsense"], "--device"),
     (["--cases", "nothing-*"], "no case matches")],
)
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--out", "/nonexistent/never-written"])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_command_runs_by_its_name_and_its_help_shows_examples_that_parse():
    """``python -m tools.calibration`` from the repository root; each example line of --help parses."""
    res = subprocess.run([sys.executable, "-m", "tools.calibration", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    examples = res.stdout.split("examples:\n", 1)[1].splitlines()
    calls = [ln.split("#")[0].split()[3:] for ln in examples if ln.strip().startswith(cli.PROG)]
    assert len(calls) >= 3 and any("--quick" in c for c in calls)
    for argv in calls:
        if "cuda" not in argv or torch.cuda.is_available():
            cli.build_parser().parse_args(argv)
    listed = subprocess.run([sys.executable, "-m", "tools.calibration", "--list"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    assert [ln.split()[0] for ln in listed] == [c.name for c in CASES]


def test_seed_samples_are_the_same_on_every_device_and_fields_follow_the_input():
    """The samples of a seed are drawn on the CPU and moved (meta: a device without data);
    the fields evaluate in the input's dtype."""
    target, field, _ = make_case(CASE_BY_NAME["iso2-rot_sym"])
    x = seed_samples(target, 3, 40)
    assert torch.equal(x, seed_samples(target, 3, 40)) and not torch.equal(x, seed_samples(target, 4, 40))
    assert seed_samples(target, 3, 40, "meta").device.type == "meta"
    assert field(x.float()).dtype == torch.float32 and not math.isnan(float(field(x).sum()))
