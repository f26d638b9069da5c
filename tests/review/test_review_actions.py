"""A request's story, review actions on the chain, and every read of a text recorded before it is shown."""

from __future__ import annotations

import contextlib
import json
from typing import Iterator

import pytest

from audit import AuditStore, verify_chain
from tests.review.conftest import all_entries, bearer
from tests.review.test_review_described import described

pytestmark = pytest.mark.anyio


def _doc_texts(document: dict) -> dict:
    """The texts a returned document shows (payload, or a format-1 body)."""
    kept = document["payload"] or document["body"]
    return {k: v for k, v in kept.items() if k in ("messages", "prompt", "output")}


def _reads(store: AuditStore) -> list:
    return [e for e in all_entries(store) if e.kind == "payload_read"]


def _target(store: AuditStore, principal: str = "carol", kind: str = "completion"):
    ended = next(e for e in all_entries(store) if e.principal == principal and e.kind == kind)
    return ended.request_id


async def test_the_story_holds_request_decision_outcome_and_review(rclient, rstore, rkeys):
    request_id = _target(rstore)
    url = f"/v1/audit/requests/{request_id}"
    flag = await rclient.post(f"{url}/flag", headers=bearer(rkeys.reviewer), json={"note": "odd prompt"})
    assert flag.status_code == 201, flag.text
    assert flag.headers["x-govgate-request-id"] == request_id
    assert flag.json()["kind"] == "flagged" and flag.json()["principal"] == "rita"
    comment = await rclient.post(f"{url}/comment", headers=bearer(rkeys.reviewer),
                                 json={"text": "asked the team; \"fine\" 50%_ \u00fcn\u00ef"})
    first = await rclient.post(f"{url}/disposition", headers=bearer(rkeys.reviewer),
                               json={"disposition": "needs-follow-up"})
    last = await rclient.post(f"{url}/disposition", headers=bearer(rkeys.reviewer),
                              json={"disposition": "violation", "note": "confirmed"})
    assert [r.status_code for r in (comment, first, last)] == [201, 201, 201]

    story = (await rclient.get(url, headers=bearer(rkeys.reviewer))).json()
    assert story["object"] == "audit.request" and story["request_id"] == request_id
    assert story["principal"] == "carol" and story["team"] == "research"
    assert story["status"] == "completion" and story["decision"]["allow"] is True
    assert story["policy_revision"] == "rev-1"
    assert [d["kind"] for d in story["entries"]] == ["request", "completion"]
    assert story["entries"][1]["body"]["usage"]["total_tokens"] >= 1
    assert story["flagged"] is True and story["disposition"] == "violation"
    review = story["review"]
    assert [d["kind"] for d in review] == ["flagged", "commented", "dispositioned", "dispositioned"]
    assert review[0]["body"]["note"] == "odd prompt"
    assert review[1]["body"]["text"] == "asked the team; \"fine\" 50%_ \u00fcn\u00ef"
    assert {"disposition": "violation", "note": "confirmed", "roles": ["reviewer"]}.items() <= review[3]["body"].items()
    assert review[0]["body"]["target"] == {"principal": "carol", "team": "research", "model": story["model"],
                                           "seq": story["entries"][0]["seq"]}
    # On the chain, as entries of their own, and the chain still verifies.
    stored = [e for e in rstore.entries_for(request_id) if e.kind in ("flagged", "commented", "dispositioned")]
    # The reviewed request's team (its records hold how it was judged); the reviewer's own in the body.
    assert [e.principal for e in stored] == ["rita"] * 4 and [e.team for e in stored] == ["research"] * 4
    assert [e.body["reviewer_team"] for e in stored] == ["compliance"] * 4
    by_team = await rclient.get("/v1/audit/entries", headers=bearer(rkeys.auditor),
                                params={"team": "research", "request_id": request_id})
    assert {d["kind"] for d in by_team.json()["data"]} >= {"request", "flagged", "dispositioned"}
    assert verify_chain(rstore).ok
    # The review is searchable.
    flagged = await rclient.get("/v1/audit/entries", headers=bearer(rkeys.auditor),
                                params={"kind": "dispositioned", "request_id": request_id})
    assert [d["body"]["disposition"] for d in flagged.json()["data"]] == ["violation", "needs-follow-up"]
    # The user whose request it is does not see the reviewers' notes.
    own = await rclient.get(url, headers=bearer(rkeys.alice))
    assert own.status_code == 404  # carol's, not alice's


async def test_a_denied_request_made_through_the_gateway_has_its_story(rclient, rstore, rkeys):
    response = await rclient.post("/v1/chat/completions", headers=bearer(rkeys.viewer),
                                  json={"model": "govgate-tiny", "messages": [{"role": "user", "content": "hi there"}]})
    assert response.status_code == 404  # a model the viewer may not see: answered as an unknown one
    request_id = response.headers["x-govgate-request-id"]
    # the reviewer reads the real reasons
    story = (await rclient.get(f"/v1/audit/requests/{request_id}", headers=bearer(rkeys.reviewer))).json()
    assert story["status"] == "denied" and story["principal"] == "victor"
    assert [r["code"] for r in story["decision"]["reasons"]] == ["model_not_allowed"]
    assert len(story["policy_revision"]) == 16
    assert story["review"] == []
    # the user whose request it was reads it as they were told it: an unknown model's rejection
    # (tests/review/test_review_hidden_models.py)
    own = (await rclient.get(f"/v1/audit/requests/{request_id}", headers=bearer(rkeys.viewer))).json()
    assert own["status"] == "rejected" and own["principal"] == "victor" and own["decision"] is None
    assert own["policy_revision"] == story["policy_revision"] and own["review"] == []
    denied = await rclient.get("/v1/audit/entries", headers=bearer(rkeys.reviewer),
                               params={"reason": "model_not_allowed", "principal": "victor"})
    assert [d["request_id"] for d in denied.json()["data"]][:1] == [request_id]


async def test_a_request_refused_at_admission_has_ended_not_pending(rclient, rkeys, worker):
    """Allowed by the policy, then refused before any queue (here: too long for the model's context): the
    client had its answer, so the story says it ended (``not_admitted``, the entry's ``admission`` says why).
    (``worker``: it writes the tiny model's file, whose tokenizer the gateway counts the prompt with.)"""
    response = await rclient.post("/v1/chat/completions", headers=bearer(rkeys.alice),
                                  json={"model": "govgate-tiny", "max_tokens": 8,
                                        "messages": [{"role": "user", "content": "A" * 6000}]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    request_id = response.headers["x-govgate-request-id"]
    document = (await rclient.get("/schema/openapi.json")).json()
    story = described(document, await rclient.get(f"/v1/audit/requests/{request_id}", headers=bearer(rkeys.reviewer)))
    assert story["status"] == "not_admitted" and story["decision"]["allow"] is True  # as the description says
    assert story["entries"][0]["body"]["admission"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("action,body,status,code,param", [
    ("comment", {}, 422, "invalid_value", "text"),
    ("comment", {"text": ""}, 422, "invalid_value", "text"),
    ("comment", {"text": " \n\t "}, 422, "invalid_value", "text"),  # blank: as empty, not a note of spaces
    ("flag", {"note": "   "}, 422, "invalid_value", "note"),
    ("comment", {"text": "x" * 4001}, 422, "invalid_value", "text"),
    ("comment", {"text": 5}, 422, "invalid_value", "text"),
    ("comment", {"text": "a\x00b"}, 422, "invalid_value", "text"),
    ("comment", {"text": "x", "seq": 1}, 400, "unsupported_parameter", "seq"),
    ("disposition", {"disposition": "fine"}, 422, "invalid_value", "disposition"),
    ("disposition", {}, 422, "invalid_value", "disposition"),
    ("flag", {"note": None, "hash": "0" * 64}, 400, "unsupported_parameter", "hash"),
    ("flag", [], 400, "invalid_json", None),
    ("flag", "not json", 400, "invalid_json", None),
    ("comment", {"text": "x" * (2 * 1024 * 1024)}, 413, "body_too_large", None),  # over GOVGATE_MAX_BODY_BYTES
    ("flag", {"note": json.loads("[" * 100 + "]" * 100)}, 400, "invalid_json", None),  # nests too deep
])
async def test_bad_action_bodies_are_refused_and_leave_no_entry(rclient, rstore, rkeys, action, body, status, code,
                                                                param):
    request_id = _target(rstore)
    before = len(all_entries(rstore))
    url = f"/v1/audit/requests/{request_id}/{action}"
    if body == "not json":
        response = await rclient.post(url, headers={**bearer(rkeys.reviewer), "content-type": "application/json"},
                                      content=b"{not json")
    else:
        response = await rclient.post(url, headers=bearer(rkeys.reviewer), json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code and response.json()["error"]["param"] == param
    assert len(all_entries(rstore)) == before


@pytest.mark.parametrize("action", ["flag", "comment", "disposition"])
async def test_a_query_parameter_on_an_action_is_refused_and_leaves_no_entry(rclient, rstore, rkeys, action):
    before = len(all_entries(rstore))
    body = {"flag": {}, "comment": {"text": "x"}, "disposition": {"disposition": "ok"}}[action]
    response = await rclient.post(f"/v1/audit/requests/{_target(rstore)}/{action}?note=x",
                                  headers=bearer(rkeys.reviewer), json=body)
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == ("unsupported_parameter", "note")
    assert len(all_entries(rstore)) == before


async def test_actions_need_an_existing_request_and_a_known_action(rclient, rstore, rkeys):
    before = len(all_entries(rstore))
    missing = await rclient.post("/v1/audit/requests/no-such-request/flag", headers=bearer(rkeys.reviewer))
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "request_not_found")
    unknown = await rclient.post(f"/v1/audit/requests/{_target(rstore)}/approve", headers=bearer(rkeys.reviewer),
                                 json={})
    assert unknown.status_code == 404
    # A flag needs no body at all.
    empty = await rclient.post(f"/v1/audit/requests/{_target(rstore)}/flag", headers=bearer(rkeys.reviewer))
    assert empty.status_code == 201 and "note" not in empty.json()["body"]
    assert len(all_entries(rstore)) == before + 1


async def test_reading_texts_is_recorded_before_they_are_shown(rclient, rstore, rkeys):
    request_id = _target(rstore, principal="bob")
    url = f"/v1/audit/requests/{request_id}"
    reads = len(_reads(rstore))
    plain = await rclient.get(url, headers=bearer(rkeys.reviewer))
    assert "needle-" not in plain.text and "answer " not in plain.text
    assert plain.json()["entries"][0]["withheld"] in (["body.messages"], ["payload"])
    assert len(_reads(rstore)) == reads
    assert rstore.entries_for(plain.headers["x-govgate-request-id"]) == []  # an id, naming no entry: nothing read

    for key, who in ((rkeys.reviewer, "rita"), (rkeys.auditor, "otto"), (rkeys.bob, "bob")):
        shown = await rclient.get(url, headers=bearer(key), params={"include_text": "true"})
        assert shown.status_code == 200
        entries = shown.json()["entries"]
        assert _doc_texts(entries[0])["messages"][0]["content"].startswith("needle-")
        assert _doc_texts(entries[1])["output"].startswith("answer ")
        read = _reads(rstore)[-1]
        assert shown.headers["x-govgate-request-id"] == read.request_id
        assert read.principal == who and read.body["request_ids"] == [request_id]
        assert read.body["via"] == "story" and read.seq > entries[-1]["seq"]
    assert len(_reads(rstore)) == reads + 3
    # Who read it: in the story (for reviewers and auditors) and as a search.
    story = (await rclient.get(url, headers=bearer(rkeys.auditor))).json()
    assert [(r["principal"], r["body"]["request_ids"]) for r in story["reads"]] == \
        [("rita", [request_id]), ("otto", [request_id]), ("bob", [request_id])]
    found = await rclient.get("/v1/audit/entries", headers=bearer(rkeys.reviewer), params={"read_of": request_id})
    assert [d["principal"] for d in found.json()["data"]] == ["bob", "otto", "rita"]
    assert "reads" not in (await rclient.get(url, headers=bearer(rkeys.bob))).json()
    other = await rclient.get("/v1/audit/entries", headers=bearer(rkeys.reviewer), params={"read_of": "no-such"})
    assert other.json()["data"] == []


async def test_a_text_search_and_a_page_with_texts_are_recorded(rclient, rstore, rkeys):
    reads = len(_reads(rstore))
    found = await rclient.get("/v1/audit/entries", headers=bearer(rkeys.auditor), params={"q": "needle-2"})
    matched = sorted({d["request_id"] for d in found.json()["data"]})
    assert matched and all(_doc_texts(d) == {} for d in found.json()["data"])
    read = _reads(rstore)[-1]
    assert read.body["request_ids"] == matched and read.body["text_search"] is True
    assert "needle" not in str(read.body)  # the search term itself is not kept
    assert found.headers["x-govgate-request-id"] == read.request_id

    page = await rclient.get("/v1/audit/entries", headers=bearer(rkeys.reviewer),
                             params={"kind": "completion", "limit": "4", "include_text": "true"})
    assert all(_doc_texts(d)["output"].startswith("answer ") for d in page.json()["data"])
    assert _reads(rstore)[-1].body["request_ids"] == sorted({d["request_id"] for d in page.json()["data"]})
    assert len(_reads(rstore)) == reads + 2
    # A page whose entries hold no text records nothing.
    await rclient.get("/v1/audit/entries", headers=bearer(rkeys.reviewer),
                      params={"kind": "rejected", "include_text": "true"})
    assert len(_reads(rstore)) == reads + 2


@contextlib.contextmanager
def refusing(store: AuditStore, kind: str) -> Iterator[None]:
    """The database refuses to record entries of ``kind`` (a real refusal, by a trigger) while inside."""
    if store.engine.dialect.name == "postgresql":
        make = [f"CREATE FUNCTION refuse_{kind}() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
                f"CREATE TRIGGER refuse_{kind} BEFORE INSERT ON audit_entries FOR EACH ROW "
                f"WHEN (NEW.kind = '{kind}') EXECUTE FUNCTION refuse_{kind}()"]
        drop = [f"DROP TRIGGER refuse_{kind} ON audit_entries", f"DROP FUNCTION refuse_{kind}()"]
    else:
        make = [f"CREATE TRIGGER refuse_{kind} BEFORE INSERT ON audit_entries WHEN NEW.kind = '{kind}' "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"]
        drop = [f"DROP TRIGGER refuse_{kind}"]
    with store.engine.begin() as conn:
        for statement in make:
            conn.exec_driver_sql(statement)
    try:
        yield
    finally:
        with store.engine.begin() as conn:
            for statement in drop:
                conn.exec_driver_sql(statement)


async def test_no_text_is_shown_when_its_read_cannot_be_recorded(rclient, rstore, rkeys):
    request_id = _target(rstore, principal="dave")
    url = f"/v1/audit/requests/{request_id}"
    with refusing(rstore, "payload_read"):
        for response in (await rclient.get(url, headers=bearer(rkeys.reviewer), params={"include_text": "1"}),
                         await rclient.get("/v1/audit/entries", headers=bearer(rkeys.reviewer),
                                           params={"q": "needle"}),
                         await rclient.get("/v1/audit/export", headers=bearer(rkeys.auditor),
                                           params={"include_text": "true"})):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "audit_unavailable"
            assert "needle" not in response.text and "answer" not in response.text
        # Reads without texts go on.
        assert (await rclient.get(url, headers=bearer(rkeys.reviewer))).status_code == 200
    with refusing(rstore, "flagged"):
        refused = await rclient.post(f"{url}/flag", headers=bearer(rkeys.reviewer))
        assert (refused.status_code, refused.json()["error"]["code"]) == (503, "audit_unavailable")
    assert (await rclient.get(url, headers=bearer(rkeys.reviewer), params={"include_text": "1"})).status_code == 200
