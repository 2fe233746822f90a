"""The TLS serving shell: the peer certificate reaches the app, bad certificates never do."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import trio
from cryptography import x509

from knox_server.serve import ServeSettings, serve
from tests.asgi import serve_lifespan
from tests.pki import CA, CertPair, ssl_client_context


async def _echo_peer_app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """Answers with the URI SANs of the client certificate the tls extension carries."""
    if scope["type"] == "lifespan":
        await serve_lifespan(receive, send)
        return
    tls_ext = scope.get("extensions", {}).get("tls")
    uris: list[str] = []
    if tls_ext and tls_ext["client_cert_chain"]:
        leaf = x509.load_pem_x509_certificate(tls_ext["client_cert_chain"][0].encode())
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    body = json.dumps({"tls": tls_ext is not None, "uris": uris}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def _served(ca: CA, tmp_path: Path) -> AsyncIterator[str]:
    cert, key = ca.server_cert().write(tmp_path, "server")
    settings = ServeSettings(
        listen=("127.0.0.1:0",), cert=cert, key=key, client_ca=ca.write_cert(tmp_path / "ca.pem")
    )
    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(serve, _echo_peer_app, settings)
        yield urls[0]
        nursery.cancel_scope.cancel()


async def _get(url: str, ctx: ssl.SSLContext) -> httpx.Response:
    async with httpx.AsyncClient(verify=ctx, timeout=5) as client:
        return await client.get(url + "/")


async def test_spiffe_id_reaches_the_handler(tmp_path: Path) -> None:
    ca = CA.create()
    workload = ca.spiffe_cert("spiffe://example.org/ns/prod/sa/web")
    with trio.fail_after(20):
        async with _served(ca, tmp_path) as url:
            response = await _get(url, ssl_client_context(ca, workload, tmp_path))
    assert response.json() == {"tls": True, "uris": ["spiffe://example.org/ns/prod/sa/web"]}


async def test_client_without_certificate_is_served_with_empty_chain(tmp_path: Path) -> None:
    ca = CA.create()
    with trio.fail_after(20):
        async with _served(ca, tmp_path) as url:
            response = await _get(url, ssl_client_context(ca, None, tmp_path))
    assert response.json() == {"tls": True, "uris": []}


@pytest.mark.parametrize("kind", ["wrong_ca", "expired"])
async def test_bad_client_certificate_is_refused_and_logged(tmp_path: Path, kind: str) -> None:
    ca = CA.create()
    bad: CertPair
    if kind == "wrong_ca":
        bad = CA.create("other CA").machine_cert("web-1.example.com")
    else:
        bad = ca.expired_machine_cert("web-1.example.com")
    client_ctx = ssl_client_context(ca, bad, tmp_path)
    with trio.fail_after(20), structlog.testing.capture_logs() as logs:
        async with _served(ca, tmp_path) as url:
            with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)):
                await _get(url, client_ctx)
            # The refusal is logged by the server's connection task; give it a moment to run.
            with trio.move_on_after(5):
                while not any(e["event"] == "tls_handshake_refused" for e in logs):  # noqa: ASYNC110
                    await trio.sleep(0.01)
    refusals = [e for e in logs if e["event"] == "tls_handshake_refused"]
    assert refusals, logs
    assert refusals[0]["peer"].startswith("127.0.0.1:")
    assert refusals[0]["reason"]
