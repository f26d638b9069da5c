"""The job's line back to the gateway while it runs: text pieces out, cancel in.

Pieces are published sealed on the reply channel of the gateway that waits
for the job (tagged with the request id) and mirrored on a short-lived list, so a redelivered job knows what the client already got;
see docs/architecture.md, "Design notes by package" (workers).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Protocol

import redis

from workers.contract.jobs import (CANCEL_TTL_S, JOB_LOOK_AGAIN, JOB_STARTED, REPLY_PIECE, STOP_KEY_REVOKED,
                                   STOP_TIMED_OUT, cancel_key, reply_message, runs_key, seal_piece)
from workers.contract.output_check import (REPLY_OUTPUT, STOP_CONTENT_FILTER, OutputReport, OutputVerdict,
                                           verdict_key)
from workers.contract.gateway_liveness import GATEWAY_GONE_SCRIPT, GATEWAYS_KEY
from workers.contract.handover import PENDING_KEY, CarriedHandOver, Carrier
from workers.contract.repick import PutBack, Ticket
from workers.contract.repick import look_again
from workers.contract.sealing import SealError, Sealer

log = logging.getLogger(__name__)

#: Least time between two looks at the cancel key.
CANCEL_CHECK_INTERVAL_S = 0.05
#: Longest one BLPOP for a verdict blocks: below the worker client's socket timeout (5 s), which a
#: longer blocking command would trip.
VERDICT_POLL_S = 4.0
#: Shortest BLPOP for a verdict: Redis reads a timeout in whole milliseconds, and one that rounds
#: down to 0 would block for ever.
MIN_VERDICT_WAIT_S = 0.01

# KEYS[1] the request's verdict key; ARGV[1] the reply channel, ARGV[2] the report.
# A report that reaches no subscriber (its gateway is gone: killed while the job waited) can get no
# verdict, and the worker would wait out the whole verdict timeout for nothing, the model idle. So an
# empty item then goes onto the verdict key: the BLPOP that follows in the same pipeline takes it at
# once, and the output is recorded unchecked as it would have been after the wait. One round trip still.
_REPORT = """
if redis.call('PUBLISH', ARGV[1], ARGV[2]) > 0 then return 1 end
redis.call('LPUSH', KEYS[1], '')
redis.call('EXPIRE', KEYS[1], 60)
return 0
"""

# KEYS[1] the pending terminals; ARGV[1] the request id, ARGV[2] its fallback, ARGV[3] the reply channel,
# ARGV[4] the report. A script stops at its first refused write, before the PUBLISH (EVAL, not EVALSHA:
# no NOSCRIPT to handle; the prefork pool's hand-over and the solo pool's when its take failed).
_HAND_OVER = """
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
"""

#: Default least time between two pieces a stream sends (``GOVGATE_STREAM_FLUSH_INTERVAL_MS``).
STREAM_FLUSH_INTERVAL_S = 0.01

#: Prefix of the list that mirrors a stream's published pieces (sealed).
STREAMED_KEY_PREFIX = "govgate:streamed:"
#: How long a stream's mirror outlives its last piece when nobody deletes it:
#: longer than a redelivery takes (the broker's visibility timeout).
STREAMED_TTL_S = 3600


class JobChannel(Protocol):
    def publish(self, text: str) -> None: ...
    def flush(self) -> None: ...
    def cancel_requested(self) -> bool: ...
    def claim_start(self) -> bool: ...
    def count_run(self) -> int | None: ...
    def gateway_gone(self) -> bool: ...
    def streamed_text(self) -> str: ...
    def forget(self) -> None: ...
    def stopped_by_rules(self) -> bool: ...
    def stopped_by_timeout(self) -> bool: ...
    def stopped_by_revocation(self) -> bool: ...
    def await_verdict(self, report: OutputReport, timeout_s: float) -> OutputVerdict | None: ...
    def cancelled_verdict(self) -> OutputVerdict | None: ...
    def hand_over(self, report: OutputReport, fallback: bytes,
                  unchecked: Callable[[], Any] | None = None) -> bool: ...


class RedisJobChannel:
    """A job's channel over the worker's Redis connection.

    A stream's text goes out in pieces at most every ``flush_interval_s``:
    what the model makes meanwhile waits and travels as one piece. Each piece
    costs a Redis round trip here and a message, an unsealing and an SSE
    chunk at the gateway, so a fast model sending every token on its own
    spent more on relaying than on generating; at a reader's pace (tens of
    tokens a second) every token still goes at once. The first piece never
    waits (time to first token), and a token waits at most until the next
    one is made once the interval has passed.
    """

    def __init__(self, client: redis.Redis, request_id: str, *, streaming: bool, sealer: Sealer,
                 reply_to: str = "", flush_interval_s: float = STREAM_FLUSH_INTERVAL_S,
                 carrier: Carrier | None = None, deliver_late: Callable[[Any], None] | None = None,
                 ticket: Ticket | None = None) -> None:
        self._client = client
        #: What the start needs to give way to a fairer job (a fair job on the solo pool; None: it cannot).
        self._ticket = ticket
        #: The transport channel whose take carries this job's hand-over (the solo pool; None: sent here),
        #: and how an end recorded after the job returned reaches its gateway.
        self._carrier = carrier if deliver_late is not None else None
        self._deliver_late = deliver_late
        self._sealer = sealer
        self._request_id = request_id
        self._streamed_key = STREAMED_KEY_PREFIX + request_id
        self._reply_to = reply_to
        #: The job's state key: ``JOB_STARTED`` once generation began, ``JOB_LOOK_AGAIN`` a job not started
        #: that may give way at its start, anything else a cancel request.
        self._cancel_key = cancel_key(request_id)
        self._streaming = streaming
        self._seq = 0
        self._flush_interval_s = flush_interval_s
        #: Text generated but not yet sent, and when the next piece may go.
        self._unsent: list[str] = []
        self._next_flush = 0.0
        self._next_check = 0.0
        #: The cancel flag as read with :meth:`claim_start`, answered by the next look.
        self._cancel_seen: bool | None = None
        #: The cancel seen was the gateway stopping the output under its rules (not a client gone).
        self._stopped_by_rules = False
        #: The cancel seen was the gateway's request timeout (``STOP_TIMED_OUT``): recorded ``timed_out``.
        self._stopped_by_timeout = False
        #: The cancel seen was the request's key revoked (``STOP_KEY_REVOKED``): the end's message says so.
        self._stopped_by_revocation = False

    def claim_start(self) -> bool:
        """True the first time a job's generation begins; False on a redelivery; raises
        :class:`~workers.contract.repick.PutBack` when the job gave way to a fairer one (back on its list).

        A redelivered streaming job must not start again: its client has
        already received the first run's text, and a second run would repeat
        it (or, sampled, contradict it).
        """
        # The claim and the first look at the cancel flag are one command on one
        # key (SET … GET: Redis 6.2 has no SET NX GET): nothing there, a first run;
        # JOB_STARTED, a redelivery; anything else, a cancel request. A cancel it
        # overwrote is written back, so that a redelivery of this job (its worker
        # dying before it recorded the cancel) sees it too; and as it cannot tell
        # whether an earlier run began, it answers False, which costs only the
        # database's look for an earlier end.
        # JOB_LOOK_AGAIN is none of these: a job not started yet, which a gateway's push
        # marked (a list turned non-empty after its take). A fair job taken by this
        # process then looks for a fairer job (workers/contract/repick.py) and may give
        # way to it: its claim undone and PutBack raised. Any other start (a prefork
        # pool's, GOVGATE_FAIR_GIVE_WAY=0) reads the mark as a first run.
        was = self._client.set(self._cancel_key, JOB_STARTED, ex=CANCEL_TTL_S, get=True)
        if was == JOB_LOOK_AGAIN:
            was = None
            if self._ticket is not None:
                put_back, was = look_again(self._client, self._ticket, self._cancel_key, JOB_STARTED,
                                           JOB_LOOK_AGAIN)
                if put_back:
                    raise PutBack(self._request_id)
        cancelled = was is not None and was != JOB_STARTED
        self._stopped_by_rules = was == STOP_CONTENT_FILTER
        self._stopped_by_timeout = was == STOP_TIMED_OUT
        self._stopped_by_revocation = was == STOP_KEY_REVOKED
        if cancelled:
            self._client.set(self._cancel_key, was, ex=CANCEL_TTL_S)
        self._cancel_seen = cancelled
        self._next_check = time.monotonic() + CANCEL_CHECK_INTERVAL_S
        return was is None

    def gateway_gone(self) -> bool:
        """Whether the gateway waiting on the job's reply channel is gone (killed, or stopped): one script,
        asked only of a job that waited (:mod:`workers.contract.gateway_liveness`). False when its gateway is
        there, does not beat (older than the protocol), or Redis cannot say: the job runs, as it did before."""
        if not self._reply_to:
            return False
        try:
            return bool(self._client.eval(GATEWAY_GONE_SCRIPT, 1, GATEWAYS_KEY, self._reply_to))
        except (redis.RedisError, OSError) as exc:
            log.debug("whether the gateway of %s is there is not known (Redis: %s)", self._request_id, exc)
            return False

    def count_run(self) -> int | None:
        """On a redelivery (:meth:`claim_start` False): count this run; how many runs of the job have begun.

        Two commands (``INCR``, ``EXPIRE``), only on a redelivery. None when
        Redis cannot say: the run goes ahead, as it did before runs were counted.
        """
        key = runs_key(self._request_id)
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, CANCEL_TTL_S)
            after_first, _ = pipe.execute()
        except redis.RedisError as exc:
            log.warning("cannot count the runs of %s (%s); running it", self._request_id, exc)
            return None
        return 1 + int(after_first)

    def publish(self, text: str) -> None:
        """Send ``text`` towards the client now, or with the next piece if one went less than the interval ago."""
        if not self._streaming or not text:
            return
        self._unsent.append(text)
        now = time.monotonic()
        if now >= self._next_flush:
            self._send_unsent(now)

    def flush(self) -> None:
        """Send what waits: before the job's end is reported, so the stream holds the whole text first.

        Never raises: if Redis fails here the text is not lost, the job's
        result holds all of it and the gateway sends what its stream missed.
        """
        if not self._unsent:
            return
        try:
            self._send_unsent(time.monotonic())
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot send the last piece of %s: %s", self._request_id, exc)

    def _send_unsent(self, now: float) -> None:
        text = "".join(self._unsent)
        self._unsent.clear()
        with self._client.pipeline(transaction=False) as pipe:
            pipe.rpush(self._streamed_key, self._sealer.seal(text.encode()))
            if self._seq == 0:  # the mirror outlives any stream by far: one expiry is enough
                pipe.expire(self._streamed_key, STREAMED_TTL_S)
            if self._reply_to:
                pipe.publish(self._reply_to, reply_message(REPLY_PIECE, self._request_id,
                                                           seal_piece(self._sealer, self._seq, text)))
            pipe.execute()
        self._seq += 1
        self._next_flush = now + self._flush_interval_s

    def streamed_text(self) -> str:
        """What earlier runs of this job published (and so sent towards the client)."""
        try:
            pieces = self._client.lrange(self._streamed_key, 0, -1)
        except redis.RedisError as exc:
            log.error("cannot read what %s already streamed: %s", self._streamed_key, exc)
            return ""
        try:
            return "".join(self._sealer.unseal(piece).decode() for piece in pieces)
        except SealError as exc:  # another key sealed it: no text is better than a guess
            log.error("cannot unseal what %s already streamed: %s", self._streamed_key, exc)
            return ""

    def forget(self) -> None:
        """Drop the mirror: the request's terminal entry now holds the text."""
        if not self._streaming:
            return
        try:
            self._client.delete(self._streamed_key)
        except redis.RedisError as exc:  # it expires on its own
            log.warning("cannot delete %s: %s", self._streamed_key, exc)

    def cancel_requested(self) -> bool:
        if self._cancel_seen is not None:
            seen, self._cancel_seen = self._cancel_seen, None
            return seen
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + CANCEL_CHECK_INTERVAL_S
        try:
            state = self._client.get(self._cancel_key)
            if state is None:  # Redis came back without its data mid-job: claim the job again, so that its
                # gateway's look for lost jobs (gateway/dispatch/lost_jobs.py) sees it running
                self._client.set(self._cancel_key, JOB_STARTED, ex=CANCEL_TTL_S, nx=True)
            self._stopped_by_rules = state == STOP_CONTENT_FILTER
            self._stopped_by_timeout = state == STOP_TIMED_OUT
            self._stopped_by_revocation = state == STOP_KEY_REVOKED
            return state is not None and state != JOB_STARTED and state != JOB_LOOK_AGAIN
        except redis.RedisError as exc:  # keep generating: the result still goes through the log
            log.warning("cannot read cancel flag for %s: %s", self._cancel_key, exc)
            return False

    def stopped_by_rules(self) -> bool:
        """The last cancel seen was the gateway's output rules stopping the stream (it waits for the end)."""
        return self._stopped_by_rules

    def cancelled_verdict(self) -> OutputVerdict | None:
        """The ``cancelled`` verdict a gateway left for this stream when it cancelled it (its client left, or
        the gateway stopped): what the client received, and the decision on the windows judged; None if
        there is none (or Redis fails: the end is recorded without it).

        The gateway pushes it before it sets the cancel key, so a worker that saw the key finds it; one
        read, no wait.
        """
        try:
            raw = self._client.lpop(verdict_key(self._request_id))
            verdict = OutputVerdict.opened(raw, self._sealer) if raw is not None else None
        except (redis.RedisError, OSError) as exc:
            log.error("cannot read the cancelled verdict of %s (Redis: %s)", self._request_id, exc)
            return None
        except (SealError, ValueError) as exc:
            log.error("unreadable output verdict for %s: %s", self._request_id, exc)
            return None
        return verdict if verdict is not None and verdict.cancelled else None

    def stopped_by_timeout(self) -> bool:
        """The last cancel seen was the gateway's request timeout: the end is recorded ``timed_out``."""
        return self._stopped_by_timeout

    def stopped_by_revocation(self) -> bool:
        """The last cancel seen was the request's key revoked: the ``cancelled`` end says so."""
        return self._stopped_by_revocation

    def await_verdict(self, report: OutputReport, timeout_s: float) -> OutputVerdict | None:
        """Report the output to the waiting gateway and wait for its verdict; None if none came in time.

        The report is published (sealed) on the reply channel and the first
        BLPOP of the request's verdict key follows it in the same round trip
        (a pipeline: Redis runs the PUBLISH, then blocks on the BLPOP); a report
        nobody heard ends the wait at once (``_REPORT``); a wait
        longer than one step goes on in further BLPOPs, each shorter than the
        client's socket timeout. None also when Redis fails or the verdict
        cannot be opened: the caller records the output as unchecked.
        """
        if not self._reply_to:
            return None
        key = verdict_key(self._request_id)
        deadline = time.monotonic() + timeout_s
        message = reply_message(REPLY_OUTPUT, self._request_id, report.sealed(self._sealer))
        try:
            if timeout_s < MIN_VERDICT_WAIT_S:  # no time to wait: the gateway still hears the output
                self._client.publish(self._reply_to, message)
                return None
            with self._client.pipeline(transaction=False) as pipe:
                pipe.eval(_REPORT, 1, key, self._reply_to, message)  # EVAL, not EVALSHA: no NOSCRIPT to handle
                pipe.blpop([key], timeout=min(timeout_s, VERDICT_POLL_S))
                _, popped = pipe.execute()
            if popped is not None and not popped[1]:
                log.warning("the output report of %s reached no gateway (gone): recorded unchecked without "
                            "waiting for a verdict", self._request_id)
                return None
            while popped is None and (remaining := deadline - time.monotonic()) >= MIN_VERDICT_WAIT_S:
                popped = self._client.blpop([key], timeout=min(remaining, VERDICT_POLL_S))
            if popped is not None:
                return OutputVerdict.opened(popped[1], self._sealer)
        except (redis.RedisError, OSError) as exc:
            log.error("no output verdict for %s (Redis: %s)", self._request_id, exc)
        except (SealError, ValueError) as exc:
            log.error("unreadable output verdict for %s: %s", self._request_id, exc)
        return None

    def hand_over(self, report: OutputReport, fallback: bytes,
                  unchecked: Callable[[], Any] | None = None) -> bool:
        """Keep ``fallback`` (a sealed pending terminal entry) and publish ``report``, in one round trip.

        The fallback goes first (Redis runs a pipeline in order), so a gateway
        that hears the report always finds it to drop once it has recorded the
        real end. False when there is nobody to report to or Redis failed:
        the caller records the output unchecked itself.

        With a carrier (the solo pool) and ``unchecked`` (records the output
        unchecked, returning the job's result), the two commands ride on the
        take the ack sends (``workers/contract/handover.py``) and True is
        returned at once; if that take fails they are sent here on their own,
        and if Redis refuses them again ``unchecked`` ends the request and its
        result is delivered (``deliver_late``).
        """
        if not self._reply_to:
            return False
        message = reply_message(REPLY_OUTPUT, self._request_id, report.sealed(self._sealer))
        if self._carrier is not None and unchecked is not None:
            self._carrier.carry(CarriedHandOver(self._request_id, fallback, self._reply_to, message,
                                                alone=lambda: self._hand_over_alone(message, fallback, unchecked)))
            return True
        return self._send_hand_over(message, fallback)

    def _hand_over_alone(self, message: bytes, fallback: bytes, unchecked: Callable[[], Any]) -> None:
        """A carried hand-over its take did not complete: sent on its own, or the request ended here."""
        log.warning("the take carrying the output of %s failed: handing it over on its own", self._request_id)
        if self._send_hand_over(message, fallback):
            return
        result = unchecked()
        assert self._deliver_late is not None
        self._deliver_late(result)

    def _send_hand_over(self, message: bytes, fallback: bytes) -> bool:
        """The fallback kept, then the report published: one script, so that a Redis refusing the write
        (full) publishes nothing either; in a pipeline the ``PUBLISH``, which a full Redis
        allows, went out without its fallback, and the gateway that heard it raced the worker's own
        unchecked end for the request's one terminal entry."""
        try:
            self._client.eval(_HAND_OVER, 1, PENDING_KEY, self._request_id, fallback, self._reply_to, message)
            return True
        except (redis.RedisError, OSError) as exc:
            log.error("cannot hand the output of %s over to its gateway (Redis: %s)", self._request_id, exc)
            return False


class SilentChannel:
    """For jobs run outside a worker (tests, benchmarks): publishes nothing, never cancelled."""

    def publish(self, text: str) -> None:
        return None

    def flush(self) -> None:
        return None

    def cancel_requested(self) -> bool:
        return False

    def claim_start(self) -> bool:
        return True

    def count_run(self) -> int | None:
        return 1

    def gateway_gone(self) -> bool:
        return False

    def streamed_text(self) -> str:
        return ""

    def forget(self) -> None:
        return None

    def stopped_by_rules(self) -> bool:
        return False

    def stopped_by_timeout(self) -> bool:
        return False

    def stopped_by_revocation(self) -> bool:
        return False

    def await_verdict(self, report: OutputReport, timeout_s: float) -> OutputVerdict | None:
        return None

    def cancelled_verdict(self) -> OutputVerdict | None:
        return None

    def hand_over(self, report: OutputReport, fallback: bytes,
                  unchecked: Callable[[], Any] | None = None) -> bool:
        return False
