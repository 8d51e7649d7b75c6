"""Tests of fluxbench.samplers.rollout: langevin_rollout and log_spaced.

The rollout must reproduce fluxbench.samplers.langevin draw for draw (bitwise on CPU) from
the same generator state, at every checkpoint and in the thinned trace.
"""

from __future__ import annotations

import pytest
import torch

from fluxbench.fields import MLPField
from fluxbench.samplers import Rollout, langevin, langevin_rollout, log_spaced


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_field(x: torch.Tensor) -> torch.Tensor:
    return -x @ torch.tensor([[1.0, 0.5], [-0.5, 2.0]], dtype=x.dtype).T


@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("field", ["linear", "mlp"])
def test_rollout_equals_langevin_draw_for_draw(field, chunk_size):
    torch.manual_seed(0)
    f = linear_field if field == "linear" else MLPField(2, hidden=(16,))
    x0 = torch.randn(20, 2, generator=gen(0))
    steps = [0, 1, 3, 10, 40]
    out = langevin_rollout(f, x0, step_size=0.05, checkpoints=steps, generator=gen(1), chunk_size=chunk_size)
    ref = langevin(f, x0, step_size=0.05, n_steps=40, generator=gen(1), thin=1, chunk_size=chunk_size)
    assert isinstance(out, Rollout) and out.steps == steps
    for s, state in zip(out.steps, out.states):
        assert torch.equal(state, ref[s]), s
    assert out.trace is None and out.trace_steps is None


def test_rollout_consumes_the_generator_like_langevin():
    """After n steps both leave the generator in the same state (one (N, d) draw per step)."""
    x0 = torch.randn(5, 2, generator=gen(0))
    g1, g2 = gen(3), gen(3)
    langevin_rollout(linear_field, x0, step_size=0.1, checkpoints=[7], generator=g1)
    langevin(linear_field, x0, step_size=0.1, n_steps=7, generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_trace_records_observables_every_thin_steps():
    x0 = torch.randn(12, 2, generator=gen(0))
    obs = lambda x: torch.stack([x[:4, 0], x[:4].square().sum(1)], 1)  # (4, 2)
    out = langevin_rollout(linear_field, x0, step_size=0.05, checkpoints=[10, 25], generator=gen(1), trace=obs, thin=3)
    ref = langevin(linear_field, x0, step_size=0.05, n_steps=25, generator=gen(1), thin=3)  # steps 0, 3, ..., 24
    assert out.trace.shape == (9, 4, 2)
    assert out.trace_steps == list(range(0, 25, 3))
    for i in range(9):
        assert torch.equal(out.trace[i], obs(ref[i])), i
    one = langevin_rollout(linear_field, x0, step_size=0.05, checkpoints=[4], generator=gen(1), trace=lambda x: x[:, 0])
    assert one.trace.shape == (5, 12, 1)


def test_checkpoints_are_sorted_deduplicated_and_copies():
    x0 = torch.randn(6, 2, generator=gen(0))
    keep = x0.clone()
    out = langevin_rollout(linear_field, x0, step_size=0.1, checkpoints=[5, 0, 5, 2], generator=gen(1))
    assert out.steps == [0, 2, 5]
    assert torch.equal(x0, keep) and torch.equal(out.states[0], x0)
    assert out.states[0].data_ptr() != x0.data_ptr()
    assert len({s.data_ptr() for s in out.states}) == 3
    assert out.seconds > 0 and out.particle_steps_per_s > 0
    only0 = langevin_rollout(linear_field, x0, step_size=0.1, checkpoints=[0], generator=gen(1))
    assert only0.steps == [0] and torch.equal(only0.states[0], x0) and only0.particle_steps_per_s == 0.0


def test_rollout_is_reproducible():
    x0 = torch.randn(6, 2, generator=gen(0))
    run = lambda seed: langevin_rollout(linear_field, x0, step_size=0.1, checkpoints=[3, 9], generator=gen(seed)).states[-1]
    assert torch.equal(run(4), run(4))
    assert not torch.equal(run(4), run(5))


def test_field_output_is_validated_on_the_first_step():
    """A NaN from the field is named at once (not only as a non-finite state at the checkpoint)."""
    with pytest.raises(ValueError, match="field output contains NaN"):
        langevin_rollout(lambda x: x * float("nan"), torch.ones(3, 2), step_size=0.1, checkpoints=[5], generator=gen(0))


def test_divergence_is_reported_at_a_checkpoint():
    x0 = torch.ones(3, 2)
    with pytest.raises(ValueError, match="non-finite by step 1000"):
        langevin_rollout(lambda x: 10 * x, x0, step_size=1.0, checkpoints=[1000], generator=gen(0))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(checkpoints=[]), "checkpoints is empty"),
        (dict(checkpoints=[3, -1]), r"checkpoints\[1\] must be >= 0"),
        (dict(checkpoints=[2.5]), r"checkpoints\[0\] must be an integer"),
        (dict(checkpoints=5), "sequence"),
        (dict(step_size=0.0), "step_size"),
        (dict(thin=0), "thin"),
        (dict(x0=torch.ones(3)), "x0"),
        (dict(generator="seed"), "generator"),
        (dict(field=3), "field must be callable"),
        (dict(trace=lambda x: x.sum()), "trace must return"),
        (dict(field=lambda x: x[:, :1]), "output has shape"),
    ],
)
def test_rollout_bad_input(kwargs, match):
    args = dict(field=linear_field, x0=torch.ones(3, 2), step_size=0.1, checkpoints=[2], generator=gen(0)) | kwargs
    with pytest.raises(ValueError, match=match):
        langevin_rollout(args.pop("field"), args.pop("x0"), **args)


def test_log_spaced():
    assert log_spaced(100, 4) == [0, 1, 2, 3, 6, 10, 18, 32, 56, 100]
    assert log_spaced(10_000, 1) == [0, 1, 10, 100, 1000, 10_000]
    assert log_spaced(0) == [0] and log_spaced(1) == [0, 1] and log_spaced(7, 1) == [0, 1, 7]
    big = log_spaced(100_000, 8)
    assert big[0] == 0 and big[-1] == 100_000 and all(b > a for a, b in zip(big[:-1], big[1:]))
    ratios = [b / a for a, b in zip(big[:-1], big[1:]) if a >= 100]  # 8 per decade: ratio 10^(1/8)
    assert all(abs(r - 10 ** (1 / 8)) < 0.01 for r in ratios[:-1]) and len(ratios) == 3 * 8
    with pytest.raises(ValueError, match="per_decade"):
        log_spaced(10, 0)
    with pytest.raises(ValueError, match="n_max"):
        log_spaced(-1)
