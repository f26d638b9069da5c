"""What the soak recorded (requests, faults) and the audit promises it checks against the store.

The checks read the audit through the ``audit`` package's public functions
only (``AuditStore.iter_entries``, ``verify_chain``, ``TERMINAL_KINDS``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

CHECKS = {
    "served_audited": "every served answer has one request entry and a completion entry",
    "outputs_equal": "the completion entry's output is exactly what the client got",
    "partial_streams_audited": "every piece a stream cut short delivered is in its terminal entry's output, in order",
    "client_output_recorded": "what a stream cut short delivered is its entries' client_output (its gateway's "
                              "delivered entry's, or else its terminal entry's), unless its gateway or database "
                              "died",
    "one_terminal_per_accepted": "every accepted request has exactly one terminal entry",
    "one_request_entry": "no request id has two request entries",
    "chain_verifies": "audit verify passes",
    "no_unplanned_exit": "no process exited that the soak did not kill",
    "errors_designed": "every error answer is OpenAI-shaped and none is a 500",
    "all_faults_injected": "every scheduled fault was injected before the deadline",
}

#: The outcome of a stream whose client the soak disconnected mid-way (it read less than was sent).
DISCONNECTED = "client disconnect mid-stream"
#: Faults after which a cut stream's ``client_output`` may go unrecorded: only its gateway knew what it released
#: (killed: it cannot say; its database down: it cannot write it). bench/soak.py's names for them.
_UNRECORDABLE = frozenset({"gateway_kill", "db_sessions_kill", "db_restart", "db_crash"})


@dataclass
class Sent:
    """One request as the client saw it."""

    index: int
    gateway: int
    stream: bool
    started: float
    #: The team whose principal's key sent it.
    team: str = ""
    ended: float = 0.0
    status: int | None = None
    outcome: str = ""
    request_id: str | None = None
    text: str = ""
    #: The text pieces of a stream, as received.
    pieces: list[str] = field(default_factory=list)
    #: A 200 answer, or a stream that ended with ``[DONE]``.
    served: bool = False


@dataclass
class Fault:
    """One injected fault: when, what, and how long the stack took to answer again."""

    kind: str
    #: When it was injected: ``time.monotonic()`` (client records) and ``time.time()`` (audit entries).
    at: float
    wall: float = 0.0
    #: When the victim was gone (exited, or SIGKILL sent): recovery counts requests sent after it.
    down_at: float | None = None
    detail: str = ""
    #: Seconds until the restarted part answered (None: nothing to restart).
    restart_s: float | None = None
    #: Seconds from the fault to the end of the first successful request sent after it.
    recovery_s: float | None = None
    gateway: int | None = None


@dataclass
class Check:
    """One audit promise: held or not, how often it broke, near which faults, a few examples."""

    ok: bool
    failures: int
    examples: list[str] = field(default_factory=list)
    #: Failures counted by the fault they followed (``before any fault`` when none had happened).
    by_fault: Counter = field(default_factory=Counter)


def _entries_by_request(store: Any) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for entry in store.iter_entries():
        found.setdefault(entry.request_id, []).append(entry)
    return found


def accepted(entries: list[Any]) -> bool:
    for entry in entries:
        if entry.kind == "request":
            body = entry.body
            return bool(body.get("decision", {}).get("allow") and (body.get("admission") or {}).get("admitted"))
    return False


def _terminals(entries: list[Any]) -> list[Any]:
    from audit import TERMINAL_KINDS

    return [e for e in entries if e.kind in TERMINAL_KINDS]


def wait_for_terminals(store: Any, bound_s: float, say: Callable[[str], None]) -> dict[str, list[Any]]:
    """The audit by request id, once every accepted request has its terminal entry or ``bound_s`` passed.

    Terminal entries can come late by design: a gateway's abandoned stream
    waits a request timeout; a dead worker's task is redelivered after the
    visibility timeout. So wait for them, bounded, rather than skip them.
    """
    deadline = time.monotonic() + bound_s
    said = False
    while True:
        by_request = _entries_by_request(store)
        open_ids = [rid for rid, entries in by_request.items() if accepted(entries) and not _terminals(entries)]
        if not open_ids or time.monotonic() >= deadline:
            return by_request
        if not said:
            say(f"soak: waiting up to {bound_s:.0f}s for {len(open_ids)} accepted requests to end in the audit")
            said = True
        time.sleep(1.0)


class _Failures(list):
    """Failure texts, each tagged with the fault it followed."""

    def add(self, text: str, fault: Fault | None, moment: float | None = None) -> None:
        if fault is None:
            self.append(("before any fault", text))
            return
        delta = "" if moment is None else f" {moment - fault.at:+.1f}s"
        self.append((fault.kind, f"{text} [{fault.kind}{delta}]"))


def _fault_before(faults: list[Fault], moment: float) -> Fault | None:
    """The last fault injected before ``moment`` (monotonic): the one a request could have met."""
    earlier = [f for f in faults if f.at <= moment]
    return earlier[-1] if earlier else None


def _fault_met(faults: list[Fault], when: datetime, window_s: float) -> tuple[Fault | None, float | None]:
    """The fault a request first recorded at ``when`` most likely met, and ``when`` on the monotonic clock.

    The first fault within ``window_s`` after it (its longest life), else the
    last fault before it.
    """
    stamp = when.timestamp()
    later = [f for f in faults if 0 <= f.wall - stamp <= window_s]
    earlier = [f for f in faults if f.wall < stamp]
    fault = later[0] if later else earlier[-1] if earlier else None
    return fault, None if fault is None else fault.at + (stamp - fault.wall)


def _holds_in_order(output: str, pieces: list[str]) -> bool:
    """True when every piece occurs in ``output`` after the one before it.

    Not "starts with": a piece lost on the way (a Redis reconnect drops
    pub/sub messages) leaves the client a gap, yet what it did get is audited.
    """
    position = 0
    for piece in pieces:
        found = output.find(piece, position)
        if found < 0:
            return False
        position = found + len(piece)
    return True


def _check(failures: _Failures) -> Check:
    return Check(ok=not failures, failures=len(failures), examples=[text for _, text in failures[:3]],
                 by_fault=Counter(kind for kind, _ in failures))


def audit_checks(sent: list[Sent], by_request: dict[str, list[Any]], verified: Any, unplanned: list[str],
                 faults: Iterable[Fault], window_s: float) -> dict[str, Check]:
    """The audit promises, each as a :class:`Check` with a few examples of what broke it."""
    faults = list(faults)
    unaudited, unequal, partial, untold = _Failures(), _Failures(), _Failures(), _Failures()
    for record in sent:
        entries = by_request.get(record.request_id or "", [])
        kinds = [e.kind for e in entries]
        terminal = _terminals(entries)
        fault = _fault_before(faults, record.ended)
        if record.served:
            completion = [e for e in terminal if e.kind == "completion"]
            if record.request_id is None or kinds.count("request") != 1 or len(completion) != 1:
                unaudited.add(f"#{record.index} {record.team} {record.outcome} id={record.request_id} "
                              f"entries={kinds}", fault, record.ended)
                continue
            output = _output(completion[0])
            if output != record.text:
                unequal.add(f"#{record.index} {record.team} {record.outcome} id={record.request_id}: client got "
                            f"{len(record.text)} chars, audit holds {len(output or '')}", fault, record.ended)
        elif record.stream and record.text:
            output = _output(terminal[0]) if terminal else None
            if not isinstance(output, str) or not _holds_in_order(output, record.pieces):
                holder = f"its {terminal[0].kind} entry" if terminal else "no terminal entry"
                holds = "no output" if output is None else f"{len(output)} chars without them in order"
                partial.add(f"#{record.index} {record.team} {record.outcome} id={record.request_id}: delivered "
                            f"{len(record.text)} chars, {holder} holds {holds}", fault, record.ended)
            if record.outcome != DISCONNECTED and (fault is None or fault.kind not in _UNRECORDABLE):
                told = _client_output(entries)
                if told != record.text:
                    said = "none" if told is None else f"{len(told)} chars"
                    untold.add(f"#{record.index} {record.team} {record.outcome} id={record.request_id}: delivered "
                               f"{len(record.text)} chars, client_output {said}", fault, record.ended)
    ended, twice_requested = _Failures(), _Failures()
    for request_id, entries in by_request.items():
        kinds = [e.kind for e in entries]
        fault, moment = _fault_met(faults, entries[0].created_at, window_s)
        if kinds.count("request") > 1:
            twice_requested.add(f"{request_id}: {kinds}", fault, moment)
        if accepted(entries) and len(_terminals(entries)) != 1:
            ended.add(f"{request_id}: {kinds}", fault, moment)
    undesigned = _Failures()
    for record in sent:
        if record.outcome.endswith(("not-openai-shaped", "unreadable answer")) or record.status == 500:
            undesigned.add(f"#{record.index} {record.team} {record.outcome}", _fault_before(faults, record.ended),
                           record.ended)
    chain, exits = _Failures(), _Failures()
    if not verified.ok:
        chain.add(f"seq {verified.first_bad_seq}: {verified.problem}", None)
    for text in unplanned:
        exits.add(text, None)
    return {
        "served_audited": _check(unaudited),
        "outputs_equal": _check(unequal),
        "partial_streams_audited": _check(partial),
        "client_output_recorded": _check(untold),
        "one_terminal_per_accepted": _check(ended),
        "one_request_entry": _check(twice_requested),
        "chain_verifies": _check(chain),
        "no_unplanned_exit": _check(exits),
        "errors_designed": _check(undesigned),
    }


#: Log lines counted in the report: worth reading, not failures by themselves.
_LOG_PATTERNS = {"Traceback": "tracebacks", "Task was destroyed but it is pending": "destroyed pending tasks",
                 " ERROR ": "ERROR lines", " CRITICAL ": "CRITICAL lines"}


def log_problems(logs: Path) -> dict[str, int]:
    counts: Counter = Counter()
    for log in sorted(logs.glob("*.log")):
        component = log.stem.rsplit("-", 1)[0]
        for line in log.read_text(errors="replace").splitlines():
            for pattern, name in _LOG_PATTERNS.items():
                if pattern in line:
                    counts[f"{component} {name}"] += 1
    return dict(counts)


def _client_output(entries: list[Any]) -> Any:
    """What a request's entries say its client received: a ``delivered`` entry's ``client_output`` (the
    gateway's, when the terminal one could not say it, or said more), else the terminal entry's; None when
    neither does."""
    for entry in [*(e for e in entries if e.kind == "delivered"), *_terminals(entries)]:
        told = (entry.payload or {}).get("client_output", entry.body.get("client_output"))
        if told is not None:
            return told
    return None


def _output(entry: Any) -> Any:
    """The output an entry keeps: in its payload (chain format 2), or its body (an entry of format 1)."""
    return (entry.payload if entry.payload is not None else entry.body).get("output")
