"""The one seam between knoxd's socket side and its upstream side.

Data flows one way: ``upstream/`` writes into ``cache/``, ``socket_api/`` reads from it. Where the
socket side must cause a fetch (``register``, ``get`` with ``wait_ms``, the admin ``refresh``) or
report upstream health (``status``), it calls a :class:`FetchRequester`, which the daemon's root
wires to the refreshers. Neither side imports the other.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["FetchRequester", "IdentityStatus", "Refusal"]


class Refusal(enum.Enum):
    """Why the upstream would not give an identity a key (remembered briefly: a negative cache)."""

    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    UNREACHABLE = "upstream_unavailable"


@dataclass(frozen=True, slots=True)
class IdentityStatus:
    """One identity's upstream health, for the admin ``status`` op and the metrics. The request
    counts are since start: ``requests_answered`` (change checks and key fetches the upstream
    answered) and ``requests_failed`` (those that got no usable answer)."""

    name: str
    principal: str
    keys: int
    last_refresh_at: float | None
    last_error: str | None
    upstream_ok: bool
    requests_answered: int = 0
    requests_failed: int = 0


class FetchRequester(Protocol):
    """What the socket side may ask of the upstream side. Every method returns promptly: fetches
    happen in the refreshers' own tasks, and their results arrive through the cache view."""

    async def register(self, identity: str, key_ids: Sequence[str]) -> list[str]:
        """Persist the registrations and schedule an immediate fetch of the new ones; returns the
        ids now registered (all of ``key_ids``). Raises ``KeyError`` for an unknown identity."""

    async def unregister(self, identity: str, key_ids: Sequence[str]) -> list[str]:
        """Drop registrations (and their cached values); returns the ids that were registered."""

    def is_registered(self, identity: str, key_id: str) -> bool: ...

    def refusal(self, identity: str, key_id: str) -> Refusal | None:
        """The upstream's recent answer for a key that is not cached, if it refused it."""

    def request_refresh(self, identity: str | None, key_ids: Sequence[str] | None) -> int:
        """Queue a fetch now (all identities / all their keys when None); returns keys queued."""

    def status(self) -> list[IdentityStatus]: ...
