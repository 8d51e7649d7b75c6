"""Fields: callables x -> f(x) on (N, d) points (SPEC section 1).

* :mod:`.base`: the field convention and :func:`at_sigma` for noise-conditioned models.
* :mod:`.mlp`: neural fields (:class:`MLPField`, :class:`ConservativeField`).
* :mod:`.rotational`: the stationary family f = s + A s + div A of SPEC eq. (4).
"""

from .base import Field, at_sigma, is_sigma_conditioned
from .mlp import ConservativeField, MLPField
from .rotational import (
    ConstantAntisymmetric,
    LearnedAntisymmetric,
    RotationalField,
    ScalarAntisymmetric,
    antisymmetric_basis,
)

__all__ = [
    "Field",
    "at_sigma",
    "is_sigma_conditioned",
    "MLPField",
    "ConservativeField",
    "RotationalField",
    "ConstantAntisymmetric",
    "ScalarAntisymmetric",
    "LearnedAntisymmetric",
    "antisymmetric_basis",
]
