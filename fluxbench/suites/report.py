"""The suites report: Markdown and HTML with plots, the claims table and the provenance.

:func:`render_report` writes into ``out_dir``::

    report.md, report.html      the same content (the HTML is one file plus the PNGs beside it)
    plots/*.png                 matplotlib's object API (``Figure``; no pyplot, so no global backend or state)

Content: a summary; the claims table (verdict, claim, group, value, threshold, evidence);
the provenance (commit, suite hash, device, dtype, torch, runs, wall time, recording times);
then per suite: the results at each run's last checkpoint (mean, min, max over seeds, noise
floor, smallest p-value), and the plots:

* ``<suite>-<tier>-<metric>-steps.png`` for metrics recorded at several steps: the metric
  against the rollout step (log x; symlog when step 0 is present), one panel per objective
  side by side with a shared y-axis, one line per configuration (mean over seeds, min-max
  shading) and its noise-floor band (min-max of the recorded floors) dashed;
* ``<suite>-<tier>-<metric>-objectives.png``: the last checkpoint, bars per objective
  (flux, DSM, exact, ...) side by side per configuration, min-max over seeds as error bars,
  the noise floor as a black tick;
* ``<suite>-<target>-<model>-field.png`` for runs with an artifact: streamlines of the
  field over the reference samples and the model's samples, one panel per objective.

Artifacts: ``artifacts_dir/<suite>/<artifact_name(run)>`` or ``artifacts_dir/<artifact_name(run)>``,
a ``torch.save``-d dict with ``grid_x`` (G,), ``grid_y`` (H,), ``field`` (H, G, 2) with
``field[i, j] = f(grid_x[j], grid_y[i])`` (meshgrid "xy" order, as ``plt.streamplot``
takes it), ``samples`` (n, 2), ``reference`` (m, 2). :func:`save_field_artifact` writes one.

The output depends on the input only (no clock): the same records and results give the same
bytes. Every file is written atomically (temporary file + ``os.replace``); PNGs of an
earlier report that this one does not produce are removed from ``plots/``.
"""

from __future__ import annotations

import html
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fluxbench.fileio import atomic_write, write_text
from fluxbench.suites.claims import ClaimResult, results_frame
from fluxbench.suites.records import COLUMNS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["render_report", "artifact_name", "save_field_artifact", "load_field_artifact"]

_PNG_META = {"Software": None}  # no version string in the files: same input, same bytes


def artifact_name(run: str) -> str:
    """File name of a run's 2-D field artifact: the run key, every character outside
    ``[A-Za-z0-9._-]`` replaced by ``_``, plus ``.pt`` (``ring/flux/mlp/seed0`` -> ``ring_flux_mlp_seed0.pt``)."""
    if not isinstance(run, str) or not run:
        raise ValueError(f"run must be a non-empty string, got {run!r}")
    return re.sub(r"[^A-Za-z0-9._-]", "_", run) + ".pt"


def save_field_artifact(path, *, grid_x, grid_y, field, samples, reference) -> Path:
    """Write a field artifact (shapes in the module docstring), atomically; returns the path."""
    import torch

    data = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in
            dict(grid_x=grid_x, grid_y=grid_y, field=field, samples=samples, reference=reference).items()}  # fmt: skip
    _check_artifact(Path(path), {k: v.numpy() for k, v in data.items()})
    return atomic_write(path, lambda fh: torch.save(data, fh), binary=True)


def load_field_artifact(path) -> dict[str, np.ndarray]:
    """Load and validate a field artifact (float64 numpy arrays). Raises ValueError naming the file."""
    import torch

    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ValueError(f"{path}: not a readable field artifact ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a field artifact is a dict, got {type(raw).__name__}")
    data = {k: np.asarray(torch.as_tensor(v).double()) for k, v in raw.items() if k in _ARTIFACT_KEYS}
    _check_artifact(path, data)
    return data


_ARTIFACT_KEYS = ("grid_x", "grid_y", "field", "samples", "reference")


def _check_artifact(path: Path, d: dict) -> None:
    missing = [k for k in _ARTIFACT_KEYS if k not in d]
    if missing:
        raise ValueError(f"{path}: field artifact lacks {missing}")
    gx, gy, f = d["grid_x"], d["grid_y"], d["field"]
    if gx.ndim != 1 or gy.ndim != 1 or len(gx) < 2 or len(gy) < 2:
        raise ValueError(f"{path}: grid_x, grid_y must be 1-D with >= 2 points, got {gx.shape}, {gy.shape}")
    if f.shape != (len(gy), len(gx), 2):
        raise ValueError(f"{path}: field must have shape (len(grid_y), len(grid_x), 2) = "
                         f"{(len(gy), len(gx), 2)}, got {tuple(f.shape)}")  # fmt: skip
    for k in ("samples", "reference"):
        if d[k].ndim != 2 or d[k].shape[1] != 2:
            raise ValueError(f"{path}: {k} must have shape (n, 2), got {tuple(d[k].shape)}")
    if not all(np.isfinite(d[k]).all() for k in ("grid_x", "grid_y", "field")):
        raise ValueError(f"{path}: grid or field has non-finite values")


def _objectives(values) -> list[str]:
    """flux, dsm, exact first (in that order), then the others alphabetically."""
    first = [o for o in ("flux", "dsm", "exact") if o in set(values)]
    return first + sorted(set(values) - set(first))


def _slug(s) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", str(s)).strip("_") or "_"


def _fmt(x) -> str:
    return "" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4g}"


def _config(df: pd.DataFrame) -> pd.Series:
    """Run key without its seed, objective and tier segments: the line / bar a run belongs to."""
    def one(run, seed, objective, tier):
        parts = [p for p in run.split("/") if p not in (f"seed{seed}", objective, tier)]
        return "/".join(parts) or run
    cols = zip(df["run"], df["seed"], df["objective"], df["tier"])
    return pd.Series([one(*t) for t in cols], index=df.index, dtype=object)


def _last(df: pd.DataFrame) -> pd.DataFrame:
    key = ["suite", "tier", "run", "metric"]
    return df[df["step"] == df.groupby(key)["step"].transform("max")]


def _save(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata=_PNG_META)
    atomic_write(path, lambda fh: fh.write(buf.getvalue()), binary=True)


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _plot_steps(g: pd.DataFrame, metric: str, title: str) -> Figure:
    from matplotlib.figure import Figure  # lazily: importing fluxbench.suites stays light

    objectives = _objectives(g["objective"].unique())
    configs = sorted(g["config"].unique())
    colors = dict(zip(configs, _colors(len(configs))))
    fig = Figure(figsize=(4.2 * len(objectives) + 0.8, 3.6), layout="constrained")
    axes = fig.subplots(1, len(objectives), sharey=True, squeeze=False)[0]
    for ax, obj in zip(axes, objectives):
        for cfg, h in g[g["objective"] == obj].groupby("config", sort=True):
            s = h.groupby("step")["value"].agg(["mean", "min", "max"])
            ax.plot(s.index, s["mean"], marker="o", ms=3, color=colors[cfg], label=cfg)
            ax.fill_between(s.index, s["min"], s["max"], color=colors[cfg], alpha=0.15, lw=0)
            floor = h.dropna(subset=["noise_floor"]).groupby("step")["noise_floor"].agg(["min", "max"])
            if len(floor):
                ax.fill_between(floor.index, floor["min"], floor["max"], color=colors[cfg], alpha=0.25,
                                hatch="//", lw=0.8, ls="--", edgecolor=colors[cfg])  # fmt: skip
                ax.plot(floor.index, floor["max"], color=colors[cfg], ls="--", lw=0.8)
        if (g["step"] <= 0).any():
            ax.set_xscale("symlog", linthresh=1)
        else:
            ax.set_xscale("log")
        ax.set_title(obj)
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{metric} (dashed: noise floor)")
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    return fig


def _plot_objectives(g: pd.DataFrame, metric: str, title: str) -> Figure:
    from matplotlib.figure import Figure  # lazily: importing fluxbench.suites stays light

    objectives = _objectives(g["objective"].unique())
    configs = sorted(g["config"].unique())
    x = np.arange(len(configs))
    width = 0.8 / len(objectives)
    fig = Figure(figsize=(max(4.5, 1.1 * len(configs) * max(1, len(objectives) / 2) + 1.5), 3.6), layout="constrained")
    ax = fig.subplots()
    for k, (obj, color) in enumerate(zip(objectives, _colors(len(objectives)))):
        s = g[g["objective"] == obj].groupby("config")["value"].agg(["mean", "min", "max"]).reindex(configs)
        pos = x - 0.4 + width * (k + 0.5)
        err = np.vstack([s["mean"] - s["min"], s["max"] - s["mean"]])
        ax.bar(pos, s["mean"], width, yerr=err, capsize=2, color=color, label=obj)
    floor = g.groupby("config")["noise_floor"].mean().reindex(configs)
    if floor.notna().any():
        ax.hlines(floor, x - 0.45, x + 0.45, colors="black", lw=1.5, label="noise floor")
    ax.set_xticks(x, configs, rotation=20 if len(configs) > 3 else 0, ha="right" if len(configs) > 3 else "center",
                  fontsize=8)  # fmt: skip
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    ax.set_title(title)
    return fig


def _plot_fields(arts: list[tuple[str, str, dict]], title: str) -> Figure:
    from matplotlib.figure import Figure  # lazily: importing fluxbench.suites stays light

    fig = Figure(figsize=(4.0 * len(arts) + 0.5, 4.0), layout="constrained")
    axes = fig.subplots(1, len(arts), squeeze=False)[0]
    for ax, (obj, run, d) in zip(axes, arts):
        ax.streamplot(d["grid_x"], d["grid_y"], d["field"][..., 0], d["field"][..., 1], color="0.35", density=1.0,
                      linewidth=0.6, arrowsize=0.6)  # fmt: skip
        ax.scatter(d["reference"][:, 0], d["reference"][:, 1], s=2, color="tab:gray", alpha=0.4, label="reference")
        ax.scatter(d["samples"][:, 0], d["samples"][:, 1], s=2, color="tab:red", alpha=0.5, label="samples")
        ax.set_xlim(d["grid_x"][0], d["grid_x"][-1])
        ax.set_ylim(d["grid_y"][0], d["grid_y"][-1])
        ax.set_aspect("equal")
        ax.set_title(f"{obj}\n{run}", fontsize=8)
    axes[0].legend(fontsize=7, loc="upper right", markerscale=3)
    fig.suptitle(title)
    return fig


def _results_table(df: pd.DataFrame) -> pd.DataFrame:
    last = _last(df)
    keys = ["tier", "metric", "config", "objective"]
    agg = last.groupby(keys, sort=True).agg(
        n=("seed", "nunique"), mean=("value", "mean"), min=("value", "min"), max=("value", "max"),
        floor=("noise_floor", "mean"), min_p=("p_value", "min"), step=("step", "max"))  # fmt: skip
    agg = agg.reset_index()
    for c in ("mean", "min", "max", "floor", "min_p"):
        agg[c] = [_fmt(float(v)) for v in agg[c]]
    return agg.rename(columns={"config": "configuration", "min_p": "min p", "floor": "noise floor"})


def _provenance(df: pd.DataFrame) -> pd.DataFrame:
    keys = ["suite", "tier", "commit", "suite_hash", "device", "dtype", "torch"]
    per_run = df.groupby(keys + ["run"], sort=True).agg(wall=("wall_s", "max"), first=("recorded_at", "min"),
                                                       last=("recorded_at", "max"))  # fmt: skip
    out = per_run.groupby(keys, sort=True).agg(runs=("wall", "size"), wall_s=("wall", "sum"), first=("first", "min"),
                                               last=("last", "max")).reset_index()  # fmt: skip
    out["wall_s"] = [_fmt(float(v)) for v in out["wall_s"]]
    out["recorded"] = [f"{a} .. {b}" if a != b else a for a, b in zip(out.pop("first"), out.pop("last"))]
    return out


def _find_artifact(artifacts_dir: Path | None, suite: str, run: str) -> Path | None:
    if artifacts_dir is None:
        return None
    for p in (artifacts_dir / _slug(suite) / artifact_name(run), artifacts_dir / artifact_name(run)):
        if p.is_file():
            return p
    return None


def _blocks(df: pd.DataFrame, results: Sequence[ClaimResult], out_dir: Path, artifacts_dir: Path | None):
    """The report as a list of blocks (("h", level, text) | ("p", text) | ("table", df) | ("img", rel, alt))."""
    plots = out_dir / "plots"
    written: set[str] = set()

    def figure(fig: Figure, name: str, alt: str):
        _save(fig, plots / name)
        written.add(name)
        return ("img", f"plots/{name}", alt)

    blocks = [("h", 1, "fluxbench suites report")]
    counts = pd.Series([r.verdict for r in results], dtype=object).value_counts()
    verdicts = ", ".join(f"{counts.get(v, 0)} {v}" for v in ("pass", "fail", "xfail", "xpass"))
    suites = sorted(df["suite"].unique())
    blocks.append(("p", f"{len(df)} records of {df[['suite', 'run']].drop_duplicates().shape[0]} runs in "
                        f"{len(suites)} suite(s) ({', '.join(suites) or 'none'}); {len(results)} claims: {verdicts}."))
    blocks += [("h", 2, "Claims"), ("table", results_frame(results)) if results else ("p", "No claims evaluated.")]
    blocks += [("h", 2, "Provenance"), ("table", _provenance(df)) if len(df) else ("p", "No records.")]
    df = df.assign(config=_config(df)) if len(df) else df
    for suite in suites:
        s = df[df["suite"] == suite]
        blocks += [("h", 2, f"Suite {suite}"), ("h", 3, "Results at the last checkpoint of each run"),
                   ("table", _results_table(s)), ("h", 3, "Plots")]  # fmt: skip
        for (tier, metric), g in s.groupby(["tier", "metric"], sort=True):
            base = f"{_slug(suite)}-{_slug(tier)}-{_slug(metric)}"
            if g["step"].nunique() > 1:
                fig = _plot_steps(g, metric, f"{suite} ({tier}): {metric} against rollout step")
                blocks.append(figure(fig, f"{base}-steps.png", f"{metric} against rollout step"))
            fig = _plot_objectives(_last(g), metric, f"{suite} ({tier}): {metric}, last checkpoint")
            blocks.append(figure(fig, f"{base}-objectives.png", f"{metric} by objective"))
        runs = s.drop_duplicates(["run"]).sort_values(["target", "model", "objective", "seed", "run"])
        found = [(r, p) for r in runs.itertuples() if (p := _find_artifact(artifacts_dir, suite, r.run))]
        by_cfg: dict[tuple, dict] = {}
        for r, p in found:  # lowest seed per objective, panels side by side
            by_cfg.setdefault((r.target, r.model), {}).setdefault(r.objective, (r.run, p))
        if by_cfg:
            blocks.append(("h", 3, "Fields and samples"))
        for (target, model), objs in sorted(by_cfg.items()):
            arts = [(obj, *objs[obj]) for obj in _objectives(objs)]
            arts = [(obj, run, load_field_artifact(p)) for obj, run, p in arts]
            fig = _plot_fields(arts, f"{suite}: {target}, {model}")
            blocks.append(figure(fig, f"{_slug(suite)}-{_slug(target)}-{_slug(model)}-field.png", f"field {target}"))
    return blocks, written


def _md_table(t: pd.DataFrame) -> str:
    t = t.astype(str).apply(lambda c: c.str.replace("|", r"\|", regex=False))
    return t.to_markdown(index=False, disable_numparse=True)  # "2.10" stays "2.10"


def _markdown(blocks) -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append(f"{'#' * b[1]} {b[2]}")
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "table":
            out.append(_md_table(b[1]))
        else:
            out.append(f"![{b[2]}]({b[1]})")
    return "\n\n".join(out) + "\n"


_CSS = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}"
        "img{max-width:100%}")  # fmt: skip


def _html(blocks) -> str:
    out = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
           "<title>fluxbench suites report</title>", f"<style>{_CSS}</style></head><body>"]  # fmt: skip
    for b in blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{html.escape(b[1])}</p>")
        elif b[0] == "table":
            out.append(b[1].to_html(index=False, escape=True, border=0, na_rep=""))
        else:
            out.append(f'<p><img src="{html.escape(b[1])}" alt="{html.escape(b[2])}"></p>')
    return "\n".join(out) + "\n</body></html>\n"


def render_report(
    records_df: pd.DataFrame,
    claim_results: Sequence[ClaimResult],
    out_dir: str | os.PathLike,
    artifacts_dir: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Render the Markdown and HTML report of suite records and claim results.

    Args:
        records_df: records (:meth:`fluxbench.suites.records.Records.load`, several files
            concatenated is fine), every column of :data:`fluxbench.suites.records.COLUMNS`.
        claim_results: :func:`fluxbench.suites.claims.evaluate`'s results (may be empty).
        out_dir: directory for ``report.md``, ``report.html`` and ``plots/`` (created).
        artifacts_dir: directory of 2-D field artifacts (module docstring), or None.

    Returns:
        ``(md_path, html_path)``.

    Raises:
        ValueError: records that are not a DataFrame or lack record columns, results that
            are not ClaimResults, a missing ``artifacts_dir``, a malformed artifact.
    """
    if not isinstance(records_df, pd.DataFrame):
        raise ValueError(f"records_df must be a pandas DataFrame, got {type(records_df).__name__}")
    missing = [c for c in COLUMNS if c not in records_df.columns]
    if missing:
        raise ValueError(f"records_df lacks the record column(s) {missing}")
    if isinstance(claim_results, (str, bytes, ClaimResult)) or not isinstance(claim_results, Sequence):
        raise ValueError(f"claim_results must be a list of ClaimResult, got {type(claim_results).__name__}")
    results_frame(claim_results)  # validates the items
    if artifacts_dir is not None:
        artifacts_dir = Path(artifacts_dir)
        if not artifacts_dir.is_dir():
            raise ValueError(f"artifacts_dir {str(artifacts_dir)!r} is not a directory")
    out_dir = Path(out_dir)
    blocks, written = _blocks(records_df.reset_index(drop=True), list(claim_results), out_dir, artifacts_dir)
    plots = out_dir / "plots"
    if plots.is_dir():
        for stale in sorted(plots.glob("*.png")):
            if stale.name not in written:
                stale.unlink()
    md = write_text(out_dir / "report.md", _markdown(blocks))
    page = write_text(out_dir / "report.html", _html(blocks))
    return md, page
