"""Suite files: validation errors name the file and the key; run enumeration, keys, shards, hashes."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from fluxbench.suites import find_suite, list_suites, load_suite, parse_shard, shard_runs
from fluxbench.suites.spec import OBJECTIVES

SUITES_DIR = Path(__file__).resolve().parents[1] / "suites"

BASE = """\
name = "{name}"
description = "a test suite"
kind = "sampling"
targets = ["triangle", {{ name = "g8", target = "anisotropic_gaussian", args = {{ dim = 8, condition_number = 100.0, seed = 8 }}, step_size = 0.001 }}]
objectives = ["exact", "flux"]
{extra}
[tiers.quick]
{quick}
[tiers.full]
seeds = [0, 5, 7]
"""


EXTRA = 'sigma_eval = 0.02\nmetrics = ["w2", "stationarity"]'
QUICK = "steps = 10\nseeds = 2"


def write(tmp_path: Path, name: str = "demo", extra: str = EXTRA, quick: str = QUICK, text: str | None = None) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text if text is not None else BASE.format(name=name, extra=extra, quick=quick))
    return path


def test_shipped_suites_load_and_cover_the_five_kinds():
    suites = list_suites(SUITES_DIR)
    names = [s.name for s in suites]
    assert names == sorted(["gmm2d", "gaussian-nd", "rotational", "long-rollout", "estimator"])
    for s in suites:
        assert set(s.tiers) == {"quick", "full"}
        assert s.claims, f"suite {s.name} has no claims"
        assert len(s.suite_hash) == 12
        for tier in ("quick", "full"):
            keys = [r.key for r in s.runs(tier)]
            assert len(keys) == len(set(keys)) > 0


def test_runs_are_the_product_of_the_axes_with_stable_keys(tmp_path):
    suite = load_suite(write(tmp_path))
    runs = suite.runs("quick")
    assert len(runs) == 2 * 2 * 1 * 2  # targets x objectives x models x seeds
    expected = [
        f"{t}/{o}/mlp/seed{s}/quick" for t, o, s in itertools.product(["triangle", "g8"], ["exact", "flux"], [0, 1])
    ]
    assert [r.key for r in runs] == expected
    assert [r.key for r in load_suite(write(tmp_path)).runs("quick")] == expected  # reloading: same keys
    assert [r.seed for r in suite.runs("full")][:3] == [0, 5, 7]
    assert runs[2].target.build().dim == 2 and suite.runs("quick")[4].target.build().dim == 8
    assert suite.runs("quick")[4].target.step_size == 0.001


def test_tier_overrides_axes_and_budget(tmp_path):
    suite = load_suite(write(tmp_path, quick=QUICK + '\nobjectives = ["exact"]\ntargets = ["ring"]\nn_samples = 77'))
    runs = suite.runs("quick")
    assert [r.key for r in runs] == ["ring/exact/mlp/seed0/quick", "ring/exact/mlp/seed1/quick"]
    assert suite.budget("quick")["n_samples"] == 77
    assert suite.budget("full")["n_samples"] == 1000  # the kind's default


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 20])
def test_shards_partition_the_runs(tmp_path, n):
    runs = load_suite(write(tmp_path)).runs("quick") + load_suite(write(tmp_path)).runs("full")
    shards = [shard_runs(runs, (i, n)) for i in range(1, n + 1)]
    keys = [r.key for s in shards for r in s]
    assert sorted(keys) == sorted(r.key for r in runs)  # union is everything, nothing twice
    assert len(keys) == len(set(keys))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # round-robin balances
    assert shard_runs(runs, f"1/{n}") == shards[0]


@pytest.mark.parametrize("bad", ["0/2", "3/2", "2", "a/b", "1/0", "-1/2", "1/2/3"])
def test_parse_shard_rejects(bad):
    with pytest.raises(ValueError, match="shard"):
        parse_shard(bad)


def test_parse_shard_accepts():
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) == (1, 1) and parse_shard((1, 3)) == (1, 3)


def test_hash_follows_the_file_bytes_and_the_overrides(tmp_path):
    a = load_suite(write(tmp_path))
    b = load_suite(write(tmp_path, extra=EXTRA + "\n# a comment changes the bytes"))
    assert a.suite_hash != b.suite_hash
    assert load_suite(write(tmp_path)).suite_hash == a.suite_hash
    c = a.with_overrides("quick", n_samples=50)
    assert c.suite_hash != a.suite_hash and c.budget("quick")["n_samples"] == 50
    assert a.budget("quick")["n_samples"] == 1000  # the original is unchanged
    with pytest.raises(ValueError, match=r"tiers\.quick\.n_samples"):
        a.with_overrides("quick", n_samples=-1)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(extra='colour = "red"'), "'colour'"),
        (dict(extra='kind = "nope"'), None),  # a second kind: a TOML error
        (dict(quick="steps = -3"), "'tiers.quick.steps'"),
        (dict(quick='steps = "many"'), "'tiers.quick.steps'"),
        (dict(quick="stepz = 3"), "'tiers.quick.stepz'"),
        (dict(quick="seeds = 0"), "'tiers.quick.seeds'"),
        (dict(quick='objectives = ["rotational"]'), "'tiers.quick.objectives'"),
        (dict(quick='targets = ["no_such_target"]'), "'tiers.quick.targets.target'"),
        (dict(quick="checkpoints = [-1]"), "'tiers.quick.checkpoints'"),
        (dict(extra='recipe = { sigma_min = 0.02, stepss = 3 }'), "'recipe.stepss'"),
        (dict(extra="recipe = { steps = 3 }"), "'recipe.steps'"),
        (dict(extra='sampler = { step = 0.1 }'), "'sampler'"),
        (dict(extra='metrics = ["w3"]'), "'metrics'"),
        (dict(extra="sigma_eval = -1"), "'sigma_eval'"),
        (dict(extra='models = [{ name = "r", kind = "rotational" }]'), "'models.rotation'"),
        (dict(extra='models = [{ name = "m", kind = "transformer" }]'), "'models.kind'"),
        (dict(extra='[[claims]]\nid = "c"\nmetric = "w2"\nop = "<>"\nvalue = 1'), "'claims'"),
        (dict(extra='[[claims]]\nid = "c"\nmetric = "w2"\nop = "<="\nvalue = 1\n[[claims]]\nid = "c"\nmetric = "w2"\nop = "<="\nvalue = 1'), "'claims'"),
    ],
)
def test_validation_errors_name_the_file_and_the_key(tmp_path, kwargs, key):
    path = write(tmp_path, **kwargs)
    with pytest.raises(ValueError) as info:
        load_suite(path)
    msg = str(info.value)
    assert str(path) in msg
    if key is not None:
        assert f"key {key}" in msg, msg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(quick='targets = ["triangle", "triangle"]'), "target names must be unique; got ['triangle', 'triangle']"),
        (dict(quick='objectives = ["flux", "flux"]'), "objectives must be unique; got ['flux', 'flux']"),
        (dict(extra='models = [{ name = "m", kind = "mlp" }, { name = "m", kind = "mlp", hidden = [8] }]'),
         "model names must be unique; got ['m', 'm']"),
    ],
)
def test_repeated_names_of_an_axis_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as info:
        load_suite(write(tmp_path, **kwargs))
    assert message in str(info.value)


def test_structural_errors(tmp_path):
    with pytest.raises(ValueError, match="must equal the file's stem"):
        load_suite(write(tmp_path, name="demo", text=BASE.format(name="other", extra=EXTRA, quick=QUICK)).rename(tmp_path / "demo.toml"))
    with pytest.raises(ValueError, match=r"key 'tiers.full': missing"):
        load_suite(write(tmp_path, text=BASE.format(name="demo", extra=EXTRA, quick=QUICK).split("[tiers.full]")[0]))
    with pytest.raises(ValueError, match="not valid TOML"):
        load_suite(write(tmp_path, text="name = "))
    with pytest.raises(ValueError, match="cannot read"):
        load_suite(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="no suite 'nope'.*known suites: demo"):
        write(tmp_path)
        find_suite("nope", tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        list_suites(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="has no tier 'slow'"):
        load_suite(write(tmp_path)).runs("slow")


def test_kinds_enumerate_their_extras(tmp_path):
    est = load_suite(SUITES_DIR / "estimator.toml")
    keys = [r.key for r in est.runs("quick")]
    # flux: 3 SNR sigmas + 4 (sigma, B) biases + 1 loss mass; dsm: 3 SNR sigmas
    assert len([k for k in keys if "/flux/" in k]) == 8 and len([k for k in keys if "/dsm/" in k]) == 3
    assert "triangle/flux/mlp/seed0/part=bias/sigma=0.3/B=1024/quick" in keys
    lr = load_suite(SUITES_DIR / "long-rollout.toml")
    assert {r.extra("start") for r in lr.runs("quick")} == {"data", "far"}
    assert set(OBJECTIVES["long-rollout"]) >= set(lr.objectives("quick"))
