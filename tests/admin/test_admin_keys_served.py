"""Two served gateways sharing a database and Redis: a change made over HTTP on one holds at once on the other.

Both run ``govgate serve`` as real processes with a ten-minute principal
cache (``GOVGATE_AUTH_CACHE_TTL_S``), so only the key-change signal can
explain the second gateway refusing a key it served a moment before.
``GET /v1/models`` is the authenticated request (no worker needed).
"""

from __future__ import annotations

import threading

import httpx
import pytest
from click.testing import CliRunner

from gateway.auth import KeyStore
from gateway.components import open_database
from govgate.cli import main
from govgate.supervisor import child_env
from tests.conftest import bearer, serving
from tests.keys_and_limits import secret_part

KEYS = "/admin/keys"


@pytest.fixture
def own(settings, tmp_path):
    return settings.with_(database_url=f"sqlite:///{tmp_path / 'keys.db'}", auth_cache_ttl_s=600.0)


@pytest.fixture
def store(own):
    made = KeyStore(open_database(own))
    yield made
    made.engine.dispose()


@pytest.fixture
def gateways(own, tmp_path):
    with serving(own, tmp_path / "a.log") as first, serving(own, tmp_path / "b.log") as second:
        yield first, second


def models(base: str, secret: str) -> list[str] | int:
    response = httpx.get(f"{base}/v1/models", headers=bearer(secret), timeout=30)
    return sorted(m["id"] for m in response.json()["data"]) if response.status_code == 200 else response.status_code


def test_a_key_revoked_on_one_gateway_stops_working_on_the_other_at_once(own, store, gateways, tmp_path) -> None:
    first, second = gateways
    admin = store.create("root", team="ops", roles=["admin"], by="test").secret
    made = httpx.post(f"{first}{KEYS}", headers=bearer(admin), timeout=30,
                      json={"user": "kim", "team": "research", "roles": ["analyst"]})
    assert made.status_code == 201, made.text
    secret, key_id = made.json()["key"], made.json()["key_id"]
    mover = store.create("mo", team="research", roles=["analyst"], by="test")
    for _ in range(3):  # cached on both
        for base in gateways:
            assert "govgate-tiny" in models(base, secret)
            assert "govgate-tiny" in models(base, mover.secret)

    revoked = httpx.post(f"{first}{KEYS}/{key_id}/revoke", headers=bearer(admin), timeout=30)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["gateways_told"] is True
    assert models(second, secret) == 401
    assert models(first, secret) == 401
    for log in ("a.log", "b.log"):  # the secret was in one answer only, never in a gateway's log
        assert secret_part(secret) not in (tmp_path / log).read_text(errors="replace")

    changed = httpx.put(f"{first}{KEYS}/{mover.key.key_id}/roles", headers=bearer(admin), timeout=30,
                        json={"roles": ["viewer"]})
    assert changed.status_code == 200, changed.text
    assert models(second, mover.secret) == []  # a viewer may use no model


def test_two_admins_revoking_each_other_at_once_leave_one_admin(own, store, gateways) -> None:
    """The last-admin rule holds across gateways: the check runs inside the change's transaction."""
    first, second = gateways
    one = store.create("root", team="ops", roles=["admin"], by="test")
    two = store.create("root2", team="ops", roles=["admin"], by="test")
    for base, secret in ((first, one.secret), (second, two.secret)):
        assert models(base, secret) != 401
    start = threading.Barrier(2)
    answers: dict[str, httpx.Response] = {}

    def revoke(name: str, base: str, secret: str, target: str) -> None:
        start.wait()
        answers[name] = httpx.post(f"{base}{KEYS}/{target}/revoke", headers=bearer(secret), timeout=60)

    threads = [threading.Thread(target=revoke, args=("one", first, one.secret, two.key.key_id)),
               threading.Thread(target=revoke, args=("two", second, two.secret, one.key.key_id))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    statuses = sorted(response.status_code for response in answers.values())
    assert statuses in ([200, 401], [200, 409]), {k: v.text for k, v in answers.items()}
    refused = next(r for r in answers.values() if r.status_code != 200)
    assert refused.json()["error"]["code"] in ("invalid_api_key", "last_admin")
    live_admins = [k for k in store.list() if "admin" in k.roles]
    assert len(live_admins) == 1
    result = CliRunner().invoke(main, ["audit", "verify"], env=child_env(own, own.redis_url), catch_exceptions=False)
    assert result.exit_code == 0 and "keys: the key table matches the chain" in result.output, result.output
