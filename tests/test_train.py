"""Tests of fluxbench.train: convergence, determinism, bit-exact resume, EMA, errors."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from fluxbench.fields import MLPField
from fluxbench.objectives import FluxMatching
from fluxbench.objectives.base import Objective, ObjectiveOutput
from fluxbench.train import TrainResult, load_checkpoint, save_checkpoint, train

SIGMA_DATA = torch.tensor([[1.0, 0.6], [0.6, 0.8]])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # many tiny ops: intra-op threads only add synchronisation on a small shared machine
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def gaussian_data(n: int = 2000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=_gen(seed)) @ torch.linalg.cholesky(SIGMA_DATA).T


class TinyScoreNet(nn.Module):
    """f(x, sigma): an MLP on [x, log sigma]."""

    def __init__(self, d: int = 2, hidden: int = 32, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(d + 1, hidden), nn.SiLU(), nn.Linear(hidden, d))

    def forward(self, x, sigma):
        log_sigma = torch.as_tensor(sigma, dtype=x.dtype).log().expand(x.shape[0], 1)
        return self.net(torch.cat([x, log_sigma], dim=1))


class TinyDSM(Objective):
    """Denoising score matching at one log-uniform sigma per batch, with a learned loss
    normaliser c (total = loss exp(-c) + c, SPEC section 2) and a call-counter buffer, so
    that the objective has parameters and state of its own."""

    def __init__(self, nan_at: int | None = None, crash_at: int | None = None):
        super().__init__()
        self.c = nn.Parameter(torch.zeros(()))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.nan_at = nan_at
        self.crash_at = crash_at

    def forward(self, model, x, generator=None):
        self.calls += 1
        calls = int(self.calls)
        if self.crash_at is not None and calls == self.crash_at:
            raise RuntimeError("simulated crash")
        u = torch.rand((), generator=generator, dtype=x.dtype)
        sigma = torch.exp(math.log(0.1) + u * (math.log(1.0) - math.log(0.1)))
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        raw = ((sigma * model(x + sigma * eps, sigma) + eps) ** 2).sum(dim=1).mean()
        if self.nan_at is not None and calls == self.nan_at:
            raw = raw * float("nan")
        total = raw * torch.exp(-self.c) + self.c
        return ObjectiveOutput(loss=total, logs={"raw_loss": float(raw.detach()), "sigma": float(sigma)})


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_same_log(a: pd.DataFrame, b: pd.DataFrame) -> None:
    # "seconds" is wall-clock time, the only column allowed to differ
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"), check_exact=True)


def run(steps: int = 12, seed: int = 0, model_seed: int = 0, objective: TinyDSM | None = None, data=None, **kw):
    model = TinyScoreNet(seed=model_seed)
    objective = objective if objective is not None else TinyDSM()
    data = gaussian_data() if data is None else data
    kw.setdefault("batch_size", 64)
    kw.setdefault("lr", 3e-3)
    kw.setdefault("ema_decay", 0.9)
    return train(model, objective, data, steps=steps, seed=seed, **kw), objective


# ---------------------------------------------------------------------------- tests
def excess_dsm_loss(model: nn.Module) -> float:
    """E |sigma (f(x, sigma) - s_sigma(x))|^2 under p_sigma = N(0, Sigma + sigma^2 I), averaged over
    sigma in {0.1, 0.2, 0.5, 1}: the DSM loss minus its minimum (s_sigma the exact smoothed score),
    estimated on 4000 fixed samples per sigma."""
    g = _gen(123)
    total = 0.0
    with torch.no_grad():
        for s in (0.1, 0.2, 0.5, 1.0):
            cov = SIGMA_DATA + s**2 * torch.eye(2)
            x = torch.randn(4000, 2, generator=g) @ torch.linalg.cholesky(cov).T
            score = -x @ torch.linalg.inv(cov)
            total += float(((s * (model(x, torch.tensor(s)) - score)) ** 2).sum(1).mean())
    return total / 4


def test_loss_decreases_on_2d_gaussian():
    initial = excess_dsm_loss(TinyScoreNet())
    result, objective = run(steps=200, batch_size=128, lr=1e-2)
    assert isinstance(result, TrainResult) and result.steps_done == 200
    log = result.log
    assert list(log.columns[:5]) == ["step", "loss", "grad_norm", "lr", "seconds"]
    assert {"raw_loss", "sigma"} <= set(log.columns)
    assert log["step"].tolist() == list(range(1, 201))
    # the logged loss has a floor of ~1.5 (the DSM minimum) and per-step noise ~0.4, so the
    # decisive check is the excess over the minimum, computed against the exact score:
    # 0.61 untrained -> 0.02 after 200 steps; require a 10-fold drop, for the EMA weights too
    assert log["raw_loss"].iloc[-50:].mean() < log["raw_loss"].iloc[:50].mean()
    assert excess_dsm_loss(result.model) < 0.1 * initial, initial
    assert excess_dsm_loss(result.ema_model) < 0.1 * initial, initial
    assert float(objective.c.detach()) != 0.0  # the objective's parameter was optimised
    assert int(objective.calls) == 200
    assert (log["lr"] == 1e-2).all() and (log["grad_norm"] > 0).all()


def test_same_seed_bit_identical_and_different_seed_differs():
    a, _ = run(seed=3)
    b, _ = run(seed=3)
    assert_same_state(a.model, b.model)
    assert_same_state(a.ema_model, b.ema_model)
    assert_same_log(a.log, b.log)
    c, _ = run(seed=4)
    assert not torch.equal(a.model.net[0].weight, c.model.net[0].weight)


def test_callable_data_is_seeded_too():
    chol = torch.linalg.cholesky(SIGMA_DATA)

    def sample(n, generator=None):
        return torch.randn(n, 2, generator=generator) @ chol.T

    a, _ = run(data=sample, seed=1)
    b, _ = run(data=sample, seed=1)
    assert_same_state(a.model, b.model)
    assert_same_log(a.log, b.log)


def test_resume_after_crash_is_bit_identical(tmp_path):
    full, full_obj = run(steps=12, checkpoint=tmp_path / "full.pt", checkpoint_every=5)
    # interrupted run: crashes during step 8, last checkpoint at step 6
    path = tmp_path / "run.pt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(steps=12, checkpoint=path, checkpoint_every=3, objective=TinyDSM(crash_at=8))
    saved = load_checkpoint(path)
    assert saved["step"] == 6 and len(saved["log"]) == 6
    # resume into a differently initialised model and a fresh objective: the checkpoint wins
    resumed, resumed_obj = run(steps=12, model_seed=99, checkpoint=path, checkpoint_every=3, resume=True)
    assert resumed.steps_done == 12
    assert_same_state(full.model, resumed.model)
    assert_same_state(full.ema_model, resumed.ema_model)
    assert_same_state(full_obj, resumed_obj)
    assert_same_log(full.log, resumed.log)
    final = load_checkpoint(path)
    assert final["step"] == 12 and final["error"] is None
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resume_from_shorter_run_and_missing_file(tmp_path):
    full, _ = run(steps=10)
    path = tmp_path / "short.pt"
    first, _ = run(steps=4, checkpoint=path)
    assert load_checkpoint(path)["step"] == 4
    resumed, _ = run(steps=10, checkpoint=path, resume=True)
    assert_same_state(full.model, resumed.model)
    assert_same_log(full.log, resumed.log)
    # a checkpoint already at `steps` returns without training
    again, obj = run(steps=10, checkpoint=path, resume=True)
    assert again.steps_done == 10 and int(obj.calls) == 10  # restored, not called again
    assert_same_state(full.model, again.model)
    # resume=True without an existing file starts afresh
    fresh, _ = run(steps=10, checkpoint=tmp_path / "missing.pt", resume=True)
    assert_same_state(full.model, fresh.model)
    with pytest.raises(ValueError, match="seed"):
        run(steps=12, seed=5, checkpoint=path, resume=True)
    with pytest.raises(ValueError, match="past steps"):
        run(steps=8, checkpoint=path, resume=True)


def test_nan_loss_raises_naming_the_step(tmp_path):
    path = tmp_path / "nan.pt"
    with pytest.raises(ValueError, match=r"non-finite loss .* at step 4"):
        run(steps=10, checkpoint=path, objective=TinyDSM(nan_at=4))
    saved = load_checkpoint(path)
    assert saved["step"] == 3 and [row["step"] for row in saved["log"]] == [1, 2, 3]
    assert "step 4" in saved["error"]
    assert all(bool(torch.isfinite(v).all()) for v in saved["model"].values())
    with pytest.raises(ValueError, match="step 2"):
        run(steps=5, objective=TinyDSM(nan_at=2))  # without a checkpoint too


class Vector(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))


class Quadratic(Objective):
    """loss = |w - target|^2; records the weights it is called with (p_0, ..., p_{K-1})."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.target = torch.tensor([0.3, 0.2, -0.1], dtype=torch.float64)

    def forward(self, model, x, generator=None):
        self.seen.append(model.w.detach().clone())
        return ObjectiveOutput(loss=((model.w - self.target) ** 2).sum() + 0 * x.sum())


@pytest.mark.parametrize("decay", [0.9, 0.0, 1.0])
def test_ema_matches_analytic_recursion(decay):
    objective = Quadratic()
    data = torch.zeros(10, 1, dtype=torch.float64)
    result = train(Vector(), objective, data, steps=20, batch_size=4, lr=0.05, ema_decay=decay, grad_clip=None)
    weights = objective.seen + [result.model.w.detach()]  # p_0 ... p_20
    ema = weights[0].clone()
    for p in weights[1:]:
        ema = decay * ema + (1 - decay) * p
    torch.testing.assert_close(result.ema_model.w, ema, rtol=1e-12, atol=1e-14)
    if decay == 0.0:
        assert torch.equal(result.ema_model.w, result.model.w)
    if decay == 1.0:
        assert torch.equal(result.ema_model.w, weights[0])
    if decay == 0.9:
        assert not torch.allclose(result.ema_model.w, result.model.w, atol=1e-3)  # the average lags
    assert result.ema_model is not result.model and not result.ema_model.w.requires_grad
    # logged gradient norm is |2 (p_{k-1} - target)|, before clipping
    expected = [float(2 * (p - objective.target).norm()) for p in objective.seen]
    assert result.log["grad_norm"].tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("clip", [0.05, None])
def test_updates_match_hand_written_adam_with_clipping(clip):
    # the reference: plain torch.optim.Adam on the gradient rescaled by min(1, clip / (|g| + 1e-6))
    data = torch.zeros(4, 1, dtype=torch.float64)
    result = train(Vector(), Quadratic(), data, steps=15, batch_size=2, lr=0.1, grad_clip=clip)
    ref = Vector()
    target = Quadratic().target
    opt = torch.optim.Adam(ref.parameters(), lr=0.1)
    for _ in range(15):
        opt.zero_grad()
        ((ref.w - target) ** 2).sum().backward()
        if clip is not None:
            ref.w.grad.mul_(min(1.0, clip / (float(ref.w.grad.norm()) + 1e-6)))
        opt.step()
    torch.testing.assert_close(result.model.w, ref.w.detach(), rtol=1e-12, atol=1e-14)
    if clip is not None:  # clipping was active and changes the trajectory
        assert (result.log["grad_norm"] > clip).all()
        unclipped = train(Vector(), Quadratic(), data, steps=15, batch_size=2, lr=0.1, grad_clip=None)
        assert not torch.allclose(unclipped.model.w, result.model.w)


def test_log_every_and_columns():
    result, _ = run(steps=12, log_every=5)
    assert result.log["step"].tolist() == [5, 10, 12]
    assert result.log["step"].dtype == "int64"


def test_bad_arguments_raise():
    data = gaussian_data(100)
    model, objective = TinyScoreNet(), TinyDSM()
    ok = dict(steps=2, batch_size=8)
    for kwargs, match in [
        (dict(ok, steps=0), "steps"),
        (dict(ok, batch_size=0), "batch_size"),
        (dict(ok, lr=0.0), "lr"),
        (dict(ok, lr=-1e-3), "lr"),
        (dict(ok, ema_decay=1.5), "ema_decay"),
        (dict(ok, grad_clip=0.0), "grad_clip"),
        (dict(ok, log_every=0), "log_every"),
        (dict(ok, resume=True), "checkpoint"),
        (dict(ok, checkpoint_every=3), "checkpoint"),
    ]:
        with pytest.raises(ValueError, match=match):
            train(model, objective, data, **kwargs)
    bad = data.clone()
    bad[5, 0] = float("nan")
    with pytest.raises(ValueError, match="data"):
        train(model, objective, bad, **ok)
    with pytest.raises(ValueError, match="data"):
        train(model, objective, data[:, 0], **ok)
    with pytest.raises(ValueError, match="data"):
        train(model, objective, "not data", **ok)
    with pytest.raises(ValueError, match="data"):
        train(model, objective, lambda n, generator=None: torch.full((n, 2), float("nan")), **ok)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, fh):
        fh.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr("fluxbench.train.checkpoint.torch.save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


@pytest.mark.parametrize(
    "change,name",
    [(dict(lr=1e-3), "lr"), (dict(objective_kind="other"), "objective"), (dict(ema_decay=0.5), "ema_decay")],
)
def test_resume_refuses_changed_settings(tmp_path, change, name):
    """A new learning rate, objective or EMA decay was silently ignored (or applied from the
    middle of the run on) when resuming; the checkpoint's run must be continued as it was."""
    path = tmp_path / "run.pt"
    run(steps=4, checkpoint=path)
    kw = dict(change)
    if kw.pop("objective_kind", None):
        kw["objective"] = FluxMatching(0.3)
    with pytest.raises(ValueError, match=rf"written with {name}=.* but this run has {name}="):
        run(steps=8, checkpoint=path, resume=True, **kw)


def test_resume_sees_a_changed_noise_level(tmp_path):
    path = tmp_path / "run.pt"
    model = MLPField(2, hidden=(16,), sigma_conditioned=True)
    train(model, FluxMatching(0.3), gaussian_data(), steps=2, batch_size=16, checkpoint=path)
    with pytest.raises(ValueError, match="objective="):
        train(model, FluxMatching(0.5), gaussian_data(), steps=4, batch_size=16, checkpoint=path, resume=True)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", "foreign"])
def test_resume_from_an_empty_or_foreign_checkpoint_is_a_clear_error(tmp_path, content):
    """An empty file raised EOFError() and a foreign torch file KeyError: 'config'."""
    path = tmp_path / "run.pt"
    if content == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="cannot resume from"):
        run(steps=4, checkpoint=path, resume=True)


def test_a_directory_as_checkpoint_fails_before_training(tmp_path):
    """checkpoint=<a directory> failed only when the first checkpoint was written, after training."""
    objective = TinyDSM()
    with pytest.raises(ValueError, match="is a directory"):
        run(steps=50, checkpoint=tmp_path, objective=objective)
    assert int(objective.calls) == 0
