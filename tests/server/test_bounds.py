"""Resource bounds, tried as an attacker and at real sizes, on both transports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest

from ..conftest import ServerFactory, ServerProc
from ..peers import RawClient, ask, follow, peer, recv, runner, submit
from ..procs import citron, eventually


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


# -- replay ----------------------------------------------------------------------------------


def chunk_text(seq: int, size: int) -> str:
    head = f"{seq:08d} "
    return head + "abcdefghij"[seq % 10] * (size - len(head) - 1) + "\n"


async def write_log(url: str, size: int, total: int) -> tuple[str, list[str]]:
    """A build whose runner sent ``total`` bytes of log in ``size``-byte chunks."""
    api = await peer(url)
    build = await submit(api)
    r = await runner(url)
    assert (await recv(r)).COMMAND == "run"
    chunks = [chunk_text(seq, size) for seq in range(1, total // size + 1)]
    for text in chunks:
        await r.send("RUNNER:process:" + json.dumps({"finished": False, "log": text}))
    await r.send('RUNNER:process:{"finished": true, "success": true}')
    reply = None
    for _ in range(200):
        reply = await ask(api, f'API:get_build:{{"build": "{build}", "req": "g"}}')
        if reply.build.state.finished and reply.build.log_seq == len(chunks):
            break
        await asyncio.sleep(0.05)
    assert reply is not None and reply.build.log_seq == len(chunks)
    await r.close()
    await api.close()
    return build, chunks


@pytest.mark.parametrize("size", [64 * 1024, 2 * 1024], ids=["64KiB", "2KiB"])
async def test_an_8_mib_log_replays_whole_after_a_restart(
    server_factory: ServerFactory, size: int
) -> None:
    server = server_factory("--send-timeout", "2")
    build, chunks = await write_log(server.url, size, 8 * 1024 * 1024)
    assert server.terminate() == 0  # a clean stop: everything committed
    server.restart()
    # A non-reading subscriber of the same build is dropped...
    stalled = RawClient(server.port, rcvbuf=4096)
    stalled.send_frame(f'WEB:subscribe:{{"build": "{build}", "from": 0}}'.encode())
    # ...while a reader gets every chunk, seq by seq.
    web = await peer(server.url)
    await web.send(f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    assert (await recv(web)).COMMAND == "subscribed"
    got = await follow(web, build, timeout=60)
    assert [seq for seq, _ in got] == list(range(1, len(chunks) + 1))
    assert [text for _, text in got] == chunks
    result = await asyncio.to_thread(citron, "logs", server.url, build, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(chunks)
    log = await asyncio.to_thread(
        eventually, lambda: server.log() if "slow consumer" in server.log() else None, "a drop"
    )
    assert "nothing sent for 2 s" in log
    assert "4008" not in [line for line in log.splitlines() if "closed (role WEB" in line]


# -- slow consumers ----------------------------------------------------------------------------


def web_connections(server: ServerProc) -> int:
    _, _, body = server.http("/metrics")
    for line in body.splitlines():
        if line.startswith('citron_connections{role="WEB"}'):
            return int(float(line.split()[-1]))
    raise AssertionError("no citron_connections metric")


async def test_a_slow_consumer_is_cut_within_the_send_timeout_plus_2_s(
    server_factory: ServerFactory,
) -> None:
    server = server_factory("--send-timeout", "3")
    build, _ = await write_log(server.url, 64 * 1024, 4 * 1024 * 1024)
    stalled = RawClient(server.port, rcvbuf=4096)
    stalled.send_frame(f'WEB:subscribe:{{"build": "{build}", "from": 0}}'.encode())
    started = time.monotonic()
    await asyncio.to_thread(eventually, lambda: web_connections(server) or None, "subscribed")
    await asyncio.to_thread(
        eventually, lambda: True if web_connections(server) == 0 else None, "the drop", 300
    )
    assert time.monotonic() - started <= 3 + 2 + 0.5  # the judgement comes at a tick (0.5 s)
    # Its socket is gone on the server's side: the client reads what was
    # buffered, then the end of the stream.
    stalled.sock.settimeout(5)
    frames = stalled.frames()
    assert frames  # some of the replay got out before the stall


async def test_200_non_reading_subscribers_are_dropped_and_their_memory_returns(
    server_factory: ServerFactory,
) -> None:
    server = server_factory("--send-timeout", "2")
    assert server.proc is not None
    build, _ = await write_log(server.url, 64 * 1024, 896 * 1024)
    before = rss(server.proc.pid)
    clients = [RawClient(server.port, rcvbuf=4096) for _ in range(200)]
    for client in clients:
        client.send_frame(f'WEB:subscribe:{{"build": "{build}", "from": 0}}'.encode())
    await asyncio.to_thread(
        eventually, lambda: True if web_connections(server) == 200 else None, "200 subscribers"
    )
    await asyncio.to_thread(
        eventually, lambda: True if web_connections(server) == 0 else None, "the drops", 400
    )
    await asyncio.sleep(0.5)
    grown = rss(server.proc.pid) - before
    assert grown < 30 * 1024 * 1024, f"RSS grew by {grown / 1e6:.1f} MB"
    for client in clients:
        client.close()
    assert server.log().count("slow consumer") == 200
