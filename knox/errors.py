"""Knox's v0 error codes and the exception hierarchy that maps onto them.

Every :class:`KnoxError` carries a v0 :class:`Code` and a human message. The message is what the Go
server puts in the envelope's ``message`` field; it never contains secret data. The HTTP status of
a code is :data:`HTTP_STATUS`, exactly the Go server's ``HTTPErrMap``.
"""

from __future__ import annotations

import enum

__all__ = [
    "HTTP_STATUS",
    "BadKeyFormatError",
    "BadPrincipalError",
    "BadRequestDataError",
    "Code",
    "ConcurrentChangeError",
    "InternalError",
    "KeyExistsError",
    "KeyNotFoundError",
    "KnoxError",
    "NoKeyDataError",
    "NoKeyIDError",
    "NotYetImplementedError",
    "RouteNotFoundError",
    "UnauthenticatedError",
    "UnauthorizedError",
    "VersionNotFoundError",
    "error_for_code",
]


class Code(enum.IntEnum):
    """The v0 ``code`` field (``iota`` order of ``knox.go``)."""

    OK = 0
    INTERNAL_SERVER_ERROR = 1
    KEY_IDENTIFIER_EXISTS = 2
    KEY_VERSION_DOES_NOT_EXIST = 3
    KEY_IDENTIFIER_DOES_NOT_EXIST = 4
    UNAUTHENTICATED = 5
    UNAUTHORIZED = 6
    NOT_YET_IMPLEMENTED = 7
    NOT_FOUND = 8
    NO_KEY_ID = 9
    NO_KEY_DATA = 10
    BAD_REQUEST_DATA = 11
    BAD_KEY_FORMAT = 12
    BAD_PRINCIPAL_IDENTIFIER = 13


HTTP_STATUS: dict[Code, int] = {
    Code.OK: 200,
    Code.INTERNAL_SERVER_ERROR: 500,
    Code.KEY_IDENTIFIER_EXISTS: 400,
    Code.KEY_VERSION_DOES_NOT_EXIST: 404,
    Code.KEY_IDENTIFIER_DOES_NOT_EXIST: 404,
    Code.UNAUTHENTICATED: 401,
    Code.UNAUTHORIZED: 403,
    Code.NOT_YET_IMPLEMENTED: 501,
    Code.NOT_FOUND: 404,
    Code.NO_KEY_ID: 400,
    Code.NO_KEY_DATA: 400,
    Code.BAD_REQUEST_DATA: 400,
    Code.BAD_KEY_FORMAT: 400,
    Code.BAD_PRINCIPAL_IDENTIFIER: 400,
}


class KnoxError(Exception):
    """An error with a v0 code. ``str(err)`` is the message, safe to show and log."""

    code: Code = Code.INTERNAL_SERVER_ERROR

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={int(self.code)}, message={self.message!r})"


class InternalError(KnoxError):
    code = Code.INTERNAL_SERVER_ERROR


class ConcurrentChangeError(InternalError):
    """The stored key changed between read and write (optimistic concurrency lost)."""


class KeyExistsError(KnoxError):
    code = Code.KEY_IDENTIFIER_EXISTS


class VersionNotFoundError(KnoxError):
    code = Code.KEY_VERSION_DOES_NOT_EXIST


class KeyNotFoundError(KnoxError):
    code = Code.KEY_IDENTIFIER_DOES_NOT_EXIST


class UnauthenticatedError(KnoxError):
    code = Code.UNAUTHENTICATED


class UnauthorizedError(KnoxError):
    code = Code.UNAUTHORIZED


class NotYetImplementedError(KnoxError):
    code = Code.NOT_YET_IMPLEMENTED


class RouteNotFoundError(KnoxError):
    code = Code.NOT_FOUND


class NoKeyIDError(KnoxError):
    code = Code.NO_KEY_ID


class NoKeyDataError(KnoxError):
    code = Code.NO_KEY_DATA


class BadRequestDataError(KnoxError):
    code = Code.BAD_REQUEST_DATA


class BadKeyFormatError(KnoxError):
    code = Code.BAD_KEY_FORMAT


class BadPrincipalError(KnoxError):
    code = Code.BAD_PRINCIPAL_IDENTIFIER


_BY_CODE: dict[Code, type[KnoxError]] = {
    Code.INTERNAL_SERVER_ERROR: InternalError,
    Code.KEY_IDENTIFIER_EXISTS: KeyExistsError,
    Code.KEY_VERSION_DOES_NOT_EXIST: VersionNotFoundError,
    Code.KEY_IDENTIFIER_DOES_NOT_EXIST: KeyNotFoundError,
    Code.UNAUTHENTICATED: UnauthenticatedError,
    Code.UNAUTHORIZED: UnauthorizedError,
    Code.NOT_YET_IMPLEMENTED: NotYetImplementedError,
    Code.NOT_FOUND: RouteNotFoundError,
    Code.NO_KEY_ID: NoKeyIDError,
    Code.NO_KEY_DATA: NoKeyDataError,
    Code.BAD_REQUEST_DATA: BadRequestDataError,
    Code.BAD_KEY_FORMAT: BadKeyFormatError,
    Code.BAD_PRINCIPAL_IDENTIFIER: BadPrincipalError,
}


def error_for_code(code: int, message: str) -> KnoxError:
    """The exception a client raises for an error envelope; unknown codes become internal."""
    try:
        cls = _BY_CODE[Code(code)]
    except (ValueError, KeyError):
        cls = InternalError
    return cls(message)
