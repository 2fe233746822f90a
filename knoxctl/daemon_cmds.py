"""knoxctl's knoxd commands: talk to the local daemon over its sockets, never to the server.

======================================  ==============================================  ========
command                                 what                                            socket
======================================  ==============================================  ========
``status [--json]``                     daemon version, identities, cache, connections  admin
``cache ls [--identity ID] [--json]``   cached keys: identity, primary version, age,    admin
                                        stale, last error (never data)
``cache show KEY [--identity ID]``      one key's cache entries in detail               admin
``register KEY… [--identity ID] [-g]``  keep keys fresh (``-g``: wait for the first      workload
                                        fetch); with ``--identity``, as that identity   / admin
``unregister KEY… [--identity ID]``     stop keeping keys fresh                         as above
``refresh [KEY…] [--identity ID]``      refetch now (all keys when none given)          admin
``get --daemon KEY``                    the primary data from knoxd (raw, no newline)   workload
======================================  ==============================================  ========

Sockets: ``--socket`` (else ``$KNOXD_SOCKET``, else ``/run/knoxd/knoxd.sock``) and
``--admin-socket`` (else ``$KNOXD_ADMIN_SOCKET``, else ``/run/knoxd-admin/admin.sock``). A daemon
that is not running, a socket the user may not open, or a refused request is one line on stderr and
exit 1.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from knox.client import DEFAULT_SOCKET, Client, DaemonError, DaemonUnavailable
from knoxctl.command import EXIT_OK, CommandError, Handler, Invocation, UsageError

__all__ = ["DEFAULT_ADMIN_SOCKET", "register"]

DEFAULT_ADMIN_SOCKET = "/run/knoxd-admin/admin.sock"
_TIMEOUT = 10.0
_WAIT_MS = 10_000
_MAX_WAIT_S = 30  # PROTOCOL.md: wait_ms <= 30,000


def _socket(inv: Invocation, admin: bool) -> str:
    if admin:
        chosen = inv.args.admin_socket or inv.env.get("KNOXD_ADMIN_SOCKET") or DEFAULT_ADMIN_SOCKET
    else:
        chosen = inv.args.socket or inv.env.get("KNOXD_SOCKET") or DEFAULT_SOCKET
    return str(chosen)


@contextmanager
def _client(inv: Invocation, admin: bool, wait: float = 0.0) -> Iterator[Client]:
    """A client for one command: no cache, no waiting for a daemon that is not there; its
    answers may take ``wait`` seconds longer (a get that waits for a first fetch)."""
    path = _socket(inv, admin)
    client = Client(path, timeout=_TIMEOUT + wait, reconnect_window=0.0, cache=False)
    try:
        yield client
    except DaemonUnavailable as exc:
        raise CommandError(f"knoxctl: {exc.message}") from None
    except DaemonError as exc:
        raise CommandError(f"knoxctl: {exc.message}") from None
    finally:
        client.close()


def _age(age_ms: object) -> str:
    if not isinstance(age_ms, int):
        return "-"
    seconds = age_ms / 1000
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _primary_version(entry: dict[str, Any]) -> str:
    for version in entry.get("versions") or ():
        if isinstance(version, dict) and version.get("status") == "Primary":
            return str(version.get("id"))
    return "-"


def _text(value: object) -> str:
    return "-" if value is None else str(value)


def _table(inv: Invocation, header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        inv.line("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def _json(inv: Invocation, value: object) -> None:
    inv.line(json.dumps(value, indent=2, sort_keys=True))


# --- handlers -----------------------------------------------------------------------------------


def _status(inv: Invocation) -> int:
    with _client(inv, admin=True) as client:
        status = client.status()
    if inv.args.json:
        _json(inv, status)
        return EXIT_OK
    cache = status.get("cache") or {}
    inv.line(f"knoxd {_text(status.get('version'))}, started {_text(status.get('started_at'))}")
    inv.line(
        f"cache: {_text(cache.get('entries'))} entries, {_text(cache.get('stale'))} stale, "
        f"oldest {_age(cache.get('oldest_age_ms'))}"
    )
    inv.line(f"connections: {_text(status.get('connections'))}")
    rows = [
        (
            _text(i.get("name")),
            _text(i.get("principal")),
            _text(i.get("keys")),
            "ok" if i.get("upstream_ok") else "DOWN",
            _text(i.get("last_error")),
        )
        for i in status.get("identities") or ()
        if isinstance(i, dict)
    ]
    _table(inv, ("IDENTITY", "PRINCIPAL", "KEYS", "UPSTREAM", "LAST ERROR"), rows)
    return EXIT_OK


def _entries(inv: Invocation) -> list[dict[str, Any]]:
    with _client(inv, admin=True) as client:
        entries = client.list_entries(inv.args.identity)
    return [e for e in entries if isinstance(e, dict)]


def _cache_ls(inv: Invocation) -> int:
    entries = _entries(inv)
    if inv.args.json:
        _json(inv, entries)
        return EXIT_OK
    rows = [
        (
            _text(e.get("key_id")),
            _text(e.get("identity")),
            _primary_version(e),
            _age(e.get("age_ms")),
            "yes" if e.get("stale") else "no",
            _text(e.get("last_error")),
        )
        for e in entries
    ]
    _table(inv, ("KEY", "IDENTITY", "PRIMARY", "AGE", "STALE", "LAST ERROR"), rows)
    return EXIT_OK


def _cache_show(inv: Invocation) -> int:
    found = [e for e in _entries(inv) if e.get("key_id") == inv.args.key]
    if not found:
        raise CommandError(f"knoxctl: {inv.args.key} is not in knoxd's cache")
    if inv.args.json:
        _json(inv, found)
        return EXIT_OK
    for number, entry in enumerate(found):
        if number:
            inv.line()
        inv.line(f"key:        {_text(entry.get('key_id'))}")
        inv.line(f"identity:   {_text(entry.get('identity'))}")
        inv.line(f"hash:       {_text(entry.get('hash'))}")
        inv.line(f"fetched at: {_text(entry.get('fetched_at'))}")
        inv.line(f"age:        {_age(entry.get('age_ms'))}")
        inv.line(f"stale:      {'yes' if entry.get('stale') else 'no'}")
        inv.line(f"last error: {_text(entry.get('last_error'))}")
        for version in entry.get("versions") or ():
            if isinstance(version, dict):
                inv.line(f"version:    {_text(version.get('id'))} {_text(version.get('status'))}")
    return EXIT_OK


def _register(inv: Invocation) -> int:
    identity = inv.args.identity
    with _client(inv, admin=identity is not None) as client:
        registered = client.register(inv.args.keys, identity=identity)
        for key_id in registered:
            inv.line(f"registered {key_id}")
    if inv.args.get:
        with _client(inv, admin=False) as client:
            for key_id in registered:
                key = client.get(key_id, wait_ms=_WAIT_MS)
                inv.line(f"fetched {key_id} (primary version {key.primary.id})")
    return EXIT_OK


def _unregister(inv: Invocation) -> int:
    identity = inv.args.identity
    with _client(inv, admin=identity is not None) as client:
        for key_id in client.unregister(inv.args.keys, identity=identity):
            inv.line(f"unregistered {key_id}")
    return EXIT_OK


def _refresh(inv: Invocation) -> int:
    with _client(inv, admin=True) as client:
        queued = client.refresh(inv.args.keys or None, inv.args.identity)
    inv.line(f"queued {queued} key{'s' if queued != 1 else ''} for refresh")
    return EXIT_OK


def _daemon_get(server_get: Handler) -> Handler:
    def handler(inv: Invocation) -> int:
        if not inv.args.daemon:
            return server_get(inv)
        a = inv.args
        if a.json or a.all:
            raise CommandError("knoxctl: get --daemon prints raw data; -j and -a need the server")
        if not 0 <= a.wait <= _MAX_WAIT_S:
            raise UsageError(f"knoxctl: --wait takes 0 to {_MAX_WAIT_S} seconds")
        with _client(inv, admin=False, wait=a.wait) as client:
            if a.version is None:
                # Register-and-wait, so a key this identity never read before works in one call.
                wait_ms = round(a.wait * 1000) if a.wait > 0 else None
                data = client.get(a.key, wait_ms=wait_ms).primary.data
            else:
                try:
                    version = int(a.version)
                except ValueError:
                    raise CommandError(f"knoxctl: version {a.version!r} is not a number") from None
                data = client.get(a.key, version=version).version(version).data
        inv.stdout.write(data)
        return EXIT_OK

    return handler


# --- registration -------------------------------------------------------------------------------


def register(
    root: argparse.ArgumentParser,
    subparsers: Any,
    parsers: dict[str, argparse.ArgumentParser],
) -> None:
    """Add ``--socket``/``--admin-socket`` to ``root``, the daemon commands to ``subparsers``, and
    ``--daemon`` to the server module's ``get`` (which must be registered before)."""
    root.add_argument("--socket", metavar="PATH", help="knoxd's workload socket")
    root.add_argument("--admin-socket", metavar="PATH", help="knoxd's admin socket")

    def command(name: str, help_text: str, handler: Callable[[Invocation], int]) -> Any:
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        parsers[name] = p
        return p

    def identity_option(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--identity", metavar="ID", help=what)

    def json_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON")

    p = command("status", "show knoxd's status (admin socket)", _status)
    json_option(p)

    cache = command("cache", "inspect knoxd's cache (admin socket)", _cache_ls)
    cache_commands = cache.add_subparsers(
        dest="cache_command", metavar="COMMAND", required=True, parser_class=type(cache)
    )
    p = cache_commands.add_parser("ls", help="list cached keys (never data)")
    p.set_defaults(handler=_cache_ls)
    identity_option(p, "only this identity's keys")
    json_option(p)
    p = cache_commands.add_parser("show", help="one key's cache entries (never data)")
    p.set_defaults(handler=_cache_show)
    identity_option(p, "only this identity's entry")
    json_option(p)
    p.add_argument("key", metavar="KEY")

    p = command("register", "ask knoxd to keep keys fresh", _register)
    identity_option(p, "register for this identity (admin socket)")
    p.add_argument("-g", dest="get", action="store_true", help="wait for the first fetch")
    p.add_argument("keys", nargs="+", metavar="KEY")

    p = command("unregister", "ask knoxd to stop keeping keys fresh", _unregister)
    identity_option(p, "unregister for this identity (admin socket)")
    p.add_argument("keys", nargs="+", metavar="KEY")

    p = command("refresh", "ask knoxd to refetch keys now (admin socket)", _refresh)
    identity_option(p, "only this identity's keys")
    p.add_argument("keys", nargs="*", metavar="KEY")

    get = parsers["get"]
    get.add_argument("--daemon", action="store_true", help="read from knoxd, not the server")
    get.add_argument(
        "--wait",
        type=float,
        default=_WAIT_MS / 1000,
        metavar="SECONDS",
        help="with --daemon: register the key if needed and wait this long for its first fetch "
        f"(default {_WAIT_MS / 1000:g}; 0: only keys already registered)",
    )
    get.set_defaults(handler=_daemon_get(get.get_default("handler")))
