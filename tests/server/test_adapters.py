"""Adapter details that the end-to-end tests cannot reach."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode

from citron_server.aio import _text_frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_aiohttp_batched_frames_are_websocket_frames(size: int) -> None:
    payload = ("é" * size).encode()[:size]
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    assert _text_frame(payload) == expected
