"""The hub's behaviour, in memory: every bullet of the contract's section 4."""

from __future__ import annotations

import copy as copy_module

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from citron_protocol import BuildState, Hub, HubConfig, Role, RunnerState, decode_server
from citron_protocol import strategies as cst
from citron_protocol.hub import CloseCode, CountingIds

from ..helpers import T0, Harness, commands


@pytest.fixture
def h() -> Harness:
    return Harness()


def resume_frame(build: str, session: str) -> str:
    resume = f'{{"build": "{build}", "session": "{session}"}}'
    return f'RUNNER:init:{{"type": "simple", "resume": {resume}}}'


def build_state(h: Harness, build: str) -> BuildState:
    info = h.hub.build(build)
    assert info is not None
    return info.state


# -- runners -----------------------------------------------------------------------


def test_init_replies_ready(h: Harness) -> None:
    conn = h.connect()
    (ready,) = h.send(conn, 'RUNNER:init:{"type": "simple"}')
    assert ready.COMMAND == "ready"
    assert ready.protocol == 1 and ready.runner and ready.session and ready.resume is None


def test_repeated_identical_init_is_a_no_op(h: Harness) -> None:
    conn = h.connect()
    (first,) = h.send(conn, 'RUNNER:init:{"type": "simple"}')
    (again,) = h.send(conn, 'RUNNER:init:{"type": "simple"}')
    assert again == first
    api = h.connect()
    (runners,) = h.send(api, "API:get_runners:")
    assert len(runners.runners) == 1


def test_a_different_init_is_refused(h: Harness) -> None:
    conn = h.connect()
    h.send(conn, 'RUNNER:init:{"type": "simple"}')
    (error,) = h.send(conn, 'RUNNER:init:{"type": "docker"}')
    assert error.code == "bad_state"


def test_runners_are_listed_waiting_then_running_then_removed(h: Harness) -> None:
    r = h.runner(name="one")
    api = h.connect()
    (runners,) = h.send(api, "API:get_runners:")
    (info,) = runners.runners
    assert (info.type, info.name, info.state, info.build) == (
        "simple",
        "one",
        RunnerState.WAITING,
        None,
    )
    build = h.submit(api)
    (runners,) = h.send(api, "API:get_runners:")
    assert runners.runners[0].state is RunnerState.RUNNING
    assert runners.runners[0].build == build
    h.send(r, 'RUNNER:process:{"finished": true, "success": true}')
    (runners,) = h.send(api, "API:get_runners:")
    assert runners.runners[0].state is RunnerState.WAITING
    h.disconnect(r)
    (runners,) = h.send(api, "API:get_runners:")
    assert runners.runners == ()


def test_unregister_removes_the_runner(h: Harness) -> None:
    r = h.runner()
    assert h.send(r, "RUNNER:unregister:") == []
    api = h.connect()
    (runners,) = h.send(api, "API:get_runners:")
    assert runners.runners == ()


# -- queue and dispatch ---------------------------------------------------------------


def test_the_seed_flow(h: Harness) -> None:
    r = h.runner()
    api = h.connect()
    (queued,) = h.send(
        api, 'API:run:{"repo": "https://x/r.git", "script": ["make", "make test"], "req": "a"}'
    )
    assert queued.COMMAND == "queued" and queued.req == "a"
    (run,) = h.recv(r)
    assert run.COMMAND == "run" and run.build == queued.build
    assert run.repo == "https://x/r.git" and run.script == ("make", "make test")
    assert h.send(r, 'RUNNER:process:{"finished": false, "log": "building\\n"}') == []
    assert h.send(r, 'RUNNER:process:{"finished": true, "success": true}') == []
    (reply,) = h.send(api, f'API:get_build:{{"build": "{queued.build}"}}')
    b = reply.build
    assert (b.state, b.success, b.log_seq, b.runner, b.attempt) == (
        BuildState.SUCCESS,
        True,
        1,
        run and b.runner,
        1,
    )
    assert b.created.endswith("Z") and b.started and b.finished
    assert h.log_of(queued.build) == [(1, "building\n")]


def test_builds_wait_in_fifo_order(h: Harness) -> None:
    api = h.connect()
    builds = [h.submit(api, f'["step {i}"]') for i in range(3)]
    r = h.runner()
    received = h.recv(r)
    for expected in builds:
        (run,) = received
        assert run.build == expected
        received = h.send(r, 'RUNNER:process:{"finished": true, "success": false}')
    assert [build_state(h, b) for b in builds] == [BuildState.FAILURE] * 3


def test_typed_builds_go_only_to_runners_of_that_type(h: Harness) -> None:
    api = h.connect()
    docker_build = h.submit(api, extra=', "type": "docker"')
    plain = h.runner("simple")
    any_build = h.submit(api)
    (run,) = h.recv(plain)
    assert run.build == any_build  # the docker build was older, but not for it
    assert build_state(h, docker_build) is BuildState.QUEUED
    docker = h.runner("docker")
    (run,) = h.recv(docker)
    assert run.build == docker_build


def test_an_untyped_build_goes_to_any_runner(h: Harness) -> None:
    docker = h.runner("docker")
    api = h.connect()
    build = h.submit(api)
    (run,) = h.recv(docker)
    assert run.build == build


def test_one_build_per_runner_and_dispatch_on_release(h: Harness) -> None:
    r = h.runner()
    api = h.connect()
    first, second = h.submit(api), h.submit(api)
    assert commands(h.recv(r)) == ["run"]
    assert build_state(h, second) is BuildState.QUEUED
    (run,) = h.send(r, 'RUNNER:process:{"finished": true, "success": true}')
    assert run.build == second
    assert build_state(h, first) is BuildState.SUCCESS


def test_the_longest_waiting_runner_gets_the_build(h: Harness) -> None:
    r1, r2 = h.runner(), h.runner()
    api = h.connect()
    build = h.submit(api)
    assert commands(h.recv(r1)) == ["run"] and h.recv(r2) == []
    assert build_state(h, build) is BuildState.RUNNING


def test_run_carries_the_build_options(h: Harness) -> None:
    r = h.runner()
    api = h.connect()
    h.submit(api, extra=', "ref": "main", "env": {"A": "1"}, "timeout": 2.5')
    (run,) = h.recv(r)
    assert (run.ref, run.env, run.timeout) == ("main", {"A": "1"}, 2.5)


def test_a_legacy_runner_gets_the_same_frames(h: Harness) -> None:
    conn = h.connect()
    (ready,) = h.send(conn, 'RUNNER:init:{"type": "simple"}')
    assert ready.COMMAND == "ready"
    api = h.connect()
    build = h.submit(api)
    (run,) = h.recv(conn)
    assert run.build == build


# -- logs ----------------------------------------------------------------------------


def test_chunks_are_numbered_and_empty_ones_kept(h: Harness) -> None:
    r = h.runner()
    api = h.connect()
    build = h.submit(api)
    for text in ["a", "", "c"]:
        h.send(r, f'RUNNER:process:{{"finished": false, "log": "{text}"}}')
    assert h.log_of(build) == [(1, "a"), (2, ""), (3, "c")]
    info = h.hub.build(build)
    assert info is not None and info.log_seq == 3 and info.log_bytes == 2


def test_runner_seq_is_deduplicated_and_gaps_refused(h: Harness) -> None:
    r = h.runner()
    api = h.connect()
    build = h.submit(api)
    h.recv(r)
    h.send(r, f'RUNNER:process:{{"finished": false, "log": "one", "seq": 1, "build": "{build}"}}')
    assert h.send(r, 'RUNNER:process:{"finished": false, "log": "one", "seq": 1}') == []
    (error,) = h.send(r, 'RUNNER:process:{"finished": false, "log": "three", "seq": 3}')
    assert error.code == "bad_state" and "gap" in error.message
    h.send(r, 'RUNNER:process:{"finished": false, "log": "two", "seq": 2}')
    assert h.log_of(build) == [(1, "one"), (2, "two")]


def test_log_cap_truncates_with_one_notice() -> None:
    h = Harness(HubConfig(log_cap=10))
    r = h.runner()
    api = h.connect()
    build = h.submit(api)
    h.send(r, 'RUNNER:process:{"finished": false, "log": "12345678"}')
    h.send(r, 'RUNNER:process:{"finished": false, "log": "too much"}')
    h.send(r, 'RUNNER:process:{"finished": false, "log": "and more"}')
    log = h.log_of(build)
    assert log[0] == (1, "12345678")
    assert len(log) == 2 and "truncated" in log[1][1]
    info = h.hub.build(build)
    assert info is not None and info.truncated


def test_log_and_finish_need_a_current_build(h: Harness) -> None:
    r = h.runner()
    (error,) = h.send(r, 'RUNNER:process:{"finished": false, "log": "x"}')
    assert error.code == "no_build"
    (error,) = h.send(r, 'RUNNER:process:{"finished": true, "success": true}')
    assert error.code == "no_build"
    api = h.connect()
    h.submit(api)
    h.recv(r)
    (error,) = h.send(r, 'RUNNER:process:{"finished": false, "log": "x", "build": "other"}')
    assert error.code == "no_build"


def test_runner_frames_before_init(h: Harness) -> None:
    conn = h.connect()
    (error,) = h.send(conn, 'RUNNER:process:{"finished": false, "log": "x"}')
    assert error.code == "not_registered"
    (error,) = h.send(conn, "RUNNER:unregister:")
    assert error.code == "not_registered"


# -- cancel ----------------------------------------------------------------------------


def test_cancel_a_queued_build(h: Harness) -> None:
    api = h.connect()
    build = h.submit(api)
    (reply,) = h.send(api, f'API:cancel:{{"build": "{build}", "req": "c"}}')
    assert reply.COMMAND == "build" and reply.req == "c"
    assert reply.build.state is BuildState.CANCELLED
    r = h.runner()
    assert h.recv(r) == []  # nothing left to run


def test_cancel_a_running_build(h: Harness) -> None:
    r = h.runner()
    api = h.connect()
    build = h.submit(api)
    h.recv(r)
    (reply,) = h.send(api, f'API:cancel:{{"build": "{build}"}}')
    assert reply.build.state is BuildState.CANCELLING
    (cancel,) = h.recv(r)
    assert cancel.COMMAND == "cancel" and cancel.build == build
    (again,) = h.send(api, f'API:cancel:{{"build": "{build}"}}')
    assert again.build.state is BuildState.CANCELLING
    h.send(r, 'RUNNER:process:{"finished": true, "success": false}')
    info = h.hub.build(build)
    assert info is not None and info.state is BuildState.CANCELLED and info.success is False


def test_cancel_timeout(h: Harness) -> None:
    r = h.runner()
    api = h.connect()
    build = h.submit(api)
    h.recv(r)
    h.send(api, f'API:cancel:{{"build": "{build}"}}')
    h.advance(29)
    assert build_state(h, build) is BuildState.CANCELLING
    h.advance(1.5)
    assert build_state(h, build) is BuildState.CANCELLED
    assert h.closed[r][0] == CloseCode.CANCEL_TIMEOUT


def test_cancel_a_finished_or_unknown_build(h: Harness) -> None:
    r = h.runner()
    api = h.connect()
    build = h.submit(api)
    h.send(r, 'RUNNER:process:{"finished": true, "success": true}')
    (error,) = h.send(api, f'API:cancel:{{"build": "{build}", "req": "x"}}')
    assert (error.code, error.req) == ("bad_state", "x")
    (error,) = h.send(api, 'API:cancel:{"build": "nope"}')
    assert error.code == "unknown_build"


# -- runner loss and resume ---------------------------------------------------------------


def _running(h: Harness) -> tuple[int, str, str, int]:
    conn = h.connect()
    (ready,) = h.send(conn, 'RUNNER:init:{"type": "simple", "protocol": 1}')
    api = h.connect()
    build = h.submit(api)
    h.recv(conn)
    return conn, build, ready.session, api


def test_runner_loss_keeps_the_build_running_for_the_grace(h: Harness) -> None:
    r, build, _, _ = _running(h)
    h.disconnect(r)
    h.advance(59)
    assert build_state(h, build) is BuildState.RUNNING


def test_resume_within_the_grace(h: Harness) -> None:
    r, build, session, _ = _running(h)
    for i in (1, 2):
        h.send(r, f'RUNNER:process:{{"finished": false, "log": "line {i}", "seq": {i}}}')
    h.disconnect(r)
    h.advance(30)
    again = h.connect()
    (ready,) = h.send(
        again,
        resume_frame(build, session),
    )
    assert ready.resume is not None and (ready.resume.build, ready.resume.seq) == (build, 2)
    assert ready.session != session
    # The runner resends from its start: what was stored is skipped.
    for i in (1, 2, 3):
        h.send(again, f'RUNNER:process:{{"finished": false, "log": "line {i}", "seq": {i}}}')
    h.send(again, 'RUNNER:process:{"finished": true, "success": true}')
    assert h.log_of(build) == [(1, "line 1"), (2, "line 2"), (3, "line 3")]
    assert build_state(h, build) is BuildState.SUCCESS
    h.advance(60)
    assert build_state(h, build) is BuildState.SUCCESS


def test_resume_replaces_a_stale_connection(h: Harness) -> None:
    r, build, session, _ = _running(h)
    again = h.connect()
    (ready,) = h.send(
        again,
        resume_frame(build, session),
    )
    assert ready.resume is not None
    assert h.closed[r][0] == CloseCode.REPLACED
    assert build_state(h, build) is BuildState.RUNNING
    h.send(again, 'RUNNER:process:{"finished": true, "success": true}')
    assert build_state(h, build) is BuildState.SUCCESS


@pytest.mark.parametrize("case", ["late", "wrong secret", "unknown build", "finished"])
def test_refused_resumes_get_ready_without_resume(h: Harness, case: str) -> None:
    r, build, session, _ = _running(h)
    if case == "finished":
        h.send(r, 'RUNNER:process:{"finished": true, "success": true}')
    h.disconnect(r)
    if case == "late":
        h.advance(61)
    if case == "wrong secret":
        session = "guess"
    if case == "unknown build":
        build = "build-999"
    again = h.connect()
    ready = h.send(
        again,
        resume_frame(build, session),
    )[0]
    assert ready.COMMAND == "ready" and ready.resume is None


def test_lost_builds_are_requeued_once(h: Harness) -> None:
    r, build, _, _api = _running(h)
    h.send(r, 'RUNNER:process:{"finished": false, "log": "attempt one"}')
    h.disconnect(r)
    h.advance(60)
    info = h.hub.build(build)
    assert info is not None and (info.state, info.attempt, info.runner) == (
        BuildState.QUEUED,
        2,
        None,
    )
    r2 = h.runner()
    (run,) = h.recv(r2)
    assert run.build == build
    h.send(r2, 'RUNNER:process:{"finished": false, "log": "attempt two"}')
    h.disconnect(r2)
    h.advance(60)
    assert build_state(h, build) is BuildState.LOST
    log = [text for _, text in h.log_of(build)]
    assert log[0] == "attempt one" and "requeued as attempt 2" in log[1]
    assert log[2] == "attempt two" and "no retry left" in log[3]
    assert [seq for seq, _ in h.log_of(build)] == [1, 2, 3, 4]


def test_a_requeue_is_one_change_and_a_final_loss_is_announced(h: Harness) -> None:
    """docs/protocol.md §5.4: followers see queued (attempt 2), never a lost
    first; the store keeps both records."""
    r, build, _, _api = _running(h)
    feed = h.connect([Role.WEB])
    h.send(feed, "WEB:subscribe:{}")
    follower = h.connect([Role.WEB])
    h.send(follower, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    h.recv(follower)
    h.disconnect(r)
    h.advance(60)
    for conn in (feed, follower):
        states = [(m.build.state, m.build.attempt) for m in h.recv(conn) if m.COMMAND == "state"]
        assert states == [(BuildState.QUEUED, 2)], states
    r2 = h.runner()
    h.recv(r2)
    h.recv(feed)
    h.disconnect(r2)
    h.advance(60)  # no retry left: lost, and said so
    states = [m.build.state for m in h.recv(feed) if m.COMMAND == "state"]
    assert states == [BuildState.LOST]


def test_retry_count_is_configurable() -> None:
    h = Harness(HubConfig(retry_lost=0, lost_grace=5))
    r, build, _, _ = _running(h)
    h.disconnect(r)
    h.advance(5)
    assert build_state(h, build) is BuildState.LOST


def test_unregister_while_running_loses_the_build_at_once(h: Harness) -> None:
    r, build, _, _ = _running(h)
    h.send(r, "RUNNER:unregister:")
    info = h.hub.build(build)
    assert info is not None and info.state is BuildState.QUEUED and info.attempt == 2


def test_cancel_while_the_runner_is_away(h: Harness) -> None:
    r, build, _, api = _running(h)
    h.disconnect(r)
    (reply,) = h.send(api, f'API:cancel:{{"build": "{build}"}}')
    assert reply.build.state is BuildState.CANCELLED


def test_runner_closing_while_cancelling_ends_the_build(h: Harness) -> None:
    r, build, _, api = _running(h)
    h.send(api, f'API:cancel:{{"build": "{build}"}}')
    h.disconnect(r)
    assert build_state(h, build) is BuildState.CANCELLED


def test_resume_of_a_cancelling_build_repeats_the_cancel(h: Harness) -> None:
    _r, build, session, api = _running(h)
    h.send(api, f'API:cancel:{{"build": "{build}"}}')
    again = h.connect()
    replies = h.send(
        again,
        resume_frame(build, session),
    )
    assert commands(replies) == ["ready", "cancel"]


# -- subscriptions --------------------------------------------------------------------


def _logs(messages: list[object]) -> list[tuple[int, str]]:
    return [(m.seq, m.log) for m in messages if getattr(m, "COMMAND", "") == "log"]  # type: ignore[attr-defined]


def test_followers_before_and_after_the_start_see_the_whole_log_once(h: Harness) -> None:
    r, build, _, _ = _running(h)
    early = h.connect([Role.WEB])
    replies = h.send(early, f'WEB:subscribe:{{"build": "{build}", "from": 0, "req": "s"}}')
    assert commands(replies) == ["subscribed", "state"] and replies[0].req == "s"
    for i in range(1, 4):
        h.send(r, f'RUNNER:process:{{"finished": false, "log": "l{i}"}}')
    late = h.connect([Role.WEB])
    late_replies = h.send(late, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    for i in range(4, 6):
        h.send(r, f'RUNNER:process:{{"finished": false, "log": "l{i}"}}')
    h.send(r, 'RUNNER:process:{"finished": true, "success": true}')
    expected = [(i, f"l{i}") for i in range(1, 6)]
    early_all = replies + h.recv(early)
    late_all = late_replies + h.recv(late)
    assert _logs(early_all) == expected
    assert _logs(late_all) == expected
    assert early_all[-1].COMMAND == "state" and early_all[-1].build.state is BuildState.SUCCESS
    assert late_all[-1].COMMAND == "state" and late_all[-1].build.state is BuildState.SUCCESS


@pytest.mark.parametrize("start", [0, 1, 3, 5, 9])
def test_replay_from_any_point(h: Harness, start: int) -> None:
    r, build, _, api = _running(h)
    for i in range(1, 6):
        h.send(r, f'RUNNER:process:{{"finished": false, "log": "l{i}"}}')
    replies = h.send(api, f'API:subscribe:{{"build": "{build}", "from": {start}}}')
    assert replies[0].COMMAND == "subscribed" and replies[0].from_ == start
    assert _logs(replies) == [(i, f"l{i}") for i in range(start + 1, 6)]


def test_live_chunks_wait_while_the_backlog_loads() -> None:
    h = Harness(answer_loads=False)
    r, build, _, _api = _running(h)
    for i in range(1, 4):
        h.send(r, f'RUNNER:process:{{"finished": false, "log": "l{i}"}}')
    web = h.connect([Role.WEB])
    h.send(web, f'WEB:subscribe:{{"build": "{build}", "from": 1}}')
    for i in range(4, 6):
        h.send(r, f'RUNNER:process:{{"finished": false, "log": "l{i}"}}')
    h.send(r, 'RUNNER:process:{"finished": true, "success": true}')
    assert _logs(h.recv(web)) == []  # held back until the backlog is out
    h.answer_held()
    got = h.recv(web)
    assert _logs(got) == [(i, f"l{i}") for i in range(2, 6)]
    states = [m.build.state for m in got if m.COMMAND == "state"]
    assert states[-1] is BuildState.SUCCESS


def test_replay_comes_in_pages() -> None:
    h = Harness(HubConfig(replay_page=2))
    r, build, _, api = _running(h)
    for i in range(1, 8):
        h.send(r, f'RUNNER:process:{{"finished": false, "log": "l{i}"}}')
    replies = h.send(api, f'API:subscribe:{{"build": "{build}", "from": 0}}')
    assert _logs(replies) == [(i, f"l{i}") for i in range(1, 8)]


def test_unsubscribe_stops_the_log(h: Harness) -> None:
    r, build, _, api = _running(h)
    h.send(api, f'API:subscribe:{{"build": "{build}"}}')
    h.send(r, 'RUNNER:process:{"finished": false, "log": "one"}')
    assert _logs(h.recv(api)) == [(1, "one")]
    (unsub,) = h.send(api, f'API:unsubscribe:{{"build": "{build}"}}')
    assert unsub.COMMAND == "unsubscribed" and unsub.from_ == 1
    h.send(r, 'RUNNER:process:{"finished": false, "log": "two"}')
    assert h.recv(api) == []
    (error,) = h.send(api, 'API:unsubscribe:{"build": "nope"}')
    assert error.code == "unknown_build"
    (error,) = h.send(api, 'API:subscribe:{"build": "nope"}')
    assert error.code == "unknown_build"


def test_the_global_feed(h: Harness) -> None:
    web = h.connect([Role.WEB])
    (sub,) = h.send(web, "WEB:subscribe:{}")
    assert (sub.COMMAND, sub.build) == ("subscribed", None)
    r = h.runner()
    api = h.connect()
    build = h.submit(api)
    h.send(r, 'RUNNER:process:{"finished": false, "log": "not in the feed"}')
    h.send(r, 'RUNNER:process:{"finished": true, "success": true}')
    h.disconnect(r)
    feed = h.recv(web)
    assert commands(feed) == ["runner", "state", "state", "runner", "state", "runner", "runner"]
    assert [m.build.state for m in feed if m.COMMAND == "state"] == [
        BuildState.QUEUED,
        BuildState.RUNNING,
        BuildState.SUCCESS,
    ]
    assert feed[-1].gone and feed[-1].runner.id == feed[0].runner.id
    assert all(m.build.id == build for m in feed if m.COMMAND == "state")
    (unsub,) = h.send(web, "WEB:unsubscribe:{}")
    assert unsub.build is None
    h.runner()
    assert h.recv(web) == []


# -- listings ---------------------------------------------------------------------------


def test_get_builds_newest_first_with_paging_and_state(h: Harness) -> None:
    api = h.connect()
    ids = [h.submit(api) for _ in range(5)]
    h.send(api, f'API:cancel:{{"build": "{ids[1]}"}}')
    (page,) = h.send(api, 'API:get_builds:{"limit": 2}')
    assert [b.id for b in page.builds] == [ids[4], ids[3]]
    (page,) = h.send(api, f'API:get_builds:{{"limit": 2, "before": "{ids[3]}"}}')
    assert [b.id for b in page.builds] == [ids[2], ids[1]]
    (page,) = h.send(api, 'API:get_builds:{"state": "cancelled"}')
    assert [b.id for b in page.builds] == [ids[1]]
    (page,) = h.send(api, "WEB:get_builds:" if False else "API:get_builds:")
    assert len(page.builds) == 5
    (error,) = h.send(api, 'API:get_builds:{"before": "nope"}')
    assert error.code == "unknown_build"
    (error,) = h.send(api, 'API:get_build:{"build": "nope", "req": "q"}')
    assert (error.code, error.req) == ("unknown_build", "q")


# -- permissions and bad input -------------------------------------------------------------


def test_the_front_may_read_but_never_run_or_cancel(h: Harness) -> None:
    web = h.connect([Role.WEB])
    (error,) = h.send(web, 'WEB:run:{"repo": "r", "script": [], "req": "x"}')
    assert (error.code, error.req) == ("forbidden", "x")
    (error,) = h.send(web, 'WEB:cancel:{"build": "b"}')
    assert error.code == "forbidden"
    (runners,) = h.send(web, "WEB:get_runners:")
    assert runners.COMMAND == "runners"
    assert web not in h.closed


def test_a_role_the_credentials_do_not_allow_is_unauthorized(h: Harness) -> None:
    web = h.connect([Role.WEB])
    (error,) = h.send(web, 'API:run:{"repo": "r", "script": []}')
    assert error.code == "unauthorized"
    assert h.closed[web] == (CloseCode.POLICY, "unauthorized")
    assert h.send(web, "WEB:get_runners:") == []  # closed: nothing more


def test_a_connection_keeps_its_first_role(h: Harness) -> None:
    conn = h.connect()
    h.send(conn, "WEB:get_runners:")
    (error,) = h.send(conn, "API:get_runners:")
    assert error.code == "role_mismatch"
    (error,) = h.send(conn, 'RUNNER:init:{"type": "simple"}')
    assert error.code == "role_mismatch"


ERROR_FRAMES = {
    "malformed": "not a frame",
    "unknown_role": "ROOT:get_runners:",
    "unknown_command": "API:launch:{}",
    "invalid_payload": 'API:run:{"repo": 1}',
    "forbidden": 'API:init:{"type": "simple"}',
    "unknown_build": 'API:get_build:{"build": "nope"}',
}


@pytest.mark.parametrize("code", sorted(ERROR_FRAMES))
def test_error_codes_from_frames(h: Harness, code: str) -> None:
    api = h.connect([Role.API])
    (error,) = h.send(api, ERROR_FRAMES[code])
    assert error.COMMAND == "error" and error.code == code and error.message


def test_binary_frames_are_malformed(h: Harness) -> None:
    conn = h.connect()
    h.apply(h.hub.receive_binary(conn, h.now))
    (error,) = h.recv(conn)
    assert error.code == "malformed"


def test_too_large_build_definition() -> None:
    h = Harness(HubConfig(max_build_bytes=100))
    api = h.connect()
    (error,) = h.send(api, f'API:run:{{"repo": "r", "script": ["{"x" * 200}"], "req": "big"}}')
    assert (error.code, error.req) == ("too_large", "big")


def test_too_many_errors_close_the_connection(h: Harness) -> None:
    bad = h.connect()
    good = h.connect([Role.WEB])
    for _ in range(100):
        h.send(bad, "junk")
    assert bad not in h.closed
    h.advance(61)  # the window slides: old errors no longer count
    for _ in range(100):
        h.send(bad, "junk")
    assert bad not in h.closed
    h.send(bad, "junk")
    assert h.closed[bad] == (CloseCode.POLICY, "too many errors")
    (runners,) = h.send(good, "WEB:get_runners:")
    assert runners.COMMAND == "runners"


def test_frames_after_disconnect_are_ignored(h: Harness) -> None:
    conn = h.connect()
    h.disconnect(conn)
    assert not h.hub.receive(conn, "API:get_runners:", h.now)
    assert not h.hub.disconnect(conn, h.now)


# -- restart ----------------------------------------------------------------------------


def test_restart_keeps_builds_logs_and_the_queue(h: Harness) -> None:
    r, running, session, api = _running(h)
    h.send(r, 'RUNNER:process:{"finished": false, "log": "before", "seq": 1}')
    queued = h.submit(api)
    h.restart()
    assert build_state(h, queued) is BuildState.QUEUED
    assert build_state(h, running) is BuildState.RUNNING
    web = h.connect([Role.WEB])
    replies = h.send(web, f'WEB:subscribe:{{"build": "{running}", "from": 0}}')
    assert _logs(replies) == [(1, "before")]
    # The runner resumes after the restart: the session survived it.
    again = h.connect()
    (ready,) = h.send(
        again,
        resume_frame(running, session),
    )
    assert ready.resume is not None and ready.resume.seq == 1
    h.send(again, 'RUNNER:process:{"finished": false, "log": "after", "seq": 2}')
    (run,) = h.send(again, 'RUNNER:process:{"finished": true, "success": true}')
    assert run.build == queued
    assert _logs(h.recv(web)) == [(2, "after")]


def test_restart_then_no_resume_follows_the_lost_policy(h: Harness) -> None:
    _, running, _, _ = _running(h)
    h.restart()
    assert h.hub.next_deadline() == h.now + 60
    h.advance(60)
    info = h.hub.build(running)
    assert info is not None and (info.state, info.attempt) == (BuildState.QUEUED, 2)


def test_counts_for_hosts(h: Harness) -> None:
    h.runner()
    api = h.connect()
    h.submit(api)
    h.submit(api)
    assert h.hub.runner_counts() == {"WAITING": 0, "RUNNING": 1}
    assert h.hub.build_counts()["queued"] == 1 and h.hub.queue_depth() == 1
    assert h.hub.role_of(api) is Role.API
    assert h.hub.stats.frames_in[("API", "run")] == 2
    assert h.hub.stats.frames_out[("API", "queued")] == 2


# -- property: nothing a peer sends breaks the hub ------------------------------------------


@settings(
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    deadline=None,
)
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=2),
            st.one_of(
                cst.frames(Role.RUNNER),
                cst.frames(Role.API),
                cst.frames(Role.WEB),
                cst.invalid_frames(),
            ),
        ),
        max_size=30,
    )
)
def test_any_frames_leave_the_hub_working(script: list[tuple[int, str]]) -> None:
    h = Harness()
    conns = [h.connect(), h.connect(), h.connect([Role.WEB])]
    for who, frame in script:
        h.apply(h.hub.receive(conns[who], frame, h.now))
        h.now += 0.1
    for frames in h.inbox.values():
        for text in frames:
            decode_server(text)  # every frame the hub sends is valid
    h.advance(120)
    # A fresh runner, backend and front still complete a build.
    r = h.runner("fresh-check")
    api = h.connect([Role.API])
    build = h.submit(api, extra=', "type": "fresh-check"')
    # Builds queued by the script run first (FIFO); each is finished in turn.
    received = h.recv(r)
    for _ in range(40):
        (run,) = [m for m in received if m.COMMAND == "run"]
        if run.build == build:
            break
        received = h.send(r, 'RUNNER:process:{"finished": true, "success": true}')
    h.send(r, f'RUNNER:process:{{"finished": false, "log": "ok", "build": "{build}"}}')
    h.send(r, f'RUNNER:process:{{"finished": true, "success": true, "build": "{build}"}}')
    assert build_state(h, build) is BuildState.SUCCESS
    assert h.log_of(build)[-1] == (1, "ok")


# -- secrets ------------------------------------------------------------------------------

SECRET_RUN = 'API:run:{"repo": "r", "script": ["echo $TOKEN"], "secrets": {"TOKEN": "hunter22"}}'


def test_secrets_go_to_the_runner_and_nowhere_else(h: Harness) -> None:
    web = h.connect([Role.WEB])
    h.send(web, "WEB:subscribe:{}")
    r = h.runner()
    api = h.connect()
    (queued,) = h.send(api, SECRET_RUN)
    (run,) = h.recv(r)
    assert run.secrets == {"TOKEN": "hunter22"}
    (reply,) = h.send(api, f'API:get_build:{{"build": "{queued.build}"}}')
    everything_else = [*h.raw(web), repr(reply), repr(h.store.builds), repr(run)]
    assert not any("hunter22" in text for text in everything_else)


def test_short_secrets_are_refused(h: Harness) -> None:
    api = h.connect()
    (error,) = h.send(api, 'API:run:{"repo": "r", "script": [], "secrets": {"A": "abc"}}')
    assert (
        error.code == "invalid_payload"
        and "$.secrets.A: a secret must be at least 4" in error.message
    )


def test_queued_builds_lose_their_secrets_in_a_restart(h: Harness) -> None:
    api = h.connect()
    (queued,) = h.send(api, SECRET_RUN)
    plain = h.submit(api)
    h.restart()
    assert build_state(h, queued.build) is BuildState.LOST
    assert "secrets were lost" in h.log_of(queued.build)[-1][1]
    r = h.runner()
    (run,) = h.recv(r)
    assert run.build == plain


def test_requeued_builds_without_their_secrets_are_lost_at_dispatch(h: Harness) -> None:
    r = h.runner()
    api = h.connect()
    (queued,) = h.send(api, SECRET_RUN)
    h.recv(r)
    h.restart()  # the build was running: it waits for its runner
    h.advance(60)  # which never comes back: requeued, without secrets
    assert build_state(h, queued.build) is BuildState.QUEUED
    h.runner()
    assert build_state(h, queued.build) is BuildState.LOST


def test_finish_and_leave_takes_no_other_build(h: Harness) -> None:
    r = h.runner()
    api = h.connect()
    first, second = h.submit(api), h.submit(api)
    assert [m.build for m in h.recv(r)] == [first]
    assert h.send(r, 'RUNNER:process:{"finished": true, "success": true, "leave": true}') == []
    assert build_state(h, first) is BuildState.SUCCESS
    assert build_state(h, second) is BuildState.QUEUED
    (runners,) = h.send(api, "API:get_runners:")
    assert runners.runners == ()


def test_unauthorized_and_role_mismatch_echo_req(h: Harness) -> None:
    web = h.connect([Role.WEB])
    h.send(web, "WEB:get_runners:")
    (error,) = h.send(web, 'RUNNER:init:{"type": "simple", "req": "m"}')
    assert (error.code, error.req) == ("unauthorized", "m")
    conn = h.connect()
    h.send(conn, "WEB:get_runners:")
    (error,) = h.send(conn, 'API:get_runners:{"req": "n"}')
    assert (error.code, error.req) == ("role_mismatch", "n")


# -- property: a restored snapshot decides as the hub it was taken from ------------------

_SCRIPTED = st.sampled_from(
    [
        'RUNNER:init:{"type": "simple"}',
        'RUNNER:init:{"type": "other"}',
        'RUNNER:process:{"finished": false, "log": "a line\\n"}',
        'RUNNER:process:{"finished": true, "success": true}',
        'RUNNER:process:{"finished": true, "success": false, "leave": true}',
        'API:run:{"repo": "r", "script": ["make"]}',
        'API:run:{"repo": "r", "script": ["make"], "type": "other"}',
        'API:run:{"repo": "r", "script": ["x"], "secrets": {"TOKEN": "abcdef"}}',
        "API:get_runners:",
        'API:get_builds:{"limit": 5}',
        'WEB:subscribe:{"build": "build-3", "from": 0}',
        "WEB:subscribe:{}",
        'API:cancel:{"build": "build-3"}',
        'API:cancel:{"build": "build-6"}',
    ]
)
_FRAME = st.tuples(st.just("frame"), st.integers(0, 4), _SCRIPTED)
_EVENT = st.one_of(
    _FRAME,
    _FRAME,
    _FRAME,
    st.tuples(st.just("frame"), st.integers(0, 4), cst.frames()),
    st.tuples(st.just("drop"), st.integers(0, 4), st.just("")),
    st.tuples(st.just("drop"), st.integers(0, 4), st.just("")),
    st.tuples(st.just("wait"), st.just(0), st.just("")),
)


def _replay_both(
    before: list[tuple[str, int, str]], after: list[tuple[str, int, str]], window: int = 1000
) -> None:
    """Play ``before`` on a hub, snapshot it, then play ``after`` on both the
    hub and the restored copy: they must answer alike."""
    config = HubConfig(lost_grace=5, cancel_timeout=5, window=window)
    hub = Hub(CountingIds(), config)
    clock = [T0]
    generation = [0] * 5

    def play(target: Hub, events: list[tuple[str, int, str]], gen: list[int]) -> list[object]:
        out: list[object] = []
        for kind, who, frame in events:
            # Runners on 0 and 1, backends on 2 and 3, a front on 4.
            if frame.startswith("RUNNER:"):
                who %= 2
            elif frame.startswith("API:"):
                who = 2 + who % 2
            elif frame.startswith("WEB:"):
                who = 4
            conn = (who, gen[who])
            if kind == "frame":
                fx = target.receive(conn, frame, clock[0])
            elif kind == "drop":
                who %= 2  # a runner's connection drops; it comes back as a new one
                conn = (who, gen[who])
                fx = target.disconnect(conn, clock[0])
                gen[who] += 1
                fx2 = target.connect((who, gen[who]), list(Role), clock[0])
                fx.records += fx2.records
            else:
                clock[0] += 3
                fx = target.advance(clock[0])
            # Deliveries to followers are local to a host: not compared.
            sends = [(c, t) for c, t in fx.sends if not t.startswith(("log:", "state:", "runner:"))]
            out.append((sends, fx.closes, fx.records))
        return out

    for who in range(5):
        hub.connect((who, 0), list(Role), clock[0])
    play(hub, before, generation)
    copy = Hub.from_snapshot(hub.snapshot(), copy_module.deepcopy(hub.ids), config)
    start = clock[0]
    expected = play(hub, after, list(generation))
    clock[0] = start
    assert play(copy, after, list(generation)) == expected


def test_a_restored_snapshot_keeps_queues_waiting_runners_and_deadlines() -> None:
    init, other = 'RUNNER:init:{"type": "simple"}', 'RUNNER:init:{"type": "other"}'
    run, typed = (
        'API:run:{"repo": "r", "script": ["make"]}',
        ('API:run:{"repo": "r", "script": ["make"], "type": "other"}'),
    )
    line, done = (
        'RUNNER:process:{"finished": false, "log": "a line\\n"}',
        'RUNNER:process:{"finished": true, "success": true}',
    )
    before = [
        ("frame", 0, init),  # runner 0 waits
        ("frame", 2, run),  # build-3 runs on runner 0
        ("frame", 0, line),
        ("drop", 0, ""),  # runner 0 gone mid-build: a deadline
        ("frame", 2, run),  # build-4, build-5, build-6 queued for anyone
        ("frame", 2, run),
        ("frame", 2, run),
        ("frame", 1, other),  # runner 1 (other) takes build-4
        ("frame", 1, done),  # then build-5; build-6 stays queued
    ]
    after = [
        ("frame", 1, done),  # runner 1 takes build-6 from the queue
        ("frame", 1, done),  # and waits
        ("frame", 2, typed),  # build-7 goes to the waiting runner 1
        ("frame", 1, done),  # and waits again
        ("frame", 2, run),  # build-8 too
        ("wait", 0, ""),
        ("wait", 0, ""),  # the deadline fires: build-3 requeued as attempt 2
        ("frame", 0, init),  # a new runner takes build-3
        ("frame", 0, done),
        ("frame", 1, done),
        ("frame", 2, "API:get_runners:"),
        ("frame", 2, 'API:get_builds:{"limit": 10}'),
    ]
    _replay_both(before, after)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(_EVENT, max_size=40), st.lists(_EVENT, max_size=40))
def test_a_restored_snapshot_decides_alike(
    before: list[tuple[str, int, str]], after: list[tuple[str, int, str]]
) -> None:
    _replay_both(before, after)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(_EVENT, max_size=40), st.lists(_EVENT, max_size=40))
def test_a_restored_snapshot_decides_alike_with_a_small_window(
    before: list[tuple[str, int, str]], after: list[tuple[str, int, str]]
) -> None:
    _replay_both(before, after, window=1)


def test_a_remote_connection_is_decided_for_but_not_delivered_to(h: Harness) -> None:
    remote = 99
    h.apply(h.hub.connect(remote, [Role.WEB], h.now, local=False))
    r = h.runner()
    api = h.connect()
    build = h.submit(api)
    (subscribed,) = h.send(remote, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    assert (subscribed.COMMAND, subscribed.build) == ("subscribed", build)
    (feed,) = h.send(remote, "WEB:subscribe:{}")
    assert feed.COMMAND == "subscribed"
    h.send(r, 'RUNNER:process:{"finished": false, "log": "x"}')
    h.send(r, 'RUNNER:process:{"finished": true, "success": true}')
    assert h.recv(remote) == []  # its own host follows the log for it
    # Requests and errors are answered as for any connection.
    (error,) = h.send(remote, 'WEB:get_build:{"build": "nope"}')
    assert error.code == "unknown_build"
    assert h.log_of(build) == [(1, "x")]


def test_stats_count_only_this_hosts_connections(h: Harness) -> None:
    h.apply(h.hub.connect(99, [Role.API], h.now, local=False))
    h.send(99, "API:get_runners:")
    h.send(99, "junk")
    stats = h.hub.stats
    assert (stats.frames_in, stats.frames_out, stats.errors) == ({}, {}, {})
    api = h.connect()
    h.send(api, "API:get_runners:")
    assert stats.frames_in == {("API", "get_runners"): 1}


def test_a_finished_builds_secrets_are_forgotten(h: Harness) -> None:
    r = h.runner()
    api = h.connect()
    (queued,) = h.send(api, SECRET_RUN)
    h.recv(r)
    assert b"hunter22" in h.hub.snapshot()
    h.send(r, 'RUNNER:process:{"finished": true, "success": true}')
    assert b"hunter22" not in h.hub.snapshot()
    assert build_state(h, queued.build) is BuildState.SUCCESS


class _CollidingIds(CountingIds):
    """Gives every id twice: the second build would take the first one's."""

    def __init__(self) -> None:
        super().__init__()
        self._last: str | None = None

    def new_id(self, kind: str) -> str:
        if self._last is None:
            self._last = super().new_id(kind)
            return self._last
        last, self._last = self._last, None
        return last


def test_an_id_that_collides_is_drawn_again() -> None:
    h = Harness()
    h.ids = _CollidingIds()
    h.hub = Hub(h.ids)
    api = h.connect()
    first, second = h.submit(api), h.submit(api)
    assert first != second
    assert {b.id for b in h.send(api, 'API:get_builds:{"limit": 5}')[0].builds} == {first, second}


def test_replay_pages_are_bounded_in_bytes() -> None:
    h = Harness(HubConfig(replay_bytes=1000), answer_loads=False)
    r, build, _, _api = _running(h)
    texts = [f"{i}" + "x" * 399 for i in range(1, 11)]  # 10 chunks of 400 bytes
    for text in texts:
        h.send(r, f'RUNNER:process:{{"finished": false, "log": "{text}"}}')
    web = h.connect([Role.WEB])
    h.send(web, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    pages = []
    while h.held_loads:
        load = h.held_loads.pop(0)
        assert load.max_bytes == 1000
        h.answer(load)
        pages.append(_logs(h.recv(web)))
    assert [len(page) for page in pages] == [2, 2, 2, 2, 2]  # 2 x 400 <= 1000 < 3 x 400
    assert [text for page in pages for _, text in page] == texts
    for page in pages:
        assert sum(len(encode_back_log(build, seq, text)) for seq, text in page) < 1000 + 500


def encode_back_log(build: str, seq: int, text: str) -> str:
    from citron_protocol.codec import encode_log_chunk

    return encode_log_chunk(build, seq, text)


def test_a_page_the_store_made_too_big_is_cut_by_the_hub() -> None:
    h = Harness(HubConfig(replay_bytes=1000), answer_loads=False)
    r, build, _, _api = _running(h)
    for i in range(1, 11):
        h.send(r, f'RUNNER:process:{{"finished": false, "log": "{i:03d}' + "x" * 397 + '"}')
    web = h.connect([Role.WEB])
    h.send(web, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    (load,) = h.held_loads
    h.held_loads.clear()
    everything = h.store.read_log(build, load.after, load.until, load.limit)  # no byte bound
    h.apply(h.hub.log_loaded(load.request, everything, h.now))
    assert [seq for seq, _ in _logs(h.recv(web))] == [1, 2, 3]  # the page is full at 1000
    h.answer_held()
    assert [seq for seq, _ in _logs(h.recv(web))] == list(range(4, 11))


def test_a_new_subscribe_or_an_unsubscribe_drops_the_replay_in_flight() -> None:
    h = Harness(answer_loads=False)
    r, build, _, _api = _running(h)
    for i in range(1, 4):
        h.send(r, f'RUNNER:process:{{"finished": false, "log": "l{i}"}}')
    web = h.connect([Role.WEB])
    h.send(web, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    first = h.held_loads[-1]
    h.send(web, f'WEB:subscribe:{{"build": "{build}", "from": 1}}')
    second = h.held_loads[-1]
    assert h.cancelled == [first.request]
    h.answer(first)  # answered anyway: ignored
    assert _logs(h.recv(web)) == []
    h.answer(second)
    assert _logs(h.recv(web)) == [(2, "l2"), (3, "l3")]
    h.held_loads.clear()
    h.send(web, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    third = h.held_loads[-1]
    h.send(web, f'WEB:unsubscribe:{{"build": "{build}"}}')
    assert h.cancelled == [first.request, third.request]
    h.send(web, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    fourth = h.held_loads[-1]
    h.disconnect(web)
    assert h.cancelled == [first.request, third.request, fourth.request]


def test_a_chunk_whose_frame_would_be_too_big_is_stored_in_pieces() -> None:
    h = Harness(HubConfig(max_log_frame=64 * 1024))
    r, build, _, _api = _running(h)
    web = h.connect([Role.WEB])
    h.send(web, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    h.recv(web)
    # Raw control characters, as the PHP runner sends them: 1 byte each in,
    # 6 bytes each once escaped in a log: frame.
    text = "\x01\x02\x1f" * 100_000 + "end\n"
    h.send(r, 'RUNNER:process:{"finished": false, "log": "' + text + '"}')
    frames = [f for f in h.raw(web) if f.startswith("log:")]
    assert len(frames) >= 6 * len(text) // (64 * 1024)
    assert all(len(f.encode()) <= 64 * 1024 for f in frames)
    pieces = [decode_server(f) for f in frames]
    assert "".join(p.log for p in pieces) == text
    assert [p.seq for p in pieces] == list(range(1, len(pieces) + 1))
    assert h.log_of(build) == [(p.seq, p.log) for p in pieces]
    # One runner chunk: the next one is the runner's seq 2, whatever the pieces.
    h.send(r, f'RUNNER:process:{{"build": "{build}", "seq": 2, "finished": false, "log": "x"}}')
    assert h.log_of(build)[-1] == (len(pieces) + 1, "x")


def test_the_request_budget() -> None:
    h = Harness(HubConfig(request_rate=2, request_burst=3))
    web = h.connect([Role.WEB])
    for i in range(3):
        (reply,) = h.send(web, f'WEB:get_runners:{{"req": "{i}"}}')
        assert reply.COMMAND == "runners"
    for _ in range(300):  # far past the error limit: a limit is not a fault
        (reply,) = h.send(web, 'WEB:get_runners:{"req": "over"}')
        assert (reply.COMMAND, reply.code, reply.req) == ("error", "rate_limited", "over")
    assert web not in h.closed
    h.now += 1.0  # two more tokens
    assert [m.COMMAND for m in h.send(web, "WEB:get_runners:")] == ["runners"]
    assert [m.COMMAND for m in h.send(web, "WEB:get_runners:")] == ["runners"]
    assert [m.code for m in h.send(web, "WEB:get_runners:")] == ["rate_limited"]
    h.now += 60  # refills to the burst, not beyond
    assert [m.COMMAND for m in h.send(web, "WEB:get_runners:") * 1] == ["runners"]
    # Runner frames spend no budget: a log is as long as it is.
    r, build, _, _api = _running(h)
    for i in range(50):
        assert h.send(r, f'RUNNER:process:{{"finished": false, "log": "l{i}"}}') == []
    assert len(h.log_of(build)) == 50


def test_get_runners_pages_past_the_reply_size() -> None:
    h = Harness(HubConfig(max_reply_bytes=2000))
    names = {}
    for i in range(40):
        r = h.connect([Role.RUNNER])
        (ready,) = h.send(r, f'RUNNER:init:{{"type": "t", "name": "{"n" * 100}{i}"}}')
        names[ready.runner] = i
    web = h.connect([Role.WEB])
    (reply,) = h.send(web, 'WEB:get_runners:{"req": "p"}')
    assert reply.more and 1 <= len(reply.runners) < 40
    seen = [r.id for r in reply.runners]
    while reply.more:
        (reply,) = h.send(web, f'WEB:get_runners:{{"after": "{seen[-1]}"}}')
        seen += [r.id for r in reply.runners]
    assert seen == sorted(names)  # each exactly once, in id order
    small = Harness()
    for _ in range(3):
        small.runner()
    (reply,) = small.send(small.connect([Role.WEB]), "WEB:get_runners:")
    assert not reply.more and len(reply.runners) == 3


# -- an operator's shutdown -----------------------------------------------------------


def test_shutdown_runner_an_idle_runner_leaves_at_once(h: Harness) -> None:
    r = h.runner(name="idle")
    api = h.connect([Role.API])
    (runners,) = h.send(api, "API:get_runners:")
    runner_id = runners.runners[0].id
    (reply,) = h.send(api, f'API:shutdown_runner:{{"runner": "{runner_id}", "req": "s"}}')
    assert (reply.COMMAND, reply.req, reply.runners[0].id) == ("runners", "s", runner_id)
    assert [m.COMMAND for m in h.recv(r)] == ["shutdown"]
    (runners,) = h.send(api, "API:get_runners:")
    assert runners.runners == ()
    h.submit(api)
    assert h.recv(r) == []  # no build reaches it any more


def test_shutdown_runner_a_busy_runner_ends_its_build_first(h: Harness) -> None:
    r = h.runner()
    api = h.connect([Role.API])
    build = h.submit(api)
    h.recv(r)
    runner_id = h.hub.build(build).runner  # type: ignore[union-attr]
    (reply,) = h.send(api, f'API:shutdown_runner:{{"runner": "{runner_id}"}}')
    assert reply.runners[0].build == build
    assert [m.COMMAND for m in h.recv(r)] == ["shutdown"]
    h.submit(api)  # queued: it must not go to the leaving runner
    h.send(r, 'RUNNER:process:{"finished": false, "log": "still here\\n"}')
    h.send(r, 'RUNNER:process:{"finished": true, "success": true, "leave": true}')
    assert build_state(h, build) is BuildState.SUCCESS
    assert h.log_of(build) == [(1, "still here\n")]
    assert h.recv(r) == []
    (runners,) = h.send(api, "API:get_runners:")
    assert runners.runners == () and h.hub.queue_depth() == 1


def test_shutdown_runner_refusals(h: Harness) -> None:
    api = h.connect([Role.API])
    (error,) = h.send(api, 'API:shutdown_runner:{"runner": "nope", "req": "x"}')
    assert (error.code, error.req) == ("unknown_runner", "x")
    web = h.connect([Role.WEB])
    (error,) = h.send(web, 'WEB:shutdown_runner:{"runner": "r"}')
    assert error.code == "forbidden"


# -- protocol 2: acknowledgements -----------------------------------------------------


def runner2(h: Harness) -> int:
    conn = h.connect()
    (ready,) = h.send(conn, 'RUNNER:init:{"type": "simple", "protocol": 2}')
    assert ready.protocol == 2
    return conn


def test_a_protocol_2_runner_gets_acks_once_stored(h: Harness) -> None:
    r = runner2(h)
    api = h.connect()
    build = h.submit(api)
    (run,) = h.recv(r)
    assert run.build == build
    fx = h.hub.receive(r, 'RUNNER:process:{"finished": false, "log": "a", "seq": 1}', h.now)
    assert [(conn, slot) for conn, slot, _ in fx.acks] == [(r, (build, "log"))]
    assert decode_server(fx.acks[0][2]) == decode_server(f'ack:{{"build": "{build}", "seq": 1}}')
    assert fx.records  # the ack goes with the record it acknowledges
    h.apply(fx)
    h.send(r, 'RUNNER:process:{"finished": false, "log": "b", "seq": 2}')
    h.send(r, 'RUNNER:process:{"finished": false, "log": "a", "seq": 1}')  # a resend: stored
    (done,) = h.send(r, 'RUNNER:process:{"finished": true, "success": true}')
    assert (done.COMMAND, done.build, done.finished) == ("ack", build, True)
    assert h.recv(r) == []
    assert h.log_of(build) == [(1, "a"), (2, "b")]


def test_protocol_1_and_0_runners_get_no_acks(h: Harness) -> None:
    for init in ('{"type": "simple", "protocol": 1}', '{"type": "simple"}'):
        r = h.connect()
        (ready,) = h.send(r, f"RUNNER:init:{init}")
        assert ready.protocol == 1
        api = h.connect()
        h.submit(api)
        h.recv(r)
        fx = h.hub.receive(r, 'RUNNER:process:{"finished": false, "log": "a"}', h.now)
        assert fx.acks == []
        h.apply(fx)
        fx = h.hub.receive(r, 'RUNNER:process:{"finished": true, "success": true}', h.now)
        assert fx.acks == []
        h.apply(fx)


def test_a_result_records_the_commit_and_the_exit_code(h: Harness) -> None:
    r = h.runner()
    api = h.connect([Role.API])
    sha = "0123456789abcdef0123456789abcdef01234567"
    build = h.submit(api)
    h.recv(r)
    h.send(
        r,
        f'RUNNER:process:{{"finished": true, "success": false, "commit": "{sha}", "exit_code": 3}}',
    )
    (reply,) = h.send(api, f'API:get_build:{{"build": "{build}"}}')
    assert (reply.build.commit, reply.build.exit_code) == (sha, 3)
    assert (h.store.builds[build].commit, h.store.builds[build].exit_code) == (sha, 3)
    plain = h.submit(api)  # a runner that says neither: both unknown
    h.recv(r)
    h.send(r, 'RUNNER:process:{"finished": true, "success": true}')
    (reply,) = h.send(api, f'API:get_build:{{"build": "{plain}"}}')
    assert (reply.build.commit, reply.build.exit_code) == (None, None)
    for bad in ('"exit_code": "3"', '"exit_code": true', '"commit": 7', '"exit_code": 4294967296'):
        (error,) = h.send(r, f'RUNNER:process:{{"finished": true, "success": true, {bad}}}')
        assert error.code == "invalid_payload", bad


def test_a_result_records_its_steps_one_per_script_line(h: Harness) -> None:
    from citron_protocol import Step, StepState

    r = h.runner()
    api = h.connect([Role.API])
    build = h.submit(api, script='["echo one", "exit 3", "echo never"]')
    h.recv(r)
    passed = '{"state": "passed", "exit_code": 0, "duration": 0.5}'
    failed = '{"state": "failed", "exit_code": 3, "duration": 1.25}'
    skipped = '{"state": "skipped"}'
    # Another count than the script's lines: refused, nothing of the result kept.
    for steps in (f"[{passed}, {failed}]", f"[{passed}, {failed}, {skipped}, {skipped}]", "[]"):
        (error,) = h.send(
            r, f'RUNNER:process:{{"finished": true, "success": false, "steps": {steps}}}'
        )
        assert error.code == "bad_state" and "one step per line" in error.message
        (reply,) = h.send(api, f'API:get_build:{{"build": "{build}"}}')
        assert reply.build.state == "running" and reply.build.steps is None
    # Steps that break their own rules: invalid_payload, naming the step.
    for bad, where in (
        ('[{"state": "done"}]', "$.steps[0].state"),
        (f'[{passed}, {{"state": "skipped", "exit_code": 1}}, {skipped}]', "$.steps[1].exit_code"),
        (f'[{passed}, {{"state": "failed", "exit_code": 0}}, {skipped}]', "$.steps[1].exit_code"),
        (f'[{passed}, {{"state": "failed", "duration": -1}}, {skipped}]', "$.steps[1].duration"),
        (f'[{passed}, {{"state": "failed", "duration": "1"}}, {skipped}]', "$.steps[1].duration"),
        (f"[{passed}, 3, {skipped}]", "$.steps[1]: expected an object"),
        ('{"0": 1}', "$.steps: expected a list"),
    ):
        (error,) = h.send(
            r, f'RUNNER:process:{{"finished": true, "success": false, "steps": {bad}}}'
        )
        assert error.code == "invalid_payload" and where in error.message, (bad, error)
    h.send(
        r,
        'RUNNER:process:{"finished": true, "success": false, "exit_code": 3,'
        f' "steps": [{passed}, {failed}, {skipped}]}}',
    )
    expected = (
        Step(state=StepState.PASSED, exit_code=0, duration=0.5),
        Step(state=StepState.FAILED, exit_code=3, duration=1.25),
        Step(state=StepState.SKIPPED),
    )
    (reply,) = h.send(api, f'API:get_build:{{"build": "{build}"}}')
    assert reply.build.state == "failure" and reply.build.steps == expected
    assert h.store.builds[build].steps == expected
    # A runner that says nothing of its steps: null.
    plain = h.submit(api)
    h.recv(r)
    h.send(r, 'RUNNER:process:{"finished": true, "success": true}')
    (reply,) = h.send(api, f'API:get_build:{{"build": "{plain}"}}')
    assert reply.build.steps is None


def test_steps_survive_a_snapshot(h: Harness) -> None:
    from citron_protocol import Hub

    r = h.runner()
    api = h.connect([Role.API])
    build = h.submit(api, script='["a", "b"]')
    h.recv(r)
    h.send(
        r,
        'RUNNER:process:{"finished": true, "success": true, "steps": [{"state": "passed",'
        ' "exit_code": 0, "duration": 1}, {"state": "passed", "duration": 2.5}]}',
    )
    copy = Hub.from_snapshot(h.hub.snapshot(), h.ids, h.config)
    assert copy.snapshot() == h.hub.snapshot()
    (reply,) = h.send(api, f'API:get_build:{{"build": "{build}"}}')
    assert [s.duration for s in reply.build.steps] == [1, 2.5]


def test_each_chunk_carries_when_it_was_received(h: Harness) -> None:
    from citron_protocol.codec import log_time

    r = h.runner()
    api = h.connect([Role.API])
    build = h.submit(api)
    h.recv(r)
    live = h.connect([Role.WEB])
    h.send(live, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    h.recv(live)
    received = h.now
    h.send(r, 'RUNNER:process:{"finished": false, "log": "first\\n"}')
    (chunk,) = [m for m in h.recv(live) if m.COMMAND == "log"]
    assert chunk.time == log_time(received)
    assert h.store.logs[build][0].time == received
    h.now += 61.25
    late = h.connect([Role.WEB])  # a replay, from the store: the same time
    got = h.send(late, f'WEB:subscribe:{{"build": "{build}", "from": 0}}') + h.recv(late)
    (replayed,) = [m for m in got if m.COMMAND == "log"]
    assert replayed.time == chunk.time


def test_a_stored_time_no_clock_gives_is_left_out(h: Harness) -> None:
    """A store may hand back any float (a database edited by hand): a
    replay goes on without a time, never a closed connection."""
    r = h.runner()
    build = h.submit(h.connect([Role.API]))
    h.recv(r)
    for i in range(4):
        h.send(r, f'RUNNER:process:{{"finished": false, "log": "line {i}\\n"}}')
    stored = h.store.logs[build]
    for record, bad in zip(stored, (float("nan"), float("inf"), -5.0, 1e300), strict=True):
        object.__setattr__(record, "time", bad)
    web = h.connect([Role.WEB])
    got = h.send(web, f'WEB:subscribe:{{"build": "{build}", "from": 0}}') + h.recv(web)
    chunks = [m for m in got if m.COMMAND == "log"]
    assert [(c.seq, c.time) for c in chunks] == [(1, None), (2, None), (3, None), (4, None)]
