"""The console in a real browser: headless Chromium (Debian's) driven by Playwright, against ``govgate serve``.

Signs in, searches, opens a request, flags it, finds the flag on the audit
chain; as an admin, creates a key (its secret shown once) and revokes it,
finding both on the chain in the admin's name; and saves a screenshot of each page under
``var/test-artifacts/console/``. Also holds the page to its
Content-Security-Policy as the browser enforces it: a markup prompt runs
nothing, and no resource is refused. Skips without Chromium or Playwright,
unless ``GOVGATE_TEST_REQUIRE_BROWSER=1`` (``.ci/run``), when it fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from audit import verify_chain
from tests.conftest import serving
from audit.key_ledger import key_request_id
from tests.console.conftest import DENIED_REQUEST, MARKUP_PROMPT, MARKUP_REQUEST, Console, new_key

REQUIRE_ENV = "GOVGATE_TEST_REQUIRE_BROWSER"
ARTIFACTS = Path(__file__).resolve().parents[2] / "var" / "test-artifacts" / "console"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _chromium() -> str | None:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    return found


@pytest.fixture(scope="module")
def console_database() -> str:
    """SQLite only here: the pages' reads are tested on both databases by the client tests."""
    return ""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    executable = _chromium()
    if sync_playwright is None or executable is None:
        missing = "playwright" if sync_playwright is None else "chromium"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{missing} is not installed and {REQUIRE_ENV}=1")
        pytest.skip(f"{missing} is not installed (set {REQUIRE_ENV}=1 to fail instead)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def served(console: Console) -> Iterator[str]:
    log = console.settings.var_dir / "console-serve.log"
    with serving(console.settings, log) as base:
        yield base


@pytest.fixture
def page(browser: Any, served: str) -> Iterator[Any]:
    context = browser.new_context(base_url=served, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.problems = []  # console errors (a CSP refusal is one), dialogs (a script that ran), failed loads
    page.on("console", lambda message: message.type == "error" and page.problems.append(message.text))
    page.on("dialog", lambda dialog: (page.problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    # A load cut short by the next navigation (net::ERR_ABORTED) is the test moving on, not a refusal.
    page.on("requestfailed", lambda request: "ERR_ABORTED" not in (request.failure or "")
            and page.problems.append(f"failed: {request.url} {request.failure}"))
    try:
        yield page
    finally:
        context.close()


def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _sign_in(page: Any, key: str) -> None:
    page.goto("/console/sign-in")
    _shot(page, "01-sign-in")
    page.fill("input[name=key]", key)
    page.click("button:has-text('Sign in')")
    page.wait_for_url("**/console/**")
    page.wait_for_load_state("load")


def test_sign_in_search_open_flag_and_find_the_flag_on_the_chain(page: Any, console: Console) -> None:
    _sign_in(page, console.keys.reviewer)
    assert page.locator("h1").first.inner_text().startswith("Review queue")
    # The stylesheet was loaded and applied under the page's Content-Security-Policy.
    assert page.eval_on_selector(".topbar", "e => getComputedStyle(e).backgroundColor") == "rgb(31, 58, 95)"
    assert page.locator(f"a:has-text('{DENIED_REQUEST}')").count() == 1
    _shot(page, "02-queue")

    page.click("nav >> text=Search")
    page.fill("input[name=team]", "support")
    page.select_option("select[name=decision]", "deny")
    page.click("button:has-text('Search')")
    page.wait_for_selector("table tbody tr")
    assert "team=support" in page.url
    _shot(page, "03-search")

    page.click(f"a:has-text('{DENIED_REQUEST}')")
    page.wait_for_selector("text=model_not_allowed")
    assert page.locator("pre.text").first.inner_text() == "may I?"
    _shot(page, "04-request")

    before = [e.seq for e in console.store.entries_for(DENIED_REQUEST) if e.kind == "flagged"]
    page.fill("form[action$='/flag'] input[name=note]", "flagged from the browser")
    page.click("form[action$='/flag'] button")
    page.wait_for_url("**?done=flag")
    assert page.locator(".badge:has-text('flagged')").count() >= 1
    assert page.locator("text=flagged from the browser").count() == 1
    _shot(page, "05-request-flagged")

    flags = [e for e in console.store.entries_for(DENIED_REQUEST) if e.kind == "flagged" and e.seq not in before]
    assert len(flags) == 1
    assert flags[0].principal == "rita" and flags[0].body["note"] == "flagged from the browser"
    assert flags[0].body["target"]["principal"] == "bob"
    result = verify_chain(console.store)
    assert result.ok and result.head_seq >= flags[0].seq  # the flag is a sound entry of the chain

    page.click("nav >> text=Usage")
    page.goto("/console/usage?since=2000-01-01")
    assert page.locator("figure.chart > svg").count() == 5
    _shot(page, "06-usage")
    page.click("nav >> text=Chain")
    page.wait_for_selector("text=verified up to entry")
    _shot(page, "07-chain")
    assert page.problems == []


def test_markup_in_a_prompt_runs_nothing_in_the_browser(page: Any, console: Console) -> None:
    _sign_in(page, console.keys.auditor)
    page.goto(f"/console/requests/{MARKUP_REQUEST}")
    assert page.locator("pre.text").first.inner_text() == MARKUP_PROMPT
    assert page.locator("form[action$='/flag']").count() == 0  # an auditor has no action forms
    _shot(page, "08-request-auditor")
    assert page.problems == []


def test_sign_out_in_the_browser(page: Any, console: Console) -> None:
    _sign_in(page, console.keys.reviewer)
    page.click("button:has-text('Sign out')")
    page.wait_for_url("**/console/sign-in")
    page.goto("/console/search")
    assert "/console/sign-in" in page.url
    assert page.problems == []


def test_an_admin_creates_a_key_sees_its_secret_once_and_revokes_it(page: Any, console: Console) -> None:
    admin_id = console.keys.admin.split("_")[1]
    _sign_in(page, console.keys.admin)
    assert page.url.endswith("/console/keys")
    assert page.locator("nav a").all_inner_texts() == ["Keys"]  # an admin-only key is offered the keys page only
    _shot(page, "09-keys")

    page.fill("#create input[name=user]", "browser-made")
    page.fill("#create input[name=team]", "research")
    page.check("#create input[name=roles][value=analyst]")
    page.fill("#create input[name=note]", "made in the browser test")
    page.click("#create button:has-text('Create key')")
    page.wait_for_selector("text=it will not be shown again")
    secret = page.input_value("input.secret")
    assert secret.startswith("gk_")
    key_id = secret.split("_")[1]
    _shot(page, "10-key-created")

    page.click("text=This key's page")
    page.wait_for_selector("h1:has-text('Key')")
    assert secret not in page.content()  # shown once: not on the key's page
    _shot(page, "11-key")
    page.check("#revoke input[name=confirm]")
    page.click(f"#revoke button:has-text('Revoke key {key_id}')")
    page.wait_for_selector("text=Revoked: the key stops working")
    assert page.locator("h1 .badge:has-text('revoked')").count() == 1
    _shot(page, "12-key-revoked")

    page.goto("/console/keys?include_revoked=true")
    assert page.locator(f"tr.revoked >> text={key_id}").count() == 1
    assert secret not in page.content()
    _shot(page, "13-keys-with-revoked")

    entries = console.store.entries_for(key_request_id(key_id))
    assert [(e.kind, e.body["by"]) for e in entries] == [("key_created", f"key:{admin_id}"),
                                                          ("key_revoked", f"key:{admin_id}")]
    assert all(secret not in str(e.body) for e in entries)
    result = verify_chain(console.store)
    assert result.ok and result.head_seq >= entries[-1].seq
    assert page.problems == []


def _page_width(page: Any) -> tuple[int, int]:
    return page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")


def test_long_unbroken_values_wrap_instead_of_widening_the_page(page: Any, console: Console) -> None:
    """A note, a name or a model name may be one long word (a pasted hash, a 128-character user): it
    wraps in its box; before, one such comment made the request page 40,000 pixels wide, pushing the
    review forms off screen, and a long user pushed the keys table's status and revoke links away."""
    long_word = "W" * 3000
    who = {"principal": "alice", "team": "T" * 128, "model": "M" * 200}
    console.store.append("request", "long-names-1", **who, policy_revision="rev-1",
                         body={"endpoint": "chat.completions", "key_id": "k",
                               "decision": {"allow": False, "reasons": [{"code": "c" * 120, "message": long_word}],
                                            "obligations": {"max_tokens": 16}}},
                         payload={"messages": [{"role": "user", "content": long_word}]})
    new_key(console, "u" * 128, ["analyst"])
    _sign_in(page, console.keys.reviewer)
    page.goto(f"/console/requests/{MARKUP_REQUEST}")
    page.fill("form[action$='/comment'] textarea[name=text]", long_word)
    page.click("form[action$='/comment'] button")
    page.wait_for_url("**?done=comment")
    for path in (f"/console/requests/{MARKUP_REQUEST}", "/console/requests/long-names-1",
                 "/console/search?kind=commented", "/console/search?request_id=long-names-1", "/console/",
                 "/console/usage"):
        page.goto(path)
        width, screen = _page_width(page)
        if width > screen:
            _shot(page, "wide-" + path.strip("/").replace("/", "-").replace("?", "-"))
        assert width <= screen, f"{path} is {width}px wide on a {screen}px screen"
    page.click("button:has-text('Sign out')")
    page.wait_for_url("**/console/sign-in")
    _sign_in(page, console.keys.admin)
    page.goto("/console/keys?limit=500")
    assert page.locator("td", has_text="u" * 128).count() == 1
    width, screen = _page_width(page)
    assert width <= screen, f"the keys page is {width}px wide on a {screen}px screen"
    assert page.problems == []
