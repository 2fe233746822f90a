"""Knox's data model: keys, versions, ACLs, principals, the version hash and status transitions.

Everything here is pure: values in, values out, no I/O. The rules are Pinterest Knox's (``knox.go``)
to the letter, including its error texts, with three deliberate tightenings that cost compatibility
nothing:

* a :class:`PrincipalType.SERVICE_PREFIX` entry always matches whole path components, even if it was
  stored without its trailing slash (Knox's create route never validated it);
* a key id longer than :data:`MAX_KEY_ID_LENGTH` is invalid (Knox's SQL schema enforced it
  silently);
* an empty MachinePrefix or ServicePrefix entry matches nobody (Knox's plain prefix test matched
  everyone; its ACL route refuses such entries, its create route did not).

:meth:`PrincipalMux.is_user` looks through every principal, as upstream does since PR #124.

Secret bytes never appear in a ``repr``.
"""

from __future__ import annotations

import enum
import hashlib
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol
from urllib.parse import urlsplit

from knox.errors import (
    BadKeyFormatError,
    BadPrincipalError,
    BadRequestDataError,
    InternalError,
    VersionNotFoundError,
)

__all__ = [
    "ACL",
    "MAX_KEY_ID_LENGTH",
    "Access",
    "AccessType",
    "InvalidACLError",
    "InvalidKeyError",
    "InvalidKeyIDError",
    "Key",
    "KeyVersion",
    "Machine",
    "Principal",
    "PrincipalMux",
    "PrincipalType",
    "Service",
    "StatusTransitionError",
    "User",
    "VersionStatus",
    "acl_add",
    "acl_allows",
    "acl_validate",
    "is_valid_key_id",
    "update_status",
    "validate_key_id",
    "validate_principal",
    "version_hash",
]

MAX_KEY_ID_LENGTH = 512
_KEY_ID_RE = re.compile(r"[a-zA-Z0-9_:]+")

ERR_INVALID_KEY_ID = "KeyID can only contain alphanumeric characters, colons, and underscores."
ERR_ACL_DUPLICATE = "Duplicate entries in ACL"
ERR_ACL_NONE = "ACL contains None access"
ERR_ACL_EMPTY_PRINCIPAL = (
    "Principals of type user, user group, machine, or machine prefix may not be empty."
)
ERR_ACL_SERVICE_URL = (
    "Service prefix is invalid URL, must conform to 'spiffe://<domain>/<path>/' format."
)
ERR_ACL_SERVICE_NO_SLASH = (
    "Service prefix had no trailing slash, must conform to 'spiffe://<domain>/<path>/' format."
)
ERR_ACL_UNKNOWN_TYPE = "json: Invalid PrincipalType to convert"
ERR_INVALID_HASH = "Hash does not match"
ERR_INACTIVE_TO_PRIMARY = "Version must be Active to promote to Primary"
ERR_PRIMARY_TO_ACTIVE = "Primary Key can not be demoted. Specify Active key to promote."
ERR_PRIMARY_TO_INACTIVE = "Version must be Active to demote to Inactive"
ERR_MULTIPLE_PRIMARY = "More than one Primary key"
ERR_SAME_VERSION_ID = "Repeated Version ID"
ERR_VERSION_NOT_FOUND = "Key version not found"


class InvalidKeyIDError(BadKeyFormatError):
    """A key id that does not match ``^[a-zA-Z0-9_:]+$`` or is too long."""


class InvalidACLError(InternalError):
    """An ACL holding a ``None`` entry or a duplicate (type, id) pair (Knox answers 500)."""


class InvalidKeyError(InternalError):
    """A version list without exactly one Primary, with a repeated id, or a wrong hash."""


class StatusTransitionError(BadRequestDataError):
    """A version status change that Knox's rules forbid (400, code 11)."""


class VersionStatus(enum.Enum):
    """A version's place in rotation. Ordered Primary < Active < Inactive, as Knox sorts them."""

    PRIMARY = "Primary"
    ACTIVE = "Active"
    INACTIVE = "Inactive"

    @property
    def rank(self) -> int:
        return _STATUS_RANK[self]


_STATUS_RANK = {VersionStatus.PRIMARY: 0, VersionStatus.ACTIVE: 1, VersionStatus.INACTIVE: 2}


class AccessType(enum.Enum):
    """Access levels, ordered None < Read < Write < Admin."""

    NONE = "None"
    READ = "Read"
    WRITE = "Write"
    ADMIN = "Admin"

    @property
    def level(self) -> int:
        return _ACCESS_LEVEL[self]

    def can_access(self, required: AccessType) -> bool:
        """True if this grant covers ``required`` (``Admin ⊃ Write ⊃ Read``)."""
        return self.level >= required.level


_ACCESS_LEVEL = {AccessType.NONE: 0, AccessType.READ: 1, AccessType.WRITE: 2, AccessType.ADMIN: 3}


class PrincipalType(enum.Enum):
    """ACL principal types. ``UNKNOWN`` is what an unrecognised JSON value decodes to."""

    USER = "User"
    USER_GROUP = "UserGroup"
    MACHINE = "Machine"
    MACHINE_PREFIX = "MachinePrefix"
    SERVICE = "Service"
    SERVICE_PREFIX = "ServicePrefix"
    UNKNOWN = "<unknown>"


@dataclass(frozen=True, slots=True)
class Access:
    """One ACL entry: a principal (type and id) and what it may do."""

    type: PrincipalType
    id: str
    access: AccessType


ACL = tuple[Access, ...]


@dataclass(frozen=True, slots=True)
class KeyVersion:
    """One version of a key. ``data`` is the secret; it is left out of ``repr``."""

    id: int
    data: bytes = field(repr=False)
    status: VersionStatus
    ts: int

    def __repr__(self) -> str:
        return (
            f"KeyVersion(id={self.id}, data=<{len(self.data)} bytes>, "
            f"status={self.status.value}, ts={self.ts})"
        )


@dataclass(frozen=True, slots=True)
class Key:
    """A Knox key. ``path`` and ``tink_keyset`` are client-side fields (omitted when empty)."""

    id: str
    acl: ACL
    versions: tuple[KeyVersion, ...]
    hash: str
    path: str = ""
    tink_keyset: str = field(default="", repr=False)

    @property
    def primary(self) -> KeyVersion:
        """The Primary version. Raises :class:`InvalidKeyError` if there is none."""
        for v in self.versions:
            if v.status is VersionStatus.PRIMARY:
                return v
        raise InvalidKeyError(ERR_MULTIPLE_PRIMARY)

    @property
    def active(self) -> tuple[KeyVersion, ...]:
        """Primary and Active versions, in stored order."""
        return tuple(v for v in self.versions if v.status is not VersionStatus.INACTIVE)

    def version(self, version_id: int) -> KeyVersion:
        """The version with that id. Raises :class:`VersionNotFoundError`."""
        for v in self.versions:
            if v.id == version_id:
                return v
        raise VersionNotFoundError(ERR_VERSION_NOT_FOUND)

    def filtered(self, status: VersionStatus) -> Key:
        """The key as ``GET /v0/keys/ID/?status=…`` returns it: versions at most ``status``.

        The hash stays the hash of the full list, as Knox sends it.
        """
        kept = tuple(v for v in self.versions if v.status.rank <= status.rank)
        return replace(self, versions=kept)

    def validate(self) -> None:
        """Knox's ``Key.Validate``: id, ACL, versions, hash, in that order.

        Raises :class:`InvalidKeyIDError`, :class:`InvalidACLError` or :class:`InvalidKeyError`.
        """
        validate_key_id(self.id)
        acl_validate(self.acl)
        validate_versions(self.versions)
        if self.hash != version_hash(self.versions):
            raise InvalidKeyError(ERR_INVALID_HASH)


def is_valid_key_id(key_id: str) -> bool:
    return len(key_id) <= MAX_KEY_ID_LENGTH and _KEY_ID_RE.fullmatch(key_id) is not None


def validate_key_id(key_id: str) -> None:
    """Raises :class:`InvalidKeyIDError` with Knox's text if ``key_id`` is not a valid id."""
    if not is_valid_key_id(key_id):
        raise InvalidKeyIDError(ERR_INVALID_KEY_ID)


def version_hash(versions: Iterable[KeyVersion]) -> str:
    """Knox's version hash: sha256 over the LE u64 ids of the Primary, then the Actives ascending,
    then 8 zero bytes per Inactive version; lowercase hex. Independent of input order."""
    ordered = sorted(versions, key=lambda v: (v.status.rank, v.id))
    buf = b"".join(
        struct.pack("<Q", v.id) if v.status is not VersionStatus.INACTIVE else b"\0" * 8
        for v in ordered
    )
    return hashlib.sha256(buf).hexdigest()


def validate_versions(versions: Sequence[KeyVersion]) -> None:
    """Unique version ids (checked first, as Knox does) and exactly one Primary."""
    seen: set[int] = set()
    primaries = 0
    for v in versions:
        if v.status is VersionStatus.PRIMARY:
            primaries += 1
        if v.id in seen:
            raise InvalidKeyError(ERR_SAME_VERSION_ID)
        seen.add(v.id)
    if primaries != 1:
        raise InvalidKeyError(ERR_MULTIPLE_PRIMARY)


def update_status(
    versions: Sequence[KeyVersion], version_id: int, status: VersionStatus
) -> tuple[KeyVersion, ...]:
    """Knox's ``KeyVersionList.Update``: returns the new list, order kept.

    Only Active→Primary (the old Primary becomes Active), Inactive→Active and Active→Inactive are
    allowed. Raises :class:`StatusTransitionError` (code 11) with Knox's exact texts, or
    :class:`VersionNotFoundError` (code 3) if no version has that id.
    """
    target = next((v for v in versions if v.id == version_id), None)
    if target is None:
        raise VersionNotFoundError(ERR_VERSION_NOT_FOUND)
    if status is VersionStatus.PRIMARY:
        if target.status is not VersionStatus.ACTIVE:
            raise StatusTransitionError(ERR_INACTIVE_TO_PRIMARY)

        def moved(v: KeyVersion) -> KeyVersion:
            if v.id == version_id:
                return replace(v, status=VersionStatus.PRIMARY)
            if v.status is VersionStatus.PRIMARY:
                return replace(v, status=VersionStatus.ACTIVE)
            return v

        return tuple(moved(v) for v in versions)
    if status is VersionStatus.ACTIVE:
        if target.status is not VersionStatus.INACTIVE:
            raise StatusTransitionError(ERR_PRIMARY_TO_ACTIVE)
    elif target.status is not VersionStatus.ACTIVE:
        raise StatusTransitionError(ERR_PRIMARY_TO_INACTIVE)
    return tuple(replace(v, status=status) if v.id == version_id else v for v in versions)


def acl_add(acl: ACL, entry: Access) -> ACL:
    """Knox's ``ACL.Add``: replace the entry with the same (type, id), remove it when ``entry``
    grants None, or append."""
    for i, existing in enumerate(acl):
        if existing.type is entry.type and existing.id == entry.id:
            if entry.access is AccessType.NONE:
                return acl[:i] + acl[i + 1 :]
            return (*acl[:i], entry, *acl[i + 1 :])
    if entry.access is AccessType.NONE:
        return acl
    return (*acl, entry)


def acl_validate(acl: ACL) -> None:
    """Raises :class:`InvalidACLError` for a None entry or a duplicate (type, id) pair."""
    seen: set[tuple[PrincipalType, str]] = set()
    for entry in acl:
        if entry.access is AccessType.NONE:
            raise InvalidACLError(ERR_ACL_NONE)
        pair = (entry.type, entry.id)
        if pair in seen:
            raise InvalidACLError(ERR_ACL_DUPLICATE)
        seen.add(pair)


def validate_principal(entry: Access) -> None:
    """Knox's ``IsValidPrincipal`` for ACL updates; None entries are not checked.

    Raises :class:`BadPrincipalError` (code 13). Unknown principal types are rejected too (Knox
    stores them and then cannot encode its own ACL).
    """
    if entry.access is AccessType.NONE:
        return
    if entry.type is PrincipalType.UNKNOWN:
        raise BadPrincipalError(ERR_ACL_UNKNOWN_TYPE)
    if entry.id == "":
        raise BadPrincipalError(ERR_ACL_EMPTY_PRINCIPAL)
    if entry.type in (PrincipalType.SERVICE, PrincipalType.SERVICE_PREFIX):
        try:
            parts = urlsplit(entry.id)
        except ValueError:
            raise BadPrincipalError(ERR_ACL_SERVICE_URL) from None
        if parts.scheme != "spiffe" or not parts.hostname:
            raise BadPrincipalError(ERR_ACL_SERVICE_URL)
        if entry.type is PrincipalType.SERVICE_PREFIX and not entry.id.endswith("/"):
            raise BadPrincipalError(ERR_ACL_SERVICE_NO_SLASH)


class Principal(Protocol):
    """Someone a request is made for. ``kind`` is ``user``, ``machine`` or ``service``."""

    @property
    def id(self) -> str: ...

    @property
    def kind(self) -> str: ...

    def grant(self, acl: ACL) -> AccessType:
        """The highest access any ACL entry gives this principal."""


def _highest(levels: Iterable[AccessType]) -> AccessType:
    return max(levels, key=lambda a: a.level, default=AccessType.NONE)


@dataclass(frozen=True, slots=True)
class User:
    """A user and the groups they belong to; matches User and UserGroup entries."""

    id: str
    groups: frozenset[str] = frozenset()

    @property
    def kind(self) -> str:
        return "user"

    def grant(self, acl: ACL) -> AccessType:
        return _highest(
            e.access
            for e in acl
            if (e.type is PrincipalType.USER and e.id == self.id)
            or (e.type is PrincipalType.USER_GROUP and e.id in self.groups)
        )


@dataclass(frozen=True, slots=True)
class Machine:
    """A host; matches Machine entries and MachinePrefix entries by plain string prefix."""

    id: str

    @property
    def kind(self) -> str:
        return "machine"

    def grant(self, acl: ACL) -> AccessType:
        return _highest(
            e.access
            for e in acl
            if (e.type is PrincipalType.MACHINE and e.id == self.id)
            or (e.type is PrincipalType.MACHINE_PREFIX and e.id and self.id.startswith(e.id))
        )


def _service_prefix_matches(prefix: str, spiffe_id: str) -> bool:
    if not prefix:
        return False
    if not prefix.endswith("/"):
        return spiffe_id == prefix or spiffe_id.startswith(prefix + "/")
    return spiffe_id.startswith(prefix)


@dataclass(frozen=True, slots=True)
class Service:
    """A SPIFFE workload; matches Service entries and ServicePrefix entries by path component."""

    id: str

    @property
    def kind(self) -> str:
        return "service"

    def grant(self, acl: ACL) -> AccessType:
        return _highest(
            e.access
            for e in acl
            if (e.type is PrincipalType.SERVICE and e.id == self.id)
            or (e.type is PrincipalType.SERVICE_PREFIX and _service_prefix_matches(e.id, self.id))
        )


@dataclass(frozen=True, slots=True)
class PrincipalMux:
    """Every principal a request authenticated as, with the provider that vouched for each.

    The first is the default principal: its id names the request in messages and audit. Access is
    granted if *any* principal has it.
    """

    principals: tuple[tuple[str, Principal], ...]

    def __post_init__(self) -> None:
        if not self.principals:
            raise ValueError("a PrincipalMux needs at least one principal")

    @property
    def default(self) -> Principal:
        return self.principals[0][1]

    @property
    def id(self) -> str:
        return self.default.id

    @property
    def kind(self) -> str:
        if len(self.principals) == 1:
            return self.default.kind
        return "mux[" + ",".join(f"{prov}=>{p.kind}" for prov, p in self.principals) + "]"

    def grant(self, acl: ACL) -> AccessType:
        return _highest(p.grant(acl) for _, p in self.principals)

    def is_user(self) -> bool:
        """True if any principal is a :class:`User`."""
        return any(isinstance(p, User) for _, p in self.principals)


def acl_allows(acl: ACL, principal: Principal, required: AccessType) -> bool:
    """True if ``principal`` holds at least ``required`` on ``acl``."""
    return principal.grant(acl).can_access(required)
