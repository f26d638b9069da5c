"""The console's keys page, for admins: list, create (the secret shown once), revoke, change roles.

A view over :class:`gateway.keys_admin.KeyAdmin`, the service ``/admin/keys``
calls, acting as the signed-in admin's key: so every change is the same audit
entry (``by`` = ``key:<the admin's key id>``), the roles are checked against
the policy, the last-admin guard holds, and a revocation is told to every
gateway, exactly as through the API. A refusal is the page again with the
service's message (it never quotes a value it refused, nor a secret) at the
status the API would answer with. Every form carries the session's CSRF
token, checked before anything else is read. The list shows what the API's
list shows (``key_document``): never a secret, never a digest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlencode

import anyio.to_thread
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath

from gateway import urls
from gateway.api.admin_keys import list_query, api_error
from gateway.api.admin_keys_shapes import key_document
from gateway.console import csrf, once
from gateway.console.errors import error_page
from gateway.console.forms import read_form
from gateway.console.render import page
from gateway.console.signin import PageRefused, Reviewer, provide_user
from gateway.keys_admin import KeyAdmin, KeyAdminError, KeyChange, KeyChangeSignal, RolesUnreadable, policy_roles
from gateway.keys_admin.service import DEFAULT_PAGE_SIZE, InvalidField

#: The create form's text fields (beside the CSRF token and the ``roles`` checkboxes).
CREATE_FIELDS: Final = ("user", "team", "note")
#: The revoke form's confirmation box must come back with this value.
CONFIRM: Final = "yes"


@dataclass(frozen=True)
class Admin:
    """The signed-in admin and the key service acting as its key."""

    user: Reviewer
    keys: KeyAdmin


async def provide_admin(request: Request, state: State) -> Admin:
    """The signed-in admin; a key without the ``admin`` role gets the console's 403 page (with its own nav)."""
    user = await provide_user(request, state)
    if not user.may_admin:
        raise PageRefused(user, "The keys page is for keys with the 'admin' role.")
    components = state.components
    service = KeyAdmin(components.keys, user.principal, policy_dir=components.settings.policy_dir,
                       signal=KeyChangeSignal(components.redis, components.auth.cache,
                                              on_change=components.completions.admitted_keys.changed),
                       cache_ttl_s=components.settings.auth_cache_ttl_s)
    return Admin(user, service)


class KeysPage(Controller):
    """``/console/keys`` and ``/console/keys/{key_id}``: admins only (the ``admin`` dependency)."""

    dependencies = {"admin": Provide(provide_admin)}

    @get(urls.CONSOLE_KEYS.removeprefix(urls.CONSOLE), name="console-keys")
    async def keys(self, request: Request, state: State, admin: NamedDependency[Admin]) -> Response:
        return await _list_page(request, state, admin)

    @post(urls.CONSOLE_KEYS.removeprefix(urls.CONSOLE), name="console-key-create", status_code=200)
    async def create(self, request: Request, state: State, admin: NamedDependency[Admin]) -> Response:
        form = await _checked_form(request, admin)
        try:
            await once.claim(state.components.redis, form.get(once.FIELD))
        except once.FormResent:
            return error_page(409, "form_resent", "This form was sent before, and its key was made then (its "
                              "secret was shown once, on that page). Sending it again makes no second key: "
                              "the key is on the keys page.", user=admin.user)
        values: dict[str, str | None] = {}
        try:
            values.update((name, _text(form, name)) for name in CREATE_FIELDS)
            roles = _roles(form)
            user = values["user"] or ""
            if not user:
                raise InvalidField("'user' is required: the name of the person or service the key is for.",
                                   param="user")
            issued = await admin.keys.create(user, team=values["team"], roles=roles, note=values["note"])
        except KeyAdminError as refusal:
            # The form comes back filled in, but never with the value refused (the service quotes none either).
            kept = {name: value for name, value in values.items()
                    if name != refusal.param and value is not None and value.isprintable()}
            chosen = [] if refusal.param == "roles" else _chosen_roles(form)
            return await _list_page(request, state, admin, refusal=refusal, values=kept, chosen=chosen)
        return page("key_created.html", user=admin.user, active=urls.CONSOLE_KEYS, key=key_document(issued.key),
                    secret=issued.secret)

    @get(urls.CONSOLE_KEY.removeprefix(urls.CONSOLE), name="console-key")
    async def key(self, state: State, admin: NamedDependency[Admin], key_id: FromPath[str]) -> Response:
        try:
            row = await admin.keys.get(key_id)
        except KeyAdminError as refusal:
            return _refused_page(admin, refusal)
        return await _key_page(state, admin, key_document(row))

    @post(urls.CONSOLE_KEY.removeprefix(urls.CONSOLE) + "/revoke", name="console-key-revoke", status_code=200)
    async def revoke(self, request: Request, state: State, admin: NamedDependency[Admin],
                     key_id: FromPath[str]) -> Response:
        form = await _checked_form(request, admin)
        try:
            row = await admin.keys.get(key_id)
            if _text(form, "confirm") != CONFIRM:
                raise InvalidField("Tick the box to confirm the revocation: it cannot be undone.", param="confirm")
            change = await admin.keys.revoke(key_id)
        except KeyAdminError as refusal:
            return await _refused_key_page(state, admin, key_id, refusal)
        done = ("Revoked: the key stops working on every gateway now." if change.changed
                else "This key was already revoked; nothing changed.")
        return await _key_page(state, admin, key_document(change.key), done=done, warning=change.warning)

    @post(urls.CONSOLE_KEY.removeprefix(urls.CONSOLE) + "/roles", name="console-key-roles", status_code=200)
    async def roles(self, request: Request, state: State, admin: NamedDependency[Admin],
                    key_id: FromPath[str]) -> Response:
        form = await _checked_form(request, admin)
        try:
            change = await admin.keys.set_roles(key_id, _roles(form))
        except KeyAdminError as refusal:
            return await _refused_key_page(state, admin, key_id, refusal)
        return await _key_page(state, admin, key_document(change.key), done=_roles_done(change),
                               warning=change.warning)


def _roles_done(change: KeyChange) -> str:
    if not change.changed:
        return "The key already held exactly these roles; nothing changed."
    return f"Roles changed to: {', '.join(change.key.roles)}."


async def _checked_form(request: Request, admin: Admin) -> Any:
    """The posted form, once its CSRF token is the session's (:class:`csrf.CsrfRefused` otherwise) and no field
    came twice (:class:`FieldRepeated`) but the ``roles`` checkboxes and the text fields (``_text`` refuses a
    repeated one on the form itself, filled in)."""
    form = await read_form(request, may_repeat=("roles", "confirm", *CREATE_FIELDS))
    csrf.check(admin.user.session.csrf, form.get(csrf.FIELD))
    return form


def _text(form: Any, name: str) -> str | None:
    """A text field, stripped; None when absent or empty. A file where text belongs is refused."""
    values = form.getall(name) if name in form else []
    if len(values) > 1 or any(not isinstance(value, str) for value in values):
        raise InvalidField(f"'{name}' must be one text field.", param=name)
    text = values[0].strip() if values else ""
    return text or None


def _chosen_roles(form: Any) -> list[str]:
    return [value for value in form.getall("roles") if isinstance(value, str)] if "roles" in form else []


def _roles(form: Any) -> list[str]:
    """The ticked roles (the service checks each against the policy)."""
    values = form.getall("roles") if "roles" in form else []
    if any(not isinstance(value, str) for value in values):
        raise InvalidField("'roles' must be text fields.", param="roles")
    return values


async def _known_roles(state: State) -> tuple[list[str], str | None]:
    """The policy's roles for the checkboxes, or none and why (the service refuses a change then too)."""
    try:
        return await anyio.to_thread.run_sync(policy_roles, state.components.settings.policy_dir), None
    except RolesUnreadable:
        return [], "The policy's roles cannot be read right now, so no key can be created or re-roled."


async def _list_page(request: Request, state: State, admin: Admin, *, refusal: KeyAdminError | None = None,
                     values: dict[str, str | None] | None = None, chosen: list[str] | None = None) -> Response:
    """The list (paged as ``GET /admin/keys`` pages) with the create form; a create refusal shown above it."""
    limit, cursor, include_revoked = list_query(request)  # strict, as the API reads it (a POST has no query)
    try:
        found = await admin.keys.page(cursor=cursor, limit=limit, include_revoked=include_revoked)
    except KeyAdminError as listing_refusal:
        return _refused_page(admin, listing_refusal)
    known, roles_problem = await _known_roles(state)
    shown = {"include_revoked": "true"} if include_revoked else {}
    if limit != DEFAULT_PAGE_SIZE:
        shown["limit"] = str(limit)
    status = api_error(refusal).status if refusal else 200
    return page("keys.html", status=status, user=admin.user, active=urls.CONSOLE_KEYS,
                keys=[key_document(row) for row in found.keys], include_revoked=include_revoked,
                next_page=f"?{urlencode({**shown, 'cursor': found.next_cursor})}" if found.next_cursor else None,
                first_page=f"?{urlencode(shown)}" if cursor else None,
                toggle=f"?{urlencode({'include_revoked': 'true'})}" if not include_revoked else "?",
                known_roles=known, roles_problem=roles_problem, refusal=refusal,
                values=values or {}, chosen=chosen or [], form_id=once.new_id())


async def _key_page(state: State, admin: Admin, key: dict[str, Any], *, status: int = 200,
                    done: str | None = None, warning: str | None = None,
                    refusal: KeyAdminError | None = None) -> Response:
    known, roles_problem = await _known_roles(state)
    offered = known + [role for role in key["roles"] if role not in known]  # an old role is shown, to untick
    return page("key.html", status=status, user=admin.user, active=urls.CONSOLE_KEYS, key=key, roles=offered,
                known_roles=known, roles_problem=roles_problem, done=done, warning=warning, refusal=refusal,
                own=key["key_id"] == admin.user.principal.key_id, confirm=CONFIRM)


async def _refused_key_page(state: State, admin: Admin, key_id: str, refusal: KeyAdminError) -> Response:
    """The key's page with the refusal on it; an unknown key's refusal on the error page."""
    try:
        row = await admin.keys.get(key_id)
    except KeyAdminError:
        return _refused_page(admin, refusal)
    return await _key_page(state, admin, key_document(row), status=api_error(refusal).status, refusal=refusal)


def _refused_page(admin: Admin, refusal: KeyAdminError) -> Response:
    error = api_error(refusal)
    return error_page(error.status, error.code, error.message, user=admin.user)
