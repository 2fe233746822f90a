"""Sealing and opening cache rows (pure: values in, values out).

A row's blob is ``0x01 || nonce (12 bytes) || AES-256-GCM(plaintext)`` with the AAD
``b"knoxd-cache-v1\\0" + identity + b"\\0" + key_id``, so a blob copied to another identity's or
key's row does not open. The plaintext is one msgpack map::

    {"key": {"id": str, "acl": [[type, id, access], ...],
             "versions": [[id, data (bin), status, ts], ...],
             "hash": str, "path": str, "tink": str},
     "hash": str, "fetched_at": float, "last_error": str | nil}

Enums are stored by their Knox string values; an ACL principal type this version does not know
is kept as :attr:`~knox.model.PrincipalType.UNKNOWN`.
"""

from __future__ import annotations

import os
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from knox.model import Access, AccessType, Key, KeyVersion, PrincipalType, VersionStatus
from knoxd.cache.entry import CacheEntry

__all__ = ["AAD_PREFIX", "ROW_FORMAT", "RowError", "open_entry", "row_aad", "seal_entry"]

AAD_PREFIX = b"knoxd-cache-v1\0"
ROW_FORMAT = 1
_NONCE_BYTES = 12
_HEADER = bytes([ROW_FORMAT])


class RowError(Exception):
    """A row that cannot be opened or decoded. The message says why, never what it holds."""


def row_aad(identity: str, key_id: str) -> bytes:
    return AAD_PREFIX + identity.encode() + b"\0" + key_id.encode()


def seal_entry(aead: AESGCM, entry: CacheEntry) -> bytes:
    """The blob to store in the row (``entry.identity``, ``entry.key_id``)."""
    nonce = os.urandom(_NONCE_BYTES)
    plaintext = msgpack.packb(_entry_to_obj(entry), use_bin_type=True)
    return _HEADER + nonce + aead.encrypt(nonce, plaintext, row_aad(entry.identity, entry.key_id))


def open_entry(aead: AESGCM, identity: str, key_id: str, blob: bytes) -> CacheEntry:
    """Open the blob of row (``identity``, ``key_id``). Raises :class:`RowError`."""
    if len(blob) < 1 + _NONCE_BYTES + 16 or blob[:1] != _HEADER:
        raise RowError("not a sealed row of a known format")
    nonce = blob[1 : 1 + _NONCE_BYTES]
    try:
        plaintext = aead.decrypt(nonce, blob[1 + _NONCE_BYTES :], row_aad(identity, key_id))
    except InvalidTag:
        raise RowError(
            "authentication failed (another cache key, a tampered row, or a row moved from "
            "another identity or key)"
        ) from None
    try:
        obj = msgpack.unpackb(plaintext, raw=False, strict_map_key=True, max_ext_len=0)
        entry = _entry_from_obj(identity, obj)
    except (ValueError, TypeError, KeyError) as e:
        raise RowError(f"undecodable plaintext ({type(e).__name__})") from None
    if entry.key_id != key_id:
        raise RowError("the sealed key id differs from the row's")
    return entry


def _entry_to_obj(entry: CacheEntry) -> dict[str, Any]:
    key = entry.key
    return {
        "key": {
            "id": key.id,
            "acl": [[a.type.value, a.id, a.access.value] for a in key.acl],
            "versions": [[v.id, v.data, v.status.value, v.ts] for v in key.versions],
            "hash": key.hash,
            "path": key.path,
            "tink": key.tink_keyset,
        },
        "hash": entry.hash,
        "fetched_at": float(entry.fetched_at),
        "last_error": entry.last_error,
    }


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"expected {kind}")
    return value


def _entry_from_obj(identity: str, obj: Any) -> CacheEntry:
    obj = _typed(obj, dict)
    k = _typed(obj["key"], dict)
    acl = tuple(
        Access(
            type=PrincipalType(_typed(t, str)),
            id=_typed(pid, str),
            access=AccessType(_typed(access, str)),
        )
        for t, pid, access in _typed(k["acl"], list)
    )
    versions = tuple(
        KeyVersion(
            id=_typed(vid, int),
            data=_typed(data, bytes),
            status=VersionStatus(_typed(status, str)),
            ts=_typed(ts, int),
        )
        for vid, data, status, ts in _typed(k["versions"], list)
    )
    last_error = obj["last_error"]
    return CacheEntry(
        identity=identity,
        key=Key(
            id=_typed(k["id"], str),
            acl=acl,
            versions=versions,
            hash=_typed(k["hash"], str),
            path=_typed(k["path"], str),
            tink_keyset=_typed(k["tink"], str),
        ),
        hash=_typed(obj["hash"], str),
        fetched_at=_typed(obj["fetched_at"], float),
        last_error=None if last_error is None else _typed(last_error, str),
    )
