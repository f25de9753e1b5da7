"""Coordination servers that break one rule of docs/protocol.md each, for
``citron conformance`` to catch: the citron hub with one rule changed in a
test-only subclass, served by the real websockets transport in-process.

Each entry of :data:`BROKEN` is ``name -> (make, check, why)``: ``make()``
(or ``make(config)``) returns the broken hub; ``check`` is the conformance check named for the
broken rule, which must fail; ``why`` is what its failure must say.

A rule is broken in one of three ways: a handler overridden, the frames the
hub sends changed on their way out (``outgoing``), or the frames it gets
changed on their way in (``incoming``), as a server that read the spec
wrongly would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs

from citron_protocol import BuildState, Hub
from citron_protocol._scheduler import Scheduler
from citron_protocol.errors import ErrorCode
from citron_protocol.hub import CloseCode, Effects, HubConfig, _Refusal
from citron_protocol.messages import Ack, BuildReply, Runners, RunnerState
from citron_server.host import RandomIds

FAST = HubConfig(lost_grace=1.0, cancel_timeout=1.0)


class Filtered(Hub):
    """A hub whose frames in and out pass a filter: a subclass breaks one
    rule by overriding ``incoming`` or ``outgoing``."""

    def incoming(self, text: str) -> str:
        return text

    def outgoing(self, conn: Any, text: str) -> str | None:
        """The frame sent instead (None: not sent)."""
        return text

    def closing(self, code: int) -> bool:
        """Whether a close with ``code`` is done."""
        return True

    def _out(self, fx: Effects) -> Effects:
        sends = []
        for conn, text in fx.sends:
            changed = self.outgoing(conn, text)
            if changed is not None:
                sends.append((conn, changed))
        fx.sends = sends
        fx.acks = [
            (conn, slot, text)
            for conn, slot, text in fx.acks
            if self.outgoing(conn, text) is not None
        ]
        fx.closes = [c for c in fx.closes if self.closing(c.code)]
        return fx

    def receive(self, conn: Any, text: str, now: float) -> Effects:
        return self._out(super().receive(conn, self.incoming(text), now))

    def disconnect(self, conn: Any, now: float) -> Effects:
        return self._out(super().disconnect(conn, now))

    def advance(self, now: float) -> Effects:
        return self._out(super().advance(now))


def _payload(text: str) -> tuple[str, dict[str, Any]]:
    command, _, payload = text.partition(":")
    return command, json.loads(payload) if payload else {}


def _client(text: str) -> tuple[str, dict[str, Any]] | None:
    head, sep, payload = text.partition(":{")
    if not sep:
        return None
    try:
        return head, json.loads("{" + payload)
    except ValueError:
        return None


def outgoing(rewrite: Callable[[str], str | None]) -> Callable[[], Hub]:
    class Out(Filtered):
        def outgoing(self, conn: Any, text: str) -> str | None:
            return rewrite(text)

    return lambda config=FAST: Out(RandomIds(), config)


def incoming(rewrite: Callable[[str], str]) -> Callable[[], Hub]:
    class In(Filtered):
        def incoming(self, text: str) -> str:
            return rewrite(text)

    return lambda config=FAST: In(RandomIds(), config)


def change_client(head: str, change: Callable[[dict[str, Any]], None]) -> Callable[[str], str]:
    """An incoming rewrite of frames that start with ``head``."""

    def rewrite(text: str) -> str:
        if not text.startswith(head):
            return text
        parsed = _client(text)
        if parsed is None:
            return text
        prefix, body = parsed
        change(body)
        return f"{prefix}:{json.dumps(body)}"

    return rewrite


def change_server(command: str, change: Callable[[dict[str, Any]], Any]) -> Callable[[str], str]:
    """An outgoing rewrite of ``command:`` frames (``change`` returns False to drop)."""

    def rewrite(text: str) -> str | None:
        if not text.startswith(command + ":"):
            return text
        _, body = _payload(text)
        if change(body) is False:
            return None
        return f"{command}:{json.dumps(body)}"

    return rewrite


def drop(command: str) -> Callable[[str], str | None]:
    return lambda text: None if text.startswith(command + ":") else text


def subclass(**methods: Any) -> Callable[[], Hub]:
    cls = type("Broken", (Hub,), methods)
    return lambda config=FAST: cls(RandomIds(), config)


# -- broken handlers ----------------------------------------------------------------


def _resumable_any_secret(self: Any, msg: Any) -> Any:
    if msg.resume is None:
        return None
    build = self._builds.get(msg.resume.build)
    if build is None or build.state not in (BuildState.RUNNING, BuildState.CANCELLING):
        return None
    return build


class _ConstantSecret(RandomIds):
    def new_secret(self) -> str:
        return "the-same-session-secret-for-all"


class _ShortSecret(RandomIds):
    def new_secret(self) -> str:
        return "s" + super().new_secret()[:3]


def _with_ids(ids: RandomIds) -> Callable[[], Hub]:
    return lambda config=FAST: Hub(ids, config)


def _ack_always(self: Any, c: Any, build: Any, seq: int | None = None) -> None:
    if c.runner is None:
        return
    ack = Ack(build=build.id, seq=seq, finished=seq is None)
    from citron_protocol.codec import encode

    self._fx.acks.append((c.id, (build.id, "log" if seq is not None else "finished"), encode(ack)))


def _ack_chunks_only(self: Any, c: Any, build: Any, seq: int | None = None) -> None:
    if seq is not None:
        Hub._ack(self, c, build, seq)


def _cancel_final_ok(self: Any, c: Any, msg: Any) -> None:
    build = self._find(msg.build)
    if build.state.finished:
        self._send(c.id, BuildReply(build=build.info(), req=msg.req))
        return
    Hub._on_cancel(self, c, msg)


def _shutdown_unknown_quiet(self: Any, c: Any, msg: Any) -> None:
    if msg.runner not in self._runners:
        self._send(c.id, Runners(runners=(), req=msg.req))
        return
    Hub._on_shutdown_runner(self, c, msg)


def _shutdown_idle_stays(self: Any, c: Any, msg: Any) -> None:
    runner = self._runners.get(msg.runner)
    if runner is None or runner.state is None:
        raise _Refusal(ErrorCode.UNKNOWN_RUNNER, f"no runner {msg.runner!r}")
    from citron_protocol.messages import Shutdown

    self._send(runner.conn.id, Shutdown())
    self._send(c.id, Runners(runners=(runner.info(),), req=msg.req))


def _leave_ignored(self: Any, c: Any, msg: Any) -> None:
    Hub._on_finished(self, c, attrs.evolve(msg, leave=False))


def _busy_leaves_at_once(self: Any, c: Any, msg: Any) -> None:
    runner = self._runners.get(msg.runner)
    Hub._on_shutdown_runner(self, c, msg)
    if runner is not None and runner.state is RunnerState.RUNNING:
        self._runner_leaves(runner, unregistered=True)


def _seq_gap_accepted(self: Any, c: Any, msg: Any) -> None:
    build = c.runner.build if c.runner is not None else None
    if build is not None and msg.seq is not None and msg.seq > build.run_seq + 1:
        msg = attrs.evolve(msg, seq=build.run_seq + 1)
    Hub._on_log(self, c, msg)


def _seq_duplicate_stored(self: Any, c: Any, msg: Any) -> None:
    build = c.runner.build if c.runner is not None else None
    if build is not None and msg.seq is not None and msg.seq <= build.run_seq:
        msg = attrs.evolve(msg, seq=build.run_seq + 1)
    Hub._on_log(self, c, msg)


def _seq_duplicate_refused(self: Any, c: Any, msg: Any) -> None:
    build = c.runner.build if c.runner is not None else None
    if build is not None and msg.seq is not None and msg.seq <= build.run_seq:
        raise _Refusal(ErrorCode.BAD_STATE, f"seq {msg.seq} was stored already")
    Hub._on_log(self, c, msg)


def _unregister_as_loss(self: Any, c: Any, msg: Any) -> None:
    if c.runner is None:
        raise _Refusal(ErrorCode.NOT_REGISTERED, "send RUNNER:init first")
    self._runner_leaves(c.runner, unregistered=False)


def _always_notify(
    self: Any, build: Any, event: Any, *, notify: bool = True, **changes: Any
) -> None:
    Hub._transition(self, build, event, notify=True, **changes)


def _requeue_same_attempt(self: Any, build: Any) -> None:
    attempt = build.record.attempt
    Hub._lose(self, build)
    if build.state is BuildState.QUEUED:
        self._save(build, attempt=attempt)


class _NewestRunner(Scheduler):
    def runner_for(self, build: Any) -> Any:
        t = build.record.type
        pool = self._waiting_any if t is None else self._waiting_typed.get(t)
        return list(pool.values())[-1] if pool else None


class _NewestBuild(Scheduler):
    def build_for(self, runner: Any) -> Any:
        candidates = list(self._queue_any.values())
        candidates += list(self._queue_typed.get(runner.init.type, {}).values())
        return max(candidates, key=lambda b: b.queue_order) if candidates else None


def _with_scheduler(kind: type[Scheduler]) -> Callable[[], Hub]:
    def make(config: HubConfig = FAST) -> Hub:
        hub = Hub(RandomIds(), config)
        hub._scheduler = kind()
        return hub

    return make


class _No4002(Filtered):
    def closing(self, code: int) -> bool:
        return code != CloseCode.REPLACED


class _NoCancelOnResume(Filtered):
    def receive(self, conn: Any, text: str, now: float) -> Effects:
        fx = super().receive(conn, text, now)
        if '"resume"' in text and text.startswith("RUNNER:init:"):
            fx.sends = [(c, t) for c, t in fx.sends if not t.startswith("cancel:")]
        return fx


def _cancel_queued_stays(self: Any, build: Any) -> None:
    """The reply says cancelled; the build stays queued."""


def _reverse_builds(body: dict[str, Any]) -> None:
    body["builds"].reverse()


def _time_with_offset(body: dict[str, Any]) -> None:
    if "time" in body:
        body["time"] = body["time"].replace("Z", "+00:00")


def _no_req_on_errors(body: dict[str, Any]) -> None:
    body.pop("req", None)


def _resume_seq_zero(body: dict[str, Any]) -> None:
    if body.get("resume"):
        body["resume"]["seq"] = 0


def _ready_protocol_1(body: dict[str, Any]) -> None:
    body["protocol"] = 1


def _log_text_changed(body: dict[str, Any]) -> None:
    body["log"] = body["log"].upper()


def _log_seq_from_two(body: dict[str, Any]) -> None:
    body["seq"] += 1


def _queued_hidden_from_feed(body: dict[str, Any]) -> Any:
    return body.get("state") != "queued"


def _cancel_running_reply_running(body: dict[str, Any]) -> None:
    if body.get("state") == "cancelling":
        body["state"] = "running"


def _same_type(body: dict[str, Any]) -> None:
    body.pop("type", None)


def _from_zero(body: dict[str, Any]) -> None:
    if "from" in body:
        body["from"] = 0


def _no_before(body: dict[str, Any]) -> None:
    body.pop("before", None)


def _web_may_run(text: str) -> str:
    if text.startswith("WEB:run:"):
        return "API:run:" + text[len("WEB:run:") :]
    return text


def _registered_twice(self: Any, c: Any, msg: Any) -> None:
    if c.runner is not None and msg == c.runner.init:
        raise _Refusal(ErrorCode.BAD_STATE, "already registered")
    Hub._on_init(self, c, msg)


def _no_build_as_bad_state(self: Any, c: Any, build_id: Any) -> Any:
    try:
        return Hub._current_build(self, c, build_id)
    except _Refusal as refusal:
        if refusal.code is ErrorCode.NO_BUILD:
            raise _Refusal(ErrorCode.BAD_STATE, refusal.message) from None
        raise


def _type_limit_in_characters(text: str) -> str:
    # A server counting characters, not UTF-8 bytes: 257 bytes of "é" pass.
    if text.startswith("RUNNER:init:"):
        parsed = _client(text)
        if parsed is not None and isinstance(parsed[1].get("type"), str):
            t = parsed[1]["type"]
            if len(t) <= 256 < len(t.encode("utf-8", "surrogatepass")):
                parsed[1]["type"] = t[:128]
                return f"{parsed[0]}:{json.dumps(parsed[1])}"
    return text


def _no_gone_runner_frame(body: dict[str, Any]) -> Any:
    return not body.get("gone")


def _cancelling_lost_as_lost(self: Any, build: Any) -> None:
    if build.state is BuildState.CANCELLING:
        from citron_protocol.states import BuildEvent

        # As if the cancel had never been asked: lost, like a running build.
        self._save(build, state=BuildState.RUNNING)
        Hub._transition(self, build, BuildEvent.LOSE)
        build.secrets = None
        return
    Hub._lose(self, build)


def _notify_each_way(self: Any, build: Any) -> None:
    """state: to the build's followers and to the feed, without seeing that
    a connection is both."""
    from citron_protocol.codec import encode
    from citron_protocol.messages import StateChange

    if not build.subs and not self._feed:
        return
    frame = encode(StateChange(build=build.info()))
    for sub in build.subs.values():
        self._send_raw(sub.conn.id, "state", frame)
    for conn in self._feed:
        self._send_raw(conn, "state", frame)


def _integers_leniently(text: str) -> str:
    # A server whose JSON reader makes 2.0 and 5e1 integers.
    return text.replace('"protocol": 2.0', '"protocol": 2').replace(
        '"protocol": 5e1', '"protocol": 50'
    )


def _surrogates_replaced(text: str) -> str:
    return text.replace("\\ud800", "?")


def _name_limit_in_characters(text: str) -> str:
    if text.startswith("RUNNER:init:"):
        parsed = _client(text)
        if parsed is not None and isinstance(parsed[1].get("name"), str):
            name = parsed[1]["name"]
            if len(name) <= 256 < len(name.encode("utf-8", "surrogatepass")):
                parsed[1]["name"] = name[:128]
                return f"{parsed[0]}:{json.dumps(parsed[1])}"
    return text


def _secrets_in_utf16_units(text: str) -> str:
    # A server that counts a secret's length in UTF-16 units: two emoji pass.
    if text.startswith("API:run:"):
        parsed = _client(text)
        if parsed is not None and isinstance(parsed[1].get("secrets"), dict):
            secrets = parsed[1]["secrets"]
            for name, value in secrets.items():
                if isinstance(value, str) and len(value) < 4 <= len(value.encode("utf-16-le")) // 2:
                    secrets[name] = value + "...."
            return f"{parsed[0]}:{json.dumps(parsed[1])}"
    return text


#: name -> (make the broken hub, the check that must catch it, what it says)
BROKEN: dict[str, tuple[Callable[..., Hub], str, str]] = {
    # registration and sessions (§2, §5.6)
    "resume_any_secret": (
        subclass(_resumable=_resumable_any_secret),
        "resume_refused",
        "was accepted",
    ),
    "same_session_every_ready": (
        _with_ids(_ConstantSecret()),
        "session_secret",
        "the same session",
    ),
    "short_session": (_with_ids(_ShortSecret()), "session_secret", "a random secret"),
    "repeated_init_refused": (
        subclass(_on_init=_registered_twice),
        "session_secret",
        "expected ready:",
    ),
    "resume_point_zero": (
        outgoing(change_server("ready", _resume_seq_zero)),
        "resume",
        "resume seq 0, expected 3",
    ),
    # acknowledgements (§2.2)
    "no_acks": (subclass(_ack=lambda self, c, build, seq=None: None), "acks", "ack"),
    "no_result_ack": (subclass(_ack=_ack_chunks_only), "acks", "finished"),
    "ready_always_protocol_1": (
        outgoing(change_server("ready", _ready_protocol_1)),
        "acks",
        "asked for protocol 2 got 1",
    ),
    "acks_to_protocol_1": (
        subclass(_ack=_ack_always),
        "no_acks_protocol_1",
        "unexpected ack",
    ),
    # cancel, shutdown, loss (§5.1, §5.4)
    "cancel_final_succeeds": (
        subclass(_on_cancel=_cancel_final_ok),
        "cancel_final",
        "expected bad_state",
    ),
    "cancel_queued_stays_queued": (
        subclass(_cancel_queued=_cancel_queued_stays),
        "cancel_queued",
        "got",
    ),
    "cancel_frame_never_sent": (outgoing(drop("cancel")), "cancel_running", "cancel:"),
    "cancel_answered_running": (
        outgoing(change_server("build", _cancel_running_reply_running)),
        "cancel_running",
        "cancel answered running",
    ),
    "no_unknown_runner": (
        subclass(_on_shutdown_runner=_shutdown_unknown_quiet),
        "shutdown_idle",
        "unknown runner",
    ),
    "shutdown_never_sent": (outgoing(drop("shutdown")), "shutdown_idle", "shutdown:"),
    "idle_runner_kept_after_shutdown": (
        subclass(_on_shutdown_runner=_shutdown_idle_stays),
        "shutdown_idle",
        "still listed",
    ),
    "leave_ignored": (
        subclass(_on_finished=_leave_ignored),
        "shutdown_busy",
        "run:",
    ),
    "busy_runner_dropped_at_shutdown": (
        subclass(_on_shutdown_runner=_busy_leaves_at_once),
        "shutdown_busy",
        "stay RUNNING",
    ),
    "unregister_as_lost_connection": (
        subclass(_on_unregister=_unregister_as_loss),
        "unregister",
        "without the lost-grace period",
    ),
    "requeue_announced_as_lost": (subclass(_transition=_always_notify), "requeue", "lost"),
    "requeue_same_attempt": (
        subclass(_lose=_requeue_same_attempt),
        "requeue",
        "attempt 2",
    ),
    "no_4002": (lambda config=FAST: _No4002(RandomIds(), config), "resume_elsewhere", "4002"),
    "no_cancel_on_resume": (
        lambda config=FAST: _NoCancelOnResume(RandomIds(), config),
        "resume_elsewhere",
        "cancel",
    ),
    # logs (§5.3, §5.5)
    "seq_gap_accepted": (subclass(_on_log=_seq_gap_accepted), "seq_rules", "bad_state"),
    "seq_duplicate_stored": (subclass(_on_log=_seq_duplicate_stored), "seq_rules", "stored"),
    "seq_duplicate_refused": (
        subclass(_on_log=_seq_duplicate_refused),
        "seq_rules",
        "ignored silently",
    ),
    "log_text_changed": (
        outgoing(change_server("log", _log_text_changed)),
        "log_order",
        "changed",
    ),
    "log_seq_from_two": (
        outgoing(change_server("log", _log_seq_from_two)),
        "log_order",
        "seqs",
    ),
    "replay_from_ignored": (
        incoming(change_client("WEB:subscribe:", _from_zero)),
        "replay",
        "replay from",
    ),
    "log_time_missing": (
        outgoing(change_server("log", lambda body: body.pop("time", None))),
        "log_time",
        "no time",
    ),
    "log_time_not_utc_z": (
        outgoing(change_server("log", _time_with_offset)),
        "log_time",
        "RFC 3339",
    ),
    # the feed (§5.5)
    "feed_without_queued": (
        outgoing(change_server("state", _queued_hidden_from_feed)),
        "global_feed",
        "states",
    ),
    "no_gone_runner_frame": (
        outgoing(change_server("runner", _no_gone_runner_frame)),
        "runner_gone",
        "",
    ),
    # queue and dispatch (§5.2)
    "dispatch_to_newest_runner": (
        _with_scheduler(_NewestRunner),
        "dispatch_longest_waiting",
        "waited least",
    ),
    "queue_lifo": (_with_scheduler(_NewestBuild), "dispatch_fifo", "FIFO"),
    "type_ignored": (
        incoming(change_client("API:run:", _same_type)),
        "type_matching",
        "",
    ),
    # listings (§3)
    "get_builds_oldest_first": (
        outgoing(change_server("builds", _reverse_builds)),
        "builds_order",
        "newest first",
    ),
    "get_builds_before_ignored": (
        incoming(change_client("API:get_builds:", _no_before)),
        "builds_order",
        "the page before",
    ),
    # limits and errors (§1, §4)
    "no_build_definition_limit": (
        lambda config=FAST: Hub(RandomIds(), attrs.evolve(config, max_build_bytes=1024 * 1024)),
        "limits",
        "too_large",
    ),
    "type_limit_in_characters": (
        incoming(_type_limit_in_characters),
        "limits",
        "257 bytes",
    ),
    "req_not_echoed_on_errors": (
        outgoing(change_server("error", _no_req_on_errors)),
        "limits",
        "not echoed",
    ),
    "no_rate_limit": (
        lambda config=FAST: Hub(
            RandomIds(), attrs.evolve(config, request_burst=10**6, request_rate=10**6)
        ),
        "error_codes",
        "2,000",
    ),
    "no_build_answered_bad_state": (
        subclass(_current_build=_no_build_as_bad_state),
        "error_codes",
        "no_build",
    ),
    "web_may_submit": (incoming(_web_may_run), "permissions", "WEB:run"),
    "cancelling_lost_as_lost": (
        subclass(_lose=_cancelling_lost_as_lost),
        "cancelling_lost",
        "becomes cancelled",
    ),
    "state_twice_to_a_follower_on_the_feed": (
        subclass(_notify_build=_notify_each_way),
        "feed_once",
        "came 2 times",
    ),
    "integers_read_leniently": (incoming(_integers_leniently), "values", "2.0"),
    "lone_surrogates_replaced": (incoming(_surrogates_replaced), "values", "surrogate"),
    "name_limit_in_characters": (incoming(_name_limit_in_characters), "values", "257 bytes"),
    "secret_length_in_utf16_units": (
        incoming(_secrets_in_utf16_units),
        "values",
        "code points",
    ),
}
