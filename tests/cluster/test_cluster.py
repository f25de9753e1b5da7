"""Three citron-server processes on one real redis-server behave as one hub."""

from __future__ import annotations

import asyncio
import collections
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from websockets.exceptions import ConnectionClosed

from citron_protocol import RunnerState

from ..client import test_e2e as client_e2e
from ..client import test_tools as client_tools
from ..peers import ask, expect, follow, page_all, peer, recv, runner, submit
from ..procs import Spawn, citron, eventually, run_module, runner_argv
from ..server import test_bounds as bounds
from ..server import test_e2e as server_e2e
from .conftest import Cluster, ClusterFactory, RedisServer


async def running_build(runner_url: str, api_url: str) -> tuple[Any, Any, str]:
    """A runner on one node running a build that a backend on another node
    submitted: (backend, runner, build)."""
    r = await runner(runner_url)
    api = await peer(api_url)
    build = await submit(api)
    assert (await expect(r, "run")).build == build
    return api, r, build


# -- the end-to-end suite, with every peer on another node -------------------------

SERVER_CASES: list[Callable[[Any], Awaitable[None]]] = [
    server_e2e.test_the_seed_flow_watched_by_two_fronts,
    server_e2e.test_legacy_php_runner_frames_end_to_end,
    server_e2e.test_invalid_utf8_closes_with_1007,
    server_e2e.test_error_codes_bad_state_on_cancel_echo_req,
    server_e2e.test_binary_frames_are_malformed,
    server_e2e.test_too_many_errors_close_with_1008,
    server_e2e.test_a_2mib_frame_closes_only_its_connection,
    client_e2e.test_the_client_library,
]


@pytest.mark.parametrize("case", SERVER_CASES, ids=lambda f: f.__name__.removeprefix("test_"))
async def test_the_server_suite_on_a_cluster(
    cluster: Cluster, case: Callable[[Any], Awaitable[None]]
) -> None:
    await case(cluster)


@pytest.mark.parametrize(
    ("code", "before", "frame"), server_e2e.ERROR_CASES, ids=[c[0] for c in server_e2e.ERROR_CASES]
)
async def test_every_error_code_on_a_cluster(
    cluster: Cluster, code: str, before: list[str], frame: str
) -> None:
    await server_e2e.test_every_error_code(cluster, code, before, frame)  # type: ignore[arg-type]


def test_citron_runner_and_cli_on_a_cluster(
    cluster: Cluster, spawn: Spawn, git_repo: Path, tmp_path: Path
) -> None:
    client_e2e.test_submit_wait_streams_live_and_exits_with_the_result(
        cluster,  # type: ignore[arg-type]
        spawn,
        git_repo,
        tmp_path,
    )


def test_cancel_across_nodes(cluster: Cluster, spawn: Spawn, git_repo: Path) -> None:
    client_e2e.test_cancel_kills_the_whole_build(cluster, spawn, git_repo)  # type: ignore[arg-type]


async def test_the_live_feed_shows_the_whole_cluster(cluster: Cluster) -> None:
    first, second, third = cluster.nodes
    feed = await peer(third.url)
    assert (await ask(feed, "WEB:subscribe:{}")).COMMAND == "subscribed"
    r = await runner(first.url)
    registered = await expect(feed, "runner")
    assert registered.runner.state is RunnerState.WAITING and not registered.gone
    api = await peer(second.url)
    build = await submit(api)
    queued = await expect(feed, "state")
    assert (queued.build.id, queued.build.state.value) == (build, "queued")
    await expect(r, "run")
    await r.close()
    while not (change := await expect(feed, "runner")).gone:
        pass
    assert change.runner.id == registered.runner.id


# -- dispatch ------------------------------------------------------------------------


async def test_fifo_across_the_cluster(cluster: Cluster) -> None:
    apis = [await peer(url) for url in cluster.urls()]
    builds = [await submit(apis[i % 3]) for i in range(6)]
    r = await runner(cluster.urls()[1])
    for build in builds:
        run = await expect(r, "run")
        assert run.build == build
        await r.send('RUNNER:process:{"finished": true, "success": true}')


async def test_200_builds_race_for_30_runners_on_3_nodes(cluster: Cluster) -> None:
    urls = cluster.urls()
    runs: collections.Counter[str] = collections.Counter()
    by_runner: collections.Counter[int] = collections.Counter()
    stop = asyncio.Event()

    async def serve(n: int) -> None:
        ws = await runner(urls[n % 3])
        while not stop.is_set():
            try:
                message = await recv(ws, timeout=0.2)
            except TimeoutError:
                continue
            if message.COMMAND == "run":
                runs[message.build] += 1
                by_runner[n] += 1
                await ws.send('RUNNER:process:{"finished": false, "log": "ran\\n"}')
                await ws.send('RUNNER:process:{"finished": true, "success": true}')

    runners = [asyncio.create_task(serve(n)) for n in range(30)]
    apis = [await peer(url) for url in urls]

    async def submit_many(api: Any, count: int) -> list[str]:
        return [await submit(api) for _ in range(count)]

    lists = await asyncio.gather(
        *(submit_many(api, 67 if i < 2 else 66) for i, api in enumerate(apis))
    )
    builds = [b for sub in lists for b in sub]
    assert len(builds) == len(set(builds)) == 200
    web = await peer(urls[2])

    async def all_done() -> None:
        while True:
            reply = await ask(web, 'WEB:get_builds:{"limit": 500, "state": "success"}')
            if len(reply.builds) == 200:
                return
            await asyncio.sleep(0.1)

    await asyncio.wait_for(all_done(), 30)
    stop.set()
    await asyncio.gather(*runners)
    assert sorted(runs) == sorted(builds)
    assert set(runs.values()) == {1}, [b for b, n in runs.items() if n > 1]
    assert len(by_runner) > 10  # the work really was spread over the runners
    reply = await ask(web, 'WEB:get_builds:{"limit": 500}')
    assert {b.id: (b.state.value, b.attempt, b.log_seq) for b in reply.builds} == {
        b: ("success", 1, 1) for b in builds
    }


# -- node death ---------------------------------------------------------------------


def test_kill_9_mid_build_the_build_finishes_on_another_node(
    cluster: Cluster, spawn: Spawn, git_repo: Path
) -> None:
    first, second, third = cluster.nodes
    # The runner knows every node, and starts on the first.
    spawn(*runner_argv(f"{first.url},{second.url}", third.url), log_name="runner")
    eventually(
        lambda: json.loads(citron("runners", third.url, "--json").stdout) or None,
        "the runner registered",
    )
    script = "for i in $(seq 1 300); do echo line $i; sleep 0.01; done"
    result = citron("submit", second.url, "--repo", str(git_repo), "--script", script)
    assert result.returncode == 0, result.stderr
    build = result.stdout.strip()

    def stored() -> str:
        out = citron("logs", third.url, build)
        assert out.returncode == 0, out.stderr
        return out.stdout

    eventually(lambda: "line 40\n" in stored() or None, "line 40 stored")
    first.kill9()
    shown = eventually(
        client_e2e.state_is(third, build, "success", "failure", "lost"),
        "the build ended",
        tries=600,
    )
    assert (shown["state"], shown["attempt"]) == ("success", 1), shown
    lines = [line for line in stored().splitlines() if line.startswith("line ")]
    assert lines == [f"line {i}" for i in range(1, 301)]
    # A front following from 0 on another node gets each line once too.
    followed = citron("logs", second.url, build, "--follow")
    assert [x for x in followed.stdout.splitlines() if x.startswith("line ")] == lines


async def test_a_runner_that_never_comes_back_is_lost_and_retried(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory("--lost-grace", "1")
    first, second, third = cluster.nodes
    api, _doomed, build = await running_build(first.url, second.url)
    web = await peer(third.url)
    await ask(web, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    first.kill9()
    survivor = await runner(third.url)
    run = await expect(survivor, "run", timeout=15)  # lease (1 s) + grace (1 s)
    assert run.build == build
    info = (await ask(api, f'API:get_build:{{"build": "{build}"}}')).build
    assert (info.state.value, info.attempt) == ("running", 2)


async def test_a_node_that_joins_later_sees_the_whole_hub(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(nodes=2)
    _api, r, build = await running_build(cluster.nodes[1].url, cluster.nodes[0].url)
    await r.send('RUNNER:process:{"finished": false, "log": "hello\\n"}')
    late = cluster_factory(nodes=1).nodes[0]
    web = await peer(late.url)
    runners = await ask(web, "WEB:get_runners:")
    assert [x.state for x in runners.runners] == [RunnerState.RUNNING]
    await ask(web, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    await r.send('RUNNER:process:{"finished": true, "success": true}')
    assert await follow(web, build) == [(1, "hello\n")]
    assert late.healthz()["builds"] == {"queued": 0, "running": 0}


async def test_sigterm_leaves_the_cluster_at_once(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory("--lost-grace", "30")
    first, second, third = cluster.nodes
    _api, leaving, build = await running_build(first.url, second.url)
    assert await asyncio.to_thread(first.terminate) == 0
    with pytest.raises(ConnectionClosed) as info:
        await recv(leaving)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    # The others know at once (no lease to wait for): the runner is gone and
    # its build waits for a resume.
    web = await peer(third.url)
    assert (await ask(web, "WEB:get_runners:")).runners == ()
    info_now = (await ask(web, f'WEB:get_build:{{"build": "{build}"}}')).build
    assert info_now.state.value == "running"


# -- Redis going away ---------------------------------------------------------------


async def test_redis_away_answers_unavailable_and_recovers(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    api = await peer(node.url)
    web = await peer(cluster.nodes[1].url)
    assert (await ask(api, 'API:get_runners:{"req": "before"}')).COMMAND == "runners"
    cluster.redis.stop()
    try:
        reply = await ask(api, 'API:get_runners:{"req": "during"}', timeout=10)
        while reply.COMMAND != "error":  # a request in flight as Redis went may still pass
            reply = await ask(api, 'API:get_runners:{"req": "during"}', timeout=10)
        assert (reply.code, reply.req) == ("unavailable", "during")
        status, _, body = node.http("/healthz")
        assert status == 503 and "Redis unreachable" in json.loads(body)["status"]
    finally:
        cluster.redis.start()

    async def answered() -> Any:
        while True:
            reply = await ask(web, 'WEB:get_runners:{"req": "after"}', timeout=10)
            if reply.COMMAND == "runners":
                return reply
            await asyncio.sleep(0.2)

    assert (await asyncio.wait_for(answered(), 20)).req == "after"
    # The same connections carry on; a build runs across nodes again. Each
    # node learns on its own that Redis is back: until then, it still says
    # unavailable, and the client sends the request again.
    r = await runner(cluster.nodes[2].url)

    async def submitted() -> str:
        while True:
            reply = await ask(api, 'API:run:{"repo": "r", "script": ["make"]}')
            if reply.COMMAND == "queued":
                return str(reply.build)
            assert reply.code == "unavailable"
            await asyncio.sleep(0.2)

    build = await asyncio.wait_for(submitted(), 20)
    assert (await expect(r, "run")).build == build


async def test_runner_frames_wait_out_a_redis_outage(cluster: Cluster) -> None:
    first, second, third = cluster.nodes
    _api, r, build = await running_build(first.url, second.url)
    web = await peer(third.url)
    await ask(web, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')

    def line(i: int) -> str:
        return f'RUNNER:process:{{"finished": false, "log": "line {i}\\n", "seq": {i}}}'

    for i in range(1, 51):
        await r.send(line(i))
    cluster.redis.stop()
    try:
        for i in range(51, 101):  # held by the runner's node, in order
            await r.send(line(i))
        await asyncio.sleep(0.5)
    finally:
        cluster.redis.start()
    await r.send('RUNNER:process:{"finished": true, "success": true}')
    expected = [(i, f"line {i}\n") for i in range(1, 101)]
    assert await follow(web, build, timeout=30) == expected
    late = await peer(second.url)
    await ask(late, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    # (As long as the first: every node reconnects to Redis with backoff.)
    assert await follow(late, build, timeout=30) == expected


async def test_a_foreign_entry_in_the_stream_is_skipped(cluster: Cluster) -> None:
    client = cluster.redis.client()
    client.xadd("citron:cmd", {"e": "not a citron entry"})
    client.xadd("citron:cmd", {"other": "field"})
    await running_build(cluster.nodes[0].url, cluster.nodes[1].url)
    for node in cluster.nodes:
        assert "not a citron entry" in node.log()


# -- retention -----------------------------------------------------------------------


async def test_finished_logs_expire_after_the_retention(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory("--log-retention", "1", nodes=2)
    api, r, build = await running_build(cluster.nodes[1].url, cluster.nodes[0].url)
    await r.send('RUNNER:process:{"finished": false, "log": "kept a while\\n"}')
    client = cluster.redis.client()
    key = f"citron:log:{build}"
    eventually(lambda: client.exists(key) or None, "the log stored in Redis")
    assert client.ttl(key) == -1  # running: kept
    await r.send('RUNNER:process:{"finished": true, "success": true}')
    eventually(lambda: client.ttl(key) > 0 or None, "an expiry set on the finished log")
    eventually(lambda: not client.exists(key) or None, "the log trimmed")
    info = (await ask(api, f'API:get_build:{{"build": "{build}"}}')).build
    assert (info.state.value, info.log_seq) == ("success", 1)  # the build itself stays


# -- snapshots ------------------------------------------------------------------------


async def test_snapshots_keep_the_stream_short_and_late_nodes_whole(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory("--snapshot-every", "20", nodes=2)
    api = await peer(cluster.nodes[0].url)
    r = await runner(cluster.nodes[1].url)
    builds = []
    for i in range(30):
        builds.append(await submit(api))
        assert (await expect(r, "run")).build == builds[-1]
        await r.send(f'RUNNER:process:{{"finished": false, "log": "build {i}\\n"}}')
        await r.send('RUNNER:process:{"finished": true, "success": true}')
    client = cluster.redis.client()
    eventually(lambda: client.exists("citron:snapshot") or None, "a snapshot stored")
    # A node keeps what the slowest node has not read as of its last lease
    # renewal (every 0.2 s here): the next snapshots trim the rest.
    appended = 2 + 30 * 3
    for _ in range(10):
        await asyncio.sleep(0.3)
        for _ in range(20):
            await ask(api, "API:get_runners:")
        appended += 20
        if client.xlen("citron:cmd") < 60:
            break
    assert client.xlen("citron:cmd") < 60 < appended
    late = cluster_factory("--snapshot-every", "20", nodes=1).nodes[0]
    web = await peer(late.url)
    listed = await ask(web, 'WEB:get_builds:{"limit": 100}')
    assert sorted((b.id, b.state.value, b.log_seq) for b in listed.builds) == sorted(
        (b, "success", 1) for b in builds
    )
    await ask(web, f'WEB:subscribe:{{"build": "{builds[7]}", "from": 0}}')
    assert await follow(web, builds[7]) == [(1, "build 7\n")]
    # The late node dispatches like the others.
    r2 = await runner(late.url)
    await r.close()
    # Once every node knows the first runner left (else the build may go to
    # it, and wait out its lost grace): submit.
    for _ in range(200):
        if len((await ask(api, "API:get_runners:")).runners) == 1:
            break
        await asyncio.sleep(0.05)
    build = await submit(api)
    assert (await expect(r2, "run")).build == build


def test_a_node_with_other_hub_options_is_refused(cluster: Cluster) -> None:
    result = run_module(
        "citron_server",
        "--port",
        "0",
        "--engine",
        cluster.redis.url(),
        "--lost-grace",
        "7",
        timeout=30,
    )
    assert result.returncode == 2
    assert "every node needs the same" in result.stderr and "Traceback" not in result.stderr


def test_an_unreachable_redis_is_one_line_and_exit_2() -> None:
    from .conftest import free_port

    url = f"redis://citron:hunter22@127.0.0.1:{free_port()}/0"
    result = run_module("citron_server", "--port", "0", "--engine", url)
    assert result.returncode == 2
    assert result.stderr.startswith("citron-server: error: cannot reach Redis at redis://***@")
    assert "Traceback" not in result.stderr and "hunter22" not in result.stderr


def test_a_batch_sent_again_is_appended_once(redis_server: RedisServer) -> None:
    """When Redis goes away while a batch is appended, the node cannot know
    whether it was: it sends the same batch again, and the append script
    appends each batch number of a node once."""
    from citron_server.cluster import _APPEND, APPENDED, COMMANDS

    client = redis_server.client()
    client.flushall()
    append = client.register_script(_APPEND)
    batch = ["r\0n1\0n1/1\x001.0\0RUNNER:init:{}", "d\0n1\0n1/1\x001.0\0"]
    assert append(keys=[COMMANDS, APPENDED], args=["n1", 1, *batch]) == 2
    assert append(keys=[COMMANDS, APPENDED], args=["n1", 1, *batch]) == 0  # the retry
    assert append(keys=[COMMANDS, APPENDED], args=["n2", 1, batch[0]]) == 1  # another node
    assert append(keys=[COMMANDS, APPENDED], args=["n1", 2, batch[1]]) == 1
    assert [f["e"] for _, f in client.xrange(COMMANDS)] == [*batch, batch[0], batch[1]]


# -- the wire-level tools against one node of a cluster -------------------------------


def test_conformance_passes_on_a_cluster_node(cluster_factory: ClusterFactory) -> None:
    # The same checks as against one server, against the second node.
    client_tools.test_conformance_passes_on_citron_server(
        lambda *args: cluster_factory(*args).nodes[1]
    )


def test_fuzz_passes_on_a_cluster_node(cluster_factory: ClusterFactory) -> None:
    client_tools.test_fuzz_passes_on_citron_server(lambda *args: cluster_factory(*args).nodes[2])


@pytest.mark.parametrize("size", [64 * 1024, 2 * 1024], ids=["64KiB", "2KiB"])
async def test_an_8_mib_log_replays_whole_on_redis_after_a_restart(
    cluster_factory: ClusterFactory, size: int
) -> None:
    cluster = cluster_factory(nodes=2)
    writer, reader = cluster.nodes
    build, chunks = await bounds.write_log(writer.url, size, 8 * 1024 * 1024)
    for node in cluster.nodes:
        assert await asyncio.to_thread(node.terminate) == 0
    for node in cluster.nodes:
        await asyncio.to_thread(node.restart)
    await bounds.replays_whole(reader.url, build, chunks)


# -- history: builds beyond the window come from Redis; retention --------------------


async def test_builds_beyond_the_window_are_read_from_redis(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory("--window", "5", "--snapshot-every", "20", nodes=2)
    api = await peer(cluster.nodes[0].url)
    r = await runner(cluster.nodes[1].url)
    builds = []
    for i in range(40):
        builds.append(await submit(api))
        assert (await expect(r, "run")).build == builds[-1]
        await r.send(f'RUNNER:process:{{"finished": false, "log": "build {i}\\n"}}')
        await r.send('RUNNER:process:{"finished": true, "success": true}')
    queued = await submit(api, extra=', "type": "none"')
    expected = [queued, *reversed(builds)]
    for node in cluster.nodes:
        web = await peer(node.url)
        assert await page_all(web, 7) == expected
        info = (await ask(web, f'WEB:get_build:{{"build": "{builds[0]}"}}')).build
        assert (info.state.value, info.log_seq) == ("success", 1)
        await ask(web, f'WEB:subscribe:{{"build": "{builds[0]}", "from": 0}}')
        assert await follow(web, builds[0]) == [(1, "build 0\n")]
    client = cluster.redis.client()
    assert client.zcard("citron:builds") == 41
    # A node that starts from the snapshot holds the window only, and pages alike.
    late = cluster_factory("--window", "5", "--snapshot-every", "20", nodes=1).nodes[0]
    web = await peer(late.url)
    assert await page_all(web, 9) == expected


async def test_retention_on_redis_deletes_what_it_should_and_nothing_else(
    redis_server: RedisServer,
) -> None:
    from citron_protocol import BuildState
    from citron_protocol.records import LogRecord
    from citron_server.cluster import ClusterConfig, RedisStore

    from ..server.test_store import finished

    redis_server.client().flushall()
    store = RedisStore(ClusterConfig(url=redis_server.url()))
    await store.open()
    now = 1_000_000.0

    old = [finished(n, now - 10 * 86400) for n in range(1, 11)]
    recent = [finished(n, now - 86400, BuildState.FAILURE) for n in range(11, 16)]
    live = [finished(n, now - 30 * 86400, BuildState.RUNNING) for n in range(16, 18)]
    records: list[Any] = [*old, *recent, *live]
    for b in [*old, *recent, *live]:
        records += [
            LogRecord(build=b.id, seq=s, log="x\n", attempt=1, run_seq=s, size=2)
            for s in range(1, 4)
        ]
    # An older revision written late (by a slower node) changes nothing.
    records.append(attrs.evolve(finished(1, now, BuildState.RUNNING), revision=1))
    store.write(records)
    assert await store.max_number() == 17
    total = 0
    while deleted := await store.purge(now - 7 * 86400, 40):
        total += deleted
    assert total == 10
    client = redis_server.client()
    kept = sorted(client.zrange("citron:builds", 0, -1))
    assert kept == sorted(f"b{n}" for n in range(11, 18))
    assert not any(client.exists(f"citron:log:b{n}") for n in range(1, 11))
    assert all(client.xlen(f"citron:log:b{n}") == 3 for n in range(11, 18))
    assert sorted(client.zrange("citron:state:running", 0, -1)) == ["b16", "b17"]
    assert client.zcard("citron:state:success") == 0 and client.zcard("citron:finished") == 5
    await store.close()


def test_startup_says_engine_and_node(cluster: Cluster) -> None:
    """The start-up lines of a node, as docs/operations.md shows them."""
    for node in cluster.nodes:
        assert node.lines[0].startswith("citron-server: listening on ws://")
        assert node.lines[1].startswith("citron-server: transport ")
        assert re.fullmatch(
            r"citron-server: engine redis://127\.0\.0\.1:\d+/\d+ \(Redis, node [0-9a-f]{12}\)",
            node.lines[2],
        ), node.lines[2]


async def test_log_entries_with_a_foreign_time_replay_without_one(cluster: Cluster) -> None:
    """Log entries in Redis whose time is not a time (written by something
    else) replay whole, without a time: never a hang or a closed front."""
    from citron_server.cluster import log_key

    first, second, _ = cluster.nodes
    _api, r, build = await running_build(first.url, second.url)
    for i in (1, 2, 3):
        await r.send(f'RUNNER:process:{{"finished": false, "log": "line {i}\\n"}}')
    await r.send('RUNNER:process:{"finished": true, "success": true}')
    web = await peer(second.url)
    await ask(web, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    assert len(await follow(web, build, timeout=30)) == 3
    client = cluster.redis.client()
    client.delete(log_key(build))
    for seq, stamp in ((1, "not a number"), (2, "nan"), (3, "-inf")):
        client.xadd(log_key(build), {"l": f"line {seq}\n", "t": stamp}, id=f"0-{seq}")
    late = await peer(first.url)
    await late.send(f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
    chunks = []
    async with asyncio.timeout(30):
        while len(chunks) < 3:
            message = await recv(late)
            if message.COMMAND == "log":
                chunks.append(message)
    assert [(c.seq, c.log, c.time) for c in chunks] == [(i, f"line {i}\n", None) for i in (1, 2, 3)]
