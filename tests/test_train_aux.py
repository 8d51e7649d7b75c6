"""Training with an objective that has parameters of its own (issue 14, "Training that works").

The time proposal and the loss normaliser of the noise-annealed Flux Matching objective
(SPEC section 2) are trained together with the model, but their gradients are on another
scale (the proposal's REINFORCE gradient is ~4e4 times the model's): the model's gradient
is clipped on its own, the auxiliary parameters in their own optimiser group; the REINFORCE
target is the normalised loss; the log keeps the flux loss, the normaliser and the
REINFORCE term in separate columns. Also the EMA warm-up and the learning-rate schedule.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fluxbench.fields import MLPField
from fluxbench.objectives import ExponentialTimeProposal, FluxMatching
from fluxbench.objectives.base import Objective, ObjectiveOutput
from fluxbench.train import train

F64 = torch.float64
TARGET_W = torch.tensor([0.3, 0.2, -0.1], dtype=F64)
TARGET_A = torch.tensor([1.0, -1.0], dtype=F64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Vector(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=F64))


class HeavyAux(Objective):
    """loss = |w - TARGET_W|^2 + scale |a - TARGET_A|^2: an auxiliary parameter ``a`` whose
    gradient is ``scale`` times larger than the model's, like the time proposal's."""

    def __init__(self, scale: float = 1e6):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2, dtype=F64))
        self.scale = scale

    def forward(self, model, x, generator=None):
        model_loss = ((model.w - TARGET_W) ** 2).sum() + 0 * x.sum()
        return ObjectiveOutput(loss=model_loss + self.scale * ((self.a - TARGET_A) ** 2).sum())


def _hand_adam(start: torch.Tensor, target: torch.Tensor, scale: float, clip: float | None, lr: float, steps: int):
    """Adam on scale |p - target|^2 alone, the gradient rescaled by min(1, clip / (|g| + 1e-6))."""
    p = nn.Parameter(start.clone())
    opt = torch.optim.Adam([p], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (scale * ((p - target) ** 2).sum()).backward()
        if clip is not None:
            p.grad.mul_(min(1.0, clip / (float(p.grad.norm()) + 1e-6)))
        opt.step()
    return p.detach()


def test_model_gradient_is_clipped_on_its_own():
    """The model's trajectory is that of Adam on the model's loss alone (clipped at 0.05), however
    large the auxiliary gradient; the auxiliary parameter follows its own Adam, clipped at the
    default ``aux_grad_clip`` = 1. Fails when the two are clipped together: the model's gradient is
    then scaled by ~1e-7."""
    data = torch.zeros(4, 1, dtype=F64)
    objective = HeavyAux()
    result = train(Vector(), objective, data, steps=15, batch_size=2, lr=0.1, grad_clip=0.05)
    expected_w = _hand_adam(torch.tensor([1.0, -2.0, 0.5], dtype=F64), TARGET_W, 1.0, 0.05, 0.1, 15)
    expected_a = _hand_adam(torch.zeros(2, dtype=F64), TARGET_A, 1e6, 1.0, 0.1, 15)
    torch.testing.assert_close(result.model.w.detach(), expected_w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(objective.a.detach(), expected_a, rtol=1e-12, atol=1e-14)
    # grad_norm is the model's alone: |2 (w_0 - target)| at step 1
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    assert result.log["grad_norm"].iloc[0] == pytest.approx(float(2 * (w0 - TARGET_W).norm()))


def test_aux_grad_clip_none_and_aux_grad_norm_column():
    data = torch.zeros(4, 1, dtype=F64)
    objective = HeavyAux()
    result = train(Vector(), objective, data, steps=15, batch_size=2, lr=0.1, grad_clip=0.05, aux_grad_clip=None)
    torch.testing.assert_close(objective.a.detach(), _hand_adam(torch.zeros(2, dtype=F64), TARGET_A, 1e6, None, 0.1, 15), rtol=1e-12, atol=1e-14)
    assert result.log["aux_grad_norm"].iloc[0] == pytest.approx(float(2e6 * TARGET_A.norm()))


def test_aux_lr_is_its_own_group():
    data = torch.zeros(4, 1, dtype=F64)
    objective = HeavyAux()
    result = train(Vector(), objective, data, steps=5, batch_size=2, lr=0.1, aux_lr=0.01, grad_clip=None, aux_grad_clip=None)
    torch.testing.assert_close(objective.a.detach(), _hand_adam(torch.zeros(2, dtype=F64), TARGET_A, 1e6, None, 0.01, 5))
    torch.testing.assert_close(result.model.w.detach(), _hand_adam(torch.tensor([1.0, -2.0, 0.5], dtype=F64), TARGET_W, 1.0, None, 0.1, 5))


def _flux_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = MLPField(2, hidden=(32, 32), sigma_conditioned=True)
    objective = FluxMatching((0.02, 2.0), learn_proposal=True, normalise=True)
    data = torch.randn(512, 2, generator=torch.Generator().manual_seed(1)) * torch.tensor([1.0, 0.5])
    return model, objective, data


def test_flux_model_gradient_is_clipped_on_its_own():
    """Real objective, proposal and normaliser on: at every step the model's gradient reaching Adam
    has norm min(grad_norm, clip), grad_norm the model's own pre-clipping norm (logged), whatever the
    auxiliary gradient (here up to ~1e8 times the model's). Read in a global optimiser pre-step hook.
    Fails on joint clipping, where the model's gradient was scaled by clip / (joint norm)."""
    model, objective, data = _flux_setup()
    seen = []

    def hook(optimizer, args, kwargs):
        seen.append(
            (
                float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm()),
                float(torch.cat([p.grad.flatten() for p in objective.parameters()]).norm()),
            )
        )

    handle = register_optimizer_step_pre_hook(hook)
    try:
        result = train(model, objective, data, steps=12, batch_size=64, lr=1e-3, grad_clip=1.0, seed=3)
    finally:
        handle.remove()
    pre = result.log["grad_norm"].to_numpy()
    assert len(seen) == 12
    post_model = [m for m, _ in seen]
    assert post_model == pytest.approx([min(g, 1.0) for g in pre], rel=1e-4)
    assert max(a for _, a in seen) <= 1.0 + 1e-4  # the auxiliary group, clipped at aux_grad_clip = 1
    ratio = result.log["aux_grad_norm"] / result.log["grad_norm"]
    assert float(ratio.max()) > 1e3  # the case that matters: aux gradients dwarf the model's


def test_reinforce_target_is_the_normalised_loss():
    """With a normaliser c(sigma), the REINFORCE surrogate is -stopgrad((L exp(-c))^2) log q(t) (the
    published annealed example): the proposal's gradient is -(L exp(-c))^2 grad log q(t). Checked
    against log q recomputed at the logged t and sigma, float64, with c far from 0."""
    torch.manual_seed(0)
    model = MLPField(2, hidden=(16,), sigma_conditioned=True).double()
    objective = FluxMatching((0.1, 1.0), learn_proposal=True, normalise=True).double()
    with torch.no_grad():
        objective.normaliser.b.fill_(2.5)
        objective.normaliser.a.fill_(-0.5)
    x = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    out = objective(model, x, torch.Generator().manual_seed(3))
    out.loss.backward()
    sigma, t = out.logs["sigma"], out.logs["t"]
    c = float(objective.normaliser(sigma).detach())
    assert abs(c) > 1  # the normalised and the raw target differ by exp(-2c) > 7
    flux = float(out.model_loss)
    probe = ExponentialTimeProposal(objective.horizon).double()
    probe.load_state_dict(objective.proposal.state_dict())
    probe.log_prob(torch.tensor(t, dtype=F64), sigma).backward()
    target = (flux * math.exp(-c)) ** 2
    for name in ("a", "b"):
        got = float(getattr(objective.proposal, name).grad)
        want = -target * float(getattr(probe, name).grad)
        assert got == pytest.approx(want, rel=1e-9), (name, got, want)
    assert float(out.logs["reinforce"]) == pytest.approx(-target * float(probe.log_prob(torch.tensor(t, dtype=F64), sigma).detach()), rel=1e-9)


def test_log_separates_flux_loss_normaliser_and_reinforce():
    """The logged ``loss`` is the flux loss (the model's objective: the batch mean of the per-sample
    loss, reproduced here from the run's generator), and the normaliser and REINFORCE terms have their
    own columns; their sum is what was minimised."""
    model, objective, data = _flux_setup()
    init_model = MLPField(2, hidden=(32, 32), sigma_conditioned=True)
    init_model.load_state_dict(model.state_dict())
    init_objective = FluxMatching((0.02, 2.0), learn_proposal=True, normalise=True)
    init_objective.load_state_dict(objective.state_dict())
    result = train(model, objective, data, steps=3, batch_size=64, lr=1e-3, seed=5)
    log = result.log
    assert {"loss", "normaliser", "normaliser_c", "reinforce", "grad_norm", "aux_grad_norm", "sigma", "t"} <= set(log.columns)
    # reproduce step 1: the batch indices, then the objective, from the same generator
    g = torch.Generator().manual_seed(5)
    batch = data[torch.randint(0, data.shape[0], (64,), generator=g)]
    out = init_objective(init_model, batch, g)
    assert log["loss"].iloc[0] == float(out.model_loss)
    assert log["reinforce"].iloc[0] == float(out.logs["reinforce"])
    assert log["normaliser"].iloc[0] == float(out.logs["normaliser"])
    assert float(out.loss.detach()) == pytest.approx(float(out.logs["normaliser"]) + float(out.logs["reinforce"]), rel=1e-6)
    assert log["loss"].iloc[0] != pytest.approx(float(out.loss.detach()), rel=1e-3)  # not the surrogate total


@pytest.mark.parametrize("warmup", [0, 10])
def test_ema_warmup_matches_analytic_recursion(warmup):
    """EMA decay at step k = min(ema_decay, (1 + k) / (warmup + k)) (warmup 0: constant decay)."""
    from tests.test_train import Quadratic  # noqa: PLC0415

    objective = Quadratic()
    data = torch.zeros(10, 1, dtype=F64)
    result = train(Vector(), objective, data, steps=30, batch_size=4, lr=0.05, ema_decay=0.9, ema_warmup=warmup, grad_clip=None)
    weights = objective.seen + [result.model.w.detach()]
    ema = weights[0].clone()
    for k, p in enumerate(weights[1:], start=1):
        decay = 0.9 if warmup == 0 else min(0.9, (1 + k) / (warmup + k))
        ema = decay * ema + (1 - decay) * p
    torch.testing.assert_close(result.ema_model.w, ema, rtol=1e-12, atol=1e-14)


def test_cosine_lr_schedule():
    """lr_k = lr (1 + cos(pi (k - 1) / steps)) / 2 for the model and the auxiliary group alike."""
    data = torch.zeros(4, 1, dtype=F64)
    objective = HeavyAux()
    result = train(Vector(), objective, data, steps=8, batch_size=2, lr=0.1, aux_lr=0.02, lr_schedule="cosine")
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * (k - 1) / 8)) for k in range(1, 9)]
    assert result.log["lr"].tolist() == pytest.approx(expected, rel=1e-12)


def test_resume_with_aux_groups_and_warmup_is_bit_identical(tmp_path):
    """Crash during step 5 (the data source raises), resume from the step-3 checkpoint: weights,
    EMA (with warm-up), objective parameters and log equal an uninterrupted run's, cosine lr included."""
    model, objective, data = _flux_setup()
    m2 = MLPField(2, hidden=(32, 32), sigma_conditioned=True)
    m2.load_state_dict(model.state_dict())
    o2 = FluxMatching((0.02, 2.0), learn_proposal=True, normalise=True)
    o2.load_state_dict(objective.state_dict())
    calls = []

    def sample(n, generator=None, crash_at=None):
        calls.append(1)
        if crash_at is not None and len(calls) == crash_at:
            raise RuntimeError("simulated crash")
        return data[torch.randint(0, data.shape[0], (n,), generator=generator)]

    kw = dict(steps=6, batch_size=32, lr=1e-3, seed=2, ema_warmup=10, lr_schedule="cosine")
    full = train(model, objective, sample, **kw)
    calls.clear()
    path = tmp_path / "ck.pt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(m2, o2, lambda n, generator=None: sample(n, generator, crash_at=5), checkpoint=path, checkpoint_every=3, **kw)
    resumed = train(m2, o2, sample, checkpoint=path, resume=True, **kw)
    for a, b in zip(full.ema_model.state_dict().values(), resumed.ema_model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(objective.state_dict().values(), o2.state_dict().values()):
        assert torch.equal(a, b)
    assert full.log.drop(columns="seconds").equals(resumed.log.drop(columns="seconds"))


def test_bad_new_arguments():
    data = torch.zeros(4, 1, dtype=F64)
    for kwargs, match in [
        (dict(aux_grad_clip=0.0), "aux_grad_clip"),
        (dict(aux_lr=-1.0), "aux_lr"),
        (dict(ema_warmup=-1), "ema_warmup"),
        (dict(lr_schedule="linear"), "lr_schedule"),
    ]:
        with pytest.raises(ValueError, match=match):
            train(Vector(), HeavyAux(), data, steps=2, batch_size=2, **kwargs)
