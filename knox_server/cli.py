"""``knox-server``: serve, run a development server, create or upgrade the store's schema, re-wrap
stored data under a new master key."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog
import trio

from knox.errors import KnoxError
from knox.logs import configure_logging
from knox_server import main as server_main
from knox_server.config import ConfigError, ServerConfig, load_config
from knox_server.crypto import KeyFileError
from knox_server.dev import prepare_dev_state, write_dev_outputs
from knox_server.tokens import TokenFileError

log = structlog.get_logger("knox_server")

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knox-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the Knox v0 API as configured")
    serve.add_argument("--config", type=Path, required=True, help="the server's TOML file")
    dev = sub.add_parser("dev", help="run a development server with a generated PKI")
    dev.add_argument("--state-dir", type=Path, required=True)
    dev.add_argument("--listen", default="127.0.0.1:9000", help="HOST:PORT (port 0: any free)")
    dev.add_argument(
        "--knox-compat",
        action="store_true",
        help="list every key on GET /v0/keys/ as Go Knox does (default: only readable keys)",
    )
    migrate = sub.add_parser(
        "migrate", help="create or upgrade the store's schema (idempotent); prints a JSON report"
    )
    migrate.add_argument("--config", type=Path, required=True)
    rewrap = sub.add_parser(
        "rewrap", help="re-seal every stored version under the newest master key"
    )
    rewrap.add_argument("--config", type=Path, required=True)
    return parser


async def _until_signalled(
    config: ServerConfig, on_listening: Callable[[list[str]], None] | None = None
) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully (in-flight requests answered)."""
    stop = trio.Event()

    async def wait_for_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("stopping", signal=signal.Signals(signum).name)
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_signal)
        await server_main.run_server(config, on_listening=on_listening, shutdown_trigger=stop.wait)
        nursery.cancel_scope.cancel()


async def _dev(args: argparse.Namespace) -> None:
    state = prepare_dev_state(args.state_dir)
    config = state.server_config(args.listen, knox_compat=args.knox_compat)

    def announce(urls: list[str]) -> None:
        info = write_dev_outputs(state, urls[0])
        sys.stdout.write(json.dumps(info) + "\n")
        sys.stdout.flush()

    await _until_signalled(config, announce)


_EXPECTED = (ConfigError, KeyFileError, TokenFileError, KnoxError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    return_code = 0
    try:
        if args.command == "serve":
            config = load_config(args.config)
            trio.run(_until_signalled, config)
        elif args.command == "dev":
            trio.run(_dev, args)
        elif args.command == "migrate":
            report = trio.run(server_main.migrate_store, load_config(args.config))
            sys.stdout.write(json.dumps(report) + "\n")
        else:
            report = trio.run(server_main.rewrap_stored, load_config(args.config))
            sys.stdout.write(json.dumps(report) + "\n")
    except* KeyboardInterrupt:
        pass
    except* _EXPECTED as group:
        # Start-up errors raised inside a nursery arrive wrapped in exception groups.
        for exc in _leaves(group):
            sys.stderr.write(f"knox-server: {exc}\n")
        return_code = 1
    return return_code


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


if __name__ == "__main__":
    sys.exit(main())
