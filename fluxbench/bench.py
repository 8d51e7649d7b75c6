"""Time one training step of Flux Matching against DSM on the same MLP.

    fluxbench bench                                 # B in {256, 1024, 4096}, d in {2, 64, 784}
    fluxbench bench --batch 256 --dim 2 --repeats 30
    fluxbench bench --device cuda --table gpu --published ~/flux-matching/src/loss.py:LOSS_FN

A step is: loss, backward, Adam update. All objectives run on the same MLP
(d -> 128 -> 128 -> d, SiLU) at one sigma: Flux Matching with every anchor's reference
chain (``flux``, the reference estimator) and with a quarter of the chains reweighted
(``flux_B/4``, ``chains=B/4``: the same expectation, more variance), plain DSM (``dsm``,
the baseline of the ratios) and DSM with the batch-posterior target (``dsm_batch``). The steps are interleaved (FM, DSM, FM, ...)
so the ratios compare like with like on a shared, noisy machine; each time is the
median over at least ``--repeats`` rounds and at least ``--min-time`` seconds of them,
after ``warmup`` steps (device-synchronised on accelerators). ``benchmarks/`` (asv) reuses :func:`step_functions`.

Also printed: the published loss's step (``--published FILE:FUNCTION``, a user's checkout
of Pao-Huang et al.'s ``src/loss.py``, called as ``FUNCTION(model, x, sigma**2)``; it
cannot be vendored) and its ratio to ours, and the flux step's peak memory
(``torch.cuda.max_memory_allocated`` on CUDA; NA elsewhere). ``--compile`` takes the
compiled path: on CPU the loss's block sums in fused compiled loops, on accelerators
the network and the optimiser update through ``torch.compile``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from ._pairwise import use_compiled
from .fields import MLPField
from .objectives import DenoisingScoreMatching, FluxMatching

__all__ = ["step_functions", "time_steps", "load_published", "flux_peak_memory", "TABLES", "main"]

# Row presets of --table: "gpu" spans launch-bound small batches to B = 65536 (d = 2) and wide data (d = 64, 784).
TABLES: dict[str, list[tuple[int, int]]] = {
    "gpu": [(256, 2), (4096, 2), (16384, 2), (65536, 2), (4096, 64), (1024, 784), (4096, 784)],
}


def load_published(spec: str) -> Callable:
    """The published loss from ``FILE:FUNCTION`` (FILE a ``loss.py``, or a checkout holding
    ``src/loss.py``), imported from that path.

    Raises:
        ValueError: on a spec without ``:FUNCTION``, a missing file, or a missing function.
    """
    path, sep, function = spec.rpartition(":")
    if not sep or not path or not function:
        raise ValueError(f"--published needs FILE:FUNCTION (e.g. ~/flux-matching/src/loss.py:loss_fn); got {spec!r}")
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "src" / "loss.py"
    if not file.is_file():
        raise ValueError(f"--published: no published loss at {file} (point it at a checkout's src/loss.py)")
    module_spec = importlib.util.spec_from_file_location(f"published_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ValueError(f"--published: {file} defines no function {function!r}")
    return fn


def step_functions(
    batch: int,
    dim: int,
    *,
    sigma: float = 0.3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    compile: bool = False,
    published: Callable | None = None,
) -> dict[str, Callable[[], None]]:
    """One closure per objective that performs one full training step on ``device`` when called.

    Keys: ``flux``, ``flux_quarter`` (a quarter of the chains), ``dsm``, ``dsm_batch``, and
    ``published`` when the published loss ``published(model, x, sigma**2)`` is given (see
    :func:`load_published`). With ``compile=True`` the loss's block sums on CPU take the
    compiled kernel of ``fluxbench._pairwise.compiled`` (the rest of the pairwise work
    stays eager: its control flow depends on the data), and on other devices each step's
    network and Adam update run through ``torch.compile``; the first calls compile.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    data = torch.randn(batch, dim, generator=gen, device=device)
    objectives: dict[str, Callable] = {
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
        steps[name] = _training_step(model, opt, lambda model, objective=objective: objective(model, data, gen).loss, compile)
    if published is not None:
        torch.manual_seed(seed)
        model = MLPField(dim).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        steps["published"] = _training_step(model, opt, lambda model: published(model, data, sigma * sigma).mean(), compile)
    return steps


def _training_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_of: Callable, compile: bool) -> Callable[[], None]:
    """loss, backward, Adam update. With ``compile``: on CPU the loss's block sums compiled
    (``use_compiled``); elsewhere also the network's forward and the update, which on CPU
    made steps slower (B = 256, d = 2 on the AMD EPYC here: flux 11.8 ms against 2.7 ms,
    DSM 1.3 ms against 0.74 ms)."""
    if compile and next(model.parameters()).device.type != "cpu":
        model.forward = torch.compile(model.forward)
        update = torch.compile(opt.step)
    else:
        update = opt.step

    def step(model=model, opt=opt) -> None:
        with use_compiled(compile):
            loss = loss_of(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        update()

    return step


def flux_peak_memory(step: Callable[[], None], device: str | torch.device) -> float:
    """Peak bytes allocated during one call of ``step`` (CUDA: ``max_memory_allocated``
    above what was held before); NaN on devices without an allocator record."""
    device = torch.device(device)
    if device.type != "cuda":
        return math.nan
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - before)


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (asynchronous accelerators); nothing on CPU."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def time_steps(
    steps: dict[str, Callable[[], None]],
    *,
    repeats: int,
    warmup: int = 3,
    device: str | torch.device = "cpu",
    min_time: float = 0.0,
    max_repeats: int | None = None,
) -> dict[str, float]:
    """Median seconds per step for each closure, measured interleaved (device-synchronised).

    At least ``repeats`` rounds (one call of every closure each), then more until the
    measured rounds took ``min_time`` seconds in all, up to ``max_repeats`` rounds (default
    20 x ``repeats``): timeit's autorange idea, so that millisecond steps get as many
    samples as their medians need.
    """
    device = torch.device(device)
    cap = max(repeats, 20 * repeats if max_repeats is None else max_repeats)
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    spent, rounds = 0.0, 0
    while rounds < repeats or (spent < min_time and rounds < cap):
        for name, fn in steps.items():
            _synchronize(device)
            t0 = time.perf_counter()
            fn()
            _synchronize(device)
            samples[name].append(time.perf_counter() - t0)
            spent += samples[name][-1]
        rounds += 1
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


_EPILOG = """examples:
  python -m fluxbench.bench --batch 256 4096 --dim 2                  # the CPU ratios
  python -m fluxbench.bench --device cuda --table gpu                # small and large batches, narrow and wide data
  python -m fluxbench.bench --device cuda --table gpu \\
      --published ~/flux-matching/src/loss.py:LOSS_FN                   # with the published loss
  python -m fluxbench.bench --batch 256 --dim 2 --compile             # torch.compile'd steps
"""


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(
        prog="fluxbench bench", description=__doc__, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, nargs="+", default=[2, 64, 784])
    parser.add_argument("--table", choices=sorted(TABLES), default=None, help="a preset of (B, d) rows instead of --batch x --dim")
    parser.add_argument("--repeats", type=int, default=15, help="at least this many interleaved rounds (default 15)")
    parser.add_argument(
        "--min-time", type=float, default=2.0,
        help="and more rounds until they took this many seconds in all, up to 20x --repeats (default 2): at "
        "B = 256 the median of 15 rounds moved by 6%% between runs on a shared 2-core CPU, of 100 by 2%%",
    )  # fmt: skip
    parser.add_argument("--sigma", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument(
        "--compile", action="store_true",
        help="compiled steps: CPU, the loss's block sums; other devices, the network and update (torch.compile)",
    )  # fmt: skip
    parser.add_argument(
        "--published", default=None, metavar="FILE:FUNCTION",
        help="the published loss (a checkout's src/loss.py and its loss function, called as FUNCTION(model, x, sigma**2))",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        parser.error(f"--device {args.device!r} is not usable here: {exc}")
    try:
        published = None if args.published is None else load_published(args.published)
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = TABLES[args.table] if args.table else [(b, d) for d in args.dim for b in args.batch]
    rows = []
    for batch, dim in shapes:
        repeats = max(3, args.repeats // (4 if batch * dim > 1_000_000 else 1))
        steps = step_functions(batch, dim, sigma=args.sigma, device=device, compile=args.compile, published=published)
        t = time_steps(steps, repeats=repeats, device=device, min_time=args.min_time)
        pub = t.get("published", math.nan)
        rows.append(
            {
                "B": batch,
                "d": dim,
                "flux_ms": 1e3 * t["flux"],
                "dsm_ms": 1e3 * t["dsm"],
                "flux/dsm": t["flux"] / t["dsm"],
                "published_ms": 1e3 * pub,
                "published/flux": pub / t["flux"],
                "flux_peak_MB": flux_peak_memory(steps["flux"], device) / 2**20,
                "flux_B/4_ms": 1e3 * t["flux_quarter"],
                "flux_B/4/dsm": t["flux_quarter"] / t["dsm"],
                "dsm_batch_ms": 1e3 * t["dsm_batch"],
            }
        )
    table = pd.DataFrame(rows)
    sync = "CUDA-synchronised " if device.type == "cuda" else ""
    print(
        f"# one training step (loss + backward + Adam), MLP d-128-128-d, sigma={args.sigma}; "
        f"{sync}median of interleaved steps{', torch.compile' if args.compile else ''}; torch {torch.__version__}, "
        f"device {_device_name(device)}, {torch.get_num_threads()} threads, {cpu_model()}"
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="NA"))
    return table


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


if __name__ == "__main__":
    main()
