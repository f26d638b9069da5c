"""``govgate keys``: create, list, revoke and re-role API keys; each change is an audit entry naming who made it."""

from __future__ import annotations

import unicodedata
from typing import Callable

import click

from gateway.settings import Settings, without_password
from govgate.cli_common import given_once, load_settings, refuse_missing_store
from govgate.own_entries import sign_key_entry_while_down


@click.group()
def keys() -> None:
    """Create, list, revoke and change the roles of API keys (each change goes on the audit chain)."""


def cli_actor() -> str:
    """Who made a change from this command line, for the entry's ``by``: ``cli:<os user>``.

    The OS account is what an operator's shell can tell; a deployment that
    shares one account between people should say who in ``--note`` or its
    own records.
    """
    import getpass
    import os

    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        name = f"uid{os.getuid()}"
    return f"cli:{name}"


def _open_database(settings: Settings):
    """The database engine with its schema up to date, or a one-line error naming the setting."""
    from audit import AuditError
    from gateway.auth import KeyStoreError
    from gateway.db_setup import DatabaseError, open_database

    try:
        return open_database(settings)
    except (AuditError, DatabaseError, KeyStoreError) as exc:
        raise click.ClickException(f"GOVGATE_DATABASE_URL={without_password(settings.effective_database_url)} "
                                   f"cannot be used: {exc}") from None


def _key_store(on_change: Callable[[str], None] | None = None, *, existing: bool = True):
    """The key store; ``on_change`` hears the ids of keys whose access was narrowed (see KeyStore).

    ``existing``: a SQLite store that is not there is an error, not a new empty one (only ``keys create``
    makes one: an operator may make the first admin key before the first start).
    """
    from gateway.auth import KeyStore

    settings = load_settings()
    if existing:
        refuse_missing_store(settings.effective_database_url)
    return KeyStore(_open_database(settings), on_change=on_change)


def _refused_write(exc: Exception) -> click.ClickException:
    """A change the database did not take (locked past GOVGATE_DATABASE_BUSY_TIMEOUT_S, a value too long
    for a column...): nothing was changed, say so in one line."""
    return click.ClickException(f"{exc}; nothing was changed")


def _gateways_redis_url(settings: Settings) -> str:
    """Where running gateways listen for key changes: ``GOVGATE_REDIS_URL``, else ``govgate up``'s own Redis.

    ``govgate up`` starts Redis on ``$GOVGATE_VAR_DIR/redis/redis.sock`` and
    passes its URL to its children only, so a ``govgate keys`` run in another
    terminal finds it there.
    """
    from govgate.redis_server import socket_url

    if settings.redis_url:
        return settings.redis_url
    embedded = settings.var_dir / "redis" / "redis.sock"
    return socket_url(embedded) if embedded.exists() else ""


#: The length of every key id (``secrets.token_hex(6)``): an argument longer than this names no key.
_KEY_ID_LEN = 12


def _checked_name(kind: str, value: str, hint: str) -> str:
    """``value`` if a key may hold it as its ``kind`` (user, team, role); else a one-line error naming the option
    ``hint`` and the rule, never the value: a 5000-character ``--user`` came back whole in the error, where the
    HTTP key administration (``gateway/keys_admin/service.py``) quotes no refused value."""
    from gateway.auth.keys import validate_name
    from gateway.keys_admin.service import MAX_NAME

    try:
        return validate_name(kind, value)
    except ValueError:
        raise click.ClickException(f"{hint} must be 1-{MAX_NAME} letters, digits or . _ @ - (starting with a letter "
                                   "or digit)") from None


def _checked_roles(roles: tuple[str, ...], hint: str = "--role") -> list[str]:
    """The roles, if there is at least one and each is a name a key may hold (:func:`_checked_name`, so an
    unknown role quoted below is a short name, as the HTTP API quotes it) that the policy knows; else a one-line
    error.

    The rule is :func:`gateway.keys_admin.roles.checked_roles`, which the HTTP key administration uses too.
    """
    from gateway.keys_admin.roles import RolesUnreadable, UnknownRoles, checked_roles, policy_roles

    for role in roles:
        _checked_name("role", role, hint)
    try:
        return checked_roles(roles, policy_roles(load_settings().policy_dir), none_given="no --role given")
    except (RolesUnreadable, UnknownRoles) as exc:
        raise click.ClickException(str(exc)) from None


def _refuse_a_secret(key_id: str, command: str) -> None:
    """A secret pasted where a key id belongs: name the id it carries (if it has an id's shape: a long argument
    is not repeated either), never echo the secret back."""
    from gateway.auth.keys import KEY_PREFIX
    from gateway.keys_admin.service import well_formed_id

    if key_id.startswith(KEY_PREFIX):
        parts = key_id.split("_")
        carried = parts[1] if len(parts) >= 3 and well_formed_id(parts[1]) else ""
        hint = f": govgate keys {command} {carried}" if carried else " (see 'govgate keys list')"
        raise click.ClickException(f"that is a key's secret, not its id; pass the key id{hint}")


def _no_key(what: str, key_id: str, see: str = "") -> click.ClickException:
    """No ``what`` ("key", "live key") has ``key_id``: the id named (as a terminal shows it) when it could be one,
    else only how long an id is, so a long argument is not repeated."""
    if len(key_id) > _KEY_ID_LEN:
        return click.ClickException(f"no {what} with that id: a key id is {_KEY_ID_LEN} characters, not "
                                    f"{len(key_id)}{see}")
    return click.ClickException(f"no {what} with id {_shown(key_id)}{see}")


@keys.command("create")
@click.option("--user", multiple=True, callback=given_once, help="Who the key belongs to (principal id). Required.")
@click.option("--team", multiple=True, callback=given_once, help="The user's team (policies and limits use it).")
@click.option("--role", "roles", multiple=True,
              help="A role the policy knows (policies/data.json); repeat for several. At least one.")
@click.option("--note", multiple=True, callback=given_once, help="Free text shown in 'keys list'.")
def keys_create(user: str | None, team: str | None, roles: tuple[str, ...], note: str | None) -> None:
    """Create a key and print it once (it is stored only as a hash)."""
    if user is None:
        raise click.MissingParameter(param_hint="'--user'", param_type="option")
    from gateway.auth import KeyStoreError
    from gateway.keys_admin.service import MAX_NOTE

    from govgate.cli_stdout import OutputError, stdout_closed

    _checked_name("user", user, "--user")
    if team is not None:
        _checked_name("team", team, "--team")
    checked = _checked_roles(roles)
    if note is not None and len(note) > MAX_NOTE:  # the HTTP API's rule; PostgreSQL's column refuses it too
        raise click.BadParameter(f"at most {MAX_NOTE} characters, not {len(note)}", param_hint="--note")
    if stdout_closed():  # the secret is shown once, there: with nowhere to show it, make no key
        raise OutputError("it is closed")
    store = _key_store(existing=False)
    try:
        issued = store.create(user, team=team, roles=checked, note=note, by=cli_actor())
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyStoreError as exc:
        raise _refused_write(exc) from None
    sign_key_entry_while_down(store.engine, issued.key.key_id)
    try:
        click.echo(issued.secret)
    except OutputError as exc:  # a full disk: the secret reached no one, so the key must not stay live
        raise OutputError(f"{exc.message.removeprefix('cannot write to standard output: ')}; "
                          f"{_unshown_key(store, issued.key.key_id)}") from None
    click.echo(f"key id {issued.key.key_id}: user={user} team={team or '-'} roles={','.join(issued.key.roles)} "
               "(the key is shown only now)", err=True)


def _unshown_key(store, key_id: str) -> str:
    """Revoke a key whose secret could not be printed; what became of it, for the error line."""
    from gateway.auth import KeyStoreError

    try:
        store.revoke(key_id, by=cli_actor())
    except KeyStoreError as exc:
        return f"key {key_id} was made and its secret shown nowhere, and revoking it failed ({exc}): revoke it"
    sign_key_entry_while_down(store.engine, key_id)
    return f"key {key_id} was made and revoked again (its secret was shown nowhere)"


@keys.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
def keys_list(include_revoked: bool) -> None:
    """List keys (ids, owners and notes, never secrets)."""
    lines = [("KEY ID", "USER", "TEAM", "ROLES", "CREATED", "REVOKED", "NOTE")]
    for key in _key_store().list(include_revoked=include_revoked):
        revoked = "-" if key.revoked_at is None else key.revoked_at or "(revoked)"  # '': revoked all the same
        lines.append((key.key_id, _shown(key.user), _shown(key.team or "-"), ",".join(key.roles) or "-",
                      str(key.created_at), str(revoked), _shown(key.note or "-")))
    # Columns as wide as their widest value (a 128-character user name pushed every later column out of
    # line when they were fixed), two spaces apart; the note, last, as it is.
    widths = [max(len(line[column]) for line in lines) + 2 for column in range(len(lines[0]) - 1)]
    for line in lines:
        click.echo("".join(value.ljust(width) for value, width in zip(line, widths)) + line[-1])


def _shown(text: str) -> str:
    """A stored value as one line a terminal shows as it is: control and format characters written as escapes.

    A key's note is free text an admin key may set over HTTP; printed raw, a newline in it printed a whole
    forged row and an escape sequence (``ESC[2K``) erased the row of a newly made admin key (probe h11).
    """
    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in text)


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id (the part after gk_, as 'keys list' shows); requests with it are refused from now on.

    A key revoked already is reported and left as it is (exit 0); an id no key has exits 1."""
    _refuse_a_secret(key_id, "revoke")
    from gateway.auth import KeyStoreError
    from gateway.auth.key_changes import KeyChangeAnnouncer

    settings = load_settings()
    announcer = KeyChangeAnnouncer(_gateways_redis_url(settings))
    store = _key_store(on_change=announcer)
    try:
        revoked = store.revoke(key_id, by=cli_actor())
    except KeyStoreError as exc:
        raise _refused_write(exc) from None
    if not revoked:
        # Revoked already (by an earlier run whose answer was lost, or by someone else): done, exit 0, as the
        # API answers 200 with changed: false; only an id no key has is an error, so a retrying script can
        # tell "done already" from a typo (h11 #5).
        row = store.get(key_id)
        if row is None:
            raise _no_key("key", key_id, " (see 'govgate keys list --all')")
        click.echo(f"{key_id} was already revoked at {row.revoked_at or '(unknown time)'}: nothing changed")
        # The gateways are told again: the run that revoked it may have warned that they were not (Redis
        # down), and its retry is how an operator mends that. A repeated signal only drops a cache entry.
        announcer(key_id)
        _warn_if_not_told(announcer, settings, "accepted this key", "accept it")
        return
    sign_key_entry_while_down(store.engine, key_id)
    click.echo(f"revoked {key_id}")
    _warn_if_not_told(announcer, settings, "accepted this key", "accept it")


@keys.command("roles")
@click.argument("key_id")
@click.argument("roles", nargs=-1, required=True)
def keys_roles(key_id: str, roles: tuple[str, ...]) -> None:
    """Give a live key exactly these roles (replacing its old ones); running gateways are told."""
    _refuse_a_secret(key_id, "roles")
    checked = _checked_roles(roles, "ROLE")
    from gateway.auth import KeyStoreError
    from gateway.auth.key_changes import KeyChangeAnnouncer

    settings = load_settings()
    announcer = KeyChangeAnnouncer(_gateways_redis_url(settings))
    store = _key_store(on_change=announcer)
    try:
        change = store.set_roles(key_id, checked, by=cli_actor())
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyStoreError as exc:
        raise _refused_write(exc) from None
    if change is None:
        raise _no_key("live key", key_id)
    if not change.changed:
        click.echo(f"{key_id} already has roles {','.join(change.new_roles)}: nothing changed")
        return
    sign_key_entry_while_down(store.engine, key_id)
    click.echo(f"{key_id}: roles {','.join(change.old_roles) or '-'} -> {','.join(change.new_roles)}")
    _warn_if_not_told(announcer, settings, "served this key", "serve it with its old roles")


def _warn_if_not_told(announcer, settings: Settings, seen: str, stale: str) -> None:
    """The change is committed; only its signal is missing: say how long a gateway may lag.

    A gateway whose own Redis connection is down asks the database anyway,
    so the window is a gateway that reaches a Redis this command could not:
    it may keep its cached principal until the entry expires.
    """
    if announcer.failure:
        ttl = settings.auth_cache_ttl_s
        # The advice fits the cause: with GOVGATE_REDIS_URL set, the Redis it names did not answer (frozen,
        # down), and setting the variable again would not help (probe s59 G7).
        advice = ("the Redis GOVGATE_REDIS_URL names did not answer: check that it is the gateways' and is up"
                  if settings.redis_url else "set GOVGATE_REDIS_URL to the gateways' Redis to make it immediate")
        click.echo(f"warning: running gateways were not told: {announcer.failure}. A gateway that {seen} "
                   f"in the last {ttl:g} s (GOVGATE_AUTH_CACHE_TTL_S) may {stale} for up to "
                   f"{ttl:g} s more; {advice}.", err=True)


def report_key_table(engine) -> bool:
    """``govgate audit verify``'s key part: one line per discrepancy (tampering), or one "matches" line."""
    keys_known, problems = key_discrepancies(engine)
    for problem in problems:
        click.echo(f"KEY TAMPERED: {problem}")
    if problems and keys_known == 0:
        click.echo("keys: the chain records no key at all: if this database was upgraded and not opened since, "
                   "run any 'govgate keys' command (or start govgate) once to record the existing keys, then verify")
    if not problems:
        click.echo(f"keys: the key table matches the chain ({keys_known} keys)")
    return not problems


def key_discrepancies(engine) -> tuple[int, list[str]]:
    """For ``govgate audit verify``: how many keys the chain knows, and each way the key table disagrees.

    Reads the key table (the gateway's) and folds the chain's key entries
    (:mod:`audit.key_ledger`). A database without the key table (an audit
    store only) is compared as an empty table.
    """
    from sqlalchemy import inspect

    from audit.key_ledger import KeyRecord, key_fingerprint, read_ledger, reconcile
    from gateway.auth import KeyStore

    ledger = read_ledger(engine)
    rows = KeyStore(engine).list(include_revoked=True) if inspect(engine).has_table("api_keys") else []
    records = [KeyRecord(key_id=row.key_id, roles=_stored_roles(row.roles_json), revoked=row.revoked_at is not None,
                         user=row.user, team=row.team, fingerprint=key_fingerprint(row.key_hash), note=row.note)
               for row in rows]
    return len(ledger.keys), [found.describe() for found in reconcile(ledger, records)]


def _stored_roles(roles_json: str) -> tuple[str, ...]:
    """A row's roles; text that is not a JSON list of names (edited by hand) is kept as one odd "role"."""
    import json

    try:
        roles = json.loads(roles_json)
    except ValueError:
        roles = None
    if isinstance(roles, list) and all(isinstance(role, str) for role in roles):
        return tuple(roles)
    return (f"<unreadable roles_json {roles_json[:40]!r}>",)
