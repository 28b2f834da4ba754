"""The ``invdefend`` command line: one subcommand per module in :mod:`invdefend.commands`.

Each command module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` and
``run(args: argparse.Namespace) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ._version import __version__

__all__ = ["main", "build_parser", "COMMANDS"]

#: Subcommands, in the order ``--help`` lists them (module names under ``invdefend.commands``).
COMMANDS: tuple[str, ...] = ("assess", "audit", "demo")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="invdefend",
        description="Measure and defeat data-reconstruction attacks on shared gradients and embeddings.",
    )
    parser.add_argument("--version", action="version", version=f"invdefend {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"invdefend.commands.{name}")
        p = module.add_parser(sub)
        p.set_defaults(run_command=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``invdefend`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run_command", None) is None:
        parser.print_help()
        return 2
    return int(args.run_command(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
