"""A command's own audit entry, appended while no gateway runs, signed by the command itself.

An operator's commands append to the chain too: ``govgate audit export
--include-text`` its ``payload_read``, ``govgate keys create``/``revoke``/
``roles`` their key entries. Run while the stack is down, that entry came
after the last gateway's closing checkpoint, signed by nobody, and the next
start recorded a ``chain_anomaly`` for the operator's own, legitimate act
(probe q1). So the command signs its entry itself, as a closing checkpoint
(:meth:`audit.checkpoints.CheckpointStore.close_over_own`: only when that
entry directly follows a closing checkpoint that still holds, so nothing
anyone else wrote is vouched for), and pipes it to
``GOVGATE_CHECKPOINT_COMMAND`` as a stopping gateway would. With a gateway
running (the latest checkpoint not a closing one) its checkpointer signs as
usual and this does nothing; nor does it sign while the checkpoint this
host's gateways last vouched for is gone from the database
(``audit/checkpoint_memory.py``): the closing checkpoint it would follow is
then one the log was cut back to.
"""

from __future__ import annotations

import subprocess
from typing import Any

import click


def sign_own_entry_while_down(engine: Any, seq: int, entry_hash: str) -> None:
    """Sign the caller's just-appended entry ``seq`` (its hash ``entry_hash``) if no gateway runs; never raises
    for the signing (the command's own work is done): without the key it says so and leaves the entry for the
    next start to name."""
    from audit import AuditError
    from audit.checkpoints import CheckpointStore, checkpoint_file_text
    from audit.signing import SigningKeyError, load_signing_key
    from govgate.cli_audit_checkpoints import memory_problem
    from govgate.cli_common import load_settings

    settings = load_settings()
    checkpoints = CheckpointStore(engine)
    try:
        latest = checkpoints.latest()
        if latest is None or not latest.closing or latest.seq != seq - 1:
            return  # a gateway runs (or none ever signed, or others wrote since): nothing of this command's to sign
        key = load_signing_key(settings.effective_audit_signing_key_file)
        gone = memory_problem(engine, key.public)
        if gone is not None:  # the closing checkpoint it would follow is not the newest this host vouched for
            click.echo(f"note: this command's audit entry (seq {seq}) is left for a gateway to sign: {gone}",
                       err=True)
            return
        signed = checkpoints.close_over_own(key, seq, entry_hash)
    except (SigningKeyError, AuditError) as exc:
        click.echo(f"note: this command's audit entry (seq {seq}) is left for a gateway to sign: {exc}", err=True)
        return
    if signed is None or not settings.checkpoint_command:
        return
    try:
        done = subprocess.run(["sh", "-c", settings.checkpoint_command], start_new_session=True, timeout=30,
                              input=checkpoint_file_text(signed, key.public).encode("utf-8"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except (OSError, subprocess.TimeoutExpired) as exc:
        click.echo(f"warning: GOVGATE_CHECKPOINT_COMMAND failed for checkpoint {signed.seq}: {exc}", err=True)
        return
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip()[-300:]
        click.echo(f"warning: GOVGATE_CHECKPOINT_COMMAND exited {done.returncode} for checkpoint {signed.seq}: "
                   f"{tail}", err=True)


def sign_key_entry_while_down(engine: Any, key_id: str) -> None:
    """After a key change this command made: sign the key's newest entry (that change's) if no gateway runs.

    :meth:`~audit.checkpoints.CheckpointStore.close_over_own` signs it only
    when it is the one entry after a closing checkpoint, so an older entry
    of the key is never signed again, nor one with another's after it.
    """
    from audit import AuditError, AuditStore
    from audit.key_ledger import key_request_id

    try:
        entries = AuditStore(engine).entries_for(key_request_id(key_id))
    except AuditError as exc:
        click.echo(f"note: this command's audit entry is left for a gateway to sign: {exc}", err=True)
        return
    if entries:
        sign_own_entry_while_down(engine, entries[-1].seq, entries[-1].hash)
