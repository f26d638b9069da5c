"""The gateway's side of the output rules: judge windows of an output, answer the worker's report.

The policy's ``output_decision`` judges the output the way ``decision``
judged the prompt (``gateway/policy``); :class:`~gateway.requests.holdback.HoldBack`
says what of it the client may receive; the verdict (sealed, LPUSHed on
``govgate:verdict:<request id>``) tells the worker what to record, or, for
an output the worker handed over, goes into the terminal entry the gateway
records itself (``gateway/requests/handed_over.py``). Any
failure to judge fails closed: an unavailable decision stops the output. See
docs/architecture.md, "Output rules".
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.policy.decision import POLICY_UNAVAILABLE, Reason
from gateway.policy.reloader import ReloadingPolicyEngine
from gateway.requests.holdback import HoldBack, Judged, Window
from gateway.requests.ticket import Ticket
from workers.contract.output_check import VERDICT_TTL_S, OutputReport, OutputVerdict, verdict_key
from workers.contract.sealing import Sealer

log = logging.getLogger(__name__)

InputBuilder = Callable[[Ticket, Window], dict[str, Any]]


class _Unavailable:
    """The decision of an evaluation that failed in an unexpected way (the engines report their own)."""

    allow = False
    redact: Sequence[Any] = ()

    def __init__(self, message: str) -> None:
        self.reasons = (Reason(POLICY_UNAVAILABLE, message),)


def policy_input_for(ticket: Ticket, window: Window) -> dict[str, Any]:
    """The ``output_decision`` input for one window of ``ticket``'s output (``gateway/requests/output_input.py``)."""
    from gateway.requests.output_input import output_policy_input

    return output_policy_input(ticket.policy_input, ticket.decision, window.text, offset=window.offset,
                               final=window.final)


def is_unavailable(decision: Judged) -> bool:
    """A stop because the policy could not judge (not because of the output): the client gets a 503."""
    return not decision.allow and bool(decision.reasons) and all(
        reason.code == POLICY_UNAVAILABLE for reason in decision.reasons)


class OutputRules:
    """Judges outputs for one gateway process and answers the workers' reports."""

    def __init__(self, *, policy: ReloadingPolicyEngine, redis: aioredis.Redis, sealer: Sealer,
                 holdback_chars: int, build_input: InputBuilder = policy_input_for) -> None:
        self.policy = policy
        self.redis = redis
        self.sealer = sealer
        self.holdback_chars = holdback_chars
        self.build_input = build_input

    def hold(self) -> HoldBack:
        return HoldBack(self.holdback_chars)

    async def rule_absent(self, ticket: Ticket) -> bool:
        """True when the policy revision that admitted ``ticket`` has no output rule at all (asked once
        per revision); False on any doubt, so the output is judged as usual."""
        ask = getattr(self.policy, "output_rule_absent", None)  # a bare engine (tests) keeps no such answer
        if ask is None:
            return False
        try:
            return await ask(ticket.job.policy_revision)
        except Exception as exc:  # noqa: BLE001 - a failed question means: judge it
            log.error("cannot tell whether the policy has output rules: %s: %s", type(exc).__name__, exc)
            return False

    async def judge(self, ticket: Ticket, hold: HoldBack, *, final: bool = False) -> tuple[str, str]:
        """Judge the text ``hold`` has not released; the text this releases (masked) and the policy revision."""
        window = hold.window(final=final)
        try:
            decision, revision = await self.policy.decide_output_with_revision(self.build_input(ticket, window))
        except Exception as exc:  # noqa: BLE001 - whatever fails, the output must not pass unjudged
            log.error("output decision for %s failed: %s: %s", ticket.request_id, type(exc).__name__, exc)
            decision, revision = _Unavailable("the output rules could not be evaluated"), self.policy.revision
        hold.revision = revision
        return hold.apply(window, decision, unavailable=is_unavailable(decision)), revision

    async def answer(self, ticket: Ticket, hold: HoldBack, report: OutputReport, *,
                     abandoned: bool = False) -> OutputVerdict:
        """Judge what ``report`` adds to ``hold`` (:meth:`verdict_on`) and send the worker its verdict.

        A verdict that cannot be sent leaves the worker to record ``output_unchecked``.
        """
        verdict = await self.verdict_on(ticket, hold, report, abandoned=abandoned)
        await self.send(ticket.request_id, verdict)
        return verdict

    async def verdict_on(self, ticket: Ticket, hold: HoldBack, report: OutputReport, *,
                         abandoned: bool = False) -> OutputVerdict:
        """The verdict on ``report``'s output: what it adds to ``hold`` is judged as the final window.

        The tail is judged unless the output was stopped already; pieces the
        gateway did not receive are taken from the report. ``abandoned``: the
        client left, so it receives nothing more (the tail is judged for the
        record only).
        """
        received = hold.client_text
        if hold.replace_text(report.text) and not hold.stopped:
            await self.judge(ticket, hold, final=True)
        return OutputVerdict(decision=hold.decision_document(),
                             client_text=received if abandoned else hold.client_text,
                             stopped=hold.stopped, unavailable=hold.unavailable,
                             revision=hold.revision or self.policy.revision)

    async def cancelled(self, ticket: Ticket, hold: HoldBack, *, client_text: str | None = None,
                        timed_out: bool = False, key_revoked: bool = False) -> OutputVerdict:
        """Answer the report of a stream whose client left while its answer was being judged.

        That judgement was abandoned with the client's connection (its
        evaluator with it), and the worker, which waits for an answer and
        does not look at the cancel key meanwhile, would have waited out its
        whole verdict timeout (10 s), holding its model. It gets a
        ``cancelled`` verdict instead: the decision on the windows judged
        before, and the text the client received (``hold`` released it, so it
        was judged: nothing unjudged is ever served). The same two commands
        the verdict would have cost; nothing on the usual path changes.

        ``timed_out``: the gateway's request timeout stopped the stream (p2 #3), and ``client_text`` is what
        the stream delivered (``hold`` may have released a last window the client never got); the worker
        records ``timed_out`` with it. ``key_revoked``: the request's key was revoked (its entry says so).
        Returns the verdict sent (or that could not be sent).
        """
        verdict = self.standing(hold, client_text=client_text, cancelled=True, timed_out=timed_out,
                                key_revoked=key_revoked)
        await self.send(ticket.request_id, verdict)
        return verdict

    def standing(self, hold: HoldBack, *, client_text: str | None = None, cancelled: bool = False,
                 timed_out: bool = False, key_revoked: bool = False) -> OutputVerdict:
        """The verdict as ``hold`` stands, not judged further: the decision on the windows judged so far and
        ``client_text`` (default: what ``hold`` released) as what the client received."""
        return OutputVerdict(
            decision=hold.decision_document(), client_text=hold.client_text if client_text is None else client_text,
            stopped=hold.stopped, unavailable=hold.unavailable, revision=hold.revision or self.policy.revision,
            cancelled=cancelled, timed_out=timed_out, key_revoked=key_revoked)

    async def discard(self, request_id: str) -> None:
        """Take back a verdict sent for a job no worker will ever run (taken back from its queue, or stopped
        before any began it): it would sit sealed in Redis for :data:`VERDICT_TTL_S` with nobody to read it.
        Best effort: Redis failing leaves it to its expiry."""
        try:
            await self.redis.delete(verdict_key(request_id))
        except (RedisError, OSError) as exc:
            log.warning("cannot take back the output verdict of %s (it expires on its own): %s", request_id, exc)

    async def send(self, request_id: str, verdict: OutputVerdict) -> None:
        key = verdict_key(request_id)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.lpush(key, verdict.sealed(self.sealer))
                pipe.expire(key, VERDICT_TTL_S)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.error("cannot send the output verdict of %s: %s", request_id, exc)
