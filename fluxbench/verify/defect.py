"""The stationarity defect r = div u + u . s and the current divergence div(p u) (SPEC eq. (3)).

These need the score (or log density) of the target: they are the analytic checks, next to
the sample-based tests of :mod:`fluxbench.verify.stationarity`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fluxbench._checks import check_field_output, check_generator, check_points, check_positive_int
from fluxbench.divergence import divergence as _divergence

__all__ = ["defect", "current_divergence"]


def defect(
    field: Callable[[Tensor], Tensor],
    score: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    divergence: str = "exact",
    generator: torch.Generator | None = None,
    n_probes: int = 1,
) -> Tensor:
    """Stationarity defect ``r(x) = div u(x) + u(x) . s(x)``, ``u = f - s`` (SPEC eq. (3)).

    p is stationary for f iff r = 0 p-almost everywhere; every field of SPEC eq. (4)
    (``s + A s + div A``) has r = 0 exactly. The divergence of u is taken by
    :func:`fluxbench.divergence.divergence` through autograd (f and s must be
    differentiable in x; ``s`` is differentiated too, so pass an exact score such as
    ``target.score``):

    * ``"exact"``: d reverse passes, exact to round-off (use for d <= ~10);
    * ``"hutchinson"``: ``eps^T (J_u) eps`` with Rademacher eps (SPEC section 4), averaged over
      ``n_probes`` independent probes drawn from ``generator`` (evaluated in one batched
      pass over the rows repeated ``n_probes`` times); unbiased for r, with variance
      ``2 (||sym J_u||_F^2 - sum_i (J_u)_ii^2) / n_probes``.

    Args:
        field: f, (N, d) -> (N, d).
        score: s = grad log p, (N, d) -> (N, d).
        x: (N, d) points.
        divergence: ``"exact"`` or ``"hutchinson"``.
        generator: random source of the Hutchinson probes.
        n_probes: probes per point (Hutchinson only), >= 1.

    Returns:
        (N,) tensor r(x), detached, in x's dtype.

    Raises:
        ValueError: bad points, an unknown divergence method, or a field/score output of the
            wrong shape, dtype or device.
    """
    x = check_points(x, "x")
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence must be 'exact' or 'hutchinson'; got {divergence!r}")
    n_probes = check_positive_int(n_probes, "n_probes")
    check_generator(generator, x.device)

    def u(z: Tensor) -> Tensor:
        return check_field_output(field(z), z, "field") - check_field_output(score(z), z, "score")

    x = x.detach()
    if divergence == "exact":
        div = _divergence(u, x, method="exact")
    else:
        # all probes in one pass: the rows are repeated n_probes times (the field is pointwise)
        n = x.shape[0]
        rep = x.repeat(n_probes, 1)
        div = _divergence(u, rep, method="hutchinson", generator=generator).reshape(n_probes, n).mean(0)
    with torch.no_grad():
        s = score(x)
        uu = field(x) - s
        return (div.detach() + (uu * s).sum(1)).detach()


def current_divergence(
    field: Callable[[Tensor], Tensor],
    log_prob: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    divergence: str = "exact",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``div(p u)(x) = p(x) r(x)`` with u = f - s: the divergence of the probability current.

    SPEC eq. (2): p is stationary iff ``div(p f) - Lap p = div(p (f - s)) = 0``. Here the
    score is obtained from ``log_prob`` by autograd, ``s = grad_x log p`` (with
    ``create_graph`` so that div u includes the Hessian of log p), the defect r is
    :func:`defect` with that score, and the result is ``exp(log_prob(x)) * r(x)``, which
    equals ``div(p u)`` because ``div(p u) = p div u + grad p . u = p (div u + u . s)``.

    Args:
        field: f, (N, d) -> (N, d).
        log_prob: log p, (N, d) -> (N,), twice differentiable (e.g. ``target.log_prob``).
        x: (N, d) points.
        divergence: ``"exact"`` or ``"hutchinson"`` (see :func:`defect`).
        generator: random source of the Hutchinson probe.

    Returns:
        (N,) tensor div(p u)(x), detached.
    """
    x = check_points(x, "x")

    def score(z: Tensor) -> Tensor:
        with torch.enable_grad():
            zr = z if z.requires_grad else z.detach().requires_grad_(True)
            lp = log_prob(zr)
            if not isinstance(lp, Tensor) or lp.shape != (z.shape[0],):
                shape = tuple(lp.shape) if isinstance(lp, Tensor) else type(lp).__name__
                raise ValueError(f"log_prob must return shape ({z.shape[0]},); got {shape}")
            (g,) = torch.autograd.grad(lp.sum(), zr, create_graph=True)
        return g

    r = defect(field, score, x, divergence=divergence, generator=generator)
    with torch.no_grad():
        return (torch.exp(log_prob(x.detach())) * r).detach()
