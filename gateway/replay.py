"""Policy replay: what would a candidate policy have decided on past requests?

Re-decides the policy inputs kept in ``request`` audit entries; requests
whose prompt was not kept in full are reported as *partial*. See
docs/architecture.md, "Design notes by package" (gateway/policy).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

from audit import AuditEntry
from gateway.policy import Decision, PolicyEngine
from gateway.requests.normalize import normalized_text
from gateway.requests.policy_input import prompt_text
from workers.contract.privacy import texts_of

_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``7d``, ``12h``, ``30m``, ``2w`` ago, or an ISO date/time (UTC when no zone is given)."""
    now = now or datetime.now(timezone.utc)
    text = text.strip()
    if len(text) >= 2 and text[-1] in _UNITS and text[:-1].isdigit():
        return now - timedelta(**{_UNITS[text[-1]]: int(text[:-1])})
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


@dataclass
class ReplayReport:
    since: datetime
    candidate_revision: str
    evaluated: int = 0
    partial: int = 0
    skipped: int = 0
    unchanged: int = 0
    transitions: Counter = field(default_factory=Counter)
    examples: dict[str, list[Change]] = field(default_factory=lambda: defaultdict(list))

    @property
    def changed(self) -> int:
        return sum(self.transitions.values())

    def to_document(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "candidate_revision": self.candidate_revision,
            "evaluated": self.evaluated,
            "partial": self.partial,
            "skipped": self.skipped,
            "unchanged": self.unchanged,
            "changed": self.changed,
            "transitions": dict(self.transitions.most_common()),
            "examples": {key: [vars(c) for c in changes] for key, changes in self.examples.items()},
        }


def _obligation_change(before: dict[str, Any], after: Decision) -> str:
    old = before.get("obligations", {}) or {}
    new = after.to_document()["obligations"]
    keys = ("max_tokens", "prompt_logging", "priority")
    diffs = [f"{k} {old.get(k)!r}->{new.get(k)!r}" for k in keys if k in new and old.get(k) != new.get(k)]
    return ", ".join(diffs)


async def replay(entries: Iterable[AuditEntry], candidate: PolicyEngine, since: datetime, *,
                 examples_per_change: int = 3) -> ReplayReport:
    """Evaluate ``candidate`` on every audited request since ``since`` and compare."""
    report = ReplayReport(since=since, candidate_revision=candidate.revision)
    for entry in entries:
        if entry.kind != "request" or entry.created_at < since:
            continue
        rebuilt = input_from_entry(entry)
        if rebuilt is None:
            report.skipped += 1
            continue
        document, complete = rebuilt
        report.evaluated += 1
        report.partial += 0 if complete else 1
        recorded = entry.body.get("decision") or {}
        decision = await candidate.decide(document)
        before, after = _summary(recorded), _summary(decision.to_document())
        detail = ""
        if before == after == "allow":
            detail = _obligation_change(recorded, decision)
            if detail:
                after = "allow (obligations changed)"
        if before == after:
            report.unchanged += 1
            continue
        key = f"{before} -> {after}"
        report.transitions[key] += 1
        if len(report.examples[key]) < examples_per_change:
            report.examples[key].append(Change(entry.seq, entry.request_id, entry.created_at.isoformat(),
                                               entry.principal, entry.model, before, after, detail))
    return report
