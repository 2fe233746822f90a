"""``knoxd --config FILE``: run the daemon until SIGTERM or SIGINT.

Exit status: 0 after a clean stop, 1 when the daemon cannot start (the reason on stderr), 2 for an
unusable configuration file. Logs are JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
import trio

from knox import __version__
from knoxd.config import Config, ConfigError, load_config
from knoxd.daemon import DaemonContext, StartupError, run_daemon
from knoxd.socket_api.listener import ListenerError
from knoxd.socket_api.server import SocketContext, serve_sockets

__all__ = ["DEFAULT_CONFIG", "main"]

DEFAULT_CONFIG = Path("/etc/knoxd/knoxd.toml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knoxd", description="The per-host Knox daemon.")
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=f"knoxd.toml (default {DEFAULT_CONFIG})"
    )
    return parser


def configure_logging(level: int = logging.INFO) -> None:
    """structlog (and stdlib logging) as one JSON object per line on stderr."""
    logging.basicConfig(stream=sys.stderr, level=level, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


async def _serve(context: DaemonContext) -> None:
    await serve_sockets(
        SocketContext(
            config=context.config,
            view=context.view,
            fetch=context.fetcher,
            version=__version__,
            started_at=context.started_at,
        )
    )


async def _run(config: Config) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        await run_daemon(config, serve_sockets=_serve)
        nursery.cancel_scope.cancel()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            structlog.get_logger("knoxd").info("stopping", signal=signal.Signals(signum).name)
            scope.cancel()
            return


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        sys.stderr.write(f"knoxd: {exc}\n")
        return 2
    status = 0
    try:
        trio.run(_run, config)
    except* (StartupError, ListenerError) as group:
        for reason in group.exceptions:
            sys.stderr.write(f"knoxd: cannot start: {reason}\n")
        status = 1
    return status
