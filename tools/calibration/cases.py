"""The calibration cases: a target, a field, and whether the target is stationary for it.

Stationary cases (false alarms): the score s of each target and the eq. (4) rotations of
SPEC section 1 (constant A, a non-constant a(x) A, a large constant rotation), which keep
the target stationary. Perturbed cases (detections): a wrong temperature c s, a constant
drift s + b, a symmetric error under a large rotation, a rotation without the score, other
mixing weights. One ``limit`` case is recorded outside the required set.

The samples of a seed (:func:`seed_samples`) are drawn on the CPU from a generator seeded
by the seed alone, then moved to the device: every run, tool and device tests the same
points.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fluxbench.fields import RotationalField, ScalarAntisymmetric
from fluxbench.targets import Gaussian, GaussianMixture, anisotropic_gaussian, ring, triangle

__all__ = [
    "Case", "CASES", "CASE_BY_NAME", "QUICK_CASES", "TEMPERATURES", "make_case", "case_target", "drift_vector",
    "wrong_weights", "seed_samples", "select_cases",
]  # fmt: skip

STRONG_ROTATION = 4.0
ROT_SYM_EPS = 0.3
DRIFT = 0.3
TEMPERATURE = 0.9
#: the wrong temperatures of the ``temp*`` fields: f = c s
TEMPERATURES = {"temp09": TEMPERATURE, "temp07": 0.7}
TRIANGLE_WRONG_WEIGHTS = (0.5, 0.25, 0.25)


@dataclass(frozen=True)
class Case:
    """One calibration case: a target name, a field name and the family."""

    name: str
    family: str  # "stationary", "perturbed" or "limit"
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


def case_target(name: str):
    """The target of a case's ``target`` name (iso{d}, aniso{d}, triangle, ring)."""
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
    """A fixed antisymmetric (d, d) matrix with spectral norm 1 (the 90-degree rotation in 2-D)."""
    if d == 2:
        return torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    g = torch.randn(d, d, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    a = g - g.T
    return a / torch.linalg.matrix_norm(a, ord=2)


def _symmetric_part(d: int) -> Tensor:
    """The symmetric perturbation S of the rot_sym case: diag(1.5, 0.5, 1.5, 0.5, ...)."""
    return torch.diag(torch.tensor([1.5 if i % 2 == 0 else 0.5 for i in range(d)], dtype=torch.float64))


def drift_vector(d: int) -> Tensor:
    """The constant drift b (d,) of the ``drift`` case: |b| = DRIFT along (1, ..., 1)."""
    return DRIFT * torch.ones(d, dtype=torch.float64) / math.sqrt(d)


def wrong_weights(case: Case) -> Tensor:
    """The mixture weights (K,) of the field of a ``weights`` case."""
    if case.target == "triangle":
        return torch.tensor(TRIANGLE_WRONG_WEIGHTS, dtype=torch.float64)
    target = case_target(case.target)
    return torch.tensor([3.0 if k % 2 == 0 else 1.0 for k in range(target.n_components)], dtype=torch.float64)


class _Linear:
    """x -> c M s(x) + b in the input's dtype and device (M (d, d), b (d,) stored in float64)."""

    def __init__(self, inner: Callable[[Tensor], Tensor], matrix: Tensor | None = None, shift: Tensor | None = None,
                 scale: float = 1.0):
        self.inner, self.matrix, self.shift, self.scale = inner, matrix, shift, scale

    def __call__(self, x: Tensor) -> Tensor:
        s = self.inner(x)
        out = s if self.matrix is None else s @ self.matrix.to(s).T
        if self.scale != 1.0:
            out = self.scale * out
        if self.shift is not None:
            out = out + self.shift.to(s)
        return out


def make_case(case: Case):
    """Build ``(target, field, linear)`` for a case.

    ``linear`` is ``(M, b)`` when the target is Gaussian and the field is
    ``f(x) = -M (x - m) + b`` (for the closed-form stationary law), else None. The target
    and field evaluate on the inputs' device and dtype.
    """
    target = case_target(case.target)
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
        b = drift_vector(d)
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
        field, mat = GaussianMixture(wrong_weights(case), target.means, target.covariances).score, None
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


def seed_samples(target, seed: int, n: int, device: torch.device | str = "cpu") -> Tensor:
    """The (n, d) samples of a case's target tested under ``seed``, on ``device``.

    Drawn on the CPU from a generator seeded by ``seed`` alone (the same points in every
    run, tool and device), then moved.
    """
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1))
    return target.sample(n, generator=g, device="cpu").to(device)


def select_cases(patterns: str, names: Sequence[str]) -> list[str]:
    """The names matching any of the comma-separated glob ``patterns``, in ``names``' order."""
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [c for c in names if any(fnmatch.fnmatch(c, p) for p in pats)]
