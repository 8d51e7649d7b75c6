"""``fluxbench images sample``: draw images from a trained field; :func:`sample_images` does the work.

Samplers (SPEC section 3), all started from x = sigma_max z, z ~ N(0, I), on EDM's rho = 7
schedule from sigma_max (80) to sigma_min (0.002):

* ``heun``: EDM's deterministic Heun sampler (:func:`fluxbench.samplers.edm_heun`) over
  ``steps`` levels and a final 0 (2 steps - 1 field evaluations per image);
* ``pc``: predictor-corrector (:func:`fluxbench.samplers.annealed_langevin`, reverse-VE
  Euler-Maruyama with ``corrector_steps`` Langevin corrector steps per level), then one
  denoising step x <- x + sigma_min^2 f(x, sigma_min) (= D(x, sigma_min), Tweedie);
* ``ode``: the probability-flow ODE (:func:`fluxbench.samplers.probability_flow`, Euler or
  Heun) over the same grid as ``heun``.

Writes to ``--out`` (default runs/images/samples): ``samples.pt`` (the (N, C, H, W) float32
samples, unclipped), ``grid.png`` (the first 64, clipped to [-1, 1]) and ``samples.json``
(the settings, the checkpoint, the number of field evaluations).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import Tensor

from ..samplers import annealed_langevin, edm_heun, edm_sigmas, probability_flow
from ..argtypes import device_arg, positive_float, positive_int
from .cli import DEFAULT_ROOT
from .checkpoint import load_field

__all__ = ["main", "sample_images", "SAMPLERS", "evaluations"]

SAMPLERS = ("heun", "pc", "ode")


def evaluations(sampler: str, steps: int, *, corrector_steps: int = 1, ode_method: str = "heun") -> int:
    """Field evaluations per image of :func:`sample_images` with these settings."""
    if sampler == "heun" or (sampler == "ode" and ode_method == "heun"):
        return 2 * steps - 1
    if sampler == "ode":
        return steps
    return (steps - 1) * (1 + corrector_steps) + 1


def sample_images(
    field,
    n: int,
    shape: tuple[int, int, int],
    *,
    sampler: str = "heun",
    steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    corrector_steps: int = 1,
    snr: float = 0.16,
    ode_method: str = "heun",
    batch_size: int = 256,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Tensor:
    """``n`` images (n, C, H, W) from ``field(x, sigma)``, in batches of ``batch_size``.

    The starting noise of every batch is drawn from ``generator`` in order, so the samples do
    not depend on ``batch_size`` for the deterministic samplers. See the module docstring for
    the samplers.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}; got {sampler!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
    device = torch.device(device)
    zero_end = sampler != "pc"
    sigmas = edm_sigmas(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, final_zero=zero_end, device=device)
    noise = torch.randn((n, *shape), generator=generator, device=device)
    out = []
    for start in range(0, n, batch_size):
        x = sigma_max * noise[start:start + batch_size]
        if sampler == "heun":
            x = edm_heun(field, x, sigmas, progress=progress)
        elif sampler == "ode":
            x = probability_flow(field, x, sigmas, method=ode_method, progress=progress)
        else:
            x = annealed_langevin(field, x, sigmas, generator=generator, corrector_steps=corrector_steps, snr=snr,
                                  progress=progress)
            with torch.no_grad():  # Tweedie's denoising step at sigma_min: x + sigma^2 f = D(x, sigma)
                x = x + sigma_min**2 * field(x, torch.tensor(sigma_min, dtype=x.dtype, device=device))
        out.append(x)
    return torch.cat(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluxbench images sample",
        description="Sample a trained EDM image field and write the samples and a PNG grid.",
        epilog=(
            "examples:\n"
            "  fluxbench images sample --checkpoint runs/images/flux/checkpoint.pt --sampler heun --steps 18 --n 1000\n"
            "  fluxbench images sample --checkpoint runs/images/flux/checkpoint.pt --sampler pc --steps 100 \\\n"
            "      --corrector-steps 1 --out runs/images/flux-pc"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pt written by 'fluxbench images train'")
    parser.add_argument("--sampler", choices=SAMPLERS, default="heun")
    parser.add_argument("--steps", type=positive_int(2), default=18, help="noise levels of the rho schedule (default 18)")
    parser.add_argument("--n", type=positive_int(1), default=64, help="number of images (default 64)")
    parser.add_argument("--batch-size", type=positive_int(1), default=256)
    parser.add_argument("--sigma-min", type=positive_float, default=0.002)
    parser.add_argument("--sigma-max", type=positive_float, default=80.0)
    parser.add_argument("--rho", type=positive_float, default=7.0)
    parser.add_argument("--corrector-steps", type=positive_int(0), default=1, help="pc: Langevin steps per level (default 1)")
    parser.add_argument("--snr", type=positive_float, default=0.16, help="pc: corrector signal-to-noise ratio")
    parser.add_argument("--ode-method", choices=("heun", "euler"), default="heun")
    parser.add_argument("--no-ema", action="store_true", help="use the trained weights instead of their EMA")
    parser.add_argument("--seed", type=positive_int(0), default=0)
    parser.add_argument("--device", type=device_arg, default=torch.device("cpu"), help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--out", type=Path, default=DEFAULT_ROOT / "samples", help=f"output folder (default {DEFAULT_ROOT}/samples)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    from torchvision.utils import save_image  # imported here: only this command needs torchvision

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not args.sigma_min < args.sigma_max:
        parser.error(f"--sigma-min ({args.sigma_min}) must be below --sigma-max ({args.sigma_max})")
    try:
        field, config = load_field(args.checkpoint, device=args.device, ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    shape = tuple(config["image_shape"])
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    x = sample_images(
        field, args.n, shape, sampler=args.sampler, steps=args.steps, sigma_min=args.sigma_min,
        sigma_max=args.sigma_max, rho=args.rho, corrector_steps=args.corrector_steps, snr=args.snr,
        ode_method=args.ode_method, batch_size=args.batch_size, generator=gen, device=args.device,
        progress=not args.no_progress,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(x.float().cpu(), args.out / "samples.pt")
    grid = x[:64].clamp(-1, 1).add(1).div(2).float().cpu()
    save_image(grid, args.out / "grid.png", nrow=int(math.ceil(math.sqrt(grid.shape[0]))), padding=1)
    nfe = evaluations(args.sampler, args.steps, corrector_steps=args.corrector_steps, ode_method=args.ode_method)
    meta = {"checkpoint": str(args.checkpoint), "ema": not args.no_ema, "n": args.n, "sampler": args.sampler,
            "steps": args.steps, "evaluations_per_image": nfe, "sigma_min": args.sigma_min, "sigma_max": args.sigma_max,
            "rho": args.rho, "seed": args.seed, "command": " ".join(["fluxbench", "images", "sample", *argv])}
    if args.sampler == "pc":
        meta.update(corrector_steps=args.corrector_steps, snr=args.snr)
    if args.sampler == "ode":
        meta["ode_method"] = args.ode_method
    (args.out / "samples.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.n} samples ({nfe} field evaluations each) to {args.out}/samples.pt and grid.png")
    return 0
