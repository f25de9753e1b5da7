"""The SQLite store on its own: batches, reads after writes, a failure."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import attrs
import pytest

from citron_protocol import BuildState
from citron_protocol.records import BuildRecord, FindBuilds, LogRecord
from citron_server.store import SCHEMA_VERSION, SqliteStore, StoreError


def build(number: int = 1, state: BuildState = BuildState.RUNNING) -> BuildRecord:
    return BuildRecord(
        id=f"b{number}",
        number=number,
        state=state,
        repo="r",
        script=("make",),
        created=1.0,
        attempt=1,
        secret_names=("TOKEN",),
    )


def chunk(seq: int, run_seq: int | None = None) -> LogRecord:
    return LogRecord(
        build="b1",
        seq=seq,
        log=f"line {seq}\n",
        attempt=1,
        run_seq=run_seq,
        size=7,
        time=100.5 + seq,
    )


async def test_reads_see_writes_and_counters_come_from_chunks(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "c.db"))
    await store.open()
    store.write([build(), chunk(1, 1), chunk(2, 2), chunk(3, None)])
    assert await store.read_log("b1", 0, 3, 10) == [
        (1, "line 1\n", 101.5),
        (2, "line 2\n", 102.5),
        (3, "line 3\n", 103.5),
    ]
    assert await store.read_log("b1", 1, 3, 1) == [(2, "line 2\n", 102.5)]
    (loaded,) = await store.load_builds()
    assert (loaded.log_seq, loaded.log_bytes, loaded.run_seq) == (3, 21, 2)
    assert loaded.secret_names == ("TOKEN",)
    await store.close()
    again = SqliteStore(str(tmp_path / "c.db"))
    await again.open()
    assert [b.id for b in await again.load_builds()] == ["b1"]
    await again.close()
    with sqlite3.connect(tmp_path / "c.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "c.db") as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store = SqliteStore(str(tmp_path / "c.db"))
    with pytest.raises(StoreError, match="schema version"):
        await store.open()


async def test_a_failed_store_says_so_and_drops_writes(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "c.db"))
    await store.open()
    await store._call(lambda db: db.close())  # the database goes away under the thread
    store.write([build()])
    store._handoff()
    for _ in range(100):
        if store.error:
            break
        await asyncio.sleep(0.01)
    assert store.error is not None
    before = store.dropped
    store.write([chunk(1), chunk(2)])
    assert store.dropped == before + 2
    with pytest.raises(StoreError):
        await store.read_log("b1", 0, 1, 1)
    await store.close()


# -- history: finding builds, retention, the schema-1 upgrade ------------------------


def finished(number: int, at: float, state: BuildState = BuildState.SUCCESS) -> BuildRecord:
    """Build ``number`` created at ``at``, and finished then if ``state`` is final."""
    return attrs.evolve(
        build(number, state),
        created=at,
        finished=at if state.finished else None,
        success=state is BuildState.SUCCESS if state.finished else None,
        revision=3,
    )


def lines(build: str, n: int, size: int = 1000) -> list[LogRecord]:
    text = "x" * (size - 1) + "\n"
    return [
        LogRecord(build=build, seq=s, log=text, attempt=1, run_seq=s, size=size)
        for s in range(1, n + 1)
    ]


async def test_builds_are_found_by_id_and_by_page(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "c.db"))
    await store.open()
    states = [BuildState.SUCCESS, BuildState.FAILURE, BuildState.QUEUED]
    store.write([finished(n, 1000.0 + n, states[n % 3]) for n in range(1, 31)])
    assert await store.max_number() == 30
    (found,) = await store.find_builds(FindBuilds(request=1, conn=1, build="b7")) or []
    assert (found.id, found.state) == ("b7", BuildState.FAILURE)
    assert await store.find_builds(FindBuilds(request=1, conn=1, build="nope")) is None
    page = await store.find_builds(FindBuilds(request=1, conn=1, before=20, limit=4)) or []
    assert [b.number for b in page] == [19, 18, 17, 16]
    page = (
        await store.find_builds(
            FindBuilds(request=1, conn=1, before=20, state=BuildState.QUEUED, limit=3)
        )
        or []
    )
    assert [b.number for b in page] == [17, 14, 11]
    assert [b.number for b in await store.load_builds()] == list(range(2, 31, 3))
    await store.close()


async def test_retention_deletes_old_finished_builds_and_their_logs_only(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    store = SqliteStore(str(path))
    await store.open()
    now = 1_000_000.0
    old = [finished(n, now - 10 * 86400 + n) for n in range(1, 21)]
    recent = [finished(n, now - 86400) for n in range(21, 31)]
    live = [finished(n, now - 30 * 86400, BuildState.RUNNING) for n in range(31, 34)]
    records: list[BuildRecord | LogRecord] = [*old, *recent, *live]
    for b in [*old, *recent, *live]:
        records += lines(b.id, 50)  # 50 KB of log each
    store.write(records)
    await store.flush()
    pages_before = await store._call(lambda db: db.execute("PRAGMA page_count").fetchone()[0])
    steps = []
    while done := await store.purge(now - 7 * 86400, 30):
        steps.append(done)
    assert len(steps) >= 20 * 51 // 30  # in small steps
    left = await store._call(lambda db: [r[0] for r in db.execute("SELECT id FROM builds")])
    assert sorted(left) == sorted(b.id for b in [*recent, *live])
    chunks = await store._call(
        lambda db: db.execute("SELECT count(*), count(DISTINCT build) FROM log_chunks").fetchone()
    )
    assert chunks == (13 * 50, 13)
    pages_after = await store._call(lambda db: db.execute("PRAGMA page_count").fetchone()[0])
    assert pages_after < pages_before * 0.7  # the space went back to the file system
    await store.close()


async def test_a_schema_1_database_is_upgraded(tmp_path: Path) -> None:
    from citron_server.store import _MIGRATIONS, _converter

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(_MIGRATIONS[0])
        db.execute("PRAGMA user_version = 1")
        for b in (finished(1, 500.0), finished(2, 600.0, BuildState.QUEUED)):
            stale = attrs.evolve(b, log_seq=0, log_bytes=0)  # as a lost build's notice left it
            db.execute(
                "INSERT INTO builds (id, number, state, record) VALUES (?, ?, ?, ?)",
                (b.id, b.number, b.state.value, json.dumps(_converter.unstructure(stale))),
            )
        for c in lines("b1", 3, 10):
            db.execute(
                "INSERT INTO log_chunks VALUES (?, ?, ?, ?, ?, ?)",
                (c.build, c.seq, c.attempt, c.run_seq, c.size, c.log),
            )
    store = SqliteStore(str(path))
    await store.open()
    (b1,) = await store.find_builds(FindBuilds(request=1, conn=1, build="b1")) or []
    assert (b1.log_seq, b1.log_bytes) == (3, 30)
    assert [b.id for b in await store.load_builds()] == ["b2"]
    assert await store.purge(550.0, 100) >= 4  # b1 and its 3 chunks
    assert await store.find_builds(FindBuilds(request=1, conn=1, build="b1")) is None
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental


async def test_a_record_that_does_not_read_back_is_a_store_error_and_the_store_goes_on(
    tmp_path: Path,
) -> None:
    store = SqliteStore(str(tmp_path / "c.db"))
    await store.open()
    store.write([finished(1, 10.0), finished(2, 20.0)])
    await store.flush()
    await store._call(
        lambda db: db.execute("UPDATE builds SET record = '{\"id\": 5}' WHERE id = 'b1'")
    )
    with pytest.raises(StoreError, match="does not read back"):
        await asyncio.wait_for(
            store.find_builds(FindBuilds(request=1, conn=1, build="b1")), timeout=5
        )
    # The store's thread is still there: the next read is answered.
    (b2,) = (
        await asyncio.wait_for(
            store.find_builds(FindBuilds(request=1, conn=1, build="b2")), timeout=5
        )
        or []
    )
    assert b2.id == "b2" and await store.max_number() == 2
    await store.close()


async def test_chunks_stored_before_times_were_kept_read_back_without_one(tmp_path: Path) -> None:
    """A schema 2 database (no time column) is migrated: its chunks read
    back with time None, new ones with theirs."""
    path = tmp_path / "c.db"
    store = SqliteStore(str(path))
    await store.open()
    store.write([build(), chunk(1, 1)])
    await store.close()
    with sqlite3.connect(path) as db:  # back to schema 2: the chunk's time unknown
        db.execute("UPDATE log_chunks SET time = NULL")
        db.execute("ALTER TABLE log_chunks DROP COLUMN time")
        db.execute("PRAGMA user_version = 2")
    again = SqliteStore(str(path))
    await again.open()
    again.write([chunk(2, 2)])
    assert await again.read_log("b1", 0, 2, 10) == [(1, "line 1\n", None), (2, "line 2\n", 102.5)]
    await again.close()


async def test_steps_are_kept_and_builds_stored_before_steps_read_back_without(
    tmp_path: Path,
) -> None:
    from citron_protocol import Step, StepState
    from citron_server.store import record_json

    steps = (
        Step(state=StepState.PASSED, exit_code=0, duration=0.25),
        Step(state=StepState.FAILED, exit_code=3, duration=1.5),
        Step(state=StepState.SKIPPED),
    )
    with_steps = attrs.evolve(
        finished(1, 10.0, BuildState.FAILURE), script=("a", "b", "c"), steps=steps, exit_code=3
    )
    store = SqliteStore(str(tmp_path / "c.db"))
    await store.open()
    store.write([with_steps, finished(2, 20.0)])
    await store.flush()
    # A record as a server of the last version wrote it: no "steps" key at all.
    old = json.loads(record_json(finished(2, 20.0)))
    del old["steps"]
    await store._call(
        lambda db: db.execute("UPDATE builds SET record = ? WHERE id = 'b2'", (json.dumps(old),))
    )
    await store.close()
    again = SqliteStore(str(tmp_path / "c.db"))
    await again.open()
    (b1,) = await again.find_builds(FindBuilds(request=1, conn=1, build="b1")) or []
    (b2,) = await again.find_builds(FindBuilds(request=1, conn=1, build="b2")) or []
    assert b1.steps == steps and b1.exit_code == 3
    assert b2.steps is None and b2 == finished(2, 20.0)
    await again.close()
