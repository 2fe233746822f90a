"""Run the whole system on its embedded defaults, as an ordinary user, from a fresh clone.

1. ``knox-server dev`` on SQLite with a generated dev PKI in ``.knox-dev/``;
2. an admin creates ``demo:greeting`` and grants this host's machine identity Read;
3. ``knoxd`` with the generated ``.knox-dev/knoxd.toml`` (sockets inside ``.knox-dev/``);
4. ``knoxctl get --daemon`` reads the key through the daemon's socket;

then both stay running, with the next commands to try printed, until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".knox-dev"
BIN = Path(sys.executable).parent
KEY = "demo:greeting"


def _knoxctl(*args: str, env: dict[str, str], stdin: bytes | None = None) -> bytes:
    result = subprocess.run(
        [str(BIN / "knoxctl"), *args],
        input=stdin,
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"demo: knoxctl {' '.join(args)} failed: {result.stderr.decode().strip()}")
    return result.stdout


def _wait_for_socket(path: Path, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(
                f"demo: knoxd exited with status {process.returncode}; see {STATE / 'knoxd.log'}"
            )
        # The file may be left over from an earlier run: wait until the daemon accepts.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                time.sleep(0.05)
            else:
                return
    sys.exit(f"demo: knoxd did not create {path} within {timeout:.0f} s")


def main() -> None:
    STATE.mkdir(mode=0o700, exist_ok=True)
    children: list[subprocess.Popen[bytes]] = []
    try:
        with (STATE / "server.log").open("ab") as log:
            server = subprocess.Popen(
                [
                    str(BIN / "knox-server"),
                    "dev",
                    "--state-dir",
                    str(STATE),
                    "--listen",
                    "127.0.0.1:0",
                ],
                stdout=subprocess.PIPE,
                stderr=log,
            )
        children.append(server)
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line:
            sys.exit(f"demo: knox-server dev exited; see {STATE / 'server.log'}")
        info = json.loads(line)
        env = dict(os.environ, KNOX_SERVER=info["url"], KNOX_CA=info["ca"])
        admin = ["--token-file", info["tokens"]["admin"]]
        hostname = socket.gethostname()
        existing = _knoxctl(*admin, "keys", KEY, env=env).split()
        if KEY.encode() not in existing:
            _knoxctl(*admin, "create", KEY, env=env, stdin=b"hello from knox")
        _knoxctl(*admin, "access", "-r", "-M", KEY, hostname, env=env)

        workload_socket = STATE / "knoxd.sock"
        with (STATE / "knoxd.log").open("ab") as log:
            knoxd = subprocess.Popen(
                [str(BIN / "knoxd"), "--config", info["knoxd_config"]], stdout=log, stderr=log
            )
        children.append(knoxd)
        _wait_for_socket(workload_socket, knoxd, timeout=30)
        value = _knoxctl("--socket", str(workload_socket), "get", "--daemon", KEY, env=env)
        print(f"read {KEY} through knoxd's socket: {value.decode()!r}\n")
        print(
            f"""The dev server ({info["url"]}) and knoxd are running; state in {STATE}.
Try, in another shell:
  export KNOX_SERVER={info["url"]} KNOX_CA={info["ca"]}
  {BIN}/knoxctl --token-file {info["tokens"]["admin"]} versions {KEY}
  echo -n rotated | {BIN}/knoxctl --token-file {info["tokens"]["admin"]} add {KEY}
  {BIN}/knoxctl --token-file {info["tokens"]["admin"]} promote {KEY} <the new version id>
  {BIN}/knoxctl --socket {workload_socket} get --daemon {KEY}
  {BIN}/knoxctl --admin-socket {STATE / "admin" / "admin.sock"} status
  {BIN}/knoxctl --admin-socket {STATE / "admin" / "admin.sock"} cache ls
Ctrl-C stops both."""
        )
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while all(child.poll() is None for child in children):
            time.sleep(1)
        sys.exit("demo: a child process exited; see the logs in " + str(STATE))
    except KeyboardInterrupt:
        pass
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()


if __name__ == "__main__":
    main()
