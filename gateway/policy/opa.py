"""The OPA server engine: the same policy folder, evaluated by an OPA server.

Answers with the same :class:`Decision` as the embedded engine, failing
closed within ``timeout_s`` (client retries off); loading and proving the
policy is :mod:`gateway.policy.opa_sync`. What is a deny and what is
"unavailable", and how reloads fail: docs/architecture.md, "Design notes by
package" (gateway/policy).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal
from urllib.parse import urlsplit

import aiohttp
from opa_client import AsyncOpaClient
from opa_client.errors import ConnectionsError, DeletePolicyError, PolicyNotFoundError, RegoParseError, TypeException

from gateway.policy.decision import POLICY_ERROR, Decision, PolicyTimeout, PolicyUnavailable
from gateway.policy.engine import (
    DECISION_RULE,
    DEFAULT_WAIT_TIMEOUT_S,
    OUTPUT_RULE_PROBE,
    UNAVAILABLE_RETRY_AFTER_S,
    VISIBLE_MODELS_RULE,
    PolicyLoadError,
    input_team,
    team_weights,
)
from gateway.policy.fair_line import FairSlots
from gateway.policy.opa_sync import (
    check_config,
    describe_error,
    read_back,
    read_snapshot,
    upload_policy,
    verify_policy,
)
from gateway.policy.opa_query import OpaQueryError, query_rule
from gateway.policy.output_decision import OUTPUT_DECISION_RULE, OutputDecision
from gateway.policy.revision import PolicySnapshot, compute_revision

log = logging.getLogger("govgate.policy")

#: Longest one administrative request (upload, read-back) may take; compiling
#: a policy set on OPA can take far longer than one decision may.
ADMIN_TIMEOUT_S = 30.0
#: How long :meth:`OpaPolicyEngine.connect` waits for OPA's ``/health`` by default
#: (OPA may still be starting beside the gateway).
READY_TIMEOUT_S = 10.0

#: Decisions in flight at once: the connection limit of the aiohttp session
#: opa-python-client opens (aiohttp's default). More would only queue inside
#: aiohttp, where the wait would count against the evaluation's timeout; they
#: wait for a slot in a line that serves teams by their shares instead.
MAX_QUERIES = 100

#: How long ``/readyz`` waits for OPA's own ``/health``.
READINESS_TIMEOUT_S = 1.0

#: HTTP statuses that say nothing about the request, only that no answer came
#: through (a proxy or load balancer in front of OPA).
_UNAVAILABLE_STATUSES = frozenset({502, 503, 504})

# What a failing OPA request raises: the client's own errors, aiohttp's
# (HTTP status, connection), timeouts, and a body that is not JSON.
_REQUEST_ERRORS = (
    aiohttp.ClientError,
    TimeoutError,
    ValueError,
    ConnectionsError,
    DeletePolicyError,
    PolicyNotFoundError,
    RegoParseError,
    TypeException,
)


class OpaUnreachable(PolicyLoadError):
    """No answer from OPA (refused, reset, timed out, a proxy's 502/503/504): nothing learnt about its policy."""


@dataclass(frozen=True)
class OpaAddress:
    """Where OPA listens, in the parts ``AsyncOpaClient`` takes (it has no URL argument)."""

    host: str
    port: int
    ssl: bool

    @classmethod
    def parse(cls, url: str) -> "OpaAddress":
        """``http(s)://host[:port]``; raises ``PolicyLoadError`` for anything the client cannot reach."""
        parts = urlsplit(url.strip())
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
            raise PolicyLoadError(f"OPA URL {shown_opa_url(url)!r} is not http(s)://host[:port]")
        if parts.path.strip("/") or parts.query or parts.fragment or parts.username:
            # The client builds every URL as scheme://host:port/v1/...
            raise PolicyLoadError(f"OPA URL {shown_opa_url(url)!r} must not have a path, query or credentials")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        https = parts.scheme == "https"
        return cls(host=host, port=port or (443 if https else 80), ssl=https)

    def client(self, timeout_s: float) -> AsyncOpaClient:
        """A client without retries (a retry could only break the caller's deadline)."""
        # The client's default retries a POST answered 500/502/504 or refused
        # (about 0.9 s of back-off), and it raises HTTP failures as raw aiohttp
        # exceptions, which _query sorts into "unavailable" and "error".
        return AsyncOpaClient(host=self.host, port=self.port, ssl=self.ssl, retries=0, timeout=timeout_s)


def shown_opa_url(url: str) -> str:
    """``url`` as a message may show it: any credentials (``user:password@``, a token as the user) as ``***``.
    The URL is refused with credentials, but the refusal quoted them whole, into the log too (probe s56)."""
    return re.sub(r"//[^/?#]*@", "//***@", url)


@dataclass(frozen=True)
class _Outcome:
    """What one query produced, before it is read as a decision."""

    kind: Literal["ok", "undefined", "error", "timeout", "unreachable", "busy"]
    value: Any = None
    error: str = ""
    #: What a decision says of it when ``error`` holds what only the log may (OPA's address, the policy
    #: folder's path, what differs: a decision's reasons reach API clients and the audit chain; probe s59 G4).
    public: str = ""

    @property
    def said(self) -> str:
        """The error as a decision's reason may give it."""
        return self.public or self.error


class OpaPolicyEngine:
    """Evaluates the policy on an OPA server; a :class:`PolicyEngine`.

    Build one with :meth:`connect`. Decisions share one HTTP session (kept
    open until :meth:`aclose`); loading and checking use short-lived ones with
    a longer timeout.
    """

    def __init__(self, address: OpaAddress, url: str, snapshot: PolicySnapshot, policy_dir: Path,
                 timeout_s: float, load: bool, wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S) -> None:
        """Use :meth:`connect`; this only holds state."""
        self._address = address
        self._url = url
        self._snapshot = snapshot
        self._policy_dir = policy_dir
        self._timeout_s = timeout_s
        self._wait_timeout_s = wait_timeout_s
        #: Team weights of the policy OPA holds (replaced on reload), read by the slots' line.
        self._weights = team_weights(snapshot)
        #: The session's connections; queries wait for one by team (``self._weights``), FIFO within a team.
        self._slots = FairSlots(MAX_QUERIES, self.team_weight)
        self._load = load
        self._stack = AsyncExitStack()
        self._client: AsyncOpaClient | None = None
        self._closed = False
        #: Why OPA's policy cannot be trusted to be ``revision`` (decisions deny while set).
        self._out_of_sync: str | None = None
        self._reload_lock = asyncio.Lock()
        #: Whether OPA's policy has an output rule, per revision asked about (a reload changes the answer).
        self._has_output_rule: dict[str, bool] = {}

    @classmethod
    async def connect(cls, url: str, policy_dir: Path, timeout_s: float, *, load: bool = True,
                      ready_timeout_s: float = READY_TIMEOUT_S,
                      wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S) -> "OpaPolicyEngine":
        """Reach OPA at ``url``, load ``policy_dir`` into it (``load=True``) and prove OPA holds it.

        With ``load=False`` OPA is assumed to have loaded the folder itself
        (``opa run --server /policies``); only the proof is done. Either way
        OPA must then report the same revision as ``policy_dir``, and the
        policy must find no problem in its data (``config_problems``, checked
        here once rather than on every decision), or ``PolicyLoadError`` is
        raised. ``load=True`` makes OPA's modules and
        base data exactly the folder's: other modules on OPA are deleted.

        A failed load may leave OPA partly loaded; to change the policy of a
        running gateway use :meth:`reload`, which puts the old policy back.
        """
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        address = OpaAddress.parse(url)
        snapshot = read_snapshot(Path(policy_dir))
        engine = cls(address, url.strip().rstrip("/"), snapshot, Path(policy_dir), timeout_s, load, wait_timeout_s)
        async with engine._admin("reach OPA") as client:
            try:
                # Bounded here too: one health check of a hung OPA would wait out ADMIN_TIMEOUT_S.
                await asyncio.wait_for(client.wait_for_ready(timeout=ready_timeout_s, interval=0.1),
                                       ready_timeout_s + 1.0)
            except (ConnectionsError, TimeoutError):
                raise PolicyLoadError(f"OPA at {engine._url} did not answer /health within {ready_timeout_s:g}s") \
                    from None
        if load:
            async with engine._admin("load the policy into OPA") as client:
                await upload_policy(client, snapshot)
        async with engine._admin("read the policy back from OPA") as client:
            await verify_policy(client, snapshot, engine._url, Path(policy_dir))
            await check_config(client, Path(policy_dir))
        # The decision session: its own timeout is only a backstop behind wait_for.
        engine._client = await engine._stack.enter_async_context(address.client(timeout_s + 1.0))
        log.info("policy revision %s on OPA at %s (%s)", snapshot.revision, engine._url,
                 "loaded by the gateway" if load else "loaded by OPA")
        return engine

    @property
    def revision(self) -> str:
        return self._snapshot.revision

    @property
    def url(self) -> str:
        return self._url

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    @property
    def snapshot(self) -> PolicySnapshot:
        """The policy (as read from the folder) that OPA was proven to hold."""
        return self._snapshot

    def team_weight(self, team: str | None) -> float:
        """A team's share in the policy OPA holds: its weight in the waiting lines (slots, admission)."""
        return self._weights(team)

    async def decide(self, input: dict[str, Any]) -> Decision:
        outcome = await self._query(DECISION_RULE, input)
        if outcome.kind == "busy":
            return _unavailable(f"no connection to OPA became free within {self._wait_timeout_s:g}s")
        if outcome.kind == "timeout":
            return _unavailable(f"policy evaluation on OPA took longer than {self._timeout_s:g}s", timed_out=True)
        if outcome.kind == "unreachable":
            return _unavailable(outcome.said, detail=outcome.error)
        if outcome.kind == "undefined":
            return _deny(POLICY_ERROR, "the policy gave no decision for this request")
        if outcome.kind == "error":
            return _deny(POLICY_ERROR, f"policy evaluation on OPA failed: {outcome.said}", detail=outcome.error)
        try:
            return Decision.from_document(outcome.value)
        except ValueError as exc:  # MalformedDecision
            return _deny(POLICY_ERROR, f"the policy returned a malformed decision: {exc}")

    async def decide_output(self, input: dict[str, Any]) -> OutputDecision:
        revision = self.revision  # the probe's answer holds for the policy this query ran on
        outcome = await self._query(OUTPUT_DECISION_RULE, input)
        if outcome.kind == "undefined":
            if await self._output_rule_absent(revision):
                return OutputDecision.allowed()
            return _stop(POLICY_ERROR, "the policy gave no output decision for this output")
        if outcome.kind == "busy":
            return _output_unavailable(f"no connection to OPA became free within {self._wait_timeout_s:g}s")
        if outcome.kind == "timeout":
            return _output_unavailable(f"policy evaluation on OPA took longer than {self._timeout_s:g}s",
                                       timed_out=True)
        if outcome.kind == "unreachable":
            return _output_unavailable(outcome.said, detail=outcome.error)
        if outcome.kind == "error":
            return _stop(POLICY_ERROR, f"output policy evaluation on OPA failed: {outcome.said}", detail=outcome.error)
        try:
            return OutputDecision.from_document(outcome.value)
        except ValueError as exc:  # MalformedDecision
            return _stop(POLICY_ERROR, f"the policy returned a malformed output decision: {exc}")

    async def has_output_rule(self) -> bool:
        return not await self._output_rule_absent(self.revision)

    async def _output_rule_absent(self, revision: str) -> bool:
        """Whether OPA's policy has no output rule, asked once per revision; no answer counts as "has one",
        so the output is stopped rather than let through.

        The output rule undefined on :data:`OUTPUT_RULE_PROBE` means no rule
        only while the request decision is defined on it: an OPA that lost
        its policy (restarted empty) answers every rule undefined, and that
        must stop outputs, not let them through.
        """
        if revision not in self._has_output_rule:
            probe = await self._query(OUTPUT_DECISION_RULE, OUTPUT_RULE_PROBE)
            if probe.kind == "undefined":
                policy = await self._query(DECISION_RULE, OUTPUT_RULE_PROBE)
                if policy.kind != "ok":
                    return False
            elif probe.kind not in ("ok", "error"):
                return False
            if self.revision != revision:
                return False
            # undefined on the probe is not "no rule" when the text defines one (it may need a real output)
            self._has_output_rule[revision] = (probe.kind != "undefined"
                                               or self._snapshot.defines_rule("govgate", "output_decision"))
        return not self._has_output_rule[revision]

    async def visible_models(self, principal: dict[str, Any], models: list[dict[str, Any]]) -> set[str]:
        return await self.visible_models_known(principal, models) or set()

    async def visible_models_known(self, principal: dict[str, Any],
                                   models: list[dict[str, Any]]) -> set[str] | None:
        outcome = await self._query(VISIBLE_MODELS_RULE, {"principal": principal, "models": models})
        if outcome.kind == "busy":
            raise PolicyUnavailable(f"no connection to OPA became free within {self._wait_timeout_s:g}s")
        if outcome.kind == "timeout":
            raise PolicyTimeout(f"policy evaluation on OPA took longer than {self._timeout_s:g}s")
        if outcome.kind == "unreachable":
            log.warning("visible_models: %s", outcome.error)
            raise PolicyUnavailable(outcome.said)
        if outcome.kind == "undefined":
            return set()
        if outcome.kind != "ok":  # no answer from the policy (closed, out of sync, an HTTP error)
            log.warning("visible_models: %s %s; listing no models", outcome.kind, outcome.error)
            return None
        names = outcome.value
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            log.warning("visible_models: policy returned %.200r, not a list of names; listing no models", names)
            return set()
        # Never advertise a model the caller did not offer, whatever the policy says.
        offered = {m.get("name") for m in models if isinstance(m, dict)}
        return {name for name in names if name in offered}

    async def reload(self, policy_dir: Path | None = None) -> str:
        """Make OPA evaluate ``policy_dir`` (default: the current folder) and return its revision.

        With ``load=True`` the folder is pushed to OPA and verified; on any
        failure the previous policy is pushed back and ``PolicyLoadError`` is
        raised. With ``load=False`` OPA is expected to have picked up the
        folder itself (``opa run --watch``); a mismatch raises. Either way,
        if OPA is then found to hold neither policy, decisions deny until a
        reload succeeds.
        """
        folder = Path(policy_dir) if policy_dir is not None else self._policy_dir
        async with self._reload_lock:
            snapshot = read_snapshot(folder)
            try:
                if self._load:
                    async with self._admin("load the policy into OPA") as client:
                        await upload_policy(client, snapshot)
                async with self._admin("read the policy back from OPA") as client:
                    await verify_policy(client, snapshot, self._url, folder)
                    await check_config(client, folder)
            except PolicyLoadError:
                await self._restore()
                raise
            old, self._snapshot, self._policy_dir = self._snapshot.revision, snapshot, folder
            self._weights = team_weights(snapshot)
            self._out_of_sync = None
        if old != snapshot.revision:
            log.info("policy reloaded on OPA at %s: revision %s -> %s", self._url, old, snapshot.revision)
        return snapshot.revision

    async def verify(self) -> str:
        """Check that OPA still holds :attr:`revision`; raise ``PolicyLoadError`` (and deny from now on) if not.

        For a gateway whose OPA loads the folder itself and may change it
        behind the gateway's back (``opa run --watch``).
        """
        async with self._reload_lock:
            try:
                async with self._admin("read the policy back from OPA") as client:
                    await verify_policy(client, self._snapshot, self._url, self._policy_dir)
            except OpaUnreachable:
                raise  # decisions are already "unavailable" while OPA cannot be reached; no verdict on its policy
            except PolicyLoadError as exc:
                if self._out_of_sync is None:
                    log.error("OPA at %s no longer holds policy revision %s; denying until it does: %s",
                              self._url, self.revision, exc)
                self._out_of_sync = str(exc)
                raise
            if self._out_of_sync is not None:
                log.info("OPA at %s holds policy revision %s again", self._url, self.revision)
            self._out_of_sync = None
            return self._snapshot.revision

    async def readiness_problem(self) -> str | None:
        """Why decisions cannot be had now (``/readyz``), or None: OPA holds another revision, or OPA's
        own ``/health`` does not answer 200 within a second (every decision would be ``policy_unavailable``).

        ``/readyz`` answers anyone, without a key, so the text names neither OPA's address nor the policy
        folder's path nor what differs (the error's class at most): the log has those (the out-of-sync
        error when it is found, :meth:`verify`), and the operator knows ``GOVGATE_OPA_URL``.
        """
        if self._out_of_sync is not None:
            return f"OPA does not hold revision {self.revision} (the gateway's log says what differs)"
        try:
            timeout = aiohttp.ClientTimeout(total=READINESS_TIMEOUT_S)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(f"{self._url}/health") as answer:
                if answer.status != 200:
                    return f"OPA answers its health check with HTTP {answer.status}"
        except TimeoutError:
            return f"OPA does not answer its health check within {READINESS_TIMEOUT_S:g}s"
        except aiohttp.ClientError as exc:
            return f"OPA does not answer its health check: {type(exc).__name__}"
        return None

    async def remote_revision(self) -> str:
        """The revision of what OPA holds now, computed as for a folder (for operators and tests)."""
        async with self._admin("read the policy back from OPA") as client:
            modules, data = await read_back(client, self._snapshot.base_data().keys())
        return compute_revision(modules, data)

    async def aclose(self) -> None:
        """Close the decision session; OPA keeps its policy (other gateways may be using it)."""
        if self._closed:
            return
        self._closed = True
        self._client = None
        await self._stack.aclose()

    # ------------------------------------------------------------ internals

    async def _query(self, rule: str, input: dict[str, Any]) -> _Outcome:
        """Ask OPA for ``rule``; the wait for a connection bounded by ``wait_timeout_s``, the query by
        ``timeout_s``; never raises."""
        if self._closed or self._client is None:
            return _Outcome("error", error="the policy engine is closed")
        if self._out_of_sync is not None:
            return _Outcome("error", error=f"OPA's policy is not revision {self.revision}: {self._out_of_sync}",
                            public=f"OPA does not hold the gateway's policy revision {self.revision} (the gateway's "
                                   "log says what differs)")
        try:
            # The client serialises with json.dumps defaults, which would send NaN to OPA.
            json.dumps(input, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return _Outcome("error", error=f"the policy input is not JSON: {exc}")
        # All connections busy: wait in line, bounded apart. A team's weight is read when it
        # starts waiting after being idle, so a reload's new shares apply from then.
        if not await self._slots.take(input_team(input), self._wait_timeout_s):
            return _Outcome("busy")
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for runs the query as a task of its own,
            # whose request leaves one loop turn later (gateway/resp_send.py says what that costs).
            async with asyncio.timeout(self._timeout_s):
                body = await query_rule(self._client, rule, input)
        except TimeoutError:
            return _Outcome("timeout")
        except OpaQueryError as exc:  # its summary names OPA's error codes and where, never its messages
            kind = "unreachable" if exc.status in _UNAVAILABLE_STATUSES else "error"
            return _Outcome(kind, error=f"OPA answered {exc} for {rule}")
        except aiohttp.ClientResponseError as exc:
            kind = "unreachable" if exc.status in _UNAVAILABLE_STATUSES else "error"
            return _Outcome(kind, error=f"OPA answered HTTP {exc.status} for {rule}")
        except aiohttp.ClientError as exc:  # refused, reset, dropped: no answer, not a wrong one
            return _Outcome("unreachable", error=f"cannot reach OPA at {self._url}: {type(exc).__name__}: {exc}",
                            public=f"cannot reach the policy server (OPA): {type(exc).__name__}")
        except Exception as exc:  # a bug here must deny, not crash the request
            log.exception("policy query to OPA could not run")
            return _Outcome("error", error=f"{type(exc).__name__}: {exc}",
                            public=f"the query could not run ({type(exc).__name__}; the gateway's log has it)")
        finally:
            self._slots.give()
        if not isinstance(body, dict):
            return _Outcome("error", error="OPA's answer is not a JSON object")
        if "result" not in body:
            return _Outcome("undefined")
        return _Outcome("ok", value=body["result"])

    async def _restore(self) -> None:
        """After a failed reload: put the current policy back (when we load it) and re-verify it."""
        try:
            if self._load:
                async with self._admin("restore the previous policy on OPA") as client:
                    await upload_policy(client, self._snapshot)
            async with self._admin("read the policy back from OPA") as client:
                await verify_policy(client, self._snapshot, self._url, self._policy_dir)
        except PolicyLoadError as exc:
            self._out_of_sync = str(exc)
            log.error("OPA at %s no longer holds policy revision %s; denying until a reload succeeds: %s",
                      self._url, self.revision, exc)
        else:
            self._out_of_sync = None

    @contextlib.asynccontextmanager
    async def _admin(self, what: str) -> AsyncIterator[AsyncOpaClient]:
        """A short-lived client for loading and checking; request failures become ``PolicyLoadError``."""
        try:
            async with self._address.client(ADMIN_TIMEOUT_S) as client:
                yield client
        except PolicyLoadError:
            raise
        except (aiohttp.ClientConnectionError, TimeoutError, ConnectionsError) as exc:
            raise OpaUnreachable(f"could not {what} at {self._url}: {describe_error(exc)}") from None
        except aiohttp.ClientResponseError as exc:
            error = OpaUnreachable if exc.status in _UNAVAILABLE_STATUSES else PolicyLoadError
            raise error(f"could not {what} at {self._url}: {describe_error(exc)}") from None
        except _REQUEST_ERRORS as exc:
            raise PolicyLoadError(f"could not {what} at {self._url}: {describe_error(exc)}") from None
        except (AttributeError, TypeError, KeyError) as exc:  # a 200 of another shape: not OPA's API
            raise PolicyLoadError(f"could not {what} at {self._url}: the answer is not OPA's "
                                  f"({type(exc).__name__}: {exc})") from None


# ``message`` goes into the decision (its client's answer, its audit entry); ``detail``, when given, is what the
# log says instead: OPA's address, the folder's path, what differs (probe s59 G4).


def _deny(code: str, message: str, *, detail: str | None = None) -> Decision:
    log.warning("policy deny %s: %s", code, detail or message)
    return Decision.fail_closed(code, message)


def _unavailable(message: str, *, timed_out: bool = False, detail: str | None = None) -> Decision:
    log.warning("policy unavailable: %s", detail or message)
    return Decision.unavailable(message, retry_after_s=UNAVAILABLE_RETRY_AFTER_S, timed_out=timed_out)


def _stop(code: str, message: str, *, detail: str | None = None) -> OutputDecision:
    log.warning("output policy stop %s: %s", code, detail or message)
    return OutputDecision.fail_closed(code, message)


def _output_unavailable(message: str, *, timed_out: bool = False, detail: str | None = None) -> OutputDecision:
    log.warning("output policy unavailable: %s", detail or message)
    return OutputDecision.unavailable(message, retry_after_s=UNAVAILABLE_RETRY_AFTER_S, timed_out=timed_out)
