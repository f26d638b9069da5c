"""After ``govgate audit prune`` the review API shows what is left: metadata and digests, no text, no read."""

from __future__ import annotations

import random
import pytest

from audit import verify_chain
from audit.prune import prune_payloads
from tests.review.conftest import all_entries, bearer, seed

pytestmark = pytest.mark.anyio


async def test_erased_texts_are_neither_shown_searched_nor_recorded_as_read(rclient, rstore, rkeys):
    late = seed(rstore, 3, rng=random.Random(99), team="late")
    cut = all_entries(rstore)[-1].created_at
    prune_payloads(rstore, cut)  # everything before the last entry loses its texts
    with_payload = [e for e in all_entries(rstore) if e.payload_digest and e.created_at < cut]
    assert with_payload and all(e.payload is None for e in with_payload)
    target = next(e for e in with_payload if e.kind == "request" and e.team)
    reads = sum(e.kind == "payload_read" for e in all_entries(rstore))

    story = await rclient.get(f"/v1/audit/requests/{target.request_id}", headers=bearer(rkeys.reviewer),
                              params={"include_text": "true"})
    assert story.status_code == 200
    request = story.json()["entries"][0]
    assert request["payload"] is None and request["payload_digest"] == target.payload_digest
    assert "needle" not in story.text and "withheld" not in request
    found = await rclient.get("/v1/audit/entries", headers=bearer(rkeys.reviewer),
                              params={"q": "needle", "team": target.team, "until": cut.isoformat()})
    legacy = [e for e in all_entries(rstore) if "messages" in e.body and e.team == target.team and e.created_at < cut]
    assert {d["request_id"] for d in found.json()["data"]} == {e.request_id for e in legacy if
                                                                 "needle" in e.body["messages"][0]["content"]}
    # The story read nothing (no text left); the search matched only texts kept in bodies (format 1 style).
    assert sum(e.kind == "payload_read" for e in all_entries(rstore)) == reads + bool(found.json()["data"])
    assert late and verify_chain(rstore).ok
