"""Policy replay: what would a candidate policy have decided on past requests, and on their outputs?

Re-decides the policy inputs kept in ``request`` audit entries; requests
whose prompt was not kept in full are reported as *partial*, and their
decisions that differ are listed apart from the others: they were decided
without the text, so a content rule's verdict on them is not replayed (the
running policy replayed on itself showed `deny[pii_detected] -> allow` for
a pruned prompt among the changes, probe s54 F5). Then judges
the output of each ``completion`` entry whose output was kept in full with
the candidate's ``output_decision`` (one final window, in the context of its
request entry); outputs kept only as a digest or masked are counted as not
judged. See docs/architecture.md, "Design notes by package" (gateway/policy).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

from audit import AuditEntry
from gateway.policy import Decision, OutputDecision, PolicyEngine
from gateway.requests.normalize import normalized_text
from gateway.requests.output_input import output_policy_input
from gateway.requests.policy_input import prompt_text
from workers.contract.privacy import texts_of

_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``7d``, ``12h``, ``30m``, ``2w`` ago, or an ISO date/time (UTC when no zone is given)."""
    now = now or datetime.now(timezone.utc)
    text = text.strip()
    # ASCII digits only: str.isdigit() also read other scripts' ('٣٠d' as 30 days, probe s56), and int() too
    if len(text) >= 2 and text[-1] in _UNITS and text[:-1].isascii() and text[:-1].isdigit():
        try:
            return now - timedelta(**{_UNITS[text[-1]]: int(text[:-1])})
        except OverflowError:  # before year 1
            raise ValueError(f"{text!r} reaches back before the year 1") from None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a period (7d, 12h, 30m, 2w) or an ISO date") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def input_from_entry(entry: AuditEntry) -> tuple[dict[str, Any], bool] | None:
    """The policy input an audited request was decided on, and whether it is complete."""
    body = entry.body
    stored = body.get("policy_input")
    if not isinstance(stored, dict):
        return None  # written before inputs were recorded
    document = {key: value for key, value in stored.items()}
    request = dict(document.get("request") or {})
    complete = body.get("prompt_logging") == "full"
    texts = texts_of(body, entry.payload)  # the payload; a format-1 entry's body
    complete = complete and ("messages" in texts or "prompt" in texts)  # not when erased (audit prune)
    if complete:
        messages, prompt = texts.get("messages"), texts.get("prompt")
        if messages is not None:
            request["messages"] = messages
        else:
            request["prompt"] = prompt
        request["text"] = prompt_text(messages, prompt)
        request["normalized_text"] = normalized_text(messages, prompt)
    else:
        request.setdefault("text", "")
    document["request"] = request
    return document, complete


def _summary(decision: dict[str, Any]) -> str:
    if decision.get("allow"):
        return "allow"
    codes = sorted({r.get("code", "?") for r in decision.get("reasons", [])})
    return "deny[" + ",".join(codes) + "]"


@dataclass
class Change:
    seq: int
    request_id: str
    at: str
    principal: str | None
    model: str | None
    before: str
    after: str
    detail: str = ""


#: The output decision of a completion recorded without one (before output rules): it was served as generated.
SERVED_UNCHECKED: dict[str, Any] = {"allow": True, "reasons": [], "findings": []}


def _output_summary(decision: dict[str, Any]) -> str:
    """``allow`` or ``stop[codes]``."""
    if decision.get("allow"):
        return "allow"
    codes = sorted({r.get("code", "?") for r in decision.get("reasons") or [] if isinstance(r, dict)})
    return "stop[" + ",".join(codes) + "]"


def _masked_detectors(items: Any) -> list[str]:
    """The detector names of an output decision's findings (``redact`` or the audit's ``findings``)."""
    return sorted({item.get("detector") for item in items or [] if isinstance(item, dict)
                   and isinstance(item.get("detector"), str)})


def output_from_entry(entry: AuditEntry) -> str | None:
    """The output of a ``completion`` entry as generated, when the entry kept it in full (else None)."""
    texts = texts_of(entry.body, entry.payload)
    output = texts.get("output")
    if not isinstance(output, str) or entry.body.get("output_masked"):
        return None  # a digest and a length, a masked copy, or erased (audit prune)
    return output


def _changes_document(transitions: Counter, examples: dict[str, list["Change"]]) -> dict[str, Any]:
    """The kinds of change, most frequent first, and their examples, as the JSON report shows them."""
    return {"transitions": dict(transitions.most_common()),
            "examples": {key: [vars(c) for c in changes] for key, changes in examples.items()}}


@dataclass
class OutputReplay:
    """What the candidate's output rules would have done to the outputs of the period."""

    evaluated: int = 0
    #: Completions whose output was kept only as a digest or masked: not judged.
    not_judged: int = 0
    #: Completions whose request entry is outside the period or has no policy input.
    skipped: int = 0
    unchanged: int = 0
    transitions: Counter = field(default_factory=Counter)
    examples: dict[str, list["Change"]] = field(default_factory=lambda: defaultdict(list))

    @property
    def changed(self) -> int:
        return sum(self.transitions.values())

    def to_document(self) -> dict[str, Any]:
        return {
            "evaluated": self.evaluated,
            "not_judged": self.not_judged,
            "skipped": self.skipped,
            "unchanged": self.unchanged,
            "changed": self.changed,
            **_changes_document(self.transitions, self.examples),
        }


@dataclass
class PartialReplay:
    """The requests whose prompt was not kept in full (``hash``, ``redacted``, or erased by prune), decided
    on what was kept: a difference may be the candidate's, or only the text that is missing."""

    unchanged: int = 0
    transitions: Counter = field(default_factory=Counter)
    examples: dict[str, list[Change]] = field(default_factory=lambda: defaultdict(list))

    @property
    def differ(self) -> int:
        return sum(self.transitions.values())

    def to_document(self) -> dict[str, Any]:
        return {
            "unchanged": self.unchanged,
            "differ": self.differ,
            **_changes_document(self.transitions, self.examples),
        }


@dataclass
class ReplayReport:
    since: datetime
    candidate_revision: str
    evaluated: int = 0
    #: Of ``evaluated``, the requests without their full prompt; their outcomes are in ``partial_changes``,
    #: not in ``unchanged`` / ``transitions``.
    partial: int = 0
    skipped: int = 0
    unchanged: int = 0
    transitions: Counter = field(default_factory=Counter)
    examples: dict[str, list[Change]] = field(default_factory=lambda: defaultdict(list))
    partial_changes: PartialReplay = field(default_factory=PartialReplay)
    outputs: OutputReplay = field(default_factory=OutputReplay)

    @property
    def changed(self) -> int:
        return sum(self.transitions.values())

    def to_document(self) -> dict[str, Any]:
        return {
            "outputs": self.outputs.to_document(),
            "since": self.since.isoformat(),
            "candidate_revision": self.candidate_revision,
            "evaluated": self.evaluated,
            "partial": self.partial,
            "partial_changes": self.partial_changes.to_document(),
            "skipped": self.skipped,
            "unchanged": self.unchanged,
            "changed": self.changed,
            **_changes_document(self.transitions, self.examples),
        }


def _obligation_change(before: dict[str, Any], after: Decision) -> str:
    old = before.get("obligations", {}) or {}
    new = after.to_document()["obligations"]
    keys = ("max_tokens", "prompt_logging", "priority")
    diffs = [f"{k} {old.get(k)!r}->{new.get(k)!r}" for k in keys if k in new and old.get(k) != new.get(k)]
    return ", ".join(diffs)


async def replay(entries: Iterable[AuditEntry], candidate: PolicyEngine, since: datetime, *,
                 examples_per_change: int = 3) -> ReplayReport:
    """Evaluate ``candidate`` on every audited request since ``since``, and on its output; compare."""
    report = ReplayReport(since=since, candidate_revision=candidate.revision)
    #: request id -> (its policy input, its recorded decision), until its completion is judged.
    contexts: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for entry in entries:
        if entry.created_at < since:
            continue
        if entry.kind == "request":
            recorded = await _replay_request(entry, candidate, report, examples_per_change)
            stored = entry.body.get("policy_input")
            if recorded.get("allow") and isinstance(stored, dict):
                contexts[entry.request_id] = (stored, recorded)
        elif entry.kind == "completion":
            await _replay_output(entry, contexts.pop(entry.request_id, None), candidate, report.outputs,
                                 examples_per_change)
    return report


async def _replay_request(entry: AuditEntry, candidate: PolicyEngine, report: ReplayReport,
                          examples_per_change: int) -> dict[str, Any]:
    """Decide one request entry again; returns its recorded decision."""
    recorded = entry.body.get("decision") or {}
    rebuilt = input_from_entry(entry)
    if rebuilt is None:
        report.skipped += 1
        return recorded
    document, complete = rebuilt
    report.evaluated += 1
    report.partial += 0 if complete else 1
    tally = report if complete else report.partial_changes
    decision = await candidate.decide(document)
    before, after = _summary(recorded), _summary(decision.to_document())
    detail = ""
    if before == after == "allow":
        detail = _obligation_change(recorded, decision)
        if detail:
            after = "allow (obligations changed)"
    if before == after:
        tally.unchanged += 1
        return recorded
    _note(tally.transitions, tally.examples, entry, before, after, detail, examples_per_change)
    return recorded


async def _replay_output(entry: AuditEntry, context: tuple[dict[str, Any], dict[str, Any]] | None,
                         candidate: PolicyEngine, report: OutputReplay, examples_per_change: int) -> None:
    """Judge one completion's output (as one final window) under the candidate's output rules."""
    if context is None:
        report.skipped += 1
        return
    output = output_from_entry(entry)
    if output is None:
        report.not_judged += 1
        return
    report.evaluated += 1
    policy_input, decision = context
    recorded = entry.body.get("output_decision")
    if not isinstance(recorded, dict):
        recorded = SERVED_UNCHECKED
    judged: OutputDecision = await candidate.decide_output(output_policy_input(policy_input, decision, output))
    before, after = _output_summary(recorded), _output_summary(judged.to_document())
    detail = ""
    if before == after == "allow":
        old = _masked_detectors(recorded.get("findings", recorded.get("redact")))
        new = _masked_detectors([item.to_document() for item in judged.redact])
        if old != new:
            detail, after = f"masks {old or '[]'} -> {new or '[]'}", "allow (masking changed)"
    if before == after:
        report.unchanged += 1
        return
    _note(report.transitions, report.examples, entry, before, after, detail, examples_per_change)


def _note(transitions: Counter, examples: dict[str, list[Change]], entry: AuditEntry, before: str, after: str,
          detail: str, examples_per_change: int) -> None:
    key = f"{before} -> {after}"
    transitions[key] += 1
    if len(examples[key]) < examples_per_change:
        examples[key].append(Change(entry.seq, entry.request_id, entry.created_at.isoformat(), entry.principal,
                                    entry.model, before, after, detail))
