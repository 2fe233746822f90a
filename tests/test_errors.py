"""knox.errors: the v0 code table, its HTTP statuses, and the exception for each code."""

from __future__ import annotations

import pytest

from knox import errors
from knox.errors import HTTP_STATUS, Code, KnoxError, error_for_code
from knox.model import (
    InvalidACLError,
    InvalidKeyError,
    InvalidKeyIDError,
    StatusTransitionError,
)
from knox.wire import WireError

# Knox's HTTPErrMap (server/api.go), code by code.
GO_TABLE = {
    0: 200,
    1: 500,
    2: 400,
    3: 404,
    4: 404,
    5: 401,
    6: 403,
    7: 501,
    8: 404,
    9: 400,
    10: 400,
    11: 400,
    12: 400,
    13: 400,
}

CLASSES = {
    1: errors.InternalError,
    2: errors.KeyExistsError,
    3: errors.VersionNotFoundError,
    4: errors.KeyNotFoundError,
    5: errors.UnauthenticatedError,
    6: errors.UnauthorizedError,
    7: errors.NotYetImplementedError,
    8: errors.RouteNotFoundError,
    9: errors.NoKeyIDError,
    10: errors.NoKeyDataError,
    11: errors.BadRequestDataError,
    12: errors.BadKeyFormatError,
    13: errors.BadPrincipalError,
}


def test_codes_are_knox_iota_order() -> None:
    assert [int(c) for c in Code] == list(range(14))
    assert Code(11) is Code.BAD_REQUEST_DATA
    assert Code(13) is Code.BAD_PRINCIPAL_IDENTIFIER


def test_http_status_table_is_complete_and_exact() -> None:
    assert {int(code): status for code, status in HTTP_STATUS.items()} == GO_TABLE
    assert set(HTTP_STATUS) == set(Code)


@pytest.mark.parametrize(("code", "cls"), sorted(CLASSES.items()))
def test_error_for_code(code: int, cls: type[KnoxError]) -> None:
    error = error_for_code(code, "No such key foo")
    assert type(error) is cls
    assert error.code == code
    assert error.http_status == GO_TABLE[code]
    assert str(error) == error.message == "No such key foo"
    assert repr(error) == f"{cls.__name__}(code={code}, message='No such key foo')"
    assert isinstance(error, KnoxError)


@pytest.mark.parametrize("code", [0, 14, -1, 999])
def test_error_for_unexpected_code_is_internal(code: int) -> None:
    error = error_for_code(code, "odd")
    assert type(error) is errors.InternalError
    assert error.code == Code.INTERNAL_SERVER_ERROR
    assert error.http_status == 500
    assert str(error) == "odd"


def test_every_exception_class_is_exported_with_a_status() -> None:
    exported = {
        getattr(errors, name)
        for name in errors.__all__
        if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), KnoxError)
    }
    assert set(CLASSES.values()) | {KnoxError, errors.ConcurrentChangeError} == exported
    for cls in exported:
        assert cls("x").http_status == GO_TABLE[int(cls.code)]


def test_concurrent_change_is_a_500() -> None:
    error = errors.ConcurrentChangeError("key changed")
    assert isinstance(error, errors.InternalError)
    assert error.http_status == 500


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (WireError, 11),
        (StatusTransitionError, 11),
        (InvalidKeyIDError, 12),
        (InvalidACLError, 1),
        (InvalidKeyError, 1),
    ],
)
def test_core_errors_carry_their_codes(cls: type[KnoxError], code: int) -> None:
    error = cls("m")
    assert error.code == code
    assert error.http_status == GO_TABLE[code]


def test_default_message_is_empty() -> None:
    assert str(errors.RouteNotFoundError()) == ""
    assert errors.RouteNotFoundError().http_status == 404
