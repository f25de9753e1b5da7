"""A connection's session alone: role binding, parsing, budget, faults."""

from __future__ import annotations

import pytest

from citron_protocol import ErrorCode, Role
from citron_protocol._session import Refused, Session
from citron_protocol.messages import GetRunners


def test_the_first_frame_binds_the_role() -> None:
    s = Session(id=1, roles=frozenset({Role.API, Role.WEB}))
    message, command, payload = s.parse("WEB:get_runners:")
    assert isinstance(message, GetRunners) and (command, payload) == ("get_runners", "")
    assert s.role is Role.WEB and s.out_key == ("WEB", "log")
    with pytest.raises(Refused) as mismatch:
        s.parse('API:get_runners:{"req": "x"}')
    assert (mismatch.value.code, mismatch.value.req, mismatch.value.close) == (
        ErrorCode.ROLE_MISMATCH,
        "x",
        False,
    )


@pytest.mark.parametrize(
    ("text", "code", "close"),
    [
        ("junk", ErrorCode.MALFORMED, False),
        ("NOPE:x:", ErrorCode.UNKNOWN_ROLE, False),
        ('RUNNER:init:{"type": "simple"}', ErrorCode.UNAUTHORIZED, True),
        ("API:nope:", ErrorCode.UNKNOWN_COMMAND, False),
        ('API:run:{"repo": 5}', ErrorCode.INVALID_PAYLOAD, False),
    ],
)
def test_bad_frames_are_refused_with_their_code(text: str, code: ErrorCode, close: bool) -> None:
    s = Session(id=1, roles=frozenset({Role.API}))
    with pytest.raises(Refused) as refused:
        s.parse(text)
    assert (refused.value.code, refused.value.close) == (code, close)


def test_the_budget_refills_at_its_rate_up_to_its_burst() -> None:
    s = Session(id=1, roles=frozenset({Role.API}), tokens=3.0, refilled=0.0)
    assert [s.spend(0.0, rate=10, burst=3) for _ in range(4)] == [True, True, True, False]
    assert s.spend(0.1, rate=10, burst=3)  # one token back after 0.1 s
    assert not s.spend(0.1, rate=10, burst=3)
    s.spend(100.0, rate=10, burst=3)
    assert s.tokens == 2.0  # never more than the burst


def test_faults_close_past_the_limit_within_the_window() -> None:
    s = Session(id=1, roles=frozenset({Role.API}))
    assert [s.fault(t, window=10, limit=2) for t in (0.0, 1.0, 2.0)] == [False, False, True]
    assert not s.fault(20.0, window=10, limit=2)  # the old ones left the window
