"""A revocation over HTTP while Redis is gone: made, refused at once by this gateway, and the admin told.

The real app on a Redis of its own, stopped after the keys are cached: the
signal cannot be published, so the answer must say so (``gateways_told:
false`` and a warning naming the cache TTL), the database must hold the
revocation, and this gateway must refuse the key on its very next request.
"""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.auth import KeyStore
from gateway.components import open_database
from govgate.redis_server import RedisProcess
from tests.conftest import bearer
from tests.gateway.test_auth_cache_api import until

pytestmark = pytest.mark.anyio


async def test_a_revocation_redis_cannot_carry_is_made_refused_here_and_reported(settings, tmp_path, short_tmp):
    redis_server = RedisProcess.start(short_tmp("gg-ak-"), persist=False)
    own = settings.with_(database_url=f"sqlite:///{tmp_path / 'keys.db'}", redis_url=redis_server.url,
                         auth_cache_ttl_s=300.0)
    store = KeyStore(open_database(own))
    try:
        admin = store.create("root", team="ops", roles=["admin"], by="test").secret
        victim = store.create("vic", team="research", roles=["analyst"], by="test")
        app = create_app(own)
        async with AsyncTestClient(app, timeout=60) as client:
            await until(lambda: app.state.components.auth.cache.serving, "the cache's lease")
            for secret in (admin, victim.secret):
                assert (await client.get("/v1/models", headers=bearer(secret))).status_code == 200
            redis_server.stop()

            response = await client.post(f"/admin/keys/{victim.key.key_id}/revoke", headers=bearer(admin))
            assert response.status_code == 200, response.text
            answer = response.json()
            assert (answer["changed"], answer["gateways_told"]) == (True, False)
            assert "not told" in answer["warning"] and "300 s" in answer["warning"]
            assert store.get(victim.key.key_id).revoked_at is not None
            refused = await client.get("/v1/models", headers=bearer(victim.secret))
            assert refused.status_code == 401, refused.text
    finally:
        redis_server.stop()
        store.engine.dispose()
