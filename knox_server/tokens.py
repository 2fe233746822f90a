"""The user token file: who a ``0u<token>`` request is, without storing any token.

The file is TOML, one ``[[user]]`` table per user::

    [[user]]
    name = "admin"                      # the user id ACL entries of type User name
    groups = ["security-team"]          # optional; what UserGroup entries match
    token_sha256 = "9f86d081884c7d65…"  # sha256 of the token, 64 hex digits

Nothing else is allowed (an unknown key is an error, so a typo cannot silently disable a user).
Names and groups are non-empty, at most 256 characters, without control characters; names and
token hashes are unique. Tokens themselves are never stored: :func:`new_token` makes one,
:func:`hash_token` gives the line for the file, :func:`write_token_file` writes a whole file.

Errors name the file and the entry (its position and, when known, its name) and never echo a hash
or a token.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from knox.model import User

__all__ = ["TokenDB", "TokenFileError", "hash_token", "new_token", "write_token_file"]

MAX_NAME_LENGTH = 256
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_USER_KEYS = frozenset({"name", "groups", "token_sha256"})


class TokenFileError(ValueError):
    """A token file that cannot be read or is malformed. The message is safe to log."""


def new_token() -> str:
    """A fresh user token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The lowercase hex sha256 of ``token`` (UTF-8), as stored in the token file.

    A plain fast hash is enough because tokens carry 256 random bits: there is nothing to
    brute-force, so a slow password KDF would only cost time on every request.
    """
    # surrogatepass: a header can carry any code point; hashing must not raise on it.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _name_problem(value: object) -> str | None:
    """Why ``value`` is not a valid user or group name, or None if it is."""
    if not isinstance(value, str):
        return "must be a string"
    if not value:
        return "must not be empty"
    if len(value) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 for c in value):
        return "must not contain control characters or lone surrogates"
    return None


def _entry_label(index: int, name: object) -> str:
    if isinstance(name, str) and _name_problem(name) is None:
        return f"user {index} ({name!r})"
    return f"user {index}"


class TokenDB:
    """Users by the sha256 of their token. Immutable once built.

    :meth:`lookup` hashes the presented token and does one dictionary lookup, so its timing
    depends on the hash, which tells an attacker nothing about any stored token.
    """

    __slots__ = ("_by_hash",)

    def __init__(self, users: Iterable[tuple[str, Sequence[str], str]]) -> None:
        """Build from ``(name, groups, token_sha256)`` triples.

        Raises :class:`TokenFileError` for an invalid name or group, a hash that is not 64 hex
        digits, or a repeated name or hash; the message names the entry (counted from 1).
        """
        by_hash: dict[str, User] = {}
        first_by_name: dict[str, int] = {}
        first_by_hash: dict[str, tuple[int, str]] = {}
        for index, (name, groups, raw_digest) in enumerate(users, start=1):
            label = _entry_label(index, name)
            problem = _name_problem(name)
            if problem is not None:
                raise TokenFileError(f"{label}: name {problem}")
            for group in groups:
                problem = _name_problem(group)
                if problem is not None:
                    raise TokenFileError(f"{label}: each group {problem}")
            if not isinstance(raw_digest, str) or _HEX64.fullmatch(raw_digest) is None:
                raise TokenFileError(f"{label}: token_sha256 must be 64 hexadecimal digits")
            if name in first_by_name:
                raise TokenFileError(
                    f"{label}: duplicate name, already used by user {first_by_name[name]}"
                )
            digest = raw_digest.lower()
            if digest in first_by_hash:
                other_index, other_name = first_by_hash[digest]
                raise TokenFileError(f"{label}: same token as user {other_index} ({other_name!r})")
            first_by_name[name] = index
            first_by_hash[digest] = (index, name)
            by_hash[digest] = User(id=name, groups=frozenset(groups))
        self._by_hash = by_hash

    @classmethod
    def parse(cls, text: str, *, source: str = "<token file>") -> TokenDB:
        """Parse the TOML text of a token file; ``source`` names it in error messages.

        Raises :class:`TokenFileError`.
        """
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            # tomllib's messages give a position, never the offending text.
            raise TokenFileError(f"{source}: not valid TOML: {exc}") from None
        unknown = sorted(set(doc) - {"user"})
        if unknown:
            raise TokenFileError(f"{source}: unknown top-level key {unknown[0]!r}")
        entries = doc.get("user", [])
        if not isinstance(entries, list):
            raise TokenFileError(f"{source}: 'user' must be an array of tables ([[user]])")
        try:
            return cls(_entry_triples(entries))
        except TokenFileError as exc:
            raise TokenFileError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenDB:
        """Read and parse the token file at ``path``. Raises :class:`TokenFileError`."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenFileError(f"{os.fspath(path)}: cannot read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise TokenFileError(f"{os.fspath(path)}: not valid UTF-8") from None
        return cls.parse(text, source=os.fspath(path))

    def lookup(self, token: str) -> User | None:
        """The user holding ``token``, or None."""
        return self._by_hash.get(hash_token(token))

    def __len__(self) -> int:
        return len(self._by_hash)

    def __repr__(self) -> str:
        return f"TokenDB(<{len(self._by_hash)} users>)"


def _entry_triples(entries: list[Any]) -> Iterable[tuple[str, Sequence[str], str]]:
    """Check each ``[[user]]`` table's shape and yield it as a triple for :class:`TokenDB`."""
    for index, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise TokenFileError(f"user {index}: must be a table")
        label = _entry_label(index, entry.get("name"))
        unknown = sorted(set(entry) - _USER_KEYS)
        if unknown:
            raise TokenFileError(f"{label}: unknown key {unknown[0]!r}")
        for required in ("name", "token_sha256"):
            if required not in entry:
                raise TokenFileError(f"{label}: missing {required!r}")
        groups = entry.get("groups", [])
        if not isinstance(groups, list):
            raise TokenFileError(f"{label}: groups must be an array of strings")
        yield entry["name"], groups, entry["token_sha256"]


def _toml_string(value: str) -> str:
    # Names are validated to hold no control characters, so JSON's escaping of '"' and '\\' is
    # exactly TOML's basic-string escaping (ensure_ascii=False keeps other characters literal).
    return json.dumps(value, ensure_ascii=False)


def write_token_file(
    path: str | os.PathLike[str], users: Sequence[tuple[str, Sequence[str], str]]
) -> None:
    """Write a token file for ``(name, groups, token)`` triples, storing only token hashes.

    The file is written atomically (a temporary file in the same directory, fsynced, then
    renamed over ``path``) with mode 0600. Raises :class:`TokenFileError` if the entries would not
    load back (bad names, repeated names or tokens, an empty token), or :class:`OSError`.
    """
    for index, (name, _groups, token) in enumerate(users, start=1):
        if not token:
            raise TokenFileError(f"{_entry_label(index, name)}: token must not be empty")
    rows = [(name, list(groups), hash_token(token)) for name, groups, token in users]
    TokenDB(rows)  # validates, with the same messages as loading would give
    lines = ["# knox_server user tokens: sha256 of each token, never the token itself.", ""]
    for name, groups, digest in rows:
        lines += [
            "[[user]]",
            f"name = {_toml_string(name)}",
            f"groups = [{', '.join(_toml_string(g) for g in groups)}]",
            f'token_sha256 = "{digest}"',
            "",
        ]
    _write_atomically(Path(path), "\n".join(lines).encode("utf-8"))


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
