"""A development PKI for ``knox-server dev``: a CA, a server certificate, a machine certificate and
a SPIFFE workload certificate, written as PEM files (private keys mode 0600).

For development and demos only: one-year validity, keys unencrypted on disk.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DevPKI", "create_dev_pki"]

_VALIDITY = datetime.timedelta(days=365)


@dataclass(frozen=True, slots=True)
class DevPKI:
    """Paths of the generated files."""

    ca: Path
    ca_key: Path
    server: tuple[Path, Path]
    host: tuple[Path, Path]
    service: tuple[Path, Path]

    @classmethod
    def at(cls, directory: Path) -> DevPKI:
        """The file layout inside ``directory``."""
        return cls(
            ca=directory / "ca.pem",
            ca_key=directory / "ca.key",
            server=(directory / "server.pem", directory / "server.key"),
            host=(directory / "host.pem", directory / "host.key"),
            service=(directory / "service.pem", directory / "service.key"),
        )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _leaf(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    sans: list[x509.GeneralName],
    eku: x509.ObjectIdentifier,
    now: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def create_dev_pki(directory: Path, *, hostname: str, spiffe_id: str) -> DevPKI:
    """Generate the dev PKI into ``directory`` (created if needed) and return the file paths."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("knox dev CA"))
        .issuer_name(_name("knox dev CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = DevPKI.at(directory)
    _write_cert(paths.ca, ca)
    _write_key(paths.ca_key, ca_key)
    leaves: list[tuple[tuple[Path, Path], str, list[x509.GeneralName], x509.ObjectIdentifier]] = [
        (
            paths.server,
            "localhost",
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
            ExtendedKeyUsageOID.SERVER_AUTH,
        ),
        (paths.host, hostname, [x509.DNSName(hostname)], ExtendedKeyUsageOID.CLIENT_AUTH),
        (
            paths.service,
            spiffe_id,
            [x509.UniformResourceIdentifier(spiffe_id)],
            ExtendedKeyUsageOID.CLIENT_AUTH,
        ),
    ]
    for (cert_path, key_path), cn, sans, eku in leaves:
        cert, key = _leaf(ca, ca_key, cn, sans, eku, now)
        _write_cert(cert_path, cert)
        _write_key(key_path, key)
    return paths
