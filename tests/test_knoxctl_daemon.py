"""knoxctl's daemon commands against the real knoxd socket server (see tests/test_client.py)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from knoxctl import cli, daemon_cmds, keys
from tests.test_client import Daemon, make_key


@pytest.fixture(autouse=True)
def with_daemon_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    if daemon_cmds.register not in cli.COMMAND_SETS:
        monkeypatch.setattr(cli, "COMMAND_SETS", (keys.register, daemon_cmds.register))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    d.start()
    yield d
    d.stop()


def run(daemon: Daemon | None, *argv: str) -> tuple[int, bytes, str]:
    out, err = io.BytesIO(), io.StringIO()
    env = {}
    if daemon is not None:
        env = {"KNOXD_SOCKET": str(daemon.workload), "KNOXD_ADMIN_SOCKET": str(daemon.admin)}
    code = cli.main(list(argv), env=env, stdin=io.BytesIO(), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_get_daemon_prints_raw_primary(daemon: Daemon) -> None:
    daemon.put(make_key("db:pw", b"s3cret", b"old"))
    assert run(daemon, "get", "--daemon", "db:pw") == (0, b"s3cret", "")
    assert run(daemon, "get", "--daemon", "-v", "2", "db:pw")[:2] == (0, b"old")
    assert run(daemon, "get", "--daemon", "-v", "1", "db:pw")[:2] == (0, b"s3cret")
    code, out, err = run(daemon, "get", "--daemon", "--wait", "0", "no:key")
    assert (code, out) == (1, b"") and "not registered" in err


def test_cache_ls_and_show_never_print_data(daemon: Daemon) -> None:
    daemon.put(make_key("db:pw", b"s3cret"))
    code, out, err = run(daemon, "cache", "ls")
    text = out.decode()
    assert code == 0 and err == ""
    assert text.splitlines()[0].split() == [
        "KEY",
        "IDENTITY",
        "PRIMARY",
        "AGE",
        "STALE",
        "LAST",
        "ERROR",
    ]
    assert "db:pw" in text and "host" in text and "s3cret" not in text
    code, out, _ = run(daemon, "cache", "ls", "--json")
    entries = json.loads(out)
    assert code == 0 and entries[0]["key_id"] == "db:pw"
    code, out, _ = run(daemon, "cache", "show", "db:pw")
    assert code == 0 and b"identity:   host" in out and b"s3cret" not in out
    code, _, err = run(daemon, "cache", "show", "no:key")
    assert code == 1 and "not in knoxd's cache" in err


def test_status_register_unregister_refresh(daemon: Daemon) -> None:
    code, out, _ = run(daemon, "status")
    assert code == 0 and b"knoxd test" in out and b"host" in out
    code, out, _ = run(daemon, "status", "--json")
    assert code == 0 and json.loads(out)["version"] == "test"
    assert run(daemon, "register", "a:b", "c:d")[:2] == (0, b"registered a:b\nregistered c:d\n")
    assert daemon.fetch.is_registered("host", "c:d")
    code, out, _ = run(daemon, "register", "--identity", "other", "x:y")
    assert code == 0 and daemon.fetch.is_registered("other", "x:y")
    assert run(daemon, "unregister", "a:b")[:2] == (0, b"unregistered a:b\n")
    code, out, _ = run(daemon, "refresh", "c:d")
    assert code == 0 and out == b"queued 1 key for refresh\n"
    assert daemon.fetch.refreshes[-1][1] == ("c:d",)


def test_daemon_not_running_is_one_line_exit_1(tmp_path: Path) -> None:
    code, out, err = run(None, "--admin-socket", str(tmp_path / "none.sock"), "status")
    assert code == 1 and out == b""
    assert err.count("\n") == 1 and "is knoxd running" in err


def test_usage_errors_exit_2(daemon: Daemon) -> None:
    assert run(daemon, "register")[0] == 2
    assert run(daemon, "cache")[0] == 2
