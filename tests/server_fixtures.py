"""Real knox_server instances for tests of its clients (knoxctl, knoxd, the HTTP client).

Both helpers run exactly what ``knox-server dev`` runs: a generated dev PKI, users ``admin``
(group ``security-team``, default Admin on new keys) and ``dev``, a fresh master key, SQLite.

* :func:`dev_server` serves in-process, in the caller's nursery-owning task (cheap, for most tests);
* :func:`dev_server_process` runs ``python -m knox_server.cli dev`` as a child process, for tests
  that kill or restart the server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from knox_server.dev import prepare_dev_state, write_dev_outputs
from knox_server.main import run_server

__all__ = ["DevServer", "dev_server", "dev_server_process"]

START_TIMEOUT = 30


@dataclass(frozen=True, slots=True)
class DevServer:
    """A running dev server: its URL and the files a client needs."""

    url: str
    state_dir: Path
    ca: Path
    admin_token: str
    dev_token: str
    host_cert: tuple[Path, Path]
    service_cert: tuple[Path, Path]
    knoxd_config: Path
    hostname: str

    @classmethod
    def from_info(cls, state_dir: Path, info: dict[str, object]) -> DevServer:
        tokens = info["tokens"]
        certs = info["certs"]
        assert isinstance(tokens, dict) and isinstance(certs, dict)
        host = certs["host"]
        service = certs["service"]
        return cls(
            url=str(info["url"]),
            state_dir=state_dir,
            ca=Path(str(info["ca"])),
            admin_token=Path(tokens["admin"]).read_text().strip(),
            dev_token=Path(tokens["dev"]).read_text().strip(),
            host_cert=(Path(host[0]), Path(host[1])),
            service_cert=(Path(service[0]), Path(service[1])),
            knoxd_config=Path(str(info["knoxd_config"])),
            hostname=os.uname().nodename,
        )


@asynccontextmanager
async def dev_server(state_dir: Path, *, knox_compat: bool = False) -> AsyncIterator[DevServer]:
    """Serve a dev server in-process on 127.0.0.1 (any free port) until the block exits."""
    state = prepare_dev_state(state_dir)
    config = state.server_config("127.0.0.1:0", knox_compat=knox_compat)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_TIMEOUT):
            urls: list[str] = await nursery.start(
                lambda task_status: run_server(config, task_status=task_status)
            )
        info = write_dev_outputs(state, urls[0])
        try:
            yield DevServer.from_info(state.directory, info)
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def dev_server_process(
    state_dir: Path, *, listen: str = "127.0.0.1:0"
) -> AsyncIterator[DevServer]:
    """Run ``knox-server dev`` as a child process; SIGKILL it when the block exits (if alive).

    The child's stdout carries the one JSON line; its logs and audit go to files in state_dir.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / "server.log").open("ab") as log:
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "knox_server.cli",
                "dev",
                "--state-dir",
                str(state_dir),
                "--listen",
                listen,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(START_TIMEOUT):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"knox-server dev exited: see {state_dir / 'server.log'}")
                line += chunk
        yield DevServer.from_info(state_dir.resolve(), json.loads(line))
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
        with trio.move_on_after(10):
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()
