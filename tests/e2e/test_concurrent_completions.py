"""Many completions in flight at once on a served gateway: each gets its own result, each audited once."""

from __future__ import annotations

import pytest

from audit import verify_chain
from tests.conftest import bearer
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio


async def test_concurrent_requests_each_get_their_own_result(served_api, keyring, audit_store):
    """One shared pub/sub listener serves many waiters; results must never cross.

    Real HTTP against ``govgate serve``, so the 40 requests are in flight at once.
    """
    import anyio
    import httpx

    results: dict[int, dict] = {}
    async with httpx.AsyncClient(timeout=120) as http:
        async def one(n: int) -> None:
            response = await http.post(f"{served_api}/v1/completions", headers=bearer(keyring["admin"]),
                                       json={"model": TINY_MODEL_NAME, "prompt": f"request {n}", "max_tokens": n,
                                             "temperature": 0})
            assert response.status_code == 200, response.text
            results[n] = {"body": response.json(), "request_id": response.headers["x-govgate-request-id"]}

        async with anyio.create_task_group() as group:
            for n in range(1, 41):
                group.start_soon(one, n)
    assert len(results) == 40
    for n, got in results.items():
        assert got["body"]["usage"]["completion_tokens"] == n
        completion = audit_store.terminal_for(got["request_id"])
        assert completion.kind == "completion"
        assert completion.payload["output"] == got["body"]["choices"][0]["text"]
    assert verify_chain(audit_store).ok
