"""``knox``: the daemon-side commands of Knox's Go CLI, answered by knoxd, for existing boot scripts
and for Knox's Go file client (``knox.NewFileClient`` runs ``knox register -g -k ID``).

==========================================  =================================================
``knox register -k ID [-g] [-t TIMEOUT]``   ask knoxd to keep ID fresh; with ``-g``, wait up to
                                            TIMEOUT (default 5 s) for it and print the key's
                                            JSON, as Knox does (no newline)
``knox unregister ID``                      stop keeping ID fresh
``knox get [-j] [-v VERSION] ID``           the primary data, raw with no newline (``-j``: the
                                            key's JSON; ``-v``: that version's data)
==========================================  =================================================

Flags follow Go's ``flag`` package: ``-k ID``, ``-k=ID``, ``--k ID``, before the positional
arguments. ``-t`` is a bare number of seconds or a Go duration (``1500ms``, ``1m30s``). Knox's
register file and its ``-r``/``-f`` options do not exist here: registrations live in knoxd.

The socket is ``$KNOXD_SOCKET``, else ``/run/knoxd/knoxd.sock``. The key JSON carries ``path`` (as
Knox's cached keys do) when knoxd exports the key to ``$KNOX_EXPORT_DIR/v0/keys/ID`` (default
``/var/lib/knox``), which is where Knox's file client re-reads it.

Exit codes as Knox: 0 success; 1 failure, one line on stderr; 2 usage error.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, TextIO

from knox.client import Client, DaemonError, socket_path_from
from knox.errors import VersionNotFoundError
from knox.model import Key, is_valid_key_id
from knox.protocol import MAX_WAIT_MS
from knox.wire import encode_key

__all__ = ["FlagError", "main", "parse_duration", "parse_flags"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

DEFAULT_TIMEOUT = 5.0
MAX_TIMEOUT = 3600.0
GET_WAIT_SECONDS = 10.0
DEFAULT_EXPORT_DIR = "/var/lib/knox"
_CALL_MARGIN = 5.0
_RETRY_PAUSE = 0.05

USAGE = """\
usage: knox <command> [arguments]

Knox's daemon commands, answered by knoxd:

    register    register keys to keep fresh with knoxd: register -k ID [-g] [-t TIMEOUT]
    unregister  stop keeping a key fresh: unregister ID
    get         get a key's data: get [-j] [-v VERSION] ID

Key management (create, add, promote, access...) is knoxctl's.
"""


class FlagError(Exception):
    """The command line is wrong; the message says how (usage error, exit 2)."""


class _Failure(Exception):
    """A failure to report as one line (exit 1)."""


# --- pure parsing -------------------------------------------------------------------------------


def parse_flags(
    args: Sequence[str], *, bools: frozenset[str], values: frozenset[str]
) -> tuple[dict[str, str | bool], list[str]]:
    """Go ``flag`` parsing: flags (``-x``, ``--x``, ``-x=v``; a value flag takes the next argument
    unless given with ``=``) up to the first non-flag argument or ``--``. Returns the flags set and
    the positional arguments. Raises :class:`FlagError` with Go's messages."""
    flags: dict[str, str | bool] = {}
    rest = list(args)
    while rest:
        arg = rest[0]
        if len(arg) < 2 or arg[0] != "-":
            break
        rest.pop(0)
        if arg == "--":
            break
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if not name or name[0] in "-=":
            raise FlagError(f"bad flag syntax: {arg}")
        name, has_value, value = name.partition("=")
        if name in bools:
            if has_value and value not in ("true", "false", "1", "0", "t", "f"):
                raise FlagError(f'invalid boolean value "{value}" for -{name}')
            flags[name] = not has_value or value in ("true", "1", "t")
        elif name in values:
            if not has_value:
                if not rest:
                    raise FlagError(f"flag needs an argument: -{name}")
                value = rest.pop(0)
            flags[name] = value
        else:
            raise FlagError(f"flag provided but not defined: -{name}")
    return flags, rest


_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds from ``-t``'s value: a bare integer is seconds (Knox PR #87), anything else a Go
    duration (``300ms``, ``1m30s``, ``1.5h``). Negative means no wait. Raises :class:`FlagError`."""
    body = text[1:] if text[:1] in "+-" else text
    sign = -1.0 if text.startswith("-") else 1.0
    if body.isdigit() and body.isascii():
        return max(0.0, sign * int(body))
    total, at = 0.0, 0
    while at < len(body):
        m = _DURATION_PART.match(body, at)
        if m is None:
            break
        total += float(m[1]) * _DURATION_UNITS[m[2]]
        at = m.end()
    if not body or at != len(body):
        raise FlagError(f'invalid value "{text}" for flag -t: parse error')
    return max(0.0, sign * total)


# --- commands -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Run:
    env: Mapping[str, str]
    stdout: BinaryIO
    stderr: TextIO

    def client(self, wait: float = 0.0) -> Client:
        """A client whose calls may take ``wait`` seconds longer than usual (a get that waits)."""
        return Client(
            socket_path_from(None, self.env),
            timeout=wait + _CALL_MARGIN,
            reconnect_window=0.0,
            cache=False,
        )

    def key_json(self, key: Key) -> bytes:
        """The key as Knox prints it; ``path`` set when the exported file exists."""
        export_dir = self.env.get("KNOX_EXPORT_DIR") or DEFAULT_EXPORT_DIR
        path = Path(export_dir, "v0", "keys", key.id)
        return encode_key(dataclasses.replace(key, path=str(path) if path.is_file() else ""))


def _key_id(value: str) -> str:
    if not is_valid_key_id(value):
        raise _Failure(f"{value!r} is not a valid key id")
    return value


def _register(run: _Run, args: Sequence[str]) -> int:
    flags, rest = parse_flags(args, bools=frozenset({"g"}), values=frozenset({"k", "t"}))
    if rest:
        raise FlagError(f"register takes no arguments after its flags (got {rest[0]!r})")
    key_text = flags.get("k")
    if not isinstance(key_text, str) or not key_text:
        raise _Failure("You must include a key to register (-k ID). See 'knox help'.")
    key_id = _key_id(key_text)
    timeout_text = flags.get("t")
    timeout = parse_duration(timeout_text) if isinstance(timeout_text, str) else DEFAULT_TIMEOUT
    timeout = min(timeout, MAX_TIMEOUT)
    with run.client(min(timeout, MAX_WAIT_MS / 1000)) as client:
        client.register([key_id])
        if not flags.get("g"):
            run.stderr.write(
                f"Successfully registered keys [{key_id}]. knoxd keeps them fresh; "
                "see 'knoxctl cache ls'.\n"
            )
            return EXIT_OK
        key = _wait_for(client, key_id, timeout)
    run.stdout.write(run.key_json(key))
    return EXIT_OK


def _wait_for(client: Client, key_id: str, timeout: float) -> Key:
    """The key once knoxd has it, waiting up to ``timeout`` seconds. Errors that say the key may
    come later are retried until then; others end the wait at once."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        wait_ms = min(MAX_WAIT_MS, int(remaining * 1000))
        try:
            return client.get(key_id, wait_ms=wait_ms) if wait_ms > 0 else client.get(key_id)
        except DaemonError as exc:
            if not exc.retry:
                raise _Failure(f"Error getting key from daemon: {exc.message}") from None
            if time.monotonic() + _RETRY_PAUSE >= deadline:
                raise _Failure(
                    f"Error getting key from daemon (hit timeout after {timeout:g}s); check "
                    f"knoxd's logs for details (most recent error: {exc.message})"
                ) from None
        time.sleep(_RETRY_PAUSE)


def _unregister(run: _Run, args: Sequence[str]) -> int:
    _, rest = parse_flags(args, bools=frozenset(), values=frozenset())
    if len(rest) != 1:
        raise FlagError("unregister takes exactly one key id")
    with run.client() as client:
        client.unregister([_key_id(rest[0])])
    run.stderr.write("Unregistered key successfully\n")
    return EXIT_OK


def _get(run: _Run, args: Sequence[str]) -> int:
    flags, rest = parse_flags(args, bools=frozenset({"j"}), values=frozenset({"v"}))
    if len(rest) != 1:
        raise FlagError("get takes only one argument. See 'knox help get'")
    key_id = _key_id(rest[0])
    version_text = flags.get("v")
    with run.client(GET_WAIT_SECONDS) as client:
        if isinstance(version_text, str):
            if not version_text.isdigit() or not version_text.isascii():
                raise _Failure("Key version not found.")
            version = int(version_text)
            key = client.get(key_id, version=version)
        else:
            version = None
            # Registers the key if needed, as Knox would fetch an uncached key from the server.
            key = client.get(key_id, wait_ms=int(GET_WAIT_SECONDS * 1000))
    if flags.get("j"):
        run.stdout.write(run.key_json(key))
    elif version is not None:
        # knoxd answers with the whole cached key once it holds that version.
        try:
            run.stdout.write(key.version(version).data)
        except VersionNotFoundError:
            raise _Failure("Key version not found.") from None
    else:
        run.stdout.write(key.primary.data)
    return EXIT_OK


def _one_line(text: str) -> str:
    """``text`` with control characters escaped: a message cannot forge lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_COMMANDS = {"register": _register, "unregister": _unregister, "get": _get}


def main(
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    stdout: BinaryIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run ``knox``; returns the exit status. Defaults: ``sys.argv[1:]``, ``os.environ`` and the
    process's standard streams."""
    args = list(sys.argv[1:] if argv is None else argv)
    run = _Run(
        os.environ if env is None else env,
        stdout if stdout is not None else sys.stdout.buffer,
        stderr if stderr is not None else sys.stderr,
    )
    if not args or args[0] in ("-h", "-help", "--help"):
        run.stderr.write(USAGE)
        return EXIT_USAGE
    command, rest = args[0], args[1:]
    if command == "help":
        run.stdout.write(USAGE.encode())
        return EXIT_OK
    handler = _COMMANDS.get(command)
    if handler is None:
        run.stderr.write(f"knox: unknown subcommand {command!r}\nRun 'knox help' for usage.\n")
        return EXIT_USAGE
    try:
        return handler(run, rest)
    except FlagError as exc:
        run.stderr.write(f"{exc}\n{USAGE}")
        return EXIT_USAGE
    except _Failure as exc:
        run.stderr.write(f"knox: {_one_line(str(exc))}\n")
    except DaemonError as exc:
        run.stderr.write(f"knox: {_one_line(exc.message)}\n")
    finally:
        run.stdout.flush()
    return EXIT_ERROR
