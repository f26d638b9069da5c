"""``GET /v1/audit/entries`` and ``GET /v1/audit/usage`` against a Python reference over every stored entry."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from audit import AuditEntry
from audit.kinds import TERMINAL_KINDS
from tests.review.conftest import all_entries, bearer, pages, texts

pytestmark = pytest.mark.anyio


def _texts(entry: AuditEntry) -> list[str]:
    kept = texts(entry)
    found = [m["content"] for m in kept.get("messages", [])]
    return found + [kept[name] for name in ("prompt", "output") if isinstance(kept.get(name), str)]


def _decision(entry: AuditEntry) -> str | None:
    if entry.kind != "request":
        return None
    decision = entry.body["decision"]
    if decision.get("unavailable"):
        return "unavailable"
    return "allow" if decision["allow"] else "deny"


def _refused_admission(entry: AuditEntry) -> str | None:
    """The code an allowed request's reservation refused it with, None when admitted (or denied before)."""
    admission = entry.body.get("admission") if entry.kind == "request" else None
    return admission["code"] if isinstance(admission, dict) and admission.get("admitted") is False else None


def _reasons(entry: AuditEntry) -> list[str]:
    """What the ``reason`` filter finds an entry by: its decision's reasons, or its refused admission's code."""
    refused = _refused_admission(entry)
    return [r["code"] for r in entry.body["decision"]["reasons"]] + ([refused] if refused else [])


def matches(entry: AuditEntry, params: dict[str, Any]) -> bool:
    """What the search should answer, written plainly."""
    for name in ("principal", "team", "model", "request_id"):
        if name in params and getattr(entry, name) != params[name]:
            return False
    if "kind" in params and entry.kind not in params["kind"].split(","):
        return False
    if "decision" in params and _decision(entry) != params["decision"]:
        return False
    if "reason" in params and (entry.kind != "request" or params["reason"] not in _reasons(entry)):
        return False
    if "since" in params and entry.created_at < datetime.fromisoformat(params["since"]):
        return False
    if "until" in params and entry.created_at >= datetime.fromisoformat(params["until"]):
        return False
    if "q" in params and not any(params["q"].lower() in text.lower() for text in _texts(entry)):
        return False
    return True


FILTERS = [
    {},
    {"principal": "alice"},
    {"team": "research"},
    {"model": "idle-tiny"},
    {"kind": "request"},
    {"kind": "completion,failed"},
    {"kind": "rejected"},
    {"decision": "allow"},
    {"decision": "deny"},
    {"decision": "unavailable"},
    {"reason": "rate_limited"},
    {"reason": "policy_unavailable"},
    {"reason": "no_such_reason"},
    {"decision": "deny", "reason": "outside_hours", "team": "support"},
    {"principal": "dave", "model": "govgate-tiny", "kind": "request"},
    {"principal": "nobody-at-all"},
    {"q": "needle-1"},
    {"q": 'with "quotes"'},
    {"q": "50%_"},
    {"q": "%"},
    {"q": "_"},
    {"q": "back\\slash"},
    {"q": "new\nline"},
    {"q": "ünï"},
    {"q": "ANSWER 7"},
    {"q": "nothing like this"},
    {"q": "salt"},
    {"q": "0"},
]


@pytest.mark.parametrize("params", FILTERS, ids=lambda p: ",".join(f"{k}={v!r}" for k, v in p.items()) or "all")
async def test_each_filter_finds_exactly_the_matching_entries(rclient, rstore, rkeys, params):
    expected = [e.seq for e in reversed(all_entries(rstore)) if matches(e, params)]
    found = await pages(rclient, rkeys.reviewer, {**params, "limit": "17"})
    assert [doc["seq"] for doc in found] == expected  # newest first, no duplicate, no gap
    if params and params not in ({"reason": "no_such_reason"}, {"principal": "nobody-at-all"},
                                 {"q": "nothing like this"}, {"q": "salt"}):
        assert expected  # the filter is not vacuous


async def test_time_range_is_since_inclusive_until_exclusive(rclient, rstore, rkeys):
    entries = all_entries(rstore)
    lower, upper = entries[10], entries[40]
    params = {"since": lower.created_at.isoformat(), "until": upper.created_at.isoformat()}
    found = await pages(rclient, rkeys.reviewer, params)
    assert [d["seq"] for d in found] == [e.seq for e in reversed(entries) if lower.created_at <= e.created_at
                                         < upper.created_at]
    assert found[-1]["seq"] == lower.seq and all(d["seq"] != upper.seq for d in found)
    # A date means its midnight UTC; an offset is honoured.
    today = entries[0].created_at.date().isoformat()
    whole_day = await pages(rclient, rkeys.reviewer, {"since": today, "kind": "rejected"})
    assert len(whole_day) == sum(e.kind == "rejected" for e in entries)
    first = entries[0].created_at.astimezone(timezone(timedelta(hours=5)))  # read as UTC it would be 5 h later
    assert await pages(rclient, rkeys.reviewer, {"until": first.isoformat(), "kind": "rejected"}) == []


@pytest.mark.parametrize("limit", ["1", "7", "500"])
@pytest.mark.parametrize("order", ["newest", "oldest"])
async def test_pages_cover_the_result_once_in_order(rclient, rstore, rkeys, limit, order):
    params = {"kind": "request,rejected", "limit": limit, "order": order}
    expected = [e.seq for e in all_entries(rstore) if e.kind in ("request", "rejected")]
    if order == "newest":
        expected.reverse()
    found = [d["seq"] for d in await pages(rclient, rkeys.reviewer, params)]
    assert found == expected and len(set(found)) == len(found)


async def test_an_entry_appended_while_paging_does_not_shift_the_pages(rclient, rstore, rkeys):
    params = {"kind": "rejected", "limit": "5"}
    first = (await rclient.get("/v1/audit/entries", headers=bearer(rkeys.reviewer), params=params)).json()
    rstore.append("rejected", "appended-while-paging", principal="bob", team="support", model=None,
                  body={"status": 400}, policy_revision=None)
    rest = await pages(rclient, rkeys.reviewer, {**params, "cursor": first["next_cursor"]})
    seen = [d["seq"] for d in first["data"] + rest]
    older = [e.seq for e in reversed(all_entries(rstore)) if e.kind == "rejected" and e.seq <= first["data"][0]["seq"]]
    assert seen == older


async def test_texts_are_withheld_unless_asked_for(rclient, rstore, rkeys):
    reads = sum(e.kind == "payload_read" for e in all_entries(rstore))
    response = await rclient.get("/v1/audit/entries", headers=bearer(rkeys.reviewer),
                                 params={"kind": "request", "limit": "3"})
    for doc in response.json()["data"]:
        assert "messages" not in doc["body"] and doc["withheld"] in (["body.messages"], ["payload"])
        assert doc["payload"] is None and (doc["withheld"] == ["body.messages"] or len(doc["payload_digest"]) == 64)
        assert doc["body"]["decision"]  # metadata stays
        assert "needle" not in response.text
    assert rstore.entries_for(response.headers["x-govgate-request-id"]) == []  # every answer has an id; no entry
    assert sum(e.kind == "payload_read" for e in all_entries(rstore)) == reads  # nothing read, nothing recorded


def _usage_reference(entries: list[AuditEntry], groups: tuple[str, ...]) -> tuple[dict, dict]:
    rows: dict[tuple, Counter] = defaultdict(Counter)
    denials: Counter = Counter()
    for e in entries:
        key = tuple(e.created_at.date().isoformat() if g == "day" else getattr(e, g) for g in groups)
        if e.kind == "request":
            rows[key]["requests"] += 1
            verdict = _decision(e)
            refused = _refused_admission(e)
            if refused == "usage_unavailable":  # allowed, but no limit could be checked: a 503
                rows[key]["unavailable"] += 1
            elif refused is not None:  # allowed, then refused at the reservation: a denial by its code
                rows[key]["denied"] += 1
                denials[key + (refused,)] += 1
            else:
                rows[key][{"allow": "allowed", "deny": "denied", "unavailable": "unavailable"}[verdict]] += 1
            if verdict != "allow":
                for reason in e.body["decision"]["reasons"]:
                    denials[key + (reason["code"],)] += 1
        elif e.kind == "rejected":
            rows[key]["rejected"] += 1
        elif e.kind in TERMINAL_KINDS:
            for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
                rows[key][name] += e.body.get("usage", {}).get(name, 0)
            rows[key]["requests"] += 0
        else:
            continue
    return rows, denials


@pytest.mark.parametrize("group_by", [None, "team", "model,principal", "day"])
async def test_usage_counts_requests_tokens_and_denials_per_group(rclient, rstore, rkeys, group_by):
    groups = tuple(group_by.split(",")) if group_by else ("day", "team", "model")
    response = await rclient.get("/v1/audit/usage", headers=bearer(rkeys.reviewer),
                                 params={"group_by": group_by} if group_by else {})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["group_by"] == list(groups) and body["truncated"] is False
    rows, denials = _usage_reference(all_entries(rstore), groups)
    got = {tuple(row[g] for g in groups): {k: v for k, v in row.items() if k not in groups and v}
           for row in body["data"]}
    assert got == {key: dict(+counter) for key, counter in rows.items()}
    assert {tuple(d[g] for g in groups) + (d["reason"],): d["count"] for d in body["denials"]} == dict(denials)
    assert sum(d["count"] for d in body["denials"]) > 0


async def test_usage_of_a_team_in_a_window(rclient, rstore, rkeys):
    entries = all_entries(rstore)
    since = entries[30].created_at
    response = await rclient.get("/v1/audit/usage", headers=bearer(rkeys.auditor),
                                 params={"team": "support", "since": since.isoformat(), "group_by": "team"})
    rows, _ = _usage_reference([e for e in entries if e.team == "support" and e.created_at >= since], ("team",))
    assert [{k: v for k, v in row.items() if v} for row in response.json()["data"]] == \
        [{"team": "support", **dict(+rows[("support",)])}]
