"""The runner's state machine, paired with a hub in memory."""

from __future__ import annotations

import json

import pytest

from citron_protocol import (
    BuildDropped,
    BuildResumed,
    BuildStarted,
    BuildState,
    CancelRequested,
    ProtocolError,
    Registered,
    RunnerPhase,
    RunnerProtocol,
    ServerError,
    ShutdownRequested,
    UsageError,
)
from citron_protocol.runner import UnexpectedMessage

from ..helpers import Harness


class Pair:
    """A RunnerProtocol wired to a hub through the in-memory harness."""

    def __init__(self, h: Harness, proto: RunnerProtocol) -> None:
        self.h, self.proto = h, proto
        self.conn = 0

    def open(self) -> list[object]:
        self.conn = self.h.connect()
        self.proto.connect()
        return self.pump()

    def pump(self) -> list[object]:
        """Carry frames both ways until neither side has more to say."""
        events: list[object] = []
        while True:
            out = self.proto.data_to_send()
            for frame in out:
                self.h.apply(self.h.hub.receive(self.conn, frame, self.h.now))
            back = self.h.raw(self.conn)
            for frame in back:
                self.proto.receive(frame)
            events += self.proto.events_received()
            if not out and not back:
                return events

    def drop(self) -> None:
        self.h.disconnect(self.conn)
        self.proto.connection_lost()


def started(h: Harness) -> tuple[Pair, str, int]:
    pair = Pair(h, RunnerProtocol(type="simple", name="r1"))
    events = pair.open()
    assert isinstance(events[0], Registered)
    api = h.connect()
    build = h.submit(api)
    (event,) = pair.pump()
    assert isinstance(event, BuildStarted) and event.run.build == build
    assert pair.proto.phase is RunnerPhase.RUNNING and pair.proto.build == event.run
    return pair, build, api


def test_a_whole_build() -> None:
    h = Harness()
    pair, build, _ = started(h)
    pair.proto.log("one\n")
    pair.proto.log("two\n")
    pair.proto.finish(success=True)
    assert pair.pump() == []
    assert pair.proto.phase is RunnerPhase.WAITING and pair.proto.build is None
    assert h.log_of(build) == [(1, "one\n"), (2, "two\n")]
    info = h.hub.build(build)
    assert info is not None and info.state is BuildState.SUCCESS


def test_resume_resends_exactly_what_was_not_stored() -> None:
    h = Harness()
    pair, build, _ = started(h)
    pair.proto.log("stored\n")
    pair.pump()
    pair.proto.log("lost in flight\n")
    pair.proto.data_to_send()  # written to a socket that died
    pair.drop()
    pair.proto.log("while away\n")  # held
    pair.proto.finish(success=False)
    assert pair.proto.data_to_send() == []
    events = pair.open()
    assert any(isinstance(e, BuildResumed) and e.seq == 1 for e in events)
    assert h.log_of(build) == [(1, "stored\n"), (2, "lost in flight\n"), (3, "while away\n")]
    info = h.hub.build(build)
    assert info is not None and info.state is BuildState.FAILURE


def test_a_finish_lost_in_flight_is_resent() -> None:
    h = Harness()
    pair, build, _ = started(h)
    pair.proto.finish(success=True)
    pair.proto.data_to_send()  # never arrives
    pair.drop()
    pair.open()
    info = h.hub.build(build)
    assert info is not None and info.state is BuildState.SUCCESS


def test_a_refused_resume_drops_the_build() -> None:
    h = Harness()
    pair, build, _ = started(h)
    pair.drop()
    h.advance(61)
    events = pair.open()
    assert BuildDropped(build) in events
    # The requeued build comes straight back to this (only) runner, as attempt 2.
    assert any(isinstance(e, BuildStarted) and e.run.build == build for e in events)


def test_cancel_and_shutdown_are_surfaced() -> None:
    h = Harness()
    pair, build, api = started(h)
    h.send(api, f'API:cancel:{{"build": "{build}"}}')
    assert pair.pump() == [CancelRequested(build)]
    pair.proto.finish(success=False)
    pair.pump()
    info = h.hub.build(build)
    assert info is not None and info.state is BuildState.CANCELLED
    pair.proto.receive("shutdown:")
    assert pair.proto.events_received() == [ShutdownRequested()]
    assert pair.proto.phase is RunnerPhase.CLOSED


def test_server_errors_are_events() -> None:
    proto = RunnerProtocol(type="simple")
    proto.connect()
    proto.receive('error:{"code": "bad_state", "message": "no"}')
    (event,) = proto.events_received()
    assert isinstance(event, ServerError) and event.error.code == "bad_state"


def test_calls_out_of_order_are_refused() -> None:
    proto = RunnerProtocol(type="simple")
    with pytest.raises(UsageError):
        proto.log("x")
    with pytest.raises(UsageError):
        proto.finish(True)
    with pytest.raises(UsageError):
        proto.unregister()
    proto.connect()
    with pytest.raises(UsageError):
        proto.connect()
    proto.unregister()
    assert proto.phase is RunnerPhase.CLOSED
    assert proto.data_to_send()[-1] == "RUNNER:unregister:"


def test_bad_server_frames_raise_protocol_errors() -> None:
    proto = RunnerProtocol(type="simple")
    proto.connect()
    with pytest.raises(ProtocolError):
        proto.receive("garbage")
    with pytest.raises(UnexpectedMessage):
        proto.receive('queued:{"build": "b"}')
    proto.receive('ready:{"runner": "r", "protocol": 1, "session": "s"}')
    proto.receive('run:{"build": "b1", "repo": "r", "script": []}')
    with pytest.raises(UnexpectedMessage):
        proto.receive('run:{"build": "b2", "repo": "r", "script": []}')


def test_init_frame_names_the_protocol() -> None:
    proto = RunnerProtocol(type="simple", name="n")
    proto.connect()
    assert proto.data_to_send() == ['RUNNER:init:{"type":"simple","name":"n","protocol":2}']


# -- a seed-only server: no ready:, no build ids, no resume ---------------------------


def test_a_seed_only_servers_build_runs_and_is_answered_in_the_seeds_frames() -> None:
    proto = RunnerProtocol(type="simple")
    proto.connect()
    assert proto.data_to_send() == ['RUNNER:init:{"type":"simple","protocol":2}']
    proto.receive('run:{"repo": "https://x/r.git", "script": ["make", "make test"]}')
    (started,) = proto.events_received()
    assert isinstance(started, BuildStarted) and started.run.build is None
    assert started.run.script == ("make", "make test") and proto.phase is RunnerPhase.RUNNING
    proto.log("one\n")
    proto.log("two\n")
    proto.finish(success=False)
    assert proto.data_to_send() == [
        'RUNNER:process:{"finished":false,"log":"one\\n"}',
        'RUNNER:process:{"finished":false,"log":"two\\n"}',
        'RUNNER:process:{"finished":true,"success":false}',
    ]
    assert proto._chunks == []  # nothing kept: such a server cannot take it back
    # The next build, and a cancel in the seed's form (no build named).
    proto.receive('run:{"repo": "r", "script": ["x"]}')
    proto.receive("cancel:")
    started, cancel = proto.events_received()
    assert isinstance(started, BuildStarted) and cancel == CancelRequested(None)
    proto.finish(success=False)
    assert proto.data_to_send() == ['RUNNER:process:{"finished":true,"success":false}']


def seed_build() -> RunnerProtocol:
    """A runner whose seed-only server gave it a build (no ready:, no id)."""
    proto = RunnerProtocol(type="simple")
    proto.connect()
    proto.receive('run:{"repo": "r", "script": ["x"]}')
    return proto


def test_a_seed_build_in_flight_is_dropped_on_a_reconnect() -> None:
    proto = seed_build()
    proto.events_received()
    proto.log("before\n")
    proto.connection_lost()
    proto.log("while away\n")
    proto.connect()
    assert proto.events_received() == [BuildDropped(None)]
    assert proto.build is None and proto.phase is RunnerPhase.REGISTERING
    assert proto.data_to_send() == ['RUNNER:init:{"type":"simple","protocol":2}']  # no resume
    with pytest.raises(UsageError):
        proto.log("after")


def test_a_run_while_a_build_runs_is_still_unexpected() -> None:
    proto = seed_build()
    with pytest.raises(UnexpectedMessage):
        proto.receive('run:{"repo": "r", "script": ["y"]}')


def test_shutdown_mid_build_reports_the_build_then_leaves() -> None:
    proto = RunnerProtocol(type="simple")
    proto.connect()
    proto.receive('ready:{"runner": "r-1", "protocol": 1, "session": "s"}')
    proto.receive('run:{"build": "b-1", "repo": "r", "script": ["x"]}')
    proto.events_received()
    proto.data_to_send()
    proto.receive("shutdown:")
    assert proto.events_received() == [ShutdownRequested()]
    assert proto.phase is RunnerPhase.RUNNING  # the build goes on
    proto.log("last words\n")
    proto.finish(success=True)
    assert proto.data_to_send() == [
        'RUNNER:process:{"finished":false,"log":"last words\\n","build":"b-1","seq":1}',
        'RUNNER:process:{"finished":true,"success":true,"build":"b-1","leave":true}',
    ]
    assert proto.phase is RunnerPhase.CLOSED


def test_shutdown_while_idle_closes() -> None:
    proto = RunnerProtocol(type="simple")
    proto.connect()
    proto.receive('ready:{"runner": "r-1", "protocol": 1, "session": "s"}')
    proto.receive("shutdown:")
    assert proto.phase is RunnerPhase.CLOSED
    with pytest.raises(UnexpectedMessage):
        proto.receive('run:{"build": "b-1", "repo": "r", "script": ["x"]}')


def running_pair() -> tuple[Harness, Pair, str]:
    """A protocol 2 runner on a hub, running a build just submitted."""
    h = Harness()
    pair = Pair(h, RunnerProtocol(type="simple"))
    pair.open()
    build = h.submit(h.connect())
    pair.pump()
    return h, pair, build


def test_a_protocol_2_runner_keeps_only_what_is_not_acknowledged() -> None:
    h, pair, build = running_pair()
    proto = pair.proto
    assert proto.acks and proto.build is not None
    most = 0
    for i in range(500):
        proto.log(f"line {i}\n" * 10)
        most = max(most, proto.unacknowledged)
        pair.pump()  # the chunk goes, the ack comes back
    assert proto.unacknowledged == 0 and most == len("line 499\n" * 10)  # one chunk at most
    proto.finish(success=True)
    pair.pump()
    assert len(h.log_of(build)) == 500


def test_a_protocol_2_resume_resends_from_what_was_acknowledged() -> None:
    h, pair, build = running_pair()
    proto = pair.proto
    proto.log("one\n")
    pair.pump()  # stored and acknowledged: forgotten
    proto.log("two\n")
    proto.data_to_send()  # sent, but the connection drops before it arrives
    h.disconnect(pair.conn)
    proto.connection_lost()
    proto.log("three\n")
    events = pair.open()
    assert any(isinstance(e, BuildResumed) for e in events)
    proto.finish(success=True)
    pair.pump()
    assert h.log_of(build) == [(1, "one\n"), (2, "two\n"), (3, "three\n")]
    assert proto.unacknowledged == 0


def test_an_ack_for_what_was_not_sent_forgets_nothing() -> None:
    """A server that acknowledges chunks it was not sent (on this
    connection) cannot make the runner drop them."""
    proto = RunnerProtocol(type="simple")
    proto.connect()
    proto.receive('ready:{"runner": "r-1", "protocol": 2, "session": "s"}')
    proto.receive('run:{"build": "b-1", "repo": "r", "script": ["x"]}')
    proto.log("one\n")
    proto.log("two\n")
    proto.connection_lost()
    proto.connect()  # nothing sent on this connection yet
    proto.receive('ack:{"build": "b-1", "seq": 2}')
    assert proto.unacknowledged == len("one\ntwo\n")
    proto.data_to_send()
    proto.receive(
        'ready:{"runner": "r-2", "protocol": 2, "session": "s2",'
        ' "resume": {"build": "b-1", "seq": 0}}'
    )
    sent = proto.data_to_send()
    assert [json.loads(f.split(":", 2)[2])["seq"] for f in sent] == [1, 2]


def test_steps_go_with_the_result_one_per_script_line() -> None:
    from citron_protocol import Step, StepState, UsageError

    h = Harness()
    pair, build, _ = started(h)  # a script of one line ("make")
    with pytest.raises(UsageError, match="one step per script line: 2 steps for 1 lines"):
        pair.proto.finish(success=True, steps=[Step(state=StepState.PASSED)] * 2)
    assert pair.proto.phase is RunnerPhase.RUNNING  # refused: nothing changed
    pair.proto.finish(success=False, exit_code=2, steps=[Step(state=StepState.FAILED, exit_code=2)])
    pair.pump()
    info = h.hub.build(build)
    assert info is not None and info.steps == (Step(state=StepState.FAILED, exit_code=2),)
