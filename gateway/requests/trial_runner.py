"""Asking the reload trial's decisions several at a time (``gateway/requests/policy_trial.py``).

The trial awaited each decision in turn while the new engine had
``GOVGATE_POLICY_EVALUATORS`` evaluators: a policy at about 20 ms a decision
took 8.6 s to try, at every reload and every start (probe q3, closing note),
and ``govgate up`` gives the API 60 s to start. The decisions are now asked
:func:`trial_width` at once: as many as the embedded engine has evaluators
(more would only wait in its line), or :data:`OPA_TRIAL_WIDTH` on OPA, which
serves the live requests of the running revision meanwhile.

The answers are read in the order the decisions were listed, so a refusal
names the same decision (the first failing one) whatever order they
finished in; once one fails, the decisions not yet started are not asked.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Sequence, TypeVar

T = TypeVar("T")

#: Trial decisions at once on an engine without an evaluator pool (OPA evaluates concurrently itself; a
#: reload's trial must leave it room for the live requests).
OPA_TRIAL_WIDTH = 4


def trial_width(engine: Any) -> int:
    """How many trial decisions to ask ``engine`` at once: its evaluators, else :data:`OPA_TRIAL_WIDTH`."""
    pids = getattr(engine, "evaluator_pids", None)
    return max(1, len(pids)) if isinstance(pids, list) else OPA_TRIAL_WIDTH


async def ask_all(asks: Sequence[Callable[[], Awaitable[T]]], width: int,
                  fails: Callable[[T], bool]) -> list[T | None]:
    """The answer of each of ``asks`` in their order, at most ``width`` asked at once.

    Once an answer ``fails``, the asks not yet started are not (their
    answers are None); those running are awaited, so every ask before the
    first failing one in the list has its answer. An exception cancels the
    rest and is raised.
    """
    slots = asyncio.Semaphore(max(1, width))
    failed = False

    async def run(ask: Callable[[], Awaitable[T]]) -> T:
        nonlocal failed
        try:
            answer = await ask()
        finally:
            slots.release()
        if fails(answer):
            failed = True
        return answer

    tasks: list[asyncio.Task[T]] = []
    try:
        for ask in asks:
            await slots.acquire()
            if failed:
                slots.release()
                break
            tasks.append(asyncio.ensure_future(run(ask)))
        answers: list[T | None] = list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return answers + [None] * (len(asks) - len(answers))


async def again_if_timed_out(ask: Callable[[], Awaitable[T]], timed_out: Callable[[T], bool]) -> T:
    """``ask``'s answer, asked a second time when the first timed out: one slow moment (a busy host, an
    evaluator's first answers) is not the policy's fault; two in a row refuse it (the caller's choice)."""
    answer = await ask()
    return await ask() if timed_out(answer) else answer
