"""The runner: rows and provenance, skip-if-done, interruption, shards and merge, perturbations, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fluxbench.suites import Records, RecordsError, load_suite, merge, parse_perturb, rotation_matrix, run_suite
from fluxbench.suites import runner as runner_mod
from fluxbench.suites.cli import main_gate, main_suite
from fluxbench.suites.gate import load_records, records_path
from fluxbench.suites.perturb import RotationalModel, perturb_field, strip_rotation

SAMPLING = """\
name = "{name}"
description = "tiny exact-score suite for the tests"
kind = "sampling"
targets = ["triangle", {{ name = "g2", target = "anisotropic_gaussian", args = {{ dim = 2, condition_number = 4.0, seed = 1 }}, step_size = 0.005 }}]
objectives = ["exact"]
sigma_eval = 0.05
sampler = {{ step_size = 0.01 }}
metrics = ["w2", "sliced_w2", "mmd", "gauss_w2", "stationarity", "field_rel_l2"]
[tiers.quick]
seeds = 2
n_samples = 200
stationarity_n = 200
checkpoints = [0, 20]
n_permutations = 20
floor_repeats = 2
artifacts_grid = 8
[tiers.full]
seeds = 1
[[claims]]
id = "w2-at-floor"
metric = "w2"
where = {{ objective = "exact", step = "last" }}
against = "noise_floor"
per = ["target"]
op = "<="
value = 0.15
[[claims]]
id = "stationary"
kind = "p-value"
metric = "stationarity"
where = {{ objective = "exact" }}
"""


@pytest.fixture()
def suite(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(SAMPLING.format(name="tiny"))
    return load_suite(path)


def test_rows_have_every_column_provenance_and_floors(suite, tmp_path):
    rec = Records(tmp_path / "r.csv")
    df = run_suite(suite, tier="quick", records=rec, artifacts_dir=tmp_path / "art")
    assert sorted(df["run"].unique()) == sorted(r.key for r in suite.runs("quick"))
    assert df.equals(rec.load())
    assert (df["device"] == "cpu").all() and (df["dtype"] == "float32").all() and (df["torch"] == torch.__version__).all()
    assert (df["suite_hash"] == suite.suite_hash).all() and (df["commit"] == runner_mod.git_commit()).all()
    assert (df["wall_s"] > 0).all()
    one = df[df["run"] == "triangle/exact/mlp/seed0/quick"]
    for metric in ("w2", "sliced_w2", "mmd", "gauss_w2"):
        rows = one[one["metric"] == metric]
        assert rows["step"].tolist() == [0, 20]
        assert rows["noise_floor"].notna().all() and (rows["value"] > (0 if metric != "mmd" else -1)).all()
    assert one.loc[one["metric"] == "mmd", "p_value"].between(0, 1).all()
    stat = one[one["metric"] == "stationarity"]
    assert len(stat) == 1 and 0 < float(stat["p_value"].iloc[0]) <= 1
    assert float(one.loc[one["metric"] == "field_rel_l2", "value"].iloc[0]) == pytest.approx(0, abs=1e-6)
    art = torch.load(next((tmp_path / "art" / "tiny").glob("triangle_exact*seed0*.pt")))
    assert art["field"].shape == (8, 8, 2) and art["samples"].shape == (200, 2) and art["grid_x"].shape == (8,)


def test_rerun_skips_what_is_recorded(suite, tmp_path, monkeypatch):
    rec = Records(tmp_path / "r.csv")
    run_suite(suite, tier="quick", records=rec)
    calls = []
    monkeypatch.setattr(runner_mod, "_measurer", lambda kind: lambda ctx: calls.append(ctx.run.key) or [])
    again = run_suite(suite, tier="quick", records=rec)
    assert len(again) == 0 and calls == []
    # another suite hash (the file changed) runs everything again
    monkeypatch.undo()
    changed = suite.with_overrides("quick", n_samples=150)
    monkeypatch.setattr(runner_mod, "_measurer", lambda kind: lambda ctx: calls.append(ctx.run.key) or [dict(metric="x", value=1.0)])
    run_suite(changed, tier="quick", records=rec)
    assert calls == [r.key for r in suite.runs("quick")]


def test_interrupted_suite_loses_nothing_finished(suite, tmp_path, monkeypatch):
    rec = Records(tmp_path / "r.csv")
    real = runner_mod._measurer("sampling")
    seen = []

    def flaky(ctx):
        seen.append(ctx.run.key)
        if len(seen) == 3:
            raise RuntimeError("simulated crash in the third run")
        return real(ctx)

    monkeypatch.setattr(runner_mod, "_measurer", lambda kind: flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_suite(suite, tier="quick", records=rec)
    keys = [r.key for r in suite.runs("quick")]
    assert set(rec.load()["run"]) == set(keys[:2])  # the two finished runs are recorded, whole
    seen.clear()
    run_suite(suite, tier="quick", records=rec)  # the rerun does only what is missing
    assert seen == keys[2:]
    assert set(rec.load()["run"]) == set(keys)


def test_shards_write_separate_files_that_merge_into_the_whole(suite, tmp_path):
    paths = []
    for i in (1, 2, 3):
        path = records_path(tmp_path, "tiny", shard=(i, 3))
        run_suite(suite, tier="quick", records=path, shard=f"{i}/3")
        paths.append(path)
    assert paths[0].name == "tiny.shard-1-of-3.csv"
    parts = [set(Records(p).load()["run"]) for p in paths]
    assert all(a.isdisjoint(b) for a in parts for b in parts if a is not b)
    merged = merge(paths, tmp_path / "records" / "tiny.csv")
    assert set(merged["run"]) == {r.key for r in suite.runs("quick")}
    assert len(load_records(tmp_path, ["tiny"])) == len(merged)  # shards + merged file: duplicates dropped
    # a complete shard set means nothing left to run
    assert len(run_suite(suite, tier="quick", records=tmp_path / "records" / "tiny.csv")) == 0


def test_bad_arguments_are_value_errors(suite, tmp_path):
    with pytest.raises(ValueError, match="shard"):
        run_suite(suite, tier="quick", records=tmp_path / "r.csv", shard="4/3")
    with pytest.raises(ValueError, match="no tier"):
        run_suite(suite, tier="medium", records=tmp_path / "r.csv")
    with pytest.raises(ValueError, match="device"):
        run_suite(suite, tier="quick", records=tmp_path / "r.csv", device="cuda:7" if not torch.cuda.is_available() else "nope")
    with pytest.raises(ValueError, match="unknown perturbation"):
        run_suite(suite, tier="quick", records=tmp_path / "r.csv", perturb="temperature:-1")
    bad = tmp_path / "foreign.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(RecordsError, match="not a fluxbench records file"):
        run_suite(suite, tier="quick", records=bad)


def test_perturbations():
    assert parse_perturb("temperature:0.5").arg == 0.5 and parse_perturb("sign:1").label == "sign:1"
    assert parse_perturb("drop-rotation").kind == "drop-rotation" and parse_perturb(None) is None
    for bad in ("temperature:0", "temperature:x", "sign:-1", "rotate", "sign:"):
        with pytest.raises(ValueError, match="unknown perturbation"):
            parse_perturb(bad)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    f = lambda z: 2 * z  # noqa: E731
    assert torch.equal(perturb_field(f, parse_perturb("temperature:0.5"), dim=3)(x), x)
    flipped = perturb_field(f, parse_perturb("sign:2"), dim=3)(x)
    assert torch.equal(flipped[:, :2], 2 * x[:, :2]) and torch.equal(flipped[:, 2], -2 * x[:, 2])
    with pytest.raises(ValueError, match="component"):
        perturb_field(f, parse_perturb("sign:3"), dim=3)
    A = rotation_matrix(5, 1.5)
    assert torch.equal(A, -A.T) and A[0, 1] == -1.5 and A[4].abs().sum() == 0
    model = RotationalModel(3, 2.0, hidden=(8,))
    g = model.base(x, 0.3)
    assert torch.allclose(model(x, 0.3), g + g @ rotation_matrix(3, 2.0).T)
    assert strip_rotation(model) is model.base and strip_rotation(f) is None


def test_perturbed_runs_are_recorded_under_their_own_keys(suite, tmp_path):
    rec = Records(tmp_path / "p.csv")
    df = run_suite(suite, tier="quick", records=rec, perturb="temperature:0.5")
    assert all(k.endswith("/perturb=temperature:0.5") for k in df["run"].unique())
    ok = run_suite(suite, tier="quick", records=tmp_path / "ok.csv")
    p = lambda d: d.loc[d["metric"] == "stationarity", "p_value"]  # noqa: E731
    assert p(df).max() < 0.01 < p(ok).min()  # half the drift: twice the temperature, rejected


def test_long_rollout_and_estimator_rows(tmp_path):
    lr = tmp_path / "lr.toml"
    lr.write_text("""
name = "lr"
kind = "long-rollout"
targets = [{ name = "g2", target = "anisotropic_gaussian", args = { dim = 2, condition_number = 10.0, seed = 2 }, step_size = 0.01 }]
objectives = ["exact", "rotational"]
rotation = 1.5
metrics = ["w2"]
[tiers.quick]
particles = 200
n_eval = 200
rollout_steps = 1500
per_decade = 1
trace_chains = 200
trace_every = 5
floor_repeats = 3
[tiers.full]
particles = 100
""")
    df = run_suite(load_suite(lr), tier="quick", records=tmp_path / "lr.csv")
    far = df[df["metric"] == "w2@far"]
    assert far["step"].tolist()[:2] == [0, 1] and far["value"].iloc[0] > 4  # 5 std away at the start
    iat = df[df["metric"] == "iat_max"].set_index("objective")["value"]
    assert 100 < iat["exact"] < 400  # OU in the slow direction: tau ~ 2 / (lambda eps) = 200 steps (trace every 5th)
    assert iat["rotational"] < iat["exact"] / 2
    assert (df.loc[df["metric"] == "steps_to_floor@far", "value"] <= 1500).all()
    assert (df.loc[df["metric"] == "particle_steps_per_s", "value"] > 0).all()

    est = tmp_path / "est.toml"
    est.write_text("""
name = "est"
kind = "estimator"
targets = ["triangle"]
objectives = ["flux"]
[tiers.quick]
n_draws = 4
n_batches = 8
snr_sigmas = [0.3]
bias = [[0.3, 64]]
loss_mass_sigmas = [0.3]
hidden = [16]
[tiers.full]
n_draws = 4
""")
    df = run_suite(load_suite(est), tier="quick", records=tmp_path / "est.csv")
    assert set(df["target"]) == {"triangle@sigma=0.3"}
    c = df[df["metric"] == "c_star"]
    assert c["model"].tolist() == ["B64"] and c["stderr"].iloc[0] > 0
    assert {"grad_snr", "frac_draws_t<0.5", "frac_abs_loss_t<0.5"} <= set(df["metric"])


def test_fitted_runs_and_equal_wallclock(tmp_path):
    path = tmp_path / "fit.toml"
    path.write_text("""
name = "fit"
kind = "sampling"
targets = ["triangle"]
objectives = ["flux", "dsm"]
models = [{ name = "mlp", hidden = [16] }, { name = "rot", kind = "rotational", rotation = 1.0, hidden = [16] }]
sigma_eval = 0.1
recipe = { sigma_max = 1.0, batch_size = 64 }
metrics = ["w2", "rotation_coef", "field_rel_l2"]
[tiers.quick]
steps = 20
batch_size = 64
n_samples = 100
stationarity_n = 100
checkpoints = [0, 5]
sample_levels = 10
equal_wallclock = true
[tiers.full]
steps = 10
""")
    df = run_suite(load_suite(path), tier="quick", records=tmp_path / "f.csv")
    wc = df[df["objective"] == "dsm-wallclock"]
    assert set(wc["run"]) == {"triangle/flux/mlp/seed0/quick/dsm-wallclock", "triangle/flux/rot/seed0/quick/dsm-wallclock"}
    steps = wc.loc[wc["metric"] == "train_steps", "value"]
    assert (steps >= 1).all()
    flux_s = df[(df["objective"] == "flux") & (df["metric"] == "train_seconds")]["value"].to_numpy()
    wc_s = wc[wc["metric"] == "train_seconds"]["value"].to_numpy()
    assert ((wc_s > 0.2 * flux_s) & (wc_s < 5 * flux_s)).all()  # about the same wall clock
    assert set(df.loc[df["metric"] == "rotation_coef", "model"]) == {"rot"}
    # done: the flux run's key covers its dsm-wallclock rows
    assert len(run_suite(load_suite(path), tier="quick", records=tmp_path / "f.csv")) == 0


def test_git_commit(tmp_path, monkeypatch):
    commit = runner_mod.git_commit()
    assert commit == "unknown" or len(commit.split("+")[0]) == 12
    monkeypatch.setattr(runner_mod, "_PROVENANCE_CACHE", {})
    assert runner_mod.git_commit(tmp_path) == "unknown"  # not a git checkout


def test_cli_usage_errors_and_gate_exit_codes(suite, tmp_path, capsys):
    d = str(suite.path.parent)
    assert main_suite(["list", "--suites-dir", d]) == 0
    assert "tiny" in capsys.readouterr().out
    for argv in (["run", "tiny", "--shard", "0/2", "--suites-dir", d], ["run", "nope", "--suites-dir", d],
                 ["run", "tiny", "--tier", "slow", "--suites-dir", d]):
        with pytest.raises(SystemExit) as info:
            main_suite(argv)
        assert info.value.code == 2
        assert "error" in capsys.readouterr().err
    out = str(tmp_path / "out")
    assert main_gate(["tiny", "--suites-dir", d, "--out", out, "--quiet"]) == 0
    assert "PASS" in capsys.readouterr().out
    code = main_gate(["tiny", "--suites-dir", d, "--out", out, "--quiet", "--perturb", "sign:0"])
    captured = capsys.readouterr()
    assert code == 1 and "FAILED tiny:stationary" in captured.err and "GATE FAILS: stationary" in captured.out
    with pytest.raises(SystemExit) as info:
        main_gate(["--alpha", "2", "--suites-dir", d])
    assert info.value.code == 2
    rec = Path(out) / "records"
    assert main_suite(["merge", str(rec / "tiny.csv"), str(rec / "tiny+perturb=sign_0.csv"), "-o", str(tmp_path / "m.csv")]) == 0
    assert "merged 2 files" in capsys.readouterr().out
    (tmp_path / "junk.csv").write_text("not,records\n")
    with pytest.raises(SystemExit) as info:
        main_suite(["merge", str(tmp_path / "junk.csv"), "-o", str(tmp_path / "m2.csv")])
    assert info.value.code == 2 and "not a fluxbench records file" in capsys.readouterr().err


def test_cli_help_has_an_example(capsys):
    from fluxbench.cli import main

    for cmd in (["suite", "--help"], ["suite", "run", "--help"], ["suite", "list", "--help"], ["suite", "merge", "--help"],
                ["gate", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(cmd)
        out = capsys.readouterr().out
        assert info.value.code == 0 and "example:" in out, (cmd, out)
    res = subprocess.run([sys.executable, "-m", "fluxbench.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and all(c in res.stdout for c in ("suite", "report", "gate"))


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cli_threads_are_set_before_the_work(monkeypatch, restore_threads, tmp_path, capsys):
    """``suite run``, ``gate`` and ``report`` run their work at ``--threads`` (default 1), whatever
    the process had before; a non-positive or non-integer value is a usage error."""
    import importlib

    import pandas as pd

    from fluxbench.suites.cli import main_report

    gate_mod = importlib.import_module("fluxbench.suites.gate")  # the package re-exports a function of that name

    seen = []

    def record(result):
        def fn(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return result
        return fn

    monkeypatch.setattr(runner_mod, "run_suite", record(pd.DataFrame()))
    monkeypatch.setattr(gate_mod, "gate", record(([], None)))
    monkeypatch.setattr(gate_mod, "load_records", record(pd.DataFrame()))
    d = tmp_path / "suites"
    d.mkdir()
    (d / "tiny.toml").write_text(SAMPLING.format(name="tiny"))
    common = ["--suites-dir", str(d), "--out", str(tmp_path / "out")]
    for threads, extra in ((1, []), (2, ["--threads", "2"])):  # 1: the documented default
        torch.set_num_threads(3)
        assert main_suite(["run", "tiny", "--quiet", *common, *extra]) == 0
        torch.set_num_threads(3)
        main_gate(["tiny", "--quiet", *common, *extra])
        torch.set_num_threads(3)
        with pytest.raises(SystemExit):  # no records: a usage error, after the threads were set
            main_report([*common, *extra])
        assert seen == [threads] * 3, (extra, seen)
        seen.clear()
    capsys.readouterr()
    for bad in ("0", "-1", "two"):
        for main, argv in ((main_suite, ["run", "tiny"]), (main_gate, []), (main_report, [])):
            with pytest.raises(SystemExit) as info:
                main([*argv, *common, "--threads", bad])
            assert info.value.code == 2 and "--threads" in capsys.readouterr().err
