"""The runner side of the protocol, sans I/O.

A custom runner hosts :class:`RunnerProtocol` on any transport::

    proto = RunnerProtocol(type="simple", name="builder-1")
    proto.connect()                    # after the WebSocket opened
    send(proto.data_to_send())         # the init frame
    ...
    proto.receive(text)                # each frame from the server
    for event in proto.events_received():
        if isinstance(event, BuildStarted): start(event.run)
        elif isinstance(event, CancelRequested): stop()
        ...
    proto.log("output")                # while a build runs
    proto.finish(success=True)
    send(proto.data_to_send())

It numbers the chunks of each run from 1 (``seq``) and keeps them, so that
after a reconnect (``connection_lost()`` then ``connect()``) it asks to resume
the build and resends exactly what the server had not stored. With a server
that speaks protocol 2, it keeps only what the server has not acknowledged
(``ack:``): its memory is bounded by what is in flight, which a host can
read from :attr:`RunnerProtocol.unacknowledged` to hold output back. Out-of-order
calls raise :class:`~citron_protocol.errors.UsageError`.

A seed-only server (the original ci-tron) sends no ``ready:`` and names no
build: its ``run:`` has no ``build``. The protocol then runs the build at
once and sends the seed's frames (``process`` without ``build`` or ``seq``),
keeps no chunk (such a server cannot take a build back), and drops a build
in flight when the connection is lost (:class:`BuildDropped`).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from .codec import decode_server, encode
from .errors import ErrorCode, ProtocolError, UsageError
from .hub import PROTOCOL_VERSION
from .messages import (
    Ack,
    Cancel,
    Error,
    Ready,
    Resume,
    Run,
    RunnerFinished,
    RunnerInit,
    RunnerLog,
    RunnerUnregister,
    Shutdown,
    Step,
    utf8_size,
)
from .states import PHASE_TRANSITIONS, PhaseEvent, RunnerPhase, next_phase

__all__ = [
    "BuildDropped",
    "BuildResumed",
    "BuildStarted",
    "CancelRequested",
    "Registered",
    "RunnerProtocolEvent",
    "RunnerProtocol",
    "ServerError",
    "ShutdownRequested",
    "UnexpectedMessage",
]


class UnexpectedMessage(ProtocolError):
    """The server sent a frame that makes no sense now (e.g. ``run`` while busy)."""

    code = ErrorCode.BAD_STATE


@attrs.frozen
class Registered:
    """``ready`` arrived: the server knows this runner."""

    runner: str
    session: str
    protocol: int


@attrs.frozen
class BuildStarted:
    """Run this build."""

    run: Run


@attrs.frozen
class BuildResumed:
    """The server took the build back after a reconnect; what it had not
    stored is being resent."""

    build: str
    seq: int


@attrs.frozen
class BuildDropped:
    """The server refused to resume this build (or, from a seed-only
    server, ``build`` None, the connection that ran it was lost): stop
    working on it."""

    build: str | None


@attrs.frozen
class CancelRequested:
    """Stop the build, then ``finish(success=False)``."""

    build: str | None


@attrs.frozen
class ShutdownRequested:
    """Leave and do not come back: a build in flight is finished first and
    its result sent (with ``leave``); no other build comes."""


@attrs.frozen
class ServerError:
    """The server answered a frame with ``error:``."""

    error: Error


RunnerProtocolEvent = (
    Registered
    | BuildStarted
    | BuildResumed
    | BuildDropped
    | CancelRequested
    | ShutdownRequested
    | ServerError
)


class RunnerProtocol:
    """A runner's state machine; see the module docstring."""

    def __init__(self, type: str, name: str | None = None) -> None:
        self._init = RunnerInit(type=type, name=name, protocol=PROTOCOL_VERSION)
        self.phase = RunnerPhase.DISCONNECTED
        self.runner_id: str | None = None
        self._session: str | None = None
        self._run: Run | None = None  # the current build, kept until the next one
        self._chunks: list[str] = []  # the current run's chunks not acknowledged
        self._base = 0  # the last seq acknowledged: seq n is at index n - 1 - _base
        self._settled = False  # the result of the run was acknowledged
        self._held = 0  # UTF-8 bytes in _chunks
        self.acks = False  # the server acknowledges (protocol 2)
        self._finished: bool | None = None  # the result, once finish() was called
        # its commit, exit code, steps
        self._result: tuple[str | None, int | None, tuple[Step, ...] | None] = (None, None, None)
        self._leave = False
        self._shutdown = False  # shutdown: came: leave once the build is reported
        self._sent = 0  # chunks sent on this connection
        self._finish_sent = False
        self._out: list[str] = []
        self._events: list[RunnerProtocolEvent] = []

    # -- properties ----------------------------------------------------------------

    @property
    def build(self) -> Run | None:
        """The build being run (None when waiting or after ``finish``)."""
        return self._run if self._finished is None else None

    # -- connection --------------------------------------------------------------------

    def _go(self, event: PhaseEvent) -> None:
        """The one place the phase changes: by the table (UsageError if it
        has no row)."""
        self.phase = next_phase(self.phase, event)

    def connect(self) -> None:
        """The connection is open: send init, asking to resume a build in flight."""
        self._go(PhaseEvent.CONNECT)
        resume = None
        run = self._run
        if run is not None and run.build is None:
            # A seed-only server's build cannot be taken back: it is lost.
            if self._finished is None:
                self._events.append(BuildDropped(None))
            self._clear_run()
        elif run is not None and run.build is not None and self._session is not None:
            resume = Resume(build=run.build, session=self._session)
        self._out.append(encode(attrs.evolve(self._init, resume=resume)))
        self._sent = 0
        self._finish_sent = False

    def connection_lost(self) -> None:
        """The connection closed; a build in flight is kept for a resume."""
        self._go(PhaseEvent.LOST)
        self._out.clear()

    def unregister(self) -> None:
        """Leave the server; a build in flight is given up."""
        self._go(PhaseEvent.UNREGISTER)
        self._out.append(encode(RunnerUnregister()))

    # -- input --------------------------------------------------------------------------

    def receive(self, text: str) -> None:
        """A frame from the server. Raises ProtocolError for a bad one."""
        message = decode_server(text)
        if isinstance(message, Ready):
            self._on_ready(message)
        elif isinstance(message, Run):
            self._on_run(message)
        elif isinstance(message, Cancel):
            current = self.build
            if current is not None and message.build in (None, current.build):
                self._events.append(CancelRequested(current.build))
        elif isinstance(message, Shutdown):
            # A build in flight is finished and reported first (with leave);
            # an idle runner leaves now (the server has let it go).
            self._shutdown = True
            if self.build is None and self.phase is not RunnerPhase.CLOSED:
                self._go(PhaseEvent.SHUTDOWN)
            self._events.append(ShutdownRequested())
        elif isinstance(message, Ack):
            self._on_ack(message)
        elif isinstance(message, Error):
            self._events.append(ServerError(message))
        else:
            raise UnexpectedMessage(f"a runner does not expect {message.COMMAND}:")

    def _on_ready(self, ready: Ready) -> None:
        if self.phase is not RunnerPhase.REGISTERING:
            return  # the answer to a repeated init: nothing changes
        self.runner_id = ready.runner
        self._session = ready.session
        self.acks = ready.protocol >= 2
        self._events.append(Registered(ready.runner, ready.session, ready.protocol))
        run = self._run
        if run is None:
            self._go(PhaseEvent.READY)
            return
        if ready.resume is None or ready.resume.build != run.build:
            if self._finished is None:
                self._events.append(BuildDropped(run.build))
            self._clear_run()
            self._go(PhaseEvent.READY)
            return
        self._sent = min(max(ready.resume.seq, self._base), self._base + len(self._chunks))
        # A build that finished while away is only resent: nothing runs.
        self._go(PhaseEvent.RESUMED if self._finished is None else PhaseEvent.READY)
        self._events.append(BuildResumed(run.build, self._sent))
        self._flush()

    def _on_ack(self, ack: Ack) -> None:
        """Protocol 2: forget what the server has made durable."""
        run = self._run
        if run is None or ack.build != run.build:
            return
        if ack.finished and self._finish_sent:
            self._settled = True  # the result is stored: nothing is left to keep
            self._chunks.clear()
            self._held = 0
            self._base = self._sent
            return
        if ack.seq is None:
            return
        # Never past what was sent on this connection: a server that
        # acknowledges more than it got cannot make the runner forget it.
        upto = min(ack.seq, self._sent)
        if upto > self._base:
            dropped = self._chunks[: upto - self._base]
            del self._chunks[: upto - self._base]
            self._held -= sum(utf8_size(text) for text in dropped)
            self._base = upto

    @property
    def settled(self) -> bool:
        """Nothing of the last build waits for the server: its result was
        acknowledged (protocol 2), or the server does not acknowledge. A
        runner that leaves waits for this (for a while) before it closes."""
        return not self.acks or self._run is None or self._settled

    @property
    def unacknowledged(self) -> int:
        """UTF-8 bytes of output kept until the server acknowledges them
        (with a protocol 1 server: the whole build's)."""
        return self._held

    def _on_run(self, run: Run) -> None:
        current = self.build
        if current is not None or (self.phase, PhaseEvent.RUN) not in PHASE_TRANSITIONS:
            busy = f"build {current.build} runs" if current is not None else self.phase
            raise UnexpectedMessage(f"run: {run.build} while {busy}")
        self._go(PhaseEvent.RUN)
        self._clear_run()
        self._run = run
        self._events.append(BuildStarted(run))

    def _clear_run(self) -> None:
        self._run = None
        self._chunks = []
        self._base = 0
        self._held = 0
        self._settled = False
        self._finished = None
        self._sent = 0
        self._finish_sent = False

    # -- the build ------------------------------------------------------------------------

    def log(self, text: str) -> None:
        """A chunk of the current build's output (held while disconnected)."""
        if self.build is None:
            raise UsageError("log() with no build running")
        if not isinstance(text, str):
            raise UsageError("log() takes text")
        self._chunks.append(text)
        self._held += utf8_size(text)
        self._flush()

    def finish(
        self,
        success: bool,
        leave: bool = False,
        *,
        commit: str | None = None,
        exit_code: int | None = None,
        steps: Sequence[Step] | None = None,
    ) -> None:
        """The current build ended. With ``leave``, the server gives this runner
        no other build: the host closes the connection once it is sent.
        ``commit`` (what was built) and ``exit_code`` (of the line that
        failed, 0 on success) go with the result when known, and ``steps``
        (one :class:`~citron_protocol.messages.Step` per script line); a
        seed-only server's build gets the seed's result frame, without them."""
        if self.build is None:
            raise UsageError("finish() with no build running")
        if steps is not None:
            steps = tuple(steps)
            if self._run is not None and len(steps) != len(self._run.script):
                raise UsageError(
                    f"finish() takes one step per script line: {len(steps)} steps"
                    f" for {len(self._run.script)} lines"
                )
        self._go(PhaseEvent.FINISH)
        self._finished = bool(success)
        self._result = (commit, exit_code, steps)
        self._leave = bool(leave) or self._shutdown
        self._flush()
        if self._shutdown and self.phase is RunnerPhase.WAITING:
            self._go(PhaseEvent.SHUTDOWN)  # the result is out: now leave

    def _flush(self) -> None:
        if self.phase not in (RunnerPhase.RUNNING, RunnerPhase.WAITING) or self._run is None:
            return
        build = self._run.build
        if build is None:  # a seed-only server's build: the seed's frames, nothing kept
            self._out.extend(encode(RunnerLog(log=chunk)) for chunk in self._chunks)
            self._chunks.clear()
            self._held = 0
        while self._sent < self._base + len(self._chunks):
            seq = self._sent + 1
            text = self._chunks[seq - 1 - self._base]
            self._out.append(encode(RunnerLog(log=text, build=build, seq=seq)))
            self._sent = seq
        if self._finished is not None and not self._finish_sent:
            commit, exit_code, steps = self._result if build is not None else (None, None, None)
            self._out.append(
                encode(
                    RunnerFinished(
                        success=self._finished,
                        build=build,
                        leave=self._leave,
                        commit=commit,
                        exit_code=exit_code,
                        steps=steps,
                    )
                )
            )
            self._finish_sent = True

    # -- output ---------------------------------------------------------------------------

    def data_to_send(self) -> list[str]:
        """Frames to send, in order."""
        out, self._out = self._out, []
        return out

    def events_received(self) -> list[RunnerProtocolEvent]:
        """What happened since the last call, in order."""
        events, self._events = self._events, []
        return events
