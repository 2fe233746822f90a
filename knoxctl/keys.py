"""Knox's key-management commands, talking to a Knox server over the v0 HTTP API.

Names, flags and output texts are Knox's (``client/*.go``), with these deliberate differences:

* ``create`` and ``add`` say "Reading from stdin..." on stderr and only when stdin is a terminal,
  so piped output holds nothing but the result;
* ``get -v VERSION`` looks among all versions, inactive ones included, without needing ``-a``;
* ``versions -s`` rejects an unknown state (Knox silently falls back to Primary);
* failures print ``<what failed>: <server message>`` as one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from knox import wire
from knox.errors import KnoxError
from knox.http_client import KnoxHTTPClient
from knox.model import Access, AccessType, PrincipalType, VersionStatus
from knoxctl.command import EXIT_OK, CommandError, Invocation, UsageError
from knoxctl.connection import add_server_options, open_client, server_settings

__all__ = ["MAX_DATA_BYTES", "register"]

T = TypeVar("T")

#: Largest key data read from stdin (a server refuses far smaller bodies anyway).
MAX_DATA_BYTES = 4 * 1024 * 1024
_MAX_ACL_FILE_BYTES = 1024 * 1024

_ACCESS_FLAGS = (
    ("-n", AccessType.NONE, "no access (removes the principal's entry)"),
    ("-r", AccessType.READ, "read access"),
    ("-w", AccessType.WRITE, "write access (rotate versions)"),
    ("-a", AccessType.ADMIN, "admin access (change the ACL, delete the key)"),
)
_PRINCIPAL_FLAGS = (
    ("-M", PrincipalType.MACHINE, "a machine (exact hostname)"),
    ("-U", PrincipalType.USER, "a user"),
    ("-G", PrincipalType.USER_GROUP, "a user group"),
    ("-P", PrincipalType.MACHINE_PREFIX, "a hostname prefix"),
    ("-S", PrincipalType.SERVICE, "a service (exact SPIFFE ID)"),
    ("-N", PrincipalType.SERVICE_PREFIX, "a SPIFFE ID prefix ending in '/'"),
)
_STATES = {
    "active": VersionStatus.ACTIVE,
    "primary": VersionStatus.PRIMARY,
    "inactive": VersionStatus.INACTIVE,
}


def _call(inv: Invocation, failure: str, op: Callable[[KnoxHTTPClient], Awaitable[T]]) -> T:
    """Run ``op`` with a client for the configured server; a Knox error becomes one line
    ``<failure>: <message>``."""
    settings = server_settings(inv.args, inv.env)

    async def run() -> T:
        async with open_client(settings) as client:
            return await op(client)

    try:
        return trio.run(run)
    except KnoxError as exc:
        raise CommandError(f"{failure}: {exc.message}") from None


def _read_data(inv: Invocation) -> bytes:
    if inv.stdin.isatty():
        inv.stderr.write("Reading from stdin...\n")
        inv.stderr.flush()
    data = inv.stdin.read(MAX_DATA_BYTES + 1)
    if len(data) > MAX_DATA_BYTES:
        raise CommandError(f"key data on stdin exceeds {MAX_DATA_BYTES} bytes")
    return data


def _version_id(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > wire.MAX_UINT64:
        raise UsageError(f"not a version id: {text!r} (expected a decimal number)")
    return int(text)


# --- handlers --------------------------------------------------------------------------------


def _keys(inv: Invocation) -> int:
    ids: list[str] = inv.args.keys
    hashes = dict.fromkeys(ids, "NONE") if ids else None
    for key_id in _call(inv, "Error getting keys", lambda c: c.get_keys(hashes)):
        inv.line(key_id)
    return EXIT_OK


def _get(inv: Invocation) -> int:
    a = inv.args
    wanted = None if a.version is None else _version_id(a.version)
    every = a.all or (wanted is not None and not a.json)
    status = VersionStatus.INACTIVE if every else VersionStatus.ACTIVE
    key = _call(inv, "Error getting key", lambda c: c.get_key(a.key, status))
    if a.json:
        inv.stdout.write(wire.encode_key(key))
    elif wanted is None:
        inv.stdout.write(key.primary.data)
    else:
        match = next((v for v in key.versions if v.id == wanted), None)
        if match is None:
            raise CommandError("Key version not found.")
        inv.stdout.write(match.data)
    return EXIT_OK


def _versions(inv: Invocation) -> int:
    a = inv.args
    status = _STATES[a.state]
    key = _call(inv, "error getting key", lambda c: c.get_key(a.key, status))
    for v in key.versions:
        inv.line(f'{v.id} "{v.status.value}"' if a.verbose else str(v.id))
    return EXIT_OK


def _acl(inv: Invocation) -> int:
    a = inv.args
    acl = _call(inv, "Error getting key ACL", lambda c: c.get_acl(a.key))
    if a.json:
        inv.line(wire.encode_acl(acl).decode("utf-8"))
    else:
        for entry in acl:
            inv.line(wire.dumps(wire.access_to_obj(entry)).decode("utf-8"))
    return EXIT_OK


def _update_version(status: VersionStatus, done: str, failure: str) -> Callable[[Invocation], int]:
    def handler(inv: Invocation) -> int:
        a = inv.args
        version = _version_id(a.version)
        _call(inv, failure, lambda c: c.update_version(a.key, version, status))
        inv.line(f"{done} {a.version} successfully.")
        return EXIT_OK

    return handler


_promote = _update_version(VersionStatus.PRIMARY, "Promoted", "Error promoting version")
_deactivate = _update_version(VersionStatus.INACTIVE, "Deactivated", "Error deactivating version")
_reactivate = _update_version(VersionStatus.ACTIVE, "Reactivated", "Error reactivating version")


def _create(inv: Invocation) -> int:
    a = inv.args
    data = _read_data(inv)
    version = _call(inv, "Error creating key", lambda c: c.create_key(a.key, data))
    inv.line(f"Created key with initial version {version}")
    return EXIT_OK


def _add(inv: Invocation) -> int:
    a = inv.args
    data = _read_data(inv)
    version = _call(inv, "Error adding version", lambda c: c.add_version(a.key, data))
    inv.line(f"Added key version {version}")
    return EXIT_OK


def _read_acl_file(path: Path) -> tuple[Access, ...]:
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_ACL_FILE_BYTES + 1)
    except OSError as exc:
        raise CommandError(f"Could not read acl file: {exc.strerror or exc}") from None
    if len(raw) > _MAX_ACL_FILE_BYTES:
        raise CommandError(f"Could not read acl file: larger than {_MAX_ACL_FILE_BYTES} bytes")
    try:
        acl = wire.decode_acl(raw)
    except wire.WireError as exc:
        raise CommandError(f"Could not decode access list properly: {exc.message}") from None
    if not acl:
        raise CommandError("Could not decode access list properly: no entries")
    if any(e.type is PrincipalType.UNKNOWN for e in acl):
        raise CommandError("Could not decode access list properly: unknown principal type")
    return acl


def _access(inv: Invocation) -> int:
    a = inv.args
    entries: tuple[Access, ...]
    if a.acl_file is not None:
        if a.access is not None or a.principal_type is not None or a.principal is not None:
            raise UsageError("--acl takes only KEY; do not combine it with access flags")
        entries = _read_acl_file(a.acl_file)
    else:
        if a.access is None:
            raise UsageError("access requires one of -n, -r, -w, -a")
        if a.principal_type is None:
            raise UsageError("access requires one of -M, -U, -G, -P, -S, -N")
        if a.principal is None:
            raise UsageError("access takes KEY and PRINCIPAL")
        entries = (Access(type=a.principal_type, id=a.principal, access=a.access),)
    _call(inv, "Failed to update access", lambda c: c.put_access(a.key, *entries))
    inv.line("Successfully updated Access")
    return EXIT_OK


def _delete(inv: Invocation) -> int:
    a = inv.args
    _call(inv, "Error deleting key", lambda c: c.delete_key(a.key))
    inv.line("Successfully deleted key")
    return EXIT_OK


# --- registration ----------------------------------------------------------------------------


def _key_and_version(p: argparse.ArgumentParser) -> None:
    p.add_argument("key", metavar="KEY")
    p.add_argument("version", metavar="VERSION")


def register(
    root: argparse.ArgumentParser,
    subparsers: Any,
    parsers: dict[str, argparse.ArgumentParser],
) -> None:
    """Add the server options to ``root`` and the key commands to ``subparsers``, in Knox's
    help order, recording each command's parser in ``parsers``."""
    add_server_options(root)

    def command(name: str, help_text: str, handler: Callable[[Invocation], int]) -> Any:
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        parsers[name] = p
        return p

    p = command("keys", "list key ids (all, or those of KEY… that exist)", _keys)
    p.add_argument("keys", nargs="*", metavar="KEY")

    p = command("get", "print a key's primary data (raw, no newline)", _get)
    p.add_argument("-v", dest="version", metavar="VERSION", help="print this version's data")
    p.add_argument("-j", dest="json", action="store_true", help="print the key as Knox JSON")
    p.add_argument("-a", dest="all", action="store_true", help="include inactive versions (-j)")
    p.add_argument("key", metavar="KEY")

    p = command("versions", "list a key's version ids", _versions)
    p.add_argument(
        "-s",
        dest="state",
        type=str.lower,
        choices=tuple(_STATES),
        default="active",
        help="lowest state to list (default active: primary and active)",
    )
    p.add_argument("-v", dest="verbose", action="store_true", help="also print each status")
    p.add_argument("key", metavar="KEY")

    p = command("acl", "print a key's ACL, one Access JSON per line", _acl)
    p.add_argument("--json", "-json", dest="json", action="store_true", help="one JSON array")
    p.add_argument("key", metavar="KEY")

    p = command("promote", "make an active version primary", _promote)
    _key_and_version(p)

    p = command("create", "create a key; its data is read from stdin", _create)
    p.add_argument("key", metavar="KEY")

    p = command("add", "add an active version; its data is read from stdin", _add)
    p.add_argument("key", metavar="KEY")

    p = command("deactivate", "make an active version inactive", _deactivate)
    _key_and_version(p)

    p = command("reactivate", "make an inactive version active", _reactivate)
    _key_and_version(p)

    p = command("access", "grant, change or remove a principal's access to a key", _access)
    level = p.add_mutually_exclusive_group()
    for flag, access, text in _ACCESS_FLAGS:
        level.add_argument(flag, dest="access", action="store_const", const=access, help=text)
    kind = p.add_mutually_exclusive_group()
    for flag, ptype, text in _PRINCIPAL_FLAGS:
        kind.add_argument(flag, dest="principal_type", action="store_const", const=ptype, help=text)
    p.add_argument(
        "--acl", "-acl", dest="acl_file", type=Path, metavar="FILE",
        help="apply a JSON array of Access entries from FILE instead",
    )  # fmt: skip
    p.add_argument("key", metavar="KEY")
    p.add_argument("principal", metavar="PRINCIPAL", nargs="?")

    p = command("delete", "delete a key and all its versions", _delete)
    p.add_argument("key", metavar="KEY")
