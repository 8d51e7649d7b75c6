"""Standard toy targets: Gaussians and 2-D Gaussian mixtures (SPEC sections 4 and 6).

Every factory returns a :class:`~fluxbench.targets.Gaussian` or
:class:`~fluxbench.targets.GaussianMixture`, so densities, scores and smoothings are exact.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .._checks import check_positive, check_positive_int
from .._random import generator_from_seed
from ._linalg import as_float64
from .gaussian import Gaussian
from .mixture import GaussianMixture

__all__ = ["ring", "eight_gaussians", "triangle", "anisotropic_gaussian", "standard_gaussian"]

#: Component std of the SPEC section 6 three-mode mixture: sqrt(0.65^2 + 0.45^2).
TRIANGLE_STD = math.sqrt(0.65**2 + 0.45**2)


def _circle_mixture(angles_deg: Sequence[float], radius: float, std: float) -> GaussianMixture:
    angles = torch.tensor([math.radians(a) for a in angles_deg], dtype=torch.float64)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    weights = torch.full((len(angles_deg),), 1.0 / len(angles_deg), dtype=torch.float64)
    return GaussianMixture.isotropic(weights, means, std)


def ring(n_modes: int = 8, radius: float = 2.0, std: float = 0.2) -> GaussianMixture:
    """Equal-weight isotropic modes evenly spaced on a circle in R^2.

    p(x) = (1/n) sum_{k=0}^{n-1} N(x; radius (cos t_k, sin t_k), std^2 I), t_k = 2 pi k / n.

    Args:
        n_modes: number of modes n >= 1 (mode 0 sits on the positive x-axis).
        radius: distance of every mode centre from the origin, > 0.
        std: per-coordinate standard deviation of every mode, > 0.

    Returns:
        A 2-D :class:`GaussianMixture` with K = n_modes.
    """
    n_modes = check_positive_int(n_modes, "n_modes")
    radius = check_positive(radius, "radius")
    std = check_positive(std, "std")
    return _circle_mixture([360.0 * k / n_modes for k in range(n_modes)], radius, std)


def eight_gaussians(radius: float = 2.0, std: float = 0.2) -> GaussianMixture:
    """The usual "8 Gaussians" toy: equal-weight modes at angles k * 45 degrees, k = 0..7.

    Args:
        radius: distance of every mode centre from the origin, > 0.
        std: per-coordinate standard deviation of every mode, > 0.

    Returns:
        A 2-D :class:`GaussianMixture` with K = 8 (same as ``ring(8, radius, std)``).
    """
    return ring(8, radius=radius, std=std)


def triangle(radius: float = 2.3, std: float = TRIANGLE_STD) -> GaussianMixture:
    """The three-mode mixture of SPEC section 6 ("controllable 2-D fields").

    Equal weights, centres at ``radius`` and angles 90, 210, 330 degrees, isotropic
    component std sqrt(0.65^2 + 0.45^2) ~= 0.7906 by default.

    Args:
        radius: distance of every centre from the origin, > 0 (SPEC: 2.3).
        std: per-coordinate component standard deviation, > 0.

    Returns:
        A 2-D :class:`GaussianMixture` with K = 3.
    """
    radius = check_positive(radius, "radius")
    std = check_positive(std, "std")
    return _circle_mixture([90.0, 210.0, 330.0], radius, std)


def standard_gaussian(dim: int) -> Gaussian:
    """N(0, I_d).

    Args:
        dim: d >= 1.

    Returns:
        The standard Gaussian in R^d.
    """
    return Gaussian.isotropic(dim)


def anisotropic_gaussian(
    dim: int,
    condition_number: float = 10.0,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    mean: Tensor | Sequence[float] | None = None,
) -> Gaussian:
    """A randomly rotated Gaussian with a prescribed covariance condition number.

    Sigma = Q diag(lambda) Q^T with Q Haar-distributed on O(d) (QR of a Gaussian matrix,
    signs fixed by diag R) and lambda_i = kappa^(-i / (d - 1)), i = 0..d-1: log-spaced
    from 1 down to 1/kappa, so lambda_max / lambda_min = kappa exactly (up to rounding)
    and the largest variance is 1. For such targets the reversible Langevin spectral gap
    is lambda_min(Sigma^-1) = 1 and the best non-reversible speed-up is
    mean(1/lambda) (SPEC section 4, "Mixing rate").

    Args:
        dim: d >= 1.
        condition_number: kappa >= 1 (must be 1 when d = 1).
        seed: seed of the rotation draw; default 0 when no generator is given.
        generator: draw the rotation from this generator instead (consumes d^2
            normals); give either ``seed`` or ``generator``, not both.
        mean: shape (d,); default the origin.

    Returns:
        The :class:`Gaussian`, stored in float64 on cpu.

    Raises:
        ValueError: on kappa < 1, kappa != 1 with d = 1, or both seed and generator.
    """
    dim = check_positive_int(dim, "dim")
    kappa = check_positive(condition_number, "condition_number")
    if kappa < 1:
        raise ValueError(f"condition_number must be >= 1; got {kappa}")
    if dim == 1 and kappa != 1:
        raise ValueError(f"condition_number must be 1 when dim = 1 (one eigenvalue); got {kappa}")
    if generator is not None and seed is not None:
        raise ValueError("give either seed or generator to anisotropic_gaussian, not both")
    if generator is None:
        generator = generator_from_seed(0 if seed is None else seed)
    elif not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    g = torch.randn((dim, dim), generator=generator, dtype=torch.float64, device=generator.device).cpu()
    q, r = torch.linalg.qr(g)
    # Without the sign fix QR's convention biases Q; with it Q is Haar-distributed.
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    q = q * signs
    exponents = torch.zeros(1, dtype=torch.float64) if dim == 1 else torch.linspace(0.0, 1.0, dim, dtype=torch.float64)
    eigenvalues = kappa ** (-exponents)
    cov = (q * eigenvalues) @ q.transpose(0, 1)
    cov = 0.5 * (cov + cov.transpose(0, 1))
    m = torch.zeros(dim, dtype=torch.float64) if mean is None else as_float64(mean, "mean").cpu()
    if m.shape != (dim,):
        raise ValueError(f"mean must have shape (dim,) = ({dim},); got shape {tuple(m.shape)}")
    return Gaussian(m, cov)
