"""``govgate audit``: read and verify the audit log."""

from __future__ import annotations

import json
import os
import sys

import click

from govgate.cli_audit_checkpoints import (checkpoint_options, load_trust, register, report_bundle,
                                          report_checkpoints)
from govgate.cli_common import audit_engine
from govgate.own_entries import sign_own_entry_while_down


@click.group()
def audit() -> None:
    """Read and verify the audit log."""


@audit.command("tail")
@click.option("-n", "count", type=click.IntRange(min=0, max=10**9), default=20, show_default=True,
              help="How many of the newest entries.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit_tail(count: int, as_json: bool) -> None:
    """Show the newest audit entries."""
    from audit import AuditError, AuditStore

    try:
        entries = AuditStore(audit_engine()).tail(count)
    except AuditError as exc:  # a row that no longer decodes (edited) or a store that cannot be read
        raise click.ClickException(f"{exc} (run `govgate audit verify`)") from None
    for entry in entries:
        if as_json:
            click.echo(json.dumps(entry.to_document(), sort_keys=True, default=str))
        else:
            try:
                summary = _summary(entry)
            except (AttributeError, TypeError):  # a body of another shape than the kind's (edited)
                summary = "(body not of this kind's shape)"
            click.echo(f"{entry.seq:>6} {entry.created_at} {entry.kind:<10} {entry.request_id} "
                       f"{entry.principal or '-'} {entry.model or '-'} {summary}")


def _summary(entry) -> str:
    body = entry.body
    if not isinstance(body, dict):  # stored as other JSON than an object: edited
        return "(body is not a JSON object)"
    if entry.kind == "request":
        decision = body.get("decision", {})
        if decision.get("unavailable"):  # no decision could be had: refused with 503, not denied
            return "unavailable"
        verdict = "allow" if decision.get("allow") else "deny " + ",".join(r.get("code", "?") for r in decision.get("reasons", []))
        return verdict
    if entry.kind == "completion":
        usage = body.get("usage", {})
        return f"{body.get('finish_reason')} {usage.get('prompt_tokens')}+{usage.get('completion_tokens')} tokens"
    if entry.kind == "delivered":  # what a stream's client received, completing its terminal entry
        return f"received, completing #{body.get('terminal_seq', '?')} ({body.get('ended_as', '?')})"
    return body.get("error", {}).get("code", "")


@audit.command("verify")
@checkpoint_options
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None,
              help="Processes recomputing the chain at once [default: the machine's cores].")
def audit_verify(export_file: str | None, jobs: int | None, **checkpoint_args: object) -> None:
    """Recompute the hash chain and hold it against the signed checkpoints; exit 1 on any sign of tampering.

    With --export, check an audit bundle alone instead (no database).
    """
    from audit import verify_chain
    from govgate.cli_keys import report_key_table

    if export_file is not None:
        # A bundle is checked in one pass and always ends at a checkpoint of its last entry (no unsigned tail:
        # --strict holds by construction); options that would change nothing are refused, not ignored.
        unused = [name for name, given in (("--jobs", jobs is not None),
                                           ("--max-unsigned-age", checkpoint_args["max_unsigned_age"] is not None))
                  if given]
        if unused:
            raise click.UsageError(f"{' and '.join(unused)} cannot be used with --export: a bundle is checked in "
                                   "one pass and ends at a checkpoint of its last entry (no unsigned tail)")
        if not report_bundle(export_file, checkpoint_args["public_key_file"],  # type: ignore[arg-type]
                             checkpoint_args["checkpoint_file"]):  # type: ignore[arg-type]
            sys.exit(1)
        return
    from audit import AuditError
    from gateway.auth import KeyStoreError

    strict, max_unsigned_age = checkpoint_args.pop("strict"), checkpoint_args.pop("max_unsigned_age")
    trust = load_trust(**checkpoint_args)  # type: ignore[arg-type]  # a bad --public-key: before the walk
    engine = audit_engine()
    try:
        result = verify_chain(engine, workers=jobs or os.cpu_count() or 1)
    except AuditError as exc:
        raise click.ClickException(f"cannot verify: {exc}") from None
    if result.ok:
        click.echo(f"ok: {result.checked} entries, chain intact")
    else:
        click.echo(f"BROKEN at seq {result.first_bad_seq}: {result.problem} ({result.checked} entries checked)")
    try:
        keys_ok = report_key_table(engine)  # the key table held to the chain's key entries
    except (AuditError, KeyStoreError) as exc:  # an undecodable key entry or row: a verdict, not a crash
        click.echo(f"KEY TAMPERED: the key entries or the key table cannot be read: {exc}")
        keys_ok = False
    erasures_ok = _report_erasures(engine)
    checkpoints_ok = report_checkpoints(engine, trust, strict=strict,  # type: ignore[arg-type]
                                        max_unsigned_age=max_unsigned_age)  # type: ignore[arg-type]
    if not (result.ok and keys_ok and erasures_ok and checkpoints_ok):
        sys.exit(1)


def _report_erasures(engine) -> bool:
    """Every erased payload covered by a ``payloads_erased`` entry (``audit.prune.unrecorded_erasures``)."""
    from audit import AuditError, AuditStore
    from audit.prune import unrecorded_erasures

    try:
        found = unrecorded_erasures(AuditStore(engine))
    except AuditError as exc:
        click.echo(f"ERASURES UNCHECKED: {exc}")
        return False
    if found.count:
        shown = ", ".join(str(seq) for seq in found.seqs) + (", …" if found.count > len(found.seqs) else "")
        click.echo(f"PAYLOADS ERASED UNRECORDED: {found.count} entries lost their prompt or output with no "
                   f"payloads_erased entry naming them (seq {shown}): erased outside `govgate audit prune` (or by "
                   "a prune that failed midway, whose next run records them)")
        return False
    click.echo(f"erasures: every erased payload is recorded ({found.records} payloads_erased entries)")
    return True


@audit.command("prune")
@click.option("--before", "before", required=True, metavar="DATE",
              help="Erase the payloads of entries created before this ISO date or time (UTC unless it says).")
@click.option("--batch", type=click.IntRange(min=1, max=1_000_000), default=500, show_default=True,
              help="Entries erased per transaction.")
def audit_prune(before: str, batch: int) -> None:
    """Erase prompts and outputs older than DATE; digests, metadata and the chain stay, and verify passes."""
    from datetime import datetime, timezone

    from audit import AuditError, AuditStore
    from audit.prune import prune_payloads

    try:
        moment = datetime.fromisoformat(before)
    except ValueError:
        raise click.BadParameter(f"cannot read {before!r} as an ISO date or time", param_hint="--before") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    if moment > datetime.now(timezone.utc):  # a typo (9999-12-31, a month for a day) erased every text, at once
        raise click.BadParameter(f"{before!r} is in the future: prune erases what was kept before it, and the "
                                 "payloads of requests still running are kept now", param_hint="--before")
    engine = audit_engine()
    try:
        result = prune_payloads(AuditStore(engine), moment, batch=batch)
    except AuditError as exc:
        click.echo(f"prune failed: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:  # between batches: those erased are not recorded yet, and verify says so
        click.echo(f"\ninterrupted (SIGINT): the payloads erased so far are not recorded yet ('audit verify' "
                   f"fails until they are); run 'govgate audit prune --before {before}' again to record them",
                   err=True)
        sys.exit(130)
    when = moment.isoformat()
    if result.entry is None:
        click.echo(f"no payload to erase before {when}")
    else:
        click.echo(f"erased the payloads of {result.erased} entries (seq {result.first_seq}..{result.last_seq}) "
                   f"created before {when}; recorded as entry {result.entry.seq} (payloads_erased)")
        # run while no gateway runs, the record is signed here, as other commands' own entries are (probe s59 F4)
        sign_own_entry_while_down(engine, result.entry.seq, result.entry.hash)
    if result.skipped_format_1:
        click.echo(f"{result.skipped_format_1} entries before {when} are of chain format 1 (written before the "
                   "upgrade): any text they hold is inside their hashed body and cannot be erased without "
                   "breaking the chain; they were left as they are")
    if result.warning:
        click.echo(f"warning: {result.warning}", err=True)


register(audit)
