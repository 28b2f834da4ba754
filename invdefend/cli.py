"""The ``invdefend`` command line: one subcommand per module in :mod:`invdefend.commands`.

Each command module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` and
``run(args: argparse.Namespace) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ._version import __version__
from .commands.errors import UsageError

__all__ = ["main", "build_parser", "default_threads", "COMMANDS"]

#: Subcommands, in the order ``--help`` lists them (module names under ``invdefend.commands``).
COMMANDS: tuple[str, ...] = ("assess", "audit", "demo")


def default_threads() -> int:
    """torch intra-op threads the CLI uses unless told: ``$INVDEFEND_THREADS``, else half the cores (at most 4,
    at least 1). torch's own default, one per core, spin-waits when anything else runs on the machine: on a
    shared 2-core machine the same command took 75.8 s, then 2.9 s."""
    env = os.environ.get("INVDEFEND_THREADS")
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value >= 1:
            return value
        raise UsageError(f"INVDEFEND_THREADS={env!r} must be a positive integer; set e.g. INVDEFEND_THREADS=2, "
                         "or unset it")
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="invdefend",
        description="Measure and defeat data-reconstruction attacks on shared gradients and embeddings.",
    )
    parser.add_argument("--version", action="version", version=f"invdefend {__version__}")
    parser.add_argument(
        "--threads", dest="torch_threads", type=_positive_int, default=None, metavar="N",
        help="torch intra-op threads (default: $INVDEFEND_THREADS, else half the cores, at most 4)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"invdefend.commands.{name}")
        p = module.add_parser(sub)
        p.set_defaults(run_command=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``invdefend`` console script; returns the exit status: 0, or 2 for a usage error
    (argparse's, or a :class:`~invdefend.commands.errors.UsageError` a command raised, printed as one line
    ``invdefend <command>: <message>`` on stderr without a traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run_command", None) is None:
        parser.print_help()
        return 2
    try:
        return _run(args)
    except UsageError as exc:
        print(f"invdefend {args.command}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    """Run the chosen command with the torch threads asked for, restoring torch's setting after."""
    import torch

    threads = args.torch_threads or default_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return int(args.run_command(args) or 0)
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
