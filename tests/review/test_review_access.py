"""Who may read and act: reviewer, auditor, a plain user, an admin; bad filters; no route changes an entry."""

from __future__ import annotations

import pytest

from gateway.auth import KeyStore
from gateway.components import open_database

from tests.review.conftest import all_entries, bearer, pages

pytestmark = pytest.mark.anyio


def _error(response, status: int, code: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and set(error) >= {"message", "type", "code", "param"}
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("who", ["alice", "bob", "admin", "viewer"])
async def test_a_key_without_a_review_role_reads_only_its_own_entries(rclient, rstore, rkeys, who):
    name = {"alice": "alice", "bob": "bob", "admin": "root", "viewer": "victor"}[who]
    key = getattr(rkeys, who)
    found = await pages(rclient, key, {"limit": "50"})
    assert [d["seq"] for d in found] == [e.seq for e in reversed(all_entries(rstore)) if e.principal == name]
    assert who not in ("alice", "bob") or found  # the seeded users have entries
    for params in ({"principal": "carol"}, {"principal": "alice" if who != "alice" else "bob"}):
        _error(await rclient.get("/v1/audit/entries", headers=bearer(key), params=params), 403,
               "review_forbidden", "principal")
    own = await pages(rclient, key, {"principal": name, "team": "research"})
    assert all(d["principal"] == name for d in own)


async def test_a_plain_user_sees_only_the_story_and_usage_of_its_own_requests(rclient, rstore, rkeys):
    entries = all_entries(rstore)
    alices = next(e for e in entries if e.principal == "alice" and e.kind == "request")
    bobs = next(e for e in entries if e.principal == "bob" and e.kind == "request")
    assert (await rclient.get(f"/v1/audit/requests/{alices.request_id}", headers=bearer(rkeys.alice))).status_code == 200
    # Another's request is answered like one that does not exist.
    other = await rclient.get(f"/v1/audit/requests/{bobs.request_id}", headers=bearer(rkeys.alice))
    missing = await rclient.get("/v1/audit/requests/no-such-request", headers=bearer(rkeys.alice))
    assert _error(other, 404, "request_not_found") == _error(missing, 404, "request_not_found")
    usage = (await rclient.get("/v1/audit/usage", headers=bearer(rkeys.alice), params={"group_by": "principal"})).json()
    assert [row["principal"] for row in usage["data"]] == ["alice"]
    _error(await rclient.get("/v1/audit/usage", headers=bearer(rkeys.alice), params={"principal": "bob"}), 403,
           "review_forbidden", "principal")


@pytest.mark.parametrize("who", ["auditor", "alice", "admin"])
@pytest.mark.parametrize("action,body", [("flag", {}), ("comment", {"text": "hm"}),
                                         ("disposition", {"disposition": "ok"})])
async def test_only_reviewers_act(rclient, rstore, rkeys, who, action, body):
    target = next(e for e in all_entries(rstore) if e.principal == "alice" and e.kind == "request")
    before = len(all_entries(rstore))
    response = await rclient.post(f"/v1/audit/requests/{target.request_id}/{action}",
                                  headers=bearer(getattr(rkeys, who)), json=body)
    _error(response, 403, "review_forbidden")
    assert len(all_entries(rstore)) == before


async def test_auditors_read_everything(rclient, rstore, rkeys):
    found = await pages(rclient, rkeys.auditor, {"limit": "500", "order": "oldest"})
    assert [d["seq"] for d in found][: len(all_entries(rstore))] == [e.seq for e in all_entries(rstore)][: len(found)]
    assert {d["principal"] for d in found} >= {"alice", "bob", "carol", "dave"}


async def test_no_key_no_access(rclient):
    _error(await rclient.get("/v1/audit/entries"), 401, "missing_api_key")
    _error(await rclient.get("/v1/audit/entries", headers=bearer("gk_000000000000_" + "a" * 43)), 401,
           "invalid_api_key")


@pytest.mark.parametrize("path", ["/v1/audit/entries", "/v1/audit/requests/x", "/v1/audit/usage",
                                  "/v1/audit/export", "/v1/audit/requests/x/comment"])
@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
async def test_no_route_updates_or_deletes_an_entry(rclient, rstore, rkeys, path, method):
    before = [e.hash for e in all_entries(rstore)]
    response = await rclient.request(method, path, headers=bearer(rkeys.reviewer), json={"text": "x"})
    assert response.status_code in (404, 405), response.text
    assert response.json()["error"]["code"] in ("method_not_allowed", "not_found")
    assert [e.hash for e in all_entries(rstore)][: len(before)] == before


async def test_no_route_under_an_entry(rclient, rkeys):
    for path in ("/v1/audit/entries/1", "/v1/audit/requests/x/delete", "/v1/audit/requests/x/erase"):
        response = await rclient.post(path, headers=bearer(rkeys.reviewer), json={})
        assert response.status_code in (404, 405), (path, response.text)


BAD = [
    ("/v1/audit/entries", {"since": "yesterday"}, "since"),
    ("/v1/audit/entries", {"until": "2026-13-01"}, "until"),
    ("/v1/audit/entries", {"since": "0001-01-01T00:00:00+05:00"}, "since"),
    ("/v1/audit/entries", {"since": "2026-05-01T25:00:00"}, "since"),
    ("/v1/audit/entries", {"since": "2026-05-01 12:00:00 00:00"}, "since"),
    ("/v1/audit/entries", {"since": "2026-05-02", "until": "2026-05-01"}, "until"),
    ("/v1/audit/entries", {"since": "2026-05-01", "until": "2026-05-01"}, "until"),
    ("/v1/audit/entries", {"kind": "requests"}, "kind"),
    ("/v1/audit/entries", {"kind": "request,"}, "kind"),
    ("/v1/audit/entries", {"kind": "'; DROP TABLE audit_entries; --"}, "kind"),
    ("/v1/audit/entries", {"limit": "0"}, "limit"),
    ("/v1/audit/entries", {"limit": "501"}, "limit"),
    ("/v1/audit/entries", {"limit": "-1"}, "limit"),
    ("/v1/audit/entries", {"limit": "1e3"}, "limit"),
    ("/v1/audit/entries", {"limit": "٣"}, "limit"),
    ("/v1/audit/entries", {"cursor": "abc"}, "cursor"),
    ("/v1/audit/entries", {"cursor": "9" * 40}, "cursor"),
    ("/v1/audit/entries", {"decision": "maybe"}, "decision"),
    ("/v1/audit/entries", {"order": "random"}, "order"),
    ("/v1/audit/entries", {"include_text": "yes please"}, "include_text"),
    ("/v1/audit/entries", {"q": ""}, "q"),
    ("/v1/audit/entries", {"q": "x" * 1001}, "q"),
    ("/v1/audit/entries", {"team": "a\x00b"}, "team"),
    ("/v1/audit/entries", {"principal": "p" * 256}, "principal"),
    ("/v1/audit/entries", {"format": "csv"}, "format"),
    ("/v1/audit/usage", {"group_by": "week"}, "group_by"),
    ("/v1/audit/usage", {"group_by": "team,team"}, "group_by"),
    ("/v1/audit/usage", {"group_by": ","}, "group_by"),
    ("/v1/audit/usage", {"group_by": "day,"}, "group_by"),
    ("/v1/audit/usage", {"kind": "request"}, "kind"),
    ("/v1/audit/export", {"format": "xml"}, "format"),
    ("/v1/audit/export", {"limit": "10"}, "limit"),
    ("/v1/audit/requests/x", {"include_text": "2"}, "include_text"),
    ("/v1/audit/requests/x", {"team": "t"}, "team"),
]


@pytest.mark.parametrize("path,params,param", BAD, ids=[f"{p.rsplit('/', 1)[1]}:{n}" for p, _, n in BAD])
async def test_bad_filters_are_400_naming_the_parameter(rclient, rkeys, path, params, param):
    response = await rclient.get(path, headers=bearer(rkeys.reviewer), params=params)
    error = _error(response, 400, response.json()["error"]["code"], param)
    assert error["code"] in ("invalid_filter", "unsupported_parameter")
    assert error["type"] == "invalid_request_error"
    assert "x" * 100 not in error["message"]  # values are not echoed at length


async def test_a_repeated_parameter_is_refused_but_kinds_may_repeat(rclient, rstore, rkeys):
    response = await rclient.get("/v1/audit/entries?team=a&team=b", headers=bearer(rkeys.reviewer))
    _error(response, 400, "invalid_filter", "team")
    both = await pages(rclient, rkeys.reviewer, {"kind": ["failed", "cancelled"]})
    assert [d["seq"] for d in both] == [e.seq for e in reversed(all_entries(rstore))
                                        if e.kind in ("failed", "cancelled")]


async def test_ugly_values_are_answered_not_crashed(rclient, rkeys):
    for params in ({"since": "0001-01-01", "until": "9999-12-31T23:59:59+14:00"}, {"principal": "' OR 1=1 --"}, {"q": "\\"}, {"q": "!"}, {"q": "!%"}, {"q": "\U0001F600"},
                   {"request_id": "x" * 255}, {"reason": "%"}, {"model": "\u202e"}):
        response = await rclient.get("/v1/audit/entries", headers=bearer(rkeys.reviewer), params=params)
        assert response.status_code == 200, (params, response.text)
        assert response.json()["data"] == [] or "q" in params or "since" in params
    for raw in ("team=%ff", "%00=1", "q=%00", "limit", "kind", "cursor=%2B1", "since=%2B002026-05-01"):
        response = await rclient.get(f"/v1/audit/entries?{raw}", headers=bearer(rkeys.reviewer))
        assert response.status_code in (200, 400), (raw, response.text)
        assert response.json()["error"]["param"] if response.status_code == 400 else True
    nul = await rclient.get("/v1/audit/requests/a%00b", headers=bearer(rkeys.reviewer))
    assert nul.status_code == 404, nul.text
    long_id = "r" * 300
    _error(await rclient.get(f"/v1/audit/requests/{long_id}", headers=bearer(rkeys.reviewer)), 404,
           "request_not_found")


async def test_a_reviewer_may_not_dispose_of_their_own_request(rclient, rstore, rkeys, rsettings):
    """Separation of duties: rita's own denied request waits for another reviewer's verdict."""
    made = await rclient.post("/v1/chat/completions", headers=bearer(rkeys.reviewer),
                              json={"model": "govgate-tiny", "messages": [{"role": "user", "content": "mine"}]})
    assert made.status_code in (403, 404), made.text  # the reviewer role grants no model
    request_id = made.headers["x-govgate-request-id"]
    assert any(e.kind == "request" and e.principal == "rita" for e in rstore.entries_for(request_id))
    url = f"/v1/audit/requests/{request_id}"
    before = len(all_entries(rstore))
    refused = await rclient.post(f"{url}/disposition", headers=bearer(rkeys.reviewer), json={"disposition": "ok"})
    _error(refused, 403, "review_forbidden")
    assert "own" in refused.json()["error"]["message"]
    assert len(all_entries(rstore)) == before
    # Flagging and commenting on one's own request stay allowed; another reviewer disposes of it.
    flag = await rclient.post(f"{url}/flag", headers=bearer(rkeys.reviewer), json={"note": "my own"})
    comment = await rclient.post(f"{url}/comment", headers=bearer(rkeys.reviewer), json={"text": "self-report"})
    assert (flag.status_code, comment.status_code) == (201, 201)
    other = KeyStore(open_database(rsettings)).create("rolf", team="compliance", roles=["reviewer"]).secret
    settled = await rclient.post(f"{url}/disposition", headers=bearer(other), json={"disposition": "ok"})
    assert settled.status_code == 201, settled.text
    story = (await rclient.get(url, headers=bearer(rkeys.reviewer))).json()
    assert story["disposition"] == "ok"
    assert [e["principal"] for e in story["review"] if e["kind"] == "dispositioned"] == ["rolf"]
