"""Keys and policy limits for tests that give one principal or team limits of its own.

Used by the usage-rule, budget and error-id tests, in-process and served.
"""

from __future__ import annotations

from gateway.auth import KeyStore
from gateway.components import open_database


def new_key(settings, user: str, team: str | None, roles=("analyst",)) -> str:
    """A fresh API key for ``user``, so a test's limits and counters are its own."""
    store = KeyStore(open_database(settings))
    try:
        return store.create(user, team=team, roles=list(roles)).secret
    finally:
        store.engine.dispose()


def limits_for(kind: str, name: str, **limits):
    """A change for :func:`tests.conftest.policy_copy` giving one principal or team (``kind``) its limits."""
    def change(config: dict) -> None:
        config.setdefault("limits", {}).setdefault(kind + "s", {})[name] = limits
    return change


def secret_part(key: str) -> str:
    """The random part of a key ``gk_<key id>_<secret>``: what must never be logged or shown again. Split
    from the left: the secret itself may hold ``_`` (its last piece can be one character long)."""
    return key.split("_", 2)[2]
