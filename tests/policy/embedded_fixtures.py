"""Policy inputs, small policies and the shipped-policy engine for the embedded-engine tests.

Shared by the tests of the shipped policy, of the embedded engine and of its
evaluator pool, so all of them ask with the same input the gateway builds and
fail with the same slow and broken policies. Fixtures here are imported by
name (``# noqa: F401``) by the files that use them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from gateway.policy import Decision, EmbeddedPolicyEngine
from tests.opa_fixtures import POLICY_DIR
from workers.contract.registry import ModelSpec

TIMEOUT_S = 5.0

TINY = ModelSpec(name="govgate-tiny", path=Path("unused.gguf"), tags=("tiny",))
BIG = ModelSpec(name="big", path=Path("unused.gguf"), context_length=4096)

ALLOW = '{"allow": true, "reasons": [], "obligations": {"max_tokens": 7, "prompt_logging": "full"}}'

# Takes minutes if left alone: 10^12 products.
SLOW = """
slow_count := count([p |
	some i in numbers.range(1, 1000000)
	some j in numbers.range(1, 1000000)
	p := i * j
])
"""

# Slow only when the input asks: the load-time trial evaluation (empty input) stays quick.
SLOW_WHEN_ASKED = f"""{SLOW}
decision := {ALLOW} if not input.slow

decision := {ALLOW} if {{
	input.slow
	slow_count > 0
}}

visible_models := set()
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def request_input(roles: list[str], model: ModelSpec = TINY, max_tokens: int = 100) -> dict[str, Any]:
    """A policy input as the gateway builds it (docs/architecture.md, "Policy input")."""
    return {
        "principal": {"id": "u-1", "team": "t-1", "roles": roles, "key_id": "k-1"},
        "request": {
            "endpoint": "chat.completions",
            "model": model.name,
            "messages": [{"role": "user", "content": "hello"}],
            "text": "hello",
            "max_tokens": max_tokens,
            "stream": False,
            "purpose": None,
        },
        "model": model.policy_view(),
        "time": {"now_ns": 1_700_000_000_000_000_000, "hour_utc": 12, "weekday": "Tuesday"},
    }


def with_text(policy_input: dict[str, Any], text: str) -> dict[str, Any]:
    return {**policy_input, "request": {**policy_input["request"], "text": text}}


def write_policy(folder: Path, rego: str, data: dict[str, Any] | None = None) -> Path:
    """A policy folder holding one module (``package govgate`` added) and optional data."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.rego").write_text("package govgate\n\n" + rego)
    if data is not None:
        (folder / "data.json").write_text(json.dumps(data))
    return folder


@pytest.fixture
async def shipped() -> AsyncIterator[EmbeddedPolicyEngine]:
    """The engine on the policy that ships in policies/."""
    engine = EmbeddedPolicyEngine.load(POLICY_DIR, TIMEOUT_S)
    try:
        yield engine
    finally:
        await engine.aclose()


async def engine_for(folder: Path, rego: str, timeout_s: float = TIMEOUT_S) -> EmbeddedPolicyEngine:
    return EmbeddedPolicyEngine.load(write_policy(folder, rego), timeout_s)


def exited(pid: int) -> bool:
    """True once ``pid`` is gone or a zombie (its parent has not reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def codes(decision: Decision) -> list[str]:
    return [reason.code for reason in decision.reasons]
