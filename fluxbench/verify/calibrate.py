"""Measure the size and power of the stationarity tests (SPEC section 5: "measured, never assumed").

    python -m fluxbench.verify.calibrate [--seeds 100] [--n 2000] [--quick] [--jobs 1]
                                         [--cases PATTERN[,PATTERN...]] [--out DIR]
                                         [--rerun-ksd | --rerun-rollout] [--refresh-w2]

For every case (a target, a field, and whether the target is stationary for the field) and
every seed, N exact samples of the target are drawn and tested with ``method="ksd"`` and
``method="rollout"`` (default options, ``seed`` = the seed). ``"combined"`` is derived from
the same two p-values, ``p = min(1, 2 min(p_ksd, p_rollout))``, which is exactly what
``stationarity_test(method="combined", seed=seed)`` computes (it runs the two sub-tests
with the same seed and options). Three diagnostic variants of the KSD come from the same
pass: ``ksd_kernels`` (the lengthscale grid alone, without the mode test functions),
``ksd_median`` (the median-heuristic lengthscale alone) and ``ksd_sum`` (the sum of the
kernels' standardised statistics instead of their maximum).

Outputs (in ``--out``, default ``results/calibration``):

* ``calibration.csv``: one row per case x method x alpha (alpha = 0.01, the default
  level, and 0.05): rejections, rate, se = sqrt(rate (1 - rate) / n_seeds), the W2 of the
  perturbation, the requirement and whether it is met. Requirements: stationary cases,
  ``rate <= alpha + 2 se``; perturbed cases with W2 >= 0.1, ``rate >= 0.9``.
* ``pvalues.csv``: every p-value of every seed (the raw material of the table).
* ``README.md``: the summary, the command, date, machine and torch threads.

Results are appended per case with atomic writes (``fluxbench._io.write_text``): an
interrupted run loses at most the case in progress, and a rerun skips the cases already
in the CSV with the same N and number of seeds. ``--rerun-rollout`` recomputes the
rollout p-values of every selected case on the same samples, reusing the stored KSD
p-values (after a change to the rollout test only); ``--rerun-ksd`` does the converse.

W2 of a perturbation: ``w2_rollout`` is the exact W2 (:func:`fluxbench.metrics.w2`) between
2000 target samples pushed through a long Langevin run of the perturbed field (schedule of
:func:`fluxbench.verify.rollout_schedule` with 100 relaxation times, at most 50000 steps)
and 2000 fresh target samples; ``w2_floor`` is the W2 between two independent 2000-point
target samples (its noise floor). ``w2_reference`` is the W2 between the target p and the
perturbed field's stationary law q computed without the rollout: in closed form for
Gaussian targets with linear fields (SPEC section 4, Lyapunov equation), ``inf`` when
there is no stationary law, and, for 2-D mixtures whose q has a known density ratio to p
(temperature c: q = p^c; drift b: q = p e^{b.x}; other weights: the other mixture), an
upper bound from the Knothe-Rosenblatt coupling on a fine grid (:func:`w2_bounds_2d`,
``w2_lower`` holds Gelbrich's lower bound). The requirement uses ``w2_reference`` (for
those mixtures the upper bound: the requirement applies unless W2 < 0.1 is established),
else the debiased rollout estimate
``sqrt(max(w2_rollout^2 - w2_floor^2, 0))``. ``--refresh-w2`` recomputes these columns for
the cases already in the CSV (from ``pvalues.csv``, without rerunning the seeds).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import fnmatch
import io
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from fluxbench._io import write_text

__all__ = ["Case", "CASES", "QUICK_CASES", "make_case", "run_case", "perturbation_w2", "main"]

ALPHAS = (0.01, 0.05)
METHODS = ("ksd", "rollout", "combined", "ksd_kernels", "ksd_median", "ksd_sum")
REQUIRED_METHODS = ("ksd", "rollout", "combined")
W2_THRESHOLD = 0.1
POWER_TARGET = 0.9


# --------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One calibration case: a target name, a field name and the family."""

    name: str
    family: str  # "stationary" or "perturbed"
    target: str  # iso{d}, aniso{d}, triangle, ring
    field: str
    description: str

    @property
    def d(self) -> int:
        return _dim(self.target)


def _dim(target: str) -> int:
    if target.startswith("iso"):
        return int(target[3:])
    if target.startswith("aniso"):
        return int(target[5:])
    return 2


def _target(name: str):
    from fluxbench.targets import Gaussian, anisotropic_gaussian, ring, triangle

    if name.startswith("iso"):
        return Gaussian.isotropic(_dim(name))
    if name.startswith("aniso"):
        return anisotropic_gaussian(_dim(name), 10.0, seed=0)
    if name == "triangle":
        return triangle()
    if name == "ring":
        return ring()
    raise ValueError(f"unknown calibration target {name!r}")


def _antisymmetric(d: int) -> Tensor:
    """A fixed antisymmetric matrix with spectral norm 1 (the 90-degree rotation in 2-D)."""
    if d == 2:
        return torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    g = torch.randn(d, d, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    a = g - g.T
    return a / torch.linalg.matrix_norm(a, ord=2)


def _symmetric_part(d: int) -> Tensor:
    """The symmetric perturbation S of the rot_sym case: diag(1.5, 0.5, 1.5, 0.5, ...)."""
    return torch.diag(torch.tensor([1.5 if i % 2 == 0 else 0.5 for i in range(d)], dtype=torch.float64))


STRONG_ROTATION = 4.0
ROT_SYM_EPS = 0.3
DRIFT = 0.3
TEMPERATURE = 0.9
#: the wrong temperatures of the ``temp*`` fields: f = c s
TEMPERATURES = {"temp09": TEMPERATURE, "temp07": 0.7}
TRIANGLE_WRONG_WEIGHTS = (0.5, 0.25, 0.25)


def _drift(d: int) -> Tensor:
    """The constant drift b of the ``drift`` case: |b| = DRIFT along (1, ..., 1)."""
    return DRIFT * torch.ones(d, dtype=torch.float64) / math.sqrt(d)


class _Linear:
    """x -> x @ M^T (+ b) in the input's dtype (M, b stored in float64)."""

    def __init__(self, inner: Callable[[Tensor], Tensor], matrix: Tensor | None = None, shift: Tensor | None = None,
                 scale: float = 1.0):
        self.inner, self.matrix, self.shift, self.scale = inner, matrix, shift, scale

    def __call__(self, x: Tensor) -> Tensor:
        s = self.inner(x)
        out = s if self.matrix is None else s @ self.matrix.to(s.dtype).T
        if self.scale != 1.0:
            out = self.scale * out
        if self.shift is not None:
            out = out + self.shift.to(s.dtype)
        return out


def make_case(case: Case):
    """Build ``(target, field, linear)`` for a case.

    ``linear`` is ``(M, b)`` when the target is Gaussian and the field is
    ``f(x) = -M (x - m) + b`` (for the closed-form stationary law), else None.
    """
    from fluxbench.fields import RotationalField, ScalarAntisymmetric
    from fluxbench.targets import Gaussian, GaussianMixture

    target = _target(case.target)
    d = target.dim
    a = _antisymmetric(d)
    eye = torch.eye(d, dtype=torch.float64)
    gauss = isinstance(target, Gaussian)
    prec = target.precision if gauss else None
    f = case.field
    linear = None
    if f == "score":
        field, mat = target.score, eye
    elif f == "rot_const":
        field, mat = RotationalField(target.score, a), eye + a
    elif f == "rot_strong":
        field, mat = RotationalField(target.score, STRONG_ROTATION * a), eye + STRONG_ROTATION * a
    elif f == "rot_scalar":
        amp, width = 2.0, 4.0 * d

        def scalar(x: Tensor) -> Tensor:
            return amp * torch.exp(-(x * x).sum(1) / width)

        def grad(x: Tensor) -> Tensor:
            return (-2.0 / width) * x * scalar(x)[:, None]

        field, mat = RotationalField(target.score, ScalarAntisymmetric(scalar, a, grad=grad)), None
    elif f in TEMPERATURES:
        c = TEMPERATURES[f]
        field, mat = _Linear(target.score, scale=c), c * eye
    elif f == "drift":
        b = _drift(d)
        field = _Linear(target.score, shift=b)
        mat = eye
        if gauss:
            linear = (prec, b)
    elif f == "rot_sym":
        m = eye + STRONG_ROTATION * a + ROT_SYM_EPS * _symmetric_part(d)
        field, mat = _Linear(target.score, matrix=m), m
    elif f == "rot_only":
        field, mat = _Linear(target.score, matrix=a), a
    elif f == "weights":
        if not isinstance(target, GaussianMixture):
            raise ValueError("the weights case needs a mixture target")
        field, mat = GaussianMixture(_wrong_weights(case), target.means, target.covariances).score, None
    else:
        raise ValueError(f"unknown calibration field {f!r}")
    if gauss and linear is None and mat is not None:
        linear = (mat @ prec, torch.zeros(d, dtype=torch.float64))
    return target, field, linear


def _cases() -> list[Case]:
    out: list[Case] = []
    desc = {
        "score": "f = s",
        "rot_const": "f = (I + A) s, A constant antisymmetric, |A| = 1 (SPEC eq. (4))",
        "rot_scalar": "f = s + a(x) A s + A grad a, a(x) = 2 exp(-|x|^2 / (4 d)) (SPEC eq. (4))",
        "rot_strong": f"f = (I + {STRONG_ROTATION:g} A) s (large rotation)",
    }
    for t in ("iso2", "iso5", "iso20", "aniso2", "aniso5", "aniso20", "triangle", "ring"):
        for f in ("score", "rot_const", "rot_scalar"):
            out.append(Case(f"{t}-{f}", "stationary", t, f, desc[f]))
    for t in ("iso2", "aniso5"):
        out.append(Case(f"{t}-rot_strong", "stationary", t, "rot_strong", desc["rot_strong"]))
    pdesc = {
        "temp09": f"f = {TEMPERATURE} s (wrong temperature)",
        "temp07": f"f = {TEMPERATURES['temp07']} s (wrong temperature; the modes are 14x narrower than the median distance)",
        "drift": f"f = s + b, |b| = {DRIFT} along (1, ..., 1)",
        "rot_sym": f"f = (I + {STRONG_ROTATION:g} A + {ROT_SYM_EPS} S) s, S = diag(1.5, 0.5, ...) (symmetric error under a large rotation)",
        "rot_only": "f = A s (rotation without the score: no stationary law)",
        "weights": "f = score of the same mixture with other weights",
    }
    perturbed = [
        ("iso2", "temp09"), ("iso20", "temp09"), ("aniso5", "temp09"), ("triangle", "temp09"), ("ring", "temp07"),
        ("iso2", "drift"), ("iso20", "drift"), ("triangle", "drift"),
        ("iso2", "rot_sym"), ("aniso5", "rot_sym"),
        ("iso2", "rot_only"), ("aniso5", "rot_only"),
        ("triangle", "weights"), ("ring", "weights"),
    ]
    for t, f in perturbed:
        d = pdesc[f]
        if f == "weights":
            d += f" {TRIANGLE_WRONG_WEIGHTS}" if t == "triangle" else " (3:1 alternating)"
        family = "perturbed"
        if (t, f) == ("ring", "weights"):
            family = "limit"
            d += "; beyond reach: the saddles between modes hold almost no samples and mass takes ~1e3 time units to cross"
        out.append(Case(f"{t}-{f}", family, t, f, d))
    return out


CASES: list[Case] = _cases()
CASE_BY_NAME = {c.name: c for c in CASES}
QUICK_CASES = ("iso2-score", "iso2-rot_scalar", "iso20-temp09", "triangle-weights")


# --------------------------------------------------------------------------- W2 of a perturbation
def _gaussian_stationary(target, linear) -> tuple[Tensor, Tensor] | None:
    """Stationary N(mean, C) of f(x) = -M (x - m) + b, or None if M is not stable."""
    from scipy.linalg import solve_continuous_lyapunov

    m_mat, b = linear
    eig = torch.linalg.eigvals(m_mat)
    if float(eig.real.min()) <= 1e-9:
        return None
    c = solve_continuous_lyapunov(m_mat.numpy(), 2.0 * np.eye(m_mat.shape[0]))
    c = torch.tensor(0.5 * (c + c.T), dtype=torch.float64)
    mean = target.mean + torch.linalg.solve(m_mat, b)
    return mean, c


def perturbation_w2(case: Case, *, n: int = 2000, seed: int = 99, time_factor: float = 100.0,
                    max_steps: int = 50000) -> dict:
    """W2 between the target and the perturbed field's stationary law (see the module doc)."""
    from fluxbench.metrics import gaussian_w2, w2
    from fluxbench.samplers import langevin
    from fluxbench.verify.stationarity import rollout_schedule

    target, field, linear = make_case(case)
    g = torch.Generator().manual_seed(seed)
    x0 = target.sample(n, generator=g)
    ref = target.sample(n, generator=g)
    eps, steps, info = rollout_schedule(field, x0, generator=g, time_factor=time_factor, max_steps=max_steps)
    y = langevin(field, x0, step_size=eps, n_steps=steps, generator=g)
    out = {
        "w2_rollout": w2(y, ref),
        "w2_floor": w2(x0, ref),
        "w2_rollout_time": eps * steps,
        "w2_rollout_eps": eps,
    }
    ref_w2 = math.nan
    source = "rollout (debiased)"
    if linear is not None:
        st = _gaussian_stationary(target, linear)
        if st is None:
            ref_w2, source = math.inf, "none: no stationary law"
        else:
            ref_w2 = float(gaussian_w2(target.mean, target.covariance, st[0], st[1]))
            source = "closed form (Gaussian)"
    else:
        log_ratio = _stationary_log_ratio(case, target)
        if log_ratio is not None and target.dim == 2:
            # q has a known density ratio to p: bracket W2 on a fine grid
            radius = float(target.means.norm(dim=1).max())
            std = float(torch.linalg.eigvalsh(target.covariances).max().sqrt())
            half = radius + 8.0 * std
            n_grid = int(min(1600, max(800, math.ceil(2 * half / (std / 30)))))
            upper, lower = w2_bounds_2d(target.log_prob, lambda x: target.log_prob(x) + log_ratio(x), -half, half, n=n_grid)
            ref_w2, out["w2_lower"] = upper, lower
            source = (f"upper bound: Knothe-Rosenblatt coupling on a {n_grid}^2 grid (best of 8 rotations); "
                      f"Gelbrich lower bound {lower:.3f}")
    out["w2_reference"] = ref_w2
    out.setdefault("w2_lower", ref_w2 if source.startswith("closed form") or math.isinf(ref_w2) else math.nan)
    out["w2_source"] = source
    if math.isnan(ref_w2):
        out["w2"] = math.sqrt(max(out["w2_rollout"] ** 2 - out["w2_floor"] ** 2, 0.0))
    else:
        out["w2"] = ref_w2
    return out


def w2_bounds_2d(
    log_p: Callable[[Tensor], Tensor],
    log_q: Callable[[Tensor], Tensor],
    lo: float,
    hi: float,
    *,
    n: int = 1000,
    n_angles: int = 8,
) -> tuple[float, float]:
    """Upper and lower bounds on W2(p, q) for 2-D densities known up to constants.

    Upper: the cost of the Knothe-Rosenblatt coupling (a valid transport map: the marginal
    quantile map of the first coordinate, then the conditional quantile maps of the second),
    computed on an n x n grid of [lo, hi]^2 by 1-D CDF inversion, in the best of
    ``n_angles`` rotated frames (each is a valid coupling, so the minimum is still an upper
    bound; it is exact for Gaussians related by a map that is triangular in some frame).
    Lower: Gelbrich's bound W2(p, q) >= W2(N(m_p, C_p), N(m_q, C_q)) with the grid moments.
    Both up to the grid's discretisation error (checked against closed forms for Gaussians:
    4 digits at n = 800).
    """
    from fluxbench.metrics import gaussian_w2

    u = np.linspace(lo, hi, n)
    h = u[1] - u[0]
    best = math.inf
    grid_u, grid_v = np.meshgrid(u, u, indexing="ij")

    def masses(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xt = torch.from_numpy(points)
        lp, lq = log_p(xt).numpy().reshape(n, n), log_q(xt).numpy().reshape(n, n)
        mp, mq = np.exp(lp - lp.max()), np.exp(lq - lq.max())
        return mp / mp.sum(), mq / mq.sum()

    for k in range(n_angles):
        c, s_ = math.cos(math.pi * k / n_angles), math.sin(math.pi * k / n_angles)
        pts = np.stack([c * grid_u - s_ * grid_v, s_ * grid_u + c * grid_v], -1).reshape(-1, 2)
        mp, mq = masses(pts)
        p1, q1 = mp.sum(1), mq.sum(1)
        t1 = np.interp(np.cumsum(p1) - 0.5 * p1, np.cumsum(q1) - 0.5 * q1, u)
        cond_q = (np.cumsum(mq, 1) - 0.5 * mq) / np.maximum(q1[:, None], 1e-300)
        cond_p = (np.cumsum(mp, 1) - 0.5 * mp) / np.maximum(p1[:, None], 1e-300)
        pos = (t1 - lo) / h
        i0 = np.clip(np.floor(pos).astype(int), 0, n - 2)
        frac = np.clip(pos - i0, 0.0, 1.0)
        cost = float(((u - t1) ** 2 * p1).sum())
        for i in np.nonzero(p1 > 1e-14)[0]:
            fq = np.maximum.accumulate((1 - frac[i]) * cond_q[i0[i]] + frac[i] * cond_q[i0[i] + 1])
            cost += float((mp[i] * (u - np.interp(cond_p[i], fq, u)) ** 2).sum())
        best = min(best, math.sqrt(cost))
    pts = np.stack([grid_u, grid_v], -1).reshape(-1, 2)
    mp, mq = (m.reshape(-1) for m in masses(pts))
    mean_p, mean_q = mp @ pts, mq @ pts
    cov_p = (pts - mean_p).T @ ((pts - mean_p) * mp[:, None])
    cov_q = (pts - mean_q).T @ ((pts - mean_q) * mq[:, None])
    cov_p, cov_q = 0.5 * (cov_p + cov_p.T), 0.5 * (cov_q + cov_q.T)
    lower = float(gaussian_w2(*(torch.from_numpy(a) for a in (mean_p, cov_p, mean_q, cov_q))))
    return best, lower


def _stationary_log_ratio(case: Case, target) -> Callable[[Tensor], Tensor] | None:
    """x -> log(q(x) / p(x)) + const for the perturbed field's stationary law q, when known.

    temperature c (f = c s): q = p^c; drift (f = s + b): q = p e^{b.x}; weights: the other mixture.
    """
    from fluxbench.targets import GaussianMixture

    if case.field in TEMPERATURES:
        c = TEMPERATURES[case.field]
        return lambda x: (c - 1.0) * target.log_prob(x)
    if case.field == "drift":
        b = _drift(target.dim)
        return lambda x: x @ b.to(x.dtype)
    if case.field == "weights":
        q = GaussianMixture(_wrong_weights(case), target.means, target.covariances)
        return lambda x: q.log_prob(x) - target.log_prob(x)
    return None


def _wrong_weights(case: Case) -> Tensor:
    """The mixture weights of the field of a ``weights`` case."""
    target = _target(case.target)
    if case.target == "triangle":
        return torch.tensor(TRIANGLE_WRONG_WEIGHTS, dtype=torch.float64)
    return torch.tensor([3.0 if k % 2 == 0 else 1.0 for k in range(target.n_components)], dtype=torch.float64)


# --------------------------------------------------------------------------- running a case
KSD_COLUMNS = ("p_ksd", "p_ksd_kernels", "p_ksd_median", "p_ksd_sum", "ksd_seconds")
ROLLOUT_COLUMNS = ("p_rollout", "rollout_seconds", "eps", "n_steps")


def seed_samples(target, seed: int, n: int) -> Tensor:
    """The n samples of a case's target tested under ``seed`` (the same in every run and tool)."""
    return target.sample(n, generator=torch.Generator().manual_seed(1_000_003 * (seed + 1)))


def select_cases(patterns: str, names: Sequence[str]) -> list[str]:
    """The names matching any of the comma-separated glob ``patterns``, in ``names``' order."""
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [c for c in names if any(fnmatch.fnmatch(c, p) for p in pats)]


def run_case(case: Case, *, n: int, n_seeds: int, seed_offset: int = 0, progress: bool = False,
             ksd_rows: pd.DataFrame | None = None, rollout_rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """All seeds of one case: a DataFrame of p-values (one row per seed).

    ``ksd_rows`` / ``rollout_rows`` (earlier p-values of the case, one row per seed) skip
    that test for the seeds they hold and reuse its columns: the samples of a seed are the
    same in every run, so only the other test is recomputed (``--rerun-rollout``,
    ``--rerun-ksd``).
    """
    from fluxbench.verify.stationarity import combined_p_value, ksd_test, rollout_test

    def by_seed(rows: pd.DataFrame | None) -> dict:
        return {} if rows is None else {int(r["seed"]): r for _, r in rows.iterrows()}

    target, field, _ = make_case(case)
    ksd_reuse, rollout_reuse = by_seed(ksd_rows), by_seed(rollout_rows)
    rows = []
    for s in range(seed_offset, seed_offset + n_seeds):
        x = seed_samples(target, s, n)
        t0 = time.perf_counter()
        if s in ksd_reuse:
            ksd = {k: float(ksd_reuse[s][k]) for k in KSD_COLUMNS}
        else:
            rk = ksd_test(field, x, seed=s)
            ksd = {"p_ksd": rk.p_value, "p_ksd_kernels": rk.details["p_value_kernels"],
                   "p_ksd_median": rk.details.get("p_value_median", math.nan),
                   "p_ksd_sum": rk.details["p_value_sum"], "ksd_seconds": time.perf_counter() - t0}
        t1 = time.perf_counter()
        if s in rollout_reuse:
            roll = {k: rollout_reuse[s][k] for k in ROLLOUT_COLUMNS}
        else:
            rr = rollout_test(field, x, seed=s, compute_w2=False)
            roll = {"p_rollout": rr.p_value, "rollout_seconds": time.perf_counter() - t1, "eps": rr.eps,
                    "n_steps": rr.n_steps}
        rows.append(
            {
                "case": case.name,
                "seed": s,
                "p_ksd": ksd["p_ksd"],
                "p_ksd_kernels": ksd["p_ksd_kernels"],
                "p_ksd_median": ksd["p_ksd_median"],
                "p_ksd_sum": ksd["p_ksd_sum"],
                "p_rollout": float(roll["p_rollout"]),
                "p_combined": combined_p_value(ksd["p_ksd"], float(roll["p_rollout"])),
                "ksd_seconds": ksd["ksd_seconds"],
                "rollout_seconds": float(roll["rollout_seconds"]),
                "eps": float(roll["eps"]),
                "n_steps": int(roll["n_steps"]),
            }
        )
        if progress:
            print(f"  {case.name} seed {s}: p_ksd {ksd['p_ksd']:.3f} p_rollout {float(roll['p_rollout']):.3f} "
                  f"({ksd['ksd_seconds']:.2f} s + {float(roll['rollout_seconds']):.2f} s)", flush=True)
    return pd.DataFrame(rows)


def summarise(case: Case, pv: pd.DataFrame, w2info: dict | None, n: int) -> pd.DataFrame:
    """Rows of calibration.csv for one case."""
    rows = []
    n_seeds = len(pv)
    for method in METHODS:
        col = f"p_{method}"
        for alpha in ALPHAS:
            rej = int((pv[col] < alpha).sum())
            rate = rej / n_seeds
            se = math.sqrt(rate * (1 - rate) / n_seeds)
            w2v = w2info["w2"] if w2info else math.nan
            if case.family == "stationary":
                req = "rate <= alpha + 2 se"
                meets = "yes" if rate <= alpha + 2 * se + 1e-12 else "no"
            elif case.family == "limit":
                req = "none (documented limit, outside the required set)"
                meets = "not required"
            elif w2v >= W2_THRESHOLD:
                req = f"rate >= {POWER_TARGET}"
                meets = "yes" if rate >= POWER_TARGET else "no"
            else:
                req = f"none (W2 < {W2_THRESHOLD})"
                meets = "not required"
            rows.append(
                {
                    "case": case.name,
                    "family": case.family,
                    "target": case.target,
                    "d": case.d,
                    "field": case.field,
                    "method": method,
                    "alpha": alpha,
                    "n": n,
                    "n_seeds": n_seeds,
                    "rejections": rej,
                    "rate": rate,
                    "se": se,
                    "w2": w2v,
                    "w2_lower": w2info.get("w2_lower", math.nan) if w2info else math.nan,
                    "w2_source": w2info["w2_source"] if w2info else "",
                    "w2_rollout": w2info["w2_rollout"] if w2info else math.nan,
                    "w2_floor": w2info["w2_floor"] if w2info else math.nan,
                    "w2_rollout_time": w2info["w2_rollout_time"] if w2info else math.nan,
                    "requirement": req,
                    "meets": meets,
                    "mean_seconds": float(pv["ksd_seconds"].mean() + pv["rollout_seconds"].mean()),
                    "mean_eps": float(pv["eps"].mean()),
                    "mean_n_steps": float(pv["n_steps"].mean()),
                    "description": case.description,
                }
            )
    return pd.DataFrame(rows)


def _case_job(args: tuple) -> tuple[str, pd.DataFrame, pd.DataFrame, float]:
    name, n, n_seeds, progress, w2_n, ksd_rows, rollout_rows = args
    torch.set_num_threads(1)
    case = CASE_BY_NAME[name]
    start = time.perf_counter()
    pv = run_case(case, n=n, n_seeds=n_seeds, progress=progress, ksd_rows=ksd_rows, rollout_rows=rollout_rows)
    w2info = perturbation_w2(case, n=w2_n) if case.family != "stationary" else None
    table = summarise(case, pv, w2info, n)
    return name, table, pv, time.perf_counter() - start


# --------------------------------------------------------------------------- output
def _read(path: Path) -> pd.DataFrame | None:
    """The table at ``path`` (None if absent or empty), refusing a truncated or foreign file.

    pandas alone accepts a file cut mid-row (it pads the short row with NaN), so the
    resumable run would keep a half-written case as if it were complete.
    """
    if not (path.exists() and path.stat().st_size > 0):
        return None
    text = path.read_text()
    rows = list(csv.reader(io.StringIO(text)))
    header = rows[0]
    if "case" not in header or ("seed" not in header and "method" not in header):
        raise ValueError(f"{path} is not a calibration table (header {header[:4]}...); move it away or pass another --out")
    if not text.endswith("\n"):
        raise ValueError(f"{path} is truncated: its last line ends without a newline; delete that line or the file")
    short = next((i for i, r in enumerate(rows[1:], start=2) if len(r) != len(header)), None)
    if short is not None:
        raise ValueError(
            f"{path}:{short}: {len(rows[short - 1])} fields where the header has {len(header)} "
            "(truncated or corrupted row); delete that row or the file"
        )
    return pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=["nan", "NaN", ""])


def _append(path: Path, new: pd.DataFrame, case: str) -> pd.DataFrame:
    old = _read(path)
    if old is not None:
        old = old[old["case"] != case]
        new = pd.concat([old, new], ignore_index=True)
    buf = io.StringIO()
    new.to_csv(buf, index=False)
    write_text(path, buf.getvalue())
    return new


def _in_case_order(table: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by the order of :data:`CASES` (stable within a case)."""
    order = {c.name: i for i, c in enumerate(CASES)}
    return table.sort_values(by=["case"], key=lambda s: s.map(order), kind="stable")


def _factors_text() -> str:
    from fluxbench.verify.stein import DEFAULT_LENGTHSCALE_FACTORS

    return ", ".join(f"{c:g}" for c in DEFAULT_LENGTHSCALE_FACTORS)


def _fmt_rate(r: pd.Series) -> str:
    mark = " **FAIL**" if r["meets"] == "no" else ""
    return f"{r['rate']:.2f} ± {r['se']:.2f}{mark}"


def write_summary(out: Path, table: pd.DataFrame, command: str, elapsed: dict[str, float], meta: dict) -> None:
    """Regenerate README.md from the CSV."""
    lines = [
        "# Calibration of the stationarity tests: size and power",
        "",
        "Produced by `fluxbench.verify.calibrate` (see its docstring for the protocol).",
        "",
        f"- command: `{command}`",
        *([f"- all runs into this directory (`commands.log`): "
           + "; ".join(f"`{ln.strip()}`" for ln in meta["history"].splitlines() if ln.strip())]
          if meta.get("history") else []),
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- torch {torch.__version__}, torch threads per process: {meta['threads']}, processes: {meta['jobs']}",
        f"- N = {meta['n']} samples per seed; seeds per case: {meta['seeds']}",
        f"- wall time of the cases listed (sum over cases, seconds): {sum(elapsed.values()):.0f}"
        if elapsed else "- wall time: (cases computed in earlier runs)",
        "",
        "Each entry is the rejection rate ± its SE, sqrt(rate (1 - rate) / n_seeds), over the seeds.",
        "Requirements: stationary cases (false alarms) `rate <= alpha + 2 SE`; perturbed cases with",
        f"W2 >= {W2_THRESHOLD} (detections) `rate >= {POWER_TARGET}`. **FAIL** marks an entry that misses its",
        f"requirement. `ksd` (maximum over the lengthscales {_factors_text()} x the median and the mode",
        "test functions), `rollout` and `combined` (the default, both with Bonferroni) are the methods of",
        "`stationarity_test`;",
        "`ksd_kernels` (the lengthscales alone, without the mode test functions), `ksd_median` (the",
        "median lengthscale alone) and `ksd_sum` (sum of the kernels' standardised statistics) are",
        "diagnostics computed from the same pass.",
        "",
    ]
    for alpha in ALPHAS:
        sub = table[table["alpha"] == alpha]
        for family, title in (("stationary", "False-alarm rate (stationary cases)"),
                              ("perturbed", "Detection rate (perturbed cases)"),
                              ("limit", "Detection rate (documented limit, outside the required set)")):
            fam = sub[sub["family"] == family]
            if fam.empty:
                continue
            lines += [f"## {title}, alpha = {alpha}", ""]
            head = "| case | d | " + ("W2 | " if family != "stationary" else "") + " | ".join(METHODS) + " |"
            lines += [head, "|" + "---|" * (head.count("|") - 1)]
            for case in dict.fromkeys(fam["case"]):
                rows = fam[fam["case"] == case].set_index("method")
                first = rows.iloc[0]
                cells = [case, str(int(first["d"]))]
                if family != "stationary":
                    w = first["w2"]
                    cells.append("inf" if math.isinf(w) else f"{w:.3f}")
                # "-": a method added after this case was last computed (rerun it to fill it in)
                cells += [_fmt_rate(rows.loc[m]) if m in rows.index else "-" for m in METHODS]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    # which method meets what
    lines += ["## Which method meets which requirement", ""]
    req = table[table["meets"] != "not required"]
    lines += ["| alpha | method | stationary cases met | perturbed cases (W2 >= 0.1) met | cases missed |",
              "|---|---|---|---|---|"]
    for alpha in ALPHAS:
        for m in METHODS:
            sub = req[(req["alpha"] == alpha) & (req["method"] == m)]
            st = sub[sub["family"] == "stationary"]
            pe = sub[sub["family"] == "perturbed"]
            missed = ", ".join(sub[sub["meets"] == "no"]["case"]) or "none"
            lines.append(f"| {alpha} | {m} | {int((st['meets'] == 'yes').sum())}/{len(st)} | "
                         f"{int((pe['meets'] == 'yes').sum())}/{len(pe)} | {missed} |")
    lines.append("")
    pert = table[(table["family"] != "stationary") & (table["method"] == "ksd") & (table["alpha"] == ALPHAS[0])]
    if not pert.empty:
        lines += ["## W2 of the perturbations", "",
                  "W2 used: the value the requirement is judged by (see `fluxbench/verify/calibrate.py`). "
                  "W2 rollout: exact W2 between target samples (2000 unless `--w2-n`) after a long Langevin run of "
                  "the perturbed field and as many fresh target samples, next to its noise floor (two independent "
                  "target samples).",
                  "",
                  "| case | W2 used | lower bound | source | W2 rollout | noise floor | rollout time | description |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in pert.itertuples():
            w = "inf" if math.isinf(r.w2) else f"{r.w2:.3f}"
            lo = getattr(r, "w2_lower", math.nan)
            lo = "" if lo != lo else ("inf" if math.isinf(lo) else f"{lo:.3f}")
            lines.append(f"| {r.case} | {w} | {lo} | {r.w2_source} | {r.w2_rollout:.3f} | {r.w2_floor:.3f} | "
                         f"{r.w2_rollout_time:.1f} | {r.description} |")
        lines.append("")
    st = table[(table["method"] == "rollout") & (table["alpha"] == ALPHAS[0])]
    lines += ["## Rollout schedules and cost", "",
              "| case | mean eps | mean n_steps | mean seconds per seed (ksd + rollout) | description |",
              "|---|---|---|---|---|"]
    for r in st.itertuples():
        lines.append(f"| {r.case} | {r.mean_eps:.2e} | {r.mean_n_steps:.0f} | {r.mean_seconds:.2f} | {r.description} |")
    lines.append("")
    if meta.get("notes"):
        lines += ["## Notes", "", meta["notes"], ""]
    write_text(out / "README.md", "\n".join(lines))


NOTES_FILE = "NOTES.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fluxbench.verify.calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=100, help="seeds per case (default 100)")
    parser.add_argument("--n", type=int, default=2000, help="samples per seed (default 2000)")
    parser.add_argument("--quick", action="store_true",
                        help=f"10 seeds on {len(QUICK_CASES)} cases, written to OUT/quick (about 2 minutes)")
    parser.add_argument("--cases", default=None, help="comma-separated case names or glob patterns")
    parser.add_argument("--out", default="results/calibration", help="output directory")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one torch thread each")
    parser.add_argument("--progress", action="store_true", help="print every seed")
    parser.add_argument("--w2-n", type=int, default=2000, help="points of the W2 estimates of the perturbations")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    rerun = parser.add_mutually_exclusive_group()
    rerun.add_argument("--rerun-rollout", action="store_true",
                       help="recompute the rollout p-values of the cases already in the CSV, reusing their KSD p-values")
    rerun.add_argument("--rerun-ksd", action="store_true",
                       help="recompute the KSD p-values of the cases already in the CSV, reusing their rollout p-values")
    parser.add_argument("--refresh-w2", action="store_true",
                        help="recompute the W2 columns of the cases already in the CSV (seeds are not rerun)")
    args = parser.parse_args(argv)
    if args.list:
        for c in CASES:
            print(f"{c.name:24s} {c.family:10s} {c.description}")
        return 0
    torch.set_num_threads(1)
    out = Path(args.out)
    seeds = args.seeds
    cases = [c.name for c in CASES]
    if args.quick:
        out = out / "quick"
        seeds = 10 if args.seeds == 100 else args.seeds
        cases = list(QUICK_CASES)
    if args.cases:
        cases = select_cases(args.cases, cases)
        if not cases:
            parser.error(f"no case matches {args.cases!r}; see --list")
    out.mkdir(parents=True, exist_ok=True)
    csv_path, pv_path = out / "calibration.csv", out / "pvalues.csv"
    existing = _read(csv_path)
    done = set()
    if existing is not None:
        same = existing[(existing["n"] == args.n) & (existing["n_seeds"] == seeds)]
        done = set(same["case"])
    ksd_reuse: dict[str, pd.DataFrame] = {}
    rollout_reuse: dict[str, pd.DataFrame] = {}
    if args.rerun_rollout or args.rerun_ksd:
        old_pv = _read(pv_path)
        if old_pv is not None:
            kept = {c: old_pv[old_pv["case"] == c] for c in done}
            if args.rerun_rollout:
                ksd_reuse = kept
            else:
                rollout_reuse = kept
        done = set()
    # the perturbed cases first (they decide the design), then the stationary ones
    todo = sorted((c for c in cases if c not in done), key=lambda c: CASE_BY_NAME[c].family == "stationary")
    if args.refresh_w2:
        todo = []
    command = "python -m fluxbench.verify.calibrate " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"Python {platform.python_version()}",
        "threads": torch.get_num_threads(),
        "jobs": args.jobs,
        "n": args.n,
        "seeds": seeds,
    }
    history_path = out / "commands.log"
    history = history_path.read_text() if history_path.exists() else ""
    history += f"{meta['date']}  {command}\n"
    write_text(history_path, history)
    meta["history"] = history
    notes = out / NOTES_FILE
    if notes.exists():
        meta["notes"] = notes.read_text()
    print(f"calibration: {len(todo)} case(s) to run ({len(cases) - len(todo)} already in {csv_path}), "
          f"{seeds} seeds, N = {args.n}", flush=True)
    elapsed: dict[str, float] = {}
    table = existing if existing is not None else pd.DataFrame()
    jobs = [(c, args.n, seeds, args.progress, args.w2_n, ksd_reuse.get(c), rollout_reuse.get(c)) for c in todo]

    def record(name: str, rows: pd.DataFrame, pv: pd.DataFrame, secs: float) -> None:
        nonlocal table
        table = _append(csv_path, rows, name)
        _append(pv_path, pv, name)
        elapsed[name] = secs
        table = _in_case_order(table)
        write_summary(out, table, command, elapsed, meta)
        r = rows[(rows["alpha"] == ALPHAS[0])].set_index("method")["rate"]
        print(f"[{len(elapsed)}/{len(todo)}] {name}: " + ", ".join(f"{m} {r[m]:.2f}" for m in REQUIRED_METHODS)
              + f" (alpha {ALPHAS[0]}) in {secs:.0f} s", flush=True)

    if args.refresh_w2 and existing is not None:
        pv_all = _read(pv_path)
        for name in dict.fromkeys(existing["case"]):
            case = CASE_BY_NAME.get(name)
            if case is None or case.family == "stationary" or name not in cases:
                continue
            start = time.perf_counter()
            pv = pv_all[pv_all["case"] == name]
            rows = summarise(case, pv, perturbation_w2(case, n=args.w2_n), int(existing[existing["case"] == name]["n"].iloc[0]))
            table = _append(csv_path, rows, name)
            print(f"refreshed W2 of {name}: {rows['w2'].iloc[0]:.4g} ({rows['w2_source'].iloc[0]}) "
                  f"in {time.perf_counter() - start:.0f} s", flush=True)
    elif args.jobs <= 1:
        for job in jobs:
            record(*_case_job(job))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Pool(args.jobs) as pool:
            for res in pool.imap_unordered(_case_job, jobs):
                record(*res)
    if table is not None and not table.empty:
        write_summary(out, _in_case_order(table), command, elapsed, meta)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
