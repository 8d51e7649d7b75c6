"""Neural fields: a plain MLP and the gradient of a scalar network."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_points, check_positive_int

__all__ = ["MLPField", "ConservativeField"]


def _mlp(d_in: int, d_out: int, hidden: tuple[int, ...], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = d_in
    for h in hidden:
        layers += [nn.Linear(width, check_positive_int(h, "hidden width")), activation()]
        width = h
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


def _sigma_column(x: Tensor, sigma: Tensor | float) -> Tensor:
    """sigma as an (N, 1) column: a scalar is broadcast, a per-sample (N,) or (N, 1) kept."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.numel() not in (1, x.shape[0]):
        raise ValueError(f"sigma must be a scalar or have one value per row; got shape {tuple(s.shape)} for {x.shape[0]} rows")
    return s.reshape(-1, 1).expand(x.shape[0], 1)


class MLPField(nn.Module):
    """A multilayer perceptron field f_theta: R^d -> R^d, optionally noise-conditioned.

    Unconditioned: f(x) = net(x). Conditioned (``sigma_conditioned=True``): the network
    sees [x, log sigma] and its output is divided by sigma,

        f(x, sigma) = net([x, log sigma]) / sigma,

    because the score of p * N(0, sigma^2 I) scales like 1/sigma: the network then
    predicts an O(1) quantity at every noise level.

    The default (2 -> 128 -> 128 -> 2, SiLU) is the toy model of SPEC section 6.

    Args:
        dim: d.
        hidden: widths of the hidden layers.
        activation: activation module class.
        sigma_conditioned: take sigma as a second argument.
    """

    def __init__(
        self,
        dim: int,
        hidden: tuple[int, ...] = (128, 128),
        activation: type[nn.Module] = nn.SiLU,
        sigma_conditioned: bool = False,
    ):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.sigma_conditioned = bool(sigma_conditioned)
        self.net = _mlp(self.dim + int(self.sigma_conditioned), self.dim, tuple(hidden), activation)

    def forward(self, x: Tensor, sigma: Tensor | float | None = None) -> Tensor:
        """Evaluate the field: x (N, d) [, sigma scalar] -> (N, d)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            check_points(x, "x", dim=self.dim, finite=False)
        if not self.sigma_conditioned:
            return self.net(x)
        if sigma is None:
            raise ValueError("this MLPField is sigma-conditioned: call it as model(x, sigma)")
        s = _sigma_column(x, sigma)
        return self.net(torch.cat([x, s.log()], dim=1)) / s


class ConservativeField(nn.Module):
    """A gradient field f = grad_x phi_theta(x) of a scalar MLP phi_theta (a pure score model).

    Its Jacobian is symmetric by construction, so it cannot represent rotational
    (non-reversible) dynamics; it is the reversible baseline.

    Args:
        dim: d.
        hidden: widths of the hidden layers of phi.
        activation: activation module class (must be twice differentiable for training).
        sigma_conditioned: phi sees [x, log sigma] and f = grad phi / sigma.
    """

    def __init__(
        self,
        dim: int,
        hidden: tuple[int, ...] = (128, 128),
        activation: type[nn.Module] = nn.SiLU,
        sigma_conditioned: bool = False,
    ):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.sigma_conditioned = bool(sigma_conditioned)
        self.potential = _mlp(self.dim + int(self.sigma_conditioned), 1, tuple(hidden), activation)

    def forward(self, x: Tensor, sigma: Tensor | float | None = None) -> Tensor:
        """Evaluate grad phi: x (N, d) [, sigma scalar] -> (N, d), differentiable in theta."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            check_points(x, "x", dim=self.dim, finite=False)
        if self.sigma_conditioned and sigma is None:
            raise ValueError("this ConservativeField is sigma-conditioned: call it as model(x, sigma)")
        with torch.enable_grad():
            xr = x if x.requires_grad else x.detach().requires_grad_(True)
            if not self.sigma_conditioned:
                return torch.autograd.grad(self.potential(xr).sum(), xr, create_graph=True)[0]
            s = _sigma_column(xr, sigma)
            phi = self.potential(torch.cat([xr, s.log()], dim=1)).sum()
            return torch.autograd.grad(phi, xr, create_graph=True)[0] / s
