"""The RBF kernel, the median heuristic and pairwise squared distances (SPEC section 5).

The RBF kernel is ``k(x, y) = exp(-|x - y|^2 / (2 l^2))`` with lengthscale ``l > 0``
(``a = 1 / l^2`` in the KSD formula), computed in the working dtype with autocast off.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fluxbench._checks import (
    check_generator,
    check_points,
    check_positive,
    check_positive_int,
    check_same_space,
)
from fluxbench._pairwise.common import no_autocast, sq_dists_expanded, working_dtype

__all__ = ["squared_distances", "rbf_kernel", "rbf_block", "median_bandwidth"]


def _upcast(x: Tensor) -> Tensor:
    return x.to(working_dtype(x))


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances ``D_ij = |x_i - y_j|^2``, clamped at 0.

    Computed as ``|x_i|^2 + |y_j|^2 - 2 x_i . y_j`` in at least float32 with autocast
    disabled. Only shapes are checked (no NaN scan, no host sync), so this is safe to call
    inside a chunked loop. The formula loses relative accuracy for points far from the
    origin compared with their spread; centre the points first (as the public metrics do).

    Args:
        x: (N, d) points.
        y: (M, d) points, same d and device.

    Returns:
        (N, M) tensor in ``working_dtype(x.dtype)``.

    Raises:
        ValueError: if the shapes are not (N, d) and (M, d) with the same d.
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.ndim != 2 or y.ndim != 2:
        raise ValueError("x and y must be tensors of shape (N, d) and (M, d)")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has d = {x.shape[1]} but y has d = {y.shape[1]}")
    with no_autocast(x.device):
        dtype = working_dtype(x, y)
        return sq_dists_expanded(x.to(dtype), y.to(dtype))


def rbf_block(x: Tensor, y: Tensor, inv_two_l2: float) -> Tensor:
    """exp(-|x_i - y_j|^2 / (2 l^2)) for one block; no checks (hot-loop helper)."""
    with no_autocast(x.device):
        d2 = sq_dists_expanded(_upcast(x), _upcast(y))
        return torch.exp(d2 * (-inv_two_l2))


def rbf_kernel(x: Tensor, y: Tensor, lengthscale: float | Tensor) -> Tensor:
    """RBF (Gaussian) kernel matrix ``K_ij = exp(-|x_i - y_j|^2 / (2 l^2))`` (SPEC section 5).

    Squared distances are computed as ``|x|^2 + |y|^2 - 2 x.y`` (after centring both clouds
    on the mean of ``x``, which leaves distances unchanged) clamped at 0, in at least
    float32 (half and bfloat16 inputs are upcast to float32) with autocast disabled, so the
    result is the same inside and outside ``torch.autocast``. The whole ``N x M`` matrix is
    returned: for large clouds use :func:`chunked_pairwise_sum` instead.

    Args:
        x: (N, d) points, finite.
        y: (M, d) points, same d, dtype and device as ``x``.
        lengthscale: l > 0, a float or a 1-element tensor.

    Returns:
        (N, M) tensor in ``working_dtype(x.dtype)`` on ``x.device``.

    Raises:
        ValueError: on a bad shape, NaN/inf, mismatched d/dtype/device or ``lengthscale <= 0``.
    """
    check_points(x, "x")
    check_points(y, "y")
    check_same_space(x, y, "x", "y")
    ell = check_positive(lengthscale, "lengthscale")
    # distances are translation invariant: centring on x's mean keeps the expansion
    # |x|^2 + |y|^2 - 2 x.y accurate for clouds far from the origin
    with no_autocast(x.device):
        x, y = _upcast(x), _upcast(y)
        centre = x.mean(dim=0, keepdim=True)
        return rbf_block(x - centre, y - centre, 0.5 / ell**2)


def median_bandwidth(
    x: Tensor,
    y: Tensor | None = None,
    *,
    max_points: int = 2000,
    generator: torch.Generator | None = None,
) -> float:
    """Median heuristic lengthscale ``l`` for ``k(x, y) = exp(-|x - y|^2 / (2 l^2))``.

    ``l = median{ |z_i - z_j| : i < j }``, the median of the Euclidean *distances* (not of
    the squared distances) over all distinct pairs of the pooled sample ``z = [x; y]``
    (Gretton et al., "A kernel two-sample test", JMLR 2012, section 8; Garreau et al.,
    "Large sample analysis of the median heuristic", 2017). The median of an even number
    of pairs is the mean of the two middle values. When the pooled sample has more than
    ``max_points`` points, a uniform subsample of ``max_points`` of them (without
    replacement, drawn with ``generator``; torch's global RNG when ``generator`` is None)
    is used, so that the cost stays O(max_points^2).

    Args:
        x: (N, d) points, finite.
        y: optional (M, d) points, same d, dtype and device; pooled with ``x``.
        max_points: subsample size cap, >= 2.
        generator: random source for the subsample (on ``x.device``).

    Returns:
        The lengthscale ``l`` as a Python float (> 0).

    Raises:
        ValueError: on bad points, fewer than 2 pooled points, or a zero median distance
            (more than half of the pairs coincide: pass a lengthscale explicitly).
    """
    check_points(x, "x")
    if y is not None:
        check_points(y, "y")
        check_same_space(x, y, "x", "y")
    max_points = check_positive_int(max_points, "max_points", minimum=2)
    check_generator(generator, x.device)
    with torch.no_grad():
        z = x.detach() if y is None else torch.cat([x.detach(), y.detach()], dim=0)
        n = z.shape[0]
        if n < 2:
            raise ValueError("median_bandwidth needs at least 2 points in total (x and y pooled)")
        if n > max_points:
            idx = torch.randperm(n, generator=generator, device=z.device)[:max_points]
            z = z[idx]
            n = max_points
        z = _upcast(z)
        z = z - z.mean(dim=0, keepdim=True)
        with no_autocast(z.device):
            d2 = sq_dists_expanded(z, z)
        iu = torch.triu_indices(n, n, offset=1, device=z.device)
        dists = d2[iu[0], iu[1]].sqrt_()
        k = dists.numel()
        # selection, not a sort: O(n^2) instead of O(n^2 log n)
        lo = torch.kthvalue(dists, (k - 1) // 2 + 1).values
        hi = torch.kthvalue(dists, k // 2 + 1).values
        value = float(0.5 * (lo + hi))
    if not value > 0:
        raise ValueError(
            "median pairwise distance is 0 (more than half of the pairs of points coincide); "
            "pass an explicit lengthscale"
        )
    return value
