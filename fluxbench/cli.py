"""The ``fluxbench`` command line: ``fluxbench demo``, ``fluxbench bench``."""

from __future__ import annotations

import argparse
import sys

from . import __version__

COMMANDS = {
    "demo": ("fluxbench.demo", "train Flux Matching and DSM on a 2-D mixture, sample, score, plot"),
    "bench": ("fluxbench.bench", "time one training step of Flux Matching against DSM"),
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
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return
    import importlib

    importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    main()
