"""Who is on the other end of a Unix socket, from the kernel only.

uid and gid come from ``SO_PEERCRED`` (the credentials in effect at ``connect()``: they cannot race
and do not follow a later ``setuid``), supplementary groups from ``SO_PEERGROUPS``. Facts derived
from the pid (systemd unit, executable) are read from ``/proc`` only through a pidfd
(``SO_PEERPIDFD``) and kept only if the process is still alive after the read, so a recycled pid
can never lend its facts to the peer. Without ``SO_PEERPIDFD`` (Linux < 6.5) those facts are
``None``, and unit selectors never match.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
from dataclasses import dataclass

__all__ = ["Peer", "PeerFacts", "read_peer", "unit_from_cgroup"]

_SO_PEERCRED = socket.SO_PEERCRED
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
_CRED = struct.Struct("3i")
_GID = struct.Struct("I")
_CGROUP_MAX = 65536


@dataclass(frozen=True, slots=True)
class PeerFacts:
    """What the policy judges: the peer's connect-time uid, gid, groups, and its unit if known."""

    uid: int
    gid: int
    groups: frozenset[int]
    unit: str | None


def unit_from_cgroup(text: str) -> str | None:
    """The systemd unit of a ``/proc/PID/cgroup`` text: the first part of the cgroup v2 path
    that is not a ``.slice``, or None (no v2 line, or the root cgroup)."""
    for line in text.splitlines():
        if line.startswith("0::"):
            for part in line[3:].split("/"):
                if part and not part.endswith(".slice"):
                    return part
            return None
    return None


class Peer:
    """The kernel's facts about one connected peer. Owns a pidfd when the kernel gives one:
    :meth:`close` it (the connection does, when it ends)."""

    __slots__ = ("exe", "facts", "pid", "pidfd")

    def __init__(self, pid: int, facts: PeerFacts, exe: str | None, pidfd: int | None) -> None:
        self.pid = pid
        self.facts = facts
        self.exe = exe
        self.pidfd = pidfd

    def alive(self) -> bool:
        """False once the connecting process has exited. Always True without a pidfd: then
        nothing pid-derived was trusted in the first place."""
        if self.pidfd is None:
            return True
        try:
            signal.pidfd_send_signal(self.pidfd, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def current_unit(self) -> str | None:
        """Re-read the unit (a process can be moved between cgroups); None if unknown or gone."""
        if self.pidfd is None:
            return None
        unit = _read_unit(self.pid)
        return unit if self.alive() else None

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def __repr__(self) -> str:
        f = self.facts
        return f"Peer(pid={self.pid}, uid={f.uid}, gid={f.gid}, unit={f.unit!r})"


def _read_unit(pid: int) -> str | None:
    # os.read, not open(): a text file object costs twice the syscalls' time, per connection.
    try:
        fd = os.open(f"/proc/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    chunks: list[bytes] = []
    size = 0
    try:
        while size < _CGROUP_MAX and (chunk := os.read(fd, _CGROUP_MAX - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return unit_from_cgroup(b"".join(chunks).decode("utf-8", errors="replace"))


def _groups(sock: socket.socket) -> frozenset[int]:
    for count in (64, 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, count * _GID.size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return frozenset()
        return frozenset(g for (g,) in _GID.iter_unpack(raw[: len(raw) - len(raw) % _GID.size]))
    return frozenset()


def _pidfd(sock: socket.socket) -> int | None:
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
    except OSError:
        return None
    return fd if fd >= 0 else None


def read_peer(sock: socket.socket) -> Peer:
    """The facts about ``sock``'s peer. Raises :class:`OSError` if the kernel gives no
    credentials (not a connected Unix socket)."""
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, _CRED.size))
    groups = _groups(sock) | {gid}
    pidfd = _pidfd(sock)
    unit: str | None = None
    exe: str | None = None
    if pidfd is not None:
        unit = _read_unit(pid)
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            exe = None
        peer = Peer(pid, PeerFacts(uid, gid, groups, None), None, pidfd)
        if not peer.alive():
            # The pid may already name another process: its /proc facts are not the peer's.
            unit = exe = None
        peer.facts = PeerFacts(uid, gid, groups, unit)
        peer.exe = exe
        return peer
    return Peer(pid, PeerFacts(uid, gid, groups, None), None, None)
