"""The asv benchmarks (benchmarks/) as asv check sees them, plus their setup on the CPU.

``asv check`` (run by CI) imports the suite in asv's own process; these tests do the same
cheaply in-process, so a benchmark broken by a library change fails the unit tests too:
every module imports and defines benchmarks, parameters are well formed, every class's
setup runs on the CPU at its smallest sizes (or skips with asv's NotImplementedError),
CUDA skips where there is none, and the cheap tracks return finite values.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import math
import pkgutil

import pytest
import torch

import benchmarks
from benchmarks import common

from .conftest import load_tool

PREFIXES = ("time_", "peakmem_", "track_", "mem_")
MODULES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))


def benchmark_classes():
    """(module name, class) for every class in benchmarks/ that defines a benchmark method."""
    out = []
    for name in MODULES:
        module = importlib.import_module(f"benchmarks.{name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and any(a.startswith(PREFIXES) for a in dir(cls)):
                out.append((name, cls))
    return out


CLASSES = benchmark_classes()


def test_every_module_defines_benchmarks():
    assert {"bench_objectives", "bench_samplers", "bench_metrics", "bench_verify", "bench_quality", "bench_images"} <= set(MODULES)
    assert {name for name, _ in CLASSES} == set(MODULES)


@pytest.mark.parametrize("cls", [c for _, c in CLASSES], ids=lambda c: c.__name__)
def test_params_are_well_formed(cls):
    assert len(cls.params) == len(cls.param_names)
    assert cls.param_names[0] == "device" and list(cls.params[0]) == common.DEVICES
    for values in cls.params:
        assert len(values) == len(set(values)) > 0
    for attr in dir(cls):
        if attr.startswith("track_"):
            assert getattr(getattr(cls, attr), "unit", getattr(cls, "unit", None)), f"{cls.__name__}.{attr} has no unit"


def smallest(cls, device):
    """The class's parameters with ``device`` and the first (smallest) value of every other one."""
    return (device, *[values[0] for values in cls.params[1:]])


def every_kind(cls, device):
    """Every combination of the class's named (string) parameters, numeric ones at their smallest."""
    choices = [values if isinstance(values[0], str) else values[:1] for values in cls.params[1:]]
    return [(device, *combo) for combo in itertools.product(*choices)]


# setup_cache fits four models (about a minute): asv check and CI's quick run cover it
CPU_SKIPS = {"PublishedLoss", "TrainingStepDeviceMemory"}
CHEAP = [c for _, c in CLASSES if not hasattr(c, "setup_cache")]


@pytest.mark.parametrize("cls", CHEAP, ids=lambda c: c.__name__)
def test_setup_runs_on_cpu_at_the_smallest_size(cls, one_torch_thread):
    for args in every_kind(cls, "cpu"):
        try:
            cls().setup(*args)
        except NotImplementedError as exc:
            # only the optional published loss and the accelerator's memory may skip on a CPU
            assert cls.__name__ in CPU_SKIPS, f"{cls.__name__}{args} skipped on cpu: {exc}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip where there is no CUDA device")
@pytest.mark.parametrize("cls", [c for _, c in CLASSES], ids=lambda c: c.__name__)
def test_cuda_skips_without_a_device(cls):
    bench = cls()
    args = smallest(cls, "cuda")
    with pytest.raises(NotImplementedError):
        bench.setup(*(({},) if hasattr(cls, "setup_cache") else ()), *args)


@pytest.mark.parametrize(
    "batch, dim, skipped",
    [(16384, 2, False), (4096, 64, False), (1024, 784, False), (16384, 64, True), (4096, 784, True), (16384, 784, True)],
)
def test_slow_flux_sizes_run_on_cuda_only(batch, dim, skipped):
    if skipped:
        with pytest.raises(NotImplementedError, match="CUDA only"):
            common.skip_slow_flux_on_cpu(torch.device("cpu"), batch, dim)
    else:
        common.skip_slow_flux_on_cpu(torch.device("cpu"), batch, dim)
    common.skip_slow_flux_on_cpu(torch.device("meta"), batch, dim)  # never on an accelerator


def test_require_skips_what_a_commit_lacks():
    assert common.require("fluxbench.metrics", "w2").w2 is not None
    with pytest.raises(NotImplementedError, match="no_such_name"):
        common.require("fluxbench.metrics", "no_such_name")
    with pytest.raises(NotImplementedError, match="fluxbench.no_such_module"):
        common.require("fluxbench.no_such_module")


@pytest.mark.parametrize("network", ["mlp", "sequential"])
def test_training_steps_update_the_network(network, one_torch_thread):
    steps = common.training_steps(network, 64, 2, torch.device("cpu"))
    assert set(steps) == {"flux", "dsm"}
    for step in steps.values():
        owner = step.__defaults__[0]  # the closure's model (bound as a default argument)
        before = [p.detach().clone() for p in owner.parameters()]
        step()
        assert any(not torch.equal(b, p) for b, p in zip(before, owner.parameters()))
    with pytest.raises(ValueError, match="network"):
        common.training_steps("resnet", 64, 2, torch.device("cpu"))


def test_sequential_network_is_a_plain_sequential():
    steps = common.training_steps("sequential", 8, 3, torch.device("cpu"))
    assert type(steps["flux"].__defaults__[0]) is torch.nn.Sequential


def test_cheap_tracks_are_finite_and_positive(one_torch_thread):
    from benchmarks.bench_objectives import StepRatio
    from benchmarks.bench_quality import GradientSNR
    from benchmarks.bench_samplers import LangevinThroughput

    ratio = StepRatio()
    ratio.setup("cpu", "mlp", 256, 2)
    rate = LangevinThroughput()
    rate.setup("cpu", 2000, 2)
    snr = GradientSNR()
    snr.setup("cpu", 1.0)
    for value in (
        ratio.track_flux_over_dsm("cpu", "mlp", 256, 2),
        rate.track_particle_steps_per_second("cpu", 2000, 2),
        snr.track_dsm_snr("cpu", 1.0),
    ):
        assert math.isfinite(value) and value > 0


# ---------------------------------------------------------------- tools/asv_plot.py
def write_asv_results(root, commit: str, values: list) -> None:
    """A results folder as asv 0.6 writes it: benchmarks.json and one machine's result file."""
    import json

    (root / "vm").mkdir(parents=True, exist_ok=True)
    name = "bench_objectives.TrainingStep.time_step"
    (root / "benchmarks.json").write_text(json.dumps({name: {"param_names": ["device", "method"]}, "version": 2}))
    result = {
        "commit_hash": commit,
        "env_name": "virtualenv-py3.11",
        "date": 1764806400000,
        "result_columns": ["result", "params", "version", "started_at", "duration"],
        "results": {name: [values, [["'cpu'"], ["'flux'", "'dsm'"]], "abc", 0, 1.0]},
        "version": 2,
    }
    (root / "vm" / f"{commit[:8]}-virtualenv-py3.11.json").write_text(json.dumps(result))
    (root / "vm" / "machine.json").write_text(json.dumps({"machine": "vm", "version": 1}))


def test_asv_plot_reads_results_with_their_parameters(tmp_path):
    plot = load_tool("asv_plot")
    write_asv_results(tmp_path, "a" * 40, [0.25, None])
    table = plot.load_results(tmp_path)
    assert list(table["method"]) == ["flux", "dsm"] and list(table["device"]) == ["cpu", "cpu"]
    assert table["value"].iloc[0] == 0.25 and math.isnan(table["value"].iloc[1])  # failed/skipped: a gap
    with pytest.raises(ValueError, match="benchmarks.json"):
        plot.load_results(tmp_path / "missing")
    with pytest.raises(ValueError, match="machine folder named 'other'"):
        plot.load_results(tmp_path, machine="other")
    write_asv_results(tmp_path, "b" * 40, None)  # asv's record of a benchmark that failed as a whole
    table = plot.load_results(tmp_path)
    failed = table[table["commit"] == "b" * 40]
    assert len(failed) == 2 and failed["value"].isna().all()
    (tmp_path / "vm" / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not an asv result file"):
        plot.load_results(tmp_path)


def test_quality_skips_a_commit_without_the_recipes(monkeypatch):
    from benchmarks import bench_quality

    def missing(*args):
        raise NotImplementedError("fluxbench.recipes is not in this commit's fluxbench")

    monkeypatch.setattr(bench_quality, "_score", missing)
    bench = bench_quality.AnnealedQuality()
    cache = bench.setup_cache()
    with pytest.raises(NotImplementedError, match="fluxbench.recipes"):
        bench.setup(cache, "cpu", "mixture2d", "flux")


def test_image_fid_skips_a_commit_without_images(monkeypatch):
    from benchmarks import bench_images

    def missing(*args):
        raise NotImplementedError("fluxbench.images is not in this commit's fluxbench")

    monkeypatch.setattr(bench_images, "_fids", missing)
    bench = bench_images.DigitsFID()
    cache = bench.setup_cache()
    with pytest.raises(NotImplementedError, match="fluxbench.images"):
        bench.setup(cache, "cpu", "flux", "heun-18")


def test_image_fid_tracks_read_the_cache_of_their_method_and_sampler():
    from benchmarks.bench_images import SAMPLERS, DigitsFID

    cache = {("cpu", m): {s: float(i + 10 * j) for i, s in enumerate(SAMPLERS)} for j, m in enumerate(["flux", "dsm"])}
    bench = DigitsFID()
    bench.setup(cache, "cpu", "dsm", SAMPLERS[2])
    assert bench.track_fid(cache, "cpu", "dsm", SAMPLERS[2]) == 12.0
