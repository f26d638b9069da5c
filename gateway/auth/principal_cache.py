"""Principals of recently seen keys, so a request does not read the key table each time.

Keyed by the key's digest (SHA-256 of the whole presented secret, the same
value the store keeps), never by key id: a hit needs the whole secret, so a
request with a real key id and a wrong secret takes the same path (the
store's constant-time comparison) as an unknown key, and timing still reveals
no key ids. Only successful authentications are cached: an unknown or revoked
key always reaches the store, so a key created a moment ago works at once.

Revocation must not wait for an entry to expire, so the cache serves only
while it holds a *lease*: proof, renewed about twice a second by
:class:`gateway.auth.key_changes.KeyChangeListener`, that its subscription
to key changes is connected and has delivered every change published so far.
Without a lease (Redis down, reconnecting, silent network loss) every lookup
misses and the store decides. Every invalidation or loss of the lease bumps
an epoch, and a principal read from the store is kept only if the epoch did
not move while it was read, so a read that raced a revocation cannot put the
revoked key back. ``ttl_s`` bounds what no signal covers (a row edited by
hand in the database).

Single-threaded by design: every method runs on the gateway's event loop.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from gateway.auth.keys import Principal


@dataclass(frozen=True)
class Ticket:
    """Taken before a store read; :meth:`PrincipalCache.put` keeps its result only if still valid."""

    epoch: int
    serving: bool


class PrincipalCache:
    """A bounded LRU of digest → principal, each entry living ``ttl_s``, served only under a lease."""

    def __init__(self, *, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._digest_of: dict[str, str] = {}  # key id → digest, to drop a key on its signal
        self._lease_until = float("-inf")
        self._epoch = 0

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    @property
    def serving(self) -> bool:
        """True while a lease holds: entries may be served and stored."""
        return self.enabled and self.clock() < self._lease_until

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str) -> Principal | None:
        """The cached principal, or None (absent, expired, or no lease)."""
        if not self.serving:
            return None
        entry = self._entries.get(digest)
        if entry is None:
            return None
        principal, expires = entry
        if self.clock() >= expires:
            self._drop(digest)
            return None
        self._entries.move_to_end(digest)
        return principal

    def ticket(self) -> Ticket:
        return Ticket(self._epoch, self.serving)

    def put(self, digest: str, principal: Principal, ticket: Ticket) -> bool:
        """Keep ``principal`` unless a change or a lost lease came since ``ticket``; True if kept."""
        if not (ticket.serving and ticket.epoch == self._epoch and self.serving):
            return False
        self._drop(self._digest_of.get(principal.key_id, ""))
        self._entries[digest] = (principal, self.clock() + self.ttl_s)
        self._digest_of[principal.key_id] = digest
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))
        return True

    def forget_key(self, key_id: str) -> None:
        """A key changed (revoked, roles or team): drop it, and keep no read that began before."""
        self._epoch += 1
        self._drop(self._digest_of.get(key_id, ""))

    def renew_lease(self, until: float) -> None:
        """Every change published before ``until - grace`` has been received (the listener's proof)."""
        self._lease_until = max(self._lease_until, until)

    def revoke_lease(self) -> None:
        """The subscription is down or was re-made: signals may have been missed, so forget everything."""
        self._lease_until = float("-inf")
        self._epoch += 1
        self._entries.clear()
        self._digest_of.clear()

    def _drop(self, digest: str) -> None:
        entry = self._entries.pop(digest, None)
        if entry is not None and self._digest_of.get(entry[0].key_id) == digest:
            del self._digest_of[entry[0].key_id]
