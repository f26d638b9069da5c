"""What :class:`SeenModels` keeps (``gateway/requests/hidden_models.py``): only answers the policy gave.

An evaluation that failed (an evaluator lost mid-evaluation, OPA out of sync
or answering an error) is listed as no model by ``visible_models``, to fail
closed; kept, it would answer every later refusal of a model the key may see
as an unknown model's 404, for as long as the revision lasts. Real regorus
evaluator, killed for real.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import AsyncIterator

import anyio
import pytest

from gateway.auth import Principal
from gateway.policy import EmbeddedPolicyEngine
from gateway.policy.reloader import ReloadingPolicyEngine
from gateway.requests.hidden_models import SeenModels
from tests.policy.embedded_fixtures import ALLOW, TINY, engine_for

pytestmark = pytest.mark.anyio

EVERY_MODEL = f"decision := {ALLOW}\nvisible_models := {{m.name | some m in input.models}}\n"
ALICE = Principal(id="alice", team="research", roles=("analyst",), key_id="0123456789ab")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _lost_mid_evaluation(engine: EmbeddedPolicyEngine, seen: SeenModels) -> bool:
    """``seen.may_see`` while its evaluator is killed mid-evaluation: stopped first, so it cannot answer,
    then killed once the pool has handed it the question."""
    pid = engine.evaluator_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        async with anyio.create_task_group() as tg:
            async def kill_once_asked() -> None:
                while engine.free_evaluators:
                    await anyio.sleep(0.01)
                os.kill(pid, signal.SIGKILL)

            tg.start_soon(kill_once_asked)
            return await seen.may_see(ALICE, TINY)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextlib.asynccontextmanager
async def _seen_models(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedPolicyEngine, ReloadingPolicyEngine,
                                                               SeenModels]]:
    """A real regorus engine that shows every model, its reloading wrapper and a SeenModels over it."""
    engine = await engine_for(tmp_path, EVERY_MODEL)
    policy = ReloadingPolicyEngine(engine, lambda: engine, policy_dir=tmp_path)
    try:
        with anyio.fail_after(60):
            yield engine, policy, SeenModels(policy)
    finally:
        await engine.aclose()


async def test_a_failed_evaluation_is_not_kept_as_hidden(tmp_path: Path) -> None:
    async with _seen_models(tmp_path) as (engine, policy, seen):
        assert await _lost_mid_evaluation(engine, seen) is False  # failed closed: this once, no model
        assert policy.revision == engine.revision  # the same revision: only what was kept could answer
        assert await seen.may_see(ALICE, TINY) is True  # asked again of the restarted evaluator
        assert await seen.may_see(ALICE, TINY) is True


async def test_an_answer_the_policy_gave_is_kept(tmp_path: Path) -> None:
    async with _seen_models(tmp_path) as (engine, _policy, seen):
        assert await seen.may_see(ALICE, TINY) is True
        os.kill(engine.evaluator_pid, signal.SIGSTOP)  # no evaluator could answer now: the kept answer does
        try:
            assert await seen.may_see(ALICE, TINY) is True
        finally:
            os.kill(engine.evaluator_pid, signal.SIGKILL)
