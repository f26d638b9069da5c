"""A served gateway caches principals, yet a revoked key is refused on its very next request.

``govgate serve`` runs as its own process with a long ``GOVGATE_AUTH_CACHE_TTL_S``,
so only the key-change signal can explain a prompt refusal. ``GET /v1/models``
is the authenticated request (it needs no worker).
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


@pytest.fixture
def own(settings, tmp_path):
    return settings.with_(database_url=f"sqlite:///{tmp_path / 'keys.db'}", auth_cache_ttl_s=600.0)


@pytest.fixture
def store(own):
    made = KeyStore(open_database(own))
    yield made
    made.engine.dispose()


def models(base: str, secret: str) -> httpx.Response:
    return httpx.get(f"{base}/v1/models", headers=bearer(secret), timeout=30)


def test_a_cached_key_works_while_the_key_table_is_unreadable(own, store, tmp_path):
    cached = store.create("carl", team="research", roles=["analyst"]).secret
    uncached = store.create("uma", team="research", roles=["analyst"]).secret
    database = own.effective_database_url.removeprefix("sqlite:///")
    with serving(own, tmp_path / "serve.log") as base:
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


def test_a_key_revoked_by_the_cli_is_refused_on_its_next_request(own, store, tmp_path):
    key = store.create("rita", team="research", roles=["analyst"])
    other = store.create("otto", team="research", roles=["analyst"]).secret
    with serving(own, tmp_path / "serve.log") as base:
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


def test_a_key_revoked_through_the_key_store_is_refused_on_its_next_request(own, store, tmp_path):
    key = store.create("kim", team="research", roles=["analyst"])
    announcer = KeyChangeAnnouncer(own.redis_url)
    with serving(own, tmp_path / "serve.log") as base:
        assert models(base, key.secret).status_code == 200
        assert KeyStore(store.engine, on_change=announcer).revoke(key.key.key_id)
        assert announcer.failure is None and announcer.receivers >= 1
        assert models(base, key.secret).status_code == 401
