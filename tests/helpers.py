"""An in-memory host for the hub: connections are ids, the store is a
MemoryStore, the clock is a number the test moves."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from citron_protocol import Effects, Hub, HubConfig, Role, decode_server
from citron_protocol.hub import CountingIds
from citron_protocol.records import LoadLog, MemoryStore

T0 = 1_700_000_000.0


class Harness:
    """Hosts a Hub in memory, as an adapter would, minus the sockets."""

    def __init__(self, config: HubConfig | None = None, *, answer_loads: bool = True) -> None:
        self.config = config or HubConfig()
        self.ids = CountingIds()
        self.store = MemoryStore()
        self.now = T0
        self.hub = Hub(self.ids, self.config)
        self.inbox: dict[int, list[str]] = defaultdict(list)
        self.closed: dict[int, tuple[int, str]] = {}
        self.held_loads: list[LoadLog] = []
        self.cancelled: list[int] = []
        self.answer_loads = answer_loads
        self._conns = itertools.count(1)

    # -- host duties --------------------------------------------------------------

    def apply(self, fx: Effects) -> None:
        self.store.apply(fx.records)
        for conn, text in fx.sends:
            assert isinstance(conn, int)
            if conn not in self.closed:
                self.inbox[conn].append(text)
        for close in fx.closes:
            assert isinstance(close.conn, int)
            self.closed[close.conn] = (close.code, close.reason)
        for close in fx.closes:
            self.apply(self.hub.disconnect(close.conn, self.now))
        self.cancelled.extend(fx.cancels)
        for load in fx.loads:
            if self.answer_loads:
                self.answer(load)
            else:
                self.held_loads.append(load)
        for conn, _, frame in fx.acks:  # a MemoryStore is durable at once
            assert isinstance(conn, int)
            if conn not in self.closed:
                self.inbox[conn].append(frame)
        for find in fx.finds:
            self.apply(self.hub.builds_found(find.request, self.store.find_builds(find), self.now))

    def answer(self, load: LoadLog) -> None:
        chunks = self.store.read_log(load.build, load.after, load.until, load.limit, load.max_bytes)
        self.apply(self.hub.log_loaded(load.request, chunks, self.now))

    def answer_held(self) -> None:
        while self.held_loads:
            self.answer(self.held_loads.pop(0))

    # -- what peers do ----------------------------------------------------------------

    def connect(self, roles: Iterable[Role] = (Role.RUNNER, Role.API, Role.WEB)) -> int:
        conn = next(self._conns)
        self.apply(self.hub.connect(conn, roles, self.now))
        return conn

    def send(self, conn: int, text: str) -> list[Any]:
        """Send a frame; returns what came back to this connection."""
        self.apply(self.hub.receive(conn, text, self.now))
        return self.recv(conn)

    def recv(self, conn: int) -> list[Any]:
        frames, self.inbox[conn] = self.inbox[conn], []
        return [decode_server(f) for f in frames]

    def raw(self, conn: int) -> list[str]:
        frames, self.inbox[conn] = self.inbox[conn], []
        return frames

    def disconnect(self, conn: int) -> None:
        self.closed.setdefault(conn, (1006, "gone"))
        self.apply(self.hub.disconnect(conn, self.now))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.apply(self.hub.advance(self.now))

    def restart(self) -> None:
        """A new hub from what the store holds, as after a server restart."""
        self.hub = Hub(self.ids, self.config)
        self.inbox.clear()
        self.apply(
            self.hub.restore(
                self.store.load_builds(), self.now, last_number=self.store.max_number()
            )
        )

    # -- shortcuts ----------------------------------------------------------------------

    def runner(self, type: str = "simple", name: str | None = None) -> int:
        conn = self.connect()
        name_part = f', "name": "{name}"' if name else ""
        replies = self.send(conn, f'RUNNER:init:{{"type": "{type}"{name_part}, "protocol": 1}}')
        assert replies and replies[0].COMMAND == "ready", replies
        self.inbox[conn] = [encode_back(m) for m in replies[1:]] + self.inbox[conn]
        return conn

    def submit(self, conn: int, script: str = '["make"]', extra: str = "") -> str:
        replies = self.send(
            conn, f'API:run:{{"repo": "https://x/r.git", "script": {script}{extra}}}'
        )
        queued = [m for m in replies if m.COMMAND == "queued"]
        assert queued, replies
        return str(queued[0].build)

    def log_of(self, build: str) -> list[tuple[int, str]]:
        return [(c.seq, c.log) for c in self.store.logs.get(build, [])]


def encode_back(message: Any) -> str:
    from citron_protocol import encode

    return encode(message)


def commands(messages: list[Any]) -> list[str]:
    return [m.COMMAND for m in messages]
