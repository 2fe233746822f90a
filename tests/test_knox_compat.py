"""``knox`` (knoxctl.knox_compat) against the real knoxd socket server (see tests/test_client.py):
the commands Knox's boot scripts and Knox's Go file client run."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from knox.wire import decode_key
from knoxctl.knox_compat import FlagError, main, parse_duration, parse_flags
from knoxd.fetch import Refusal
from tests.test_client import Daemon, make_key, wait_until


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    d.start()
    yield d
    d.stop()


def knox(daemon: Daemon, *argv: str, export_dir: Path | None = None) -> tuple[int, bytes, str]:
    out, err = io.BytesIO(), io.StringIO()
    env = {"KNOXD_SOCKET": str(daemon.workload)}
    if export_dir is not None:
        env["KNOX_EXPORT_DIR"] = str(export_dir)
    code = main(list(argv), env=env, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# --- pure parsing -------------------------------------------------------------------------------


def test_flags_parse_like_gos_flag_package() -> None:
    bools, values = frozenset({"g"}), frozenset({"k", "t"})
    assert parse_flags(["-g", "-k", "a:b", "x"], bools=bools, values=values) == (
        {"g": True, "k": "a:b"},
        ["x"],
    )
    assert parse_flags(["--k=a:b", "-t=2s", "-g=false"], bools=bools, values=values) == (
        {"k": "a:b", "t": "2s", "g": False},
        [],
    )
    # Flags stop at the first positional argument or at "--".
    assert parse_flags(["id", "-g"], bools=bools, values=values) == ({}, ["id", "-g"])
    assert parse_flags(["--", "-g"], bools=bools, values=values) == ({}, ["-g"])
    for args, message in (
        (["-x"], "flag provided but not defined: -x"),
        (["-k"], "flag needs an argument: -k"),
        (["---k"], "bad flag syntax: ---k"),
        (["-g=maybe"], 'invalid boolean value "maybe" for -g'),
    ):
        with pytest.raises(FlagError, match=message):
            parse_flags(args, bools=bools, values=values)


def test_timeouts_are_seconds_or_go_durations() -> None:
    assert parse_duration("5") == 5.0
    assert parse_duration("5s") == 5.0
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("1500ms") == 1.5
    assert parse_duration(".5h") == 1800.0
    assert parse_duration("0") == 0.0
    assert parse_duration("-3") == 0.0
    for bad in ("", "5x", "s", "1.5", "5s3", "five"):
        with pytest.raises(FlagError, match="for flag -t"):
            parse_duration(bad)


# --- against knoxd ------------------------------------------------------------------------------


def test_register_g_waits_for_the_first_fetch_and_prints_knox_json(daemon: Daemon) -> None:
    def fetch_when_registered() -> None:
        wait_until(lambda: daemon.fetch.is_registered("host", "web:db"))
        daemon.put(make_key("web:db", b"s3cret", b"older"))

    fetcher = threading.Thread(target=fetch_when_registered)
    fetcher.start()
    try:
        code, out, err = knox(daemon, "register", "-g", "-k", "web:db")
    finally:
        fetcher.join(10)
    assert (code, err) == (0, "")
    # What Knox's file client parses: the key JSON, no newline, no path without an export file.
    assert not out.endswith(b"\n")
    obj = json.loads(out)
    assert list(obj) == ["id", "acl", "versions", "hash"] and obj["acl"] == []
    key = decode_key(out)
    assert key.primary.data == b"s3cret" and [v.data for v in key.versions] == [b"s3cret", b"older"]


def test_register_g_names_the_export_file_when_there_is_one(daemon: Daemon, tmp_path: Path) -> None:
    daemon.put(make_key("web:db", b"s3cret"))
    export = tmp_path / "knox"
    (export / "v0" / "keys").mkdir(parents=True)
    (export / "v0" / "keys" / "web:db").write_bytes(b"{}")
    code, out, _ = knox(daemon, "register", "-k", "web:db", "-g", export_dir=export)
    assert code == 0 and json.loads(out)["path"] == str(export / "v0" / "keys" / "web:db")


def test_register_without_g_only_registers(daemon: Daemon) -> None:
    code, out, err = knox(daemon, "register", "-k", "web:db")
    assert (code, out) == (0, b"") and "Successfully registered keys [web:db]" in err
    assert daemon.fetch.is_registered("host", "web:db")
    assert knox(daemon, "unregister", "web:db") == (0, b"", "Unregistered key successfully\n")
    assert not daemon.fetch.is_registered("host", "web:db")


def test_register_g_gives_up_after_the_timeout_or_at_a_refusal(daemon: Daemon) -> None:
    code, out, err = knox(daemon, "register", "-g", "-t", "300ms", "-k", "never:fetched")
    assert (code, out) == (1, b"")
    assert err.startswith("knox: Error getting key from daemon (hit timeout after 0.3s)")
    assert "first fetch is not done" in err and err.count("\n") == 1
    daemon.fetch.refusals["host", "no:access"] = Refusal.FORBIDDEN
    code, out, err = knox(daemon, "register", "-g", "-t", "30", "-k", "no:access")
    assert (code, out) == (1, b"") and "refused this identity the key" in err


def test_get_prints_raw_data_json_or_a_version(daemon: Daemon) -> None:
    daemon.put(make_key("web:db", b"s3cret\n", b"older"))
    assert knox(daemon, "get", "web:db") == (0, b"s3cret\n", "")
    code, out, _ = knox(daemon, "get", "-j", "web:db")
    assert code == 0 and decode_key(out).primary.data == b"s3cret\n"
    assert knox(daemon, "get", "-v", "2", "web:db") == (0, b"older", "")
    code, out, err = knox(daemon, "get", "-v", "99", "web:db")
    assert (code, out) == (1, b"") and "not cached" in err


def test_usage_errors_exit_2_and_failures_exit_1(daemon: Daemon, tmp_path: Path) -> None:
    assert knox(daemon)[0] == 2
    assert knox(daemon, "create", "x")[0] == 2
    code, _, err = knox(daemon, "get", "-n", "web:db")
    assert code == 2 and "flag provided but not defined: -n" in err
    assert knox(daemon, "get")[0] == 2
    assert knox(daemon, "register", "-t", "soon", "-k", "a")[0] == 2
    code, _, err = knox(daemon, "register")
    assert code == 1 and "You must include a key" in err
    code, _, err = knox(daemon, "get", "bad/id")
    assert code == 1 and "not a valid key id" in err
    code, out, err = knox(daemon, "help")
    assert code == 0 and b"register -k ID" in out
    out_stream, err_stream = io.BytesIO(), io.StringIO()
    env = {"KNOXD_SOCKET": str(tmp_path / "none.sock")}
    code = main(["get", "web:db"], env=env, stdout=out_stream, stderr=err_stream)
    assert code == 1 and err_stream.getvalue().startswith("knox: ")


def test_as_knoxs_file_client_runs_it(daemon: Daemon) -> None:
    # knox.NewFileClient: exec `knox register -g -k ID`, stdout is the key, stderr separate.
    daemon.put(make_key("web:db", b"s3cret"))
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from knoxctl.knox_compat import main; sys.exit(main())",
            "register",
            "-g",
            "-k",
            "web:db",
        ],
        env={"KNOXD_SOCKET": str(daemon.workload), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, b"")
    assert decode_key(done.stdout).primary.data == b"s3cret"
