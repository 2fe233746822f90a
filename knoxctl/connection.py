"""How knoxctl reaches a Knox server: URL, TLS trust, client certificate and credentials.

Each setting comes from a global option, else from the environment:

=====================  ===================  ==================================================
option                 environment          meaning
=====================  ===================  ==================================================
``--server URL[,URL]``  ``KNOX_SERVER``      base URLs, tried in order (``host:port`` = https)
``--ca FILE``          ``KNOX_CA``          CA bundle for the server certificate (default: system)
``--cert FILE``        ``KNOX_CERT``        client certificate (machine or SPIFFE identity)
``--key FILE``         ``KNOX_KEY``         its private key
``--token-file FILE``  —                    a user token read from a file (``0u`` auth)
``--timeout SECONDS``  —                    per-request bound (default 10)
=====================  ===================  ==================================================

Credentials, first match wins: ``--token-file``, then Knox's own order ``KNOX_USER_AUTH`` (token,
``0u``) > ``KNOX_MACHINE_AUTH`` (hostname, ``0t``) > ``KNOX_SERVICE_AUTH`` (``0s``); the last two
authenticate with the client certificate, so they need ``--cert``/``--key``. Empty variables count
as unset, as in Knox.
"""

from __future__ import annotations

import argparse
import math
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from knox.http_client import DEFAULT_TIMEOUT, KnoxHTTPClient, ssl_context_for
from knoxctl.command import CommandError, UsageError

__all__ = ["ServerSettings", "add_server_options", "open_client", "server_settings"]

_MAX_TOKEN_FILE_BYTES = 64 * 1024
ERR_NO_AUTH = (
    "No authentication data given. Set KNOX_USER_AUTH, KNOX_MACHINE_AUTH or KNOX_SERVICE_AUTH, "
    "or use --token-file"
)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    urls: tuple[str, ...]
    ca: Path | None
    cert: Path | None
    key: Path | None
    auth: str = field(repr=False)
    timeout: float


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """The global connection options. Their ``dest`` names stay clear of subcommand arguments
    (``key`` is a subcommand's KEY)."""
    group = parser.add_argument_group("Knox server connection")
    group.add_argument(
        "--server",
        dest="server_urls",
        metavar="URL[,URL…]",
        help="server base URL(s) [KNOX_SERVER]",
    )
    group.add_argument(
        "--ca", dest="server_ca", metavar="FILE", type=Path, help="CA bundle to trust [KNOX_CA]"
    )
    group.add_argument(
        "--cert",
        dest="client_cert",
        metavar="FILE",
        type=Path,
        help="client certificate [KNOX_CERT]",
    )
    group.add_argument(
        "--key", dest="client_key", metavar="FILE", type=Path, help="client private key [KNOX_KEY]"
    )
    group.add_argument(
        "--token-file", metavar="FILE", type=Path, help="read a user token from FILE"
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"per-request timeout (default {DEFAULT_TIMEOUT:g})",
    )


def _env(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()


def _base_url(text: str) -> str:
    text = text.strip()
    return text if "://" in text else "https://" + text


def _read_token(path: Path) -> str:
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise CommandError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    if len(raw) > _MAX_TOKEN_FILE_BYTES:
        raise CommandError(f"token file {path} is too large")
    token = raw.strip()
    # The token goes into an HTTP header: printable ASCII, no whitespace. It is never echoed.
    if not token or not all(0x21 <= b <= 0x7E for b in token):
        raise CommandError(f"token file {path} does not hold a token")
    return token.decode("ascii")


def _check_header_value(value: str, variable: str) -> str:
    if not all(0x21 <= ord(c) <= 0x7E for c in value):
        raise CommandError(f"{variable} holds characters not allowed in a header")
    return value


def _auth(args: argparse.Namespace, env: Mapping[str, str], cert: Path | None) -> str:
    if args.token_file is not None:
        return "0u" + _read_token(args.token_file)
    if user := _env(env, "KNOX_USER_AUTH"):
        return "0u" + _check_header_value(user, "KNOX_USER_AUTH")
    for variable, prefix in (("KNOX_MACHINE_AUTH", "0t"), ("KNOX_SERVICE_AUTH", "0s")):
        if value := _env(env, variable):
            if cert is None:
                raise CommandError(
                    f"{variable} authenticates with a client certificate: "
                    "use --cert/--key or set KNOX_CERT/KNOX_KEY"
                )
            return prefix + _check_header_value(value, variable)
    raise CommandError(ERR_NO_AUTH)


def _path(option: Path | None, env: Mapping[str, str], variable: str) -> Path | None:
    if option is not None:
        return option
    value = _env(env, variable)
    return Path(value) if value else None


def server_settings(args: argparse.Namespace, env: Mapping[str, str]) -> ServerSettings:
    """Resolve the connection settings. Raises :class:`UsageError` for a missing server, a lone
    ``--cert``/``--key`` or a bad timeout, :class:`CommandError` for missing or bad credentials."""
    server = args.server_urls or _env(env, "KNOX_SERVER")
    urls = tuple(_base_url(u) for u in server.split(",") if u.strip()) if server else ()
    if not urls:
        raise UsageError("no Knox server given: use --server URL or set KNOX_SERVER")
    cert = _path(args.client_cert, env, "KNOX_CERT")
    key = _path(args.client_key, env, "KNOX_KEY")
    if (cert is None) != (key is None):
        raise UsageError("a client certificate needs both --cert and --key (KNOX_CERT/KNOX_KEY)")
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise UsageError("--timeout must be a positive number of seconds")
    return ServerSettings(
        urls=urls,
        ca=_path(args.server_ca, env, "KNOX_CA"),
        cert=cert,
        key=key,
        auth=_auth(args, env, cert),
        timeout=args.timeout,
    )


def open_client(settings: ServerSettings) -> KnoxHTTPClient:
    """A client for ``settings``. Raises :class:`CommandError` for unreadable or invalid TLS
    files, :class:`UsageError` for a malformed URL (messages name files, never their contents)."""
    try:
        ctx = ssl_context_for(settings.ca, settings.cert, settings.key)
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(str(p) for p in (settings.ca, settings.cert, settings.key) if p)
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise CommandError(f"cannot load TLS files ({files}): {reason}") from None
    try:
        return KnoxHTTPClient(
            settings.urls, auth=settings.auth, ssl_context=ctx, timeout=settings.timeout
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
