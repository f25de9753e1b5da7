"""Request matching for backends and fronts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citron_protocol import (
    BuildInfo,
    BuildState,
    ClientProtocol,
    Failure,
    Follow,
    GetRunners,
    LogChunk,
    Push,
    Reply,
    Role,
    StateChange,
    SubmitBuild,
    UsageError,
)


def test_requests_are_numbered_and_replies_matched() -> None:
    proto = ClientProtocol(Role.API)
    req, frame = proto.request(SubmitBuild(repo="r", script=("make",)))
    assert frame == f'API:run:{{"repo":"r","script":["make"],"req":"{req}"}}'
    event = proto.receive(f'queued:{{"build": "b1", "req": "{req}"}}')
    assert isinstance(event, Reply) and event.req == req and event.message.COMMAND == "queued"
    assert req not in proto.pending


def test_errors_and_pushes() -> None:
    proto = ClientProtocol(Role.WEB)
    req, _ = proto.request(GetRunners(role=Role.WEB))
    event = proto.receive(f'error:{{"code": "unauthorized", "message": "no", "req": "{req}"}}')
    assert isinstance(event, Failure) and event.error.code == "unauthorized"
    push = proto.receive('log:{"build": "b", "seq": 1, "log": "x"}')
    assert isinstance(push, Push)
    stray = proto.receive('queued:{"build": "b", "req": "unknown"}')
    assert isinstance(stray, Push)


def test_misuse_is_refused() -> None:
    with pytest.raises(UsageError):
        ClientProtocol(Role.RUNNER)
    proto = ClientProtocol(Role.WEB)
    with pytest.raises(UsageError):
        proto.request(SubmitBuild(repo="r", script=()))
    proto.request(GetRunners(role=Role.WEB, req="same"))
    with pytest.raises(UsageError):
        proto.request(GetRunners(role=Role.WEB, req="same"))


# -- Follow: one build's log, each chunk once, to the end, across reconnects ----------


def _state(build: str, state: str, log_seq: int) -> StateChange:
    return StateChange(
        build=BuildInfo(
            id=build,
            state=BuildState(state),
            repo="r",
            script=(),
            attempt=1,
            created="2026-01-01T00:00:00.000Z",
            log_seq=log_seq,
            log_bytes=log_seq,
        )
    )


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 30),
    st.integers(0, 5),
    st.lists(st.integers(0, 40), max_size=4),
    st.data(),
)
def test_follow_shows_each_chunk_once_in_order_then_ends(
    n: int, start: int, drops: list[int], data: st.DataObject
) -> None:
    """A server that sends the log from the subscription's ``from``, a state
    now and then, and a connection that drops at the given points (what was
    in flight is lost, the next subscription sends it again)."""
    start = min(start, n)
    follow = Follow("b", start)
    shown: list[int] = []
    ended = False
    sent = 0  # frames the server sent, over all connections
    for _ in range(len(drops) + 1):
        subscribe = follow.subscribe(Role.WEB)
        assert (subscribe.build, subscribe.from_) == ("b", follow.after)
        seq = subscribe.from_
        # a stale chunk and a state of another build on the way: ignored
        if seq:
            assert follow.receive(LogChunk(build="b", seq=seq, log="x")) == []
        assert follow.receive(_state("other", "success", 0)) == []
        while seq < n:
            seq += 1
            sent += 1
            if drops and sent == drops[0]:
                drops.pop(0)
                break  # the connection dropped: this chunk never arrived
            for event in follow.receive(LogChunk(build="b", seq=seq, log=f"{seq}")):
                assert isinstance(event, LogChunk)
                shown.append(event.seq)
            if data.draw(st.booleans()):
                follow.receive(_state("b", "running", seq))
                assert not follow.done
        else:
            (event,) = follow.receive(_state("b", "success", n))
            assert event.build.state is BuildState.SUCCESS
            ended = True
            break
    if ended:
        assert follow.done and shown == list(range(start + 1, n + 1))
        assert follow.receive(LogChunk(build="b", seq=n + 1, log="late")) == []
        with pytest.raises(UsageError):
            follow.subscribe(Role.WEB)
    else:
        assert shown == list(range(start + 1, follow.after + 1))


def test_follow_ends_on_a_finished_state_only_with_every_chunk() -> None:
    follow = Follow("b")
    assert follow.receive(_state("b", "success", 2)) != [] and not follow.done  # chunks due
    follow.receive(LogChunk(build="b", seq=1, log="1"))
    follow.receive(LogChunk(build="b", seq=2, log="2"))
    follow.receive(_state("b", "success", 2))
    assert follow.done
    with pytest.raises(UsageError):
        Follow("b", -1)
