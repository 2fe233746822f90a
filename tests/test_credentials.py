"""systemd ``LoadCredential=`` delivery (knoxd.credentials) to clients connecting as systemd does.

The clients are real processes in real cgroups named like systemd units, asking as
``LoadCredential=ID:/path/to/socket`` does (see ``systemd_clients.py``). The end-to-end tests need
root and a writable cgroup v2 hierarchy, and are skipped otherwise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from knoxd.cache.entry import CacheEntry
from knoxd.cache.view import CacheView, RemovalReason
from knoxd.config import (
    Config,
    ConfigError,
    CredentialConfig,
    DaemonConfig,
    IdentityConfig,
    IdentityKind,
    PeerSelectors,
    UpstreamConfig,
    parse_config,
)
from knoxd.credentials import (
    CredentialPolicy,
    CredentialRequest,
    Refused,
    parse_peer_address,
    serve_credentials,
)
from knoxd.fetch import Refusal
from knoxd.socket_api.listener import bind_unix
from knoxd.socket_api.peer import PeerFacts
from tests.systemd_clients import Units, short_dir, systemd_connect, unit_cgroups
from tests.test_client import Fetch, make_key

SECRET = b"hunter2-db-password"
GRANT = CredentialConfig("web.service", "db_password", "web:db_password", "web")
OTHER_UID = 4242

# --- the pure part ------------------------------------------------------------------------------


def test_parse_peer_address_reads_systemds_form_only() -> None:
    assert parse_peer_address(b"\x00a3f0c2/unit/web.service/db_password") == CredentialRequest(
        "web.service", "db_password"
    )
    assert parse_peer_address(b"\x00ff/unit/app@2.service/tls.key") == CredentialRequest(
        "app@2.service", "tls.key"
    )
    for other in (
        "",  # an unbound client
        "/run/some.sock",  # a path-bound client
        b"\x00a3f0/unit/web.service",  # no credential
        b"\x00a3f0/unit/web.service/db/extra",
        b"\x00a3f0/units/web.service/db",
        b"\x00/unit/web.service/db",  # no random part
        b"\x00a3f0/unit//db",
        b"\x00a3f0/unit/web.service/\xff",  # not ASCII
        b"\x00a3f0/unit/web.service/d\x01b",  # not printable
        b"a3f0/unit/web.service/db",  # not abstract
        None,
    ):
        assert parse_peer_address(other) is None, other


def facts(uid: int = 0, unit: str | None = "web.service") -> PeerFacts:
    return PeerFacts(uid, uid, frozenset({uid}), unit)


def test_policy_believes_a_claim_only_from_root_in_that_unit() -> None:
    policy = CredentialPolicy([GRANT])
    claim = CredentialRequest("web.service", "db_password")
    assert policy.decide(claim, facts()) == GRANT
    refusals = {
        "not systemd's": (None, facts()),
        "not root": (claim, facts(uid=OTHER_UID)),
        "did not tell": (claim, facts(unit=None)),
        "runs in 'other.service'": (claim, facts(unit="other.service")),
        "no [[credential]]": (CredentialRequest("web.service", "api_token"), facts()),
    }
    for reason, (request, peer) in refusals.items():
        with pytest.raises(Refused, match=reason.replace("[", r"\[").replace("]", r"\]")):
            policy.decide(request, peer)


# --- configuration ------------------------------------------------------------------------------

BASE = """\
[daemon]
workload_socket = "/run/knoxd/knoxd.sock"
credentials_socket = "/run/knoxd/credentials.sock"
[upstream]
urls = ["https://knox.example.com"]
[[identity]]
name = "web"
kind = "machine"
cert = "/etc/knoxd/web.pem"
key = "/etc/knoxd/web.key"
keys = ["web:other"]
[identity.peers]
uid = [1001]
"""


def test_credential_tables_parse_and_register_their_keys() -> None:
    config = parse_config(
        BASE
        + """
[[credential]]
unit = "web.service"
name = "db_password"
key = "web:db_password"
identity = "web"

[[credential]]
unit = "batch.service"
key = "plain_key"
identity = "web"
"""
    )
    assert config.daemon.credentials_socket == Path("/run/knoxd/credentials.sock")
    assert config.credentials == (
        GRANT,
        CredentialConfig("batch.service", "plain_key", "plain_key", "web"),
    )
    web = config.identity("web")
    assert web is not None and web.keys == ("web:other", "web:db_password", "plain_key")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            'unit = "web.service"\nkey = "web:db"\nidentity = "web"',
            "credential[#1].name: is required",
        ),
        ('unit = "web"\nkey = "k"\nidentity = "web"', "not a systemd unit name"),
        ('unit = "web.service"\nkey = "bad key"\nidentity = "web"', "not a valid key id"),
        ('unit = "web.service"\nkey = "k"\nidentity = "nobody"', "not the name of an [[identity]]"),
        ('unit = "web.service"\nkey = "k"\nname = "a/b"\nidentity = "web"', "credential[#1].name"),
        ('unit = "web.service"\nkey = "k"\nname = ".."\nidentity = "web"', "credential[#1].name"),
        ('unit = "web.service"\nkey = "k"\nidentity = "web"\nsecret = 1', "unknown key"),
    ],
)
def test_bad_credential_tables_are_precise_errors(table: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + "[[credential]]\n" + table + "\n")
    assert message in str(info.value)
    assert info.value.line is not None


def test_a_unit_cannot_have_one_credential_twice_and_sockets_differ() -> None:
    twice = '[[credential]]\nunit = "web.service"\nkey = "k"\nidentity = "web"\n'
    with pytest.raises(ConfigError, match=r"credential\[#2\].name: web.service already has"):
        parse_config(BASE + twice + twice)
    same = BASE.replace("credentials.sock", "knoxd.sock")
    with pytest.raises(ConfigError, match="credentials_socket: must differ"):
        parse_config(same)
    assert parse_config(BASE.replace('credentials_socket = "/run/knoxd/credentials.sock"\n', ""))


# --- end to end, with real processes in real cgroups ------------------------------------------


@pytest.fixture
def units() -> Iterator[Units]:
    with unit_cgroups() as cgroups:
        yield cgroups


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir("knoxd-cred-") as d:
        yield d


def _identity(name: str) -> IdentityConfig:
    unused = Path("/nonexistent")
    return IdentityConfig(
        name, IdentityKind.MACHINE, unused, unused, "h", (), PeerSelectors(uid=(1001,))
    )


def make_config(d: Path, *credentials: CredentialConfig, max_stale: float = 0.0) -> Config:
    return Config(
        DaemonConfig(
            d,
            d / "knoxd.sock",
            d / "admin.sock",
            max_stale_seconds=max_stale,
            credentials_socket=d / "run" / "credentials.sock",
        ),
        UpstreamConfig(("https://knox.invalid",)),
        (_identity("web"), _identity("batch")),
        credentials=credentials or (GRANT,),
    )


def put(view: CacheView, identity: str, key_id: str, data: bytes, at: float | None = None) -> None:
    key = make_key(key_id, data, b"older")
    view.set(CacheEntry(identity, key, key.hash, time.time() if at is None else at))


class SignallingFetch(Fetch):
    """The refresher seam; ``registered_one`` is set by the first registration."""

    def __init__(self) -> None:
        super().__init__(["web", "batch"])
        self.registered_one = trio.Event()

    async def register(self, identity: str, key_ids: Sequence[str]) -> list[str]:
        done = await super().register(identity, key_ids)
        self.registered_one.set()
        return done


@dataclass
class Served:
    config: Config
    view: CacheView
    fetch: SignallingFetch
    path: Path


async def start(nursery: trio.Nursery, d: Path, **kw: Any) -> Served:
    config = make_config(d, **kw)
    view = CacheView()
    fetch = SignallingFetch()
    await nursery.start(serve_credentials, config, view, fetch)
    assert config.daemon.credentials_socket is not None
    return Served(config, view, fetch, config.daemon.credentials_socket)


async def test_an_allowed_unit_gets_the_primary_data(sock_dir: Path, units: Units) -> None:
    async with trio.open_nursery() as nursery:
        served = await start(nursery, sock_dir)
        put(served.view, "web", "web:db_password", SECRET)
        assert os.stat(served.path).st_mode & 0o777 == 0o600
        with structlog.testing.capture_logs() as logs:
            result = await systemd_connect(served.path, units, "web.service", "db_password")
        assert result == (0, SECRET)
        assert [e["event"] for e in logs] == ["credential served"]
        assert logs[0]["unit"] == "web.service" and logs[0]["key_id"] == "web:db_password"
        assert SECRET.decode() not in repr(logs)
        nursery.cancel_scope.cancel()


async def test_other_units_and_impostors_get_nothing(sock_dir: Path, units: Units) -> None:
    async with trio.open_nursery() as nursery:
        served = await start(nursery, sock_dir)
        put(served.view, "web", "web:db_password", SECRET)
        path = served.path
        with structlog.testing.capture_logs() as logs:
            # Another unit asking for the credential in its own name: not granted to it.
            assert await systemd_connect(path, units, "other.service", "db_password") == (0, b"")
            # Root in another unit claiming web.service: the kernel says otherwise.
            claim = await systemd_connect(
                path, units, "web.service", "db_password", in_unit="other.service"
            )
            assert claim == (0, b"")
            # Root outside any unit (the test's own cgroup) claiming web.service.
            claim = await systemd_connect(path, units, "web.service", "db_password", in_unit=None)
            assert claim == (0, b"")
            # web.service asking for a credential it was not given.
            assert await systemd_connect(path, units, "web.service", "api_token") == (0, b"")
        reasons = [e["reason"] for e in logs]
        assert [e["event"] for e in logs] == ["credential request refused"] * 4
        assert "no [[credential]]" in reasons[0]
        assert "runs in 'other.service'" in reasons[1]
        # (The test's own cgroup is no unit here; under a systemd session it would be a scope.)
        assert "did not tell the peer's unit" in reasons[2] or "not in the unit" in reasons[2]
        assert "no [[credential]]" in reasons[3]
        assert SECRET.decode() not in repr(logs)
        # Non-root processes cannot even connect to the socket knoxd binds (0600).
        denied = await systemd_connect(path, units, "web.service", "db_password", uid=OTHER_UID)
        assert denied == (13, b"")
        nursery.cancel_scope.cancel()


async def test_a_non_root_peer_is_refused_even_on_an_open_socket(
    sock_dir: Path, units: Units
) -> None:
    # A socket systemd hands over may be more open than knoxd's own: the uid check still holds.
    config = make_config(sock_dir)
    view, fetch = CacheView(), Fetch(["web", "batch"])
    put(view, "web", "web:db_password", SECRET)
    listener = bind_unix(sock_dir / "open.sock", mode=0o666)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda **kw: serve_credentials(config, view, fetch, listener=listener, **kw)
            )
            with structlog.testing.capture_logs() as logs:
                result = await systemd_connect(
                    sock_dir / "open.sock", units, "web.service", "db_password", uid=OTHER_UID
                )
            assert result == (0, b"")
            assert "peer uid 4242 is not root" in logs[0]["reason"]
            assert await systemd_connect(
                sock_dir / "open.sock", units, "web.service", "db_password"
            ) == (0, SECRET)
            nursery.cancel_scope.cancel()
    finally:
        listener.close()


async def test_a_unit_starting_before_the_first_fetch_waits_for_it(
    sock_dir: Path, units: Units
) -> None:
    async with trio.open_nursery() as nursery:
        served = await start(nursery, sock_dir)
        result: list[tuple[int, bytes]] = []

        async def client() -> None:
            result.append(await systemd_connect(served.path, units, "web.service", "db_password"))

        async with trio.open_nursery() as clients:
            clients.start_soon(client)
            with trio.fail_after(10):
                await served.fetch.registered_one.wait()
            # The request registered the key; its first fetch arrives, and the unit gets it.
            assert served.fetch.is_registered("web", "web:db_password")
            put(served.view, "web", "web:db_password", SECRET)
        assert result == [(0, SECRET)]
        nursery.cancel_scope.cancel()


async def test_refused_revoked_and_stale_keys_are_not_delivered(
    sock_dir: Path, units: Units
) -> None:
    async with trio.open_nursery() as nursery:
        served = await start(nursery, sock_dir, max_stale=60.0)
        path = served.path
        served.fetch.refusals["web", "web:db_password"] = Refusal.FORBIDDEN
        with structlog.testing.capture_logs() as logs:
            assert await systemd_connect(path, units, "web.service", "db_password") == (0, b"")
        assert "refuses the key to identity 'web' (forbidden)" in logs[0]["reason"]
        served.fetch.refusals.clear()

        got: list[tuple[int, bytes]] = []

        async def client() -> None:
            got.append(await systemd_connect(path, units, "web.service", "db_password"))

        with structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as clients:
                clients.start_soon(client)
                with trio.fail_after(10):
                    await served.fetch.registered_one.wait()
                served.view.remove("web", "web:db_password", RemovalReason.FORBIDDEN)
        assert got == [(0, b"")]
        assert "left the cache for identity 'web' (forbidden)" in logs[0]["reason"]

        put(served.view, "web", "web:db_password", SECRET, at=time.time() - 3600)
        with structlog.testing.capture_logs() as logs:
            assert await systemd_connect(path, units, "web.service", "db_password") == (0, b"")
        assert "old (limit 60 s)" in logs[0]["reason"]
        nursery.cancel_scope.cancel()


async def test_the_wait_for_a_first_fetch_is_bounded(sock_dir: Path, units: Units) -> None:
    config = make_config(sock_dir)
    view, fetch = CacheView(), Fetch(["web", "batch"])
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda **kw: serve_credentials(config, view, fetch, wait_seconds=0.2, **kw)
        )
        assert config.daemon.credentials_socket is not None
        with structlog.testing.capture_logs() as logs:
            result = await systemd_connect(
                config.daemon.credentials_socket, units, "web.service", "db_password"
            )
        assert result == (0, b"")
        assert "not fetched within 0.2 s" in logs[0]["reason"]
        nursery.cancel_scope.cancel()


async def test_without_a_socket_there_is_nothing_to_serve(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config = Config(
        DaemonConfig(tmp_path, tmp_path / "w.sock", tmp_path / "a.sock"),
        config.upstream,
        config.identities,
        credentials=config.credentials,
    )
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_credentials, config, CacheView(), Fetch(["web"]))
