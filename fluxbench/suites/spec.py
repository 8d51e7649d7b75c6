"""Suite files: TOML -> :class:`Suite`, validation, tiers, run enumeration and hashing.

A suite file ``suites/NAME.toml`` declares what to run (targets, objectives, models,
seeds), how (recipe, sampler, step sizes), at which budget (``[tiers.quick]``,
``[tiers.full]``) and what must hold (``[[claims]]``, evaluated by
:mod:`fluxbench.suites.claims`). Schema (every key is validated; an unknown or ill-typed
key is a ``ValueError`` naming the file and the key)::

    name = "gmm2d"                       # must equal the file's stem
    description = "..."
    kind = "sampling"                    # "sampling" | "long-rollout" | "estimator"
    targets = ["triangle", { name = "aniso-d8", target = "anisotropic_gaussian",
                             args = { dim = 8, condition_number = 100, seed = 8 }, step_size = 1e-3 }]
    objectives = ["flux", "dsm"]         # "exact" (the target's smoothed score), "flux", "dsm",
                                         # "rotational" (long-rollout: exact score + constant A)
    models = [{ name = "mlp", kind = "mlp", hidden = [128, 128] }]   # kind "mlp" | "rotational"
    sigma_eval = 0.02                    # noise level of the field that is sampled and tested
    recipe = { sigma_max = 2.0, ... }    # fluxbench.recipes.AnnealedRecipe fields (steps from the tier)
    sampler = { step_size = 0.01 }       # Langevin step (a target's own step_size wins)
    metrics = ["w2", "sliced_w2", "mmd", "stationarity"]
    [tiers.quick]                        # budgets; may also override targets/objectives/models/seeds
    steps = 2000
    seeds = 1                            # a count (seeds 0..n-1) or an explicit list
    [[claims]]                           # passed unchanged to fluxbench.suites.claims

``suite_hash`` is the first 12 hex digits of the sha256 of the file's bytes (plus the
overrides, when a test or a caller overrides a tier). A run's key is
``f"{target}/{objective}/{model}/seed{seed}"`` followed by ``/{extra}={value}`` for each
extra axis and ``/{tier}``, so that tiers never share a key.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .schema import (
    AXES,
    DEFAULTS,
    KINDS,
    METRICS,
    OBJECTIVES,
    POS_NUM,
    TIERS,
    TOP_KEYS,
    ModelSpec,
    TargetSpec,
    check_axis,
    check_recipe,
    check_tier,
    fmt_value,
    is_int,
    is_num,
    model_spec,
    spec_error,
    target_spec,
)

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "KINDS",
    "TIERS",
    "OBJECTIVES",
    "METRICS",
    "TargetSpec",
    "ModelSpec",
    "Run",
    "Suite",
    "load_suite",
    "list_suites",
    "find_suite",
    "shard_runs",
    "parse_shard",
]

@dataclass(frozen=True)
class Run:
    """One unit of work of a suite: a (target, objective, model, seed, extras) combination."""

    suite: str
    tier: str
    target: TargetSpec
    objective: str
    model: ModelSpec
    seed: int
    extras: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        """The stable run key (see the module docstring)."""
        parts = [self.target.name, self.objective, self.model.name, f"seed{self.seed}"]
        parts += [f"{k}={fmt_value(v)}" for k, v in self.extras]
        parts.append(self.tier)
        return "/".join(parts)

    def extra(self, name: str, default: Any = None) -> Any:
        return dict(self.extras).get(name, default)


@dataclass(frozen=True)
class Suite:
    """A validated suite file. Build with :func:`load_suite`.

    Attributes:
        name, description, kind: as in the file.
        path: the file.
        suite_hash: sha256 (first 12 hex) of the file's bytes and of any overrides.
        config: the top-level tables (targets, objectives, models, ... as parsed).
        tiers: tier name -> the tier's own table (before defaults).
        claims: the ``[[claims]]`` tables, unchanged.
    """

    name: str
    description: str
    kind: str
    path: Path
    suite_hash: str
    config: Mapping[str, Any]
    tiers: Mapping[str, Mapping[str, Any]]
    claims: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)

    def budget(self, tier: str) -> dict[str, Any]:
        """The tier's budget: the kind's defaults, updated by the tier's table (axes excluded)."""
        t = self._tier(tier)
        out = dict(DEFAULTS[self.kind])
        out.update({k: v for k, v in t.items() if k not in AXES})
        return out

    def targets(self, tier: str) -> list[TargetSpec]:
        return [target_spec(self.path, v, f"tiers.{tier}.targets" if "targets" in self._tier(tier) else "targets")
                for v in self._axis(tier, "targets")]

    def objectives(self, tier: str) -> list[str]:
        return list(self._axis(tier, "objectives"))

    def models(self, tier: str) -> list[ModelSpec]:
        return [model_spec(self.path, v, "models") for v in self._axis(tier, "models")]

    def seeds(self, tier: str) -> list[int]:
        v = self._axis(tier, "seeds")
        return list(range(v)) if is_int(v) else [int(s) for s in v]

    def runs(self, tier: str) -> list[Run]:
        """Every run of the tier, in a stable order (target, objective, model, seed, extras)."""
        runs = []
        for target in self.targets(tier):
            for objective in self.objectives(tier):
                for model in self._models_for(tier, objective):
                    for seed in self.seeds(tier):
                        for extras in self._extras(tier, objective):
                            runs.append(Run(self.name, tier, target, objective, model, seed, extras))
        keys = [r.key for r in runs]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"{self.path}: tier {tier!r} enumerates duplicate run keys {dupes}")
        return runs

    def with_overrides(self, tier: str, **overrides: Any) -> "Suite":
        """A copy whose tier ``tier`` is updated with ``overrides`` (validated; the hash changes).

        Used by tests and callers that shrink a budget: ``suite.with_overrides("quick", steps=10)``.
        """
        tiers = {k: dict(v) for k, v in self.tiers.items()}
        tiers.setdefault(tier, {}).update(overrides)
        check_tier(self.path, self.kind, tier, tiers[tier], self.config)
        blob = json.dumps({tier: overrides}, sort_keys=True, default=str).encode()
        digest = hashlib.sha256(self.suite_hash.encode() + blob).hexdigest()[:12]
        return replace(self, tiers=tiers, suite_hash=digest)

    # ------------------------------------------------------------------ helpers
    def _tier(self, tier: str) -> Mapping[str, Any]:
        if tier not in self.tiers:
            raise ValueError(f"{self.path}: suite {self.name!r} has no tier {tier!r}; tiers: {', '.join(self.tiers)}")
        return self.tiers[tier]

    def _axis(self, tier: str, key: str) -> Any:
        t = self._tier(tier)
        if key in t:
            return t[key]
        defaults = {"objectives": list(OBJECTIVES[self.kind][:1]), "models": [{}], "seeds": 1}
        return self.config.get(key, defaults.get(key))

    def _models_for(self, tier: str, objective: str) -> list[ModelSpec]:
        models = self.models(tier)
        if self.kind == "sampling" or objective in ("flux", "dsm"):
            return models
        # analytic fields (exact, rotational) have no network: the first model labels them
        return models[:1] if self.kind == "long-rollout" else models

    def _extras(self, tier: str, objective: str) -> list[tuple[tuple[str, Any], ...]]:
        b = self.budget(tier)
        if self.kind == "estimator":
            return [(("part", "snr"), ("sigma", s)) for s in b["snr_sigmas"]] + (
                [(("part", "bias"), ("sigma", s), ("B", n)) for s, n in b["bias"]] if objective == "flux" else []
            ) + ([(("part", "loss_mass"), ("sigma", s)) for s in b["loss_mass_sigmas"]] if objective == "flux" else [])
        if self.kind == "long-rollout":
            return [(("start", s),) for s in b["starts"]]
        return [()]


def _parse(path: Path, raw: dict[str, Any], data: bytes) -> Suite:
    for k in raw:
        if k not in TOP_KEYS:
            raise spec_error(path, k, f"unknown top-level key; known: {', '.join(sorted(TOP_KEYS))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise spec_error(path, "name", f"required, a non-empty string; got {name!r}")
    if name != path.stem:
        raise spec_error(path, "name", f"must equal the file's stem {path.stem!r}; got {name!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise spec_error(path, "description", f"must be a string; got {description!r}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise spec_error(path, "kind", f"required, one of {', '.join(KINDS)}; got {kind!r}")
    if "targets" not in raw:
        raise spec_error(path, "targets", "required: a non-empty list of targets")
    for axis in AXES:
        if axis in raw:
            check_axis(path, kind, axis, axis, raw[axis])
    if "rotation" in raw and (not is_num(raw["rotation"]) or kind != "long-rollout"):
        raise spec_error(path, "rotation", f"a number, for long-rollout suites only (A = a J of the 'rotational' field); got {raw['rotation']!r}")
    if "sigma_eval" in raw and not POS_NUM[1](raw["sigma_eval"]):
        raise spec_error(path, "sigma_eval", f"must be a positive number; got {raw['sigma_eval']!r}")
    if "recipe" in raw:
        check_recipe(path, raw["recipe"])
    sampler = raw.get("sampler", {})
    if not isinstance(sampler, dict) or set(sampler) - {"step_size"}:
        raise spec_error(path, "sampler", f"must be a table with a step_size; got {sampler!r}")
    if "step_size" in sampler and not POS_NUM[1](sampler["step_size"]):
        raise spec_error(path, "sampler.step_size", f"must be a positive number; got {sampler['step_size']!r}")
    metrics = raw.get("metrics", [])
    if not isinstance(metrics, list) or any(m not in METRICS for m in metrics):
        raise spec_error(path, "metrics", f"must be a list drawn from {', '.join(METRICS)}; got {metrics!r}")
    for k in ("starts", "estimator"):
        if k in raw:
            raise spec_error(path, k, f"belongs in a tier table ([tiers.quick] {k} = ...)")
    tiers = raw.get("tiers")
    if not isinstance(tiers, dict) or not tiers:
        raise spec_error(path, "tiers", "required: [tiers.quick] and [tiers.full] tables")
    for t in tiers:
        if t not in TIERS:
            raise spec_error(path, f"tiers.{t}", f"unknown tier; tiers are {', '.join(TIERS)}")
    for t in TIERS:
        if t not in tiers:
            raise spec_error(path, f"tiers.{t}", "missing: every suite has a quick and a full tier")
        check_tier(path, kind, t, tiers[t], raw)
    claims = raw.get("claims", [])
    if not isinstance(claims, list) or any(not isinstance(c, dict) for c in claims):
        raise spec_error(path, "claims", "must be an array of tables ([[claims]])")
    ids = [c.get("id") for c in claims]
    for i, cid in enumerate(ids):
        if not isinstance(cid, str) or not cid:
            raise spec_error(path, f"claims[{i}].id", f"every claim needs a non-empty string id; got {cid!r}")
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        raise spec_error(path, "claims", f"duplicate claim ids {dupes}")
    suite = Suite(
        name=name,
        description=description,
        kind=kind,
        path=path,
        suite_hash=hashlib.sha256(data).hexdigest()[:12],
        config={k: v for k, v in raw.items() if k not in ("tiers", "claims")},
        tiers={k: dict(v) for k, v in tiers.items()},
        claims=tuple(claims),
    )
    _check_claims(suite)
    for t in TIERS:
        suite.runs(t)  # duplicate keys, bad axes
    return suite


def _check_claims(suite: Suite) -> None:
    """Validate the claims with H2's parser when it is importable (names the file)."""
    try:
        from fluxbench.suites import claims as claims_mod
    except ImportError:  # pragma: no cover
        return
    parse = getattr(claims_mod, "parse_claims", None) or getattr(claims_mod, "parse", None)
    if parse is None:
        return
    try:
        parse(list(suite.claims))
    except ValueError as exc:
        raise ValueError(f"{suite.path}: key 'claims': {exc}") from exc


def load_suite(path: str | os.PathLike) -> Suite:
    """Read and validate a suite file.

    Args:
        path: a ``.toml`` suite file.

    Returns:
        The :class:`Suite`.

    Raises:
        ValueError: a missing or unreadable file, a TOML syntax error, or an invalid key
            (the message names the file and the key).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the suite file: {exc.strerror or exc}") from exc
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    return _parse(path, raw, data)


def list_suites(directory: str | os.PathLike = "suites") -> list[Suite]:
    """Every ``*.toml`` suite in ``directory``, validated, sorted by name.

    Raises:
        ValueError: if the directory does not exist or a file is invalid.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"suites directory {str(d)!r} does not exist (pass --suites-dir)")
    return [load_suite(p) for p in sorted(d.glob("*.toml"))]


def find_suite(name: str, directory: str | os.PathLike = "suites") -> Suite:
    """The suite called ``name`` (``directory/name.toml``), or a path to a suite file."""
    p = Path(name)
    if p.suffix == ".toml" and p.is_file():
        return load_suite(p)
    candidate = Path(directory) / f"{name}.toml"
    if not candidate.is_file():
        known = [s.stem for s in sorted(Path(directory).glob("*.toml"))] if Path(directory).is_dir() else []
        raise ValueError(f"no suite {name!r} in {str(directory)!r}; known suites: {', '.join(known) or 'none'}")
    return load_suite(candidate)


def parse_shard(text: str | Sequence[int] | None) -> tuple[int, int]:
    """``"i/n"`` (1-based, 1 <= i <= n) -> (i, n); None -> (1, 1).

    Raises:
        ValueError: on anything else.
    """
    if text is None:
        return (1, 1)
    if isinstance(text, str):
        try:
            a, b = text.split("/")
            i, n = int(a), int(b)
        except ValueError:
            raise ValueError(f"shard must look like i/n (e.g. 2/4); got {text!r}") from None
    else:
        try:
            i, n = (int(v) for v in text)
        except (TypeError, ValueError):
            raise ValueError(f"shard must be a pair (i, n); got {text!r}") from None
    if n < 1 or not 1 <= i <= n:
        raise ValueError(f"shard i/n needs 1 <= i <= n; got {i}/{n}")
    return i, n


def shard_runs(runs: Sequence[Run], shard: tuple[int, int] | str | None) -> list[Run]:
    """The runs of shard i of n: every n-th run starting at the (i-1)-th (round-robin).

    The n shards partition the runs: each run is in exactly one shard.
    """
    i, n = parse_shard(shard)
    return [r for k, r in enumerate(runs) if k % n == i - 1]
