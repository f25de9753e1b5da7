"""``citron conformance``: check a ci-tron server, or a runner, from the wire.

:class:`ServerConformance` runs the scenarios of docs/protocol.md against a
server, each as a named check. :class:`RunnerConformance` plays a scripted
server and checks a runner command. Every check passes, fails with the reason,
or is skipped with the reason (a timer longer than ``max_wait``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from citron_protocol import BuildState, ErrorCode, ProtocolError, Role, decode_client
from citron_protocol.messages import RunnerFinished, RunnerInit, RunnerLog

from .wire import Closed, Wire, WireTimeout

__all__ = ["CheckResult", "RunnerConformance", "ServerConformance", "print_results"]

PASS, FAIL, SKIP = "pass", "fail", "skip"


@attrs.frozen
class CheckResult:
    name: str
    status: str
    detail: str = ""
    output: str = ""  # what the implementation said (a runner's stderr) when it failed


class _Skip(Exception):
    pass


class _Fail(Exception):
    pass


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise _Fail(message)


def print_results(title: str, results: Sequence[CheckResult], out: Any = None) -> None:
    """The results as a table: check, PASS/FAIL/SKIP, why."""
    out = out or sys.stdout
    width = max([len(r.name) for r in results] + [5])
    print(title, file=out)
    for r in results:
        print(f"  {r.name.ljust(width)}  {r.status.upper():4}  {r.detail}".rstrip(), file=out)
        if r.output:
            print("      the runner's stderr:", file=out)
            for line in r.output.splitlines():
                print(f"      | {line}".rstrip(), file=out)
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
    print(f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped", file=out)


async def _run_checks(
    checks: Sequence[tuple[str, Callable[[], Awaitable[str | None]]]], limit: float
) -> list[CheckResult]:
    results = []
    for name, check in checks:
        try:
            async with asyncio.timeout(limit):
                detail = await check()
            results.append(CheckResult(name, PASS, detail or ""))
        except _Skip as skip:
            results.append(CheckResult(name, SKIP, str(skip)))
        except (_Fail, AssertionError) as exc:
            results.append(CheckResult(name, FAIL, str(exc)))
        except TimeoutError:
            results.append(CheckResult(name, FAIL, f"no conclusion within {limit:g} s"))
        except ProtocolError as exc:
            results.append(CheckResult(name, FAIL, f"the server sent a bad frame: {exc}"))
        except Exception as exc:  # noqa: BLE001 - a check that breaks is a failed check
            results.append(CheckResult(name, FAIL, f"{type(exc).__name__}: {exc}"))
    return results


# -- the server side ----------------------------------------------------------------


class ServerConformance:
    """The protocol's scenarios against a server at ``url``."""

    def __init__(
        self,
        url: str,
        tokens: dict[Role, str | None] | None = None,
        *,
        lost_grace: float = 60.0,
        cancel_timeout: float = 30.0,
        max_wait: float = 20.0,
        timeout: float = 5.0,
        ca: str | None = None,
        only: Sequence[str] = (),
        model: int = 0,
    ) -> None:
        self.url = url
        self.only = list(only)
        self.model_frames = model
        self.tokens = tokens or {}
        self.ca = ca
        self.lost_grace, self.cancel_timeout = lost_grace, cancel_timeout
        self.max_wait, self.timeout = max_wait, timeout
        self._wires: list[Wire] = []

    @property
    def checks(self) -> list[tuple[str, Callable[[], Awaitable[str | None]]]]:
        return [
            ("model", self.model),  # first: the model starts from an empty server
            ("registration", self.registration),
            ("dispatch_fifo", self.dispatch_fifo),
            ("type_matching", self.type_matching),
            ("log_order", self.log_order),
            ("replay", self.replay),
            ("global_feed", self.global_feed),
            ("cancel_queued", self.cancel_queued),
            ("cancel_running", self.cancel_running),
            ("cancel_timeout", self.cancel_timeout_check),
            ("runner_loss_requeue", self.runner_loss),
            ("resume", self.resume),
            ("error_codes", self.error_codes),
            ("permissions", self.permissions),
            ("session_secret", self.session_secret),
            ("resume_refused", self.resume_refused),
            ("resume_elsewhere", self.resume_elsewhere),
            ("acks", self.acks),
            ("no_acks_protocol_1", self.no_acks_protocol_1),
            ("cancel_final", self.cancel_final),
            ("shutdown_idle", self.shutdown_idle),
            ("shutdown_busy", self.shutdown_busy),
            ("seq_rules", self.seq_rules),
            ("unregister", self.unregister),
            ("requeue", self.requeue),
            ("builds_order", self.builds_order),
            ("dispatch_longest_waiting", self.dispatch_longest_waiting),
            ("log_time", self.log_time),
            ("runner_gone", self.runner_gone),
            ("limits", self.limits),
            ("values", self.values),
            ("cancelling_lost", self.cancelling_lost),
            ("feed_once", self.feed_once),
        ]

    async def run(self) -> list[CheckResult]:
        limit = self.max_wait + 4 * self.timeout
        try:
            results = []
            for name, check in self.checks:
                if self.only and name not in self.only:
                    continue
                results += await _run_checks([(name, check)], limit)
                await self._close_all()
            return results
        finally:
            await self._close_all()

    # -- helpers ------------------------------------------------------------------------

    async def _close_all(self) -> None:
        wires, self._wires = self._wires, []
        for wire in wires:
            await wire.close()

    async def open(self, role: Role) -> Wire:
        wire = await Wire.open(self.url, self.tokens.get(role), ca=self.ca)
        self._wires.append(wire)
        return wire

    async def runner(self, type: str, resume: str = "", protocol: int = 1) -> tuple[Wire, Any]:
        wire = await self.open(Role.RUNNER)
        await wire.send(
            f'RUNNER:init:{{"type": {json.dumps(type)}, "protocol": {protocol}{resume}}}'
        )
        ready = await self.expect(wire, "ready")
        return wire, ready

    async def expect(self, wire: Wire, command: str, skip: tuple[str, ...] = ()) -> Any:
        """The next ``command:`` frame on ``wire`` (frames in ``skip`` passed
        over); a failure that names it when none comes in time."""
        try:
            return await wire.expect(command, self.timeout, skip)
        except (TimeoutError, WireTimeout):
            raise _Fail(f"no {command}: within {self.timeout:g} s") from None

    async def quiet(self, wire: Wire, commands: set[str], seconds: float = 0.5) -> None:
        """Nothing of ``commands`` comes on ``wire`` for ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = await wire.recv(left)
            except WireTimeout:
                return
            if isinstance(message, Closed):
                return
            _check(message.COMMAND not in commands, f"unexpected {message.COMMAND}: {message!r}")

    async def feed(self) -> Wire:
        """A front on the live feed."""
        front = await self.open(Role.WEB)
        reply = await self.ask(front, "WEB:subscribe:{}")
        _check(reply.COMMAND == "subscribed", f"subscribe to the feed got {reply!r}")
        return front

    async def states_of(self, wire: Wire, build: str, until: Callable[[Any], bool]) -> list[Any]:
        """The ``state:`` frames of ``build`` on ``wire`` until one satisfies ``until``."""
        seen: list[Any] = []
        async with asyncio.timeout(self.timeout):
            while True:
                message = await wire.recv(self.timeout)
                if isinstance(message, Closed):
                    raise _Fail("the front's connection closed")
                if message.COMMAND == "state" and message.build.id == build:
                    seen.append(message.build)
                    if until(message.build):
                        return seen

    async def ask(self, wire: Wire, frame: str) -> Any:
        """Send a request with a fresh req; return the reply (or error) to it."""
        req = secrets.token_hex(4)
        role, command, payload = frame.split(":", 2)
        body = json.loads(payload) if payload else {}
        body["req"] = req
        await wire.send(f"{role}:{command}:{json.dumps(body)}")
        async with asyncio.timeout(self.timeout):
            while True:
                message = await wire.recv(self.timeout)
                if isinstance(message, Closed):
                    raise _Fail(
                        f"the connection closed ({message.code}) before the reply to {command}"
                    )
                if getattr(message, "req", None) == req:
                    return message
                if message.COMMAND not in ("log", "state", "runner", "run", "cancel"):
                    raise _Fail(
                        f"{role}:{command} was answered with {message.COMMAND}: without its req"
                        f" ({message!r})"
                    )

    async def submit(self, api: Wire, type: str | None, script: str = '["true"]') -> str:
        extra = f', "type": {json.dumps(type)}' if type else ""
        reply = await self.ask(
            api, f'API:run:{{"repo": "https://example.org/r.git", "script": {script}{extra}}}'
        )
        _check(reply.COMMAND == "queued", f"API:run got {reply.COMMAND}: {reply!r}")
        return str(reply.build)

    async def build(self, api: Wire, build: str) -> Any:
        reply = await self.ask(api, f'API:get_build:{{"build": "{build}"}}')
        _check(reply.COMMAND == "build", f"get_build got {reply.COMMAND}:")
        return reply.build

    async def until_state(self, api: Wire, build: str, states: set[BuildState], wait: float) -> Any:
        deadline = time.monotonic() + wait
        while True:
            info = await self.build(api, build)
            if info.state in states:
                return info
            if time.monotonic() > deadline:
                raise _Fail(f"build {build} is {info.state}, expected {'/'.join(sorted(states))}")
            await asyncio.sleep(0.1)

    @staticmethod
    def fresh_type() -> str:
        return f"conformance-{secrets.token_hex(4)}"

    async def follow_log(self, wire: Wire, build: str, count: int) -> list[tuple[int, str]]:
        chunks: list[tuple[int, str]] = []
        while len(chunks) < count:
            message = await wire.recv(self.timeout)
            if isinstance(message, Closed):
                raise _Fail("the front's connection closed")
            if message.COMMAND == "log" and message.build == build:
                chunks.append((message.seq, message.log))
        return chunks

    # -- the checks ---------------------------------------------------------------------

    async def registration(self) -> str:
        t = self.fresh_type()
        wire, ready = await self.runner(t)
        _check(
            ready.protocol >= 1 and bool(ready.runner) and bool(ready.session),
            f"bad ready: {ready!r}",
        )
        api = await self.open(Role.API)
        runners = (await self.ask(api, "API:get_runners:")).runners
        mine = [r for r in runners if r.id == ready.runner]
        _check(len(mine) == 1, "the runner is not listed by get_runners")
        _check(mine[0].type == t and mine[0].state.value == "WAITING", f"listed as {mine[0]!r}")
        await wire.send('RUNNER:init:{"type": ' + json.dumps(t) + ', "protocol": 1}')
        again = await self.expect(wire, "ready")
        _check(again.runner == ready.runner, "a repeated identical init changed the registration")
        return f"runner {ready.runner}"

    async def dispatch_fifo(self) -> None:
        t = self.fresh_type()
        api = await self.open(Role.API)
        builds = [await self.submit(api, t) for _ in range(3)]
        wire, _ = await self.runner(t)
        for expected in builds:
            run = await self.expect(wire, "run")
            _check(run.build == expected, f"got {run.build}, expected {expected} (FIFO)")
            await wire.send(
                f'RUNNER:process:{{"finished": true, "success": true, "build": "{run.build}"}}'
            )

    async def type_matching(self) -> None:
        t, other = self.fresh_type(), self.fresh_type()
        wire, _ = await self.runner(other)
        api = await self.open(Role.API)
        typed = await self.submit(api, t)
        with contextlib.suppress(Exception):
            message = await wire.recv(0.5)
            _check(
                isinstance(message, Closed) or message.COMMAND != "run",
                f"a {other} runner got a {t} build",
            )
        info = await self.build(api, typed)
        _check(info.state is BuildState.QUEUED, f"the typed build is {info.state}")
        right, _ = await self.runner(t)
        run = await self.expect(right, "run")
        _check(run.build == typed, "the typed build did not go to the runner of its type")
        await right.send('RUNNER:process:{"finished": true, "success": true}')
        await self.ask(api, f'API:cancel:{{"build": "{typed}"}}')

    async def _running_build(self) -> tuple[Wire, Wire, str, Any]:
        t = self.fresh_type()
        runner, ready = await self.runner(t)
        api = await self.open(Role.API)
        build = await self.submit(api, t)
        run = await self.expect(runner, "run")
        _check(run.build == build, "the runner got another build")
        return runner, api, build, ready

    async def log_order(self) -> None:
        runner, api, build, _ = await self._running_build()
        front = await self.open(Role.WEB)
        sub = await self.ask(front, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
        _check(sub.COMMAND == "subscribed", f"subscribe got {sub.COMMAND}:")
        texts = [f"line {i}\n" for i in range(1, 21)] + [""]
        for text in texts:
            await runner.send("RUNNER:process:" + json.dumps({"finished": False, "log": text}))
        await runner.send('RUNNER:process:{"finished": true, "success": true}')
        chunks = await self.follow_log(front, build, len(texts))
        _check(
            [s for s, _ in chunks] == list(range(1, len(texts) + 1)),
            f"seqs {[s for s, _ in chunks]}",
        )
        _check([t for _, t in chunks] == texts, "the log text changed on the way")
        info = await self.until_state(api, build, {BuildState.SUCCESS}, self.timeout)
        _check(info.log_seq == len(texts), f"log_seq is {info.log_seq}")

    async def replay(self) -> None:
        runner, api, build, _ = await self._running_build()
        for i in range(1, 11):
            await runner.send(f'RUNNER:process:{{"finished": false, "log": "r{i}"}}')
        await runner.send('RUNNER:process:{"finished": true, "success": true}')
        await self.until_state(api, build, {BuildState.SUCCESS}, self.timeout)
        for start in (0, 1, 5, 9, 10):
            front = await self.open(Role.WEB)
            await self.ask(front, f'WEB:subscribe:{{"build": "{build}", "from": {start}}}')
            chunks = await self.follow_log(front, build, 10 - start)
            _check(
                chunks == [(i, f"r{i}") for i in range(start + 1, 11)],
                f"replay from {start}: {chunks}",
            )

    async def global_feed(self) -> None:
        front = await self.open(Role.WEB)
        reply = await self.ask(front, "WEB:subscribe:{}")
        _check(reply.COMMAND == "subscribed" and reply.build is None, f"got {reply!r}")
        runner, _api, build, ready = await self._running_build()
        await runner.send('RUNNER:process:{"finished": true, "success": true}')
        states, runners = [], set()
        async with asyncio.timeout(self.timeout):
            while BuildState.SUCCESS not in states:
                message = await front.recv(self.timeout)
                if isinstance(message, Closed):
                    raise _Fail("the feed's connection closed")
                if message.COMMAND == "state" and message.build.id == build:
                    states.append(message.build.state)
                elif message.COMMAND == "runner":
                    runners.add(message.runner.id)
        _check(
            states == [BuildState.QUEUED, BuildState.RUNNING, BuildState.SUCCESS],
            f"states {states}",
        )
        _check(ready.runner in runners, "no runner: frame for the new runner")

    async def cancel_queued(self) -> None:
        api = await self.open(Role.API)
        build = await self.submit(api, self.fresh_type())
        reply = await self.ask(api, f'API:cancel:{{"build": "{build}"}}')
        _check(
            reply.COMMAND == "build" and reply.build.state is BuildState.CANCELLED, f"got {reply!r}"
        )

    async def cancel_running(self) -> None:
        runner, api, build, _ = await self._running_build()
        reply = await self.ask(api, f'API:cancel:{{"build": "{build}"}}')
        _check(reply.build.state is BuildState.CANCELLING, f"cancel answered {reply.build.state}")
        cancel = await self.expect(runner, "cancel")
        _check(cancel.build == build, "cancel: named another build")
        await runner.send('RUNNER:process:{"finished": true, "success": false}')
        await self.until_state(api, build, {BuildState.CANCELLED}, self.timeout)

    async def cancel_timeout_check(self) -> None:
        if self.cancel_timeout > self.max_wait:
            raise _Skip(f"the cancel timeout ({self.cancel_timeout:g} s) is longer than --max-wait")
        _runner, api, build, _ = await self._running_build()
        await self.ask(api, f'API:cancel:{{"build": "{build}"}}')
        try:
            await self.until_state(
                api, build, {BuildState.CANCELLED}, self.cancel_timeout + self.timeout
            )
        except _Fail as exc:
            raise _Fail(
                f"{exc} {self.cancel_timeout:g} s after a cancel the runner ignored: if the"
                " server's --cancel-timeout is not that, give it with --cancel-timeout"
            ) from None

    async def runner_loss(self) -> None:
        if self.lost_grace > self.max_wait:
            raise _Skip(f"the lost grace ({self.lost_grace:g} s) is longer than --max-wait")
        runner, api, build, _ = await self._running_build()
        await runner.close()
        info = await self.build(api, build)
        _check(info.state is BuildState.RUNNING, f"right after the loss the build is {info.state}")
        try:
            info = await self.until_state(
                api, build, {BuildState.QUEUED, BuildState.LOST}, self.lost_grace + self.timeout
            )
        except _Fail as exc:
            raise _Fail(
                f"{exc} {self.lost_grace:g} s after its runner was lost: if the server's"
                " --lost-grace is not that, give it with --lost-grace"
            ) from None
        await self.ask(api, f'API:cancel:{{"build": "{build}"}}')
        _check(info.state is BuildState.LOST or info.attempt == 2, f"after the grace: {info!r}")

    async def resume(self) -> None:
        runner, api, build, ready = await self._running_build()
        for i in (1, 2, 3):
            await runner.send(f'RUNNER:process:{{"finished": false, "log": "s{i}", "seq": {i}}}')
        await self.ask(api, "API:get_runners:")  # a round trip on another connection
        await asyncio.sleep(0.2)
        await runner.close()
        resume = f', "resume": {{"build": "{build}", "session": {json.dumps(ready.session)}}}'
        again, ready2 = await self.runner(self.fresh_type(), resume)
        _check(
            ready2.resume is not None and ready2.resume.build == build, f"no resume in {ready2!r}"
        )
        _check(ready2.resume.seq == 3, f"resume seq {ready2.resume.seq}, expected 3")
        for i in (1, 2, 3, 4):
            await again.send(f'RUNNER:process:{{"finished": false, "log": "s{i}", "seq": {i}}}')
        await again.send('RUNNER:process:{"finished": true, "success": true}')
        await self.until_state(api, build, {BuildState.SUCCESS}, self.timeout)
        front = await self.open(Role.WEB)
        await self.ask(front, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
        chunks = await self.follow_log(front, build, 4)
        _check(chunks == [(i, f"s{i}") for i in (1, 2, 3, 4)], f"log after resume: {chunks}")

    async def error_codes(self) -> str:
        cases: list[tuple[str, Role, list[str], str | bytes]] = [
            ("malformed", Role.API, [], "not a frame"),
            ("malformed", Role.API, [], b"\x00binary"),
            ("unknown_role", Role.API, [], "ROOT:get_runners:"),
            ("unknown_command", Role.API, [], "API:launch:{}"),
            ("forbidden", Role.API, [], 'API:init:{"type": "x"}'),
            ("invalid_payload", Role.API, [], 'API:run:{"repo": "r", "script": [1]}'),
            (
                "too_large",
                Role.API,
                [],
                'API:run:{"repo": "r", "script": ["' + "x" * 300_000 + '"]}',
            ),
            ("not_registered", Role.RUNNER, [], 'RUNNER:process:{"finished": false, "log": "x"}'),
            (
                "no_build",
                Role.RUNNER,
                [f'RUNNER:init:{{"type": "{self.fresh_type()}"}}'],
                'RUNNER:process:{"finished": true, "success": true}',
            ),
            ("unknown_build", Role.API, [], 'API:get_build:{"build": "no-such-build"}'),
            ("unknown_runner", Role.API, [], 'API:shutdown_runner:{"runner": "no-such-runner"}'),
            (
                "bad_state",
                Role.RUNNER,
                ['RUNNER:init:{"type": "a-conformance"}'],
                'RUNNER:init:{"type": "b"}',
            ),
        ]
        api_token = self.tokens.get(Role.API)
        also_open = [r for r in (Role.WEB, Role.RUNNER) if self.tokens.get(r) in (None, api_token)]
        if also_open:  # the API connection may use another role too: mix them
            other = "WEB:get_runners:" if also_open[0] is Role.WEB else "RUNNER:unregister:"
            cases.append(("role_mismatch", Role.API, ["API:get_runners:"], other))
        seen = set()
        for code, role, before, frame in cases:
            wire = await self.open(role)
            for first in before:
                await wire.send(first)
                await wire.recv(self.timeout)
            await wire.send(frame)
            answer = await wire.recv(self.timeout)
            _check(not isinstance(answer, Closed), f"{code}: the connection closed instead")
            _check(answer.COMMAND == "error" and answer.code == code, f"{code}: got {answer!r}")
            seen.add(code)
        unauthorized = self.tokens.get(Role.API) and self.tokens.get(Role.WEB) != self.tokens.get(
            Role.API
        )
        if unauthorized:
            wire = await self.open(Role.WEB)
            await wire.send("API:get_runners:")
            answer = await wire.recv(self.timeout)
            _check(getattr(answer, "code", None) == "unauthorized", f"unauthorized: got {answer!r}")
            closed = await wire.recv(self.timeout)
            _check(
                isinstance(closed, Closed) and closed.code == 1008,
                "unauthorized did not close with 1008",
            )
            seen.add("unauthorized")
        if await self._rate_limited():
            seen.add("rate_limited")
        missing = {c.value for c in ErrorCode} - seen
        # Codes that only some settings can produce: not checked, saying
        # which setting would produce them. Any other code missing fails.
        needs = {
            "unauthorized": "not checked: give --api-token and --web-token of a server whose"
            " API and WEB tokens differ",
            "role_mismatch": "not checked: give a token that opens two roles (or none, to a"
            " server with open roles)",
            "unavailable": "not checked: only a cluster node that cannot reach its Redis"
            " produces it",
        }
        failed = sorted(code for code in missing if code not in needs)
        _check(not failed, f"never produced: {', '.join(failed)}")
        notes = [f"{code} {needs[code]}" for code in sorted(missing)]
        return f"{len(seen)} codes" + (f" ({'; '.join(notes)})" if notes else "")

    async def _rate_limited(self) -> bool:
        """Past the request budget (2,000 at once, docs/protocol.md §4), a
        request is answered rate_limited."""
        front = await self.open(Role.WEB)
        count = 2_200
        for i in range(count):
            if not await front.send(f'WEB:get_runners:{{"req": "b{i}"}}'):
                break
        limited = False
        async with asyncio.timeout(self.timeout + 10):
            for _ in range(count):
                answer = await front.recv(self.timeout)
                if isinstance(answer, Closed):
                    raise _Fail(f"the connection closed ({answer.code}) during a burst")
                if getattr(answer, "code", None) == "rate_limited":
                    _check(answer.req is not None, "rate_limited without the request's req")
                    limited = True
        _check(limited, f"{count} requests at once were all answered: the budget is 2,000")
        return True

    # -- the rules of registration, resume and acknowledgement (§2, §5.4) --------------

    async def session_secret(self) -> str:
        t = self.fresh_type()
        one, ready1 = await self.runner(t)
        _two, ready2 = await self.runner(t)
        for ready in (ready1, ready2):
            _check(
                isinstance(ready.session, str) and len(ready.session) >= 16,
                f"session {ready.session!r}: a random secret (§5.6)",
            )
        _check(ready1.session != ready2.session, "two registrations got the same session")
        await one.send(f'RUNNER:init:{{"type": {json.dumps(t)}, "protocol": 1}}')
        again = await self.expect(one, "ready")
        _check(
            again.session == ready1.session and again.runner == ready1.runner,
            "a repeated identical init is a no-op and gets the same ready",
        )
        return "a new secret for each registration"

    async def resume_refused(self) -> str:
        runner, api, build, ready = await self._running_build()
        _other_runner, _api2, _other, other_ready = await self._running_build()
        await runner.close()
        wrong = [
            ("a wrong secret", "x" + ready.session),
            ("another build's secret", other_ready.session),
            ("a secret of one character", "x"),
        ]
        for what, secret in wrong:
            resume = f', "resume": {{"build": "{build}", "session": {json.dumps(secret)}}}'
            _wire, refused = await self.runner(self.fresh_type(), resume)
            _check(refused.resume is None, f"a resume with {what} was accepted")
        info = await self.build(api, build)
        _check(
            info.state is BuildState.RUNNING and info.runner == ready.runner,
            f"a refused resume changed the build: {info!r}",
        )
        resume = f', "resume": {{"build": "{build}", "session": {json.dumps(ready.session)}}}'
        back, accepted = await self.runner(self.fresh_type(), resume)
        _check(
            accepted.resume is not None and accepted.resume.build == build,
            "the right secret, after refused ones, was refused",
        )
        _check(accepted.session != ready.session, "a resume got the old session again")
        await back.send('RUNNER:process:{"finished": true, "success": true}')
        return f"{len(wrong)} wrong secrets refused, the right one accepted"

    async def resume_elsewhere(self) -> str:
        runner, api, build, ready = await self._running_build()
        await self.ask(api, f'API:cancel:{{"build": "{build}"}}')
        await self.expect(runner, "cancel")
        resume = f', "resume": {{"build": "{build}", "session": {json.dumps(ready.session)}}}'
        new, accepted = await self.runner(self.fresh_type(), resume)
        _check(accepted.resume is not None, "a resume with the old connection open was refused")
        closed = None
        try:
            async with asyncio.timeout(self.timeout):
                while not isinstance(closed, Closed):
                    closed = await runner.recv(self.timeout)
        except (TimeoutError, WireTimeout):
            raise _Fail(
                "the old connection stayed open after a resume elsewhere: it is closed with 4002"
            ) from None
        _check(closed.code == 4002, f"the old connection closed with {closed.code}, not 4002")
        cancel = await self.expect(new, "cancel", skip=("ack",))
        _check(cancel.build == build, "cancel: on the resumed connection named another build")
        await new.send('RUNNER:process:{"finished": true, "success": false}')
        await self.until_state(api, build, {BuildState.CANCELLED}, self.timeout)
        return "4002 to the old connection, cancel: sent again"

    async def acks(self) -> str:
        t = self.fresh_type()
        runner, ready = await self.runner(t, protocol=2)
        _check(ready.protocol == 2, f"a runner that asked for protocol 2 got {ready.protocol}")
        api = await self.open(Role.API)
        build = await self.submit(api, t)
        await self.expect(runner, "run")
        for i in range(1, 6):
            chunk = {"finished": False, "log": f"a{i}", "build": build, "seq": i}
            await runner.send("RUNNER:process:" + json.dumps(chunk))
        acked = 0
        try:
            async with asyncio.timeout(self.timeout):
                while acked < 5:
                    ack = await runner.expect("ack", self.timeout)
                    _check(ack.build == build, f"an ack names build {ack.build}")
                    _check(
                        ack.seq is not None and acked <= ack.seq <= 5,
                        f"ack {ack!r} after {acked}",
                    )
                    acked = ack.seq
        except (TimeoutError, WireTimeout):
            raise _Fail(
                f"chunks 1..5 acknowledged up to {acked} only within {self.timeout:g} s: a"
                " protocol 2 runner's chunks get ack: once stored (§2.2)"
            ) from None
        await runner.send(
            f'RUNNER:process:{{"finished": true, "success": true, "build": "{build}"}}'
        )
        try:
            done = await runner.expect("ack", self.timeout)
        except (TimeoutError, WireTimeout):
            raise _Fail("no ack: with finished: true for the result (§2.2)") from None
        _check(done.finished and done.build == build, f"the result's ack is {done!r}")
        await self.until_state(api, build, {BuildState.SUCCESS}, self.timeout)
        return "protocol 2, chunks and the result acknowledged"

    async def no_acks_protocol_1(self) -> None:
        runner, _api, _build, ready = await self._running_build()
        _check(ready.protocol == 1, f"a protocol 1 runner was answered protocol {ready.protocol}")
        for i in range(1, 4):
            await runner.send(f'RUNNER:process:{{"finished": false, "log": "x", "seq": {i}}}')
        await runner.send('RUNNER:process:{"finished": true, "success": true}')
        await self.quiet(runner, {"ack", "error"}, 0.5)

    async def cancel_final(self) -> None:
        runner, api, build, _ = await self._running_build()
        await runner.send('RUNNER:process:{"finished": true, "success": true}')
        await self.until_state(api, build, {BuildState.SUCCESS}, self.timeout)
        reply = await self.ask(api, f'API:cancel:{{"build": "{build}"}}')
        _check(
            reply.COMMAND == "error" and reply.code == "bad_state",
            f"cancel of a finished build got {reply!r}, expected bad_state",
        )
        info = await self.build(api, build)
        _check(info.state is BuildState.SUCCESS, f"the finished build became {info.state}")

    async def shutdown_idle(self) -> None:
        api = await self.open(Role.API)
        reply = await self.ask(api, 'API:shutdown_runner:{"runner": "no-such-runner"}')
        _check(
            reply.COMMAND == "error" and reply.code == "unknown_runner",
            f"shutdown_runner of an unknown runner got {reply!r}",
        )
        t = self.fresh_type()
        runner, ready = await self.runner(t)
        reply = await self.ask(api, f'API:shutdown_runner:{{"runner": "{ready.runner}"}}')
        _check(reply.COMMAND == "runners", f"shutdown_runner got {reply!r}")
        await self.expect(runner, "shutdown")
        listed = (await self.ask(api, "API:get_runners:")).runners
        _check(
            all(r.id != ready.runner for r in listed),
            "an idle runner told to shut down is still listed: it is removed at once",
        )
        build = await self.submit(api, t)
        await self.quiet(runner, {"run"}, 0.3)
        await self.ask(api, f'API:cancel:{{"build": "{build}"}}')

    async def shutdown_busy(self) -> None:
        runner, api, build, ready = await self._running_build()
        t = (await self.build(api, build)).type
        reply = await self.ask(api, f'API:shutdown_runner:{{"runner": "{ready.runner}"}}')
        _check(reply.COMMAND == "runners", f"shutdown_runner got {reply!r}")
        await self.expect(runner, "shutdown")
        waiting = await self.submit(api, t)
        listed = (await self.ask(api, "API:get_runners:")).runners
        _check(
            any(r.id == ready.runner and r.state.value == "RUNNING" for r in listed),
            "a busy runner told to shut down must stay RUNNING until its result",
        )
        await runner.send('RUNNER:process:{"finished": true, "success": true, "leave": true}')
        await self.until_state(api, build, {BuildState.SUCCESS}, self.timeout)
        await self.quiet(runner, {"run"}, 0.5)
        info = await self.build(api, waiting)
        _check(
            info.state is BuildState.QUEUED, f"the next build went to a leaving runner: {info!r}"
        )
        listed = (await self.ask(api, "API:get_runners:")).runners
        _check(all(r.id != ready.runner for r in listed), "the runner is listed after leave")
        await self.ask(api, f'API:cancel:{{"build": "{waiting}"}}')

    async def seq_rules(self) -> None:
        runner, api, build, _ = await self._running_build()
        for seq in (1, 2):
            await runner.send(
                f'RUNNER:process:{{"finished": false, "log": "s{seq}", "seq": {seq}}}'
            )
        await runner.send('RUNNER:process:{"finished": false, "log": "again", "seq": 2}')
        try:
            await self.quiet(runner, {"error"}, 0.3)
        except _Fail as exc:
            raise _Fail(f"a seq sent again was answered ({exc}): it is ignored silently") from None
        stored = (await self.build(api, build)).log_seq
        _check(stored == 2, f"a seq sent again was stored again (log_seq {stored}): it is ignored")
        await runner.send('RUNNER:process:{"finished": false, "log": "s4", "seq": 4}')
        try:
            answer = await runner.recv(self.timeout)
        except WireTimeout:
            answer = None
        _check(
            getattr(answer, "code", None) == "bad_state",
            f"a seq that leaves a gap got {answer!r}, expected bad_state",
        )
        await runner.send('RUNNER:process:{"finished": false, "log": "s3", "seq": 3}')
        await runner.send('RUNNER:process:{"finished": true, "success": true}')
        info = await self.until_state(api, build, {BuildState.SUCCESS}, self.timeout)
        _check(info.log_seq == 3, f"stored {info.log_seq} chunks, expected 3 (1, 2, 3)")
        front = await self.open(Role.WEB)
        await self.ask(front, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
        chunks = await self.follow_log(front, build, 3)
        _check([t for _, t in chunks] == ["s1", "s2", "s3"], f"the log is {chunks}")

    async def unregister(self) -> None:
        runner, api, build, _ = await self._running_build()
        await runner.send("RUNNER:unregister:")
        await self.ask(api, "API:get_runners:")  # after the unregister, on the server
        await asyncio.sleep(0.1)
        info = await self.build(api, build)
        _check(
            info.state is BuildState.LOST
            or (info.state is BuildState.QUEUED and info.attempt == 2),
            f"after unregister the build is {info.state} (attempt {info.attempt}): unregister"
            " loses it at once, without the lost-grace period (§5.4)",
        )
        if info.state is BuildState.QUEUED:
            await self.ask(api, f'API:cancel:{{"build": "{build}"}}')

    async def requeue(self) -> str:
        runner, api, build, _ = await self._running_build()
        front = await self.feed()
        await runner.send("RUNNER:unregister:")
        changes = await self.states_of(front, build, lambda b: b.state is not BuildState.RUNNING)
        last = changes[-1]
        if last.state is BuildState.LOST:
            try:
                await self.quiet(front, {"state"}, 0.3)  # lost for good: nothing follows
            except _Fail:
                raise _Fail(
                    "the requeue was announced as lost, then queued: a requeue is one change"
                    " (queued, attempt 2), never a lost that looks final (§5.4)"
                ) from None
            return "lost (the server does not requeue)"
        _check(
            last.state is BuildState.QUEUED and last.attempt == 2 and last.runner is None,
            f"a requeue is one change to queued, attempt 2, no runner: got {last!r}",
        )
        info = await self.build(api, build)
        _check(
            info.state is BuildState.QUEUED and info.attempt == 2,
            f"after the requeue get_build says {info.state}, attempt {info.attempt}:"
            " expected queued, attempt 2",
        )
        await self.ask(api, f'API:cancel:{{"build": "{build}"}}')
        return "one change: queued, attempt 2"

    # -- listings, dispatch, logs (§3, §5.2, §5.5) ----------------------------------------

    async def builds_order(self) -> None:
        api = await self.open(Role.API)
        t = self.fresh_type()
        made = [await self.submit(api, t) for _ in range(4)]
        reply = await self.ask(api, '{"limit": 100}'.join(("API:get_builds:", "")))
        ids = [b.id for b in reply.builds if b.id in made]
        _check(ids == made[::-1], f"get_builds: {ids}, expected newest first {made[::-1]}")
        page = await self.ask(api, f'API:get_builds:{{"limit": 2, "before": "{made[3]}"}}')
        _check(
            [b.id for b in page.builds] == [made[2], made[1]],
            f"the page before {made[3]}: {[b.id for b in page.builds]}",
        )
        for build in made:
            await self.ask(api, f'API:cancel:{{"build": "{build}"}}')

    async def dispatch_longest_waiting(self) -> None:
        t = self.fresh_type()
        first, _ = await self.runner(t)
        await asyncio.sleep(0.05)
        second, _ = await self.runner(t)
        api = await self.open(Role.API)
        build = await self.submit(api, t)
        try:
            await self.quiet(second, {"run"}, 0.3)
        except _Fail:
            raise _Fail(
                "the build went to the runner that waited least: the longest waiting gets it (§5.2)"
            ) from None
        run = await self.expect(first, "run")
        _check(run.build == build, "the first runner got another build")
        await first.send('RUNNER:process:{"finished": true, "success": true}')
        # Now the second runner has waited longest.
        again = await self.submit(api, t)
        run = await self.expect(second, "run")
        _check(run.build == again, "the next build did not go to the runner that waited longest")
        await second.send('RUNNER:process:{"finished": true, "success": true}')

    async def log_time(self) -> None:
        runner, _api, build, _ = await self._running_build()
        front = await self.open(Role.WEB)
        await self.ask(front, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
        before = time.time()
        await runner.send('RUNNER:process:{"finished": false, "log": "when"}')
        async with asyncio.timeout(self.timeout):
            while True:
                message = await front.recv(self.timeout)
                if isinstance(message, Closed):
                    raise _Fail("the front's connection closed")
                if message.COMMAND == "log":
                    break
        _check(message.time is not None, "a live log: frame has no time")
        from datetime import datetime

        when = datetime.fromisoformat(message.time.replace("Z", "+00:00")).timestamp()
        _check(
            abs(when - before) < 60 and message.time.endswith("Z") and len(message.time) == 24,
            f"time {message.time!r}: RFC 3339 UTC with milliseconds, when it was received",
        )
        await runner.send('RUNNER:process:{"finished": true, "success": true}')

    async def runner_gone(self) -> None:
        front = await self.feed()
        runner, ready = await self.runner(self.fresh_type())
        await runner.close()
        async with asyncio.timeout(self.timeout):
            while True:
                message = await front.recv(self.timeout)
                if isinstance(message, Closed):
                    raise _Fail("the feed's connection closed")
                mine = message.COMMAND == "runner" and message.runner.id == ready.runner
                if mine and message.gone:
                    break
        api = await self.open(Role.API)
        listed = (await self.ask(api, "API:get_runners:")).runners
        _check(all(r.id != ready.runner for r in listed), "a runner that left is still listed")

    async def limits(self) -> str:
        api = await self.open(Role.API)
        t = self.fresh_type()
        limit = 256 * 1024

        def run_frame(size: int) -> str:
            head = f'{{"repo": "r", "type": "{t}", "script": ["'
            tail = '"]}'
            return "API:run:" + head + "x" * (size - len(head) - len(tail)) + tail

        fits = run_frame(limit)
        await api.send(fits)
        answer = await api.recv(self.timeout)
        _check(answer.COMMAND == "queued", f"a build definition of 256 KiB got {answer!r}")
        await self.ask(api, f'API:cancel:{{"build": "{answer.build}"}}')
        await api.send(run_frame(limit + 1))
        answer = await api.recv(self.timeout)
        _check(
            getattr(answer, "code", None) == "too_large",
            f"a build definition of 256 KiB + 1 byte got {answer!r}, expected too_large",
        )
        for size, ok in ((256, True), (257, False)):
            name = "é" * (size // 2) + "x" * (size % 2)  # bytes of UTF-8, not characters
            wire = await self.open(Role.RUNNER)
            await wire.send("RUNNER:init:" + json.dumps({"type": name, "protocol": 1}))
            answer = await wire.recv(self.timeout)
            got = answer.COMMAND == "ready"
            _check(got == ok, f"a type of {size} bytes (UTF-8) got {answer!r}")
        for size, echoed in ((256, True), (257, False)):
            req = "r" * size
            await api.send("API:get_runners:" + json.dumps({"req": req}))
            answer = await api.recv(self.timeout)
            if echoed:
                _check(answer.req == req, f"a req of {size} bytes was not echoed: {answer!r}")
            else:
                _check(
                    answer.COMMAND == "error" and answer.req is None,
                    f"a req of {size} bytes got {answer!r}: refused, and not echoed",
                )
        await api.send('API:get_build:{"build": "no-such-build", "req": "echo-me"}')
        answer = await api.recv(self.timeout)
        _check(
            answer.COMMAND == "error" and answer.req == "echo-me",
            f"an error's req was not echoed: {answer!r}",
        )
        return "build definition, type and req at their limits"

    async def values(self) -> str:
        """docs/protocol.md §1.1 and §5.6: what an integer, a name and a
        secret are, at their edges."""
        api = await self.open(Role.API)
        t = self.fresh_type()
        cases: list[tuple[str, str, bool]] = [
            ("an integer written 2.0", '{"type": "T", "protocol": 2.0}', False),
            ("an integer written 5e1", '{"type": "T", "protocol": 5e1}', False),
            ("an integer of 2^53 + 1", '{"type": "T", "protocol": 9007199254740993}', False),
            ("null for an optional key", '{"type": "T", "protocol": null}', True),
            ("a lone surrogate", '{"type": "T", "name": "\\ud800"}', False),
            ("a name of 256 bytes", '{"type": "T", "name": "' + "é" * 128 + '"}', True),
            ("a name of 257 bytes", '{"type": "T", "name": "' + "é" * 128 + 'x"}', False),
        ]
        for what, payload, ok in cases:
            wire = await self.open(Role.RUNNER)
            await wire.send("RUNNER:init:" + payload.replace("T", t))
            answer = await wire.recv(self.timeout)
            if ok:
                _check(answer.COMMAND == "ready", f"init with {what} got {answer!r}")
            else:
                _check(
                    getattr(answer, "code", None) == "invalid_payload",
                    f"init with {what} got {answer!r}, expected invalid_payload",
                )
        secrets_cases = [("abc", False), ("😀😀", False), ("😀😀😀😀", True)]
        for value, ok in secrets_cases:
            body = {"repo": "r", "script": [], "type": t, "secrets": {"S": value}}
            reply = await self.ask(api, "API:run:" + json.dumps(body, ensure_ascii=False))
            if ok:
                _check(reply.COMMAND == "queued", f"a secret of 4 characters got {reply!r}")
                await self.ask(api, f'API:cancel:{{"build": "{reply.build}"}}')
            else:
                _check(
                    getattr(reply, "code", None) == "invalid_payload",
                    f"a secret {value!r} ({len(value)} characters) got {reply!r}: at least 4"
                    " characters, counted in code points",
                )
        return "integers, null, surrogates, names and secrets at their edges"

    async def cancelling_lost(self) -> None:
        runner, api, build, _ = await self._running_build()
        await self.ask(api, f'API:cancel:{{"build": "{build}"}}')
        await self.expect(runner, "cancel")
        await runner.send("RUNNER:unregister:")
        await self.ask(api, "API:get_runners:")
        info = await self.build(api, build)
        _check(
            info.state is BuildState.CANCELLED,
            f"a cancelling build whose runner is lost is {info.state}: it becomes cancelled (§5.4)",
        )

    async def feed_once(self) -> None:
        """A connection that follows a build and the feed gets each state: once."""
        front = await self.feed()
        runner, _api, build, _ = await self._running_build()
        await self.ask(front, f'WEB:subscribe:{{"build": "{build}", "from": 0}}')
        await runner.send('RUNNER:process:{"finished": true, "success": true}')
        seen: list[Any] = []
        async with asyncio.timeout(self.timeout):
            while not any(b.state is BuildState.SUCCESS for b in seen):
                message = await front.recv(self.timeout)
                if isinstance(message, Closed):
                    raise _Fail("the front's connection closed")
                if message.COMMAND == "state" and message.build.id == build:
                    seen.append(message.build)
        with contextlib.suppress(WireTimeout):
            while True:
                message = await front.recv(0.3)
                if isinstance(message, Closed):
                    break
                if message.COMMAND == "state" and message.build.id == build:
                    seen.append(message.build)
        finals = [b for b in seen if b.state is BuildState.SUCCESS]
        _check(
            len(finals) == 1,
            f"the success of a build followed twice (the build and the feed) came"
            f" {len(finals)} times: each state: once per connection (§5.5)",
        )

    async def model(self) -> str:
        """``citron fuzz --model`` as a check: the server's answers to
        ``--model N`` frames equal the reference model's (the server must be
        fresh, with citron's default settings)."""
        if not self.model_frames:
            raise _Skip(
                "give --model N to compare N frames with the reference model"
                " (a fresh server with citron's default settings)"
            )
        try:
            import hypothesis  # noqa: F401
        except ImportError:
            raise _Skip("needs the fuzz extra: pip install 'citron[fuzz]'") from None
        from .model import ModelFuzzer

        fuzzer = ModelFuzzer(
            self.url, self.tokens, frames=self.model_frames, seed=1, ca=self.ca, stop_after=1
        )
        report = await fuzzer.run()
        if report.differences:
            d = report.differences[0]
            raise _Fail(
                f"step {d.step}: after {d.sent[:200]!r} the model sent {d.expected} on"
                f" {d.role}, the server {d.got} (citron fuzz URL --model --seed 1"
                f" --frames {self.model_frames} shows them all)"
            )
        return f"{report.steps} frames, {report.compared} answers equal the model's"

    async def permissions(self) -> None:
        front = await self.open(Role.WEB)
        for frame in ('WEB:run:{"repo": "r", "script": []}', 'WEB:cancel:{"build": "x"}'):
            reply = await self.ask(front, frame)
            _check(reply.COMMAND == "error" and reply.code == "forbidden", f"{frame} got {reply!r}")
        reply = await self.ask(front, "WEB:get_runners:")
        _check(reply.COMMAND == "runners", "the front cannot read runners")


# -- the runner side -------------------------------------------------------------------

#: Seconds a runner is given to exit after SIGTERM before it gets SIGKILL.
STOP_GRACE = 5.0
#: Seconds a runner that was told to leave is watched for a new connection.
REJOIN_WATCH = 2.0
#: Lines of the runner's stderr shown with a failed check.
STDERR_LINES = 25


class _Stage:
    """One check's world: a scripted server on a free loopback port and a
    fresh runner process connected to it, stopped (SIGTERM, then SIGKILL)
    when the check ends. The runner's stderr goes to a file, shown when the
    check fails."""

    def __init__(self, command: list[str], workdir: Path, timeout: float) -> None:
        self.command = command
        self.workdir = workdir
        self.timeout = timeout
        self.stderr_path = workdir / "stderr.txt"
        self.incoming: asyncio.Queue[tuple[ServerConnection, str | None]] = asyncio.Queue()
        self.connections: list[ServerConnection] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.protocol = 1  # what the scripted server speaks with this runner
        self.killed = False
        self.resent = 0  # chunks sent again that were stored already (ignored)
        self.exited: int | None = None  # the exit status, when it ended before the stop
        self.current: ServerConnection | None = None  # the connection of the last init
        self._server: Any = None

    async def start(self) -> None:
        self._server = await serve(
            self._handler, "127.0.0.1", 0, compression=None, max_size=8 * 1024 * 1024
        )
        port = self._server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}/ws"
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [*self.command, url],
                env={**os.environ, "CITRON_URL": url},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None:
            self.exited = proc.poll()
        if proc is not None and proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.killed = True
                self._signal(signal.SIGKILL)
                await asyncio.to_thread(proc.wait, 10)
        elif proc is not None:
            self._signal(signal.SIGKILL)  # what it left behind in its group
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stderr_tail(self) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        lines = text.rstrip().splitlines()[-STDERR_LINES:]
        if self.exited is not None:
            lines.append(f"(the runner exited with {self.exited} before the check ended)")
        elif self.killed:
            lines.append(f"(the runner was still running {STOP_GRACE:g} s after SIGTERM: killed)")
        return "\n".join(lines)

    async def _handler(self, ws: ServerConnection) -> None:
        self.connections.append(ws)
        try:
            async for text in ws:
                await self.incoming.put((ws, text if isinstance(text, str) else None))
        except ConnectionClosed:
            pass
        await self.incoming.put((ws, None))

    async def next(self, timeout: float | None = None) -> tuple[ServerConnection, Any, str]:
        """The next frame (decoded, and as sent); None at a close."""
        wait = self.timeout if timeout is None else timeout
        try:
            ws, text = await asyncio.wait_for(self.incoming.get(), wait)
        except TimeoutError:
            exit = self.proc.poll() if self.proc is not None else None
            if exit is not None:
                raise _Fail(f"the runner exited with {exit}") from None
            raise _Fail(f"the runner sent nothing for {wait:g} s") from None
        if text is None:
            return ws, None, ""
        try:
            return ws, decode_client(text), text
        except ProtocolError as exc:
            raise _Fail(f"the runner sent a bad frame: {exc}: {text[:200]!r}") from None

    async def init(
        self, stale: ServerConnection | None = None
    ) -> tuple[ServerConnection, RunnerInit, str]:
        """The runner's init on a new connection (what ``stale`` still had
        in flight is skipped)."""
        while True:
            ws, message, text = await self.next()
            if message is None or ws is stale:
                continue
            _check(isinstance(message, RunnerInit), f"the first frame is not init: {text[:200]!r}")
            self.current = ws
            return ws, message, text

    async def register(self) -> tuple[ServerConnection, RunnerInit, str]:
        """init, answered with ready; returns the connection, init, session."""
        ws, init, _ = await self.init()
        self.protocol = 2 if init.protocol >= 2 else 1
        session = "session-" + secrets.token_hex(8)
        await ws.send(json_frame("ready", runner="r-1", protocol=self.protocol, session=session))
        return ws, init, session

    async def collect(
        self,
        build: str,
        logs: list[RunnerLog] | None = None,
        stored: int = 0,
        timeout: float | None = None,
    ) -> tuple[list[RunnerLog], RunnerFinished | None]:
        """Chunks of ``build`` until its result (None: the connection closed).

        A chunk with a ``seq`` up to ``stored`` (or up to the last one kept)
        is a resend and is ignored, as a server does; a gap fails."""
        logs = [] if logs is None else logs
        last = stored
        while True:
            ws, message, text = await self.next(timeout)
            if ws is not self.current:
                continue  # what an old connection still had in flight
            if message is None:
                return logs, None
            if isinstance(message, RunnerFinished):
                _check(message.build in (None, build), f"the result names build {message.build}")
                if self.protocol >= 2:
                    await _send(ws, json_frame("ack", build=build, finished=True))
                return logs, message
            _check(isinstance(message, RunnerLog), f"unexpected during a build: {text[:200]!r}")
            _check(message.build in (None, build), f"a chunk names build {message.build}")
            if message.seq is not None:
                if message.seq <= last:
                    self.resent += 1
                    continue  # stored already: ignored
                _check(message.seq == last + 1, f"seq {message.seq} after {last}: a gap")
                last = message.seq
            logs.append(message)

    async def left(self, ws: ServerConnection) -> str:
        """The runner closes ``ws`` and does not come back for a while."""
        while True:
            try:
                peer, message, text = await self.next()
            except _Fail as exc:
                raise _Fail(
                    f"the runner did not close its connection after shutdown: ({exc})"
                ) from None
            if peer is ws and message is None:
                break
            _check(
                peer is ws and not isinstance(message, RunnerInit),
                f"the runner went on after shutdown: {text[:200]!r}",
            )
        with contextlib.suppress(_Fail):
            peer, message, text = await self.next(REJOIN_WATCH)
            raise _Fail(f"the runner came back after shutdown: {text[:200]!r}")
        exit = self.proc.poll() if self.proc is not None else None
        return "closed, did not come back" + (f", exited {exit}" if exit is not None else "")


async def _send(ws: ServerConnection, text: str) -> None:
    with contextlib.suppress(ConnectionClosed):
        await ws.send(text)


def _text(logs: Sequence[RunnerLog]) -> str:
    return "".join(m.log for m in logs)


def _last_seq(logs: Sequence[RunnerLog]) -> int:
    return max((m.seq for m in logs if m.seq is not None), default=0)


#: The runner checks that need its script lines run as shell commands, and
#: what for; ``--protocol-only`` skips them (a device runner, say).
SHELL_CHECKS: dict[str, str] = {
    "failing_script": "a line that runs `exit 3`",
    "secret_masking": "lines that print a secret from the environment",
    "cancel": "a line that runs `sleep`",
    "shutdown_busy": "a line that runs `sleep`",
    "reconnect_resume": "a shell loop that prints for 2 s",
    "acks": "a shell loop that prints for 2 s",
    "pipefail": "the script semantics of docs/protocol.md §5.7.1",
    "errexit": "the script semantics of docs/protocol.md §5.7.1",
    "shell_state": "the script semantics of docs/protocol.md §5.7.1",
    "steps": "the script semantics of docs/protocol.md §5.7.1",
    "background": "the script semantics of docs/protocol.md §5.7.1",
}


class RunnerConformance:
    """Plays a scripted server on a free loopback port and checks a runner.

    Each check starts the runner command afresh, with the URL as its last
    argument and in ``CITRON_URL``, and stops it at the end (SIGTERM, then
    SIGKILL). Builds use a git repository made in a temp directory
    (``file://``), scripts of plain shell lines (``echo``, ``sleep``,
    ``printf``, ``exit``), and the checks of docs/protocol.md §5.7.1 (one
    shell session, errexit, pipefail, steps, background processes ended).
    With ``protocol_only``, the checks that need shell lines
    (:data:`SHELL_CHECKS`) are skipped, saying why: for a runner whose lines
    are not shell commands.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        cancel_grace: float = 10.0,
        timeout: float = 10.0,
        only: Sequence[str] = (),
        protocol_only: bool = False,
    ) -> None:
        self.command = list(command)
        self.cancel_grace = cancel_grace
        self.timeout = timeout
        self.only = list(only)
        self.protocol_only = protocol_only
        self.repo = ""

    @property
    def checks(self) -> list[tuple[str, Callable[[_Stage], Awaitable[str | None]]]]:
        return [
            ("init", self.check_init),
            ("protocol", self.check_protocol),
            ("build_and_log", self.check_build),
            ("failing_script", self.check_failure),
            ("secret_masking", self.check_secrets),
            ("cancel", self.check_cancel),
            ("shutdown_idle", self.check_shutdown_idle),
            ("shutdown_busy", self.check_shutdown_busy),
            ("reconnect_resume", self.check_resume),
            ("acks", self.check_acks),
            ("pipefail", self.check_pipefail),
            ("errexit", self.check_errexit),
            ("shell_state", self.check_shell_state),
            ("steps", self.check_steps),
            ("background", self.check_background),
        ]

    async def run(self) -> list[CheckResult]:
        results = []
        with tempfile.TemporaryDirectory(prefix="citron-conformance-") as tmp:
            self.repo = _make_repo(Path(tmp))
            for i, (name, check) in enumerate(self.checks):
                if self.only and name not in self.only:
                    continue
                if self.protocol_only and name in SHELL_CHECKS:
                    why = f"--protocol-only: needs {SHELL_CHECKS[name]}"
                    results.append(CheckResult(name, SKIP, why))
                    continue
                workdir = Path(tmp) / f"check-{i}"
                workdir.mkdir()
                stage = _Stage(self.command, workdir, self.timeout)
                try:
                    await stage.start()
                    [result] = await _run_checks(
                        [(name, functools.partial(check, stage))],
                        4 * self.timeout + self.cancel_grace,
                    )
                finally:
                    await stage.stop()
                if result.status == FAIL:
                    result = attrs.evolve(result, output=stage.stderr_tail())
                results.append(result)
        return results

    def run_frame(self, build: str, script: list[str], **extra: Any) -> str:
        return json_frame("run", build=build, repo=self.repo, script=script, **extra)

    async def _output_until(
        self, stage: _Stage, build: str, needle: str, logs: list[RunnerLog], chunks: int = 1
    ) -> None:
        """Chunks of ``build`` into ``logs`` until ``needle`` was printed, in
        at least ``chunks`` chunks."""
        while needle not in _text(logs) or len(logs) < chunks:
            _, message, text = await stage.next()
            _check(message is not None, "the connection closed during the build")
            _check(isinstance(message, RunnerLog), f"expected output, got {text[:200]!r}")
            _check(message.build in (None, build), f"a chunk names build {message.build}")
            logs.append(message)

    async def check_init(self, stage: _Stage) -> str:
        _, init, _ = await stage.init()
        _check(bool(init.type), "init has no type")
        return f"type {init.type}, name {init.name or '-'}"

    async def check_protocol(self, stage: _Stage) -> str:
        _, init, text = await stage.init()
        payload = json.loads(text.split(":", 2)[2])
        _check(
            "protocol" in payload,
            "init has no protocol: the server must treat it as the legacy runner (protocol 0)",
        )
        _check(init.protocol >= 1, f"init says protocol {init.protocol}: the legacy runner")
        return f"protocol {init.protocol}"

    async def check_build(self, stage: _Stage) -> None:
        ws, _, _ = await stage.register()
        await ws.send(self.run_frame("b-1", ["echo conformance-one", "echo conformance-two"]))
        logs, finished = await stage.collect("b-1")
        _check(finished is not None, "the connection closed before the result")
        assert finished is not None
        text = _text(logs)
        _check(
            "conformance-one" in text and "conformance-two" in text,
            f"the output is missing from {text[-300:]!r}",
        )
        _check(finished.success, "a build of echo lines reported failure")

    async def _result(
        self, stage: _Stage, script: list[str], timeout: float | None = None
    ) -> tuple[str, RunnerFinished]:
        """Run ``script`` as build b-1: its output and result."""
        ws, _, _ = await stage.register()
        await ws.send(self.run_frame("b-1", script))
        logs, finished = await stage.collect("b-1", timeout=timeout)
        _check(finished is not None, "the connection closed before the result")
        assert finished is not None
        return _text(logs), finished

    @staticmethod
    def _exit_code(finished: RunnerFinished, expected: int, why: str) -> str:
        """Check the result's exit_code, if it has one."""
        if finished.exit_code is None:
            return ", no exit_code"
        _check(
            finished.exit_code == expected,
            f"exit_code {finished.exit_code}, expected {expected}: {why}",
        )
        return f", exit_code {expected}"

    async def check_failure(self, stage: _Stage) -> str:
        # (`$((...))` prints what the line's own text does not hold: a section
        # title or an echo of the command never passes for its output.)
        script = ["echo conformance-$((1+1))", "exit 3", "echo conformance-$((2+2))"]
        text, finished = await self._result(stage, script)
        _check("conformance-2" in text, "the first line's output is missing")
        _check(not finished.success, "a script with a line that exits 3 reported success")
        _check(
            "conformance-4" not in text,
            "the line after the failing one ran: the first failing line ends the script"
            " (docs/protocol.md §5.7.1)",
        )
        more = self._exit_code(finished, 3, "the failing line's status")
        return "failure reported, later lines not run" + more

    async def check_pipefail(self, stage: _Stage) -> str:
        script = ["sh -c 'echo conformance-piped; exit 4' | cat", "echo conformance-$((3+3))"]
        text, finished = await self._result(stage, script)
        _check("conformance-piped" in text, f"the pipe's output is missing: {text[-300:]!r}")
        _check(
            not finished.success,
            "a pipe whose first command exits 4 reported success: without pipefail a"
            " failing test suite piped to `tail` is green (docs/protocol.md §5.7.1)",
        )
        _check("conformance-6" not in text, "the line after the failing pipe ran")
        return "a failing pipe fails the build" + self._exit_code(finished, 4, "pipefail")

    async def check_errexit(self, stage: _Stage) -> str:
        text, finished = await self._result(stage, ["false; echo conformance-$((6*7))"])
        _check(
            "conformance-42" not in text,
            "`false; echo x` printed x: the first failing command ends the script"
            " (errexit, docs/protocol.md §5.7.1)",
        )
        _check(not finished.success, "`false; echo x` reported success")
        return "`false; echo x` stops at false" + self._exit_code(finished, 1, "false's status")

    async def check_shell_state(self, stage: _Stage) -> str:
        script = [
            "mkdir -p conformance-dir && cd conformance-dir && export CONFORMANCE_VAR=kept;"
            " CONFORMANCE_LOCAL=here; conformance_fn() { echo fn-$((2+3)); }",
            'echo "state: $(basename "$PWD") $CONFORMANCE_VAR $CONFORMANCE_LOCAL"; conformance_fn',
        ]
        text, finished = await self._result(stage, script)
        _check(
            "state: conformance-dir kept here" in text,
            "the second line did not see the first one's cd, export and variable: the lines"
            f" run in one shell session (docs/protocol.md §5.7.1): {text[-300:]!r}",
        )
        _check("fn-5" in text, "a function defined on line 1 is unknown on line 2")
        _check(finished.success, f"the build failed: {text[-300:]!r}")
        return "cd, export, variables and functions carry over"

    async def check_steps(self, stage: _Stage) -> str:
        script = ["true", "sleep 0.3", "exit 3", "echo conformance-$((4+5))"]
        _, finished = await self._result(stage, script)
        _check(not finished.success, "a script with a line that exits 3 reported success")
        _check(
            finished.steps is not None,
            "the result has no steps: one per script line, with its state, exit code and"
            " duration (docs/protocol.md §2, the result)",
        )
        assert finished.steps is not None
        got = [(s.state.value, s.exit_code) for s in finished.steps]
        expected = [("passed", 0), ("passed", 0), ("failed", 3), ("skipped", None)]
        # (A passed line may leave its exit_code out.)
        got = [(state, 0 if state == "passed" and code is None else code) for state, code in got]
        _check(got == expected, f"steps {got}, expected {expected}")
        durations = [s.duration for s in finished.steps]
        _check(
            durations[1] is None or durations[1] >= 0.25,
            f"`sleep 0.3` took {durations[1]} s",
        )
        return "passed, passed, failed 3, skipped" + self._exit_code(finished, 3, "line 3")

    async def check_background(self, stage: _Stage) -> str:
        tag = f"{300 + secrets.randbelow(100)}.{secrets.randbelow(10**6):06d}"
        started = time.monotonic()
        text, finished = await self._result(
            stage, [f"sleep {tag} & echo conformance-$((3*3))"], timeout=self.timeout
        )
        took = time.monotonic() - started
        _check("conformance-9" in text, f"the line's output is missing: {text[-300:]!r}")
        _check(finished.success, f"the build failed: {text[-300:]!r}")
        left = _running(f"sleep {tag}")
        for _ in range(40):  # a moment to end them
            if not left:
                break
            await asyncio.sleep(0.05)
            left = _running(f"sleep {tag}")
        for pid in left or ():  # (this tool leaves nothing behind either)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        _check(
            not left,
            f"`sleep {tag}` started in the background still ran after the result: the"
            " runner ends what a script left running (docs/protocol.md §5.7.1)",
        )
        return f"ended {took:.1f} s after run:, nothing left running"

    async def check_secrets(self, stage: _Stage) -> str:
        ws, _, _ = await stage.register()
        value = "conf-" + secrets.token_hex(8)
        script = [
            'echo "whole: $CONFORMANCE_SECRET"',
            # half of it, a pause (the runner sends what it has), the rest
            "printf 'split: %.9s' \"$CONFORMANCE_SECRET\"; sleep 1;"
            " printf '%s\\n' \"${CONFORMANCE_SECRET#?????????}\"",
        ]
        secret = {"CONFORMANCE_SECRET": value}
        await ws.send(self.run_frame("b-1", script, secrets=secret))
        logs, finished = await stage.collect("b-1")
        _check(finished is not None, "the connection closed before the result")
        assert finished is not None
        text = _text(logs)
        _check(finished.success, f"the build failed: {text[-300:]!r}")
        _check("whole: " in text and "split: " in text, f"the output is missing: {text[-300:]!r}")
        _check("whole: ***" in text, f"a secret is not replaced with ***: {text[-300:]!r}")
        _check(value not in text, "a secret split across two chunks is in the log unmasked")
        _check(value[:9] not in text, "the first half of a secret split across chunks is unmasked")
        _check(
            "split: ***" in text,
            f"a secret split across chunks is not replaced with ***: {text[-300:]!r}",
        )
        return f"masked, also across {len(logs)} chunks"

    async def check_cancel(self, stage: _Stage) -> str:
        ws, _, _ = await stage.register()
        await ws.send(self.run_frame("b-1", ["echo started", "sleep 120"]))
        logs: list[RunnerLog] = []
        await self._output_until(stage, "b-1", "started", logs)
        await ws.send(json_frame("cancel", build="b-1"))
        sent = time.monotonic()
        logs, finished = await stage.collect(
            "b-1", logs, stored=_last_seq(logs), timeout=self.cancel_grace
        )
        _check(finished is not None, "the connection closed before the result")
        assert finished is not None
        _check(not finished.success, "a cancelled build reported success")
        return f"ended {time.monotonic() - sent:.1f} s after cancel"

    async def check_shutdown_idle(self, stage: _Stage) -> str:
        ws, _, _ = await stage.register()
        await asyncio.sleep(0.2)
        await ws.send("shutdown:")
        return await stage.left(ws)

    async def check_shutdown_busy(self, stage: _Stage) -> str:
        ws, _, _ = await stage.register()
        script = ["echo shutdown-start", "sleep 1", "echo shutdown-end"]
        await ws.send(self.run_frame("b-1", script))
        logs: list[RunnerLog] = []
        await self._output_until(stage, "b-1", "shutdown-start", logs)
        await ws.send("shutdown:")
        logs, finished = await stage.collect("b-1", logs, stored=_last_seq(logs))
        _check(finished is not None, "the connection closed before the build's result")
        assert finished is not None
        _check(
            "shutdown-end" in _text(logs),
            "the build was stopped: shutdown: lets the build in flight finish",
        )
        _check(finished.success, "the build reported failure")
        _check(finished.leave, 'the result of the last build has no "leave": true')
        return await stage.left(ws)

    async def check_resume(self, stage: _Stage) -> str:
        ws, _, session = await stage.register()
        script = ["for i in $(seq 1 40); do echo resume-line-$i; sleep 0.05; done"]
        await ws.send(self.run_frame("b-1", script))
        logs: list[RunnerLog] = []
        await self._output_until(stage, "b-1", "resume-line-5\n", logs)
        _check(all(m.seq is not None for m in logs), "the runner sends no seq: it cannot resume")
        stored = _last_seq(logs)
        await ws.close(1001, "conformance: going away")
        ws2, init, _ = await stage.init(stale=ws)
        _check(init.resume is not None, "the runner reconnected without asking to resume")
        assert init.resume is not None
        _check(
            init.resume.build == "b-1" and init.resume.session == session,
            f"resume {init.resume!r}, expected build b-1 and session {session}",
        )
        await ws2.send(
            json_frame(
                "ready",
                runner="r-2",
                protocol=stage.protocol,
                session="session-2",
                resume={"build": "b-1", "seq": stored},
            )
        )
        more, finished = await stage.collect("b-1", logs, stored=stored)
        _check(finished is not None and finished.success, "the resumed build did not end well")
        lines = [line for line in _text(more).splitlines() if line.startswith("resume-line-")]
        _check(lines == [f"resume-line-{i}" for i in range(1, 41)], f"lines after resume: {lines}")
        again = f", {stage.resent} stored chunks sent again (ignored)" if stage.resent else ""
        return f"resumed after seq {stored}{again}"

    async def check_acks(self, stage: _Stage) -> str:
        ws, init, session = await stage.register()
        if stage.protocol < 2:
            raise _Skip(f"the runner asked for protocol {init.protocol}: no acknowledgements")
        script = ["for i in $(seq 1 40); do echo ack-line-$i; sleep 0.05; done"]
        await ws.send(self.run_frame("b-1", script))
        logs: list[RunnerLog] = []
        await self._output_until(stage, "b-1", "ack-line-5\n", logs, chunks=3)
        _check(all(m.seq is not None for m in logs), "the runner sends no seq")
        acked = _last_seq(logs)
        await ws.send(json_frame("ack", build="b-1", seq=acked))
        await asyncio.sleep(1.0)  # for the runner to read it
        await ws.close(1001, "conformance: going away")
        ws2, init, _ = await stage.init(stale=ws)
        _check(
            init.resume is not None and init.resume.session == session,
            f"the runner reconnected without resuming with its session: {init.resume!r}",
        )
        # A server never asks for less than it acknowledged; asking for
        # everything shows what the runner kept.
        await ws2.send(
            json_frame(
                "ready",
                runner="r-2",
                protocol=2,
                session="session-2",
                resume={"build": "b-1", "seq": 0},
            )
        )
        resent: list[int] = []
        while True:
            peer, message, text = await stage.next()
            if peer is ws:
                continue
            _check(message is not None, "the connection closed before the result")
            if isinstance(message, RunnerFinished):
                break
            _check(isinstance(message, RunnerLog), f"unexpected during a build: {text[:200]!r}")
            if message.seq is not None and message.seq <= acked:
                resent.append(message.seq)
        if resent:
            raise _Fail(
                f"chunks {resent[0]}..{resent[-1]} resent after the server acknowledged"
                f" {acked}: a protocol 2 runner forgets acknowledged chunks"
            )
        return f"nothing up to the acknowledged seq {acked} kept"


def _running(command: str) -> list[int]:
    """The processes whose command line is ``command`` (from /proc; none
    where there is no /proc)."""
    proc = Path("/proc")
    if not (proc / "self").exists():
        return []
    want = command.encode().replace(b" ", b"\0")
    found = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.rstrip(b"\0") == want:
                found.append(int(entry.name))
    return found


def json_frame(command: str, **payload: Any) -> str:
    return f"{command}:{json.dumps(payload)}"


def _make_repo(root: Path) -> str:
    repo = root / "repo"
    repo.mkdir()
    (repo / "README").write_text("citron conformance\n")
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "c",
        "GIT_AUTHOR_EMAIL": "c@example.org",
        "GIT_COMMITTER_NAME": "c",
        "GIT_COMMITTER_EMAIL": "c@example.org",
    }
    for argv in (["git", "init", "-q"], ["git", "add", "."], ["git", "commit", "-q", "-m", "c"]):
        subprocess.run(argv, cwd=repo, env=env, check=True, capture_output=True)
    return f"file://{repo}"
