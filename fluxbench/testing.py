"""pytest helpers: gate your own fields with fluxbench's checks (like scikit-learn's ``parametrize_with_checks``).

Example (a test module in *your* project)::

    import torch
    from fluxbench.fields import RotationalField
    from fluxbench.targets import Gaussian
    from fluxbench.testing import parametrize_with_checks

    p = Gaussian.isotropic(2)
    A = torch.tensor([[0.0, -1.0], [1.0, 0.0]])

    @parametrize_with_checks([("score", p.score, p), ("rotational", RotationalField(p.score, A), p)])
    def test_my_fields(field, target, check):
        check(field, target)

pytest then collects one test per (case, check), with ids such as
``test_my_fields[rotational-ksd_stationarity]``; a failing check raises ``AssertionError``
with the value, the threshold and what was measured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from fluxbench.verify.checks import CHECKS, run_check

__all__ = ["parametrize_with_checks", "FieldCheck"]


class FieldCheck:
    """One check of the battery as a callable ``check(field, target)`` that raises on failure.

    Attributes:
        name: the check's name (a key of :data:`fluxbench.verify.CHECKS`).
        options: the options passed to :func:`fluxbench.verify.check_field`.
    """

    def __init__(self, name: str, **options: Any):
        if name not in CHECKS:
            raise ValueError(f"unknown check {name!r}; known: {', '.join(CHECKS)}")
        self.name = name
        self.options = options

    def __call__(self, field: Callable, target: object) -> dict[str, Any]:
        """Run the check; return its row, raise ``AssertionError`` if it fails, and skip
        the pytest test (``pytest.skip``) if it does not apply to this target."""
        row = run_check(self.name, field, target, **self.options)
        if row["status"] == "skipped":
            import pytest

            pytest.skip(f"check {self.name!r}: {row['detail']}")
        return row

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"FieldCheck({self.name!r}{opts})"


def _normalise_cases(cases: object) -> list[tuple[str, Callable, object]]:
    if isinstance(cases, Mapping):
        items = []
        for name, value in cases.items():
            if not isinstance(value, Sequence) or len(value) != 2:
                raise ValueError(f"cases[{name!r}] must be a (field, target) pair; got {value!r}")
            items.append((str(name), value[0], value[1]))
    elif isinstance(cases, Iterable) and not isinstance(cases, (str, bytes)):
        items = []
        for i, value in enumerate(cases):
            if not isinstance(value, Sequence) or len(value) != 3:
                raise ValueError(f"cases[{i}] must be a (name, field, target) triple; got {value!r}")
            items.append((str(value[0]), value[1], value[2]))
    else:
        raise ValueError(f"cases must be a list of (name, field, target) or a dict name -> (field, target); got {cases!r}")
    if not items:
        raise ValueError("cases is empty")
    names = [n for n, _, _ in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"case names must be unique; repeated: {', '.join(dup)}")
    for name, field, _ in items:
        if not callable(field):
            raise ValueError(f"the field of case {name!r} is not callable")
    return items


def parametrize_with_checks(
    cases: Sequence[tuple[str, Callable, object]] | Mapping[str, tuple[Callable, object]],
    *,
    checks: Sequence[str] | None = None,
    **options: Any,
):
    """A ``pytest.mark.parametrize`` decorator over every (case, check) pair.

    The decorated test takes the arguments ``field``, ``target`` and ``check`` and calls
    ``check(field, target)``; each check is one row of :func:`fluxbench.verify.check_field`
    (output contract, determinism, batch independence, defect, KSD and rollout
    stationarity tests) and raises ``AssertionError`` with a clear message on failure.
    Test ids are ``"{case}-{check}"``.

    Example::

        from fluxbench.targets import Gaussian
        from fluxbench.testing import parametrize_with_checks

        p = Gaussian.isotropic(2)
        model = ...  # your trained field, a callable (N, 2) -> (N, 2)

        @parametrize_with_checks([("my_model", model, p)], n=2000, alpha=0.01)
        def test_my_fields(field, target, check):
            check(field, target)

    Args:
        cases: a list of ``(name, field, target)`` or a dict ``name -> (field, target)``;
            ``target`` is a :class:`fluxbench.targets.Target` (or an (N, d) tensor of samples:
            the defect check is then skipped).
        checks: names of the checks to parametrise over (default all of
            :data:`fluxbench.verify.CHECKS`).
        **options: options of :func:`fluxbench.verify.check_field` (``n``, ``alpha``,
            ``seed``, ``defect_tol``, ...), validated now.

    Returns:
        The ``pytest.mark.parametrize("field, target, check", ...)`` decorator.

    Raises:
        ValueError: malformed cases, an unknown check or option.
    """
    import pytest

    from fluxbench.verify.checks import resolve_options

    resolve_options(options)  # fail at collection time on a bad option
    items = _normalise_cases(cases)
    names = list(CHECKS) if checks is None else list(checks)
    unknown = [c for c in names if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    params = []
    for case_name, field, target in items:
        for check_name in names:
            params.append(
                pytest.param(field, target, FieldCheck(check_name, **options), id=f"{case_name}-{check_name}")
            )
    return pytest.mark.parametrize("field, target, check", params)
