"""`knox-server dev` end to end: the child process serves, and a user creates and reads a key."""

from __future__ import annotations

import base64
import json
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from tests.server_fixtures import dev_server, dev_server_process


async def _create_and_read(url: str, ca: Path, token: str) -> dict[str, object]:
    ctx = ssl.create_default_context(cafile=str(ca))
    auth = {"Authorization": "0u" + token}
    async with httpx.AsyncClient(verify=ctx, timeout=10) as client:
        created = await client.post(
            url + "/v0/keys/",
            data={"id": "demo:db_password", "data": base64.b64encode(b"hunter2").decode()},
            headers=auth,
        )
        assert created.status_code == 200, created.text
        got = await client.get(url + "/v0/keys/demo:db_password/", headers=auth)
    body: dict[str, object] = got.json()
    return body


async def test_dev_process_serves_and_restarts_with_the_same_state(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with dev_server_process(tmp_path / "dev") as server:
            body = await _create_and_read(server.url, server.ca, server.admin_token)
        data = body["data"]
        assert isinstance(data, dict)
        assert base64.b64decode(data["versions"][0]["data"]) == b"hunter2"
        assert data["acl"] == []
        # A second run reuses the PKI, tokens, master key and database: the key is still there.
        async with dev_server_process(tmp_path / "dev") as again:
            assert again.admin_token == server.admin_token
            ctx = ssl.create_default_context(cafile=str(again.ca))
            async with httpx.AsyncClient(verify=ctx, timeout=10) as client:
                got = await client.get(
                    again.url + "/v0/keys/demo:db_password/",
                    headers={"Authorization": "0u" + again.admin_token},
                )
            assert got.json()["code"] == 0
    info = json.loads((tmp_path / "dev" / "dev.json").read_text())
    assert info["url"] == again.url


async def test_in_process_dev_server_denies_the_dev_user_by_default(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with dev_server(tmp_path / "dev") as server:
            await _create_and_read(server.url, server.ca, server.admin_token)
            ctx = ssl.create_default_context(cafile=str(server.ca))
            async with httpx.AsyncClient(verify=ctx, timeout=10) as client:
                denied = await client.get(
                    server.url + "/v0/keys/demo:db_password/",
                    headers={"Authorization": "0u" + server.dev_token},
                )
    assert denied.status_code == 403
    assert denied.json()["message"] == "Principal dev not authorized to read demo:db_password"


def test_port_in_use_is_one_line_error_not_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "knox_server.cli", "dev", "--state-dir", str(tmp_path)]
        result = subprocess.run(
            [*command, "--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert b"knox-server: [Errno 98] Address already in use" in result.stderr
    assert b"Traceback" not in result.stderr


def test_sigterm_stops_the_server_cleanly(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "knox_server.cli",
            "dev",
            "--state-dir",
            str(tmp_path),
            "--listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert json.loads(process.stdout.readline())["url"].startswith("https://127.0.0.1:")
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert b"Traceback" not in err
