"""``govgate audit checkpoint``, ``govgate audit public-key`` and the checkpoint half of ``audit verify``.

:func:`register` adds the commands to the ``audit`` group; ``audit verify``
takes :func:`checkpoint_options`, reads the files they name with
:func:`load_trust` before anything else and calls :func:`report_checkpoints`
after the hash check. What is checked: :mod:`audit.checkpoint_check`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from govgate.cli_common import audit_engine, load_settings
from govgate.cli_output import output_file


class UnreadableArgument(click.ClickException):
    """A file named on the command line (``--public-key``, ``--checkpoint``) cannot be used: one line naming the
    option, exit status 2 (a usage error), never 1, which ``verify`` keeps for tampering."""

    exit_code = 2

    def __init__(self, option: str, why: object) -> None:
        super().__init__(f"{option}: {why}")


def register(group: click.Group) -> None:
    """Add this module's commands to ``group`` (the ``audit`` group)."""
    group.add_command(audit_checkpoint)
    group.add_command(audit_public_key)
    group.add_command(audit_export_bundle)


def _signing_key():  # -> audit.signing.SigningKey
    """The store's signing key; never made here, so a wrong GOVGATE_VAR_DIR cannot start a second key."""
    from audit.signing import SigningKeyError, load_signing_key

    path = load_settings().effective_audit_signing_key_file
    if not path.exists():
        raise click.ClickException(f"no audit signing key at {path}: a gateway makes it at its first start "
                                   "(or set GOVGATE_AUDIT_SIGNING_KEY_FILE)")
    try:
        return load_signing_key(path)
    except SigningKeyError as exc:
        raise click.ClickException(str(exc)) from None


def _refuse_to_vouch_for_a_rewrite(engine: Any, public_key: Any) -> None:
    """Refuse to sign when a stored checkpoint or closing mark no longer holds (as the gateway's checkpointer
    refuses), when the one this host's gateways last vouched for is gone (:func:`memory_problem`): signing the
    head then would vouch for a chain rewritten or cut below it; or when the entries after the latest
    checkpoint are ones a gateway's start would name in a ``chain_anomaly`` (:func:`unvouched_tail`).

    Until 2026-12-06 only the stored checkpoints were held (probe s59 F1, F2): a chain rewritten above its
    last checkpoint, whose closing mark no longer held, or entries appended while no gateway ran, were
    signed by a scheduled ``audit checkpoint`` and passed ``verify`` after it, with no anomaly recorded.
    """
    from audit import AuditError
    from audit.checkpoints import CheckpointRowError, CheckpointStore

    store = CheckpointStore(engine)
    try:
        for checkpoint, entry_hash in store.with_entry_hashes():
            if entry_hash != checkpoint.head_hash:
                raise click.ClickException(
                    f"refusing to sign: the stored checkpoint of entry {checkpoint.seq} no longer matches the chain "
                    "(rewritten or cut below it); run `govgate audit verify`")
        for mark, entry_hash in store.closing_marks():
            if entry_hash != mark.head_hash:
                raise click.ClickException(
                    f"refusing to sign: the closing mark of entry {mark.seq} (a gateway's stop) no longer matches "
                    "the chain (rewritten or cut below it); run `govgate audit verify`")
        problem = memory_problem(engine, public_key)
        tail = unvouched_tail(store)
    except (AuditError, CheckpointRowError) as exc:
        raise click.ClickException(f"refusing to sign: the stored checkpoints cannot be read: {exc}") from None
    if problem is not None:
        raise click.ClickException(f"refusing to sign: {problem}; a gateway's next start names it in a "
                                   "chain_anomaly entry (run `govgate audit verify`)")
    if tail is not None:
        raise click.ClickException(f"refusing to sign: {tail}")


def unvouched_tail(store: Any) -> str | None:
    """Why the entries after the latest checkpoint must not be signed by a command, or None.

    They are what a starting gateway names in a ``chain_anomaly`` entry
    (:func:`audit.checkpoint_check.anomaly_at_start`): written after a closing checkpoint (no gateway ran), or
    long after the latest checkpoint (none signed for longer than a running one takes); or an entry of
    theirs is dated in the future. Signing them would make them look vouched for, and the anomaly would
    never be recorded. A tail after a closing checkpoint younger than the grace a starting gateway's first
    signature takes (:data:`~audit.checkpoint_check.CLOSING_GRACE_S`) is asked to wait instead.
    """
    from datetime import datetime, timedelta, timezone

    from audit.checkpoint_check import (FUTURE_SKEW_S, anomaly_at_start, closing_tail_judged_at,
                                        default_max_unsigned_age_s, unsigned_tail)

    now = datetime.now(timezone.utc)
    tail = unsigned_tail(store, store.latest())
    if tail is None:
        return None
    span = f"entries {tail.first_seq}..{tail.last_seq}"
    if tail.newest_at > now + timedelta(seconds=FUTURE_SKEW_S):
        return f"{span}, which no checkpoint covers yet, include one dated in the future; run `govgate audit verify`"
    if closing_tail_judged_at(store, now=now) is not None:
        return (f"{span} follow a gateway's closing checkpoint and are only seconds old: a gateway that has "
                "just started signs them within a second; try again in a few seconds")
    body = anomaly_at_start(store, max_unsigned_age_s=default_max_unsigned_age_s(
        load_settings().checkpoint_interval_s))
    if body is None:
        return None
    why = (f"follow the closing checkpoint of entry {body['after_checkpoint']} (a gateway's stop): they were "
           "written while no gateway ran" if body["reason"] == "after_closing" else
           f"were written long after the checkpoint of entry {body['after_checkpoint']} with no gateway signing "
           "them (a gateway killed, or writes while none ran)")
    return (f"{span} {why}. A gateway's next start names them in a chain_anomaly entry and then signs them; "
            "`govgate audit verify` shows them")



def memory_problem(engine: Any, public_key: Any) -> str | None:
    """Why the database no longer holds the checkpoint this host's gateways last vouched for
    (``audit/checkpoint_memory.py``), or None: it does, or there is no usable memory here. Raises
    :class:`audit.AuditError` when the database cannot be read."""
    from audit.checkpoint_check import remembered_problem
    from audit.checkpoints import CheckpointStore

    remembered, _note = _remembered(load_settings(), public_key)
    if remembered is None:
        return None
    problem = remembered_problem(CheckpointStore(engine), remembered)
    return None if problem is None else f"the checkpoint at seq {remembered.seq} that this host's gateways " \
                                        f"vouched for is gone from the database: {problem}"


@click.command("checkpoint")
@click.option("--out", default="-", show_default=True, metavar="FILE",
              help="Where to write the checkpoint file (JSON); '-' is standard output.")
def audit_checkpoint(out: str) -> None:
    """Sign the head of the audit chain now and write the checkpoint, to keep it somewhere else.

    A copy kept off this host catches a log cut off below it, even by
    someone who holds the signing key.
    """
    from audit import AuditError
    from audit.checkpoints import CheckpointStore, checkpoint_file_text

    key = _signing_key()
    engine = audit_engine()
    _refuse_to_vouch_for_a_rewrite(engine, key.public)
    try:
        made = CheckpointStore(engine).make(key)
    except AuditError as exc:
        raise click.ClickException(str(exc)) from None
    if made is None:
        raise click.ClickException("the audit log is empty: nothing to checkpoint")
    checkpoint, new = made
    if out == "-":
        click.echo(checkpoint_file_text(checkpoint, key.public), nl=False)
    else:
        try:
            with output_file(out, private=False, text=True) as handle:
                handle.write(checkpoint_file_text(checkpoint, key.public))
        except OSError as exc:  # the checkpoint is stored; only its file could not be written
            raise click.ClickException(f"cannot write checkpoint file {out}: {exc.strerror or exc} (the checkpoint "
                                       f"of entry {checkpoint.seq} is stored: run the command again with another "
                                       "--out to get its file)") from None
    what = "signed now" if new else "already checkpointed, the stored checkpoint"
    click.echo(f"checkpoint of entry {checkpoint.seq} ({what}){'' if out == '-' else ' written to ' + out}",
               err=True)


@click.command("public-key")
@click.option("--out", default="-", show_default=True, metavar="FILE",
              help="Where to write the PEM public key; '-' is standard output.")
def audit_public_key(out: str) -> None:
    """Write the public key that verifies the audit checkpoints (PEM), for `verify --public-key`."""
    key = _signing_key()
    pem = key.public.pem()
    if out == "-":
        click.echo(pem.decode("ascii"), nl=False)
    else:
        try:
            with output_file(out, private=False) as handle:
                handle.write(pem)
        except OSError as exc:
            raise click.ClickException(f"cannot write {out}: {exc.strerror or exc}") from None
        click.echo(f"public key {key.key_id} written to {out}", err=True)


@click.command("export-bundle")
@click.option("--out", required=True, metavar="FILE", help="The bundle to write (JSON Lines).")
@click.option("--team", default=None, help="Only this team's entries (default: everyone's).")
@click.option("--since", default=None, help="Only entries from then on: 7d, 12h, 30m, 2w, or an ISO date "
                                            "(default: from the first entry).")
def audit_export_bundle(out: str, team: str | None, since: str | None) -> None:
    """Write entries with what proves them: their chain links to a signed checkpoint, for `verify --export`.

    Entries of the range outside the selection show their hashed fields
    (who, when, model, decision) but never their payload (prompt, output).
    """
    from audit import AuditError, AuditStore
    from audit.bundle import Selection, write_bundle
    from gateway.replay import parse_since

    try:
        start = parse_since(since) if since else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    key = _signing_key()
    store = AuditStore(audit_engine())
    _refuse_to_vouch_for_a_rewrite(store.engine, key.public)
    # The bundle holds prompts and outputs: written private (0600), in place only once whole (cli_output.py).
    try:
        with output_file(out, private=True, text=True) as handle:
            summary = write_bundle(store, key, handle, Selection(team=team, since=start))
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror or exc}") from None
    except AuditError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{summary.selected} entries selected of entries {summary.first_seq}..{summary.last_seq}, "
               f"{summary.checkpoints} checkpoints, written to {out}", err=True)


def report_bundle(export_file: str, public_key_file: str | None, checkpoint_file: str | None = None) -> bool:
    """``verify --export``: check a bundle without the database; True when it holds.

    With ``checkpoint_file`` (kept elsewhere) the bundle must also hold what it signs; until 2026-12-05 the
    option was ignored here and the bundle reported ok without it (probe s54 F1).
    """
    from audit import AuditError
    from audit.bundle import verify_bundle
    from audit.checkpoints import read_checkpoint_file
    from audit.signing import SigningKeyError, load_public_key

    if public_key_file is None:
        raise click.UsageError("--export needs --public-key: a bundle cannot vouch for itself")
    try:
        public_key = load_public_key(Path(public_key_file))
    except SigningKeyError as exc:  # the operator's argument: a usage error, as for verify without --export
        raise UnreadableArgument("--public-key", exc) from None
    external = None
    if checkpoint_file is not None:
        try:
            external, _named = read_checkpoint_file(Path(checkpoint_file))
        except (SigningKeyError, AuditError) as exc:
            raise UnreadableArgument("--checkpoint", exc) from None
    try:
        handle = open(export_file, encoding="utf-8", newline="")  # lines as written: a CR is not read away
    except OSError as exc:  # no such file, a folder, no permission: the argument, not the bundle's content
        raise UnreadableArgument("--export", f"cannot read {export_file}: {exc.strerror or exc}") from None
    try:
        with handle:
            header = handle.readline()
            handle.seek(0)
            verdict = verify_bundle(handle, public_key, external)
    except SigningKeyError as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"cannot read {export_file}: {exc}") from None
    try:
        selection = json.loads(header).get("selection")
    except (ValueError, AttributeError, RecursionError):  # RecursionError: nested too deep (verify_bundle says so)
        selection = None
    if verdict.ok:
        click.echo(f"bundle ok: {verdict.selected} selected of {verdict.entries} entries "
                   f"{verdict.first_seq}..{verdict.last_seq}, selection {json.dumps(selection, sort_keys=True)}, "
                   f"complete and linked up to a checkpoint signed {verdict.signed_at} by {public_key.key_id[:16]}…")
        if verdict.external_checked:
            click.echo(f"checkpoint file ok: the bundle's entry {external.seq} is the one it signs")  # type: ignore[union-attr]
        elif verdict.external_checked is False:  # ok so far, but what was asked for could not be checked
            raise UnreadableArgument("--checkpoint", f"it signs entry {external.seq}, outside the bundle's "  # type: ignore[union-attr]
                                     f"entries {verdict.first_seq}..{verdict.last_seq}: it cannot be checked "
                                     "against this bundle (export one that reaches it)")
        return True
    click.echo(f"bundle TAMPERED ({verdict.entries} entries checked before the problem):")
    for problem in verdict.problems:
        click.echo(f"  - {problem}")
    return False


def _finite(_ctx: click.Context, _param: click.Parameter, value: float | None) -> float | None:
    """FloatRange lets NaN and infinity by, and an age compared with either is never too old: no unsigned tail
    would count as tampering (probe s56 C: ``inf`` was taken)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number of seconds, not {value}")
    return value


def checkpoint_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options ``audit verify`` takes for checkpoints."""
    options = [
        click.option("--checkpoint", "checkpoint_file", type=click.Path(dir_okay=False), default=None,
                     help="A checkpoint file kept elsewhere (from `audit checkpoint --out` or "
                          "GOVGATE_CHECKPOINT_COMMAND); the chain must still hold what it signs."),
        click.option("--public-key", "public_key_file", type=click.Path(dir_okay=False), default=None,
                     help="The only key trusted for signatures (PEM from `audit public-key`); "
                          "default: the store's own signing key, with a warning."),
        click.option("--export", "export_file", type=click.Path(dir_okay=False), default=None,
                     help="Check an audit bundle (`audit export-bundle`) instead of the database; needs --public-key."),
        click.option("--strict", is_flag=True, help="Fail if any entry is not covered by a checkpoint yet."),
        click.option("--max-unsigned-age", "max_unsigned_age", type=click.FloatRange(min=0), default=None,
                     callback=_finite,
                     help="Seconds an entry may stay unsigned [default: 2 x GOVGATE_CHECKPOINT_INTERVAL_S + 30]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@dataclass(frozen=True)
class Trust:
    """What ``audit verify`` holds the checkpoints against, read before the chain is walked."""

    public_key: Any
    source: str
    external: Any
    named: str | None


def load_trust(*, checkpoint_file: str | None, public_key_file: str | None) -> Trust:
    """The trusted key and the checkpoint file, read before the walk: a file given on the command line that
    cannot be read is a usage error (exit 2) at once, not an exit 1 (tampering's) after the whole chain was
    walked and "chain intact" printed (h11 #11). The store's own key failing stays an error (exit 1)."""
    from audit import AuditError
    from audit.checkpoints import read_checkpoint_file
    from audit.signing import SigningKeyError, load_public_key, load_signing_key

    if public_key_file is not None:
        try:
            public_key = load_public_key(Path(public_key_file))
        except SigningKeyError as exc:
            raise UnreadableArgument("--public-key", exc) from None
        source = f"the given public key {public_key.key_id[:16]}…"
    else:
        own = load_settings().effective_audit_signing_key_file
        try:
            public_key = load_signing_key(own).public if own.exists() else None
        except SigningKeyError as exc:
            raise click.ClickException(str(exc)) from None
        source = (f"the store's own key {own} (whoever holds it can re-sign a rewritten log; "
                  "pass --public-key with a copy kept elsewhere)") if public_key else \
            (f"no key: GOVGATE_AUDIT_SIGNING_KEY_FILE={own} does not exist; pass --public-key with a copy of "
             "the public key ('govgate audit public-key' where the gateway's key is)")
    external = named = None
    if checkpoint_file is not None:
        try:
            external, named = read_checkpoint_file(Path(checkpoint_file))
        except (SigningKeyError, AuditError) as exc:
            raise UnreadableArgument("--checkpoint", exc) from None
    return Trust(public_key, source, external, named)


def _remembered(settings: Any, public_key: Any) -> tuple[Any, str | None]:
    """The checkpoint this host's gateways last vouched for on the configured database (``audit/checkpoint_memory.py``),
    and a note when there is a memory file that cannot be used; (None, None) when there is none."""
    from audit import AuditError
    from audit.checkpoint_memory import CheckpointMemory, database_name

    folder = settings.effective_checkpoint_memory_dir
    if folder is None or public_key is None:
        return None, None
    memory = CheckpointMemory(folder, database_name(settings.effective_database_url))
    try:
        return memory.load(public_key), None
    except AuditError as exc:
        return None, f"{exc}; not used"


def report_checkpoints(engine: Any, trust: Trust, *, strict: bool, max_unsigned_age: float | None) -> bool:
    """Check the checkpoints against ``trust`` (:func:`load_trust`) and print the result; True when nothing
    points at tampering."""
    from audit import AuditError
    from audit.checkpoint_check import check_checkpoints, default_max_unsigned_age_s
    from audit.checkpoint_check import NO_KEY_PROBLEM
    from audit.checkpoints import CheckpointStore

    settings = load_settings()
    public_key, source, external, named = trust.public_key, trust.source, trust.external, trust.named
    max_age = max_unsigned_age if max_unsigned_age is not None else \
        default_max_unsigned_age_s(settings.checkpoint_interval_s)
    remembered, memory_note = _remembered(settings, public_key)
    try:
        verdict = check_checkpoints(CheckpointStore(engine), public_key, external=external, remembered=remembered,
                                    strict=strict, max_unsigned_age_s=max_age)
    except AuditError as exc:
        raise click.ClickException(str(exc)) from None
    latest = verdict.latest
    where = f"latest at seq {latest.seq}{' (closing)' if latest.closing else ''}" if latest else "none stored"
    file_part = f" and the checkpoint file (seq {external.seq})" if external else ""
    if remembered is not None:
        file_part += f" and this host's checkpoint memory (seq {remembered.seq})"
    if verdict.ok:
        click.echo(f"checkpoints ok: {verdict.checked} stored{file_part}, {where}; signatures checked against {source}")
    elif verdict.only_unsigned_tail:
        # Not "TAMPERED": nothing signed fails; entries nobody signed cannot be vouched for (probe q1 F5).
        click.echo(f"checkpoints UNVERIFIED: {verdict.checked} stored{file_part}, {where}, all hold; "
                   f"signatures checked against {source}")
        for problem in verdict.problems:
            click.echo(f"  - {problem}")
        click.echo("  why: no checkpoint signs these entries. A gateway killed or crashed (or one whose "
                   "checkpointer failed: see its log), or a worker that finished a job after every gateway "
                   "stopped, leaves entries so until the next start signs them and names them in a chain_anomaly "
                   "entry; entries added or rewritten while no gateway "
                   "ran look the same, so this fails until they are signed or explained.")
    elif public_key is None and all(NO_KEY_PROBLEM in problem for problem in verdict.problems):
        # Not "TAMPERED": nothing was found to fail, but nothing can vouch for the checkpoints either (exit 1
        # still: a log whose key was taken away must not pass). The setting named (probe s56).
        click.echo(f"checkpoints UNCHECKED: {verdict.checked} stored{file_part}, {where}; {source}")
        for problem in verdict.problems:
            click.echo(f"  - {problem}")
    else:
        click.echo(f"checkpoints TAMPERED: {verdict.checked} stored{file_part}, {where}; "
                   f"signatures checked against {source}")
        for problem in verdict.problems:
            click.echo(f"  - {problem}")
    if named is not None and public_key is not None and named != public_key.hex:
        click.echo("  note: the checkpoint file names another public key than the trusted one")
    if memory_note is not None:
        click.echo(f"  note: {memory_note}")
    for note in verdict.notes:
        click.echo(f"  note: {note}")
    for anomaly in verdict.anomalies:
        click.echo(f"  chain_anomaly: {anomaly}")
    return verdict.ok
