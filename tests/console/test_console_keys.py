"""The console's keys page: who may use it, the list, create (the secret once), revoke, roles; CSRF; refusals.

Every change goes through ``KeyAdmin``: the tests find each on the audit
chain with ``by`` = the signed-in admin's key, and check the refusals the
service makes (unknown role, bad names, unknown key, last admin) reach the
page as its message at the API's status, never as a 500.
"""

from __future__ import annotations

import re

import pytest
from litestar.testing import AsyncTestClient

from audit.key_ledger import key_request_id
from gateway.app import create_app
from tests.conftest import policy_copy
from tests.console.conftest import Console, form_token, key_store, new_key, sign_in

pytestmark = pytest.mark.anyio

KEYS = "/console/keys"
_SECRET = re.compile(r"gk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}")


def key_id(secret: str) -> str:
    return secret.split("_")[1]


async def sign_in_admin(client: AsyncTestClient, key: str) -> str:
    """Sign in with an admin key; the session's CSRF token (from the keys page)."""
    form = await client.get("/console/sign-in")
    response = await client.post("/console/sign-in", data={"csrf_token": form_token(form.text), "key": key})
    assert response.status_code == 303, response.text
    assert response.headers["location"] == KEYS  # an admin-only key lands on the keys page
    page = await client.get(KEYS)
    assert page.status_code == 200, page.text
    return form_token(page.text)


def chain_of(console: Console, key: str) -> list[tuple[str, str]]:
    """(kind, by) of every entry about one key, oldest first."""
    return [(entry.kind, entry.body.get("by")) for entry in console.store.entries_for(key_request_id(key))]


def row(console: Console, key: str):  # noqa: ANN201
    store = key_store(console)
    try:
        return store.get(key)
    finally:
        store.engine.dispose()


def keys_of_user(console: Console, user: str) -> list[str]:
    store = key_store(console)
    try:
        found, _ = store.page(after=None, limit=500, include_revoked=True)
        return [k.key_id for k in found if k.user == user]
    finally:
        store.engine.dispose()


def only_admin(console: Console, keep: str) -> None:
    """Revoke every live admin key but ``keep`` (in the database), so ``keep`` is the last admin."""
    store = key_store(console)
    try:
        found, _ = store.page(after=None, limit=500, include_revoked=False)
        for k in found:
            if "admin" in k.roles and k.key_id != keep:
                assert store.revoke(k.key_id)
    finally:
        store.engine.dispose()


# -- who may use the page ------------------------------------------------------


async def test_an_admin_only_key_signs_in_to_the_keys_page_and_is_refused_the_review_pages(
        client: AsyncTestClient, console: Console) -> None:
    await sign_in_admin(client, console.keys.admin)
    page = await client.get(KEYS)
    assert 'href="/console/keys"' in page.text and 'class="badge role-admin"' in page.text
    assert 'href="/console/search"' not in page.text  # the nav offers only what the key may use
    for path in ("/console/", "/console/search", "/console/usage", "/console/chain", "/console/requests/x"):
        refused = await client.get(path)
        assert refused.status_code == 403, path
        assert "console_forbidden" in refused.text and "keys page" in refused.text
        assert 'href="/console/keys"' in refused.text  # the refusal page keeps the admin's nav
    csrf = form_token((await client.get(KEYS)).text)
    flag = await client.post("/console/requests/x/flag", data={"csrf_token": csrf, "note": "n"})
    assert flag.status_code == 403 and "console_forbidden" in flag.text
    out = await client.post("/console/sign-out", data={"csrf_token": csrf})
    assert out.status_code == 303 and out.headers["location"] == "/console/sign-in"
    assert (await client.get(KEYS)).status_code == 303


async def test_an_admin_asking_for_a_review_page_at_sign_in_lands_on_the_keys_page(
        client: AsyncTestClient, console: Console) -> None:
    form = await client.get("/console/sign-in")
    response = await client.post("/console/sign-in", data={"csrf_token": form_token(form.text),
                                                           "key": console.keys.admin, "next": "/console/usage"})
    assert response.headers["location"] == KEYS


async def test_an_admin_who_also_reviews_sees_both(client: AsyncTestClient, console: Console) -> None:
    secret, _ = new_key(console, "ada", ["admin", "reviewer"])
    await sign_in(client, secret)
    for path in ("/console/", "/console/search", KEYS):
        page = await client.get(path)
        assert page.status_code == 200, path
        assert 'href="/console/keys"' in page.text and 'href="/console/search"' in page.text
        assert "role-reviewer" in page.text and "role-admin" in page.text


@pytest.mark.parametrize("who", ["reviewer", "auditor"])
async def test_reviewers_and_auditors_are_refused_the_keys_page(
        client: AsyncTestClient, console: Console, who: str) -> None:
    csrf = await sign_in(client, getattr(console.keys, who))
    assert 'href="/console/keys"' not in (await client.get("/console/")).text
    for response in (await client.get(KEYS), await client.get(f"{KEYS}/{key_id(console.keys.admin)}"),
                     await client.post(KEYS, data={"csrf_token": csrf, "user": "mallory", "roles": "admin"})):
        assert response.status_code == 403
        assert "console_forbidden" in response.text and "&#39;admin&#39; role" in response.text
    assert keys_of_user(console, "mallory") == []


async def test_signed_out_the_keys_pages_redirect_to_sign_in(client: AsyncTestClient) -> None:
    for path in (KEYS, f"{KEYS}/0123456789ab"):
        response = await client.get(path)
        assert response.status_code == 303 and response.headers["location"].startswith("/console/sign-in")
    response = await client.post(KEYS, data={"user": "x", "roles": "viewer"})
    assert response.status_code == 303


# -- the list ------------------------------------------------------------------


async def test_the_list_shows_what_the_api_lists_and_never_a_secret_or_digest(
        client: AsyncTestClient, console: Console) -> None:
    await sign_in_admin(client, console.keys.admin)
    page = await client.get(KEYS)
    admin = row(console, key_id(console.keys.admin))
    assert admin.key_id in page.text and "root" in page.text
    assert _SECRET.search(page.text) is None
    assert admin.key_hash not in page.text
    assert page.headers["cache-control"] == "no-store"


async def test_the_revoked_toggle_and_paging(client: AsyncTestClient, console: Console) -> None:
    _, gone = new_key(console, "gone-user", ["viewer"])
    store = key_store(console)
    try:
        assert store.revoke(gone)
    finally:
        store.engine.dispose()
    await sign_in_admin(client, console.keys.admin)
    assert gone not in (await client.get(KEYS)).text
    assert 'href="/console/keys?include_revoked=true"' in (await client.get(KEYS)).text
    shown = await client.get(f"{KEYS}?include_revoked=true")
    assert gone in shown.text and "revoked" in shown.text

    seen: list[str] = []
    target = f"{KEYS}?include_revoked=true&limit=2"
    for _ in range(100):
        page = await client.get(target)
        assert page.status_code == 200
        ids = re.findall(r'<a class="mono" href="/console/keys/([0-9a-f]{12})">', page.text)
        assert 1 <= len(ids) <= 2
        seen += ids
        found = re.search(r'href="/console/keys(\?[^"]*cursor=[^"]*)">Next page', page.text)
        if not found:
            break
        target = KEYS + found.group(1).replace("&amp;", "&")
    assert len(seen) == len(set(seen)) and gone in seen and key_id(console.keys.admin) in seen


@pytest.mark.parametrize("query", ["nope=1", "limit=0", "limit=abc", "include_revoked=maybe", "cursor=zz"])
async def test_bad_list_queries_are_clear_4xx_pages(client: AsyncTestClient, console: Console, query: str) -> None:
    await sign_in_admin(client, console.keys.admin)
    response = await client.get(f"{KEYS}?{query}")
    assert response.status_code == 400, response.text
    assert "Error code" in response.text


# -- create --------------------------------------------------------------------


async def test_sending_the_create_form_again_makes_no_second_key(client: AsyncTestClient, console: Console) -> None:
    """Reloading the "key created" page sends its form again: the second sending is refused (409), so no
    second key is made whose secret nobody sees. A refused form comes back with a new id to send."""
    csrf = await sign_in_admin(client, console.keys.admin)
    form_id = re.search(r'name="form_id" value="([^"]+)"', (await client.get(KEYS)).text).group(1)
    fields = {"csrf_token": csrf, "form_id": form_id, "user": "reloader", "roles": "viewer"}
    first = await client.post(KEYS, data=fields)
    assert first.status_code == 200 and "it will not be shown again" in first.text
    again = await client.post(KEYS, data=fields)
    assert again.status_code == 409 and "form_resent" in again.text and not _SECRET.search(again.text)
    assert len(keys_of_user(console, "reloader")) == 1
    refused = await client.post(KEYS, data={**{k: v for k, v in fields.items() if k != "form_id"},
                                            "user": "bad name"})
    assert refused.status_code == 422
    fresh = re.search(r'name="form_id" value="([^"]+)"', refused.text).group(1)
    assert fresh != form_id
    tampered = await client.post(KEYS, data={**fields, "form_id": "x"})
    assert tampered.status_code == 403 and "csrf_refused" in tampered.text
    assert len(keys_of_user(console, "reloader")) == 1


async def test_a_create_form_repeating_a_field_is_refused_whole(client: AsyncTestClient, console: Console) -> None:
    """Two ``form_id`` fields were read as the first one (a repeated text field is refused on the form, below)."""
    csrf = await sign_in_admin(client, console.keys.admin)
    form_id = re.search(r'name="form_id" value="([^"]+)"', (await client.get(KEYS)).text).group(1)
    fields = {"csrf_token": csrf, "form_id": form_id, "user": "twice", "roles": ["viewer", "analyst"]}
    for repeated in ({"form_id": [form_id, "another"]}, {"csrf_token": [csrf, csrf]}):
        response = await client.post(KEYS, data={**fields, **repeated})
        name = next(iter(repeated))
        assert response.status_code == 400, response.text
        assert "invalid_request" in response.text and f"the field &#39;{name}&#39; more than once" in response.text
        assert not _SECRET.search(response.text)
    assert keys_of_user(console, "twice") == []
    made = await client.post(KEYS, data=fields)
    assert made.status_code == 200 and _SECRET.search(made.text), made.text
    assert len(keys_of_user(console, "twice")) == 1


async def test_create_shows_the_secret_once_and_records_it_in_the_admins_name(
        client: AsyncTestClient, console: Console) -> None:
    csrf = await sign_in_admin(client, console.keys.admin)
    response = await client.post(KEYS, data={"csrf_token": csrf, "user": "carla", "team": "research",
                                             "roles": ["analyst", "viewer"], "note": "for the dashboards"})
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert "it will not be shown again" in response.text
    secrets_shown = _SECRET.findall(response.text)
    assert len(set(secrets_shown)) == 1
    secret = secrets_shown[0]
    made = row(console, key_id(secret))
    assert made.user == "carla" and made.team == "research" and made.roles == ["analyst", "viewer"]
    assert made.note == "for the dashboards"
    store = key_store(console)
    try:
        assert store.authenticate(secret) is not None  # the secret shown is the key's
    finally:
        store.engine.dispose()
    assert chain_of(console, made.key_id) == [("key_created", f"key:{key_id(console.keys.admin)}")]
    for later in (await client.get(KEYS), await client.get(f"{KEYS}/{made.key_id}")):
        assert later.status_code == 200 and secret not in later.text  # never again


@pytest.mark.parametrize("token", [None, "", "wrong-token"])
async def test_every_keys_form_refuses_a_missing_or_wrong_csrf_token(
        client: AsyncTestClient, console: Console, token: str | None) -> None:
    await sign_in_admin(client, console.keys.admin)
    _, target = new_key(console, "csrf-target", ["viewer"])
    extra = {"csrf_token": token} if token is not None else {}
    create = await client.post(KEYS, data={**extra, "user": "csrf-made", "roles": "viewer"})
    revoke = await client.post(f"{KEYS}/{target}/revoke", data={**extra, "confirm": "yes"})
    roles = await client.post(f"{KEYS}/{target}/roles", data={**extra, "roles": "admin"})
    for response in (create, revoke, roles):
        assert response.status_code == 403 and "csrf_refused" in response.text
    assert keys_of_user(console, "csrf-made") == []
    assert row(console, target).revoked_at is None and row(console, target).roles == ["viewer"]


@pytest.mark.parametrize(("fields", "status", "says"), [
    ({"user": "ursula", "roles": "analist"}, 422, "unknown role &#39;analist&#39;"),
    ({"user": "ursula"}, 422, "&#39;roles&#39; is empty"),
    ({"user": "urs\x00ula", "roles": "viewer"}, 422, "&#39;user&#39; must be 1-128"),
    ({"user": "ursula", "team": "re\x00search", "roles": "viewer"}, 422, "&#39;team&#39; must be 1-128"),
    ({"user": "", "roles": "viewer"}, 422, "&#39;user&#39; is required"),
    ({"user": "   ", "roles": "viewer"}, 422, "&#39;user&#39; is required"),
    ({"user": "<script>x</script>", "roles": "viewer"}, 422, "&#39;user&#39; must be 1-128"),
    ({"user": "ursula", "roles": "viewer", "note": "n\x00te"}, 422, "&#39;note&#39; must be at most"),
    ({"user": "ursula", "roles": "viewer", "note": "n" * 257}, 422, "&#39;note&#39; must be at most"),
    ({"user": "u" * 129, "roles": "viewer"}, 422, "&#39;user&#39; must be 1-128"),
    ({"user": ["ursula", "ulla"], "roles": "viewer"}, 422, "&#39;user&#39; must be one text field"),
])
async def test_ugly_create_input_is_refused_on_the_page(
        client: AsyncTestClient, console: Console, fields: dict, status: int, says: str) -> None:
    csrf = await sign_in_admin(client, console.keys.admin)
    before = keys_of_user(console, "ursula")
    response = await client.post(KEYS, data={"csrf_token": csrf, **fields})
    assert response.status_code == status, response.text
    assert says in response.text
    assert '<p class="error" role="alert">' in response.text and "Create a key" in response.text
    assert "\x00" not in response.text and "<script>x</script>" not in response.text
    assert _SECRET.search(response.text) is None
    assert keys_of_user(console, "ursula") == before


# -- one key: revoke, roles ----------------------------------------------------


async def test_revoke_needs_its_confirmation_and_twice_is_answered_calmly(
        client: AsyncTestClient, console: Console) -> None:
    csrf = await sign_in_admin(client, console.keys.admin)
    secret, target = new_key(console, "vera", ["viewer"])
    page = await client.get(f"{KEYS}/{target}")
    assert page.status_code == 200 and "I understand" in page.text and secret not in page.text
    unconfirmed = await client.post(f"{KEYS}/{target}/revoke", data={"csrf_token": csrf})
    assert unconfirmed.status_code == 422 and "Tick the box" in unconfirmed.text
    assert row(console, target).revoked_at is None
    first = await client.post(f"{KEYS}/{target}/revoke", data={"csrf_token": csrf, "confirm": "yes"})
    assert first.status_code == 200 and "Revoked" in first.text
    assert row(console, target).revoked_at is not None
    again = await client.post(f"{KEYS}/{target}/revoke", data={"csrf_token": csrf, "confirm": "yes"})
    assert again.status_code == 200 and "already revoked; nothing changed" in again.text
    by = f"key:{key_id(console.keys.admin)}"
    assert chain_of(console, target)[1:] == [("key_revoked", by)]  # the second revocation wrote nothing
    roles = await client.post(f"{KEYS}/{target}/roles", data={"csrf_token": csrf, "roles": "analyst"})
    assert roles.status_code == 409 and "This key is revoked" in roles.text


async def test_change_roles_is_recorded_in_the_admins_name(client: AsyncTestClient, console: Console) -> None:
    csrf = await sign_in_admin(client, console.keys.admin)
    _, target = new_key(console, "rolf", ["viewer"])
    response = await client.post(f"{KEYS}/{target}/roles", data={"csrf_token": csrf, "roles": ["analyst", "auditor"]})
    assert response.status_code == 200 and "Roles changed to: analyst, auditor" in response.text
    assert row(console, target).roles == ["analyst", "auditor"]
    assert chain_of(console, target)[-1] == ("key_roles_changed", f"key:{key_id(console.keys.admin)}")
    same = await client.post(f"{KEYS}/{target}/roles", data={"csrf_token": csrf, "roles": ["analyst", "auditor"]})
    assert same.status_code == 200 and "nothing changed" in same.text
    for bad, says in ((["analist"], "unknown role"), ([], "&#39;roles&#39; is empty"),
                      (["view\x00er"], "&#39;role&#39; must be 1-128")):
        refused = await client.post(f"{KEYS}/{target}/roles", data={"csrf_token": csrf, "roles": bad})
        assert refused.status_code == 422 and says in refused.text
    assert row(console, target).roles == ["analyst", "auditor"]


@pytest.mark.parametrize("path", ["0123456789ab", "not-an-id", "A" * 300, "%00", "gk_0123456789ab_" + "A" * 43])
async def test_an_unknown_key_is_a_404_page_on_every_route(client: AsyncTestClient, console: Console,
                                                           path: str) -> None:
    csrf = await sign_in_admin(client, console.keys.admin)
    for response in (await client.get(f"{KEYS}/{path}"),
                     await client.post(f"{KEYS}/{path}/revoke", data={"csrf_token": csrf, "confirm": "yes"}),
                     await client.post(f"{KEYS}/{path}/roles", data={"csrf_token": csrf, "roles": "viewer"})):
        assert response.status_code == 404, response.text
        assert "key_not_found" in response.text
        assert "A" * 43 not in response.text  # a secret pasted as an id is not echoed


async def test_the_last_admin_can_neither_revoke_nor_demote_itself(client: AsyncTestClient, console: Console) -> None:
    admin = key_id(console.keys.admin)
    only_admin(console, admin)
    csrf = await sign_in_admin(client, console.keys.admin)
    revoke = await client.post(f"{KEYS}/{admin}/revoke", data={"csrf_token": csrf, "confirm": "yes"})
    assert revoke.status_code == 409 and "last live key with the &#39;admin&#39; role" in revoke.text
    demote = await client.post(f"{KEYS}/{admin}/roles", data={"csrf_token": csrf, "roles": "viewer"})
    assert demote.status_code == 409 and "last live key" in demote.text
    kept = row(console, admin)
    assert kept.revoked_at is None and kept.roles == ["admin"]


async def test_an_admin_who_drops_its_own_admin_role_is_signed_out_at_the_next_click(
        client: AsyncTestClient, console: Console) -> None:
    secret, mine = new_key(console, "adele", ["admin"])  # root stays an admin, so this is not the last
    csrf = await sign_in_admin(client, secret)
    response = await client.post(f"{KEYS}/{mine}/roles", data={"csrf_token": csrf, "roles": "analyst"})
    assert response.status_code == 200 and "Roles changed to: analyst" in response.text
    assert chain_of(console, mine)[-1] == ("key_roles_changed", f"key:{mine}")
    following = await client.get(KEYS)
    assert following.status_code == 303 and "why=ended" in following.headers["location"]
    assert (await client.get(KEYS)).status_code == 303  # the session is gone, not only refused once


async def test_an_admin_reviewer_who_drops_admin_keeps_the_review_pages(
        client: AsyncTestClient, console: Console) -> None:
    secret, mine = new_key(console, "adrian", ["admin", "reviewer"])
    csrf = await sign_in(client, secret)
    response = await client.post(f"{KEYS}/{mine}/roles", data={"csrf_token": csrf, "roles": "reviewer"})
    assert response.status_code == 200
    assert (await client.get(KEYS)).status_code == 403
    page = await client.get("/console/search")
    assert page.status_code == 200 and 'href="/console/keys"' not in page.text



async def test_unreadable_policy_roles_are_said_and_refuse_a_create(console: Console, tmp_path) -> None:  # noqa: ANN001
    """The checkboxes come from the policy's files: when they cannot be read, the page says so and nothing is made."""
    policy_dir = policy_copy(tmp_path)
    async with AsyncTestClient(create_app(console.settings.with_(policy_dir=policy_dir)), timeout=60) as client:
        client.follow_redirects = False
        csrf = await sign_in_admin(client, console.keys.admin)
        policy_dir.rename(tmp_path / "policies-away")  # as a volume unmounted under a running gateway
        page = await client.get(KEYS)
        assert page.status_code == 200 and "roles cannot be read right now" in page.text
        assert 'name="roles"' not in page.text
        response = await client.post(KEYS, data={"csrf_token": csrf, "user": "nadia", "roles": "viewer"})
        assert response.status_code == 503 and "The roles cannot be checked" in response.text
    assert keys_of_user(console, "nadia") == []
