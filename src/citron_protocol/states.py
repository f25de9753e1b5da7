"""The lifecycles of builds and runners: every transition, in one table each.

The hub (:mod:`citron_protocol.hub`) changes a build's or a runner's state only
through :func:`next_build_state` and :func:`next_runner_state`, and
docs/protocol.md draws its state diagrams from these same tables
(:func:`build_diagram`, :func:`runner_diagram`), so the two cannot drift.

The runner's own side (:class:`~citron_protocol.runner.RunnerProtocol`) has
its table too: :data:`PHASE_TRANSITIONS`, through :func:`next_phase`, drawn
in docs/howto-runner.md by :func:`phase_diagram`.

What the tables cannot say, the hub does beside them, in plain code:

- a runner's connection closing while it runs a build is not a transition: the
  build stays ``running`` for the lost-grace period, waiting for a resume;
- ``lose`` on a ``cancelling`` build ends it ``cancelled``: there is nothing
  left to cancel;
- after ``lose``, a build with retries left takes ``requeue`` at once, as a new
  attempt.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from .errors import UsageError
from .messages import BuildState, RunnerState

__all__ = [
    "BUILD_TRANSITIONS",
    "HELD_STATES",
    "PHASE_TRANSITIONS",
    "RUNNER_TRANSITIONS",
    "BuildEvent",
    "PhaseEvent",
    "RunnerEvent",
    "RunnerPhase",
    "build_diagram",
    "next_build_state",
    "next_phase",
    "next_runner_state",
    "phase_diagram",
    "runner_diagram",
]


class BuildEvent(StrEnum):
    """What happens to a build."""

    DISPATCH = "dispatch"  # a waiting runner of the right type takes it
    SUCCEED = "succeed"  # its runner sends process finished, success true
    FAIL = "fail"  # its runner sends process finished, success false
    CANCEL = "cancel"  # API:cancel
    CANCEL_TIMEOUT = "cancel_timeout"  # the runner did not finish it in time
    LOSE = "lose"  # runner gone for good: grace expired, or it unregistered
    REQUEUE = "requeue"  # a lost build with retries left goes back to the queue


S = BuildState
E = BuildEvent

#: (state, event) -> next state. A pair that is not here is refused.
BUILD_TRANSITIONS: Final[dict[tuple[BuildState, BuildEvent], BuildState]] = {
    (S.QUEUED, E.DISPATCH): S.RUNNING,
    (S.QUEUED, E.CANCEL): S.CANCELLED,
    (S.QUEUED, E.LOSE): S.LOST,  # its secrets did not survive a server restart
    (S.RUNNING, E.SUCCEED): S.SUCCESS,
    (S.RUNNING, E.FAIL): S.FAILURE,
    (S.RUNNING, E.CANCEL): S.CANCELLING,
    (S.RUNNING, E.LOSE): S.LOST,
    (S.CANCELLING, E.SUCCEED): S.CANCELLED,
    (S.CANCELLING, E.FAIL): S.CANCELLED,
    (S.CANCELLING, E.CANCEL_TIMEOUT): S.CANCELLED,
    (S.CANCELLING, E.LOSE): S.CANCELLED,
    (S.LOST, E.REQUEUE): S.QUEUED,
}


def _held_states() -> frozenset[BuildState]:
    """The states of a build that a runner holds: from where ``dispatch``
    leads, every state reached by events that do not end it."""
    held = {BUILD_TRANSITIONS[(S.QUEUED, E.DISPATCH)]}
    while True:
        more = {
            target
            for (state, event), target in BUILD_TRANSITIONS.items()
            if state in held and not target.finished and event is not E.REQUEUE
        }
        if more <= held:
            return frozenset(held)
        held |= more


#: Builds a runner holds (running, cancelling): a resume may take them back,
#: and losing the runner is ``lose``. Drawn from the table.
HELD_STATES: Final = _held_states()


class RunnerEvent(StrEnum):
    """What happens to a runner."""

    REGISTER = "register"  # RUNNER:init accepted
    DISPATCH = "dispatch"  # it is given a build (or resumes one)
    RELEASE = "release"  # its build ended
    LEAVE = "leave"  # unregister, or its connection closed


R = RunnerState
RE = RunnerEvent

#: (state, event) -> next state; ``None`` is "not registered".
RUNNER_TRANSITIONS: Final[dict[tuple[RunnerState | None, RunnerEvent], RunnerState | None]] = {
    (None, RE.REGISTER): R.WAITING,
    (R.WAITING, RE.DISPATCH): R.RUNNING,
    (R.RUNNING, RE.RELEASE): R.WAITING,
    (R.WAITING, RE.LEAVE): None,
    (R.RUNNING, RE.LEAVE): None,
}


def next_build_state(state: BuildState, event: BuildEvent) -> BuildState:
    """The state a build in ``state`` takes on ``event``; UsageError if none."""
    try:
        return BUILD_TRANSITIONS[(state, event)]
    except KeyError:
        raise UsageError(f"a {state} build cannot take {event}") from None


def next_runner_state(state: RunnerState | None, event: RunnerEvent) -> RunnerState | None:
    """The state a runner in ``state`` takes on ``event``; UsageError if none."""
    try:
        return RUNNER_TRANSITIONS[(state, event)]
    except KeyError:
        raise UsageError(f"a {state or 'unregistered'} runner cannot take {event}") from None


def build_diagram() -> str:
    """The build lifecycle as a Mermaid state diagram, drawn from the table."""
    lines = ["stateDiagram-v2", "    [*] --> queued: API run"]
    for (state, event), target in BUILD_TRANSITIONS.items():
        lines.append(f"    {state} --> {target}: {event}")
    lines += [f"    {s} --> [*]" for s in BuildState if s.finished and s is not S.LOST]
    lines.append(f"    {S.LOST} --> [*]: no retry left")
    return "\n".join(lines)


def runner_diagram() -> str:
    """The runner lifecycle as a Mermaid state diagram, drawn from the table."""
    lines = ["stateDiagram-v2"]
    for (state, event), target in RUNNER_TRANSITIONS.items():
        lines.append(f"    {state or '[*]'} --> {target or '[*]'}: {event}")
    return "\n".join(lines)


# -- the runner's own side ------------------------------------------------------------


class RunnerPhase(StrEnum):
    """Where a runner's connection is, as the runner sees it."""

    DISCONNECTED = "disconnected"
    REGISTERING = "registering"  # init sent, waiting for ready
    WAITING = "waiting"  # registered, no build running
    RUNNING = "running"  # a build is running
    CLOSED = "closed"  # unregistered or told to shut down


class PhaseEvent(StrEnum):
    """What moves a runner from one phase to another."""

    CONNECT = "connect"  # the connection opened: init sent
    READY = "ready"  # ready: nothing to go on with (or the build had finished)
    RESUMED = "resumed"  # ready: the build in flight was taken back
    RUN = "run"  # run: a build to start
    FINISH = "finish"  # the runner's build ended
    LOST = "lost"  # the connection closed
    UNREGISTER = "unregister"  # the runner leaves
    SHUTDOWN = "shutdown"  # shutdown: the server says leave


P = RunnerPhase
PE = PhaseEvent

#: (phase, event) -> phase. A finish while disconnected or registering
#: keeps the phase: the result is sent once the connection is back; after
#: leaving (closed), it is only recorded.
PHASE_TRANSITIONS: Final[dict[tuple[RunnerPhase, PhaseEvent], RunnerPhase]] = {
    (P.DISCONNECTED, PE.CONNECT): P.REGISTERING,
    (P.REGISTERING, PE.READY): P.WAITING,
    (P.REGISTERING, PE.RESUMED): P.RUNNING,
    (P.WAITING, PE.RUN): P.RUNNING,
    (P.REGISTERING, PE.RUN): P.RUNNING,  # a seed-only server sends no ready:
    (P.RUNNING, PE.FINISH): P.WAITING,
    (P.DISCONNECTED, PE.FINISH): P.DISCONNECTED,
    (P.REGISTERING, PE.FINISH): P.REGISTERING,
    (P.CLOSED, PE.FINISH): P.CLOSED,
    (P.REGISTERING, PE.LOST): P.DISCONNECTED,
    (P.WAITING, PE.LOST): P.DISCONNECTED,
    (P.RUNNING, PE.LOST): P.DISCONNECTED,
    (P.DISCONNECTED, PE.LOST): P.DISCONNECTED,
    (P.CLOSED, PE.LOST): P.CLOSED,
    (P.REGISTERING, PE.UNREGISTER): P.CLOSED,
    (P.WAITING, PE.UNREGISTER): P.CLOSED,
    (P.RUNNING, PE.UNREGISTER): P.CLOSED,
    (P.REGISTERING, PE.SHUTDOWN): P.CLOSED,
    (P.WAITING, PE.SHUTDOWN): P.CLOSED,
    (P.RUNNING, PE.SHUTDOWN): P.CLOSED,
}


def next_phase(phase: RunnerPhase, event: PhaseEvent) -> RunnerPhase:
    """The phase a runner in ``phase`` takes on ``event``; UsageError if none."""
    try:
        return PHASE_TRANSITIONS[(phase, event)]
    except KeyError:
        raise UsageError(f"a runner {phase} cannot take {event}") from None


def phase_diagram() -> str:
    """The runner's own phases as a Mermaid state diagram, drawn from the table."""
    lines = ["stateDiagram-v2", f"    [*] --> {P.DISCONNECTED}"]
    for (phase, event), target in PHASE_TRANSITIONS.items():
        if phase is not target:  # (self-loops: in the table's comment)
            lines.append(f"    {phase} --> {target}: {event}")
    lines.append(f"    {P.CLOSED} --> [*]")
    return "\n".join(lines)
