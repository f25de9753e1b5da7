"""Resource bounds, tried as an attacker and at real sizes, on both transports."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import subprocess
import time
from pathlib import Path

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from citron_protocol import decode_server

from .. import procs
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


def refused(port: int, header: bytes) -> bytes:
    """A well-formed WebSocket handshake with one more header, refused for it."""
    return (
        failed_handshake(port)[:-2]
        + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        + (header + b"\r\n\r\n")
    )


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
    statuses = await hammer(port, [refused(port, b"Origin: http://evil.example")] * 5000)
    assert set(statuses) == {403}, set(statuses)
    statuses = await hammer(port, [refused(port, b"Authorization: Basic eDp5")] * 5000)
    assert set(statuses) == {401}, set(statuses)
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
    await replays_whole(server.url, build, chunks)
    log = await asyncio.to_thread(
        eventually, lambda: server.log() if "slow consumer" in server.log() else None, "a drop"
    )
    assert "nothing sent for 2 s" in log
    assert log.count("slow consumer") == 1  # the non-reader's, not the readers'


async def replays_whole(url: str, build: str, chunks: list[str]) -> None:
    """A front that reads gets every chunk of ``build``, seq by seq, and so
    does ``citron logs``."""
    web = await peer(url)
    await web.send(f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    assert (await recv(web)).COMMAND == "subscribed"
    got = await follow(web, build, timeout=60)
    assert [seq for seq, _ in got] == list(range(1, len(chunks) + 1))
    assert [text for _, text in got] == chunks
    result = await asyncio.to_thread(citron, "logs", url, build, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(chunks)


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


async def test_a_subscribe_storm_leaves_others_answered(server_factory: ServerFactory) -> None:
    server = server_factory()
    build, _ = await write_log(server.url, 64 * 1024, 4 * 1024 * 1024)
    storm = RawClient(server.port, rcvbuf=4096)
    frame = f'WEB:subscribe:{{"build": "{build}", "from": 0}}'.encode()
    for _ in range(3000):
        storm.send_frame(frame)
    other = await peer(server.url)
    latencies = []
    for i in range(20):
        started = time.monotonic()
        reply = await ask(other, f'WEB:get_runners:{{"req": "{i}"}}')
        latencies.append(time.monotonic() - started)
        assert reply.COMMAND == "runners"
        await asyncio.sleep(0.05)
    latencies.sort()
    assert latencies[len(latencies) // 2] < 0.05, latencies
    assert server.proc is not None
    # The storm's replays were replaced, not stacked: the server is idle again.
    await asyncio.sleep(1)
    cpu = Path(f"/proc/{server.proc.pid}/stat").read_text().split()
    ticks = int(cpu[13]) + int(cpu[14])
    await asyncio.sleep(2)
    cpu = Path(f"/proc/{server.proc.pid}/stat").read_text().split()
    assert int(cpu[13]) + int(cpu[14]) - ticks < 50  # under a quarter of a core for 2 s


# -- deadlines and caps -------------------------------------------------------------------------


async def test_a_websocket_that_sends_nothing_is_closed_with_1008(
    server_factory: ServerFactory,
) -> None:
    server = server_factory("--init-timeout", "1")
    silent = await peer(server.url)
    started = time.monotonic()
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(silent.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert time.monotonic() - started < 1 + 2
    talker = await peer(server.url)
    await asyncio.sleep(0.5)
    assert (await ask(talker, 'WEB:get_runners:{"req": "x"}')).COMMAND == "runners"
    await asyncio.sleep(1.5)  # past the deadline: it has spoken, it stays
    assert (await ask(talker, 'WEB:get_runners:{"req": "y"}')).COMMAND == "runners"


async def test_a_raw_socket_that_never_completes_its_first_frame_is_dropped(
    server_factory: ServerFactory,
) -> None:
    server = server_factory("--init-timeout", "1")
    raw = RawClient(server.port)
    raw.sock.sendall(b"\x81")  # the first byte of a frame, and nothing more
    raw.sock.settimeout(6)
    started = time.monotonic()
    raw.frames()  # the close frame, then the end of the stream
    assert time.monotonic() - started < 1 + 2 + 1


async def test_max_connections_answers_503(server_factory: ServerFactory) -> None:
    server = server_factory("--max-connections", "5")
    held = [await peer(server.url) for _ in range(5)]
    with pytest.raises(InvalidStatus) as refused:
        await peer(server.url)
    assert refused.value.response.status_code == 503
    await held.pop().close()
    await asyncio.sleep(0.2)
    again = await peer(server.url)
    assert (await ask(again, 'WEB:get_runners:{"req": "x"}')).COMMAND == "runners"


async def test_a_connection_follows_at_most_1000_builds(server: ServerProc) -> None:
    api = await peer(server.url)
    builds = [await submit(api, extra=', "type": "nobody"') for _ in range(1001)]
    web = await peer(server.url)
    for build in builds[:1000]:
        await web.send(f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    for _ in range(2000):  # subscribed: and state: for each
        await recv(web)
    reply = await ask(web, f'WEB:subscribe:{{"build": "{builds[1000]}", "req": "one-more"}}')
    assert (reply.COMMAND, reply.code, reply.req) == ("error", "rate_limited", "one-more")
    # The same build again is a resubscribe, not one more; after an
    # unsubscribe there is room.
    assert (await ask(web, f'WEB:subscribe:{{"build": "{builds[0]}"}}')).COMMAND == "subscribed"
    await recv(web)
    assert (await ask(web, f'WEB:unsubscribe:{{"build": "{builds[0]}"}}')).COMMAND == (
        "unsubscribed"
    )
    assert (await ask(web, f'WEB:subscribe:{{"build": "{builds[1000]}"}}')).COMMAND == (
        "subscribed"
    )


async def test_a_slowloris_is_cut_after_10_s(server: ServerProc) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    started = time.monotonic()
    writer.write(b"GET / HTTP/1.1\r\n")
    closed_at = None
    for n in range(30):  # one header byte a second
        await asyncio.sleep(1)
        try:
            writer.write(b"X-A"[n % 3 : n % 3 + 1])
            await writer.drain()
        except ConnectionError:
            closed_at = time.monotonic()
            break
        if reader.at_eof() or writer.transport.is_closing():
            closed_at = time.monotonic()
            break
        with contextlib.suppress(TimeoutError):
            data = await asyncio.wait_for(reader.read(100), 0.01)
            if data == b"" or b"HTTP/1.1 408" in data:
                closed_at = time.monotonic()
                break
    writer.close()
    assert closed_at is not None, "still open after 30 s"
    assert 9 <= closed_at - started <= 10 + 2
    assert server.healthz()["status"] == "ok"


# -- clients back off -----------------------------------------------------------------------------


async def test_citron_logs_backs_off_when_every_replay_is_cut(
    server_factory: ServerFactory,
) -> None:
    # Every page of this log is over the server's outgoing limit: each
    # subscribe ends in 4008 right after the connection opened.
    server = server_factory("--max-buffer", "4096", "--log-level", "DEBUG")  # (opened: DEBUG)
    build, _ = await write_log(server.url, 8 * 1024, 160 * 1024)
    opened_before = server.log().count("opened")
    proc = await asyncio.to_thread(procs.citron_popen, "logs", server.url, build)
    await asyncio.sleep(5)
    proc.kill()
    proc.communicate(timeout=10)
    opened = server.log().count("opened") - opened_before
    # 0.1 s doubling with jitter: at most 7 attempts fit in 5 s; without
    # backoff it was one every 0.1 s.
    assert 2 <= opened <= 8, opened
    assert server.log().count("slow consumer") >= 2


@pytest.mark.slow
async def test_citron_runner_backs_off_from_a_server_that_closes_after_ready() -> None:
    opened = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal opened
        opened += 1
        await ws.recv()  # RUNNER:init
        await ws.send('ready:{"runner": "r-1", "protocol": 1, "session": "s3cr3t"}')
        await ws.close(1011, "going away at once")

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        proc = subprocess.Popen(
            procs.runner_argv(f"ws://127.0.0.1:{port}/ws"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await asyncio.sleep(5)
        finally:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)
    assert 2 <= opened <= 8, opened


# -- sizes are UTF-8 bytes ---------------------------------------------------------------------


def padded(size: int) -> str:
    """A valid WEB frame of exactly ``size`` bytes (unknown keys are ignored)."""
    head, tail = 'WEB:get_runners:{"pad": "', '"}'
    return head + "r" * (size - len(head) - len(tail)) + tail


async def test_a_frame_of_exactly_max_frame_bytes_is_accepted(
    server_factory: ServerFactory,
) -> None:
    server = server_factory("--max-frame", "1000")
    web = await peer(server.url)
    reply = await ask(web, padded(1000))
    assert reply.COMMAND == "runners"
    await web.send(padded(1001))
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(web.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_the_build_definition_limit_counts_bytes(server: ServerProc) -> None:
    api = await peer(server.url)
    emoji = json.dumps(["\U0001f600" * 70_000], ensure_ascii=False)  # 70k characters, 280 KB
    reply = await ask(api, f'API:run:{{"repo": "https://x/r.git", "script": {emoji}}}')
    assert (reply.COMMAND, reply.code) == ("error", "too_large")
    fits = json.dumps(["\U0001f600" * 60_000], ensure_ascii=False)  # 240 KB
    reply = await ask(api, f'API:run:{{"repo": "https://x/r.git", "script": {fits}}}')
    assert reply.COMMAND == "queued"


async def test_a_runner_name_is_at_most_256_bytes(server: ServerProc) -> None:
    r = await peer(server.url)
    long_name = "é" * 129  # 258 bytes
    reply = await ask(r, f'RUNNER:init:{{"type": "simple", "name": "{long_name}"}}')
    assert (reply.COMMAND, reply.code) == ("error", "invalid_payload")
    assert "$.name" in reply.message and "256 bytes" in reply.message
    reply = await ask(r, f'RUNNER:init:{{"type": "{"t" * 257}"}}')
    assert (reply.COMMAND, reply.code) == ("error", "invalid_payload")
    reply = await ask(r, f'RUNNER:init:{{"type": "simple", "name": "{"é" * 128}"}}')
    assert reply.COMMAND == "ready"


# -- replies fit ---------------------------------------------------------------------------


async def test_get_builds_over_big_scripts_is_paged_not_4008(server: ServerProc) -> None:
    from citron_client import Client

    api = await peer(server.url)
    script = json.dumps(["echo " + "x" * 200_000])
    ids = [await submit(api, script, ', "type": "nobody"') for _ in range(30)]  # 6 MB in all
    web = await peer(server.url)
    reply = await ask(web, 'WEB:get_builds:{"limit": 50, "req": "page"}')
    assert reply.COMMAND == "builds" and reply.more
    assert 1 <= len(reply.builds) < 30
    assert [b.id for b in reply.builds] == ids[::-1][: len(reply.builds)]
    assert sum(len(line) for b in reply.builds for line in b.script) <= 512 * 1024
    # The connection is still open, and the rest comes with before.
    seen = [b.id for b in reply.builds]
    while reply.more:
        reply = await ask(web, f'WEB:get_builds:{{"limit": 50, "before": "{seen[-1]}"}}')
        seen += [b.id for b in reply.builds]
    assert seen == ids[::-1]
    async with Client(server.url) as client:  # the library pages by itself
        assert [b.id for b in await client.builds(limit=25)] == ids[::-1][:25]
    result = await asyncio.to_thread(citron, "builds", server.url, "--limit", "30", "--json")
    assert result.returncode == 0, result.stderr
    assert [b["id"] for b in json.loads(result.stdout)] == ids[::-1]


async def test_a_chunk_that_grows_6x_when_escaped_reaches_its_readers(server: ServerProc) -> None:
    api = await peer(server.url)
    build = await submit(api)
    r = await peer(server.url)
    await r.send('RUNNER:init:{"type": "simple"}')  # a legacy runner, as the PHP one
    assert (await recv(r)).COMMAND == "ready"
    assert (await recv(r)).COMMAND == "run"
    live = await peer(server.url)
    await ask(live, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    await recv(live)  # state:
    text = "\x01\x1b\x7f\x02" * 225_000  # 900 KB raw; about 5 MB once escaped
    await r.send('RUNNER:process:{"finished": false, "log": "' + text + '"}')
    await r.send('RUNNER:process:{"finished": true, "success": true}')
    got = await follow(live, build, timeout=30)
    assert "".join(t for _, t in got) == text
    late = await peer(server.url)
    await ask(late, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    got = await follow(late, build, timeout=30)
    assert "".join(t for _, t in got) == text
    assert "slow consumer" not in server.log()


async def test_requests_past_the_budget_get_rate_limited(server: ServerProc) -> None:
    web = await peer(server.url)
    for i in range(2300):
        await web.send(f'WEB:get_runners:{{"req": "{i}"}}')
    codes: collections.Counter[str] = collections.Counter()
    for _ in range(2300):
        reply = await recv(web)
        codes[reply.code if reply.COMMAND == "error" else reply.COMMAND] += 1
    assert codes["runners"] >= 2000 and codes["rate_limited"] >= 1, codes
    assert sum(codes.values()) == 2300
    await asyncio.sleep(1)  # the budget refills; the connection is still open
    assert (await ask(web, 'WEB:get_runners:{"req": "after"}')).COMMAND == "runners"


async def test_keepalive_closes_a_reader_that_never_answers_pings(
    server_factory: ServerFactory,
) -> None:
    # Frames go out past the library's own send path; its pings must too.
    server = server_factory("--ping-interval", "1")
    api = await peer(server.url)
    build = await submit(api)
    r = await runner(server.url)
    await recv(r)
    silent = RawClient(server.port)  # reads every frame, never answers a ping
    silent.send_frame(f'WEB:subscribe:{{"build": "{build}", "from": 0}}'.encode())
    silent.sock.settimeout(15)
    reading = asyncio.create_task(asyncio.to_thread(silent.frames))
    started = time.monotonic()
    while not reading.done() and time.monotonic() - started < 15:
        await r.send("RUNNER:process:" + json.dumps({"finished": False, "log": "x" * 1000}))
        await asyncio.sleep(0.02)
    frames = await reading
    assert time.monotonic() - started < 1 + 1 + 2  # ping interval, pong timeout, slack
    assert any(opcode == 9 for opcode, _ in frames)  # the pings came
    assert sum(1 for opcode, _ in frames if opcode == 1) > 10  # among the log frames


async def test_a_req_is_at_most_256_bytes_and_a_longer_one_is_not_echoed(
    server: ServerProc,
) -> None:
    web = await peer(server.url)
    reply = await ask(web, f'WEB:get_runners:{{"req": "{"é" * 128}"}}')  # 256 bytes
    assert (reply.COMMAND, reply.req) == ("runners", "é" * 128)
    long_req = "r" * (1024 * 1024 - 100)  # a reply that echoed it would be 1 MiB
    await web.send(f'WEB:get_runners:{{"req": "{long_req}"}}')
    text = await asyncio.wait_for(web.recv(), 5)
    assert len(text) < 1000 and "$.req" in text
    reply = decode_server(str(text))
    assert (reply.COMMAND, reply.code, reply.req) == ("error", "invalid_payload", None)


# -- a store that falls behind slows the peers down, it does not fill memory ----------


@pytest.mark.parametrize("transport", ["websockets", "aiohttp"])
async def test_a_store_that_falls_behind_slows_the_readers(
    transport: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store commits slowly (2 ms a batch of at most 50 records); a
    runner streams 3,000 chunks as fast as it can. The store's backlog stays
    near --max-backlog (frames wait in the socket meanwhile), and every
    chunk is stored in the end."""
    from citron_protocol import Role
    from citron_server import store as store_module
    from citron_server.host import Host, HostConfig
    from citron_server.metrics import Metrics
    from citron_server.security import Auth, Gate
    from citron_server.settings import parse_settings

    real_apply = store_module._apply

    def slow_apply(db: object, records: list[object]) -> None:
        for start in range(0, len(records), 50):
            time.sleep(0.002)
            real_apply(db, records[start : start + 50])  # type: ignore[arg-type]

    monkeypatch.setattr(store_module, "_apply", slow_apply)
    store = store_module.SqliteStore(str(tmp_path / "c.db"))
    host = Host(store, config=HostConfig(max_backlog=300))
    await host.start()
    settings = parse_settings(["--port", "0", "--transport", transport], {})
    gate = Gate(Auth({Role.RUNNER: None, Role.API: None, Role.WEB: None}), loopback=True)
    if transport == "aiohttp":
        from citron_server.aio import AiohttpTransport

        server: object = AiohttpTransport(host, gate, Metrics(), settings, None)
    else:
        from citron_server.ws import WebsocketsTransport

        server = WebsocketsTransport(host, gate, Metrics(), settings, None)
    port = await server.start()  # type: ignore[attr-defined]
    url = f"ws://127.0.0.1:{port}/ws"
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, store.backlog())
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    try:
        r = await runner(url)
        api = await peer(url)
        build = await submit(api)
        await recv(r)  # run:
        for i in range(3000):
            await r.send(f'RUNNER:process:{{"finished": false, "log": "line {i}\\n"}}')
        await r.send('RUNNER:process:{"finished": true, "success": true}')
        for _ in range(2000):  # until the hub has the result (every chunk came before it)
            info = host.hub.build(build)
            if info is not None and info.state.value == "success":
                break
            await asyncio.sleep(0.01)
        await store.flush()
        stored = await store.read_log(build, 0, 10_000, 10_000)
        assert [chunk[1] for chunk in stored] == [f"line {i}\n" for i in range(3000)]
        assert 300 < peak < 300 + 100, peak  # it reached the mark, and stopped near it
        await r.close()
        await api.close()
    finally:
        watcher.cancel()
        await server.stop_accepting()  # type: ignore[attr-defined]
        await host.shutdown()
        await server.close()  # type: ignore[attr-defined]
