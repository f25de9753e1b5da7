"""Resource bounds, tried as an attacker and at real sizes, on both transports."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from ..conftest import ServerProc


def rss(pid: int) -> int:
    """The resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def hammer(port: int, requests: list[bytes], concurrency: int = 32) -> list[int]:
    """Send each request on its own connection; the HTTP statuses answered."""
    statuses: list[int] = []
    queue = list(reversed(requests))

    async def worker() -> None:
        while queue:
            request = queue.pop()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(request)
                line = await asyncio.wait_for(reader.readline(), 10)
                statuses.append(int(line.split()[1]) if line else 0)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def failed_handshake(port: int) -> bytes:
    return (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def unknown_path(port: int, n: int) -> bytes:
    head = f"GET /nothing-{n:06d} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    return (head + "Connection: close\r\n\r\n").encode()


async def test_refused_requests_leave_no_memory_behind(server: ServerProc) -> None:
    assert server.proc is not None
    pid, port = server.proc.pid, server.port
    # Warm up: the allocator's arenas, the libraries' lazy imports.
    await hammer(port, [failed_handshake(port)] * 2000)
    await hammer(port, [unknown_path(port, n) for n in range(2000)])
    before = rss(pid)
    statuses = await hammer(port, [failed_handshake(port)] * 20_000)
    assert set(statuses) == {400}, set(statuses)
    statuses = await hammer(port, [unknown_path(port, n) for n in range(2000, 12_000)])
    assert set(statuses) == {404}, set(statuses)
    await asyncio.sleep(0.5)
    grown = rss(pid) - before
    assert grown < 10 * 1024 * 1024, f"RSS grew by {grown / 1e6:.1f} MB"
    assert server.healthz()["status"] == "ok"
