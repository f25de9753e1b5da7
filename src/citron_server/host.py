"""The host: runs the sans-IO hub on asyncio, for any transport.

An adapter (websockets or aiohttp) accepts connections, decides their roles
from the credentials (:class:`~citron_server.security.Gate`), and tells the
host what happened on each
(:meth:`Host.open`, :meth:`Host.receive`, :meth:`Host.receive_binary`,
:meth:`Host.closed`). The host passes it to the hub with the time, and carries
out what the hub answers: records to the store, frames to each connection's
bounded outbox, closes, and log reads for replays paced to the reader.

The host knows no command: it moves text, bytes and close codes.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import itertools
import logging
import secrets
import sys
import termios
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Protocol

import attrs

from citron_protocol import Effects, Hub, HubConfig, Role
from citron_protocol.codec import frame_head
from citron_protocol.hub import CloseCode
from citron_protocol.messages import MAX_INT, utf8_size
from citron_protocol.records import BuildRecord, Chunk, FindBuilds, LoadLog

from .store import Store, StoreError

__all__ = ["Connection", "Host", "HostConfig", "Peer", "RandomIds"]

log = logging.getLogger("citron.server")
#: Text read from the store at once for GET /builds/ID/log.
RAW_LOG_PAGE = 1024 * 1024
#: Close codes of a connection that ended as it should (logged at DEBUG).
QUIET_CLOSES = frozenset({1000, 1001, 1005, None})


class Peer(Protocol):
    """One WebSocket connection as an adapter exposes it."""

    async def send(self, text: str) -> None:
        """Send a text frame (may wait for the socket to drain)."""

    def write_batch(self, texts: list[str]) -> bool:
        """Hand text frames to the transport at once, without waiting, if the
        library allows it; False: they go through :meth:`send`."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close with a WebSocket close code."""

    def buffered(self) -> int:
        """Bytes waiting in the transport's write buffer."""
        ...

    async def drain(self) -> None:
        """Return once the transport takes more data: at once unless its
        flow control paused writing, else when it resumes (an event of the
        transport, not a poll). May raise if the connection is lost."""

    def abort(self) -> None:
        """Drop the TCP connection now, whatever is still buffered."""

    def unsent(self) -> int:
        """Bytes written that the peer has not taken yet: the transport's
        buffer and the kernel's send queue (see :func:`unsent_bytes`)."""
        ...


def unsent_bytes(transport: asyncio.BaseTransport | None) -> int:
    """The transport's write buffer plus, on Linux, the bytes in its
    socket's send queue that the peer has not acknowledged (``SIOCOUTQ``).
    A peer that stops reading leaves up to megabytes in the kernel, where
    the transport's buffer alone does not show them."""
    if transport is None or transport.is_closing():
        return 0
    size = transport.get_write_buffer_size()  # type: ignore[attr-defined]
    sock = transport.get_extra_info("socket")
    if sock is not None and _OUTQ is not None:
        try:
            queued = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
            size += int.from_bytes(queued, sys.byteorder, signed=True)
        except OSError:
            pass
    return int(size)


_OUTQ: int | None = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None


class RandomIds:
    """Ids and secrets for a real server: random, never reused."""

    def new_id(self, kind: str) -> str:
        return f"{kind[0]}-{secrets.token_hex(6)}"

    def new_secret(self) -> str:
        return secrets.token_urlsafe(24)


@attrs.frozen(kw_only=True)
class HostConfig:
    """I/O policy."""

    max_buffer: int = 1024 * 1024  # outgoing bytes per connection before 4008
    send_timeout: float = 10.0  # seconds outgoing data may stand still before 4008
    init_timeout: float = 10.0  # seconds a new connection has to send its first frame
    max_connections: int = 10_000  # open WebSockets; past it handshakes get 503
    abort_after: float = 1.5  # seconds from a 4008 to dropping the TCP connection
    tick: float = 0.5  # how often the hub hears the time, at most
    max_backlog: int = 20_000  # records the store may be behind before frames wait
    ack_every: float = 0.1  # seconds between two rounds of protocol 2 acknowledgements
    purge_every: float = 600.0  # seconds between two retention passes
    purge_rows: int = 2000  # rows deleted per step of a retention pass


@attrs.define(eq=False)
class Connection:
    """A connection's outbox.

    Frames pushed during one turn of the event loop are written together at
    its end (one write, one system call, when the library allows it); if the
    library must wait, they wait in ``queue`` for the writer task. Whatever
    is not on the wire yet counts against ``max_buffer``.
    """

    id: int | str
    peer: Peer
    host: Host
    batch: list[str] = attrs.Factory(list)
    batched: int = 0
    queue: deque[str] = attrs.Factory(deque)
    queued: int = 0
    closing: tuple[int, str] | None = None
    gone: bool = False
    wake: asyncio.Event = attrs.Factory(asyncio.Event)
    writer: asyncio.Task[None] | None = None
    heard: bool = False  # a frame came in
    written: int = 0  # bytes handed to the transport, ever
    moved: int = 0  # of those, bytes the transport had passed on at the last check
    stalled_since: float = 0.0  # when ``moved`` last grew (monotonic clock)

    def pending(self) -> int:
        """Bytes not yet on the wire: the outbox and the transport's buffer."""
        return self.batched + self.queued + self.peer.buffered()

    def push(self, text: str) -> None:
        if self.closing is not None or self.gone:
            return
        if not self.batch:
            self.host.dirty(self)
        self.batch.append(text)
        self.batched += utf8_size(text)
        if self.batched > self.host.config.max_buffer:  # the transport's part: at flush
            self._slow("over the buffer limit")

    def flush(self) -> None:
        """Write what this turn of the loop pushed."""
        batch, self.batch, self.batched = self.batch, [], 0
        if not batch or self.gone:
            return
        if not self.queue and self.peer.write_batch(batch):
            self.written += sum(map(utf8_size, batch))
            if self.peer.buffered() > self.host.config.max_buffer:
                self._slow("over the buffer limit")
            else:
                self.host.backlogged(self)  # watched until the peer took it all
            return
        self.queue.extend(batch)
        self.queued += sum(map(utf8_size, batch))
        self.host.backlogged(self)
        self._wake_writer()

    def _slow(self, why: str) -> None:
        """The peer does not keep up: drop the outbox, close with 4008, and
        drop the TCP connection ``abort_after`` seconds later whatever the
        peer does (a close handshake would wait on the very reader that
        does not read)."""
        self.host.slow_consumers += 1
        log.warning(
            "connection %s: slow consumer, %s (%d bytes waiting, %d in the transport), closing",
            self.id,
            why,
            self.batched + self.queued,
            self.peer.buffered(),
        )
        self.batch, self.batched = [], 0
        self.queue.clear()
        self.queued = 0
        self.close(CloseCode.SLOW_CONSUMER, "slow consumer")
        asyncio.get_running_loop().call_later(self.host.config.abort_after, self.abort)

    def abort(self) -> None:
        """Drop the TCP connection, unless it is gone already."""
        if not self.gone:
            log.info("connection %s: aborted", self.id)
            self.peer.abort()

    def check_stall(self, now: float) -> bool:
        """Judge a connection with data waiting at ``now`` (monotonic): slow
        if nothing left its buffer for ``send_timeout`` seconds. False once
        there is nothing left to watch."""
        if self.gone or self.closing is not None:
            return False
        unsent = self.peer.unsent()
        if unsent == 0 and not self.queue:
            return False
        moved = self.written - unsent
        if moved > self.moved or self.stalled_since == 0.0:  # 0: the first look
            self.moved, self.stalled_since = moved, now
        elif now - self.stalled_since >= self.host.config.send_timeout:
            self._slow(f"nothing sent for {self.host.config.send_timeout:g} s")
            return False
        return True

    def close(self, code: int, reason: str) -> None:
        """Close after what is pushed has been sent."""
        if self.closing is None and not self.gone:
            self.flush()
            self.closing = (code, reason)
            self._wake_writer()

    def _wake_writer(self) -> None:
        """The writer task exists only once something must wait for it."""
        if self.writer is None:
            self.writer = asyncio.create_task(self.run_writer())
        self.wake.set()

    async def run_writer(self) -> None:
        try:
            while True:
                while self.queue:
                    text = self.queue.popleft()
                    size = utf8_size(text)
                    self.queued -= size
                    self.written += size
                    await self.peer.send(text)
                if self.closing is not None:
                    await self.peer.close(*self.closing)
                    return
                self.wake.clear()
                await self.wake.wait()
        except Exception:  # noqa: BLE001 - a dead socket ends the writer; the reader reports it
            self.queue.clear()
            self.queued = 0


class Host:
    """Runs a :class:`Hub` for an adapter; see the module docstring."""

    def __init__(
        self,
        store: Store,
        hub_config: HubConfig | None = None,
        config: HostConfig | None = None,
        *,
        hub: Hub | None = None,
    ) -> None:
        self.store = store
        self.config = config or HostConfig()
        self.hub = hub or Hub(RandomIds(), hub_config)
        self.connections: dict[int | str, Connection] = {}
        self._dirty: list[Connection] = []
        self.slow_consumers = 0
        self.internal_errors = 0
        self.started = False
        self._ids = itertools.count(1)
        self._timer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loading: dict[int, asyncio.Task[None]] = {}  # replay pages, by request
        self._backlogged: set[Connection] = set()  # connections with data waiting
        self._pacing = 0  # read loops waiting for the store (see pace)
        # Protocol 2 acknowledgements waiting for their records to be
        # durable: (conn, slot) -> (store position, frame); the last one wins.
        self._acks: dict[tuple[object, object], tuple[int, str]] = {}
        self._ack_timer: asyncio.TimerHandle | None = None

    @staticmethod
    def now() -> float:
        return time.time()

    # -- the raw log (GET /builds/ID/log) ---------------------------------------------

    async def log_size(self, build_id: str) -> int | None:
        """The UTF-8 size of a build's stored log, or None for no such build
        (StoreError if the store cannot say)."""
        info = self.hub.build(build_id)
        if info is not None:
            return info.log_bytes
        records = await self.store.find_builds(FindBuilds(request=0, conn=None, build=build_id))
        return records[0].log_bytes if records else None

    async def log_pages(self, build_id: str) -> AsyncIterator[str]:
        """A build's stored log, in order, a page (about 1 MiB) at a time."""
        after = 0
        while True:
            chunks = await self.store.read_log(build_id, after, MAX_INT, 100_000, RAW_LOG_PAGE)
            if not chunks:
                return
            yield "".join(chunk[1] for chunk in chunks)
            after = chunks[-1][0]

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and rebuild the hub from it."""
        await self.store.open()
        builds = await self.store.load_builds()
        last = await self.store.max_number()
        self.apply(self.hub.restore(builds, self.now(), last_number=last))
        self._timer = asyncio.create_task(self._tick())
        self._start_retention()
        self.started = True
        log.info(
            "restored %d builds not finished (the newest stored is number %d)", len(builds), last
        )

    def _start_retention(self) -> None:
        if self.hub.config.retention is not None:
            task = asyncio.create_task(self._retention(self.hub.config.retention))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _retention(self, keep: float) -> None:
        """Delete the builds that finished more than ``keep`` seconds ago, in
        small steps (each a short job of the store's own thread), every
        ``purge_every`` seconds."""
        while True:
            total = 0
            try:
                while deleted := await self.store.purge(self.now() - keep, self.config.purge_rows):
                    total += deleted
                    await asyncio.sleep(0)  # let the others in between two steps
            except StoreError as exc:
                log.error("retention: deleting old builds failed: %s", exc)
            if total:
                log.info("retention: old builds deleted (%d rows and pages)", total)
            await asyncio.sleep(self.config.purge_every)

    async def shutdown(self) -> None:
        """Close every connection with 1001, then commit and close the store."""
        await self.close_connections()
        if self._timer is not None:
            self._timer.cancel()
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        for task in [*self._tasks, *self._loading.values()]:
            task.cancel()
        await self.store.close()

    async def close_connections(self) -> None:
        """Close every connection with 1001 (what is queued is dropped) and
        wait up to 3 s for the closes to go out."""
        for conn in list(self.connections.values()):
            conn.batch, conn.batched = [], 0
            conn.queue.clear()
            conn.queued = 0
            conn.close(CloseCode.GOING_AWAY, "server shutting down")
        writers = [c.writer for c in self.connections.values() if c.writer is not None]
        if writers:
            await asyncio.wait(writers, timeout=3)

    async def _tick(self) -> None:
        while True:
            deadline = self.hub.next_deadline()
            now = self.now()
            delay = self.config.tick if deadline is None else min(self.config.tick, deadline - now)
            await asyncio.sleep(max(delay, 0.01))
            try:
                self._check_backlogs()
                self._deadline_reached()
            except Exception:  # the timers must keep running
                self.internal_errors += 1
                log.exception("internal error while advancing the hub's timers")

    def backlogged(self, conn: Connection) -> None:
        """``conn`` wrote: watch that the peer takes it (``send_timeout``);
        the first look is at the next tick."""
        if conn not in self._backlogged:
            conn.stalled_since = 0.0
            self._backlogged.add(conn)

    def _check_backlogs(self) -> None:
        now = time.monotonic()
        for conn in list(self._backlogged):
            if not conn.check_stall(now):
                self._backlogged.discard(conn)

    def _deadline_reached(self) -> None:
        """The clock may have reached the hub's next deadline."""
        self.apply(self.hub.advance(self.now()))

    def dirty(self, conn: Connection) -> None:
        """``conn`` has frames to write at the end of this turn of the loop."""
        if not self._dirty:
            asyncio.get_running_loop().call_soon(self._flush_all)
        self._dirty.append(conn)

    def _flush_all(self) -> None:
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()

    # -- what adapters report --------------------------------------------------------

    def open(self, peer: Peer, roles: Iterable[Role]) -> Connection:
        conn = Connection(id=self._new_conn_id(), peer=peer, host=self)
        self.connections[conn.id] = conn
        asyncio.get_running_loop().call_later(self.config.init_timeout, self._first_frame_due, conn)
        roles = frozenset(roles)
        log.debug("connection %s opened (roles %s)", conn.id, ",".join(sorted(roles)))
        self._hub_connect(conn, roles)
        return conn

    @property
    def full(self) -> bool:
        """As many connections are open as ``max_connections`` allows: an
        adapter answers a new handshake with HTTP 503."""
        return len(self.connections) >= self.config.max_connections

    @property
    def busy(self) -> bool:
        """The store is more than ``max_backlog`` records behind: an
        adapter awaits :meth:`pace` before it hands over the next frame."""
        return self.store.backlog() > self.config.max_backlog

    async def pace(self) -> None:
        """Wait until the store is back under half of ``max_backlog``. The
        adapter's read loop stops meanwhile, so its library stops reading
        the socket and TCP slows the peers down: no frame is lost, and
        memory holds at most about ``max_backlog`` records."""
        low = self.config.max_backlog // 2
        if self.store.backlog() > low:
            if not self._pacing:
                log.warning(
                    "the store is %d records behind: reading frames waits", self.store.backlog()
                )
            self._pacing += 1
            try:
                while self.store.backlog() > low and self.store.error is None:
                    await asyncio.sleep(0.005)
            finally:
                self._pacing -= 1

    def receive(self, conn: Connection, text: str) -> None:
        conn.heard = True
        self._hub_receive(conn, text)

    def receive_binary(self, conn: Connection) -> None:
        conn.heard = True
        self._hub_binary(conn)

    def _first_frame_due(self, conn: Connection) -> None:
        """A connection that sent nothing in ``init_timeout`` seconds: 1008."""
        if conn.heard or conn.gone or conn.closing is not None:
            return
        log.info("connection %s: no frame within %g s, closing", conn.id, self.config.init_timeout)
        conn.close(CloseCode.POLICY, "no frame in time")
        asyncio.get_running_loop().call_later(self.config.abort_after, conn.abort)

    # The hub's inputs. An engine that replicates the hub overrides these four.

    def _new_conn_id(self) -> int | str:
        return next(self._ids)

    def _hub_connect(self, conn: Connection, roles: frozenset[Role]) -> None:
        self.apply(self.hub.connect(conn.id, roles, self.now()))

    def _hub_receive(self, conn: Connection, text: str) -> None:
        try:
            fx = self.hub.receive(conn.id, text, self.now())
        except Exception:  # noqa: BLE001 - a bug in the hub must not take the server down
            self._internal_error(conn, text)
            return
        self.apply(fx)

    def _hub_binary(self, conn: Connection) -> None:
        self.apply(self.hub.receive_binary(conn.id, self.now()))

    def _hub_disconnect(self, conn: Connection) -> None:
        self.apply(self.hub.disconnect(conn.id, self.now()))

    def _internal_error(self, conn: Connection, text: str) -> None:
        """The hub raised: log it with the frame, close that connection with
        1011, keep serving the others."""
        self.internal_errors += 1
        log.exception("connection %s: internal error on a frame (%s)", conn.id, frame_head(text))
        conn.close(1011, "internal error")

    def closed(self, conn: Connection, code: int | None = None) -> None:
        """The connection is closed (its reader ended)."""
        if conn.gone:
            return
        role = self.hub.role_of(conn.id)
        conn.gone = True
        conn.batch, conn.batched = [], 0
        conn.queue.clear()
        conn.queued = 0
        conn.wake.set()
        if conn.writer is not None and conn.closing is None:
            conn.writer.cancel()
        self.connections.pop(conn.id, None)
        self._backlogged.discard(conn)
        for key in [k for k in self._acks if k[0] == conn.id]:
            del self._acks[key]  # (a resume on a new connection learns where it stands)
        # A front or a CLI call comes and goes all day: only a runner's
        # connection, or an unusual close, is worth a line at INFO.
        usual = code in QUIET_CLOSES and role != Role.RUNNER
        log.log(
            logging.DEBUG if usual else logging.INFO,
            "connection %s closed (role %s, code %s)",
            conn.id,
            role or "-",
            code,
        )
        self._hub_disconnect(conn)

    # -- carrying out the hub's answer ---------------------------------------------------

    def apply(self, fx: Effects) -> None:
        if fx.records:
            self.store.write(fx.records)
            for record in fx.records:
                if isinstance(record, BuildRecord):
                    log.info(
                        "build %s %s (attempt %d, runner %s)",
                        record.id,
                        record.state,
                        record.attempt,
                        record.runner or "-",
                    )
        conns = self.connections
        for target, text in fx.sends:
            conn = conns.get(target)  # type: ignore[call-overload]
            if conn is not None:
                conn.push(text)
        for close in fx.closes:
            conn = conns.get(close.conn)  # type: ignore[call-overload]
            if conn is not None:
                log.info("connection %s: closing (%d %s)", conn.id, close.code, close.reason)
                conn.close(close.code, close.reason)
        for request in fx.cancels:
            task = self._loading.pop(request, None)
            if task is not None:
                task.cancel()
        for load in fx.loads:
            task = asyncio.create_task(self._load(load))
            self._loading[load.request] = task
            task.add_done_callback(functools.partial(self._loaded, load.request))
        for find in fx.finds:
            task = asyncio.create_task(self._find(find))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if fx.acks:
            position = self.store.position()
            for conn_id, slot, frame in fx.acks:
                self._acks[(conn_id, slot)] = (position, frame)
            if self._ack_timer is None:
                self._ack_timer = asyncio.get_running_loop().call_later(
                    self.config.ack_every, self._send_acks
                )

    def _send_acks(self) -> None:
        """Send the acknowledgements whose records are durable now; the
        others wait for the next round (every ``ack_every`` seconds)."""
        self._ack_timer = None
        durable = self.store.durable()
        for key, (position, frame) in list(self._acks.items()):
            if position <= durable:
                del self._acks[key]
                conn = self.connections.get(key[0])  # type: ignore[call-overload]
                if conn is not None:
                    conn.push(frame)
        if self._acks:
            self._ack_timer = asyncio.get_running_loop().call_later(
                self.config.ack_every, self._send_acks
            )

    async def _find(self, find: FindBuilds) -> None:
        """Read stored builds for a request and hand them to the hub."""
        failed = None
        records = None
        try:
            records = await self.store.find_builds(find)
        except StoreError as exc:
            log.error("reading builds from the store failed: %s", exc)
            failed = str(exc)
        self._answer(
            find.conn,
            lambda: self.hub.builds_found(find.request, records, self.now(), failed=failed),
        )

    def _answer(self, conn_id: object, call: Callable[[], Effects]) -> None:
        """Hand the store's answer to the hub. If the hub raises (a bug),
        close the connection it was for with 1011 and keep serving: an
        answer never dies in a task, unseen."""
        try:
            fx = call()
        except Exception:  # a bug in the hub must not take the server down
            self.internal_errors += 1
            log.exception("connection %s: internal error on an answer from the store", conn_id)
            conn = self.connections.get(conn_id)  # type: ignore[call-overload]
            if conn is not None:
                conn.close(1011, "internal error")
            return
        self.apply(fx)

    def _loaded(self, request: int, task: asyncio.Task[None]) -> None:
        if self._loading.get(request) is task:
            del self._loading[request]

    async def _load(self, load: LoadLog) -> None:
        """Read one page of a replay once its connection drained, and hand it
        to the hub (which asks for the next page, if any)."""
        conn = self.connections.get(load.conn)  # type: ignore[call-overload]
        chunks: list[Chunk] = []
        if conn is not None and not conn.gone:
            try:
                await conn.peer.drain()  # pace the replay to the reader
            except Exception:  # noqa: BLE001 - the connection is going: the reader reports it
                # Not answered: an empty page would tell the hub the backlog
                # is out. The disconnect drops the request.
                log.debug("connection %s: replay stopped, the connection is going", load.conn)
                return
        if conn is not None and not conn.gone:
            try:
                chunks = list(
                    await self.store.read_log(
                        load.build, load.after, load.until, load.limit, load.max_bytes
                    )
                )
            except StoreError as exc:
                log.error("reading the log of %s failed: %s", load.build, exc)
        self._answer(load.conn, lambda: self.hub.log_loaded(load.request, chunks, self.now()))
