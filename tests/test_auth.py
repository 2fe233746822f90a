"""Request authentication: Knox's providers, messages and multi-principal rules, and the cache."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from knox.errors import Code, UnauthenticatedError
from knox.model import Machine, Service, User
from knox_server.auth import (
    ERR_NO_HEADER,
    ERR_NO_PROVIDER,
    ERR_NO_SPIFFE,
    ERR_UNKNOWN_USER,
    Authenticator,
    AuthResult,
    verify_hostname,
)
from knox_server.tokens import TokenDB, hash_token, new_token
from tests.pki import CA, CertPair

HOST = "h1.example.com"
SPIFFE_ID = "spiffe://example.org/ns/prod/sa/web"


class Clock:
    """A settable clock for the authenticator (seconds since the epoch)."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC).timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA.create()


@pytest.fixture(scope="module")
def user_token() -> str:
    return new_token()


@pytest.fixture(scope="module")
def tokens(user_token: str) -> TokenDB:
    return TokenDB([("alice", ["security-team"], hash_token(user_token))])


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def auth(ca: CA, tokens: TokenDB, clock: Clock) -> Authenticator:
    return Authenticator(ca.cert_pem, tokens, clock=clock)


def chain(*pairs: CertPair | CA) -> list[str]:
    return [p.cert_pem.decode() for p in pairs]


def refused(auth: Authenticator, header: str | None, certs: list[str]) -> str:
    """The 401 message for a request that must not authenticate."""
    with pytest.raises(UnauthenticatedError) as info:
        auth.authenticate(header, certs)
    assert info.value.code is Code.UNAUTHENTICATED
    assert info.value.http_status == 401
    return info.value.message


def providers(result: AuthResult) -> list[tuple[str, object]]:
    return list(result.principal.principals)


# --- machine (0t) ------------------------------------------------------------------------------


def test_machine_cert_with_claimed_hostname_is_a_machine(ca: CA, auth: Authenticator) -> None:
    result = auth.authenticate("0t" + HOST, chain(ca.machine_cert(HOST)))
    assert providers(result) == [("mtls", Machine(HOST))]
    assert result.auth_type == "machine"
    assert result.principal.id == HOST


def test_any_dns_san_may_be_claimed(ca: CA, auth: Authenticator) -> None:
    certs = chain(ca.machine_cert(HOST, extra_dns=["alias.example.com"]))
    assert auth.authenticate("0talias.example.com", certs).principal.id == "alias.example.com"


def test_wrong_claimed_hostname_reports_the_spiffe_fallback_error(
    ca: CA, auth: Authenticator
) -> None:
    # Knox answers with the *last* provider's error (reference §11.9).
    assert refused(auth, "0tother.example.com", chain(ca.machine_cert(HOST))) == ERR_NO_SPIFFE


def test_machine_cert_with_spiffe_uri_is_both_with_the_machine_first(
    ca: CA, auth: Authenticator
) -> None:
    both = ca.leaf(common_name=HOST, dns=[HOST], uris=[SPIFFE_ID])
    result = auth.authenticate("0t" + HOST, chain(both))
    assert providers(result) == [("mtls", Machine(HOST)), ("spiffe-fallback", Service(SPIFFE_ID))]
    assert result.auth_type == "mux[mtls=>machine,spiffe-fallback=>service]"
    assert result.principal.id == HOST
    # With a hostname the cert does not hold, only the SPIFFE identity remains.
    only_service = auth.authenticate("0tother.example.com", chain(both))
    assert providers(only_service) == [("spiffe-fallback", Service(SPIFFE_ID))]
    assert only_service.auth_type == "service"


def test_spiffe_cert_on_machine_auth_is_a_service(ca: CA, auth: Authenticator) -> None:
    result = auth.authenticate("0tanything", chain(ca.spiffe_cert(SPIFFE_ID)))
    assert providers(result) == [("spiffe-fallback", Service(SPIFFE_ID))]


@pytest.mark.parametrize(
    ("san", "claim", "ok"),
    [
        ("*.web.example.com", "host1.web.example.com", True),
        ("*.web.example.com", "HOST1.Web.Example.COM", True),
        ("*.web.example.com", "a.b.web.example.com", False),
        ("*.web.example.com", "web.example.com", False),
        ("H1.Example.com", "h1.example.com", True),
        ("h1.example.com", "h1.example.com.", True),
        ("h1.example.com", "h1.example.co", False),
        ("h_1.example.com", "H_1.example.com", True),
        ("*", "localhost", False),
        ("ab*.example.com", "abc.example.com", False),
        # Not valid hostnames: only an exact (case-insensitive) match counts, wildcards do not.
        ("weird name!", "WEIRD name!", True),
        ("*.example.com", "bad name!.example.com", False),
    ],
)
def test_hostname_matching_follows_go(
    ca: CA, auth: Authenticator, san: str, claim: str, ok: bool
) -> None:
    certs = chain(ca.leaf(common_name="c", dns=[san]))
    if ok:
        assert auth.authenticate("0t" + claim, certs).principal.id == claim
    else:
        assert refused(auth, "0t" + claim, certs) == ERR_NO_SPIFFE


def test_ip_claims_match_only_ip_sans() -> None:
    ips = [ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("2001:db8::1")]
    assert verify_hostname("10.0.0.7", [], ips)
    assert verify_hostname("[2001:db8::1]", [], ips)
    assert verify_hostname("2001:DB8:0::1", [], ips)
    assert not verify_hostname("10.0.0.8", ["10.0.0.8"], ips)
    assert not verify_hostname("10.0.0.7", ["10.0.0.7"])
    assert not verify_hostname("", [""])


def test_ip_san_machine_auth(ca: CA, auth: Authenticator) -> None:
    certs = chain(ca.leaf(common_name="10.1.2.3", ips=["10.1.2.3"]))
    assert auth.authenticate("0t10.1.2.3", certs).principal.id == "10.1.2.3"


# --- SPIFFE (0s) -------------------------------------------------------------------------------


def test_spiffe_cert_is_a_service(ca: CA, auth: Authenticator) -> None:
    result = auth.authenticate("0sx", chain(ca.spiffe_cert(SPIFFE_ID)))
    assert providers(result) == [("spiffe", Service(SPIFFE_ID))]
    assert result.auth_type == "service"
    assert result.principal.id == SPIFFE_ID


def test_two_uri_sans_are_refused(ca: CA, auth: Authenticator) -> None:
    certs = chain(ca.two_uri_cert(SPIFFE_ID, "spiffe://example.org/other"))
    message = "auth: more than one service identity specified in certificate"
    assert refused(auth, "0sx", certs) == message
    assert refused(auth, "0t" + HOST, certs) == message


def test_no_san_is_refused(ca: CA, auth: Authenticator) -> None:
    certs = chain(ca.no_san_cert(common_name=HOST))
    assert refused(auth, "0sx", certs) == ERR_NO_SPIFFE
    # The Common Name is never a hostname (Go >= 1.15).
    assert refused(auth, "0t" + HOST, certs) == ERR_NO_SPIFFE


def test_machine_cert_is_not_a_service(ca: CA, auth: Authenticator) -> None:
    assert refused(auth, "0sx", chain(ca.machine_cert(HOST))) == ERR_NO_SPIFFE


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("https://example.org/web", "bad prefix"),
        ("spiffe://example.org", "bad format"),
        ("spiffe://example.org/", "bad format"),
        ("spiffe:///web", "bad format"),
    ],
)
def test_malformed_spiffe_ids_are_refused(
    ca: CA, auth: Authenticator, uri: str, reason: str
) -> None:
    message = refused(auth, "0sx", chain(ca.spiffe_cert(uri)))
    assert message == f"auth: service identity was not a valid SPIFFE ID ({reason})"


# --- certificate verification ------------------------------------------------------------------


@pytest.mark.parametrize("header", ["0t" + HOST, "0sx"])
def test_cert_from_another_ca_is_refused(auth: Authenticator, header: str) -> None:
    other = CA.create()
    message = refused(
        auth, header, chain(other.leaf(common_name=HOST, dns=[HOST], uris=[SPIFFE_ID]))
    )
    assert message == (
        "auth: failed to verify client's certificate: x509: certificate signed by unknown authority"
    )


@pytest.mark.parametrize("header", ["0t" + HOST, "0sx"])
def test_expired_cert_is_refused(ca: CA, auth: Authenticator, header: str) -> None:
    message = refused(auth, header, chain(ca.expired_machine_cert(HOST)))
    assert message.startswith(
        "auth: failed to verify client's certificate: x509: certificate has expired or is not yet"
        " valid: current time "
    )
    assert " is after " in message


def test_server_auth_only_cert_is_refused_for_client_auth(ca: CA, auth: Authenticator) -> None:
    message = refused(auth, "0tlocalhost", chain(ca.server_cert(["localhost"])))
    assert message == (
        "auth: failed to verify client's certificate: x509: certificate specifies an incompatible"
        " key usage"
    )


def test_no_peer_certificate(auth: Authenticator) -> None:
    assert refused(auth, "0t" + HOST, []) == "auth: No peer certs configured"
    assert refused(auth, "0sx", []) == "auth: No peer certs configured"


def test_garbage_and_overlong_chains_are_refused(ca: CA, auth: Authenticator) -> None:
    prefix = "auth: failed to verify client's certificate: "
    assert refused(auth, "0sx", ["not a certificate"]) == prefix + "malformed certificate"
    assert refused(auth, "0sx", ["\u00e9"]) == prefix + "malformed certificate"
    leaf = chain(ca.spiffe_cert(SPIFFE_ID))
    assert refused(auth, "0sx", leaf * 9) == prefix + "more than 8 certificates in the chain"


def _intermediate(root: CA) -> CA:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "knox intermediate")]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
            critical=False,
        )
        .sign(root.key, hashes.SHA256())
    )
    return CA(cert=cert, key=key, cert_pem=cert.public_bytes(serialization.Encoding.PEM))


def test_later_chain_certs_are_intermediates(ca: CA, auth: Authenticator) -> None:
    intermediate = _intermediate(ca)
    leaf = intermediate.machine_cert(HOST)
    assert auth.authenticate("0t" + HOST, chain(leaf, intermediate)).principal.id == HOST
    assert refused(auth, "0t" + HOST, chain(leaf)).endswith("signed by unknown authority")


def test_ca_bundle_may_hold_several_cas(ca: CA, tokens: TokenDB) -> None:
    other = CA.create()
    auth = Authenticator(ca.cert_pem + other.cert_pem, tokens)
    assert auth.authenticate("0t" + HOST, chain(other.machine_cert(HOST))).principal.id == HOST


@pytest.mark.parametrize("ca_pem", [b"", b"not a pem", b"-----BEGIN CERTIFICATE-----\nAA\n"])
def test_unusable_ca_bundle_is_refused(ca_pem: bytes) -> None:
    with pytest.raises(ValueError, match="no valid PEM CA certificate"):
        Authenticator(ca_pem, None)


# --- users (0u) --------------------------------------------------------------------------------


def test_user_token_is_a_user_with_groups(auth: Authenticator, user_token: str) -> None:
    result = auth.authenticate("0u" + user_token, [])
    assert providers(result) == [("token", User("alice", frozenset({"security-team"})))]
    assert result.auth_type == "user"
    assert result.principal.is_user()


def test_user_token_ignores_any_client_cert(ca: CA, auth: Authenticator, user_token: str) -> None:
    result = auth.authenticate("0u" + user_token, chain(ca.machine_cert(HOST)))
    assert result.principal.id == "alice"


def test_unknown_token_is_refused(auth: Authenticator) -> None:
    assert refused(auth, "0u" + new_token(), []) == ERR_UNKNOWN_USER


def test_without_a_token_db_user_auth_does_not_match(ca: CA, user_token: str) -> None:
    auth = Authenticator(ca.cert_pem, None)
    assert refused(auth, "0u" + user_token, []) == ERR_NO_PROVIDER


def test_token_never_appears_in_errors_or_reprs(auth: Authenticator, user_token: str) -> None:
    stranger = new_token()
    with pytest.raises(UnauthenticatedError) as info:
        auth.authenticate("0u" + stranger, [])
    assert stranger not in str(info.value)
    assert stranger not in repr(info.value)
    assert stranger not in repr(info.value.args)
    result = auth.authenticate("0u" + user_token, [])
    assert user_token not in repr(result)
    assert user_token not in repr(auth)


# --- header matching ---------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["0", "0t", "0s", "0u", "1t" + HOST, "0x" + HOST, "t0" + HOST])
def test_headers_no_provider_matches(ca: CA, auth: Authenticator, header: str) -> None:
    both = chain(ca.leaf(common_name=HOST, dns=[HOST], uris=[SPIFFE_ID]))
    assert refused(auth, header, both) == ERR_NO_PROVIDER


@pytest.mark.parametrize("header", [None, ""])
def test_missing_header(ca: CA, auth: Authenticator, header: str | None) -> None:
    assert refused(auth, header, chain(ca.machine_cert(HOST))) == ERR_NO_HEADER


# --- the verification cache --------------------------------------------------------------------


def test_cached_chain_answers_the_same_until_it_expires(
    ca: CA, auth: Authenticator, clock: Clock
) -> None:
    not_after = dt.datetime.fromtimestamp(clock.now, dt.UTC) + dt.timedelta(hours=1)
    certs = chain(ca.machine_cert(HOST, not_after=not_after))
    first = auth.authenticate("0t" + HOST, certs)
    assert auth.authenticate("0t" + HOST, list(certs)) == first
    clock.now = not_after.timestamp() - 1
    assert auth.authenticate("0t" + HOST, certs) == first
    clock.now = not_after.timestamp() + 1
    assert " is after " in refused(auth, "0t" + HOST, certs)


def test_cached_chain_stops_when_the_ca_expires(ca: CA, auth: Authenticator, clock: Clock) -> None:
    # The leaf outlives its CA (valid for a week): the chain is only good while both are.
    start = dt.datetime.fromtimestamp(clock.now, dt.UTC)
    certs = chain(ca.machine_cert(HOST, not_after=start + dt.timedelta(days=30)))
    assert auth.authenticate("0t" + HOST, certs).principal.id == HOST
    clock.now = ca.cert.not_valid_after_utc.timestamp() + 1
    assert refused(auth, "0t" + HOST, certs) == (
        "auth: failed to verify client's certificate: x509: certificate has expired or is not yet"
        " valid"
    )


def test_cached_chain_is_refused_when_the_clock_goes_before_it(
    ca: CA, auth: Authenticator, clock: Clock
) -> None:
    certs = chain(ca.machine_cert(HOST))
    assert auth.authenticate("0t" + HOST, certs).principal.id == HOST
    clock.now -= 7 * 24 * 3600
    assert " is before " in refused(auth, "0t" + HOST, certs)


def test_failures_are_not_cached(ca: CA, auth: Authenticator, clock: Clock) -> None:
    start = dt.datetime.fromtimestamp(clock.now, dt.UTC)
    certs = chain(ca.machine_cert(HOST, not_before=start + dt.timedelta(minutes=10)))
    assert " is before " in refused(auth, "0t" + HOST, certs)
    clock.now += 11 * 60
    assert auth.authenticate("0t" + HOST, certs).principal.id == HOST


def test_a_full_cache_evicts_and_still_answers(ca: CA, tokens: TokenDB) -> None:
    auth = Authenticator(ca.cert_pem, tokens, cache_size=2)
    hosts = [f"h{i}.example.com" for i in range(4)]
    certs = {h: chain(ca.machine_cert(h)) for h in hosts}
    for _ in range(2):
        for h in hosts:
            assert auth.authenticate("0t" + h, certs[h]).principal.id == h


def test_cache_size_must_be_positive(ca: CA) -> None:
    with pytest.raises(ValueError, match="cache_size"):
        Authenticator(ca.cert_pem, None, cache_size=0)
