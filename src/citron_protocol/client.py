"""The backend's and the front's side of the protocol, sans I/O.

:class:`ClientProtocol` numbers requests (``req``) and sorts what the server
sends into replies to those requests and pushes (``log:``, ``state:``,
``runner:``)::

    proto = ClientProtocol(Role.WEB)
    req, frame = proto.request(GetBuilds(role=Role.WEB, limit=10))
    send(frame)
    event = proto.receive(text)        # Reply, Failure or Push
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
)

__all__ = ["ClientEvent", "ClientProtocol", "Failure", "Push", "Reply"]


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
