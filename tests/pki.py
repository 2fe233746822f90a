"""A throwaway test PKI built with ``cryptography``, for tests that need real X.509 certificates.

``CA.create()`` makes a self-signed EC P-256 certificate authority in memory; its methods issue leaf
certificates shaped like the ones Knox deals with:

* a TLS server certificate (serverAuth, DNS + IP SANs) for ``knox_server`` test instances;
* machine certificates (clientAuth, the hostname as DNS SAN), the identity a host presents upstream;
* SPIFFE workload certificates (clientAuth, exactly one URI SAN);
* deliberately bad ones: expired, two URI SANs, no SAN extension at all.

A "wrong CA" certificate is simply one issued by a second ``CA.create()``. The extensions
(basic constraints, key usage, subject/authority key identifiers) are set so that both Python's
``ssl`` module and ``cryptography.x509.verification`` accept the chains. ``ssl_server_context`` and
``ssl_client_context`` turn a CA and a ``CertPair`` into ready ``ssl.SSLContext`` objects (``ssl``
only loads certificates from files, so they write PEM files into a directory the caller owns,
typically pytest's ``tmp_path``).

Nothing here is for production: keys are unencrypted and live as long as the test.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA",
    "CLIENT_AUTH",
    "SERVER_AUTH",
    "CertPair",
    "ssl_client_context",
    "ssl_server_context",
]

CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH

_LEAF_BACKDATE = dt.timedelta(minutes=5)
_LEAF_LIFETIME = dt.timedelta(days=1)
# The CA covers a wider window than any default leaf, so expired or future-dated test leaves still
# fail for their own dates, not for the CA's.
_CA_BACKDATE = dt.timedelta(days=2)
_CA_LIFETIME = dt.timedelta(days=7)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, also when the file already exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


@dataclass(frozen=True, slots=True)
class CertPair:
    """A leaf certificate and its private key, both PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes
    cert: x509.Certificate

    def write(self, dir: Path, name: str) -> tuple[Path, Path]:
        """Write ``<name>.pem`` and ``<name>.key`` (mode 0600) into ``dir``; return both paths."""
        cert_path = dir / f"{name}.pem"
        key_path = dir / f"{name}.key"
        cert_path.write_bytes(self.cert_pem)
        _write_private(key_path, self.key_pem)
        return cert_path, key_path


@dataclass(frozen=True, slots=True)
class CA:
    """A self-signed test certificate authority that issues leaf certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_pem: bytes

    @classmethod
    def create(
        cls,
        common_name: str = "knox test CA",
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> CA:
        """Make a new CA; by default valid from two days ago until a week ahead."""
        key = _new_key()
        now = _now()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - _CA_BACKDATE)
            .not_valid_after(not_after or now + _CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert=cert, key=key, cert_pem=cert.public_bytes(serialization.Encoding.PEM))

    def write_cert(self, path: Path) -> Path:
        """Write the CA certificate (PEM) to ``path`` and return it."""
        path.write_bytes(self.cert_pem)
        return path

    def leaf(
        self,
        *,
        common_name: str,
        dns: Iterable[str] = (),
        uris: Iterable[str] = (),
        ips: Iterable[str] = (),
        eku: Sequence[x509.ObjectIdentifier] = (CLIENT_AUTH,),
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        with_san: bool = True,
    ) -> CertPair:
        """Issue a leaf certificate; the general builder behind the other methods.

        SANs are added in the order DNS names, URIs, IP addresses. With ``with_san=False`` the
        certificate has no subjectAltName extension at all (``dns``/``uris``/``ips`` must be empty).
        Default validity: five minutes ago until a day ahead.
        """
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if not with_san and sans:
            raise ValueError("with_san=False but SANs were given")
        key = _new_key()
        now = _now()
        public = key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - _LEAF_BACKDATE)
            .not_valid_after(not_after or now + _LEAF_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        if with_san:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return CertPair(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=_key_pem(key),
            cert=cert,
        )

    def server_cert(
        self, hostnames: Sequence[str] = ("localhost",), ips: Sequence[str] = ("127.0.0.1",)
    ) -> CertPair:
        """A TLS server certificate: serverAuth, DNS and IP SANs."""
        cn = hostnames[0] if hostnames else "knox test server"
        return self.leaf(common_name=cn, dns=hostnames, ips=ips, eku=(SERVER_AUTH,))

    def machine_cert(
        self,
        hostname: str,
        *,
        extra_dns: Sequence[str] = (),
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> CertPair:
        """A host's client certificate: clientAuth, DNS SANs ``hostname`` then ``extra_dns``."""
        return self.leaf(
            common_name=hostname,
            dns=(hostname, *extra_dns),
            eku=(CLIENT_AUTH,),
            not_before=not_before,
            not_after=not_after,
        )

    def spiffe_cert(
        self,
        spiffe_id: str,
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> CertPair:
        """A workload's X.509-SVID: clientAuth and exactly one URI SAN."""
        return self.leaf(
            common_name="knox test workload",
            uris=(spiffe_id,),
            eku=(CLIENT_AUTH,),
            not_before=not_before,
            not_after=not_after,
        )

    def expired_machine_cert(self, hostname: str) -> CertPair:
        """A machine certificate whose validity ended an hour ago."""
        now = _now()
        return self.machine_cert(
            hostname,
            not_before=now - dt.timedelta(days=1),
            not_after=now - dt.timedelta(hours=1),
        )

    def two_uri_cert(self, uri1: str, uri2: str) -> CertPair:
        """A clientAuth certificate with two URI SANs (invalid as a SPIFFE SVID)."""
        return self.leaf(common_name="knox test two URIs", uris=(uri1, uri2))

    def no_san_cert(self, common_name: str = "knox test no SAN") -> CertPair:
        """A clientAuth certificate without any subjectAltName extension."""
        return self.leaf(common_name=common_name, with_san=False)


def _write_for_ssl(
    ca: CA, pair: CertPair | None, tmp: Path
) -> tuple[Path, Path | None, Path | None]:
    # Names carry the serial numbers so several contexts can share one directory.
    ca_path = ca.write_cert(tmp / f"ca-{ca.cert.serial_number:x}.pem")
    if pair is None:
        return ca_path, None, None
    cert_path, key_path = pair.write(tmp, f"leaf-{pair.cert.serial_number:x}")
    return ca_path, cert_path, key_path


def ssl_server_context(
    ca: CA, pair: CertPair, tmp: Path, *, require_client_cert: bool = False
) -> ssl.SSLContext:
    """A server-side context presenting ``pair`` and trusting ``ca`` for client certificates.

    With ``require_client_cert`` a client without a valid certificate is refused; otherwise a
    certificate is requested (``CERT_OPTIONAL``) and verified if the client sends one.
    """
    ca_path, cert_path, key_path = _write_for_ssl(ca, pair, tmp)
    assert cert_path is not None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca_path))
    ctx.load_cert_chain(cert_path, key_path)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def ssl_client_context(ca: CA, pair: CertPair | None, tmp: Path) -> ssl.SSLContext:
    """A client-side context trusting ``ca`` (hostname checked), presenting ``pair`` if given."""
    ca_path, cert_path, key_path = _write_for_ssl(ca, pair, tmp)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_path))
    if cert_path is not None:
        ctx.load_cert_chain(cert_path, key_path)
    return ctx
