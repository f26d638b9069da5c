"""The folder's watch loads a changed policy only once its files have stopped changing.

A module written in two steps whose first part still parses was loaded
between the steps and decided requests, each audited under that half
revision. Now the watch (``ReloadingPolicyEngine.poll``, what its loop
calls) loads a revision only when two polls in a row read it and the engine
opened on it holds it too; a SIGHUP (``reload()``) still loads at once.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from gateway.policy import EmbeddedPolicyEngine
from gateway.policy.reloader import ReloadingPolicyEngine
from gateway.policy.revision import policy_revision
from tests.opa_fixtures import POLICY_DIR
from tests.policy.embedded_fixtures import request_input

pytestmark = pytest.mark.anyio

TIMEOUT_S = 5.0
#: A module that parses after its first write alone, and again once whole.
FIRST_PART = "package govgate_extra\n\nanswer := 1\n"
SECOND_PART = "\nbonus := answer + 1\n"


async def _open(folder: Path) -> EmbeddedPolicyEngine:
    return await asyncio.to_thread(EmbeddedPolicyEngine.load, folder, TIMEOUT_S)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return Path(shutil.copytree(POLICY_DIR, tmp_path / "policy"))


async def test_a_module_written_in_two_steps_is_served_only_whole(folder: Path) -> None:
    reloading = ReloadingPolicyEngine(await _open(folder), lambda: _open(folder), policy_dir=folder)
    before = reloading.revision
    audited: list[str] = []

    async def poll_and_decide() -> None:
        await reloading.poll()
        decision, revision = await reloading.decide_with_revision(request_input(["analyst"]))
        assert decision.allow
        audited.append(revision)  # what the request's audit entry names

    module = folder / "extra.rego"
    try:
        with module.open("w") as writing:
            writing.write(FIRST_PART)
            writing.flush()
            half = policy_revision(folder)
            await poll_and_decide()  # the half-written module parses: seen, not loaded
            writing.write(SECOND_PART)
        whole = policy_revision(folder)
        assert half not in (before, whole)
        await poll_and_decide()  # changed since the last poll: not yet
        assert reloading.revision == before
        await poll_and_decide()  # the same files two polls in a row: loaded
        assert reloading.revision == whole
        await poll_and_decide()
        assert audited == [before, before, whole, whole]
    finally:
        await reloading.aclose()


async def test_files_changing_while_the_engine_opens_are_not_loaded(folder: Path) -> None:
    """The revision two polls read is loaded only if the engine opened on the folder holds it too."""
    module = folder / "extra.rego"
    opened: list[str] = []

    async def open_while_written() -> EmbeddedPolicyEngine:
        if not opened:  # the writer appends between the poll's read and the engine's
            with module.open("a") as writing:
                writing.write(SECOND_PART)
        engine = await _open(folder)
        opened.append(engine.revision)
        return engine

    reloading = ReloadingPolicyEngine(await _open(folder), open_while_written, policy_dir=folder)
    before = reloading.revision
    try:
        module.write_text(FIRST_PART)
        half = policy_revision(folder)
        await reloading.poll()
        result = await reloading.poll()  # settled on the half revision, but the engine read the whole one
        assert not result.changed and reloading.revision == before and opened == [policy_revision(folder)]
        result = await reloading.poll()  # that one, read again: loaded
        assert result.changed and reloading.revision == policy_revision(folder) != half
    finally:
        await reloading.aclose()


async def test_a_sighup_loads_at_once(folder: Path) -> None:
    reloading = ReloadingPolicyEngine(await _open(folder), lambda: _open(folder), policy_dir=folder)
    try:
        (folder / "extra.rego").write_text(FIRST_PART + SECOND_PART)
        result = await reloading.reload()  # what SIGHUP runs: the operator says the files are complete
        assert result.changed and reloading.revision == policy_revision(folder)
    finally:
        await reloading.aclose()
