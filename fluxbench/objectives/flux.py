"""The Flux Matching loss: the reference estimator of SPEC section 2, made exact and fast.

One evaluation, for a batch x (B, d), one noise level sigma, horizon H and K sub-steps:

1. anchors x0_i = x_i + sigma xi_i (exact samples of p_hat);
2. one t ~ q on [0, H] for the batch; K steps of the exponential integrator (SPEC eq. (6))

       z' = rho_h z + (1 - rho_h) m(z) + sigma sqrt(1 - rho_h^2) xi,   rho_h = exp(-t / K)

   from x0 give x_t;
3. the defect estimate r_hat(z) = eps^T J_u eps + u . s_hat, u = f - s_hat, at z = x_t;
4. g_j = grad_z r_hat at x_t,j (detached);
5. W_ij = softmax over i of -|mu_i - x_t,j|^2 / (2 v), mu_i = x0_i + (1 - rho) sigma^2 s_hat(x0_i),
   rho = exp(-t), v = sigma^2 (1 - rho^2);
6. g_hat_i = (rho / q(t)) sum_j W_ij g_j (detached);
7. loss_i = -2 (f(x0_i) - s_hat(x0_i)) . g_hat_i.

E[loss] = 2 J_H, J_H = int_0^H <r, P_t r>_{p_hat} dt (SPEC eq. (7)).

What differs from the published code, all without changing the estimator's expectation:

* the batch-score parts of grad r_hat are closed-form moments of the posterior weights
  (``batch_score.score_terms``): autograd only differentiates f, never the B x B softmax;
* f's own part, grad [eps^T J_f eps + f . s_hat], comes from the field's closed-form
  ``defect_pullback`` where it has one (:class:`fluxbench.fields.MLPField` with SiLU or
  Tanh: a forward pass carrying the probe's tangent and one reverse pass, no double
  backward), else from autograd;
* every B x B sum runs chunked in float32 or better, in fused attention kernels (on CUDA
  for small d a Triton kernel, forward and backward) or (on CPU) 1 MiB blocks with one
  exponential per pair (exp2 of base-2 log-kernels), the transition sums of step 6 in a single pass
  (``fluxbench.pairwise``); no pass holds more than a (chunk, B) block, so memory grows
  like B, not B^2;
* steps 1-6 are never differentiated and run in inference mode, without autograd's
  per-operation bookkeeping (a step at B = 256 is mostly per-operation overhead);
* s_hat(x0) is computed once and reused for the first sub-step, mu and the loss;
* t is clamped to at least ``T_MIN`` (at t = 0 the published code divides by v = 0);
* a sigma tensor with several distinct values is rejected.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import (
    check_field_output,
    check_generator,
    check_points,
    check_positive,
    check_positive_int,
    check_sigma,
)
from .._random import normal, rademacher, uniform
from .._pairwise import working_dtype
from .batch_score import BatchKernel, make_batch_kernel

__all__ = ["flux_matching_loss", "FluxLossInfo", "T_MIN"]

# Smallest reference time used: the transition kernel's variance v = sigma^2 (1 - e^{-2t})
# must stay positive. The loss is continuous in t, so this changes nothing measurable.
T_MIN = 1e-6


@dataclass
class FluxLossInfo:
    """Diagnostics of one evaluation (returned with ``return_info=True``).

    Attributes:
        t: the reference time used (after clamping), a float.
        log_q: log density of t under the proposal (``0`` for a fixed t).
        weight: the weight rho(t) / q(t) (times the chain reweighting) applied to g_hat.
        x0: (B, d) anchors.
        x_t: (C, d) end points of the C reference chains (in the kernel's working
            order; all B anchors' chains unless ``chains`` was given).
    """

    t: float
    log_q: Tensor
    weight: float
    x0: Tensor
    x_t: Tensor


def _field_at(field: Callable[[Tensor], Tensor], z: Tensor, name: str) -> Tensor:
    return check_field_output(field(z), z, name)


def flux_matching_loss(
    field: Callable[[Tensor], Tensor],
    x: Tensor,
    sigma: float | Tensor,
    *,
    horizon: float = 4.0,
    substeps: int = 4,
    proposal=None,
    divergence: str = "hutchinson",
    t: float | None = None,
    chains: int | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    generator: torch.Generator | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, FluxLossInfo]:
    """Per-sample Flux Matching loss for one batch at one noise level (SPEC section 2).

    Args:
        field: the field f_theta, (B, d) -> (B, d) (for a noise-conditioned model pass
            ``fluxbench.fields.at_sigma(model, sigma)``). It is evaluated at the anchors
            with its parameters' graph (the loss is differentiated through it) and at x_t
            (differentiated in z only).
        x: (B, d) data batch, B >= 1, finite.
        sigma: one noise level (standard deviation), a float or a tensor whose entries
            are all equal; > 0.
        horizon: H, the upper end of the time range (> 0).
        substeps: K, exponential-integrator steps from x0 to x_t (>= 1).
        proposal: a time proposal with ``sample(sigma, like, generator) -> (t, log_q)``
            (for example :class:`fluxbench.objectives.ExponentialTimeProposal`); default
            Uniform[0, H], q(t) = 1 / H.
        divergence: ``"hutchinson"`` (one Rademacher probe per sample, SPEC step 3) or
            ``"exact"`` (d reverse passes; for small d).
        t: evaluate at this fixed time with importance weight 1 instead of sampling,
            giving the integrand of SPEC eq. (7): E[loss | t] = 2 <r, P_t r>_{p_hat}
            (for a single Gaussian 4 e^{-2t} ||M_s||^2 + 2 e^{-t} |c|^2 / sigma^2).
        chains: run the reference chains (steps 2-4) from this many anchors only, drawn
            uniformly without replacement (stratified over the local frames), and
            reweight their contributions by 1 / P(selected) (Horvitz-Thompson): the
            expectation of every per-sample loss is unchanged, the variance grows, and
            the cost of steps 2-6 scales with ``chains`` instead of B. Default: all B.
        chunk_size: at most this many query rows per pairwise block (bounds the memory
            of the B x B work; the fused backend's result does not depend on it).
        backend: ``"fused"`` (local frames, fused kernels or bounded blocks, nothing
            B x B stored), ``"dense"`` (materialised blocks of rows against the whole
            batch), or ``"auto"`` (dense for small batches on CPU, else fused); see
            :func:`fluxbench.objectives.batch_score.make_batch_kernel`.
        generator: the source of every random draw (anchors, time, chain noise, probe).
        return_info: also return a :class:`FluxLossInfo`.

    Returns:
        (B,) per-sample losses in the compute dtype (float32, or float64 for float64
        input); their mean estimates 2 J_H (SPEC eq. (7)). With ``return_info`` a pair.

    Raises:
        ValueError: for bad shapes, non-finite data, sigma <= 0 or several sigmas, a
            field whose output does not match its input (shape, dtype, device,
            finiteness), bad options, or a loss that is not finite (in float32 at
            sigma <= 1e-7 against data of unit scale, where it overflows).

    Example:
        >>> import torch
        >>> from fluxbench.fields import MLPField
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(256, 2, generator=g)
        >>> field = MLPField(2)
        >>> loss = flux_matching_loss(field, x, 0.5, generator=g)
        >>> loss.shape, bool(loss.isfinite().all())
        (torch.Size([256]), True)
        >>> loss.mean().backward()  # gradients for the field's parameters
    """
    check_points(x, "x")
    sig = float(check_sigma(sigma, like=x))
    horizon = check_positive(horizon, "horizon")
    substeps = check_positive_int(substeps, "substeps")
    if divergence not in ("hutchinson", "exact"):
        raise ValueError(f"divergence must be 'hutchinson' or 'exact'; got {divergence!r}")
    check_generator(generator, x.device)
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")
    if t is not None:
        t = check_positive(t, "t", allow_zero=True)
    if chains is not None:
        chains = check_positive_int(chains, "chains")

    b, d = x.shape
    dtype = working_dtype(x)
    xc = x.detach().to(dtype)
    var = sig * sig
    # Steps 1-6 are never differentiated: inference mode skips autograd's bookkeeping on
    # each of their ~230 operations (5% of a step at B = 256, d = 2). What they make
    # enters the graph only as copies made outside it.
    with torch.inference_mode():
        # rows below are in the kernel's working order (P >= B rows, see BatchKernel)
        kern = make_batch_kernel(xc, sig, backend=backend, chunk_size=chunk_size)
        xw = kern.rows(xc)
        p = xw.shape[0]

        # 1. anchors and their batch score, computed once
        x0 = xw + sig * normal((p, d), xc, generator)
        m0 = kern.mean(x0)
        s0 = (m0 - x0) / var

    # 2. the reference time and its importance weight (outside inference mode: a learned
    # proposal's log_q carries its graph), then the chains from x0 to x_t
    if t is not None:
        t_val, log_q = float(t), xc.new_zeros(())
    elif proposal is None:
        t_val = float(uniform((), xc, generator)) * horizon
        log_q = xc.new_tensor(-math.log(horizon))
    else:
        t_tensor, log_q = proposal.sample(sig, xc, generator)
        t_val = float(t_tensor)
    t_val = max(t_val, T_MIN)
    inv_q = 1.0 if t is not None else math.exp(-float(log_q.detach()))
    with torch.inference_mode():
        sel, chain_weight = kern.select_chains(chains, generator)
        z, m = (x0, m0) if sel is None else (x0[sel], m0[sel])
        c = z.shape[0]

        h = t_val / substeps
        rho_h = math.exp(-h)
        noise_scale = sig * math.sqrt(-math.expm1(-2 * h))
        for k in range(substeps):
            noise = normal((c, d), xc, generator)
            z = torch.mul(z, rho_h).add_(m, alpha=1 - rho_h).add_(noise, alpha=noise_scale)
            if k < substeps - 1:
                m = kern.mean(z)
        x_t = z

        # 3-4. g = grad r_hat at x_t: the field's derivatives, the batch score's in closed form
        probe = rademacher((c, d), xc, generator) if divergence == "hutchinson" else None
        g = _defect_gradient(field, x_t, kern, probe, x.dtype)

        # 5-6. transition weights normalised over all anchors, then g_hat
        rho = math.exp(-t_val)
        mu = x0 + (1 - rho) * var * s0
        g_sum = kern.transition_sum(mu, x_t, -var * math.expm1(-2 * t_val), g, sel)
        # the batch's own order from here on (f acts row by row)
        x0, s0, g_sum = kern.restore(x0), kern.restore(s0), kern.restore(g_sum)
    weight = rho * inv_q * chain_weight
    g_hat = weight * g_sum

    # 7. the loss, differentiated through f at the anchors only (at a copy of x0 made
    # outside inference mode: the field's graph keeps it)
    f0 = _field_at(field, x0.to(x.dtype, copy=True), "field")
    loss = -2 * ((f0.to(dtype) - s0) * g_hat).sum(1)
    if not bool(torch.isfinite(loss.detach()).all()):
        _raise_non_finite(loss, x, sig, dtype)
    if return_info:
        return loss, FluxLossInfo(t=t_val, log_q=log_q, weight=weight, x0=x0.clone(), x_t=x_t.clone())
    return loss


def _raise_non_finite(loss: Tensor, x: Tensor, sigma: float, dtype: torch.dtype) -> None:
    """A non-finite loss is an error, never a silent NaN: name what caused it."""
    bad = int((~torch.isfinite(loss.detach())).sum())
    extent = float(x.detach().abs().amax())
    raise ValueError(
        f"flux_matching_loss: {bad} of {loss.shape[0]} per-sample losses are not finite at sigma={sigma:g} in "
        f"{dtype} (data extent max|x| = {extent:.3g}). The loss grows like a high power of 1/sigma (SPEC "
        "section 2, scaling), so at a sigma this small against the data's scale it overflows: use a larger "
        "sigma, or float64 data and field; otherwise check that the field's outputs are finite"
    )


def _defect_gradient(
    field: Callable[[Tensor], Tensor],
    y: Tensor,
    kern: BatchKernel,
    probe: Tensor | None,
    field_dtype: torch.dtype,
) -> Tensor:
    """g = grad_z r_hat(z) at z = y (SPEC section 2, steps 3-4), detached, shape (P, d).

    Only the field is differentiated: grad_z [eps^T J_f eps + f . stopgrad(s_hat)], by the
    field's closed-form ``defect_pullback`` where it has one (see
    :mod:`fluxbench.fields.base`), else by autograd (one vector-Jacobian product kept in the
    graph, then one backward); the batch-score terms come in closed form from
    :meth:`BatchKernel.score_terms`. Called in inference mode: the closed form runs there,
    autograd leaves it.
    """
    fast = None
    if probe is not None and hasattr(field, "defect_pullback"):
        z = y.to(field_dtype)
        fast = field.defect_pullback(z, probe.to(field_dtype))
    if fast is not None:
        f, pullback = fast
        s, g_s = kern.score_terms(y, check_field_output(f, z, "field"), probe)
        return g_s + pullback(s.to(f.dtype)).to(g_s.dtype)
    # autograd needs normal tensors (inference tensors cannot be saved for backward)
    with torch.inference_mode(False), torch.enable_grad():
        z = y.to(field_dtype, copy=True).requires_grad_(True)
        f = _field_at(field, z, "field")
    s, g_s = kern.score_terms(y, f.detach(), probe)
    with torch.inference_mode(False), torch.enable_grad():
        phi = (f * s.to(f.dtype, copy=True)).sum()
        if probe is not None:
            eps = probe.to(f.dtype, copy=True)
            (vjp,) = torch.autograd.grad(f, z, eps, create_graph=True, allow_unused=True)
            if vjp is not None and vjp.requires_grad:
                phi = phi + (vjp * eps).sum()
        else:
            for i in range(z.shape[1]):
                cot = torch.zeros_like(f)
                cot[:, i] = 1
                (row,) = torch.autograd.grad(f, z, cot, create_graph=True, allow_unused=True)
                if row is not None and row.requires_grad:
                    phi = phi + row[:, i].sum()
        g_f = torch.autograd.grad(phi, z, allow_unused=True)[0] if phi.requires_grad else None
    return g_s if g_f is None else g_s + g_f.detach().to(g_s.dtype)
