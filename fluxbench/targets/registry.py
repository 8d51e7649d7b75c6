"""Name -> factory registry of targets, for configs and the command line.

Built-in names: ``gaussian``, ``standard_gaussian``, ``anisotropic_gaussian``,
``mixture``, ``ring``, ``eight_gaussians``, ``triangle``.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

from torch import Tensor

from .base import Target
from .gaussian import Gaussian
from .mixture import GaussianMixture
from .toys import anisotropic_gaussian, eight_gaussians, ring, standard_gaussian, triangle

__all__ = ["make_target", "list_targets", "register_target"]

TargetFactory = Callable[..., Target]

_REGISTRY: dict[str, TargetFactory] = {}


def register_target(name: str, factory: TargetFactory) -> None:
    """Register ``factory`` (keyword arguments -> :class:`Target`) under ``name``.

    Args:
        name: a non-empty string not yet registered.
        factory: callable; ``make_target(name, **kwargs)`` calls ``factory(**kwargs)``.

    Raises:
        ValueError: on an empty or duplicate name, or a non-callable factory.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"target name must be a non-empty string; got {name!r}")
    if not callable(factory):
        raise ValueError(f"factory for target {name!r} must be callable; got {type(factory).__name__}")
    if name in _REGISTRY:
        raise ValueError(f"target name {name!r} is already registered (to {_REGISTRY[name]!r})")
    _REGISTRY[name] = factory


def list_targets() -> list[str]:
    """The registered target names, sorted."""
    return sorted(_REGISTRY)


def make_target(name: str, **kwargs: object) -> Target:
    """Build the target registered under ``name`` from keyword arguments.

    Args:
        name: a name from :func:`list_targets`.
        **kwargs: the factory's keyword arguments, for example
            ``make_target("gaussian", dim=2, std=0.5)`` or
            ``make_target("ring", n_modes=6, radius=3.0)``.

    Returns:
        The :class:`Target`.

    Raises:
        ValueError: on an unknown name (the message lists the known names), on keyword
            arguments the factory does not take, or on invalid parameter values.
    """
    factory = _REGISTRY.get(name) if isinstance(name, str) else None
    if factory is None:
        raise ValueError(f"unknown target {name!r}; known targets: {', '.join(list_targets())}")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            raise ValueError(f"bad arguments for target {name!r}: {exc}; its factory takes {signature}") from exc
    target = factory(**kwargs)
    if not isinstance(target, Target):
        raise ValueError(f"factory for target {name!r} returned {type(target).__name__}, not a Target")
    return target


def _gaussian(dim: int, std: float = 1.0, mean: Tensor | Sequence[float] | None = None) -> Gaussian:
    """Isotropic N(mean, std^2 I_dim)."""
    return Gaussian.isotropic(dim, std=std, mean=mean)


def _mixture(
    weights: Tensor | Sequence[float],
    means: Tensor | Sequence[Sequence[float]],
    stds: Tensor | Sequence[float] | float | None = None,
    covariances: Tensor | None = None,
) -> GaussianMixture:
    """Gaussian mixture from isotropic ``stds`` or full ``covariances`` (exactly one)."""
    if (stds is None) == (covariances is None):
        raise ValueError("target 'mixture' needs exactly one of stds (isotropic) or covariances (full)")
    if stds is not None:
        return GaussianMixture.isotropic(weights, means, stds)
    return GaussianMixture(weights, means, covariances)


for _name, _factory in [
    ("gaussian", _gaussian),
    ("standard_gaussian", standard_gaussian),
    ("anisotropic_gaussian", anisotropic_gaussian),
    ("mixture", _mixture),
    ("ring", ring),
    ("eight_gaussians", eight_gaussians),
    ("triangle", triangle),
]:
    register_target(_name, _factory)
del _name, _factory
