"""Rotational (non-reversible) fields: every field that keeps p stationary (SPEC eq. (4)).

    f = s + A s + div A,     A(x)^T = -A(x),     (div A)_i = sum_j d_j A_ij

leaves p stationary for any smooth antisymmetric matrix field A, because
div(p (A s + div A)) = sum_ij d_i d_j (p A_ij) = 0. For constant A this is the classical
non-reversible drift (I + A) s.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._checks import all_finite, check_points, check_positive_int
from ..divergence import matrix_divergence
from .mlp import _mlp

__all__ = [
    "antisymmetric_basis",
    "ConstantAntisymmetric",
    "ScalarAntisymmetric",
    "LearnedAntisymmetric",
    "RotationalField",
]


def antisymmetric_basis(dim: int, *, dtype: torch.dtype | None = None, device=None) -> Tensor:
    """The K = d(d-1)/2 basis matrices E_ab - E_ba (a < b), shape (K, d, d)."""
    dim = check_positive_int(dim, "dim")
    rows, cols = torch.triu_indices(dim, dim, offset=1, device=device)
    basis = torch.zeros(rows.numel(), dim, dim, dtype=dtype, device=device)
    k = torch.arange(rows.numel(), device=device)
    basis[k, rows, cols] = 1
    basis[k, cols, rows] = -1
    return basis


def _check_antisymmetric(matrix: Tensor, name: str = "antisymmetric matrix") -> Tensor:
    if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"{name} must be a square (d, d) tensor; got {shape}")
    if not all_finite(matrix):
        raise ValueError(f"{name} contains NaN or inf")
    resid = (matrix + matrix.T).abs().max()
    scale = matrix.abs().max().clamp_min(1.0)
    if float(resid) > 1e-6 * float(scale):
        raise ValueError(f"{name} is not antisymmetric: max |A + A^T| = {float(resid):.3g}")
    return matrix


class ConstantAntisymmetric(nn.Module):
    """A constant antisymmetric matrix A (d, d); its divergence is zero."""

    def __init__(self, matrix: Tensor, learnable: bool = False):
        super().__init__()
        matrix = _check_antisymmetric(torch.as_tensor(matrix))
        self.dim = matrix.shape[0]
        if learnable:
            # parametrise by the strict upper triangle so A stays antisymmetric while learned
            rows, cols = torch.triu_indices(self.dim, self.dim, offset=1)
            self.coefficients = nn.Parameter(matrix[rows, cols].clone())
        else:
            self.register_buffer("_matrix", matrix.clone())

    def matrix(self, like: Tensor) -> Tensor:
        """A as a (d, d) tensor with ``like``'s dtype and device."""
        if hasattr(self, "coefficients"):
            basis = antisymmetric_basis(self.dim, dtype=like.dtype, device=like.device)
            return torch.einsum("k,kij->ij", self.coefficients.to(like.dtype), basis)
        return self._matrix.to(dtype=like.dtype, device=like.device)

    def forward(self, x: Tensor) -> Tensor:
        """A(x) for every row: (N, d) -> (N, d, d)."""
        return self.matrix(x).expand(x.shape[0], -1, -1)

    def apply(self, x: Tensor, v: Tensor) -> Tensor:
        """A v for every row: (N, d), (N, d) -> (N, d)."""
        return v @ self.matrix(x).T

    def divergence(self, x: Tensor, create_graph: bool = False) -> Tensor:
        """div A = 0, shape (N, d)."""
        return torch.zeros_like(x)


class ScalarAntisymmetric(nn.Module):
    """A(x) = a(x) J for a scalar field a and a constant antisymmetric J.

    div A = J grad a (since (div A)_i = sum_j J_ij d_j a). In d = 2 with J the 90-degree
    rotation this is the most general antisymmetric field.

    Args:
        scalar: a(x), (N, d) -> (N,).
        matrix: J, (d, d) antisymmetric.
        grad: optional closed-form grad a, (N, d) -> (N, d); autograd otherwise.
    """

    def __init__(
        self,
        scalar: Callable[[Tensor], Tensor],
        matrix: Tensor,
        grad: Callable[[Tensor], Tensor] | None = None,
    ):
        super().__init__()
        matrix = _check_antisymmetric(torch.as_tensor(matrix))
        self.dim = matrix.shape[0]
        self.scalar = scalar
        self.grad = grad
        self.register_buffer("_matrix", matrix.clone())

    def _j(self, like: Tensor) -> Tensor:
        return self._matrix.to(dtype=like.dtype, device=like.device)

    def forward(self, x: Tensor) -> Tensor:
        """A(x): (N, d) -> (N, d, d)."""
        return self.scalar(x)[:, None, None] * self._j(x)

    def apply(self, x: Tensor, v: Tensor) -> Tensor:
        """A(x) v: (N, d) -> (N, d)."""
        return self.scalar(x)[:, None] * (v @ self._j(x).T)

    def divergence(self, x: Tensor, create_graph: bool = False) -> Tensor:
        """div A = J grad a: (N, d) -> (N, d)."""
        if self.grad is not None:
            ga = self.grad(x)
        else:
            with torch.enable_grad():
                xr = x if x.requires_grad else x.detach().requires_grad_(True)
                (ga,) = torch.autograd.grad(self.scalar(xr).sum(), xr, create_graph=create_graph)
        return ga @ self._j(x).T


class LearnedAntisymmetric(nn.Module):
    """A learned antisymmetric field A(x) = sum_k a_k(x) (E_ab - E_ba), a = MLP(x).

    Its divergence is exact (autograd, 2 d reverse passes), differentiable in theta.
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (64, 64), activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.register_buffer("basis", antisymmetric_basis(self.dim))
        self.net = _mlp(self.dim, self.basis.shape[0], tuple(hidden), activation)

    def forward(self, x: Tensor) -> Tensor:
        """A(x): (N, d) -> (N, d, d)."""
        return torch.einsum("nk,kij->nij", self.net(x), self.basis.to(x.dtype))

    def apply(self, x: Tensor, v: Tensor) -> Tensor:
        """A(x) v: (N, d) -> (N, d)."""
        return torch.einsum("nij,nj->ni", self(x), v)

    def divergence(self, x: Tensor, create_graph: bool = False) -> Tensor:
        """div A: (N, d) -> (N, d), exact."""
        return matrix_divergence(self, x, create_graph=create_graph)


class RotationalField(nn.Module):
    """The stationary family of SPEC eq. (4): f = s + A s + div A.

    Args:
        score: the score s = grad log p, a field (N, d) -> (N, d) (for example
            ``target.score``, or a trained score model).
        antisymmetric: a (d, d) antisymmetric tensor (constant A) or a module with
            ``forward(x) -> (N, d, d)``, ``apply(x, v) -> (N, d)`` and
            ``divergence(x) -> (N, d)`` (``ConstantAntisymmetric``,
            ``ScalarAntisymmetric``, ``LearnedAntisymmetric``).
    """

    def __init__(self, score: Callable[[Tensor], Tensor], antisymmetric: Tensor | nn.Module):
        super().__init__()
        if isinstance(antisymmetric, Tensor):
            antisymmetric = ConstantAntisymmetric(antisymmetric)
        for attr in ("apply", "divergence"):
            if not callable(getattr(antisymmetric, attr, None)):
                raise ValueError(f"antisymmetric must provide .{attr}(x, ...); got {type(antisymmetric).__name__}")
        self.score = score
        self.antisymmetric = antisymmetric

    def forward(self, x: Tensor) -> Tensor:
        """f(x): (N, d) -> (N, d)."""
        if x.ndim != 2:
            check_points(x, "x", finite=False)
        s = self.score(x)
        # keep the graph of div A only when someone will differentiate the output
        create = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        return s + self.antisymmetric.apply(x, s) + self.antisymmetric.divergence(x, create_graph=create)
