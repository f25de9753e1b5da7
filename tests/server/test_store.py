"""The SQLite store on its own: batches, reads after writes, a failure."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from citron_protocol import BuildRecord, BuildState, LogRecord
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
    return LogRecord(build="b1", seq=seq, log=f"line {seq}\n", attempt=1, run_seq=run_seq, size=7)


async def test_reads_see_writes_and_counters_come_from_chunks(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "c.db"))
    await store.open()
    store.write([build(), chunk(1, 1), chunk(2, 2), chunk(3, None)])
    assert await store.read_log("b1", 0, 3, 10) == [
        (1, "line 1\n"),
        (2, "line 2\n"),
        (3, "line 3\n"),
    ]
    assert await store.read_log("b1", 1, 3, 1) == [(2, "line 2\n")]
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
