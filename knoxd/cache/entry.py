"""One cached key of one identity, as the cache stores it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from knox.model import Key, is_valid_key_id

__all__ = ["CacheEntry"]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """The key ``key`` as ``identity`` last fetched it.

    ``hash`` is the version hash the server reported (what the next change check sends),
    ``fetched_at`` the unix time the value was last confirmed upstream, ``last_error`` the last
    refresh failure (None after a success). The ``repr`` shows no secret data.

    Raises ValueError for an empty identity or one holding NUL (it is a field of the row's AAD), an
    invalid key id, or a non-finite ``fetched_at``.
    """

    identity: str
    key: Key
    hash: str
    fetched_at: float
    last_error: str | None = None

    def __post_init__(self) -> None:
        if not self.identity or "\0" in self.identity:
            raise ValueError("identity must be a non-empty string without NUL")
        if not is_valid_key_id(self.key.id):
            raise ValueError("invalid key id")
        if not math.isfinite(self.fetched_at):
            raise ValueError("fetched_at must be finite")

    @property
    def key_id(self) -> str:
        return self.key.id

    def __repr__(self) -> str:
        return (
            f"CacheEntry(identity={self.identity!r}, key_id={self.key.id!r}, hash={self.hash!r}, "
            f"versions={len(self.key.versions)}, fetched_at={self.fetched_at!r}, "
            f"last_error={self.last_error!r})"
        )
