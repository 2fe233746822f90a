"""The test PKI produces certificates that real TLS stacks and verifiers treat as claimed."""

from __future__ import annotations

import datetime as dt
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from tests.pki import CA, CertPair, ssl_client_context, ssl_server_context

SPIFFE_ID = "spiffe://example.org/ns/prod/sa/knoxd"
HANDSHAKE_TIMEOUT = 10


@dataclass
class Outcome:
    """What each side of one TLS connection saw."""

    server_peer_sans: list[tuple[str, str]] | None = None
    server_error: BaseException | None = None
    client_echo: bytes | None = None
    client_error: BaseException | None = None


def _sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


async def _connect(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str = "127.0.0.1"
) -> Outcome:
    """One TLS connection over loopback TCP: the client sends b"ping", the server echoes it."""
    out = Outcome()
    listeners = await trio.open_ssl_over_tcp_listeners(0, server_ctx, host="127.0.0.1")
    try:
        assert len(listeners) == 1
        listener = listeners[0]
        tcp_listener = listener.transport_listener
        assert isinstance(tcp_listener, trio.SocketListener)
        port = tcp_listener.socket.getsockname()[1]

        async def serve() -> None:
            stream = await listener.accept()
            try:
                await stream.do_handshake()
                peer = stream.getpeercert()
                alt_names = peer.get("subjectAltName", ()) if peer else ()
                out.server_peer_sans = [(str(k), str(v)) for k, v in alt_names]
                data = await stream.receive_some()
                await stream.send_all(data)
            except trio.BrokenResourceError as exc:
                out.server_error = exc
            finally:
                await stream.aclose()

        async def client() -> None:
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            stream = trio.SSLStream(tcp, client_ctx, server_hostname=server_hostname)
            try:
                await stream.do_handshake()
                await stream.send_all(b"ping")
                out.client_echo = bytes(await stream.receive_some())
            except trio.BrokenResourceError as exc:
                out.client_error = exc
            finally:
                await stream.aclose()

        with trio.fail_after(HANDSHAKE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                nursery.start_soon(client)
    finally:
        for lst in listeners:
            await lst.aclose()
    return out


def _ssl_cause(exc: BaseException | None) -> ssl.SSLError:
    """The ``ssl.SSLError`` behind a trio ``BrokenResourceError``."""
    assert exc is not None
    cause = exc.__cause__
    assert isinstance(cause, ssl.SSLError), repr(exc)
    return cause


async def test_mtls_handshake_server_sees_machine_dns_san(tmp_path: Path) -> None:
    ca = CA.create()
    server = ssl_server_context(ca, ca.server_cert(), tmp_path, require_client_cert=True)
    machine = ca.machine_cert("host1.example.com", extra_dns=("alias.example.com",))
    out = await _connect(server, ssl_client_context(ca, machine, tmp_path))
    assert out.server_error is None
    assert out.client_error is None
    assert out.client_echo == b"ping"
    assert out.server_peer_sans == [("DNS", "host1.example.com"), ("DNS", "alias.example.com")]


async def test_server_cert_matches_localhost_name_too(tmp_path: Path) -> None:
    ca = CA.create()
    server = ssl_server_context(ca, ca.server_cert(), tmp_path)
    out = await _connect(server, ssl_client_context(ca, None, tmp_path), "localhost")
    assert out.client_error is None
    assert out.server_peer_sans == []
    assert out.client_echo == b"ping"


async def test_client_cert_from_other_ca_is_refused(tmp_path: Path) -> None:
    ca = CA.create()
    other = CA.create("some other CA")
    server = ssl_server_context(ca, ca.server_cert(), tmp_path, require_client_cert=True)
    stranger = other.machine_cert("host1.example.com")
    out = await _connect(server, ssl_client_context(ca, stranger, tmp_path))
    assert out.server_peer_sans is None
    assert _ssl_cause(out.server_error).reason == "CERTIFICATE_VERIFY_FAILED"
    # Under TLS 1.3 the client learns of the refusal from the server's alert, after its handshake.
    assert out.client_echo is None
    assert out.client_error is not None


async def test_expired_machine_cert_is_refused(tmp_path: Path) -> None:
    ca = CA.create()
    server = ssl_server_context(ca, ca.server_cert(), tmp_path, require_client_cert=True)
    expired = ca.expired_machine_cert("host1.example.com")
    out = await _connect(server, ssl_client_context(ca, expired, tmp_path))
    assert out.server_peer_sans is None
    cause = _ssl_cause(out.server_error)
    assert isinstance(cause, ssl.SSLCertVerificationError)
    assert "expired" in cause.verify_message
    assert out.client_echo is None
    assert out.client_error is not None


async def test_client_refuses_server_from_other_ca(tmp_path: Path) -> None:
    ca = CA.create()
    other = CA.create("some other CA")
    server = ssl_server_context(other, other.server_cert(), tmp_path)
    out = await _connect(server, ssl_client_context(ca, None, tmp_path))
    assert isinstance(_ssl_cause(out.client_error), ssl.SSLCertVerificationError)
    assert out.server_error is not None


def test_policy_verifier_accepts_spiffe_cert_and_returns_uri() -> None:
    ca = CA.create()
    svid = ca.spiffe_cert(SPIFFE_ID)
    verifier = PolicyBuilder().store(Store([ca.cert])).build_client_verifier()
    verified = verifier.verify(svid.cert, [])
    assert verified.subjects == [x509.UniformResourceIdentifier(SPIFFE_ID)]
    assert verified.chain == [svid.cert, ca.cert]


def test_policy_verifier_rejects_other_ca_and_expired() -> None:
    ca = CA.create()
    verifier = PolicyBuilder().store(Store([ca.cert])).build_client_verifier()
    with pytest.raises(VerificationError):
        verifier.verify(CA.create().spiffe_cert(SPIFFE_ID).cert, [])
    now = dt.datetime.now(dt.UTC)
    expired = ca.spiffe_cert(
        SPIFFE_ID, not_before=now - dt.timedelta(days=1), not_after=now - dt.timedelta(hours=1)
    )
    with pytest.raises(VerificationError):
        verifier.verify(expired.cert, [])


def test_policy_server_verifier_accepts_server_cert() -> None:
    ca = CA.create()
    verifier = (
        PolicyBuilder().store(Store([ca.cert])).build_server_verifier(x509.DNSName("localhost"))
    )
    chain = verifier.verify(ca.server_cert().cert, [])
    assert chain[-1] == ca.cert


def test_bad_certs_have_exactly_the_claimed_sans() -> None:
    ca = CA.create()
    two = ca.two_uri_cert("spiffe://example.org/a", "spiffe://example.org/b")
    assert list(_sans(two.cert)) == [
        x509.UniformResourceIdentifier("spiffe://example.org/a"),
        x509.UniformResourceIdentifier("spiffe://example.org/b"),
    ]
    with pytest.raises(x509.ExtensionNotFound):
        _sans(ca.no_san_cert().cert)
    assert list(_sans(ca.spiffe_cert(SPIFFE_ID).cert)) == [
        x509.UniformResourceIdentifier(SPIFFE_ID)
    ]
    expired = ca.expired_machine_cert("host1.example.com").cert
    assert expired.not_valid_after_utc < dt.datetime.now(dt.UTC) - dt.timedelta(minutes=59)


def test_cert_pair_write_and_key_mode(tmp_path: Path) -> None:
    ca = CA.create()
    pair: CertPair = ca.machine_cert("host1.example.com")
    cert_path, key_path = pair.write(tmp_path, "machine")
    assert (cert_path.name, key_path.name) == ("machine.pem", "machine.key")
    assert x509.load_pem_x509_certificate(cert_path.read_bytes()) == pair.cert
    assert key_path.read_bytes() == pair.key_pem
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    ca_path = ca.write_cert(tmp_path / "ca.pem")
    assert x509.load_pem_x509_certificate(ca_path.read_bytes()) == ca.cert
