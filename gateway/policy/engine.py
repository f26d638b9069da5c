"""Policy engines: evaluate ``policies/`` for a request and return a Decision.

Two engines answer the same questions over the same policy folder: the
embedded one here (regorus, in a child process) and, in production, an OPA
server. The gateway only sees :class:`PolicyEngine`.

Why the embedded engine runs regorus in a child process, not a thread:
regorus holds the GIL for a whole evaluation (measured: a 0.6 s evaluation on
a worker thread let another Python thread run once). On a thread, a slow or
runaway policy would freeze the event loop, so a timeout could neither fire
nor be enforced. In a child process the event loop stays free, and a timed-out
evaluation is ended by killing the child and starting a fresh one, which
bounds every evaluation by ``timeout_s``. The child also satisfies regorus's
other rule: an ``Engine`` may only be used by the thread that created it (the
child's main thread). The price is one pipe round trip per evaluation (a few
hundred microseconds; see tests/test_policy_engine.py for the figure).

Whatever goes wrong (no decision, a malformed one, an engine error, a regorus
panic, a crash, a timeout, a closed engine) the answer is a deny; nothing
here raises into the request path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from gateway.policy.decision import POLICY_ERROR, POLICY_TIMEOUT, Decision
from gateway.policy.revision import PolicyFilesError, PolicySnapshot, read_policy

log = logging.getLogger("govgate.policy")

#: The rule whose value is the decision for one request.
DECISION_RULE = "data.govgate.decision"
#: The rule whose value is the set of model names a principal may use.
VISIBLE_MODELS_RULE = "data.govgate.visible_models"

#: Longest a child may take to start, compile the policy and pass its trial
#: evaluations; only paid at load and after a timeout or crash.
START_TIMEOUT_S = 30.0

# What regorus's eval_rule_as_json returns for an undefined rule. A rule whose
# value really is this string is no valid decision or model list either, so
# reading it as "undefined" denies in both cases.
_UNDEFINED_JSON = '"<undefined>"'

# Exceptions that must end the child rather than become a deny.
_PASS_THROUGH = (KeyboardInterrupt, SystemExit)


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
        """The decision for one request; a deny whenever the policy gives no usable answer."""
        ...

    async def visible_models(self, principal: dict[str, Any], models: list[dict[str, Any]]) -> set[str]:
        """Names among ``models`` (policy views) that ``principal`` may use; empty on any failure."""
        ...

    async def aclose(self) -> None:
        """Release the engine's resources; later calls deny."""
        ...


@dataclass(frozen=True)
class _Outcome:
    """What one evaluation produced, before it is read as a decision."""

    kind: Literal["ok", "undefined", "error", "timeout"]
    #: The rule's JSON value for "ok"; the error text for "error".
    text: str = ""


class EmbeddedPolicyEngine:
    """Evaluates the policy with regorus in one dedicated child process."""

    def __init__(self, snapshot: PolicySnapshot, timeout_s: float) -> None:
        """Start the evaluator for a policy already read; raises ``PolicyLoadError``."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        try:
            data = [json.dumps(doc) for _, doc in snapshot.data_documents()]
        except PolicyFilesError as exc:
            raise PolicyLoadError(str(exc)) from None
        self._revision = snapshot.revision
        self._timeout_s = timeout_s
        self._closed = False
        self._evaluator = _Evaluator(modules=list(snapshot.modules), data=data)
        # One thread owns the child and its pipe: evaluations queue here in
        # order, and start/stop never race with an evaluation.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="govgate-policy")
        try:
            self._io.submit(self._evaluator.start).result()
        except BaseException:
            self._io.shutdown(wait=False)
            raise

    @classmethod
    def load(cls, policy_dir: Path, timeout_s: float) -> "EmbeddedPolicyEngine":
        """Read and compile ``policy_dir``; a policy that does not compile raises ``PolicyLoadError``."""
        try:
            snapshot = read_policy(Path(policy_dir))
        except PolicyFilesError as exc:
            raise PolicyLoadError(str(exc)) from None
        return cls(snapshot, timeout_s)

    @property
    def revision(self) -> str:
        return self._revision

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    @property
    def evaluator_pid(self) -> int | None:
        """Process id of the child evaluating the policy (for operators and tests)."""
        return self._evaluator.pid

    async def decide(self, input: dict[str, Any]) -> Decision:
        outcome = await self._run(DECISION_RULE, input)
        if outcome.kind == "timeout":
            return _deny(POLICY_TIMEOUT, f"policy evaluation took longer than {self._timeout_s:g}s")
        if outcome.kind == "undefined":
            return _deny(POLICY_ERROR, "the policy gave no decision for this request")
        if outcome.kind == "error":
            return _deny(POLICY_ERROR, f"policy evaluation failed: {_summarize(outcome.text)}", detail=outcome.text)
        try:
            return Decision.from_document(json.loads(outcome.text))
        except ValueError as exc:  # MalformedDecision, or not JSON at all
            return _deny(POLICY_ERROR, f"the policy returned a malformed decision: {exc}")

    async def visible_models(self, principal: dict[str, Any], models: list[dict[str, Any]]) -> set[str]:
        outcome = await self._run(VISIBLE_MODELS_RULE, {"principal": principal, "models": models})
        if outcome.kind == "undefined":
            return set()
        if outcome.kind != "ok":
            log.warning("visible_models: %s %s; listing no models", outcome.kind, _summarize(outcome.text))
            return set()
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
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._io, self._evaluator.stop)
        finally:
            self._io.shutdown(wait=False)

    async def _run(self, rule: str, input: dict[str, Any]) -> _Outcome:
        """Evaluate ``rule`` on the I/O thread, bounded by ``timeout_s`` including queueing."""
        if self._closed:
            return _Outcome("error", "the policy engine is closed")
        try:
            payload = json.dumps(input, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            return _Outcome("error", f"the policy input is not JSON: {exc}")
        deadline = time.monotonic() + self._timeout_s
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._io, self._evaluator.evaluate, rule, payload, deadline)
            # Cancelling on timeout also drops the job if it is still queued.
            return await asyncio.wait_for(future, self._timeout_s)
        except TimeoutError:
            return _Outcome("timeout")
        except Exception as exc:  # a bug here must deny, not crash the request
            log.exception("policy evaluation could not run")
            return _Outcome("error", f"{type(exc).__name__}: {exc}")


def _deny(code: str, message: str, detail: str = "") -> Decision:
    # The reason carries a one-line summary; the log keeps the full engine error.
    log.warning("policy deny %s: %s%s", code, message, f"\n{detail}" if "\n" in detail else "")
    return Decision.fail_closed(code, message)


def _summarize(text: str, limit: int = 300) -> str:
    """One line from a regorus error: its ``error:`` line and where it happened."""
    text = text.split("Stack backtrace:", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    error = next((line.removeprefix("error: ") for line in lines if line.startswith("error:")), None)
    where = next((line.removeprefix("--> ").strip() for line in lines if line.startswith("-->")), None)
    if error and where:
        summary = f"{error} (at {where})"
    else:
        summary = lines[0] if lines else "unknown error"
    return summary if len(summary) <= limit else summary[: limit - 1] + "…"


# --------------------------------------------------------------------------
# The parent's handle on the child. Every method runs on the engine's I/O thread.


class _Evaluator:
    """Starts, feeds and replaces the child process that owns the regorus Engine.

    The child is a plain ``python -c`` subprocess rather than a multiprocessing
    one: multiprocessing's "spawn" re-runs the parent's main script in the child,
    which breaks any script without a ``__main__`` guard, and "fork" copies a
    threaded server. Messages are length-framed by ``multiprocessing.connection``.
    """

    def __init__(self, modules: list[tuple[str, str]], data: list[str]) -> None:
        self._setup = json.dumps({"modules": modules, "data": data}).encode()
        self._process: subprocess.Popen[bytes] | None = None
        self._send: Connection | None = None
        self._recv: Connection | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start a child and wait until it has compiled the policy; raise ``PolicyLoadError`` if it cannot."""
        self.stop()
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _CHILD_COMMAND],
                stdin=to_child_r,
                stdout=from_child_w,
                env=_child_environment(),
                close_fds=True,
                # Out of the terminal's process group: Ctrl-C is the parent's to handle.
                start_new_session=True,
            )
        except OSError as exc:
            for fd in (to_child_w, from_child_r):
                os.close(fd)
            raise PolicyLoadError(f"the policy evaluator could not be started: {exc}") from None
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        send = Connection(to_child_w, readable=False)
        recv = Connection(from_child_r, writable=False)
        self._process, self._send, self._recv = process, send, recv
        try:
            send.send_bytes(self._setup)
            if not recv.poll(START_TIMEOUT_S):
                raise PolicyLoadError(
                    f"the policy did not compile and pass its trial evaluations within {START_TIMEOUT_S:g}s"
                )
            status, _, text = recv.recv_bytes().decode("utf-8", "replace").partition("\n")
        except (EOFError, OSError):
            self.stop()
            raise PolicyLoadError(
                f"the policy evaluator exited while starting (exit code {process.returncode})"
            ) from None
        except BaseException:
            self.stop()
            raise
        if status != "ready":
            self.stop()
            raise PolicyLoadError(f"the policy cannot be loaded: {text.strip()}")

    def evaluate(self, rule: str, payload: bytes, deadline: float) -> _Outcome:
        """Send one evaluation; kill the child if it is not done by ``deadline``."""
        if self._process is None or self._process.poll() is not None:
            try:
                self.start()
            except PolicyLoadError as exc:
                return _Outcome("error", f"the policy evaluator could not start: {exc}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return _Outcome("timeout")
        assert self._send is not None and self._recv is not None
        try:
            self._send.send_bytes(rule.encode() + b"\n" + payload)
            if not self._recv.poll(remaining):
                self._replace("timed out")
                return _Outcome("timeout")
            reply = self._recv.recv_bytes()
        except (EOFError, OSError):
            self._replace("exited during an evaluation")
            return _Outcome("error", "the policy evaluator exited during the evaluation")
        status, _, text = reply.decode("utf-8").partition("\n")
        if status == "ok":
            return _Outcome("ok", text)
        if status == "undefined":
            return _Outcome("undefined")
        return _Outcome("error", text)

    def stop(self) -> None:
        """End the child (it may be mid-evaluation: regorus cannot be interrupted otherwise)."""
        process, send, recv = self._process, self._send, self._recv
        self._process = self._send = self._recv = None
        for conn in (send, recv):
            if conn is not None:
                conn.close()
        if process is not None:
            if process.poll() is None:
                process.kill()
            process.wait()

    def _replace(self, why: str) -> None:
        """Kill a busy or dead child and start another, so the next evaluation finds one ready."""
        log.warning("policy evaluator (pid %s) %s; starting a new one", self.pid, why)
        self.stop()
        try:
            self.start()
        except PolicyLoadError as exc:
            log.error("policy evaluator could not be restarted: %s", exc)


def _child_environment() -> dict[str, str]:
    """The parent's environment, with the folder holding ``gateway`` importable.

    regorus errors carry a long Rust backtrace when RUST_BACKTRACE=1 (set on
    some machines). RUST_LIB_BACKTRACE=0 turns that off for errors while panics
    still follow RUST_BACKTRACE; an operator who sets either keeps their value.
    """
    env = dict(os.environ)
    env.setdefault("RUST_BACKTRACE", "0")
    env.setdefault("RUST_LIB_BACKTRACE", "0")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


# --------------------------------------------------------------------------
# The child. Runs in its own process; the only place regorus is imported.

_CHILD_COMMAND = "from gateway.policy.engine import _child_main; _child_main()"


def _child_main() -> None:
    """Child entry point: build the engine once, then answer one request at a time."""
    recv = Connection(os.dup(0), writable=False)
    send = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # a stray print must not corrupt the protocol on stdout
    try:
        setup = json.loads(recv.recv_bytes())
        engine = _build_engine([tuple(m) for m in setup["modules"]], setup["data"])
    except (EOFError, OSError):
        return
    except _PASS_THROUGH:
        raise
    except BaseException as exc:  # regorus panics are BaseException (pyo3 PanicException)
        send.send_bytes(b"error\n" + _error_text(exc).encode())
        return
    send.send_bytes(b"ready\n")
    while True:
        try:
            request = recv.recv_bytes()
            send.send_bytes(_evaluate(engine, request))
        except (EOFError, OSError):
            return  # the parent closed the pipe, died, or stopped us


def _build_engine(modules: list[tuple[str, str]], data: list[str]) -> Any:
    """Compile the policy, and prove it: regorus reports some errors (unsafe
    variables, a missing entry point) only when a rule is first evaluated."""
    import regorus

    engine = regorus.Engine()
    for path, text in modules:
        engine.add_policy(path, text)
    for doc in data:
        engine.add_data_json(doc)
    trials = ((DECISION_RULE, "{}"), (VISIBLE_MODELS_RULE, '{"principal":{},"models":[]}'))
    for rule, trial_input in trials:
        engine.set_input_json(trial_input)
        try:
            engine.eval_rule_as_json(rule)
        except RuntimeError as exc:
            if "not a valid rule path" in str(exc):
                raise RuntimeError(f"the policy defines no rule {rule}") from None
            raise RuntimeError(f"the policy fails a trial evaluation of {rule} with an empty input: {exc}") from None
    return engine


def _evaluate(engine: Any, request: bytes) -> bytes:
    """One request: ``rule\\ninput-json`` in, ``status\\nbody`` out; never raises for engine faults."""
    rule, _, payload = request.partition(b"\n")
    try:
        engine.set_input_json(payload.decode("utf-8"))
        value = engine.eval_rule_as_json(rule.decode("utf-8"))
    except _PASS_THROUGH:
        raise
    except BaseException as exc:  # includes regorus panics
        return b"error\n" + _error_text(exc).encode("utf-8", "replace")
    if value == _UNDEFINED_JSON:
        return b"undefined\n"
    return b"ok\n" + value.encode("utf-8")


def _error_text(exc: BaseException) -> str:
    text = str(exc).split("Stack backtrace:", 1)[0].strip()
    if not isinstance(exc, Exception):
        return f"regorus panicked: {text}"
    return text
