"""Neural fields: a plain MLP and the gradient of a scalar network."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
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


def _silu_terms(a: Tensor, a_tangent: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """silu(a), silu'(a) and silu''(a) a_tangent, from one sigmoid; overwrites a."""
    sig = torch.sigmoid(a)
    h = a * sig
    first = torch.addcmul(sig + h, h, sig, value=-1)  # sig (1 + a (1 - sig))
    # silu''(a) = sig (1 - sig) (2 + a (1 - 2 sig)) = sig (1 - sig) (2 + a - 2 silu(a))
    curvature = torch.ops.aten.sigmoid_backward(a.sub_(h, alpha=2).add_(2).mul_(a_tangent), sig)
    return h, first, curvature


def _tanh_terms(a: Tensor, a_tangent: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """tanh(a), 1 - tanh^2(a) and -2 tanh(a) (1 - tanh^2(a)) a_tangent."""
    h = torch.tanh(a)
    first = torch.mul(h, h).neg_().add_(1)
    return h, first, (h * first).mul_(-2).mul_(a_tangent)


# activations whose first and second derivatives the analytic pullback knows (exact type)
_TERMS = {nn.SiLU: _silu_terms, nn.Tanh: _tanh_terms}


@torch.no_grad()
def _mlp_defect_pullback(
    net: nn.Sequential, x_in: Tensor, probe: Tensor, d: int, scale: Tensor | None
) -> tuple[Tensor, Callable[[Tensor], Tensor]] | None:
    """f(x) and s -> grad_x [s . f(x) + probe^T J_f(x) probe] for an MLP, without autograd.

    With a_1 = W_1 x_in + b_1, h_l = act(a_l), a_{l+1} = W_{l+1} h_l + b_{l+1} and
    f = (W_{L+1} h_L + b_{L+1}) / scale, the tangent along the probe e is
    a'_1 = W_1[:, :d] e, a'_{l+1} = W_{l+1} (act'(a_l) a'_l), and probe^T J_f probe =
    e . W_{L+1} (act'(a_L) a'_L) / scale. Its reverse pass carries two adjoints per layer,
    hb (of h_l, seeded by W_{L+1}^T s / scale) and hb' (of act'(a_l) a'_l, seeded by
    W_{L+1}^T e / scale):

        ab_l = act'(a_l) hb_l + act''(a_l) a'_l hb'_l,   hb_{l-1} = W_l^T ab_l,
        hb'_{l-1} = W_l^T (act'(a_l) hb'_l),             grad_x = W_1[:, :d]^T ab_1.

    This is exactly what autograd's double backward computes (the Hutchinson term of
    SPEC section 2, step 3), with about half the operations; each layer keeps two (N,
    width) tensors, act'(a_l) and act''(a_l) a'_l, which the pullback consumes in place
    (it can be called once). Returns None for a network this does not cover (an
    activation outside ``_TERMS``, any other module).

    Shapes: x_in (N, d_in) with its first d columns the point, probe (N, d), scale a
    column (N, 1) or None; f (N, d), the pullback maps (N, d) to (N, d).
    """
    mods = list(net)
    linears, acts = mods[0::2], mods[1::2]
    if len(linears) != len(acts) + 1 or not all(type(m) is nn.Linear for m in linears):
        return None
    if not all(type(m) in _TERMS for m in acts):
        return None
    h, tangent, layers = x_in, probe, []
    for i, (lin, act) in enumerate(zip(linears, acts)):
        weight = lin.weight if i else lin.weight[:, :d]
        a = F.linear(h, lin.weight, lin.bias)
        a_tangent = tangent @ weight.t()
        h, first, curvature = _TERMS[type(act)](a, a_tangent)
        tangent = first * a_tangent
        layers.append((first, curvature, weight))
    last = linears[-1]
    f = F.linear(h, last.weight, last.bias)
    if scale is not None:
        f = f / scale
    calls = []

    def pullback(s: Tensor) -> Tensor:
        if calls:
            raise RuntimeError("this defect pullback was already used (it consumes its saved tensors)")
        calls.append(1)
        # a context, not a decorator: wrapping this closure anew on every call costs more
        with torch.no_grad():
            s_adj, e_adj = (s, probe) if scale is None else (s / scale, probe / scale)
            if not layers:  # no hidden layer: f is affine and J constant
                return s_adj @ last.weight[:, :d]
            hb, hb_tangent = s_adj @ last.weight, e_adj @ last.weight
            for i in range(len(layers) - 1, -1, -1):
                first, curvature, weight = layers[i]
                ab = curvature.mul_(hb_tangent).addcmul_(hb, first)
                if i == 0:
                    return ab @ weight
                hb, hb_tangent = ab @ weight, hb_tangent.mul_(first) @ weight

    return f, pullback


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

    def _net_input(self, x: Tensor, sigma: Tensor | float | None) -> tuple[Tensor, Tensor | None]:
        """The network's input ([x, log sigma] when conditioned) and the output's divisor."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            check_points(x, "x", dim=self.dim, finite=False)
        if not self.sigma_conditioned:
            return x, None
        if sigma is None:
            raise ValueError("this MLPField is sigma-conditioned: call it as model(x, sigma)")
        s = _sigma_column(x, sigma)
        return torch.cat([x, s.log()], dim=1), s

    def forward(self, x: Tensor, sigma: Tensor | float | None = None) -> Tensor:
        """Evaluate the field: x (N, d) [, sigma scalar] -> (N, d)."""
        x_in, scale = self._net_input(x, sigma)
        return self.net(x_in) if scale is None else self.net(x_in) / scale

    def defect_pullback(
        self, x: Tensor, probe: Tensor, sigma: Tensor | float | None = None
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]] | None:
        """The field and its Hutchinson pullback in closed form (the optional field protocol of
        :mod:`fluxbench.fields.base`): ``(f(x), s -> grad_x [s . f(x) + probe^T J_f(x) probe])``.

        x and probe (N, d), sigma as for :meth:`forward`. None when the network is not
        covered (activations other than SiLU and Tanh, a subclass that overrides
        ``forward``): callers then use autograd. Not differentiable in the parameters.
        """
        if type(self).forward is not MLPField.forward or any(m._forward_hooks or m._forward_pre_hooks for m in (self, self.net, *self.net)):
            return None
        x_in, scale = self._net_input(x, sigma)
        return _mlp_defect_pullback(self.net, x_in, probe, self.dim, scale)


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
