"""Divergences and Jacobians of vector and matrix fields by automatic differentiation.

All functions assume the field acts on each row independently (no batch coupling), so
derivatives of batch sums give per-sample derivatives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._random import rademacher

__all__ = ["divergence", "jacobian", "matrix_divergence"]


def _grad(out: Tensor, x: Tensor, cotangent: Tensor, create_graph: bool, retain_graph: bool = False) -> Tensor:
    (g,) = torch.autograd.grad(
        out, x, cotangent, create_graph=create_graph, retain_graph=retain_graph or create_graph, allow_unused=True
    )
    return torch.zeros_like(x) if g is None else g


def jacobian(fn: Callable[[Tensor], Tensor], x: Tensor, *, create_graph: bool = False) -> Tensor:
    """Per-sample Jacobian J[n, i, j] = d f_i / d x_j at x_n, shape (N, d_out, d), by d_out reverse passes."""
    with torch.enable_grad():
        x = x if x.requires_grad else x.detach().requires_grad_(True)
        f = fn(x)
        rows = []
        for i in range(f.shape[1]):
            cot = torch.zeros_like(f)
            cot[:, i] = 1
            rows.append(_grad(f, x, cot, create_graph, retain_graph=i < f.shape[1] - 1))
    return torch.stack(rows, dim=1)


def divergence(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    method: str = "exact",
    generator: torch.Generator | None = None,
    create_graph: bool = False,
) -> Tensor:
    """Divergence div f(x) = sum_i d f_i / d x_i of a vector field, shape (N,).

    Args:
        fn: field (N, d) -> (N, d).
        x: (N, d) points.
        method: ``"exact"`` (d reverse passes) or ``"hutchinson"`` (one Rademacher
            probe eps per sample: eps^T J eps, unbiased, SPEC section 4).
        generator: for the Hutchinson probe.
        create_graph: keep the graph so the result can be differentiated.

    Returns:
        (N,) divergences.
    """
    if method not in ("exact", "hutchinson"):
        raise ValueError(f"method must be 'exact' or 'hutchinson'; got {method!r}")
    with torch.enable_grad():
        x = x if x.requires_grad else x.detach().requires_grad_(True)
        f = fn(x)
        if method == "hutchinson":
            eps = rademacher(tuple(x.shape), x, generator)
            return (_grad(f, x, eps, create_graph) * eps).sum(1)
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i in range(x.shape[1]):
            cot = torch.zeros_like(f)
            cot[:, i] = 1
            total = total + _grad(f, x, cot, create_graph, retain_graph=i < x.shape[1] - 1)[:, i]
    return total


def matrix_divergence(a_fn: Callable[[Tensor], Tensor], x: Tensor, *, create_graph: bool = False) -> Tensor:
    """Row divergence of a matrix field, (div A)_i = sum_j d_j A_ij (SPEC eq. (4)), shape (N, d).

    Computed exactly with 2 d reverse passes: for each column j, the directional
    derivative d_j A[:, :, j] is a Jacobian-vector product, obtained as the gradient of a
    vector-Jacobian product with respect to its cotangent.

    Args:
        a_fn: matrix field (N, d) -> (N, d, d).
        x: (N, d) points.
        create_graph: keep the graph (to train a learned A).
    """
    n, d = x.shape
    with torch.enable_grad():
        x = x if x.requires_grad else x.detach().requires_grad_(True)
        a = a_fn(x)
        total = torch.zeros(n, d, dtype=x.dtype, device=x.device)
        for j in range(d):
            col = a[:, :, j]
            v = torch.zeros_like(col, requires_grad=True)
            (vjp,) = torch.autograd.grad(col, x, v, create_graph=True, allow_unused=True)
            if vjp is None:
                continue
            tangent = torch.zeros_like(x)
            tangent[:, j] = 1
            (jvp,) = torch.autograd.grad(
                vjp, v, tangent, create_graph=create_graph, retain_graph=True, allow_unused=True
            )
            if jvp is not None:
                total = total + jvp
    return total
