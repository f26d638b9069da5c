"""From a presented key to its principal: the cache first, the key store on a miss.

A hit costs a SHA-256 and a dictionary lookup on the event loop: no thread
hand-off, no database. A miss asks :meth:`KeyStore.authenticate` on a worker
thread (the ORM blocks) and keeps the answer if it is a live key and the
cache still holds its lease (``gateway/auth/principal_cache.py``).
"""

from __future__ import annotations

import anyio

from gateway.auth.keys import KeyStore, Principal, key_digest, well_formed
from gateway.auth.principal_cache import PrincipalCache


class Authenticator:
    """The principal of a live key, or None; raises ``KeyStoreError`` when the store must answer and cannot."""

    def __init__(self, store: KeyStore, cache: PrincipalCache) -> None:
        self.store = store
        self.cache = cache

    async def authenticate(self, presented: str) -> Principal | None:
        if not well_formed(presented):
            return None  # the store would refuse it without a lookup: no thread for it either
        digest = key_digest(presented)
        principal = self.cache.get(digest)
        if principal is not None:
            return principal
        ticket = self.cache.ticket()
        principal = await anyio.to_thread.run_sync(self.store.authenticate, presented)
        if principal is not None:
            self.cache.put(digest, principal, ticket)
        return principal
