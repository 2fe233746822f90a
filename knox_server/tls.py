"""Hand the TLS peer certificate to the app through the standard ASGI ``tls`` extension.

Hypercorn 0.18's trio worker completes the TLS handshake but never puts the client certificate in
the ASGI scope (pgjones/hypercorn#62). :class:`CertCapturingTCPServer` finishes the handshake first
(``do_handshake`` is idempotent), stores the peer's DER certificate in a context variable that every
request task of that connection inherits, and logs refused handshakes (an expired or wrong-CA
client certificate is refused here by Python's ``ssl``, before any request exists).
:func:`with_tls_extension` then writes ``scope["extensions"]["tls"]`` so handlers only ever read
the standard key.

If a Hypercorn upgrade bypasses the shim, the extension is simply missing and certificate
authentication fails closed (401). Hypercorn is pinned exactly for this reason, and
``tests/test_server_tls.py`` proves a SPIFFE ID reaches the handler.
"""

from __future__ import annotations

import contextlib
import contextvars
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import hypercorn.trio.run
import hypercorn.trio.tcp_server
import structlog
import trio

__all__ = ["CertCapturingTCPServer", "PeerTLS", "install", "with_tls_extension"]

log = structlog.get_logger("knox_server.tls")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class PeerTLS:
    """What the handshake established about one connection."""

    client_cert_pem: str | None
    tls_version: str | None
    cipher: str | None


_TLS_VERSION_CODES = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}

_peer: contextvars.ContextVar[PeerTLS | None] = contextvars.ContextVar(
    "knox_peer_tls", default=None
)


def _handshake_failure_reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLError):
        return cause.reason or type(cause).__name__
    if isinstance(exc, trio.TooSlowError):
        return "handshake timeout"
    return type(cause or exc).__name__


class CertCapturingTCPServer(hypercorn.trio.tcp_server.TCPServer):
    """Hypercorn's trio connection handler, with the handshake done (and logged) up front."""

    async def run(self) -> None:
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            try:
                with trio.fail_after(self.config.ssl_handshake_timeout):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                peer = _peer_address(stream)
                log.warning(
                    "tls_handshake_refused", peer=peer, reason=_handshake_failure_reason(exc)
                )
                await _aclose_quietly(stream)
                return
            der = stream.getpeercert(binary_form=True)
            cipher = stream.cipher()
            _peer.set(
                PeerTLS(
                    client_cert_pem=ssl.DER_cert_to_PEM_cert(der) if der else None,
                    tls_version=stream.version(),
                    cipher=cipher[0] if cipher else None,
                )
            )
        await super().run()


def _peer_address(stream: trio.SSLStream[Any]) -> str:
    try:
        host, port, *_ = stream.transport_stream.socket.getpeername()
    except (OSError, AttributeError, ValueError):
        return "unknown"
    return f"{host}:{port}"


async def _aclose_quietly(stream: trio.SSLStream[Any]) -> None:
    with trio.move_on_after(1):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.transport_stream.aclose()


def install() -> None:
    """Make Hypercorn's trio worker use :class:`CertCapturingTCPServer`. Idempotent."""
    setattr(hypercorn.trio.run, "TCPServer", CertCapturingTCPServer)  # noqa: B010


def with_tls_extension(app: ASGIApp) -> ASGIApp:
    """Wrap ``app`` so HTTPS scopes carry the ASGI ``tls`` extension with the client chain."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("scheme") == "https":
            peer = _peer.get()
            if peer is not None:
                extensions = scope.setdefault("extensions", {})
                extensions["tls"] = {
                    "server_cert": None,
                    "client_cert_chain": [peer.client_cert_pem] if peer.client_cert_pem else [],
                    "client_cert_name": None,
                    "client_cert_error": None,
                    "tls_version": _TLS_VERSION_CODES.get(peer.tls_version or ""),
                    "cipher_suite": None,
                    # Not in the ASGI spec (which wants the IANA number ssl does not expose):
                    # the OpenSSL cipher name, for the audit record.
                    "cipher_name": peer.cipher,
                }
        await app(scope, receive, send)

    return wrapped
