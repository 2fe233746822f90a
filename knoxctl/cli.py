"""knoxctl's entry point: argument parsing, dispatch and exit codes.

Commands come from the modules in :data:`COMMAND_SETS`. Each is a function
``register(root, subparsers, parsers)`` that may add global options to ``root``, adds its
subcommands with ``subparsers.add_parser`` (each setting ``handler`` via ``set_defaults``, see
:mod:`knoxctl.command`), and records every subcommand parser in ``parsers`` by name. A later module
can extend an earlier module's command through ``parsers`` (e.g. add ``--daemon`` to ``get`` and
wrap its handler), so the daemon commands plug in as one more entry in :data:`COMMAND_SETS`.

Exit codes: 0 success; 1 failure, with one line on stderr (the server's message for a Knox error);
2 usage error, with the usage on stderr. Never a traceback.
"""

from __future__ import annotations

import argparse
import contextvars
import io
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, NoReturn, TextIO

from knox import __version__
from knox.errors import KnoxError
from knoxctl import daemon_cmds, keys
from knoxctl.command import EXIT_ERROR, CommandError, Invocation, UsageError

__all__ = ["COMMAND_SETS", "Registrar", "build_parser", "main"]

Registrar = Callable[[argparse.ArgumentParser, Any, dict[str, argparse.ArgumentParser]], None]

COMMAND_SETS: tuple[Registrar, ...] = (keys.register, daemon_cmds.register)

_EXIT_INTERRUPTED = 130


@dataclass(frozen=True, slots=True)
class _Streams:
    stdout: BinaryIO
    stderr: TextIO


_streams: contextvars.ContextVar[_Streams] = contextvars.ContextVar("knoxctl_streams")


class _ParserExit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse writing to the invocation's streams and returning instead of exiting."""

    def _print_message(self, message: str, file: Any = None) -> None:
        if not message:
            return
        streams = _streams.get()
        if file is sys.stderr:
            streams.stderr.write(message)
        else:
            streams.stdout.write(message.encode("utf-8"))

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._print_message(message, sys.stderr)
        raise _ParserExit(status)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The root parser and every subcommand parser by name."""
    root = _Parser(
        prog="knoxctl",
        description="Manage Knox keys on a Knox server.",
        allow_abbrev=False,
    )
    root.add_argument("--version", action="version", version=f"knoxctl {__version__}")
    subparsers = root.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    parsers: dict[str, argparse.ArgumentParser] = {}
    for register in COMMAND_SETS:
        register(root, subparsers, parsers)
    for parser in parsers.values():
        parser.allow_abbrev = False
    return root, parsers


def _one_line(text: str) -> str:
    """``text`` with control characters escaped, so a message cannot forge lines or drive the
    terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main(
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run knoxctl; returns the exit status. Defaults: ``sys.argv[1:]``, ``os.environ`` and the
    process's standard streams."""
    out = stdout if stdout is not None else sys.stdout.buffer
    err = stderr if stderr is not None else sys.stderr
    if stdin is None:
        # fd 0 may be closed (sys.stdin is None); commands reading data then see empty input.
        stdin = sys.stdin.buffer if sys.stdin is not None else io.BytesIO()
    token = _streams.set(_Streams(out, err))
    try:
        return _dispatch(
            list(sys.argv[1:] if argv is None else argv),
            os.environ if env is None else env,
            stdin,
            out,
            err,
        )
    finally:
        _streams.reset(token)
        try:
            out.flush()
        except BrokenPipeError:
            # The reader went away (``knoxctl keys | head``). Point stdout at /dev/null so the
            # interpreter's own flush at exit does not complain either.
            if stdout is None:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)


def _dispatch(
    argv: list[str], env: Mapping[str, str], stdin: BinaryIO, stdout: BinaryIO, err: TextIO
) -> int:
    root, parsers = build_parser()
    try:
        args = root.parse_args(argv)
    except _ParserExit as exc:
        return exc.status
    inv = Invocation(args, env, stdin, stdout, err)
    try:
        status: int = args.handler(inv)
        return status
    except UsageError as exc:
        try:
            parsers[args.command].error(str(exc))
        except _ParserExit as usage_exit:
            return usage_exit.status
    except (CommandError, KnoxError) as exc:
        err.write(_one_line(str(exc)) + "\n")
    except BrokenPipeError:
        return EXIT_ERROR
    except KeyboardInterrupt:
        err.write("knoxctl: interrupted\n")
        return _EXIT_INTERRUPTED
    except Exception as exc:
        err.write(_one_line(f"knoxctl: unexpected error: {type(exc).__name__}: {exc}") + "\n")
    return EXIT_ERROR
