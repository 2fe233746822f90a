"""The server's configuration file (TOML), validated at start with errors naming the key.

```toml
[server]
listen = ["0.0.0.0:9000"]          # HOST:PORT or fd://N (socket activation)
cert = "/etc/knox-server/server.pem"
key = "/etc/knox-server/server.key"
client_ca = "/etc/knox-server/ca.pem"   # CA for client certificates (machines, SPIFFE workloads)
host = "knox-1"                    # the envelope's "host"; default: this machine's hostname
knox_compat = false                # true: GET /v0/keys/ lists every key, as Go Knox does
max_body_bytes = 65536
metrics = true                     # serve GET /metrics (Prometheus) without authentication

[storage]
url = "sqlite:///var/lib/knox-server/knox.db"   # or postgresql://USER@HOST:PORT/DB?...
master_key_file = "/etc/knox-server/master.keys"
migrate_on_start = false    # PostgreSQL: create or upgrade the schema at start

[auth]
token_file = "/etc/knox-server/tokens.toml"     # optional: users authenticated by 0u<token>

[[default_acl]]                     # added to every new key after the creator's Admin entry
type = "UserGroup"
id = "security-team"
access = "Admin"

[audit]
file = "/var/log/knox-server/audit.jsonl"  # optional; default: a JSON line per request on stdout
```

Relative paths are relative to the configuration file's directory.

``metrics``: ``GET /metrics`` answers without a client certificate or token, since Prometheus
scrapers rarely hold either; it exposes request counts and timings by route and code, the
long-polls held and the audit records written, never a key id or a principal. Set it to ``false``
to answer ``/metrics`` as an unknown route (404 code 8, after authentication).
"""

from __future__ import annotations

import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knox.errors import KnoxError
from knox.model import Access, AccessType, PrincipalType, validate_principal

__all__ = ["ConfigError", "ServerConfig", "load_config", "parse_config"]


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[str, ...]
    cert: Path
    key: Path
    client_ca: Path
    host: str
    knox_compat: bool
    max_body_bytes: int
    storage_url: str
    master_key_file: Path
    token_file: Path | None
    default_acl: tuple[Access, ...]
    audit_file: Path | None
    migrate_on_start: bool = False
    metrics: bool = True


_SECTIONS: dict[str, set[str]] = {
    "server": {
        "listen",
        "cert",
        "key",
        "client_ca",
        "host",
        "knox_compat",
        "max_body_bytes",
        "metrics",
    },
    "storage": {"url", "master_key_file", "migrate_on_start"},
    "auth": {"token_file"},
    "audit": {"file"},
}


class _Reader:
    def __init__(self, base: Path) -> None:
        self.base = base

    def table(self, doc: Mapping[str, Any], name: str, *, required: bool) -> Mapping[str, Any]:
        value = doc.get(name)
        if value is None:
            if required:
                raise ConfigError(f"missing table [{name}]")
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a table")
        unknown = sorted(set(value) - _SECTIONS[name])
        if unknown:
            raise ConfigError(f"{name}.{unknown[0]}: unknown key")
        return value

    def string(
        self, t: Mapping[str, Any], section: str, key: str, default: str | None = None
    ) -> str:
        value = t.get(key, default)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{section}.{key}: expected a non-empty string")
        return value

    def path(self, t: Mapping[str, Any], section: str, key: str) -> Path:
        return self.base / self.string(t, section, key)

    def optional_path(self, t: Mapping[str, Any], section: str, key: str) -> Path | None:
        return self.path(t, section, key) if key in t else None


def _default_acl(doc: Mapping[str, Any]) -> tuple[Access, ...]:
    entries = doc.get("default_acl", [])
    if not isinstance(entries, list):
        raise ConfigError("default_acl: expected an array of tables")
    acl: list[Access] = []
    for i, entry in enumerate(entries):
        where = f"default_acl[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"type", "id", "access"}:
            raise ConfigError(f"{where}: expected exactly the keys type, id, access")
        try:
            access = Access(
                PrincipalType(entry["type"]), str(entry["id"]), AccessType(entry["access"])
            )
        except ValueError:
            raise ConfigError(f"{where}: unknown type or access") from None
        if access.access is AccessType.NONE:
            raise ConfigError(f"{where}.access: None grants nothing")
        try:
            validate_principal(access)
        except KnoxError as exc:
            raise ConfigError(f"{where}.id: {exc.message}") from None
        acl.append(access)
    return tuple(acl)


def parse_config(doc: Mapping[str, Any], base: Path) -> ServerConfig:
    """Validate a parsed TOML document. Raises :class:`ConfigError`."""
    unknown = sorted(set(doc) - set(_SECTIONS) - {"default_acl"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown table")
    r = _Reader(base)
    server = r.table(doc, "server", required=True)
    storage = r.table(doc, "storage", required=True)
    auth = r.table(doc, "auth", required=False)
    audit = r.table(doc, "audit", required=False)

    listen = server.get("listen", ["127.0.0.1:9000"])
    if (
        not isinstance(listen, list)
        or not listen
        or not all(isinstance(x, str) and x for x in listen)
    ):
        raise ConfigError("server.listen: expected a non-empty array of HOST:PORT strings")
    knox_compat = server.get("knox_compat", False)
    if not isinstance(knox_compat, bool):
        raise ConfigError("server.knox_compat: expected true or false")
    metrics = server.get("metrics", True)
    if not isinstance(metrics, bool):
        raise ConfigError("server.metrics: expected true or false")
    max_body = server.get("max_body_bytes", 64 * 1024)
    if (
        isinstance(max_body, bool)
        or not isinstance(max_body, int)
        or not 1024 <= max_body <= 16 << 20
    ):
        raise ConfigError("server.max_body_bytes: expected an integer between 1024 and 16 MiB")
    migrate_on_start = storage.get("migrate_on_start", False)
    if not isinstance(migrate_on_start, bool):
        raise ConfigError("storage.migrate_on_start: expected true or false")
    url = r.string(storage, "storage", "url")
    if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError("storage.url: expected sqlite:///PATH or postgresql://...")
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        url = "sqlite:///" + str(base / url.removeprefix("sqlite:///"))
    return ServerConfig(
        listen=tuple(listen),
        cert=r.path(server, "server", "cert"),
        key=r.path(server, "server", "key"),
        client_ca=r.path(server, "server", "client_ca"),
        host=r.string(server, "server", "host", socket.gethostname()),
        knox_compat=knox_compat,
        max_body_bytes=max_body,
        storage_url=url,
        master_key_file=r.path(storage, "storage", "master_key_file"),
        token_file=r.optional_path(auth, "auth", "token_file"),
        default_acl=_default_acl(doc),
        audit_file=r.optional_path(audit, "audit", "file"),
        migrate_on_start=migrate_on_start,
        metrics=metrics,
    )


def load_config(path: Path) -> ServerConfig:
    """Read and validate the file. Raises :class:`ConfigError` (also for unreadable/bad TOML)."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse_config(doc, path.parent.resolve())
