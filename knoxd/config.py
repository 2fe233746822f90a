"""knoxd.toml: parse and validate the daemon's configuration into frozen dataclasses.

The file format is the contract in ``knoxd-config.md``. :func:`load_config` checks everything that
can be checked from the file alone (types, ranges, URLs, identity rules); checks that need the cert
and key files are in :mod:`knoxd.upstream.identity_files`. Every problem raises
:class:`ConfigError`, whose message names the file, the line when it can be found, and the
offending key as a dotted path, with an identity shown by its name (``identity[web].peers.uid``)
or, before its name is known, by its 1-based position (``identity[#2].name``). Nothing else
escapes: a bad file never gives a traceback.

Durations are seconds (integers or floats, finite, at most a year). Paths must be absolute, since
the daemon's working directory is not a meaningful anchor.

Beyond the keys of ``knoxd-config.md``, two ways of delivering keys to programs that do not speak
the socket protocol:

* ``[daemon] credentials_socket`` (optional; no default) and ``[[credential]]`` tables
  (``unit``, ``name``, ``key``, ``identity``): systemd's ``LoadCredential=NAME:SOCKET`` in ``unit``
  receives the primary data of ``key`` as ``identity`` holds it (see :mod:`knoxd.credentials`).
  ``name`` defaults to the key id, which must then hold no ``:``.
* ``[daemon] export_dir`` (default ``/var/lib/knox``) and ``[[export]]`` tables (``key``,
  ``identity``, ``owner``, ``group``, ``mode``): the key is written to ``EXPORT_DIR/v0/keys/KEY`` in
  Knox's JSON form (see :mod:`knoxd.export`). ``owner`` and ``group`` are names or numeric ids
  (default ``0``, root), ``mode`` an octal integer or string (default ``0o640``; world-writable
  modes are refused).

Every key a credential or an export serves is registered for its identity at start: it is added to
that identity's ``keys``.

And one way of watching the daemon: ``[daemon] metrics_listen`` (optional; absent means no metrics
endpoint) is where knoxd serves Prometheus metrics over plain HTTP (``GET /metrics``, see
:mod:`knoxd.metrics`): ``"127.0.0.1:9102"`` (an IP address or ``localhost``, IPv6 in brackets,
port 1-65535) or ``"unix:/run/knoxd-metrics/metrics.sock"`` (an absolute path; the socket is mode
0666). There is no authentication: the figures name identities, never keys, but prefer a loopback
address or the Unix socket. It is parsed to a ``(host, port)`` pair or a :class:`~pathlib.Path`.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from knox.model import is_valid_key_id

__all__ = [
    "DEFAULT_ADMIN_SOCKET",
    "DEFAULT_EXPORT_DIR",
    "DEFAULT_EXPORT_MODE",
    "DEFAULT_STATE_DIR",
    "DEFAULT_WORKLOAD_SOCKET",
    "Config",
    "ConfigError",
    "CredentialConfig",
    "DaemonConfig",
    "ExportConfig",
    "IdentityConfig",
    "IdentityKind",
    "PeerSelectors",
    "UpstreamConfig",
    "load_config",
    "parse_config",
]

DEFAULT_STATE_DIR = Path("/var/lib/knoxd")
DEFAULT_WORKLOAD_SOCKET = Path("/run/knoxd/knoxd.sock")
DEFAULT_ADMIN_SOCKET = Path("/run/knoxd-admin/admin.sock")
DEFAULT_EXPORT_DIR = Path("/var/lib/knox")
DEFAULT_EXPORT_MODE = 0o640

MAX_CONFIG_BYTES = 1 << 20
MAX_SECONDS = 366 * 86400
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
MAX_UNIX_ID = 2**32 - 2  # (uid_t)-1 means "no id" to the kernel

_IDENTITY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*")
_GROUP_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,255}")
_UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\@-]{1,250}\.[a-z]+")
# A stricter subset of systemd's credential names (printable, no "/" or ":", at most 255 bytes).
_CREDENTIAL_NAME_RE = re.compile(r"[A-Za-z0-9_@+-][A-Za-z0-9_.@+-]{0,254}")
_USER_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,255}")


class ConfigError(Exception):
    """The configuration file is unusable. ``str(err)`` says where and why.

    ``key`` is the dotted path of the offending key (None for file-level problems) and ``line`` its
    1-based line in the file, when it could be found.
    """

    def __init__(self, message: str, *, key: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.line = line


class IdentityKind(enum.StrEnum):
    """How an identity authenticates upstream: ``0t<hostname>`` or ``0s<spiffe id>``."""

    MACHINE = "machine"
    SPIFFE = "spiffe"


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """The ``[daemon]`` table. Durations in seconds."""

    state_dir: Path
    workload_socket: Path
    admin_socket: Path
    admin_group: str | None = None
    refresh_seconds: float = 60.0
    revalidate_seconds: float = 600.0
    max_stale_seconds: float = 0.0
    idle_timeout_seconds: float = 300.0
    max_connections: int = 4096
    max_connections_per_uid: int = 256
    jitter: float = 0.1
    backoff_min_seconds: float = 1.0
    backoff_max_seconds: float = 300.0
    credentials_socket: Path | None = None
    export_dir: Path = DEFAULT_EXPORT_DIR
    metrics_listen: tuple[str, int] | Path | None = None


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """The ``[upstream]`` table. ``ca`` None means the system's trust store."""

    urls: tuple[str, ...]
    ca: Path | None = None
    timeout_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class PeerSelectors:
    """Which local peers act as an identity; a peer matching any one selector qualifies."""

    uid: tuple[int, ...] = ()
    gid: tuple[int, ...] = ()
    group: tuple[str, ...] = ()
    unit: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.uid or self.gid or self.group or self.unit)


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """One ``[[identity]]``. ``hostname`` is None for SPIFFE identities and, for machine identities,
    when the first DNS SAN of the certificate is to be used."""

    name: str
    kind: IdentityKind
    cert: Path
    key: Path
    hostname: str | None = None
    keys: tuple[str, ...] = ()
    peers: PeerSelectors = field(default_factory=PeerSelectors)


@dataclass(frozen=True, slots=True)
class CredentialConfig:
    """One ``[[credential]]``: the systemd unit ``unit`` asking for the credential ``name`` (the id
    in its ``LoadCredential=``) receives the primary data of ``key`` as ``identity`` holds it."""

    unit: str
    name: str
    key: str
    identity: str


@dataclass(frozen=True, slots=True)
class ExportConfig:
    """One ``[[export]]``: ``key`` as ``identity`` holds it, written in Knox's JSON form with this
    owner, group (a name, or a numeric id) and mode."""

    key: str
    identity: str
    owner: str | int = 0
    group: str | int = 0
    mode: int = DEFAULT_EXPORT_MODE


@dataclass(frozen=True, slots=True)
class Config:
    """The whole file. ``identities`` keeps the file's order (the first match wins)."""

    daemon: DaemonConfig
    upstream: UpstreamConfig
    identities: tuple[IdentityConfig, ...]
    credentials: tuple[CredentialConfig, ...] = ()
    exports: tuple[ExportConfig, ...] = ()

    def identity(self, name: str) -> IdentityConfig | None:
        return next((i for i in self.identities if i.name == name), None)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a knoxd.toml file. Raises :class:`ConfigError` (never anything else)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 (byte {e.start})") from None
    return parse_config(text, source=str(path))


def parse_config(text: str, *, source: str = "knoxd.toml") -> Config:
    """Validate the TOML ``text``; ``source`` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    ctx = _Context(source, text)
    top = _Table(ctx, data, (), "")
    top.check_keys({"daemon", "upstream", "identity", "credential", "export"})
    daemon = _daemon(top.table("daemon"))
    upstream_table = top.table("upstream")
    if upstream_table is None:
        raise ctx.error((), "upstream", "the [upstream] table is required")
    upstream = _upstream(upstream_table)
    identities = _identities(ctx, data.get("identity"))
    names = {i.name for i in identities}
    credentials = _credentials(ctx, data.get("credential"), names)
    exports = _exports(ctx, data.get("export"), names)
    served: dict[str, list[str]] = {name: [] for name in names}
    for credential in credentials:
        served[credential.identity].append(credential.key)
    for export in exports:
        served[export.identity].append(export.key)
    identities = tuple(
        replace(i, keys=tuple(dict.fromkeys((*i.keys, *served[i.name])))) for i in identities
    )
    return Config(
        daemon=daemon,
        upstream=upstream,
        identities=identities,
        credentials=credentials,
        exports=exports,
    )


# --- the tables ------------------------------------------------------------------------------


def _daemon(t: _Table | None) -> DaemonConfig:
    if t is None:
        return DaemonConfig(
            state_dir=DEFAULT_STATE_DIR,
            workload_socket=DEFAULT_WORKLOAD_SOCKET,
            admin_socket=DEFAULT_ADMIN_SOCKET,
        )
    t.check_keys(
        {
            "state_dir",
            "workload_socket",
            "admin_socket",
            "admin_group",
            "refresh_seconds",
            "revalidate_seconds",
            "max_stale_seconds",
            "idle_timeout_seconds",
            "max_connections",
            "max_connections_per_uid",
            "jitter",
            "backoff_min_seconds",
            "backoff_max_seconds",
            "credentials_socket",
            "export_dir",
            "metrics_listen",
        }
    )
    d = DaemonConfig(
        state_dir=t.path("state_dir") or DEFAULT_STATE_DIR,
        workload_socket=t.socket_path("workload_socket", DEFAULT_WORKLOAD_SOCKET),
        admin_socket=t.socket_path("admin_socket", DEFAULT_ADMIN_SOCKET),
        admin_group=t.optional_name("admin_group", _GROUP_RE, "a group name"),
        refresh_seconds=t.seconds("refresh_seconds", 60.0),
        revalidate_seconds=t.seconds("revalidate_seconds", 600.0),
        max_stale_seconds=t.seconds("max_stale_seconds", 0.0, allow_zero=True),
        idle_timeout_seconds=t.seconds("idle_timeout_seconds", 300.0),
        max_connections=t.integer("max_connections", 4096, 1, 1_000_000),
        max_connections_per_uid=t.integer("max_connections_per_uid", 256, 1, 1_000_000),
        jitter=t.fraction("jitter", 0.1),
        backoff_min_seconds=t.seconds("backoff_min_seconds", 1.0),
        backoff_max_seconds=t.seconds("backoff_max_seconds", 300.0),
        credentials_socket=(
            t.socket_path("credentials_socket", DEFAULT_WORKLOAD_SOCKET)
            if "credentials_socket" in t.data
            else None
        ),
        export_dir=t.path("export_dir") or DEFAULT_EXPORT_DIR,
        metrics_listen=_metrics_listen(t) if "metrics_listen" in t.data else None,
    )
    if d.backoff_min_seconds > d.backoff_max_seconds:
        raise t.error("backoff_min_seconds", "must not be larger than backoff_max_seconds")
    if d.workload_socket == d.admin_socket:
        raise t.error("admin_socket", "must differ from workload_socket")
    if d.credentials_socket in (d.workload_socket, d.admin_socket):
        raise t.error("credentials_socket", "must differ from workload_socket and admin_socket")
    if isinstance(d.metrics_listen, Path) and d.metrics_listen in (
        d.workload_socket,
        d.admin_socket,
        d.credentials_socket,
    ):
        raise t.error("metrics_listen", "must differ from knoxd's other sockets")
    return d


def _metrics_listen(t: _Table) -> tuple[str, int] | Path:
    value = t.string("metrics_listen")
    if value.startswith("unix:"):
        path = Path(value.removeprefix("unix:"))
        if not path.is_absolute():
            raise t.error("metrics_listen", f"{value!r}: the socket path must be absolute")
        if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
            raise t.error(
                "metrics_listen",
                f"too long for a Unix socket (the limit is {MAX_SOCKET_PATH_BYTES} bytes)",
            )
        return path
    host, _, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if host == "localhost":
        ipv6 = False
    else:
        try:
            ipv6 = ipaddress.ip_address(host).version == 6
        except ValueError:
            host = ""
    if (
        not host
        or ipv6 != bracketed
        or not (port.isascii() and port.isdigit() and len(port) <= 5)
        or not 1 <= int(port) <= 65535
    ):
        raise t.error(
            "metrics_listen",
            f'{value!r}: expected "HOST:PORT" (an IP address or localhost, IPv6 in brackets) '
            'or "unix:/PATH"',
        )
    return host, int(port)


def _upstream(t: _Table) -> UpstreamConfig:
    t.check_keys({"urls", "ca", "timeout_seconds"})
    urls = t.str_list("urls", required=True)
    if not urls:
        raise t.error("urls", "must name at least one server")
    checked = tuple(_check_url(t, i, u) for i, u in enumerate(urls))
    if len(set(checked)) != len(checked):
        raise t.error("urls", "lists a server twice")
    return UpstreamConfig(
        urls=checked,
        ca=t.path("ca"),
        timeout_seconds=t.seconds("timeout_seconds", 10.0),
    )


def _check_url(t: _Table, index: int, url: str) -> str:
    key = f"urls[{index}]"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise t.error(key, f"{url!r} is not a URL") from None
    if parts.scheme != "https":
        raise t.error(key, f"{url!r} must be an https:// URL")
    if not parts.hostname:
        raise t.error(key, f"{url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise t.error(key, f"{url!r} must not carry credentials")
    if parts.query or parts.fragment:
        raise t.error(key, f"{url!r} must not have a query or fragment")
    if port == 0:
        raise t.error(key, f"{url!r} has port 0")
    return url.rstrip("/")


def _identities(ctx: _Context, raw: Any) -> tuple[IdentityConfig, ...]:
    if raw is None:
        raise ctx.error((), "identity", "at least one [[identity]] is required")
    if not isinstance(raw, list) or not all(isinstance(i, dict) for i in raw):
        raise ctx.error((), "identity", "expected [[identity]] tables")
    seen: dict[str, int] = {}
    out = []
    for index, table in enumerate(raw):
        ident = _identity(_Table(ctx, table, ("identity", index), f"identity[#{index + 1}]"))
        if ident.name in seen:
            raise ctx.error(
                ("identity", index),
                "name",
                f"{ident.name!r} is already the name of identity #{seen[ident.name] + 1}",
                label=f"identity[#{index + 1}]",
            )
        seen[ident.name] = index
        out.append(ident)
    return tuple(out)


def _identity(t: _Table) -> IdentityConfig:
    raw_name = t.data.get("name")
    if isinstance(raw_name, str) and _IDENTITY_NAME_RE.fullmatch(raw_name):
        t.label = f"identity[{raw_name}]"
    t.check_keys({"name", "kind", "cert", "key", "hostname", "keys", "peers"})
    name = t.string("name", required=True)
    if not _IDENTITY_NAME_RE.fullmatch(name):
        raise t.error(
            "name", f"{name!r}: use 1-64 letters, digits, '_', '.', '-', starting alphanumeric"
        )
    kind_text = t.string("kind", required=True)
    try:
        kind = IdentityKind(kind_text)
    except ValueError:
        raise t.error("kind", f'{kind_text!r}: must be "machine" or "spiffe"') from None
    cert = t.path("cert")
    key = t.path("key")
    if cert is None:
        raise t.error("cert", "is required")
    if key is None:
        raise t.error("key", "is required")
    hostname = t.optional_name("hostname", _HOSTNAME_RE, "a DNS hostname")
    if hostname is not None and kind is IdentityKind.SPIFFE:
        raise t.error("hostname", 'applies only to kind = "machine"')
    keys = t.str_list("keys")
    for i, key_id in enumerate(keys):
        if not is_valid_key_id(key_id):
            raise t.error(f"keys[{i}]", f"{key_id!r} is not a valid key id")
    peers_table = t.table("peers")
    peers = _peers(peers_table) if peers_table is not None else PeerSelectors()
    if peers.empty:
        raise t.error("peers", "no peers: set at least one of peers.uid, gid, group, unit")
    return IdentityConfig(
        name=name,
        kind=kind,
        cert=cert,
        key=key,
        hostname=hostname,
        keys=tuple(dict.fromkeys(keys)),
        peers=peers,
    )


def _peers(t: _Table) -> PeerSelectors:
    t.check_keys({"uid", "gid", "group", "unit"})
    groups = t.str_list("group")
    for i, g in enumerate(groups):
        if not _GROUP_RE.fullmatch(g):
            raise t.error(f"group[{i}]", f"{g!r} is not a group name")
    units = t.str_list("unit")
    for i, u in enumerate(units):
        if not _UNIT_RE.fullmatch(u):
            raise t.error(f"unit[{i}]", f"{u!r} is not a systemd unit name (e.g. web.service)")
    return PeerSelectors(
        uid=tuple(dict.fromkeys(t.int_list("uid", 0, MAX_UNIX_ID))),
        gid=tuple(dict.fromkeys(t.int_list("gid", 0, MAX_UNIX_ID))),
        group=tuple(dict.fromkeys(groups)),
        unit=tuple(dict.fromkeys(units)),
    )


def _array_of_tables(ctx: _Context, raw: Any, name: str) -> list[_Table]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(i, dict) for i in raw):
        raise ctx.error((), name, f"expected [[{name}]] tables")
    return [_Table(ctx, table, (name, i), f"{name}[#{i + 1}]") for i, table in enumerate(raw)]


def _key_and_identity(t: _Table, identities: set[str]) -> tuple[str, str]:
    key = t.string("key", required=True)
    if not is_valid_key_id(key):
        raise t.error("key", f"{key!r} is not a valid key id")
    identity = t.string("identity", required=True)
    if identity not in identities:
        raise t.error("identity", f"{identity!r} is not the name of an [[identity]]")
    return key, identity


def _credentials(ctx: _Context, raw: Any, identities: set[str]) -> tuple[CredentialConfig, ...]:
    seen: dict[tuple[str, str], int] = {}
    out = []
    for index, t in enumerate(_array_of_tables(ctx, raw, "credential")):
        t.check_keys({"unit", "name", "key", "identity"})
        unit = t.string("unit", required=True)
        if not _UNIT_RE.fullmatch(unit):
            raise t.error("unit", f"{unit!r} is not a systemd unit name (e.g. web.service)")
        key, identity = _key_and_identity(t, identities)
        if "name" in t.data:
            name = t.string("name")
            if not _CREDENTIAL_NAME_RE.fullmatch(name):
                raise t.error(
                    "name", f"{name!r}: use 1-255 letters, digits, '_', '.', '@', '+', '-'"
                )
        elif ":" in key:
            raise t.error(
                "name", f"is required: the key id {key!r} holds ':', which a credential name cannot"
            )
        else:
            name = key
        if (unit, name) in seen:
            raise t.error(
                "name", f"{unit} already has a credential {name!r} (credential #{seen[unit, name]})"
            )
        seen[unit, name] = index + 1
        out.append(CredentialConfig(unit=unit, name=name, key=key, identity=identity))
    return tuple(out)


def _exports(ctx: _Context, raw: Any, identities: set[str]) -> tuple[ExportConfig, ...]:
    seen: dict[str, int] = {}
    out = []
    for index, t in enumerate(_array_of_tables(ctx, raw, "export")):
        t.check_keys({"key", "identity", "owner", "group", "mode"})
        key, identity = _key_and_identity(t, identities)
        if key in seen:
            raise t.error("key", f"{key!r} is already exported (export #{seen[key]})")
        seen[key] = index + 1
        out.append(
            ExportConfig(
                key=key,
                identity=identity,
                owner=t.owner("owner", _USER_RE, "a user name"),
                group=t.owner("group", _GROUP_RE, "a group name"),
                mode=t.file_mode("mode", DEFAULT_EXPORT_MODE),
            )
        )
    return tuple(out)


# --- reading typed values, with errors that say where ----------------------------------------

_Path = tuple[str | int, ...]
_MISSING: Any = object()


class _Context:
    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.text = text

    def error(self, table: _Path, key: str, problem: str, *, label: str = "") -> ConfigError:
        dotted = f"{label}.{key}" if label else key
        line = _find_line(self.text, (*table, *_split_index(key)))
        if line is None and table:
            # A missing key has no line of its own: point at its table's header instead.
            line = _find_line(self.text, table)
        where = f"{self.source}:{line}" if line is not None else self.source
        return ConfigError(f"{where}: {dotted}: {problem}", key=dotted, line=line)


def _split_index(key: str) -> _Path:
    """``"urls[2]"`` -> ("urls",): a line is found for the array, not for one of its items."""
    return (key.split("[", 1)[0],)


class _Table:
    """One TOML table being read. ``where`` is its path in the document (for finding lines),
    ``label`` how messages name it (``daemon``, ``identity[web]``)."""

    def __init__(self, ctx: _Context, data: Mapping[str, Any], where: _Path, label: str) -> None:
        self.ctx = ctx
        self.data = data
        self.where = where
        self.label = label

    def error(self, key: str, problem: str) -> ConfigError:
        return self.ctx.error(self.where, key, problem, label=self.label)

    def check_keys(self, allowed: set[str]) -> None:
        for key in self.data:
            if key not in allowed:
                raise self.error(key, "unknown key")

    def _get(self, key: str, expected: str, required: bool) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING and required:
            raise self.error(key, f"is required ({expected})")
        return value

    def table(self, key: str) -> _Table | None:
        value = self._get(key, "a table", False)
        if value is _MISSING:
            return None
        if not isinstance(value, dict):
            raise self.error(key, "expected a table")
        label = f"{self.label}.{key}" if self.label else key
        return _Table(self.ctx, value, (*self.where, key), label)

    def string(self, key: str, *, required: bool = False) -> str:
        value = self._get(key, "a string", required)
        if value is _MISSING:
            return ""
        if not isinstance(value, str):
            raise self.error(key, "expected a string")
        if not value or "\0" in value:
            raise self.error(key, "must be a non-empty string without NUL")
        return value

    def optional_name(self, key: str, pattern: re.Pattern[str], what: str) -> str | None:
        if key not in self.data:
            return None
        value = self.string(key)
        if not pattern.fullmatch(value):
            raise self.error(key, f"{value!r} is not {what}")
        return value

    def path(self, key: str) -> Path | None:
        if key not in self.data:
            return None
        value = Path(self.string(key))
        if not value.is_absolute():
            raise self.error(key, f"{str(value)!r} must be an absolute path")
        return value

    def socket_path(self, key: str, default: Path) -> Path:
        value = self.path(key) or default
        if len(os.fsencode(value)) > MAX_SOCKET_PATH_BYTES:
            raise self.error(
                key, f"too long for a Unix socket (the limit is {MAX_SOCKET_PATH_BYTES} bytes)"
            )
        return value

    def owner(self, key: str, pattern: re.Pattern[str], what: str) -> str | int:
        """A name matching ``pattern`` or a numeric id; default 0 (root)."""
        value = self.data.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise self.error(key, f"expected {what} or a numeric id")
        if isinstance(value, int):
            if not 0 <= value <= MAX_UNIX_ID:
                raise self.error(key, f"must be in [0, {MAX_UNIX_ID}]")
            return value
        if not pattern.fullmatch(value):
            raise self.error(key, f"{value!r} is not {what}")
        return value

    def file_mode(self, key: str, default: int) -> int:
        """Permission bits, as an integer (``0o640``) or a string of octal digits (``"0640"``);
        never world-writable."""
        value = self.data.get(key, default)
        if isinstance(value, str) and re.fullmatch(r"(?:0o)?[0-7]{1,4}", value):
            value = int(value.removeprefix("0o"), 8)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, 'expected permission bits in octal (mode = 0o640 or "0640")')
        if not 0 <= value <= 0o777:
            raise self.error(
                key, f"{value} is not a mode in [0, 0o777] (write it in octal: 0o640, not 640)"
            )
        if value & 0o002:
            raise self.error(key, f"{value:#o} is world-writable")
        return value

    def _number(self, key: str, default: float) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, "expected a number")
        if not math.isfinite(value):
            raise self.error(key, "must be finite")
        return float(value)

    def seconds(self, key: str, default: float, *, allow_zero: bool = False) -> float:
        value = self._number(key, default)
        if value < 0:
            raise self.error(key, "must not be negative")
        if value == 0 and not allow_zero:
            raise self.error(key, "must be more than 0 seconds")
        if value > MAX_SECONDS:
            raise self.error(key, f"must be at most {MAX_SECONDS} seconds")
        return value

    def fraction(self, key: str, default: float) -> float:
        value = self._number(key, default)
        if not 0.0 <= value < 1.0:
            raise self.error(key, "must be a fraction in [0, 1)")
        return value

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, "expected an integer")
        if not lo <= value <= hi:
            raise self.error(key, f"must be in [{lo}, {hi}]")
        return value

    def _list(self, key: str, required: bool) -> Sequence[Any]:
        value = self._get(key, "an array", required)
        if value is _MISSING:
            return ()
        if not isinstance(value, list):
            raise self.error(key, "expected an array")
        return value

    def str_list(self, key: str, *, required: bool = False) -> list[str]:
        items = self._list(key, required)
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item:
                raise self.error(f"{key}[{i}]", "expected a non-empty string")
        return list(items)

    def int_list(self, key: str, lo: int, hi: int) -> list[int]:
        items = self._list(key, False)
        for i, item in enumerate(items):
            if isinstance(item, bool) or not isinstance(item, int) or not lo <= item <= hi:
                raise self.error(f"{key}[{i}]", f"expected an integer in [{lo}, {hi}]")
        return list(items)


# --- finding the line a key is on ------------------------------------------------------------
#
# tomllib reports no positions for valid documents, so the line of a key is found by scanning the
# text: headers set the current table (array-of-tables headers count their occurrences, so the
# n-th [[identity]] is table ("identity", n-1)), and "key = value" lines define current table +
# dotted key. The first line whose defined path starts with the wanted path is the answer. Values
# spanning lines (arrays, multi-line strings) are skipped as well as a line scanner can; keys set
# through inline tables are not found, and the message then goes without a line.

_KEY_PART = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_ARRAY_HEADER_RE = re.compile(rf"\s*\[\[\s*({_DOTTED})\s*\]\]")
_TABLE_HEADER_RE = re.compile(rf"\s*\[\s*({_DOTTED})\s*\]")
_KEY_LINE_RE = re.compile(rf"\s*({_DOTTED})\s*=(.*)")
_KEY_PART_RE = re.compile(_KEY_PART)


def _key_parts(dotted: str) -> list[str]:
    parts = []
    for m in _KEY_PART_RE.finditer(dotted):
        part = m.group(0)
        if part[0] in "\"'":
            part = part[1:-1]
        parts.append(part)
    return parts


def _defined_paths(text: str) -> Iterator[tuple[int, _Path]]:
    arrays: dict[_Path, int] = {}
    current: _Path = ()
    open_string: str | None = None

    def resolve(parts: list[str]) -> _Path:
        resolved: _Path = ()
        for part in parts:
            resolved = (*resolved, part)
            if resolved in arrays:
                resolved = (*resolved, arrays[resolved] - 1)
        return resolved

    for lineno, line in enumerate(text.splitlines(), start=1):
        if open_string is not None:
            if line.count(open_string) % 2 == 1:
                open_string = None
            continue
        if m := _ARRAY_HEADER_RE.match(line):
            parts = _key_parts(m.group(1))
            parent = resolve(parts[:-1])
            array = (*parent, parts[-1])
            arrays[array] = arrays.get(array, 0) + 1
            current = (*array, arrays[array] - 1)
            yield lineno, current
        elif m := _TABLE_HEADER_RE.match(line):
            current = resolve(_key_parts(m.group(1)))
            yield lineno, current
        elif m := _KEY_LINE_RE.match(line):
            yield lineno, (*current, *_key_parts(m.group(1)))
            for quote in ('"""', "'''"):
                if m.group(2).count(quote) % 2 == 1:
                    open_string = quote


def _find_line(text: str, wanted: _Path) -> int | None:
    for lineno, defined in _defined_paths(text):
        if defined[: len(wanted)] == wanted:
            return lineno
    return None
