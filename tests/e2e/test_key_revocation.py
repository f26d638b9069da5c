"""A served gateway caches principals, yet a revoked key is refused on its very next request.

``govgate serve`` runs as its own process with a long ``GOVGATE_AUTH_CACHE_TTL_S``,
so only the key-change signal can explain a prompt refusal. ``GET /v1/models``
is the authenticated request (it needs no worker).

The module's tests share one served gateway and its key database (starting
a gateway costs seconds); each test makes its own principals, so no test
sees another's keys in the cache or the table.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import httpx
import pytest

from gateway.auth import KeyStore
from gateway.auth.key_changes import KeyChangeAnnouncer
from gateway.components import open_database
from govgate.supervisor import child_env
from tests.conftest import bearer, serving


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("key-revocation")


@pytest.fixture(scope="module")
def own(settings, folder):
    return settings.with_(database_url=f"sqlite:///{folder / 'keys.db'}", auth_cache_ttl_s=600.0)


@pytest.fixture(scope="module")
def store(own):
    made = KeyStore(open_database(own))
    yield made
    made.engine.dispose()


@pytest.fixture(scope="module")
def base(own, store, folder):
    """The module's gateway, started once its key table exists."""
    with serving(own, folder / "serve.log") as url:
        yield url


def models(base: str, secret: str) -> httpx.Response:
    return httpx.get(f"{base}/v1/models", headers=bearer(secret), timeout=30)


def test_a_cached_key_works_while_the_key_table_is_unreadable(own, store, base):
    cached = store.create("carl", team="research", roles=["analyst"]).secret
    uncached = store.create("uma", team="research", roles=["analyst"]).secret
    database = own.effective_database_url.removeprefix("sqlite:///")
    for _ in range(3):
        assert models(base, cached).status_code == 200
    with sqlite3.connect(database) as raw:
        raw.execute("ALTER TABLE api_keys RENAME TO api_keys_away")
    try:
        assert models(base, cached).status_code == 200  # the cache answered
        refused = models(base, uncached)
        assert refused.status_code == 503, refused.text  # the store had to, and could not
        assert refused.json()["error"]["code"] == "auth_unavailable"
    finally:
        with sqlite3.connect(database) as raw:
            raw.execute("ALTER TABLE api_keys_away RENAME TO api_keys")


def test_a_key_revoked_by_the_cli_is_refused_on_its_next_request(own, store, base):
    key = store.create("rita", team="research", roles=["analyst"])
    other = store.create("otto", team="research", roles=["analyst"]).secret
    for _ in range(3):
        assert models(base, key.secret).status_code == 200
    assert models(base, other).status_code == 200
    revoked = subprocess.run([sys.executable, "-m", "govgate.cli", "keys", "revoke", key.key.key_id],
                             env=child_env(own, own.redis_url), capture_output=True, text=True, timeout=60)
    assert revoked.returncode == 0, revoked.stderr
    assert "warning" not in revoked.stderr
    response = models(base, key.secret)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert models(base, other).status_code == 200  # only that key was dropped


def test_a_key_revoked_through_the_key_store_is_refused_on_its_next_request(own, store, base):
    key = store.create("kim", team="research", roles=["analyst"])
    announcer = KeyChangeAnnouncer(own.redis_url)
    assert models(base, key.secret).status_code == 200
    assert KeyStore(store.engine, on_change=announcer).revoke(key.key.key_id)
    assert announcer.failure is None and announcer.receivers >= 1
    assert models(base, key.secret).status_code == 401
