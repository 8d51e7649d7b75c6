"""``fluxbench images train``: train an EDM U-Net field on images, on one device or under torchrun.

Writes to ``--out`` (default runs/images/train-<method>): ``checkpoint.pt`` (model, EMA,
optimiser, objective, config; see :mod:`fluxbench.images.checkpoint`), ``log.csv`` (the
training log) and ``config.json`` (the settings and the command line).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..argtypes import device_arg, positive_float, positive_int
from .cli import DEFAULT_ROOT
from .data import cifar10, digits, procedural
from .distributed import setup, teardown
from .flatten import METHODS
from .precond import EDMField
from .train import PRECISIONS, train_images
from .unet import UNet

__all__ = ["main", "build_parser", "load_data"]

DATASETS = ("digits", "procedural", "cifar10")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluxbench images train",
        description="Train an EDM-preconditioned U-Net field by noise-annealed Flux Matching or DSM.",
        epilog=(
            "examples:\n"
            "  fluxbench images train --data digits --method flux --steps 3000 --batch-size 128 --lr 1e-3 \\\n"
            "      --out runs/images/flux\n"
            "  torchrun --nproc_per_node 8 -m fluxbench.cli images train --data cifar10 --data-root ~/data/cifar10 \\\n"
            "      --channels 128 --multipliers 1 2 2 2 --num-blocks 4 --batch-size 64 --precision bf16 --device cuda"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", choices=DATASETS, default="digits", help="dataset (default digits: scikit-learn's 8x8 digits)")
    data.add_argument("--data-root", type=Path, default=None, help="cifar10: the folder holding cifar-10-batches-py")
    data.add_argument("--resolution", type=positive_int(8), default=None, help="digits/procedural image side (default 8 / 16)")
    data.add_argument("--data-size", type=positive_int(1), default=2000, help="procedural: number of images (default 2000)")
    model = parser.add_argument_group("model")
    model.add_argument("--channels", type=positive_int(4), default=32, help="base U-Net width (default 32; the paper's 128)")
    model.add_argument("--multipliers", type=positive_int(1), nargs="+", default=[1, 2], help="channel multiplier per level (default 1 2)")
    model.add_argument("--num-blocks", type=positive_int(1), default=1, help="residual blocks per level (default 1; EDM's 4)")
    model.add_argument("--attention-resolutions", type=positive_int(1), nargs="*", default=None,
                       help="feature-map sizes with self-attention (default: half the image side)")
    model.add_argument("--dropout", type=float, default=0.0)
    model.add_argument("--sigma-data", type=positive_float, default=0.5, help="EDM's sigma_data (default 0.5)")
    train = parser.add_argument_group("training")
    train.add_argument("--method", choices=METHODS, default="flux")
    train.add_argument("--steps", type=positive_int(1), default=2000)
    train.add_argument("--batch-size", type=positive_int(1), default=128, help="images per rank per step (default 128)")
    train.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate (default 1e-4, the paper's)")
    train.add_argument("--aux-lr", type=positive_float, default=1e-2,
                       help="flux: Adam learning rate of the loss normaliser and time proposal (default 1e-2: the "
                            "normaliser must reach log E[loss | sigma] ~ 20 at EDM's smallest sigmas)")
    train.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    train.add_argument("--ema-decay", type=float, default=0.9993, help="EMA decay (default 0.9993, the paper's)")
    train.add_argument("--ema-warmup", type=positive_int(0), default=10)
    train.add_argument("--grad-clip", type=positive_float, default=1.0)
    train.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16: autocast, pairwise parts in fp32")
    train.add_argument("--gather-batch", action="store_true", help="under torchrun: one Flux loss on the all-gathered batch")
    train.add_argument("--no-proposal", action="store_true", help="flux: uniform reference times (no learned proposal)")
    train.add_argument("--no-normaliser", action="store_true", help="flux: no learned loss normaliser")
    train.add_argument("--chains", type=positive_int(1), default=None, help="flux: reference chains per batch (default all)")
    train.add_argument("--p-mean", type=float, default=-1.2, help="log sigma ~ N(p_mean, p_std^2) (default -1.2)")
    train.add_argument("--p-std", type=positive_float, default=1.2, help="(default 1.2)")
    train.add_argument("--seed", type=positive_int(0), default=0)
    run = parser.add_argument_group("run")
    run.add_argument("--device", type=device_arg, default=torch.device("cpu"), help="cpu (default), cuda (cuda:LOCAL_RANK under torchrun)")
    run.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEFAULT_ROOT}/train-<method>, ignored by git)")
    run.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt if it exists")
    run.add_argument("--checkpoint-every", type=positive_int(1), default=None)
    run.add_argument("--log-every", type=positive_int(1), default=10)
    run.add_argument("--no-progress", action="store_true")
    return parser


def load_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> torch.Tensor:
    """The training images (N, C, R, R) named by the arguments (usage errors for bad combinations)."""
    if args.data == "cifar10":
        if args.data_root is None:
            parser.error("--data cifar10 needs --data-root (the folder holding cifar-10-batches-py)")
        if args.resolution not in (None, 32):
            parser.error("cifar10 images are 32x32; drop --resolution")
        try:
            return cifar10(args.data_root, train=True)
        except FileNotFoundError as exc:
            parser.error(str(exc))
    if args.data_root is not None:
        parser.error(f"--data-root applies to cifar10, not {args.data}")
    if args.data == "digits":
        return digits(resolution=args.resolution or 8)
    gen = torch.Generator().manual_seed(args.seed)
    return procedural(args.data_size, resolution=args.resolution or 16, generator=gen)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1); got {args.dropout}")
    if not 0 <= args.ema_decay <= 1:
        parser.error(f"--ema-decay must be in [0, 1]; got {args.ema_decay}")
    if args.method == "dsm" and (args.no_proposal or args.no_normaliser or args.chains is not None):
        parser.error("--no-proposal, --no-normaliser and --chains apply to --method flux")
    images = load_data(args, parser)
    resolution = images.shape[-1]
    attention = args.attention_resolutions if args.attention_resolutions is not None else [resolution // 2]
    out = args.out if args.out is not None else DEFAULT_ROOT / f"train-{args.method}"
    try:
        unet_kwargs = dict(channels=args.channels, multipliers=tuple(args.multipliers), num_blocks=args.num_blocks,
                           resolution=resolution, attention_resolutions=tuple(attention), dropout=args.dropout)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)  # the initial weights (DDP then broadcasts rank 0's)
            field = EDMField(UNet(images.shape[1], **unet_kwargs), sigma_data=args.sigma_data)
    except ValueError as exc:
        parser.error(str(exc))
    rank, world, device = setup(args.device)
    try:
        options = {"p_mean": args.p_mean, "p_std": args.p_std}
        if args.method == "flux":
            options.update(learn_proposal=not args.no_proposal, normalise=not args.no_normaliser, chains=args.chains)
        start = time.perf_counter()
        result = train_images(
            field, images, method=args.method, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            aux_lr=args.aux_lr, lr_schedule=args.lr_schedule, ema_decay=args.ema_decay, ema_warmup=args.ema_warmup,
            grad_clip=args.grad_clip, precision=args.precision, gather_batch=args.gather_batch,
            objective_options=options, seed=args.seed, checkpoint=out / "checkpoint.pt", resume=args.resume,
            checkpoint_every=args.checkpoint_every, log_every=args.log_every, progress=not args.no_progress,
            device=device,
        )
        seconds = time.perf_counter() - start
        if rank == 0:
            result.log.to_csv(out / "log.csv", index=False)
            settings = {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()}
            meta = {"settings": settings, "world_size": world, "seconds": seconds, "steps_done": result.steps_done,
                    "images": list(images.shape), "command": " ".join(["fluxbench", "images", "train", *argv])}
            (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
            last = result.log.tail(min(50, len(result.log)))["loss"].mean()
            print(f"trained {args.method} for {result.steps_done} steps in {seconds:.1f} s on {world} rank(s); "
                  f"mean loss of the last logged steps {last:.4g}; wrote {out}/checkpoint.pt, log.csv, config.json")
    finally:
        teardown()
    return 0
