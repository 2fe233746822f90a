"""Online re-wrapping: re-seal every stored version under the keyring's current master key.

Run it after a new master key has been added to the key file *and* every server has loaded that
file, so nothing new is sealed under the old key meanwhile. It works key by key through
:meth:`~knox_server.store.KeyStore.update`, so it is safe while servers serve: a key changed
concurrently is re-read and retried, a key deleted meanwhile is skipped, and no write is lost.
Once a run reports no failure, the old key can be removed from the file.

Plaintext exists only between opening one version and sealing it again, and is never logged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from knox.errors import ConcurrentChangeError, KeyNotFoundError
from knox_server.crypto import MasterKeyring, SealedDataError
from knox_server.store import KeyStore, StoredKey, StoredVersion

__all__ = ["RewrapReport", "rewrap"]

REASON_CONFLICTS = "changed concurrently on every attempt"
REASON_UNREADABLE = "sealed data does not open with this keyring"


@dataclass(frozen=True, slots=True)
class RewrapReport:
    """What a run did: keys re-wrapped and their versions re-sealed, keys that were already
    current, keys skipped because they were deleted meanwhile, and how many updates lost a race
    and were re-read. ``failed`` pairs each key left (partly) under an old master key with the
    reason (:data:`REASON_CONFLICTS` or :data:`REASON_UNREADABLE`)."""

    keys_rewrapped: int = 0
    versions_rewrapped: int = 0
    keys_current: int = 0
    keys_skipped: int = 0
    conflicts_retried: int = 0
    failed: tuple[tuple[str, str], ...] = ()

    @property
    def ok(self) -> bool:
        """True if every key that still exists is now sealed under the current master key."""
        return not self.failed


async def rewrap(store: KeyStore, keyring: MasterKeyring, *, max_retries: int = 5) -> RewrapReport:
    """Re-seal every version not sealed under ``keyring.current_id``, one key per update.

    A key that still conflicts after ``max_retries`` re-reads, or holds a
    version that does not open, is reported in ``failed`` and left as it was; the run goes on.
    Store errors other than these (:class:`~knox.errors.InternalError`) propagate.
    """
    rewrapped = versions = current = skipped = conflicts = 0
    failed: list[tuple[str, str]] = []
    for key_id in sorted(await store.meta()):
        for _ in range(max_retries + 1):
            key = await store.get(key_id)
            if key is None:
                skipped += 1
                break
            try:
                resealed, count = _reseal(key, keyring)
            except SealedDataError:
                failed.append((key_id, REASON_UNREADABLE))
                break
            if count == 0:
                current += 1
                break
            try:
                await store.update(resealed)
            except ConcurrentChangeError:
                conflicts += 1
                continue
            except KeyNotFoundError:
                skipped += 1
                break
            rewrapped += 1
            versions += count
            break
        else:
            failed.append((key_id, REASON_CONFLICTS))
    return RewrapReport(
        keys_rewrapped=rewrapped,
        versions_rewrapped=versions,
        keys_current=current,
        keys_skipped=skipped,
        conflicts_retried=conflicts,
        failed=tuple(failed),
    )


def _reseal(key: StoredKey, keyring: MasterKeyring) -> tuple[StoredKey, int]:
    """The key with every stale version re-sealed, and how many were. Raises
    :class:`SealedDataError` if one does not open."""
    count = 0
    out: list[StoredVersion] = []
    for v in key.versions:
        if keyring.needs_rewrap(v.sealed):
            sealed = keyring.seal(key.id, v.id, v.ts, keyring.open(key.id, v.id, v.ts, v.sealed))
            out.append(replace(v, sealed=sealed))
            count += 1
        else:
            out.append(v)
    return replace(key, versions=tuple(out)), count
