"""Encryption at rest: the master keyring and the sealed-version envelope.

Every version's data is sealed on its own with AES-256-GCM under one key of a
:class:`MasterKeyring`. The envelope is self-describing::

    format (1 byte, 0x01) || master key id (1 byte) || nonce (12 random bytes) || ciphertext+tag

and the AAD binds the envelope header, the key id, the version id and the version's creation time,
so a sealed blob cannot be moved to another key, another version or another timestamp, nor
relabelled with another master key id, without :meth:`MasterKeyring.open` failing.

The ring seals with its **newest** key, the one with the highest id, and opens with any of its
keys. Rotation is therefore: add a key with the next id (:func:`add_key_to_file`), deploy the file
to every server, re-wrap the stored data (:mod:`knox_server.rewrap`), then delete the old line.
Ids run from 0 to 255, so a file allows 256 rotations.

The key file is text, one ``<id>:<base64 of 32 bytes>`` per line; blank lines and lines starting
with ``#`` are ignored. It must not be readable by group or others. No error message, ``repr`` or
``str`` here ever contains key material or plaintext.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import stat
import struct
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from knox.errors import InternalError

__all__ = [
    "ENVELOPE_FORMAT",
    "MASTER_KEY_SIZE",
    "KeyFileError",
    "MasterKeyring",
    "SealedDataError",
    "add_key_to_file",
]

ENVELOPE_FORMAT = 0x01
MASTER_KEY_SIZE = 32
MAX_MASTER_KEY_ID = 255
_NONCE_SIZE = 12
_TAG_SIZE = 16
_HEADER_SIZE = 2
_MIN_SEALED = _HEADER_SIZE + _NONCE_SIZE + _TAG_SIZE
_AAD_LABEL = b"knox-server/version-data\x00"
_U64_MAX = 2**64 - 1
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_ID_RE = re.compile(r"[0-9]{1,3}")
# A key file holds at most 256 short lines; anything far larger is not a key file.
_MAX_FILE_SIZE = 64 * 1024


class SealedDataError(InternalError):
    """Sealed data that cannot be opened: unknown format or master key id, truncated, tampered,
    or bound to another key, version or timestamp. The message never contains the data."""


class KeyFileError(ValueError):
    """A master key file that is missing, unsafe or malformed. The message names the file and the
    line, never the key material."""


class MasterKeyring:
    """Several AES-256 master keys, each with a one-byte id.

    :meth:`seal` uses the key with the highest id (:attr:`current_id`); :meth:`open` uses
    whichever key the envelope names. Each key's ``AESGCM`` object is built once, here.
    """

    __slots__ = ("_aeads", "_current_id")

    def __init__(self, keys: Mapping[int, bytes]) -> None:
        """Raises :class:`ValueError` if ``keys`` is empty, an id is outside 0-255 or a key is
        not 32 bytes long."""
        if not keys:
            raise ValueError("a master keyring needs at least one key")
        aeads: dict[int, AESGCM] = {}
        for key_id, material in keys.items():
            if not 0 <= key_id <= MAX_MASTER_KEY_ID:
                raise ValueError(f"master key id {key_id} is outside 0-{MAX_MASTER_KEY_ID}")
            if len(material) != MASTER_KEY_SIZE:
                raise ValueError(f"master key {key_id} is not {MASTER_KEY_SIZE} bytes long")
            aeads[key_id] = AESGCM(material)
        self._aeads = aeads
        self._current_id = max(aeads)

    def __repr__(self) -> str:
        return f"MasterKeyring(ids={sorted(self._aeads)}, current_id={self._current_id})"

    @property
    def current_id(self) -> int:
        """The id of the key :meth:`seal` uses: the highest id in the ring."""
        return self._current_id

    @property
    def ids(self) -> tuple[int, ...]:
        """Every master key id in the ring, ascending."""
        return tuple(sorted(self._aeads))

    def seal(self, key_id: str, version_id: int, ts: int, plaintext: bytes) -> bytes:
        """Encrypt one version's data under the current master key, with a fresh random nonce.

        Raises :class:`ValueError` if ``version_id`` is not a u64 or ``ts`` not an i64.
        """
        header = bytes((ENVELOPE_FORMAT, self._current_id))
        nonce = secrets.token_bytes(_NONCE_SIZE)
        aad = _aad(header, key_id, version_id, ts)
        return header + nonce + self._aeads[self._current_id].encrypt(nonce, plaintext, aad)

    def open(self, key_id: str, version_id: int, ts: int, sealed: bytes) -> bytes:
        """Decrypt what :meth:`seal` returned for the same key id, version id and timestamp.

        Raises :class:`SealedDataError` if the envelope is malformed or truncated, names a master
        key not in this ring, was tampered with, or was sealed for other ids or another time.
        """
        master_id = self.sealed_key_id(sealed)
        aead = self._aeads.get(master_id)
        if aead is None:
            raise SealedDataError(f"sealed data: master key {master_id} is not in the keyring")
        try:
            aad = _aad(sealed[:_HEADER_SIZE], key_id, version_id, ts)
        except ValueError:
            raise SealedDataError("sealed data: version id or timestamp out of range") from None
        nonce = sealed[_HEADER_SIZE : _HEADER_SIZE + _NONCE_SIZE]
        try:
            return aead.decrypt(nonce, sealed[_HEADER_SIZE + _NONCE_SIZE :], aad)
        except InvalidTag:
            raise SealedDataError(
                "sealed data does not authenticate (tampered, or sealed for another key, "
                "version or timestamp)"
            ) from None

    @staticmethod
    def sealed_key_id(sealed: bytes) -> int:
        """The master key id an envelope names. Raises :class:`SealedDataError` if it is too short
        to be an envelope or has an unknown format byte."""
        if len(sealed) < _MIN_SEALED:
            raise SealedDataError(f"sealed data is truncated ({len(sealed)} bytes)")
        if sealed[0] != ENVELOPE_FORMAT:
            raise SealedDataError(f"sealed data has unknown format {sealed[0]}")
        return sealed[1]

    def needs_rewrap(self, sealed: bytes) -> bool:
        """True if ``sealed`` is not sealed under the current master key. Raises
        :class:`SealedDataError` as :meth:`sealed_key_id` does."""
        return self.sealed_key_id(sealed) != self._current_id

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MasterKeyring:
        """Read a key file. Raises :class:`KeyFileError` if the file cannot be read, is not a
        regular file, is readable or writable by group or others, or has any malformed line, a
        duplicate id, or no key at all."""
        return cls(_parse_key_file(Path(path), _read_key_file(Path(path))))

    @classmethod
    def generate_file(cls, path: str | os.PathLike[str]) -> MasterKeyring:
        """Create a new key file holding one fresh key with id 0, mode 0600, and return its ring.

        The file appears complete or not at all; an existing file is never overwritten
        (:class:`KeyFileError`)."""
        target = Path(path)
        material = secrets.token_bytes(MASTER_KEY_SIZE)
        text = (
            "# knox_server master keys: <id>:<base64 of 32 bytes>; the highest id seals.\n"
            + _key_line(0, material)
        )
        _write_atomically(target, text, replace=False)
        return cls({0: material})


def add_key_to_file(path: str | os.PathLike[str]) -> int:
    """Append a fresh key with the next id (highest + 1) to a valid key file; returns that id.

    The file is rewritten atomically (same content plus one line, mode 0600). Raises
    :class:`KeyFileError` if the file is invalid or already holds id 255. Not safe against another
    process editing the file at the same moment."""
    target = Path(path)
    text = _read_key_file(target)
    keys = _parse_key_file(target, text)
    new_id = max(keys) + 1
    if new_id > MAX_MASTER_KEY_ID:
        raise KeyFileError(f"{target}: already holds master key id {MAX_MASTER_KEY_ID}, the last")
    if text and not text.endswith("\n"):
        text += "\n"
    _write_atomically(target, text + _key_line(new_id, secrets.token_bytes(MASTER_KEY_SIZE)))
    return new_id


def _aad(header: bytes, key_id: str, version_id: int, ts: int) -> bytes:
    # The key id goes last, so the fixed-width fields before it make the encoding unambiguous.
    if not 0 <= version_id <= _U64_MAX or not _I64_MIN <= ts <= _I64_MAX:
        raise ValueError("version id must be a u64 and ts an i64")
    return _AAD_LABEL + header + struct.pack(">Qq", version_id, ts) + key_id.encode("utf-8")


def _key_line(key_id: int, material: bytes) -> str:
    return f"{key_id}:{base64.b64encode(material).decode('ascii')}\n"


def _read_key_file(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot open master key file ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: master key file is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"{path}: master key file has mode {stat.S_IMODE(st.st_mode):04o}; "
                "it must not be accessible by group or others (chmod 600)"
            )
        raw = b""
        while len(raw) <= _MAX_FILE_SIZE:
            chunk = os.read(fd, _MAX_FILE_SIZE + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read master key file ({e.strerror})") from None
    finally:
        os.close(fd)
    if len(raw) > _MAX_FILE_SIZE:
        raise KeyFileError(f"{path}: master key file is larger than {_MAX_FILE_SIZE} bytes")
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: master key file is not ASCII text") from None


def _parse_key_file(path: Path, text: str) -> dict[int, bytes]:
    keys: dict[int, bytes] = {}
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path} line {lineno}"
        id_text, sep, b64 = line.partition(":")
        if not sep:
            raise KeyFileError(f"{where}: expected '<id>:<base64 key>'")
        id_text, b64 = id_text.strip(), b64.strip()
        if not _ID_RE.fullmatch(id_text) or int(id_text) > MAX_MASTER_KEY_ID:
            raise KeyFileError(f"{where}: key id must be an integer from 0 to {MAX_MASTER_KEY_ID}")
        key_id = int(id_text)
        if key_id in keys:
            raise KeyFileError(f"{where}: duplicate key id {key_id}")
        try:
            material = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError(f"{where}: key is not valid base64") from None
        if len(material) != MASTER_KEY_SIZE:
            raise KeyFileError(
                f"{where}: key is {len(material)} bytes, expected {MASTER_KEY_SIZE} (AES-256)"
            )
        keys[key_id] = material
    if not keys:
        raise KeyFileError(f"{path}: master key file holds no key")
    return keys


def _write_atomically(path: Path, text: str, *, replace: bool = True) -> None:
    """Write ``text`` to a 0600 temporary file beside ``path``, fsync it, then move it into place
    (``rename`` when replacing, ``link`` otherwise so an existing file is never clobbered)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot create master key file ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("ascii"))
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KeyFileError(f"{path}: already exists; not overwriting it") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot write master key file ({e.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
