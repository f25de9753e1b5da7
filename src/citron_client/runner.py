"""Write a runner in a few lines: subclass :class:`Runner`, implement ``run``.

::

    from citron_client import BuildContext, Runner, run_runner

    class Echo(Runner):
        type = "echo"

        async def run(self, build, ctx: BuildContext) -> bool:
            for line in build.script:
                ctx.log(line + "\\n")
            return True

    asyncio.run(run_runner(Echo(), "ws://127.0.0.1:8765/ws"))

The framework hosts :class:`~citron_protocol.RunnerProtocol` over a websockets
connection: it registers, runs one build at a time, streams ``ctx.log`` text
(secret values masked), reports the result, reconnects with backoff when the
server goes away, resumes the build in flight and resends what the server had
not stored. ``ctx.cancelled`` tells a build to stop; ``run`` then returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from citron_protocol import (
    BuildDropped,
    BuildResumed,
    BuildStarted,
    CancelRequested,
    ProtocolError,
    Registered,
    Run,
    RunnerProtocol,
    ServerError,
    ShutdownRequested,
    Step,
    UsageError,
)
from citron_protocol.codec import frame_head

from .connection import AuthError, Backoff, ConnectError, Endpoints, open_any
from .masking import SecretMasker

__all__ = ["BuildContext", "Runner", "RunnerHost", "run_runner"]

#: Output bytes a build may have unacknowledged (protocol 2) before it waits.
WINDOW = 4 * 1024 * 1024
#: Seconds a leaving runner waits for its result's acknowledgement (protocol 2).
SETTLE_TIMEOUT = 10.0

log = logging.getLogger("citron.runner")


class Runner:
    """A runner: set ``type`` (and ``name``), implement :meth:`run`."""

    type: str = "simple"
    name: str | None = None

    async def run(self, build: Run, ctx: BuildContext) -> bool:
        """Run ``build``; stream output with ``ctx.log``; return success."""
        raise NotImplementedError


class BuildContext:
    """What a build sees of its runner: output, and cancellation."""

    def __init__(
        self,
        build: Run,
        emit: Callable[[str], None],
        room: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.build = build
        self._emit = emit
        self._room = room
        self._masker = SecretMasker((build.secrets or {}).values())
        self._cancelled = asyncio.Event()
        #: What was built (a git commit's full id), reported with the result.
        self.commit: str | None = None
        #: The exit status of the line that failed (0 on success), reported
        #: with the result; None when unknown.
        self.exit_code: int | None = None
        #: What became of each script line (one Step per line, in order),
        #: reported with the result; None when unknown.
        self.steps: tuple[Step, ...] | None = None

    def log(self, text: str) -> None:
        """Stream output (secret values become ``***``)."""
        safe = self._masker.feed(text)
        if safe:
            self._emit(safe)

    async def room(self) -> None:
        """Wait while the runner holds too much output the server has not
        acknowledged yet (protocol 2: more than ``RunnerHost.window``
        bytes): a build that produces output faster than the server
        stores it, or while the server is away, is held back here instead
        of filling memory. Call it between two reads of output."""
        if self._room is not None:
            await self._room()

    @property
    def cancelled(self) -> bool:
        """True once the build was cancelled (by the server or a signal)."""
        return self._cancelled.is_set()

    async def wait_cancelled(self) -> None:
        await self._cancelled.wait()

    def cancel(self) -> None:
        self._cancelled.set()

    def close(self) -> None:
        """Send what the masker held back; called when ``run`` returned."""
        rest = self._masker.flush()
        if rest:
            self._emit(rest)


class RunnerHost:
    """Connects one :class:`Runner` to a server and keeps it connected."""

    def __init__(
        self,
        runner: Runner,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        once: bool = False,
        backoff_cap: float = 30.0,
        ca: str | None = None,
    ) -> None:
        self.runner, self.token, self.once = runner, token, once
        self.ca = ca
        self.endpoints = Endpoints(url)
        self.proto = RunnerProtocol(type=runner.type, name=runner.name)
        self.builds_run = 0
        self._backoff = Backoff(cap=backoff_cap)
        self._ws: ClientConnection | None = None
        self._wake = asyncio.Event()
        self.window = WINDOW  # unacknowledged output bytes a build may run ahead
        self._roomy = asyncio.Event()
        self._settled = asyncio.Event()
        self._ctx: BuildContext | None = None
        self._task: asyncio.Task[None] | None = None
        self._leave = False  # leave after the current build
        self._done = False
        self._close_when_sent = False

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def stop(self, cancel_build: bool = False) -> None:
        """Leave: after the current build (or at once when idle); with
        ``cancel_build``, the current build is cancelled first."""
        self._leave = True
        if cancel_build and self._ctx is not None:
            self._ctx.cancel()
        if not self.busy:
            self._done = True
            if self._ws is not None and self.proto.phase.value in ("waiting", "registering"):
                with contextlib.suppress(UsageError):
                    self.proto.unregister()
            self._wake.set()

    async def serve(self) -> None:
        """Run until stopped, told to shut down, or (``once``) one build is done.

        Raises ConnectError if the first connection fails, AuthError if the
        server refuses the token.
        """
        first = True
        while not self._done:
            try:
                ws = await open_any(self.endpoints, self.token, ca=self.ca)
            except ConnectError:
                if first:
                    raise
                log.info("server unreachable, retrying")
                await self._backoff.sleep()
                continue
            first = False
            self._ws = ws
            self._backoff.opened()
            self.proto.connect()
            writer = asyncio.create_task(self._write(ws))
            try:
                async for text in ws:
                    if isinstance(text, str):
                        self._receive(text)
            except ConnectionClosed:
                pass
            finally:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
            self._ws = None
            self._backoff.closed()
            self.proto.connection_lost()
            if ws.close_code == 1008:
                raise AuthError("the server closed the connection: unauthorized")
            if not self._done:
                log.info("connection closed (%s), reconnecting", ws.close_code)
                await self._backoff.sleep()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _write(self, ws: ClientConnection) -> None:
        while True:
            for frame in self.proto.data_to_send():
                await ws.send(frame)
            if self._done or self._close_when_sent:
                if not self.proto.settled:  # protocol 2: until the result is stored
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._settled.wait(), SETTLE_TIMEOUT)
                self._done = True  # the result with leave is out
                await ws.close()
                return
            self._wake.clear()
            await self._wake.wait()

    def _receive(self, text: str) -> None:
        try:
            self.proto.receive(text)
        except ProtocolError as exc:
            # Said loudly: a frame this runner cannot understand may be a
            # build it will never run.
            log.error(
                "a frame from the server this runner cannot use (%s): %s", frame_head(text), exc
            )
            return
        for event in self.proto.events_received():
            if isinstance(event, Registered):
                log.info("registered as %s", event.runner)
            elif isinstance(event, BuildStarted):
                self._start(event.run)
            elif isinstance(event, BuildResumed):
                log.info("resumed build %s after seq %d", event.build, event.seq)
            elif isinstance(event, BuildDropped):
                log.warning("the server dropped build %s", _name(event.build))
                if self._task is not None:
                    self._task.cancel()
            elif isinstance(event, CancelRequested):
                log.info("build %s cancelled", _name(event.build))
                if self._ctx is not None:
                    self._ctx.cancel()
            elif isinstance(event, ShutdownRequested):
                busy = self.busy
                log.info(
                    "the server asked this runner to shut down%s",
                    ": it leaves once its build is reported" if busy else "",
                )
                self._leave = True  # the build in flight is finished and reported first
                if not busy:
                    self._done = True
            elif isinstance(event, ServerError):
                log.warning("server error: %s: %s", event.error.code, event.error.message)
        if not self.proto.acks or self.proto.unacknowledged <= self.window:
            self._roomy.set()
        if self.proto.settled:
            self._settled.set()
        else:
            self._settled.clear()
        self._wake.set()

    def _start(self, build: Run) -> None:
        log.info("running build %s", _name(build.build))
        if self.once:
            self._leave = True
        self._ctx = BuildContext(build, self._emit, self._wait_room)
        self._task = asyncio.create_task(self._execute(self._ctx))

    async def _wait_room(self) -> None:
        while self.proto.acks and self.proto.unacknowledged > self.window:
            self._roomy.clear()
            await self._roomy.wait()

    def _emit(self, text: str) -> None:
        with contextlib.suppress(UsageError):  # the build was dropped meanwhile
            self.proto.log(text)
            self._wake.set()

    async def _execute(self, ctx: BuildContext) -> None:
        try:
            ok = bool(await self.runner.run(ctx.build, ctx))
        except asyncio.CancelledError:
            return  # dropped by the server: nothing to report
        except Exception as exc:
            log.exception("build %s: the runner failed", _name(ctx.build.build))
            ctx.log(f"\n[citron-runner] the runner failed: {exc!r}\n")
            ok = False
        ctx.close()
        self.builds_run += 1
        with contextlib.suppress(UsageError):
            self.proto.finish(
                ok and not ctx.cancelled,
                leave=self._leave,
                commit=ctx.commit,
                exit_code=ctx.exit_code,
                steps=_steps_for(ctx),
            )
            log.info("build %s %s", _name(ctx.build.build), "succeeded" if ok else "failed")
        if self._leave:
            self._close_when_sent = True
        self._ctx = None
        self._wake.set()


async def run_runner(
    runner: Runner, url: str | Sequence[str], *, token: str | None = None, once: bool = False
) -> None:
    """Serve ``runner`` on the server at ``url`` (or the first of several
    URLs that answers, rotating on reconnects) until it is told to stop."""
    await RunnerHost(runner, url, token=token, once=once).serve()


def _steps_for(ctx: BuildContext) -> tuple[Step, ...] | None:
    """The steps to report: one per script line, or none (a runner that set
    a list of another length is logged, and its steps left out)."""
    steps = ctx.steps
    if steps is None:
        return None
    steps = tuple(steps)
    if len(steps) != len(ctx.build.script):
        log.error(
            "build %s: %d steps for %d script lines; reported without steps",
            _name(ctx.build.build),
            len(steps),
            len(ctx.build.script),
        )
        return None
    return steps


def _name(build: str | None) -> str:
    """A build's id for the log; a seed-only server names none."""
    return build if build is not None else "(unnamed: a seed-only server)"
