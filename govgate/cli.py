"""The ``govgate`` command: a thin shell over the same functions the app uses."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

from gateway.settings import Settings, SettingsError

#: ``policy explain``'s exit status on a deny (1 is an error, 2 a usage error: click's).
EXIT_DENIED = 3

#: When the command began (``govgate up`` prints its time to ready from here).
_STARTED = time.monotonic()


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="govgate", prog_name="govgate")
def main() -> None:
    """govgate: a usage-governance gateway for open LLMs.

    Configuration comes from GOVGATE_* environment variables (see README).
    """


@main.command()
def up() -> None:
    """Run the embedded default: Redis, one worker per model, and the API."""
    from govgate.supervisor import run_up

    sys.exit(run_up(_settings(), started=_STARTED))


@main.command()
def serve() -> None:
    """Run only the API server (production: next to external Redis and workers)."""
    import uvicorn

    settings = _settings()
    _check_serve_settings(settings)
    _configure_logging(settings.log_level)
    uvicorn.run("gateway.app:app_from_env", factory=True, host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), access_log=False, lifespan="on")


def _check_serve_settings(settings: Settings) -> None:
    """Refuse in one line what would otherwise fail in the app's startup with a traceback."""
    from govgate.redis_server import ping
    from govgate.supervisor import StartupError, check_port
    from workers.contract.registry import RegistryError, load_registry

    if not settings.redis_url:
        raise click.ClickException("GOVGATE_REDIS_URL is not set: 'govgate serve' needs a Redis "
                                   "(or run 'govgate up', which starts one)")
    if not ping(settings.redis_url):
        raise click.ClickException(f"GOVGATE_REDIS_URL={settings.redis_url} does not answer")
    if not settings.opa_url and not settings.policy_dir.is_dir():
        raise click.ClickException(f"GOVGATE_POLICY_DIR={settings.policy_dir} is not a folder")
    try:
        load_registry(settings.models_file, settings.var_dir)
        check_port(settings.host, settings.port)
    except (RegistryError, StartupError) as exc:
        raise click.ClickException(str(exc)) from None
    _check_database(settings)


def _check_database(settings: Settings) -> None:
    """Connect once (the app's startup migrates; doing it here too would slow every start)."""
    from sqlalchemy.exc import SQLAlchemyError

    from audit import AuditError, make_engine

    try:
        engine = make_engine(settings.effective_database_url)
        try:
            engine.connect().close()
        finally:
            engine.dispose()
    except (AuditError, SQLAlchemyError) as exc:
        raise click.ClickException(f"GOVGATE_DATABASE_URL={settings.effective_database_url} "
                                   f"cannot be used: {exc}") from None


def _open_database(settings: Settings):
    """The database engine with its schema up to date, or a one-line error naming the setting."""
    from audit import AuditError
    from gateway.auth import KeyStoreError
    from gateway.db import DatabaseError, open_database

    try:
        return open_database(settings)
    except (AuditError, DatabaseError, KeyStoreError) as exc:
        raise click.ClickException(f"GOVGATE_DATABASE_URL={settings.effective_database_url} "
                                   f"cannot be used: {exc}") from None


@main.command()
@click.option("--model", "model_name", required=True, help="Registry name of the model this worker serves.")
@click.option("--concurrency", default=1, show_default=True, help="Pool processes (each loads the model).")
def worker(model_name: str, concurrency: int) -> None:
    """Run a Celery worker serving one model's queue."""
    from workers.contract.registry import RegistryError, load_registry
    from workers.runtime import WorkerConfig, run_worker
    from workers.contract.sealing import KeyFileError
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
    config = WorkerConfig(model=spec, redis_url=settings.redis_url, database_url=settings.effective_database_url,
                          concurrency=concurrency, loglevel=settings.log_level,
                          time_limit_s=settings.generation_time_limit_s,
                          payload_key_file=settings.effective_payload_key_file,
                          digest_key_file=settings.effective_digest_key_file,
                          terminal_retry_horizon_s=settings.terminal_retry_horizon_s)
    try:
        run_worker(config)
    except KeyFileError as exc:
        raise click.ClickException(f"{exc}: replace it, or remove it to have a new key made") from None


# ---------------------------------------------------------------- keys


@main.group()
def keys() -> None:
    """Create, list and revoke API keys."""


def _key_store():
    from gateway.auth import KeyStore

    return KeyStore(_open_database(_settings()))


def _policy_roles(settings: Settings) -> list[str]:
    """The roles the policy grants anything to (``govgate_config.roles`` in its data)."""
    from gateway.policy.revision import PolicyFilesError, read_policy

    try:
        roles = read_policy(settings.policy_dir).base_data().get("govgate_config", {}).get("roles", {})
    except PolicyFilesError as exc:
        raise click.ClickException(f"cannot read the roles from GOVGATE_POLICY_DIR={settings.policy_dir}: "
                                   f"{exc}") from None
    return sorted(roles) if isinstance(roles, dict) else []


@keys.command("create")
@click.option("--user", required=True, help="Who the key belongs to (principal id).")
@click.option("--team", default=None, help="The user's team (policies and limits use it).")
@click.option("--role", "roles", multiple=True,
              help="A role the policy knows (policies/data.json); repeat for several. At least one.")
@click.option("--note", default=None, help="Free text shown in 'keys list'.")
def keys_create(user: str, team: str | None, roles: tuple[str, ...], note: str | None) -> None:
    """Create a key and print it once (it is stored only as a hash)."""
    known = _policy_roles(_settings())
    unknown = [role for role in roles if role not in known]
    if not roles or unknown:
        what = f"unknown role {', '.join(map(repr, unknown))}" if unknown else "no --role given"
        raise click.ClickException(f"{what}: a key needs at least one of the roles the policy knows: "
                                   f"{', '.join(known) or '(none)'}")
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
    """List keys (ids, owners and notes, never secrets)."""
    rows = _key_store().list(include_revoked=include_revoked)
    click.echo(f"{'KEY ID':<14}{'USER':<20}{'TEAM':<16}{'ROLES':<24}{'CREATED':<27}{'REVOKED':<27}NOTE")
    for key in rows:
        click.echo(f"{key.key_id:<14}{key.user:<20}{key.team or '-':<16}{','.join(key.roles) or '-':<24}"
                   f"{key.created_at:<27}{key.revoked_at or '-':<27}{key.note or '-'}")


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id (the part after gk_, as 'keys list' shows); requests with it are refused from now on."""
    from gateway.auth.keys import KEY_PREFIX

    if key_id.startswith(KEY_PREFIX):
        # A secret was pasted: name the id it carries, never echo the secret back.
        carried = key_id.split("_")[1] if key_id.count("_") >= 2 else ""
        hint = f": govgate keys revoke {carried}" if carried else " (see 'govgate keys list')"
        raise click.ClickException(f"that is a key's secret, not its id; pass the key id{hint}")
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
        if decision.get("unavailable"):  # no decision could be had: refused with 503, not denied
            return "unavailable"
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


# ---------------------------------------------------------------- policy


@main.group()
def policy() -> None:
    """Explain, test and replay the Rego policy."""


@policy.command("explain")
@click.option("--input", "input_file", type=click.File("r"), required=True,
              help="A policy input document (JSON), as described in the README; '-' for stdin.")
@click.option("--policy-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Policy folder (default: GOVGATE_POLICY_DIR).")
def policy_explain(input_file, policy_dir: Path | None) -> None:
    """Print the decision, reasons and obligations for one input; exit 0 on allow, 3 on deny (1 on an error)."""
    import asyncio

    try:
        document = json.load(input_file)
    except ValueError as exc:
        raise click.ClickException(f"the input is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise click.ClickException("the input must be a JSON object")
    from gateway.requests.policy_input import with_normalized_text

    document = with_normalized_text(document)
    settings = _settings()

    async def explain() -> tuple[dict, str]:
        engine = await _open_engine(settings, policy_dir)
        try:
            decision = await engine.decide(document)
            return decision.to_document(), engine.revision
        finally:
            await engine.aclose()

    decision, revision = asyncio.run(explain())
    click.echo(json.dumps({"revision": revision, **decision}, indent=2, sort_keys=True))
    if not decision["allow"]:
        for reason in decision["reasons"]:
            retry = f" (retry after {reason['retry_after_s']}s)" if reason.get("retry_after_s") else ""
            click.echo(f"denied: {reason['code']}: {reason['message']}{retry}", err=True)
        sys.exit(EXIT_DENIED)


@policy.command("test")
@click.option("--policy-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Policy folder (default: GOVGATE_POLICY_DIR).")
@click.option("--engine", type=click.Choice(["auto", "opa", "embedded"]), default="auto", show_default=True,
              help="auto: 'opa test' when an opa binary is found, else the embedded engine.")
def policy_test(policy_dir: Path | None, engine: str) -> None:
    """Run the Rego unit tests (*_test.rego) beside the policies."""
    import subprocess

    from gateway.policy.opa_binary import find_opa
    from gateway.policy.unittests import run_all

    folder = policy_dir or _settings().policy_dir
    opa = find_opa()
    if engine == "opa" and not opa:
        raise click.ClickException("no opa binary found (build one with 'make opa')")
    if engine != "embedded" and opa:
        sys.exit(subprocess.run([opa, "test", str(folder), "-v"]).returncode)
    results = run_all(folder)
    failed = [r for r in results if not r.passed]
    for result in results:
        mark = "PASS" if result.passed else "FAIL"
        click.echo(f"{mark} {result.test.file}::{result.test.rule}{': ' + result.detail if result.detail else ''}")
    click.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed or not results:
        sys.exit(1)


@policy.command("replay")
@click.option("--candidate", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="The policy folder to try.")
@click.option("--since", default="7d", show_default=True, help="Period: 7d, 12h, 30m, 2w, or an ISO date.")
@click.option("--examples", default=3, show_default=True, help="Examples shown per kind of change.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def policy_replay(candidate: Path, since: str, examples: int, as_json: bool) -> None:
    """Re-decide audited requests under a candidate policy and report what would change."""
    import asyncio

    from audit import AuditStore
    from gateway.policy import EmbeddedPolicyEngine, PolicyLoadError
    from gateway.replay import parse_since, replay

    try:
        start = parse_since(since)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    settings = _settings()
    store = AuditStore(_audit_engine())

    async def run():
        try:
            engine = EmbeddedPolicyEngine.load(candidate, settings.policy_timeout_s)
        except PolicyLoadError as exc:
            raise click.ClickException(f"the candidate policy does not load: {exc}") from None
        try:
            return await replay(store.iter_entries(), engine, start, examples_per_change=examples)
        finally:
            await engine.aclose()

    report = asyncio.run(run())
    if as_json:
        click.echo(json.dumps(report.to_document(), indent=2, sort_keys=True))
        return
    click.echo(f"replayed {report.evaluated} requests since {report.since:%Y-%m-%d %H:%M} UTC "
               f"under candidate revision {report.candidate_revision}")
    if report.partial:
        click.echo(f"  {report.partial} had no full prompt logged (content rules judged on what was kept)")
    if report.skipped:
        click.echo(f"  {report.skipped} could not be replayed (no recorded policy input)")
    click.echo(f"  unchanged: {report.unchanged}   would change: {report.changed}")
    for transition, count in report.transitions.most_common():
        click.echo(f"\n  {count:>6}  {transition}")
        for change in report.examples[transition]:
            detail = f"  [{change.detail}]" if change.detail else ""
            click.echo(f"          e.g. seq {change.seq} {change.at} {change.principal or '-'} "
                       f"{change.model or '-'} {change.request_id}{detail}")


async def _open_engine(settings: Settings, policy_dir: Path | None):
    """The engine the gateway would use (OPA when GOVGATE_OPA_URL is set), on ``policy_dir``."""
    from gateway.policy import PolicyLoadError, open_policy_engine

    try:
        return await open_policy_engine(settings.with_(policy_dir=policy_dir or settings.policy_dir))
    except PolicyLoadError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main()
