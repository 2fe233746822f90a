"""Serve an ASGI app over TLS with Hypercorn's trio worker.

TLS 1.2 or newer; client certificates are requested but optional (users authenticate with tokens),
and Python's ``ssl`` verifies every certificate a client does send against the configured CA, so a
wrong-CA or expired certificate is refused in the handshake (logged by :mod:`knox_server.tls`) where
Go Knox would answer 401. Header, idle and handshake timeouts are bounded.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

from knox_server import tls

__all__ = ["ServeSettings", "serve", "server_ssl_context"]


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """Where and how to listen. ``listen`` entries are ``HOST:PORT`` or ``fd://N``."""

    listen: tuple[str, ...]
    cert: Path
    key: Path
    client_ca: Path
    keep_alive_seconds: float = 60.0
    read_timeout_seconds: int = 30
    handshake_timeout_seconds: float = 10.0
    graceful_timeout_seconds: float = 5.0
    # Room for the longest change check knox.http_client sends (a 60 KiB request target).
    max_header_bytes: int = 64 * 1024
    # Knox clients keep one connection per host; recycling it every 1,000 requests (Hypercorn's
    # default) costs a TLS handshake for nothing.
    keep_alive_max_requests: int = 100_000
    backlog: int = 1024


def server_ssl_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """TLS 1.2+, ALPN h2 and http/1.1, client certificates requested and verified if sent."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(str(client_ca))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class _Config(hypercorn.config.Config):
    """Hypercorn's config with our own SSL context instead of the one it would build."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context

    def create_ssl_context(self) -> ssl.SSLContext:
        return self._context

    @property
    def ssl_enabled(self) -> bool:
        return True

    def create_sockets(self) -> hypercorn.config.Sockets:
        """Hypercorn's own version leaks the socket when ``bind`` fails; this one closes every
        socket it made before re-raising."""
        made: list[socket.socket] = []
        try:
            for bind in self.bind:
                if bind.startswith("fd://"):
                    sock = socket.socket(fileno=int(bind.removeprefix("fd://")))
                    made.append(sock)
                else:
                    host, _, port = bind.replace("[", "").replace("]", "").rpartition(":")
                    family = socket.AF_INET6 if ":" in host else socket.AF_INET
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    made.append(sock)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((host, int(port)))
                sock.setblocking(False)
                sock.set_inheritable(True)
        except BaseException:
            for sock in made:
                sock.close()
            raise
        return hypercorn.config.Sockets(made, [], [])


def _hypercorn_config(settings: ServeSettings) -> hypercorn.config.Config:
    config = _Config(server_ssl_context(settings.cert, settings.key, settings.client_ca))
    config.bind = list(settings.listen)
    config.keep_alive_timeout = settings.keep_alive_seconds
    config.read_timeout = settings.read_timeout_seconds
    config.ssl_handshake_timeout = settings.handshake_timeout_seconds
    config.graceful_timeout = settings.graceful_timeout_seconds
    config.h11_max_incomplete_size = settings.max_header_bytes
    config.backlog = settings.backlog
    config.keep_alive_max_requests = settings.keep_alive_max_requests
    config.accesslog = None
    config.include_server_header = False
    return config


async def serve(
    app: Callable[..., Awaitable[None]],
    settings: ServeSettings,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled or ``shutdown_trigger`` returns.

    ``task_status.started`` receives the bound URLs (``https://127.0.0.1:PORT``), so a caller
    listening on port 0 learns the port. Raises ``OSError`` if an address cannot be bound.
    """
    tls.install()
    wrapped: Any = tls.with_tls_extension(app)
    await hypercorn.trio.serve(
        wrapped,
        _hypercorn_config(settings),
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
        mode="asgi",
    )
