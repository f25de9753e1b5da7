"""Persistence: the one small interface the host needs, and its SQLite engine.

A :class:`Store` takes the hub's records in order (``write``, which never
blocks), hands the live builds back on start (``load_builds``, with
``max_number``), reads log chunks for replays (``read_log``), finds the builds
that are no longer in the hub's memory (``find_builds``) and deletes old ones
(``purge``). Reads see every record written before them, committed or not.

:class:`SqliteStore` keeps everything in one SQLite file in WAL mode. One
thread owns the connection. Records gather on the event loop for up to 10 ms,
go to the thread as one batch, and are group-committed, one transaction per
batch, at least every 50 ms and whenever the queue runs dry, so storing logs
never blocks the event loop. A ``kill -9`` loses at most what was not
committed yet: about the last 60 ms of records.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import cattrs
import orjson

from citron_protocol.records import (
    LIVE_STATES,
    BuildRecord,
    Chunk,
    FindBuilds,
    LogRecord,
    Record,
    page_of,
)

__all__ = ["SCHEMA_VERSION", "SqliteStore", "Store", "StoreError", "write_database"]

log = logging.getLogger("citron.store")

#: The schema version this code writes (``PRAGMA user_version``).
SCHEMA_VERSION = 3
BATCH_SECONDS = 0.05  # a transaction commits after at most this long
HANDOFF_SECONDS = 0.01  # records wait at most this long on the event loop

_converter = cattrs.Converter()


class StoreError(Exception):
    """The store cannot be opened or used."""


class Store(Protocol):
    """What the host needs from a store engine."""

    async def open(self) -> None:
        """Open (and migrate) the store."""

    async def load_builds(self) -> list[BuildRecord]:
        """The builds not finished, oldest first, log counters taken from the
        stored chunks."""
        ...

    async def max_number(self) -> int:
        """The highest build number stored, 0 if none."""
        ...

    async def find_builds(self, query: FindBuilds) -> list[BuildRecord] | None:
        """The answer to ``query`` (see :class:`~citron_protocol.records.FindBuilds`)."""
        ...

    async def purge(self, finished_before: float, max_rows: int) -> int:
        """Delete builds that finished before ``finished_before`` (seconds
        since the epoch) and their logs, about ``max_rows`` rows at most in
        one go (a build's log may take several), and give some freed space
        back; how much was done (rows, pages), 0 once nothing is left to
        do."""
        ...

    def write(self, records: Sequence[Record]) -> None:
        """Persist records, in order; returns at once."""

    def backlog(self) -> int:
        """Records handed to :meth:`write` and not stored yet: the host
        stops reading frames while it is high (see ``HostConfig.max_backlog``)."""
        ...

    def position(self) -> int:
        """How many records were handed to :meth:`write` so far."""
        ...

    def durable(self) -> int:
        """How many of those are durable (committed, in order): a record
        handed at position ``p`` is durable once ``durable() >= p``."""
        ...

    async def read_log(
        self, build: str, after: int, until: int, limit: int, max_bytes: int | None = None
    ) -> Sequence[Chunk]:
        """Chunks ``after < seq <= until`` of ``build``, ascending, at most
        ``limit``, as ``(seq, text, time)``; with ``max_bytes``, no more text
        than that but at least one chunk
        (:func:`citron_protocol.records.page_of`)."""
        ...

    async def close(self) -> None:
        """Commit everything written, then close."""

    @property
    def error(self) -> str | None:
        """Why the store stopped working, if it did (then writes are dropped)."""
        ...


_MIGRATIONS: list[str] = [
    # version 1
    """
    CREATE TABLE builds (
        id TEXT PRIMARY KEY,
        number INTEGER NOT NULL UNIQUE,
        state TEXT NOT NULL,
        record TEXT NOT NULL
    );
    CREATE TABLE log_chunks (
        build TEXT NOT NULL,
        seq INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        run_seq INTEGER,
        size INTEGER NOT NULL,
        log TEXT NOT NULL,
        PRIMARY KEY (build, seq)
    ) WITHOUT ROWID;
    """,
    # version 2: builds found by state and number, and by when they finished
    # (retention); the stored records' log counters made whole
    """
    ALTER TABLE builds ADD COLUMN finished REAL;
    UPDATE builds SET finished = json_extract(record, '$.finished');
    CREATE INDEX builds_by_state ON builds (state, number);
    CREATE INDEX builds_by_finished ON builds (finished) WHERE finished IS NOT NULL;
    UPDATE builds SET record = json_set(record, '$.log_seq', c.seq, '$.log_bytes', c.size)
        FROM (SELECT build, max(seq) AS seq, sum(size) AS size FROM log_chunks GROUP BY build)
        AS c WHERE c.build = builds.id;
    """,
    # version 3: when each chunk was received (null for older chunks)
    """
    ALTER TABLE log_chunks ADD COLUMN time REAL;
    """,
]
PURGE_VACUUM_PAGES = 4096  # pages given back to the file system per purge step


@attrs.define
class _Job:
    kind: str  # "write", "call"
    records: Sequence[Record] = ()
    fn: Callable[[sqlite3.Connection], Any] | None = None
    future: asyncio.Future[Any] | None = None


class SqliteStore:
    """The embedded default engine. ``path`` may be ``:memory:``."""

    def __init__(self, path: str, on_commit: Callable[[float, int], None] | None = None) -> None:
        self.path = path
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._db: sqlite3.Connection | None = None
        self._failed: BaseException | None = None
        self._gathered: list[Record] = []
        self.dropped = 0  # records refused after a failure
        self._handed = 0  # records handed to the thread's way (event loop only)
        self._stored = 0  # records committed (the thread only)
        self._handoff_timer: asyncio.TimerHandle | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="citron-store", daemon=True
        )
        self._thread.start()
        await ready

    async def close(self) -> None:
        if self._thread is None:
            return
        if self._handoff_timer is not None:
            self._handoff_timer.cancel()
        self._handoff()
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # -- the interface -----------------------------------------------------------------

    @property
    def error(self) -> str | None:
        return None if self._failed is None else str(self._failed)

    def write(self, records: Sequence[Record]) -> None:
        if self._failed is not None:
            self.dropped += len(records)  # the thread is gone: do not pile up
            return
        # Records gather on the event loop and go to the thread in one batch
        # every HANDOFF_SECONDS: one wake-up of the thread per batch, not per
        # record, keeps the two threads from trading the GIL on every chunk.
        if not records:
            return
        self._handed += len(records)
        self._gathered.extend(records)
        if self._handoff_timer is None and self._loop is not None:
            self._handoff_timer = self._loop.call_later(HANDOFF_SECONDS, self._handoff)

    def backlog(self) -> int:
        if self._failed is not None:
            return 0  # writes are dropped: nothing to wait for
        return self._handed - self._stored

    def position(self) -> int:
        return self._handed

    def durable(self) -> int:
        return self._stored

    def _handoff(self) -> None:
        self._handoff_timer = None
        if self._gathered:
            batch, self._gathered = self._gathered, []
            self._queue.put(_Job("write", records=batch))

    async def load_builds(self) -> list[BuildRecord]:
        return await self._call(_load_builds)  # type: ignore[no-any-return]

    async def max_number(self) -> int:
        return await self._call(  # type: ignore[no-any-return]
            lambda db: int(db.execute("SELECT coalesce(max(number), 0) FROM builds").fetchone()[0])
        )

    async def find_builds(self, query: FindBuilds) -> list[BuildRecord] | None:
        return await self._call(  # type: ignore[no-any-return]
            lambda db: _find_builds(db, query)
        )

    async def purge(self, finished_before: float, max_rows: int) -> int:
        return await self._call(  # type: ignore[no-any-return]
            lambda db: _purge(db, finished_before, max_rows)
        )

    async def read_log(
        self, build: str, after: int, until: int, limit: int, max_bytes: int | None = None
    ) -> Sequence[Chunk]:
        def read(db: sqlite3.Connection) -> list[Chunk]:
            rows = db.execute(
                "SELECT seq, log, time FROM log_chunks WHERE build = ? AND seq > ? AND seq <= ?"
                " ORDER BY seq LIMIT ?",
                (build, after, until, limit),
            )
            # The cursor steps row by row: a page reads only what it keeps.
            chunks = ((int(seq), str(text), t) for seq, text, t in rows)
            return list(chunks) if max_bytes is None else page_of(chunks, max_bytes)

        return await self._call(read)  # type: ignore[no-any-return]

    async def flush(self) -> None:
        """Wait until everything written so far is committed."""
        await self._call(lambda db: None)

    # -- the thread ----------------------------------------------------------------------

    async def _call(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        self._handoff()  # a read sees every record written before it
        if self._failed is not None:
            raise StoreError(f"the store failed: {self._failed}")
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put(_Job("call", fn=fn, future=future))
        return await future

    def _resolve(
        self, future: asyncio.Future[Any], value: Any, error: BaseException | None
    ) -> None:
        assert self._loop is not None

        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

        self._loop.call_soon_threadsafe(settle)

    def _run(self, ready: asyncio.Future[None]) -> None:
        try:
            db = _connect(self.path)
        except (sqlite3.Error, OSError, StoreError) as exc:
            self._resolve(ready, None, StoreError(f"cannot open database {self.path}: {exc}"))
            return
        self._resolve(ready, None, None)
        try:
            self._serve(db)
        except sqlite3.Error as exc:  # disk full, file removed: say it, keep the server up
            self._failed = exc
            log.error("store failed, builds and logs are no longer kept: %s", exc)
            self._fail_pending(exc)
        finally:
            db.close()

    def _serve(self, db: sqlite3.Connection) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            started = time.monotonic()
            count = 0
            done = False
            db.execute("BEGIN")
            while True:
                count += self._do(db, job)
                if time.monotonic() - started >= BATCH_SECONDS:
                    break
                try:
                    next_job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if next_job is None:
                    done = True
                    break
                job = next_job
            commit_started = time.monotonic()
            db.execute("COMMIT")
            self._stored += count
            if self._on_commit is not None:
                self._on_commit(time.monotonic() - commit_started, count)
            if done:
                return

    def _do(self, db: sqlite3.Connection, job: _Job) -> int:
        if job.kind == "write":
            _apply(db, job.records)
            return len(job.records)
        assert job.fn is not None and job.future is not None
        try:
            value = job.fn(db)
        except (sqlite3.Error, StoreError) as exc:
            self._resolve(job.future, None, StoreError(str(exc)))
        except Exception as exc:
            log.exception("a read of the store failed")
            self._resolve(job.future, None, StoreError(f"a read failed: {exc!r}"))
        else:
            self._resolve(job.future, value, None)
        return 0

    def _fail_pending(self, exc: BaseException) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and job.future is not None:
                self._resolve(job.future, None, StoreError(str(exc)))


def _connect(path: str) -> sqlite3.Connection:
    if path != ":memory:":
        parent = Path(path).expanduser().resolve().parent
        if not parent.is_dir():
            raise StoreError(f"no directory {parent}")
        _create_private(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        if int(db.execute("PRAGMA user_version").fetchone()[0]) == 0:
            # A new database gives back the space that retention frees
            # (set before the first table, it needs no VACUUM).
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        _migrate(db)
    except sqlite3.Error:
        db.close()
        raise
    return db


def _create_private(path: str) -> None:
    """Create the database file 0600 if it does not exist (it holds logs,
    ``env`` values and session hashes); SQLite gives its ``-wal`` and
    ``-shm`` files the same mode. An existing file that others may read is
    left as it is, with a warning."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            log.warning(
                "the database %s is readable by others (mode %o): chmod 600 it and its"
                " -wal and -shm files",
                path,
                mode,
            )
        return
    except OSError as exc:
        raise StoreError(f"cannot create {path}: {exc.strerror or exc}") from None
    os.close(fd)


def _migrate(db: sqlite3.Connection) -> None:
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the database has schema version {version}; this citron knows up to {SCHEMA_VERSION}"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        db.execute("BEGIN")
        for statement in _MIGRATIONS[target - 1].split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {target}")
        db.execute("COMMIT")
        if version > 0:  # (a new database is simply made: one line below)
            log.info("database migrated to schema version %d", target)
    if version == 0:
        log.info("database created (schema version %d)", SCHEMA_VERSION)
    if version < 2 and int(db.execute("PRAGMA auto_vacuum").fetchone()[0]) != 2:
        # A database made before version 2: rewrite it once so that the
        # space retention frees goes back to the file system.
        log.info("rewriting the database once (VACUUM) so that retention can shrink it")
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("VACUUM")


def write_database(path: str, records: Iterable[Record]) -> None:
    """Write ``records``, in order, straight into the SQLite database at
    ``path`` (made or migrated as the server would), in one transaction: for
    tools, benchmarks and tests that prepare a history. No server may have
    the database open meanwhile."""
    db = _connect(path)
    try:
        db.execute("BEGIN")
        _apply(db, records)
        db.execute("COMMIT")
    finally:
        db.close()


def _apply(db: sqlite3.Connection, records: Iterable[Record]) -> None:
    chunks: list[tuple[str, int, int, int | None, int, str, float | None]] = []
    for record in records:
        if isinstance(record, LogRecord):
            chunks.append(
                (
                    record.build,
                    record.seq,
                    record.attempt,
                    record.run_seq,
                    record.size,
                    record.log,
                    record.time,
                )
            )
            continue
        if chunks:
            _insert_chunks(db, chunks)
            chunks = []
        db.execute(
            "INSERT INTO builds (id, number, state, finished, record) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET state = excluded.state,"
            " finished = excluded.finished, record = excluded.record",
            (record.id, record.number, record.state.value, record.finished, record_json(record)),
        )
    if chunks:
        _insert_chunks(db, chunks)


_RECORD_FIELDS = tuple(a.name for a in attrs.fields(BuildRecord))


def record_json(record: BuildRecord) -> str:
    """A build record as the JSON the stores keep: its fields by name
    (orjson, a quarter of the cost of cattrs and json; the same text)."""
    data = {name: getattr(record, name) for name in _RECORD_FIELDS}
    if record.steps is not None:
        data["steps"] = [attrs.asdict(step) for step in record.steps]
    try:
        return orjson.dumps(data).decode()
    except TypeError:  # (a lone surrogate: orjson refuses it, json escapes it)
        return json.dumps(_converter.unstructure(record), separators=(",", ":"))


def record_of(text: str) -> BuildRecord:
    """A build record from the JSON the stores keep; StoreError (saying
    what) for text that is not one, never another exception."""
    try:
        return _converter.structure(json.loads(text), BuildRecord)
    except (ValueError, TypeError, KeyError, RecursionError, cattrs.BaseValidationError) as exc:
        raise StoreError(f"a stored build record does not read back: {exc}") from None


def _insert_chunks(
    db: sqlite3.Connection,
    chunks: list[tuple[str, int, int, int | None, int, str, float | None]],
) -> None:
    db.executemany(
        "INSERT OR REPLACE INTO log_chunks (build, seq, attempt, run_seq, size, log, time)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        chunks,
    )


def _load_builds(db: sqlite3.Connection) -> list[BuildRecord]:
    """The builds not finished, with their log counters from the chunks:
    a few rows, whatever the history's size."""
    marks = ", ".join("?" * len(LIVE_STATES))
    rows = db.execute(
        f"SELECT record FROM builds WHERE state IN ({marks}) ORDER BY number",
        sorted(s.value for s in LIVE_STATES),
    ).fetchall()
    out = []
    for (text,) in rows:
        record = record_of(text)
        log_seq, log_bytes = db.execute(
            "SELECT coalesce(max(seq), 0), coalesce(sum(size), 0) FROM log_chunks WHERE build = ?",
            (record.id,),
        ).fetchone()
        (run_seq,) = db.execute(
            "SELECT coalesce(max(run_seq), 0) FROM log_chunks WHERE build = ? AND attempt = ?",
            (record.id, record.attempt),
        ).fetchone()
        out.append(
            attrs.evolve(
                record, log_seq=int(log_seq), log_bytes=int(log_bytes), run_seq=int(run_seq)
            )
        )
    return out


def _find_builds(db: sqlite3.Connection, query: FindBuilds) -> list[BuildRecord] | None:
    if query.build is not None:
        row = db.execute("SELECT record FROM builds WHERE id = ?", (query.build,)).fetchone()
        return None if row is None else [record_of(row[0])]
    where: list[str] = []
    args: list[object] = []
    if query.before is not None:
        where.append("number < ?")
        args.append(query.before)
    if query.state is not None:
        where.append("state = ?")
        args.append(query.state.value)
    sql = "SELECT record FROM builds"
    if where:
        sql += " WHERE " + " AND ".join(where)
    rows = db.execute(sql + " ORDER BY number DESC LIMIT ?", (*args, query.limit))
    return [record_of(text) for (text,) in rows]


def _purge(db: sqlite3.Connection, finished_before: float, max_rows: int) -> int:
    """One step of retention: the oldest expired builds' chunks, then the
    builds themselves, about ``max_rows`` rows; then some free pages go back."""
    deleted = 0
    expired = db.execute(
        "SELECT id FROM builds WHERE finished IS NOT NULL AND finished < ?"
        " ORDER BY finished LIMIT ?",
        (finished_before, max_rows),
    ).fetchall()
    for (build,) in expired:
        cursor = db.execute(
            "DELETE FROM log_chunks WHERE build = ? AND seq IN"
            " (SELECT seq FROM log_chunks WHERE build = ? ORDER BY seq LIMIT ?)",
            (build, build, max_rows - deleted),
        )
        deleted += cursor.rowcount
        if deleted >= max_rows:
            break  # the rest of this log in the next step
        db.execute("DELETE FROM builds WHERE id = ?", (build,))
        deleted += 1
    # Give free pages back, a bounded number a step (a 64 MiB log frees
    # 16,000 pages); the steps go on while some are left. Each step of this
    # pragma frees one page, and the sqlite3 module steps a statement once.
    free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
    if int(db.execute("PRAGMA auto_vacuum").fetchone()[0]) != 2:
        free = 0  # (an in-memory database: nothing to give back)
    for _ in range(min(free, PURGE_VACUUM_PAGES)):
        db.execute("PRAGMA incremental_vacuum(1)")
    return deleted + min(free, PURGE_VACUUM_PAGES)
