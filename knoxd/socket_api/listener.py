"""Listening Unix sockets: bound by knoxd, or handed over by systemd socket activation.

Binding never leaves a window with looser permissions: the umask is set around ``bind`` so the
inode is created no more open than ``mode``, then ownership and the exact mode are applied. A
socket file left by a dead daemon is replaced; a live daemon (something accepts a connection) is
an error, never silently displaced. Anything at the path that is not a socket is left alone.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog
import trio

__all__ = ["ListenerError", "accept", "activated_sockets", "bind_unix"]

log = structlog.get_logger("knoxd.listener")

_LISTEN_FDS_START = 3
_BACKLOG = 4096


class ListenerError(Exception):
    """A socket could not be set up; the message names the path and the cause."""


def _clear_stale(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    except OSError as exc:
        raise ListenerError(f"cannot tell whether {path} is in use: {exc.strerror}") from None
    finally:
        probe.close()
    raise ListenerError(f"{path} is in use: another knoxd is already listening there")


def bind_unix(path: Path, *, mode: int, uid: int = -1, gid: int = -1) -> socket.socket:
    """A non-blocking listening socket at ``path`` with exactly ``mode`` and owner ``uid:gid``
    (-1: unchanged). The parent directory must exist.

    Raises :class:`ListenerError` if a live daemon listens at ``path``, something other than a
    socket is there, or binding fails.
    """
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid)
        os.chmod(path, mode)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return sock


def activated_sockets(environ: MutableMapping[str, str] | None = None) -> dict[str, socket.socket]:
    """The listening sockets systemd passed to this process, by their ``FileDescriptorName``
    (``LISTEN_FDNAMES``; an unnamed one is ``"unknown"``, as systemd names it).

    Empty unless ``LISTEN_PID`` is this process. The ``LISTEN_*`` variables are removed (so
    children do not inherit them) and the fds are made close-on-exec. Raises
    :class:`ListenerError` for a passed fd that is not a listening Unix stream socket.
    """
    env = os.environ if environ is None else environ
    try:
        pid_ok = int(env.get("LISTEN_PID", "")) == os.getpid()
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return {}
    finally:
        names_text = env.get("LISTEN_FDNAMES", "")
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
    if not pid_ok or count <= 0:
        return {}
    names = names_text.split(":") if names_text else []
    result: dict[str, socket.socket] = {}
    for index in range(count):
        fd = _LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            for other in result.values():
                other.close()
            raise ListenerError(f"systemd passed fd {fd}, which is not a Unix stream socket")
        sock.setblocking(False)
        result[names[index] if index < len(names) else "unknown"] = sock
    return result


async def accept(listener: socket.socket) -> tuple[socket.socket, Any]:
    """The next connection on the non-blocking ``listener`` and its peer address. Waits for one;
    after an error such as EMFILE it logs, backs off briefly and tries again instead of spinning."""
    while True:
        try:
            return listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
        except OSError as exc:
            log.warning("accept failed", error=exc.strerror)
            await trio.sleep(0.1)
