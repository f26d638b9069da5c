"""A key reading its own entries cannot tell a model it may not see from a name that does not exist.

The gateway answers both with the same 404 ``model_not_found``
(tests/gateway/test_hidden_models.py), but the review API lets any key read
its own entries, and there a hidden model's refusal was a ``request`` entry
naming the model with the policy's reasons, where an unknown name leaves a
``rejected`` entry. Here the same analyst key asks for a model its role
lacks and for an unknown name of the same length, through the real gateway
(the shipped policy on regorus, Redis, SQLite and PostgreSQL), then reads
both refusals back every way the review API offers it: search, story,
export, usage, and each filter. Apart from ids and times (and the body's
keyed digest) what it reads must be the same; a reviewer and an auditor
still read the entry as recorded.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest

from gateway import urls
from tests.conftest import IDLE_MODEL
from tests.review.conftest import bearer, pages
from tests.review.test_review_described import described

pytestmark = pytest.mark.anyio

#: A name no registry holds, as long as the hidden model's, so both bodies have the same size.
UNKNOWN = "zzzz-zzzz"
assert len(UNKNOWN) == len(IDLE_MODEL)
HELLO = [{"role": "user", "content": "Hello hidden"}]
#: What differs between any two requests' entries: ids, times, places on the chain, the body's keyed digest.
_VARYING = ("seq", "created_at", "request_id")


async def _refused(client, key: str, model: str, **extra: Any) -> str:
    response = await client.post(urls.CHAT_COMPLETIONS, headers=bearer(key),
                                 json={"model": model, "messages": HELLO, **extra})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found", response.text
    return response.headers["x-govgate-request-id"]


def _same_part(document: dict[str, Any]) -> dict[str, Any]:
    """An entry document without what differs between any two requests."""
    shown = {name: value for name, value in document.items() if name not in _VARYING}
    body = dict(shown["body"])
    assert isinstance(body.pop("body_hmac_sha256", None), str)  # kept, keyed: differs with the body's text
    return {**shown, "body": body}


def _same_story(story: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in story.items() if k not in ("request_id", "entries")},
            "entries": [_same_part(document) for document in story["entries"]]}


@pytest.fixture(scope="module")
async def refusals(rclient, rkeys) -> dict[str, str]:
    """One key's refusals: a model its role lacks (a denial; a body the model cannot take, rejected before the
    policy), and an unknown name, sent the same way."""
    return {
        "denied": await _refused(rclient, rkeys.alice, IDLE_MODEL),
        "unknown": await _refused(rclient, rkeys.alice, UNKNOWN),
        "unfit": await _refused(rclient, rkeys.alice, IDLE_MODEL, frequency_penalty=0.5),
        "unknown_unfit": await _refused(rclient, rkeys.alice, UNKNOWN, frequency_penalty=0.5),
    }


async def _entries(client, key: str, **params: Any) -> list[dict[str, Any]]:
    return await pages(client, key, params)


@pytest.mark.parametrize("hidden,unknown", [("denied", "unknown"), ("unfit", "unknown_unfit")])
async def test_own_entries_show_a_hidden_model_as_an_unknown_name(rclient, rstore, rkeys, refusals, hidden,
                                                                  unknown):
    stored = rstore.entries_for(refusals[hidden])
    assert stored[0].body["answered"]["code"] == "model_not_found"  # the premise: recorded as the truth
    if hidden == "denied":
        assert stored[0].kind == "request" and stored[0].model == IDLE_MODEL
        assert [r["code"] for r in stored[0].body["decision"]["reasons"]] == ["model_not_allowed"]
    else:
        assert stored[0].kind == "rejected" and stored[0].body["error"]["code"] == "unsupported_parameter"

    # search
    seen = await _entries(rclient, rkeys.alice, request_id=refusals[hidden])
    baseline = await _entries(rclient, rkeys.alice, request_id=refusals[unknown])
    assert len(seen) == len(baseline) == 1
    assert _same_part(seen[0]) == _same_part(baseline[0])
    assert seen[0]["kind"] == "rejected" and seen[0]["model"] is None and "answered" not in seen[0]["body"]
    assert IDLE_MODEL not in json.dumps(seen[0]) and "decision" not in seen[0]["body"]
    # the chain's hashes are left out of a key's own entries (a hash of what is shown would not be the stored one)
    assert seen[0]["hash"] is None and seen[0]["prev_hash"] is None
    assert seen[0]["withheld"] == baseline[0]["withheld"] == ["prev_hash", "hash"]
    # with texts asked for: still nothing (a rejection has none), and no read recorded for them
    texts = await _entries(rclient, rkeys.alice, request_id=refusals[hidden], include_text="true")
    assert _same_part(texts[0]) == _same_part(seen[0]) and texts[0]["payload"] is None

    # as the API's description says (a closed schema: no field it does not know, hashes null)
    schema = (await rclient.get("/schema/openapi.json")).json()
    for path in ("/v1/audit/entries", "/v1/audit/export", f"/v1/audit/requests/{refusals[hidden]}"):
        described(schema, await rclient.get(path, headers=bearer(rkeys.alice),
                                            params={} if "requests" in path else {"request_id": refusals[hidden]}))

    # story, with and without texts
    for params in ({}, {"include_text": "true"}):
        story = await rclient.get(f"/v1/audit/requests/{refusals[hidden]}", headers=bearer(rkeys.alice),
                                  params=params)
        known = await rclient.get(f"/v1/audit/requests/{refusals[unknown]}", headers=bearer(rkeys.alice),
                                  params=params)
        assert story.status_code == known.status_code == 200, story.text
        assert _same_story(story.json()) == _same_story(known.json())
        assert story.json()["status"] == "rejected" and story.json()["decision"] is None
        assert IDLE_MODEL not in story.text and "may not" not in story.text

    # export, both formats
    for fmt in ("jsonl", "csv"):
        lines = []
        for request_id in (refusals[hidden], refusals[unknown]):
            response = await rclient.get("/v1/audit/export", headers=bearer(rkeys.alice),
                                         params={"request_id": request_id, "format": fmt})
            assert response.status_code == 200, response.text
            assert IDLE_MODEL not in response.text
            if fmt == "jsonl":
                lines.append([_same_part(json.loads(line)) for line in response.text.splitlines()])
            else:
                rows = list(csv.DictReader(io.StringIO(response.text, newline="")))
                lines.append([_same_part({**row, "body": json.loads(row["body"])}) for row in rows])
        assert len(lines[0]) == 1 and lines[0] == lines[1]


async def test_reviewers_and_auditors_still_read_the_entry_as_recorded(rclient, rstore, rkeys, refusals):
    """The view is the key's own: the stored entry is unchanged, verifies, and is what reviewers read."""
    stored = rstore.entries_for(refusals["denied"])[0]
    own = (await _entries(rclient, rkeys.alice, request_id=refusals["denied"]))[0]
    assert own["kind"] == "rejected"  # the key's view (before the change: the request entry, reasons and all)
    for key in (rkeys.reviewer, rkeys.auditor):
        real = (await _entries(rclient, key, request_id=refusals["denied"]))[0]
        assert (real["kind"], real["model"], real["hash"], real["prev_hash"]) == \
            ("request", IDLE_MODEL, stored.hash, stored.prev_hash)
        assert real["body"]["decision"] == stored.body["decision"] and real["body"]["answered"]["status"] == 404
        story = (await rclient.get(f"/v1/audit/requests/{refusals['denied']}", headers=bearer(key))).json()
        assert story["status"] == "denied" and story["model"] == IDLE_MODEL
        assert [r["code"] for r in story["decision"]["reasons"]] == ["model_not_allowed"]
    assert stored.expected_hash() == stored.hash
    assert rstore.entries_for(refusals["denied"])[0] == stored


#: Filters a key may give, each of which a hidden model's refusal must match exactly as an unknown name's does.
FILTERS = [{}, {"kind": "request"}, {"kind": "rejected"}, {"kind": "request,rejected"}, {"kind": "completion"},
           {"decision": "deny"}, {"decision": "allow"}, {"decision": "unavailable"},
           {"reason": "model_not_allowed"}, {"model": IDLE_MODEL}, {"q": "hidden"}, {"team": "research"},
           {"kind": "rejected", "model": IDLE_MODEL}]


@pytest.mark.parametrize("hidden,unknown", [("denied", "unknown"), ("unfit", "unknown_unfit")])
async def test_filters_match_a_hidden_model_as_an_unknown_name(rclient, rkeys, refusals, hidden, unknown):
    """Each filter, on the search and the export: the hidden model's refusal is among the key's matches exactly
    when the unknown name's is (before, ``decision=deny``, ``reason``, ``model``, ``kind=request`` and ``q``
    found the one and not the other), and looks the same there; a reviewer's filters match the truth."""
    expected = {"kind": "request", "decision": "deny", "reason": "model_not_allowed", "model": IDLE_MODEL,
                "q": "hidden"}
    for where in FILTERS:
        for path in ("/v1/audit/entries", "/v1/audit/export"):
            matched = []
            for name in (hidden, unknown):
                response = await rclient.get(path, headers=bearer(rkeys.alice),
                                             params={**where, "request_id": refusals[name]})
                assert response.status_code == 200, response.text
                documents = response.json()["data"] if path.endswith("entries") else \
                    [json.loads(line) for line in response.text.splitlines()]
                matched.append([_same_part(document) for document in documents])
            assert matched[0] == matched[1], (path, where)
            assert len(matched[1]) == (1 if where.get("kind", "rejected") in ("rejected", "request,rejected")
                                       and set(where) <= {"kind", "team"} else 0), (path, where)
        if hidden != "denied":
            continue
        truth = await _entries(rclient, rkeys.reviewer, **{**where, "request_id": refusals["denied"]})
        wanted = all(where[name] == expected[name] or (name == "kind" and "request" in where[name])
                     for name in where if name in expected)
        assert len(truth) == (1 if wanted else 0), where


async def test_usage_counts_a_hidden_model_as_an_unknown_names_rejection(rclient, rkeys, refusals):
    answers = []
    for name in ("denied", "unknown"):
        response = await rclient.get("/v1/audit/usage", headers=bearer(rkeys.alice),
                                     params={"request_id": refusals[name], "group_by": "team,model,principal"})
        assert response.status_code == 200, response.text
        answers.append(response.json())
    assert answers[0] == answers[1]
    assert [(row["model"], row["rejected"], row["denied"]) for row in answers[0]["data"]] == [(None, 1, 0)]
    assert answers[0]["denials"] == []
    for name in ("denied", "unknown"):  # by a model's name: neither is counted
        response = await rclient.get("/v1/audit/usage", headers=bearer(rkeys.alice),
                                     params={"request_id": refusals[name], "model": IDLE_MODEL})
        assert response.json()["data"] == []
    truth = (await rclient.get("/v1/audit/usage", headers=bearer(rkeys.reviewer),
                               params={"request_id": refusals["denied"], "group_by": "model"})).json()
    assert [(row["model"], row["denied"], row["rejected"]) for row in truth["data"]] == [(IDLE_MODEL, 1, 0)]
    assert [(row["reason"], row["count"]) for row in truth["denials"]] == [("model_not_allowed", 1)]
