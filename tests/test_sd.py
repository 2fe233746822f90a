"""knoxd under a service manager, without one: a real datagram socket stands in for systemd's
notify socket, and a real parent process binds the sockets and execs knoxd with ``LISTEN_FDS``,
``LISTEN_PID`` and ``LISTEN_FDNAMES``, as systemd does for socket activation.

The helpers that run knoxd so are in ``knoxd_process.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio

from knox.client import AsyncClient, BadRequestError, Client
from knoxd.sd import MAX_STATUS_CHARS, Notifier, status_field, watchdog, watchdog_interval
from tests.knoxd_process import (
    REPO,
    WAIT,
    NotifySocket,
    activated,
    dev_knoxd_config,
    knoxd_argv,
    knoxd_environ,
    knoxd_process,
)

# A client under another uid: it imports first (the interpreter's files may be root's only),
# drops to the uid, then connects; prints the uid and identity knoxd saw.
_OTHER_USER_CLIENT = r"""
import json, os, sys
from knox.client import Client
path, uid = sys.argv[1], int(sys.argv[2])
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
with Client(path, cache=False, timeout=5) as client:
    client.ping()
    hello = client.hello()
print(json.dumps([hello.uid, hello.identity]))
"""


# --- the notifier and the watchdog, in process -----------------------------------------------


async def test_notify_sends_one_datagram_per_call_to_a_path_or_an_abstract_socket(
    tmp_path: Path,
) -> None:
    async with NotifySocket(tmp_path / "notify") as systemd:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(systemd.path)})
        assert notifier.enabled
        assert notifier.notify("READY=1", status_field("serving\n3 keys"))
        assert await systemd.receive() == ["READY=1", "STATUS=serving 3 keys"]
    name = f"knoxd-test-{os.getpid()}-{time.monotonic_ns()}"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        await abstract.bind("\0" + name)
        assert Notifier(f"@{name}").notify("STOPPING=1")
        with trio.fail_after(WAIT):
            assert await abstract.recv(100) == b"STOPPING=1"


async def test_notify_without_a_usable_socket_returns_false_and_never_raises(
    tmp_path: Path,
) -> None:
    assert not Notifier.from_environ({}).notify("READY=1")
    assert not Notifier("relative/path").enabled
    assert not Notifier("vsock:2:1234").enabled
    gone = Notifier(str(tmp_path / "nobody-listens"))
    assert gone.enabled
    assert not gone.notify("WATCHDOG=1")
    assert not gone.notify("WATCHDOG=1")
    with pytest.raises(ValueError, match="not a notification field"):
        gone.notify("READY")
    with pytest.raises(ValueError, match="not a notification field"):
        gone.notify("STATUS=two\nlines")


def test_status_field_is_one_bounded_line() -> None:
    assert status_field("  a\n b\tc ") == "STATUS=a b c"
    long = status_field("x" * 1000)
    assert len(long) == len("STATUS=") + MAX_STATUS_CHARS
    assert long.endswith("…")


def test_watchdog_interval_is_half_the_timeout_for_this_process_only() -> None:
    me = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": me}) == 0.1
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "x"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


async def test_watchdog_pings_stop_while_the_loop_is_blocked_and_resume_after(
    tmp_path: Path,
) -> None:
    interval = 0.02
    async with NotifySocket(tmp_path / "notify") as systemd, trio.open_nursery() as nursery:
        nursery.start_soon(watchdog, Notifier(str(systemd.path)), interval)
        assert await systemd.receive() == ["WATCHDOG=1"]
        assert await systemd.receive() == ["WATCHDOG=1"]
        # Everything sent so far is queued now: this task runs in the same loop as the pinger.
        systemd.drain()
        # A run loop stuck in a synchronous call, for many ping intervals.
        time.sleep(interval * 15)  # noqa: ASYNC251
        with pytest.raises(BlockingIOError):
            systemd.receive_nowait()
        assert await systemd.receive() == ["WATCHDOG=1"]
        nursery.cancel_scope.cancel()


async def test_watchdog_sends_nothing_while_unhealthy(tmp_path: Path) -> None:
    healthy = False
    checks = 0
    judged_often = trio.Event()

    def judge() -> bool:
        nonlocal checks
        checks += 1
        if checks == 5:
            judged_often.set()
        return healthy

    async with NotifySocket(tmp_path / "notify") as systemd, trio.open_nursery() as nursery:
        nursery.start_soon(lambda: watchdog(Notifier(str(systemd.path)), 0.01, healthy=judge))
        with trio.fail_after(WAIT):
            await judged_often.wait()
        with pytest.raises(BlockingIOError):
            systemd.receive_nowait()
        healthy = True
        assert await systemd.receive() == ["WATCHDOG=1"]
        nursery.cancel_scope.cancel()


# --- knoxd as systemd runs it ----------------------------------------------------------------


async def _status_over(path: Path) -> dict[str, object]:
    def call() -> dict[str, object]:
        with Client(path, cache=False, timeout=5) as client:
            return client.status()

    return await trio.to_thread.run_sync(call)


async def test_socket_activated_knoxd_serves_the_passed_sockets_by_name_and_notifies_in_order(
    tmp_path: Path,
) -> None:
    config = dev_knoxd_config(tmp_path / "dev", sockets=tmp_path / "own")
    passed = tmp_path / "passed"
    passed.mkdir()
    admin, workload = passed / "admin.sock", passed / "work.sock"
    log = tmp_path / "knoxd.log"
    async with NotifySocket(tmp_path / "notify") as systemd:
        env = knoxd_environ(NOTIFY_SOCKET=str(systemd.path), WATCHDOG_USEC="100000")
        # The admin socket first: knoxd must go by the names, not the order.
        argv = activated("admin:workload", [admin, workload], knoxd_argv(config))
        async with knoxd_process(argv, log, env) as knoxd:
            ready = await systemd.ready(knoxd, log)
            assert ready[0] == "READY=1"
            assert ready[1].startswith("STATUS=serving 0 cached keys for 2 identities; upstream ")
            await systemd.until("WATCHDOG=1")

            async with AsyncClient(workload, cache=False, timeout=5) as client:
                await client.ping()
            with pytest.raises(BadRequestError):
                await _status_over(workload)
            status = await _status_over(admin)
            assert status["cache"] == {"entries": 0, "stale": 0, "oldest_age_ms": 0}
            # knoxd bound nothing of its own.
            assert not (tmp_path / "own").exists()

            knoxd.send_signal(signal.SIGTERM)
            stopping = await systemd.until("STOPPING=1")
            with trio.fail_after(WAIT):
                assert await knoxd.wait() == 0, log.read_text()
        systemd.drain()
    assert stopping == ["STOPPING=1", "STATUS=stopping"]
    # READY first, STOPPING last; between them only pings and changed summaries.
    first, *between, last = systemd.messages
    assert first == ready and last == stopping
    assert ["WATCHDOG=1"] in between
    assert all(m == ["WATCHDOG=1"] or m[0].startswith("STATUS=serving ") for m in between)
    # The activated sockets stay (systemd owns them); knoxd never touched the paths.
    assert admin.exists() and workload.exists()


async def test_a_passed_socket_of_the_wrong_kind_fails_the_start_with_a_status(
    tmp_path: Path,
) -> None:
    config = dev_knoxd_config(tmp_path / "dev", sockets=tmp_path / "own")
    log = tmp_path / "knoxd.log"
    async with NotifySocket(tmp_path / "notify") as systemd:
        env = knoxd_environ(NOTIFY_SOCKET=str(systemd.path))
        argv = activated("workload", ["-"], knoxd_argv(config))
        async with knoxd_process(argv, log, env) as knoxd:
            status = await systemd.receive()
            with trio.fail_after(WAIT):
                assert await knoxd.wait() == 1
    assert status == ["STATUS=cannot start: systemd passed fd 3, which is not a Unix stream socket"]
    assert "not a Unix stream socket" in log.read_text()
    assert not (tmp_path / "own").exists()


async def test_knoxd_with_an_unusable_config_says_why_in_its_status(tmp_path: Path) -> None:
    config = tmp_path / "knoxd.toml"
    config.write_text("[daemon]\nnope = 1\n")
    async with NotifySocket(tmp_path / "notify") as systemd:
        env = knoxd_environ(NOTIFY_SOCKET=str(systemd.path))
        async with knoxd_process(knoxd_argv(config), tmp_path / "knoxd.log", env) as knoxd:
            (status,) = await systemd.receive()
            with trio.fail_after(WAIT):
                assert await knoxd.wait() == 2
    assert status.startswith("STATUS=unusable configuration: ")
    assert "nope" in status


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client under another uid")
async def test_knoxd_without_capabilities_still_checks_peers_of_other_users() -> None:
    nobody = 65534
    with tempfile.TemporaryDirectory(prefix="knoxd-caps-", dir="/tmp") as d:
        top = Path(d)
        os.chmod(top, 0o755)
        config = dev_knoxd_config(top / "dev", sockets=top / "own")
        workload, admin, log = top / "work.sock", top / "admin.sock", top / "log"
        async with NotifySocket(top / "notify") as systemd:
            env = knoxd_environ(NOTIFY_SOCKET=str(systemd.path), ACTIVATOR_NO_CAPS="1")
            argv = activated("workload:admin", [workload, admin], knoxd_argv(config))
            async with knoxd_process(argv, log, env) as knoxd:
                await systemd.ready(knoxd, log)
                status = Path(f"/proc/{knoxd.pid}/status").read_text()
                for field in ("CapEff", "CapPrm", "CapBnd"):
                    assert f"{field}:\t0000000000000000" in status
                # Its credentials, and whether it is still alive (signal 0 through its pidfd
                # answers EPERM, not ESRCH), are read with no privilege over the peer.
                client = await trio.run_process(
                    [sys.executable, "-c", _OTHER_USER_CLIENT, str(workload), str(nobody)],
                    capture_stdout=True,
                    capture_stderr=True,
                    cwd=REPO,
                    check=False,
                )
                assert client.returncode == 0, client.stderr.decode()
                assert json.loads(client.stdout) == [nobody, None]
                knoxd.send_signal(signal.SIGTERM)
                with trio.fail_after(WAIT):
                    assert await knoxd.wait() == 0, log.read_text()
