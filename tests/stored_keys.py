"""Stored keys for the key store tests: an ACL with every escape Knox's JSON makes, and keys whose
versions, sealed bytes and hash follow from their version ids."""

from __future__ import annotations

from knox.model import Access, AccessType, PrincipalType, VersionStatus
from knox_server.store import StoredKey, StoredVersion

ACL = (
    Access(PrincipalType.USER, "alice", AccessType.ADMIN),
    Access(PrincipalType.MACHINE_PREFIX, "web<&>", AccessType.READ),
    Access(PrincipalType.SERVICE, "spiffe://example.org/ns/prod/sa/app", AccessType.WRITE),
)


def make_key(key_id: str, *version_ids: int, acl: tuple[Access, ...] = ACL) -> StoredKey:
    """A key with these versions (``1`` if none), the first Primary and the others Active."""
    ids = version_ids or (1,)
    versions = tuple(
        StoredVersion(
            id=vid,
            sealed=b"\x01\x00sealed-" + vid.to_bytes(8, "big"),
            status=VersionStatus.PRIMARY if i == 0 else VersionStatus.ACTIVE,
            ts=1_700_000_000_000_000_000 + vid % 1000,
        )
        for i, vid in enumerate(ids)
    )
    return StoredKey(id=key_id, acl=acl, versions=versions, hash=f"hash-{ids}")
