"""Running knoxd as a service manager would: a real process (:func:`knoxd_process`, argv from
:func:`knoxd_argv`), a datagram socket standing in for systemd's notify socket
(:class:`NotifySocket`), a systemd-like parent passing it sockets by name (:func:`activated`), and
a dev PKI with its ``knoxd.toml`` (:func:`dev_knoxd_config`)."""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from knox_server.dev import prepare_dev_state, write_dev_outputs

WAIT = 20
REPO = Path(__file__).resolve().parent.parent

# knoxd.service sets MemoryDenyWriteExecute=yes, so knoxd runs here under the kernel's own form of
# it, PR_SET_MDWE (kept across exec; on kernels before 6.3 the call fails and nothing changes).
_NO_WRITABLE_CODE = "import ctypes; ctypes.CDLL(None).prctl(65, 1, 0, 0, 0)\n"

# A systemd-like parent (argv: the names joined by ":", the paths, "--", the command): binds the
# Unix sockets, 0666 for the one named "workload" and 0600 for the others as the socket units make
# them ("-" is a UDP socket instead, a kind knoxd must refuse), moves them to fds 3, 4, ... in
# order, names them, and execs the command in the same process (so LISTEN_PID stays right).
_ACTIVATOR = r"""
import fcntl, os, socket, sys
split = sys.argv.index("--")
names, paths, command = sys.argv[1], sys.argv[2:split], sys.argv[split + 1:]
high = []
for name, path in zip(names.split(":"), paths):
    if path == "-":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, 0o666 if name == "workload" else 0o600)
        sock.listen(64)
    # Out of the way first, so that moving one to fd 3 + i never closes another.
    high.append(fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD, 64))
    sock.close()
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index, inheritable=True)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(paths)), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=names)
if os.environ.pop("ACTIVATOR_NO_CAPS", ""):
    # As CapabilityBoundingSet= (empty) and NoNewPrivileges=yes in the unit: after the exec,
    # even root holds no capability.
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), f"cannot drop capability {cap}")
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "cannot set no_new_privs")
os.execvp(command[0], command)
"""


def activated(names: str, paths: Sequence[Path | str], command: Sequence[str]) -> list[str]:
    """The argv of a parent that passes the sockets it binds at ``paths`` (``-``: a UDP socket)
    to ``command`` as systemd's socket activation does, named by ``names`` (joined by ``:``).
    With ``ACTIVATOR_NO_CAPS=1`` in its environment, the command runs without any capability."""
    return [sys.executable, "-c", _ACTIVATOR, names, *map(str, paths), "--", *command]


class NotifySocket:
    """A bound ``AF_UNIX`` datagram socket: what systemd listens on for ``sd_notify``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.messages: list[list[str]] = []

    async def __aenter__(self) -> NotifySocket:
        await self.sock.bind(str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sock.close()

    async def receive(self) -> list[str]:
        """The next message's fields (recorded in :attr:`messages`)."""
        with trio.fail_after(WAIT):
            data = await self.sock.recv(4096)
        fields = data.decode().split("\n")
        self.messages.append(fields)
        return fields

    async def until(self, field: str) -> list[str]:
        """Receive until a message has ``field``; that message."""
        while True:
            fields = await self.receive()
            if field in fields:
                return fields

    async def ready(self, process: trio.Process, log: Path) -> list[str]:
        """The READY=1 message; fails with knoxd's log if the process exits first."""
        with trio.fail_after(WAIT):
            while True:
                with trio.move_on_after(0.1):
                    fields = await self.receive()
                    if "READY=1" in fields:
                        return fields
                    continue
                if process.poll() is not None:
                    raise AssertionError(f"knoxd exited ({process.returncode}): {log.read_text()}")

    def receive_nowait(self) -> bytes:
        """A queued message, unrecorded; raises :class:`BlockingIOError` if there is none."""
        raw: socket.socket = self.sock._sock  # type: ignore[attr-defined]
        return raw.recv(4096, socket.MSG_DONTWAIT)

    def drain(self) -> None:
        """Record whatever is queued, without waiting."""
        while True:
            try:
                data = self.receive_nowait()
            except BlockingIOError:
                return
            self.messages.append(data.decode().split("\n"))


def dev_knoxd_config(
    directory: Path, *, url: str = "https://127.0.0.1:9", sockets: Path | None = None
) -> Path:
    """A dev PKI and ``knoxd.toml`` in ``directory`` (upstream ``url``, unreachable by default);
    with ``sockets``, the configured socket paths are moved into that directory."""
    state = prepare_dev_state(directory)
    config = Path(write_dev_outputs(state, url)["knoxd_config"])
    if sockets is not None:
        text = config.read_text()
        for name, path in (("workload_socket", "w.sock"), ("admin_socket", "a/a.sock")):
            text = re.sub(rf'(?m)^{name} = ".*"$', f'{name} = "{sockets / path}"', text)
        config.write_text(text)
    return config


def knoxd_environ(**extra: str) -> dict[str, str]:
    """This process's environment without any systemd variables, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LISTEN_", "WATCHDOG_"))
        and k not in ("NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY")
    }
    env.update(extra)
    return env


@asynccontextmanager
async def knoxd_process(
    argv: Sequence[str], log: Path, env: Mapping[str, str]
) -> AsyncIterator[trio.Process]:
    """Run ``argv`` (logs to ``log``); SIGKILL it at the end if it still runs."""
    with log.open("ab") as out:
        process = await trio.lowlevel.open_process(
            list(argv), stdout=out, stderr=out, cwd=REPO, env=dict(env)
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(WAIT):
            await process.wait()


def knoxd_argv(config: Path, *extra: str) -> list[str]:
    """``python -m knoxd --config config ...``, under the same memory restriction as the unit."""
    shim = _NO_WRITABLE_CODE + "import os, sys\nos.execv(sys.executable, sys.argv[1:])"
    return [
        sys.executable,
        "-c",
        shim,
        sys.executable,
        "-m",
        "knoxd",
        "--config",
        str(config),
        *extra,
    ]
