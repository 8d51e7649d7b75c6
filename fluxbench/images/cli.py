"""``fluxbench images train|sample|fid``: the dispatcher, and the output root the three share.

Each subcommand lives in its own module (``train_cli``, ``sample_cli``, ``fid_cli``) with a
``main(argv)``; this module picks one from the first argument.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

__all__ = ["main", "SUBCOMMANDS", "DEFAULT_ROOT"]

# name -> (module, help)
SUBCOMMANDS = {
    "train": ("fluxbench.images.train_cli", "train an EDM U-Net field by Flux Matching or DSM (torchrun for several GPUs)"),
    "sample": ("fluxbench.images.sample_cli", "sample a trained image field (EDM Heun, predictor-corrector, ODE)"),
    "fid": ("fluxbench.images.fid_cli", "FID/KID (and IS) of samples against real images through torch-fidelity"),
}
DEFAULT_ROOT = Path("runs") / "images"


def main(argv: list[str] | None = None) -> int | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="fluxbench images",
        description="Train, sample and score EDM image models (Flux Matching or DSM).",
        epilog=(
            "example:\n"
            "  fluxbench images train --data digits --method flux --steps 2000 --out runs/images/flux\n"
            "  fluxbench images sample --checkpoint runs/images/flux/checkpoint.pt --sampler heun --steps 18\n"
            "Run 'fluxbench images <command> --help' for the options of a command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv or ["--help"])
        return None
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
