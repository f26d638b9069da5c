"""What the chain alone cannot see, the signed checkpoints must: tampering with a real store, SQLite and PostgreSQL.

The attacker has the database (and switches its guard triggers off) but not
the signing key, except where a test says otherwise. Each case also shows the
hash check alone passing, so the checkpoint check is what catches it.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest

from audit import AuditError, AuditStore, make_engine, verify_chain
from audit.checkpoint_check import CLOSING_GRACE_S, CheckpointVerdict, anomaly_at_start, check_checkpoints
from audit.checkpoints import CheckpointStore, read_checkpoint_file, sign_checkpoint, write_checkpoint_file
from audit.signing import SigningKey
from gateway.checkpointer import Checkpointer
from tests.audit.conftest import RawDB

MAX_AGE = 50.0


class Trail:
    """A migrated store (either backend), its signing key and raw access for the attacker."""

    def __init__(self, raw: RawDB) -> None:
        self.raw = raw
        self.backend = raw.backend
        self.engine = make_engine(raw.url)
        self.audit = AuditStore(self.engine)
        self.checkpoints = CheckpointStore(self.engine)
        self.key = SigningKey.generate()

    def append(self, n: int, tag: str = "r") -> None:
        for i in range(n):
            self.audit.append("request", f"{tag}-{i}", principal="alice", team="blue", model="tiny",
                              body={"decision": {"allow": True}, "i": i}, policy_revision="rev")

    def checkpoint(self, *, closing: bool = False) -> int:
        made = self.checkpoints.make(self.key, closing=closing)
        assert made is not None and made[1]
        return made[0].seq

    def check(self, *, key: SigningKey | None = None, now: datetime | None = None, **kwargs: object) -> CheckpointVerdict:
        return check_checkpoints(self.checkpoints, (key or self.key).public, max_unsigned_age_s=MAX_AGE,
                                 now=now, **kwargs)

    def sql(self, *statements: str) -> None:
        """Run SQL as an attacker with database access: the guard triggers out of the way first."""
        self.engine.dispose()
        self.raw.without_guards(*statements)

    def head_seq(self) -> int:
        head = self.audit.head()
        assert head is not None
        return head.seq


@pytest.fixture
def trail(raw: RawDB) -> Iterator[Trail]:
    t = Trail(raw)
    yield t
    t.engine.dispose()


def _later(seconds: float) -> datetime:
    return datetime.now(timezone.utc) + timedelta(seconds=seconds)


def _problems(verdict: CheckpointVerdict) -> str:
    assert not verdict.ok, "tampering was not detected"
    return "\n".join(verdict.problems)


# -- the sound case ---------------------------------------------------------------


def test_a_sound_trail_passes_with_its_checkpoints_and_a_file(trail: Trail, tmp_path: Path) -> None:
    trail.append(5)
    trail.checkpoint()
    trail.append(3)
    seq = trail.checkpoint()
    write_checkpoint_file(tmp_path / "cp.json", trail.checkpoints.get(seq), trail.key.public)
    external, _ = read_checkpoint_file(tmp_path / "cp.json")
    verdict = trail.check(external=external, strict=True)
    assert verdict.ok, verdict.problems
    assert verdict.checked == 2 and verdict.tail is None and verdict.latest.seq == trail.head_seq()


def test_a_second_checkpoint_of_the_same_head_is_a_no_op(trail: Trail) -> None:
    trail.append(2)
    first = trail.checkpoints.make(trail.key)
    second = trail.checkpoints.make(SigningKey.generate())  # another replica, same head
    assert first[1] and not second[1]
    assert second[0] == first[0] == trail.checkpoints.latest()
    # a replica's stop over that head: its closing checkpoint is kept as the head's closing mark, once
    closing = trail.checkpoints.make(trail.key, closing=True)
    again = trail.checkpoints.make(SigningKey.generate(), closing=True)
    assert closing[1] and closing[0].closing and not again[1] and again[0] == closing[0]
    assert trail.checkpoints.latest() == closing[0] and trail.checkpoints.get(first[0].seq) == first[0]


# -- truncation ------------------------------------------------------------------------


def test_a_truncated_tail_is_detected_against_an_exported_checkpoint_file(trail: Trail, tmp_path: Path) -> None:
    trail.append(10)
    seq = trail.checkpoint()
    write_checkpoint_file(tmp_path / "kept-elsewhere.json", trail.checkpoints.get(seq), trail.key.public)
    # Cut the last three entries and every stored checkpoint that would tell.
    trail.sql(f"DELETE FROM audit_entries WHERE seq > {seq - 3}", "DELETE FROM audit_checkpoints")
    assert verify_chain(trail.engine).ok  # the chain alone still verifies
    assert trail.check(now=_later(1)).ok  # and so does what is left in the database, unsigned but young
    external, _ = read_checkpoint_file(tmp_path / "kept-elsewhere.json")
    problems = _problems(trail.check(external=external))
    assert f"the chain has no entry {seq}" in problems and "checkpoint file" in problems


def test_truncation_below_a_stored_checkpoint_is_detected(trail: Trail) -> None:
    trail.append(6)
    seq = trail.checkpoint()
    trail.sql(f"DELETE FROM audit_entries WHERE seq > {seq - 2}")
    assert verify_chain(trail.engine).ok
    assert f"no entry {seq}" in _problems(trail.check())


def test_truncation_and_removed_checkpoints_fail_strict_and_age(trail: Trail) -> None:
    trail.append(6)
    trail.checkpoint()
    trail.sql("DELETE FROM audit_entries WHERE seq > 4", "DELETE FROM audit_checkpoints")
    assert "--strict" in _problems(trail.check(strict=True))
    assert "longer than" in _problems(trail.check(now=_later(MAX_AGE + 5)))


# -- a forged entry at the tail ----------------------------------------------------------


def _forge_at_tail(trail: Trail) -> int:
    """Append an entry with a correct hash, as anyone with the file and the code can."""
    trail.engine.dispose()
    trail.audit.append("completion", "r-0", principal="alice", team="blue", model="tiny",
                       body={"output": "forged"}, policy_revision="rev")
    return trail.head_seq()


def test_a_forged_tail_entry_after_a_closing_checkpoint_is_detected(trail: Trail) -> None:
    trail.append(4)
    closing = trail.checkpoint(closing=True)
    forged = _forge_at_tail(trail)
    assert verify_chain(trail.engine).ok
    problems = _problems(trail.check(now=_later(30)))
    assert f"entries {closing + 1}..{forged}" in problems and "closing checkpoint" in problems


def test_a_forged_tail_entry_fails_strict_and_when_old(trail: Trail) -> None:
    trail.append(4)
    trail.checkpoint()
    _forge_at_tail(trail)
    verdict = trail.check()
    assert verdict.ok and verdict.tail is not None and "unsigned tail" in verdict.notes[0]  # reported always
    assert "--strict" in _problems(trail.check(strict=True))
    assert "unsigned for" in _problems(trail.check(now=_later(MAX_AGE + 10)))


def test_a_forged_tail_entry_dated_in_the_future_is_detected(trail: Trail) -> None:
    trail.append(3)
    trail.checkpoint()
    trail.append(1, tag="late")
    seq = trail.head_seq()
    trail.sql(f"UPDATE audit_entries SET created_at = '2099-01-01 00:00:00.000000' WHERE seq = {seq}")
    assert "dated in the future" in _problems(trail.check())


@pytest.mark.anyio
async def test_a_forged_tail_entry_is_named_by_the_next_gateway_start(trail: Trail) -> None:
    trail.append(4)
    closing = trail.checkpoint(closing=True)
    forged = _forge_at_tail(trail)
    # Started a while after the forgery (a running replica would have signed it by then).
    checkpointer = Checkpointer(trail.checkpoints, trail.audit, trail.key, every_entries=1000, interval_s=10,
                                clock=lambda: _later(CLOSING_GRACE_S + 1))
    await checkpointer.start()
    anomaly = trail.audit.tail(1)[0]
    assert anomaly.kind == "chain_anomaly"
    assert anomaly.body["first_seq"] == closing + 1 and anomaly.body["last_seq"] == forged
    assert anomaly.body["reason"] == "after_closing"
    signed = await checkpointer.tick()  # the first tick after a closing checkpoint signs at once
    assert signed is not None and signed.seq == anomaly.seq
    await checkpointer.aclose()
    verdict = trail.check(now=_later(30))
    assert verdict.ok  # signed now, but the verdict names what happened
    assert any(f"entries {closing + 1}..{forged}" in line for line in verdict.anomalies)
    # A replica starting as well finds the range already named and adds nothing.
    assert anomaly_at_start(trail.checkpoints, max_unsigned_age_s=MAX_AGE) is None


class _Clock:
    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def _starting_replica(trail: Trail, clock: _Clock) -> Checkpointer:
    # A long poll: the test drives the start check itself, through the loop's own call.
    return Checkpointer(trail.checkpoints, trail.audit, trail.key, every_entries=1000, interval_s=3600,
                        poll_s=3600, clock=clock)


@pytest.mark.anyio
async def test_a_replica_starting_as_another_stops_names_nothing_a_running_replica_then_signs(trail: Trail) -> None:
    """Rolling restart: one replica stopped (closing checkpoint), another still runs and has just appended; a
    third starts before the running one's next look signs. It used to name those entries a chain_anomaly."""
    trail.append(3)
    trail.checkpoint(closing=True)
    trail.append(2, tag="running-replica")  # the running replica's, not yet signed
    clock = _Clock()
    starting = _starting_replica(trail, clock)
    await starting.start()
    assert not starting._start_checked  # not judged yet (and so signing nothing): nothing appended
    assert trail.audit.tail(1)[0].kind == "request"
    trail.append(1, tag="own")  # the starting replica serves meanwhile
    trail.checkpoint()  # the running replica's next look signs the head
    clock.now += timedelta(seconds=CLOSING_GRACE_S + 1)
    await starting._start_check()  # the loop's next look
    assert starting._start_checked
    assert trail.audit.tail(1)[0].kind == "request"  # no chain_anomaly
    await starting.aclose()
    assert trail.check(now=_later(30)).ok


@pytest.mark.anyio
async def test_a_young_tail_nobody_signs_is_named_once_old_without_the_starting_gateways_own_entries(
        trail: Trail) -> None:
    trail.append(3)
    closing = trail.checkpoint(closing=True)
    forged = _forge_at_tail(trail)  # just now: young
    clock = _Clock()
    starting = _starting_replica(trail, clock)
    await starting.start()
    assert not starting._start_checked and trail.head_seq() == forged
    trail.append(2, tag="own")  # what the starting gateway serves while it waits: its own, not an anomaly
    await starting._start_check()  # still young
    assert not starting._start_checked and trail.audit.tail(1)[0].kind == "request"
    clock.now += timedelta(seconds=CLOSING_GRACE_S + 1)
    await starting._start_check()
    assert starting._start_checked
    anomaly = trail.audit.tail(1)[0]
    assert anomaly.kind == "chain_anomaly" and anomaly.body["reason"] == "after_closing"
    assert (anomaly.body["first_seq"], anomaly.body["last_seq"]) == (closing + 1, forged)
    signed = await starting.tick()  # judged: it signs now, its own entries with the rest
    assert signed is not None and signed.seq == anomaly.seq
    await starting.aclose()


@pytest.mark.anyio
async def test_a_tail_dated_ahead_holds_the_start_check_back_no_longer_than_the_grace(trail: Trail) -> None:
    trail.append(3)
    closing = trail.checkpoint(closing=True)
    trail.append(1, tag="fast-clock")
    forged = trail.head_seq()
    trail.sql(f"UPDATE audit_entries SET created_at = '2099-01-01 00:00:00.000000' WHERE seq = {forged}")
    clock = _Clock()
    starting = _starting_replica(trail, clock)
    await starting.start()
    assert not starting._start_checked
    clock.now += timedelta(seconds=CLOSING_GRACE_S + 1)  # not 2099: the wait ends the grace after the first look
    await starting._start_check()
    assert starting._start_checked
    anomaly = trail.audit.tail(1)[0]
    assert anomaly.kind == "chain_anomaly" and (anomaly.body["first_seq"], anomaly.body["last_seq"]) == (closing + 1,
                                                                                                      forged)
    await starting.aclose()


@pytest.mark.anyio
async def test_a_gateway_stopping_before_a_young_tail_is_judged_judges_it_and_closes(trail: Trail) -> None:
    trail.append(3)
    closing = trail.checkpoint(closing=True)
    forged = _forge_at_tail(trail)
    starting = _starting_replica(trail, _Clock())
    await starting.start()
    assert not starting._start_checked
    await starting.aclose()
    latest = trail.checkpoints.latest()
    anomaly = trail.audit.get(latest.seq)
    assert anomaly.kind == "chain_anomaly" and anomaly.body["first_seq"] == closing + 1
    assert anomaly.body["last_seq"] == forged
    assert latest.closing and latest.seq == anomaly.seq  # the stop still closed the chain


@pytest.mark.anyio
async def test_entries_left_unsigned_too_long_are_named_at_start(trail: Trail) -> None:
    trail.append(3)
    trail.checkpoint()
    trail.append(2, tag="late")
    # The last checkpoint is an hour older than these entries: no gateway was signing meanwhile.
    trail.sql("UPDATE audit_checkpoints SET created_at = '2000-01-01 00:00:00.000000'")
    body = anomaly_at_start(trail.checkpoints, max_unsigned_age_s=MAX_AGE)
    assert body is not None and body["reason"] == "unsigned_too_long"
    assert (body["first_seq"], body["last_seq"]) == (trail.head_seq() - 1, trail.head_seq())


@pytest.mark.anyio
async def test_a_clean_restart_records_no_anomaly(trail: Trail) -> None:
    trail.append(3)
    trail.checkpoint(closing=True)
    assert anomaly_at_start(trail.checkpoints, max_unsigned_age_s=MAX_AGE) is None


# -- the chain rewritten -----------------------------------------------------------------


def _rewrite_from(trail: Trail, seq: int) -> None:
    """Replace entries from ``seq`` on with as many others: fresh, correct hashes."""
    count = trail.head_seq() - seq + 1
    trail.sql(f"DELETE FROM audit_entries WHERE seq >= {seq}")
    trail.append(count, tag="rewritten")


def test_a_chain_rewritten_with_fresh_hashes_is_detected_by_the_checkpoints(trail: Trail) -> None:
    trail.append(6)
    first = trail.checkpoint()
    trail.append(4)
    second = trail.checkpoint()
    _rewrite_from(trail, first - 1)
    assert verify_chain(trail.engine).ok  # every hash recomputes
    problems = _problems(trail.check())
    assert f"checkpoint at seq {first} signs hash" in problems
    assert f"checkpoint at seq {second} signs hash" in problems


def test_a_rewrite_re_signed_with_another_key_is_detected(trail: Trail) -> None:
    trail.append(6)
    first = trail.checkpoint()
    trail.sql(f"DELETE FROM audit_checkpoints WHERE seq >= {first}")
    _rewrite_from(trail, first - 1)
    forger = SigningKey.generate()
    trail.checkpoints.add(sign_checkpoint(forger, trail.head_seq(), trail.audit.head().hash))
    assert "signed by another key" in _problems(trail.check())
    # A verifier who trusts the forger's key is misled, which is why --public-key must come from elsewhere.
    assert trail.check(key=forger).ok


def test_a_rewrite_re_signed_with_the_stolen_key_is_caught_only_by_a_file_kept_elsewhere(trail: Trail,
                                                                                         tmp_path: Path) -> None:
    trail.append(6)
    seq = trail.checkpoint()
    write_checkpoint_file(tmp_path / "offsite.json", trail.checkpoints.get(seq), trail.key.public)
    trail.sql("DELETE FROM audit_checkpoints")
    _rewrite_from(trail, 3)
    trail.checkpoint()  # the attacker holds the key beside the database
    assert trail.check(strict=True).ok
    external, _ = read_checkpoint_file(tmp_path / "offsite.json")
    assert f"checkpoint file at seq {seq} signs hash" in _problems(trail.check(external=external))


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["below-the-checkpoints", "in-the-unsigned-tail-after-them"])
async def test_a_running_checkpointer_does_not_sign_a_rewrite_whose_checkpoints_were_deleted(trail: Trail,
                                                                                             where: str) -> None:
    # It checked only that the latest *remaining* checkpoint still matched: a writer without the key
    # rewrote the chain from some entry on, deleted the checkpoints above it, and the gateway signed the
    # forged head within a second (verify --strict then passed; a probe flipped a denial to an allow)
    trail.append(6)
    checkpointer = Checkpointer(trail.checkpoints, trail.audit, trail.key, every_entries=2, interval_s=3600)
    await checkpointer.start()
    first = trail.checkpoint()
    trail.append(3, tag="more")
    signed = await checkpointer.tick()
    assert signed is not None and signed.seq == trail.head_seq()
    rewrite_at = first - 2 if where == "below-the-checkpoints" else first + 1
    trail.sql(f"DELETE FROM audit_checkpoints WHERE seq > {rewrite_at}")
    _rewrite_from(trail, rewrite_at + 1)
    trail.append(2, tag="after")
    with pytest.raises(AuditError, match="not signing"):
        await checkpointer.tick()
    def signed_up_to() -> int:
        latest = trail.checkpoints.latest()
        return 0 if latest is None else latest.seq

    assert signed_up_to() <= rewrite_at  # nothing signed over the rewrite
    assert not trail.check(strict=True).ok  # its unsigned tail stays for verify to find
    await checkpointer.aclose()  # no closing checkpoint over it either
    assert signed_up_to() <= rewrite_at


# -- checkpoints themselves tampered with --------------------------------------------------


@pytest.mark.parametrize("change", [
    "head_hash = (SELECT hash FROM audit_entries WHERE seq = 2)",
    "closing = NOT closing",
    "created_at = '2020-01-01 00:00:00.000000'",
    "seq = seq - 1",
])
def test_an_edited_checkpoint_row_is_detected(trail: Trail, change: str) -> None:
    trail.append(5)
    trail.checkpoint()
    trail.sql(f"UPDATE audit_checkpoints SET {change}")
    problems = _problems(trail.check())
    assert "does not verify" in problems or "signs hash" in problems


def test_an_undecodable_checkpoint_row_is_a_problem_not_a_crash(trail: Trail) -> None:
    trail.append(2)
    trail.checkpoint()
    # SQLite: text that is no timestamp; PostgreSQL (which parses 'yesterday'): one psycopg cannot load.
    value = "infinity" if trail.backend == "postgresql" else "yesterday"
    trail.sql(f"UPDATE audit_checkpoints SET created_at = '{value}'")
    assert "cannot be read" in _problems(trail.check())


def test_a_checkpoint_signed_by_another_key_is_detected(trail: Trail) -> None:
    trail.append(3)
    trail.checkpoint()
    trail.append(2)
    other = SigningKey.generate()
    trail.checkpoints.add(sign_checkpoint(other, trail.head_seq(), trail.audit.head().hash))
    assert "another key" in _problems(trail.check())
    # And a checkpoint file signed by another key.
    problems = _problems(trail.check(external=sign_checkpoint(other, 1, trail.audit.get(1).hash)))
    assert "checkpoint file" in problems


def test_without_a_trusted_key_no_checkpoint_vouches(trail: Trail) -> None:
    trail.append(2)
    trail.checkpoint()
    verdict = check_checkpoints(trail.checkpoints, None, max_unsigned_age_s=MAX_AGE)
    assert "no trusted public key" in _problems(verdict)


def test_the_guards_refuse_changes_to_checkpoints_through_the_store(trail: Trail) -> None:
    trail.append(2)
    trail.checkpoint()
    for statement in ("UPDATE audit_checkpoints SET closing = NOT closing", "DELETE FROM audit_checkpoints"):
        with trail.engine.begin() as conn, pytest.raises(Exception, match="append-only"):
            conn.exec_driver_sql(statement)
    assert trail.check().ok
