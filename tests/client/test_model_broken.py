"""``citron fuzz --model`` against the broken hubs of
tests/client/broken_hubs.py: a difference wherever a frame can reach the
broken rule (a file of its own, so that the suite's workers share them)."""

from __future__ import annotations

import pytest

from .broken_hubs import BROKEN
from .test_model import CONFIG, UNSEEN, model_fuzz, state_frames

#: Real servers on loopback sockets, in-process: part of the slow suite.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", sorted(set(BROKEN) - set(UNSEEN)))
async def test_a_broken_rule_is_a_difference(name: str) -> None:
    make, _, _ = BROKEN[name]
    report = await model_fuzz(make(CONFIG), stop_after=1, sent=state_frames())
    assert report.differences, name  # type: ignore[attr-defined]
