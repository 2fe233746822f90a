"""knoxctl: argument handling, settings, exit codes and messages; then end to end against a served
knox_server (in-process through ``main`` and as a real ``python -m knoxctl`` process)."""

from __future__ import annotations

import functools
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from knox import wire
from knox_server.dev import DEV_SPIFFE_ID
from knoxctl.cli import build_parser, main
from tests.pki import CA
from tests.server_fixtures import DevServer, dev_server
from tests.test_http_client import JSON, Script, error_body, scripted_server

WAIT = 30


@dataclass
class Result:
    status: int
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode()


def run(argv: Sequence[str], env: Mapping[str, str] | None = None, stdin: bytes = b"") -> Result:
    out = io.BytesIO()
    err = io.StringIO()
    status = main(list(argv), env=dict(env or {}), stdin=io.BytesIO(stdin), stdout=out, stderr=err)
    return Result(status, out.getvalue(), err.getvalue())


async def arun(
    argv: Sequence[str], env: Mapping[str, str] | None = None, stdin: bytes = b""
) -> Result:
    """``run`` in a worker thread, for tests that serve something on this trio loop."""
    with trio.fail_after(WAIT):
        return await trio.to_thread.run_sync(functools.partial(run, argv, env, stdin))


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def assert_one_line(text: str) -> None:
    assert text.endswith("\n") and text.count("\n") == 1, text
    assert "Traceback" not in text


# --- usage (exit 2) --------------------------------------------------------------------------


def test_help_lists_knox_commands() -> None:
    result = run(["--help"])
    assert result.status == 0
    for name in ("keys", "get", "versions", "acl", "promote", "create", "add", "deactivate",
                 "reactivate", "access", "delete"):  # fmt: skip
        assert f"    {name} " in result.text
    assert result.err == ""


def test_version() -> None:
    result = run(["--version"])
    assert (result.status, result.text) == (0, "knoxctl 0.1.0\n")


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        ([], "required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["get"], "required: KEY"),
        (["get", "k", "extra"], "unrecognized arguments: extra"),
        (["versions", "-s", "bogus", "k"], "invalid choice: 'bogus'"),
        (["access", "-r", "-w", "-U", "k", "bob"], "not allowed with argument"),
        (["--timeout", "soon", "keys"], "invalid float value"),
        (["--serv=x", "keys"], "unrecognized arguments: --serv=x"),
    ],
)
def test_bad_command_lines_exit_2_with_usage(argv: list[str], complaint: str) -> None:
    result = run(argv)
    assert result.status == 2
    assert "usage: knoxctl" in result.err
    assert complaint in result.err
    assert result.out == b""


AUTH = {"KNOX_SERVER": "127.0.0.1:1", "KNOX_USER_AUTH": "tok"}


@pytest.mark.parametrize(
    ("argv", "env", "complaint"),
    [
        (["get", "k"], {}, "no Knox server given"),
        (["--cert", "c.pem", "get", "k"], AUTH, "needs both --cert and --key"),
        (["get", "k"], {**AUTH, "KNOX_KEY": "k.pem"}, "needs both --cert and --key"),
        (["--timeout", "0", "get", "k"], AUTH, "--timeout must be a positive"),
        (["--timeout", "nan", "get", "k"], AUTH, "--timeout must be a positive"),
        (["--server", "ftp://h", "get", "k"], AUTH, "not an http(s) base URL"),
        (["promote", "k", "12x"], AUTH, "not a version id: '12x'"),
        (["get", "-v", "-1", "k"], {**AUTH, "KNOX_SERVER": closed_port()}, "not a version id"),
        (["access", "-U", "k", "bob"], AUTH, "one of -n, -r, -w, -a"),
        (["access", "-r", "k", "bob"], AUTH, "one of -M, -U, -G, -P, -S, -N"),
        (["access", "-r", "-U", "k"], AUTH, "takes KEY and PRINCIPAL"),
        (["access", "--acl", "f.json", "-r", "k"], AUTH, "--acl takes only KEY"),
    ],
)
def test_bad_settings_exit_2(argv: list[str], env: dict[str, str], complaint: str) -> None:
    result = run(argv, env)
    assert result.status == 2, result
    assert complaint in result.err
    assert "Traceback" not in result.err


def test_global_key_option_does_not_clash_with_the_key_argument() -> None:
    args = build_parser()[0].parse_args(["--key", "client.key", "get", "svc:k"])
    assert (args.client_key, args.key) == (Path("client.key"), "svc:k")


# --- local failures (exit 1) -----------------------------------------------------------------


def test_no_credentials_is_knoxs_no_auth_error() -> None:
    result = run(["get", "k"], {"KNOX_SERVER": "127.0.0.1:1", "KNOX_USER_AUTH": "  "})
    assert result.status == 1
    assert result.err.startswith("No authentication data given.")
    assert_one_line(result.err)


@pytest.mark.parametrize("variable", ["KNOX_MACHINE_AUTH", "KNOX_SERVICE_AUTH"])
def test_certificate_auth_needs_a_certificate(variable: str) -> None:
    result = run(["keys"], {"KNOX_SERVER": "127.0.0.1:1", variable: "web1.example.com"})
    assert result.status == 1
    assert f"{variable} authenticates with a client certificate" in result.err


def test_token_file_problems_never_echo_the_file(tmp_path: Path) -> None:
    server = {"KNOX_SERVER": "127.0.0.1:1"}
    missing = run(["--token-file", str(tmp_path / "none"), "keys"], server)
    assert missing.status == 1
    assert "cannot read token file" in missing.err
    bad = tmp_path / "bad.token"
    bad.write_text("sekrit value with spaces\n")
    result = run(["--token-file", str(bad), "keys"], server)
    assert result.status == 1
    assert "does not hold a token" in result.err
    assert "sekrit" not in result.err


def test_header_breaking_credentials_are_refused() -> None:
    result = run(["keys"], {"KNOX_SERVER": "127.0.0.1:1", "KNOX_USER_AUTH": "a\r\nX-Evil: 1"})
    assert result.status == 1
    assert "KNOX_USER_AUTH holds characters not allowed" in result.err
    assert "Evil" not in result.err


def test_unreadable_tls_files_are_named(tmp_path: Path) -> None:
    result = run(["--ca", str(tmp_path / "nope.pem"), "keys"], AUTH)
    assert result.status == 1
    assert f"cannot load TLS files ({tmp_path / 'nope.pem'})" in result.err
    assert_one_line(result.err)


def test_mismatched_client_key_is_refused_without_showing_it(tmp_path: Path) -> None:
    ca = CA.create()
    cert, _ = ca.machine_cert("a.example.com").write(tmp_path, "a")
    _, other_key = ca.machine_cert("b.example.com").write(tmp_path, "b")
    env = {"KNOX_SERVER": "127.0.0.1:1", "KNOX_MACHINE_AUTH": "a.example.com"}
    result = run(["--cert", str(cert), "--key", str(other_key), "keys"], env)
    assert result.status == 1
    assert "cannot load TLS files" in result.err
    assert "PRIVATE KEY" not in result.err


def test_unreachable_server_is_one_line() -> None:
    result = run(["get", "k"], {"KNOX_SERVER": closed_port(), "KNOX_USER_AUTH": "tok"})
    assert result.status == 1
    assert result.err.startswith("Error getting key: no Knox server answered GET /v0/keys/k/")
    assert_one_line(result.err)
    assert "tok" not in result.err.replace("/v0/keys", "")


def test_invalid_key_id_is_refused_locally() -> None:
    result = run(["get", "../admin"], {"KNOX_SERVER": closed_port(), "KNOX_USER_AUTH": "tok"})
    assert result.status == 1
    assert result.err == (
        "Error getting key: KeyID can only contain alphanumeric characters, colons, "
        "and underscores.\n"
    )


def test_oversized_stdin_is_refused() -> None:
    from knoxctl.keys import MAX_DATA_BYTES

    result = run(["create", "k"], AUTH, stdin=b"x" * (MAX_DATA_BYTES + 1))
    assert result.status == 1
    assert "exceeds" in result.err


def test_bad_acl_file(tmp_path: Path) -> None:
    acl = tmp_path / "acl.json"
    acl.write_text('[{"type": "User", "id": "bob"}]')
    result = run(["access", "--acl", str(acl), "k"], AUTH)
    assert result.status == 1
    assert result.err.startswith("Could not decode access list properly:")
    acl.write_text('[{"type": "Robot", "id": "r2", "access": "Read"}]')
    result = run(["access", "-acl", str(acl), "k"], AUTH)
    assert "unknown principal type" in result.err


async def test_server_messages_cannot_forge_lines_or_drive_the_terminal(tmp_path: Path) -> None:
    evil = "No such key k\n\x1b[31mroot password: hunter2"
    script = Script([(404, error_body(4, evil), JSON)])
    async with scripted_server(script, tmp_path) as srv:
        env = {"KNOX_SERVER": srv.url, "KNOX_CA": str(srv.ca_path), "KNOX_USER_AUTH": "tok"}
        result = await arun(["get", "k"], env)
    assert result.status == 1
    assert_one_line(result.err)
    assert "\x1b" not in result.err
    assert result.err.startswith("Error getting key: No such key k\\n\\x1b[31m")


async def test_versions_verbose_prints_json_quoted_status(tmp_path: Path) -> None:
    key = {
        "id": "k",
        "acl": [],
        "versions": [
            {"id": 5, "data": "YQ==", "status": "Primary", "ts": 1},
            {"id": 7, "data": "Yg==", "status": "Active", "ts": 2},
        ],
        "hash": "h" * 64,
    }
    script = Script([(200, wire.ok_envelope(key, host="h", ts=1), JSON)])
    async with scripted_server(script, tmp_path) as srv:
        env = {"KNOX_SERVER": srv.url, "KNOX_CA": str(srv.ca_path), "KNOX_USER_AUTH": "tok"}
        plain = await arun(["versions", "k"], env)
        verbose = await arun(["versions", "-v", "k"], env)
    assert plain.text == "5\n7\n"
    assert verbose.text == '5 "Primary"\n7 "Active"\n'
    assert script.seen[0].target == "/v0/keys/k/?status=%22Active%22"


# --- end to end against knox_server ----------------------------------------------------------


def admin_env(srv: DevServer) -> dict[str, str]:
    return {"KNOX_SERVER": srv.url, "KNOX_CA": str(srv.ca), "KNOX_USER_AUTH": srv.admin_token}


async def test_key_lifecycle_end_to_end(tmp_path: Path) -> None:
    async with dev_server(tmp_path / "srv") as srv:
        env = admin_env(srv)
        created = await arun(["create", "app:api_token"], env, stdin=b"first\x00secret")
        assert created.status == 0, created
        assert created.text.startswith("Created key with initial version ")
        first = int(created.text.split()[-1])
        assert created.err == ""

        got = await arun(["get", "app:api_token"], env)
        assert (got.status, got.out) == (0, b"first\x00secret")

        added = await arun(["add", "app:api_token"], env, stdin=b"second")
        assert added.text.startswith("Added key version ")
        second = int(added.text.split()[-1])

        versions = await arun(["versions", "-v", "app:api_token"], env)
        assert sorted(versions.text.splitlines()) == sorted(
            [f'{first} "Primary"', f'{second} "Active"']
        )

        promoted = await arun(["promote", "app:api_token", str(second)], env)
        assert promoted.text == f"Promoted {second} successfully.\n"
        assert (await arun(["get", "app:api_token"], env)).out == b"second"

        deactivated = await arun(["deactivate", "app:api_token", str(first)], env)
        assert deactivated.text == f"Deactivated {first} successfully.\n"
        active = await arun(["versions", "app:api_token"], env)
        assert active.text == f"{second}\n"
        inactive = await arun(["versions", "-s", "INACTIVE", "app:api_token"], env)
        assert sorted(inactive.text.split()) == sorted([str(first), str(second)])
        primary = await arun(["versions", "-s", "primary", "app:api_token"], env)
        assert primary.text == f"{second}\n"
        old = await arun(["get", "-v", str(first), "app:api_token"], env)
        assert old.out == b"first\x00secret"

        as_json = await arun(["get", "-j", "app:api_token"], env)
        key = wire.decode_key(as_json.out)
        assert [v.id for v in key.versions] == [second]
        every = wire.decode_key((await arun(["get", "-j", "-a", "app:api_token"], env)).out)
        assert {v.id for v in every.versions} == {first, second}

        reactivated = await arun(["reactivate", "app:api_token", str(first)], env)
        assert reactivated.text == f"Reactivated {first} successfully.\n"

        access = await arun(["access", "-r", "-M", "app:api_token", srv.hostname], env)
        assert access.text == "Successfully updated Access\n"
        acl_lines = (await arun(["acl", "app:api_token"], env)).text.splitlines()
        entries = [json.loads(line) for line in acl_lines]
        assert {"type": "Machine", "id": srv.hostname, "access": "Read"} in entries
        assert {"type": "User", "id": "admin", "access": "Admin"} in entries
        as_array = await arun(["acl", "--json", "app:api_token"], env)
        assert json.loads(as_array.text) == entries

        keys = await arun(["keys"], env)
        assert keys.text == "app:api_token\n"
        subset = await arun(["keys", "app:api_token", "ghost"], env)
        assert subset.text == "app:api_token\n"

        deleted = await arun(["delete", "app:api_token"], env)
        assert deleted.text == "Successfully deleted key\n"
        assert (await arun(["keys"], env)).text == ""


async def test_server_errors_exit_1_with_the_servers_message(tmp_path: Path) -> None:
    async with dev_server(tmp_path / "srv") as srv:
        env = admin_env(srv)
        missing = await arun(["get", "nope"], env)
        assert (missing.status, missing.out) == (1, b"")
        assert missing.err == "Error getting key: No such key nope\n"

        assert (await arun(["create", "k"], env, stdin=b"v")).status == 0
        exists = await arun(["create", "k"], env, stdin=b"v")
        assert exists.status == 1
        assert exists.err.startswith("Error creating key: ")
        assert "k" in exists.err
        assert_one_line(exists.err)

        dev = {**env, "KNOX_USER_AUTH": srv.dev_token}
        denied = await arun(["delete", "k"], dev)
        assert denied.status == 1
        assert denied.err.startswith("Error deleting key: ")
        assert "dev" in denied.err

        bad = await arun(["promote", "k", "12345"], env)
        assert bad.status == 1
        assert bad.err == "Error promoting version: Key version not found\n"

        version = (await arun(["versions", "k"], env)).text.strip()
        no_version = await arun(["get", "-v", str(int(version) + 1), "k"], env)
        assert (no_version.status, no_version.err) == (1, "Key version not found.\n")

        principal = await arun(["access", "-r", "-S", "k", "not-a-spiffe-id"], env)
        assert principal.status == 1
        assert principal.err.startswith("Failed to update access: ")

        unauthenticated = await arun(["keys"], {**env, "KNOX_USER_AUTH": "wrong"})
        assert unauthenticated.status == 1
        assert unauthenticated.err.startswith("Error getting keys: ")
        assert "wrong" not in unauthenticated.err


async def test_token_file_machine_and_service_auth(tmp_path: Path) -> None:
    async with dev_server(tmp_path / "srv") as srv:
        server = {"KNOX_SERVER": srv.url, "KNOX_CA": str(srv.ca)}
        admin_token = srv.state_dir / "admin.token"
        # --token-file wins over a (wrong) token in the environment.
        created = await arun(
            ["--token-file", str(admin_token), "create", "shared"],
            {**server, "KNOX_USER_AUTH": "wrong"},
            stdin=b"for hosts",
        )
        assert created.status == 0, created
        for flag, principal in (("-M", srv.hostname), ("-S", DEV_SPIFFE_ID)):
            granted = await arun(
                ["--token-file", str(admin_token), "access", "-r", flag, "shared", principal],
                server,
            )
            assert granted.status == 0, granted

        cert, key = srv.host_cert
        machine = await arun(
            ["--cert", str(cert), "--key", str(key), "get", "shared"],
            {**server, "KNOX_MACHINE_AUTH": srv.hostname},
        )
        assert (machine.status, machine.out) == (0, b"for hosts")

        cert, key = srv.service_cert
        service = await arun(
            ["get", "shared"],
            {**server, "KNOX_SERVICE_AUTH": "x", "KNOX_CERT": str(cert), "KNOX_KEY": str(key)},
        )
        assert (service.status, service.out) == (0, b"for hosts")


async def test_access_from_an_acl_file(tmp_path: Path) -> None:
    async with dev_server(tmp_path / "srv") as srv:
        env = admin_env(srv)
        assert (await arun(["create", "k"], env, stdin=b"v")).status == 0
        acl_file = tmp_path / "acl.json"
        acl_file.write_text(
            json.dumps(
                [
                    {"type": "UserGroup", "id": "ops", "access": "Write"},
                    {"type": "MachinePrefix", "id": "web", "access": "Read"},
                ]
            )
        )
        result = await arun(["access", "-acl", str(acl_file), "k"], env)
        assert result.text == "Successfully updated Access\n"
        acl = (await arun(["acl", "k"], env)).text
        assert '{"type":"UserGroup","id":"ops","access":"Write"}' in acl
        assert '{"type":"MachinePrefix","id":"web","access":"Read"}' in acl


async def test_python_dash_m_knoxctl_as_a_real_process(tmp_path: Path) -> None:
    async with dev_server(tmp_path / "srv") as srv:
        env = {**os.environ, **admin_env(srv)}
        with trio.fail_after(WAIT):
            created = await trio.run_process(
                [sys.executable, "-m", "knoxctl", "create", "proc:key"],
                stdin=b"piped data",
                capture_stdout=True,
                capture_stderr=True,
                env=env,
            )
            got = await trio.run_process(
                [sys.executable, "-m", "knoxctl", "get", "proc:key"],
                capture_stdout=True,
                capture_stderr=True,
                env=env,
            )
            missing = await trio.run_process(
                [sys.executable, "-m", "knoxctl", "get", "proc:none"],
                capture_stdout=True,
                capture_stderr=True,
                env=env,
                check=False,
            )
            usage = await trio.run_process(
                [sys.executable, "-m", "knoxctl", "versions"],
                capture_stdout=True,
                capture_stderr=True,
                env=env,
                check=False,
                stdin=subprocess.DEVNULL,
            )
    assert created.stdout.startswith(b"Created key with initial version ")
    assert created.stderr == b""
    assert (got.stdout, got.stderr) == (b"piped data", b"")
    assert missing.returncode == 1
    assert missing.stderr == b"Error getting key: No such key proc:none\n"
    assert usage.returncode == 2
    assert b"usage: knoxctl versions" in usage.stderr
    for result in (created, got, missing, usage):
        assert b"Traceback" not in result.stderr
