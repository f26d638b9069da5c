"""The hold-back of a checked output: which text may reach the client, and masked how.

Pure bookkeeping, no I/O, so its rules can be tested piece by piece: text
is released only once a window that reaches ``holdback`` characters past it
was judged; a release never cuts a finding in two (the release point moves
back to the finding's start); a stop releases nothing more. The same class
judges a non-streamed output as one final window. See docs/architecture.md,
"Output rules".
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from gateway.requests.normalize import weight
from workers.contract.privacy import mask

#: Reason code of an output whose finding cannot be located in the text as generated (only in its
#: normalised view): it cannot be masked, so the output is stopped (fail closed).
OUTPUT_UNMASKABLE = "output_unmaskable"
#: Reason code of a stream whose relayed pieces do not match the worker's report of the output.
STREAM_INCONSISTENT = "stream_inconsistent"


class _Reason(Protocol):
    code: str
    message: str


class _Finding(Protocol):
    detector: str
    text: str


class Judged(Protocol):
    """What the hold-back needs of an output decision (``gateway.policy``'s ``OutputDecision``)."""

    allow: bool
    reasons: Sequence[_Reason]
    redact: Sequence[_Finding]
    log_redact: Sequence[_Finding]


@dataclass(frozen=True)
class Window:
    """A stretch of the output to judge: ``text`` starts at ``offset``; ``final`` when it reaches the end."""

    text: str
    offset: int
    final: bool

    @property
    def end(self) -> int:
        return self.offset + len(self.text)


class HoldBack:
    """One output's judged windows, what was released of it, and the decision folded over its windows."""

    def __init__(self, holdback_chars: int, step_chars: int | None = None) -> None:
        self.holdback = holdback_chars
        self.step = step_chars if step_chars is not None else max(1, holdback_chars // 2)
        self.text = ""
        #: ``_seen[i]``: how many of the first i characters of ``text`` the rules see (normalize.weight).
        self._seen = [0]
        #: Characters of ``text`` released (their masked form is in ``_released``).
        self.released = 0
        self._released: list[str] = []
        self._findings: dict[str, str] = {}  # finding text -> detector
        #: Findings released to the client as they are that the audit's copy masks (``log_redact``).
        self._logged: dict[str, str] = {}
        self._reasons: list[dict[str, Any]] = []
        self.stopped = False
        self.unavailable = False
        #: The policy revision of the last decision folded in.
        self.revision = ""

    def add(self, piece: str) -> None:
        self.text += piece
        self._count(piece)

    def _count(self, piece: str) -> None:
        seen = self._seen[-1]
        for char in piece:
            seen += weight(char)
            self._seen.append(seen)

    def due(self) -> bool:
        """A window is worth judging: the unreleased text reached the hold-back plus one step.

        Both count the characters the rules see, not the invisible ones, spaces or
        line breaks (:func:`gateway.requests.normalize.weight`): a card number or
        key header padded with them is no longer than the hold-back.
        """
        return not self.stopped and self._seen[-1] - self._seen[self.released] >= self.holdback + self.step

    def window(self, *, final: bool = False) -> Window:
        """The text not yet released (the longest finding a window sees whole is ``holdback`` characters)."""
        return Window(self.text[self.released:], self.released, final)

    def replace_text(self, text: str) -> bool:
        """Take the worker's report as the output (pieces may have been lost); False if it contradicts
        what was already released, which is then a stop."""
        if not text.startswith(self.text[:self.released]):
            self._stop({"code": STREAM_INCONSISTENT, "message": "the relayed stream does not match the output "
                                                                "the worker reported"})
            return False
        if not text.startswith(self.text):
            self._seen = [0]
            self._count(text)
        else:
            self._count(text[len(self.text):])
        self.text = text
        return True

    def apply(self, window: Window, decision: Judged, *, unavailable: bool = False) -> str:
        """Fold ``decision`` on ``window`` in; the text it releases to the client (masked), possibly empty."""
        if self.stopped:
            return ""
        for reason in decision.reasons:
            document = {"code": reason.code, "message": reason.message}
            if document not in self._reasons:
                self._reasons.append(document)
        for finding in decision.redact:  # a stop lists its findings too: the log masks them all
            self._findings.setdefault(finding.text, finding.detector)
        for finding in decision.log_redact:
            self._logged.setdefault(finding.text, finding.detector)
        if not decision.allow:
            self.unavailable = unavailable
            self.stopped = True
            return ""
        for finding in decision.redact:
            if finding.text and finding.text not in window.text:
                self._stop({"code": OUTPUT_UNMASKABLE, "message": f"a {finding.detector} finding could not be "
                                                                  "located in the output to mask it"})
                return ""
        spans = [(window.offset + start, window.offset + stop)
                 for known in self._findings for start, stop in _occurrences(window.text, known)]
        point = window.end if window.final else max(self.released, self._held_from(window.end))
        moved = True
        while moved:  # moving back to one finding's start may cut another
            moved = False
            for start, stop in spans:
                if start < point < stop:
                    point, moved = start, True
        point = max(point, self.released)
        released = mask(self.text[self.released:point], self.redact)
        self.released = point
        self._released.append(released)
        return released

    def _held_from(self, end: int) -> int:
        """The last position with ``holdback`` characters the rules see between it and ``end``."""
        return max(0, bisect_right(self._seen, self._seen[end] - self.holdback, 0, end + 1) - 1)

    def _stop(self, reason: dict[str, Any]) -> None:
        if reason not in self._reasons:
            self._reasons.append(reason)
        self.stopped = True

    @property
    def client_text(self) -> str:
        """Everything released to the client, masked."""
        return "".join(self._released)

    @property
    def redact(self) -> list[dict[str, str]]:
        return [{"detector": detector, "text": text} for text, detector in self._findings.items()]

    @property
    def log_redact(self) -> list[dict[str, str]]:
        """The findings the client receives as they are and the audit's copy masks (none of ``redact``'s)."""
        return [{"detector": detector, "text": text} for text, detector in self._logged.items()
                if text not in self._findings]

    def decision_document(self) -> dict[str, Any]:
        """The output decision folded over every window: stopped or not, every reason and finding."""
        document = {"allow": not self.stopped, "reasons": list(self._reasons), "redact": self.redact}
        if self._logged:  # only then: a worker older than log_redact reads the verdict as before
            document["log_redact"] = self.log_redact
        return document


def _occurrences(text: str, finding: str) -> list[tuple[int, int]]:
    """Every (start, stop) of ``finding`` in ``text``, overlapping ones included."""
    spans = []
    if not finding:
        return spans
    start = text.find(finding)
    while start != -1:
        spans.append((start, start + len(finding)))
        start = text.find(finding, start + 1)
    return spans
