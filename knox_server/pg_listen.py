"""Change notification across replicas: ``LISTEN`` on the PostgreSQL backend's channel.

Every committed write of :class:`~knox_server.pg_store.PostgresKeyStore` announces its key id on
:data:`~knox_server.pg_store.CHANNEL`. :func:`listen_for_changes` keeps one dedicated connection
listening and reports each announcement, from any replica (this one included), on the trio thread.

A lost connection may have missed announcements, so the listener never resumes silently: it
reconnects with backoff and, once listening again, calls ``on_reset`` (every waiter counts its
keys as changed and re-reads them). A dead peer that sends nothing is found by TCP keepalives
(unless the URL sets its own keepalive parameters).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NoReturn

import psycopg
import structlog
import trio

from knox_server.pg_store import (
    CHANNEL,
    Connection,
    connect_error,
    connection_string,
    run_interruptible,
)

__all__ = ["BACKOFF_MAX_S", "POLL_S", "listen_for_changes"]

# The longest wait for notifications between looks at the stop flag: how soon cancellation
# returns.
POLL_S = 0.25
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0

log = structlog.get_logger("knox_server.pg_listen")


async def listen_for_changes(
    dsn: str,
    on_change: Callable[[str], None],
    on_reset: Callable[[], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Listen for key changes in the database at ``dsn`` until cancelled.

    ``on_change(key_id)`` is called on the trio thread for every change announced, in commit
    order, after :meth:`task_status.started`; ``on_reset()`` after each reconnection. Both must
    return quickly and not raise (an exception ends the listener with it).

    Raises :class:`~knox.errors.InternalError` if the first connection fails (with libpq's
    reason); later losses are retried forever, at most :data:`BACKOFF_MAX_S` apart.
    """
    conninfo = connection_string(
        dsn,
        application_name="knox-server listener",
        keepalives=1,
        keepalives_idle=30,
        keepalives_interval=10,
        keepalives_count=3,
    )
    try:
        conn: Connection | None = await trio.to_thread.run_sync(_open_listening, conninfo)
    except psycopg.Error as exc:
        raise connect_error(exc) from None
    task_status.started()
    try:
        while True:
            assert conn is not None
            lost = await _pump(conn, on_change)
            log.warning("change_listener_lost", error=type(lost).__name__)
            await trio.to_thread.run_sync(conn.close)
            conn = None
            conn = await _reconnect(conninfo)
            log.info("change_listener_reconnected")
            on_reset()
    finally:
        if conn is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(conn.close)


async def _pump(conn: Connection, on_change: Callable[[str], None]) -> psycopg.Error:
    """Deliver notifications until the connection fails; returns its error."""
    stop = threading.Event()

    def pump() -> psycopg.Error | None:
        try:
            while not stop.is_set():
                for notify in conn.notifies(timeout=POLL_S):
                    if notify.channel == CHANNEL:
                        trio.from_thread.run_sync(on_change, notify.payload)
        except psycopg.Error as exc:
            return exc
        return None

    lost = await run_interruptible(pump, stop.set)
    if lost is None:
        # Only a cancellation sets the stop flag: this raises its Cancelled.
        await trio.lowlevel.checkpoint()
    assert lost is not None
    return lost


async def _reconnect(conninfo: str) -> Connection:
    delay = BACKOFF_INITIAL_S
    while True:
        await trio.sleep(delay)
        try:
            return await trio.to_thread.run_sync(_open_listening, conninfo)
        except psycopg.Error as exc:
            log.warning("change_listener_reconnect_failed", error=type(exc).__name__)
        delay = min(delay * 2, BACKOFF_MAX_S)


def _open_listening(conninfo: str) -> Connection:
    conn = psycopg.connect(conninfo, autocommit=True)
    try:
        conn.execute(f"LISTEN {CHANNEL}")
    except BaseException:
        conn.close()
        raise
    return conn
