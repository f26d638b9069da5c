"""A gateway of its own for the console tests: its own SQLite database, the suite's Redis, seeded entries.

The entries are the review tests' (``tests/review/conftest.py``: requests,
denials, completions as the gateway and workers append them), plus one
request whose prompt and output are markup, for the escaping tests.
Helpers sign in the way a browser does: read the sign-in form's token,
post it with the key, keep the cookies.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
from litestar.testing import AsyncTestClient

from audit import AuditStore, make_engine
from gateway.app import create_app
from gateway.auth import KeyStore
from gateway.components import open_database
from gateway.settings import Settings
from govgate.redis_server import RedisProcess
from tests.review.conftest import Keys, make_keys, review_settings, seed

#: The prompt and output of the request the escaping tests open.
MARKUP_PROMPT = '<script>alert("prompt")</script><img src=x onerror=alert(1)>'
MARKUP_OUTPUT = "</pre><script>alert('output')</script>"
MARKUP_REQUEST = "markup-request-1"
DENIED_REQUEST = "denied-request-1"
#: A checked stream whose worker's end could not say what its client received: its gateway's ``delivered``.
DELIVERED_REQUEST = "delivered-request-1"
DELIVERED_OUTPUT = "the whole generated output, held back in part"
DELIVERED_CLIENT = "the whole generated"
#: A kept end that says more than its client got (the verdict's text), and the gateway's delivered entry.
OVERSTATED_REQUEST = "overstated-request-1"
OVERSTATED_CLAIM = "the verdict released all of this text"
OVERSTATED_CLIENT = "the verdict released"

_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class Console:
    settings: Settings
    keys: Keys
    store: AuditStore


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def console_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """The console's pages on SQLite and on a fresh PostgreSQL database (skips, or fails in CI, without one)."""
    if request.param == "sqlite":
        yield ""
        return
    server = request.getfixturevalue("postgres_server")
    url = server.fresh_database("console")
    yield url
    server.drop_database(url)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisProcess, models_file: Path,
            console_database: str) -> Iterator[Console]:
    settings = review_settings(tmp_path_factory.mktemp("console"), redis_server, models_file, console_database)
    keys = make_keys(settings)
    engine = make_engine(settings.effective_database_url)
    store = AuditStore(engine)
    seed(store, 60, rng=random.Random(11))
    who = {"principal": "alice", "team": "research", "model": "govgate-tiny"}
    store.append("request", MARKUP_REQUEST, **who, policy_revision="rev-1",
                 body={"endpoint": "chat.completions", "key_id": "k",
                       "decision": {"allow": True, "reasons": [], "obligations": {"max_tokens": 16}}},
                 payload={"messages": [{"role": "user", "content": MARKUP_PROMPT}]})
    store.append("completion", MARKUP_REQUEST, **who, policy_revision="rev-1",
                 body={"finish_reason": "stop", "timings": {"queue_ms": 3.0, "generate_ms": 41.5},
                       "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}},
                 payload={"output": MARKUP_OUTPUT})
    store.append("request", DENIED_REQUEST, principal="bob", team="support", model="other-model",
                 policy_revision="rev-1",
                 body={"endpoint": "chat.completions", "key_id": "k",
                       "decision": {"allow": False, "reasons": [{"code": "model_not_allowed", "message": "no"}],
                                    "obligations": {}}},
                 payload={"messages": [{"role": "user", "content": "may I?"}]})
    store.append("request", DELIVERED_REQUEST, **who, policy_revision="rev-1",
                 body={"endpoint": "completions", "key_id": "k",
                       "decision": {"allow": True, "reasons": [], "obligations": {}}},
                 payload={"prompt": "Tell"})
    failed = store.append("failed", DELIVERED_REQUEST, **who, policy_revision="rev-1",
                          body={"error": {"code": "worker_error", "message": "the job's channel failed"}},
                          payload={"output": DELIVERED_OUTPUT})
    store.append("delivered", DELIVERED_REQUEST, **who, policy_revision="rev-1",
                 body={"terminal_seq": failed.seq, "ended_as": "failed",
                       "output_decision": {"allow": True, "reasons": [], "findings": [], "stopped": False,
                                           "policy_revision": "rev-1"}},
                 payload={"client_output": DELIVERED_CLIENT})
    store.append("request", OVERSTATED_REQUEST, **who, policy_revision="rev-1",
                 body={"endpoint": "completions", "key_id": "k",
                       "decision": {"allow": True, "reasons": [], "obligations": {}}},
                 payload={"prompt": "Tell"})
    kept = store.append("failed", OVERSTATED_REQUEST, **who, policy_revision="rev-1",
                        body={"error": {"code": "audit_unavailable", "message": "kept"}, "ended_as": "completion"},
                        payload={"output": OVERSTATED_CLAIM, "client_output": OVERSTATED_CLAIM})
    store.append("delivered", OVERSTATED_REQUEST, **who, policy_revision="rev-1",
                 body={"terminal_seq": kept.seq, "ended_as": "failed"},
                 payload={"client_output": OVERSTATED_CLIENT})
    yield Console(settings, keys, store)
    engine.dispose()


@pytest.fixture(scope="module")
async def app_client(console: Console) -> AsyncIterator[AsyncTestClient]:
    async with AsyncTestClient(create_app(console.settings), timeout=60) as client:
        yield client


@pytest.fixture
async def client(app_client: AsyncTestClient) -> AsyncIterator[AsyncTestClient]:
    """The module's app with an empty cookie jar (a fresh browser) for each test."""
    app_client.cookies.clear()
    app_client.follow_redirects = False  # the tests look at each redirect and its cookies
    yield app_client
    app_client.cookies.clear()


def form_token(html: str) -> str:
    found = _TOKEN.search(html)
    assert found, "no CSRF token in the page"
    return found.group(1)


async def sign_in(client: AsyncTestClient, key: str) -> str:
    """Sign in as a browser does; the session's CSRF token (from a signed-in page's sign-out form)."""
    form = await client.get("/console/sign-in")
    assert form.status_code == 200, form.text
    response = await client.post("/console/sign-in", data={"csrf_token": form_token(form.text), "key": key,
                                                           "next": "/console/search"})
    assert response.status_code == 303, response.text
    page = await client.get("/console/search")
    assert page.status_code == 200, page.text
    return form_token(page.text)


def new_key(console: Console, user: str, roles: list[str]) -> tuple[str, str]:
    """(secret, key id) of a fresh key, for tests that revoke or change it."""
    store = KeyStore(open_database(console.settings))
    try:
        issued = store.create(user, team="compliance", roles=roles)
        return issued.secret, issued.key.key_id
    finally:
        store.engine.dispose()


def key_store(console: Console) -> KeyStore:
    return KeyStore(open_database(console.settings))
