"""``citron fuzz --model``: a server's answers against the spec's own
implementation.

An in-memory :class:`~citron_protocol.Hub`, configured like the server under
test, is the **reference model**. The fuzzer opens one connection per role
to the server and the same three to the model, and sends each frame to both,
one at a time: after each frame it reads from the server exactly the frames
the model sent on each connection (its replies, and what the frame pushed to
the others: a ``run:`` to the runner, a ``state:`` to the front) and compares
them, and a close with its code.

What may legitimately differ is said here, in code, not by accepting
anything:

- ids, session secrets and times are the server's choice: both sides'
  frames are compared with each id and secret replaced by its rank of first
  appearance (so ``b-7f3a`` and ``build-3`` are both ``#3`` if they came
  third), and every time by ``<time>``;
- an error's ``message`` is for people: only its ``code`` and ``req`` are
  compared;
- ``ack:`` frames come when the server's store makes the chunks durable,
  which no model can say: they are not compared (``citron conformance``'s
  ``acks`` check covers them).

The frames: drawn with a seed from :mod:`citron_protocol.strategies` (valid,
invalid, the legacy runner's), weighted edge cases of every rule the decoder
knows (integers written as ``2.0``, lone surrogates, limits just under and
over), and frames that reach the server's state: an ``init`` with a known
session, requests naming builds and runners that exist (each side gets its
own id for the same build). The server must be fresh (no other client): the
model starts empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import attrs

from citron_protocol import Hub, HubConfig, Role
from citron_protocol.hub import CountingIds, Effects
from citron_protocol.records import MemoryStore

from .wire import Closed, Wire, WireTimeout

__all__ = ["Difference", "ModelFuzzer", "ModelHost", "ModelReport", "Normal"]

#: Keys whose string value is a time (compared as ``<time>`` when it is one).
TIME_KEYS = frozenset({"created", "started", "finished", "time"})
#: A time as docs/protocol.md §1.1 writes it; any other text is compared as it is.
TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
#: The shortest session secret docs/protocol.md §2 allows.
MIN_SESSION = 16
#: Server commands whose objects' ``id`` names a runner (else a build).
RUNNER_OBJECTS = frozenset({"runners", "runner", "ready"})
#: The largest frame compared: a larger one is the transport's business
#: (its frame limit), which the model does not play.
MAX_SENT = 512 * 1024
#: API and WEB requests a connection sends before it is replaced by a fresh
#: one (within the request budget of docs/protocol.md §4, on both sides).
ROTATE_AFTER = 1_500


class ModelIds(CountingIds):
    """Counted ids, and secrets as long as a server's must be."""

    def new_secret(self) -> str:
        number = super().new_secret().rpartition("-")[2]
        return "secret-" + number.zfill(25)


class ModelHost:
    """A hub hosted in memory, as a server hosts it: a store that is
    durable at once, frames kept per connection, closes done."""

    def __init__(self, config: HubConfig | None = None) -> None:
        self.hub = Hub(ModelIds(), config)
        self.store = MemoryStore()
        self.inbox: dict[int, list[str]] = defaultdict(list)
        self.closed: dict[int, int] = {}

    def connect(self, conn: int, now: float) -> None:
        self.apply(self.hub.connect(conn, list(Role), now), now)

    def receive(self, conn: int, text: str, now: float) -> None:
        self.apply(self.hub.advance(now), now)
        self.apply(self.hub.receive(conn, text, now), now)

    def disconnect(self, conn: int, now: float) -> None:
        self.closed.setdefault(conn, 1006)
        self.apply(self.hub.disconnect(conn, now), now)

    def take(self, conn: int) -> list[str]:
        frames, self.inbox[conn] = self.inbox[conn], []
        return frames

    def apply(self, fx: Effects, now: float) -> None:
        self.store.apply(fx.records)
        for conn, text in fx.sends:
            if isinstance(conn, int) and conn not in self.closed:
                self.inbox[conn].append(text)
        for close in fx.closes:
            if isinstance(close.conn, int):
                self.closed.setdefault(close.conn, close.code)
        for close in fx.closes:
            self.apply(self.hub.disconnect(close.conn, now), now)
        for load in fx.loads:
            chunks = self.store.read_log(
                load.build, load.after, load.until, load.limit, load.max_bytes
            )
            self.apply(self.hub.log_loaded(load.request, chunks, now), now)
        for find in fx.finds:
            self.apply(self.hub.builds_found(find.request, self.store.find_builds(find), now), now)
        # (fx.acks: not compared, see the module's text.)


class Normal:
    """One side's frames with ids and secrets replaced by their rank of
    first appearance, times by ``<time>``, error messages left out."""

    def __init__(self) -> None:
        self.ranks: dict[str, str] = {}
        self.values: dict[str, str] = {}  # rank -> this side's value
        self.kinds: dict[str, str] = {}  # rank -> "build", "runner" or "session"

    def frame(self, text: str) -> str:
        command, _, payload = text.partition(":")
        try:
            value = json.loads(payload) if payload else None
        except ValueError:
            return text
        return command + ":" + json.dumps(self._walk(value, command, None), sort_keys=True)

    def _rank(self, value: str, kind: str) -> str:
        rank = self.ranks.get(value)
        if rank is None:
            rank = self.ranks[value] = f"#{len(self.ranks) + 1}"
            self.values[rank] = value
            self.kinds[rank] = kind
        return rank

    def _walk(self, value: Any, command: str, key: str | None) -> Any:
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if k == "message" and command == "error":
                    continue
                out[k] = self._walk(v, command, k)
            return out
        if isinstance(value, list):
            return [self._walk(v, command, key) for v in value]
        if not isinstance(value, str):
            return value
        if key in TIME_KEYS and TIME.fullmatch(value):
            return "<time>"
        if key == "session":
            # (A secret's value is the server's; that it is long enough is not.)
            short = "" if len(value) >= MIN_SESSION else " (too short)"
            return self._rank(value, "session") + short
        if key == "build" or (key == "id" and command not in RUNNER_OBJECTS):
            return self._rank(value, "build")
        if key == "runner" or (key == "id" and command in RUNNER_OBJECTS):
            return self._rank(value, "runner")
        return value


@attrs.frozen
class Difference:
    """A step where the server's frames were not the model's."""

    step: int
    role: str  # the connection the frames were read on
    sent: str  # the frame sent (as the server got it)
    expected: list[str]
    got: list[str]


@attrs.define
class ModelReport:
    seed: int
    steps: int = 0
    compared: int = 0  # frames compared
    differences: list[Difference] = attrs.Factory(list)
    kinds: dict[str, int] = attrs.Factory(dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "steps": self.steps,
            "compared": self.compared,
            "kinds": self.kinds,
            "differences": [attrs.asdict(d) for d in self.differences],
        }

    def print(self, out: Any) -> None:
        print(f"citron fuzz --model, seed {self.seed}", file=out)
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items()))
        print(
            f"frames sent: {self.steps} ({kinds}); server frames compared: {self.compared}",
            file=out,
        )
        print(f"differences from the model: {len(self.differences)}", file=out)
        for d in self.differences[:20]:
            print(f"  step {d.step}, sent {d.sent[:200]!r}", file=out)
            print(f"    on {d.role}: the model sent {_short(d.expected)}", file=out)
            print(f"    the server sent       {_short(d.got)}", file=out)


def _short(frames: list[str], limit: int = 600) -> str:
    text = repr(frames)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _same_cut(want: str, have: str) -> tuple[str, str]:
    """A listing cut short to stay within the reply size (``more: true``)
    holds as many objects as fit, which depends on the length of the ids,
    the server's choice: of two cut listings, the common part is compared
    (and ``more`` left out)."""
    command, _, payload = want.partition(":")
    key = {"builds": "builds", "runners": "runners"}.get(command)
    if key is None or not have.startswith(command + ":"):
        return want, have
    try:
        w, h = json.loads(payload), json.loads(have.partition(":")[2])
    except ValueError:
        return want, have
    if not (isinstance(w, dict) and isinstance(h, dict) and (w.get("more") or h.get("more"))):
        return want, have
    if not (isinstance(w.get(key), list) and isinstance(h.get(key), list)):
        return want, have
    n = min(len(w[key]), len(h[key]))
    for body in (w, h):
        body[key] = body[key][:n]
        body.pop("more", None)
    return (
        f"{command}:{json.dumps(w, sort_keys=True)}",
        f"{command}:{json.dumps(h, sort_keys=True)}",
    )


def _kind_of(frame: str) -> str:
    """A normalized frame's command and req."""
    command, _, payload = frame.partition(":")
    try:
        req = json.loads(payload).get("req") if payload else None
    except (ValueError, AttributeError):
        req = None
    return f"{command}: req {req!r}"


class _Side:
    """One connection of a role, on both sides."""

    def __init__(self, role: Role, name: str) -> None:
        self.role = role
        self.name = name
        self.wire: Wire | None = None
        self.conn = 0
        self.requests = 0
        self.init: tuple[str, str] | None = None  # the runner's init, as each side got it
        # What this runner was last given, on each side (server, model): to
        # aim a resume or a cancel at a build that runs.
        self.session: tuple[str, str] | None = None
        self.build: tuple[str, str] | None = None
        self.runner: tuple[str, str] | None = None


class ModelFuzzer:
    """Sends the same frames to a server and to the model; see the module."""

    def __init__(
        self,
        url: str,
        tokens: dict[Role, str | None] | None = None,
        *,
        frames: int = 10_000,
        seed: int = 0,
        timeout: float = 5.0,
        config: HubConfig | None = None,
        ca: str | None = None,
        stop_after: int = 20,
    ) -> None:
        self.url, self.tokens, self.ca = url, tokens or {}, ca
        self.frames, self.seed, self.timeout = frames, seed, timeout
        self.model = ModelHost(config)
        self.report = ModelReport(seed=seed)
        self.server_names = Normal()
        self.model_names = Normal()
        # Two runners (dispatch among waiting runners, a resume elsewhere),
        # one backend, one front.
        self.sides = {
            name: _Side(Role(name.rstrip("2")), name)
            for name in ("RUNNER", "RUNNER2", "API", "WEB")
        }
        self.stop_after = stop_after
        self._conns = 0
        self._probe: Wire | None = None
        self.stuck = False  # the server stopped reading: nothing more is sent

    # -- the frames ---------------------------------------------------------------------

    def frames_to_send(self) -> list[tuple[str, Role, str]]:
        """(kind, role, frame), drawn with the seed."""
        from citron_protocol import strategies as cst

        from .fuzz import draw

        rng = random.Random(self.seed)
        n = self.frames
        out: list[tuple[str, Role, str]] = []
        for i, role in enumerate(Role):
            share = n // 3
            out += [
                ("valid", role, f) for f in draw(cst.frames(role), share * 5 // 10, self.seed + i)
            ]
            out += [
                ("invalid", role, f)
                for f in draw(cst.invalid_frames(), share // 10, self.seed + 7 + i)
            ]
        out += [
            ("legacy", Role.RUNNER, f)
            for f, _ in draw(cst.legacy_log_frames(), n // 20, self.seed + 13)
        ]
        while len(out) < n - len(edge_frames()):
            out.append(("state", *rng.choice(STATE_FRAMES)))
        rng.shuffle(out)
        # The edges of the rules early, among the first frames (a short run
        # reaches them too).
        edges = [("edge", role, frame) for role, frame in edge_frames()]
        mixed = out[: 4 * len(edges)] + edges
        rng.shuffle(mixed)
        return (mixed + out[4 * len(edges) :])[: max(n, len(edges))]

    # -- running ------------------------------------------------------------------------

    async def run(self, frames: Sequence[tuple[str, Role, str]] | None = None) -> ModelReport:
        todo = list(frames) if frames is not None else self.frames_to_send()
        rng = random.Random(self.seed + 1)
        try:
            for step, (kind, role, frame) in enumerate(todo, 1):
                if isinstance(frame, bytes) or len(frame) > MAX_SENT:
                    # The transport's business (1009, malformed), not the hub's:
                    # counted, not sent.
                    key = f"{kind} not sent (binary or over {MAX_SENT // 1024} KiB)"
                    self.report.kinds[key] = self.report.kinds.get(key, 0) + 1
                    continue
                if frame == TAKE_OVER:
                    await self._take_over(step, rng)
                    continue
                # (An edge frame is sent as it is: its ids are part of the edge.)
                server_text, model_text = (
                    (frame, frame) if kind == "edge" else self._aim(frame, rng)
                )
                name = role.value
                if role is Role.RUNNER and rng.random() < 0.5:
                    name = "RUNNER2"
                if frame.startswith("RUNNER:process:") and rng.random() < 0.7:
                    busy = [s.name for s in self.sides.values() if s.build and s.wire]
                    name = rng.choice(busy) if busy else name  # (a runner given a build)
                side = self.sides[name]
                if (
                    side.role is Role.RUNNER
                    and side.init is None
                    and not frame.startswith("RUNNER:init:")
                    and rng.random() < 0.8
                ):
                    # Most of the time a runner registers first, so that its
                    # frames reach builds (sometimes not: not_registered).
                    await self.step(step, "register", name, REGISTER, REGISTER)
                await self.step(step, kind, name, server_text, model_text)
                if self.stuck or len(self.report.differences) >= self.stop_after:
                    break
            else:
                await self._drain(len(todo) + 1)
        finally:
            wires = [s.wire for s in self.sides.values()] + [self._probe]
            for wire in wires:
                if wire is not None:
                    # (A server that stopped reading never answers the close.)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wire.close(), self.timeout)
        return self.report

    async def step(
        self, step: int, kind: str, name: str, server_text: str, model_text: str
    ) -> None:
        """Send one frame to both sides and compare what comes back. A
        runner frame that gets no answer is followed by a fence: the
        runner's own ``init`` again, a no-op answered ``ready`` (§2), so
        that the server has taken the frame before the next one is sent
        on another connection."""
        answered = await self._step(step, kind, name, server_text, model_text)
        side = self.sides[name]
        if side.role is Role.RUNNER and not answered and side.wire is not None and side.init:
            await self._step(step, "fence", name, *side.init)

    async def _step(
        self, step: int, kind: str, name: str, server_text: str, model_text: str
    ) -> bool:
        if self.stuck:
            return False
        side = self.sides[name]
        role = side.role
        if side.wire is None or (role is not Role.RUNNER and side.requests >= ROTATE_AFTER):
            await self._open(side)
        assert side.wire is not None
        side.requests += 1
        self.report.steps += 1
        self.report.kinds[kind] = self.report.kinds.get(kind, 0) + 1
        now = time.time()
        if server_text == CLOSE:
            await side.wire.close()
            await self._until_gone(side)
            self.model.disconnect(side.conn, now)
            side.wire = None
        else:
            try:
                await asyncio.wait_for(side.wire.send(server_text), self.timeout)
            except TimeoutError:
                # A server that does not read: said, and the run ends here.
                self._differ(
                    step,
                    side,
                    server_text,
                    ["(the frame read)"],
                    [f"(unread after {self.timeout:g} s)"],
                )
                self.stuck = True
                return False
            self.model.receive(side.conn, model_text, now)
        answered = False
        for other in self.sides.values():
            if other.wire is None:
                continue
            expected = self.model.take(other.conn)
            self._learn(other, expected, 1)
            if other is side:
                answered = bool(expected)
                if role is Role.RUNNER and any(t.startswith("ready:") for t in expected):
                    side.init = (server_text, model_text)
            closing = self.model.closed.get(other.conn)
            got, closed = await self._read(other.wire, len(expected), closing is not None)
            self._learn(other, got, 0)
            self._compare(step, other, server_text, expected, got)
            if closing is not None:
                if closed is None or closed.code != closing:
                    self._differ(
                        step, other, server_text, [f"(close {closing})"], [f"(close {closed})"]
                    )
                other.wire = None
            elif closed is not None:
                self._differ(step, other, server_text, ["(open)"], [f"(close {closed.code})"])
                self.model.disconnect(other.conn, now)
                other.wire = None
        return answered

    async def _until_gone(self, side: _Side) -> None:
        """Wait until the server has taken a runner's close: its runner is no
        longer listed (asked on a connection of the fuzzer's own, which the
        model does not see), or ``CLOSE_SETTLE`` when it never registered."""
        runner = side.runner[0] if side.runner and side.init else None
        if runner is None:
            await asyncio.sleep(CLOSE_SETTLE)
            return
        if self._probe is None:
            self._probe = await Wire.open(self.url, self.tokens.get(Role.API), ca=self.ca)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            await self._probe.send("API:get_runners:")
            try:
                text = await self._probe.recv_text(self.timeout)
            except WireTimeout:
                return
            if isinstance(text, Closed) or f'"{runner}"' not in text:
                return
            await asyncio.sleep(0.01)

    async def _open(self, side: _Side) -> None:
        if side.wire is not None:
            await side.wire.close()
            self.model.disconnect(side.conn, time.time())
            self.model.take(side.conn)
        side.wire = await Wire.open(self.url, self.tokens.get(side.role), ca=self.ca)
        self._conns += 1
        side.conn = self._conns
        side.requests = 0
        side.init = None
        self.model.connect(side.conn, time.time())

    async def _read(
        self, wire: Wire, count: int, until_close: bool
    ) -> tuple[list[str], Closed | None]:
        """``count`` frames from the server (acks passed over), and its close
        if one comes (waited for when ``until_close``)."""
        got: list[str] = []
        while len(got) < count or until_close:
            try:
                text = await wire.recv_text(self.timeout)
            except WireTimeout:
                return got, None
            if isinstance(text, Closed):
                return got, text
            if text.startswith("ack:"):
                continue
            got.append(text)
        return got, None

    async def _drain(self, step: int) -> None:
        """What the server still sends that the model did not."""
        for side in self.sides.values():
            if side.wire is None:
                continue
            while True:
                try:
                    text = await side.wire.recv_text(0.3)
                except WireTimeout:
                    break
                if isinstance(text, Closed):
                    break
                if not text.startswith("ack:"):
                    self._differ(step, side, "(end of the run)", [], [text])

    async def _take_over(self, step: int, rng: random.Random) -> None:
        """A runner's build taken over by the other runner connection,
        sometimes cancelled first: the resume rules of §5.4 (4002 to the old
        connection when it is still open, cancel: again when cancelling,
        the resume point)."""
        ready = [
            s
            for s in self.sides.values()
            if s.role is Role.RUNNER and s.wire is not None and s.build and s.session
        ]
        if not ready:
            return
        old = rng.choice(ready)
        new = self.sides["RUNNER2" if old.name == "RUNNER" else "RUNNER"]
        assert old.build is not None and old.session is not None
        if rng.random() < 0.7:
            server_cancel, model_cancel = (f'API:cancel:{{"build": "{b}"}}' for b in old.build)
            await self.step(step, "take_over", "API", server_cancel, model_cancel)
        if rng.random() < 0.5:
            await self.step(step, "take_over", old.name, CLOSE, CLOSE)
        texts = [
            "RUNNER:init:"
            + json.dumps(
                {"type": "simple", "protocol": 2, "resume": {"build": build, "session": session}}
            )
            for build, session in zip(old.build, old.session, strict=True)
        ]
        await self.step(step, "take_over", new.name, texts[0], texts[1])

    @staticmethod
    def _learn(side: _Side, frames: list[str], which: int) -> None:
        """Note the session and build a runner was given (``which``: 0 the
        server's frames, 1 the model's)."""
        for text in frames:
            command, _, payload = text.partition(":")
            if command not in ("ready", "run"):
                continue
            try:
                body = json.loads(payload)
            except ValueError:
                continue
            keys = ("session", "runner") if command == "ready" else ("build",)
            for key in keys:
                value = body.get(key) if isinstance(body, dict) else None
                if not isinstance(value, str):
                    continue
                pair = list(getattr(side, key) or ("", ""))
                pair[which] = value
                setattr(side, key, (pair[0], pair[1]))

    def _compare(
        self, step: int, side: _Side, sent: str, expected: list[str], got: list[str]
    ) -> None:
        want = [self.model_names.frame(t) for t in expected if not t.startswith("ack:")]
        have = [self.server_names.frame(t) for t in got]
        if sent.startswith(("API:get_runners:", "WEB:get_runners:")) and '"after"' in sent:
            # Which runners sort after `after`, and in which order, depends on
            # the ids, which are the server's choice: only the reply's kind
            # and req are the spec's.
            want = [_kind_of(t) for t in want]
            have = [_kind_of(t) for t in have]
        if len(want) == len(have):
            pairs = [_same_cut(w, h) for w, h in zip(want, have, strict=True)]
            want, have = [w for w, _ in pairs], [h for _, h in pairs]
        self.report.compared += len(have)
        if want != have:
            self._differ(step, side, sent, want, have)

    def _differ(
        self, step: int, side: _Side, sent: str, expected: list[str], got: list[str]
    ) -> None:
        self.report.differences.append(
            Difference(step=step, role=side.name, sent=sent, expected=expected, got=got)
        )

    # -- aiming frames at what exists -----------------------------------------------------

    def _aim(self, frame: str, rng: random.Random) -> tuple[str, str]:
        """The frame as sent to the server and to the model: fields that name
        a build, a runner or a session name one that exists, often, each
        side its own."""
        role, sep, rest = frame.partition(":")
        command, sep2, payload = rest.partition(":")
        if not (sep and sep2) or not payload.startswith("{"):
            return frame, frame
        try:
            body = json.loads(payload)
        except ValueError:
            return frame, frame
        if not isinstance(body, dict):
            return frame, frame
        server_body, model_body = dict(body), dict(body)
        aimed = False
        runners = [s for s in self.sides.values() if s.role is Role.RUNNER and s.build]
        for key, kind in (("build", "build"), ("runner", "runner"), ("before", "build")):
            if key in body and rng.random() < 0.7:
                pair = self._known(kind, rng)
                if key == "build" and runners and rng.random() < 0.5:
                    pair = rng.choice(runners).build  # a build that runs (or ran)
                mine = [s.runner for s in self.sides.values() if s.runner and s.wire]
                if key == "runner" and mine and rng.random() < 0.6:
                    pair = rng.choice(mine)  # one of the fuzzer's runners
                if pair is not None:
                    server_body[key], model_body[key] = pair
                    aimed = True
        resume = body.get("resume")
        if isinstance(resume, dict) and rng.random() < 0.7:
            build, session = self._known("build", rng), self._known("session", rng)
            held = [s for s in runners if s.session]
            if held and rng.random() < 0.7:  # the session of the runner given the build
                chosen = rng.choice(held)
                build, session = chosen.build, chosen.session
                other = self._known("session", rng)
                if other is not None and rng.random() < 0.4:
                    session = other  # ... or another one, which must be refused
            if build is not None and session is not None:
                server_body["resume"] = {"build": build[0], "session": session[0]}
                model_body["resume"] = {"build": build[1], "session": session[1]}
                aimed = True
        if not aimed:
            return frame, frame
        head = f"{role}:{command}:"
        return head + json.dumps(server_body), head + json.dumps(model_body)

    def _known(self, kind: str, rng: random.Random) -> tuple[str, str] | None:
        server, model = self.server_names, self.model_names
        ranks = [r for r, k in server.kinds.items() if k == kind and r in model.values]
        if not ranks:
            return None
        rank = rng.choice(ranks)
        return server.values[rank], model.values[rank]


#: A runner's registration.
REGISTER = 'RUNNER:init:{"type": "simple", "protocol": 1}'
#: Not a frame: the runner's connection closes (a lost runner; another may
#: resume its build).
CLOSE = "(close)"
#: Not a frame: the other runner connection takes over a runner's build
#: (a cancel first, a close first, each sometimes), see ``_take_over``.
TAKE_OVER = "(take over)"
#: Seconds given to the server to take a close before the next frame.
CLOSE_SETTLE = 0.05

#: Frames that move the server's state along (ids aimed by ``_aim``).
STATE_FRAMES: list[tuple[Role, str]] = [
    (Role.RUNNER, CLOSE),
    *[(Role.RUNNER, TAKE_OVER)] * 3,  # (three times as often as one frame)
    (Role.RUNNER, 'RUNNER:init:{"type": "simple", "protocol": 1}'),
    (Role.RUNNER, 'RUNNER:init:{"type": "other", "protocol": 2}'),
    (Role.RUNNER, 'RUNNER:init:{"type": "simple", "resume": {"build": "b", "session": "s"}}'),
    (Role.RUNNER, 'RUNNER:process:{"finished": false, "log": "line\\n"}'),
    *[(Role.RUNNER, 'RUNNER:process:{"finished": false, "log": "seq", "seq": 1}')] * 2,
    (Role.RUNNER, 'RUNNER:process:{"finished": false, "log": "two", "seq": 2}'),
    (Role.RUNNER, 'RUNNER:process:{"finished": false, "log": "line\\n"}'),
    (Role.RUNNER, 'RUNNER:process:{"finished": false, "log": "gap", "seq": 5}'),
    (Role.RUNNER, 'RUNNER:process:{"finished": true, "success": true}'),
    (Role.RUNNER, 'RUNNER:process:{"finished": true, "success": false, "build": "b"}'),
    (Role.RUNNER, 'RUNNER:process:{"finished": true, "success": true, "leave": true}'),
    (Role.RUNNER, "RUNNER:unregister:"),
    (Role.API, 'API:run:{"repo": "https://example.org/r.git", "script": ["make"]}'),
    (Role.API, 'API:run:{"repo": "r", "script": ["a", "b"], "type": "other"}'),
    (Role.API, 'API:run:{"repo": "r", "script": [], "type": "nobody"}'),
    (Role.API, 'API:cancel:{"build": "b"}'),
    (Role.API, 'API:shutdown_runner:{"runner": "r"}'),
    (Role.API, 'API:get_build:{"build": "b"}'),
    (Role.API, 'API:get_builds:{"limit": 3, "before": "b"}'),
    (Role.API, "API:get_runners:"),
    (Role.WEB, 'WEB:subscribe:{"build": "b", "from": 0}'),
    (Role.WEB, 'WEB:subscribe:{"build": "b", "from": 1}'),
    (Role.WEB, 'WEB:unsubscribe:{"build": "b"}'),
    (Role.WEB, "WEB:subscribe:{}"),
    (Role.WEB, "WEB:unsubscribe:{}"),
    (Role.WEB, 'WEB:get_builds:{"state": "queued"}'),
]


def edge_frames() -> list[tuple[Role, str]]:
    """A frame at each edge of a rule the decoder knows (docs/protocol.md §1,
    §3): on both sides of it."""
    fits, over = "é" * 128, "é" * 128 + "x"
    head = '{"repo": "r", "type": "nobody", "script": ["'

    def run_of(size: int) -> str:
        return "API:run:" + head + "x" * (size - len(head) - 3) + '"]}'

    return [
        (Role.RUNNER, 'RUNNER:init:{"type": "t", "protocol": 2.0}'),
        (Role.RUNNER, 'RUNNER:init:{"type": "t", "protocol": 5e1}'),
        (Role.RUNNER, 'RUNNER:init:{"type": "t", "protocol": 1e999}'),
        (Role.RUNNER, 'RUNNER:init:{"type": "t", "protocol": null}'),
        (Role.RUNNER, 'RUNNER:init:{"type": "t", "protocol": 9007199254740993}'),
        (Role.RUNNER, f'RUNNER:init:{{"type": "{fits}"}}'),
        (Role.RUNNER, f'RUNNER:init:{{"type": "{over}"}}'),
        (Role.RUNNER, 'RUNNER:init:{"type": "\\ud800"}'),
        (Role.RUNNER, f'RUNNER:init:{{"type": "t", "name": "{fits}"}}'),
        (Role.RUNNER, f'RUNNER:init:{{"type": "t", "name": "{over}"}}'),
        (Role.RUNNER, 'RUNNER:process:{"finished": false, "log": "x", "seq": 0}'),
        (
            Role.RUNNER,
            'RUNNER:process:{"finished": true, "success": true, "exit_code": 2147483648}',
        ),
        (Role.API, 'API:run:{"repo": "r", "script": [], "secrets": {"A": "abc"}}'),
        (Role.API, 'API:run:{"repo": "r", "script": [], "secrets": {"A": "😀😀"}}'),
        (
            Role.API,
            'API:run:{"repo": "r", "script": [], "type": "nobody", "secrets": {"A": "😀😀😀😀"}}',
        ),
        (Role.API, 'API:run:{"repo": "r", "script": [], "timeout": 0}'),
        (Role.API, f'API:run:{{"repo": "r", "script": [], "type": "{over}"}}'),
        (Role.API, run_of(256 * 1024)),
        (Role.API, run_of(256 * 1024 + 1)),
        (Role.API, 'API:get_builds:{"limit": 1001}'),
        (Role.API, 'API:get_build:{"build": "no-such-build", "req": "an error echoes it"}'),
        (Role.API, 'API:get_builds:{"limit": 0}'),
        (Role.API, 'API:get_builds:{"limit": 2.0}'),
        (Role.API, "API:get_runners:" + json.dumps({"req": "r" * 256})),
        (Role.API, "API:get_runners:" + json.dumps({"req": "r" * 257})),
        (Role.WEB, 'WEB:run:{"repo": "r", "script": []}'),
        (Role.API, 'API:get_runners:{"a_later_key": {"x": [1, null]}}'),
        (Role.RUNNER, 'RUNNER:init:{"type": "t", "later": true, "protocol": 1}'),
        (Role.WEB, 'WEB:subscribe:{"build": "nope", "from": -1}'),
    ]
