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
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Iterable
from typing import Protocol

import attrs

from citron_protocol import BuildRecord, CloseCode, Effects, Hub, HubConfig, LoadLog, Role

from .store import Store, StoreError

__all__ = ["Connection", "Host", "HostConfig", "Peer", "RandomIds"]

log = logging.getLogger("citron.server")


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
    tick: float = 0.5  # how often the hub hears the time, at most


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

    def pending(self) -> int:
        """Bytes not yet on the wire: the outbox and the transport's buffer."""
        return self.batched + self.queued + self.peer.buffered()

    def push(self, text: str) -> None:
        if self.closing is not None or self.gone:
            return
        if not self.batch:
            self.host.dirty(self)
        self.batch.append(text)
        self.batched += len(text)
        if self.batched > self.host.config.max_buffer:  # the transport's part: at flush
            self._slow()

    def flush(self) -> None:
        """Write what this turn of the loop pushed."""
        batch, self.batch, self.batched = self.batch, [], 0
        if not batch or self.gone:
            return
        if not self.queue and self.peer.write_batch(batch):
            if self.peer.buffered() > self.host.config.max_buffer:
                self._slow()
            return
        self.queue.extend(batch)
        self.queued += sum(map(len, batch))
        self._wake_writer()

    def _slow(self) -> None:
        """The outbox overflowed: drop it and close with 4008."""
        self.host.slow_consumers += 1
        log.warning(
            "connection %s: slow consumer (%d bytes waiting, %d in the transport), closing",
            self.id,
            self.batched + self.queued,
            self.peer.buffered(),
        )
        self.batch, self.batched = [], 0
        self.queue.clear()
        self.queued = 0
        self.close(CloseCode.SLOW_CONSUMER, "slow consumer")

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
                    self.queued -= len(text)
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

    @staticmethod
    def now() -> float:
        return time.time()

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and rebuild the hub from it."""
        await self.store.open()
        builds = await self.store.load_builds()
        self.apply(self.hub.restore(builds, self.now()))
        self._timer = asyncio.create_task(self._tick())
        self.started = True
        log.info("restored %d builds", len(builds))

    async def shutdown(self) -> None:
        """Close every connection with 1001, then commit and close the store."""
        await self.close_connections()
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
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
                self._deadline_reached()
            except Exception:  # the timers must keep running
                self.internal_errors += 1
                log.exception("internal error while advancing the hub's timers")

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
        roles = frozenset(roles)
        log.info("connection %s opened (roles %s)", conn.id, ",".join(sorted(roles)))
        self._hub_connect(conn, roles)
        return conn

    def receive(self, conn: Connection, text: str) -> None:
        self._hub_receive(conn, text)

    def receive_binary(self, conn: Connection) -> None:
        self._hub_binary(conn)

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
        # The frame's head only: its payload may carry secrets.
        head = ":".join(text[:64].split(":", 2)[:2])
        log.exception(
            "connection %s: internal error on a frame (%r..., %d characters)",
            conn.id,
            head,
            len(text),
        )
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
        log.info("connection %s closed (role %s, code %s)", conn.id, role or "-", code)
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
        for load in fx.loads:
            task = asyncio.create_task(self._load(load))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _load(self, load: LoadLog) -> None:
        conn = self.connections.get(load.conn)  # type: ignore[call-overload]
        low_water = self.config.max_buffer // 4
        while conn is not None and not conn.gone and conn.pending() > low_water:
            await asyncio.sleep(0.005)  # pace the replay to the reader
        if conn is None or conn.gone:
            chunks: list[tuple[int, str]] = []
        else:
            try:
                chunks = list(
                    await self.store.read_log(load.build, load.after, load.until, load.limit)
                )
            except StoreError as exc:
                log.error("reading the log of %s failed: %s", load.build, exc)
                chunks = []
        self.apply(self.hub.log_loaded(load.request, chunks, self.now()))
