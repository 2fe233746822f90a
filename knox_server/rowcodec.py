"""The column codecs shared by the key store backends, so SQLite and PostgreSQL store the same
bytes and read them back with the same checks.

A key is one row: ``acl`` is the ACL in Knox's JSON form (readable with any SQL shell),
``versions`` the version list in the compact msgpack form of :func:`encode_versions` (each
version's data stays sealed), ``hash`` and ``row_version`` as they are. Decoding is strict: a
column that does not decode raises :class:`CorruptRowError` naming the key and the column, never
quoting the value.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import msgpack

from knox.errors import InternalError
from knox.model import ACL, PrincipalType, VersionStatus
from knox.wire import WireError, acl_from_obj, acl_to_obj, decode_json, dumps
from knox_server.store import KeyMeta, StoredKey, StoredVersion

__all__ = [
    "ColumnFormatError",
    "CorruptRowError",
    "decode_acl",
    "decode_meta",
    "decode_row",
    "decode_row_version_column",
    "decode_versions",
    "decode_versions_column",
    "encode_acl",
    "encode_columns",
    "encode_versions",
]

_ACL_CACHE_SIZE = 4096
_U64_MAX = 2**64 - 1
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_STATUSES = {s.value: s for s in VersionStatus}


class ColumnFormatError(ValueError):
    """A column value that does not encode or decode; the message says which part and why."""


class CorruptRowError(InternalError):
    """A stored row that does not decode. The message names the key and the column only."""


def encode_acl(acl: ACL) -> str:
    """The ACL as Knox's JSON array text."""
    return dumps(acl_to_obj(acl)).decode("utf-8")


@functools.lru_cache(maxsize=_ACL_CACHE_SIZE)
def _decode_acl_cached(text: str) -> ACL:
    acl = acl_from_obj(decode_json(text, "acl"))
    if any(e.type is PrincipalType.UNKNOWN for e in acl):
        raise WireError("acl: unknown principal type")
    return acl


def decode_acl(text: str) -> ACL:
    """Inverse of :func:`encode_acl`; raises :class:`~knox.wire.WireError` on malformed text.

    Results are memoised by text: the change-check route decodes the same few ACLs constantly.
    """
    return _decode_acl_cached(text)


def encode_versions(versions: Iterable[StoredVersion]) -> bytes:
    """The version list as msgpack: an array of ``[id, status, ts, sealed]`` arrays, in order.

    Raises :class:`ColumnFormatError` if an id is not a u64 or a ts not an i64 (they would not
    decode).
    """
    items = []
    for i, v in enumerate(versions):
        if not 0 <= v.id <= _U64_MAX:
            raise ColumnFormatError(f"version {i}: id is not a 64-bit unsigned integer")
        if not _I64_MIN <= v.ts <= _I64_MAX:
            raise ColumnFormatError(f"version {i}: ts is not a 64-bit signed integer")
        items.append([v.id, v.status.value, v.ts, v.sealed])
    packed = msgpack.packb(items, use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


def decode_versions(raw: bytes) -> tuple[StoredVersion, ...]:
    """Inverse of :func:`encode_versions`; :class:`ColumnFormatError` on anything malformed."""
    try:
        obj = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ColumnFormatError(f"not msgpack ({type(e).__name__})") from None
    if not isinstance(obj, list):
        raise ColumnFormatError("expected an array of versions")
    versions = []
    for i, item in enumerate(obj):
        if not (isinstance(item, list) and len(item) == 4):
            raise ColumnFormatError(f"version {i}: expected a 4-element array")
        vid, status, ts, sealed = item
        if type(vid) is not int or not 0 <= vid <= _U64_MAX:
            raise ColumnFormatError(f"version {i}: bad id")
        if not isinstance(status, str) or status not in _STATUSES:
            raise ColumnFormatError(f"version {i}: bad status")
        if type(ts) is not int or not _I64_MIN <= ts <= _I64_MAX:
            raise ColumnFormatError(f"version {i}: bad ts")
        if not isinstance(sealed, bytes):
            raise ColumnFormatError(f"version {i}: sealed data is not bytes")
        versions.append(StoredVersion(id=vid, sealed=sealed, status=_STATUSES[status], ts=ts))
    return tuple(versions)


def decode_row(
    key_id: str, acl: object, hash_: object, versions: object, row_version: object
) -> StoredKey:
    """A :class:`StoredKey` from raw column values; :class:`CorruptRowError` naming the key and the
    column if any does not decode."""
    return StoredKey(
        id=key_id,
        acl=_decode_acl_column(key_id, acl),
        versions=decode_versions_column(key_id, versions),
        hash=_decode_hash_column(key_id, hash_),
        row_version=decode_row_version_column(key_id, row_version),
    )


def decode_meta(key_id: str, acl: object, hash_: object) -> KeyMeta:
    """A :class:`KeyMeta` from raw column values; :class:`CorruptRowError` as :func:`decode_row`."""
    return KeyMeta(hash=_decode_hash_column(key_id, hash_), acl=_decode_acl_column(key_id, acl))


def _decode_acl_column(key_id: str, value: object) -> ACL:
    if not isinstance(value, str):
        raise CorruptRowError(f"stored key {key_id}: acl column is not text")
    try:
        return decode_acl(value)
    except WireError as e:
        raise CorruptRowError(f"stored key {key_id}: acl column does not decode ({e})") from None


def decode_versions_column(key_id: str, value: object) -> tuple[StoredVersion, ...]:
    """The ``versions`` column; :class:`CorruptRowError` as :func:`decode_row`."""
    if not isinstance(value, bytes):
        raise CorruptRowError(f"stored key {key_id}: versions column is not a blob")
    try:
        return decode_versions(value)
    except ColumnFormatError as e:
        raise CorruptRowError(f"stored key {key_id}: versions column: {e}") from None


def _decode_hash_column(key_id: str, value: object) -> str:
    if not isinstance(value, str):
        raise CorruptRowError(f"stored key {key_id}: hash column is not text")
    return value


def decode_row_version_column(key_id: str, value: object) -> int:
    """The ``row_version`` column; :class:`CorruptRowError` as :func:`decode_row`."""
    if type(value) is not int:
        raise CorruptRowError(f"stored key {key_id}: row_version column is not an integer")
    return value


def encode_columns(key: StoredKey) -> tuple[str, bytes]:
    """The ``acl`` and ``versions`` columns of ``key``; :class:`~knox.errors.InternalError` naming
    the key if it cannot be stored (nothing is written then)."""
    try:
        return encode_acl(key.acl), encode_versions(key.versions)
    except (ColumnFormatError, WireError) as e:
        raise InternalError(f"Key {key.id} cannot be stored: {e}") from None
