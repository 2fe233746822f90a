"""The Knox-compatible export (knoxd.export): real files, real ownership, a real reader racing the
writes. Ownership tests need root (to chown to other users) and are skipped otherwise."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from knox.model import (
    Access,
    AccessType,
    Key,
    KeyVersion,
    PrincipalType,
    VersionStatus,
    version_hash,
)
from knox.wire import decode_key
from knoxd.cache.entry import CacheEntry
from knoxd.cache.view import CacheView, RemovalReason
from knoxd.config import (
    Config,
    ConfigError,
    DaemonConfig,
    ExportConfig,
    IdentityConfig,
    IdentityKind,
    PeerSelectors,
    UpstreamConfig,
    parse_config,
)
from knoxd.export import ExportError, export_document, run_export
from tests.polling import until
from tests.test_client import make_key

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to other users")

KEY = "web:db_password"


def _identity(name: str) -> IdentityConfig:
    unused = Path("/nonexistent")
    return IdentityConfig(name, IdentityKind.MACHINE, unused, unused, "h", (), PeerSelectors((0,)))


def make_config(export_dir: Path, *exports: ExportConfig) -> Config:
    d = export_dir.parent
    return Config(
        DaemonConfig(d, d / "w.sock", d / "a.sock", export_dir=export_dir),
        UpstreamConfig(("https://knox.invalid",)),
        (_identity("web"), _identity("batch")),
        exports=exports or (ExportConfig(KEY, "web"),),
    )


def put(view: CacheView, key: Key, identity: str = "web", error: str | None = None) -> None:
    view.set(CacheEntry(identity, key, key.hash, 1_700_000_000.0, error))


def key_file(export_dir: Path, key_id: str = KEY) -> Path:
    return export_dir / "v0" / "keys" / key_id


def primary_id(path: Path) -> int | None:
    try:
        return decode_key(path.read_bytes()).primary.id
    except FileNotFoundError:
        return None


async def until_primary(path: Path, version_id: int) -> None:
    # Fast: a test waits for 1000 rotations one after another.
    await until(lambda: primary_id(path) == version_id, interval=0.001)


# --- the document -------------------------------------------------------------------------------


def test_the_document_is_what_knoxs_daemon_writes() -> None:
    versions = (
        KeyVersion(7, b"new", VersionStatus.PRIMARY, 3),
        KeyVersion(5, b"old", VersionStatus.ACTIVE, 2),
        KeyVersion(3, b"gone", VersionStatus.INACTIVE, 1),
    )
    acl = (Access(PrincipalType.MACHINE, "h", AccessType.READ),)
    key = Key(KEY, acl, versions, version_hash(versions), path="/x")
    doc = export_document(key)
    obj = json.loads(doc)
    # Knox's file client rejects a key without id, acl (null), versions or hash.
    assert list(obj) == ["id", "acl", "versions", "hash"]
    assert obj["acl"] == [] and obj["hash"] == key.hash
    assert [v["id"] for v in obj["versions"]] == [7, 5]
    assert obj["versions"][0] == {"id": 7, "data": "bmV3", "status": "Primary", "ts": 3}
    assert doc.startswith(b'{"id":"web:db_password","acl":[],"versions":[{"id":7,')


# --- configuration ------------------------------------------------------------------------------

BASE = """\
[upstream]
urls = ["https://knox.example.com"]
[[identity]]
name = "web"
kind = "machine"
cert = "/etc/knoxd/web.pem"
key = "/etc/knoxd/web.key"
[identity.peers]
uid = [1001]
"""


def test_export_tables_parse_with_safe_defaults() -> None:
    config = parse_config(
        "[daemon]\nexport_dir = '/srv/knox'\n"
        + BASE
        + """
[[export]]
key = "web:db_password"
identity = "web"

[[export]]
key = "web:api"
identity = "web"
owner = "www-data"
group = 33
mode = "0644"
"""
    )
    assert config.daemon.export_dir == Path("/srv/knox")
    assert config.exports == (
        ExportConfig("web:db_password", "web", 0, 0, 0o640),
        ExportConfig("web:api", "web", "www-data", 33, 0o644),
    )
    web = config.identity("web")
    assert web is not None and web.keys == ("web:db_password", "web:api")
    assert parse_config(BASE).daemon.export_dir == Path("/var/lib/knox")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('key = "k"\nidentity = "web"\nmode = 640', "write it in octal"),
        ('key = "k"\nidentity = "web"\nmode = 0o666', "0o666 is world-writable"),
        ('key = "k"\nidentity = "web"\nmode = "rw-r-----"', "expected permission bits"),
        ('key = "k"\nidentity = "web"\nowner = "bad user!"', "export[#1].owner"),
        ('key = "k"\nidentity = "web"\ngroup = -1', "export[#1].group: must be in"),
        ('key = "k"\nidentity = "web"\nowner = true', "export[#1].owner: expected"),
        ('key = "k"\nidentity = "db"', "not the name of an [[identity]]"),
        ('key = "a b"\nidentity = "web"', "not a valid key id"),
    ],
)
def test_bad_export_tables_are_precise_errors(table: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + "[[export]]\n" + table + "\n")
    assert message in str(info.value)
    assert info.value.line is not None


def test_a_key_is_exported_once() -> None:
    twice = '[[export]]\nkey = "k"\nidentity = "web"\n'
    with pytest.raises(ConfigError, match=r"export\[#2\].key: 'k' is already exported"):
        parse_config(BASE + twice + twice)


# --- the files ----------------------------------------------------------------------------------


async def test_default_file_is_root_0640_and_follows_rotation_and_revocation(
    tmp_path: Path,
) -> None:
    export_dir = tmp_path / "knox"
    view = CacheView()
    put(view, make_key(KEY, b"s3cret", b"older"))
    put(view, make_key("web:not_exported", b"other"))
    async with trio.open_nursery() as nursery:
        await nursery.start(run_export, make_config(export_dir), view)
        path = key_file(export_dir)
        await until(path.exists)
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, os.geteuid(), 0)
        for d in (export_dir, export_dir / "v0", export_dir / "v0" / "keys"):
            assert stat.S_IMODE(d.stat().st_mode) == 0o755
        key = decode_key(path.read_bytes())
        assert key.primary.data == b"s3cret" and [v.data for v in key.versions][1] == b"older"
        assert os.listdir(export_dir / "v0" / "keys") == [KEY]

        # An error that changes nothing in the key does not rewrite the file.
        inode = path.stat().st_ino
        put(view, make_key(KEY, b"s3cret", b"older"), error="upstream down")
        put(view, make_key(KEY, b"rotated", first_id=10))
        await until_primary(path, 10)
        assert path.stat().st_ino != inode
        assert stat.S_IMODE(path.stat().st_mode) == 0o640

        view.remove("web", KEY, RemovalReason.FORBIDDEN)
        await until(lambda: not path.exists())
        # Only the key files were ever in the tree: no temporary file is left behind.
        assert sorted(os.listdir(export_dir)) == ["v0"]
        nursery.cancel_scope.cancel()


@needs_root
async def test_owner_group_and_mode_come_from_the_config(tmp_path: Path) -> None:
    export_dir = tmp_path / "knox"
    view = CacheView()
    put(view, make_key("a:key", b"x"))
    put(view, make_key("b:key", b"y"), identity="batch")
    config = make_config(
        export_dir,
        ExportConfig("a:key", "web", owner=4242, group=4343, mode=0o440),
        ExportConfig("b:key", "batch", owner="root", group="root", mode=0o600),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(run_export, config, view)
        await until(lambda: key_file(export_dir, "b:key").exists())
        await until(lambda: key_file(export_dir, "a:key").exists())
        a, b = key_file(export_dir, "a:key").stat(), key_file(export_dir, "b:key").stat()
        assert (stat.S_IMODE(a.st_mode), a.st_uid, a.st_gid) == (0o440, 4242, 4343)
        assert (stat.S_IMODE(b.st_mode), b.st_uid, b.st_gid) == (0o600, 0, 0)
        nursery.cancel_scope.cancel()


async def test_start_problems_are_precise_errors(tmp_path: Path) -> None:
    view = CacheView()
    with pytest.raises(ExportError, match="no user 'no-such-user-xyz'"):
        await run_export(
            make_config(tmp_path / "a", ExportConfig(KEY, "web", owner="no-such-user-xyz")), view
        )
    # Knox's daemon leaves 0777 directories behind: root will not write into them.
    legacy = tmp_path / "legacy"
    (legacy / "v0" / "keys").mkdir(parents=True)
    os.chmod(legacy / "v0", 0o777)
    with pytest.raises(ExportError, match=r"legacy/v0 is writable by others .* chmod go-w"):
        await run_export(make_config(legacy), view)
    # A symlink in the tree could send root's writes anywhere.
    linked = tmp_path / "linked"
    linked.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (linked / "v0").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ExportError, match="linked/v0: not a usable directory"):
        await run_export(make_config(linked), view)
    assert list((tmp_path / "elsewhere").iterdir()) == []


async def test_cold_start_keeps_an_old_file_until_the_upstream_answers(tmp_path: Path) -> None:
    export_dir = tmp_path / "knox"
    path = key_file(export_dir)
    path.parent.mkdir(parents=True)
    path.write_bytes(export_document(make_key(KEY, b"from last run")))
    leftover = export_dir / f".{KEY}.0123456789abcdef.tmp"
    leftover.write_bytes(b"{partial")
    view = CacheView()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_export, make_config(export_dir), view)
        assert not leftover.exists()
        assert decode_key(path.read_bytes()).primary.data == b"from last run"
        # The server says the key is gone: the old file goes too.
        view.remove("web", KEY, RemovalReason.DELETED)
        await until(lambda: not path.exists())
        nursery.cancel_scope.cancel()


async def test_a_failed_write_is_logged_and_retried(tmp_path: Path) -> None:
    export_dir = tmp_path / "knox"
    view = CacheView()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_export, make_config(export_dir), view)
        keys_dir = export_dir / "v0" / "keys"
        os.chmod(keys_dir, 0o777)
        with structlog.testing.capture_logs() as logs:
            put(view, make_key(KEY, b"s3cret"))
            await until(lambda: any(e["event"] == "export failed; retrying" for e in logs))
            os.chmod(keys_dir, 0o755)
            await until_primary(key_file(export_dir), 1)
        failed = next(e for e in logs if e["event"] == "export failed; retrying")
        assert "chmod go-w" in failed["error"] and failed["key_id"] == KEY
        assert "s3cret" not in repr(logs)
        nursery.cancel_scope.cancel()


# Like Knox's file client, in its own process: open the path, read it whole, decode it, check it
# is a whole key, and again, until the stop file appears; then print what it saw.
READER = r"""
import base64, json, os, sys
path, stop = sys.argv[1], sys.argv[2]
reads, ids, bad = 0, set(), []
while not os.path.exists(stop):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        bad.append("missing")
        continue
    try:
        key = json.loads(raw)
        primary = [v for v in key["versions"] if v["status"] == "Primary"]
        assert key["id"] and key["acl"] == [] and len(key["hash"]) == 64 and len(primary) == 1
        base64.b64decode(primary[0]["data"], validate=True)
    except Exception as exc:
        bad.append(f"{type(exc).__name__} after {len(raw)} bytes")
        continue
    reads += 1
    ids.add(primary[0]["id"])
print(json.dumps({"reads": reads, "versions": len(ids), "bad": bad[:10], "bad_count": len(bad)}))
"""


async def test_a_reader_never_sees_a_partial_file_across_1000_rotations(tmp_path: Path) -> None:
    export_dir = tmp_path / "knox"
    path = key_file(export_dir)
    stop = tmp_path / "stop"
    view = CacheView()
    # A large value makes a torn read likely if the writes were not atomic.
    padding = b"p" * 20_000
    put(view, make_key(KEY, b"0" + padding, first_id=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(run_export, make_config(export_dir), view)
        await until(path.exists)
        report: dict[str, Any] = {}

        async def read() -> None:
            command = [sys.executable, "-I", "-S", "-c", READER, str(path), str(stop)]
            report.update(json.loads((await trio.run_process(command, capture_stdout=True)).stdout))

        with trio.fail_after(120):
            async with trio.open_nursery() as readers:
                readers.start_soon(read)
                try:
                    for n in range(2, 1002):
                        put(view, make_key(KEY, str(n).encode() + padding, first_id=n * 10))
                        await until_primary(path, n * 10)
                finally:
                    stop.touch()
        nursery.cancel_scope.cancel()
    assert report["bad"] == [] and report["bad_count"] == 0
    assert report["reads"] > 0
    assert report["versions"] > 1  # the reader saw the file change under it
