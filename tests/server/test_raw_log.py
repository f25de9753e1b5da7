"""GET /builds/ID/log: a build's log as text/plain, for people and curl,
with the WEB (or API) token; on both transports, at real sizes."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request

from ..conftest import ServerFactory, ServerProc
from ..peers import ask, expect, peer, runner, submit

TOKENS = ("--web-token", "wt", "--api-token", "at", "--runner-token", "rt")


def get(
    server: ServerProc, path: str, token: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(server.http_base + path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def run_build(server: ServerProc, chunks: list[str], token: str = "rt") -> str:
    api = await peer(server.url, "at" if token else None)
    build = await submit(api)
    ws = await runner(server.url, token=token or None)
    await expect(ws, "run")
    for text in chunks:
        await ws.send("RUNNER:process:" + json.dumps({"finished": False, "log": text}))
    await ws.send('RUNNER:process:{"finished": true, "success": true}')
    while (await ask(api, f'API:get_build:{{"build": "{build}"}}')).build.state != "success":
        await asyncio.sleep(0.05)
    await ws.close()
    await api.close()
    return build


async def test_the_raw_log_with_and_without_token(server_factory: ServerFactory) -> None:
    server = server_factory(*TOKENS)
    text = ["plain line\n", "<script>alert(1)</script>\n", "été ✓ \x1b[31mred\x1b[0m\n", "no end"]
    build = await run_build(server, text)
    status, headers, body = await asyncio.to_thread(get, server, f"/builds/{build}/log", "wt")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["X-Content-Type-Options"] == "nosniff"  # never sniffed as HTML
    assert body.decode() == "".join(text)
    # ?token= as the dashboard's link has it, and the API token too.
    assert (await asyncio.to_thread(get, server, f"/builds/{build}/log?token=wt"))[0] == 200
    assert (await asyncio.to_thread(get, server, f"/builds/{build}/log", "at"))[0] == 200
    for token, code in ((None, 401), ("wrong", 401), ("rt", 403)):
        status, _, body = await asyncio.to_thread(get, server, f"/builds/{build}/log", token)
        assert status == code, (token, status, body)
        assert len(body.decode().strip().splitlines()) == 1
    status, _, body = await asyncio.to_thread(get, server, "/builds/b-nope/log", "wt")
    assert (status, body) == (404, b"not found: no build 'b-nope'\n")


async def test_a_large_log_comes_whole(server_factory: ServerFactory) -> None:
    """Over 11 MiB in 64 KiB chunks, non-ASCII included: the body is the log."""
    server = server_factory()
    line = "x" * 1000 + "é\n"
    chunk = line * 64
    chunks = [f"{i:06d}" + chunk for i in range(192)]
    build = await run_build(server, chunks, token="")
    status, _, body = await asyncio.to_thread(get, server, f"/builds/{build}/log")
    assert status == 200
    assert body == "".join(chunks).encode()
    assert len(body) > 11 * 1024 * 1024


async def test_the_log_of_a_build_that_left_memory(server_factory: ServerFactory) -> None:
    server = server_factory("--window", "1")
    first = await run_build(server, ["the first build\n"], token="")
    for _ in range(3):
        await run_build(server, ["another\n"], token="")
    status, _, body = await asyncio.to_thread(get, server, f"/builds/{first}/log")
    assert (status, body) == (200, b"the first build\n")


async def test_a_build_without_log_is_empty(server_factory: ServerFactory) -> None:
    server = server_factory()
    api = await peer(server.url)
    build = await submit(api)
    status, _, body = await asyncio.to_thread(get, server, f"/builds/{build}/log")
    assert (status, body) == (200, b"")


def stalled_reader(port: int, path: str) -> socket.socket:
    """A client that asks for ``path`` and never reads (a tiny receive
    buffer, so that the server's writes back up at once)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    return sock


def status_of(port: int, path: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        return int(sock.recv(64).split()[1])


async def test_readers_that_never_read_are_bounded_and_cut_off(
    server_factory: ServerFactory,
) -> None:
    """Raw logs of 16 MiB to readers that take nothing: past 16 readers (or
    the websockets transport's byte budget) the next is told 503; within
    --send-timeout the stalled ones are cut off and their places freed."""
    server = server_factory("--send-timeout", "3")
    chunk = "y" * (64 * 1024 - 1) + "\n"
    build = await run_build(server, [chunk] * 256, token="")
    path = f"/builds/{build}/log"
    stalled = []
    try:
        stalled = [stalled_reader(server.port, path) for _ in range(16)]
        await asyncio.sleep(0.5)
        assert await asyncio.to_thread(status_of, server.port, path) == 503
        started = time.monotonic()
        while await asyncio.to_thread(status_of, server.port, path) == 503:
            assert time.monotonic() - started < 3 + 5, "stalled readers were never cut off"
            await asyncio.sleep(0.2)
        code, _, body = await asyncio.to_thread(get, server, path)
        assert code == 200 and len(body) == 256 * 64 * 1024
        assert "cut short: the reader took nothing" in server.log()
    finally:
        for sock in stalled:
            sock.close()
