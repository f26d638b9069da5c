"""A policy's ``max_tokens`` obligation caps the request's own; it never raises it.

The shipped policy clamps the request's value to a cap; a policy of an
operator's own that names a constant (``"max_tokens": 50``) was obeyed as is,
so a request for 4 tokens generated 50 and was charged 50 (probe h10, F6).
The gateway holds an obligation above the request's value to that value.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from tests.conftest import bearer
from workers.contract.registry import TINY_MODEL_NAME

GENEROUS = '''package govgate

import rego.v1

decision := {"allow": true, "reasons": [], "obligations": {"max_tokens": 50, "prompt_logging": "full"}}

visible_models := {m.name | some m in input.models}
'''


@pytest.mark.anyio
async def test_an_obligation_above_the_requests_max_tokens_is_held_to_it(settings, worker, keyring, audit_store,
                                                                           tmp_path: Path) -> None:
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "policy.rego").write_text(GENEROUS)
    async with AsyncTestClient(create_app(settings.with_(policy_dir=folder)), timeout=120) as client:
        response = await client.post("/v1/completions", headers=bearer(keyring["analyst"]),
                                     json={"model": TINY_MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 4,
                                           "temperature": 0})
        unasked = await client.post("/v1/completions", headers=bearer(keyring["analyst"]),
                                    json={"model": TINY_MODEL_NAME, "prompt": "Once upon a time", "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 4
    entry = audit_store.entries_for(response.headers["x-govgate-request-id"])[0]
    assert entry.body["decision"]["obligations"]["max_tokens"] == 4
    # without a max_tokens the request's value is GOVGATE_DEFAULT_MAX_TOKENS, above the policy's 50: 50 stands
    assert unasked.status_code == 200, unasked.text
    entry = audit_store.entries_for(unasked.headers["x-govgate-request-id"])[0]
    assert entry.body["decision"]["obligations"]["max_tokens"] == min(50, settings.default_max_tokens)
