"""The requests a gateway has in flight, by key id, so that revoking a key ends them and not only its next one.

Before (probe s56 B-F1), revocation stopped a key's next request only: one
admitted before it ran to its end, a stream for as long as its model
generated, a queued job up to ``GOVGATE_REQUEST_TIMEOUT_S`` later. An
operator who revokes a leaked key expects its use to stop now.

Each completion request registers here while it is in flight
(:meth:`AdmittedKeys.watch`). The key-change listener
(``gateway/auth/key_change_listener.py``) passes every changed key id on
(:meth:`AdmittedKeys.changed`); a change is also a new role or team, so the
key store is asked whether the key is now revoked, and only then are its
requests ended, each as its own path ends it
(``gateway/requests/call_off.py``, ``KEY_REVOKED``): a queued job taken
back, a running one stopped at its cancel key, the client answered 401
``invalid_api_key``. When the listener's subscription comes back after a
loss (messages may have been missed meanwhile) every key with requests here
is asked about (:meth:`AdmittedKeys.resumed`). A key found revoked is
remembered (revocation is for good), so that a request whose authentication
read the key just before its revocation was committed, and registers after
the look, is ended as it registers.

The look costs nothing on the request path: one dict entry per request, and
a key store read only when a key changes.
All of it runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from gateway.auth.keys import KeyStore, KeyStoreError

log = logging.getLogger(__name__)

#: Whether a key id is revoked now (True), not (False), or cannot be told (None: the store failed).
IsRevoked = Callable[[str], Awaitable[bool | None]]


def revoked_in(keys: KeyStore) -> IsRevoked:
    """Whether a key is revoked, read from ``keys`` in a thread (the store is synchronous); a key the store
    does not hold (rows are never deleted) counts as revoked."""
    async def is_revoked(key_id: str) -> bool | None:
        try:
            row = await asyncio.to_thread(keys.get, key_id)
        except KeyStoreError as exc:
            log.warning("cannot read key %s: %s", key_id, exc)
            return None
        return row is None or row.revoked_at is not None
    return is_revoked


class AdmittedKeys:
    """Key id → the ends of its requests in flight; ends them when the key store says it is revoked."""

    def __init__(self, is_revoked: IsRevoked) -> None:
        self._is_revoked = is_revoked
        self._ends: dict[str, dict[int, Callable[[], None]]] = {}
        #: Keys found revoked (a few bytes each; revocations are rare and for good).
        self._revoked: set[str] = set()
        self._next = 0
        self._looks: set[asyncio.Task] = set()

    @property
    def in_flight(self) -> int:
        """The requests watched (not ``__len__``: an empty registry must not read as false, or as absent)."""
        return sum(len(ends) for ends in self._ends.values())

    def watch(self, key_id: str, end: Callable[[], None]) -> Callable[[], None]:
        """Call ``end`` if ``key_id`` is revoked while the request is in flight, until the returned
        ``leave`` is called (it may be called more than once); at once if the key was found revoked."""
        if key_id in self._revoked:
            end()
            return _stay
        token = self._next
        self._next += 1
        self._ends.setdefault(key_id, {})[token] = end

        def leave() -> None:
            ends = self._ends.get(key_id)
            if ends is not None:
                ends.pop(token, None)
                if not ends:
                    del self._ends[key_id]
        return leave

    def changed(self, key_id: str) -> None:
        """A key changed (the listener's message): see whether it is revoked, and if so end its requests."""
        if key_id not in self._revoked:
            self._look([key_id])

    def resumed(self) -> None:
        """The key-change subscription answers again after a loss: changes may have been missed."""
        if self._ends:
            self._look(list(self._ends))

    async def aclose(self) -> None:
        for task in list(self._looks):
            task.cancel()
        if self._looks:
            await asyncio.gather(*self._looks, return_exceptions=True)

    def _look(self, key_ids: list[str]) -> None:
        task = asyncio.get_running_loop().create_task(self._end_revoked(key_ids), name="govgate-revocations")
        self._looks.add(task)
        task.add_done_callback(self._looks.discard)

    async def _end_revoked(self, key_ids: list[str]) -> None:
        for key_id in key_ids:
            revoked = await self._is_revoked(key_id)
            if revoked is None:
                log.error("key %s changed, and whether it is revoked cannot be read (the key store failed): "
                          "its %d requests in flight go on", key_id, len(self._ends.get(key_id, ())))
                continue
            if not revoked:
                continue
            self._revoked.add(key_id)
            ends = list(self._ends.pop(key_id, {}).values())
            if ends:
                log.warning("key %s was revoked: its %d requests in flight are ended (401 invalid_api_key)",
                            key_id, len(ends))
            for end in ends:
                end()


def _stay() -> None:
    """The ``leave`` of a request that was ended as it registered: nothing to undo."""
