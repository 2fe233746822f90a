"""systemd's service-manager protocol, by hand (no libsystemd): notifications and the watchdog.

* :class:`Notifier` sends ``sd_notify`` messages (``READY=1``, ``STATUS=…``, ``WATCHDOG=1``,
  ``STOPPING=1``) as datagrams to ``$NOTIFY_SOCKET``: a filesystem path or an abstract address
  (``@name``). Without the variable it does nothing, so the daemon runs the same outside systemd.
  A send never blocks and never raises: a full or vanished socket costs one message, which the
  caller learns from the return value.
* :func:`watchdog_interval` reads ``$WATCHDOG_USEC`` / ``$WATCHDOG_PID`` and returns half the
  timeout, the ping interval systemd recommends.
* :func:`watchdog` pings from a task of the trio loop it watches: a loop that is blocked (a
  synchronous call that never returns, a busy loop without checkpoints) runs no task, so it sends
  no ping and systemd restarts the service after ``WatchdogSec=``. ``healthy`` adds the caller's
  own judgement; while it is false no ping is sent either.

Socket activation (``$LISTEN_FDS``) is read by :func:`knoxd.socket_api.listener.activated_sockets`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping

import structlog
import trio

__all__ = ["MAX_STATUS_CHARS", "Notifier", "status_field", "watchdog", "watchdog_interval"]

log = structlog.get_logger("knoxd.sd")

#: A STATUS= text longer than this is cut (``systemctl status`` shows one line anyway).
MAX_STATUS_CHARS = 200


class Notifier:
    """Sends notifications to the service manager's socket (``None``: nowhere).

    ``address`` is the value of ``$NOTIFY_SOCKET``: an absolute path, or ``@`` and an abstract
    socket name. Anything else (a relative path, a ``vsock:`` address) disables the notifier with
    a warning.
    """

    __slots__ = ("_failing", "address")

    def __init__(self, address: str | None) -> None:
        self.address: str | None = _parse_address(address) if address else None
        self._failing = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier for ``$NOTIFY_SOCKET`` in ``environ`` (default: the process's)."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (each ``NAME=value``, no newlines) as one message. True if it was
        sent; False without a socket, or when the socket is missing, full or refuses it.

        Raises :class:`ValueError` for a malformed field (a bug in the caller).
        """
        for item in fields:
            name, eq, _ = item.partition("=")
            if not eq or not name or "\n" in item:
                raise ValueError(f"not a notification field: {item[:40]!r}")
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        with socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        ) as sock:
            try:
                sock.sendto(message, self.address)
            except OSError as exc:
                # Logged once per run of failures: a watchdog pings every few seconds.
                if not self._failing:
                    log.warning(
                        "could not notify the service manager", error=exc.strerror or str(exc)
                    )
                self._failing = True
                return False
        if self._failing:
            log.info("notifying the service manager again")
            self._failing = False
        return True


def _parse_address(address: str) -> str | None:
    if address.startswith("@") and len(address) > 1:
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    log.warning("ignoring NOTIFY_SOCKET: not a path or an abstract socket name")
    return None


def status_field(text: str) -> str:
    """``STATUS=text`` on one line, at most :data:`MAX_STATUS_CHARS` characters of text."""
    line = " ".join(text.split())
    if len(line) > MAX_STATUS_CHARS:
        line = line[: MAX_STATUS_CHARS - 1] + "…"
    return f"STATUS={line}"


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or None when systemd runs no
    watchdog for this process (no or invalid ``WATCHDOG_USEC``, or ``WATCHDOG_PID`` names
    another process)."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    if usec <= 0:
        return None
    return usec / 1_000_000 / 2


async def watchdog(
    notifier: Notifier, interval: float, *, healthy: Callable[[], bool] = lambda: True
) -> None:
    """Send ``WATCHDOG=1`` every ``interval`` seconds while ``healthy()`` is true, until
    cancelled. A blocked trio loop sends nothing (this task cannot run), so systemd's watchdog
    fires."""
    while True:
        if healthy():
            notifier.notify("WATCHDOG=1")
        await trio.sleep(interval)
