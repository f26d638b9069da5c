"""``govgate keys revoke`` tells running gateways, or says plainly that it could not.

The signal goes to ``GOVGATE_REDIS_URL``, else to the Redis ``govgate up``
started under ``GOVGATE_VAR_DIR`` (an operator's second terminal has no
``GOVGATE_REDIS_URL``). A subscriber on a real Redis shows what was sent.
"""

from __future__ import annotations

import time

import pytest
import redis
from click.testing import CliRunner

from gateway.auth import KeyStore
from gateway.auth.key_changes import KEYS_CHANGED_CHANNEL
from gateway.components import open_database
from govgate.cli import main
from govgate.redis_server import RedisProcess
from govgate.supervisor import child_env


def issue_key(settings) -> str:
    engine = open_database(settings)
    try:
        return KeyStore(engine).create("erin", team="research", roles=["analyst"]).key.key_id
    finally:
        engine.dispose()


def revoke(settings, key_id: str, **env: str):
    result = CliRunner().invoke(main, ["keys", "revoke", key_id],
                                env={**child_env(settings, settings.redis_url), **env}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"revoked {key_id}"
    return result


class Subscriber:
    """A pub/sub client on the key-change channel, like a gateway's."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(KEYS_CHANGED_CHANNEL)
        assert self._pubsub.get_message(timeout=5) is None  # the confirmation, ignored

    def received(self) -> list[str]:
        got: list[str] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = self._pubsub.get_message(timeout=0.2)
            if message is None and got:
                break
            if message is not None:
                got.append(message["data"].decode())
        return got

    def close(self) -> None:
        self._pubsub.close()
        self._client.close()


@pytest.fixture
def own_db(settings, tmp_path):
    return settings.with_(database_url=f"sqlite:///{tmp_path / 'keys.db'}")


def test_revoke_signals_the_gateways_redis(own_db):
    key_id = issue_key(own_db)
    subscriber = Subscriber(own_db.redis_url)
    try:
        result = revoke(own_db, key_id)
        assert key_id in subscriber.received()
    finally:
        subscriber.close()
    assert "warning" not in result.stderr


def test_without_a_redis_url_revoke_finds_the_redis_govgate_up_started(own_db, short_tmp):
    var_dir = short_tmp("gg-kv-")
    embedded = RedisProcess.start(var_dir / "redis", persist=False)  # where 'govgate up' puts it
    local = own_db.with_(var_dir=var_dir, redis_url="")
    key_id = issue_key(local)
    subscriber = Subscriber(embedded.url)
    try:
        result = revoke(local, key_id, GOVGATE_REDIS_URL="")
        assert key_id in subscriber.received()
        assert "warning" not in result.stderr
    finally:
        subscriber.close()
        embedded.stop()


def test_revoke_says_how_long_gateways_may_still_accept_a_key_it_could_not_signal(own_db, short_tmp):
    key_id = issue_key(own_db)
    absent = f"unix://{short_tmp('gg-kv-')}/absent.sock"
    result = revoke(own_db, key_id, GOVGATE_REDIS_URL=absent, GOVGATE_AUTH_CACHE_TTL_S="7")
    assert result.stderr.startswith("warning: running gateways were not told: Redis at " + absent)
    assert "for up to 7 s more" in result.stderr and "GOVGATE_AUTH_CACHE_TTL_S" in result.stderr
    # GOVGATE_REDIS_URL is set: the advice is not to set it (probe s59 G7), but that its Redis did not answer
    assert "set GOVGATE_REDIS_URL" not in result.stderr
    assert "the Redis GOVGATE_REDIS_URL names did not answer" in result.stderr, result.stderr
    # The revocation itself is committed.
    engine = open_database(own_db)
    try:
        assert key_id not in {key.key_id for key in KeyStore(engine).list()}
    finally:
        engine.dispose()


def test_revoke_with_a_url_that_is_not_redis_still_reports_the_committed_revocation(own_db, monkeypatch):
    import govgate.cli_keys

    key_id = issue_key(own_db)
    # GOVGATE_REDIS_URL itself is checked by Settings; the announcer must still not turn a bad URL into a traceback.
    monkeypatch.setattr(govgate.cli_keys, "_gateways_redis_url", lambda settings: "http://127.0.0.1:1/")
    result = revoke(own_db, key_id)
    assert result.stderr.startswith("warning: running gateways were not told: 'http://127.0.0.1:1/' is not a Redis URL")
    engine = open_database(own_db)
    try:
        assert key_id not in {key.key_id for key in KeyStore(engine).list()}
    finally:
        engine.dispose()
