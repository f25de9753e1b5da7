"""The load generator: runs in its own process, talks to a server over
loopback, prints its result as one JSON line.

    python -m bench.loadgen '{"scenario": "relay", ...}'
"""

from __future__ import annotations

import asyncio
import itertools
import json
import resource
import sys
import time
from collections.abc import Iterable
from typing import Any

from websockets.asyncio.client import connect

LINE = "x" * 99 + "\n"  # a 100-byte log line
WINDOW = 400  # lines in flight before the writer waits for the slowest reader


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def ws_connect(url: str) -> Any:
    return await connect(
        url, compression=None, max_size=None, max_queue=None, open_timeout=60, ping_interval=None
    )


class Counter:
    """Counts what the readers got; wakes the writer when it may go on."""

    def __init__(self, readers: int) -> None:
        self.counts = [0] * readers
        self.event = asyncio.Event()

    def low(self) -> int:
        return min(self.counts)

    def add(self, i: int) -> None:
        self.counts[i] += 1
        if self.counts[i] % 50 == 0:
            self.event.set()


async def write_windowed(send: Any, frame: str, n: int, counter: Counter) -> None:
    for sent in range(n):
        while sent - counter.low() > WINDOW:
            counter.event.clear()
            await counter.event.wait()
        await send(frame)


async def wait_all(counter: Counter, n: int) -> None:
    while counter.low() < n:
        counter.event.clear()
        await asyncio.wait_for(counter.event.wait(), 60)


# -- relay ---------------------------------------------------------------------------

FRAME = 'RUNNER:process:{"finished":false,"log":' + json.dumps(LINE) + "}"


async def measure(send: Any, fronts: list[Any], n: int, counts: Any) -> float:
    """Lines per second: ``send`` streams ``n`` frames, windowed; each front
    counts the messages for which ``counts(text)`` holds until it has ``n``."""
    counter = Counter(len(fronts))

    async def read(i: int, ws: Any) -> None:
        async for text in ws:
            if counts(text):
                counter.add(i)
                if counter.counts[i] >= n:
                    counter.event.set()
                    return

    tasks = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(fronts)]
    start = time.perf_counter()
    await write_windowed(send, FRAME, n, counter)
    await wait_all(counter, n)
    elapsed = time.perf_counter() - start
    for task in tasks:
        task.cancel()
    return n / elapsed


async def relay_citron(url: str, readers: int, n: int, front_url: str | None = None) -> float:
    """The runner and the backend on ``url``; the fronts on ``front_url``
    (another node of a cluster), or on ``url`` too."""
    kind = f"bench-{time.monotonic_ns()}"
    runner = await ws_connect(url)
    await runner.send(f'RUNNER:init:{{"type": "{kind}", "protocol": 1}}')
    await runner.recv()
    api = await ws_connect(url)
    await api.send(f'API:run:{{"repo": "bench", "script": [], "type": "{kind}"}}')
    build = json.loads((await api.recv()).split(":", 1)[1])["build"]
    await runner.recv()  # run:
    fronts = [await ws_connect(front_url or url) for _ in range(readers)]
    for front in fronts:
        await front.send(f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
        await front.recv()  # subscribed
        await front.recv()  # state
    rate = await measure(runner.send, fronts, n, lambda text: text.startswith("log:"))
    await runner.send('RUNNER:process:{"finished":true,"success":true}')
    for ws in [runner, api, *fronts]:
        await ws.close()
    return rate


async def relay_raw(url: str, readers: int, n: int) -> float:
    fronts = []
    for _ in range(readers):
        ws = await ws_connect(url)
        await ws.send("reader")
        fronts.append(ws)
    writer = await ws_connect(url)
    await writer.send("writer")
    await asyncio.sleep(0.2)  # let the server see the readers
    rate = await measure(writer.send, fronts, n, lambda text: True)
    for ws in [writer, *fronts]:
        await ws.close()
    return rate


async def relay_sio(url: str, readers: int, n: int) -> float:
    import socketio

    counter = Counter(readers)
    clients = []
    for i in range(readers):
        client = socketio.AsyncClient()

        def on_line(data: str, i: int = i) -> None:
            counter.add(i)
            if counter.counts[i] >= n:
                counter.event.set()

        client.on("line", on_line)
        await client.connect(url, transports=["websocket"])
        await client.call("join")
        clients.append(client)
    writer = socketio.AsyncClient()
    await writer.connect(url, transports=["websocket"])

    async def send(line: str) -> None:
        await writer.emit("line", line)

    start = time.perf_counter()
    await write_windowed(send, LINE, n, counter)
    await wait_all(counter, n)
    elapsed = time.perf_counter() - start
    for client in [writer, *clients]:
        await client.disconnect()
    return n / elapsed


# -- idle connections and dispatch latency ------------------------------------------------


async def idle(url: str, kind: str, connections: int) -> dict[str, Any]:
    """Open ``connections`` idle runners (citron) or connections (the relay),
    print how many, then answer each line of stdin, a count N, with N latency
    samples (dispatch for citron, an echo round trip for the relay) until
    stdin ends."""
    limit = _raise_nofile()
    conns = []
    got_run: asyncio.Queue[float] = asyncio.Queue()

    async def runner_loop(ws: Any) -> None:
        async for text in ws:
            if text.startswith("run:"):
                got_run.put_nowait(time.perf_counter())
                await ws.send('RUNNER:process:{"finished":true,"success":true}')

    tasks = []
    for _ in range(connections):
        ws = await ws_connect(url)
        if kind == "citron":
            await ws.send('RUNNER:init:{"type": "idle-bench", "protocol": 1}')
            await ws.recv()  # ready
            tasks.append(asyncio.create_task(runner_loop(ws)))
        else:
            await ws.send("idle")
        conns.append(ws)
    print(json.dumps({"open": connections, "nofile": limit}), flush=True)
    loop = asyncio.get_running_loop()
    probe = None  # opened after the server's memory is measured
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if probe is None:
            probe = await ws_connect(url)
            if kind != "citron":
                await probe.send("echo")
        latencies = []
        for _ in range(int(line)):
            t0 = time.perf_counter()
            if kind == "citron":
                await probe.send('API:run:{"repo": "bench", "script": [], "type": "idle-bench"}')
                t1 = await asyncio.wait_for(got_run.get(), 30)
                await probe.recv()  # queued
            else:
                await probe.send("ping")
                await probe.recv()
                t1 = time.perf_counter()
            latencies.append(t1 - t0)
            await asyncio.sleep(0.005)
        print(json.dumps({"latencies": latencies}), flush=True)
    if probe is not None:
        await probe.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
    return {"closed": connections}


# -- replay ------------------------------------------------------------------------------


async def running_build(url: str) -> tuple[Any, Any, str]:
    """A runner, a backend, and a build the runner is running."""
    runner = await ws_connect(url)
    await runner.send('RUNNER:init:{"type": "replay-bench", "protocol": 1}')
    await runner.recv()
    api = await ws_connect(url)
    await api.send('API:run:{"repo": "bench", "script": [], "type": "replay-bench"}')
    build = json.loads((await api.recv()).split(":", 1)[1])["build"]
    await runner.recv()
    return runner, api, build


async def write_log(url: str, frames: Iterable[str], every: int) -> tuple[str, int]:
    """A build whose runner sends ``frames`` (asking for the build every
    ``every`` of them, to keep the server's inbox short) and succeeds, once
    every chunk is stored: its id and its chunk count."""
    runner, api, build = await running_build(url)
    n = 0
    for n, frame in enumerate(frames, 1):
        await runner.send(frame)
        if n % every == 1:
            await api.send(f'API:get_build:{{"build": "{build}"}}')
            await api.recv()
    await runner.send('RUNNER:process:{"finished":true,"success":true}')
    while True:
        await api.send(f'API:get_build:{{"build": "{build}"}}')
        info = json.loads((await api.recv()).split(":", 1)[1])
        if info["state"] == "success" and info["log_seq"] == n:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # past a commit period
    await runner.close()
    await api.close()
    return build, n


async def fill(url: str, n: int) -> dict[str, Any]:
    build, log_seq = await write_log(url, itertools.repeat(FRAME, n), 2000)
    return {"build": build, "log_seq": log_seq}


async def replay(url: str, build: str, n: int) -> float:
    front = await ws_connect(url)
    start = time.perf_counter()
    await front.send(f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    got = 0
    async for text in front:
        if text.startswith("log:"):
            got += 1
            if got >= n:
                break
    elapsed = time.perf_counter() - start
    await front.close()
    return n / elapsed


async def fill_big(url: str, chunk: int, total: int) -> dict[str, Any]:
    """A build whose log is ``total`` bytes in chunks of ``chunk`` bytes."""
    texts = (f"{i:08d}" + "x" * (chunk - 9) + "\n" for i in range(total // chunk))
    frames = ("RUNNER:process:" + json.dumps({"finished": False, "log": t}) for t in texts)
    build, n = await write_log(url, frames, 64)
    return {"build": build, "chunks": n}


async def replay_bytes(url: str, build: str, n: int, kind: str) -> float:
    """MB/s of ``log:`` frames received until chunk ``n``: from citron
    (subscribe) or from the baseline (``replay BUILD``)."""
    front = await ws_connect(url)
    start = time.perf_counter()
    if kind == "citron":
        await front.send(f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    else:
        await front.send(f"replay {build}")
    got = size = 0
    async for text in front:
        if text.startswith("log:"):
            got += 1
            size += len(text)
            if got >= n:
                break
    elapsed = time.perf_counter() - start
    await front.close()
    return size / elapsed / 1e6


async def builds(url: str, n: int, runners: int) -> dict[str, Any]:
    """Run ``n`` one-line builds through ``runners`` runners: the backend
    keeps up to 200 queued, each runner finishes what it is given."""
    api = await ws_connect(url)
    done = asyncio.Event()
    finished = 0

    async def work() -> None:
        nonlocal finished
        ws = await ws_connect(url)
        await ws.send('RUNNER:init:{"type": "simple", "protocol": 1}')
        async for text in ws:
            if text.startswith("run:"):
                await ws.send('RUNNER:process:{"finished": false, "log": "ok\\n"}')
                await ws.send('RUNNER:process:{"finished": true, "success": true}')
                finished += 1
                if finished >= n:
                    done.set()

    tasks = [asyncio.create_task(work()) for _ in range(runners)]
    started = time.perf_counter()
    sent = 0
    while sent < n:
        if sent and sent % 1000 == 0:
            # A connection's request budget allows a burst of 2000, then
            # 200 a second: a new backend connection now and then.
            await api.close()
            api = await ws_connect(url)
        batch = min(200, n - sent)
        for _ in range(batch):
            await api.send('API:run:{"repo": "https://x/r.git", "script": ["make"]}')
        for _ in range(batch):
            reply = await api.recv()
            assert isinstance(reply, str) and reply.startswith("queued:"), reply
        sent += batch
        while sent - finished > 400:
            await asyncio.sleep(0.001)
    await done.wait()
    elapsed = time.perf_counter() - started
    for task in tasks:
        task.cancel()
    await api.close()
    return {"rate": n / elapsed}


async def pages(url: str, befores: list[str], limit: int) -> dict[str, Any]:
    """Ask for a page of ``limit`` builds before each id in turn, one at a
    time: the median time a page took, in seconds."""
    ws = await ws_connect(url)
    times = []
    for before in befores:
        extra = f', "before": "{before}"' if before else ""
        started = time.perf_counter()
        await ws.send(f'WEB:get_builds:{{"limit": {limit}{extra}}}')
        reply = await ws.recv()
        times.append(time.perf_counter() - started)
        assert isinstance(reply, str) and reply.startswith("builds:"), reply[:200]
        assert reply.count('"id"') == limit, reply[:200]
    await ws.close()
    times.sort()
    return {"median": times[len(times) // 2]}


async def main(spec: dict[str, Any]) -> Any:
    scenario = spec["scenario"]
    if scenario == "builds":
        return await builds(spec["url"], spec["builds"], spec.get("runners", 4))
    if scenario == "pages":
        return await pages(spec["url"], spec["befores"], spec.get("limit", 50))
    if scenario == "relay" and spec.get("front_url"):
        rate = await relay_citron(spec["url"], spec["readers"], spec["lines"], spec["front_url"])
        return {"rate": rate}
    if scenario == "relay":
        fn = {"citron": relay_citron, "raw": relay_raw, "sio": relay_sio}[spec["kind"]]
        return {"rate": await fn(spec["url"], spec["readers"], spec["lines"])}
    if scenario == "idle":
        return await idle(spec["url"], spec["kind"], spec["connections"])
    if scenario == "fill":
        return await fill(spec["url"], spec["lines"])
    if scenario == "replay":
        return {"rate": await replay(spec["url"], spec["build"], spec["lines"])}
    if scenario == "fill_big":
        return await fill_big(spec["url"], spec["chunk"], spec["total"])
    if scenario == "replay_bytes":
        rate = await replay_bytes(spec["url"], spec["build"], spec["chunks"], spec["kind"])
        return {"rate": rate}
    raise SystemExit(f"unknown scenario {scenario}")


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))), flush=True)
