"""What every knoxctl command module shares: the invocation a handler receives and its errors.

A command module exposes ``register(root, subparsers, parsers)`` (see :mod:`knoxctl.cli`); each
subcommand it adds sets ``handler`` (a :data:`Handler`) with ``set_defaults``. A handler writes its
output through the :class:`Invocation` and returns the exit status, or raises:

* :class:`CommandError` or any :class:`knox.errors.KnoxError` → its one-line message on stderr,
  exit 1;
* :class:`UsageError` → the subcommand's usage and the message on stderr, exit 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import BinaryIO, TextIO

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "Handler",
    "Invocation",
    "UsageError",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A failure to report as one line on stderr (exit 1). The message must hold no secret."""


class UsageError(Exception):
    """The command line is wrong in a way argparse cannot see (exit 2)."""


@dataclass(frozen=True, slots=True)
class Invocation:
    """One run of a command: parsed arguments, the environment and the standard streams.

    ``stdout`` is binary because key data is written to it raw; text goes through :meth:`line`.
    """

    args: argparse.Namespace
    env: Mapping[str, str]
    stdin: BinaryIO
    stdout: BinaryIO
    stderr: TextIO

    def line(self, text: str = "") -> None:
        """Write ``text`` and a newline to stdout (UTF-8)."""
        self.stdout.write(text.encode("utf-8") + b"\n")


Handler = Callable[[Invocation], int]
