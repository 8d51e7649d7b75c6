"""Analytic targets with exact samples, density, score and Gaussian smoothing (SPEC section 4).

``Gaussian`` and ``GaussianMixture`` implement the :class:`Target` protocol; ``toys``
builds the standard 2-D mixtures and anisotropic Gaussians; ``registry`` maps names to
factories (``make_target("ring", n_modes=8)``).
"""

from .base import Target
from .gaussian import Gaussian
from .mixture import GaussianMixture
from .registry import list_targets, make_target, register_target
from .toys import TRIANGLE_STD, anisotropic_gaussian, eight_gaussians, ring, standard_gaussian, triangle

__all__ = [
    "Target",
    "Gaussian",
    "GaussianMixture",
    "ring",
    "eight_gaussians",
    "triangle",
    "anisotropic_gaussian",
    "standard_gaussian",
    "TRIANGLE_STD",
    "make_target",
    "list_targets",
    "register_target",
]
