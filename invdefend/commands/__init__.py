"""Subcommands of the ``invdefend`` command line (see :mod:`invdefend.cli`)."""
