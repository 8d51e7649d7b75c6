"""Shared pieces of the benchmarks: devices, skips, threads, fixed-seed data, training steps.

asv runs each benchmark in a process forked from one that imported these modules, so torch
is imported here once, at module level. fluxbench's own names are looked up inside
``setup`` through :func:`require`: a commit that lacks one skips that benchmark (asv's
``NotImplementedError``) instead of failing the whole module's import.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "DEVICES",
    "SEED",
    "CPU_MAX_B2D",
    "setup_device",
    "require",
    "skip_if",
    "synchronize",
    "generator",
    "call_on_device",
    "skip_slow_flux_on_cpu",
    "training_steps",
    "cuda_peak_bytes",
]

DEVICES = ["cpu", "cuda"]
SEED = 0
# CPU benchmarks run on one torch thread by default: the figures compare commits, and one
# thread is what a shared 2-core machine measures without noise from the other core.
THREADS = int(os.environ.get("FLUXBENCH_BENCH_THREADS", "1"))
# The flux step costs O(B^2 d). Measured on one core of an AMD EPYC (fluxbench at f69c9bb):
# B^2 d = 5.4e8 (B 16384, d 2) 2.4 s a step, 8.2e8 (1024, 784) 0.43 s, 1.1e9 (4096, 64)
# 0.54 s; 1.3e10 (4096, 784) 5.7 s and 1.7e10 (16384, 64) 10 s. Above this bound a size runs
# on an accelerator only.
CPU_MAX_B2D = 2e9


def available_devices() -> list[torch.device]:
    """The devices of ``DEVICES`` this machine has (for ``setup_cache``, which takes no parameters)."""
    return [torch.device(d) for d in DEVICES if d == "cpu" or torch.cuda.is_available()]


def setup_device(device: str) -> torch.device:
    """The benchmark's torch device; ``NotImplementedError`` (asv: skipped) where it is absent."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NotImplementedError("no CUDA device on this machine")
    if dev.type == "cpu":
        torch.set_num_threads(THREADS)
    return dev


def require(module: str, *names: str):
    """Import ``module`` (e.g. ``"fluxbench.recipes"``) and check it has ``names``.

    Raises:
        NotImplementedError: the benchmarked commit's fluxbench lacks the module or a name
            (asv records the benchmark as skipped for that commit).
    """
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise NotImplementedError(f"{module} is not in this commit's fluxbench: {exc}") from exc
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise NotImplementedError(f"{module} has no {', '.join(missing)} in this commit")
    return mod


def skip_if(condition: bool, why: str) -> None:
    """Skip the benchmark (asv's ``NotImplementedError`` from setup) when ``condition`` holds."""
    if condition:
        raise NotImplementedError(why)


def synchronize(device: torch.device) -> None:
    """Wait for an asynchronous device's queued work, so a timing covers it; nothing on CPU."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def generator(device: torch.device, seed: int = SEED) -> torch.Generator:
    """A torch.Generator on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(seed)


def call_on_device(fn: Callable, *args, device: torch.device, **kwargs):
    """``fn(*args, device=device, **kwargs)``; a function of an older commit without a
    ``device`` parameter (CPU only then) is called without it, or skipped off the CPU."""
    if "device" in inspect.signature(fn).parameters:
        return fn(*args, device=device, **kwargs)
    skip_if(device.type != "cpu", f"this commit's {fn.__qualname__} has no device parameter")
    return fn(*args, **kwargs)


def skip_slow_flux_on_cpu(device: torch.device, batch: int, dim: int) -> None:
    """Skip sizes whose flux step takes more than a few seconds on the CPU (see CPU_MAX_B2D)."""
    skip_if(
        device.type == "cpu" and batch * batch * dim > CPU_MAX_B2D,
        f"B={batch}, d={dim}: a flux step takes more than a few seconds on the CPU; runs on CUDA only",
    )


def _sequential(dim: int, hidden: int = 128) -> nn.Module:
    """A user's own network, d -> 128 -> 128 -> d with SiLU: the shape of MLPField(d), but
    a plain nn.Sequential, so the flux loss takes its autograd fallback for the pullback."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))


def _sequential_steps(batch: int, dim: int, device: torch.device, sigma: float = 0.3) -> dict[str, Callable[[], None]]:
    """One full training step (loss, backward, Adam) per objective on a plain nn.Sequential,
    like ``fluxbench.bench.step_functions`` does on MLPField. Keys ``flux`` and ``dsm``."""
    objectives = require("fluxbench.objectives", "FluxMatching", "DenoisingScoreMatching")
    gen = generator(device)
    data = torch.randn(batch, dim, generator=gen, device=device)
    steps = {}
    for name, objective in (("flux", objectives.FluxMatching(sigma)), ("dsm", objectives.DenoisingScoreMatching(sigma))):
        torch.manual_seed(SEED)
        model = _sequential(dim).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt, objective=objective) -> None:
            out = objective(model, data, gen)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()

        steps[name] = step
    return steps


def training_steps(network: str, batch: int, dim: int, device: torch.device) -> dict[str, Callable[[], None]]:
    """Closures ``flux`` and ``dsm``, each one training step on the same fixed-seed (B, d) batch.

    ``network="mlp"``: :class:`fluxbench.fields.MLPField` through
    ``fluxbench.bench.step_functions`` (the steps ``fluxbench bench`` times; closed-form
    pullback). ``network="sequential"``: a plain ``torch.nn.Sequential`` of the same shape
    (autograd fallback).
    """
    if network == "mlp":
        bench = require("fluxbench.bench", "step_functions")
        steps = call_on_device(bench.step_functions, batch, dim, seed=SEED, device=device)
        return {"flux": steps["flux"], "dsm": steps["dsm"]}
    if network == "sequential":
        return _sequential_steps(batch, dim, device)
    raise ValueError(f"network must be 'mlp' or 'sequential'; got {network!r}")


def cuda_peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by torch on ``device`` while ``fn()`` runs (CUDA only)."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))
