"""knoxd.upstream.identity: credential checks, and rotation of a live identity over real mTLS.

The rotation tests serve a small ASGI app of our own over real TLS (Hypercorn, client certificates
verified against the test CA) that answers ``GET /v0/keys/`` with one "key id" naming the serial
number of the client certificate it was shown, so each request says which identity presented it.
The identity's files are rewritten the way rotation tools do it (write a temporary file, rename)
and the real watcher picks the change up.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
from cryptography import x509

from knox import wire
from knox_server.serve import ServeSettings, serve
from knoxd.config import IdentityConfig, IdentityKind, PeerSelectors, UpstreamConfig
from knoxd.upstream.identity import (
    Credentials,
    Identity,
    check_credentials,
    read_credentials,
    tls_context,
)
from knoxd.upstream.identity_files import IdentityFileError
from tests.asgi import serve_lifespan
from tests.pki import CA, CertPair
from tests.polling import until

WAIT = 15
HOST = "web-1.example.com"
NOW = dt.datetime.now(dt.UTC)


def machine(tmp_path: Path, name: str = "host") -> IdentityConfig:
    return IdentityConfig(
        name,
        IdentityKind.MACHINE,
        tmp_path / f"{name}.pem",
        tmp_path / f"{name}.key",
        peers=PeerSelectors(uid=(0,)),
    )


def credentials(pair: CertPair, ca: CA | None) -> Credentials:
    return Credentials(pair.cert_pem, pair.key_pem, ca.cert_pem if ca else None)


def upstream(ca_path: Path | None, url: str = "https://127.0.0.1:1") -> UpstreamConfig:
    return UpstreamConfig(urls=(url,), ca=ca_path, timeout_seconds=5)


# --- checks (pure) -----------------------------------------------------------------------------


def test_a_good_pair_has_no_problems(tmp_path: Path) -> None:
    ca = CA.create()
    facts, problems = check_credentials(
        machine(tmp_path),
        credentials(ca.machine_cert(HOST), ca),
        upstream(tmp_path / "ca.pem"),
        NOW,
    )
    assert facts.principal == "0t" + HOST
    assert problems == []


def test_dates_and_chains_are_soft_problems(tmp_path: Path) -> None:
    ca = CA.create()
    ident = machine(tmp_path)
    up = upstream(tmp_path / "ca.pem")
    _, expired = check_credentials(ident, credentials(ca.expired_machine_cert(HOST), ca), up, NOW)
    assert len(expired) == 1
    assert "expired at" in expired[0]
    assert expired[0].startswith("identity 'host':")

    future = ca.machine_cert(HOST, not_before=NOW + dt.timedelta(hours=1))
    _, early = check_credentials(ident, credentials(future, ca), up, NOW)
    assert "is not valid before" in early[0]

    # Same issuer name, other key: an impostor the CA bundle exposes.
    impostor = CA.create()
    _, forged = check_credentials(ident, credentials(impostor.machine_cert(HOST), ca), up, NOW)
    assert "does not verify against" in forged[0]

    pair = ca.machine_cert(HOST)
    spliced = Credentials(pair.cert_pem + impostor.cert_pem, pair.key_pem, ca.cert_pem)
    _, broken = check_credentials(ident, spliced, up, NOW)
    assert "certificate #1" in broken[0]
    assert "is not issued by the one after it" in broken[0]


def test_a_client_ca_the_daemon_does_not_know_is_not_a_problem(tmp_path: Path) -> None:
    server_ca = CA.create("knox server CA")
    client_ca = CA.create("knox client CA")
    _, problems = check_credentials(
        machine(tmp_path),
        credentials(client_ca.machine_cert(HOST), server_ca),
        upstream(tmp_path / "ca.pem"),
        NOW,
    )
    assert problems == []


def test_hard_problems_raise_and_never_show_key_material(tmp_path: Path) -> None:
    ca = CA.create()
    a, b = ca.machine_cert(HOST), ca.machine_cert(HOST)
    with pytest.raises(IdentityFileError, match="does not match the certificate") as info:
        check_credentials(
            machine(tmp_path), Credentials(a.cert_pem, b.key_pem, None), upstream(None), NOW
        )
    assert b"PRIVATE" not in str(info.value).encode()
    half = Credentials(a.cert_pem, a.key_pem[: len(a.key_pem) // 2], None)
    with pytest.raises(IdentityFileError, match="no unencrypted PEM private key"):
        check_credentials(machine(tmp_path), half, upstream(None), NOW)
    assert "PRIVATE" not in repr(half)


def test_tls_context_refuses_a_bad_ca_bundle(tmp_path: Path) -> None:
    ca = CA.create()
    pair = ca.machine_cert(HOST)
    ctx = tls_context(machine(tmp_path), credentials(pair, ca))
    assert ctx.minimum_version.value >= 0x0303
    with pytest.raises(IdentityFileError, match="refused the CA bundle"):
        tls_context(machine(tmp_path), Credentials(pair.cert_pem, pair.key_pem, b"garbage"))


def test_read_credentials_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IdentityFileError, match=r"cannot read cert file .*host\.pem"):
        read_credentials(machine(tmp_path), upstream(None))


# --- rotation over real mTLS -------------------------------------------------------------------


async def echo_serial(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """``GET /v0/keys/`` → ``["serial_<hex>"]`` of the client certificate presented."""
    if scope["type"] == "lifespan":
        await serve_lifespan(receive, send)
        return
    chain = scope.get("extensions", {}).get("tls", {}).get("client_cert_chain") or []
    ids = ["no_certificate"]
    if chain:
        cert = x509.load_pem_x509_certificate(chain[0].encode("ascii"))
        ids = [f"serial_{cert.serial_number:x}"]
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": wire.ok_envelope(ids, host="h", ts=1)})


def serial_of(pair: CertPair) -> str:
    return f"serial_{pair.cert.serial_number:x}"


def replace_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@asynccontextmanager
async def watched_identity(tmp_path: Path, ca: CA, pair: CertPair) -> AsyncIterator[Identity]:
    """An identity (files in ``tmp_path/id``) for the echo server, with its watcher running."""
    server_cert, server_key = ca.server_cert().write(tmp_path, "server")
    ca_path = ca.write_cert(tmp_path / "ca.pem")
    settings = ServeSettings(
        listen=("127.0.0.1:0",), cert=server_cert, key=server_key, client_ca=ca_path
    )
    files = tmp_path / "id"
    files.mkdir()
    pair.write(files, "host")
    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(serve, echo_serial, settings)
        identity = Identity.load(machine(files), upstream(ca_path, urls[0]))
        try:
            await nursery.start(identity.watch)
            yield identity
        finally:
            await identity.aclose()
            nursery.cancel_scope.cancel()


async def presented(identity: Identity) -> list[str]:
    async with identity.lease() as client:
        return await client.get_keys()


async def test_rotated_files_switch_the_client_to_the_new_certificate(tmp_path: Path) -> None:
    ca = CA.create()
    old, new = ca.machine_cert(HOST), ca.machine_cert(HOST)
    with trio.fail_after(WAIT):
        async with watched_identity(tmp_path, ca, old) as identity:
            rotations: list[bool] = []
            identity.add_listener(rotations.append)
            assert await presented(identity) == [serial_of(old)]
            # The key first, then the certificate, as a rotation tool might.
            replace_file(identity.config.key, new.key_pem)
            replace_file(identity.config.cert, new.cert_pem)
            await until(lambda: identity.reloads == 1)
            assert await presented(identity) == [serial_of(new)]
            assert rotations == [False]
            assert identity.facts.not_after == new.cert.not_valid_after_utc


async def test_a_half_written_pair_is_rejected_and_the_old_identity_keeps_working(
    tmp_path: Path,
) -> None:
    ca = CA.create()
    old, new = ca.machine_cert(HOST), ca.machine_cert(HOST)
    with trio.fail_after(WAIT), structlog.testing.capture_logs() as logs:
        async with watched_identity(tmp_path, ca, old) as identity:
            replace_file(identity.config.cert, new.cert_pem)
            await until(lambda: any("rejected" in e["event"] for e in logs))
            assert await presented(identity) == [serial_of(old)]
            # A truncated key (the writer is mid-way) is rejected just the same.
            identity.config.key.write_bytes(new.key_pem[:40])
            await until(lambda: sum("rejected" in e["event"] for e in logs) >= 2)
            assert await presented(identity) == [serial_of(old)]
            replace_file(identity.config.key, new.key_pem)
            await until(lambda: identity.reloads == 1)
            assert await presented(identity) == [serial_of(new)]
    rejections = [e for e in logs if "rejected" in e["event"]]
    assert "does not match the certificate" in rejections[0]["reason"]
    assert "no unencrypted PEM private key" in rejections[1]["reason"]
    assert all(b"PRIVATE" not in repr(e).encode() for e in logs)


async def test_an_expired_new_certificate_is_rejected(tmp_path: Path) -> None:
    ca = CA.create()
    old, expired = ca.machine_cert(HOST), ca.expired_machine_cert(HOST)
    with trio.fail_after(WAIT), structlog.testing.capture_logs() as logs:
        async with watched_identity(tmp_path, ca, old) as identity:
            assert not await identity.reload()
            expired.write(identity.config.cert.parent, "host")
            await until(lambda: any("expired at" in e.get("reason", "") for e in logs))
            assert not await identity.reload()
            assert await presented(identity) == [serial_of(old)]
    reasons = [e["reason"] for e in logs if "rejected" in e["event"]]
    # Logged once, although the files were looked at again. (Between the two writes the watcher
    # may have seen the new certificate with the old key: that is another rejection.)
    assert sum("expired at" in r for r in reasons) == 1
    assert "expired at" in reasons[-1]


async def test_the_old_client_stays_open_until_its_lease_ends(tmp_path: Path) -> None:
    ca = CA.create()
    old, new = ca.machine_cert(HOST), ca.machine_cert(HOST)
    with trio.fail_after(WAIT):
        async with watched_identity(tmp_path, ca, old) as identity:
            identity.stop()
            async with identity.lease() as held:
                new.write(identity.config.cert.parent, "host")
                assert await identity.reload()
                # A request already holding the old client finishes with it...
                assert await held.get_keys() == [serial_of(old)]
                # ...while new requests use the new one.
                assert await presented(identity) == [serial_of(new)]
            with pytest.raises(RuntimeError, match="closed"):
                await held.get_keys()


async def test_a_new_spiffe_id_is_reported_as_a_principal_change(tmp_path: Path) -> None:
    ca = CA.create()
    ca_path = ca.write_cert(tmp_path / "ca.pem")
    config = IdentityConfig(
        "web",
        IdentityKind.SPIFFE,
        tmp_path / "web.pem",
        tmp_path / "web.key",
        peers=PeerSelectors(uid=(0,)),
    )
    ca.spiffe_cert("spiffe://example.org/web").write(tmp_path, "web")
    identity = Identity.load(config, upstream(ca_path))
    changes: list[bool] = []
    identity.add_listener(changes.append)
    ca.spiffe_cert("spiffe://example.org/web-v2").write(tmp_path, "web")
    assert await identity.reload()
    assert identity.facts.principal == "0sspiffe://example.org/web-v2"
    assert changes == [True]
    assert "web-v2" in repr(identity)
    await identity.aclose()


async def test_watch_returns_promptly_when_stopped(tmp_path: Path) -> None:
    ca = CA.create()
    ca.machine_cert(HOST).write(tmp_path, "host")
    identity = Identity.load(machine(tmp_path), upstream(ca.write_cert(tmp_path / "ca.pem")))
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(identity.watch)
            identity.stop()
    await identity.aclose()


async def test_an_unwatchable_directory_is_logged_not_fatal(tmp_path: Path) -> None:
    ca = CA.create()
    ca.machine_cert(HOST).write(tmp_path, "host")
    identity = Identity.load(machine(tmp_path), upstream(ca.write_cert(tmp_path / "ca.pem")))
    (tmp_path / "host.pem").unlink()
    (tmp_path / "host.key").unlink()
    (tmp_path / "ca.pem").unlink()
    tmp_path.rmdir()
    with trio.fail_after(WAIT), structlog.testing.capture_logs() as logs:
        await identity.watch()
    assert [e["event"] for e in logs] == [
        "cannot watch the identity's files; rotation needs a restart"
    ]
    async with identity.lease() as client:
        assert client.base_urls == ("https://127.0.0.1:1",)
    await identity.aclose()
