"""The ``govgate`` command: a thin shell over the same functions the app uses.

The process commands (``up``, ``serve``, ``worker``) are here; the groups
``keys``, ``audit`` and ``policy`` are in ``cli_keys``, ``cli_audit`` and
``cli_policy``, added to :func:`main` below.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import click

from gateway.settings import Settings, without_password
from govgate.cli_audit import audit
import govgate.cli_audit_export  # noqa: F401  (adds "audit export" to the audit group)
from govgate.cli_common import load_settings, one_line
from govgate.cli_keys import keys
from govgate.cli_policy import policy

if TYPE_CHECKING:
    from workers.contract.registry import Registry

#: When the command began (``govgate up`` prints its time to ready from here).
_STARTED = time.monotonic()


def _configure_logging(settings: Settings) -> None:
    from gateway.observability.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)


#: The commands that print results: a standard output that cannot take them is an error (govgate/cli_stdout.py).
_GUARDED = ("keys", "audit", "policy")


#: Options that print and exit before any command runs: guarded wherever they appear (probe s54 F4: ``govgate
#: --help > /dev/full`` ended in a traceback, as the commands did before h11 #4).
_PRINTING_OPTIONS = frozenset({"-h", "--help", "--version"})


#: A command stopped by Ctrl-C (SIGINT) exits 128 + 2, as a shell reports it: Click's "Aborted!" exit 1 is
#: ``audit verify``'s answer for tampering, and a script could not tell the two apart (probe s56).
EXIT_INTERRUPTED = 130


class _Group(click.Group):
    """The ``govgate`` group: standard output guarded for ``--help`` and ``--version`` too (govgate/cli_stdout.py);
    a command Ctrl-C stops exits :data:`EXIT_INTERRUPTED`."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\ninterrupted (SIGINT): stopped", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if _PRINTING_OPTIONS.intersection(args):
            from govgate.cli_stdout import guard_stdout

            guard_stdout()
        return super().parse_args(ctx, args)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="govgate", prog_name="govgate")
@click.pass_context
def main(ctx: click.Context) -> None:
    """govgate: a usage-governance gateway for open LLMs.

    Configuration comes from GOVGATE_* environment variables (see README).
    """
    if ctx.invoked_subcommand in _GUARDED:
        from govgate.cli_stdout import guard_stdout

        guard_stdout()


main.add_command(keys)
main.add_command(audit)
main.add_command(policy)


@main.command()
def up() -> None:
    """Run the embedded default: Redis, one worker per model, and the API."""
    from govgate.supervisor import run_up

    sys.exit(run_up(load_settings(), started=_STARTED))


@main.command()
def serve() -> None:
    """Run only the API server (production: next to external Redis and workers)."""
    from gateway.serving import serve as serve_gateway

    settings = load_settings()
    _check_serve_settings(settings)
    _configure_logging(settings)
    serve_gateway(settings)  # uvicorn; a stop drains the requests in flight first (gateway/serving.py)


def _check_serve_settings(settings: Settings) -> None:
    """Refuse in one line what would otherwise fail in the app's startup with a traceback."""
    from govgate.redis_server import ping
    from govgate.stack import StartupError
    from govgate.supervisor import check_port
    from workers.contract.registry import RegistryError, load_registry

    if not settings.redis_url:
        raise click.ClickException("GOVGATE_REDIS_URL is not set: 'govgate serve' needs a Redis "
                                   "(or run 'govgate up', which starts one)")
    _check_redis_url(settings.redis_url)
    if not ping(settings.redis_url):
        raise click.ClickException(f"GOVGATE_REDIS_URL={without_password(settings.redis_url)} does not answer")
    if not settings.opa_url and not settings.policy_dir.is_dir():
        raise click.ClickException(f"GOVGATE_POLICY_DIR={settings.policy_dir} is not a folder")
    try:
        registry = load_registry(settings.models_file, settings.var_dir)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    _check_policy(settings, registry)
    try:
        check_port(settings.host, settings.port)
    except StartupError as exc:
        raise click.ClickException(str(exc)) from None
    _check_database(settings)
    from gateway.components import open_keys

    try:
        open_keys(settings)  # made here if missing, as the app's startup would
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


def _check_redis_url(url: str) -> None:
    """Refuse in one line a Redis URL redis-py cannot read (``govgate up``'s check, as a click error)."""
    from govgate.stack import StartupError
    from govgate.supervisor import check_redis_url

    try:
        check_redis_url(url)
    except StartupError as exc:
        raise click.ClickException(str(exc)) from None


def _check_database(settings: Settings) -> None:
    """Connect once (the app's startup migrates; doing it here too would slow every start)."""
    from sqlalchemy.exc import SQLAlchemyError

    from audit import AuditError, make_engine
    from audit.db import reason

    try:
        engine = make_engine(settings.effective_database_url, busy_timeout_s=settings.database_busy_timeout_s)
        try:
            engine.connect().close()
        finally:
            engine.dispose()
    except (AuditError, SQLAlchemyError) as exc:
        # One line: under ``up`` the API's last log line is the reason quoted (it was SQLAlchemy's "Background on
        # this error" link); the driver's own message (libpq's runs on over lines) without SQLAlchemy's additions.
        raise click.ClickException(f"GOVGATE_DATABASE_URL={without_password(settings.effective_database_url)} "
                                   f"cannot be used: {one_line(reason(exc))}") from None


def _check_policy(settings: Settings, registry: Registry) -> None:
    """Load the policy once as the app's startup will (its ``GOVGATE_POLICY_EVALUATORS`` evaluators, started
    side by side; on OPA, prove it holds the folder's revision), so a folder that does not compile, or an OPA
    that is down or holds another policy, is one line naming the setting, not uvicorn's 60-line
    ``ExceptionGroup`` (h9 F6, h10 F8). About 0.15 s.

    Then run the reload's trial on it (``gateway/requests/policy_trial.py``, about 0.07 s on the shipped
    policy): a folder whose rules conflict only on real requests started without a word and answered
    ``policy_error`` to every request of a team, while the same folder was refused on a reload; a
    restart-based deploy skipped the trial entirely (probe p3 F6). Such a folder is now refused here too.
    The trial asks as many decisions at once as there are evaluators: with one, a slow policy's trial
    (8.6 s for 400 blocked patterns) ate into the 60 s ``govgate up`` gives the API to start (q3 note)."""
    import asyncio
    import logging

    from gateway.policy import open_policy_engine
    from gateway.policy.engine import PolicyLoadError
    from gateway.policy.opa import shown_opa_url
    from gateway.requests.policy_trial import policy_trial

    async def load_try_and_close() -> str | None:
        engine = await open_policy_engine(settings)
        # Each failing decision's warning (the engines' loggers): the one line below names the first. Only those:
        # the trial's own warnings (roles never asked under its caps, decisions that got no answer) are for the
        # operator starting the gateway as much as for one reloading it.
        engines_log = logging.getLogger("govgate.policy")
        level = engines_log.level
        engines_log.setLevel(logging.ERROR)
        try:
            return await policy_trial(registry)(engine)
        finally:
            engines_log.setLevel(level)
            await engine.aclose()

    where = (f"GOVGATE_OPA_URL={shown_opa_url(settings.opa_url)} (GOVGATE_POLICY_DIR={settings.policy_dir})"
             if settings.opa_url else f"GOVGATE_POLICY_DIR={settings.policy_dir}")
    try:
        refusal = asyncio.run(load_try_and_close())
    except PolicyLoadError as exc:
        raise click.ClickException(f"{where}: {one_line(str(exc))}") from None
    if refusal is not None:
        raise click.ClickException(f"{where}: the policy fails its trial: {one_line(refusal)}")


@main.command()
@click.option("--model", "model_name", required=True, help="Registry name of the model this worker serves.")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Jobs at once: pool processes with --pool prefork, each loading the model (solo: 1).")
@click.option("--pool", "pool", type=click.Choice(["prefork", "solo"]), default=None,
              help="Celery's pool (default: GOVGATE_WORKER_POOL, else solo); solo runs one job at a time.")
def worker(model_name: str, concurrency: int, pool: str | None) -> None:
    """Run a Celery worker serving one model's queue."""
    from workers.contract.registry import RegistryError, load_registry
    from workers.runtime import WorkerConfig, check_pool, run_worker
    from workers.contract.sealing import KeyFileError
    from workers.backends import BackendError, ensure_model_file

    settings = load_settings()
    if not settings.redis_url:
        raise click.ClickException("GOVGATE_REDIS_URL must be set for a standalone worker")
    _check_redis_url(settings.redis_url)
    _configure_logging(settings)
    try:
        registry = load_registry(settings.models_file, settings.var_dir)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    spec = registry.get(model_name)
    if spec is None:
        shown = repr(model_name) if len(model_name) <= 64 else f"{model_name[:64]!r}… ({len(model_name)} characters)"
        raise click.ClickException(f"no model {shown} in the registry (have: {', '.join(registry.names())})")
    try:
        ensure_model_file(spec)
    except BackendError as exc:
        raise click.ClickException(str(exc)) from None
    if not spec.path.exists():
        raise click.ClickException(f"model file {spec.path} does not exist")
    config = WorkerConfig(model=spec, redis_url=settings.redis_url, database_url=settings.effective_database_url,
                          database_busy_timeout_s=settings.database_busy_timeout_s,
                          concurrency=concurrency, pool=pool or settings.worker_pool, loglevel=settings.log_level,
                          handover_on_take=settings.handover_on_take, fair_give_way=settings.fair_give_way,
                          time_limit_s=settings.generation_time_limit_s,
                          start_timeout_s=settings.worker_start_timeout_s,
                          redelivery_margin_s=settings.redelivery_margin_s,
                          payload_key_file=settings.effective_payload_key_file,
                          digest_key_file=settings.effective_digest_key_file,
                          terminal_retry_horizon_s=settings.terminal_retry_horizon_s,
                          terminal_retry_interval_s=settings.terminal_retry_interval_s,
                          output_verdict_timeout_s=settings.output_verdict_timeout_s,
                          stream_flush_interval_s=settings.stream_flush_interval_ms / 1000,
                          banner=settings.log_format != "json")
    try:
        check_pool(config)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        run_worker(config)
    except KeyFileError as exc:
        raise click.ClickException(f"{exc}: replace it, or remove it to have a new key made") from None


if __name__ == "__main__":
    main()
