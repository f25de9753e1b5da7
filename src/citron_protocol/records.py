"""What the hub asks its host to persist, and to read back.

The hub emits :class:`BuildRecord` (a whole build, each time it changes, except
for its log counters) and :class:`LogRecord` (one log chunk) in
:attr:`Effects.records <citron_protocol.hub.Effects.records>`, in order. A store
applies them in that order; on start the host hands the builds back to
:meth:`Hub.restore <citron_protocol.hub.Hub.restore>`, with the log counters
(``log_seq``, ``log_bytes``, ``run_seq``) taken from the stored chunks.

To replay a log, the hub emits :class:`LoadLog`; the host reads the chunks from
its store (which must see every record handed to it before, committed or not)
and answers with :meth:`Hub.log_loaded <citron_protocol.hub.Hub.log_loaded>`.

The hub keeps only its working set in memory: the builds not finished and a
window of the most recent finished ones. To answer a request about an older
build, it emits :class:`FindBuilds`; the host asks its store and answers with
:meth:`Hub.builds_found <citron_protocol.hub.Hub.builds_found>`.

:class:`MemoryStore` is a complete store that keeps everything in memory: a
reference for store authors and the store of in-memory hosts.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import attrs

from .messages import BuildState, Step, utf8_size

__all__ = [
    "BuildRecord",
    "Chunk",
    "FindBuilds",
    "LoadLog",
    "LogRecord",
    "MemoryStore",
    "Record",
]


@attrs.frozen(kw_only=True)
class BuildRecord:
    """A build as persisted: the wire object's facts and what a restart needs.

    Times are seconds since the Unix epoch. ``number`` orders builds by
    creation. ``session_hash`` is the SHA-256 (hex) of the session secret of
    the registration running the build, which a resume must present.
    ``run_seq`` is the last runner seq stored in the current attempt.
    ``secret_names`` names the build's secrets; their values are never
    persisted, only kept in the hub's memory. ``revision`` counts the
    records of this build (1 for the first): of two records of one build,
    the higher revision is the newer, whoever writes them in which order.
    ``steps`` is what the runner reported of each script line (None: it did
    not say, or the build was stored before steps existed).
    """

    id: str
    number: int
    state: BuildState
    repo: str
    script: tuple[str, ...]
    type: str | None = None
    ref: str | None = None
    env: dict[str, str] | None = None
    timeout: float | None = None
    runner: str | None = None
    attempt: int = 1
    created: float
    started: float | None = None
    finished: float | None = None
    success: bool | None = None
    log_seq: int = 0
    log_bytes: int = 0
    run_seq: int = 0
    truncated: bool = False
    session_hash: str | None = None
    secret_names: tuple[str, ...] = ()
    revision: int = 0
    commit: str | None = None
    exit_code: int | None = None
    steps: tuple[Step, ...] | None = None


class _LogRecordSlots:
    """The storage of :class:`LogRecord`, and nothing else: the hub fills a
    plain instance and makes it a LogRecord by ``__class__`` assignment
    (one per log chunk; see :func:`log_record`), as the codec does for
    ``RunnerLog``."""

    __slots__ = ("__weakref__", "attempt", "build", "log", "run_seq", "seq", "size", "time")
    build: str
    seq: int
    log: str
    attempt: int
    run_seq: int | None
    size: int
    time: float | None


@attrs.frozen(kw_only=True)
class LogRecord(_LogRecordSlots):
    """One stored log chunk: ``seq`` numbers a build's chunks from 1.

    ``run_seq`` is the runner's number for it within ``attempt`` (None for a
    notice the hub wrote itself). ``size`` is its length in UTF-8 bytes.
    ``time`` is when the hub received it (seconds since the epoch).
    """

    build: str
    seq: int
    log: str
    attempt: int
    run_seq: int | None
    size: int
    time: float | None = None


Record = BuildRecord | LogRecord

#: A stored chunk as a store reads it back: seq, text, and when it was
#: received (None if the store did not keep it).
Chunk = tuple[int, str, float | None]

_new = object.__new__


def log_record(
    build: str,
    seq: int,
    log: str,
    attempt: int,
    run_seq: int | None,
    size: int,
    time: float | None = None,
) -> LogRecord:
    """``LogRecord(...)`` without the frozen ``__setattr__`` (half the cost)."""
    record = _new(_LogRecordSlots)
    record.build = build
    record.seq = seq
    record.log = log
    record.attempt = attempt
    record.run_seq = run_seq
    record.size = size
    record.time = time
    record.__class__ = LogRecord
    return record  # type: ignore[return-value]


@attrs.frozen(kw_only=True)
class LoadLog:
    """A request to read a build's stored chunks ``after < seq <= until``,
    ascending, at most ``limit`` of them and no more than about
    ``max_bytes`` of text (at least one chunk), for the subscription on
    ``conn``.

    Answer with ``hub.log_loaded(request, chunks)``. A host reads a page
    only once ``conn`` has drained its outgoing buffer: this is how a long
    replay is paced to the reader. The hub asks for one page at a time per
    subscription; when the subscription goes away (unsubscribed, replaced,
    disconnected) the request is listed in :attr:`Effects.cancels`, and
    the host may drop it.
    """

    request: int
    conn: Hashable
    build: str
    after: int
    until: int
    limit: int
    max_bytes: int = 256 * 1024


@attrs.frozen(kw_only=True)
class FindBuilds:
    """A request to read stored builds, for a request of ``conn``:

    - with ``build``: that build (a list of one, or None if it is not stored);
    - else the newest ``limit`` stored builds whose ``number`` is below
      ``before`` (any number when None) and, when ``state`` is given, in
      that state; newest first.

    Answer with ``hub.builds_found(request, records)``. Stored records may
    include builds the hub still holds: it keeps its own, newer, copy.
    """

    request: int
    conn: Hashable
    build: str | None = None
    before: int | None = None
    state: BuildState | None = None
    limit: int = 1


LIVE_STATES = frozenset({BuildState.QUEUED, BuildState.RUNNING, BuildState.CANCELLING})


@attrs.define
class MemoryStore:
    """Applies records in memory and answers reads, as a store must."""

    builds: dict[str, BuildRecord] = attrs.Factory(dict)
    logs: dict[str, list[LogRecord]] = attrs.Factory(dict)

    def apply(self, records: Iterable[Record]) -> None:
        """Persist records, in order."""
        for record in records:
            if isinstance(record, BuildRecord):
                self.builds[record.id] = record
            else:
                self.logs.setdefault(record.build, []).append(record)

    def load_builds(self) -> list[BuildRecord]:
        """The builds not finished, oldest first, with their log counters
        from the chunks: what a hub restarts with."""
        out = []
        live = (b for b in self.builds.values() if b.state in LIVE_STATES)
        for record in sorted(live, key=lambda b: b.number):
            chunks = self.logs.get(record.id, [])
            run_seqs = [
                c.run_seq for c in chunks if c.attempt == record.attempt and c.run_seq is not None
            ]
            out.append(
                attrs.evolve(
                    record,
                    log_seq=chunks[-1].seq if chunks else 0,
                    log_bytes=sum(c.size for c in chunks),
                    run_seq=max(run_seqs, default=0),
                )
            )
        return out

    def max_number(self) -> int:
        """The highest build ``number`` stored (0 if none)."""
        return max((b.number for b in self.builds.values()), default=0)

    def find_builds(self, query: FindBuilds) -> list[BuildRecord] | None:
        """The answer to ``query`` (see :class:`FindBuilds`)."""
        if query.build is not None:
            record = self.builds.get(query.build)
            return None if record is None else [record]
        out = [
            b
            for b in self.builds.values()
            if (query.before is None or b.number < query.before)
            and (query.state is None or b.state is query.state)
        ]
        out.sort(key=lambda b: b.number, reverse=True)
        return out[: query.limit]

    def purge(self, finished_before: float, limit: int) -> int:
        """Delete up to ``limit`` builds that finished before
        ``finished_before``, with their logs; how many (0: none left)."""
        old = [
            b.id
            for b in self.builds.values()
            if b.finished is not None and b.finished < finished_before
        ][:limit]
        for build in old:
            del self.builds[build]
            self.logs.pop(build, None)
        return len(old)

    def read_log(
        self, build: str, after: int, until: int, limit: int, max_bytes: int | None = None
    ) -> Sequence[Chunk]:
        """The chunks ``after < seq <= until`` of ``build``, at most ``limit``,
        and (when given) no more than ``max_bytes`` of text but at least one."""
        chunks = self.logs.get(build, [])
        # seq n is at index n - 1: chunks are appended in order from 1
        page = [(c.seq, c.log, c.time) for c in chunks[after : min(until, after + limit)]]
        return page if max_bytes is None else page_of(page, max_bytes)


def page_of(chunks: Iterable[Chunk], max_bytes: int) -> list[Chunk]:
    """The first chunks whose text adds up to at most ``max_bytes`` (UTF-8),
    and at least one: how a store bounds a replay page."""
    out: list[Chunk] = []
    total = 0
    for chunk in chunks:
        size = utf8_size(chunk[1])
        if out and total + size > max_bytes:
            break
        out.append(chunk)
        total += size
    return out
