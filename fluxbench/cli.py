"""The ``fluxbench`` command line: ``demo``, ``bench``, ``suite``, ``report``, ``gate``."""

from __future__ import annotations

import argparse
import sys

from . import __version__

# name -> (module, help, entry point in the module)
COMMANDS = {
    "demo": ("fluxbench.demo", "train Flux Matching and DSM on a 2-D mixture, sample, score, plot", "main"),
    "bench": ("fluxbench.bench", "time one training step of Flux Matching against DSM", "main"),
    "suite": ("fluxbench.suites.cli", "list, run (--shard i/n) and merge the stationarity suites", "main_suite"),
    "report": ("fluxbench.suites.cli", "render the suites' records as Markdown and HTML with plots", "main_report"),
    "gate": ("fluxbench.suites.cli", "run the suites' claims; exit 1 naming every failed claim", "main_gate"),
    "images": ("fluxbench.images.cli", "train, sample and score image models (EDM U-Net, FID)", "main"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="fluxbench",
        description="Flux Matching: reference implementation and verification harness.",
        epilog="Run 'fluxbench <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"fluxbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (_, help_text, _) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return
    import importlib

    module, _, entry = COMMANDS[argv[0]]
    code = getattr(importlib.import_module(module), entry)(argv[1:])
    if isinstance(code, int) and not isinstance(code, bool) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
