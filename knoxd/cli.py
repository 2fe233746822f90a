"""``knoxd --config FILE [--stop-timeout SECONDS]``: run the daemon until SIGTERM or SIGINT.

Exit status: 0 after a clean stop, 1 when the daemon cannot start (the reason on stderr) or its
stop was cut short, 2 for an unusable configuration file. Logs are JSON lines on stderr.

Under systemd (``Type=notify``, see ``systemd/knoxd.service``), through :mod:`knoxd.sd`:

* ``READY=1`` with a one-line ``STATUS=`` summary once the cache is loaded, every socket accepts
  connections and the ``[[export]]`` directories are checked; the summary is sent again whenever it
  changes;
* ``WATCHDOG=1`` from the run loop while it serves, when ``WatchdogSec=`` is set;
* ``STOPPING=1`` at the first SIGTERM or SIGINT; a start-up failure is sent as ``STATUS=``.

Sockets handed over by socket activation, named ``workload``, ``admin`` and ``credentials``
(``FileDescriptorName=``), are served instead of binding the configured paths. Beside the
workload and admin sockets run the ``LoadCredential=`` socket (:mod:`knoxd.credentials`, when
passed or ``credentials_socket`` is set) and the Knox-compatible export (:mod:`knoxd.export`, when
``[[export]]`` tables exist); a failure to set either up is a failure to start. So does the
Prometheus metrics endpoint (:mod:`knoxd.metrics`), when ``metrics_listen`` is set.

Stopping, at the first SIGTERM or SIGINT, within ``--stop-timeout`` seconds: the sockets stop
being served. Requests already read are answered first (except a ``get`` still waiting for its
key's first fetch: its connection is closed); a registration being written finishes and is
answered; watch streams and connections are closed. Then the identities' file watchers
stop, the refreshers end (a fetched key being written to the cache is written) and the cache
database is closed. Whatever is left at the deadline, or at a second signal, is cancelled and
the exit status is 1.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import structlog
import trio

from knox import __version__
from knox.logs import configure_logging
from knoxd.config import Config, ConfigError, load_config
from knoxd.credentials import serve_credentials
from knoxd.daemon import DaemonContext, StartupError, run_daemon
from knoxd.export import ExportError, run_export
from knoxd.fetch import FetchRequester, IdentityStatus, Refusal
from knoxd.metrics import DaemonMetrics, serve_metrics
from knoxd.sd import Notifier, status_field, watchdog, watchdog_interval
from knoxd.socket_api.listener import ListenerError, activated_sockets
from knoxd.socket_api.server import SocketContext, serve_sockets

__all__ = ["DEFAULT_CONFIG", "DEFAULT_STOP_TIMEOUT", "main"]

DEFAULT_CONFIG = Path("/etc/knoxd/knoxd.toml")
#: Seconds a stop may take before what is left is cancelled (keep below ``TimeoutStopSec=``).
DEFAULT_STOP_TIMEOUT = 10.0
#: How often the ``STATUS=`` summary is recomputed (it is sent only when it changed).
STATUS_EVERY = 5.0

log = structlog.get_logger("knoxd")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and 3600, not {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knoxd", description="The per-host Knox daemon.")
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=f"knoxd.toml (default {DEFAULT_CONFIG})"
    )
    parser.add_argument(
        "--stop-timeout",
        type=_seconds,
        default=DEFAULT_STOP_TIMEOUT,
        metavar="SECONDS",
        help=f"longest a stop may take (default {DEFAULT_STOP_TIMEOUT:g})",
    )
    return parser


class _CompletingWrites(FetchRequester):
    """The upstream side as the socket side sees it, except that registering and unregistering
    run to the end even when the daemon stops meanwhile: their cache write is short, and the
    client that sent one is then answered instead of cut off mid-request."""

    def __init__(self, inner: FetchRequester) -> None:
        self._inner = inner

    async def register(self, identity: str, key_ids: Sequence[str]) -> list[str]:
        with trio.CancelScope(shield=True):
            done = await self._inner.register(identity, key_ids)
        return done

    async def unregister(self, identity: str, key_ids: Sequence[str]) -> list[str]:
        with trio.CancelScope(shield=True):
            done = await self._inner.unregister(identity, key_ids)
        return done

    def is_registered(self, identity: str, key_id: str) -> bool:
        return self._inner.is_registered(identity, key_id)

    def refusal(self, identity: str, key_id: str) -> Refusal | None:
        return self._inner.refusal(identity, key_id)

    def request_refresh(self, identity: str | None, key_ids: Sequence[str] | None) -> int:
        return self._inner.request_refresh(identity, key_ids)

    def status(self) -> list[IdentityStatus]:
        return self._inner.status()


def summary(context: DaemonContext) -> str:
    """The one-line state shown by ``systemctl status``: cached keys, identities, upstream."""
    identities = context.fetcher.status()
    failing = [i.name for i in identities if not i.upstream_ok]
    upstream = f"upstream failing for {', '.join(failing)}" if failing else "upstream ok"
    keys = _count(len(context.view), "cached key", "cached keys")
    return f"serving {keys} for {_count(len(identities), 'identity', 'identities')}; {upstream}"


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


async def _keep_status(notifier: Notifier, context: DaemonContext, sent: str) -> None:
    while True:
        await trio.sleep(STATUS_EVERY)
        line = summary(context)
        if line != sent and notifier.notify(status_field(line)):
            sent = line


async def _serve(
    context: DaemonContext, *, stop: trio.Event, notifier: Notifier, ping_every: float | None
) -> None:
    """Serve the sockets and run the export until ``stop`` is set; then stop and return."""
    if stop.is_set():
        return
    # Read once: the variables are cleared as they are read.
    activated = activated_sockets()
    credentials = activated.pop("credentials", None)
    try:
        await _serve_all(context, activated, credentials, stop, notifier, ping_every)
    finally:
        if credentials is not None:
            credentials.close()


async def _serve_all(
    context: DaemonContext,
    activated: dict[str, socket.socket],
    credentials: socket.socket | None,
    stop: trio.Event,
    notifier: Notifier,
    ping_every: float | None,
) -> None:
    fetch = _CompletingWrites(context.fetcher)
    sockets = SocketContext(
        config=context.config,
        view=context.view,
        fetch=fetch,
        version=__version__,
        started_at=context.started_at,
        activated=activated,
    )
    async with trio.open_nursery() as nursery:
        state = await nursery.start(serve_sockets, sockets)
        metrics = DaemonMetrics(context.config, context.view, context.fetcher, state)
        await nursery.start(serve_metrics, context.config, metrics.registry)
        await nursery.start(
            partial(serve_credentials, context.config, context.view, fetch, listener=credentials)
        )
        try:
            await nursery.start(run_export, context.config, context.view)
        except ExportError as exc:
            # The message names the export or the directory to fix.
            raise StartupError(str(exc)) from None
        except OSError as exc:
            where = exc.filename or context.config.daemon.export_dir
            raise StartupError(f"export directory {where}: {exc.strerror or exc}") from None
        line = summary(context)
        notifier.notify("READY=1", status_field(line))
        log.info("ready", status=line)
        if ping_every is not None:
            nursery.start_soon(
                partial(watchdog, notifier, ping_every, healthy=lambda: not stop.is_set())
            )
        if notifier.enabled:
            nursery.start_soon(_keep_status, notifier, context, line)
        await stop.wait()
        notifier.notify("STOPPING=1", status_field("stopping"))
        nursery.cancel_scope.cancel()


async def _on_signals(
    stop: trio.Event,
    daemon: trio.CancelScope,
    stop_timeout: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The first SIGTERM/SIGINT sets ``stop`` and gives ``daemon`` its deadline; a second one
    cancels it at once."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if stop.is_set():
                log.warning("stopping now", signal=name)
                daemon.cancel()
                return
            log.info("stopping", signal=name, within_seconds=stop_timeout)
            stop.set()
            daemon.deadline = trio.current_time() + stop_timeout


async def _run(
    config: Config, *, stop_timeout: float, notifier: Notifier, ping_every: float | None
) -> bool:
    """Run until a signal stops the daemon; True if the stop finished in time."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as daemon:
            await nursery.start(_on_signals, stop, daemon, stop_timeout)
            await run_daemon(
                config,
                serve_sockets=partial(_serve, stop=stop, notifier=notifier, ping_every=ping_every),
            )
        nursery.cancel_scope.cancel()
    if daemon.cancelled_caught:
        log.error("the stop was cut short", within_seconds=stop_timeout)
        return False
    return True


def _leaves(group: BaseExceptionGroup[Exception]) -> list[Exception]:
    """The exceptions in ``group``, out of the nested groups that nurseries wrap them in."""
    found: list[Exception] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(_leaves(exc))
        else:
            found.append(exc)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    notifier = Notifier.from_environ()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        sys.stderr.write(f"knoxd: {exc}\n")
        notifier.notify(status_field(f"unusable configuration: {exc}"))
        return 2
    clean = False
    try:
        clean = trio.run(
            partial(
                _run,
                config,
                stop_timeout=args.stop_timeout,
                notifier=notifier,
                ping_every=watchdog_interval(),
            )
        )
    except* (StartupError, ListenerError) as group:
        reasons = [str(reason) for reason in _leaves(group)]
        for reason in reasons:
            sys.stderr.write(f"knoxd: cannot start: {reason}\n")
        notifier.notify(status_field(f"cannot start: {'; '.join(reasons)}"))
    return 0 if clean else 1
