"""``citron conformance``: check a ci-tron server, or a runner, from the wire.

:class:`ServerConformance` runs the scenarios of docs/protocol.md against a
server, each as a named check. :class:`RunnerConformance` plays a scripted
server and checks a runner command. Every check passes, fails with the reason,
or is skipped with the reason (a timer longer than ``max_wait``).
"""

from __future__ import annotations

import asyncio
import contextlib
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

from .wire import Closed, Wire

__all__ = ["CheckResult", "RunnerConformance", "ServerConformance", "print_results"]

PASS, FAIL, SKIP = "pass", "fail", "skip"


@attrs.frozen
class CheckResult:
    name: str
    status: str
    detail: str = ""


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
    ) -> None:
        self.url = url
        self.tokens = tokens or {}
        self.ca = ca
        self.lost_grace, self.cancel_timeout = lost_grace, cancel_timeout
        self.max_wait, self.timeout = max_wait, timeout
        self._wires: list[Wire] = []

    @property
    def checks(self) -> list[tuple[str, Callable[[], Awaitable[str | None]]]]:
        return [
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
        ]

    async def run(self) -> list[CheckResult]:
        limit = self.max_wait + 4 * self.timeout
        try:
            results = []
            for name, check in self.checks:
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

    async def runner(self, type: str, resume: str = "") -> tuple[Wire, Any]:
        wire = await self.open(Role.RUNNER)
        await wire.send(f'RUNNER:init:{{"type": {json.dumps(type)}, "protocol": 1{resume}}}')
        ready = await wire.expect("ready", self.timeout)
        return wire, ready

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
        again = await wire.expect("ready", self.timeout)
        _check(again.runner == ready.runner, "a repeated identical init changed the registration")
        return f"runner {ready.runner}"

    async def dispatch_fifo(self) -> None:
        t = self.fresh_type()
        api = await self.open(Role.API)
        builds = [await self.submit(api, t) for _ in range(3)]
        wire, _ = await self.runner(t)
        for expected in builds:
            run = await wire.expect("run", self.timeout)
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
        run = await right.expect("run", self.timeout)
        _check(run.build == typed, "the typed build did not go to the runner of its type")
        await right.send('RUNNER:process:{"finished": true, "success": true}')
        await self.ask(api, f'API:cancel:{{"build": "{typed}"}}')

    async def _running_build(self) -> tuple[Wire, Wire, str, Any]:
        t = self.fresh_type()
        runner, ready = await self.runner(t)
        api = await self.open(Role.API)
        build = await self.submit(api, t)
        run = await runner.expect("run", self.timeout)
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
        cancel = await runner.expect("cancel", self.timeout)
        _check(cancel.build == build, "cancel: named another build")
        await runner.send('RUNNER:process:{"finished": true, "success": false}')
        await self.until_state(api, build, {BuildState.CANCELLED}, self.timeout)

    async def cancel_timeout_check(self) -> None:
        if self.cancel_timeout > self.max_wait:
            raise _Skip(f"the cancel timeout ({self.cancel_timeout:g} s) is longer than --max-wait")
        _runner, api, build, _ = await self._running_build()
        await self.ask(api, f'API:cancel:{{"build": "{build}"}}')
        await self.until_state(
            api, build, {BuildState.CANCELLED}, self.cancel_timeout + self.timeout
        )

    async def runner_loss(self) -> None:
        if self.lost_grace > self.max_wait:
            raise _Skip(f"the lost grace ({self.lost_grace:g} s) is longer than --max-wait")
        runner, api, build, _ = await self._running_build()
        await runner.close()
        info = await self.build(api, build)
        _check(info.state is BuildState.RUNNING, f"right after the loss the build is {info.state}")
        info = await self.until_state(
            api, build, {BuildState.QUEUED, BuildState.LOST}, self.lost_grace + self.timeout
        )
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
        missing = {c.value for c in ErrorCode} - seen
        why = {
            "unauthorized": "needs different tokens for API and WEB",
            "role_mismatch": "needs a token that opens two roles",
            "unavailable": "comes only from a server that cannot reach its shared state",
            "rate_limited": "comes only past a per-connection limit (the request budget,"
            " 1,000 subscriptions)",
        }
        notes = [f"{code} {why.get(code, 'was not produced')}" for code in sorted(missing)]
        return f"{len(seen)} codes" + (f" ({'; '.join(notes)})" if notes else "")

    async def permissions(self) -> None:
        front = await self.open(Role.WEB)
        for frame in ('WEB:run:{"repo": "r", "script": []}', 'WEB:cancel:{"build": "x"}'):
            reply = await self.ask(front, frame)
            _check(reply.COMMAND == "error" and reply.code == "forbidden", f"{frame} got {reply!r}")
        reply = await self.ask(front, "WEB:get_runners:")
        _check(reply.COMMAND == "runners", "the front cannot read runners")


# -- the runner side -------------------------------------------------------------------


class RunnerConformance:
    """Plays a scripted server on a free loopback port and checks a runner.

    The runner command gets the URL as its last argument and in
    ``CITRON_URL``. Builds use a git repository made in a temp directory
    (``file://``), scripts of plain ``echo`` and ``sleep`` lines.
    """

    def __init__(
        self, command: Sequence[str], *, cancel_grace: float = 15.0, timeout: float = 20.0
    ) -> None:
        self.command = list(command)
        self.cancel_grace = cancel_grace
        self.timeout = timeout
        self._incoming: asyncio.Queue[tuple[ServerConnection, str | None]] = asyncio.Queue()
        self._proc: subprocess.Popen[bytes] | None = None
        self.repo = ""

    async def run(self) -> list[CheckResult]:
        with tempfile.TemporaryDirectory(prefix="citron-conformance-") as tmp:
            self.repo = _make_repo(Path(tmp))
            async with serve(self._handler, "127.0.0.1", 0, compression=None) as server:
                port = server.sockets[0].getsockname()[1]
                url = f"ws://127.0.0.1:{port}/ws"
                self._proc = subprocess.Popen(
                    [*self.command, url],
                    env={**os.environ, "CITRON_URL": url},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                try:
                    state: dict[str, Any] = {}
                    checks = [
                        ("init", lambda: self.check_init(state)),
                        ("build_and_log", lambda: self.check_build(state)),
                        ("cancel", lambda: self.check_cancel(state)),
                        ("reconnect_resume", lambda: self.check_resume(state)),
                    ]
                    return await _run_checks(checks, self.timeout + self.cancel_grace)
                finally:
                    self._stop()

    def _stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(10)

    async def _handler(self, ws: ServerConnection) -> None:
        try:
            async for text in ws:
                await self._incoming.put((ws, text if isinstance(text, str) else None))
        except ConnectionClosed:
            pass
        await self._incoming.put((ws, None))

    async def _next(self, timeout: float | None = None) -> tuple[ServerConnection, Any]:
        ws, text = await asyncio.wait_for(self._incoming.get(), timeout or self.timeout)
        if text is None:
            return ws, None
        try:
            return ws, decode_client(text)
        except ProtocolError as exc:
            raise _Fail(f"the runner sent a bad frame: {exc}: {text[:200]!r}") from None

    async def _init(
        self, stale: ServerConnection | None = None
    ) -> tuple[ServerConnection, RunnerInit]:
        while True:
            ws, message = await self._next()
            if message is None or ws is stale:
                continue  # what the old connection still had in flight
            _check(isinstance(message, RunnerInit), f"the first frame is not init: {message!r}")
            return ws, message

    async def _collect(
        self, build: str, after: int = 0
    ) -> tuple[list[RunnerLog], RunnerFinished | None]:
        logs: list[RunnerLog] = []
        while True:
            _, message = await self._next()
            if message is None:
                return logs, None
            if isinstance(message, RunnerFinished):
                _check(message.build in (None, build), f"finished names build {message.build}")
                return logs, message
            _check(isinstance(message, RunnerLog), f"unexpected {message!r} during a build")
            _check(message.build in (None, build), f"log names build {message.build}")
            if message.seq is not None:
                last = logs[-1].seq if logs and logs[-1].seq is not None else after
                _check(message.seq == last + 1, f"seq {message.seq} after {last}")
            logs.append(message)

    async def check_init(self, state: dict[str, Any]) -> str:
        ws, init = await self._init()
        _check(bool(init.type), "init has no type")
        state["ws"], state["init"], state["session"] = ws, init, "session-" + secrets.token_hex(8)
        await ws.send(
            json_frame("ready", runner="r-conformance", protocol=1, session=state["session"])
        )
        return f"type {init.type}, protocol {init.protocol}"

    async def check_build(self, state: dict[str, Any]) -> None:
        ws = state["ws"]
        await ws.send(
            json_frame(
                "run",
                build="b-1",
                repo=self.repo,
                script=["echo conformance-one", "echo conformance-two"],
            )
        )
        logs, finished = await self._collect("b-1")
        _check(finished is not None, "the connection closed before the result")
        assert finished is not None
        text = "".join(m.log for m in logs)
        _check(
            "conformance-one" in text and "conformance-two" in text,
            f"the output is missing from {text[-300:]!r}",
        )
        _check(finished.success, "a build of echo lines failed")

    async def check_cancel(self, state: dict[str, Any]) -> str:
        ws = state["ws"]
        await ws.send(
            json_frame("run", build="b-2", repo=self.repo, script=["echo started", "sleep 120"])
        )
        started = time.monotonic()
        seen = ""
        while "started" not in seen:
            _, message = await self._next()
            _check(isinstance(message, RunnerLog), f"expected output, got {message!r}")
            seen += message.log
            _check(time.monotonic() - started < self.timeout, "no output")
        await ws.send(json_frame("cancel", build="b-2"))
        sent = time.monotonic()
        while True:
            _, message = await self._next(self.cancel_grace)
            if isinstance(message, RunnerFinished):
                _check(not message.success, "a cancelled build reported success")
                return f"ended {time.monotonic() - sent:.1f} s after cancel"
            _check(isinstance(message, RunnerLog), f"unexpected {message!r} after cancel")

    async def check_resume(self, state: dict[str, Any]) -> None:
        ws = state["ws"]
        script = ["for i in $(seq 1 40); do echo resume-line-$i; sleep 0.05; done"]
        await ws.send(json_frame("run", build="b-3", repo=self.repo, script=script))
        logs: list[RunnerLog] = []
        while sum(m.log.count("resume-line-") for m in logs) < 5:
            _, message = await self._next()
            _check(isinstance(message, RunnerLog), f"expected output, got {message!r}")
            logs.append(message)
        stored = len(logs)
        _check(all(m.seq is not None for m in logs), "the runner sends no seq: it cannot resume")
        await ws.close(1001, "conformance: going away")
        ws2, init = await self._init(stale=ws)
        _check(init.resume is not None, "the runner reconnected without asking to resume")
        assert init.resume is not None
        _check(
            init.resume.build == "b-3" and init.resume.session == state["session"],
            f"resume {init.resume!r}",
        )
        await ws2.send(
            json_frame(
                "ready",
                runner="r-conformance-2",
                protocol=1,
                session="s2",
                resume={"build": "b-3", "seq": stored},
            )
        )
        more, finished = await self._collect("b-3", after=stored)
        _check(finished is not None and finished.success, "the resumed build did not finish well")
        seqs = [m.seq for m in more]
        _check(
            not seqs or seqs[0] == stored + 1,
            f"resent from seq {seqs[0] if seqs else None}, expected {stored + 1}",
        )
        text = "".join(m.log for m in logs + more)
        lines = [line for line in text.splitlines() if line.startswith("resume-line-")]
        _check(lines == [f"resume-line-{i}" for i in range(1, 41)], f"lines after resume: {lines}")


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
