"""The console's pages through Litestar's test client: what they show, escaping, ugly input, review actions."""

from __future__ import annotations

import html
import re
import secrets

from markupsafe import escape

import pytest
from litestar.testing import AsyncTestClient

from audit import verify_chain
from audit.search import EntryFilter, search
from tests.console.conftest import (DELIVERED_CLIENT, DELIVERED_OUTPUT, DELIVERED_REQUEST, DENIED_REQUEST,
                                    OVERSTATED_CLAIM, OVERSTATED_CLIENT, OVERSTATED_REQUEST,
                                    MARKUP_OUTPUT, MARKUP_PROMPT, MARKUP_REQUEST, Console, sign_in)
from tests.console.test_console_keys import sign_in_admin

pytestmark = pytest.mark.anyio

_SEQ_CELL = re.compile(r'<td class="num">(\d+)</td>')


def _reads_by(console: Console, principal: str) -> int:
    where = EntryFilter(principal=principal, kinds=frozenset({"payload_read"}))
    return len(search(console.store, where, limit=500).entries)


def _review_entries(console: Console, request_id: str) -> list:
    return [e for e in console.store.entries_for(request_id) if e.kind in ("flagged", "commented", "dispositioned")]


# -- escaping and what the request page shows ------------------------------------------------------------


async def test_prompt_and_output_markup_shows_as_text(client: AsyncTestClient, console: Console) -> None:
    await sign_in(client, console.keys.reviewer)
    page = await client.get(f"/console/requests/{MARKUP_REQUEST}")
    assert page.status_code == 200
    assert "<script>alert" not in page.text and "<img src=x" not in page.text
    assert str(escape(MARKUP_PROMPT)) in page.text
    assert str(escape(MARKUP_OUTPUT)) in page.text
    assert "<script" not in page.text  # the console has no script of its own either


async def test_the_request_page_tells_the_whole_story(client: AsyncTestClient, console: Console) -> None:
    await sign_in(client, console.keys.auditor)
    page = (await client.get(f"/console/requests/{MARKUP_REQUEST}")).text
    for expected in ("alice", "research", "govgate-tiny", "rev-1", "allowed", "completion", "queue", "generate",
                     "42 ms", "total tokens", "14", "stop"):
        assert expected in page, expected
    denied = (await client.get(f"/console/requests/{DENIED_REQUEST}")).text
    assert "denied" in denied and "model_not_allowed" in denied and "may I?" in denied


async def test_what_a_checked_stream_s_client_received_shows_from_its_delivered_entry(
        client: AsyncTestClient, console: Console) -> None:
    """The worker's ``failed`` entry holds the output it generated; what the client got is in the gateway's
    ``delivered`` entry, which the page shows under its own heading, and the request's story lists."""
    await sign_in(client, console.keys.reviewer)
    page = (await client.get(f"/console/requests/{DELIVERED_REQUEST}")).text
    output, received = page.index("<h2>Output</h2>"), page.index("<h2>What the client received</h2>")
    assert output < page.index(DELIVERED_OUTPUT) < received < page.index(f">{DELIVERED_CLIENT}<")
    assert ">delivered<" in page and "failed" in page
    plain = (await client.get(f"/console/requests/{MARKUP_REQUEST}")).text  # nothing apart: no such heading
    assert "What the client received" not in plain


async def test_the_gateway_s_delivered_entry_wins_over_an_end_that_says_more(client: AsyncTestClient,
                                                                             console: Console) -> None:
    """A worker's kept end says the verdict's text reached the client; the gateway sent an error instead of the
    last window, and its ``delivered`` entry says what did: the page shows that."""
    await sign_in(client, console.keys.reviewer)
    page = (await client.get(f"/console/requests/{OVERSTATED_REQUEST}")).text
    received = page[page.index("<h2>What the client received</h2>"):]
    assert f">{OVERSTATED_CLIENT}<" in received and OVERSTATED_CLAIM not in received


async def test_a_delivered_entry_found_by_search_links_to_its_request(client: AsyncTestClient,
                                                                       console: Console) -> None:
    await sign_in(client, console.keys.reviewer)
    page = (await client.get("/console/search", params={"kind": "delivered"})).text
    assert f'href="/console/requests/{DELIVERED_REQUEST}"' in page


async def test_characters_that_reorder_or_hide_text_are_shown_as_marks(client: AsyncTestClient,
                                                                       console: Console) -> None:
    """A right-to-left override shows "evil gnp.exe" as "exe.png live": the reviewer would judge other text
    than the model was sent. Such characters (and zero-width spaces, and control characters) show as marks, in
    prompts, outputs, reasons and notes; right-to-left scripts and the joiners emoji need are left as they are."""
    who = {"principal": "alice", "team": "research", "model": "govgate-tiny"}
    console.store.append("request", "bidi-request-1", **who, policy_revision="rev-1",
                         body={"endpoint": "chat.completions", "key_id": "k",
                               "decision": {"allow": False, "obligations": {"max_tokens": 16},
                                            "reasons": [{"code": "x", "message": "see \u2066inside\u2069"}]}},
                         payload={"messages": [{"role": "user",
                                                "content": "run \u202eevil gnp.exe \u05e9\u05dc\u05d5\u05dd "
                                                           "\U0001f469\u200d\U0001f467 \u2764\ufe0f pay 1\u200f-\u200f2 "
                                                           "memo." + "".join(chr(0xE0000 + ord(c)) for c in "Go")
                                                           + "\ufe01\U000e0100\u00ad \x00\x01\x1b[2J\x7f\x85"}]})
    csrf = await sign_in(client, console.keys.reviewer)
    flagged = await client.post("/console/requests/bidi-request-1/flag",
                                data={"csrf_token": csrf, "note": "pass\u200bword"})
    assert flagged.status_code == 303
    page = (await client.get("/console/requests/bidi-request-1")).text
    # and the default-ignorables a model reads but a browser draws as nothing: tag characters ("ASCII
    # smuggling" of a hidden sentence), variation selectors, the bidi marks, the soft hyphen
    hidden_chars = ("\u202e", "\u2066", "\u2069", "\u200b", "\u200f", "\U000e0047", "\U000e006f", "\ufe01",
                    "\U000e0100", "\u00ad",
                    # and the controls a page cannot hold (a NUL reaches a llama.cpp model; ESC starts a terminal's
                    # escape sequence), drawn as nothing or as U+FFFD
                    "\x00", "\x01", "\x1b", "\x7f", "\x85")
    for hidden in hidden_chars:
        assert hidden not in page, repr(hidden)
    for hidden in hidden_chars:
        assert f"\u27e8U+{ord(hidden):04X}\u27e9" in page, hidden
    assert "\u05e9\u05dc\u05d5\u05dd" in page and "\U0001f469\u200d\U0001f467" in page
    assert "\u2764\ufe0f" in page  # the emoji presentation selector is left as it is
    notes = (await client.get("/console/search", params={"request_id": "bidi-request-1"})).text
    assert "\u200b" not in notes and "\u27e8U+200B\u27e9" in notes


async def test_obligations_show_as_json_not_python(client: AsyncTestClient, console: Console) -> None:
    """The decision's obligations read as the API documents them (``null``, ``[]``, ``true``), not as Python's
    ``None``/``True`` with single quotes."""
    obligations = {"max_tokens": 16, "prompt_logging": "full", "redact": [], "stream_checked": True,
                   "limits": {"team": {"tokens_per_month": None, "in_flight": 4}}}
    console.store.append("request", "obligations-request-1", principal="alice", team="research",
                         model="govgate-tiny", policy_revision="rev-1",
                         body={"endpoint": "chat.completions", "key_id": "k",
                               "decision": {"allow": False, "reasons": [], "obligations": obligations}},
                         payload={"messages": [{"role": "user", "content": "hi"}]})
    await sign_in(client, console.keys.auditor)
    page = html.unescape((await client.get("/console/requests/obligations-request-1")).text)
    assert '{"team": {"in_flight": 4, "tokens_per_month": null}}' in page
    assert ">[]<" in page and ">true<" in page and ">full<" in page
    assert "None" not in page and "True" not in page


async def test_showing_texts_is_recorded_as_a_read(client: AsyncTestClient, console: Console) -> None:
    await sign_in(client, console.keys.auditor)
    before = _reads_by(console, "otto")
    page = await client.get(f"/console/requests/{MARKUP_REQUEST}")
    assert page.status_code == 200
    reads = search(console.store, EntryFilter(principal="otto", kinds=frozenset({"payload_read"})), limit=1).entries
    assert _reads_by(console, "otto") == before + 1
    assert reads[0].body["request_ids"] == [MARKUP_REQUEST] and reads[0].body["via"] == "story"
    assert reads[0].request_id in page.text  # the page names its read


# -- ugly input: clear 4xx pages, never a 500 -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/console/requests/no-such-request", f"/console/requests/{'x' * 300}",
                                  "/console/requests/%00nul"])
async def test_an_unknown_request_is_a_404_page(client: AsyncTestClient, console: Console, path: str) -> None:
    await sign_in(client, console.keys.reviewer)
    response = await client.get(path)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")
    assert "request_not_found" in response.text
    assert "Content-Security-Policy" in response.headers


async def test_a_read_s_or_a_key_s_id_opened_as_a_request_says_what_it_names(client: AsyncTestClient,
                                                                             console: Console) -> None:
    # A read's or a key-ledger entry's id is not a request: its page said no entries were found (or, before,
    # "pending"), though the search lists them under that id. It says what the id names now, as the API does.
    await sign_in(client, console.keys.auditor)
    await client.get(f"/console/requests/{MARKUP_REQUEST}")  # makes a payload_read entry
    read = search(console.store, EntryFilter(kinds=frozenset({"payload_read"})), limit=1).entries[0]
    key = search(console.store, EntryFilter(kinds=frozenset({"key_created"})), limit=1).entries[0]
    for entry, what in ((read, "a read of requests&#39; texts (payload_read)."), (key, "the key ledger")):
        page = await client.get(f"/console/requests/{entry.request_id}")
        assert page.status_code == 404 and "request_not_found" in page.text
        assert "This id names no request" in page.text and what in page.text, page.text
        assert "(payload_read) (payload_read)" not in page.text  # the kind named once
        assert "pending" not in page.text
        api = await client.get(f"/v1/audit/requests/{entry.request_id}",
                               headers={"Authorization": f"Bearer {console.keys.auditor}"})
        assert api.status_code == 404 and api.json()["error"]["code"] == "request_not_found"
        assert api.json()["error"]["message"].startswith("This id names no request"), api.text
    unknown = await client.get("/console/requests/no-such-request")  # nothing at all under the id: as before
    assert unknown.status_code == 404 and "No audit entries for this request id" in unknown.text
    mine = await client.get(f"/v1/audit/requests/{key.request_id}",  # a plain key sees none of it: as before
                            headers={"Authorization": f"Bearer {console.keys.alice}"})
    assert mine.status_code == 404 and mine.json()["error"]["message"].startswith("No audit entries"), mine.text


@pytest.mark.parametrize(("query", "param"), [
    ("cursor=abc", "cursor"), ("cursor=-1", "cursor"), ("cursor=" + "9" * 40, "cursor"),
    ("limit=0", "limit"), ("limit=100000", "limit"), ("limit=ten", "limit"),
    ("since=2026-13-45", "since"), ("until=yesterday", "until"), ("since=2026-02-02&until=2026-01-01", "until"),
    ("kind=nonsense", "kind"), ("decision=maybe", "decision"), ("order=sideways", "order"),
])
async def test_bad_search_input_is_a_400_page_naming_the_field(
        client: AsyncTestClient, console: Console, query: str, param: str) -> None:
    await sign_in(client, console.keys.reviewer)
    response = await client.get(f"/console/search?{query}")
    assert response.status_code == 400, response.text
    assert "invalid_filter" in response.text and f"<code>{param}</code>" in response.text
    assert 'name="q"' in response.text  # the form is still there to correct


@pytest.mark.parametrize(("query", "param"), [("since=not-a-date", "since"), ("until=2026-13-01", "until"),
                                              ("since=2026-02-01&until=2026-01-01", "until")])
async def test_bad_usage_input_keeps_the_form_naming_the_field(
        client: AsyncTestClient, console: Console, query: str, param: str) -> None:
    """The README's promise for search and usage filters; the usage page lost its form (probe s54 F6)."""
    await sign_in(client, console.keys.reviewer)
    response = await client.get(f"/console/usage?{query}")
    assert response.status_code == 400, response.text
    assert "invalid_filter" in response.text and f"<code>{param}</code>" in response.text
    assert 'name="since"' in response.text and 'name="principal"' in response.text  # the form, to correct
    assert 'class="tiles"' not in response.text  # no figures for a filter that was not applied


@pytest.mark.parametrize(("path", "status", "shown"), [
    ("/console/search?q=%00", 400, ('name="q" value="\ufffd"',)),
    ("/console/search?principal=a%00b%01c&team=t%1b", 400, ('value="a\ufffdb\ufffdc"', 'value="t\ufffd"')),
    ("/console/usage?team=x%00y&model=m%7f", 400, ('value="x\ufffdy"', 'value="m\ufffd"')),
    ("/console/search?principal=a%01b", 200, ('value="a\ufffdb"',)),  # a control character is a filter like any
])
async def test_a_value_sent_goes_back_into_the_form_without_control_characters(
        client: AsyncTestClient, console: Console, path: str, status: int, shown: tuple[str, ...]) -> None:
    """The form kept filled in after a refused filter echoed a NUL (refused because the database cannot hold
    it) into the input's value: HTML has no place for it. The replacement mark stands in for it; the message
    still says what was wrong."""
    await sign_in(client, console.keys.reviewer)
    response = await client.get(path)
    assert response.status_code == status, response.text
    assert not re.search("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]", response.text)
    for value in shown:
        assert value in response.text
    if status == 400:
        assert "invalid_filter" in response.text and "without NUL" in response.text


@pytest.mark.parametrize("path", ["/console/search?include_text=true", "/console/search?bogus=1",
                                  "/console/usage?since=not-a-date", "/console/usage?group_by=day",
                                  "/console/chain?x=1", "/console/?x=1", "/console/search?limit=1&limit=2",
                                  "/console/search?principal=a&principal=b", "/console/usage?team=a&team=b",
                                  "/console/requests/x?done=flag&done=comment", "/console/usage?cursor=1",
                                  "/console/chain?cursor=1", "/console/?cursor=1"])
async def test_other_bad_queries_are_400_pages(client: AsyncTestClient, console: Console, path: str) -> None:
    await sign_in(client, console.keys.reviewer)
    response = await client.get(path)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize("path", ["/console/nothing", "/console/a/b/c", "/console/static/missing.css",
                                  "/console/static/%2e%2e/__init__.py", "/console/static/console.css%00",
                                  "/console/static/%00", "/console/static/a%00b/c"])
async def test_an_unknown_console_page_is_a_404_page(client: AsyncTestClient, console: Console, path: str) -> None:
    await sign_in(client, console.keys.reviewer)
    response = await client.get(path)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")
    assert "Content-Security-Policy" in response.headers


@pytest.mark.parametrize("method, path, status", [("POST", "/console/search", 405), ("DELETE", "/console/", 405),
                                                  ("PUT", "/console/usage", 405), ("GET", "/console/static/", 404)])
async def test_litestar_s_own_refusals_under_the_console_are_pages(client: AsyncTestClient, console: Console,
                                                                   method: str, path: str, status: int) -> None:
    # Routing refusals are raised before the console router's handlers: the app sends them to its pages.
    await sign_in(client, console.keys.reviewer)
    response = await client.request(method, path)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    assert "Content-Security-Policy" in response.headers and response.headers["cache-control"] == "no-store"
    api = await client.request(method, "/v1/models" if status == 405 else "/v1/nothing")
    assert api.headers["content-type"].startswith("application/json")  # the API's stay OpenAI's shape


async def test_head_on_every_console_page_answers_like_get_without_a_body(client: AsyncTestClient,
                                                                          console: Console) -> None:
    # HEAD on a console page was a 405 (only /healthz and /readyz had HEAD) while GET showed the page.
    pages = ["/console/", "/console/search", "/console/search?kind=request&limit=5",
             f"/console/requests/{MARKUP_REQUEST}", "/console/requests/no-such-request", "/console/usage",
             "/console/chain", "/console/nothing", "/console/search?since=yesterday"]
    await sign_in(client, console.keys.reviewer)
    for path in pages:
        got, headed = await client.get(path), await client.head(path)
        assert headed.status_code == got.status_code != 405, (path, got.status_code, headed.status_code)
        assert headed.content == b"" and got.content, path
        for header in ("content-type", "content-security-policy", "cache-control"):
            assert headed.headers.get(header) == got.headers.get(header), (path, header)
        allow = (await client.options(path.split("?")[0])).headers["allow"]
        assert "HEAD" in allow.split(", "), (path, allow)
    client.cookies.clear()
    await sign_in_admin(client, console.keys.admin)
    for path in ["/console/keys", "/console/search", "/console/keys/no-such-key"]:
        got, headed = await client.get(path), await client.head(path)
        assert headed.status_code == got.status_code != 405 and headed.content == b"", path
    client.cookies.clear()
    signed_out = await client.head("/console/search")  # no session: the same redirect to the sign-in page
    assert signed_out.status_code == 303 and signed_out.headers["location"].startswith("/console/sign-in")
    assert (await client.head("/console/sign-in")).status_code == 200
    refused = await client.request("POST", "/console/search")  # a 405 page names HEAD with GET
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD, OPTIONS"


# -- search --------------------------------------------------------------------------------------------------


async def test_search_filters_and_pages_like_the_api(client: AsyncTestClient, console: Console) -> None:
    await sign_in(client, console.keys.reviewer)
    expected = [e.seq for e in search(console.store, EntryFilter(team="research", kinds=frozenset({"request"})),
                                      limit=500).entries]
    assert len(expected) > 10
    seen: list[int] = []
    url = "/console/search?team=research&kind=request&limit=7&principal="  # an empty field: not filtered on
    for _ in range(20):
        page = await client.get(url)
        assert page.status_code == 200
        seen += [int(seq) for seq in _SEQ_CELL.findall(page.text)]
        found = re.search(r'<a href="(\?[^"]+)" rel="next">', page.text)
        if not found:
            break
        url = "/console/search" + html.unescape(found.group(1))
        assert "First page" in (await client.get(url)).text
    assert seen == expected


async def test_a_search_for_several_kinds_keeps_them_in_the_form(client: AsyncTestClient, console: Console) -> None:
    """A link may ask for several kinds (``kind=flagged,commented``, as the API takes them); the form shows that
    choice, so searching again from it (another page size, a team) does not silently drop the kinds."""
    await sign_in(client, console.keys.auditor)
    page = (await client.get("/console/search", params={"kind": "request,rejected", "limit": "5"})).text
    select = re.search(r'<select name="kind">(.*?)</select>', page, re.S).group(1)
    assert re.findall(r'<option value="([^"]*)" selected>', select) == ["request,rejected"]
    single = (await client.get("/console/search", params={"kind": "rejected"})).text
    select = re.search(r'<select name="kind">(.*?)</select>', single, re.S).group(1)
    assert re.findall(r'<option value="([^"]*)" selected>', select) == ["rejected"]


async def test_text_search_is_recorded_as_a_read(client: AsyncTestClient, console: Console) -> None:
    await sign_in(client, console.keys.auditor)
    before = _reads_by(console, "otto")
    page = await client.get("/console/search?q=needle-1")
    assert page.status_code == 200 and "No entries match" not in page.text
    assert _reads_by(console, "otto") == before + 1


# -- review actions ---------------------------------------------------------------------------------------


async def test_a_reviewer_flags_comments_and_disposes(client: AsyncTestClient, console: Console) -> None:
    csrf = await sign_in(client, console.keys.reviewer)
    target = DENIED_REQUEST
    base = f"/console/requests/{target}"
    flagged = await client.post(f"{base}/flag", data={"csrf_token": csrf, "note": "<b>odd</b> request"})
    assert flagged.status_code == 303 and flagged.headers["location"] == f"{base}?done=flag"
    commented = await client.post(f"{base}/comment", data={"csrf_token": csrf, "text": "asked the team"})
    assert commented.status_code == 303
    disposed = await client.post(f"{base}/disposition", data={"csrf_token": csrf, "disposition": "ok", "note": ""})
    assert disposed.status_code == 303
    entries = _review_entries(console, target)
    assert [e.kind for e in entries[-3:]] == ["flagged", "commented", "dispositioned"]
    assert entries[-3].body["note"] == "<b>odd</b> request" and entries[-3].principal == "rita"
    assert entries[-2].body["text"] == "asked the team"
    assert entries[-1].body["disposition"] == "ok" and "note" not in entries[-1].body
    page = (await client.get(base)).text
    assert "&lt;b&gt;odd&lt;/b&gt; request" in page and "asked the team" in page
    assert verify_chain(console.store).ok


@pytest.mark.parametrize(("action", "data", "status"), [
    ("comment", {}, 422), ("comment", {"text": "x" * 4001}, 422), ("disposition", {"disposition": "great"}, 422),
    ("disposition", {}, 422), ("shout", {"text": "hi"}, 404),
])
async def test_bad_action_forms_are_refused_with_a_page(client: AsyncTestClient, console: Console, action: str,
                                                        data: dict, status: int) -> None:
    csrf = await sign_in(client, console.keys.reviewer)
    before = len(_review_entries(console, MARKUP_REQUEST))
    response = await client.post(f"/console/requests/{MARKUP_REQUEST}/{action}", data={"csrf_token": csrf, **data})
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert len(_review_entries(console, MARKUP_REQUEST)) == before


async def test_a_refused_action_never_quotes_the_refused_value(client: AsyncTestClient, console: Console) -> None:
    # The validator's wording quoted it ("Invalid enum value '…'", escaped): refusals never quote what was
    # refused (it may be anything pasted into the form). The page names the field and what it may be.
    csrf = await sign_in(client, console.keys.reviewer)
    sent = "<b>pan 4111 1111 1111 1111</b>"
    response = await client.post(f"/console/requests/{MARKUP_REQUEST}/disposition",
                                 data={"csrf_token": csrf, "disposition": sent})
    assert response.status_code == 422, response.text
    assert "4111" not in response.text and "pan " not in response.text and "&lt;b&gt;" not in response.text
    assert "&#39;disposition&#39; must be one of &#39;needs-follow-up&#39;, &#39;ok&#39;, &#39;violation&#39;" \
        in response.text
    api = await client.post(f"/v1/audit/requests/{MARKUP_REQUEST}/disposition", json={"disposition": sent},
                            headers={"Authorization": f"Bearer {console.keys.reviewer}"})
    assert api.status_code == 422 and api.json()["error"]["param"] == "disposition"
    assert "4111" not in api.text, api.text


async def test_an_action_on_an_unknown_request_is_a_404_page(client: AsyncTestClient, console: Console) -> None:
    csrf = await sign_in(client, console.keys.reviewer)
    response = await client.post("/console/requests/nope/flag", data={"csrf_token": csrf})
    assert response.status_code == 404 and "request_not_found" in response.text


@pytest.mark.parametrize("token", [None, "", "forged"])
async def test_an_action_without_the_session_token_is_refused(client: AsyncTestClient, console: Console,
                                                              token: str | None) -> None:
    await sign_in(client, console.keys.reviewer)
    before = len(_review_entries(console, MARKUP_REQUEST))
    data = {"note": "csrf", **({"csrf_token": token} if token is not None else {})}
    response = await client.post(f"/console/requests/{MARKUP_REQUEST}/flag", data=data)
    assert response.status_code == 403 and "csrf_refused" in response.text
    assert len(_review_entries(console, MARKUP_REQUEST)) == before


@pytest.mark.parametrize("form", [{"text": ["first", "second"]}, {"text": "one", "extra": ["a", "b"]}])
async def test_an_action_repeating_a_field_is_refused_whole(client: AsyncTestClient, console: Console,
                                                           form: dict) -> None:
    """Two ``text`` (or ``note``) fields were read as the first and the second dropped silently; the JSON API
    refuses it. A comment, so the shared request stays out of the queue."""
    csrf = await sign_in(client, console.keys.reviewer)
    before = len(_review_entries(console, MARKUP_REQUEST))
    response = await client.post(f"/console/requests/{MARKUP_REQUEST}/comment", data={"csrf_token": csrf, **form})
    repeated = next(name for name, value in form.items() if isinstance(value, list))
    assert response.status_code == 400 and "invalid_request" in response.text, response.text
    assert f"the field &#39;{repeated}&#39; more than once" in response.text
    assert len(_review_entries(console, MARKUP_REQUEST)) == before
    commented = await client.post(f"/console/requests/{MARKUP_REQUEST}/comment",
                                  data={"csrf_token": csrf, "text": "x"})
    assert commented.status_code == 303, commented.text
    assert len(_review_entries(console, MARKUP_REQUEST)) == before + 1


async def test_another_sessions_token_is_refused(client: AsyncTestClient, console: Console) -> None:
    other = await sign_in(client, console.keys.reviewer)
    client.cookies.clear()
    await sign_in(client, console.keys.reviewer)
    response = await client.post(f"/console/requests/{MARKUP_REQUEST}/flag", data={"csrf_token": other})
    assert response.status_code == 403


async def test_an_auditor_sees_no_action_forms_and_cannot_post_them(client: AsyncTestClient,
                                                                    console: Console) -> None:
    csrf = await sign_in(client, console.keys.auditor)
    page = (await client.get(f"/console/requests/{MARKUP_REQUEST}")).text
    assert "/flag" not in page and "/comment" not in page and "/disposition" not in page
    before = len(_review_entries(console, MARKUP_REQUEST))
    for action, data in (("flag", {}), ("comment", {"text": "hi"}), ("disposition", {"disposition": "ok"})):
        response = await client.post(f"/console/requests/{MARKUP_REQUEST}/{action}", data={"csrf_token": csrf, **data})
        assert response.status_code == 403 and "review_forbidden" in response.text
    assert len(_review_entries(console, MARKUP_REQUEST)) == before


async def test_a_reviewer_gets_no_disposition_form_on_their_own_request(client: AsyncTestClient,
                                                                      console: Console) -> None:
    """Separation of duties: rita may flag and comment on her own request, another reviewer disposes."""
    own = f"own-{secrets.token_hex(8)}"
    console.store.append("request", own, principal="rita", team="compliance", model="other-model",
                         policy_revision="rev-1",
                         body={"endpoint": "chat.completions", "key_id": "k",
                               "decision": {"allow": False, "reasons": [{"code": "model_not_allowed", "message": "no"}],
                                            "obligations": {}}},
                         payload={"messages": [{"role": "user", "content": "mine"}]})
    csrf = await sign_in(client, console.keys.reviewer)
    page = (await client.get(f"/console/requests/{own}")).text
    assert "/flag" in page and "/comment" in page and "/disposition" not in page
    assert "another reviewer records its disposition" in page
    assert own in (await client.get("/console/")).text  # denied: in the queue
    refused = await client.post(f"/console/requests/{own}/disposition", data={"csrf_token": csrf, "disposition": "ok"})
    assert refused.status_code == 403 and "review_forbidden" in refused.text
    assert [e.kind for e in _review_entries(console, own)] == []
    assert own in (await client.get("/console/")).text  # still waiting for another reviewer
    other = await client.get(f"/console/requests/{MARKUP_REQUEST}")
    assert "/disposition" in other.text  # alice's request: rita disposes of it


# -- queue, usage, chain ----------------------------------------------------------------------------------


async def test_the_queue_holds_flagged_and_denied_until_disposed(client: AsyncTestClient, console: Console) -> None:
    csrf = await sign_in(client, console.keys.reviewer)
    target = MARKUP_REQUEST  # allowed, so only a flag puts it in the queue
    assert target not in (await client.get("/console/")).text
    await client.post(f"/console/requests/{target}/flag", data={"csrf_token": csrf, "note": "look"})
    queue = (await client.get("/console/")).text
    assert target in queue and "look" in queue
    await client.post(f"/console/requests/{target}/disposition", data={"csrf_token": csrf, "disposition": "violation"})
    assert target not in (await client.get("/console/")).text
    await client.post(f"/console/requests/{target}/flag", data={"csrf_token": csrf, "note": "again"})
    assert target in (await client.get("/console/")).text  # flagged after its disposition: back in the queue
    await client.post(f"/console/requests/{target}/disposition", data={"csrf_token": csrf, "disposition": "ok"})


async def test_the_queue_lists_seeded_denials_without_disposition(client: AsyncTestClient, console: Console) -> None:
    await sign_in(client, console.keys.auditor)
    denied = search(console.store, EntryFilter(decision="deny"), limit=500).entries
    settled = {e.request_id for e in search(console.store, EntryFilter(kinds=frozenset({"dispositioned"})),
                                            limit=500).entries}
    queue = (await client.get("/console/")).text
    waiting = [e.request_id for e in denied if e.request_id not in settled]
    assert waiting
    for request_id in waiting:
        assert request_id in queue
    for request_id in settled:
        flagged_later = any(e.kind == "flagged" and e.seq > max(d.seq for d in console.store.entries_for(request_id)
                                                                 if d.kind == "dispositioned")
                            for e in console.store.entries_for(request_id))
        assert (f">{request_id}<" in queue) == flagged_later


async def test_the_usage_page_draws_the_counts(client: AsyncTestClient, console: Console) -> None:
    await sign_in(client, console.keys.reviewer)
    page = await client.get("/console/usage?since=2000-01-01")
    assert page.status_code == 200
    requests = len(search(console.store, EntryFilter(kinds=frozenset({"request"})), limit=500).entries)
    assert f'<div class="figure">{requests:,}</div><div class="label">requests</div>' in page.text
    assert page.text.count("<svg viewBox") == 5
    for title in ("Requests per day by team", "Tokens per day by model", "Denials by reason"):
        assert title in page.text
    assert "model_not_allowed" in page.text and "research" in page.text and "govgate-tiny" in page.text


async def test_the_chain_page_verifies_up_to_the_head(client: AsyncTestClient, console: Console) -> None:
    await sign_in(client, console.keys.auditor)
    head = console.store.head().seq
    page = (await client.get("/console/chain")).text
    assert f'<div class="figure">{head:,}</div><div class="label">entries</div>' in page
    assert f'<div class="figure">{head:,}</div><div class="label">verified up to entry</div>' in page


async def test_static_files_are_served_with_the_policy_and_nothing_comes_from_elsewhere(
        client: AsyncTestClient, console: Console) -> None:
    css = await client.get("/console/static/console.css")
    assert css.status_code == 200 and "Content-Security-Policy" in css.headers
    await sign_in(client, console.keys.reviewer)
    for path in ("/console/", "/console/search", "/console/usage", "/console/chain",
                 f"/console/requests/{MARKUP_REQUEST}"):
        page = (await client.get(path)).text
        assert not re.search(r'(src|href)="(https?:)?//', page), path


async def test_only_entries_of_a_request_link_to_a_request_page(client: AsyncTestClient, console: Console) -> None:
    await sign_in(client, console.keys.auditor)
    await client.get(f"/console/requests/{MARKUP_REQUEST}")  # makes a payload_read entry
    read = search(console.store, EntryFilter(kinds=frozenset({"payload_read"})), limit=1).entries[0]
    page = (await client.get("/console/search?kind=payload_read&limit=5")).text
    assert read.request_id in page and f"/console/requests/{read.request_id}" not in page
    page = (await client.get(f"/console/search?request_id={MARKUP_REQUEST}")).text
    assert f'href="/console/requests/{MARKUP_REQUEST}"' in page


async def test_every_time_shown_names_its_zone(client: AsyncTestClient, console: Console) -> None:
    """A reviewer in another zone read a bare time as their own: every time on the pages says UTC."""
    from datetime import datetime, timedelta, timezone

    from gateway.console.render import _when

    assert _when(datetime(2026, 12, 4, 9, 27, 9)) == "2026-12-04 09:27:09 UTC"  # the store's naive UTC
    assert _when("2026-12-04T10:27:09+01:00") == "2026-12-04 09:27:09 UTC"  # another offset: converted
    assert _when(datetime(2026, 12, 4, 9, 27, tzinfo=timezone(timedelta(hours=-5)))) == "2026-12-04 14:27:00 UTC"
    await sign_in(client, console.keys.reviewer)
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?! UTC)")
    for path in ("/console/", f"/console/requests/{MARKUP_REQUEST}", "/console/search?principal=alice",
                 "/console/chain"):
        page = (await client.get(path)).text
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", page), path
        assert not stamp.search(page), (path, stamp.search(page))
