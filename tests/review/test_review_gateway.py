"""A completion served end to end (gateway, Redis, worker, model), then read back through the review API."""

from __future__ import annotations

import pytest

from audit import verify_chain
from tests.conftest import bearer
from tests.keys_and_limits import new_key
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio


async def test_a_served_completion_has_its_whole_story(client, settings, audit_store):
    user = new_key(settings, "review-user", "research")
    reviewer = new_key(settings, "review-rita", None, roles=("reviewer",))
    response = await client.post("/v1/chat/completions", headers=bearer(user),
                                 json={"model": TINY_MODEL_NAME, "max_tokens": 6, "temperature": 0,
                                       "messages": [{"role": "user", "content": "Tell the reviewer"}]})
    assert response.status_code == 200, response.text
    request_id = response.headers["x-govgate-request-id"]
    output = response.json()["choices"][0]["message"]["content"]

    story = (await client.get(f"/v1/audit/requests/{request_id}", headers=bearer(reviewer))).json()
    assert story["status"] == "completion" and story["principal"] == "review-user"
    assert story["decision"]["allow"] is True and story["policy_revision"]
    completion = story["entries"][-1]
    assert completion["body"]["usage"] == response.json()["usage"]
    assert "Tell the reviewer" not in str(story)

    shown = (await client.get(f"/v1/audit/requests/{request_id}", headers=bearer(reviewer),
                              params={"include_text": "true"})).json()
    kept = [entry["payload"] or entry["body"] for entry in shown["entries"]]
    assert kept[0]["messages"] == [{"role": "user", "content": "Tell the reviewer"}]
    assert kept[-1]["output"] == output
    read = audit_store.tail(1)[0]
    assert read.kind == "payload_read" and read.principal == "review-rita" and read.body["request_ids"] == [request_id]

    disposed = await client.post(f"/v1/audit/requests/{request_id}/disposition", headers=bearer(reviewer),
                                 json={"disposition": "ok"})
    assert disposed.status_code == 201
    own = (await client.get(f"/v1/audit/requests/{request_id}", headers=bearer(user))).json()
    assert own["review"] == [] and [e["kind"] for e in own["entries"]] == ["request", "completion"]
    usage = (await client.get("/v1/audit/usage", headers=bearer(user), params={"group_by": "principal"})).json()
    assert usage["data"] == [{"principal": "review-user", "requests": 1, "allowed": 1, "denied": 0,
                              "unavailable": 0, "rejected": 0, **response.json()["usage"]}]
    assert verify_chain(audit_store).ok


async def test_no_answer_of_the_review_api_may_be_cached(client, settings):
    # The console's pages and a new key's secret said `no-store`; the review API served the same prompts and
    # outputs (include_text, exports, q searches) with no Cache-Control, which a proxy or a browser's disk cache
    # may keep.
    user = new_key(settings, "review-cache-user", "research")
    reviewer = new_key(settings, "review-cache-rita", None, roles=("reviewer",))
    response = await client.post("/v1/chat/completions", headers=bearer(user),
                                 json={"model": TINY_MODEL_NAME, "max_tokens": 6, "temperature": 0,
                                       "messages": [{"role": "user", "content": "ZQX cached prompt"}]})
    assert response.status_code == 200, response.text
    request_id = response.headers["x-govgate-request-id"]
    reads = {
        "story": await client.get(f"/v1/audit/requests/{request_id}", headers=bearer(reviewer),
                                  params={"include_text": "true"}),
        "entries": await client.get("/v1/audit/entries", headers=bearer(reviewer),
                                    params={"request_id": request_id, "include_text": "true"}),
        "search": await client.get("/v1/audit/entries", headers=bearer(reviewer), params={"q": "ZQX cached"}),
        "export": await client.get("/v1/audit/export", headers=bearer(reviewer),
                                   params={"request_id": request_id, "include_text": "true"}),
        "own story": await client.get(f"/v1/audit/requests/{request_id}", headers=bearer(user),
                                      params={"include_text": "true"}),
        "usage": await client.get("/v1/audit/usage", headers=bearer(user)),
        "comment": await client.post(f"/v1/audit/requests/{request_id}/comment", headers=bearer(reviewer),
                                     json={"text": "seen"}),
    }
    assert {name: r.status_code for name, r in reads.items()} == {name: 201 if name == "comment" else 200
                                                                 for name in reads}
    for name in ("story", "entries", "export", "own story"):  # the texts were there to keep
        assert "ZQX cached prompt" in reads[name].text, name
    assert {name: r.headers.get("cache-control") for name, r in reads.items()} == dict.fromkeys(reads, "no-store")
