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
``builds_found(request, records, now)``     a :class:`FindBuilds` was read
==========================================  ===================================

Each call returns :class:`Effects`: frames to send (``sends``, in order),
connections to close (``closes``), records to persist (``records``, in order),
logs to read (``loads``) and stored builds to find (``finds``). The hub
never reads a clock, never touches I/O and never raises on a peer's input: a
bad frame is answered with ``error:``.

The hub is a facade over its parts, each in its own module with its own
tests: :mod:`._session` (one connection: role binding, parsing, request
budget, error window), :mod:`._scheduler` (the queue and the waiting
runners), :mod:`._state` (the records of builds, runners and
subscriptions, and the one place a build and its runner are linked) and
:mod:`._snapshot` (the snapshot's JSON content). States change only
through the tables of :mod:`.states`.

Ids and secrets come from an :class:`IdSource` the host passes in. The hub keeps
its working set in memory: connections, runners, the builds not finished, and
the ``HubConfig.window`` most recent finished builds (by number). Every build
is persisted through records; a request about an older build is answered from
the store (:class:`FindBuilds`). A hub is rebuilt from the store's live builds
with :meth:`Hub.restore`, and copied whole with :meth:`Hub.snapshot`.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Final, Protocol

import attrs
import cattrs

from . import _snapshot as snap
from ._scheduler import Scheduler
from ._session import Refused
from ._session import Session as _Conn
from ._state import Build as _Build
from ._state import Runner as _Runner
from ._state import Sub as _Sub
from ._state import hash_secret as _hash_secret
from ._state import link, unlink
from .codec import (
    decode_client,
    encode,
    encode_log_chunk,
    fast_log_frame,
    log_time,
)
from .errors import ErrorCode, ProtocolError, SnapshotError, UsageError
from .messages import (
    MAX_INT,
    Ack,
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
    Shutdown,
    ShutdownRunner,
    StateChange,
    SubmitBuild,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    utf8_size,
)
from .records import LIVE_STATES, BuildRecord, FindBuilds, LoadLog, Record, log_record
from .states import HELD_STATES, BuildEvent, RunnerEvent, next_build_state, next_runner_state

__all__ = [
    "PROTOCOL_VERSION",
    "SNAPSHOT_VERSION",
    "Close",
    "CloseCode",
    "CountingIds",
    "Effects",
    "Hub",
    "HubConfig",
    "HubStats",
    "IdSource",
]

_LOG_IN: Final = (Role.RUNNER.value, "process")  # metrics key of a log chunk received
#: The highest protocol version this hub speaks. ``ready`` says the version
#: spoken with each runner: 2 (acknowledgements) if it asked for 2 or more,
#: else 1.
PROTOCOL_VERSION: Final = 2
#: The format version of :meth:`Hub.snapshot` (1 was a pickle, refused).
SNAPSHOT_VERSION: Final = 2
SNAPSHOT_FORMAT: Final = "citron-hub"

ConnId = Hashable


#: The longest ``time`` of a ``log:`` frame, to bound a frame's size.
_LONGEST_TIME = "9999-12-31T23:59:59.999Z"
_LAST_SECOND: Final = 253_402_300_799.0  # 9999-12-31T23:59:59Z


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
    window: int = 1000  # finished builds kept in memory (the newest by number)
    retention: float | None = None  # seconds a finished build is kept; None: for ever


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
    ``cancels`` (no longer wanted: their answer would be ignored), answer
    ``loads`` and ``finds`` (after the records are written: the store must
    see them).

    ``acks`` are ``(conn, slot, text)``: frames to send only once every
    record of this call (and before it) is durable in the store. Of two
    acks for one ``(conn, slot)``, the later one says all the earlier did:
    a host may send only the last."""

    sends: list[tuple[ConnId, str]] = attrs.Factory(list)
    closes: list[Close] = attrs.Factory(list)
    records: list[Record] = attrs.Factory(list)
    loads: list[LoadLog] = attrs.Factory(list)
    cancels: list[int] = attrs.Factory(list)
    finds: list[FindBuilds] = attrs.Factory(list)
    acks: list[tuple[ConnId, Hashable, str]] = attrs.Factory(list)

    def __bool__(self) -> bool:
        return bool(
            self.sends
            or self.closes
            or self.records
            or self.loads
            or self.cancels
            or self.finds
            or self.acks
        )


@attrs.define
class HubStats:
    """Counters for metrics: frames by (role, command) and errors by code, of
    this host's connections (``local``); log bytes stored, of every build."""

    frames_in: dict[tuple[str, str], int] = attrs.Factory(dict)
    frames_out: dict[tuple[str, str], int] = attrs.Factory(dict)
    errors: dict[str, int] = attrs.Factory(dict)
    log_bytes: int = 0
    finished: dict[str, int] = attrs.Factory(dict)  # builds that ended, by state


class _Counter:
    """1, 2, 3, ...: ``itertools.count`` whose value can be read and set."""

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


class _Ask(Exception):
    """Raised inside a handler, before it changed anything, when the answer
    needs builds that only the store holds: the entry point emits
    :class:`FindBuilds`, and the handler runs again with the store's
    answer (:meth:`Hub.builds_found`)."""

    def __init__(
        self,
        *,
        build: str | None = None,
        before: int | None = None,
        state: BuildState | None = None,
        limit: int = 1,
    ) -> None:
        super().__init__(build)
        self.build, self.before, self.state, self.limit = build, before, state, limit


@attrs.define(eq=False)
class _Query:
    """A request waiting for the store: what it asked and was answered."""

    conn: _Conn
    message: Any
    found: dict[str, BuildRecord | None] = attrs.Factory(dict)  # by id
    listing: list[BuildRecord] | None = None
    asked: _Ask | None = None
    evictions: int = 0  # the hub's eviction count when the listing was read
    rounds: int = 0


def _spoken(init: RunnerInit) -> int:
    """The protocol version spoken with a runner that sent ``init``."""
    return max(1, min(init.protocol, PROTOCOL_VERSION))


def _stored_time(stamp: float | None) -> str | None:
    """A stored chunk's time for the wire; None when the store has none, or
    one no clock gives (not finite, before 1970, after 9999)."""
    if stamp is None or not 0 <= stamp < _LAST_SECOND:
        return None  # (NaN fails the comparison too)
    return log_time(stamp)


def _already(build: object) -> None:
    """A row whose effect is nothing: the event changes nothing now."""


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
        self._scheduler = Scheduler()  # the queue and the waiting runners
        self._deadlines: dict[str, float] = {}  # build id -> grace or cancel deadline
        self._loads: dict[int, _Sub] = {}
        self._queries: dict[int, _Query] = {}  # waiting for the store
        self._query: _Query | None = None  # the one being answered
        self._requests = _Counter()  # apart: loads are local to a host
        self._number = 0
        # The window: finished builds in memory, a min-heap by number.
        self._window: list[tuple[int, str]] = []
        self._finishing: list[_Build] = []  # finished in this call: to the window
        self._evicted = 0  # the highest number of a build no longer in memory
        self._evictions = 0  # how many builds left memory, ever
        self._next_expiry = 0.0  # when advance() next looks for expired builds
        self._handlers = self._make_handlers()
        self._make_rows()

    def _make_handlers(self) -> dict[type[Any], Callable[[_Conn, Any], None]]:
        return {
            RunnerInit: self._on_init,
            RunnerLog: self._on_log,
            RunnerFinished: self._on_finished,
            RunnerUnregister: self._on_unregister,
            SubmitBuild: self._on_submit,
            CancelBuild: self._on_cancel,
            ShutdownRunner: self._on_shutdown_runner,
            GetRunners: self._on_get_runners,
            GetBuilds: self._on_get_builds,
            GetBuild: self._on_get_build,
            Subscribe: self._on_subscribe,
            Unsubscribe: self._on_unsubscribe,
        }

    # -- inputs ----------------------------------------------------------------

    def restore(
        self, records: Iterable[BuildRecord], now: float, *, last_number: int = 0
    ) -> Effects:
        """Rebuild from persisted builds, oldest first, before any connection.

        ``records`` are the builds not finished (finished ones given too go
        to the window); ``last_number`` is the highest build number in the
        store, so that numbers go on from it and requests about builds not
        given here are asked of the store. Queued builds are queued again;
        running and cancelling builds wait the lost-grace period for their
        runner to resume.
        """
        self._now = now
        self._number = max(self._number, last_number)
        self._evicted = max(self._evicted, last_number)
        for record in records:
            build = _Build.of(record)
            self._builds[record.id] = build
            self._number = max(self._number, record.number)
            if record.state.finished:
                self._finishing.append(build)
            elif record.state is BuildState.QUEUED and record.secret_names:
                self._notice(build, "its secrets were lost in a server restart; submit it again")
                self._transition(build, BuildEvent.LOSE)
            elif record.state is BuildState.QUEUED:
                self._scheduler.enqueue(build)
            elif record.state in HELD_STATES:
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
        if c.runner is not None:  # the hot path: a registered runner's log chunk
            chunk = fast_log_frame(text)
            if chunk is not None:
                if c.local:
                    counts = self.stats.frames_in
                    counts[_LOG_IN] = counts.get(_LOG_IN, 0) + 1
                try:
                    self._on_log(c, chunk)
                except _Refusal as refusal:
                    self._error(c, refusal.code, refusal.message)
                return self._flush()
        try:
            message, command, payload = c.parse(text)
        except Refused as refused:
            self._error(c, refused.code, refused.message, refused.req)
            if refused.close:
                self._close(c, CloseCode.POLICY, "unauthorized")
            return self._flush()
        role = message.role
        if c.local:
            key = (role.value, command)
            self.stats.frames_in[key] = self.stats.frames_in.get(key, 0) + 1
        if role is not Role.RUNNER and not c.spend(
            now, self.config.request_rate, self.config.request_burst
        ):
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
        except _Ask as ask:
            self._ask(_Query(conn=c, message=message), ask)
        return self._flush()

    def builds_found(
        self,
        request: int,
        records: Sequence[BuildRecord] | None,
        now: float,
        *,
        failed: str | None = None,
    ) -> Effects:
        """The answer to :class:`FindBuilds` ``request`` (None: the build it
        named is not stored); ``failed``: the store could not be read, and
        the request is answered ``unavailable``. The request it served is
        answered now; an error in that answer does not count toward the
        connection's error window (every replica of a hub must count alike,
        and only the host of the connection asks the store)."""
        self._now = now
        query = self._queries.pop(request, None)
        if query is None:
            return self._flush()
        c = query.conn
        if c.closing or self._conns.get(c.id) is not c:
            return self._flush()  # gone meanwhile
        if failed is not None:
            req = getattr(query.message, "req", None)
            self._error(
                c, ErrorCode.UNAVAILABLE, f"the store cannot be read: {failed}", req, count=False
            )
            return self._flush()
        asked = query.asked
        assert asked is not None
        if asked.build is not None:
            query.found[asked.build] = records[0] if records else None
        else:
            query.listing = list(records or ())
        self._query = query
        try:
            self._handlers[type(query.message)](c, query.message)
        except _Refusal as refusal:
            req = getattr(query.message, "req", None)
            self._error(c, refusal.code, refusal.message, req, count=False)
        except _Ask as ask:
            self._ask(query, ask)
        finally:
            self._query = None
        return self._flush()

    def _ask(self, query: _Query, ask: _Ask) -> None:
        """Ask the store for what a request needs (see :class:`_Ask`). Only
        the connection's own host asks: another answers nothing for it."""
        if not query.conn.local:
            return
        query.asked = ask
        query.rounds += 1
        request = next(self._requests)
        self._queries[request] = query
        self._fx.finds.append(
            FindBuilds(
                request=request,
                conn=query.conn.id,
                build=ask.build,
                before=ask.before,
                state=ask.state,
                limit=ask.limit,
            )
        )

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
        for request in [r for r, q in self._queries.items() if q.conn is c]:
            del self._queries[request]
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
            effect = self._on_deadline.get((build.state, build.runner is not None))
            if effect is not None:
                effect(build)
        if self.config.retention is not None and now >= self._next_expiry:
            self._next_expiry = now + 60
            self._expire(now - self.config.retention)
        return self._flush()

    def next_deadline(self) -> float | None:
        """When ``advance`` next has work, or None."""
        return min(self._deadlines.values(), default=None)

    def _expire(self, cutoff: float) -> None:
        """Drop from the window the builds that finished before ``cutoff``:
        the store deletes them (retention), the hub forgets them."""
        old = {
            build_id
            for _, build_id in self._window
            if (finished := self._builds[build_id].record.finished) is not None
            and finished < cutoff
        }
        if not old:
            return
        self._window = [(n, b) for n, b in self._window if b not in old]
        heapq.heapify(self._window)
        for build_id in old:
            build = self._builds.pop(build_id)
            self._evicted = max(self._evicted, build.record.number)
            self._evictions += 1

    def log_loaded(
        self,
        request: int,
        chunks: Sequence[tuple[int, str] | tuple[int, str, float | None]],
        now: float,
    ) -> Effects:
        """The answer to :class:`LoadLog` ``request``: ``(seq, text, time)``
        ascending (:data:`~citron_protocol.records.Chunk`; a store that does
        not keep times may give ``(seq, text)``)."""
        self._now = now
        sub = self._loads.pop(request, None)
        if sub is None or sub.pending is None or sub.conn.subs.get(sub.build.id) is not sub:
            return self._flush()  # unsubscribed or disconnected meanwhile
        sub.request = None
        conn = sub.conn.id
        sent = 0
        for chunk in chunks:
            seq, text = chunk[0], chunk[1]
            if sub.after < seq <= sub.until:
                if sent >= self.config.replay_bytes:
                    break  # the page is full: the rest comes with the next one
                stamp = chunk[2] if len(chunk) > 2 else None
                frame = encode_log_chunk(sub.build.id, seq, text, _stored_time(stamp))
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

        It is JSON (UTF-8): a format name and version, a SHA-256 digest of
        the content, and the content (connections, runners, the builds in
        memory, the queue and waiting order, deadlines, counters). It
        includes session secrets and the secrets of builds not finished
        (the hub forgets them when a build ends): keep it where you keep the
        hub's inputs. Subscriptions and the live feed are not in it: they
        belong to the host whose connection they serve. Connection ids must
        be strings, integers, or tuples of them.
        """
        if self._fx:
            raise UsageError("take a snapshot between calls, not inside one")
        content = snap.converter.unstructure(self._state())
        body = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return json.dumps(
            {
                "format": SNAPSHOT_FORMAT,
                "version": SNAPSHOT_VERSION,
                "sha256": hashlib.sha256(body.encode()).hexdigest(),
                "hub": body,
            }
        ).encode()

    @classmethod
    def from_snapshot(cls, data: bytes, ids: IdSource, config: HubConfig | None = None) -> Hub:
        """A hub restored from :meth:`snapshot`, taking its ids from ``ids``,
        without subscriptions, every connection in it served by another host
        (``local=False``).

        Raises :class:`SnapshotError` (with a message that says what to do)
        for anything else: not JSON, another format or version (a version 1
        snapshot, a pickle, is never loaded: it could run code), a digest
        that does not match, or content that does not check out (unknown
        fields, wrong types, links to runners, builds or connections that
        are not there). Loading a snapshot never runs code from it.
        """
        try:
            outer = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise SnapshotError(
                "not a citron hub snapshot (not JSON): a snapshot of citron before"
                " 0.2 was a pickle, which this version never loads; delete it and"
                " let a node of this version store a new one"
            ) from None
        if not isinstance(outer, dict) or outer.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError("not a citron hub snapshot (no format 'citron-hub')")
        version = outer.get("version")
        if version != SNAPSHOT_VERSION:
            raise SnapshotError(
                f"hub snapshot version {version!r}; this citron reads version"
                f" {SNAPSHOT_VERSION}: every node must run the same version of citron"
            )
        body = outer.get("hub")
        digest = outer.get("sha256")
        if not isinstance(body, str) or not isinstance(digest, str):
            raise SnapshotError("hub snapshot without content or digest")
        if not hmac.compare_digest(hashlib.sha256(body.encode()).hexdigest(), digest):
            raise SnapshotError("hub snapshot content does not match its digest: refused")
        try:
            content = json.loads(body, parse_constant=snap.no_constant)
            state = snap.converter.structure(content, snap.HubState)
        except (ValueError, TypeError, KeyError, RecursionError, cattrs.BaseValidationError) as exc:
            raise SnapshotError(f"hub snapshot content does not check out: {exc}") from None
        hub = cls(ids, config)
        try:
            hub._load_state(state)
        except RecursionError:  # (connection ids nested past any use)
            raise SnapshotError(
                "hub snapshot content does not check out: nested too deep"
            ) from None
        return hub

    def _state(self) -> snap.HubState:
        for c in self._conns.values():
            snap.check_conn_id(c.id)
        return snap.HubState(
            now=self._now,
            counter=self._scheduler.order,
            number=self._number,
            evicted=self._evicted,
            evictions=self._evictions,
            next_expiry=self._next_expiry,
            conns=[
                snap.ConnState(
                    id=c.id,
                    roles=sorted(r.value for r in c.roles),
                    role=c.role.value if c.role else None,
                    errors=list(c.errors),
                    closing=c.closing,
                    tokens=c.tokens,
                    refilled=c.refilled,
                )
                for c in self._conns.values()
            ],
            runners=[
                snap.RunnerRecord(
                    id=r.id,
                    conn=r.conn.id,
                    init=encode(r.init),
                    session=r.session,
                    state=r.state.value if r.state else None,
                )
                for r in self._runners.values()
            ],
            waiting=self._scheduler.waiting(),
            builds=[
                snap.BuildEntry(
                    record=b.record,
                    runner=b.runner.id if b.runner else None,
                    queue_order=b.queue_order,
                    secrets=b.secrets,
                    log_seq=b.log_seq,
                    log_bytes=b.log_bytes,
                    run_seq=b.run_seq,
                )
                for b in self._builds.values()
            ],
            deadlines=dict(self._deadlines),
        )

    def _load_state(self, state: snap.HubState) -> None:
        """Rebuild from ``state``, checking every link; raises SnapshotError."""

        def bad(why: str) -> SnapshotError:
            return SnapshotError(f"hub snapshot content does not check out: {why}")

        self._now = state.now
        self._scheduler.order = state.counter
        self._number = state.number
        self._evicted = state.evicted
        self._evictions = state.evictions
        self._next_expiry = state.next_expiry
        for cs in state.conns:
            conn_id = snap.conn_id_of(cs.id)
            if conn_id in self._conns:
                raise bad(f"connection {cs.id!r} twice")
            try:
                roles = frozenset(Role(r) for r in cs.roles)
                role = Role(cs.role) if cs.role is not None else None
            except ValueError as exc:
                raise bad(str(exc)) from None
            self._conns[conn_id] = conn = _Conn(
                id=conn_id,
                roles=roles,
                errors=deque(cs.errors),
                closing=cs.closing,
                local=False,  # whoever restores it serves none of them yet
                tokens=cs.tokens,
                refilled=cs.refilled,
            )
            if role is not None:
                conn.take_role(role)
        for rs in state.runners:
            holder_conn = self._conns.get(snap.conn_id_of(rs.conn))
            if holder_conn is None or holder_conn.runner is not None or rs.id in self._runners:
                raise bad(f"runner {rs.id!r} and its connection")
            try:
                init = decode_client(rs.init)
                runner_state = RunnerState(rs.state) if rs.state is not None else None
            except (ProtocolError, ValueError) as exc:
                raise bad(f"runner {rs.id!r}: {exc}") from None
            if not isinstance(init, RunnerInit):
                raise bad(f"runner {rs.id!r}: its init is not RUNNER:init")
            runner = _Runner(
                id=rs.id, conn=holder_conn, init=init, session=rs.session, state=runner_state
            )
            holder_conn.runner = runner
            self._runners[rs.id] = runner
        for bs in state.builds:
            record = bs.record
            if record.id in self._builds:
                raise bad(f"build {record.id!r} twice")
            build = _Build(
                record=record,
                queue_order=bs.queue_order,
                secrets=bs.secrets,
                log_seq=bs.log_seq,
                log_bytes=bs.log_bytes,
                run_seq=bs.run_seq,
            )
            if bs.runner is not None:
                holder = self._runners.get(bs.runner)
                if holder is None or holder.build is not None or record.state.finished:
                    raise bad(f"build {record.id!r} and its runner {bs.runner!r}")
                link(build, holder)
            self._builds[record.id] = build
        self._builds = dict(sorted(self._builds.items(), key=lambda kv: kv[1].record.number))
        queued = [b for b in self._builds.values() if b.state is BuildState.QUEUED]
        for build in sorted(queued, key=lambda b: b.queue_order):
            self._scheduler.enqueue(build, order=build.queue_order)
        for build in self._builds.values():
            if build.state.finished:
                build.windowed = True
                heapq.heappush(self._window, (build.record.number, build.id))
        for runner_id in state.waiting:
            waiter = self._runners.get(runner_id)
            if waiter is None or waiter.state is not RunnerState.WAITING:
                raise bad(f"waiting runner {runner_id!r}")
            self._scheduler.wait(waiter)
        for runner in self._runners.values():
            waiting = runner.state is RunnerState.WAITING
            if waiting != self._scheduler.is_waiting(runner) or waiting == (
                runner.build is not None
            ):
                raise bad(f"runner {runner.id!r} is {runner.state} with build {runner.build}")
        for build_id in state.deadlines:
            if build_id not in self._builds:
                raise bad(f"a deadline for build {build_id!r}, which is not there")
        self._deadlines = dict(state.deadlines)

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
        """Builds in memory by state: every build not finished, and the
        finished ones of the window (see :attr:`HubStats.finished` for all
        the builds that ended)."""
        counts = {s.value: 0 for s in BuildState}
        for b in self._builds.values():
            counts[b.state.value] += 1
        return counts

    def queue_depth(self) -> int:
        """Builds waiting for a runner."""
        return self._scheduler.depth()

    def build(self, build_id: str) -> BuildInfo | None:
        """A build as the wire shows it, or None."""
        b = self._builds.get(build_id)
        return b.info() if b else None

    # -- output helpers ---------------------------------------------------------------

    def _flush(self) -> Effects:
        if self._finishing:
            self._settle()
        fx, self._fx = self._fx, Effects()
        for find in fx.finds:
            query = self._queries.get(find.request)
            if query is not None:
                query.evictions = self._evictions  # the store reads after these
        return fx

    def _settle(self) -> None:
        """The builds that finished in this call join the window; the
        oldest (by number) beyond ``window`` leave memory. Each leaves with
        a final record if its log counters moved since the last one, so
        that the store's copy is whole."""
        finishing, self._finishing = self._finishing, []
        for build in finishing:
            if build.windowed or not build.state.finished:
                continue  # requeued meanwhile, or counted already
            if self._builds.get(build.id) is not build:
                continue
            build.windowed = True
            heapq.heappush(self._window, (build.record.number, build.id))
        while len(self._window) > self.config.window:
            number, build_id = heapq.heappop(self._window)
            build = self._builds.pop(build_id)
            r = build.record
            if (r.log_seq, r.log_bytes, r.run_seq) != (
                build.log_seq,
                build.log_bytes,
                build.run_seq,
            ):
                self._save(build)
            self._evicted = max(self._evicted, number)
            self._evictions += 1

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

    def _error(
        self,
        c: _Conn,
        code: ErrorCode,
        message: str,
        req: str | None = None,
        *,
        count: bool = True,
    ) -> None:
        if c.local:
            self.stats.errors[code.value] = self.stats.errors.get(code.value, 0) + 1
        self._send(c.id, Error(code=code.value, message=message, req=req))
        if code is ErrorCode.RATE_LIMITED or not count:
            return  # a limit, not a fault: the connection stays open
        if c.fault(self._now, self.config.error_window, self.config.max_errors):
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
            revision=build.record.revision + 1,
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

    def _transition(
        self, build: _Build, event: BuildEvent, *, notify: bool = True, **changes: Any
    ) -> None:
        state = next_build_state(build.state, event)
        if state.finished:
            self._finishing.append(build)
            self.stats.finished[state.value] = self.stats.finished.get(state.value, 0) + 1
            changes.setdefault("finished", self._now)
            changes.setdefault("success", state is BuildState.SUCCESS)
            self._deadlines.pop(build.id, None)
            if state is not BuildState.LOST:  # a lost build may be requeued: see _lose
                build.secrets = None  # of no more use: not kept a moment longer
        self._save(build, state=state, **changes)
        if notify:
            self._notify_build(build)

    def _append_log(
        self,
        build: _Build,
        text: str,
        run_seq: int | None,
        *,
        live: bool = True,
        size: int | None = None,
    ) -> None:
        """Store one chunk (``size``: its UTF-8 size, if known) and send it
        to the build's followers. The hot path: one per chunk."""
        seq = build.log_seq = build.log_seq + 1
        if size is None:
            size = utf8_size(text)
        build.log_bytes += size
        self.stats.log_bytes += size
        record = build.record
        build_id = record.id
        now = self._now
        self._fx.records.append(log_record(build_id, seq, text, record.attempt, run_seq, size, now))
        subs = build.subs
        if not subs or not live:
            return
        frame = encode_log_chunk(build_id, seq, text, log_time(now))
        sends = self._fx.sends
        counts = self.stats.frames_out
        for sub in subs.values():
            if sub.pending is not None:
                sub.pending.append((seq, frame))
            elif seq > sub.after:
                sub.after = seq
                conn = sub.conn
                sends.append((conn.id, frame))
                key = conn.out_key
                counts[key] = counts.get(key, 0) + 1

    def _notice(self, build: _Build, text: str) -> None:
        self._append_log(build, f"\n[citron] {text}\n", None)

    def _dispatch_build(self, build: _Build) -> None:
        """A build was queued: give it to the runner that has waited longest."""
        runner = self._scheduler.runner_for(build)
        if runner is not None:
            self._start(build, runner)

    def _dispatch_runner(self, runner: _Runner) -> None:
        """A runner is waiting: give it the oldest build it can run."""
        build = self._scheduler.build_for(runner)
        if build is not None:
            self._start(build, runner)

    def _start(self, build: _Build, runner: _Runner) -> None:
        self._scheduler.dequeue(build)
        if build.record.secret_names and build.secrets is None:
            # Secrets live only in memory: a restart took them.
            self._notice(build, "its secrets were lost in a server restart; submit it again")
            self._transition(build, BuildEvent.LOSE)
            self._dispatch_runner(runner)
            return
        self._set_runner_state(runner, RunnerEvent.DISPATCH)
        link(build, runner)
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
        unlink(build)
        attempt = build.record.attempt
        was_cancelling = build.state is BuildState.CANCELLING
        requeue = not was_cancelling and attempt <= self.config.retry_lost
        # A requeue is one change for followers (queued, attempt + 1), never
        # a lost that looks final (docs/protocol.md §5.4); the store keeps both.
        self._transition(build, BuildEvent.LOSE, notify=not requeue)
        if was_cancelling:
            build.secrets = None
            return
        if requeue:
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
            self._scheduler.enqueue(build)
            self._dispatch_build(build)
        else:
            self._notice(build, f"attempt {attempt} lost its runner; no retry left")
            build.secrets = None

    # -- runners ----------------------------------------------------------------------

    def _set_runner_state(self, runner: _Runner, event: RunnerEvent) -> None:
        """The one place a runner's state changes: by the table, and in or
        out of the scheduler's waiting runners with it."""
        old = runner.state
        runner.state = next_runner_state(old, event)
        if old is RunnerState.WAITING:
            self._scheduler.unwait(runner)
        if runner.state is RunnerState.WAITING:
            self._scheduler.wait(runner)

    def _release(self, runner: _Runner, dispatch: bool = True) -> None:
        """The runner's build ended: it waits for the next one."""
        if runner.build is not None:
            unlink(runner.build)
        self._set_runner_state(runner, RunnerEvent.RELEASE)
        self._notify_runner(runner)
        if dispatch and not runner.conn.closing:
            self._dispatch_runner(runner)

    def _runner_leaves(self, runner: _Runner, unregistered: bool) -> None:
        build = runner.build
        self._notify_runner(runner, gone=True)
        self._set_runner_state(runner, RunnerEvent.LEAVE)
        self._runners.pop(runner.id, None)
        runner.conn.runner = None
        if build is None:
            return
        unlink(build)
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
                self._send(c.id, Ready(runner=r.id, protocol=_spoken(r.init), session=r.session))
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
            self._set_runner_state(runner, RunnerEvent.REGISTER)
            self._send(c.id, Ready(runner=runner.id, protocol=_spoken(msg), session=runner.session))
            self._notify_runner(runner)
            self._dispatch_runner(runner)
            return
        # Resume: the build continues on this connection.
        old = unlink(build)
        if old is not None:  # the old connection is stale: replace it
            self._close(old.conn, CloseCode.REPLACED, "replaced by a resume")
            self._runner_leaves(old, unregistered=False)
        self._deadlines.pop(build.id, None)
        self._set_runner_state(runner, RunnerEvent.REGISTER)
        self._set_runner_state(runner, RunnerEvent.DISPATCH)
        link(build, runner)
        self._save(build, runner=runner.id, session_hash=_hash_secret(runner.session))
        self._send(
            c.id,
            Ready(
                runner=runner.id,
                protocol=_spoken(msg),
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
        if build is None or build.state not in HELD_STATES:
            return None
        expected = build.record.session_hash
        if expected is None or not hmac.compare_digest(expected, _hash_secret(msg.resume.session)):
            return None
        return build

    def _on_log(self, c: _Conn, msg: RunnerLog) -> None:
        runner = c.runner
        build = runner.build if runner is not None else None
        if build is None or (msg.build is not None and msg.build != build.record.id):
            _, build = self._current_build(c, msg.build)  # (it refuses)
        last = build.run_seq
        if msg.seq is None:
            run_seq = last + 1
        elif msg.seq <= last:
            self._ack(c, build, last)  # stored before: it may forget it
            return  # already stored: a resend after a resume
        elif msg.seq > last + 1:
            raise _Refusal(
                ErrorCode.BAD_STATE,
                f"seq {msg.seq} leaves a gap: the last stored seq of this run is {last}",
            )
        else:
            run_seq = msg.seq
        build.run_seq = run_seq
        self._ack(c, build, run_seq)
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
            self._append_log(build, msg.log, run_seq, size=size)
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
        if 6 * len(text) + len(build_id) + 112 <= bound or len(text) < 2:
            return [text]  # the common case: no need to encode to know
        if utf8_size(encode_log_chunk(build_id, MAX_INT, text, _LONGEST_TIME)) <= bound:
            return [text]
        half = len(text) // 2
        return self._pieces(build_id, text[:half]) + self._pieces(build_id, text[half:])

    def _ack(self, c: _Conn, build: _Build, seq: int | None = None) -> None:
        """Protocol 2: tell the runner, once durable, that its chunks up to
        ``seq`` are stored, or (no ``seq``) its result is. The host sends the
        last of these per build and kind."""
        if c.runner is None or _spoken(c.runner.init) < 2:
            return
        ack = Ack(build=build.id, seq=seq, finished=seq is None)
        self._fx.acks.append(
            (c.id, (build.id, "log" if seq is not None else "finished"), encode(ack))
        )

    def _on_finished(self, c: _Conn, msg: RunnerFinished) -> None:
        runner, build = self._current_build(c, msg.build)
        steps = msg.steps
        if steps is not None and len(steps) != len(build.record.script):
            raise _Refusal(
                ErrorCode.BAD_STATE,
                f"the result has {len(steps)} steps for a script of"
                f" {len(build.record.script)} lines: one step per line",
            )
        self._ack(c, build)  # the result
        self._transition(
            build,
            BuildEvent.SUCCEED if msg.success else BuildEvent.FAIL,
            commit=msg.commit,
            exit_code=msg.exit_code,
            steps=steps,
        )
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
        """The build ``build_id``: in memory, or (once builds have left
        memory) as the store has it; a stored build is finished for good."""
        build = self._builds.get(build_id)
        if build is not None:
            return build
        if self._evicted:
            query = self._query
            if query is None or build_id not in query.found:
                raise _Ask(build=build_id)
            record = query.found[build_id]
            if record is not None and record.id == build_id:
                return _Build.of(record)
        raise _Refusal(ErrorCode.UNKNOWN_BUILD, f"no build {build_id!r}")

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
            revision=1,
        )
        build = _Build.of(record, msg.secrets)
        self._builds[record.id] = build
        self._fx.records.append(record)
        self._send(c.id, Queued(build=record.id, req=msg.req))
        self._notify_build(build)
        self._scheduler.enqueue(build)
        self._dispatch_build(build)

    def _on_cancel(self, c: _Conn, msg: CancelBuild) -> None:
        build = self._find(msg.build)
        effect = self._on_cancel_rows.get((build.state, build.runner is not None))
        if effect is None:
            raise _Refusal(
                ErrorCode.BAD_STATE, f"build {build.id} is {build.state}: it cannot be cancelled"
            )
        effect(build)
        self._send(c.id, BuildReply(build=build.info(), req=msg.req))

    # What a cancel and a deadline do, as rows: (state, runner connected) ->
    # effect. A pair with no row: refused (cancel) or nothing to do (a
    # deadline). The transitions themselves are BUILD_TRANSITIONS'.

    def _make_rows(self) -> None:
        S = BuildState
        self._on_cancel_rows: dict[tuple[BuildState, bool], Callable[[_Build], None]] = {
            (S.QUEUED, False): self._cancel_queued,
            (S.RUNNING, True): self._cancel_running,
            (S.RUNNING, False): self._cancel_away,
            (S.CANCELLING, True): _already,  # on its way: the reply says so
            (S.CANCELLING, False): _already,
        }
        self._on_deadline: dict[tuple[BuildState, bool], Callable[[_Build], None]] = {
            (S.CANCELLING, True): self._cancel_timed_out,
            (S.RUNNING, False): self._lose,  # the lost-grace period is over
            (S.CANCELLING, False): self._lose,
        }

    def _cancel_queued(self, build: _Build) -> None:
        self._scheduler.dequeue(build)
        self._transition(build, BuildEvent.CANCEL)

    def _cancel_running(self, build: _Build) -> None:
        self._transition(build, BuildEvent.CANCEL)
        assert build.runner is not None
        self._send(build.runner.conn.id, Cancel(build=build.id))
        self._deadlines[build.id] = self._now + self.config.cancel_timeout

    def _cancel_away(self, build: _Build) -> None:
        """Its runner is away: there is nothing to stop."""
        self._transition(build, BuildEvent.CANCEL)
        self._lose(build)

    def _cancel_timed_out(self, build: _Build) -> None:
        runner = build.runner
        assert runner is not None
        self._transition(build, BuildEvent.CANCEL_TIMEOUT)
        self._close(runner.conn, CloseCode.CANCEL_TIMEOUT, "cancel timeout")
        self._release(runner)

    def _on_shutdown_runner(self, c: _Conn, msg: ShutdownRunner) -> None:
        """Send the runner ``shutdown:``. An idle runner leaves at once (no
        build can reach it after this); a busy one ends its build, reports
        it with ``leave``, and leaves then (docs/protocol.md §5.1)."""
        runner = self._runners.get(msg.runner)
        if runner is None or runner.state is None:
            raise _Refusal(ErrorCode.UNKNOWN_RUNNER, f"no runner {msg.runner!r}")
        info = runner.info()
        self._send(runner.conn.id, Shutdown())
        if runner.state is RunnerState.WAITING:
            self._runner_leaves(runner, unregistered=True)
        self._send(c.id, Runners(runners=(info,), req=msg.req))

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
        bound = None if msg.before is None else self._find(msg.before).record.number
        builds: list[_Build] = []
        for build in reversed(self._builds.values()):  # newest first: by number
            if bound is not None and build.record.number >= bound:
                continue
            if msg.state is None or build.state is msg.state:
                builds.append(build)
                if len(builds) == msg.limit:
                    break
        # Memory holds every build not finished, and every build numbered
        # above self._evicted: anything else may be in the store only.
        complete = (
            not self._evicted
            or msg.state in LIVE_STATES
            or (len(builds) == msg.limit and builds[-1].record.number > self._evicted)
        )
        if not complete:
            query = self._query
            if (
                query is None
                or query.listing is None
                or (query.evictions != self._evictions and query.rounds < 4)
            ):
                # (Builds that left memory since the store was read may be
                # in neither: read it again.)
                raise _Ask(before=bound, state=msg.state, limit=msg.limit)
            stored = [
                _Build.of(r)
                for r in query.listing
                if r.id not in self._builds and (bound is None or r.number < bound)
            ]
            builds = sorted(builds + stored, key=lambda b: b.record.number, reverse=True)
            del builds[msg.limit :]
        out: list[BuildInfo] = []
        size = 0
        more = False
        for build in builds:
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
        else:
            self._find(msg.build)  # not followed: it must at least exist
        self._send(c.id, Unsubscribed(build=msg.build, from_=last, req=msg.req))
