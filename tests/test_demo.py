"""Tests of ``fluxbench demo``: recipes, output folder, noise floor, argument errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from fluxbench import demo
from fluxbench.cli import main as cli_main
from fluxbench.recipes import AnnealedRecipe, SingleSigmaRecipe

TINY = ["--steps", "3", "--batch-size", "16", "--samples", "40", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_default_is_annealed_for_both_methods(tmp_path, capsys, monkeypatch):
    seen = []
    real_fit = demo.fit

    def spy(method, data, recipe, **kw):
        seen.append((method, recipe))
        return real_fit(method, data, recipe, **kw)

    monkeypatch.setattr(demo, "fit", spy)
    demo.main([*TINY, "--out", str(tmp_path / "d")])
    assert [m for m, _ in seen] == ["flux", "dsm"]
    assert all(isinstance(r, AnnealedRecipe) and r.steps == 3 and r.batch_size == 16 for _, r in seen)
    assert seen[0][1] == AnnealedRecipe(steps=3, batch_size=16)  # the defaults otherwise
    out = capsys.readouterr().out
    assert "annealed sigma in [0.02, 2]" in out and "noise floor" in out and "W2" in out and "MMD2" in out
    table = pd.read_csv(tmp_path / "d" / "results.csv")
    assert table["method"].tolist() == ["flux", "dsm", "noise floor"]
    record = json.loads((tmp_path / "d" / "record.json").read_text())
    assert record["config"]["recipe"] == "AnnealedRecipe" and record["config"]["sigma_min"] == 0.02
    assert (tmp_path / "d" / "demo.png").stat().st_size > 0


def test_noise_floor_is_scored_at_sigma_min(monkeypatch, tmp_path):
    """The reference and floor samples come from target.smoothed(sigma_eval): sigma_min for the
    annealed recipe, sigma for the single-sigma one."""
    calls = []
    real = demo.reference_samples

    def spy(target, sigma, n, seed):
        calls.append(sigma)
        return real(target, sigma, n, seed)

    monkeypatch.setattr(demo, "reference_samples", spy)
    monkeypatch.setattr(demo, "_plot", lambda *a, **k: None)
    for recipe in (AnnealedRecipe(steps=2, batch_size=8, sample_levels=3), SingleSigmaRecipe(steps=2, batch_size=8, langevin_steps=2)):
        table = demo.run_demo(recipe=recipe, methods=("dsm",), n_samples=20, out=tmp_path, progress=False)
        assert table["method"].tolist() == ["dsm", "noise floor"]
    assert calls == [0.02, 0.1]


def test_single_sigma_option(tmp_path, capsys):
    demo.main([*TINY, "--single-sigma", "--sigma", "0.2", "--method", "flux", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "single sigma=0.2" in out
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["config"]["recipe"] == "SingleSigmaRecipe" and record["config"]["sigma"] == 0.2


def test_default_out_is_the_ignored_runs_folder():
    assert demo.build_parser().parse_args([]).out == "runs/demo"
    assert demo.DEFAULT_OUT == "runs/demo"


def test_help_documents_the_single_sigma_bias(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--single-sigma" in text and "1.38" in text and "0.44" in text and "--device" in text


def test_help_ends_with_examples_that_parse(capsys):
    """Every command's --help shows an example; each example line must be a valid call."""
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    examples = capsys.readouterr().out.split("examples:\n", 1)[1].splitlines()
    calls = [line.split("#")[0].split()[2:] for line in examples if line.strip().startswith("fluxbench demo")]
    assert len(calls) >= 3
    for argv in calls:
        if "cuda" not in argv or torch.cuda.is_available():
            demo.build_parser().parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps"),
        (["--steps", "many"], "--steps"),
        (["--samples", "1"], "--samples"),
        (["--seed", "-1"], "--seed"),
        (["--target", "moon"], "--target"),
        (["--device", "nonsense"], "--device"),
        (["--sigma", "0.1"], "--single-sigma"),
        (["--single-sigma", "--sigma", "-1"], "--sigma"),
        (["--single-sigma", "--normalise"], "--normalise"),
        (["--method", "both2"], "--method"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["demo", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: fluxbench demo" in err and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_device_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--device", "cuda"])
    assert exc.value.code == 2 and "CUDA is not available" in capsys.readouterr().err
