"""``citron fuzz``: send a server valid, invalid and hostile frames, and check
that every answer is one the protocol documents.

Frames are drawn with a seed from :mod:`citron_protocol.strategies` (so a run
is repeatable), plus the legacy PHP runner's escaping, oversized and binary
frames, frames out of order and floods. For every frame the fuzzer knows, by
decoding it locally, which answers are allowed: a reply of the right command,
an ``error:`` with the code the decoder gives (or a state code), or a
documented close. Between batches, a fresh runner, backend and front must
still complete a build.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
from collections import Counter
from collections.abc import Sequence
from typing import Any

import attrs

from citron_protocol import (
    CancelBuild,
    Error,
    ErrorCode,
    GetBuild,
    GetBuilds,
    GetRunners,
    ProtocolError,
    Role,
    SubmitBuild,
    Subscribe,
    Unsubscribe,
    decode_server,
    encode,
)
from citron_protocol.codec import parse_client, split_client
from citron_protocol.messages import Queued, RunnerInit, ShutdownRunner

from .connection import ClientError
from .model import edge_frames
from .wire import Closed, Wire, WireTimeout

__all__ = ["DOCUMENTED_CLOSES", "Case", "Fuzzer", "Report", "Violation"]

#: Close codes docs/protocol.md and docs/operations.md document.
DOCUMENTED_CLOSES = frozenset({1000, 1001, 1007, 1008, 1009, 1011, 4001, 4002, 4008})
#: 1011 is documented, but for a server under fuzzing it means an internal error.
INTERNAL_ERROR = 1011
#: Codes that depend on the state of the server, so any valid frame may get them.
STATE_CODES = frozenset(
    {
        "not_registered",
        "no_build",
        "unknown_build",
        "unknown_runner",
        "bad_state",
        "too_large",
        "role_mismatch",
        "rate_limited",
    }
)
_CODES = frozenset(c.value for c in ErrorCode)
_REPLIES: dict[type[Any], str] = {
    SubmitBuild: "queued",
    CancelBuild: "build",
    ShutdownRunner: "runners",
    GetRunners: "runners",
    GetBuilds: "builds",
    GetBuild: "build",
    Subscribe: "subscribed",
    Unsubscribe: "unsubscribed",
    RunnerInit: "ready",
}
_PUSHES = frozenset({"log", "state", "runner", "run", "cancel", "shutdown", "ack"})
#: Sent after a frame that may get no answer (a runner's chunk or result):
#: a binary frame is answered ``malformed`` in any state and changes nothing,
#: and a frame that may go unanswered is never answered ``malformed``.
#: New connections cancel_queued may open after the server closed one.
MAX_RECONNECTS = 20
FENCE = b"\x00citron-fuzz-fence"
FENCE_ANSWER = "error:malformed"


@attrs.frozen
class Case:
    kind: str  # valid, invalid, legacy, binary, oversized, out_of_order
    role: Role
    frame: str | bytes
    index: int


@attrs.frozen
class Violation:
    case: Case
    problem: str

    def reproducer(self, url: str, seed: int) -> str:
        if self.case.index == -1:  # a flood or a health check: rerun with the seed
            return (
                f"seed {seed} {self.case.kind}: {self.problem}\n    citron fuzz {url} --seed {seed}"
            )
        frame = self.case.frame
        shown = json.dumps(frame) if isinstance(frame, str) else f"<{len(frame)} binary bytes>"
        return (
            f"seed {seed} frame #{self.case.index} ({self.case.kind}, {self.case.role}):"
            f" {self.problem}\n"
            f"    citron fuzz {url} --role {self.case.role} --replay {_shell_quote(shown)}"
        )


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


@attrs.define
class Report:
    sent: Counter[str] = attrs.Factory(Counter)
    answers: Counter[str] = attrs.Factory(Counter)
    violations: list[Violation] = attrs.Factory(list)
    health_checks: int = 0
    queued: list[str] = attrs.Factory(list)  # builds the fuzzing queued
    cancelled: int = 0  # of those, cancelled before the end
    left: int = 0  # of those, neither cancelled nor ended (the server said so)

    def as_dict(self, url: str, seed: int) -> dict[str, Any]:
        """The report as JSON data (``citron fuzz --json``)."""
        return {
            "url": url,
            "seed": seed,
            "sent": dict(sorted(self.sent.items())),
            "answers": dict(sorted(self.answers.items())),
            "health_checks": self.health_checks,
            "builds_queued": len(self.queued),
            "builds_cancelled": self.cancelled,
            "builds_left": self.left,
            "violations": [
                {
                    "kind": v.case.kind,
                    "role": v.case.role.value,
                    "index": v.case.index,
                    "frame": v.case.frame if isinstance(v.case.frame, str) else None,
                    "problem": v.problem,
                    "reproducer": v.reproducer(url, seed).splitlines()[-1].strip(),
                }
                for v in self.violations
            ],
        }

    def print(self, url: str, seed: int, out: Any) -> None:
        print(f"citron fuzz {url}, seed {seed}", file=out)
        print("frames sent by kind:", file=out)
        for kind, n in sorted(self.sent.items()):
            print(f"  {kind:14} {n:7}", file=out)
        print("answers:", file=out)
        for answer, n in sorted(self.answers.items()):
            print(f"  {answer:24} {n:7}", file=out)
        print(f"health checks passed: {self.health_checks}", file=out)
        if self.queued:
            print(
                f"builds queued by the fuzzing: {len(self.queued)},"
                f" cancelled at the end: {self.cancelled}",
                file=out,
            )
        print(f"violations: {len(self.violations)}", file=out)
        for violation in self.violations[:50]:
            print("  " + violation.reproducer(url, seed), file=out)
        if len(self.violations) > 50:
            print(f"  ... and {len(self.violations) - 50} more", file=out)


def draw(strategy: Any, n: int, seed: int) -> list[Any]:
    """``n`` examples of a hypothesis strategy, the same for the same seed."""
    if n <= 0:
        return []
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    out: list[Any] = []

    @settings(
        max_examples=n,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @hseed(seed)
    @given(strategy)
    def collect(example: Any) -> None:
        out.append(example)

    collect()
    return out[:n]


class Fuzzer:
    def __init__(
        self,
        url: str,
        tokens: dict[Role, str | None] | None = None,
        *,
        roles: Sequence[Role] = (Role.RUNNER, Role.API, Role.WEB),
        frames: int = 10_000,
        seed: int = 0,
        connections: int = 1,
        max_frame: int = 1024 * 1024,
        timeout: float = 5.0,
        batch: int = 1000,
        ca: str | None = None,
    ) -> None:
        self.url, self.tokens, self.ca = url, tokens or {}, ca
        self.roles, self.frames, self.seed = list(roles), frames, seed
        self.connections, self.max_frame = connections, max_frame
        self.timeout, self.batch = timeout, batch
        self.report = Report()

    # -- the frames -------------------------------------------------------------------

    def cases(self) -> list[Case]:
        from citron_protocol import strategies as cst

        rng = random.Random(self.seed)
        per_role = max(self.frames // len(self.roles), 1)
        raw: list[tuple[str, Role, str | bytes]] = []
        for i, role in enumerate(self.roles):
            seed = self.seed * 31 + i
            n_valid = per_role * 4 // 10
            n_legacy = per_role // 10 if role is Role.RUNNER else 0
            n_invalid = per_role - n_valid - n_legacy - 3
            raw += [("valid", role, f) for f in draw(cst.frames(role), n_valid, seed)]
            raw += [
                ("invalid", role, f)
                for f in draw(cst.invalid_frames(), max(n_invalid, 0), seed + 7)
            ]
            raw += [
                ("legacy", role, f) for f, _ in draw(cst.legacy_log_frames(), n_legacy, seed + 13)
            ]
            # The edges of every rule the oracle knows (the decoder's), on
            # both sides: integers written 2.0, lone surrogates, limits.
            raw += [("edge", role, f) for r, f in edge_frames() if r is role]
            raw.append(("binary", role, b"\x00\x01citron"))
            raw.append(("oversized", role, f"{role}:get_runners:" + "x" * (self.max_frame + 1)))
            other = Role.API if role is not Role.API else Role.WEB
            raw.append(("out_of_order", role, f"{other}:get_runners:"))
        rng.shuffle(raw)
        return [Case(kind, role, frame, i) for i, (kind, role, frame) in enumerate(raw)]

    # -- running ------------------------------------------------------------------------

    async def run(self) -> Report:
        cases = self.cases()
        for start in range(0, len(cases), self.batch):
            batch = cases[start : start + self.batch]
            lanes = [_Lane(self, role, k) for role in self.roles for k in range(self.connections)]
            by_lane: dict[tuple[Role, int], list[Case]] = {}
            for case in batch:
                by_lane.setdefault((case.role, case.index % self.connections), []).append(case)
            await asyncio.gather(
                *(lane.run(by_lane.get((lane.role, lane.k), [])) for lane in lanes)
            )
            await self.flood()
            await self.health_check()
        await self.cancel_queued()
        return self.report

    async def replay(self, role: Role, frame: str) -> Report:
        """Send one frame on a fresh connection of ``role`` and check the answer."""
        await _Lane(self, role, 0).run([Case("replay", role, frame, 0)])
        await self.cancel_queued()
        return self.report

    async def cancel_queued(self) -> None:
        """Cancel the builds the fuzzing queued, so that no runner picks them
        up later (one that already ended answers bad_state: fine). Errors
        for ended builds may fill a connection's error window: the server
        then closes it, and the rest go on a new one."""
        pending = list(self.report.queued)
        wire: Wire | None = None
        reconnects = 0
        try:
            while pending:
                if wire is None or wire.closed is not None:
                    if wire is not None:
                        await wire.close()
                    if reconnects > MAX_RECONNECTS:
                        break
                    reconnects += 1
                    try:
                        wire = await Wire.open(self.url, self.tokens.get(Role.API), ca=self.ca)
                    except ClientError:
                        break
                if not await wire.send(encode(CancelBuild(build=pending[0]))):
                    continue  # closed: again on a new connection
                try:
                    text = await wire.recv_text(self.timeout)
                except WireTimeout:
                    pending.pop(0)
                    self.report.left += 1
                    continue
                if isinstance(text, Closed):
                    continue
                answer = decode_server(text)
                if isinstance(answer, Error) and answer.code == ErrorCode.RATE_LIMITED:
                    await asyncio.sleep(0.5)  # (a budget of 200 a second): again
                    continue
                pending.pop(0)
                if not isinstance(answer, Error):
                    self.report.cancelled += 1
            self.report.left += len(pending)
        finally:
            if wire is not None:
                await wire.close()

    def violation(self, case: Case, problem: str) -> None:
        self.report.violations.append(Violation(case, problem))

    async def flood(self) -> None:
        """More than 100 bad frames at once: errors, then a close with 1008,
        while another connection is served as usual."""
        case = Case("flood", Role.API, "flood", -1)
        self.report.sent["flood"] += 1
        try:
            wire = await Wire.open(self.url, self.tokens.get(Role.API), ca=self.ca)
        except ClientError as exc:
            self.violation(case, f"cannot connect: {exc}")
            return
        try:
            for _ in range(110):
                if not await wire.send("flood"):
                    break
            codes = []
            while True:
                try:
                    text = await wire.recv_text(self.timeout)
                except WireTimeout:
                    self.violation(case, "no close after more than 100 errors in a minute")
                    return
                if isinstance(text, Closed):
                    self.report.answers[f"close:{text.code}"] += 1
                    if text.code != 1008:
                        self.violation(case, f"a flood was closed with {text.code}, not 1008")
                    break
                codes.append(getattr(decode_server(text), "code", None))
            if set(codes) != {"malformed"}:
                self.violation(case, f"flood answers {set(codes)}")
        finally:
            await wire.close()

    async def health_check(self) -> None:
        """A fresh runner, backend and front complete a whole build."""
        case = Case("health", Role.API, "health check", -1)
        wires: list[Wire] = []
        try:
            async with asyncio.timeout(self.timeout * 4):
                kind = f"fuzz-health-{secrets.token_hex(4)}"
                runner = await Wire.open(self.url, self.tokens.get(Role.RUNNER), ca=self.ca)
                api = await Wire.open(self.url, self.tokens.get(Role.API), ca=self.ca)
                front = await Wire.open(self.url, self.tokens.get(Role.WEB), ca=self.ca)
                wires += [runner, api, front]
                await runner.send(f'RUNNER:init:{{"type": "{kind}"}}')
                await runner.expect("ready", self.timeout)
                await api.send(
                    'API:run:{"repo": "https://example.org/r.git", "script": ["true"],'
                    f' "type": "{kind}"}}'
                )
                build = (await api.expect("queued", self.timeout, skip=tuple(_PUSHES))).build
                run = await runner.expect("run", self.timeout)
                while run.build != build:  # an untyped build left by the fuzzing: end it
                    await runner.send('RUNNER:process:{"finished": true, "success": false}')
                    run = await runner.expect("run", self.timeout)
                await front.send(f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
                await front.expect("subscribed", self.timeout)
                text = "legacy \\'quoted\\' \\0 line\n"
                await runner.send('RUNNER:process:{"finished": false, "log": "' + text + '"}')
                await runner.send('RUNNER:process:{"finished": true, "success": true}')
                log = await front.expect("log", self.timeout, skip=("state",))
                if log.log != "legacy 'quoted' \0 line\n":
                    raise AssertionError(f"the legacy log came back as {log.log!r}")
                while True:
                    state = await front.expect("state", self.timeout, skip=("log",))
                    if state.build.state.finished:
                        if state.build.state.value != "success":
                            raise AssertionError(f"the health build ended {state.build.state}")
                        break
            self.report.health_checks += 1
        except (AssertionError, TimeoutError, ClientError, ProtocolError) as exc:
            self.violation(case, f"health check failed: {exc or type(exc).__name__}")
        finally:
            for wire in wires:
                await wire.close()


class _Lane:
    """One connection of one role, sending cases one at a time."""

    def __init__(self, fuzzer: Fuzzer, role: Role, k: int) -> None:
        self.fuzzer, self.role, self.k = fuzzer, role, k
        self.wire: Wire | None = None

    async def run(self, cases: list[Case]) -> None:
        try:
            for case in cases:
                await self.one(case)
        finally:
            if self.wire is not None:
                await self.wire.close()

    async def _open(self) -> Wire:
        if self.wire is None or self.wire.closed is not None:
            self.wire = await Wire.open(
                self.fuzzer.url, self.fuzzer.tokens.get(self.role), ca=self.fuzzer.ca
            )
            # Fix the connection's role with a frame whose answer is known.
            if self.role is Role.RUNNER:  # a runner frame before init: out of order
                probe, allowed = f"{self.role}:unregister:", {"error:not_registered"}
                kind = "out_of_order"
            else:
                probe, allowed, kind = f"{self.role}:get_runners:", {"reply:runners"}, "probe"
            self.fuzzer.report.sent[kind] += 1
            await self.wire.send(probe)
            await self._answer(Case(kind, self.role, probe, -2), allowed, True)
        return self.wire

    def expectation(self, case: Case) -> tuple[set[str], bool]:
        """Allowed answers (``error:<code>``, ``reply:<command>``, ``close:<code>``,
        ``none``) and whether an answer must come."""
        frame = case.frame
        if isinstance(frame, bytes):
            return {"error:malformed"}, True
        if case.kind == "oversized":
            return {"close:1009"}, True
        try:
            role, command, payload = split_client(frame)
        except ProtocolError as exc:
            return {f"error:{exc.code}"}, True
        if role is not self.role:
            return {"error:role_mismatch", "error:unauthorized"}, True
        try:
            message = parse_client(role, command, payload)
        except ProtocolError as exc:
            return {f"error:{exc.code}"}, True
        states = {f"error:{c}" for c in STATE_CODES}
        reply = _REPLIES.get(type(message))
        if reply is None:  # runner output and results: no reply when all is well
            return {"none", *states}, False
        return {f"reply:{reply}", *states}, True

    async def one(self, case: Case) -> None:
        fuzzer = self.fuzzer
        fuzzer.report.sent[case.kind] += 1
        try:
            wire = await self._open()
        except ClientError as exc:
            fuzzer.violation(case, f"cannot connect: {exc}")
            return
        allowed, must = self.expectation(case)
        if not await wire.send(case.frame):
            must = True  # the close that came first is the answer
        elif not must and await wire.send(FENCE):
            # A frame that may get no answer is followed by one whose answer
            # is known (and never the first frame's): whatever comes before
            # that answer is the first frame's, however late it comes.
            await self._answer(case, allowed, True, fenced=True)
            return
        await self._answer(case, allowed, must)

    async def _answer(
        self, case: Case, allowed: set[str], must: bool, fenced: bool = False
    ) -> None:
        fuzzer = self.fuzzer
        wire = self.wire
        assert wire is not None
        wait = fuzzer.timeout
        while True:
            try:
                text = await wire.recv_text(wait)
            except WireTimeout:
                if must:
                    fuzzer.violation(
                        case,
                        f"no answer within {wait:g} s (expected {' or '.join(sorted(allowed))})",
                    )
                fuzzer.report.answers["none"] += 1
                return
            if isinstance(text, Closed):
                if fenced and text.code == 1008:
                    # The fence's own error filled the error window: the
                    # frame had no answer, and the close is documented.
                    fuzzer.report.answers["none"] += 1
                    return
                answer = f"close:{text.code}"
                fuzzer.report.answers[answer] += 1
                if text.code not in DOCUMENTED_CLOSES:
                    fuzzer.violation(case, f"closed with the undocumented code {text.code}")
                elif text.code == INTERNAL_ERROR:
                    fuzzer.violation(case, "closed with 1011: the server hit an internal error")
                elif answer not in allowed and text.code not in (1008,):
                    fuzzer.violation(
                        case, f"closed with {text.code}, expected {' or '.join(sorted(allowed))}"
                    )
                return
            try:
                message = decode_server(text)
            except ProtocolError as exc:
                fuzzer.violation(case, f"the answer is not a valid frame ({exc}): {text[:200]!r}")
                return
            if message.COMMAND in _PUSHES:
                continue
            if isinstance(message, Queued):
                fuzzer.report.queued.append(message.build)
            if isinstance(message, Error):
                answer = f"error:{message.code}"
                if fenced and answer == FENCE_ANSWER:  # the fence's: no answer to the frame
                    fuzzer.report.answers["none"] += 1
                    return
                if message.code not in _CODES:
                    fuzzer.violation(case, f"undocumented error code {message.code!r}")
            else:
                answer = f"reply:{message.COMMAND}"
            fuzzer.report.answers[answer] += 1
            if answer not in allowed:
                fuzzer.violation(
                    case, f"answered {answer}, expected {' or '.join(sorted(allowed))}"
                )
            if fenced:
                await self._fence_answer(case)
            return

    async def _fence_answer(self, case: Case) -> None:
        """After the frame's answer, the fence's must come next."""
        wire = self.wire
        assert wire is not None
        while True:
            try:
                text = await wire.recv_text(self.fuzzer.timeout)
            except WireTimeout:
                self.fuzzer.violation(case, f"the binary frame after it got no {FENCE_ANSWER}")
                return
            if isinstance(text, Closed):
                return  # a close answers everything that was in flight
            try:
                message = decode_server(text)
            except ProtocolError as exc:
                self.fuzzer.violation(case, f"an answer is not a valid frame ({exc})")
                return
            if message.COMMAND in _PUSHES:
                continue
            answer = f"error:{message.code}" if isinstance(message, Error) else message.COMMAND
            if answer != FENCE_ANSWER:
                self.fuzzer.violation(
                    case, f"two answers: then {answer} (the binary frame after it: {FENCE_ANSWER})"
                )
            return
