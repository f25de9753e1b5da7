"""The Redis engine: any number of ``citron-server`` processes as one hub.

The design is state machine replication over one Redis stream:

- Every input of the hub (a connection opened, a frame, a connection closed,
  the clock reaching a deadline, a node declared dead) is appended by the node
  where it happened to the command stream ``citron:cmd``, in numbered
  batches that a retry cannot append twice. Redis orders the appends of all
  nodes into one sequence.
- Every node reads that stream (from the last snapshot, ``citron:snapshot``,
  which one node stores every ``snapshot_every`` entries before trimming the
  stream) and applies each entry, in order, to its own replica of the
  sans-IO hub. Ids and session secrets come
  from the entry (its id and the connection's random key), so every replica
  makes the same decision at the same point: which runner gets a build, which
  build a runner gets, whether a resume is accepted. A build can never go to
  two runners, because there is one order and one deterministic hub.
- A node carries out only the effects that concern its own connections: it
  sends the frames for them and closes them. Log chunks go to one Redis
  stream per build, ``citron:log:<build>``, whose entry ids are ``0-<seq>``;
  every replica writes them and Redis keeps the first (the write is
  idempotent), so no single node's death can leave a hole. Build records go
  to ``citron:build:<id>`` (kept only if newer, by ``revision``), indexed by
  number (``citron:builds``, ``citron:state:<state>``) and by finishing time
  (``citron:finished``): the builds that left the hub's memory are read
  from there.
- Each node holds a lease, ``citron:node:<id>``, that it renews; when a
  node's lease runs out, the surviving nodes append its death, and every
  replica closes that node's connections: its runners' builds wait the
  lost-grace period for a resume on another node, as on one server.
- When Redis is away, a node keeps its connections, answers API and WEB
  requests with ``error`` ``unavailable``, holds runner frames (in order)
  until it can append them, and reconnects with backoff.

The host knows no command: what an input means is the hub's business.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
import zlib
from collections.abc import Coroutine, Sequence
from typing import Any, Final

import attrs
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from citron_protocol import Hub, HubConfig, Role, SnapshotError
from citron_protocol.codec import answer_unavailable
from citron_protocol.hub import CloseCode
from citron_protocol.records import BuildRecord, Chunk, FindBuilds, LogRecord, Record

from .host import Connection, Host, HostConfig
from .settings import redacted
from .store import StoreError, record_json, record_of

__all__ = ["ClusterConfig", "ClusterHost", "RedisStore", "ReplicaIds", "redacted"]

log = logging.getLogger("citron.cluster")

PREFIX: Final = "citron:"
COMMANDS: Final = PREFIX + "cmd"
CONFIG: Final = PREFIX + "config"
SNAPSHOT: Final = PREFIX + "snapshot"
SNAPSHOT_LOCK: Final = PREFIX + "snapshot-lock"
SNAPSHOT_FORMAT: Final = "citron-hub-2"  # the hub in it: JSON (hub.SNAPSHOT_VERSION)
TRIMMED: Final = PREFIX + "trimmed"
APPENDED: Final = PREFIX + "appended"  # node -> the number of its last batch appended
READ_COUNT: Final = 1000  # entries per read
APPEND_COUNT: Final = 1000  # entries per append round trip
MAX_HELD: Final = 100_000  # entries held while Redis is away, before runners are closed

_APPEND = """
local number = tonumber(ARGV[2])
if number <= tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') then
  return 0
end
for i = 3, #ARGV do
  redis.call('XADD', KEYS[1], '*', 'e', ARGV[i])
end
redis.call('HSET', KEYS[2], ARGV[1], number)
return #ARGV - 2
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_WRITE_CHUNKS = """
for i = 1, #KEYS do
  redis.pcall('XADD', KEYS[i], '0-' .. ARGV[3 * i - 2], 'l', ARGV[3 * i - 1], 't', ARGV[3 * i])
end
return #KEYS
"""


_WRITE_BUILD = """
local old = redis.call('HMGET', KEYS[1], 'v', 's')
if old[1] and tonumber(old[1]) >= tonumber(ARGV[2]) then
  return 0
end
if old[2] then
  redis.call('ZREM', ARGV[7] .. old[2], ARGV[1])
end
redis.call('HSET', KEYS[1], 'r', ARGV[6], 'v', ARGV[2], 's', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('ZADD', ARGV[7] .. ARGV[3], ARGV[4], ARGV[1])
if ARGV[5] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
else
  redis.call('ZREM', KEYS[3], ARGV[1])
end
return 1
"""
BUILDS: Final = PREFIX + "builds"  # every build, by number
FINISHED: Final = PREFIX + "finished"  # finished builds, by finishing time


def build_key(build: str) -> str:
    """The Redis hash that holds a build's record."""
    return f"{PREFIX}build:{build}"


def state_key(state: str) -> str:
    """The builds in ``state``, by number."""
    return f"{PREFIX}state:{state}"


def log_key(build: str) -> str:
    """The Redis stream that holds a build's log."""
    return f"{PREFIX}log:{build}"


def node_key(node: str) -> str:
    """The lease of a node."""
    return f"{PREFIX}node:{node}"


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def connect_redis(url: str) -> aioredis.Redis:
    """A redis-py asyncio client for ``url`` that round-trips any text."""
    client: aioredis.Redis = aioredis.from_url(
        url,
        decode_responses=True,
        encoding_errors="surrogatepass",
        socket_connect_timeout=2,
        socket_timeout=None,
        health_check_interval=0,
    )
    return client


class _Backoff:
    def __init__(self, first: float = 0.05, cap: float = 2.0) -> None:
        self.first, self.cap = first, cap
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.cap)


@attrs.frozen(kw_only=True)
class ClusterConfig:
    """The Redis engine's policy. Durations are seconds."""

    url: str
    lease: float = 5.0  # a node not heard of for this long is dead
    log_retention: float | None = None  # finished builds' logs expire after this
    snapshot_every: int = 10_000  # entries applied between two snapshots


class ReplicaIds:
    """Ids and secrets that every replica derives alike from the entry being
    applied: the entry id (unique, ordered by Redis) and the random key the
    connection's node drew when it opened."""

    def __init__(self) -> None:
        self._entry = "0-0"
        self._key = b""
        self._n = 0

    def begin(self, entry_id: str, key: str) -> None:
        self._entry, self._key, self._n = entry_id, key.encode(), 0

    def _next(self) -> bytes:
        self._n += 1
        return f"{self._entry}/{self._n}".encode()

    def new_id(self, kind: str) -> str:
        return f"{kind[0]}-{hashlib.sha256(self._next()).hexdigest()[:12]}"

    def new_secret(self) -> str:
        digest = hmac.new(self._key, self._next(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")


class RedisStore:
    """Log chunks in one Redis stream per build; builds live in the replicas.

    Writes are idempotent: every replica writes the same chunks, the first
    write of each ``seq`` wins. A write that fails is kept and retried: no
    chunk is dropped while Redis is away.
    """

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.redis = connect_redis(config.url)
        self._script = self.redis.register_script(_WRITE_CHUNKS)
        self._build_script = self.redis.register_script(_WRITE_BUILD)
        self._pending: list[Record] = []
        self._writer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._written = 0  # records written so far
        self._queued = 0  # records handed over so far
        self._progress = asyncio.Event()
        self._failure: str | None = None
        self.outage: str | None = None  # set by the host while Redis is away
        self._closing = False

    async def open(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise StoreError(f"cannot reach Redis at {redacted(self.config.url)}: {exc}") from None
        self._writer = asyncio.create_task(self._run())

    async def load_builds(self) -> list[BuildRecord]:
        return []  # builds come from the command stream, not from a store

    async def max_number(self) -> int:
        await self._own_writes()
        try:
            top: Any = await self.redis.zrevrange(BUILDS, 0, 0, withscores=True)
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis: {exc}") from None
        return int(top[0][1]) if top else 0

    async def _own_writes(self) -> None:
        """Wait until this node's earlier writes are in Redis."""
        target = self._queued
        while self._written < target:
            self._progress.clear()
            await self._progress.wait()

    async def find_builds(self, query: FindBuilds) -> list[BuildRecord] | None:
        await self._own_writes()
        try:
            if query.build is not None:
                text: Any = await self.redis.hget(build_key(query.build), "r")
                return None if text is None else [record_of(text)]
            key = BUILDS if query.state is None else state_key(query.state.value)
            top = "+inf" if query.before is None else f"({query.before}"
            ids: Any = await self.redis.zrevrangebyscore(key, top, "-inf", start=0, num=query.limit)
            async with self.redis.pipeline(transaction=False) as pipe:
                for build in ids:
                    pipe.hget(build_key(build), "r")
                texts: Any = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis: {exc}") from None
        return [record_of(t) for t in texts if t is not None]  # (purged meanwhile: gone)

    async def purge(self, finished_before: float, max_rows: int) -> int:
        """Every node purges: deleting twice is harmless. A log goes with
        UNLINK, which Redis frees in the background, however long it is."""
        try:
            ids: Any = await self.redis.zrangebyscore(
                FINISHED, "-inf", f"({finished_before}", start=0, num=max(1, max_rows // 10)
            )
            if not ids:
                return 0
            states: Any
            async with self.redis.pipeline(transaction=False) as pipe:
                for build in ids:
                    pipe.hget(build_key(build), "s")
                states = await pipe.execute()
            async with self.redis.pipeline(transaction=False) as pipe:
                for build, state in zip(ids, states, strict=True):
                    pipe.unlink(log_key(build), build_key(build))
                    pipe.zrem(BUILDS, build)
                    pipe.zrem(FINISHED, build)
                    if state is not None:
                        pipe.zrem(state_key(state), build)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis: {exc}") from None
        return len(ids)

    @property
    def error(self) -> str | None:
        return self._failure or self.outage

    def backlog(self) -> int:
        return len(self._pending)

    def position(self) -> int:
        return self._queued

    def durable(self) -> int:
        return self._written  # appended and confirmed by Redis

    def write(self, records: Sequence[Record]) -> None:
        self._pending.extend(records)
        self._queued += len(records)
        self._wake.set()

    async def read_log(
        self, build: str, after: int, until: int, limit: int, max_bytes: int | None = None
    ) -> Sequence[Chunk]:
        """Chunks ``after < seq <= until``; waits for this node's own earlier
        writes. With ``max_bytes``, reads a few entries at a time and stops
        once the page is full."""
        await self._own_writes()
        step = limit if max_bytes is None else min(limit, 16)
        out: list[Chunk] = []
        total = 0
        while len(out) < limit:
            try:
                entries: Any = await self.redis.xrange(
                    log_key(build), min=f"(0-{after}", max=f"0-{until}", count=step
                )
            except (RedisError, OSError) as exc:
                raise StoreError(f"Redis: {exc}") from None
            for entry_id, fields in entries:
                text = fields["l"]
                if max_bytes is not None:
                    total += len(text.encode("utf-8", "surrogatepass"))
                    if out and total > max_bytes:
                        return out
                out.append((int(entry_id.partition("-")[2]), text, _stamp(fields.get("t"))))
            if max_bytes is None or len(entries) < step:
                break
            after = out[-1][0]
        return out[:limit]

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            try:
                await asyncio.wait_for(self._writer, timeout=3)
            except (TimeoutError, asyncio.CancelledError):
                log.warning("closing with %d log records not written to Redis", len(self._pending))
        await self.redis.aclose()

    async def _run(self) -> None:
        backoff = _Backoff()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._pending[:APPEND_COUNT]
            try:
                await self._write(batch)
            except (RedisError, OSError) as exc:
                if self._failure is None:
                    log.error("writing logs to Redis failed, retrying: %s", exc)
                self._failure = f"Redis unreachable: {exc}"
                if self._closing:
                    return
                await backoff.sleep()
                continue
            if self._failure is not None:
                log.info("writing logs to Redis again")
            self._failure = None
            backoff.reset()
            del self._pending[: len(batch)]
            self._written += len(batch)
            self._progress.set()

    async def _write(self, batch: list[Record]) -> None:
        keys: list[str] = []
        args: list[Any] = []
        expire: list[str] = []
        builds: list[BuildRecord] = []
        for record in batch:
            if isinstance(record, LogRecord):
                keys.append(log_key(record.build))
                args.extend((record.seq, record.log, "" if record.time is None else record.time))
                continue
            builds.append(record)
            if record.state.finished and self.config.log_retention is not None:
                expire.append(log_key(record.id))
        async with self.redis.pipeline(transaction=False) as pipe:
            if keys:
                await self._script(keys=keys, args=args, client=pipe)
            for build in builds:
                await self._build_script(
                    keys=[build_key(build.id), BUILDS, FINISHED],
                    args=[
                        build.id,
                        build.revision,
                        build.state.value,
                        build.number,
                        "" if build.finished is None else repr(build.finished),
                        record_json(build),
                        state_key(""),
                    ],
                    client=pipe,
                )
            for key in expire:
                pipe.expire(key, max(1, round(self.config.log_retention or 0)))
            await pipe.execute()


@attrs.define
class _Input:
    """An input of the hub waiting to be appended."""

    kind: str
    conn_id: str
    rest: str
    conn: Connection | None = None


class ClusterHost(Host):
    """A :class:`Host` whose hub is one replica of the cluster's."""

    store: RedisStore

    @property
    def busy(self) -> bool:
        # The records come from every node's inputs, through the stream:
        # pausing this node's readers would not slow them. The inputs a node
        # holds are bounded by MAX_HELD instead.
        return False

    def __init__(
        self,
        store: RedisStore,
        hub_config: HubConfig | None = None,
        config: HostConfig | None = None,
    ) -> None:
        self.ids = ReplicaIds()
        super().__init__(store, hub_config, config, hub=Hub(self.ids, hub_config))
        self.cluster = store.config
        self.node = secrets.token_hex(6)
        self.redis = store.redis
        self.reader = connect_redis(self.cluster.url)  # XREAD blocks its connection
        self._append_script = self.redis.register_script(_APPEND)
        self._unlock_script = self.redis.register_script(_UNLOCK)
        self.last = "0-0"  # the last entry applied
        self.applied = 0
        self.available = True
        self._held: list[_Input] = []
        self._inflight: tuple[int, list[str]] | None = None  # a batch being appended
        self._batches = 0  # batches appended
        self._wake = asyncio.Event()
        self._keys: dict[str, str] = {}  # connection -> its key for secrets
        self._by_node: dict[str, set[str]] = {}  # node -> its connections
        self._declared: set[str] = set()  # nodes whose death is being appended
        self._tick_pending = False
        self._lease_since: float | None = None  # since when the lease is renewed
        self._caught_up = asyncio.Event()
        self._snapshot_at = 0  # self.applied when the last snapshot was taken
        self._snapshotting = "idle"  # then locking, locked (take it now), storing
        self._resync = False  # set when this node fell behind the trimmed stream
        self._background: list[asyncio.Task[None]] = []

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Open Redis, catch up with the command stream, then serve."""
        await self.store.open()
        try:
            last: Any = await self.redis.xrevrange(COMMANDS, count=1)
        except (RedisError, OSError) as exc:
            raise StoreError(f"cannot read {COMMANDS} from Redis: {exc}") from None
        self._target = last[0][0] if last else "0-0"
        try:
            await self._check_config()
            # The lease first: while it says 0-0, nobody trims what this node
            # still has to read.
            await self.redis.set(node_key(self.node), "0-0", px=int(self.cluster.lease * 1000))
            await self._load_snapshot()
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis: {exc}") from None
        for coroutine in (self._read(), self._append(), self._renew()):
            self._background.append(asyncio.create_task(coroutine))
        self._timer = asyncio.create_task(self._tick())
        await self._caught_up.wait()
        self.started = True
        log.info("node %s joined: %d entries applied", self.node, self.applied)

    async def shutdown(self) -> None:
        """Close every connection with 1001, tell the others this node has
        left, then stop."""
        await self.close_connections()
        self._queue("x", "", self.node)
        deadline = time.monotonic() + 3
        while (self._held or self._inflight) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in [*self._background, *self._tasks, *self._loading.values()]:
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(node_key(self.node))
        await self.store.close()
        await self.reader.aclose()

    # -- the hub's inputs, appended ----------------------------------------------------

    def _new_conn_id(self) -> str:
        return f"{self.node}/{next(self._ids)}"

    def _hub_connect(self, conn: Connection, roles: frozenset[Role]) -> None:
        key = secrets.token_hex(16)
        self._queue("c", str(conn.id), f"{','.join(sorted(roles))}\0{key}", conn)

    def _hub_receive(self, conn: Connection, text: str) -> None:
        if not self.available and self._refuse(conn, text):
            return
        self._queue("r", str(conn.id), text, conn)

    def _hub_binary(self, conn: Connection) -> None:
        self._queue("b", str(conn.id), "", conn)

    def _hub_disconnect(self, conn: Connection) -> None:
        self._queue("d", str(conn.id), "")

    def _refuse(self, conn: Connection, text: str) -> bool:
        """Answer a request that cannot be appended; False: hold it."""
        answer = answer_unavailable(text, "the server cannot reach Redis; try again")
        if answer is None:
            return False
        conn.push(answer)
        return True

    def _queue(self, kind: str, conn_id: str, rest: str, conn: Connection | None = None) -> None:
        self._held.append(_Input(kind, conn_id, rest, conn))
        if len(self._held) > MAX_HELD:
            self._shed()
        self._wake.set()

    def _shed(self) -> None:
        """Too much is held while Redis is away: close the connections whose
        frames are held (runners resume and send them again), keep the rest."""
        shed = {i.conn.id for i in self._held if i.conn is not None and i.kind != "c"}
        self._held = [i for i in self._held if i.conn is None or i.conn.id not in shed]
        for conn_id in shed:
            conn = self.connections.get(conn_id)
            if conn is not None:
                conn.close(CloseCode.TRY_AGAIN_LATER, "the server cannot reach Redis")
        log.warning("Redis away: closed %d connections whose frames were held", len(shed))

    async def _append(self) -> None:
        """Append what is held, in batches. A batch whose answer was lost (Redis
        went away as it ran) is sent again as it was: the script appends a
        batch number once, so a retry never appends an input twice."""
        backoff = _Backoff()
        while True:
            if self._inflight is None:
                if not self._held:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch = self._held[:APPEND_COUNT]
                del self._held[: len(batch)]
                head = f"\0{self.node}\0"
                now = f"\0{self.now()!r}\0"
                payloads = [f"{i.kind}{head}{i.conn_id}{now}{i.rest}" for i in batch]
                self._inflight = (self._batches + 1, payloads)
            number, payloads = self._inflight
            try:
                await self._append_script(
                    keys=[COMMANDS, APPENDED], args=[self.node, number, *payloads]
                )
            except (RedisError, OSError) as exc:
                self._unavailable(exc)
                await backoff.sleep()
                continue
            self._batches = number
            self._inflight = None
            backoff.reset()
            self._available()

    def _unavailable(self, exc: BaseException) -> None:
        if self.available:
            log.error("Redis unreachable, retrying with backoff: %s", exc)
        self.available = False
        self.store.outage = f"Redis unreachable: {exc}"
        self._lease_since = None
        # Requests already waiting get their answer now; runner frames wait.
        kept: list[_Input] = []
        for item in self._held:
            conn = item.conn
            if item.kind == "r" and conn is not None and self._refuse(conn, item.rest):
                continue
            kept.append(item)
        self._held = kept

    def _available(self) -> None:
        if not self.available:
            log.info("Redis reachable again")
        self.available = True
        self.store.outage = None

    # -- the command stream, applied ------------------------------------------------------

    async def _read(self) -> None:
        backoff = _Backoff()
        while True:
            caught_up = self._caught_up.is_set()
            try:
                if self._resync:
                    self._lost_place()
                    await self._load_snapshot()
                    self._resync = False
                answer: Any = await self.reader.xread(
                    {COMMANDS: self.last}, count=READ_COUNT, block=1000 if caught_up else None
                )
            except (RedisError, OSError) as exc:
                self._unavailable(exc)
                await backoff.sleep()
                continue
            except StoreError as exc:  # a snapshot this node refuses: say so, keep trying
                self.internal_errors += 1
                log.error("node %s: %s", self.node, exc)
                await backoff.sleep()
                continue
            except Exception:  # a snapshot this node cannot load: say so, keep trying
                self.internal_errors += 1
                log.exception("node %s cannot load the cluster's snapshot", self.node)
                await backoff.sleep()
                continue
            backoff.reset()
            entries: list[tuple[str, dict[str, str]]] = answer[0][1] if answer else []
            for entry_id, fields in entries:
                try:
                    self._apply_entry(entry_id, fields.get("e", ""))
                except Exception:  # the reader must go on, whatever one entry does
                    self.internal_errors += 1
                    log.exception("internal error on entry %s", entry_id)
            if caught_up:
                self._snapshot_due()
            if not caught_up and _entry_order(self.last) >= _entry_order(self._target):
                self._caught_up.set()
            if not entries:
                await asyncio.sleep(0)

    def _apply_entry(self, entry_id: str, entry: str) -> None:
        """Apply one entry: ``kind NUL node NUL connection NUL time NUL rest``,
        where rest is the frame's text (``r``), the roles and the key (``c``)
        or the dead node (``x``)."""
        self.last = entry_id
        self.applied += 1
        try:
            kind, node, conn, when, rest = entry.split("\0", 4)
            now = float(when)
        except ValueError:  # not written by citron: every replica skips it alike
            log.error("skipping entry %s of %s: not a citron entry", entry_id, COMMANDS)
            return
        self.ids.begin(entry_id, self._keys.get(conn, ""))
        local = self.connections.get(conn)
        hub = self.hub
        try:
            if kind == "r":
                fx = hub.receive(conn, rest, now)
            elif kind == "c":
                roles_text, key = rest.split("\0", 1)
                self._keys[conn] = key
                self._by_node.setdefault(node, set()).add(conn)
                roles = [Role(r) for r in roles_text.split(",") if r]
                self.ids.begin(entry_id, key)
                fx = hub.connect(conn, roles, now, local=node == self.node)
            elif kind == "d":
                self._keys.pop(conn, None)
                self._by_node.get(node, set()).discard(conn)
                fx = hub.disconnect(conn, now)
            elif kind == "b":
                fx = hub.receive_binary(conn, now)
            elif kind == "t":
                if node == self.node:
                    self._tick_pending = False
                fx = hub.advance(now)
            elif kind == "x":
                self._node_gone(rest, now)
                return
            else:
                log.error("ignoring entry %s of unknown kind %r", entry_id, kind)
                return
        except Exception:  # every replica fails alike; the node must go on
            self.internal_errors += 1
            log.exception("internal error applying entry %s (%s)", entry_id, kind)
            if local is not None:
                local.close(1011, "internal error")
            return
        self.apply(fx)

    def _node_gone(self, node: str, now: float) -> None:
        """Every replica closes a dead (or departed) node's connections."""
        self._declared.discard(node)
        conns = self._by_node.pop(node, set())
        if conns:
            log.info("node %s is gone: %d of its connections closed", node, len(conns))
        for conn in sorted(conns):
            self._keys.pop(conn, None)
            self.apply(self.hub.disconnect(conn, now))
        if node == self.node and self.started:
            # The others declared this node dead: its connections no longer
            # exist in the hub. Close them; their peers reconnect and resume.
            self._lost_place()

    # -- snapshots: the command stream stays short ------------------------------------------

    async def _check_config(self) -> None:
        """Every node must decide alike: the hub's options are the cluster's."""
        mine = json.dumps(attrs.asdict(self.hub.config), sort_keys=True)
        await self.redis.set(CONFIG, mine, nx=True)
        theirs: Any = await self.redis.get(CONFIG)
        if theirs != mine:
            raise StoreError(
                f"this server's hub options {mine} differ from the cluster's {theirs}: every"
                " node needs the same --log-cap, --lost-grace, --retry-lost, --cancel-timeout,"
                " --window and --retention"
            )

    async def _load_snapshot(self) -> None:
        data: Any = await self.redis.hgetall(SNAPSHOT)
        if not data:
            return
        if data.get("format") != SNAPSHOT_FORMAT:
            raise StoreError(
                f"the cluster's snapshot is in format {data.get('format')!r}, this server reads"
                f" {SNAPSHOT_FORMAT!r}: every node must run the same version of citron"
            )
        try:
            raw = zlib.decompress(base64.b64decode(data["hub"]))
            hub = Hub.from_snapshot(raw, self.ids, self.hub.config)
        except (KeyError, ValueError, zlib.error, SnapshotError) as exc:
            raise StoreError(f"the cluster's snapshot cannot be loaded: {exc}") from None
        self.hub = hub
        self._keys = json.loads(data["keys"])
        self._by_node = {node: set(conns) for node, conns in json.loads(data["nodes"]).items()}
        self.last = data["at"]
        log.info("node %s: restored the snapshot at %s", self.node, self.last)

    def _snapshot_due(self) -> None:
        """Called between two batches of entries: every ``snapshot_every``
        entries, the node that takes a lock snapshots its copy; the others
        do not spend the time."""
        if self._snapshotting == "idle":
            if self.applied - self._snapshot_at >= self.cluster.snapshot_every:
                self._snapshotting = "locking"
                self._spawn(self._lock_snapshot())
        elif self._snapshotting == "locked":
            self._snapshotting = "storing"
            self._snapshot_at = self.applied
            fields = {
                "format": SNAPSHOT_FORMAT,
                "at": self.last,
                "hub": base64.b64encode(zlib.compress(self.hub.snapshot(), 1)).decode(),
                "keys": json.dumps(self._keys),
                "nodes": json.dumps({n: sorted(conns) for n, conns in self._by_node.items()}),
            }
            self._spawn(self._store_snapshot(fields))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lock_snapshot(self) -> None:
        try:
            locked = await self.redis.set(SNAPSHOT_LOCK, self.node, nx=True, px=30_000)
        except (RedisError, OSError):
            locked = False
        if locked:
            self._snapshotting = "locked"
        else:  # another node is at it
            self._snapshotting = "idle"
            self._snapshot_at = self.applied

    async def _store_snapshot(self, fields: dict[str, str]) -> None:
        try:
            stored: Any = await self.redis.hget(SNAPSHOT, "at")
            if stored and _entry_order(stored) >= _entry_order(fields["at"]):
                return
            await self.redis.hset(SNAPSHOT, mapping=fields)  # type: ignore[arg-type]
            # Keep what the slowest live node has yet to read.
            keep = fields["at"]
            async for key in self.redis.scan_iter(match=node_key("*")):
                position: Any = await self.redis.get(key)
                if position and _entry_order(position) < _entry_order(keep):
                    keep = position
            trimmed = await self.redis.xtrim(COMMANDS, minid=keep)
            await self.redis.set(TRIMMED, keep)
            # Forget the batch numbers of nodes that are gone.
            numbered: Any = await self.redis.hkeys(APPENDED)
            for node in numbered:
                if node != self.node and not await self.redis.exists(node_key(node)):
                    await self.redis.hdel(APPENDED, node)
            log.info("snapshot at %s stored; %d entries trimmed", fields["at"], trimmed)
        except (RedisError, OSError) as exc:
            log.warning("storing a snapshot failed: %s", exc)
        finally:
            self._snapshotting = "idle"
            with contextlib.suppress(RedisError, OSError):
                await self._unlock_script(keys=[SNAPSHOT_LOCK], args=[self.node])

    async def _check_trimmed(self) -> None:
        """A node that fell behind what was trimmed (its lease ran out) cannot
        catch up entry by entry: it starts again from the snapshot."""
        trimmed: Any = await self.redis.get(TRIMMED)
        if not trimmed or _entry_order(self.last) >= _entry_order(trimmed):
            return
        log.error("node %s fell behind the trimmed stream: reloading the snapshot", self.node)
        self._resync = True

    def _lost_place(self) -> None:
        """This node's connections are gone from the hub (the others declared
        it dead, or it reloads a snapshot): close them; they reconnect and
        resume."""
        for local in list(self.connections.values()):
            local.close(CloseCode.SERVICE_RESTART, "this server lost its place in the cluster")

    # -- leases and timers --------------------------------------------------------------

    async def _renew(self) -> None:
        lease = self.cluster.lease
        while True:
            try:
                await self.redis.set(node_key(self.node), self.last, px=int(lease * 1000))
                if self._lease_since is None:
                    self._lease_since = time.monotonic()
                self._available()
                # Declare dead only after holding a lease for a whole period:
                # after an outage every node needs that long to renew its own.
                if self._caught_up.is_set() and time.monotonic() - self._lease_since > lease:
                    await self._find_dead()
                if self._caught_up.is_set():
                    await self._check_trimmed()
            except (RedisError, OSError) as exc:
                self._unavailable(exc)
            except Exception:  # the lease must be renewed whatever else fails
                log.exception("internal error while renewing the lease")
            await asyncio.sleep(lease / 5)

    async def _find_dead(self) -> None:
        others = [n for n, conns in self._by_node.items() if conns and n != self.node]
        others = [n for n in others if n not in self._declared]
        if not others:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for node in others:
                pipe.exists(node_key(node))
            alive = await pipe.execute()
        for node, exists in zip(others, alive, strict=True):
            if not exists:
                log.warning("node %s lost its lease: declaring it dead", node)
                self._declared.add(node)
                self._queue("x", "", node)

    def _deadline_reached(self) -> None:
        """The clock is an input like any other: it goes through the stream
        (one entry at a time per node; every node's is applied alike)."""
        deadline = self.hub.next_deadline()
        if deadline is not None and deadline <= self.now() and not self._tick_pending:
            self._tick_pending = True
            self._queue("t", "", "")


def _stamp(value: str | None) -> float | None:
    """A log entry's time; None when it has none (written before times
    were kept) or one that is not a number (the hub judges the rest)."""
    try:
        return float(value) if value else None
    except ValueError:
        return None
