"""``GOVGATE_OUTPUT_RULES``: on, every output is judged and the entry says so; off, outputs are served as before."""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from tests.conftest import bearer
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio

BODY = {"model": TINY_MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}


@pytest.mark.parametrize("rules", [True, False])
async def test_the_switch_decides_whether_the_output_is_judged(settings, worker, keyring, audit_store, rules):
    async with AsyncTestClient(create_app(settings.with_(output_rules=rules)), timeout=120) as client:
        response = await client.post("/v1/completions", headers=bearer(keyring["analyst"]), json=BODY)
    assert response.status_code == 200, response.text
    terminal = audit_store.terminal_for(response.headers["x-govgate-request-id"])
    assert terminal.kind == "completion"
    assert ("output_decision" in terminal.body) is rules
    assert ("client_output" in terminal.payload) is rules
    assert terminal.payload["output"] == response.json()["choices"][0]["text"]
