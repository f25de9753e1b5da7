"""Errors of the citron protocol.

Every error citron raises derives from :class:`CitronError`::

    CitronError
    ├── ProtocolError            a frame a peer sent breaks the wire contract;
    │   │                        ``.code`` is the stable code of the ``error:``
    │   │                        reply, ``.req`` the request id to echo
    │   ├── MalformedFrame       code ``malformed``
    │   ├── UnknownRole          code ``unknown_role``
    │   ├── UnknownCommand       code ``unknown_command``
    │   ├── Forbidden            code ``forbidden``
    │   └── InvalidPayload       code ``invalid_payload``
    ├── UsageError               this side called the protocol out of order
    │                            (a local bug, never caused by a peer)
    └── SnapshotError            a hub snapshot is not one this version of
                                 citron can load (format, version, content)

The other codes of :class:`ErrorCode` (``unauthorized``, ``role_mismatch``,
``not_registered``, ...) depend on the state of a connection, so only the hub
produces them; it answers them as ``error:`` frames and never raises them.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "CitronError",
    "ErrorCode",
    "Forbidden",
    "InvalidPayload",
    "MalformedFrame",
    "ProtocolError",
    "SnapshotError",
    "UnknownCommand",
    "UnknownRole",
    "UsageError",
]


class ErrorCode(StrEnum):
    """The stable codes of ``error:`` frames (see docs/protocol.md)."""

    MALFORMED = "malformed"
    UNKNOWN_ROLE = "unknown_role"
    UNKNOWN_COMMAND = "unknown_command"
    INVALID_PAYLOAD = "invalid_payload"
    TOO_LARGE = "too_large"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    ROLE_MISMATCH = "role_mismatch"
    NOT_REGISTERED = "not_registered"
    NO_BUILD = "no_build"
    UNKNOWN_BUILD = "unknown_build"
    UNKNOWN_RUNNER = "unknown_runner"
    BAD_STATE = "bad_state"
    UNAVAILABLE = "unavailable"
    RATE_LIMITED = "rate_limited"


class CitronError(Exception):
    """Root of every citron exception."""


class ProtocolError(CitronError):
    """A frame breaks the wire contract.

    ``code`` is the stable code sent back in the ``error:`` frame, ``message``
    a sentence for people, ``req`` the request id found in the frame, if any.
    """

    code: ErrorCode = ErrorCode.MALFORMED

    def __init__(self, message: str, *, req: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.req = req

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class MalformedFrame(ProtocolError):
    """The text is not ``ROLE:command:payload`` (or ``command:payload``)."""

    code = ErrorCode.MALFORMED


class UnknownRole(ProtocolError):
    """The role is upper case but not ``RUNNER``, ``API`` or ``WEB``."""

    code = ErrorCode.UNKNOWN_ROLE


class UnknownCommand(ProtocolError):
    """No role of the protocol has this command."""

    code = ErrorCode.UNKNOWN_COMMAND


class Forbidden(ProtocolError):
    """The command exists, but not for this role (e.g. ``WEB:run``)."""

    code = ErrorCode.FORBIDDEN


class InvalidPayload(ProtocolError):
    """The payload is not JSON, or not of the command's shape."""

    code = ErrorCode.INVALID_PAYLOAD


class UsageError(CitronError):
    """A method of a sans-IO state machine was called out of order."""


class SnapshotError(CitronError):
    """A hub snapshot was refused: another format or version, or content
    that does not check out (see :meth:`Hub.from_snapshot
    <citron_protocol.hub.Hub.from_snapshot>`)."""
