"""``gateway.keys_admin`` on its own: what the console will call, and what it does when parts fail.

Real SQLite stores, the suite's Redis, and a Redis address nobody listens
on for the signal that cannot be delivered.
"""

from __future__ import annotations

import time

import pytest
import redis
import redis.asyncio as aioredis

from gateway.auth import KeyStore, Principal
from gateway.auth.key_changes import KEYS_CHANGED_CHANNEL
from gateway.auth.principal_cache import PrincipalCache
from gateway.components import open_database
from gateway.keys_admin import (KeyAdmin, KeyChangeSignal, KeysUnavailable, NotAdmin, UnknownRole, checked_roles,
                                UnknownRoles)
from govgate.processes import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.anyio


@pytest.fixture
def store(settings, tmp_path):
    made = KeyStore(open_database(settings.with_(database_url=f"sqlite:///{tmp_path / 'keys.db'}")))
    yield made
    made.engine.dispose()


@pytest.fixture
def admin(store) -> Principal:
    key = store.create("root", team="ops", roles=["admin"], by="test").key
    return Principal(id=key.user, team=key.team, roles=tuple(key.roles), key_id=key.key_id)


def leased_cache() -> PrincipalCache:
    cache = PrincipalCache(ttl_s=600, max_entries=10)
    cache.renew_lease(time.monotonic() + 600)
    return cache


def test_only_an_admin_gets_the_service(store) -> None:
    analyst = Principal(id="alice", team=None, roles=("analyst", "reviewer"), key_id="0" * 12)
    with pytest.raises(NotAdmin):
        KeyAdmin(store, analyst, policy_dir=ROOT / "policies")


def test_the_cli_and_the_api_share_one_role_rule() -> None:
    assert checked_roles(["viewer", "analyst", "viewer"], ["analyst", "viewer"]) == ["viewer", "analyst"]
    with pytest.raises(UnknownRoles, match="unknown role 'x': .*analyst, viewer"):
        checked_roles(["x"], ["analyst", "viewer"])
    with pytest.raises(UnknownRoles, match="^no --role given"):
        checked_roles([], ["analyst"], none_given="no --role given")


async def test_unreadable_policy_roles_refuse_the_change(store, admin, tmp_path) -> None:
    service = KeyAdmin(store, admin, policy_dir=tmp_path / "no-such-policy")
    before = len(store.list(include_revoked=True))
    with pytest.raises(KeysUnavailable, match="roles cannot be checked"):
        await service.create("ann", team=None, roles=["analyst"])
    assert len(store.list(include_revoked=True)) == before
    with pytest.raises(UnknownRole):  # and a readable policy still refuses what it does not know
        await KeyAdmin(store, admin, policy_dir=ROOT / "policies").create("ann", team=None, roles=["analist"])


async def test_a_change_is_published_and_dropped_from_this_gateways_cache(settings, store, admin) -> None:
    cache = leased_cache()
    victim = store.create("vic", team=None, roles=["analyst"], by="test").key
    cache.put("digest-of-vic", Principal("vic", None, ("analyst",), victim.key_id), cache.ticket())
    client = aioredis.Redis.from_url(settings.redis_url)
    listener = redis.Redis.from_url(settings.redis_url).pubsub()
    listener.subscribe(KEYS_CHANGED_CHANNEL)
    try:
        assert listener.get_message(timeout=5)["type"] == "subscribe"
        service = KeyAdmin(store, admin, policy_dir=ROOT / "policies", signal=KeyChangeSignal(client, cache))
        change = await service.revoke(victim.key_id)
        assert change.changed and change.warning is None
        assert cache.get("digest-of-vic") is None
        message = listener.get_message(timeout=5)
        assert message["type"] == "message" and message["data"] == victim.key_id.encode()
        # a repeat changes nothing yet tells the gateways again (the first call's signal may have been lost)
        cache.put("digest-of-vic", Principal("vic", None, ("analyst",), victim.key_id), cache.ticket())
        again = await service.revoke(victim.key_id)
        assert not again.changed and again.warning is None
        assert cache.get("digest-of-vic") is None
        message = listener.get_message(timeout=5)
        assert message["type"] == "message" and message["data"] == victim.key_id.encode()
    finally:
        listener.close()
        await client.aclose()


async def test_a_signal_redis_refuses_is_reported_yet_this_gateway_forgets_the_key(store, admin) -> None:
    """The revocation stands (the database is the truth); the admin is told how long another gateway may lag."""
    cache = leased_cache()
    victim = store.create("vic", team=None, roles=["analyst"], by="test").key
    cache.put("digest-of-vic", Principal("vic", None, ("analyst",), victim.key_id), cache.ticket())
    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=1)
    try:
        signal = KeyChangeSignal(dead, cache, attempts=2, pause_s=0.01)
        service = KeyAdmin(store, admin, policy_dir=ROOT / "policies", signal=signal, cache_ttl_s=42)
        change = await service.revoke(victim.key_id)
        retried = await service.revoke(victim.key_id)  # the admin's retry, Redis still down: still said
    finally:
        await dead.aclose()
    assert not retried.changed and retried.warning is not None and "not told" in retried.warning
    assert change.changed and change.key.revoked_at is not None
    assert store.get(victim.key_id).revoked_at is not None
    assert cache.get("digest-of-vic") is None
    assert change.warning is not None and "not told" in change.warning and "42 s" in change.warning
    assert "GOVGATE_AUTH_CACHE_TTL_S" in change.warning


async def test_a_database_that_is_gone_refuses_reads_and_changes(settings, tmp_path, admin, store) -> None:
    broken = KeyStore(open_database(settings.with_(database_url=f"sqlite:///{tmp_path / 'gone.db'}")))
    (tmp_path / "gone.db").unlink()
    (tmp_path / "gone.db").mkdir()  # a folder where the file was: nothing can open it
    broken.engine.dispose()
    service = KeyAdmin(broken, admin, policy_dir=ROOT / "policies")
    for call in (service.page(cursor=None, limit=5, include_revoked=False), service.get(admin.key_id),
                 service.create("ann", team=None, roles=["analyst"]), service.revoke(admin.key_id)):
        with pytest.raises(KeysUnavailable):
            await call


async def test_a_user_or_team_differing_only_in_case_from_a_live_key_is_refused(store, admin) -> None:
    # Policies, limits and fair share match names exactly: a key for team 'Support' escaped 'support''s model
    # list, limits and share; 'Alice' escaped limits.principals.alice.
    from gateway.auth.keys import NameLookAlike
    from gateway.keys_admin import InvalidField

    store.create("alice", team="support", roles=["analyst"], by="test")
    with pytest.raises(NameLookAlike, match="team 'Support' differs only in case from the existing team 'support'"):
        store.create("sam", team="Support", roles=["analyst"], by="test")
    with pytest.raises(NameLookAlike, match="user 'Alice'"):
        store.create("Alice", team="support", roles=["analyst"], by="test")
    service = KeyAdmin(store, admin, policy_dir=ROOT / "policies")
    with pytest.raises(InvalidField) as refused:
        await service.create("sam", team="SUPPORT", roles=["analyst"])
    assert refused.value.param == "team"
    # names the field and the name to use, never quotes the refused value (README, "The keys page")
    assert str(refused.value).startswith("'team' differs only in case from the existing team 'support'")
    assert "SUPPORT" not in str(refused.value)
    assert store.create("alice", team="support", roles=["analyst"], by="test").key.team == "support"  # exact: fine
    revoked = store.create("bob", team="Typo", roles=["analyst"], by="test").key
    store.revoke(revoked.key_id, by="test")
    # a revoked key's spelling does not bind
    assert store.create("bob", team="typo", roles=["analyst"], by="test").key.team == "typo"
