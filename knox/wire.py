"""Knox v0 JSON, byte-compatible with the Go server.

Encoding matches Go's ``encoding/json``: compact, fields in struct order, ``<``, ``>``, ``&``,
U+2028 and U+2029 escaped as ``\\u003c``-style sequences, non-ASCII text as UTF-8, ``[]byte`` as
standard padded base64, string enums. The response envelope is
``{"status","code","host","ts","message","data"}`` followed by a newline, as ``json.Encoder``
writes it.

Decoding accepts what the Go server sends and rejects anything malformed with a
:class:`WireError` whose message names the offending field; it never raises anything else.
Unknown principal types decode to :attr:`PrincipalType.UNKNOWN` (Knox's forward compatibility)
and cannot be encoded.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from knox.errors import BadRequestDataError, Code
from knox.model import (
    ACL,
    Access,
    AccessType,
    Key,
    KeyVersion,
    PrincipalType,
    VersionStatus,
)

__all__ = [
    "MAX_UINT64",
    "Response",
    "WireError",
    "access_from_obj",
    "access_to_obj",
    "acl_from_obj",
    "acl_to_obj",
    "decode_access",
    "decode_acl",
    "decode_json",
    "decode_key",
    "decode_response",
    "decode_status",
    "dumps",
    "encode_acl",
    "encode_key",
    "envelope",
    "error_envelope",
    "key_from_obj",
    "key_ids_from_obj",
    "key_to_obj",
    "ok_envelope",
    "version_from_obj",
    "version_id_from_obj",
    "version_to_obj",
]

MAX_UINT64 = 2**64 - 1
MIN_INT64 = -(2**63)
MAX_INT64 = 2**63 - 1

_PRINCIPAL_TYPES = {t.value: t for t in PrincipalType if t is not PrincipalType.UNKNOWN}
_ACCESS_TYPES = {a.value: a for a in AccessType}
_STATUSES = {s.value: s for s in VersionStatus}
_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class WireError(BadRequestDataError):
    """Malformed Knox JSON. The message says which field and why; it never echoes secret data."""


def dumps(obj: Any) -> bytes:
    """Serialize like Go's ``json.Marshal`` (compact, HTML-escaped, UTF-8).

    A lone surrogate, which has no UTF-8 form, becomes U+FFFD as Go writes invalid UTF-8.
    """
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if any(c in text for c in _GO_ESCAPES):
        text = "".join(_GO_ESCAPES.get(c, c) for c in text)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text).encode("utf-8")


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are Python extensions, not JSON; Go refuses them.
    raise ValueError(name)


def _finite_float(text: str) -> float:
    # "1e400" would become inf, which nothing can encode again; Go refuses it as out of range.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def decode_json(raw: bytes | str, what: str) -> Any:
    """Parse strict JSON text; :class:`WireError` naming ``what`` if it is not JSON."""
    try:
        return json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise WireError(f"invalid JSON in {what}") from None


# --- encoding --------------------------------------------------------------------------------


def access_to_obj(entry: Access) -> dict[str, Any]:
    if entry.type is PrincipalType.UNKNOWN:
        raise WireError("json: Invalid PrincipalType to convert")
    return {"type": entry.type.value, "id": entry.id, "access": entry.access.value}


def acl_to_obj(acl: ACL) -> list[dict[str, Any]]:
    return [access_to_obj(e) for e in acl]


def version_to_obj(v: KeyVersion) -> dict[str, Any]:
    """Raises :class:`WireError` for an id or timestamp Go's uint64/int64 fields cannot hold."""
    if not 0 <= v.id <= MAX_UINT64:
        raise WireError("version id out of uint64 range")
    if not MIN_INT64 <= v.ts <= MAX_INT64:
        raise WireError("version ts out of int64 range")
    return {
        "id": v.id,
        "data": base64.b64encode(v.data).decode("ascii"),
        "status": v.status.value,
        "ts": v.ts,
    }


def key_to_obj(key: Key) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": key.id,
        "acl": acl_to_obj(key.acl),
        "versions": [version_to_obj(v) for v in key.versions],
        "hash": key.hash,
    }
    if key.path:
        obj["path"] = key.path
    if key.tink_keyset:
        obj["tinkKeyset"] = key.tink_keyset
    return obj


def encode_key(key: Key) -> bytes:
    return dumps(key_to_obj(key))


def encode_acl(acl: ACL) -> bytes:
    return dumps(acl_to_obj(acl))


def envelope(
    *, status: str, code: int, host: str, ts: int, message: str, data_json: bytes
) -> bytes:
    """The v0 response envelope around already-encoded ``data`` JSON, with Go's trailing newline."""
    head = dumps({"status": status, "code": code, "host": host, "ts": ts, "message": message})
    return head[:-1] + b',"data":' + data_json + b"}\n"


def ok_envelope(data: Any, *, host: str, ts: int) -> bytes:
    return envelope(status="ok", code=0, host=host, ts=ts, message="", data_json=dumps(data))


def error_envelope(code: int, message: str, *, host: str, ts: int) -> bytes:
    return envelope(status="error", code=code, host=host, ts=ts, message=message, data_json=b"null")


# --- decoding --------------------------------------------------------------------------------


def _field(obj: Mapping[str, Any], name: str, what: str) -> Any:
    if name not in obj:
        raise WireError(f"{what}: missing field {name!r}")
    return obj[name]


def _expect_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise WireError(f"{what}: expected a string")
    return value


def _expect_int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise WireError(f"{what}: expected an integer in [{lo}, {hi}]")
    return value


def _expect_object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise WireError(f"{what}: expected an object")
    return value


def _expect_list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise WireError(f"{what}: expected an array")
    return value


def decode_status(value: Any, what: str = "status") -> VersionStatus:
    """A VersionStatus from its JSON string value; Knox's text on failure."""
    if isinstance(value, str) and value in _STATUSES:
        return _STATUSES[value]
    raise WireError("json: Invalid VersionStatus to convert")


def access_from_obj(value: Any, what: str = "access") -> Access:
    obj = _expect_object(value, what)
    raw_type = _field(obj, "type", what)
    ptype = (
        _PRINCIPAL_TYPES.get(raw_type, PrincipalType.UNKNOWN) if isinstance(raw_type, str) else None
    )
    if ptype is None:
        raise WireError(f"{what}.type: expected a string")
    raw_access = _field(obj, "access", what)
    if not isinstance(raw_access, str) or raw_access not in _ACCESS_TYPES:
        raise WireError("json: Invalid AccessType to convert")
    return Access(
        type=ptype,
        id=_expect_str(_field(obj, "id", what), f"{what}.id"),
        access=_ACCESS_TYPES[raw_access],
    )


def acl_from_obj(value: Any, what: str = "acl") -> ACL:
    if value is None:
        return ()
    return tuple(
        access_from_obj(e, f"{what}[{i}]") for i, e in enumerate(_expect_list(value, what))
    )


def _decode_data(value: Any, what: str) -> bytes:
    if value is None:
        return b""
    text = _expect_str(value, what)
    # b64decode lets excess padding through ("YWJj=="); Go's decoder does not.
    if len(text) % 4:
        raise WireError(f"{what}: invalid base64")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise WireError(f"{what}: invalid base64") from None


def version_from_obj(value: Any, what: str) -> KeyVersion:
    obj = _expect_object(value, what)
    return KeyVersion(
        id=_expect_int(_field(obj, "id", what), f"{what}.id", 0, MAX_UINT64),
        data=_decode_data(obj.get("data"), f"{what}.data"),
        status=decode_status(_field(obj, "status", what), f"{what}.status"),
        ts=_expect_int(obj.get("ts", 0), f"{what}.ts", MIN_INT64, MAX_INT64),
    )


def key_from_obj(value: Any, what: str = "key") -> Key:
    obj = _expect_object(value, what)
    versions = _expect_list(_field(obj, "versions", what), f"{what}.versions")
    return Key(
        id=_expect_str(_field(obj, "id", what), f"{what}.id"),
        acl=acl_from_obj(obj.get("acl"), f"{what}.acl"),
        versions=tuple(
            version_from_obj(v, f"{what}.versions[{i}]") for i, v in enumerate(versions)
        ),
        hash=_expect_str(_field(obj, "hash", what), f"{what}.hash"),
        path=_expect_str(obj.get("path", ""), f"{what}.path"),
        tink_keyset=_expect_str(obj.get("tinkKeyset", ""), f"{what}.tinkKeyset"),
    )


def decode_key(raw: bytes | str) -> Key:
    return key_from_obj(decode_json(raw, "key"))


def decode_acl(raw: bytes | str) -> ACL:
    return acl_from_obj(decode_json(raw, "acl"))


def decode_access(raw: bytes | str) -> Access:
    return access_from_obj(decode_json(raw, "access"))


@dataclass(frozen=True, slots=True)
class Response:
    """A decoded v0 envelope. ``data`` is the raw JSON value, for the caller to interpret."""

    status: str
    code: int
    host: str
    ts: int
    message: str
    data: Any

    @property
    def ok(self) -> bool:
        return self.code == Code.OK


def decode_response(raw: bytes | str) -> Response:
    """Decode a v0 envelope; :class:`WireError` if it is not one."""
    obj = _expect_object(decode_json(raw, "response"), "response")
    return Response(
        status=_expect_str(_field(obj, "status", "response"), "response.status"),
        code=_expect_int(_field(obj, "code", "response"), "response.code", 0, 2**31),
        host=_expect_str(obj.get("host", ""), "response.host"),
        ts=_expect_int(obj.get("ts", 0), "response.ts", MIN_INT64, MAX_INT64),
        message=_expect_str(obj.get("message", ""), "response.message"),
        data=obj.get("data"),
    )


def key_ids_from_obj(value: Any, what: str = "data") -> list[str]:
    """The ``[]string`` of ``GET /v0/keys/``."""
    if value is None:
        return []
    return [_expect_str(v, f"{what}[{i}]") for i, v in enumerate(_expect_list(value, what))]


def version_id_from_obj(value: Any, what: str = "data") -> int:
    return _expect_int(value, what, 0, MAX_UINT64)
