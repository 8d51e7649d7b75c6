"""Claims: every op, groups, relations, reductions, tiers, the Holm family, verdicts, bad specs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fluxbench.suites.claims import (
    Claim,
    evaluate,
    format_results,
    gate_exit_code,
    holm_adjust,
    parse_claim,
    parse_claims,
    results_frame,
)
from fluxbench.suites.records import COLUMNS, empty_records


def frame(*rows) -> pd.DataFrame:
    """A records table from partial rows (the other columns get plausible values)."""
    full = []
    for r in rows:
        d = dict(suite="gmm2d", tier="quick", target="triangle", model="mlp", objective="flux", seed=0, step=0,
                 metric="w2", value=0.0, stderr=math.nan, noise_floor=math.nan, p_value=math.nan, device="cpu",
                 dtype="float32", torch="2.5", commit="c0ffee", suite_hash="abc", wall_s=1.0,
                 recorded_at="2025-01-01T00:00:00+00:00")  # fmt: skip
        d.update(r)
        d.setdefault("run", f"{d['target']}/{d['objective']}/{d['model']}/seed{d['seed']}")
        full.append(d)
    return pd.concat([empty_records(), pd.DataFrame(full, columns=list(COLUMNS))], ignore_index=True)


def seeds(values, **kw):
    return [dict(seed=s, value=v, **kw) for s, v in enumerate(values)]


def one(spec, df, tier="quick", **kw):
    (r,) = evaluate([{"id": "c", **spec}], df, tier, **kw)
    return r


W2 = frame(*seeds([0.25, 0.27, 0.26], target="triangle", noise_floor=0.24),
           *seeds([0.40, 0.30, 0.35], target="ring", noise_floor=0.23),
           *seeds([0.24, 0.25, 0.23], target="triangle", objective="dsm", noise_floor=0.24),
           *seeds([0.25, 0.26, 0.24], target="ring", objective="dsm", noise_floor=0.23))  # fmt: skip


@pytest.mark.parametrize(
    "op, value, passed",
    [("<=", 0.30, True), ("<=", 0.29, False), (">=", 0.29, True), (">=", 0.31, False),
     ("in", [0.29, 0.31], True), ("in", [0.31, 0.4], False), ("in", [0.2, 0.29], False)],
)  # fmt: skip
def test_every_op_against_a_threshold(op, value, passed):
    df = frame(*seeds([0.2, 0.3, 0.4]))  # mean 0.3
    r = one({"metric": "w2", "op": op, "value": value}, df)
    assert r.passed is passed and r.verdict == ("pass" if passed else "fail")
    assert r.value == pytest.approx(0.3) and "mean w2 = 0.3" in r.evidence and "n=3 seeds" in r.evidence


@pytest.mark.parametrize("reduce, passed", [("mean", True), ("max", False), ("min", True)])
def test_reductions_over_seeds(reduce, passed):
    df = frame(*seeds([0.1, 0.2, 0.6]))
    assert one({"metric": "w2", "op": "<=", "value": 0.35, "reduce": reduce}, df).passed is passed


def test_per_group_failure_names_the_group():
    r = one({"metric": "w2", "where": {"objective": "flux"}, "per": ["target"], "op": "<=", "value": 0.3}, W2)
    assert r.verdict == "fail" and r.group == "target=ring" and r.value == pytest.approx(0.35)
    assert [(g.group, g.passed) for g in r.groups] == [("target=ring", False), ("target=triangle", True)]
    assert r.evidence.startswith("target=ring: mean w2 = 0.35 (n=3 seeds, floor 0.23) > 0.3")
    assert "(1/2 groups fail)" in r.evidence
    ok = one({"metric": "w2", "where": {"objective": "flux", "target": "triangle"}, "op": "<=", "value": 0.3}, W2)
    assert ok.verdict == "pass"


def test_relation_against_a_second_selection():
    spec = {"metric": "w2", "where": {"objective": "flux"}, "against": {"objective": "dsm"}, "per": ["target"],
            "op": "<=", "value": 0.05}  # fmt: skip
    r = one(spec, W2)
    # ring: flux 0.35 > dsm 0.25 + 0.05 = 0.30; triangle: 0.26 <= 0.24 + 0.05
    assert r.verdict == "fail" and r.group == "target=ring"
    assert r.threshold == pytest.approx(0.30) and r.value == pytest.approx(0.35)
    assert "mean w2[objective=dsm] 0.25 (n=3 seeds, floor 0.23) + 0.05" in r.evidence
    assert one({**spec, "value": 0.11}, W2).verdict == "pass"
    diff = one({**spec, "op": "in", "value": [0.0, 0.05]}, W2)  # flux - dsm in [0, 0.05] per target
    assert [g.passed for g in diff.groups] == [False, True] and diff.value == pytest.approx(0.10)
    assert "= 0.1 not in [0, 0.05]" in diff.evidence


def test_relation_against_the_noise_floor():
    spec = {"metric": "w2", "where": {"objective": "flux"}, "against": "noise_floor", "per": ["target"],
            "op": "<=", "value": 0.05}  # fmt: skip
    r = one(spec, W2)  # ring 0.35 > 0.23 + 0.05; triangle 0.26 <= 0.24 + 0.05
    assert [g.passed for g in r.groups] == [False, True] and "mean floor 0.23 + 0.05" in r.evidence
    nofloor = one(spec, frame(*seeds([0.2, 0.3])))
    assert nofloor.verdict == "fail" and "no noise floor recorded" in nofloor.evidence


def test_against_group_without_records_fails():
    df = W2[~((W2.objective == "dsm") & (W2.target == "ring"))]
    spec = {"metric": "w2", "where": {"objective": "flux"}, "against": {"objective": "dsm"}, "per": ["target"],
            "op": "<=", "value": 0.2}  # fmt: skip
    r = one(spec, df)
    assert r.verdict == "fail" and r.group == "target=ring" and "no records for against" in r.evidence


def test_step_last_and_ambiguous_checkpoints():
    df = frame(*[dict(seed=s, step=t, value=v) for s in range(2) for t, v in [(0, 3.0), (1000, 0.2), (100, 1.0)]])
    r = one({"metric": "w2", "where": {"step": "last"}, "op": "<=", "value": 0.3}, df)
    assert r.verdict == "pass" and r.value == pytest.approx(0.2)
    amb = one({"metric": "w2", "op": "<=", "value": 10.0}, df)  # three rows per run: refuse to average them
    assert amb.verdict == "fail" and "ambiguous" in amb.evidence and "steps [0, 100, 1000]" in amb.evidence
    per_step = one({"metric": "w2", "per": ["step"], "op": "<=", "value": 1.5}, df)
    assert per_step.group == "step=0" and [g.passed for g in per_step.groups] == [False, True, True]
    assert [g.group for g in per_step.groups] == ["step=0", "step=100", "step=1000"]  # numeric order
    at = one({"metric": "w2", "where": {"step": [100, 1000]}, "per": ["step"], "op": "<=", "value": 1.5}, df)
    assert at.verdict == "pass" and len(at.groups) == 2
    short = frame(dict(seed=0, step=0, value=3.0), dict(seed=0, step=1000, value=0.2),
                  dict(seed=1, step=0, value=3.0), dict(seed=1, step=100, value=0.4))  # fmt: skip
    last = one({"metric": "w2", "where": {"step": "last"}, "op": "<=", "value": 1.0}, short)  # each run's own last
    assert last.value == pytest.approx(0.3) and "n=2 seeds" in last.evidence


def test_empty_selection_is_a_failure_never_a_silent_pass():
    r = one({"metric": "w2", "where": {"target": "moons"}, "op": "<=", "value": 1.0}, W2)
    assert r.verdict == "fail" and "no records for metric 'w2' where target='moons' (tier 'quick')" in r.evidence
    r = one({"metric": "w2", "op": "<=", "value": 1.0}, W2, tier="full")  # records of another tier only
    assert r.verdict == "fail" and "no records" in r.evidence
    xf = one({"metric": "nope", "op": "<=", "value": 1.0, "expect": "fail", "reason": "known"}, W2)
    assert xf.verdict == "fail"  # missing data is not the known failure
    p = one({"metric": "stationarity", "kind": "p-value"}, W2)
    assert p.verdict == "fail" and "no records" in p.evidence
    nan = one({"metric": "w2", "op": "<=", "value": 1.0}, frame(*seeds([0.2, math.nan])))
    assert nan.verdict == "fail" and "NaN value" in nan.evidence
    assert gate_exit_code([r]) == 1


def test_suite_restricts_the_selection():
    df = pd.concat([W2, frame(*seeds([9.0], suite="other"))], ignore_index=True)
    spec = {"id": "c", "metric": "w2", "where": {"target": "triangle"}, "op": "<=", "value": 1.0}
    assert evaluate(parse_claims([spec], suite="gmm2d"), df, "quick")[0].verdict == "pass"
    assert evaluate([{**spec, "suite": "other"}], df, "quick")[0].verdict == "fail"


def test_per_tier_values_and_tier_filter():
    df = pd.concat([frame(*seeds([0.3])), frame(*seeds([0.3], tier="full"))], ignore_index=True)
    spec = {"id": "c", "metric": "w2", "op": "<=", "value": {"quick": 0.5, "full": 0.1}}
    assert parse_claim(spec).tiers == ("quick", "full")
    assert evaluate([spec], df, "quick")[0].verdict == "pass"
    r = evaluate([spec], df, "full")[0]
    assert r.verdict == "fail" and r.threshold == 0.1
    assert evaluate([spec], df, "nightly") == []  # not a tier of the claim: skipped
    only_full = {"id": "d", "metric": "w2", "op": "<=", "value": 0.1, "tiers": ["full"]}
    assert [r.id for r in evaluate([spec, only_full], df, "quick")] == ["c"]


def test_holm_adjust_hand_computed():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, 1*0.04 = 0.02, 0.03, 0.06, 0.04 -> cummax
    np.testing.assert_allclose(holm_adjust([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm_adjust([0.5, 0.9]), [1.0, 1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm_adjust([0.1, 1.5])


def pclaims(ps, **kw):
    df = frame(*[dict(target=f"t{i}", metric="stationarity", value=1.0, p_value=p) for i, p in enumerate(ps)])
    specs = [{"id": f"t{i}", "metric": "stationarity", "kind": "p-value", "where": {"target": f"t{i}"}, **kw}
             for i in range(len(ps))]  # fmt: skip
    return specs, df


def test_holm_family_over_p_value_claims():
    specs, df = pclaims([0.01, 0.04, 0.03, 0.005])
    res = evaluate(specs, df, "quick", alpha_family=0.05)
    assert [r.verdict for r in res] == ["fail", "pass", "pass", "fail"]
    assert [r.value for r in res] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert "p = 0.005, Holm-adjusted 0.02 (rank 1 of m=4) < 0.05" in res[3].evidence
    # unadjusted, 0.04 and 0.03 would fail too: the family is what makes them pass
    assert [r.verdict for r in evaluate(specs, df, "quick", alpha_family=0.01)] == ["pass"] * 4
    # the claim's own level caps at alpha_family
    specs[0]["value"] = 0.02
    assert evaluate(specs, df, "quick")[0].verdict == "pass"  # 0.03 >= 0.02
    specs[1]["value"] = 0.5
    assert evaluate(specs, df, "quick")[1].threshold == 0.05


def test_holm_differs_from_bonferroni():
    # m = 3: Bonferroni-adjusted 0.03, 0.06, 0.12 would reject only the first at 0.05;
    # Holm steps down: 0.01 <= 0.05/3, 0.02 <= 0.05/2, 0.04 <= 0.05 -> rejects all three
    specs, df = pclaims([0.01, 0.02, 0.04])
    res = evaluate(specs, df, "quick")
    assert [r.verdict for r in res] == ["fail", "fail", "fail"]
    assert [r.value for r in res] == pytest.approx([0.03, 0.04, 0.04])


def test_p_value_claim_every_seed_is_a_member():
    df = frame(*seeds([1.0, 1.0, 1.0], metric="stationarity"))
    df["p_value"] = [0.5, 0.004, 0.9]
    r = one({"metric": "stationarity", "kind": "p-value", "per": ["target"]}, df)
    assert r.verdict == "fail" and len(r.groups) == 3 and "triangle/flux/mlp/seed1" in r.group
    assert r.value == pytest.approx(0.012)
    df["p_value"] = [0.5, math.nan, 0.9]
    assert "NaN p_value" in one({"metric": "stationarity", "kind": "p-value"}, df).evidence
    df["p_value"] = [0.5, 1.5, 0.9]
    bad = one({"metric": "stationarity", "kind": "p-value"}, df)
    assert bad.verdict == "fail" and "p_value 1.5 outside [0, 1]" in bad.evidence


def test_xfail_xpass_and_exit_code():
    df = frame(*seeds([0.4, 0.6]))
    known = {"metric": "w2", "op": "<=", "value": 0.3, "expect": "fail", "reason": "single sigma is biased"}
    xf = one(known, df)
    assert (xf.verdict, xf.passed, xf.expected) == ("xfail", False, "fail")
    xp = one({**known, "value": 0.9}, df)
    assert xp.verdict == "xpass" and xp.passed
    ok = one({"metric": "w2", "op": "<=", "value": 0.9}, df)
    bad = one({"metric": "w2", "op": "<=", "value": 0.1}, df)
    assert gate_exit_code([ok, xf]) == 0
    assert gate_exit_code([ok, xf, xp]) == 1 and gate_exit_code([bad]) == 1 and gate_exit_code([]) == 0


def test_format_results_lists_every_claim():
    specs = [{"id": f"claim-{i}", "metric": "w2", "op": "<=", "value": v} for i, v in enumerate([0.9, 0.1])]
    specs.append({"id": "known", "metric": "w2", "op": "<=", "value": 0.1, "expect": "fail", "reason": "biased"})
    res = evaluate(specs, frame(*seeds([0.2, 0.3])), "quick")
    text = format_results(res)
    for s in specs:
        assert s["id"] in text
    assert "PASS" in text and "FAIL" in text and "XFAIL" in text and "expected to fail: biased" in text
    assert "3 claims: 1 pass, 1 fail, 1 xfail, 0 xpass" in text and "GATE FAILS: claim-1" in text
    assert list(results_frame(res)["claim"]) == ["claim-0", "claim-1", "known"]
    assert "no claims" in format_results([])
    with pytest.raises(ValueError, match="ClaimResult"):
        results_frame(["x"])


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"metric": "w2", "op": "<=", "value": 1}, r"id: missing"),
        ({"id": "a", "metric": "w2", "op": "<=", "value": 1, "treshold": 2}, r"claim 'a': treshold: unknown key"),
        ({"id": "a", "metric": "w2", "op": "<", "value": 1}, r"claim 'a': op: expected one of"),
        ({"id": "a", "op": "<=", "value": 1}, r"claim 'a': metric: missing"),
        ({"id": "a", "metric": "w2", "op": "<="}, r"claim 'a': value: missing"),
        ({"id": "a", "metric": "w2", "op": "<=", "value": "0.1"}, r"claim 'a': value: expected a number"),
        ({"id": "a", "metric": "w2", "op": "in", "value": 0.1}, r"claim 'a': value: op \"in\" needs \[lo, hi\]"),
        ({"id": "a", "metric": "w2", "op": "in", "value": [2, 1]}, r"claim 'a': value: interval .* lo > hi"),
        ({"id": "a", "metric": "w2", "op": "<=", "value": 1, "reduce": "median"}, r"claim 'a': reduce"),
        ({"id": "a", "metric": "w2", "op": "<=", "value": 1, "where": {"colour": "red"}}, r"'a': where: unknown"),
        ({"id": "a", "metric": "w2", "op": "<=", "value": 1, "where": {"seed": "last"}}, r"'a': where: \"last\""),
        ({"id": "a", "metric": "w2", "op": "<=", "value": 1, "per": "target"}, r"'a': per: expected a list"),
        ({"id": "a", "metric": "w2", "op": "<=", "value": 1, "per": ["value"]}, r"'a': per: expected one of"),
        ({"id": "a", "metric": "w2", "op": "<=", "value": 1, "expect": "fail"}, r"'a': reason: .* needs a reason"),
        ({"id": "a", "metric": "w2", "op": "<=", "value": 1, "expect": "maybe"}, r"'a': expect"),
        ({"id": "a", "metric": "w2", "op": "<=", "value": 1, "kind": "bayes"}, r"'a': kind"),
        ({"id": "a", "metric": "p", "kind": "p-value", "op": "<="}, r"'a': op: a p-value claim"),
        ({"id": "a", "metric": "p", "kind": "p-value", "against": {"objective": "dsm"}}, r"'a': against: not allowed"),
        ({"id": "a", "metric": "p", "kind": "p-value", "value": 1.5}, r"'a': value: expected a number in \[0.0, 1.0\]"),
        ({"id": "a", "metric": "w2", "op": "<=", "value": {"quick": 1}, "tiers": ["full"]}, r"'a': value: per-tier"),
        ({"id": "a", "metric": "w2", "op": "<=", "value": 1, "tiers": "quick"}, r"'a': tiers"),
    ],
)
def test_bad_specs_name_the_claim_and_field(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_claim(spec)


def test_bad_evaluate_arguments():
    spec = {"id": "a", "metric": "w2", "op": "<=", "value": 1}
    with pytest.raises(ValueError, match="'a': id: duplicate"):
        evaluate([spec, spec], W2, "quick")
    with pytest.raises(ValueError, match="alpha_family"):
        evaluate([spec], W2, "quick", alpha_family=1.0)
    with pytest.raises(ValueError, match=r"lacks the record column\(s\) \['p_value'\]"):
        evaluate([spec], W2.drop(columns="p_value"), "quick")
    with pytest.raises(ValueError, match="DataFrame"):
        evaluate([spec], {"w2": 1}, "quick")
    assert isinstance(parse_claim(parse_claim(spec)), Claim)
