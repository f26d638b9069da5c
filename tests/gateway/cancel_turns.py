"""A cancel scope cancelled while its task waits, and the loop turned a while: anyio cancels the task again on
every turn until it leaves the scope (Litestar's streamed responses run in one), so a wait that stops at the
second cancel shows here."""

from __future__ import annotations

import asyncio

import anyio

#: Turns of the loop after the cancel, each with the scope's cancel again.
TURNS = 20


async def cancel_and_turn(scope: anyio.CancelScope, task: asyncio.Future[object], still_waiting: str) -> None:
    """Cancel ``scope``, let the loop turn :data:`TURNS` times, and check ``task`` is still waiting
    (``still_waiting``: what it means if not)."""
    scope.cancel()
    for _ in range(TURNS):
        await asyncio.sleep(0.005)
    assert not task.done(), still_waiting
