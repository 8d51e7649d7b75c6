"""The schema of suite files: keys, types, defaults per kind, and the checks that name file and key.

Used by :mod:`fluxbench.suites.spec`; every check raises ``ValueError("<file>: key '<key>': <problem>")``.

Tier (budget) keys by kind (defaults in :data:`DEFAULTS`); every tier may also override the
axes ``targets``, ``objectives``, ``models``, ``seeds``:

* sampling: ``steps`` (training steps), ``batch_size``, ``n_samples`` (sampled points),
  ``rollout_steps`` and ``per_decade`` (log-spaced checkpoints) or explicit ``checkpoints``,
  ``stationarity_n`` (reference points of the test), ``stationarity_bootstrap``,
  ``n_permutations`` (MMD), ``floor_repeats`` (exact samples averaged into each noise floor),
  ``w2_max`` (points in the exact W2), ``equal_wallclock`` (flux runs also train DSM for
  flux's time), ``sample_levels`` (annealed sampler), ``artifacts_grid`` (G x G field values
  of 2-D runs; 0: none);
* long-rollout: ``steps`` (training of fitted fields), ``particles``, ``n_eval`` (particles
  scored), ``rollout_steps``, ``per_decade`` / ``checkpoints``, ``trace_chains`` and
  ``trace_every`` (the IAT trace), ``starts`` (``["data", "far"]``), ``far_std``,
  ``floor_band`` (noise-floor standard deviations of the time-to-floor band), ``floor_repeats``;
* estimator: ``n_draws`` (SNR and loss-mass draws), ``n_batches`` (c* batches at B = 256,
  scaled by 256 / B), ``batch_size``, ``snr_sigmas``, ``bias`` ([sigma, B] pairs),
  ``loss_mass_sigmas``, ``loss_mass_batch``, ``hidden`` (the fresh MLP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "KINDS", "TIERS", "OBJECTIVES", "METRICS", "MODEL_KINDS", "TOP_KEYS", "AXES", "BUDGET", "DEFAULTS",
    "TargetSpec", "ModelSpec", "spec_error", "target_spec", "model_spec", "check_unique", "check_axis", "check_tier",
    "check_recipe", "freeze", "thaw", "fmt_value", "is_int", "is_num", "POS_NUM",
]  # fmt: skip

KINDS = ("sampling", "long-rollout", "estimator")
TIERS = ("quick", "full")
OBJECTIVES = {
    "sampling": ("exact", "flux", "dsm"),
    "long-rollout": ("exact", "rotational", "flux", "dsm"),
    "estimator": ("flux", "dsm"),
}
METRICS = ("w2", "sliced_w2", "mmd", "stationarity", "field_rel_l2", "gauss_w2", "rotation_coef")
MODEL_KINDS = ("mlp", "rotational")

TOP_KEYS = {
    "name", "description", "kind", "targets", "objectives", "models", "sigma_eval", "recipe",
    "sampler", "metrics", "tiers", "claims", "starts", "estimator", "rotation",
}
# tier keys: name -> (type description, checker)
AXES = ("targets", "objectives", "models", "seeds")


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: object) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(float(v))


_POS_INT = ("a positive integer", lambda v: is_int(v) and v >= 1)
_NONNEG_INT = ("a non-negative integer", lambda v: is_int(v) and v >= 0)
POS_NUM = ("a positive number", lambda v: is_num(v) and v > 0)
_BOOL = ("true or false", lambda v: isinstance(v, bool))
_NUM_LIST = ("a non-empty list of positive numbers", lambda v: isinstance(v, list) and v and all(is_num(x) and x > 0 for x in v))
_PAIRS = (
    "a non-empty list of [sigma, batch_size] pairs",
    lambda v: isinstance(v, list) and v and all(
        isinstance(p, list) and len(p) == 2 and is_num(p[0]) and p[0] > 0 and is_int(p[1]) and p[1] >= 2 for p in v
    ),
)
_CHECKPOINTS = (
    "a non-empty list of non-negative integer steps",
    lambda v: isinstance(v, list) and v and all(is_int(c) and c >= 0 for c in v),
)
_STARTS = ("a non-empty list of \"data\" / \"far\"", lambda v: isinstance(v, list) and v and all(s in ("data", "far") for s in v))

BUDGET: dict[str, dict[str, tuple[str, Any]]] = {
    "sampling": {
        "steps": _POS_INT, "batch_size": _POS_INT, "n_samples": _POS_INT, "rollout_steps": _NONNEG_INT,
        "per_decade": _POS_INT, "stationarity_n": _POS_INT, "n_permutations": _POS_INT, "artifacts_grid": _NONNEG_INT,
        "equal_wallclock": _BOOL, "sample_levels": _POS_INT, "w2_max": _POS_INT, "floor_repeats": _POS_INT,
        "checkpoints": _CHECKPOINTS, "stationarity_bootstrap": _POS_INT,
    },
    "long-rollout": {
        "steps": _POS_INT, "batch_size": _POS_INT, "particles": _POS_INT, "rollout_steps": _POS_INT,
        "per_decade": _POS_INT, "n_eval": _POS_INT, "trace_every": _POS_INT, "n_permutations": _POS_INT,
        "starts": _STARTS, "far_std": POS_NUM, "floor_band": ("a non-negative number", lambda v: is_num(v) and v >= 0),
        "trace_chains": _POS_INT, "floor_repeats": _POS_INT, "checkpoints": _CHECKPOINTS,
    },
    "estimator": {
        "n_draws": _POS_INT, "n_batches": _POS_INT, "batch_size": _POS_INT, "snr_sigmas": _NUM_LIST,
        "bias": _PAIRS, "loss_mass_sigmas": _NUM_LIST, "loss_mass_batch": _POS_INT, "hidden": None,
    },
}
BUDGET["estimator"]["hidden"] = ("a list of positive integers", lambda v: isinstance(v, list) and v and all(is_int(h) and h >= 1 for h in v))
DEFAULTS: dict[str, dict[str, Any]] = {
    "sampling": {
        "steps": 2000, "batch_size": 256, "n_samples": 1000, "rollout_steps": 1000, "per_decade": 1,
        "stationarity_n": 1000, "n_permutations": 200, "artifacts_grid": 0, "equal_wallclock": False, "w2_max": 2000,
        "floor_repeats": 3,
    },
    "long-rollout": {
        "steps": 2000, "batch_size": 256, "particles": 1000, "rollout_steps": 10_000, "per_decade": 2, "n_eval": 1000,
        "trace_every": 1, "n_permutations": 200, "starts": ["data", "far"], "far_std": 5.0, "floor_band": 3.0,
        "trace_chains": 256, "floor_repeats": 5,
    },
    "estimator": {
        "n_draws": 64, "n_batches": 64, "batch_size": 256, "snr_sigmas": [0.1, 0.3, 1.0],
        "bias": [[0.1, 256], [0.3, 64], [0.3, 256], [0.3, 1024]], "loss_mass_sigmas": [0.1], "loss_mass_batch": 256,
        "hidden": [128, 128],
    },
}


def spec_error(path: Path | str, key: str, problem: str) -> ValueError:
    return ValueError(f"{path}: key {key!r}: {problem}")


@dataclass(frozen=True)
class TargetSpec:
    """One target of a suite.

    Attributes:
        name: the label used in run keys and the records' ``target`` column.
        factory: a name in :func:`fluxbench.targets.list_targets`.
        args: keyword arguments of the factory.
        step_size: the Langevin step of this target (None: the suite's sampler default).
        rotation: the rotation a of rotational models on this target (None: the model's).
    """

    name: str
    factory: str
    args: tuple[tuple[str, Any], ...] = ()
    step_size: float | None = None
    rotation: float | None = None

    def build(self):
        """The :class:`fluxbench.targets.Target` (float64, cpu): ``make_target(factory, **args)``."""
        from fluxbench.targets import make_target

        return make_target(self.factory, **thaw(dict(self.args)))


@dataclass(frozen=True)
class ModelSpec:
    """The network of a trained run.

    Attributes:
        name: label in run keys and the records' ``model`` column.
        kind: ``"mlp"`` (a sigma-conditioned MLP) or ``"rotational"``
            (f(x, sigma) = (I + A) g_theta(x, sigma), constant antisymmetric A, SPEC eq. (4)).
        hidden: hidden widths of the MLP.
        rotation: a for A = a J, J the block-diagonal 90-degree rotation (rotational only).
    """

    name: str = "mlp"
    kind: str = "mlp"
    hidden: tuple[int, ...] = (128, 128)
    rotation: float = 0.0


def fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, freeze(x)) for k, x in v.items()))
    if isinstance(v, list):
        return ("__list__", tuple(freeze(x) for x in v))
    return v


def thaw(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: thaw(x) for k, x in v.items()}
    if isinstance(v, tuple) and len(v) == 2 and v[0] == "__list__":
        return [thaw(x) for x in v[1]]
    if isinstance(v, tuple) and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in v):
        return {k: thaw(x) for k, x in v}
    return v


def target_spec(path: Path, v: Any, key: str) -> TargetSpec:
    from fluxbench.targets import list_targets

    if isinstance(v, str):
        v = {"name": v, "target": v}
    if not isinstance(v, dict):
        raise spec_error(path, key, f"a target is a name or a table {{name, target, args, step_size, rotation}}; got {v!r}")
    unknown = set(v) - {"name", "target", "args", "step_size", "rotation"}
    if unknown:
        raise spec_error(path, f"{key}.{sorted(unknown)[0]}",
                   "unknown key in a target table (known: name, target, args, step_size, rotation)")
    name = v.get("name", v.get("target"))
    factory = v.get("target", name)
    if not isinstance(name, str) or not name or "/" in name:
        raise spec_error(path, f"{key}.name", f"must be a non-empty string without '/'; got {name!r}")
    if factory not in list_targets():
        raise spec_error(path, f"{key}.target", f"unknown target {factory!r}; known: {', '.join(list_targets())}")
    args = v.get("args", {})
    if not isinstance(args, dict):
        raise spec_error(path, f"{key}.args", f"must be a table of the factory's keyword arguments; got {args!r}")
    step = v.get("step_size")
    if step is not None and not POS_NUM[1](step):
        raise spec_error(path, f"{key}.step_size", f"must be a positive number; got {step!r}")
    rot = v.get("rotation")
    if rot is not None and (not is_num(rot) or rot == 0):
        raise spec_error(path, f"{key}.rotation", f"must be a non-zero number; got {rot!r}")
    return TargetSpec(name, factory, freeze(args), None if step is None else float(step),
                      None if rot is None else float(rot))


def model_spec(path: Path, v: Any, key: str) -> ModelSpec:
    if isinstance(v, str):
        v = {"name": v, "kind": v}
    if not isinstance(v, dict):
        raise spec_error(path, key, f"a model is a name or a table {{name, kind, hidden, rotation}}; got {v!r}")
    unknown = set(v) - {"name", "kind", "hidden", "rotation"}
    if unknown:
        raise spec_error(path, f"{key}.{sorted(unknown)[0]}", "unknown key in a model table (known: name, kind, hidden, rotation)")
    kind = v.get("kind", "mlp")
    if kind not in MODEL_KINDS:
        raise spec_error(path, f"{key}.kind", f"must be one of {', '.join(MODEL_KINDS)}; got {kind!r}")
    name = v.get("name", kind)
    if not isinstance(name, str) or not name or "/" in name:
        raise spec_error(path, f"{key}.name", f"must be a non-empty string without '/'; got {name!r}")
    hidden = v.get("hidden", [128, 128])
    if not (isinstance(hidden, list) and hidden and all(is_int(h) and h >= 1 for h in hidden)):
        raise spec_error(path, f"{key}.hidden", f"must be a non-empty list of positive integers; got {hidden!r}")
    rotation = v.get("rotation", 0.0)
    if not is_num(rotation):
        raise spec_error(path, f"{key}.rotation", f"must be a number; got {rotation!r}")
    if kind == "rotational" and rotation == 0:
        raise spec_error(path, f"{key}.rotation", "a rotational model needs a non-zero rotation a (A = a J)")
    return ModelSpec(name, kind, tuple(hidden), float(rotation))


def check_unique(path: Path, key: str, what: str, names: list) -> None:
    """Refuse a list with a repeated entry (the runs of a suite are keyed by these names)."""
    if len(set(names)) != len(names):
        raise spec_error(path, key, f"{what} must be unique; got {names!r}")


def check_axis(path: Path, kind: str, key: str, name: str, value: Any) -> None:
    if name == "targets":
        if not isinstance(value, list) or not value:
            raise spec_error(path, key, f"must be a non-empty list of targets; got {value!r}")
        check_unique(path, key, "target names", [target_spec(path, v, key).name for v in value])
    elif name == "objectives":
        if not isinstance(value, list) or not value or any(o not in OBJECTIVES[kind] for o in value):
            raise spec_error(path, key, f"must be a non-empty list drawn from {', '.join(OBJECTIVES[kind])} (kind {kind!r}); got {value!r}")
        check_unique(path, key, "objectives", value)
    elif name == "models":
        if not isinstance(value, list) or not value:
            raise spec_error(path, key, f"must be a non-empty list of model tables; got {value!r}")
        check_unique(path, key, "model names", [model_spec(path, v, key).name for v in value])
    elif name == "seeds":
        ok = (is_int(value) and value >= 1) or (
            isinstance(value, list) and value and all(is_int(s) and s >= 0 for s in value) and len(set(value)) == len(value)
        )
        if not ok:
            raise spec_error(path, key, f"must be a count >= 1 or a list of distinct non-negative integers; got {value!r}")


def check_tier(path: Path, kind: str, tier: str, table: Any, config: Mapping[str, Any]) -> None:
    if not isinstance(table, dict):
        raise spec_error(path, f"tiers.{tier}", f"must be a table; got {table!r}")
    budget = BUDGET[kind]
    for k, v in table.items():
        key = f"tiers.{tier}.{k}"
        if k in AXES:
            check_axis(path, kind, key, k, v)
        elif k in budget:
            what, ok = budget[k]
            if not ok(v):
                raise spec_error(path, key, f"must be {what}; got {v!r}")
        else:
            known = sorted(list(budget) + list(AXES))
            raise spec_error(path, key, f"unknown tier key for a {kind!r} suite; known: {', '.join(known)}")


def check_recipe(path: Path, recipe: Any) -> None:
    if not isinstance(recipe, dict):
        raise spec_error(path, "recipe", f"must be a table of recipe fields; got {recipe!r}")
    try:
        import dataclasses

        from fluxbench.recipes import AnnealedRecipe
    except ImportError:  # pragma: no cover - recipes not importable: checked when a run fits
        return
    known = {f.name for f in dataclasses.fields(AnnealedRecipe)}
    for k in recipe:
        if k not in known:
            raise spec_error(path, f"recipe.{k}", f"not a field of AnnealedRecipe; fields: {', '.join(sorted(known))}")
        if k == "steps":
            raise spec_error(path, "recipe.steps", "the training budget belongs in the tiers: [tiers.quick] steps = ...")


