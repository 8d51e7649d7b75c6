"""The report: Markdown + HTML with plots from a synthetic records table; determinism; bad input."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fluxbench.suites.claims import evaluate
from fluxbench.suites.records import empty_records
from fluxbench.suites.report import artifact_name, load_field_artifact, render_report, save_field_artifact

PNG = b"\x89PNG\r\n\x1a\n"


def records() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for target in ("triangle", "ring"):
        for objective in ("flux", "dsm"):
            for seed in range(2):
                run = f"{target}/{objective}/mlp/seed{seed}"
                base = dict(suite="long-rollout", tier="quick", run=run, target=target, model="mlp",
                            objective=objective, seed=seed, stderr=math.nan, p_value=math.nan, device="cpu",
                            dtype="float32", torch="2.10", commit="abc1234", suite_hash="0123456789ab", wall_s=2.0,
                            recorded_at=f"2025-01-01T00:00:0{seed}+00:00")  # fmt: skip
                for step in (0, 10, 100, 1000):
                    rows.append(dict(base, step=step, metric="w2", value=0.2 + 1 / (1 + step) + 0.01 * rng.random(),
                                     noise_floor=0.2))  # fmt: skip
                rows.append(dict(base, step=0, metric="stationarity", value=1.5, noise_floor=math.nan,
                                 p_value=0.2 + 0.3 * seed))  # fmt: skip
    return pd.concat([empty_records(), pd.DataFrame(rows)], ignore_index=True)


CLAIMS = [
    {"id": "lr/flux-near-dsm", "metric": "w2", "where": {"objective": "flux", "step": "last"},
     "against": {"objective": "dsm"}, "per": ["target"], "op": "<=", "value": 0.05},
    {"id": "lr/stationary", "metric": "stationarity", "kind": "p-value", "per": ["target"]},
    {"id": "lr/known|bad", "metric": "w2", "where": {"step": "last"}, "op": "<=", "value": 0.01, "expect": "fail",
     "reason": "the floor is 0.2"},
]  # fmt: skip


def artifacts(tmp_path):
    rng = np.random.default_rng(1)
    g = np.linspace(-2, 2, 12)
    x, y = np.meshgrid(g, g)  # "xy": field[i, j] at (g[j], g[i])
    for objective, field in (("flux", np.stack([-y - x, x - y], -1)), ("dsm", np.stack([-x, -y], -1))):
        save_field_artifact(tmp_path / "art" / artifact_name(f"ring/{objective}/mlp/seed0"), grid_x=g, grid_y=g,
                            field=field, samples=rng.normal(size=(50, 2)), reference=rng.normal(size=(50, 2)))  # fmt: skip
    return tmp_path / "art"


def test_render_report_writes_tables_and_plots(tmp_path):
    df = records()
    results = evaluate(CLAIMS, df, "quick")
    md, page = render_report(df, results, tmp_path / "out", artifacts(tmp_path))
    assert md == tmp_path / "out" / "report.md" and page == tmp_path / "out" / "report.html"
    text, html = md.read_text(), page.read_text()
    for c in CLAIMS:  # the claims table lists every claim, in both formats
        assert c["id"].replace("|", r"\|") in text and c["id"] in html
    assert "XFAIL" in text and "expected to fail: the floor is 0.2" in text
    assert "0123456789ab" in text and "abc1234" in html and "| 2.10 " in text  # provenance (torch "2.10" kept)
    plots = sorted(p.name for p in (tmp_path / "out" / "plots").iterdir())
    assert plots == [
        "long-rollout-quick-stationarity-objectives.png",  # one step: no step plot
        "long-rollout-quick-w2-objectives.png",
        "long-rollout-quick-w2-steps.png",
        "long-rollout-ring-mlp-field.png",  # artifacts for ring only
    ]
    for name in plots:
        assert (tmp_path / "out" / "plots" / name).read_bytes().startswith(PNG)
        assert f"](plots/{name})" in text and f'src="plots/{name}"' in html
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")


def test_same_input_same_bytes_and_stale_plots_removed(tmp_path):
    df = records()
    results = evaluate(CLAIMS, df, "quick")
    art = artifacts(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    render_report(df, results, a, art)
    (b / "plots").mkdir(parents=True)
    (b / "plots" / "old-metric-steps.png").write_bytes(PNG)
    render_report(df, results, b, art)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    render_report(df[df["metric"] == "stationarity"], results, a)
    assert sorted(p.name for p in (a / "plots").iterdir()) == ["long-rollout-quick-stationarity-objectives.png"]


def test_empty_records_and_no_claims_render(tmp_path):
    md, page = render_report(empty_records(), [], tmp_path)
    assert "No claims evaluated." in md.read_text() and "No records." in page.read_text()


def test_bad_input_is_refused(tmp_path):
    df = records()
    with pytest.raises(ValueError, match="DataFrame"):
        render_report(df.to_dict(), [], tmp_path)
    with pytest.raises(ValueError, match=r"lacks the record column\(s\) \['noise_floor'\]"):
        render_report(df.drop(columns="noise_floor"), [], tmp_path)
    with pytest.raises(ValueError, match="ClaimResult"):
        render_report(df, ["lr/stationary"], tmp_path)
    with pytest.raises(ValueError, match="ClaimResult"):
        render_report(df, evaluate(CLAIMS, df, "quick")[0], tmp_path)
    with pytest.raises(ValueError, match="artifacts_dir .* is not a directory"):
        render_report(df, [], tmp_path, tmp_path / "nope")
    art = artifacts(tmp_path)
    bad = art / artifact_name("ring/flux/mlp/seed0")
    import torch

    torch.save({"grid_x": torch.zeros(3), "grid_y": torch.zeros(4), "field": torch.zeros(3, 4, 2),
                "samples": torch.zeros(5, 2), "reference": torch.zeros(5, 2)}, bad)  # fmt: skip
    with pytest.raises(ValueError, match=r"ring_flux_mlp_seed0\.pt: field must have shape .*\(4, 3, 2\)"):
        render_report(df, [], tmp_path / "out", art)
    bad.write_text("not a tensor file")
    with pytest.raises(ValueError, match="not a readable field artifact"):
        load_field_artifact(bad)


def test_artifact_name_is_a_safe_file_name():
    assert artifact_name("ring/flux/mlp/seed0") == "ring_flux_mlp_seed0.pt"
    assert artifact_name("a b/../c=1") == "a_b_.._c_1.pt"  # per character, as the runner writes them
    with pytest.raises(ValueError):
        artifact_name("")
