"""Request authentication: the ``Authorization`` header and the peer certificate → principals.

Knox's providers, in Knox's order and with its error texts (``server/auth/auth.go``). The header is
``<version><type><payload>``; a provider matches when the header is longer than two characters and
starts with its own version (``0``) and type:

* ``0t<host>``, provider ``mtls``: a machine. The chain verifies to the CA for clientAuth at the
  current time, and ``<host>`` is one of the leaf's DNS (or IP) SANs (Go's ``VerifyHostname``);
  the principal id is ``<host>`` as claimed.
* ``0t…``, provider ``spiffe-fallback``: the ``spiffe`` check below on a ``0t`` request, so a host
  certificate that also carries a SPIFFE ID yields a service too.
* ``0s…``, provider ``spiffe``: a service. The chain verifies, and the leaf has exactly one URI
  SAN, of the form ``spiffe://<domain>/<path>`` (both parts non-empty).
* ``0u<token>``, provider ``token``: a user, if the token is in the
  :class:`~knox_server.tokens.TokenDB`.

Every matching provider is tried. The first success is the default principal; all successes go
into the :class:`~knox.model.PrincipalMux`. If none succeeds, :class:`UnauthenticatedError` carries
the *last* matching provider's message (so a wrong hostname on ``0t`` reports the SPIFFE
fallback's "no spiffe identity", as Knox does), or "No matching authentication providers found".

The peer certificate chain is what the ASGI ``tls`` extension gives (``client_cert_chain``: PEM
strings, leaf first, the rest used as intermediates). Path validation is cached: a chain that
verified once is remembered, with the window in which every certificate of its verified path is
valid, so a repeat costs a dictionary lookup and a clock read and stops working when a
certificate of that path expires. Failures are not cached.

No message ever contains a user token.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from knox.errors import UnauthenticatedError
from knox.model import Machine, Principal, PrincipalMux, Service
from knox_server.tokens import TokenDB

__all__ = [
    "ERR_NO_HEADER",
    "ERR_NO_PROVIDER",
    "ERR_NO_SPIFFE",
    "ERR_UNKNOWN_USER",
    "AuthResult",
    "Authenticator",
    "verify_hostname",
]

ERR_NO_HEADER = "Missing Authorization header"
ERR_NO_PROVIDER = "No matching authentication providers found"
ERR_NO_PEER_CERTS = "auth: No peer certs configured"
ERR_VERIFY_PREFIX = "auth: failed to verify client's certificate: "
ERR_NO_SPIFFE = "auth: no spiffe identity in certificate"
ERR_MANY_SPIFFE = "auth: more than one service identity specified in certificate"
ERR_SPIFFE_PREFIX = "auth: service identity was not a valid SPIFFE ID (bad prefix)"
ERR_SPIFFE_FORMAT = "auth: service identity was not a valid SPIFFE ID (bad format)"
ERR_UNKNOWN_USER = "auth: unknown user token"

DEFAULT_CACHE_SIZE = 4096
# More than any real client sends; bounds the parsing work one request can cause.
MAX_CHAIN_LENGTH = 8

_SPIFFE_SCHEME = "spiffe://"


@dataclass(frozen=True, slots=True)
class AuthResult:
    """Who a request is. ``auth_type`` is Knox's principal type string: ``user``, ``machine``,
    ``service`` or e.g. ``mux[mtls=>machine,spiffe-fallback=>service]``."""

    principal: PrincipalMux
    auth_type: str


@dataclass(frozen=True, slots=True)
class _VerifiedLeaf:
    """What the providers need from a leaf whose chain verified, and how long that holds."""

    dns_names: tuple[str, ...]
    ip_addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    uris: tuple[str, ...]
    valid_from: float
    valid_until: float


class _AuthFailure(Exception):
    """One provider's refusal; the message is Knox's."""


# A provider takes the header's payload and the peer chain; raises _AuthFailure.
_Provider = Callable[[str, Sequence[str]], Principal]


def verify_hostname(
    host: str,
    dns_names: Sequence[str],
    ip_addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
) -> bool:
    """Go's ``x509.Certificate.VerifyHostname``: True if ``host`` matches one of the SANs.

    An IP address (optionally in brackets) matches only IP SANs. A name is compared
    ASCII-case-insensitively; when both the name and the SAN are valid hostnames, a trailing dot on
    the name is ignored and a SAN whose first label is ``*`` matches exactly one label there. The
    Common Name is never consulted.
    """
    ip = _parse_ip(host)
    if ip is not None:
        return ip in ip_addresses
    name = _ascii_lower(host)
    name_is_valid = _VALID_NAME.fullmatch(name.removesuffix(".")) is not None
    for san in dns_names:
        if name_is_valid and _VALID_PATTERN.fullmatch(san) and san != "*":
            if _match_pattern(_ascii_lower(san), name.removesuffix(".")):
                return True
        elif name not in ("", ".") and san not in ("", ".") and _ascii_lower(san) == name:
            return True
    return False


# '_' is not valid in hostnames but common outside the web PKI; Go accepts it too.
_LABEL = r"[A-Za-z0-9_][A-Za-z0-9_-]*"
_VALID_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_VALID_PATTERN = re.compile(rf"(?:\*|{_LABEL})(?:\.{_LABEL})*")
# Go's ParseIP reads dotted-decimal IPv4 and colon-separated IPv6 only; anything else is a name.
_MAYBE_IP = re.compile(r"[0-9.]+|.*:.*")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if len(host) >= 3 and host[0] == "[" and host[-1] == "]":
        host = host[1:-1]
    if _MAYBE_IP.fullmatch(host) is None:
        return None  # skip ip_address's exception, costly on this per-request path
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _ascii_lower(s: str) -> str:
    # Only A-Z fold, as in Go: Unicode case folding has no place in DNS names.
    return s.translate(_ASCII_LOWER) if not s.islower() else s


def _match_pattern(pattern: str, host: str) -> bool:
    """Both arguments lowercase valid names; a leading ``*`` label in ``pattern`` matches one."""
    pattern_labels = pattern.split(".")
    host_labels = host.split(".")
    if len(pattern_labels) != len(host_labels):
        return False
    return (pattern_labels[0] == "*" or pattern_labels[0] == host_labels[0]) and (
        pattern_labels[1:] == host_labels[1:]
    )


def _spiffe_service(uris: Sequence[str]) -> Service:
    """Knox's ``spiffeToPrincipal``, requiring a non-empty trust domain and path."""
    if not uris:
        raise _AuthFailure(ERR_NO_SPIFFE)
    if len(uris) > 1:
        raise _AuthFailure(ERR_MANY_SPIFFE)
    uri = uris[0]
    if not uri.startswith(_SPIFFE_SCHEME):
        raise _AuthFailure(ERR_SPIFFE_PREFIX)
    domain, slash, path = uri[len(_SPIFFE_SCHEME) :].partition("/")
    if not (domain and slash and path):
        raise _AuthFailure(ERR_SPIFFE_FORMAT)
    return Service(uri)


def _go_time(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


class Authenticator:
    """Turns a request's ``Authorization`` header and peer certificate chain into principals.

    ``ca_pem`` holds one or more PEM CA certificates that client chains must lead to. Without
    ``tokens`` no ``0u`` provider exists. ``clock`` gives the current time (seconds since the
    epoch) for certificate validity. ``cache_size`` bounds the verified-chain cache (LRU).

    Not thread-safe: call it from one thread (the event loop); it never blocks beyond the
    occasional certificate verification (a few hundred microseconds).
    """

    def __init__(
        self,
        ca_pem: bytes,
        tokens: TokenDB | None,
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        """Raises :class:`ValueError` if ``ca_pem`` holds no parsable certificate."""
        try:
            roots = x509.load_pem_x509_certificates(ca_pem)
        except ValueError:
            raise ValueError("no valid PEM CA certificate in the CA bundle") from None
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._store = Store(roots)
        self._tokens = tokens
        self._clock = clock
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, ...], _VerifiedLeaf] = OrderedDict()
        # Knox's x509.Verify accepts a leaf without any SAN; the SAN checks come after.
        self._ee_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
            x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
        )
        self._ca_policy = ExtensionPolicy.webpki_defaults_ca()
        # Knox's order: MTLS before its SPIFFE fallback, so the machine is the default principal.
        providers: list[tuple[str, str, _Provider]] = [
            ("0t", "mtls", self._machine),
            ("0t", "spiffe-fallback", self._service),
            ("0s", "spiffe", self._service),
        ]
        if tokens is not None:
            providers.append(("0u", "token", self._user))
        self._providers = tuple(providers)

    def authenticate(self, header: str | None, client_cert_chain: Sequence[str]) -> AuthResult:
        """Authenticate one request.

        ``client_cert_chain`` is the ASGI ``tls`` extension's list of PEM certificates, leaf
        first (empty when the client sent none). Raises :class:`UnauthenticatedError` (code 5).
        """
        if not header:
            raise UnauthenticatedError(ERR_NO_HEADER)
        if len(header) <= 2:
            raise UnauthenticatedError(ERR_NO_PROVIDER)
        prefix, payload = header[:2], header[2:]
        found: list[tuple[str, Principal]] = []
        error = ERR_NO_PROVIDER
        for provider_prefix, name, provider in self._providers:
            if provider_prefix != prefix:
                continue
            try:
                found.append((name, provider(payload, client_cert_chain)))
            except _AuthFailure as exc:
                error = str(exc)
        if not found:
            raise UnauthenticatedError(error)
        mux = PrincipalMux(tuple(found))
        return AuthResult(principal=mux, auth_type=mux.kind)

    def _machine(self, claimed: str, chain: Sequence[str]) -> Machine:
        leaf = self._verified(chain)
        if not verify_hostname(claimed, leaf.dns_names, leaf.ip_addresses):
            # Go's HostnameError text. The SPIFFE fallback runs after this provider, so as in Knox
            # a 401 reports the fallback's error, not this one.
            names = ", ".join([*leaf.dns_names, *map(str, leaf.ip_addresses)]) or "no names"
            raise _AuthFailure(f"x509: certificate is valid for {names}, not {claimed}")
        return Machine(claimed)

    def _service(self, payload: str, chain: Sequence[str]) -> Service:
        return _spiffe_service(self._verified(chain).uris)

    def _user(self, token: str, chain: Sequence[str]) -> Principal:
        assert self._tokens is not None
        user = self._tokens.lookup(token)
        if user is None:
            raise _AuthFailure(ERR_UNKNOWN_USER)
        return user

    def _verified(self, chain: Sequence[str]) -> _VerifiedLeaf:
        """The verified leaf of ``chain``, from the cache when still valid. Raises _AuthFailure."""
        if not chain:
            raise _AuthFailure(ERR_NO_PEER_CERTS)
        key = tuple(chain)
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None:
            if hit.valid_from <= now <= hit.valid_until:
                self._cache.move_to_end(key)
                return hit
            del self._cache[key]
        leaf = self._verify(key, now)
        self._cache[key] = leaf
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return leaf

    def _verify(self, chain: tuple[str, ...], now: float) -> _VerifiedLeaf:
        if len(chain) > MAX_CHAIN_LENGTH:
            raise _AuthFailure(
                f"{ERR_VERIFY_PREFIX}more than {MAX_CHAIN_LENGTH} certificates in the chain"
            )
        try:
            certs = [x509.load_pem_x509_certificate(pem.encode("ascii")) for pem in chain]
        except (ValueError, UnicodeEncodeError):
            raise _AuthFailure(f"{ERR_VERIFY_PREFIX}malformed certificate") from None
        leaf, intermediates = certs[0], certs[1:]
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        # Checked here only for Go's clearer message; the verifier checks every certificate.
        if when > leaf.not_valid_after_utc:
            raise _AuthFailure(
                f"{ERR_VERIFY_PREFIX}x509: certificate has expired or is not yet valid: current"
                f" time {_go_time(when)} is after {_go_time(leaf.not_valid_after_utc)}"
            )
        if when < leaf.not_valid_before_utc:
            raise _AuthFailure(
                f"{ERR_VERIFY_PREFIX}x509: certificate has expired or is not yet valid: current"
                f" time {_go_time(when)} is before {_go_time(leaf.not_valid_before_utc)}"
            )
        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(when)
            .extension_policies(ca_policy=self._ca_policy, ee_policy=self._ee_policy)
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(leaf, intermediates)
        except VerificationError as exc:
            raise _AuthFailure(f"{ERR_VERIFY_PREFIX}{_verification_reason(exc)}") from None
        try:
            sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            dns: list[str] = []
            ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
            uris: list[str] = []
        else:
            dns = sans.get_values_for_type(x509.DNSName)
            ips = [
                ip
                for ip in sans.get_values_for_type(x509.IPAddress)
                if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
            ]
            uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        return _VerifiedLeaf(
            dns_names=tuple(dns),
            ip_addresses=tuple(ips),
            uris=tuple(uris),
            valid_from=max(c.not_valid_before_utc for c in verified.chain).timestamp(),
            valid_until=min(c.not_valid_after_utc for c in verified.chain).timestamp(),
        )


def _verification_reason(exc: VerificationError) -> str:
    """Go's texts for the failures Go names; cryptography's own text otherwise."""
    text = str(exc)
    if "required EKU not found" in text:
        return "x509: certificate specifies an incompatible key usage"
    if "not valid at validation time" in text:
        return "x509: certificate has expired or is not yet valid"
    if "candidates exhausted" in text:
        return "x509: certificate signed by unknown authority"
    return text.removeprefix("validation failed: ")
