"""The backend's and the front's side of the protocol, sans I/O.

:class:`ClientProtocol` numbers requests (``req``) and sorts what the server
sends into replies to those requests and pushes (``log:``, ``state:``,
``runner:``)::

    proto = ClientProtocol(Role.WEB)
    req, frame = proto.request(GetBuilds(role=Role.WEB, limit=10))
    send(frame)
    event = proto.receive(text)        # Reply, Failure or Push

:class:`Follow` follows one build's log: it says what to subscribe with
(now, and again after every reconnect), and turns the pushes into each
chunk once, in order, then the end::

    follow = Follow(build)
    send(proto.request(follow.subscribe(Role.WEB))[1])
    for each push of this build:
        for event in follow.receive(push.message):
            show(event)                # LogChunk or StateChange
        if follow.done: stop
"""

from __future__ import annotations

import itertools

import attrs

from .codec import decode_server, encode
from .errors import UsageError
from .messages import (
    ClientMessage,
    Error,
    LogChunk,
    Role,
    RunnerChange,
    ServerMessage,
    StateChange,
    Subscribe,
)

__all__ = ["ClientEvent", "ClientProtocol", "Failure", "Follow", "FollowEvent", "Push", "Reply"]


@attrs.frozen
class Reply:
    """The server answered request ``req``."""

    req: str
    message: ServerMessage


@attrs.frozen
class Failure:
    """The server answered request ``req`` (or no request, ``req`` None) with
    ``error:``."""

    req: str | None
    error: Error


@attrs.frozen
class Push:
    """A frame the server sent on its own: ``log:``, ``state:``, ``runner:``."""

    message: ServerMessage


ClientEvent = Reply | Failure | Push

_PUSHES = (LogChunk, StateChange, RunnerChange)


class ClientProtocol:
    """Request numbering and reply matching for an ``API`` or ``WEB`` client."""

    def __init__(self, role: Role) -> None:
        if role is Role.RUNNER:
            raise UsageError("a runner uses RunnerProtocol")
        self.role = role
        self._ids = itertools.count(1)
        self.pending: set[str] = set()

    def request(self, message: ClientMessage) -> tuple[str, str]:
        """Number ``message`` (unless it has a ``req``) and encode it.

        Returns ``(req, frame)``.
        """
        if message.role is not self.role:
            raise UsageError(f"a {self.role} client cannot send {message.role} frames")
        req = getattr(message, "req", None)
        if req is None:
            req = str(next(self._ids))
            message = attrs.evolve(message, req=req)  # type: ignore[arg-type]
        if req in self.pending:
            raise UsageError(f"request {req!r} is still waiting for its reply")
        self.pending.add(req)
        return req, encode(message)

    def receive(self, text: str) -> ClientEvent:
        """Sort a server frame. Raises ProtocolError for a bad one."""
        message = decode_server(text)
        req = getattr(message, "req", None)
        if isinstance(message, Error):
            if req is not None:
                self.pending.discard(req)
            return Failure(req, message)
        if req is not None and req in self.pending and not isinstance(message, _PUSHES):
            self.pending.discard(req)
            return Reply(req, message)
        return Push(message)


FollowEvent = LogChunk | StateChange


class Follow:
    """Following one build's log, sans I/O: the backlog, then live, each
    chunk once and in order, up to the end, across reconnects.

    - :meth:`subscribe` is the frame to send to start, and again after a
      reconnect: it asks from the last chunk this follower has, so nothing
      is missed and nothing comes twice;
    - :meth:`receive` takes a ``log:`` or ``state:`` push and returns what
      to show: a chunk not seen before, or the build's new state;
    - :attr:`done` is true once the build has ended and every chunk of it
      is out (a ``state:`` that says finished, with ``log_seq`` reached).
    """

    def __init__(self, build: str, from_: int = 0) -> None:
        if from_ < 0:
            raise UsageError("from_ is a seq: 0 or more")
        self.build = build
        self.after = from_  # the last seq shown (or skipped by from_)
        self.done = False

    def subscribe(self, role: Role) -> Subscribe:
        """The ``subscribe`` to send now: from the last chunk shown."""
        if self.done:
            raise UsageError(f"the log of {self.build} is complete")
        return Subscribe(role=role, build=self.build, from_=self.after)

    def receive(self, message: ServerMessage) -> list[FollowEvent]:
        """What a push means to this follower (nothing, if it is about
        another build or a chunk already shown)."""
        if self.done:
            return []
        if isinstance(message, LogChunk):
            if message.build != self.build or message.seq <= self.after:
                return []
            self.after = message.seq
            return [message]
        if isinstance(message, StateChange) and message.build.id == self.build:
            info = message.build
            if info.state.finished and self.after >= info.log_seq:
                self.done = True
            return [message]
        return []
