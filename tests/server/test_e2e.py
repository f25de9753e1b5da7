"""citron-server end to end, over real loopback sockets, for both transports."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from citron_protocol import BuildState

from ..conftest import ServerFactory, ServerProc
from ..peers import OPEN, RawClient, ask, follow, peer, recv, runner, submit

VECTORS = Path(__file__).parents[1] / "vectors" / "legacy-php-runner.jsonl"


async def test_the_seed_flow_watched_by_two_fronts(server: ServerProc) -> None:
    # Each peer asks for the URL: on a cluster, each lands on another node.
    r = await runner(server.url)
    api = await peer(server.url)
    early = await peer(server.url)
    build = await submit(api, '["make", "make test"]')
    run = await recv(r)
    assert (run.COMMAND, run.build, run.script) == ("run", build, ("make", "make test"))
    sub = await ask(early, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    assert sub.COMMAND == "subscribed"
    lines = [f"line {i}\n" for i in range(200)]
    for line in lines[:100]:
        await r.send(json_frame(line))
    late = await peer(server.url)
    assert (
        await ask(late, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    ).COMMAND == "subscribed"
    for line in lines[100:]:
        await r.send(json_frame(line))
    await r.send('RUNNER:process:{"finished": true, "success": true}')
    expected = [(i + 1, line) for i, line in enumerate(lines)]
    assert await follow(early, build) == expected
    assert await follow(late, build) == expected
    reply = await ask(api, f'API:get_build:{{"build": "{build}", "req": "g"}}')
    assert (reply.req, reply.build.state, reply.build.log_seq) == ("g", BuildState.SUCCESS, 200)
    for ws in (r, api, early, late):
        await ws.close()


def json_frame(line: str) -> str:
    return "RUNNER:process:" + json.dumps({"finished": False, "log": line})


async def test_legacy_php_runner_frames_end_to_end(server: ServerProc) -> None:
    vectors = [json.loads(line) for line in VECTORS.read_text().splitlines()]
    by_name = {v["name"]: v for v in vectors}
    api = await peer(server.url)
    build = await submit(api)
    r = await peer(server.url)
    await r.send(base64.b64decode(by_name["init"]["frame_b64"]).decode())
    assert (await recv(r)).COMMAND == "ready"
    assert (await recv(r)).COMMAND == "run"
    expected = []
    for v in vectors:
        if v["buffer_b64"] is None:
            continue
        raw = base64.b64decode(v["frame_b64"])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # not a text frame: see test_invalid_utf8_closes_with_1007
        await r.send(text)
        expected.append(base64.b64decode(v["buffer_b64"]).decode())
    await r.send(base64.b64decode(by_name["final_success"]["frame_b64"]).decode())
    web = await peer(server.url)
    await ask(web, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    chunks = await follow(web, build)
    assert [log for _, log in chunks] == expected
    assert len(expected) == 18


async def test_invalid_utf8_closes_with_1007(server: ServerProc) -> None:
    vectors = [json.loads(line) for line in VECTORS.read_text().splitlines()]
    bad = next(v for v in vectors if v["name"] == "invalid_utf8")
    raw = RawClient(server.port)
    raw.send_frame(b'RUNNER:init:{"type": "simple"}')
    raw.send_frame(base64.b64decode(bad["frame_b64"]))
    assert raw.close_code() == 1007
    other = await peer(server.url)
    assert (await ask(other, "WEB:get_runners:")).COMMAND == "runners"


ERROR_CASES: list[tuple[str, list[str], str]] = [
    ("malformed", [], "hello"),
    ("unknown_role", [], "ROOT:get_runners:"),
    ("unknown_command", [], "API:launch:{}"),
    ("forbidden", [], 'WEB:run:{"repo": "r", "script": []}'),
    ("invalid_payload", [], 'API:run:{"repo": "r", "script": [1]}'),
    ("too_large", [], 'API:run:{"repo": "r", "script": ["' + "x" * 300_000 + '"]}'),
    ("not_registered", [], 'RUNNER:process:{"finished": false, "log": "x"}'),
    (
        "no_build",
        ['RUNNER:init:{"type": "simple"}'],
        'RUNNER:process:{"finished": true, "success": true}',
    ),
    ("unknown_build", [], 'API:get_build:{"build": "nope"}'),
    ("unknown_runner", [], 'API:shutdown_runner:{"runner": "nope"}'),
    ("role_mismatch", ["API:get_runners:"], "WEB:get_runners:"),
    ("bad_state", ['RUNNER:init:{"type": "simple"}'], 'RUNNER:init:{"type": "other"}'),
]


@pytest.mark.parametrize(("code", "before", "frame"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
async def test_every_error_code(
    server: ServerProc, code: str, before: list[str], frame: str
) -> None:
    ws = await peer(server.url)
    for first in before:
        await ws.send(first)
        await recv(ws)
    error = await ask(ws, frame)
    assert (error.COMMAND, error.code) == ("error", code), error
    # The connection (and the server) carry on.
    assert (await ask(ws, 'API:get_build:{"build": "x", "req": "after"}')).COMMAND == "error"


async def test_error_codes_bad_state_on_cancel_echo_req(server: ServerProc) -> None:
    api = await peer(server.url)
    build = await submit(api)
    await ask(api, f'API:cancel:{{"build": "{build}"}}')
    error = await ask(api, f'API:cancel:{{"build": "{build}", "req": "again"}}')
    assert (error.code, error.req) == ("bad_state", "again")


async def test_binary_frames_are_malformed(server: ServerProc) -> None:
    ws = await peer(server.url)
    error = await ask(ws, b"\x00\x01")  # type: ignore[arg-type]
    assert error.code == "malformed"


async def test_unauthorized_closes_with_1008(server_factory: ServerFactory) -> None:
    server = server_factory("--api-token", "sesame")
    web = await peer(server.url)  # WEB and RUNNER are open
    error = await ask(web, 'API:run:{"repo": "r", "script": []}')
    assert error.code == "unauthorized"
    with pytest.raises(ConnectionClosed) as info:
        await recv(web)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    api = await peer(server.url, token="sesame")
    assert (await ask(api, 'API:run:{"repo": "r", "script": []}')).COMMAND == "queued"


async def test_wrong_token_is_refused_with_401(server_factory: ServerFactory) -> None:
    server = server_factory("--runner-token", "r", "--api-token", "a", "--web-token", "w")
    for token in ("wrong", None):
        with pytest.raises(InvalidStatus) as info:
            await peer(server.url, token=token)
        assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus):
        await peer(server.url + "?token=nope")
    web = await peer(server.url + "?token=w")  # the browser way
    assert (await ask(web, "WEB:get_runners:")).COMMAND == "runners"
    error = await ask(web, 'RUNNER:init:{"type": "simple"}')
    assert error.code == "unauthorized"
    assert "every role needs a token" in server.lines[3]


async def test_a_2mib_frame_closes_only_its_connection(server: ServerProc) -> None:
    r = await runner(server.url)
    api = await peer(server.url)
    big = await peer(server.url)
    with pytest.raises(ConnectionClosed) as info:
        # The server may close while the frame is still going out: the
        # close then shows in the send rather than in the recv.
        await big.send("API:get_runners:" + "x" * (2 * 1024 * 1024))
        await recv(big)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    build = await submit(api)
    assert (await recv(r)).build == build


async def test_a_front_that_never_reads_is_closed_4008(server: ServerProc) -> None:
    r = await runner(server.url)
    api = await peer(server.url)
    build = await submit(api)
    await recv(r)
    stuck = RawClient(server.port, rcvbuf=4096)
    stuck.send_frame(f'WEB:subscribe:{{"build": "{build}", "from": 0}}'.encode())
    reader = await peer(server.url)
    assert (
        await ask(reader, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    ).COMMAND == "subscribed"
    chunk = "x" * 65000 + "\n"
    count = 200  # about 13 MB: far past the socket buffers and the 1 MiB outbox
    received: list[int] = []

    async def read_all() -> None:
        while len(received) < count:
            message = await recv(reader, 20)
            if message.COMMAND == "log":
                received.append(message.seq)

    reading = asyncio.create_task(read_all())
    for _ in range(count):  # a fast build: about 10 MB/s of output
        await r.send(json_frame(chunk))
        await asyncio.sleep(0.005)
    await asyncio.wait_for(reading, 60)
    assert received == list(range(1, count + 1))
    code = await asyncio.to_thread(stuck.close_code)
    assert code == 4008
    _, _, metrics = server.http("/metrics")
    assert "citron_slow_consumer_disconnects_total 1.0" in metrics


async def test_restart_after_kill_9_keeps_builds_and_logs(server_factory: ServerFactory) -> None:
    server = server_factory("--lost-grace", "2")
    r = await runner(server.url)
    api = await peer(server.url)
    done = await submit(api, '["done"]')
    await recv(r)
    for i in range(50):
        await r.send(json_frame(f"done {i}\n"))
    await r.send('RUNNER:process:{"finished": true, "success": true}')
    running = await submit(api, '["running"]')
    assert (await recv(r)).build == running
    for i in range(5):
        await r.send(f'RUNNER:process:{{"finished": false, "log": "run {i}\\n", "seq": {i + 1}}}')
    queued = await submit(api, '["queued"]', ', "type": "nobody"')
    await ask(api, "API:get_runners:")  # a round trip: every frame above was handled
    await asyncio.sleep(0.5)  # more than a commit period
    server.kill9()
    server.restart()
    api = await peer(server.url)
    page = await ask(api, 'API:get_builds:{"limit": 10}')
    assert [b.id for b in page.builds] == [queued, running, done]
    states = {b.id: b.state for b in page.builds}
    assert states == {
        done: BuildState.SUCCESS,
        running: BuildState.RUNNING,
        queued: BuildState.QUEUED,
    }
    web = await peer(server.url)
    await ask(web, f'WEB:subscribe:{{"build": "{done}", "from": 0}}')
    assert await follow(web, done) == [(i + 1, f"done {i}\n") for i in range(50)]
    # The running build's runner never comes back: lost, then requeued.
    await asyncio.sleep(3)
    info = (await ask(api, f'API:get_build:{{"build": "{running}"}}')).build
    assert (info.state, info.attempt) == (BuildState.QUEUED, 2)
    nobody = await runner(server.url, type="nobody")
    assert (await recv(nobody)).build == queued


async def test_sigterm_exits_0_and_closes_with_1001(server: ServerProc) -> None:
    ws = await peer(server.url)
    await ask(ws, "WEB:get_runners:")
    code = await asyncio.to_thread(server.terminate, 10)
    assert code == 0
    with pytest.raises(ConnectionClosed) as info:
        await recv(ws)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001


async def test_healthz_and_metrics(server: ServerProc) -> None:
    r = await runner(server.url)
    api = await peer(server.url)
    await submit(api)
    await submit(api)
    await recv(r)
    await ask(api, "API:nope:")
    health = server.healthz()
    assert health == {
        "status": "ok",
        "runners": {"WAITING": 0, "RUNNING": 1},
        "builds": {"queued": 1, "running": 1},
    }
    status, content_type, text = server.http("/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    for needle in [
        'citron_connections{role="RUNNER"} 1.0',
        'citron_connections{role="API"} 1.0',
        'citron_frames_in_total{command="run",role="API"} 2.0',
        'citron_frames_out_total{command="run",role="RUNNER"} 1.0',
        'citron_errors_total{code="unknown_command"} 1.0',
        'citron_builds{state="queued"} 1.0',
        "citron_queue_depth 1.0",
        "citron_log_bytes_stored_total",
        "citron_store_commit_seconds_bucket",
        "citron_slow_consumer_disconnects_total 0.0",
    ]:
        assert needle in text, needle
    assert server.http("/nope")[0] == 404
    status, content_type, body = server.http("/")
    assert status == 200 and content_type.startswith("text/html") and "citron" in body
    assert server.http("/static/nope.js")[0] == 404


async def test_too_many_errors_close_with_1008(server: ServerProc) -> None:
    ws = await peer(server.url)
    other = await peer(server.url)
    for _ in range(101):
        await ws.send("junk")
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await recv(ws)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert (await ask(other, "WEB:get_runners:")).COMMAND == "runners"


async def test_compression_when_asked(server_factory: ServerFactory) -> None:
    server = server_factory("--compression", "deflate")
    from websockets.asyncio.client import connect

    async def deflate_peer() -> Any:
        ws = await connect(server.url, compression="deflate", open_timeout=5)
        OPEN.append(ws)
        assert ws.response is not None
        assert "permessage-deflate" in ws.response.headers.get("Sec-WebSocket-Extensions", "")
        return ws

    r, api, web = await deflate_peer(), await deflate_peer(), await deflate_peer()
    await r.send('RUNNER:init:{"type": "simple"}')
    await recv(r)
    build = await submit(api)
    await recv(r)
    await ask(web, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    lines = [f"compressed line {i} " + "z" * 200 + "\n" for i in range(300)]
    for line in lines:
        await r.send(json_frame(line))
    await r.send('RUNNER:process:{"finished": true, "success": true}')
    assert [text for _, text in await follow(web, build)] == lines
