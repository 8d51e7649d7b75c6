"""Two processes with the gloo backend on this CPU: DDP training keeps the ranks' weights
identical (per-rank losses and the gathered batch), resume works across ranks, and the
gathered-batch field's gradients equal the single-process ones. The control run without
DDP's gradient synchronisation ends with different weights, so the identity is not free.

All scenarios run in one pair of spawned processes (a module fixture) to pay the start-up
once; each test checks one scenario's outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fluxbench.images.distributed import GatheredField
from fluxbench.images.precond import EDMField
from fluxbench.images.flatten import image_objective
from fluxbench.images.train import step_seed, train_images
from fluxbench.images.unet import small_unet

WORLD = 2
STEPS = 4
OPTIONS = {"chains": 8}


def _field(seed: int) -> EDMField:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EDMField(small_unet(1, channels=8))


def _data() -> torch.Tensor:
    return torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _train(seed_init: int, root, with_log: bool = False, **kwargs):
    # different initial weights per rank: DDP must broadcast rank 0's
    field = _field(seed_init)
    result = train_images(field, _data(), method=kwargs.pop("method", "flux"), steps=kwargs.pop("steps", STEPS),
                          batch_size=8, lr=1e-3, aux_lr=1e-2, objective_options=OPTIONS, log_every=1, **kwargs)
    state = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    return (state, result.log) if with_log else state


def _first_step_gradient_norm() -> float:
    """The model's gradient norm at step 1 of a gathered-batch run, computed in one process:
    the objective on both ranks' batches concatenated, with the shared "objective" stream."""
    data, field = _data(), _field(0)
    batches = []
    for r in range(WORLD):
        gen = torch.Generator().manual_seed(step_seed(0, 1, f"data/{r}"))
        batches.append(data[torch.randint(0, data.shape[0], (8,), generator=gen)])
    objective = image_objective("flux", **OPTIONS).double()
    gen = torch.Generator().manual_seed(step_seed(0, 1, "objective"))
    objective(field, torch.cat(batches), gen).loss.backward()
    return float(torch.nn.utils.clip_grad_norm_(list(field.parameters()), float("inf")))


def _gathered_gradients() -> dict[str, float]:
    """Max differences between GatheredField and the plain field: values, input gradient,
    second input derivative, and parameter gradients summed over ranks."""
    net = _field(7).double()
    gen = torch.Generator().manual_seed(1)  # the same on every rank
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.randn(5, 1, 8, 8, generator=gen, dtype=torch.float64)  # 5 rows: padded to 6
    w = torch.randn(5, 1, 8, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(5, 1, 8, 8, generator=gen, dtype=torch.float64)
    params = list(net.parameters())

    def derivatives(field):
        z = x.clone().requires_grad_(True)
        out = field(z, 0.5)
        grads = torch.autograd.grad((out * w).sum(), [z, *params], create_graph=True)
        (second,) = torch.autograd.grad((grads[0] * v).sum(), z)
        return out.detach(), grads[0].detach(), second, [g.detach() for g in grads[1:]]

    ref = derivatives(net)
    got = derivatives(GatheredField(net, dist.new_group()))
    summed = []
    for g in got[3]:
        g = g.clone()
        dist.all_reduce(g)
        summed.append(g)
    return {
        "value": float((ref[0] - got[0]).abs().max()),
        "input_grad": float((ref[1] - got[1]).abs().max()),
        "second": float((ref[2] - got[2]).abs().max()),
        "param_grad": max(float((a - b).abs().max()) for a, b in zip(ref[3], summed)),
        "param_grad_scale": max(float(a.abs().max()) for a in ref[3]),
    }


def _worker(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=WORLD)
    try:
        out = {"gathered": _gathered_gradients()}
        out["per_rank"] = _train(rank, root)
        out["dsm"] = _train(rank, root, method="dsm")
        out["gather_batch"], log = _train(rank, root, with_log=True, gather_batch=True)
        out["gather_norm"] = float(log["grad_norm"].iloc[0])
        out["single_norm"] = _first_step_gradient_norm()
        out["bf16"] = _train(rank, root, precision="bf16")
        ckpt = f"{root}/resume.pt"
        _train(rank, root, steps=2, checkpoint=ckpt)
        out["resumed"] = _train(rank + 10, root, checkpoint=ckpt, resume=True)
        # the control: the same run with DDP replaced by the bare module (no gradient sync)
        ddp = torch.nn.parallel.DistributedDataParallel
        torch.nn.parallel.DistributedDataParallel = lambda module, **kwargs: module
        try:
            out["no_sync"] = _train(0, root)
        finally:
            torch.nn.parallel.DistributedDataParallel = ddp
        torch.save(out, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(str(root),), nprocs=WORLD, start_method="spawn")
    return [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("scenario", ["per_rank", "dsm", "gather_batch", "bf16", "resumed"])
def test_ranks_end_with_identical_weights(ranks, scenario):
    assert _max_diff(ranks[0][scenario], ranks[1][scenario]) == 0.0


def test_without_gradient_sync_the_ranks_drift_apart(ranks):
    """The negative control: same initial weights, different batches, no DDP."""
    assert _max_diff(ranks[0]["no_sync"], ranks[1]["no_sync"]) > 1e-6


def test_training_moved_the_weights(ranks):
    assert _max_diff(ranks[0]["per_rank"], _field(0).state_dict()) > 1e-6


def test_resumed_run_equals_the_uninterrupted_one(ranks):
    """2 steps, a checkpoint, then 2 more from other initial weights (overwritten by the
    checkpoint): the same weights as 4 steps at once, bit for bit."""
    assert _max_diff(ranks[0]["resumed"], ranks[0]["per_rank"]) == 0.0


def test_gathered_field_has_the_single_process_derivatives(ranks):
    """float64: the gathered and plain computations differ only by summation order."""
    for r in ranks:
        g = r["gathered"]
        assert g["value"] < 1e-13
        assert g["input_grad"] < 1e-12 and g["second"] < 1e-10
        assert g["param_grad"] < 1e-12 * max(1.0, g["param_grad_scale"])


def test_gathered_batch_gradient_is_the_one_process_gradient_of_the_whole_batch(ranks):
    """Each rank back-propagates only through its half of the rows; DDP averages, the loop
    multiplies by W: the gradient is that of one loss on the W*B images (float32 rounding of
    two differently ordered sums of ~1e5 terms: 1e-4 relative)."""
    for r in ranks:
        assert r["gather_norm"] == pytest.approx(r["single_norm"], rel=1e-4)
