"""The principal cache on its own: lease, TTL, LRU bound, and the epoch that keeps raced reads out.

A fake clock drives expiry, so nothing here waits or measures time.
"""

from __future__ import annotations

import pytest

from gateway.auth import Principal, PrincipalCache
from gateway.auth.keys import key_digest


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def principal(key_id: str, roles: tuple[str, ...] = ("analyst",)) -> Principal:
    return Principal(id=f"user-{key_id}", team="research", roles=roles, key_id=key_id)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(clock: Clock) -> PrincipalCache:
    made = PrincipalCache(ttl_s=10.0, max_entries=3, clock=clock)
    made.renew_lease(clock.now + 1e6)
    return made


def test_a_kept_principal_is_served_by_its_digest_only(cache):
    kept = principal("aaaaaaaaaaaa")
    assert cache.put(key_digest("gk_aaaaaaaaaaaa_right"), kept, cache.ticket())
    assert cache.get(key_digest("gk_aaaaaaaaaaaa_right")) is kept
    # Same key id, another secret: not a hit (the store's constant-time comparison decides it).
    assert cache.get(key_digest("gk_aaaaaaaaaaaa_wrong")) is None


def test_entries_expire_after_the_ttl(cache, clock):
    cache.put("d1", principal("k1"), cache.ticket())
    clock.now += 9.9
    assert cache.get("d1") is not None
    clock.now += 0.1
    assert cache.get("d1") is None
    assert len(cache) == 0


def test_a_hit_does_not_extend_the_ttl(cache, clock):
    cache.put("d1", principal("k1"), cache.ticket())
    for _ in range(5):
        clock.now += 3
        cache.get("d1")
    assert cache.get("d1") is None  # 15 s after it was read from the store, however often it was used


def test_the_least_recently_used_entry_leaves_first(cache):
    for n in range(3):
        cache.put(f"d{n}", principal(f"k{n}"), cache.ticket())
    assert cache.get("d0") is not None  # d1 is now the least recently used
    cache.put("d3", principal("k3"), cache.ticket())
    assert len(cache) == 3
    assert cache.get("d1") is None
    assert all(cache.get(d) is not None for d in ("d0", "d2", "d3"))


def test_nothing_is_served_or_kept_without_a_lease(clock):
    cache = PrincipalCache(ttl_s=10.0, max_entries=10, clock=clock)
    assert not cache.put("d1", principal("k1"), cache.ticket())  # never leased
    cache.renew_lease(clock.now + 2)
    assert cache.put("d1", principal("k1"), cache.ticket())
    clock.now += 2  # the lease lapses (no PONG came): the entry is there but not served
    assert cache.get("d1") is None
    cache.renew_lease(clock.now + 2)
    assert cache.get("d1") is not None


def test_losing_the_lease_empties_the_cache(cache):
    cache.put("d1", principal("k1"), cache.ticket())
    cache.revoke_lease()
    assert len(cache) == 0
    assert not cache.serving


def test_forget_key_drops_that_key_only(cache):
    cache.put("d1", principal("k1"), cache.ticket())
    cache.put("d2", principal("k2"), cache.ticket())
    cache.forget_key("k1")
    assert cache.get("d1") is None
    assert cache.get("d2") is not None


def test_a_read_that_raced_a_change_is_not_kept(cache):
    ticket = cache.ticket()  # a store read begins…
    cache.forget_key("k1")  # …a revocation signal arrives meanwhile…
    assert not cache.put("d1", principal("k1"), ticket)  # …so what the read saw is not trusted
    assert cache.get("d1") is None
    assert cache.put("d1", principal("k1"), cache.ticket())  # a read that began after it is


def test_a_read_begun_without_a_lease_is_not_kept_after_one_is_granted(clock):
    cache = PrincipalCache(ttl_s=10.0, max_entries=10, clock=clock)
    ticket = cache.ticket()  # read while the subscription is down: a signal may be missed meanwhile
    cache.renew_lease(clock.now + 2)
    assert not cache.put("d1", principal("k1"), ticket)


def test_a_ttl_of_zero_turns_the_cache_off(clock):
    cache = PrincipalCache(ttl_s=0, max_entries=10, clock=clock)
    cache.renew_lease(clock.now + 1e6)
    assert not cache.enabled and not cache.serving
    assert not cache.put("d1", principal("k1"), cache.ticket())
