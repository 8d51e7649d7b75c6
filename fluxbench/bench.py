"""Time one training step of Flux Matching against DSM on the same MLP.

    fluxbench bench                                 # B in {256, 1024, 4096}, d in {2, 64, 784}
    fluxbench bench --batch 256 --dim 2 --repeats 30
    fluxbench bench --device cuda --batch 4096 16384 --dim 2 64

A step is: loss, backward, Adam update. All objectives run on the same MLP
(d -> 128 -> 128 -> d, SiLU) at one sigma: Flux Matching with every anchor's reference
chain (``flux``, the reference estimator) and with a quarter of the chains reweighted
(``flux_B/4``, ``chains=B/4``: the same expectation, more variance), plain DSM (``dsm``,
the baseline of the ratios) and DSM with the batch-posterior target (``dsm_batch``). The steps are interleaved (FM, DSM, FM, ...)
so the ratios compare like with like on a shared, noisy machine; each time is the
median over ``repeats`` steps after ``warmup`` steps. ``benchmarks/`` (asv) reuses
:func:`step_functions`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import pandas as pd
import torch

from .fields import MLPField
from .objectives import DenoisingScoreMatching, FluxMatching

__all__ = ["step_functions", "time_steps", "main"]


def step_functions(
    batch: int, dim: int, *, sigma: float = 0.3, seed: int = 0, device: str | torch.device = "cpu"
) -> dict[str, Callable[[], None]]:
    """One closure per objective that performs one full training step on ``device`` when called."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    data = torch.randn(batch, dim, generator=gen, device=device)
    objectives = {
        "flux": FluxMatching(sigma),
        "flux_quarter": FluxMatching(sigma, chains=max(1, batch // 4)),
        "dsm": DenoisingScoreMatching(sigma),
        "dsm_batch": DenoisingScoreMatching(sigma, target="batch"),
    }
    steps = {}
    for name, objective in objectives.items():
        torch.manual_seed(seed)
        model = MLPField(dim).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt, objective=objective) -> None:
            out = objective(model, data, gen)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()

        steps[name] = step
    return steps


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (asynchronous accelerators); nothing on CPU."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def time_steps(
    steps: dict[str, Callable[[], None]], *, repeats: int, warmup: int = 3, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """Median seconds per step for each closure, measured interleaved (device-synchronised)."""
    device = torch.device(device)
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            _synchronize(device)
            t0 = time.perf_counter()
            fn()
            _synchronize(device)
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for result records."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(
        prog="fluxbench bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, nargs="+", default=[2, 64, 784])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sigma", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        parser.error(f"--device {args.device!r} is not usable here: {exc}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for dim in args.dim:
        for batch in args.batch:
            repeats = max(3, args.repeats // (4 if batch * dim > 1_000_000 else 1))
            steps = step_functions(batch, dim, sigma=args.sigma, device=device)
            t = time_steps(steps, repeats=repeats, device=device)
            rows.append(
                {
                    "d": dim,
                    "B": batch,
                    "flux_ms": 1e3 * t["flux"],
                    "flux_B/4_ms": 1e3 * t["flux_quarter"],
                    "dsm_ms": 1e3 * t["dsm"],
                    "dsm_batch_ms": 1e3 * t["dsm_batch"],
                    "flux/dsm": t["flux"] / t["dsm"],
                    "flux_B/4/dsm": t["flux_quarter"] / t["dsm"],
                }
            )
    table = pd.DataFrame(rows)
    print(
        f"# one training step (loss + backward + Adam), MLP d-128-128-d, sigma={args.sigma}; "
        f"median of interleaved steps; torch {torch.__version__}, device {device}, "
        f"{torch.get_num_threads()} threads, {cpu_model()}"
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return table


if __name__ == "__main__":
    main()
