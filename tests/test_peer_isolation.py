"""Peer isolation with real processes under other uids: the kernel's credentials decide.

Needs root (to run children as other uids); skipped otherwise.
"""

from __future__ import annotations

import grp
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.test_socket_api import Client, identity, make_key, put, start

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to run client processes under other uids"
)

UID_A = 4242
UID_B = 4343

# A client in a separate process: it starts as root (the interpreter is root's), drops to another
# uid before or after connecting, says hello, sends each request and prints every answer as JSON.
CHILD = r"""
import json, os, socket, struct, sys
import msgpack
path, uid, when, requests = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
def drop():
    if uid >= 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
if when == "before":
    drop()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(path)
if when == "after":
    drop()
def recv_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise SystemExit("closed")
        buf += chunk
    return buf
def call(obj):
    body = msgpack.packb(obj)
    s.sendall(struct.pack(">I", len(body)) + body)
    (n,) = struct.unpack(">I", recv_exact(4))
    return msgpack.unpackb(recv_exact(n), raw=False)
out = [call({"op": "hello", "magic": "knoxd", "v": 1})]
for i, req in enumerate(requests, 1):
    out.append(call({"id": i, **req}))
s.close()
print(json.dumps(out, default=lambda b: b.decode()))
"""


async def run_client(
    path: Path, requests: list[dict[str, object]], *, uid: int = -1, drop_to: int = -1
) -> list[dict[str, object]]:
    with trio.fail_after(20):
        done = await trio.run_process(
            [
                sys.executable,
                "-c",
                CHILD,
                str(path),
                str(uid if uid >= 0 else drop_to),
                "before" if uid >= 0 else "after",
                json.dumps(requests),
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    result: list[dict[str, object]] = json.loads(done.stdout)
    return result


def err(reply: dict[str, object]) -> object:
    assert reply["ok"] is False, reply
    error = reply["error"]
    assert isinstance(error, dict)
    return error["code"]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="knoxd-iso-", dir="/tmp") as d:
        os.chmod(d, 0o755)
        yield Path(d)


IDENTITIES = [
    identity("host", uid=[0]),
    identity("a", uid=[UID_A]),
    identity("b", uid=[UID_B]),
]


async def test_uid_reads_own_identity_only(nursery: trio.Nursery, sock_dir: Path) -> None:
    server = await start(nursery, sock_dir, IDENTITIES)
    put(server.view, "a", make_key("app_a", b"secret-a"))
    put(server.view, "b", make_key("app_b", b"secret-b"))
    hello, own, other_key, other_identity = await run_client(
        server.workload,
        [
            {"op": "get", "key": "app_a"},
            {"op": "get", "key": "app_b"},
            {"op": "get", "key": "app_b", "identity": "b"},
        ],
        uid=UID_A,
    )
    assert hello["identity"] == "a"
    peer = hello["peer"]
    assert isinstance(peer, dict) and (peer["uid"], peer["gid"]) == (UID_A, UID_A)
    assert own["ok"] is True and "secret-a" in json.dumps(own)
    # B's key is not in A's view: it is simply not registered for A, and never B's data.
    assert err(other_key) == "not_registered" and "secret-b" not in json.dumps(other_key)
    assert err(other_identity) == "unauthorized"


async def test_unknown_uid_maps_to_no_identity(nursery: trio.Nursery, sock_dir: Path) -> None:
    server = await start(nursery, sock_dir, IDENTITIES)
    hello, reply = await run_client(server.workload, [{"op": "get", "key": "k"}], uid=5555)
    assert hello["identity"] is None
    assert err(reply) == "unauthorized"
    assert "uid 5555" in json.dumps(reply)


async def test_connect_time_credentials_are_kept(nursery: trio.Nursery, sock_dir: Path) -> None:
    server = await start(nursery, sock_dir, IDENTITIES)
    put(server.view, "host", make_key("root_key", b"root-secret"))
    put(server.view, "a", make_key("app_a", b"secret-a"))
    # Connects as root, then drops to UID_A: still judged as root (host), not as A.
    hello, as_root, as_a = await run_client(
        server.workload,
        [{"op": "get", "key": "root_key"}, {"op": "get", "key": "app_a", "identity": "a"}],
        drop_to=UID_A,
    )
    peer = hello["peer"]
    assert isinstance(peer, dict) and peer["uid"] == 0 and hello["identity"] == "host"
    assert as_root["ok"] is True
    assert err(as_a) == "unauthorized"


async def test_non_admin_refused_every_admin_op(nursery: trio.Nursery, sock_dir: Path) -> None:
    server = await start(nursery, sock_dir, IDENTITIES)
    os.chmod(server.admin, 0o666)
    os.chmod(server.admin.parent, 0o755)
    put(server.view, "a", make_key("app_a", b"secret-a"))
    ops: list[dict[str, object]] = [
        {"op": "status"},
        {"op": "list"},
        {"op": "refresh"},
        {"op": "register", "keys": ["x"], "identity": "a"},
        {"op": "unregister", "keys": ["x"], "identity": "a"},
    ]
    _hello, *replies = await run_client(server.admin, ops, uid=UID_A)
    assert [err(r) for r in replies] == ["unauthorized"] * len(ops)
    assert not server.fetch.refreshed and ("a", "x") not in server.fetch.registered


async def test_admin_socket_mode_and_owner_with_admin_group(
    nursery: trio.Nursery, sock_dir: Path
) -> None:
    group = grp.getgrgid(0).gr_name
    server = await start(nursery, sock_dir, IDENTITIES, admin_group=group)
    st = server.admin.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o660, 0, 0)
    assert server.admin.parent.stat().st_mode & 0o777 == 0o770
    c = await Client.open(server.admin)
    assert (await c.call("status"))["ok"] is True
    await c.aclose()
