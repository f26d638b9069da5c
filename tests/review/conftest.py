"""A gateway of its own for the review tests: its own database, the suite's Redis, the shipped policy.

The entries are real: denied requests made through the gateway, and
requests, terminal entries and rejections appended through ``AuditStore``
as the gateway and the workers append them (no worker is needed, so the
store holds exactly what the tests put there). Expected answers are
computed in Python from every entry in the store, so tests that append
(review actions, reads) do not disturb the others.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
from litestar.testing import AsyncTestClient

from audit import AuditEntry, AuditStore, make_engine
from gateway.app import create_app
from gateway.auth import KeyStore
from gateway.components import open_database
from gateway.settings import Settings
from govgate.processes import free_port
from govgate.redis_server import RedisProcess
from tests.conftest import _roomy_limits, policy_copy

PRINCIPALS = {"alice": "research", "bob": "support", "carol": "research", "dave": None}
MODELS = ("govgate-tiny", "idle-tiny", "other-model")
#: Texts with what a LIKE or JSON could trip on: quotes, % and _, a backslash, a newline, non-ASCII.
TEXTS = ("plain", 'with "quotes"', "50%_off", "back\\slash", "new\nline", "ünï")
REASONS = ("model_not_allowed", "rate_limited", "outside_hours", "budget_exceeded")


@dataclass
class Keys:
    reviewer: str
    auditor: str
    alice: str
    bob: str
    admin: str
    viewer: str


def review_settings(var_dir: Path, redis_server: RedisProcess, models_file: Path,
                    database_url: str = "") -> Settings:
    return Settings(var_dir=var_dir, redis_url=redis_server.url, policy_dir=policy_copy(var_dir, _roomy_limits),
                    models_file=str(models_file), request_timeout_s=60.0, port=free_port(),
                    database_url=database_url)


def make_keys(settings: Settings) -> Keys:
    store = KeyStore(open_database(settings))
    try:
        return Keys(
            reviewer=store.create("rita", team="compliance", roles=["reviewer"]).secret,
            auditor=store.create("otto", team=None, roles=["auditor"]).secret,
            alice=store.create("alice", team="research", roles=["analyst"]).secret,
            bob=store.create("bob", team="support", roles=["analyst"]).secret,
            admin=store.create("root", team="ops", roles=["admin"]).secret,
            viewer=store.create("victor", team="research", roles=["viewer"]).secret,
        )
    finally:
        store.engine.dispose()


#: Codes a reservation refuses an allowed request with (gateway/requests/refusals.py's admission records).
ADMISSION_REFUSALS = ("rate_limited", "budget_exceeded", "queue_full", "context_length_exceeded", "usage_unavailable")


def seed(store: AuditStore, count: int, *, rng: random.Random, team: str | None = None) -> list[str]:
    """``count`` requests as the gateway and workers record them; their request ids."""
    ids = []
    for i in range(count):
        principal = rng.choice(sorted(PRINCIPALS))
        who = {"principal": principal, "team": team or PRINCIPALS[principal], "model": rng.choice(MODELS)}
        request_id = f"seed-{rng.getrandbits(64):016x}"
        ids.append(request_id)
        roll = rng.random()
        if roll < 0.1:
            store.append("rejected", request_id, **who, policy_revision="rev-1",
                         body={"endpoint": "chat.completions", "status": 422,
                               "error": {"code": "invalid_value", "message": "bad", "param": "x"}})
            continue
        if roll < 0.35:
            reasons = rng.sample(REASONS, rng.choice((1, 2)))
            decision = {"allow": False, "reasons": [{"code": c, "message": f"no: {c}"} for c in reasons],
                        "obligations": {"max_tokens": 16, "prompt_logging": "full"}}
        elif roll < 0.4:
            decision = {"allow": False, "unavailable": True,
                        "reasons": [{"code": "policy_unavailable", "message": "slow"}],
                        "obligations": {"max_tokens": 16, "prompt_logging": "full"}}
        else:
            decision = {"allow": True, "reasons": [], "obligations": {"max_tokens": 16, "prompt_logging": "full"}}
        # an allowed request's reservation: admitted, or refused after the allow (a limit the policy's snapshot
        # did not see reached, the queue, the context, the counters unreachable), as the gateway records it
        admission = None
        if decision["allow"]:
            admission = {"admitted": True, "reserved_tokens": 20}
            side = random.Random(request_id)  # its own draws: the seed's other entries stay as they were
            if side.random() < 0.2:
                admission = {"admitted": False, "code": side.choice(ADMISSION_REFUSALS)}
        text = f"needle-{i} {rng.choice(TEXTS)}"
        # Most texts go to the erasable payload (chain format 2); some stay in the body, as entries of
        # format 1 hold them, so both places are searched and withheld.
        legacy = rng.random() < 0.3
        messages = {"messages": [{"role": "user", "content": text}]}
        store.append("request", request_id, **who, policy_revision="rev-1",
                     body={"endpoint": "chat.completions", "key_id": "k", "decision": decision,
                           **({"admission": admission} if admission is not None else {}),
                           **(messages if legacy else {})},
                     payload=None if legacy else messages)
        if decision["allow"] and rng.random() < 0.9 and (admission is None or admission["admitted"]):
            prompt, completion = rng.randint(1, 50), rng.randint(0, 16)
            kind = rng.choice(("completion", "completion", "failed", "cancelled"))
            output = {"output": f"answer {i}"}
            store.append(kind, request_id, **who, policy_revision="rev-1",
                         body={"finish_reason": "length", **(output if legacy else {}),
                               "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                         "total_tokens": prompt + completion}},
                         payload=None if legacy else output)
    return ids


def all_entries(store: AuditStore) -> list[AuditEntry]:
    return list(store.iter_entries())


def texts(entry: AuditEntry) -> dict[str, Any]:
    """The entry's texts, wherever it keeps them (payload, or the body in chain format 1)."""
    if entry.payload is not None:
        return {k: v for k, v in entry.payload.items() if k in ("messages", "prompt", "output")}
    return {k: v for k, v in entry.body.items() if k in ("messages", "prompt", "output")}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def review_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each module runs on SQLite (the embedded default) and on a fresh PostgreSQL database.

    PostgreSQL comes from the suite's ``postgres_server`` fixture
    (tests/postgres_server.py), which skips, or fails in CI, without one.
    """
    if request.param == "sqlite":
        yield ""
        return
    server = request.getfixturevalue("postgres_server")
    url = server.fresh_database("review")
    yield url
    server.drop_database(url)


@pytest.fixture(scope="module")
def review_var(tmp_path_factory: pytest.TempPathFactory, review_database: str) -> Path:
    """A var folder per module and backend: its policy copy, and on SQLite its database, are the run's own."""
    return tmp_path_factory.mktemp("review")


@pytest.fixture(scope="module")
def rsettings(review_var: Path, redis_server: RedisProcess, models_file: Path, review_database: str) -> Settings:
    return review_settings(review_var, redis_server, models_file, review_database)


@pytest.fixture(scope="module")
def rkeys(rsettings: Settings) -> Keys:
    return make_keys(rsettings)


@pytest.fixture(scope="module")
def rstore(rsettings: Settings, rkeys: Keys) -> Iterator[AuditStore]:
    engine = make_engine(rsettings.effective_database_url)
    store = AuditStore(engine)
    seed(store, 120, rng=random.Random(10))
    yield store
    engine.dispose()


@pytest.fixture(scope="module")
async def rclient(rsettings: Settings, rstore: AuditStore) -> AsyncIterator[AsyncTestClient]:
    async with AsyncTestClient(create_app(rsettings), timeout=60) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def pages(client: AsyncTestClient, key: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every entry of a search, page by page (asserting each page is well formed)."""
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        response = await client.get("/v1/audit/entries", headers=bearer(key),
                                    params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        page = response.json()
        assert page["object"] == "list"
        found += page["data"]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            return found
        cursor = page["next_cursor"]
        assert cursor == str(page["data"][-1]["seq"])
