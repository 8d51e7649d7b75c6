"""Every claim of the shipped suites can fail: a deliberately broken model fails it, the unbroken one passes.

The suites are the real files in ``suites/``, shrunk with tier overrides so that each case
takes seconds, and run on the cheap fields: the exact smoothed score ("exact"), (I + A) s
("rotational"), the estimator at few batches. Breakages (``perturb``): "temperature:0.5"
(f -> f / 2: the chains sample at twice the temperature), "sign:0" (the first component
flipped), "drop-rotation" ((I + A) s -> s). Claims about trained fields (flux, DSM) are
exercised by the same machinery on the exact field's records relabelled as that objective
(the claim only sees records), and the relational claims of the estimator by swapping the
two sides of the relation in recorded values.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fluxbench.suites import Records, evaluate, load_suite, parse_claims, run_suite

SUITES = Path(__file__).resolve().parents[1] / "suites"


def claims_of(suite, ids):
    claims = {c["id"]: c for c in suite.claims}
    missing = [i for i in ids if i not in claims]
    assert not missing, f"{suite.name} has no claims {missing}"
    return parse_claims([claims[i] for i in ids], suite=suite.name)


def verdicts(suite, ids, tmp_path, perturb=None, relabel=None):
    """Run the (shrunk) suite's quick tier, optionally broken, and evaluate the claims ``ids``."""
    rec = Records(tmp_path / f"{suite.name}-{perturb or 'ok'}.csv")
    df = run_suite(suite, tier="quick", records=rec, perturb=perturb)
    if relabel:
        df = df.assign(objective=df["objective"].replace(relabel))
    results = evaluate(claims_of(suite, ids), df, "quick")
    return {r.id: r.verdict for r in results}, {r.id: r.evidence for r in results}


def shrink(name, **overrides):
    return load_suite(SUITES / f"{name}.toml").with_overrides("quick", **overrides)


def gmm2d():
    return shrink("gmm2d", objectives=["exact"], targets=[{"name": "triangle", "target": "triangle", "step_size": 0.01}],
                  n_samples=1000, stationarity_n=600, checkpoints=[0, 1000], artifacts_grid=0, n_permutations=20)


GMM_EXACT = ["gmm2d/exact-w2-at-floor", "gmm2d/exact-stationary"]


def test_gmm2d_exact_claims_pass_unbroken(tmp_path):
    v, ev = verdicts(gmm2d(), GMM_EXACT, tmp_path)
    assert set(v.values()) == {"pass"}, ev


@pytest.mark.parametrize("perturb", ["temperature:0.5", "sign:0"])
def test_gmm2d_exact_claims_fail_broken(tmp_path, perturb):
    v, ev = verdicts(gmm2d(), GMM_EXACT, tmp_path, perturb)
    assert set(v.values()) == {"fail"}, ev


def test_gmm2d_learned_claims_can_fail_and_pass(tmp_path):
    """The flux / DSM claims read the same records: the exact field relabelled as a trained one passes
    the expected-to-fail claims (xpass: the gate notices), the broken field fails the guards."""
    suite = gmm2d()
    learned = ["gmm2d/flux-samples-guard", "gmm2d/learned-rollout-stays", "gmm2d/learned-stationary"]
    ok, ev = verdicts(suite, learned, tmp_path, relabel={"exact": "flux"})
    assert ok == {"gmm2d/flux-samples-guard": "pass", "gmm2d/learned-rollout-stays": "xpass",
                  "gmm2d/learned-stationary": "xpass"}, ev
    bad, ev = verdicts(suite, learned, tmp_path, "temperature:0.5", relabel={"exact": "flux"})
    assert bad["gmm2d/learned-rollout-stays"] == "xfail" and bad["gmm2d/learned-stationary"] == "xfail", ev
    # the guard looks at the sampler's output (step 0): breaking the step-0 cloud needs a broken sampler
    df = Records(tmp_path / "gmm2d-ok.csv").load().assign(objective=lambda d: d["objective"].replace({"exact": "flux"}))
    df.loc[(df["metric"] == "w2") & (df["step"] == 0), "value"] += 1.0
    res = evaluate(claims_of(suite, ["gmm2d/flux-samples-guard"]), df, "quick")
    assert res[0].verdict == "fail"


def test_gmm2d_relations_flux_vs_dsm_fail_when_flux_is_worse():
    suite = load_suite(SUITES / "gmm2d.toml")
    rows = []
    for obj, w in (("flux", 0.40), ("dsm", 0.30), ("dsm-wallclock", 0.28)):
        for t in ("triangle", "ring"):
            rows.append(dict(suite="gmm2d", tier="quick", run=f"{t}/{obj}", target=t, model="mlp", objective=obj, seed=0,
                             step=0, metric="w2", value=w, stderr=float("nan"), noise_floor=0.25, p_value=float("nan"),
                             device="cpu", dtype="float32", torch="x", commit="c", suite_hash="h", wall_s=1.0,
                             recorded_at="t"))
    df = pd.DataFrame(rows)
    ids = ["gmm2d/flux-near-dsm-quick", "gmm2d/flux-near-dsm-wallclock", "gmm2d/flux-near-floor-quick"]
    assert {r.id: r.verdict for r in evaluate(claims_of(suite, ids), df, "quick")} == dict.fromkeys(ids, "xfail")
    df.loc[df["objective"] == "flux", "value"] = 0.27  # flux as good as DSM and near the floor: the gate notices
    assert {r.id: r.verdict for r in evaluate(claims_of(suite, ids), df, "quick")} == dict.fromkeys(ids, "xpass")
    full = ["gmm2d/flux-near-dsm", "gmm2d/flux-near-floor"]
    df["tier"] = "full"
    assert {r.verdict for r in evaluate(claims_of(suite, full), df, "full")} == {"pass"}
    df.loc[df["objective"] == "flux", "value"] = 0.40
    assert {r.verdict for r in evaluate(claims_of(suite, full), df, "full")} == {"fail"}


GAUSS = ["gaussian-nd/exact-w2-at-floor", "gaussian-nd/exact-gauss-w2-at-floor", "gaussian-nd/exact-stationary"]


def gaussian_nd():
    t = {"name": "aniso-d2-k10", "target": "anisotropic_gaussian",
         "args": {"dim": 2, "condition_number": 10.0, "seed": 2}, "step_size": 0.005}
    return shrink("gaussian-nd", objectives=["exact"], targets=[t], n_samples=1000, stationarity_n=600,
                  checkpoints=[0, 1000], n_permutations=20)


def test_gaussian_nd_exact_claims_pass_unbroken(tmp_path):
    v, ev = verdicts(gaussian_nd(), GAUSS, tmp_path)
    assert set(v.values()) == {"pass"}, ev


@pytest.mark.parametrize("perturb", ["temperature:0.5", "sign:0"])
def test_gaussian_nd_exact_claims_fail_broken(tmp_path, perturb):
    v, ev = verdicts(gaussian_nd(), GAUSS, tmp_path, perturb)
    assert set(v.values()) == {"fail"}, ev


def test_gaussian_nd_learned_claims(tmp_path):
    suite = gaussian_nd()
    ids = ["gaussian-nd/learned-field-guard", "gaussian-nd/learned-stationary", "gaussian-nd/flux-gauss-w2-near-floor"]
    ok, ev = verdicts(suite, ids, tmp_path, relabel={"exact": "flux"})
    assert ok == {ids[0]: "pass", ids[1]: "xpass", ids[2]: "xpass"}, ev
    bad, ev = verdicts(suite, ids[1:], tmp_path, "sign:0", relabel={"exact": "flux"})
    assert bad == {ids[1]: "xfail", ids[2]: "xpass"}, ev  # the samples at step 0 are exact: only the field is broken
    df = Records(tmp_path / "gaussian-nd-sign:0.csv").load().assign(objective="flux")
    df.loc[df["metric"] == "field_rel_l2", "value"] = 4.0
    df.loc[(df["metric"] == "gauss_w2") & (df["step"] == 0), "value"] = 1.0
    res = {r.id: r.verdict for r in evaluate(claims_of(suite, [ids[0], ids[2]]), df, "quick")}
    assert res == {ids[0]: "fail", ids[2]: "xfail"}


ROT = ["rotational/exact-stationary", "rotational/exact-w2-at-floor", "rotational/exact-keeps-rotation"]


def rotational(target="spiral"):
    targets = {"spiral": {"name": "spiral", "target": "gaussian", "args": {"dim": 2, "std": 1.0}, "rotation": 4.0,
                          "step_size": 0.005},
               "triangle": {"name": "triangle", "target": "triangle", "step_size": 0.005}}
    return shrink("rotational", objectives=["exact"], targets=[targets[target]], n_samples=600, stationarity_n=600,
                  checkpoints=[0, 1000], artifacts_grid=0, n_permutations=20)


def test_rotational_exact_claims_pass_unbroken(tmp_path):
    v, ev = verdicts(rotational(), ROT, tmp_path)
    assert set(v.values()) == {"pass"}, ev


def test_rotational_drop_rotation_fails_the_rotation_claim_only(tmp_path):
    v, ev = verdicts(rotational(), ROT, tmp_path, "drop-rotation")
    # s alone is still stationary: only the claim about the rotation itself can see the loss
    assert v == {ROT[0]: "pass", ROT[1]: "pass", ROT[2]: "fail"}, ev


@pytest.mark.parametrize("perturb", ["temperature:0.5", "sign:1"])
def test_rotational_exact_claims_fail_broken(tmp_path, perturb):
    v, ev = verdicts(rotational("triangle"), ROT, tmp_path, perturb)
    assert v[ROT[0]] == "fail" and v[ROT[1]] == "fail", ev
    assert v[ROT[2]] == "fail", ev  # a broken (I + A) s no longer has f - s = A s


def test_rotational_flux_claims(tmp_path):
    suite = rotational()
    ids = ["rotational/flux-samples-near-floor", "rotational/flux-stationary", "rotational/flux-keeps-rotation",
           "rotational/flux-rollout-stays"]
    ok, ev = verdicts(suite, ids, tmp_path, relabel={"exact": "flux"})
    assert ok == {ids[0]: "pass", ids[1]: "xpass", ids[2]: "xpass", ids[3]: "xpass"}, ev
    bad, ev = verdicts(suite, ids[1:], tmp_path, "drop-rotation", relabel={"exact": "flux"})
    assert bad[ids[2]] == "xfail", ev
    bad, ev = verdicts(suite, ids[1:], tmp_path, "temperature:0.5", relabel={"exact": "flux"})
    assert bad[ids[1]] == "xfail" and bad[ids[3]] == "xfail", ev


LR = ["long-rollout/exact-stays-at-floor", "long-rollout/exact-reaches-floor", "long-rollout/rotation-no-slower",
      "long-rollout/rotation-faster-gaussian", "long-rollout/rotation-reaches-floor-first"]


def long_rollout():
    t = {"name": "aniso-d2-k10", "target": "anisotropic_gaussian",
         "args": {"dim": 2, "condition_number": 10.0, "seed": 2}, "step_size": 0.01}
    return shrink("long-rollout", objectives=["exact", "rotational"], targets=[t], particles=400, n_eval=400,
                  rollout_steps=3000, per_decade=2, trace_chains=256, n_permutations=20)


def test_long_rollout_claims_pass_unbroken(tmp_path):
    v, ev = verdicts(long_rollout(), LR, tmp_path)
    assert set(v.values()) == {"pass"}, ev


def test_long_rollout_drop_rotation_fails_the_mixing_claims(tmp_path):
    v, ev = verdicts(long_rollout(), LR, tmp_path, "drop-rotation")
    # (I + A) s -> s: the same chains as the exact score, so "faster" fails and "no slower" still holds
    assert v == {LR[0]: "pass", LR[1]: "pass", LR[2]: "pass", LR[3]: "fail", LR[4]: "fail"}, ev


@pytest.mark.parametrize("perturb", ["temperature:0.5", "sign:0"])
def test_long_rollout_broken_fields_fail_the_floor_claims(tmp_path, perturb):
    v, ev = verdicts(long_rollout(), LR, tmp_path, perturb)
    assert v[LR[0]] == "fail" and v[LR[1]] == "fail", ev


def test_long_rollout_flux_claims(tmp_path):
    suite = long_rollout()
    ids = ["long-rollout/flux-stays-at-floor", "long-rollout/flux-reaches-floor"]
    ok, ev = verdicts(suite, ids, tmp_path, relabel={"exact": "flux"})
    assert set(ok.values()) == {"xpass"}, ev
    bad, ev = verdicts(suite, ids, tmp_path, "sign:0", relabel={"exact": "flux"})
    assert set(bad.values()) == {"xfail"}, ev


EST_INTERVAL = ["estimator/c-star-sigma0.1-B256"]


def estimator():
    return shrink("estimator", objectives=["flux"], bias=[[0.1, 256]], snr_sigmas=[0.3], loss_mass_sigmas=[0.1],
                  n_batches=400, n_draws=40, hidden=[32])


def test_estimator_c_star_claim_passes_and_fails_with_a_wrong_temperature(tmp_path):
    v, ev = verdicts(estimator(), EST_INTERVAL, tmp_path)
    assert v == {EST_INTERVAL[0]: "pass"}, ev
    # the family c * (s / 2): its best multiple is twice c*, outside the interval
    v, ev = verdicts(estimator(), EST_INTERVAL, tmp_path, "temperature:0.5")
    assert v == {EST_INTERVAL[0]: "fail"}, ev


def test_estimator_relations_fail_when_reversed():
    suite = load_suite(SUITES / "estimator.toml")

    def row(target, model, objective, metric, value):
        return dict(suite="estimator", tier="quick", run=f"{target}/{model}/{objective}/{metric}", target=target,
                    model=model, objective=objective, seed=0, step=0, metric=metric, value=value, stderr=0.01,
                    noise_floor=float("nan"), p_value=float("nan"), device="cpu", dtype="float32", torch="x",
                    commit="c", suite_hash="h", wall_s=1.0, recorded_at="t")

    good = [row("triangle@sigma=0.1", "B256", "flux", "c_star", 1.38), row("triangle@sigma=0.3", "B64", "flux", "c_star", 1.32),
            row("triangle@sigma=0.3", "B256", "flux", "c_star", 1.23), row("triangle@sigma=0.3", "B1024", "flux", "c_star", 1.145),
            row("triangle@sigma=0.1", "mlp-init", "flux", "grad_snr", 0.029), row("triangle@sigma=0.1", "mlp-init", "dsm", "grad_snr", 0.205),
            row("triangle@sigma=0.1", "mlp-init", "flux", "frac_draws_t<0.5", 0.13),
            row("triangle@sigma=0.1", "mlp-init", "flux", "frac_abs_loss_t<0.5", 0.62)]
    ids = [c["id"] for c in suite.claims]
    res = evaluate(parse_claims(suite.claims, suite="estimator"), pd.DataFrame(good), "quick")
    assert {r.verdict for r in res} == {"pass"}, [r.evidence for r in res if r.verdict != "pass"]
    bad = pd.DataFrame(good)
    # reversed: c* grows with B, flux's SNR above DSM's, and the loss mass at large t
    bad.loc[bad["model"] == "B64", "value"], bad.loc[bad["model"] == "B1024", "value"] = 1.145, 1.32
    bad.loc[(bad["metric"] == "grad_snr") & (bad["objective"] == "flux"), "value"] = 0.5
    bad.loc[bad["metric"] == "frac_abs_loss_t<0.5", "value"] = 0.1
    bad.loc[bad["metric"] == "frac_draws_t<0.5", "value"] = 0.5
    other = pd.DataFrame(good)
    other.loc[other["model"] == "B256", "value"] = 1.5
    res = {r.id: r.verdict for r in evaluate(claims_of(suite, ["estimator/c-star-sigma0.3-B256"]), other, "quick")}
    assert res == {"estimator/c-star-sigma0.3-B256": "fail"}
    res = {r.id: r.verdict for r in evaluate(parse_claims(suite.claims, suite="estimator"), bad, "quick")}
    for cid in ("estimator/c-star-decreases-64-256", "estimator/c-star-decreases-256-1024", "estimator/snr-flux-below-dsm",
                "estimator/snr-flux-sigma0.1", "estimator/loss-mass-below-t0.5", "estimator/draws-below-t0.5",
                "estimator/c-star-sigma0.3-B64", "estimator/c-star-sigma0.3-B1024"):
        assert res[cid] == "fail", cid
    assert set(ids) >= set(res)


def test_every_shipped_claim_is_exercised_here():
    """A new claim needs a failing case in this file (its id must appear in it)."""
    from fluxbench.suites import list_suites

    text = Path(__file__).read_text()
    ids = [c["id"] for s in list_suites(SUITES) for c in s.claims]
    assert not [i for i in ids if f'"{i}"' not in text]
