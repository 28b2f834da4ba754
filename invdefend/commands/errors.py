"""User errors of the ``invdefend`` command line and the checks that raise them.

A command raises :class:`UsageError` for a mistake in what the user asked (a flag's value, a model spec, a
data file); :func:`invdefend.cli.main` prints it as one line, ``invdefend <command>: <message>``, and
returns exit status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["UsageError", "choose_from", "require", "require_at_least"]


class UsageError(Exception):
    """A user's mistake on the command line: ``<what is wrong>; <what to do>``, shown without a traceback."""


def require(ok: bool, message: str) -> None:
    """Raise :class:`UsageError` with ``message`` unless ``ok``."""
    if not ok:
        raise UsageError(message)


def require_at_least(value: float, flag: str, minimum: float = 1, *, meaning: str = "", example: str = "") -> None:
    """Refuse ``value`` below ``minimum`` (or not finite): ``--flag must be >= minimum (meaning), got …; use
    e.g. …``."""
    real = isinstance(value, float)
    what = f" ({meaning})" if meaning else ""
    fix = f"use e.g. {flag} {example}" if example else f"give a value >= {minimum:g}"
    require((not real or math.isfinite(value)) and value >= minimum,
            f"{flag} must be {'a finite number ' if real else ''}>= {minimum:g}{what}, got {value}; {fix}")


def choose_from(wanted: Iterable[str], valid: Iterable[str], flag: str, given: str) -> list[str]:
    """The names in ``wanted``, refusing none or any not in ``valid`` (the message lists the valid ones)."""
    names, options = list(wanted), tuple(valid)
    unknown = [name for name in names if name not in options]
    require(bool(names) and not unknown,
            f"{flag} {given!r}: " + (f"unknown {', '.join(unknown)}" if unknown else "names nothing")
            + f"; choose comma-separated names from {', '.join(options)}, e.g. {flag} {','.join(options[:2])}")
    return names
