"""The hub: the server's state machine, sans I/O.

A host (the websockets or aiohttp adapter of ``citron_server``, or a test)
tells the hub what happened and does what the hub answers:

==========================================  ===================================
the host calls                              when
==========================================  ===================================
``connect(conn, roles, now)``               a WebSocket was accepted; ``roles``
                                            are what its credentials allow
``receive(conn, text, now)``                a text frame arrived
``receive_binary(conn, now)``               a binary frame arrived
``disconnect(conn, now)``                   the connection is closed
``advance(now)``                            the clock reached ``next_deadline()``
``log_loaded(request, chunks, now)``        a :class:`LoadLog` was read
==========================================  ===================================

Each call returns :class:`Effects`: frames to send (``sends``, in order),
connections to close (``closes``), records to persist (``records``, in order)
and logs to read (``loads``). The hub never reads a clock, never touches I/O and
never raises on a peer's input: a bad frame is answered with ``error:``.

Ids and secrets come from an :class:`IdSource` the host passes in. The hub keeps
the state it decides on in memory and persists it through records; it can be
rebuilt from them with :meth:`Hub.restore`.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import attrs

from .codec import encode, encode_log_chunk, parse_client, peek_req, split_client
from .errors import ErrorCode, ProtocolError, UsageError
from .messages import (
    MAX_INT,
    BuildInfo,
    BuildReply,
    Builds,
    BuildState,
    Cancel,
    CancelBuild,
    Error,
    GetBuild,
    GetBuilds,
    GetRunners,
    Queued,
    Ready,
    ResumePoint,
    Role,
    Run,
    RunnerChange,
    RunnerFinished,
    RunnerInfo,
    RunnerInit,
    RunnerLog,
    Runners,
    RunnerState,
    RunnerUnregister,
    ServerMessage,
    StateChange,
    SubmitBuild,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    utf8_size,
)
from .records import BuildRecord, LoadLog, LogRecord, Record
from .states import BuildEvent, RunnerEvent, next_build_state, next_runner_state

__all__ = [
    "PROTOCOL_VERSION",
    "Close",
    "CloseCode",
    "CountingIds",
    "Effects",
    "Hub",
    "HubConfig",
    "HubStats",
    "IdSource",
]

#: The protocol version this hub speaks (``ready``'s ``protocol``).
PROTOCOL_VERSION: Final = 1

ConnId = Hashable


class CloseCode:
    """WebSocket close codes the hub and its hosts use."""

    GOING_AWAY: Final = 1001
    POLICY: Final = 1008  # unauthorized, or too many errors
    TOO_BIG: Final = 1009
    SERVICE_RESTART: Final = 1012  # a cluster node lost its place: reconnect, resume
    TRY_AGAIN_LATER: Final = 1013  # a cluster node could not hold a runner's frames
    CANCEL_TIMEOUT: Final = 4001  # a runner did not end a cancelled build in time
    REPLACED: Final = 4002  # a resume on another connection took this runner's build
    SLOW_CONSUMER: Final = 4008


@attrs.frozen(kw_only=True)
class HubConfig:
    """The hub's policy. Durations are seconds, sizes bytes."""

    log_cap: int = 64 * 1024 * 1024
    lost_grace: float = 60.0
    retry_lost: int = 1
    cancel_timeout: float = 30.0
    max_errors: int = 100
    error_window: float = 60.0
    max_build_bytes: int = 256 * 1024
    replay_page: int = 1000  # chunks read per page of a replay, at most
    replay_bytes: int = 256 * 1024  # encoded bytes sent per page of a replay, about
    max_subscriptions: int = 1000  # builds one connection may follow at once
    max_reply_bytes: int = 512 * 1024  # a get_builds reply, about; at least one build
    max_log_frame: int = 256 * 1024  # a log: frame at most; a longer chunk is stored in pieces
    request_rate: float = 200.0  # API and WEB requests per second and connection, sustained
    request_burst: int = 2000  # ... and at once (a token bucket)


class IdSource(Protocol):
    """Where the hub gets ids and secrets (the host decides how random)."""

    def new_id(self, kind: str) -> str:
        """A fresh id for a ``build`` or a ``runner``; never one given before."""
        ...

    def new_secret(self) -> str:
        """A fresh unguessable session secret."""
        ...


class CountingIds:
    """Deterministic ids (``build-1``, ``runner-1``, ``secret-1``) for tests."""

    def __init__(self) -> None:
        self._counter = _Counter()

    def new_id(self, kind: str) -> str:
        return f"{kind}-{next(self._counter)}"

    def new_secret(self) -> str:
        return f"secret-{next(self._counter)}"


@attrs.frozen
class Close:
    """Close ``conn`` with a WebSocket close code and reason."""

    conn: ConnId
    code: int
    reason: str


@attrs.define
class Effects:
    """What the host must do after a call, in this order: persist ``records``,
    send ``sends`` (``(conn, text)``, in order per connection), close
    ``closes`` after sending, drop the :class:`LoadLog` requests listed in
    ``cancels`` (no longer wanted: their answer would be ignored) and answer
    ``loads``."""

    sends: list[tuple[ConnId, str]] = attrs.Factory(list)
    closes: list[Close] = attrs.Factory(list)
    records: list[Record] = attrs.Factory(list)
    loads: list[LoadLog] = attrs.Factory(list)
    cancels: list[int] = attrs.Factory(list)

    def __bool__(self) -> bool:
        return bool(self.sends or self.closes or self.records or self.loads or self.cancels)


@attrs.define
class HubStats:
    """Counters for metrics: frames by (role, command) and errors by code, of
    this host's connections (``local``); log bytes stored, of every build."""

    frames_in: dict[tuple[str, str], int] = attrs.Factory(dict)
    frames_out: dict[tuple[str, str], int] = attrs.Factory(dict)
    errors: dict[str, int] = attrs.Factory(dict)
    log_bytes: int = 0


class _Counter:
    """1, 2, 3, ...: ``itertools.count`` that can be pickled on every Python."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def __next__(self) -> int:
        self.value += 1
        return self.value


class _Refusal(Exception):
    """Raised inside a handler; answered as ``error:`` at the entry point."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- the hub's own state ----------------------------------------------------------


@attrs.define(eq=False)
class _Sub:
    """A connection following one build's log."""

    conn: _Conn
    build: _Build
    after: int  # the last seq sent (or skipped by ``from``)
    until: int = 0  # while replaying: the last seq that comes from the store
    pending: list[tuple[int, str]] | None = None  # while replaying: live frames held back
    request: int | None = None  # while replaying: the page asked of the host


@attrs.define(eq=False)
class _Conn:
    id: ConnId
    roles: frozenset[Role]
    role: Role | None = None
    runner: _Runner | None = None
    subs: dict[str, _Sub] = attrs.Factory(dict)
    feed: bool = False
    errors: deque[float] = attrs.Factory(deque)
    closing: bool = False
    local: bool = True  # served by this hub's host (see Hub.connect)
    tokens: float = 0.0  # the request budget left (see Hub._spend)
    refilled: float = 0.0  # when ``tokens`` was last brought up to date

    @property
    def out_key(self) -> tuple[str, str]:
        """The metrics key of a ``log:`` frame sent to this connection."""
        return (self.role.value if self.role else "", "log")


@attrs.define(eq=False)
class _Runner:
    id: str
    conn: _Conn
    init: RunnerInit
    session: str
    state: RunnerState | None = None
    build: _Build | None = None

    def info(self) -> RunnerInfo:
        assert self.state is not None
        return RunnerInfo(
            id=self.id,
            type=self.init.type,
            name=self.init.name,
            state=self.state,
            build=self.build.id if self.build else None,
        )


@attrs.define(eq=False)
class _Build:
    record: BuildRecord  # as last saved; the log counters below are newer
    runner: _Runner | None = None  # the registration running it, if connected
    subs: dict[ConnId, _Sub] = attrs.Factory(dict)
    queue_order: int = 0
    secrets: dict[str, str] | None = None  # never persisted
    # Counters that change with every chunk, kept out of the frozen record.
    log_seq: int = 0
    log_bytes: int = 0
    run_seq: int = 0

    @classmethod
    def of(cls, record: BuildRecord, secrets: dict[str, str] | None = None) -> _Build:
        return cls(
            record=record,
            secrets=secrets,
            log_seq=record.log_seq,
            log_bytes=record.log_bytes,
            run_seq=record.run_seq,
        )

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def state(self) -> BuildState:
        return self.record.state

    def info(self) -> BuildInfo:
        r = self.record
        return BuildInfo(
            id=r.id,
            state=r.state,
            repo=r.repo,
            script=r.script,
            type=r.type,
            ref=r.ref,
            runner=r.runner,
            attempt=r.attempt,
            created=rfc3339(r.created),
            started=rfc3339(r.started) if r.started is not None else None,
            finished=rfc3339(r.finished) if r.finished is not None else None,
            success=r.success,
            log_seq=self.log_seq,
            log_bytes=self.log_bytes,
            truncated=r.truncated,
        )


def rfc3339(t: float) -> str:
    """Seconds since the epoch as an RFC 3339 UTC string (millisecond precision)."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# -- the hub ------------------------------------------------------------------------


class Hub:
    """The coordination server's state machine. See the module docstring."""

    def __init__(self, ids: IdSource, config: HubConfig | None = None) -> None:
        self.config = config or HubConfig()
        self.stats = HubStats()
        self._ids = ids
        self._fx = Effects()
        self._now = 0.0
        self._conns: dict[ConnId, _Conn] = {}
        self._feed: dict[ConnId, _Conn] = {}  # connections following the live feed
        self._runners: dict[str, _Runner] = {}
        self._builds: dict[str, _Build] = {}  # in creation order
        self._queue_any: dict[str, _Build] = {}  # queued builds without a type
        self._queue_typed: dict[str, dict[str, _Build]] = {}  # type -> queued builds
        self._waiting_any: dict[str, _Runner] = {}  # waiting runners, longest first
        self._waiting_typed: dict[str, dict[str, _Runner]] = {}
        self._deadlines: dict[str, float] = {}  # build id -> grace or cancel deadline
        self._loads: dict[int, _Sub] = {}
        self._counter = _Counter()
        self._requests = _Counter()  # apart: loads are local to a host
        self._number = 0
        self._handlers = self._make_handlers()

    def _make_handlers(self) -> dict[type[Any], Callable[[_Conn, Any], None]]:
        return {
            RunnerInit: self._on_init,
            RunnerLog: self._on_log,
            RunnerFinished: self._on_finished,
            RunnerUnregister: self._on_unregister,
            SubmitBuild: self._on_submit,
            CancelBuild: self._on_cancel,
            GetRunners: self._on_get_runners,
            GetBuilds: self._on_get_builds,
            GetBuild: self._on_get_build,
            Subscribe: self._on_subscribe,
            Unsubscribe: self._on_unsubscribe,
        }

    # -- inputs ----------------------------------------------------------------

    def restore(self, records: Iterable[BuildRecord], now: float) -> Effects:
        """Rebuild from persisted builds, oldest first, before any connection.

        Queued builds are queued again; running and cancelling builds wait the
        lost-grace period for their runner to resume.
        """
        self._now = now
        for record in records:
            build = _Build.of(record)
            self._builds[record.id] = build
            self._number = max(self._number, record.number)
            if record.state is BuildState.QUEUED and record.secret_names:
                self._notice(build, "its secrets were lost in a server restart; submit it again")
                self._transition(build, BuildEvent.LOSE)
            elif record.state is BuildState.QUEUED:
                self._enqueue(build)
            elif record.state in (BuildState.RUNNING, BuildState.CANCELLING):
                self._deadlines[record.id] = now + self.config.lost_grace
        return self._flush()

    def connect(
        self, conn: ConnId, roles: Iterable[Role], now: float, *, local: bool = True
    ) -> Effects:
        """A connection opened; ``roles`` are the roles it may use.

        A host that replicates the hub passes ``local=False`` for a
        connection another host serves: the hub then decides for it as for any
        other, but spends nothing on following logs and the feed for it
        (subscriptions are answered, not kept), since only its own host
        delivers to it.
        """
        self._now = now
        self._conns[conn] = _Conn(
            id=conn,
            roles=frozenset(roles),
            local=local,
            tokens=float(self.config.request_burst),
            refilled=now,
        )
        return self._flush()

    def receive(self, conn: ConnId, text: str, now: float) -> Effects:
        """A text frame arrived on ``conn``."""
        self._now = now
        c = self._conns.get(conn)
        if c is None or c.closing:
            return self._flush()
        try:
            role, command, payload = split_client(text)
        except ProtocolError as exc:
            self._error(c, exc.code, exc.message, exc.req)
            return self._flush()
        if role not in c.roles:
            self._error(
                c,
                ErrorCode.UNAUTHORIZED,
                f"this connection may not use the {role} role",
                peek_req(payload),
            )
            self._close(c, CloseCode.POLICY, "unauthorized")
            return self._flush()
        if c.role is None:
            c.role = role
        elif role is not c.role:
            self._error(
                c,
                ErrorCode.ROLE_MISMATCH,
                f"this connection is {c.role}, not {role}",
                peek_req(payload),
            )
            return self._flush()
        try:
            message = parse_client(role, command, payload)
        except ProtocolError as exc:
            self._error(c, exc.code, exc.message, exc.req)
            return self._flush()
        if c.local:
            key = (role.value, command)
            self.stats.frames_in[key] = self.stats.frames_in.get(key, 0) + 1
        if role is not Role.RUNNER and not self._spend(c):
            self._error(
                c,
                ErrorCode.RATE_LIMITED,
                f"over the request budget ({self.config.request_rate:g} a second, "
                f"{self.config.request_burst} at once): slow down and send it again",
                getattr(message, "req", None),
            )
            return self._flush()
        if isinstance(message, SubmitBuild) and utf8_size(payload) > self.config.max_build_bytes:
            self._error(
                c,
                ErrorCode.TOO_LARGE,
                f"a build definition may be at most {self.config.max_build_bytes} bytes",
                message.req,
            )
            return self._flush()
        try:
            self._handlers[type(message)](c, message)
        except _Refusal as refusal:
            self._error(c, refusal.code, refusal.message, getattr(message, "req", None))
        return self._flush()

    def receive_binary(self, conn: ConnId, now: float) -> Effects:
        """A binary frame arrived on ``conn``: the protocol has none."""
        self._now = now
        c = self._conns.get(conn)
        if c is not None and not c.closing:
            self._error(c, ErrorCode.MALFORMED, "binary frames are not part of the protocol")
        return self._flush()

    def disconnect(self, conn: ConnId, now: float) -> Effects:
        """``conn`` is closed, whoever closed it."""
        self._now = now
        c = self._conns.pop(conn, None)
        if c is None:
            return self._flush()
        self._feed.pop(conn, None)
        for sub in c.subs.values():
            sub.build.subs.pop(c.id, None)
            self._drop_page(sub)
        c.subs.clear()
        if c.runner is not None:
            self._runner_leaves(c.runner, unregistered=False)
        return self._flush()

    def advance(self, now: float) -> Effects:
        """The clock reached ``now``: fire lost-grace and cancel timeouts."""
        self._now = now
        due = [b for b, t in self._deadlines.items() if t <= now]
        for build_id in due:
            del self._deadlines[build_id]
            build = self._builds[build_id]
            if build.state is BuildState.CANCELLING and build.runner is not None:
                runner = build.runner
                self._transition(build, BuildEvent.CANCEL_TIMEOUT)
                self._close(runner.conn, CloseCode.CANCEL_TIMEOUT, "cancel timeout")
                self._release(runner)
            elif build.runner is None and build.state in (
                BuildState.RUNNING,
                BuildState.CANCELLING,
            ):
                self._lose(build)
        return self._flush()

    def next_deadline(self) -> float | None:
        """When ``advance`` next has work, or None."""
        return min(self._deadlines.values(), default=None)

    def log_loaded(self, request: int, chunks: Sequence[tuple[int, str]], now: float) -> Effects:
        """The answer to :class:`LoadLog` ``request``: ``(seq, text)`` ascending."""
        self._now = now
        sub = self._loads.pop(request, None)
        if sub is None or sub.pending is None or sub.conn.subs.get(sub.build.id) is not sub:
            return self._flush()  # unsubscribed or disconnected meanwhile
        sub.request = None
        conn = sub.conn.id
        sent = 0
        for seq, text in chunks:
            if sub.after < seq <= sub.until:
                if sent >= self.config.replay_bytes:
                    break  # the page is full: the rest comes with the next one
                frame = encode_log_chunk(sub.build.id, seq, text)
                self._send_raw(conn, "log", frame)
                sent += utf8_size(frame)
                sub.after = seq
        if chunks and sub.after < sub.until:
            self._request_page(sub)
            return self._flush()
        # The backlog is out (or the store has no more of it): go live.
        sub.after = max(sub.after, sub.until)
        pending, sub.pending = sub.pending, None
        for seq, frame in pending:
            if seq == 0 or seq > sub.after:
                self._send_raw(conn, "log" if seq else "state", frame)
                sub.after = max(sub.after, seq)
        self._send(conn, StateChange(build=sub.build.info()))
        return self._flush()

    # -- replication ------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The hub's state, for a host that replicates it: restored with
        :meth:`from_snapshot` and fed the same inputs after this point, a copy
        makes the same decisions as this hub.

        It includes session secrets and the secrets of builds not finished
        (the hub forgets them when a build ends): keep it where you keep the
        hub's inputs. A restored copy has no subscriptions and no live feed:
        they belong to the host whose connection they serve. The format is
        this version of citron's; restore it with the same version.
        """
        fx = self._fx
        if fx:
            raise UsageError("take a snapshot between calls, not inside one")
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def from_snapshot(cls, data: bytes) -> Hub:
        """A hub restored from :meth:`snapshot`, without subscriptions, every
        connection in it served by another host (``local=False``); its
        :class:`IdSource` is the one that was snapshotted (see :attr:`ids`)."""
        hub = pickle.loads(data)
        if not isinstance(hub, cls):
            raise TypeError(f"not a snapshot of a {cls.__name__}")
        for c in hub._conns.values():
            c.subs.clear()
            c.feed = False
            c.local = False  # whoever restores it serves none of them yet
        for b in hub._builds.values():
            b.subs.clear()
        hub._feed.clear()
        hub._loads.clear()
        hub.stats = HubStats()
        return hub

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_handlers")  # bound methods: made again on restore
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._handlers = self._make_handlers()

    @property
    def ids(self) -> IdSource:
        """Where this hub gets its ids and secrets."""
        return self._ids

    # -- views for hosts ------------------------------------------------------------

    def role_of(self, conn: ConnId) -> Role | None:
        """The role ``conn`` took with its first frame, if any."""
        c = self._conns.get(conn)
        return c.role if c else None

    def runner_counts(self) -> dict[str, int]:
        """Registered runners by state."""
        counts = {s.value: 0 for s in RunnerState}
        for r in self._runners.values():
            if r.state is not None:
                counts[r.state.value] += 1
        return counts

    def build_counts(self) -> dict[str, int]:
        """Builds by state."""
        counts = {s.value: 0 for s in BuildState}
        for b in self._builds.values():
            counts[b.state.value] += 1
        return counts

    def queue_depth(self) -> int:
        """Builds waiting for a runner."""
        return len(self._queue_any) + sum(len(q) for q in self._queue_typed.values())

    def build(self, build_id: str) -> BuildInfo | None:
        """A build as the wire shows it, or None."""
        b = self._builds.get(build_id)
        return b.info() if b else None

    # -- output helpers ---------------------------------------------------------------

    def _flush(self) -> Effects:
        fx, self._fx = self._fx, Effects()
        return fx

    def _count_out(self, conn: ConnId, command: str, n: int = 1) -> None:
        c = self._conns.get(conn)
        if c is not None and not c.local:
            return  # another host's to count
        key = (c.role.value if c and c.role else "", command)
        self.stats.frames_out[key] = self.stats.frames_out.get(key, 0) + n

    def _send(self, conn: ConnId, message: ServerMessage) -> None:
        self._send_raw(conn, message.COMMAND, encode(message))

    def _send_raw(self, conn: ConnId, command: str, text: str) -> None:
        self._fx.sends.append((conn, text))
        self._count_out(conn, command)

    def _close(self, c: _Conn, code: int, reason: str) -> None:
        if not c.closing:
            c.closing = True
            self._fx.closes.append(Close(c.id, code, reason))

    def _spend(self, c: _Conn) -> bool:
        """Take one request from ``c``'s token bucket; False if it is empty."""
        refill = (self._now - c.refilled) * self.config.request_rate
        c.tokens = min(float(self.config.request_burst), c.tokens + refill)
        c.refilled = self._now
        if c.tokens < 1:
            return False
        c.tokens -= 1
        return True

    def _error(self, c: _Conn, code: ErrorCode, message: str, req: str | None = None) -> None:
        if c.local:
            self.stats.errors[code.value] = self.stats.errors.get(code.value, 0) + 1
        self._send(c.id, Error(code=code.value, message=message, req=req))
        if code is ErrorCode.RATE_LIMITED:
            return  # a limit, not a fault: the connection stays open
        window = c.errors
        window.append(self._now)
        while window and window[0] <= self._now - self.config.error_window:
            window.popleft()
        if len(window) > self.config.max_errors:
            self._close(c, CloseCode.POLICY, "too many errors")

    def _save(self, build: _Build, **changes: Any) -> None:
        if "run_seq" in changes:
            build.run_seq = changes.pop("run_seq")
        build.record = attrs.evolve(
            build.record,
            **changes,
            log_seq=build.log_seq,
            log_bytes=build.log_bytes,
            run_seq=build.run_seq,
        )
        self._fx.records.append(build.record)

    def _notify_build(self, build: _Build) -> None:
        """Send ``state:`` to the build's followers and to the live feed."""
        if not build.subs and not self._feed:
            return  # nobody follows it: skip building the frame
        frame = encode(StateChange(build=build.info()))
        targets: set[ConnId] = set()
        held: set[ConnId] = set()  # replaying: the frame waits in the backlog's queue
        for sub in build.subs.values():
            if sub.pending is not None:
                sub.pending.append((0, frame))
                held.add(sub.conn.id)
            else:
                targets.add(sub.conn.id)
        targets.update(conn for conn in self._feed if conn not in held)
        for conn in targets:
            self._send_raw(conn, "state", frame)

    def _notify_runner(self, runner: _Runner, gone: bool = False) -> None:
        """Send ``runner:`` to the live feed (``gone`` when it leaves)."""
        feed = list(self._feed)
        if feed:
            frame = encode(RunnerChange(runner=runner.info(), gone=gone))
            for conn in feed:
                self._send_raw(conn, "runner", frame)

    # -- builds -----------------------------------------------------------------------

    def _transition(self, build: _Build, event: BuildEvent, **changes: Any) -> None:
        state = next_build_state(build.state, event)
        if state.finished:
            changes.setdefault("finished", self._now)
            changes.setdefault("success", state is BuildState.SUCCESS)
            self._deadlines.pop(build.id, None)
            if state is not BuildState.LOST:  # a lost build may be requeued: see _lose
                build.secrets = None  # of no more use: not kept a moment longer
        self._save(build, state=state, **changes)
        self._notify_build(build)

    def _append_log(
        self, build: _Build, text: str, run_seq: int | None, *, live: bool = True
    ) -> None:
        seq = build.log_seq = build.log_seq + 1
        size = utf8_size(text)
        build.log_bytes += size
        self.stats.log_bytes += size
        build_id = build.record.id
        self._fx.records.append(
            LogRecord(
                build=build_id,
                seq=seq,
                log=text,
                attempt=build.record.attempt,
                run_seq=run_seq,
                size=size,
            )
        )
        if not build.subs or not live:
            return
        frame = encode_log_chunk(build_id, seq, text)
        sends = self._fx.sends
        counts = self.stats.frames_out
        for sub in build.subs.values():
            if sub.pending is not None:
                sub.pending.append((seq, frame))
            elif seq > sub.after:
                sub.after = seq
                sends.append((sub.conn.id, frame))
                key = sub.conn.out_key
                counts[key] = counts.get(key, 0) + 1

    def _notice(self, build: _Build, text: str) -> None:
        self._append_log(build, f"\n[citron] {text}\n", None)

    def _enqueue(self, build: _Build) -> None:
        build.queue_order = next(self._counter)
        t = build.record.type
        if t is None:
            self._queue_any[build.id] = build
        else:
            self._queue_typed.setdefault(t, {})[build.id] = build

    def _dequeue(self, build: _Build) -> None:
        t = build.record.type
        if t is None:
            self._queue_any.pop(build.id, None)
        else:
            queue = self._queue_typed.get(t, {})
            queue.pop(build.id, None)
            if not queue:
                self._queue_typed.pop(t, None)

    def _dispatch_build(self, build: _Build) -> None:
        """A build was queued: give it to the runner that has waited longest."""
        t = build.record.type
        pool = self._waiting_any if t is None else self._waiting_typed.get(t)
        if pool:
            self._start(build, next(iter(pool.values())))

    def _dispatch_runner(self, runner: _Runner) -> None:
        """A runner is waiting: give it the oldest build it can run."""
        candidates = []
        if self._queue_any:
            candidates.append(next(iter(self._queue_any.values())))
        typed = self._queue_typed.get(runner.init.type)
        if typed:
            candidates.append(next(iter(typed.values())))
        if candidates:
            self._start(min(candidates, key=lambda b: b.queue_order), runner)

    def _start(self, build: _Build, runner: _Runner) -> None:
        self._dequeue(build)
        if build.record.secret_names and build.secrets is None:
            # Secrets live only in memory: a restart took them.
            self._notice(build, "its secrets were lost in a server restart; submit it again")
            self._transition(build, BuildEvent.LOSE)
            self._dispatch_runner(runner)
            return
        self._set_runner_state(runner, RunnerEvent.DISPATCH, build)
        build.runner = runner
        self._transition(
            build,
            BuildEvent.DISPATCH,
            runner=runner.id,
            started=self._now,
            run_seq=0,
            session_hash=_hash_secret(runner.session),
        )
        r = build.record
        self._send(
            runner.conn.id,
            Run(
                build=r.id,
                repo=r.repo,
                script=r.script,
                ref=r.ref,
                env=r.env,
                timeout=r.timeout,
                secrets=build.secrets,
            ),
        )
        self._notify_runner(runner)

    def _lose(self, build: _Build) -> None:
        """The build's runner is gone for good: the lost policy."""
        build.runner = None
        attempt = build.record.attempt
        was_cancelling = build.state is BuildState.CANCELLING
        self._transition(build, BuildEvent.LOSE)
        if was_cancelling:
            build.secrets = None
            return
        if attempt <= self.config.retry_lost:
            self._notice(
                build, f"attempt {attempt} lost its runner; requeued as attempt {attempt + 1}"
            )
            self._transition(
                build,
                BuildEvent.REQUEUE,
                attempt=attempt + 1,
                runner=None,
                started=None,
                finished=None,
                success=None,
                run_seq=0,
                session_hash=None,
            )
            self._enqueue(build)
            self._dispatch_build(build)
        else:
            self._notice(build, f"attempt {attempt} lost its runner; no retry left")
            build.secrets = None

    # -- runners ----------------------------------------------------------------------

    def _set_runner_state(self, runner: _Runner, event: RunnerEvent, build: _Build | None) -> None:
        old = runner.state
        runner.state = next_runner_state(old, event)
        runner.build = build
        if old is RunnerState.WAITING:
            self._waiting_any.pop(runner.id, None)
            typed = self._waiting_typed.get(runner.init.type, {})
            typed.pop(runner.id, None)
            if not typed:
                self._waiting_typed.pop(runner.init.type, None)
        if runner.state is RunnerState.WAITING:
            self._waiting_any[runner.id] = runner
            self._waiting_typed.setdefault(runner.init.type, {})[runner.id] = runner

    def _release(self, runner: _Runner, dispatch: bool = True) -> None:
        """The runner's build ended: it waits for the next one."""
        if runner.build is not None and runner.build.runner is runner:
            runner.build.runner = None
        self._set_runner_state(runner, RunnerEvent.RELEASE, None)
        self._notify_runner(runner)
        if dispatch and not runner.conn.closing:
            self._dispatch_runner(runner)

    def _runner_leaves(self, runner: _Runner, unregistered: bool) -> None:
        build = runner.build
        self._notify_runner(runner, gone=True)
        self._set_runner_state(runner, RunnerEvent.LEAVE, None)
        self._runners.pop(runner.id, None)
        runner.conn.runner = None
        if build is None or build.runner is not runner:
            return
        build.runner = None
        if unregistered or build.state is BuildState.CANCELLING:
            self._lose(build)
        else:
            self._deadlines[build.id] = self._now + self.config.lost_grace

    def _current_build(self, c: _Conn, build_id: str | None) -> tuple[_Runner, _Build]:
        runner = c.runner
        if runner is None:
            raise _Refusal(ErrorCode.NOT_REGISTERED, "send RUNNER:init first")
        build = runner.build
        if build is None:
            raise _Refusal(ErrorCode.NO_BUILD, "this runner has no current build")
        if build_id is not None and build_id != build.id:
            raise _Refusal(
                ErrorCode.NO_BUILD, f"this runner's current build is {build.id}, not {build_id}"
            )
        return runner, build

    # -- handlers: RUNNER ---------------------------------------------------------------

    def _on_init(self, c: _Conn, msg: RunnerInit) -> None:
        if c.runner is not None:
            if msg == c.runner.init:
                r = c.runner
                self._send(c.id, Ready(runner=r.id, protocol=PROTOCOL_VERSION, session=r.session))
                return
            raise _Refusal(
                ErrorCode.BAD_STATE, "this connection is already registered as another runner"
            )
        runner = _Runner(
            id=self._fresh_id("runner", self._runners),
            conn=c,
            init=msg,
            session=self._ids.new_secret(),
        )
        c.runner = runner
        self._runners[runner.id] = runner
        build = self._resumable(msg)
        if build is None:
            self._set_runner_state(runner, RunnerEvent.REGISTER, None)
            self._send(
                c.id, Ready(runner=runner.id, protocol=PROTOCOL_VERSION, session=runner.session)
            )
            self._notify_runner(runner)
            self._dispatch_runner(runner)
            return
        # Resume: the build continues on this connection.
        old = build.runner
        if old is not None:  # the old connection is stale: replace it
            old.build = None
            build.runner = None
            self._close(old.conn, CloseCode.REPLACED, "replaced by a resume")
            self._runner_leaves(old, unregistered=False)
        self._deadlines.pop(build.id, None)
        self._set_runner_state(runner, RunnerEvent.REGISTER, None)
        self._set_runner_state(runner, RunnerEvent.DISPATCH, build)
        build.runner = runner
        self._save(build, runner=runner.id, session_hash=_hash_secret(runner.session))
        self._send(
            c.id,
            Ready(
                runner=runner.id,
                protocol=PROTOCOL_VERSION,
                session=runner.session,
                resume=ResumePoint(build=build.id, seq=build.run_seq),
            ),
        )
        if build.state is BuildState.CANCELLING:
            self._send(c.id, Cancel(build=build.id))
            self._deadlines[build.id] = self._now + self.config.cancel_timeout
        self._notify_runner(runner)
        self._notify_build(build)

    def _resumable(self, msg: RunnerInit) -> _Build | None:
        if msg.resume is None:
            return None
        build = self._builds.get(msg.resume.build)
        if build is None or build.state not in (BuildState.RUNNING, BuildState.CANCELLING):
            return None
        expected = build.record.session_hash
        if expected is None or not hmac.compare_digest(expected, _hash_secret(msg.resume.session)):
            return None
        return build

    def _on_log(self, c: _Conn, msg: RunnerLog) -> None:
        _, build = self._current_build(c, msg.build)
        last = build.run_seq
        if msg.seq is None:
            run_seq = last + 1
        elif msg.seq <= last:
            return  # already stored: a resend after a resume
        elif msg.seq > last + 1:
            raise _Refusal(
                ErrorCode.BAD_STATE,
                f"seq {msg.seq} leaves a gap: the last stored seq of this run is {last}",
            )
        else:
            run_seq = msg.seq
        build.run_seq = run_seq
        if build.record.truncated:
            return
        size = utf8_size(msg.log)
        if build.log_bytes + size > self.config.log_cap:
            self._notice(build, f"log truncated: it reached the cap of {self.config.log_cap} bytes")
            self._save(build, truncated=True)
            self._notify_build(build)
            return
        pieces = self._pieces(build.record.id, msg.log)
        if len(pieces) == 1:
            self._append_log(build, msg.log, run_seq)
            return
        # Too big for one frame: stored in pieces, and its followers get
        # them paced from the store, like a replay (all at once, they would
        # overflow a reader's buffer).
        for piece in pieces:
            self._append_log(build, piece, run_seq, live=False)
        for sub in build.subs.values():
            sub.until = build.log_seq
            if sub.pending is None:
                sub.pending = []
                self._request_page(sub)

    def _pieces(self, build_id: str, text: str) -> list[str]:
        """``text`` cut so that each piece's ``log:`` frame is at most
        ``max_log_frame`` bytes: escaping can make a frame six times its
        text (control characters), and a frame must fit every reader's
        buffer. Pieces share the runner's seq."""
        bound = self.config.max_log_frame
        if 6 * len(text) + len(build_id) + 64 <= bound or len(text) < 2:
            return [text]  # the common case: no need to encode to know
        if utf8_size(encode_log_chunk(build_id, MAX_INT, text)) <= bound:
            return [text]
        half = len(text) // 2
        return self._pieces(build_id, text[:half]) + self._pieces(build_id, text[half:])

    def _on_finished(self, c: _Conn, msg: RunnerFinished) -> None:
        runner, build = self._current_build(c, msg.build)
        self._transition(build, BuildEvent.SUCCEED if msg.success else BuildEvent.FAIL)
        self._release(runner, dispatch=not msg.leave)
        if msg.leave:
            self._runner_leaves(runner, unregistered=True)

    def _on_unregister(self, c: _Conn, msg: RunnerUnregister) -> None:
        if c.runner is None:
            raise _Refusal(ErrorCode.NOT_REGISTERED, "send RUNNER:init first")
        self._runner_leaves(c.runner, unregistered=True)

    # -- handlers: API and WEB -----------------------------------------------------------

    def _fresh_id(self, kind: str, taken: dict[str, Any]) -> str:
        """An id from the IdSource that names nothing yet (random ids can
        collide, however rarely; asking again is deterministic)."""
        new = self._ids.new_id(kind)
        while new in taken:
            new = self._ids.new_id(kind)
        return new

    def _find(self, build_id: str) -> _Build:
        build = self._builds.get(build_id)
        if build is None:
            raise _Refusal(ErrorCode.UNKNOWN_BUILD, f"no build {build_id!r}")
        return build

    def _on_submit(self, c: _Conn, msg: SubmitBuild) -> None:
        self._number += 1
        record = BuildRecord(
            id=self._fresh_id("build", self._builds),
            number=self._number,
            state=BuildState.QUEUED,
            repo=msg.repo,
            script=msg.script,
            type=msg.type,
            ref=msg.ref,
            env=msg.env,
            timeout=msg.timeout,
            created=self._now,
            secret_names=tuple(sorted(msg.secrets or ())),
        )
        build = _Build.of(record, msg.secrets)
        self._builds[record.id] = build
        self._fx.records.append(record)
        self._send(c.id, Queued(build=record.id, req=msg.req))
        self._notify_build(build)
        self._enqueue(build)
        self._dispatch_build(build)

    def _on_cancel(self, c: _Conn, msg: CancelBuild) -> None:
        build = self._find(msg.build)
        state = build.state
        if state is BuildState.QUEUED:
            self._dequeue(build)
            self._transition(build, BuildEvent.CANCEL)
        elif state is BuildState.RUNNING:
            self._transition(build, BuildEvent.CANCEL)
            if build.runner is None:  # its runner is away: nothing to stop
                self._lose(build)
            else:
                self._send(build.runner.conn.id, Cancel(build=build.id))
                self._deadlines[build.id] = self._now + self.config.cancel_timeout
        elif state is not BuildState.CANCELLING:
            raise _Refusal(
                ErrorCode.BAD_STATE, f"build {build.id} is {state}: it cannot be cancelled"
            )
        self._send(c.id, BuildReply(build=build.info(), req=msg.req))

    def _on_get_runners(self, c: _Conn, msg: GetRunners) -> None:
        registered = [r for r in self._runners.values() if r.state is not None]
        if msg.after is not None:
            after = msg.after
            registered = sorted((r for r in registered if r.id > after), key=lambda r: r.id)
        infos = [r.info() for r in registered]
        whole = encode(Runners(runners=tuple(infos), req=msg.req))
        if utf8_size(whole) <= self.config.max_reply_bytes:  # one encoding, as a rule
            self._send_raw(c.id, Runners.COMMAND, whole)
            return
        # Too many for one reply: pages in id order, so that a page's last
        # id marks where the next begins whoever comes and goes meanwhile.
        out: list[RunnerInfo] = []
        total = 0
        for info in sorted(infos, key=lambda info: info.id):
            total += utf8_size(encode(Runners(runners=(info,))))
            if out and total > self.config.max_reply_bytes:
                break
            out.append(info)
        self._send(c.id, Runners(runners=tuple(out), req=msg.req, more=True))

    def _on_get_builds(self, c: _Conn, msg: GetBuilds) -> None:
        builds = list(self._builds.values())
        if msg.before is not None:
            before = self._find(msg.before)
            builds = [b for b in builds if b.record.number < before.record.number]
        out: list[BuildInfo] = []
        size = 0
        more = False
        for build in reversed(builds):
            if msg.state is None or build.state is msg.state:
                if len(out) == msg.limit:
                    break
                info = build.info()
                size += utf8_size(encode(BuildReply(build=info)))
                if out and size > self.config.max_reply_bytes:
                    more = True  # the rest with before=out[-1].id
                    break
                out.append(info)
        self._send(c.id, Builds(builds=tuple(out), req=msg.req, more=more))

    def _on_get_build(self, c: _Conn, msg: GetBuild) -> None:
        self._send(c.id, BuildReply(build=self._find(msg.build).info(), req=msg.req))

    def _on_subscribe(self, c: _Conn, msg: Subscribe) -> None:
        if msg.build is None:
            if c.local:
                c.feed = True
                self._feed[c.id] = c
            self._send(c.id, Subscribed(build=None, from_=0, req=msg.req))
            return
        build = self._find(msg.build)
        if not c.local:  # another host follows the log for it
            self._send(c.id, Subscribed(build=build.id, from_=msg.from_, req=msg.req))
            return
        replaced = c.subs.get(build.id)
        if replaced is None and len(c.subs) >= self.config.max_subscriptions:
            raise _Refusal(
                ErrorCode.RATE_LIMITED,
                f"this connection follows {len(c.subs)} builds already, the most it may;"
                " unsubscribe from one first",
            )
        sub = _Sub(conn=c, build=build, after=msg.from_)
        if replaced is not None:
            self._drop_page(replaced)
        c.subs[build.id] = sub
        build.subs[c.id] = sub
        self._send(c.id, Subscribed(build=build.id, from_=msg.from_, req=msg.req))
        if msg.from_ < build.log_seq:
            sub.until = build.log_seq
            sub.pending = []
            self._request_page(sub)
        else:
            self._send(c.id, StateChange(build=build.info()))

    def _request_page(self, sub: _Sub) -> None:
        request = next(self._requests)
        self._loads[request] = sub
        sub.request = request
        self._fx.loads.append(
            LoadLog(
                request=request,
                conn=sub.conn.id,
                build=sub.build.id,
                after=sub.after,
                until=sub.until,
                limit=self.config.replay_page,
                max_bytes=self.config.replay_bytes,
            )
        )

    def _drop_page(self, sub: _Sub) -> None:
        """``sub`` goes away: the page asked for it is no longer wanted."""
        if sub.request is not None:
            self._loads.pop(sub.request, None)
            self._fx.cancels.append(sub.request)
            sub.request = None

    def _on_unsubscribe(self, c: _Conn, msg: Unsubscribe) -> None:
        if msg.build is None:
            c.feed = False
            self._feed.pop(c.id, None)
            self._send(c.id, Unsubscribed(build=None, from_=0, req=msg.req))
            return
        sub = c.subs.pop(msg.build, None)
        last = 0
        if sub is not None:
            sub.build.subs.pop(c.id, None)
            self._drop_page(sub)
            last = sub.after
        elif msg.build not in self._builds:
            raise _Refusal(ErrorCode.UNKNOWN_BUILD, f"no build {msg.build!r}")
        self._send(c.id, Unsubscribed(build=msg.build, from_=last, req=msg.req))
