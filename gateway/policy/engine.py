"""Policy engines: evaluate ``policies/`` for a request and return a Decision.

The gateway sees only :class:`PolicyEngine`; the embedded one here runs
regorus in a pool of child processes (OPA's is :mod:`gateway.policy.opa`).
Nothing here raises into the request path: an engine failure is a deny, no
answer in time is :meth:`Decision.unavailable`. Why child processes, and the
pool's bounds: docs/architecture.md, "Design notes by package".
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Final, Protocol, runtime_checkable

import msgspec

from gateway.policy.child import DECISION_RULE, VISIBLE_MODELS_RULE
from gateway.policy.decision import POLICY_ERROR, Decision, PolicyTimeout, PolicyUnavailable
from gateway.policy.fair_line import Team
from gateway.policy.output_decision import OUTPUT_DECISION_RULE, OutputDecision
from gateway.policy.pool import EvaluatorPool, EvaluatorStartError, Outcome
from gateway.policy.revision import PolicyFilesError, PolicySnapshot, read_policy
from gateway.policy.vm import MISMATCH_FLAG

log = logging.getLogger("govgate.policy")

__all__ = ["DECISION_RULE", "OUTPUT_DECISION_RULE", "VISIBLE_MODELS_RULE", "EmbeddedPolicyEngine", "PolicyEngine",
           "PolicyLoadError"]

#: How long a request may wait for a free evaluator when the caller does not say.
DEFAULT_WAIT_TIMEOUT_S = 5.0
#: One answer in this many is checked against the interpreter when the compiled VM answers (after the
#: first :data:`gateway.policy.vm.CHECK_FIRST`): ~0.6 ms once in 100 decisions, 6 µs a decision.
DEFAULT_VM_CHECK_EVERY = 100
#: ``Retry-After`` of a request refused because no decision could be had in time.
UNAVAILABLE_RETRY_AFTER_S = 1  # whole seconds, as Retry-After and every other retry_after_s
#: The input of the load-time question "does this policy have an output rule at all?": the shipped
#: output_decision is defined for any input (a malformed one stops), so undefined here means no rule.
OUTPUT_RULE_PROBE: dict[str, Any] = {}


class PolicyLoadError(RuntimeError):
    """The policy cannot be loaded: missing files, bad JSON, Rego that does not compile."""


@runtime_checkable
class PolicyEngine(Protocol):
    """What the gateway needs from a policy engine."""

    @property
    def revision(self) -> str:
        """Revision of the policy this engine evaluates (recorded with each decision)."""
        ...

    async def decide(self, input: dict[str, Any]) -> Decision:
        """The decision for one request; a deny whenever the policy gives no usable answer,
        :meth:`Decision.unavailable` when none could be had in time."""
        ...

    async def decide_output(self, input: dict[str, Any]) -> OutputDecision:
        """The output decision on one window of generated text (``gateway/requests/output_input.py``).

        A stop with ``policy_error`` whenever the policy gives no usable
        answer, :meth:`OutputDecision.unavailable` when none could be had in
        time, and an allow when the policy has no output rule at all (a
        policy written before output rules: outputs go unchecked).
        """
        ...

    async def has_output_rule(self) -> bool:
        """False only when the policy is known to have no output rule (outputs pass unchecked); asked
        once per revision, and True whenever the question goes unanswered (fail closed)."""
        ...

    async def visible_models(self, principal: dict[str, Any], models: list[dict[str, Any]]) -> set[str]:
        """Names among ``models`` (policy views) that ``principal`` may use.

        Empty when the policy errs (fail closed); raises :class:`PolicyUnavailable`
        when no answer could be had in time.
        """
        ...

    async def visible_models_known(self, principal: dict[str, Any],
                                   models: list[dict[str, Any]]) -> set[str] | None:
        """:meth:`visible_models`, but None where it fails closed because the evaluation failed (an
        evaluator lost, OPA out of sync or answering an error): an empty list the policy did not give,
        which must not be kept as its answer (``gateway/requests/hidden_models.py``)."""
        ...

    async def aclose(self) -> None:
        """Release the engine's resources; later calls deny."""
        ...


class EmbeddedPolicyEngine:
    """Evaluates the policy with regorus in a pool of child processes."""

    def __init__(self, snapshot: PolicySnapshot, timeout_s: float, *, evaluators: int = 1,
                 wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S, vm: str = "auto",
                 vm_check_every: int = DEFAULT_VM_CHECK_EVERY) -> None:
        """Start ``evaluators`` children for a policy already read; raises ``PolicyLoadError``.

        ``vm``: "auto" answers on regorus's compiled VM where it compiles the
        policy and agrees with the interpreter (:mod:`gateway.policy.vm`),
        checking one answer in ``vm_check_every``, if the policy's modules
        are the shipped ones (:mod:`gateway.policy.vm_trust`); "on" for any
        policy; "off" only interprets.
        """
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if wait_timeout_s < 0:
            raise ValueError("wait_timeout_s must not be negative")
        try:
            data = [json.dumps(doc) for _, doc in snapshot.data_documents()]
        except PolicyFilesError as exc:
            raise PolicyLoadError(str(exc)) from None
        self._snapshot = snapshot
        self._revision = snapshot.revision
        self._timeout_s = timeout_s
        #: Whether the policy has an output rule (None: not asked yet); one engine holds one revision.
        self._has_output_rule: bool | None = None
        #: A team's share in this revision's data: its weight in the waiting lines (pool, admission).
        self.team_weight: Callable[[Team], float] = team_weights(snapshot)
        try:
            vm_data = json.dumps(snapshot.base_data()) if vm in ("auto", "on") else None
        except PolicyFilesError:  # two files giving one path different values: the interpreter merges them
            vm_data = None
        setup = json.dumps({"modules": list(snapshot.modules), "data": data, "vm": vm, "vm_data": vm_data,
                            "vm_check_every": vm_check_every}).encode()
        try:
            self._pool = EvaluatorPool(setup, evaluators, timeout_s, wait_timeout_s, self.team_weight)
        except EvaluatorStartError as exc:
            raise PolicyLoadError(str(exc)) from None
        for note in sorted(set(self._pool.answered_by)):
            log.info("policy revision %s: decisions on %s", snapshot.revision[:12], note)

    async def readiness_problem(self) -> str | None:
        """Why decisions cannot be had now (``/readyz``), or None: no evaluator is running (each is being
        replaced after a crash or a timeout, or could not be started again). Idle ones found dead are
        replaced from here, so the answer comes right again without a request."""
        self._pool.revive_idle()
        if not self._pool.alive:
            return "no policy evaluator is running"
        return None

    @classmethod
    def load(cls, policy_dir: Path, timeout_s: float, *, evaluators: int = 1,
             wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S, vm: str = "auto",
             vm_check_every: int = DEFAULT_VM_CHECK_EVERY) -> "EmbeddedPolicyEngine":
        """Read and compile ``policy_dir``; a policy that does not compile raises ``PolicyLoadError``."""
        try:
            snapshot = read_policy(Path(policy_dir))
        except PolicyFilesError as exc:
            raise PolicyLoadError(str(exc)) from None
        return cls(snapshot, timeout_s, evaluators=evaluators, wait_timeout_s=wait_timeout_s, vm=vm,
                   vm_check_every=vm_check_every)

    @property
    def answered_by(self) -> list[str]:
        """Per evaluator, who answers its questions: the compiled VM or the interpreter, and why."""
        return self._pool.answered_by

    @property
    def revision(self) -> str:
        return self._revision

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    @property
    def snapshot(self) -> PolicySnapshot:
        """The policy (modules and data) the evaluators were started with; its data gives the team shares."""
        return self._snapshot

    @property
    def wait_timeout_s(self) -> float:
        return self._pool.wait_timeout_s

    @property
    def evaluator_pids(self) -> list[int | None]:
        """Process ids of the children evaluating the policy (for operators and tests)."""
        return self._pool.pids

    @property
    def free_evaluators(self) -> int:
        """Evaluators ready for a decision right now (for operators and tests)."""
        return self._pool.free

    @property
    def waiting_by_team(self) -> dict[Team, int]:
        """Requests waiting for an evaluator, per team (for operators and tests)."""
        return self._pool.waiting

    @property
    def evaluator_pid(self) -> int | None:
        """Process id of the first child (the only one with ``evaluators=1``)."""
        return self._pool.pids[0]

    async def decide(self, input: dict[str, Any]) -> Decision:
        outcome = await self._run(DECISION_RULE, input)
        if outcome.kind == "busy":
            return _unavailable(f"no policy evaluator became free within {self._pool.wait_timeout_s:g}s")
        if outcome.kind == "timeout":
            return _unavailable(f"policy evaluation took longer than {self._timeout_s:g}s", timed_out=True)
        if outcome.kind == "undefined":
            return _deny(POLICY_ERROR, "the policy gave no decision for this request")
        if outcome.kind == "error":
            return _deny(POLICY_ERROR, f"policy evaluation failed: {_summarize(outcome.text)}", detail=outcome.text)
        try:
            return Decision.from_document(json.loads(outcome.text))
        except ValueError as exc:  # MalformedDecision, or not JSON at all
            return _deny(POLICY_ERROR, f"the policy returned a malformed decision: {exc}")

    async def decide_output(self, input: dict[str, Any]) -> OutputDecision:
        outcome = await self._run(OUTPUT_DECISION_RULE, input)
        if _no_rule(outcome):
            if await self._output_rule_absent():
                return OutputDecision.allowed()
            return _stop(POLICY_ERROR, "the policy gave no output decision for this output")
        if outcome.kind == "busy":
            return _output_unavailable(f"no policy evaluator became free within {self._pool.wait_timeout_s:g}s")
        if outcome.kind == "timeout":
            return _output_unavailable(f"policy evaluation took longer than {self._timeout_s:g}s", timed_out=True)
        if outcome.kind == "error":
            return _stop(POLICY_ERROR, f"output policy evaluation failed: {_summarize(outcome.text)}",
                         detail=outcome.text)
        try:
            return OutputDecision.from_document(json.loads(outcome.text))
        except ValueError as exc:  # MalformedDecision, or not JSON at all
            return _stop(POLICY_ERROR, f"the policy returned a malformed output decision: {exc}")

    async def has_output_rule(self) -> bool:
        return not await self._output_rule_absent()

    async def _output_rule_absent(self) -> bool:
        """Whether the policy has no output rule: asked once per engine, on :data:`OUTPUT_RULE_PROBE`.

        An answer that cannot be had (busy, timeout) counts as "has one", so
        the output is stopped rather than let through unchecked.
        """
        if self._has_output_rule is None:
            probe = await self._run(OUTPUT_DECISION_RULE, OUTPUT_RULE_PROBE)
            if probe.kind in ("busy", "timeout"):
                return False
            # undefined on the probe is not "no rule" when the text defines one (it may need a real output)
            self._has_output_rule = not _no_rule(probe) or self._snapshot.defines_rule("govgate", "output_decision")
        return not self._has_output_rule

    async def visible_models(self, principal: dict[str, Any], models: list[dict[str, Any]]) -> set[str]:
        return await self.visible_models_known(principal, models) or set()

    async def visible_models_known(self, principal: dict[str, Any],
                                   models: list[dict[str, Any]]) -> set[str] | None:
        outcome = await self._run(VISIBLE_MODELS_RULE, {"principal": principal, "models": models})
        if outcome.kind == "busy":
            raise PolicyUnavailable(f"no policy evaluator became free within {self._pool.wait_timeout_s:g}s")
        if outcome.kind == "timeout":
            raise PolicyTimeout(f"policy evaluation took longer than {self._timeout_s:g}s")
        if outcome.kind == "undefined":
            return set()
        if outcome.kind != "ok":  # no answer from the policy (an evaluator lost, a runtime error)
            log.warning("visible_models: %s %s; no model may be used (GET /v1/models answers policy_error)",
                        outcome.kind, _summarize(outcome.text))
            return None
        try:
            names = json.loads(outcome.text)
        except ValueError:
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            log.warning("visible_models: policy returned %.200s, not a list of names; listing no models", outcome.text)
            return set()
        # Never advertise a model the caller did not offer, whatever the policy says.
        offered = {m.get("name") for m in models if isinstance(m, dict)}
        return {name for name in names if name in offered}

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def _run(self, rule: str, input: dict[str, Any]) -> Outcome:
        """Evaluate ``rule`` on a free evaluator of the pool, waiting in the line of the input's team."""
        try:
            payload = input_json(input)
        except (TypeError, ValueError) as exc:
            return Outcome("error", f"the policy input is not JSON: {exc}")
        try:
            outcome, reply = await self._pool.run(rule.encode() + b"\n" + payload, input_team(input))
        except Exception as exc:  # a bug here must deny, not crash the request
            log.exception("policy evaluation could not run")
            return Outcome("error", f"{type(exc).__name__}: {exc}")
        if outcome.kind != "ok":
            return outcome
        status, _, text = reply.decode("utf-8", "replace").partition("\n")
        if status.endswith(MISMATCH_FLAG):
            status = status.removesuffix(MISMATCH_FLAG)
            _vm_mismatch(rule)
        if status == "ok":
            return Outcome("ok", text)
        if status == "undefined":
            return Outcome("undefined")
        return Outcome("error", text)


#: The policy input's encoder (msgspec: a tenth of ``json.dumps``'s CPU) and the decoder that checks it.
_INPUT_ENCODER: Final = msgspec.json.Encoder()
_INPUT_DECODER: Final = msgspec.json.Decoder()


def input_json(input: Any) -> bytes:
    """The policy input as compact UTF-8 JSON, as the evaluators read it.

    The same document ``json.dumps(input, separators=(",", ":"),
    ensure_ascii=False, allow_nan=False)`` gives, for about a third of its
    CPU (two per request: the request's decision and the output's). msgspec
    differs from it in what it accepts: it writes NaN and infinities as
    ``null`` and encodes types JSON has not (datetimes, sets, enums, …),
    where ``json.dumps`` refuses them; and it writes some floats in another
    spelling of the same number (``1e16`` for ``1e+16``). So its text is
    kept only when it reads back equal to ``input``: exactly what
    ``json.dumps``'s text reads back as. Anything else (also anything
    msgspec refuses) is left to ``json.dumps``, whose text, or
    ``TypeError``/``ValueError`` (a lone surrogate: ``UnicodeEncodeError``),
    it was before.
    """
    try:
        data = _INPUT_ENCODER.encode(input)
        if _INPUT_DECODER.decode(data) == input:
            return data
    except (TypeError, ValueError, RecursionError, OverflowError):
        pass
    return json.dumps(input, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def input_team(input: Any) -> Team:
    """The team whose line a policy question waits in: ``principal.team`` of its input (request,
    output or ``visible_models``), None when there is none or the input is malformed (the policy
    judges that, not the line)."""
    principal = input.get("principal") if isinstance(input, dict) else None
    team = principal.get("team") if isinstance(principal, dict) else None
    return team if isinstance(team, str) else None


def team_weights(snapshot: PolicySnapshot) -> Callable[[Team], float]:
    """A team's weight in the waiting line: its ``share`` in this policy's data, as the workers read it.

    Imported here, not at the top: the evaluator children import this
    package, and the shares module brings in redis, which they must not pay
    for at every (re)start.
    """
    from gateway.policy.shares import ANY_TEAM, team_shares
    from workers.contract.fair_queues import encode_name

    try:
        shares = team_shares(snapshot.base_data())
    except PolicyFilesError:  # cannot happen for a policy that loaded; equal weights then
        shares = {}
    default = shares.get(ANY_TEAM, 1.0)

    def weight_of(team: Team) -> float:
        return default if team is None else shares.get(encode_name(team), default)

    return weight_of


def _vm_mismatch(rule: str) -> None:
    """An evaluator's compiled VM answered differently from its interpreter (which answered): counted and
    logged, never the input (it holds the prompt). That evaluator interprets from now on."""
    from gateway.observability.metrics import POLICY_VM_MISMATCHES

    POLICY_VM_MISMATCHES.inc()
    log.warning("policy: an evaluator's compiled VM answered %s differently from the interpreter; the "
                "interpreter's answer was used and that evaluator interprets from now on", rule)


def _unavailable(message: str, *, timed_out: bool = False) -> Decision:
    log.warning("policy unavailable: %s", message)
    return Decision.unavailable(message, retry_after_s=UNAVAILABLE_RETRY_AFTER_S, timed_out=timed_out)


def _deny(code: str, message: str, detail: str = "") -> Decision:
    # The reason carries a one-line summary; the log keeps the full engine error, its quoted values left out.
    detail = without_values(detail)
    log.warning("policy deny %s: %s%s", code, message, f"\n{detail}" if "\n" in detail else "")
    return Decision.fail_closed(code, message)


def _no_rule(outcome: Outcome) -> bool:
    """The rule has no value: undefined, or (regorus) no rule of that name at all."""
    return outcome.kind == "undefined" or (outcome.kind == "error" and outcome.text.startswith("not a valid rule path"))


def _output_unavailable(message: str, *, timed_out: bool = False) -> OutputDecision:
    log.warning("output policy unavailable: %s", message)
    return OutputDecision.unavailable(message, retry_after_s=UNAVAILABLE_RETRY_AFTER_S, timed_out=timed_out)


def _stop(code: str, message: str, detail: str = "") -> OutputDecision:
    detail = without_values(detail)
    log.warning("output policy stop %s: %s%s", code, message, f"\n{detail}" if "\n" in detail else "")
    return OutputDecision.fail_closed(code, message)


#: A backtick-quoted name in a regorus error (a builtin, a rule: kept); any other quoted span is a value.
_QUOTED_NAME = re.compile(r"`[A-Za-z_][A-Za-z0-9_.]*`")
_BACKTICKED = re.compile(r"`[^`\n]*`")
_DOUBLE_QUOTED = re.compile(r'"(?:[^"\\\n]|\\.)*"')


def without_values(text: str) -> str:
    """A regorus error without the values it quotes: kept are the builtin's or rule's name and where.

    regorus quotes the value a builtin choked on (`` `add` expects numeric
    argument. Got `"my card 4111…"` instead``): a prompt's or an output's
    text, which went into the reason (the client's 403, the chained audit
    body, never erasable) and the log, whatever ``prompt_logging`` said
    (probe p3). OPA's errors are reduced the same way
    (:mod:`gateway.policy.opa_query`).
    """
    text = _BACKTICKED.sub(lambda m: m.group(0) if _QUOTED_NAME.fullmatch(m.group(0)) else "`…`", text)
    return _DOUBLE_QUOTED.sub('"…"', text)


def _summarize(text: str, limit: int = 300) -> str:
    """One line from a regorus error: its ``error:`` line and where it happened, without quoted values."""
    text = without_values(text.split("Stack backtrace:", 1)[0])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    error = next((line.removeprefix("error: ") for line in lines if line.startswith("error:")), None)
    where = next((line.removeprefix("--> ").strip() for line in lines if line.startswith("-->")), None)
    if error and where:
        summary = f"{error} (at {where})"
    else:
        summary = lines[0] if lines else "unknown error"
    return summary if len(summary) <= limit else summary[: limit - 1] + "…"
