"""``fluxbench images fid``: FID/KID (and IS) of generated images against real ones.

Reads the generated images from a ``.pt`` file (the (N, C, H, W) tensor in [-1, 1] that
``fluxbench images sample`` writes as ``samples.pt``), the real ones from scikit-learn's
digits (at the samples' resolution) or another ``.pt`` file, scores them with
:func:`fluxbench.images.fid.image_metrics` and writes ``fid.json`` (the numbers, the
extractor that produced them, the inputs and the command line) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from ..argtypes import device_arg, positive_int
from .cli import DEFAULT_ROOT
from .data import digits
from .fid import EXTRACTORS, WEIGHTS_ENV, image_metrics

__all__ = ["main", "build_parser", "load_images", "DIGIT_SETS"]

# --real names -> digits split
DIGIT_SETS = {"digits": "all", "digits-train": "train", "digits-test": "test"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluxbench images fid",
        description=(
            "FID (and KID, IS) of generated images against real images through torch-fidelity. "
            "Every number says which feature extractor produced it."
        ),
        epilog=(
            "examples:\n"
            "  fluxbench images fid --real digits --fake runs/images/samples/samples.pt --out runs/images/fid\n"
            "  fluxbench images fid --real real.pt --fake samples.pt --extractor inception \\\n"
            "      --weights ~/weights/weights-inception-2015-12-05-6726825d.pth --device cuda\n"
            f"The inception weights may also come from ${WEIGHTS_ENV}; they are never downloaded."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--real", required=True, help=f"{', '.join(DIGIT_SETS)} (at the samples' resolution) or a .pt image tensor"
    )
    parser.add_argument("--fake", type=Path, required=True, help=".pt file of an (N, C, H, W) tensor in [-1, 1]")
    parser.add_argument("--extractor", choices=EXTRACTORS, default="digits", help="feature extractor (default digits)")
    parser.add_argument("--weights", type=Path, default=None, help=f"Inception weights file (or ${WEIGHTS_ENV})")
    parser.add_argument("--no-kid", action="store_true", help="skip KID")
    parser.add_argument("--isc", action="store_true", help="also the Inception Score of --fake")
    parser.add_argument("--kid-subsets", type=positive_int(1), default=100)
    parser.add_argument("--kid-subset-size", type=positive_int(2), default=1000)
    parser.add_argument("--batch-size", type=positive_int(1), default=256)
    parser.add_argument("--seed", type=positive_int(0), default=2020, help="KID subsets / IS splits (default 2020)")
    parser.add_argument("--device", type=device_arg, default=torch.device("cpu"), help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--out", type=Path, default=DEFAULT_ROOT / "fid", help=f"output folder (default {DEFAULT_ROOT}/fid)")
    return parser


def load_images(path: Path, name: str) -> Tensor:
    """An (N, C, H, W) floating tensor from a .pt file (a tensor, or a dict with one under "samples")."""
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no file {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/pickle raise many types for a file that is not a tensor file
        raise ValueError(f"{name}: {path} is not a readable .pt tensor file ({type(err).__name__}: {err})") from err
    if isinstance(blob, dict) and "samples" in blob:
        blob = blob["samples"]
    if not isinstance(blob, Tensor) or blob.ndim != 4 or not blob.is_floating_point():
        shape = tuple(blob.shape) if isinstance(blob, Tensor) else type(blob).__name__
        raise ValueError(f"{name}: {path} must hold a floating (N, C, H, W) tensor; got {shape}")
    return blob


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        fake = load_images(args.fake, "--fake")
        if args.real in DIGIT_SETS:
            h, w = fake.shape[-2:]
            if h != w or h < 8:
                parser.error(f"--real {args.real} needs square samples of side >= 8; --fake has {h}x{w}")
            real = digits(resolution=int(h), split=DIGIT_SETS[args.real])
        else:
            real = load_images(Path(args.real), "--real")
        result = image_metrics(
            real,
            fake,
            extractor=args.extractor,
            weights_path=args.weights,
            device=args.device,
            kid=not args.no_kid,
            isc=args.isc,
            kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    result.update(real=args.real, fake=str(args.fake), command=" ".join(["fluxbench", "images", "fid", *argv]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fid.json").write_text(json.dumps(result, indent=2) + "\n")
    kid = f", KID {result['kid_mean']:.4g} +- {result['kid_std']:.2g}" if "kid_mean" in result else ""
    isc = f", IS {result['isc_mean']:.4g}" if "isc_mean" in result else ""
    print(f"FID {result['fid']:.4g}{kid}{isc} [{result['extractor']}] -> {args.out / 'fid.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
