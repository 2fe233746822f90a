"""The audit trail: one JSON line per API request, success or failure.

Every request the app answers (including authentication failures, unknown routes and wrong
methods) becomes one :class:`AuditRecord`, written by :class:`AuditLog` as a single JSON line::

    {"time":"2025-05-23T10:00:00.123456789Z","request_id":"aB3…","route":"getkey",
     "method":"GET","path":"/v0/keys/db:pw/","key_id":"db:pw","principal":"web1",
     "principals":[{"provider":"mtls","type":"machine","id":"web1"}],"auth_type":"machine",
     "client":"10.0.0.7:51234","tls":{"version":"TLSv1.3","cipher":"TLS_AES_128_GCM_SHA256",
     "client_cert":true},"code":0,"status":200,"message":"","user_agent":"Knox_Client/…",
     "params":{"status":"\\"Active\\""},"query_ids":null}

What is guaranteed:

* the ``data`` parameter is always written as ``"<DATA>"`` (as Knox's ``scrub``), whatever the
  caller passed; the app never hands over the ``Authorization`` header, so tokens cannot appear;
* parameter values are cut to :data:`MAX_PARAM_CHARS` characters, so a record is bounded;
* :meth:`AuditLog.emit` never raises: a failing sink is reported once per burst of failures on the
  structlog logger, and again (with the number of records lost) when writing works again.

Sinks: :class:`StreamSink` (stdout by default) or :class:`FileSink`, an append-only file opened
once with ``O_APPEND``, each record one ``write(2)`` so that several worker processes can share
the file without interleaving lines.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

import structlog

__all__ = [
    "DATA_PLACEHOLDER",
    "MAX_PARAM_CHARS",
    "AuditLog",
    "AuditRecord",
    "AuditSink",
    "FileSink",
    "StreamSink",
    "format_record",
    "new_request_id",
    "rfc3339_nano",
]

DATA_PLACEHOLDER = "<DATA>"
MAX_PARAM_CHARS = 1024

log = structlog.get_logger("knox_server.audit")

_ALPHANUMERIC = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
# Byte b → alphabet[b % 62]: the slight bias is irrelevant for a correlation id.
_ID_TABLE = bytes(_ALPHANUMERIC[b % len(_ALPHANUMERIC)] for b in range(256))
# One encoder for every record: json.dumps would build a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_TLS_VERSIONS = {0x0301: "TLSv1.0", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2", 0x0304: "TLSv1.3"}


def new_request_id() -> str:
    """20 random alphanumeric characters, like Knox's request ids."""
    return os.urandom(20).translate(_ID_TABLE).decode("ascii")


@functools.lru_cache(maxsize=4)
def _second_stamp(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def rfc3339_nano(ts_ns: int) -> str:
    """Go's ``time.RFC3339Nano`` in UTC: nanoseconds with trailing zeros dropped, ``Z`` suffix."""
    seconds, nanos = divmod(ts_ns, 1_000_000_000)
    stamp = _second_stamp(seconds)
    if nanos:
        stamp += "." + f"{nanos:09d}".rstrip("0")
    return stamp + "Z"


@dataclass(slots=True)
class AuditRecord:
    """What one request did. ``code`` is the v0 code (None for a 405, which has none);
    ``status`` the HTTP status (0 if no response was sent: cancelled, or the client left);
    ``principals`` holds ``(provider, type, id)`` for every principal the request authenticated
    as; ``tls_version`` is the ASGI integer (``0x0304``), or None."""

    ts: int
    request_id: str
    route: str
    method: str
    path: str
    code: int | None
    status: int
    message: str = ""
    key_id: str | None = None
    principal: str | None = None
    principals: tuple[tuple[str, str, str], ...] = ()
    auth_type: str | None = None
    client: str | None = None
    tls_version: int | None = None
    tls_cipher: str | None = None
    client_cert: bool = False
    user_agent: str = "unknown"
    params: Mapping[str, str] = field(default_factory=dict)
    query_ids: int | None = None


def _bounded(value: str) -> str:
    if len(value) <= MAX_PARAM_CHARS:
        return value
    return value[:MAX_PARAM_CHARS] + f"...<{len(value)} chars>"


def format_record(record: AuditRecord) -> bytes:
    """The record as one JSON line (UTF-8, ending in a newline), ``data`` scrubbed."""
    params = {
        name: DATA_PLACEHOLDER if name == "data" else _bounded(value)
        for name, value in record.params.items()
    }
    tls: dict[str, Any] | None = None
    if record.tls_version is not None or record.tls_cipher is not None or record.client_cert:
        tls = {
            "version": _TLS_VERSIONS.get(record.tls_version, record.tls_version)
            if record.tls_version is not None
            else None,
            "cipher": record.tls_cipher,
            "client_cert": record.client_cert,
        }
    obj = {
        "time": rfc3339_nano(record.ts),
        "request_id": record.request_id,
        "route": record.route,
        "method": record.method,
        "path": record.path,
        "key_id": record.key_id,
        "principal": record.principal,
        "principals": [
            {"provider": provider, "type": kind, "id": pid}
            for provider, kind, pid in record.principals
        ],
        "auth_type": record.auth_type,
        "client": record.client,
        "tls": tls,
        "code": record.code,
        "status": record.status,
        "message": record.message,
        "user_agent": record.user_agent,
        "params": params,
        "query_ids": record.query_ids,
    }
    # ASCII output (the encoder's default): a path or key id with odd characters stays one
    # printable line.
    return (_ENCODER.encode(obj) + "\n").encode("ascii")


class AuditSink(Protocol):
    """Where audit lines go. ``write`` raises :class:`OSError` (or ``ValueError`` once closed)."""

    def write(self, line: bytes) -> None: ...

    def close(self) -> None: ...


class StreamSink:
    """Writes to a text stream and flushes each line. Without a stream: ``sys.stdout`` as it is
    at each write (so a redirected stdout is honoured). ``close`` leaves the stream open."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def write(self, line: bytes) -> None:
        stream = self._stream if self._stream is not None else sys.stdout
        stream.write(line.decode("ascii"))
        stream.flush()

    def close(self) -> None:
        """Nothing to release: the stream belongs to the caller."""


class FileSink:
    """An append-only file (created with mode 0600), opened once; one ``write(2)`` per line."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd: int | None = fd
        self._path = path

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FileSink:
        """Open ``path`` for appending. Raises :class:`OSError`."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return cls(fd, os.fspath(path))

    def __repr__(self) -> str:
        return f"FileSink({self._path!r})"

    def write(self, line: bytes) -> None:
        if self._fd is None:
            raise ValueError(f"audit file {self._path} is closed")
        view = memoryview(line)
        while view:
            # A short write is rare on a regular file (a full disk); finish the line regardless.
            view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        """Close the file; idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class AuditLog:
    """Formats records and writes them to a sink, never raising into the request."""

    def __init__(self, sink: AuditSink | None = None) -> None:
        self._sink: AuditSink = sink if sink is not None else StreamSink()
        self._lost = 0

    @classmethod
    def to_file(cls, path: str | os.PathLike[str]) -> AuditLog:
        """An audit log appending to ``path``. Raises :class:`OSError` if it cannot be opened."""
        return cls(FileSink.open(path))

    @property
    def lost(self) -> int:
        """Records lost in the current burst of write failures (0 while writing works)."""
        return self._lost

    def emit(self, record: AuditRecord) -> None:
        """Write one record. Never raises (a failure is logged, once per burst)."""
        try:
            self._sink.write(format_record(record))
        except (OSError, ValueError) as exc:
            if self._lost == 0:
                log.exception("audit_write_failed", sink=repr(self._sink), error=str(exc))
            self._lost += 1
            return
        if self._lost:
            log.warning("audit_write_recovered", sink=repr(self._sink), lost_records=self._lost)
            self._lost = 0

    def close(self) -> None:
        """Close the sink; idempotent."""
        self._sink.close()
