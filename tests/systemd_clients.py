"""Clients that ask for a credential as systemd's ``LoadCredential=ID:/path/to/socket`` does.

A client is a real process: it joins a real cgroup v2 directory named like a systemd unit
(``knoxd-test-….slice/web.service``, so the kernel reports that unit for it, as it does for the
process systemd forks to start a unit), binds systemd's abstract address
``\\0<random hex>/unit/<unit>/<credential>``, connects, shuts down its sending side and reads to
EOF. :func:`unit_cgroups` skips the test without root and a writable cgroup v2 hierarchy.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

WAIT = 20

# What systemd's executor does for LoadCredential=NAME:SOCKET, after joining the unit's cgroup
# (argv: socket, cgroup.procs or "", unit, credential name, uid to drop to or -1).
_SYSTEMD_CLIENT = r"""
import os, random, socket, sys
path, procs, unit, name, uid = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
if procs:
    with open(procs, "w") as f:
        f.write("0")
if uid >= 0:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
s.settimeout(30)
s.bind(("\0%x/unit/%s/%s" % (random.getrandbits(64), unit, name)).encode())
try:
    s.connect(path)
except PermissionError:
    sys.exit(13)
s.shutdown(socket.SHUT_WR)
data = b""
while chunk := s.recv(65536):
    data += chunk
s.close()
sys.stdout.buffer.write(data)
"""


@dataclass
class Units:
    """Cgroups named like systemd units; ``procs(unit)`` is the file a process writes to join."""

    slice: Path

    def procs(self, unit: str) -> Path:
        path = self.slice / unit
        path.mkdir(exist_ok=True)
        return path / "cgroup.procs"


def _cgroup2_root() -> Path | None:
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    return None


@contextmanager
def unit_cgroups() -> Iterator[Units]:
    """A fresh slice cgroup for unit cgroups, removed at the end (every client must have exited).
    Skips the test without root or a cgroup v2 hierarchy it can write to."""
    root = _cgroup2_root()
    if os.geteuid() != 0 or root is None:
        pytest.skip("needs root and a cgroup v2 hierarchy to place clients in unit cgroups")
    slice_dir = root / f"knoxd-test-{secrets.token_hex(4)}.slice"
    try:
        slice_dir.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup: {exc.strerror}")
    try:
        yield Units(slice_dir)
    finally:
        # The clients have exited (every test awaits them), so the cgroups are empty.
        for child in slice_dir.iterdir():
            if child.is_dir():
                child.rmdir()
        slice_dir.rmdir()


@contextmanager
def short_dir(prefix: str) -> Iterator[Path]:
    """A directory with a short path (``sun_path`` is 108 bytes) that other uids can traverse."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir="/tmp") as d:
        os.chmod(d, 0o755)
        yield Path(d)


async def systemd_connect(
    path: Path, units: Units, unit: str, name: str, *, in_unit: str | None = "", uid: int = -1
) -> tuple[int, bytes]:
    """Run a client that asks for ``name`` as ``unit``, placed in the cgroup ``in_unit``
    ("": the unit it claims; None: stays in the test's cgroup) and running as ``uid`` (-1: this
    process's). Returns its exit code (13: it could not connect) and the data it read."""
    procs = "" if in_unit is None else str(units.procs(in_unit or unit))
    argv = [sys.executable, "-I", "-S", "-c", _SYSTEMD_CLIENT, str(path), procs, unit, name]
    with trio.fail_after(WAIT):
        done = await trio.run_process([*argv, str(uid)], capture_stdout=True, check=False)
    return done.returncode, done.stdout
