"""Checks of an identity's certificate and key files, and what they say about the identity.

:func:`identity_facts` is pure (PEM bytes in, facts out) so that a rotation can check a new pair
before using it; :func:`check_identity_files` reads the files and calls it. Both raise
:class:`IdentityFileError` whose message starts with the identity's name and never contains key
material.

What is checked, as ``knoxd-config.md`` requires: both files readable and PEM; the key unencrypted
and matching the certificate; the certificate usable for client authentication (if it restricts
its extended key usage); a ``spiffe`` identity's certificate carries exactly one URI SAN and it is
a ``spiffe://<trust domain>/<path>`` ID (the rule the Knox server applies); a ``machine`` identity
has a hostname that is a DNS SAN of its certificate (the server refuses any other claim), by
default the first DNS SAN. Validity dates are reported, not judged: an expired certificate is the
refresher's concern, and rotation may be about to fix it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from knoxd.config import IdentityConfig, IdentityKind

__all__ = [
    "MAX_PEM_BYTES",
    "IdentityFacts",
    "IdentityFileError",
    "check_identity_files",
    "identity_facts",
    "read_identity_file",
]

MAX_PEM_BYTES = 1 << 20


class IdentityFileError(Exception):
    """An identity's cert or key file is unusable; the message names the identity and why."""


@dataclass(frozen=True, slots=True)
class IdentityFacts:
    """What an identity presents upstream.

    ``principal`` is the ``Authorization`` header value: ``0t<hostname>`` for a machine identity,
    ``0s<spiffe id>`` for a SPIFFE one. Exactly one of ``hostname`` and ``spiffe_id`` is set.
    """

    identity: str
    principal: str
    hostname: str | None
    spiffe_id: str | None
    not_before: dt.datetime
    not_after: dt.datetime


def check_identity_files(identity: IdentityConfig) -> IdentityFacts:
    """Read ``identity.cert`` and ``identity.key`` and check them (see the module docstring)."""
    cert_pem = read_identity_file(identity, "cert", identity.cert)
    key_pem = read_identity_file(identity, "key", identity.key)
    return identity_facts(identity, cert_pem, key_pem)


def identity_facts(identity: IdentityConfig, cert_pem: bytes, key_pem: bytes) -> IdentityFacts:
    """Check a certificate chain (leaf first) and key for ``identity``; return its facts."""
    name = identity.name
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise IdentityFileError(
            f"identity {name!r}: {identity.cert} holds no valid PEM certificate"
        ) from None
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The library's message is dropped on purpose: nothing derived from key bytes is shown.
        raise IdentityFileError(
            f"identity {name!r}: {identity.key} holds no unencrypted PEM private key"
        ) from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise IdentityFileError(
            f"identity {name!r}: the key in {identity.key} does not match the certificate "
            f"in {identity.cert}"
        )
    _check_client_auth(name, leaf)
    dns, uris = _sans(leaf)
    hostname: str | None = None
    spiffe_id: str | None = None
    if identity.kind is IdentityKind.SPIFFE:
        spiffe_id = _spiffe_id(name, uris)
        principal = "0s" + spiffe_id
    else:
        hostname = _hostname(name, identity.hostname, dns)
        principal = "0t" + hostname
    return IdentityFacts(
        identity=name,
        principal=principal,
        hostname=hostname,
        spiffe_id=spiffe_id,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
    )


def read_identity_file(identity: IdentityConfig, what: str, path: Path) -> bytes:
    """A PEM file of ``identity`` (at most :data:`MAX_PEM_BYTES`); :class:`IdentityFileError`
    naming the identity and file otherwise."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as e:
        raise IdentityFileError(
            f"identity {identity.name!r}: cannot read {what} file {path}: {e.strerror or e}"
        ) from None
    if len(data) > MAX_PEM_BYTES:
        raise IdentityFileError(
            f"identity {identity.name!r}: {what} file {path} is larger than {MAX_PEM_BYTES} bytes"
        )
    return data


def _check_client_auth(name: str, leaf: x509.Certificate) -> None:
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if (
        ExtendedKeyUsageOID.CLIENT_AUTH not in eku
        and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku
    ):
        raise IdentityFileError(
            f"identity {name!r}: the certificate is not valid for TLS client authentication "
            "(its extended key usage lacks clientAuth)"
        )


def _sans(leaf: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return san.get_values_for_type(x509.DNSName), san.get_values_for_type(
        x509.UniformResourceIdentifier
    )


def _spiffe_id(name: str, uris: list[str]) -> str:
    if len(uris) != 1:
        raise IdentityFileError(
            f"identity {name!r}: a spiffe certificate needs exactly one URI SAN, it has {len(uris)}"
        )
    uri = uris[0]
    rest = uri.removeprefix("spiffe://")
    domain, slash, _ = rest.partition("/")
    if rest == uri or not domain or not slash:
        raise IdentityFileError(
            f"identity {name!r}: the certificate's URI SAN {uri!r} is not a "
            "spiffe://<trust domain>/<path> ID"
        )
    return uri


def _hostname(name: str, configured: str | None, dns: list[str]) -> str:
    if configured is None:
        if not dns:
            raise IdentityFileError(
                f"identity {name!r}: the certificate has no DNS SAN; set hostname or use a "
                "certificate naming the host"
            )
        return dns[0]
    if not any(_dns_matches(pattern, configured) for pattern in dns):
        raise IdentityFileError(
            f"identity {name!r}: hostname {configured!r} is not a DNS SAN of the certificate "
            f"(it names {', '.join(dns) or 'none'}), so the server would refuse it"
        )
    return configured


def _dns_matches(pattern: str, host: str) -> bool:
    """Go's ``VerifyHostname`` for DNS SANs: case-insensitive, a leading ``*.`` covers one label."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, parent = host.partition(".")
        return bool(label) and bool(dot) and parent == pattern[2:]
    return pattern == host
