"""knoxd.toml parsing (knoxd.config) and identity file checks (knoxd.upstream.identity_files)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from knoxd.config import (
    DEFAULT_STATE_DIR,
    ConfigError,
    IdentityConfig,
    IdentityKind,
    PeerSelectors,
    load_config,
    parse_config,
)
from knoxd.upstream.identity_files import (
    IdentityFileError,
    check_identity_files,
    identity_facts,
)
from tests.pki import CA, SERVER_AUTH, CertPair

# The example from knoxd-config.md, verbatim.
EXAMPLE = """\
[daemon]
state_dir = "/var/lib/knoxd"                  # cache database, cache key file (if no systemd credential)
workload_socket = "/run/knoxd/knoxd.sock"     # ignored when systemd passes a socket named "workload"
admin_socket = "/run/knoxd-admin/admin.sock"  # ignored when systemd passes a socket named "admin"
admin_group = "knox-admin"                    # root and this group may use admin ops; optional
refresh_seconds = 60                          # change check per identity (a long-poll window when the server supports it)
revalidate_seconds = 600                      # full re-GET of every key
max_stale_seconds = 0                         # 0 = serve stale values forever (marked stale); >0 = answer `stale` after that
idle_timeout_seconds = 300
max_connections = 4096
max_connections_per_uid = 256

[upstream]
urls = ["https://knox.example.com:9000"]      # tried in order; failover on connection errors
ca = "/etc/knoxd/ca.pem"                      # CA bundle for the server certificate
timeout_seconds = 10

[[identity]]
name = "host"                                 # local name, shown in status and hello
kind = "machine"                              # "machine": sends 0t<hostname>; "spiffe": sends 0s…
cert = "/etc/knoxd/host.pem"
key = "/etc/knoxd/host.key"
hostname = "web-042.example.com"              # machine only; default: the first DNS SAN of the cert
keys = ["web:tls_session_ticket_key"]         # registered at start
[identity.peers]                              # who on this host acts as this identity (any selector matches)
uid = [0]
gid = []
group = []                                    # by name, matched against the peer's supplementary groups too
unit = []                                     # systemd units, only where the kernel gives a pidfd

[[identity]]
name = "web"
kind = "spiffe"                               # SPIFFE ID is read from the cert's single URI SAN
cert = "/run/spire/svids/web.pem"
key = "/run/spire/svids/web.key"
keys = ["web:db_password"]
[identity.peers]
uid = [1001]
unit = ["web.service"]
"""  # noqa: E501

MINIMAL = """\
[upstream]
urls = ["https://knox.example.com"]

[[identity]]
name = "host"
kind = "machine"
cert = "/etc/knoxd/host.pem"
key = "/etc/knoxd/host.key"
[identity.peers]
uid = [0]
"""


def line_of(text: str, fragment: str, occurrence: int = 1) -> int:
    """1-based line number of the ``occurrence``-th line containing ``fragment``."""
    hits = [i for i, line in enumerate(text.splitlines(), start=1) if fragment in line]
    return hits[occurrence - 1]


def expect_error(text: str, key: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.key == key
    assert f" {key}: " in str(info.value)
    return info.value


# --- parsing ---------------------------------------------------------------------------------


def test_example_parses_to_the_documented_values() -> None:
    cfg = parse_config(EXAMPLE)
    d = cfg.daemon
    assert d.state_dir == Path("/var/lib/knoxd")
    assert d.workload_socket == Path("/run/knoxd/knoxd.sock")
    assert d.admin_socket == Path("/run/knoxd-admin/admin.sock")
    assert d.admin_group == "knox-admin"
    assert (d.refresh_seconds, d.revalidate_seconds, d.max_stale_seconds) == (60, 600, 0)
    assert (d.idle_timeout_seconds, d.max_connections, d.max_connections_per_uid) == (
        300,
        4096,
        256,
    )
    assert cfg.upstream.urls == ("https://knox.example.com:9000",)
    assert cfg.upstream.ca == Path("/etc/knoxd/ca.pem")
    assert cfg.upstream.timeout_seconds == 10
    host, web = cfg.identities
    assert host == IdentityConfig(
        name="host",
        kind=IdentityKind.MACHINE,
        cert=Path("/etc/knoxd/host.pem"),
        key=Path("/etc/knoxd/host.key"),
        hostname="web-042.example.com",
        keys=("web:tls_session_ticket_key",),
        peers=PeerSelectors(uid=(0,)),
    )
    assert web.kind is IdentityKind.SPIFFE
    assert web.hostname is None
    assert web.keys == ("web:db_password",)
    assert web.peers == PeerSelectors(uid=(1001,), unit=("web.service",))
    assert cfg.identity("web") is web
    assert cfg.identity("nope") is None


def test_defaults() -> None:
    cfg = parse_config(MINIMAL)
    d = cfg.daemon
    assert d.state_dir == DEFAULT_STATE_DIR
    assert d.admin_group is None
    assert (d.refresh_seconds, d.revalidate_seconds, d.max_stale_seconds) == (60, 600, 0)
    assert (d.idle_timeout_seconds, d.max_connections, d.max_connections_per_uid) == (
        300,
        4096,
        256,
    )
    assert d.jitter == 0.1
    assert d.backoff_min_seconds <= d.backoff_max_seconds
    assert cfg.upstream.ca is None
    assert cfg.upstream.timeout_seconds == 10
    (ident,) = cfg.identities
    assert ident.hostname is None
    assert ident.keys == ()


def test_extra_daemon_keys_and_float_durations() -> None:
    text = MINIMAL.replace(
        "[upstream]",
        "[daemon]\njitter = 0.25\nbackoff_min_seconds = 0.5\nbackoff_max_seconds = 30\n"
        "refresh_seconds = 2.5\n\n[upstream]",
    )
    d = parse_config(text).daemon
    assert (d.jitter, d.backoff_min_seconds, d.backoff_max_seconds) == (0.25, 0.5, 30)
    assert d.refresh_seconds == 2.5


def test_duplicate_peer_selectors_and_keys_are_collapsed() -> None:
    text = MINIMAL.replace(
        'key = "/etc/knoxd/host.key"', 'key = "/etc/knoxd/host.key"\nkeys = ["a", "b", "a"]'
    ).replace("uid = [0]", "uid = [0, 5, 0]\ngroup = ['ops', 'ops']")
    (ident,) = parse_config(text).identities
    assert ident.keys == ("a", "b")
    assert ident.peers.uid == (0, 5)
    assert ident.peers.group == ("ops",)


def test_trailing_slash_of_url_is_dropped() -> None:
    text = MINIMAL.replace('"https://knox.example.com"', '"https://a.example/", "https://b:9000"')
    assert parse_config(text).upstream.urls == ("https://a.example", "https://b:9000")


# --- unknown keys: named, with their line ----------------------------------------------------


@pytest.mark.parametrize(
    ("after", "added", "key"),
    [
        ("max_connections = 4096", "refresh_secs = 5", "daemon.refresh_secs"),
        ("timeout_seconds = 10", "url = 'https://x'", "upstream.url"),
        ('name = "web"', "hostnme = 'a.example'", "identity[web].hostnme"),
        ("uid = [1001]", "pid = [3]", "identity[web].peers.pid"),
        ('kind = "machine"', "'quoted key' = 1", "identity[host].quoted key"),
    ],
)
def test_unknown_key_named_with_line(after: str, added: str, key: str) -> None:
    text = EXAMPLE.replace(after, f"{after}\n{added}", 1)
    err = expect_error(text, key)
    assert err.line == line_of(text, added)
    assert str(err).startswith(f"knoxd.toml:{err.line}: ")
    assert "unknown key" in str(err)


def test_unknown_key_in_second_identity_is_found_in_its_own_table() -> None:
    # The same unknown key in both identities' peers: the first identity's is reported.
    text = EXAMPLE.replace("uid = [0]", "uid = [0]\nextra = 1").replace(
        "uid = [1001]", "uid = [1001]\nextra = 2"
    )
    err = expect_error(text, "identity[host].peers.extra")
    assert err.line == line_of(text, "extra = 1")
    only_second = EXAMPLE.replace("uid = [1001]", "uid = [1001]\nextra = 2")
    err = expect_error(only_second, "identity[web].peers.extra")
    assert err.line == line_of(only_second, "extra = 2")


def test_unknown_table_and_top_level_key() -> None:
    text = EXAMPLE + "\n[metrics]\nport = 9100\n"
    err = expect_error(text, "metrics")
    assert err.line == line_of(text, "[metrics]")
    text = "log_level = 'debug'\n" + EXAMPLE
    assert expect_error(text, "log_level").line == 1


def test_unknown_key_line_skips_look_alikes_in_strings_arrays_and_comments() -> None:
    # The decoys "bogus = ..." inside a multi-line string (an odd but valid cert path), a comment
    # and a multi-line array must not be taken for the key itself.
    text = EXAMPLE.replace(
        'cert = "/run/spire/svids/web.pem"',
        'cert = """\n/run/web.pem\nbogus = 1\n"""\n# bogus = 2',
    ).replace(
        'keys = ["web:db_password"]',
        'keys = [\n  "web:db_password", # bogus = 3\n  "web:x",\n]\nbogus = 4',
    )
    err = expect_error(text, "identity[web].bogus")
    assert err.line == line_of(text, "bogus = 4")


# --- wrong values: named, with the line of the key -------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("refresh_seconds = 60", "refresh_seconds = -1", "daemon.refresh_seconds"),
        ("refresh_seconds = 60", "refresh_seconds = 0", "daemon.refresh_seconds"),
        ("refresh_seconds = 60", 'refresh_seconds = "60"', "daemon.refresh_seconds"),
        ("refresh_seconds = 60", "refresh_seconds = true", "daemon.refresh_seconds"),
        ("refresh_seconds = 60", "refresh_seconds = inf", "daemon.refresh_seconds"),
        ("refresh_seconds = 60", "refresh_seconds = 1e12", "daemon.refresh_seconds"),
        ("revalidate_seconds = 600", "revalidate_seconds = -0.5", "daemon.revalidate_seconds"),
        ("max_stale_seconds = 0", "max_stale_seconds = -1", "daemon.max_stale_seconds"),
        ("idle_timeout_seconds = 300", "idle_timeout_seconds = -3", "daemon.idle_timeout_seconds"),
        ("max_connections = 4096", "max_connections = 0", "daemon.max_connections"),
        ("max_connections = 4096", "max_connections = 1.5", "daemon.max_connections"),
        ("max_connections_per_uid = 256", "jitter = 1.0", "daemon.jitter"),
        (
            "max_connections_per_uid = 256",
            "backoff_min_seconds = 10\nbackoff_max_seconds = 5",
            "daemon.backoff_min_seconds",
        ),
        ('state_dir = "/var/lib/knoxd"', 'state_dir = "var/lib"', "daemon.state_dir"),
        ('state_dir = "/var/lib/knoxd"', "state_dir = 7", "daemon.state_dir"),
        (
            'workload_socket = "/run/knoxd/knoxd.sock"',
            f'workload_socket = "/run/{"x" * 120}"',
            "daemon.workload_socket",
        ),
        (
            'admin_socket = "/run/knoxd-admin/admin.sock"',
            'admin_socket = "/run/knoxd/knoxd.sock"',
            "daemon.admin_socket",
        ),
        ('admin_group = "knox-admin"', 'admin_group = "bad group"', "daemon.admin_group"),
        ('urls = ["https://knox.example.com:9000"]', "urls = []", "upstream.urls"),
        ('urls = ["https://knox.example.com:9000"]', 'urls = "https://x"', "upstream.urls"),
        (
            'urls = ["https://knox.example.com:9000"]',
            'urls = ["http://knox.example.com"]',
            "upstream.urls[0]",
        ),
        (
            'urls = ["https://knox.example.com:9000"]',
            'urls = ["https://a.example", "https://u:p@b.example"]',
            "upstream.urls[1]",
        ),
        (
            'urls = ["https://knox.example.com:9000"]',
            'urls = ["https://a.example:99999"]',
            "upstream.urls[0]",
        ),
        (
            'urls = ["https://knox.example.com:9000"]',
            'urls = ["https://a.example", "https://a.example/"]',
            "upstream.urls",
        ),
        ("timeout_seconds = 10", "timeout_seconds = -10", "upstream.timeout_seconds"),
        ('ca = "/etc/knoxd/ca.pem"', 'ca = "ca.pem"', "upstream.ca"),
        ('kind = "spiffe"', 'kind = "x509"', "identity[web].kind"),
        ('kind = "spiffe"', "kind = 1", "identity[web].kind"),
        ('cert = "/run/spire/svids/web.pem"', "", "identity[web].cert"),
        ('key = "/run/spire/svids/web.key"', "", "identity[web].key"),
        ('key = "/run/spire/svids/web.key"', 'key = ""', "identity[web].key"),
        (
            'key = "/run/spire/svids/web.key"',
            'key = "/k"\nhostname = "web.example"',
            "identity[web].hostname",
        ),
        ('hostname = "web-042.example.com"', 'hostname = "not a host"', "identity[host].hostname"),
        ('keys = ["web:db_password"]', 'keys = ["web/db"]', "identity[web].keys[0]"),
        ('keys = ["web:db_password"]', "keys = [1]", "identity[web].keys[0]"),
        ("uid = [1001]", "uid = [-1]", "identity[web].peers.uid[0]"),
        ("uid = [1001]", 'uid = ["root"]', "identity[web].peers.uid[0]"),
        ('unit = ["web.service"]', 'unit = ["../web"]', "identity[web].peers.unit[0]"),
        ('name = "web"', 'name = "web server"', "identity[#2].name"),
        ('name = "web"', "", "identity[#2].name"),
    ],
)
def test_bad_value_names_the_key(old: str, new: str, key: str) -> None:
    assert old in EXAMPLE
    text = EXAMPLE.replace(old, new, 1)
    err = expect_error(text, key)
    assert err.line is not None


def test_duplicate_identity_name_names_the_identity() -> None:
    text = EXAMPLE.replace('name = "web"', 'name = "host"')
    err = expect_error(text, "identity[#2].name")
    assert "'host'" in str(err)
    assert err.line == line_of(text, 'name = "host"', occurrence=2)


@pytest.mark.parametrize(
    "peers",
    [
        "",  # no [identity.peers] table at all
        "[identity.peers]\n",
        "[identity.peers]\nuid = []\ngid = []\ngroup = []\nunit = []\n",
    ],
)
def test_identity_without_peers(peers: str) -> None:
    text = EXAMPLE.replace('[identity.peers]\nuid = [1001]\nunit = ["web.service"]\n', peers)
    err = expect_error(text, "identity[web].peers")
    assert "no peers" in str(err)
    # Points at the peers table if there is one, else at the identity's header.
    if peers:
        assert err.line == line_of(text, "[identity.peers]", occurrence=2)
    else:
        assert err.line == line_of(text, "[[identity]]", occurrence=2)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[daemon]\nstate_dir = "/x"\n', "upstream"),
        (MINIMAL.split("[[identity]]")[0], "identity"),
        ('identity = "host"\n' + MINIMAL.split("[[identity]]")[0], "identity"),
        ("daemon = 1\n" + MINIMAL, "daemon"),
    ],
)
def test_missing_or_misshapen_tables(text: str, key: str) -> None:
    expect_error(text, key)


def test_load_config_reads_files_and_reports_file_problems(tmp_path: Path) -> None:
    good = tmp_path / "knoxd.toml"
    good.write_text(EXAMPLE)
    assert load_config(good).identities[0].name == "host"

    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")

    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML: .*line 1"):
        load_config(bad)

    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"a = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)

    typo = tmp_path / "typo.toml"
    typo.write_text(EXAMPLE.replace("max_connections = 4096", "max_conections = 4096"))
    with pytest.raises(ConfigError, match=rf"^{typo}:10: daemon\.max_conections: unknown key$"):
        load_config(typo)


# --- identity files ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA.create()


def example_with_files(tmp_path: Path, ca: CA) -> str:
    host_cert, host_key = ca.machine_cert("web-042.example.com").write(tmp_path, "host")
    web_cert, web_key = ca.spiffe_cert("spiffe://example.org/ns/prod/sa/web").write(tmp_path, "web")
    ca_path = ca.write_cert(tmp_path / "ca.pem")
    return (
        EXAMPLE.replace("/etc/knoxd/host.pem", str(host_cert))
        .replace("/etc/knoxd/host.key", str(host_key))
        .replace("/run/spire/svids/web.pem", str(web_cert))
        .replace("/run/spire/svids/web.key", str(web_key))
        .replace("/etc/knoxd/ca.pem", str(ca_path))
    )


def test_example_identity_files_check_out(tmp_path: Path, ca: CA) -> None:
    path = tmp_path / "knoxd.toml"
    path.write_text(example_with_files(tmp_path, ca))
    host, web = load_config(path).identities
    host_facts = check_identity_files(host)
    assert host_facts.principal == "0tweb-042.example.com"
    assert host_facts.hostname == "web-042.example.com"
    assert host_facts.spiffe_id is None
    web_facts = check_identity_files(web)
    assert web_facts.principal == "0sspiffe://example.org/ns/prod/sa/web"
    assert web_facts.spiffe_id == "spiffe://example.org/ns/prod/sa/web"
    assert web_facts.hostname is None
    assert web_facts.not_before < web_facts.not_after


def machine(cert: Path, key: Path, hostname: str | None = None) -> IdentityConfig:
    return IdentityConfig(
        name="host",
        kind=IdentityKind.MACHINE,
        cert=cert,
        key=key,
        hostname=hostname,
        peers=PeerSelectors(uid=(0,)),
    )


def spiffe(cert: Path, key: Path) -> IdentityConfig:
    return IdentityConfig(
        name="web", kind=IdentityKind.SPIFFE, cert=cert, key=key, peers=PeerSelectors(uid=(0,))
    )


def test_machine_hostname_defaults_to_first_dns_san(tmp_path: Path, ca: CA) -> None:
    pair = ca.machine_cert("web-042.example.com", extra_dns=["alias.example.com"])
    cert, key = pair.write(tmp_path, "m")
    assert check_identity_files(machine(cert, key)).principal == "0tweb-042.example.com"
    facts = check_identity_files(machine(cert, key, "ALIAS.example.com"))
    assert facts.principal == "0tALIAS.example.com"
    assert facts.not_after == pair.cert.not_valid_after_utc
    with pytest.raises(IdentityFileError, match=r"^identity 'host': hostname 'other\.example'"):
        check_identity_files(machine(cert, key, "other.example"))


def test_wildcard_dns_san_covers_one_label(tmp_path: Path, ca: CA) -> None:
    cert, key = ca.leaf(common_name="w", dns=["*.example.com"]).write(tmp_path, "w")
    assert check_identity_files(machine(cert, key, "a.example.com")).hostname
    for host in ("example.com", "a.b.example.com"):
        with pytest.raises(IdentityFileError, match="not a DNS SAN"):
            check_identity_files(machine(cert, key, host))


def test_machine_cert_without_dns_san(tmp_path: Path, ca: CA) -> None:
    cert, key = ca.no_san_cert().write(tmp_path, "n")
    with pytest.raises(IdentityFileError, match=r"^identity 'host': .*no DNS SAN"):
        check_identity_files(machine(cert, key))


@pytest.mark.parametrize(
    "make",
    [
        lambda ca: ca.two_uri_cert("spiffe://example.org/a", "spiffe://example.org/b"),
        lambda ca: ca.no_san_cert(),
        lambda ca: ca.machine_cert("web.example.com"),
    ],
    ids=["two-uris", "no-san", "dns-only"],
)
def test_spiffe_cert_needs_exactly_one_uri(
    tmp_path: Path, ca: CA, make: Callable[[CA], CertPair]
) -> None:
    pair = make(ca)
    cert, key = pair.write(tmp_path, "s")
    with pytest.raises(IdentityFileError, match=r"^identity 'web': .*exactly one URI SAN"):
        check_identity_files(spiffe(cert, key))


@pytest.mark.parametrize("uri", ["https://example.org/web", "spiffe://example.org", "spiffe:///x"])
def test_spiffe_uri_must_be_a_spiffe_id(tmp_path: Path, ca: CA, uri: str) -> None:
    cert, key = ca.leaf(common_name="s", uris=[uri]).write(tmp_path, "s")
    with pytest.raises(IdentityFileError, match=r"^identity 'web': .*is not a spiffe://"):
        check_identity_files(spiffe(cert, key))


def test_key_not_matching_cert(tmp_path: Path, ca: CA) -> None:
    cert, _ = ca.spiffe_cert("spiffe://example.org/a").write(tmp_path, "a")
    _, other_key = ca.spiffe_cert("spiffe://example.org/a").write(tmp_path, "b")
    with pytest.raises(IdentityFileError, match=r"^identity 'web': the key in .* does not match"):
        check_identity_files(spiffe(cert, other_key))


def test_unreadable_and_garbage_files(tmp_path: Path, ca: CA) -> None:
    cert, key = ca.spiffe_cert("spiffe://example.org/a").write(tmp_path, "a")
    with pytest.raises(IdentityFileError, match=r"^identity 'web': cannot read cert file"):
        check_identity_files(spiffe(tmp_path / "nope.pem", key))
    with pytest.raises(IdentityFileError, match=r"^identity 'web': cannot read key file"):
        check_identity_files(spiffe(cert, tmp_path))  # a directory
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n")
    with pytest.raises(IdentityFileError, match="no valid PEM certificate"):
        check_identity_files(spiffe(garbage, key))
    with pytest.raises(IdentityFileError, match="no unencrypted PEM private key"):
        check_identity_files(spiffe(cert, garbage))


def test_encrypted_key_is_refused_without_leaking_it(tmp_path: Path, ca: CA) -> None:
    pair = ca.spiffe_cert("spiffe://example.org/a")
    cert, _ = pair.write(tmp_path, "a")
    private = serialization.load_pem_private_key(pair.key_pem, password=None)
    encrypted = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    ident = spiffe(cert, tmp_path / "enc.key")
    with pytest.raises(IdentityFileError) as info:
        identity_facts(ident, pair.cert_pem, encrypted)
    assert "no unencrypted PEM private key" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_server_only_certificate_is_refused(tmp_path: Path, ca: CA) -> None:
    pair = ca.leaf(common_name="s", uris=["spiffe://example.org/a"], eku=(SERVER_AUTH,))
    ident = spiffe(tmp_path / "c", tmp_path / "k")
    with pytest.raises(IdentityFileError, match="not valid for TLS client authentication"):
        identity_facts(ident, pair.cert_pem, pair.key_pem)


def test_chain_file_uses_the_leaf(tmp_path: Path, ca: CA) -> None:
    pair = ca.spiffe_cert("spiffe://example.org/a")
    ident = spiffe(tmp_path / "c", tmp_path / "k")
    facts = identity_facts(ident, pair.cert_pem + ca.cert_pem, pair.key_pem)
    assert facts.spiffe_id == "spiffe://example.org/a"
