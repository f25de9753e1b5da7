"""The scheduler alone: FIFO builds by type, runners longest waiting first."""

from __future__ import annotations

from citron_protocol._scheduler import Scheduler
from citron_protocol._session import Session
from citron_protocol._state import Build, Runner
from citron_protocol.messages import BuildState, Role, RunnerInit
from citron_protocol.records import BuildRecord


def build(n: int, type: str | None = None) -> Build:
    return Build.of(
        BuildRecord(
            id=f"b{n}", number=n, state=BuildState.QUEUED, repo="r", script=(), type=type, created=0
        )
    )


def runner(n: int, type: str = "simple") -> Runner:
    return Runner(
        id=f"r{n}",
        conn=Session(id=n, roles=frozenset(Role)),
        init=RunnerInit(type=type),
        session="",
    )


def test_builds_go_oldest_first_to_a_runner_that_can_run_them() -> None:
    s = Scheduler()
    typed, untyped, other = build(1, "simple"), build(2), build(3, "other")
    for b in (typed, untyped, other):
        s.enqueue(b)
    assert s.depth() == 3
    simple = runner(1)
    assert s.build_for(simple) is typed  # the oldest of its type or untyped
    s.dequeue(typed)
    assert s.build_for(simple) is untyped
    s.dequeue(untyped)
    assert s.build_for(simple) is None  # "other" is not for it
    assert s.build_for(runner(2, "other")) is other
    s.dequeue(other)
    assert s.depth() == 0


def test_a_build_goes_to_the_longest_waiting_runner_of_its_type() -> None:
    s = Scheduler()
    a, b, c = runner(1), runner(2, "other"), runner(3)
    for r in (a, b, c):
        s.wait(r)
    assert s.waiting() == ["r1", "r2", "r3"]
    assert s.runner_for(build(1)) is a  # untyped: anyone, longest waiting
    assert s.runner_for(build(2, "other")) is b
    assert s.runner_for(build(3, "nobody")) is None
    s.unwait(a)
    assert s.runner_for(build(4, "simple")) is c and s.is_waiting(c) and not s.is_waiting(a)
    s.unwait(b)
    assert s.runner_for(build(5, "other")) is None


def test_a_restored_queue_keeps_its_order() -> None:
    s = Scheduler()
    untyped, typed = build(1), build(2, "simple")
    s.enqueue(untyped, order=7)  # each pool given in order, the pools in any order
    s.enqueue(typed, order=3)
    assert s.build_for(runner(1)) is typed  # the older by queue order, across pools
    assert s.order == 0  # given orders do not move the counter
    s.enqueue(build(3))
    assert s.order == 1
