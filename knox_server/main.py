"""The server's composition root: configuration in, a serving knox_server out."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
import trio

from knox_server.app import MAX_WAIT_SECONDS, AppSettings, create_app
from knox_server.audit import AuditLog
from knox_server.auth import Authenticator
from knox_server.changes import ChangeHub
from knox_server.config import ConfigError, ServerConfig
from knox_server.crypto import MasterKeyring
from knox_server.pg_listen import listen_for_changes
from knox_server.pg_store import PostgresKeyStore
from knox_server.pg_store import migrate as migrate_postgres
from knox_server.rewrap import rewrap
from knox_server.serve import ServeSettings, serve
from knox_server.sqlite_store import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from knox_server.sqlite_store import SQLiteKeyStore
from knox_server.store import KeyStore
from knox_server.tokens import TokenDB

__all__ = ["migrate_store", "open_store", "rewrap_stored", "run_server"]

log = structlog.get_logger("knox_server")

_READ_TIMEOUT_MARGIN_SECONDS = 30


_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


async def open_store(url: str, *, migrate: bool = False) -> KeyStore:
    """The backend named by a ``storage.url``; a PostgreSQL schema is migrated first if
    ``migrate`` (SQLite creates its schema itself). Raises :class:`ConfigError` for an unknown
    backend, :class:`~knox.errors.InternalError` if the store cannot be opened."""
    if url.startswith("sqlite:///"):
        return await SQLiteKeyStore.open(Path(url.removeprefix("sqlite:///")))
    if url.startswith(_POSTGRES_SCHEMES):
        return await PostgresKeyStore.open(url, migrate=migrate)
    raise ConfigError(f"storage.url: unsupported backend {url.split(':', 1)[0]!r}")


async def run_server(
    config: ServerConfig,
    *,
    on_listening: Callable[[list[str]], None] | None = None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Load keys, tokens and the store, then serve until cancelled or until ``shutdown_trigger``
    returns (a graceful stop: in-flight requests are answered, within Hypercorn's graceful
    timeout).

    With PostgreSQL, every replica's writes wake this one's long-polls: the change listener is
    up before the socket listens. ``on_listening`` and ``task_status`` receive the bound URLs
    once the socket listens. Raises :class:`ConfigError`, the key and token files' errors,
    :class:`~knox.errors.InternalError` (a store or listener that cannot connect), or
    ``OSError`` before serving.
    """
    keyring = MasterKeyring.load(config.master_key_file)
    tokens = TokenDB.load(config.token_file) if config.token_file else None
    authenticator = Authenticator(config.client_ca.read_bytes(), tokens)
    audit = AuditLog.to_file(config.audit_file) if config.audit_file else AuditLog()
    store = await open_store(config.storage_url, migrate=config.migrate_on_start)
    hub = ChangeHub()
    try:
        app = create_app(
            store=store,
            keyring=keyring,
            authenticator=authenticator,
            audit=audit,
            settings=AppSettings(
                host=config.host,
                default_acl=config.default_acl,
                knox_compat_list=config.knox_compat,
                max_body_bytes=config.max_body_bytes,
                metrics=config.metrics,
            ),
            hub=hub,
        )
        settings = ServeSettings(
            listen=config.listen,
            cert=config.cert,
            key=config.key,
            client_ca=config.client_ca,
            # A held long-poll reads nothing from its client: the read timeout must outlast it.
            read_timeout_seconds=MAX_WAIT_SECONDS + _READ_TIMEOUT_MARGIN_SECONDS,
        )

        async def serve_then_stop(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(app, settings, shutdown_trigger=shutdown_trigger, task_status=task_status)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            if config.storage_url.startswith(_POSTGRES_SCHEMES):
                await nursery.start(
                    listen_for_changes, config.storage_url, hub.notify, hub.notify_all
                )
            urls: list[str] = await nursery.start(serve_then_stop)
            log.info("listening", urls=urls, master_keys=list(keyring.ids))
            if on_listening is not None:
                on_listening(urls)
            task_status.started(urls)
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
        audit.close()


async def migrate_store(config: ServerConfig) -> dict[str, Any]:
    """Create or upgrade the store's schema (idempotent); a report as a dict."""
    url = config.storage_url
    if url.startswith(_POSTGRES_SCHEMES):
        report = await migrate_postgres(url)
        return {"backend": "postgresql", "schema_version": report.after, "previous": report.before}
    store = await open_store(url)
    await store.aclose()
    return {"backend": "sqlite", "schema_version": SQLITE_SCHEMA_VERSION}


async def rewrap_stored(config: ServerConfig) -> dict[str, Any]:
    """Re-seal every stored version under the newest master key; the report as a dict."""
    keyring = MasterKeyring.load(config.master_key_file)
    store = await open_store(config.storage_url)
    try:
        report = await rewrap(store, keyring)
    finally:
        await store.aclose()
    return dataclasses.asdict(report)
