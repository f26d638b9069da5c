"""One id per request: the response header of every answer, errors included, and the audit entries."""

from __future__ import annotations

import pytest

from gateway import urls
from tests.conftest import bearer
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio

HEADER = urls.REQUEST_ID_HEADER
HELLO = [{"role": "user", "content": "Hello"}]


def request_id(response) -> str:
    value = response.headers.get(HEADER, "")
    assert len(value) == 32 and int(value, 16) >= 0, f"no request id on {response.status_code}: {value!r}"
    return value


async def test_an_allowed_request_has_one_id_in_header_body_and_audit(client, keyring, audit_store):
    response = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(keyring["analyst"]),
                                 json={"model": TINY_MODEL_NAME, "messages": HELLO, "max_tokens": 4})
    assert response.status_code == 200
    rid = request_id(response)
    assert response.json()["id"] == f"chatcmpl-{rid}"
    assert [entry.kind for entry in audit_store.entries_for(rid)] == ["request", "completion"]


async def test_denied_and_rejected_requests_name_their_audit_entry(client, keyring, audit_store):
    denied = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(keyring["viewer"]),
                               json={"model": TINY_MODEL_NAME, "messages": HELLO})
    assert denied.status_code == 404  # viewers see no model: answered as an unknown one, audited as the denial
    assert [entry.kind for entry in audit_store.entries_for(request_id(denied))] == ["request"]
    bad = await client.post(urls.CHAT_COMPLETIONS, headers={**bearer(keyring["analyst"]),
                                                            "Content-Type": "application/json"}, content=b"{nope")
    assert bad.status_code == 400
    assert [entry.kind for entry in audit_store.entries_for(request_id(bad))] == ["rejected"]


async def test_every_other_answer_carries_an_id_too(client, keyring):
    answers = [
        await client.get(urls.HEALTH),
        await client.get(urls.READY),
        await client.get(urls.METRICS),
        await client.get(urls.MODELS, headers=bearer(keyring["analyst"])),
        await client.get(urls.MODELS),  # no key: 401
        await client.get(urls.MODELS, headers=bearer("gk_nope_nope")),  # bad key: 401
        await client.get("/nowhere"),  # 404 from the router
        await client.delete(urls.MODELS, headers=bearer(keyring["analyst"])),  # 405
    ]
    assert [a.status_code for a in answers] == [200, 503, 200, 200, 401, 401, 404, 405]
    ids = [request_id(a) for a in answers]
    assert len(set(ids)) == len(ids)  # a new id per request
    for error in answers[4:]:
        assert set(error.json()["error"]) >= {"message", "type", "code"}
