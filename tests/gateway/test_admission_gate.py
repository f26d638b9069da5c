"""The admission gate: at most ``size`` admissions at once, the others served by team share, never refused.

Ordering is asserted (the order admissions enter), never timing. The gate
in a served gateway is measured by bench/fairness.py (a light team's
requests are no longer held behind another team's burst).
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.requests.admission_gate import AdmissionGate

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def line_up(gate: AdmissionGate, teams: list[str | None]) -> tuple[list[str], asyncio.Event,
                                                                          list[asyncio.Task[None]]]:
    """One admission per entry of ``teams``, in that order, each holding its slot until ``release`` is set."""
    entered: list[str] = []
    release = asyncio.Event()

    async def admit(label: str, team: str | None) -> None:
        async with gate.admitting(team):
            entered.append(label)
            await release.wait()

    tasks = []
    for i, team in enumerate(teams):
        tasks.append(asyncio.create_task(admit(f"{team}{i}", team)))
        await asyncio.sleep(0)  # it took a slot or joined the line, in this order
    return entered, release, tasks


async def test_a_late_team_enters_ahead_of_another_teams_burst() -> None:
    gate = AdmissionGate(2, 60.0)
    entered, release, tasks = await line_up(gate, ["a"] * 10 + ["b"])
    assert entered == ["a0", "a1"] and gate.waiting() == {"a": 8, "b": 1} and gate.free == 0
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    # First come, first served would have let b in last.
    assert entered[:4] == ["a0", "a1", "a2", "b10"]
    assert entered[4:] == [f"a{i}" for i in range(3, 10)]
    assert gate.free == 2 and gate.waiting() == {} and gate.bypassed == 0


async def test_weights_come_from_the_given_shares() -> None:
    gate = AdmissionGate(1, 60.0, lambda team: 3.0 if team == "a" else 1.0)
    entered, release, tasks = await line_up(gate, ["x"] + ["a"] * 6 + ["b"] * 6)
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    teams = "".join(label[0] for label in entered[1:9])
    assert sorted(teams[:4]) == sorted("aaab") and sorted(teams[4:8]) == sorted("aaab"), entered


async def test_a_request_that_waited_too_long_goes_on_without_a_slot_and_gives_none_back() -> None:
    gate = AdmissionGate(1, 0.05)
    entered, release, tasks = await line_up(gate, ["a", "b"])
    async def both_in() -> None:  # b gives up waiting after its bound and enters anyway: the gate never refuses
        while len(entered) < 2:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(both_in(), 60)
    assert entered == ["a0", "b1"] and gate.bypassed == 1
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert gate.free == 1  # only the slot a held came back


async def test_a_cancelled_waiter_leaves_the_line_and_a_failing_admission_frees_its_slot() -> None:
    gate = AdmissionGate(1, 60.0)
    entered, release, tasks = await line_up(gate, ["a", "a", "b"])
    tasks[1].cancel()
    await asyncio.gather(tasks[1], return_exceptions=True)
    assert gate.waiting() == {"b": 1}
    release.set()
    await asyncio.wait_for(asyncio.gather(tasks[0], tasks[2]), 60)
    assert entered == ["a0", "b2"]

    with pytest.raises(RuntimeError):
        async with gate.admitting("c"):
            raise RuntimeError("refused inside")
    assert gate.free == 1


async def test_a_slot_handed_to_a_waiter_cancelled_in_that_moment_goes_to_the_next() -> None:
    gate = AdmissionGate(1, 60.0)
    entered, release, tasks = await line_up(gate, ["a", "b", "c"])
    release.set()          # a leaves on its next turn and hands its slot to b ...
    await asyncio.sleep(0)
    tasks[1].cancel()      # ... which is cancelled before it could run
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    assert entered == ["a0", "c2"] and gate.free == 1
