"""A gateway of its own for the key administration tests, on SQLite and on PostgreSQL.

Each module gets a fresh database per backend (the review tests' pattern,
``tests/review/conftest.py``) and the suite's Redis; tests that need a
store of their own (the last admin, a broken table) take ``fresh_gateway``.
No worker is needed: ``GET /v1/models`` is the authenticated request that
shows whether a key works and which models its roles give it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import pytest
from litestar.testing import AsyncTestClient

from audit import AuditStore
from gateway.app import create_app
from gateway.auth import KeyStore
from gateway.components import open_database
from gateway.settings import Settings
from govgate.redis_server import RedisProcess
from tests.review.conftest import review_settings


@dataclass
class Keys:
    """Secrets and key ids of the keys each test module starts with."""

    admin: str
    admin_id: str
    analyst: str
    analyst_id: str
    viewer: str
    revoked: str


def make_keys(settings: Settings) -> Keys:
    store = KeyStore(open_database(settings))
    try:
        admin = store.create("root", team="ops", roles=["admin"], by="test-setup")
        analyst = store.create("alice", team="research", roles=["analyst"], by="test-setup")
        viewer = store.create("victor", team="research", roles=["viewer"], by="test-setup")
        revoked = store.create("rex", team="research", roles=["admin"], by="test-setup")
        store.revoke(revoked.key.key_id, by="test-setup")
        return Keys(admin=admin.secret, admin_id=admin.key.key_id, analyst=analyst.secret,
                    analyst_id=analyst.key.key_id, viewer=viewer.secret, revoked=revoked.secret)
    finally:
        store.engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Iterator[Callable[[str], str]]:
    """Makes fresh databases of one backend: "" (a SQLite file in the var folder) or a PostgreSQL URL."""
    if request.param == "sqlite":
        yield lambda name: ""
        return
    server = request.getfixturevalue("postgres_server")
    made: list[str] = []

    def fresh(name: str) -> str:
        made.append(server.fresh_database(name))
        return made[-1]

    yield fresh
    for url in made:
        server.drop_database(url)


@pytest.fixture(scope="module")
def asettings(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisProcess, models_file: Path,
              backend: Callable[[str], str]) -> Settings:
    return review_settings(tmp_path_factory.mktemp("admin"), redis_server, models_file, backend("admin"))


@pytest.fixture(scope="module")
def akeys(asettings: Settings) -> Keys:
    return make_keys(asettings)


@pytest.fixture(scope="module")
def astore(asettings: Settings, akeys: Keys) -> Iterator[KeyStore]:
    store = KeyStore(open_database(asettings))
    yield store
    store.engine.dispose()


@pytest.fixture(scope="module")
def aaudit(astore: KeyStore) -> AuditStore:
    return AuditStore(astore.engine)


@pytest.fixture(scope="module")
async def aclient(asettings: Settings, akeys: Keys) -> AsyncIterator[AsyncTestClient]:
    async with AsyncTestClient(create_app(asettings), timeout=60) as client:
        yield client


@pytest.fixture
def fresh_gateway(tmp_path: Path, redis_server: RedisProcess, models_file: Path, backend: Callable[[str], str]):
    """``async with fresh_gateway() as (client, settings):`` a gateway on a database of its own, no keys yet."""

    @contextlib.asynccontextmanager
    async def start(**changes) -> AsyncIterator[tuple[AsyncTestClient, Settings]]:
        settings = review_settings(tmp_path / f"var{len(list(tmp_path.iterdir()))}", redis_server, models_file,
                                   backend("adminfresh")).with_(**changes)
        async with AsyncTestClient(create_app(settings), timeout=60) as client:
            yield client, settings

    return start


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
