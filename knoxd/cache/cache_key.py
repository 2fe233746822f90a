"""The cache key: the AES-256-GCM key that seals every row of knoxd's on-disk cache.

Where it comes from, in order:

1. a systemd credential, ``$CREDENTIALS_DIRECTORY/knoxd-cache-key`` (so it can be TPM-sealed with
   ``LoadCredentialEncrypted=``), holding 32 raw bytes or the base64 of 32 bytes. When the variable
   is set but this credential is not among the unit's credentials, the key file is used, with a
   warning;
2. else ``<state_dir>/cache.key``, 32 raw bytes, owned by the daemon's user with no group or other
   permissions. An existing file that is group- or world-accessible, owned by someone else, not a
   regular file, or not a key is refused (:class:`CacheKeyError`): the daemon does not start on a
   key that others may have read;
3. else a new key file is created: written to a temporary file (mode 0600, ``O_EXCL``), fsynced,
   then linked into place, which fails if another start got there first. A crash at any point
   leaves either no key file or a complete one.

A new key cannot open rows sealed under an old one; :class:`~knoxd.cache.store.CacheStore` drops
such rows when it loads them, so a lost key costs a cold start, never correctness.

These functions block on small file I/O; call them at start-up or through ``trio.to_thread``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

__all__ = [
    "CREDENTIAL_NAME",
    "KEY_BYTES",
    "KEY_FILE_NAME",
    "CacheKey",
    "CacheKeyError",
    "CacheKeySource",
    "decode_key_material",
    "load_cache_key",
]

CREDENTIAL_NAME = "knoxd-cache-key"
KEY_FILE_NAME = "cache.key"
KEY_BYTES = 32
_TMP_NAME = ".cache.key.tmp"
_MAX_KEY_FILE_BYTES = 1024

log = structlog.get_logger("knoxd.cache")


class CacheKeyError(Exception):
    """The cache key exists but must not or cannot be used. The message never shows key bytes."""


class CacheKeySource(enum.Enum):
    CREDENTIAL = "credential"
    FILE = "file"
    CREATED = "created"


@dataclass(frozen=True, slots=True)
class CacheKey:
    """32 key bytes, where they came from, and the file they were read from or written to."""

    key: bytes = field(repr=False)
    source: CacheKeySource
    path: Path

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ValueError(f"a cache key is {KEY_BYTES} bytes")


def decode_key_material(raw: bytes, what: str) -> bytes:
    """32 raw bytes as they are, or base64 (surrounding whitespace ignored) of 32 bytes.

    Raises :class:`CacheKeyError` naming ``what`` otherwise.
    """
    if len(raw) == KEY_BYTES:
        return raw
    try:
        decoded = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != KEY_BYTES:
        raise CacheKeyError(
            f"{what}: expected {KEY_BYTES} raw bytes or base64 of {KEY_BYTES} bytes "
            f"(found {len(raw)} bytes)"
        )
    return decoded


def load_cache_key(state_dir: Path, environ: Mapping[str, str] | None = None) -> CacheKey:
    """Find or create the cache key (see the module docstring). Raises :class:`CacheKeyError`."""
    env = os.environ if environ is None else environ
    credentials = env.get("CREDENTIALS_DIRECTORY")
    if credentials:
        cred_path = Path(credentials) / CREDENTIAL_NAME
        try:
            raw = _read_limited(cred_path)
        except FileNotFoundError:
            log.warning(
                "no cache key credential; using the key file",
                credential=str(cred_path),
                key_file=str(state_dir / KEY_FILE_NAME),
            )
        except OSError as e:
            raise CacheKeyError(f"{cred_path}: cannot read: {e.strerror or e}") from None
        else:
            key = decode_key_material(raw, str(cred_path))
            return CacheKey(key, CacheKeySource.CREDENTIAL, cred_path)
    path = state_dir / KEY_FILE_NAME
    key_or_none = _read_key_file(path)
    if key_or_none is not None:
        return CacheKey(key_or_none, CacheKeySource.FILE, path)
    created = _create_key_file(state_dir, path)
    if created is None:
        # Another start linked its key in first: use that one.
        existing = _read_key_file(path)
        if existing is None:
            raise CacheKeyError(f"{path}: vanished while being created")
        return CacheKey(existing, CacheKeySource.FILE, path)
    log.info("created a new cache key", key_file=str(path))
    return CacheKey(created, CacheKeySource.CREATED, path)


def _read_limited(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return f.read(_MAX_KEY_FILE_BYTES + 1)


def _read_key_file(path: Path) -> bytes | None:
    """The key in ``path``; None if there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CacheKeyError(f"{path}: cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CacheKeyError(f"{path}: not a regular file")
        if st.st_uid != os.geteuid():
            raise CacheKeyError(
                f"{path}: owned by uid {st.st_uid}, not by this daemon (uid {os.geteuid()})"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise CacheKeyError(
                f"{path}: mode {mode:04o} gives group or others access; the key may have been "
                "read. Remove the file for a cold start with a new key, or chmod 600 it if it "
                "was never exposed"
            )
        raw = os.read(fd, _MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise CacheKeyError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    return decode_key_material(raw, str(path))


def _create_key_file(state_dir: Path, path: Path) -> bytes | None:
    """Create ``path`` with a new random key; None if it appeared meanwhile."""
    key = os.urandom(KEY_BYTES)
    tmp = state_dir / _TMP_NAME
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A leftover from a start that crashed before linking holds no key anyone uses.
        tmp.unlink(missing_ok=True)
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(key)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
        _fsync_dir(state_dir)
    except OSError as e:
        raise CacheKeyError(f"{path}: cannot create: {e.strerror or e}") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            log.warning("could not remove temporary key file", path=str(tmp))
    return key


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
