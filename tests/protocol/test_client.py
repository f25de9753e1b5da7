"""Request matching for backends and fronts."""

from __future__ import annotations

import pytest

from citron_protocol import (
    ClientProtocol,
    Failure,
    GetRunners,
    Push,
    Reply,
    Role,
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
