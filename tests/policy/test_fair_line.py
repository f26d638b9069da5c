"""The fair waiting line: order of service by team weight, FIFO within a team, timeouts and cancellations.

The line only orders futures (its owner resolves them), so these tests push
futures and read the order ``pop`` gives them back; the pool that uses it is
tested with real evaluators in ``tests/policy/test_policy_pool.py``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Iterator

import pytest

from gateway.policy.fair_line import FairLine, Team


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def backlog(line: FairLine[str], loop: asyncio.AbstractEventLoop, team: Team, n: int) -> list[asyncio.Future[str]]:
    """``n`` waiters of ``team``, each future named by its team and place (``a3``) in its result-to-be."""
    waiters = []
    for i in range(n):
        waiter: asyncio.Future[str] = loop.create_future()
        waiter.label = f"{team}{i}"  # type: ignore[attr-defined]
        line.push(team, waiter)
        waiters.append(waiter)
    return waiters


def serve(line: FairLine[str], limit: int = 10_000) -> list[str]:
    """Pop until the line is empty, resolving each waiter as its owner would; the labels in order served."""
    order = []
    for _ in range(limit):
        waiter = line.pop()
        if waiter is None:
            return order
        waiter.set_result("served")
        order.append(waiter.label)  # type: ignore[attr-defined]
    raise AssertionError("the line never emptied")


def weights(table: dict[Team, float]):
    return lambda team: table.get(team, 1.0)


def test_equal_weights_alternate_over_a_full_backlog_and_each_team_keeps_its_order(loop) -> None:
    line: FairLine[str] = FairLine()
    backlog(line, loop, "a", 6)
    backlog(line, loop, "b", 6)
    order = serve(line)
    assert order == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3", "a4", "b4", "a5", "b5"]


def test_weights_3_to_1_serve_three_of_a_per_one_of_b_while_both_wait(loop) -> None:
    line: FairLine[str] = FairLine(weights({"a": 3, "b": 1}))
    backlog(line, loop, "a", 30)
    backlog(line, loop, "b", 10)
    order = serve(line)
    teams = "".join(label[0] for label in order)
    # Every window of four turns holds three of a and one of b, until both backlogs end together.
    assert all(Counter(teams[i:i + 4]) == Counter("aaab") for i in range(0, 40, 4)), teams
    assert [x for x in order if x[0] == "a"] == [f"a{i}" for i in range(30)]
    assert [x for x in order if x[0] == "b"] == [f"b{i}" for i in range(10)]


def test_three_teams_2_1_1_share_every_four_turns(loop) -> None:
    line: FairLine[str] = FairLine(weights({"a": 2, "b": 1, "c": 1}))
    backlog(line, loop, "a", 20)
    backlog(line, loop, "b", 10)
    backlog(line, loop, "c", 10)
    teams = "".join(label[0] for label in serve(line))
    assert all(Counter(teams[i:i + 4]) == Counter("aabc") for i in range(0, 40, 4)), teams


def test_a_team_that_appears_behind_a_backlog_is_served_next(loop) -> None:
    line: FairLine[str] = FairLine()
    backlog(line, loop, "a", 50)
    first = [line.pop() for _ in range(10)]  # ten of a's served before b shows up
    for waiter in first:
        waiter.set_result("served")
    late = backlog(line, loop, "b", 1)[0]
    assert line.pop() is late
    assert serve(line)[:3] == ["a10", "a11", "a12"]


def test_a_team_that_was_idle_builds_no_credit(loop) -> None:
    """b waited once long ago; a long a backlog since does not let b's later burst take many turns in a row."""
    line: FairLine[str] = FairLine()
    backlog(line, loop, "b", 1)
    backlog(line, loop, "a", 40)
    assert serve(line)[:1] == ["b0"]
    backlog(line, loop, "a", 40)
    for _ in range(30):
        line.pop().set_result("served")
    backlog(line, loop, "b", 5)
    teams = "".join(label[0] for label in serve(line))
    assert teams.startswith("babababab"), teams


def test_a_team_of_none_is_a_team_of_its_own(loop) -> None:
    line: FairLine[str] = FairLine()
    backlog(line, loop, "a", 3)
    backlog(line, loop, None, 3)
    assert serve(line) == ["a0", "None0", "a1", "None1", "a2", "None2"]


def test_timed_out_and_cancelled_waiters_are_skipped_and_their_team_is_not_charged(loop) -> None:
    line: FairLine[str] = FairLine()
    a = backlog(line, loop, "a", 4)
    b = backlog(line, loop, "b", 4)
    a[0].set_result("timed out")  # the owner's timer settles it: no longer waiting
    a[1].cancel()                 # the request went away
    b[0].cancel()
    assert line.waiting() == {"a": 2, "b": 3}
    assert len(line) == 5
    order = serve(line)
    assert order == ["a2", "b1", "a3", "b2", "b3"]
    assert line.pop() is None and line.waiting() == {}


def test_a_line_of_only_dead_waiters_hands_nothing(loop) -> None:
    line: FairLine[str] = FairLine()
    for waiter in backlog(line, loop, "a", 3):
        waiter.cancel()
    assert line.pop() is None
    assert len(line) == 0


def test_drain_gives_every_live_waiter_once_and_empties_the_line(loop) -> None:
    line: FairLine[str] = FairLine()
    a = backlog(line, loop, "a", 2)
    b = backlog(line, loop, "b", 2)
    b[1].cancel()
    drained = list(line.drain())
    assert set(drained) == {a[0], a[1], b[0]} and len(drained) == 3
    assert line.pop() is None


@pytest.mark.parametrize("bad", [0, -2, float("nan"), float("inf"), True, "3"])
def test_a_weight_that_is_not_a_positive_number_counts_as_one(loop, bad) -> None:
    line: FairLine[str] = FairLine(weights({"a": bad}))  # type: ignore[dict-item]
    backlog(line, loop, "a", 3)
    backlog(line, loop, "b", 3)
    assert serve(line) == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_weights_are_read_again_after_a_team_was_idle(loop) -> None:
    table: dict[Team, float] = {"a": 1, "b": 1}
    line: FairLine[str] = FairLine(weights(table))
    backlog(line, loop, "a", 2)
    backlog(line, loop, "b", 2)
    assert serve(line) == ["a0", "b0", "a1", "b1"]
    table["a"] = 3  # a new policy revision's shares
    backlog(line, loop, "a", 6)
    backlog(line, loop, "b", 2)
    teams = "".join(label[0] for label in serve(line))
    assert Counter(teams[:4]) == Counter(teams[4:]) == Counter("aaab"), teams  # was "abab" at 1:1


@pytest.mark.parametrize(("policy_input", "team"), [
    ({"principal": {"id": "u", "team": "t-1"}}, "t-1"),
    ({"principal": {"id": "u", "team": None}}, None),
    ({"principal": {"id": "u"}}, None),
    ({"principal": {"id": "u", "team": ["t"]}}, None),
    ({"principal": "u"}, None),
    ({}, None),
    ([1, 2, 3], None),  # a malformed input is the policy's to judge; it still waits in a line
    (None, None),
])
def test_the_team_is_read_from_the_policy_input_whatever_its_shape(policy_input, team) -> None:
    from gateway.policy.engine import input_team

    assert input_team(policy_input) == team
