"""The local policy: which identity a peer acts as, and whether it is an admin (pure).

A peer matches an identity if any one of the identity's selectors matches: its uid, its primary
gid, one of its groups (by gid or by group name, resolved when the policy is built), or its
systemd unit (only when the kernel gave one). Several matches: the first identity listed, unless
a request names another that the peer also matches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from knoxd.config import IdentityConfig
from knoxd.socket_api.peer import PeerFacts

__all__ = ["Policy", "Unauthorized"]


class Unauthorized(Exception):
    """The peer may not act as the identity, or is not an admin. The message names what was
    seen (uid, unit), never anything secret."""


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    uids: frozenset[int]
    gids: frozenset[int]
    groups: frozenset[int]
    units: frozenset[str]

    def matches(self, facts: PeerFacts) -> bool:
        return (
            facts.uid in self.uids
            or facts.gid in self.gids
            or not self.groups.isdisjoint(facts.groups)
            or (facts.unit is not None and facts.unit in self.units)
        )


class Policy:
    """Built once from the identities; ``group_ids`` maps the group names the config uses to
    gids (names missing from it never match). ``admin_gid`` None: only root is an admin."""

    def __init__(
        self,
        identities: Sequence[IdentityConfig],
        group_ids: Mapping[str, int],
        admin_gid: int | None,
    ) -> None:
        self._rules = tuple(
            _Rule(
                i.name,
                frozenset(i.peers.uid),
                frozenset(i.peers.gid),
                frozenset(group_ids[g] for g in i.peers.group if g in group_ids),
                frozenset(i.peers.unit),
            )
            for i in identities
        )
        self._admin_gid = admin_gid
        self.uses_units = any(r.units for r in self._rules)

    def identities(self, facts: PeerFacts) -> list[str]:
        """Every identity the peer matches, in config order."""
        return [r.name for r in self._rules if r.matches(facts)]

    def default_identity(self, facts: PeerFacts) -> str | None:
        """The identity the peer acts as when a request names none (the first match)."""
        for rule in self._rules:
            if rule.matches(facts):
                return rule.name
        return None

    def resolve(self, facts: PeerFacts, requested: str | None) -> str:
        """The identity a request acts as. Raises :class:`Unauthorized` if the peer matches
        none, or not the one ``requested``."""
        if requested is None:
            name = self.default_identity(facts)
            if name is None:
                raise Unauthorized(f"{_describe(facts)} maps to no identity")
            return name
        for rule in self._rules:
            if rule.name == requested:
                if rule.matches(facts):
                    return requested
                break
        raise Unauthorized(f"{_describe(facts)} may not act as identity {requested[:64]!r}")

    def is_admin(self, facts: PeerFacts) -> bool:
        """Root, or a member (primary or supplementary) of the admin group."""
        return facts.uid == 0 or (self._admin_gid is not None and self._admin_gid in facts.groups)

    def check_admin(self, facts: PeerFacts) -> None:
        """Raises :class:`Unauthorized` unless the peer is an admin."""
        if not self.is_admin(facts):
            raise Unauthorized(f"{_describe(facts)} is not an admin")


def _describe(facts: PeerFacts) -> str:
    unit = f", unit {facts.unit!r}" if facts.unit is not None else ", no unit"
    return f"peer uid {facts.uid}{unit}"
