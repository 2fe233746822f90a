"""knoxd's encrypted cache: cache key, SQLite store (real files), in-memory view and watchers."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing

from knox.model import (
    Access,
    AccessType,
    Key,
    KeyVersion,
    PrincipalType,
    VersionStatus,
    version_hash,
)
from knoxd.cache.cache_key import (
    KEY_FILE_NAME,
    CacheKeyError,
    CacheKeySource,
    load_cache_key,
)
from knoxd.cache.entry import CacheEntry
from knoxd.cache.store import DB_NAME, UNUSABLE_SUFFIX, CacheStore, CacheWriteError
from knoxd.cache.view import CacheView, RemovalReason, Removed, Updated
from knoxd.cache.watch import TooManyWatchesError, Watcher

REPO = Path(__file__).resolve().parent.parent
SECRET = b"s3cr3t-payload-"


def make_key(key_id: str, data: bytes = SECRET, *, extra_active: bool = True) -> Key:
    versions = [KeyVersion(id=101, data=data, status=VersionStatus.PRIMARY, ts=1_700_000_000)]
    if extra_active:
        versions.append(
            KeyVersion(id=2**64 - 1, data=data + b"-old", status=VersionStatus.ACTIVE, ts=-5)
        )
    return Key(
        id=key_id,
        acl=(
            Access(PrincipalType.MACHINE, "web-042", AccessType.READ),
            Access(PrincipalType.UNKNOWN, "future-principal", AccessType.ADMIN),
        ),
        versions=tuple(versions),
        hash=version_hash(versions),
        path="/var/lib/knox/v0/keys/" + key_id,
        tink_keyset="tink-json",
    )


def make_entry(
    identity: str,
    key_id: str,
    data: bytes = SECRET,
    *,
    at: float = 1000.5,
    error: str | None = None,
) -> CacheEntry:
    key = make_key(key_id, data)
    return CacheEntry(identity=identity, key=key, hash=key.hash, fetched_at=at, last_error=error)


@contextlib.contextmanager
def raw_db(state_dir: Path) -> Iterator[sqlite3.Connection]:
    """A direct connection to the cache database, for tampering and inspection."""
    with contextlib.closing(sqlite3.connect(state_dir / DB_NAME, isolation_level=None)) as conn:
        yield conn


def row_count(state_dir: Path) -> int:
    with raw_db(state_dir) as conn:
        (n,) = conn.execute("SELECT count(*) FROM keys").fetchone()
        return int(n)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


# --- the store -----------------------------------------------------------------------------


async def test_round_trip_across_close_and_reopen(state_dir: Path) -> None:
    cache_key = load_cache_key(state_dir)
    a = make_entry("host", "web:tls_ticket", error="upstream timeout")
    b = make_entry("web", "web:db_password", data=b"\x00\xff" * 100)
    async with await CacheStore.open(state_dir, cache_key) as store:
        await store.put(a)
        await store.put(b)
        await store.add_registrations("host", ["web:tls_ticket", "other:key"])
        await store.add_registrations("web", ["web:db_password"])
        await store.add_registrations("web", ["web:db_password"])

    again = load_cache_key(state_dir)
    assert again.key == cache_key.key
    async with await CacheStore.open(state_dir, again) as store:
        assert await store.load_all() == [a, b]
        assert await store.registrations() == {
            "host": {"web:tls_ticket", "other:key"},
            "web": {"web:db_password"},
        }
    assert (state_dir / DB_NAME).stat().st_mode & 0o777 == 0o600
    # The secret is nowhere in the file in the clear.
    assert SECRET not in (state_dir / DB_NAME).read_bytes()


async def test_put_replaces_and_delete_removes(state_dir: Path) -> None:
    async with await CacheStore.open(state_dir, os.urandom(32)) as store:
        await store.put(make_entry("host", "a", b"one"))
        await store.put(make_entry("host", "a", b"two", at=2000.0))
        await store.put(make_entry("host", "b"))
        (a, _) = await store.load_all()
        assert a.key.primary.data == b"two"
        assert a.fetched_at == 2000.0
        await store.delete("host", "b")
        await store.delete("host", "not-there")
        assert [e.key_id for e in await store.load_all()] == ["a"]


async def test_unregistering_drops_the_cached_rows(state_dir: Path) -> None:
    async with await CacheStore.open(state_dir, os.urandom(32)) as store:
        await store.add_registrations("host", ["a", "b"])
        await store.put(make_entry("host", "a"))
        await store.put(make_entry("host", "b"))
        await store.remove_registrations("host", ["a"])
        assert await store.registrations() == {"host": {"b"}}
        assert [e.key_id for e in await store.load_all()] == ["b"]


async def test_retain_identities_prunes_the_others(state_dir: Path) -> None:
    async with await CacheStore.open(state_dir, os.urandom(32)) as store:
        for identity in ("host", "web", "gone"):
            await store.put(make_entry(identity, "k"))
            await store.add_registrations(identity, ["k"])
        assert await store.retain_identities(["host", "web", "never-had-rows"]) == 1
        assert {e.identity for e in await store.load_all()} == {"host", "web"}
        assert set(await store.registrations()) == {"host", "web"}


async def test_closed_store_refuses_calls(state_dir: Path) -> None:
    store = await CacheStore.open(state_dir, os.urandom(32))
    await store.aclose()
    await store.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await store.load_all()


@pytest.mark.parametrize(
    ("identity", "key_id"), [("web", "web:tls_ticket"), ("host", "web:other_key")]
)
async def test_row_moved_to_another_identity_or_key_is_dropped(
    state_dir: Path, identity: str, key_id: str
) -> None:
    cache_key = os.urandom(32)
    async with await CacheStore.open(state_dir, cache_key) as store:
        await store.put(make_entry("host", "web:tls_ticket"))
    with raw_db(state_dir) as conn:
        conn.execute(
            "INSERT INTO keys (identity, key_id, sealed) "
            "SELECT ?, ?, sealed FROM keys WHERE identity = 'host'",
            (identity, key_id),
        )
    assert row_count(state_dir) == 2
    with structlog.testing.capture_logs() as logs:
        async with await CacheStore.open(state_dir, cache_key) as store:
            loaded = await store.load_all()
    assert [(e.identity, e.key_id) for e in loaded] == [("host", "web:tls_ticket")]
    dropped = [log for log in logs if log["event"].startswith("dropping")]
    assert len(dropped) == 1
    assert (dropped[0]["identity"], dropped[0]["key_id"]) == (identity, key_id)
    assert row_count(state_dir) == 1


@pytest.mark.parametrize("where", ["header", "nonce", "ciphertext", "tag"])
async def test_flipped_byte_drops_the_row_and_logs_it(state_dir: Path, where: str) -> None:
    cache_key = os.urandom(32)
    async with await CacheStore.open(state_dir, cache_key) as store:
        await store.put(make_entry("host", "a"))
        await store.put(make_entry("host", "b"))
    with raw_db(state_dir) as conn:
        (sealed,) = conn.execute("SELECT sealed FROM keys WHERE key_id = 'a'").fetchone()
        offset = {"header": 0, "nonce": 5, "ciphertext": 20, "tag": len(sealed) - 1}[where]
        tampered = bytearray(sealed)
        tampered[offset] ^= 0x01
        conn.execute("UPDATE keys SET sealed = ? WHERE key_id = 'a'", (bytes(tampered),))
    with structlog.testing.capture_logs() as logs:
        async with await CacheStore.open(state_dir, cache_key) as store:
            assert [e.key_id for e in await store.load_all()] == ["b"]
    (dropped,) = [log for log in logs if log["event"].startswith("dropping")]
    assert dropped["log_level"] == "warning"
    assert (dropped["identity"], dropped["key_id"]) == ("host", "a")
    assert "s3cr3t" not in repr(logs)
    assert row_count(state_dir) == 1


async def test_disk_full_raises_cache_write_error_and_keeps_the_old_row(state_dir: Path) -> None:
    cache_key = os.urandom(32)
    # max_bytes caps the file with PRAGMA max_page_count: SQLite's real SQLITE_FULL path.
    async with await CacheStore.open(state_dir, cache_key, max_bytes=64 * 1024) as store:
        await store.put(make_entry("host", "a", b"old value"))
        with pytest.raises(CacheWriteError, match=r"key 'a' of identity 'host'.*SQLITE_FULL"):
            await store.put(make_entry("host", "a", os.urandom(200_000)))
        with pytest.raises(CacheWriteError, match="SQLITE_FULL"):
            await store.put(make_entry("host", "b", os.urandom(200_000)))
        (entry,) = await store.load_all()
        assert entry.key.primary.data == b"old value"
        # Still usable after the failure.
        await store.put(make_entry("host", "a", b"new value"))
    async with await CacheStore.open(state_dir, cache_key) as store:
        (entry,) = await store.load_all()
        assert entry.key.primary.data == b"new value"


async def test_unusable_database_file_is_moved_aside_for_a_cold_start(state_dir: Path) -> None:
    (state_dir / DB_NAME).write_bytes(b"this is not an SQLite database " * 200)
    with structlog.testing.capture_logs() as logs:
        async with await CacheStore.open(state_dir, os.urandom(32)) as store:
            assert await store.load_all() == []
            await store.put(make_entry("host", "a"))
            assert len(await store.load_all()) == 1
    assert any("unusable" in log["event"] for log in logs)
    assert (state_dir / (DB_NAME + UNUSABLE_SUFFIX)).read_bytes().startswith(b"this is not")


async def test_database_from_a_newer_version_is_moved_aside(state_dir: Path) -> None:
    async with await CacheStore.open(state_dir, os.urandom(32)) as store:
        await store.add_registrations("host", ["a"])
    with raw_db(state_dir) as conn:
        conn.execute("PRAGMA user_version = 99")
    async with await CacheStore.open(state_dir, os.urandom(32)) as store:
        assert await store.registrations() == {}
    assert (state_dir / (DB_NAME + UNUSABLE_SUFFIX)).exists()


# --- the cache key -------------------------------------------------------------------------


def test_key_file_is_created_0600_and_reused(state_dir: Path) -> None:
    os.umask(old := os.umask(0o022))
    created = load_cache_key(state_dir)
    assert created.source is CacheKeySource.CREATED
    path = state_dir / KEY_FILE_NAME
    assert created.path == path
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes() == created.key
    assert sorted(p.name for p in state_dir.iterdir()) == [KEY_FILE_NAME]
    reused = load_cache_key(state_dir)
    assert (reused.source, reused.key) == (CacheKeySource.FILE, created.key)
    assert created.key.hex() not in repr(created)
    assert old == os.umask(old)


def test_key_file_creation_makes_a_missing_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    key = load_cache_key(state)
    assert key.source is CacheKeySource.CREATED
    assert state.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused(state_dir: Path, mode: int) -> None:
    path = state_dir / KEY_FILE_NAME
    path.write_bytes(os.urandom(32))
    path.chmod(mode)
    with pytest.raises(CacheKeyError, match=f"mode {mode:04o} gives group or others access"):
        load_cache_key(state_dir)


def test_key_file_of_wrong_size_or_kind_is_refused(state_dir: Path) -> None:
    path = state_dir / KEY_FILE_NAME
    path.write_bytes(b"short")
    path.chmod(0o600)
    with pytest.raises(CacheKeyError, match="expected 32 raw bytes or base64 of 32 bytes"):
        load_cache_key(state_dir)
    path.unlink()
    path.mkdir()
    with pytest.raises(CacheKeyError, match="not a regular file"):
        load_cache_key(state_dir)
    path.rmdir()
    target = state_dir / "elsewhere"
    target.write_bytes(os.urandom(32))
    target.chmod(0o600)
    path.symlink_to(target)
    with pytest.raises(CacheKeyError, match="cannot open"):
        load_cache_key(state_dir)


@pytest.mark.parametrize(
    "encode",
    [
        bytes,
        base64.b64encode,
        lambda k: base64.b64encode(k) + b"\n",
    ],
    ids=["raw", "base64", "base64-newline"],
)
def test_key_from_systemd_credential(
    tmp_path: Path,
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    encode: Callable[[bytes], bytes],
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    key = os.urandom(32)
    (creds / "knoxd-cache-key").write_bytes(encode(key))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    loaded = load_cache_key(state_dir)
    assert (loaded.key, loaded.source) == (key, CacheKeySource.CREDENTIAL)
    assert not (state_dir / KEY_FILE_NAME).exists()


def test_bad_credential_is_refused(
    tmp_path: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "knoxd-cache-key").write_bytes(base64.b64encode(os.urandom(16)))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with pytest.raises(CacheKeyError, match="knoxd-cache-key: expected 32 raw bytes"):
        load_cache_key(state_dir)


def test_credentials_directory_without_our_credential_falls_back_to_the_file(
    tmp_path: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with structlog.testing.capture_logs() as logs:
        key = load_cache_key(state_dir)
    assert key.source is CacheKeySource.CREATED
    assert any(log["event"].startswith("no cache key credential") for log in logs)


async def test_lost_key_file_means_a_cold_start(state_dir: Path) -> None:
    async with await CacheStore.open(state_dir, load_cache_key(state_dir)) as store:
        await store.put(make_entry("host", "a"))
        await store.put(make_entry("web", "b"))
        await store.add_registrations("host", ["a"])
    (state_dir / KEY_FILE_NAME).unlink()

    new_key = load_cache_key(state_dir)
    assert new_key.source is CacheKeySource.CREATED
    with structlog.testing.capture_logs() as logs:
        async with await CacheStore.open(state_dir, new_key) as store:
            assert await store.load_all() == []
            # Registrations are not secret: they survive, so the refresher refetches.
            assert await store.registrations() == {"host": {"a"}}
    assert len([log for log in logs if log["event"].startswith("dropping")]) == 2
    assert row_count(state_dir) == 0


# --- crash safety --------------------------------------------------------------------------

_BURST = """
import sys
from pathlib import Path

import trio

from knox.model import Key, KeyVersion, VersionStatus, version_hash
from knoxd.cache.entry import CacheEntry
from knoxd.cache.store import CacheStore


def entry(i: int, gen: int) -> CacheEntry:
    data = f"key{i}-gen{gen}-".encode() * 200
    versions = (KeyVersion(id=gen, data=data, status=VersionStatus.PRIMARY, ts=gen),)
    key = Key(id=f"k{i}", acl=(), versions=versions, hash=version_hash(versions))
    return CacheEntry(identity="host", key=key, hash=key.hash, fetched_at=float(gen))


async def main() -> None:
    store = await CacheStore.open(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]))
    gen = int(sys.argv[3])
    while True:
        gen += 1
        for i in range(8):
            await store.put(entry(i, gen))
            print(gen, i, flush=True)


trio.run(main)
"""


async def burst_until_killed(
    state_dir: Path, cache_key: bytes, first_gen: int, kill_after: tuple[int, int]
) -> None:
    """Run the burst writer and SIGKILL it once it acknowledged the put ``kill_after``
    (generation, key index): the kill then lands inside the next put or the ones after it."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", _BURST, str(state_dir), cache_key.hex(), str(first_gen)],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        with trio.fail_after(60):
            buffer = b""
            acknowledged = (0, 0)
            while acknowledged < kill_after:
                chunk = await proc.stdout.receive_some()
                assert chunk, "the writer exited early"
                *lines, buffer = (buffer + chunk).split(b"\n")
                if lines:
                    gen, i = lines[-1].split()
                    acknowledged = (int(gen), int(i))
        proc.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
        assert proc.stdout is not None
        await proc.stdout.aclose()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("kill_after", [(10, 2), (12, 6)])
async def test_sigkill_mid_burst_leaves_every_row_old_or_new(
    state_dir: Path, kill_after: tuple[int, int]
) -> None:
    cache_key = os.urandom(32)
    ack_gen, ack_index = kill_after
    await burst_until_killed(state_dir, cache_key, 0, kill_after)

    with raw_db(state_dir) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with structlog.testing.capture_logs() as logs:
        async with await CacheStore.open(state_dir, cache_key) as store:
            entries = await store.load_all()
    assert not [log for log in logs if log["event"].startswith("dropping")]
    assert [e.key_id for e in entries] == [f"k{i}" for i in range(8)]
    gens = []
    for i, e in enumerate(entries):
        gen = e.key.primary.id
        assert e.key.primary.data == f"key{i}-gen{gen}-".encode() * 200
        assert e.hash == version_hash(e.key.versions)
        gens.append(gen)
    # Puts ran in key order, one committed transaction each: every key holds the last or the
    # one-before-last generation, newest first.
    assert gens == sorted(gens, reverse=True)
    assert gens[0] - gens[-1] <= 1
    # Every acknowledged put is durable.
    assert all(g >= ack_gen for g in gens[: ack_index + 1])
    assert all(g >= ack_gen - 1 for g in gens)

    # A writer that crashed once leaves a database the next one keeps using.
    await burst_until_killed(state_dir, cache_key, 100, (101, 0))
    async with await CacheStore.open(state_dir, cache_key) as store:
        first, *_ = await store.load_all()
    assert first.key.primary.id >= 101


# --- the view and watchers ----------------------------------------------------------------


def test_entry_reprs_hold_no_secret() -> None:
    entry = make_entry("host", "a")
    view = CacheView()
    shown = repr(entry) + repr(view.set(entry)) + repr(entry.key)
    assert "s3cr3t" not in shown
    assert "'a'" in repr(entry)


def test_cache_entry_validates_its_row_coordinates() -> None:
    key = make_key("a")
    with pytest.raises(ValueError, match="identity"):
        CacheEntry(identity="ho\0st", key=key, hash=key.hash, fetched_at=1.0)
    with pytest.raises(ValueError, match="key id"):
        CacheEntry(identity="host", key=make_key("bad/id"), hash=key.hash, fetched_at=1.0)
    with pytest.raises(ValueError, match="finite"):
        CacheEntry(identity="host", key=key, hash=key.hash, fetched_at=float("nan"))


def test_view_get_set_confirm_remove() -> None:
    view = CacheView()
    assert view.get("host", "a") is None
    served = view.set(make_entry("host", "a", at=100.0))
    view.set(make_entry("web", "a"))
    assert view.get("host", "a") is served
    assert len(view) == 2
    assert [e.identity for e in view.entries("web")] == ["web"]

    assert view.confirm("host", "a", 200.0)
    assert served.fetched_at == 200.0
    assert view.confirm("host", "a", 150.0)
    assert served.fetched_at == 200.0  # never backwards
    assert served.entry.fetched_at == 200.0  # what a caller would persist
    assert not view.confirm("host", "missing", 1.0)

    assert view.record_error("host", "a", "timeout")
    assert (served.last_error, served.key.primary.data) == ("timeout", SECRET)
    view.confirm("host", "a", 300.0)
    assert served.last_error is None

    assert view.remove("host", "a", RemovalReason.DELETED)
    assert not view.remove("host", "a", RemovalReason.DELETED)
    assert view.get("host", "a") is None


def test_encoded_form_is_memoized_and_invalidated_on_change() -> None:
    view = CacheView()
    served = view.set(make_entry("host", "a", b"v1"))
    calls: list[bytes] = []

    def encoder(key: Key) -> bytes:
        calls.append(key.primary.data)
        return b"encoded:" + key.primary.data

    def memo() -> bytes | None:
        return served.encoded

    assert memo() is None
    assert served.encode(encoder) == b"encoded:v1"
    assert served.encode(encoder) == b"encoded:v1"
    view.confirm("host", "a", 5000.0)
    view.record_error("host", "a", "boom")
    view.set(make_entry("host", "a", b"v1", at=6000.0))  # same key, newer confirmation
    assert memo() == b"encoded:v1"
    assert calls == [b"v1"]
    view.set(make_entry("host", "a", b"v2"))
    assert memo() is None
    assert served.encode(encoder) == b"encoded:v2"


def test_listeners_hear_what_clients_could_notice() -> None:
    view = CacheView()
    heard: list[str] = []

    def listener(change: Updated | Removed) -> None:
        if isinstance(change, Updated):
            heard.append(f"update {change.entry.key.primary.data!r} {change.entry.last_error}")
        else:
            heard.append(f"removed {change.reason.value}")

    view.subscribe("host", "a", listener)
    view.set(make_entry("host", "b"))  # another key: not heard
    view.set(make_entry("host", "a", b"v1", at=1.0))
    view.set(make_entry("host", "a", b"v1", at=2.0))  # only fetched_at moved
    view.confirm("host", "a", 3.0)  # nothing to clear
    view.record_error("host", "a", "timeout")
    view.record_error("host", "a", "timeout")  # same error again
    view.confirm("host", "a", 4.0)  # error clears
    view.set(make_entry("host", "a", b"v2"))
    view.remove("host", "a", RemovalReason.FORBIDDEN)
    view.remove("host", "a", RemovalReason.DELETED)  # not held, still news
    view.unsubscribe("host", "a", listener)
    view.unsubscribe("host", "a", listener)
    view.set(make_entry("host", "a", b"v3"))
    assert heard == [
        "update b'v1' None",
        "update b'v1' timeout",
        "update b'v1' None",
        "update b'v2' None",
        "removed forbidden",
        "removed deleted",
    ]
    assert view.listener_count("host", "a") == 0


def test_subscription_keeps_only_the_newest_state_per_key() -> None:
    view = CacheView()
    with Watcher(view) as watcher:
        watcher.watch("host", "a")
        watcher.watch("host", "b")
        for gen in range(100):
            view.set(make_entry("host", "a", f"gen{gen}".encode()))
        view.set(make_entry("host", "b", b"only"))
        for gen in range(100, 200):
            view.set(make_entry("host", "a", f"gen{gen}".encode()))
        assert watcher.pending_count == 2
        first, second = watcher.poll(), watcher.poll()
        assert watcher.poll() is None
    # "a" became pending first, so it keeps its turn, and carries its newest state.
    assert isinstance(first, Updated) and isinstance(second, Updated)
    assert (first.key_id, first.entry.key.primary.data) == ("a", b"gen199")
    assert (second.key_id, second.entry.key.primary.data) == ("b", b"only")
    assert view.listener_count("host", "a") == 0


def test_removal_supersedes_a_pending_update_and_an_update_follows_it() -> None:
    view = CacheView()
    with Watcher(view) as watcher:
        watcher.watch("host", "a")
        view.set(make_entry("host", "a"))
        view.remove("host", "a", RemovalReason.FORBIDDEN)
        change = watcher.poll()
        assert change == Removed("host", "a", RemovalReason.FORBIDDEN)
        view.set(make_entry("host", "a", b"back"))
        change = watcher.poll()
        assert isinstance(change, Updated) and change.entry.key.primary.data == b"back"


def test_watch_starts_from_the_current_state_and_is_bounded() -> None:
    view = CacheView()
    view.set(make_entry("host", "a", b"now"))
    with Watcher(view, max_keys=2) as watcher:
        watcher.watch("host", "a")
        watcher.watch("host", "missing")
        change = watcher.poll()
        assert isinstance(change, Updated) and change.entry.key.primary.data == b"now"
        assert watcher.poll() is None
        watcher.watch("host", "a")  # again: no new slot, state re-queued
        assert watcher.pending_count == 1
        with pytest.raises(TooManyWatchesError):
            watcher.watch("host", "c")
        watcher.unwatch("host", "a")
        assert watcher.pending_count == 0
        assert watcher.watching == [("host", "missing")]
        view.set(make_entry("host", "a", b"later"))
        assert watcher.poll() is None
    with pytest.raises(trio.ClosedResourceError):
        watcher.watch("host", "a")


async def test_next_waits_for_a_change_and_close_wakes_it() -> None:
    view = CacheView()
    watcher = Watcher(view)
    watcher.watch("host", "a")
    got: list[object] = []

    async def reader() -> None:
        while True:
            try:
                got.append(await watcher.next())
            except trio.ClosedResourceError:
                got.append("closed")
                return

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            view.set(make_entry("host", "a", b"v1"))
            view.set(make_entry("host", "a", b"v2"))
            await trio.testing.wait_all_tasks_blocked()
            (change,) = got
            assert isinstance(change, Updated) and change.entry.key.primary.data == b"v2"
            watcher.close()
    assert got[-1] == "closed"
    assert view.listener_count("host", "a") == 0


async def test_cancelled_next_loses_no_change() -> None:
    view = CacheView()
    with Watcher(view) as watcher:
        watcher.watch("host", "a")
        with trio.move_on_after(0.01):
            await watcher.next()
        view.set(make_entry("host", "a"))
        with trio.fail_after(5):
            change = await watcher.next()
        assert isinstance(change, Updated)
