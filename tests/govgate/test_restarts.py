"""The restart policy of ``govgate up``'s workers: backoff, its reset, giving up; the clock is passed in."""

from __future__ import annotations

from govgate.restarts import (FIRST_BACKOFF_S, MAX_BACKOFF_S, MAX_RESTARTS, STABLE_AFTER_S, WINDOW_S, GiveUp,
                              Restart, RestartPolicy)


def crash_at_once(policy: RestartPolicy, now: float, runs: int, lives_s: float = 0.1) -> tuple[list, float]:
    """Start and exit the worker ``runs`` times (each run lives ``lives_s``, then waits as told)."""
    decisions = []
    for _ in range(runs):
        policy.started(now)
        now += lives_s
        decision = policy.exited(now)
        decisions.append(decision)
        if isinstance(decision, Restart):
            now += decision.delay_s
    return decisions, now


def test_the_wait_doubles_from_half_a_second_up_to_its_cap():
    policy = RestartPolicy(max_restarts=100)
    decisions, _ = crash_at_once(policy, 1000.0, 9)
    assert [d.delay_s for d in decisions] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert (FIRST_BACKOFF_S, MAX_BACKOFF_S) == (0.5, 30.0)


def test_each_restart_counts_those_within_the_window():
    decisions, _ = crash_at_once(RestartPolicy(), 0.0, MAX_RESTARTS)
    assert [d.recent for d in decisions] == [1, 2, 3, 4, 5]


def test_a_worker_that_dies_at_every_start_is_given_up_after_five_restarts_in_a_minute():
    decisions, now = crash_at_once(RestartPolicy(), 0.0, MAX_RESTARTS + 1, lives_s=3.0)
    assert all(isinstance(d, Restart) for d in decisions[:MAX_RESTARTS])
    assert decisions[-1] == GiveUp(MAX_RESTARTS)
    assert now < WINDOW_S  # 15.5 s of waits and six 3 s runs: well inside the window
    assert (MAX_RESTARTS, WINDOW_S) == (5, 60.0)


def test_restarts_older_than_the_window_no_longer_count():
    policy = RestartPolicy()
    crash_at_once(policy, 0.0, MAX_RESTARTS)  # restarts decided at 0.1, 0.7, 1.8, 3.9 and 8.0 s
    policy.started(20.0)
    assert policy.exited(60.0) == GiveUp(MAX_RESTARTS)  # the first is 59.9 s old: five in the window
    assert policy.exited(60.2) == Restart(16.0, MAX_RESTARTS)  # it is 60.1 s old now: four, and this one


def test_a_worker_that_stayed_up_starts_the_backoff_over():
    policy = RestartPolicy(max_restarts=100)
    crash_at_once(policy, 0.0, 4)  # waits 0.5, 1, 2, 4: the next would be 8
    policy.started(100.0)
    decision = policy.exited(100.0 + STABLE_AFTER_S)
    assert decision == Restart(FIRST_BACKOFF_S, 1)  # and the old restarts have left the window too
    policy.started(200.0)
    assert policy.exited(201.0) == Restart(1.0, 2)  # a quick death right after still doubles


def test_a_worker_that_lives_longer_than_the_waits_is_restarted_forever_at_the_cap():
    """Dying every 20 s never makes five restarts in a minute: a slow retry, never a spin."""
    decisions, now = crash_at_once(RestartPolicy(), 0.0, 40, lives_s=20.0)
    assert all(isinstance(d, Restart) for d in decisions)
    assert decisions[-1].delay_s == MAX_BACKOFF_S and now > 40 * 20


def test_giving_up_is_final_for_the_exit_that_asked():
    policy = RestartPolicy(max_restarts=0)
    policy.started(0.0)
    assert policy.exited(1.0) == GiveUp(0)


def test_a_start_refused_from_outside_waits_longer_each_time_but_never_gives_up():
    """Redis refusing writes (a full disk: MISCONF) is the stack's trouble, not the worker's: the starts it
    refuses are tried again with the doubling waits, and do not count toward giving the model up."""
    policy = RestartPolicy()
    crash_at_once(policy, 0.0, 1)  # one exit: one restart, due after 0.5 s
    waits = [policy.not_started(1.0 + i).delay_s for i in range(20)]
    assert waits[:7] == [1, 2, 4, 8, 16, 30, 30] and set(waits[7:]) == {MAX_BACKOFF_S}
    policy.started(40.0)
    assert policy.exited(41.0) == Restart(MAX_BACKOFF_S, 2)  # the refusals were not restarts
