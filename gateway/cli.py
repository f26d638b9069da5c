"""The ``govgate`` command: a thin shell over the same functions the app uses."""

from __future__ import annotations

import json
import logging
import sys

import click

from gateway.settings import Settings, SettingsError


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """govgate: a usage-governance gateway for open LLMs.

    Configuration comes from GOVGATE_* environment variables (see README).
    """


@main.command()
def up() -> None:
    """Run the embedded default: Redis, one worker per model, and the API."""
    from gateway.supervisor import run_up

    sys.exit(run_up(_settings()))


@main.command()
def serve() -> None:
    """Run only the API server (production: next to external Redis and workers)."""
    import uvicorn

    settings = _settings()
    _configure_logging(settings.log_level)
    uvicorn.run("gateway.app:app_from_env", factory=True, host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), access_log=False, lifespan="on")


@main.command()
@click.option("--model", "model_name", required=True, help="Registry name of the model this worker serves.")
@click.option("--concurrency", default=1, show_default=True, help="Pool processes (each loads the model).")
def worker(model_name: str, concurrency: int) -> None:
    """Run a Celery worker serving one model's queue."""
    from workers.registry import RegistryError, load_registry
    from workers.runtime import WorkerConfig, run_worker
    from workers.backends import BackendError, ensure_model_file

    settings = _settings()
    if not settings.redis_url:
        raise click.ClickException("GOVGATE_REDIS_URL must be set for a standalone worker")
    _configure_logging(settings.log_level)
    try:
        registry = load_registry(settings.models_file, settings.var_dir)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    spec = registry.get(model_name)
    if spec is None:
        raise click.ClickException(f"no model {model_name!r} in the registry (have: {', '.join(registry.names())})")
    try:
        ensure_model_file(spec)
    except BackendError as exc:
        raise click.ClickException(str(exc)) from None
    if not spec.path.exists():
        raise click.ClickException(f"model file {spec.path} does not exist")
    run_worker(WorkerConfig(model=spec, redis_url=settings.redis_url, database_url=settings.effective_database_url,
                            concurrency=concurrency, loglevel=settings.log_level))


# ---------------------------------------------------------------- keys


@main.group()
def keys() -> None:
    """Create, list and revoke API keys."""


def _key_store():
    from gateway.auth import KeyStore
    from gateway.components import open_database

    return KeyStore(open_database(_settings()))


@keys.command("create")
@click.option("--user", required=True, help="Who the key belongs to (principal id).")
@click.option("--team", default=None, help="The user's team (policies and limits use it).")
@click.option("--role", "roles", multiple=True, help="A role; repeat for several (see policies/data.json).")
@click.option("--note", default=None, help="Free text shown in 'keys list'.")
def keys_create(user: str, team: str | None, roles: tuple[str, ...], note: str | None) -> None:
    """Create a key and print it once (it is stored only as a hash)."""
    try:
        issued = _key_store().create(user, team=team, roles=list(roles), note=note)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(issued.secret)
    click.echo(f"key id {issued.key.key_id}: user={user} team={team or '-'} roles={','.join(roles) or '-'} "
               "(the key is shown only now)", err=True)


@keys.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
def keys_list(include_revoked: bool) -> None:
    """List keys (ids and owners, never secrets)."""
    rows = _key_store().list(include_revoked=include_revoked)
    click.echo(f"{'KEY ID':<14}{'USER':<20}{'TEAM':<16}{'ROLES':<24}{'CREATED':<27}REVOKED")
    for key in rows:
        click.echo(f"{key.key_id:<14}{key.user:<20}{key.team or '-':<16}{','.join(key.roles) or '-':<24}"
                   f"{key.created_at:<27}{key.revoked_at or '-'}")


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id; requests with it are refused from now on."""
    if not _key_store().revoke(key_id):
        raise click.ClickException(f"no live key with id {key_id}")
    click.echo(f"revoked {key_id}")


# ---------------------------------------------------------------- audit


@main.group()
def audit() -> None:
    """Read and verify the audit log."""


def _audit_engine():
    from audit import make_engine, migrate

    engine = make_engine(_settings().effective_database_url)
    migrate(engine)
    return engine


@audit.command("tail")
@click.option("-n", "count", default=20, show_default=True, help="How many of the newest entries.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit_tail(count: int, as_json: bool) -> None:
    """Show the newest audit entries."""
    from audit import AuditStore

    for entry in AuditStore(_audit_engine()).tail(count):
        if as_json:
            click.echo(json.dumps(entry.to_document(), sort_keys=True, default=str))
        else:
            click.echo(f"{entry.seq:>6} {entry.created_at} {entry.kind:<10} {entry.request_id} "
                       f"{entry.principal or '-'} {entry.model or '-'} {_summary(entry)}")


def _summary(entry) -> str:
    body = entry.body
    if entry.kind == "request":
        decision = body.get("decision", {})
        verdict = "allow" if decision.get("allow") else "deny " + ",".join(r.get("code", "?") for r in decision.get("reasons", []))
        return verdict
    if entry.kind == "completion":
        usage = body.get("usage", {})
        return f"{body.get('finish_reason')} {usage.get('prompt_tokens')}+{usage.get('completion_tokens')} tokens"
    return body.get("error", {}).get("code", "")


@audit.command("verify")
def audit_verify() -> None:
    """Recompute the hash chain; exit 1 and name the first bad entry if it is broken."""
    from audit import verify_chain

    result = verify_chain(_audit_engine())
    if result.ok:
        click.echo(f"ok: {result.checked} entries, chain intact")
        return
    click.echo(f"BROKEN at seq {result.first_bad_seq}: {result.problem} ({result.checked} entries checked)")
    sys.exit(1)


if __name__ == "__main__":
    main()
