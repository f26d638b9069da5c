"""``/admin/keys`` on the real app and a real database (SQLite and PostgreSQL): who may, what it does, ugly input.

Every change must be an audit entry naming the acting admin's key, leave
``govgate audit verify`` clean, and never put the secret anywhere but the
one answer that creates it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from audit import AuditStore
from audit.key_ledger import key_request_id
from gateway.auth import KeyStore
from gateway.components import open_database
from gateway.settings import Settings
from govgate.cli import main
from govgate.supervisor import child_env
from tests.admin.conftest import Keys, bearer
from tests.keys_and_limits import secret_part

pytestmark = pytest.mark.anyio

KEYS = "/admin/keys"


def assert_error(response, status: int, code: str, param: str | None = ...) -> dict[str, Any]:
    """An OpenAI-shaped error with this status and code (and ``param``, when given)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code", "param"} and error["code"] == code, error
    if param is not ...:
        assert error["param"] == param, error
    return error


async def create(client, admin: str, **body: Any):
    return await client.post(KEYS, headers=bearer(admin), json={"roles": ["analyst"], **body})


async def models(client, secret: str) -> list[str] | int:
    """The models a key may use, or the status it was refused with."""
    response = await client.get("/v1/models", headers=bearer(secret))
    return sorted(m["id"] for m in response.json()["data"]) if response.status_code == 200 else response.status_code


def entries(store: KeyStore, key_id: str) -> list[tuple[str, dict]]:
    return [(entry.kind, entry.body) for entry in AuditStore(store.engine).entries_for(key_request_id(key_id))]


def verify(settings: Settings) -> str:
    """``govgate audit verify`` on the gateway's database: exit 0 and the key table matching the chain."""
    result = CliRunner().invoke(main, ["audit", "verify"], env=child_env(settings, settings.redis_url),
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "keys: the key table matches the chain" in result.output, result.output
    return result.output


# -- who may -------------------------------------------------------------------


ROUTES = [("post", KEYS, {"user": "x", "roles": ["analyst"]}), ("get", KEYS, None),
          ("get", f"{KEYS}/0123456789ab", None), ("post", f"{KEYS}/0123456789ab/revoke", None), ("put", f"{KEYS}/0123456789ab/roles", {"roles": ["viewer"]})]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
async def test_only_admins_get_in(aclient, akeys: Keys, method: str, path: str, body: Any) -> None:
    send = getattr(aclient, method)
    kwargs = {"json": body} if body is not None else {}
    assert_error(await send(path, **kwargs), 401, "missing_api_key")
    assert_error(await send(path, headers=bearer(akeys.revoked), **kwargs), 401, "invalid_api_key")
    for secret in (akeys.analyst, akeys.viewer):
        error = assert_error(await send(path, headers=bearer(secret), **kwargs), 403, "admin_forbidden")
        assert error["type"] == "permission_error"


async def test_a_non_admin_is_refused_before_the_body_is_read(aclient, akeys: Keys) -> None:
    response = await aclient.post(KEYS, headers=bearer(akeys.analyst), content=b"\x00 not json")
    assert_error(response, 403, "admin_forbidden")


# -- create ----------------------------------------------------------------------


async def test_create_shows_the_secret_once_and_records_who_made_it(aclient, akeys: Keys, astore: KeyStore,
                                                                    asettings: Settings, caplog) -> None:
    response = await create(aclient, akeys.admin, user="carl", team="research", roles=["analyst", "viewer"],
                            note="for the dashboards")
    assert response.status_code == 201, response.text
    made = response.json()
    secret, key_id = made.pop("key"), made["key_id"]
    assert secret.startswith(f"gk_{key_id}_") and response.headers["cache-control"] == "no-store"
    assert made == {"object": "api_key", "key_id": key_id, "user": "carl", "team": "research",
                    "roles": ["analyst", "viewer"], "note": "for the dashboards", "created_at": made["created_at"],
                    "revoked_at": None}
    assert "govgate-tiny" in await models(aclient, secret)  # it works at once

    (kind, body), = entries(astore, key_id)
    assert kind == "key_created" and body["by"] == f"key:{akeys.admin_id}" and body["user"] == "carl"
    # Never again: not in the key's document, not in the listing, not on the chain, not in the logs.
    shown = (await aclient.get(f"{KEYS}/{key_id}", headers=bearer(akeys.admin))).text
    listed = (await aclient.get(KEYS, headers=bearer(akeys.admin), params={"limit": 500})).text
    with astore.engine.connect() as conn:
        chain = json.dumps([list(map(str, row)) for row in conn.execute(text("SELECT * FROM audit_entries"))])
    random_part = secret_part(secret)
    for place in (shown, listed, chain, caplog.text):
        assert random_part not in place
    verify(asettings)


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"user": 5, "roles": ["analyst"]}, 422, "invalid_value", "user"),
    ({"user": "ann", "roles": "analyst"}, 422, "invalid_value", "roles"),
    ({"user": "ann", "roles": []}, 422, "invalid_value", "roles"),
    ({"user": "ann"}, 422, "invalid_value", "roles"),
    ({"roles": ["analyst"]}, 422, "invalid_value", "user"),
    ({"user": "ann", "roles": ["analist"]}, 422, "unknown_role", "roles"),
    ({"user": "ann", "roles": ["analyst", "root"]}, 422, "unknown_role", "roles"),
    ({"user": "an\x00n", "roles": ["analyst"]}, 422, "invalid_value", "user"),
    ({"user": "ann\n", "roles": ["analyst"]}, 422, "invalid_value", "user"),
    ({"user": "ann smith", "roles": ["analyst"]}, 422, "invalid_value", "user"),
    ({"user": "a" * 129, "roles": ["analyst"]}, 422, "invalid_value", "user"),
    ({"user": "ann", "team": "", "roles": ["analyst"]}, 422, "invalid_value", "team"),
    ({"user": "ann", "roles": ["ana\x00lyst"]}, 422, "invalid_value", "roles[0]"),
    ({"user": "ann", "roles": ["analyst"] * 33}, 422, "invalid_value", "roles"),
    ({"user": "ann", "roles": ["analyst"], "note": "x\x00y"}, 422, "invalid_value", "note"),
    ({"user": "ann", "roles": ["analyst"], "note": "x" * 257}, 422, "invalid_value", "note"),
    ({"user": "ann", "roles": ["analyst"], "models": ["*"]}, 400, "unsupported_parameter", "models"),
    (["ann"], 400, "invalid_json", None),
], ids=lambda value: None if isinstance(value, (dict, list)) else str(value))
async def test_create_refuses_bad_bodies_clearly_and_writes_nothing(aclient, akeys: Keys, astore: KeyStore,
                                                                    body: Any, status: int, code: str,
                                                                    param: str | None) -> None:
    before = len(astore.list(include_revoked=True))
    error = assert_error(await aclient.post(KEYS, headers=bearer(akeys.admin), json=body), status, code, param)
    if code == "unknown_role":
        assert "analyst" in error["message"] and "reviewer" in error["message"]  # it lists the known roles
    assert "\x00" not in error["message"]
    if isinstance(body, dict) and isinstance(body.get("user"), str) and body["user"] != "ann":
        assert body["user"] not in error["message"]  # a refused value is named by its field, never quoted
    assert len(astore.list(include_revoked=True)) == before


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"[" * 200 + b"]" * 200, b'{"user": "a", "user": }'])
async def test_create_refuses_what_is_not_a_json_object(aclient, akeys: Keys, raw: bytes) -> None:
    response = await aclient.post(KEYS, headers={**bearer(akeys.admin), "Content-Type": "application/json"},
                                  content=raw)
    assert_error(response, 400, "invalid_json")


async def test_a_number_out_of_range_is_named_not_called_broken_json(aclient, akeys: Keys, astore: KeyStore) -> None:
    """msgspec refuses 1e400 while decoding, naming no key: it was 400 "not valid JSON"."""
    before = len(astore.list(include_revoked=True))
    response = await aclient.post(KEYS, headers={**bearer(akeys.admin), "Content-Type": "application/json"},
                                  content=b'{"user": "ann", "roles": ["analyst"], "note": 1e400}')
    assert "out of range" in assert_error(response, 422, "invalid_value", "note")["message"]
    assert len(astore.list(include_revoked=True)) == before


async def test_a_huge_body_is_413(aclient, akeys: Keys, asettings: Settings) -> None:
    huge = json.dumps({"user": "ann", "roles": ["analyst"], "note": "x" * asettings.max_body_bytes}).encode()
    assert_error(await aclient.post(KEYS, headers=bearer(akeys.admin), content=huge), 413, "body_too_large")


# -- list and get ---------------------------------------------------------------------


async def test_listing_pages_through_every_key_in_order(aclient, akeys: Keys, astore: KeyStore) -> None:
    for user in ("p1", "p2", "p3"):
        assert (await create(aclient, akeys.admin, user=user)).status_code == 201
    for include_revoked in (False, True):
        found, cursor = [], None
        while True:
            params = {"limit": 2, "include_revoked": str(include_revoked).lower(),
                      **({"cursor": cursor} if cursor else {})}
            response = await aclient.get(KEYS, headers=bearer(akeys.admin), params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            assert page["object"] == "list" and len(page["data"]) <= 2
            found += page["data"]
            if not page["has_more"]:
                assert page["next_cursor"] is None
                break
            cursor = page["next_cursor"]
            assert cursor == page["data"][-1]["key_id"]
        expected = astore.list(include_revoked=include_revoked)
        assert [k["key_id"] for k in found] == [row.key_id for row in expected]
        assert any(k["revoked_at"] for k in found) is include_revoked
        assert all("key" not in k for k in found)


@pytest.mark.parametrize(("params", "code", "param"), [
    ({"limit": "0"}, "invalid_parameter", "limit"),
    ({"limit": "501"}, "invalid_parameter", "limit"),
    ({"limit": "ten"}, "invalid_parameter", "limit"),
    ({"limit": "\uff15"}, "invalid_parameter", "limit"),  # a full-width digit
    ({"include_revoked": "yes"}, "invalid_parameter", "include_revoked"),
    ({"cursor": "zzzzzzzzzzzz"}, "invalid_parameter", "cursor"),
    ({"cursor": "000000000000"}, "invalid_parameter", "cursor"),  # well formed, no such key
    ({"cursor": "a\x00"}, "invalid_parameter", "cursor"),
    ({"user": "root"}, "unsupported_parameter", "user"),
    ([("limit", "2"), ("limit", "3")], "invalid_parameter", "limit"),
])
async def test_listing_refuses_bad_queries(aclient, akeys: Keys, params: Any, code: str, param: str) -> None:
    assert_error(await aclient.get(KEYS, headers=bearer(akeys.admin), params=params), 400, code, param)


async def test_include_revoked_reads_the_flag_spellings_include_text_reads(aclient, akeys: Keys,
                                                                           astore: KeyStore) -> None:
    """``1``/``0`` and any case, as the review API's ``include_text`` has always read them (one reading)."""
    assert (await create(aclient, akeys.admin, user="flag-spelling")).status_code == 201
    every = {row.key_id for row in astore.list(include_revoked=True)}
    live = {row.key_id for row in astore.list()}
    assert every != live  # the fixture's keys include revoked ones, so the flag shows
    for spelling, expected in (("1", every), ("TRUE", every), ("True", every), ("0", live), ("FALSE", live)):
        response = await aclient.get(KEYS, headers=bearer(akeys.admin),
                                     params={"limit": 500, "include_revoked": spelling})
        assert response.status_code == 200, (spelling, response.text)
        assert {k["key_id"] for k in response.json()["data"]} == expected, spelling


async def test_one_key_and_unknown_ids(aclient, akeys: Keys) -> None:
    response = await aclient.get(f"{KEYS}/{akeys.analyst_id}", headers=bearer(akeys.admin))
    assert response.status_code == 200 and response.json()["user"] == "alice"
    for missing in ("000000000000", "nothex", "A" * 300, "%00"):
        assert_error(await aclient.get(f"{KEYS}/{missing}", headers=bearer(akeys.admin)), 404, "key_not_found")


async def test_a_secret_passed_as_the_id_is_named_and_never_echoed(aclient, akeys: Keys) -> None:
    for method, suffix in (("get", ""), ("post", "/revoke")):
        response = await getattr(aclient, method)(f"{KEYS}/{akeys.analyst}{suffix}", headers=bearer(akeys.admin))
        error = assert_error(response, 404, "key_not_found", "key_id")
        assert akeys.analyst_id in error["message"] and "secret" in error["message"]
        assert secret_part(akeys.analyst) not in response.text
    assert await models(aclient, akeys.analyst) != 401  # only named as exposed, not revoked by this


# -- revoke and roles -------------------------------------------------------------------


async def test_revoke_takes_effect_at_once_and_twice_is_idempotent(aclient, akeys: Keys, astore: KeyStore,
                                                                   asettings: Settings) -> None:
    made = (await create(aclient, akeys.admin, user="temp")).json()
    assert await models(aclient, made["key"]) != 401  # cached now
    first = await aclient.post(f"{KEYS}/{made['key_id']}/revoke", headers=bearer(akeys.admin))
    assert first.status_code == 200, first.text
    assert (first.json()["changed"], first.json()["gateways_told"], first.json()["warning"]) == (True, True, None)
    assert first.json()["revoked_at"]
    assert await models(aclient, made["key"]) == 401
    again = await aclient.post(f"{KEYS}/{made['key_id']}/revoke", headers=bearer(akeys.admin))
    assert again.status_code == 200 and again.json()["changed"] is False
    assert again.json()["revoked_at"] == first.json()["revoked_at"]
    assert [kind for kind, _ in entries(astore, made["key_id"])] == ["key_created", "key_revoked"]
    assert entries(astore, made["key_id"])[1][1] == {"key_id": made["key_id"], "by": f"key:{akeys.admin_id}"}
    assert_error(await aclient.post(f"{KEYS}/000000000000/revoke", headers=bearer(akeys.admin)), 404,
                 "key_not_found")
    verify(asettings)


async def test_roles_change_takes_effect_at_once(aclient, akeys: Keys, astore: KeyStore, asettings: Settings) -> None:
    made = (await create(aclient, akeys.admin, user="mover", roles=["analyst"])).json()
    assert "govgate-tiny" in await models(aclient, made["key"])
    path = f"{KEYS}/{made['key_id']}/roles"
    changed = await aclient.put(path, headers=bearer(akeys.admin), json={"roles": ["viewer"]})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["roles"], changed.json()["changed"]) == (["viewer"], True)
    assert await models(aclient, made["key"]) == []  # a viewer may use no model: the cache was told
    same = await aclient.put(path, headers=bearer(akeys.admin), json={"roles": ["viewer", "viewer"]})
    assert same.status_code == 200 and same.json()["changed"] is False
    kinds = [(kind, body.get("new_roles"), body["by"]) for kind, body in entries(astore, made["key_id"])]
    assert kinds == [("key_created", None, f"key:{akeys.admin_id}"),
                     ("key_roles_changed", ["viewer"], f"key:{akeys.admin_id}")]

    assert_error(await aclient.put(path, headers=bearer(akeys.admin), json={"roles": ["sudo"]}), 422, "unknown_role")
    assert_error(await aclient.put(path, headers=bearer(akeys.admin), json={"roles": []}), 422, "invalid_value")
    assert_error(await aclient.put(path, headers=bearer(akeys.admin), json={"role": ["viewer"]}), 400,
                 "unsupported_parameter")
    assert_error(await aclient.put(f"{KEYS}/000000000000/roles", headers=bearer(akeys.admin),
                                   json={"roles": ["viewer"]}), 404, "key_not_found")
    await aclient.post(f"{KEYS}/{made['key_id']}/revoke", headers=bearer(akeys.admin))
    assert_error(await aclient.put(path, headers=bearer(akeys.admin), json={"roles": ["analyst"]}), 409,
                 "key_revoked")
    verify(asettings)


async def test_a_field_given_twice_is_refused_and_writes_nothing(aclient, akeys: Keys, astore: KeyStore) -> None:
    before = astore.list(include_revoked=True)
    made = await aclient.post(KEYS, headers={**bearer(akeys.admin), "content-type": "application/json"},
                              content=b'{"user": "twice", "roles": ["viewer"], "roles": ["admin"]}')
    assert_error(made, 400, "invalid_json", "roles")
    changed = await aclient.put(f"{KEYS}/{akeys.analyst_id}/roles",
                                headers={**bearer(akeys.admin), "content-type": "application/json"},
                                content=b'{"roles": ["analyst"], "roles": ["admin"]}')
    assert_error(changed, 400, "invalid_json", "roles")
    assert astore.list(include_revoked=True) == before


async def test_a_query_parameter_is_refused_on_every_route(aclient, akeys: Keys, astore: KeyStore) -> None:
    before = astore.list(include_revoked=True)
    key = f"{KEYS}/{akeys.analyst_id}"
    for response in [
        await aclient.post(f"{KEYS}?team=x", headers=bearer(akeys.admin), json={"user": "qp", "roles": ["viewer"]}),
        await aclient.get(f"{key}?x=1", headers=bearer(akeys.admin)),
        await aclient.post(f"{key}/revoke?dry_run=true", headers=bearer(akeys.admin)),
        await aclient.put(f"{key}/roles?x=1", headers=bearer(akeys.admin), json={"roles": ["viewer"]}),
    ]:
        assert_error(response, 400, "unsupported_parameter")
    assert astore.list(include_revoked=True) == before  # nothing was changed


async def test_other_methods_are_refused_in_openai_shape(aclient, akeys: Keys) -> None:
    assert_error(await aclient.delete(f"{KEYS}/{akeys.analyst_id}", headers=bearer(akeys.admin)), 405,
                 "method_not_allowed")
    assert_error(await aclient.patch(f"{KEYS}/{akeys.analyst_id}/roles", headers=bearer(akeys.admin),
                                     json={"roles": ["viewer"]}), 405, "method_not_allowed")


# -- the last admin ------------------------------------------------------------------------


async def test_the_last_admin_key_cannot_be_revoked_or_lose_the_role(fresh_gateway) -> None:
    from tests.admin.conftest import make_keys

    async with fresh_gateway() as (client, settings):
        keys = make_keys(settings)  # one live admin (root); rex's admin key is revoked
        own = f"{KEYS}/{keys.admin_id}"
        error = assert_error(await client.post(f"{own}/revoke", headers=bearer(keys.admin)), 409, "last_admin")
        assert "another admin key" in error["message"]
        assert_error(await client.put(f"{own}/roles", headers=bearer(keys.admin), json={"roles": ["analyst"]}),
                     409, "last_admin", "roles")
        keeps = await client.put(f"{own}/roles", headers=bearer(keys.admin), json={"roles": ["admin", "reviewer"]})
        assert keeps.status_code == 200 and keeps.json()["roles"] == ["admin", "reviewer"]

        # With a second admin, an admin may revoke their own key (rotation): it stops working at once.
        second = (await create(client, keys.admin, user="root2", roles=["admin"])).json()
        revoked = await client.post(f"{own}/revoke", headers=bearer(keys.admin))
        assert revoked.status_code == 200 and revoked.json()["changed"] is True
        assert_error(await client.get(KEYS, headers=bearer(keys.admin)), 401, "invalid_api_key")
        # ... and now the second is the last.
        assert_error(await client.post(f"{KEYS}/{second['key_id']}/revoke", headers=bearer(second["key"])), 409,
                     "last_admin")
        verify(settings)


# -- failing closed --------------------------------------------------------------------------


async def test_a_database_that_refuses_writes_is_503_and_changes_nothing(fresh_gateway, request) -> None:
    from tests.admin.conftest import make_keys

    if request.node.callspec.params["backend"] != "sqlite":
        pytest.skip("the write refusal is planted with a SQLite trigger")
    async with fresh_gateway() as (client, settings):
        keys = make_keys(settings)
        store = KeyStore(open_database(settings))
        audit = AuditStore(store.engine)
        try:
            with store.engine.begin() as conn:
                conn.execute(text("CREATE TRIGGER refuse_insert BEFORE INSERT ON api_keys "
                                  "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"))
                conn.execute(text("CREATE TRIGGER refuse_update BEFORE UPDATE ON api_keys "
                                  "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"))
            head = audit.head()
            error = assert_error(await create(client, keys.admin, user="ann"), 503, "keys_unavailable")
            assert error["type"] == "service_unavailable_error" and "disk on fire" not in error["message"]
            assert_error(await client.post(f"{KEYS}/{keys.analyst_id}/revoke", headers=bearer(keys.admin)), 503,
                         "keys_unavailable")
            assert_error(await client.put(f"{KEYS}/{keys.analyst_id}/roles", headers=bearer(keys.admin),
                                          json={"roles": ["viewer"]}), 503, "keys_unavailable")
            assert audit.head().seq == head.seq  # no entry without its change
            assert await models(client, keys.analyst) != 401
        finally:
            store.engine.dispose()
        verify(settings)


async def test_the_readmes_curl_works_without_a_json_content_type(aclient, akeys: Keys) -> None:
    """``curl -d`` sends ``application/x-www-form-urlencoded``; the body is read as JSON all the same."""
    response = await aclient.post(KEYS, content=b'{"user": "alice2", "roles": ["analyst"]}',
                                  headers={**bearer(akeys.admin),
                                           "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 201, response.text
    assert response.json()["user"] == "alice2"


@pytest.mark.parametrize(("body", "param"), [
    ({"user": "default", "roles": ["analyst"]}, "user"),
    ({"user": "DEFAULT", "roles": ["analyst"]}, "user"),
    ({"user": "ann", "team": "default", "roles": ["analyst"]}, "team"),
    ({"user": "ann", "team": "Default", "roles": ["analyst"]}, "team"),
])
async def test_create_refuses_the_names_the_policy_reserves(aclient, akeys: Keys, astore: KeyStore, body: Any,
                                                           param: str) -> None:
    """``limits.principals.default``, ``limits.teams.default`` and ``teams.default.share`` are everyone's entries:
    a key named ``default`` would be read as every principal's or team's (policies/limits.rego)."""
    before = len(astore.list(include_revoked=True))
    error = assert_error(await aclient.post(KEYS, headers=bearer(akeys.admin), json=body), 422, "invalid_value",
                         param)
    assert error["message"].startswith(f"'{param}' is a reserved name: the policy's data keeps 'default' (in any "
                                       "case)"), error
    assert "limits.principals.default" in error["message"] if param == "user" else \
        "limits.teams.default and teams.default.share" in error["message"]
    assert len(astore.list(include_revoked=True)) == before
    created = await aclient.post(KEYS, headers=bearer(akeys.admin),
                                 json={"user": "defaulter", "team": "defaults", "roles": ["analyst"]})
    assert created.status_code == 201, created.text  # only the reserved name itself


async def test_every_answer_that_shows_keys_is_kept_by_no_cache(aclient, akeys: Keys) -> None:
    """Users, teams, roles and notes in every answer, not only the create's secret (probe s56 F5)."""
    made = (await create(aclient, akeys.admin, user="cached", note="who may see this")).json()
    path = f"{KEYS}/{made['key_id']}"
    answers = [await aclient.get(KEYS, headers=bearer(akeys.admin)),
               await aclient.get(path, headers=bearer(akeys.admin)),
               await aclient.put(f"{path}/roles", headers=bearer(akeys.admin), json={"roles": ["viewer"]}),
               await aclient.post(f"{path}/revoke", headers=bearer(akeys.admin))]
    for answer in answers:
        assert answer.status_code == 200 and answer.headers.get_list("cache-control") == ["no-store"], answer.text
    document = (await aclient.get("/schema/openapi.json")).json()
    for route, method in ((KEYS, "get"), (KEYS + "/{key_id}", "get"), (KEYS + "/{key_id}/roles", "put"),
                          (KEYS + "/{key_id}/revoke", "post"), (KEYS, "post")):
        success = next(iter(document["paths"][route][method]["responses"].values()))
        assert success["headers"]["Cache-Control"]["schema"]["const"] == "no-store", (route, method)
