"""Adapter details that the end-to-end tests cannot reach."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode

from citron_protocol import GetRunners, Role
from citron_server.aio import _text_frame


class Peer:
    """A connection as a host sees it, that records what it is sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed: tuple[int, str] | None = None

    async def send(self, text: str) -> None:
        self.sent.append(text)

    def write_batch(self, texts: list[str]) -> bool:
        self.sent.extend(texts)
        return True

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def buffered(self) -> int:
        return 0

    async def drain(self) -> None:
        pass

    def abort(self) -> None:
        self.closed = (1006, "aborted")

    def unsent(self) -> int:
        return 0


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_aiohttp_batched_frames_are_websocket_frames(size: int) -> None:
    payload = ("é" * size).encode()[:size]
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    assert _text_frame(payload) == expected


async def test_a_hub_bug_closes_only_its_connection() -> None:
    import asyncio

    from citron_server.host import Host
    from citron_server.store import SqliteStore

    host = Host(SqliteStore(":memory:"))
    await host.start()
    broken, fine = Peer(), Peer()
    a = host.open(broken, list(Role))
    b = host.open(fine, list(Role))

    def explode(*args: object) -> None:
        raise RuntimeError("a bug")

    host.hub._handlers[GetRunners] = explode
    host.receive(a, "API:get_runners:")
    host.hub._handlers.pop(GetRunners)
    host.receive(b, 'WEB:get_build:{"build": "x"}')
    await asyncio.sleep(0.05)
    assert broken.closed == (1011, "internal error")
    assert fine.closed is None and fine.sent and "unknown_build" in fine.sent[-1]
    assert host.internal_errors == 1
    await host.shutdown()


async def test_a_hub_bug_is_logged_without_the_frames_payload(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncio

    from citron_protocol import SubmitBuild
    from citron_server.host import Host
    from citron_server.store import SqliteStore

    host = Host(SqliteStore(":memory:"))
    await host.start()
    conn = host.open(Peer(), list(Role))

    def explode(*args: object) -> None:
        raise RuntimeError("a bug")

    host.hub._handlers[SubmitBuild] = explode
    secret = "hunter2-in-a-frame"
    with caplog.at_level("ERROR", logger="citron.server"):
        host.receive(conn, f'API:run:{{"repo": "r", "script": [], "secrets": {{"S": "{secret}"}}}}')
        await asyncio.sleep(0.01)
    assert "API:run, " in caplog.text and secret not in caplog.text
    await host.shutdown()
