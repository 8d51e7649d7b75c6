"""Estimator runs: the facts of SPEC section 7 as measurements with standard errors (suite estimator).

One run = one (target, objective, seed, part, sigma[, B]), using :mod:`fluxbench.diagnostics`:

* ``part=snr``: :func:`~fluxbench.diagnostics.gradient_snr` of the flux or DSM batch-mean
  loss at a freshly initialised MLP (seeded by the run's seed), batch ``batch_size``,
  ``n_draws`` gradient draws -> metric ``grad_snr``, model ``mlp-init``;
* ``part=bias`` (flux only): :func:`~fluxbench.diagnostics.finite_batch_bias` c* over the
  family f = c s at (sigma, B), ``n_batches`` * 256 / B batches (as many points at every B)
  -> metric ``c_star``, model ``B{B}``;
* ``part=loss_mass`` (flux only): :func:`~fluxbench.diagnostics.loss_mass_by_t` at the
  initial MLP -> metrics ``frac_draws_t<0.5``, ``frac_abs_loss_t<0.5``, ``mean_loss_t[lo,hi)``.

The records' ``target`` column is ``{target}@sigma={sigma}`` so that claims can compare
objectives or batch sizes per sigma (``per = ["target"]``).

Perturbations change the field family: "temperature:c" / "sign:i" make c* the best multiple
of a wrong reference field (c s, or s with a flipped component) and break the network the
SNR and loss mass are measured at; "drop-rotation" changes nothing here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fluxbench.diagnostics import finite_batch_bias, gradient_snr, loss_mass_by_t
from fluxbench.fields import MLPField

from .perturb import Perturbation, perturb_field
from .runner import RunContext

__all__ = ["measure_estimator"]


class _PerturbedModule(nn.Module):
    def __init__(self, model: nn.Module, perturbation: Perturbation | None, dim: int):
        super().__init__()
        self.model = model
        self.perturbed = perturb_field(model, perturbation, dim=dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.perturbed(x)


class _SmoothedView:
    def __init__(self, smoothed, perturbation: Perturbation | None, dim: int):
        self.score = perturb_field(smoothed.score, perturbation, dim=dim)


class _PerturbedTarget:
    """A target whose smoothed score is perturbed (its samples are not): the c* reference family."""

    def __init__(self, target, perturbation: Perturbation | None):
        self.target, self.perturbation = target, perturbation
        self.device, self.dim = target.device, target.dim

    def sample(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.target.sample(*args, **kwargs)

    def smoothed(self, sigma: float) -> _SmoothedView:
        return _SmoothedView(self.target.smoothed(sigma), self.perturbation, self.dim)


def measure_estimator(ctx: RunContext) -> list[dict[str, Any]]:
    """The rows of one estimator run (see the module docstring)."""
    run, b = ctx.run, ctx.budget
    part, sigma = run.extra("part"), float(run.extra("sigma"))
    target = run.target.build()
    dim = target.dim
    label = f"{run.target.name}@sigma={sigma:g}"
    gen = ctx.generator(f"estimator-{part}-{sigma:g}-{run.objective}-{run.extra('B')}")
    gen_cpu = torch.Generator().manual_seed(gen.initial_seed())
    p = ctx.perturbation
    if part == "bias":
        B = int(run.extra("B"))
        tgt = target if p is None else _PerturbedTarget(target, p)
        n_batches = max(8, round(int(b["n_batches"]) * 256 / B))  # the same number of points at every B
        est = finite_batch_bias(tgt, sigma, B, n_batches=n_batches, generator=gen_cpu)
        return [dict(target=label, model=f"B{B}", metric="c_star", value=est.value, stderr=est.stderr)]

    torch.manual_seed(run.seed)
    net = MLPField(dim, hidden=tuple(b["hidden"])).to(ctx.device)
    model = _PerturbedModule(net, p, dim)

    def sample(k: int, generator: torch.Generator | None = None) -> Tensor:
        return target.sample(k, generator=generator, device=ctx.device)

    if part == "snr":
        est = gradient_snr(run.objective, model, sample, sigma, batch_size=int(b["batch_size"]),
                           n_draws=int(b["n_draws"]), generator=gen)
        return [dict(target=label, model="mlp-init", metric="grad_snr", value=est.value, stderr=est.stderr)]
    with torch.no_grad():
        out = loss_mass_by_t(model, sample, sigma, batch_size=int(b["loss_mass_batch"]), n_draws=int(b["n_draws"]),
                             generator=gen)
    return [dict(target=label, model="mlp-init", metric=k, value=e.value, stderr=e.stderr) for k, e in out.items()]
