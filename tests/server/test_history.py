"""A server with a long history in SQLite: builds beyond the window are read
from the store, pages list each build once, a start-up reads only the live
builds. Both transports, real loopback sockets."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from citron_protocol.messages import BuildState
from citron_protocol.records import BuildRecord, LogRecord, Record
from citron_server.store import write_database

from ..conftest import ServerFactory
from ..peers import ask, expect, follow, page_all, peer, runner, submit

HISTORY = 20_000


def fill(db: Path, n: int) -> None:
    """``n`` finished builds (every 100th failed), the oldest with a log."""
    records: list[Record] = []
    for number in range(1, n + 1):
        state = BuildState.FAILURE if number % 100 == 0 else BuildState.SUCCESS
        records.append(
            BuildRecord(
                id=f"old-{number}",
                number=number,
                state=state,
                repo="https://x/r.git",
                script=("make",),
                created=1.7e9 + number,
                finished=1.7e9 + number + 1,
                success=state is BuildState.SUCCESS,
                log_seq=1 if number == 1 else 0,
                log_bytes=6 if number == 1 else 0,
                revision=3,
            )
        )
    records.append(LogRecord(build="old-1", seq=1, log="first\n", attempt=1, run_seq=1, size=6))
    write_database(str(db), records)


async def test_a_long_history_is_served_from_the_store(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    db = tmp_path / "history.db"
    fill(db, HISTORY)
    server = server_factory("--window", "10", db=db)
    r = await runner(server.url)
    api = await peer(server.url)
    new = []
    for i in range(15):  # more than the window: some of these leave memory too
        new.append(await submit(api))
        assert (await expect(r, "run")).build == new[-1]
        await r.send(f'RUNNER:process:{{"finished": false, "log": "new {i}\\n"}}')
        await r.send('RUNNER:process:{"finished": true, "success": true}')
    web = await peer(server.url)
    everything = await page_all(web, 1000)
    assert everything == [*reversed(new), *(f"old-{n}" for n in range(HISTORY, 0, -1))]
    failed = await page_all(web, 50, "failure")
    assert failed == [f"old-{n}" for n in range(HISTORY, 0, -100)]
    info = (await ask(web, 'WEB:get_build:{"build": "old-1"}')).build
    assert (info.state.value, info.log_seq, info.log_bytes) == ("success", 1, 6)
    await ask(web, 'WEB:subscribe:{"build": "old-1", "from": 0}')
    assert await follow(web, "old-1") == [(1, "first\n")]
    await ask(web, f'WEB:subscribe:{{"build": "{new[0]}", "from": 0}}')
    assert await follow(web, new[0]) == [(1, "new 0\n")]
    error = await ask(web, 'WEB:get_build:{"build": "never"}')
    assert error.code == "unknown_build"
    # A restart reads only the builds not finished; numbers go on.
    server.restart()
    api = await peer(server.url)
    latest = await submit(api)
    web = await peer(server.url)
    (first,) = (await ask(web, 'WEB:get_builds:{"limit": 1}')).builds
    assert first.id == latest
    assert len(await page_all(web, 1000)) == HISTORY + len(new) + 1
    assert server.healthz()["builds"] == {"queued": 1, "running": 0}
    assert "restored 0 builds not finished" in server.log()


async def test_a_stored_build_that_does_not_read_back_is_answered_unavailable(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    db = tmp_path / "history.db"
    fill(db, 50)
    with sqlite3.connect(db) as conn:  # a record damaged on disk
        conn.execute("UPDATE builds SET record = 'not json' WHERE id = 'old-7'")
    conn.close()
    server = server_factory("--window", "10", db=db)
    web = await peer(server.url)
    error = await ask(web, 'WEB:get_build:{"build": "old-7", "req": "bad"}')
    assert (error.code, error.req) == ("unavailable", "bad")
    assert "does not read back" in error.message
    info = (await ask(web, 'WEB:get_build:{"build": "old-8"}')).build
    assert info.id == "old-8"  # the server and its store carry on
