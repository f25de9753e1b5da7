"""One connection as the hub sees it: its role, its budget, its faults.

A :class:`Session` binds the connection to the role of its first frame,
turns a frame into a message or a :class:`Refused` (parsing, role checks),
spends its request budget (a token bucket), and keeps its error window.
It decides nothing about builds or runners: that is the hub's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING

import attrs

from .codec import parse_client, peek_req, split_client
from .errors import ErrorCode, ProtocolError
from .messages import ClientMessage, Role

if TYPE_CHECKING:
    from ._state import Runner, Sub

ConnId = Hashable


class Refused(Exception):
    """A frame the session turns down: answered ``error:`` with ``code``
    (echoing ``req``); ``close`` when the connection must go too (1008)."""

    def __init__(
        self, code: ErrorCode, message: str, req: str | None = None, *, close: bool = False
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.req, self.close = code, message, req, close


@attrs.define(eq=False)
class Session:
    """A connection's own state; the hub keeps one per connection."""

    id: ConnId
    roles: frozenset[Role]
    role: Role | None = None
    runner: Runner | None = None  # the registration on this connection
    subs: dict[str, Sub] = attrs.Factory(dict)  # builds followed, by id
    feed: bool = False  # follows the live feed
    errors: deque[float] = attrs.Factory(deque)  # when its last faults were
    closing: bool = False
    local: bool = True  # served by this hub's host (see Hub.connect)
    tokens: float = 0.0  # the request budget left
    refilled: float = 0.0  # when ``tokens`` was last brought up to date
    out_key: tuple[str, str] = ("", "log")  # metrics key of a log: frame sent to it

    def take_role(self, role: Role) -> None:
        self.role = role
        self.out_key = (role.value, "log")

    def parse(self, text: str) -> tuple[ClientMessage, str, str]:
        """The message of a frame, its command and payload text; binds the
        session to the role of its first frame. Raises :class:`Refused`."""
        try:
            role, command, payload = split_client(text)
        except ProtocolError as exc:
            raise Refused(exc.code, exc.message, exc.req) from None
        if role not in self.roles:
            raise Refused(
                ErrorCode.UNAUTHORIZED,
                f"this connection may not use the {role} role",
                peek_req(payload),
                close=True,
            )
        if self.role is None:
            self.take_role(role)
        elif role is not self.role:
            raise Refused(
                ErrorCode.ROLE_MISMATCH,
                f"this connection is {self.role}, not {role}",
                peek_req(payload),
            )
        try:
            return parse_client(role, command, payload), command, payload
        except ProtocolError as exc:
            raise Refused(exc.code, exc.message, exc.req) from None

    def spend(self, now: float, rate: float, burst: int) -> bool:
        """Take one request from the token bucket (``rate`` a second, at
        most ``burst`` at once); False if it is empty."""
        self.tokens = min(float(burst), self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def fault(self, now: float, window: float, limit: int) -> bool:
        """Count a fault at ``now``; True when more than ``limit`` fell in
        the last ``window`` seconds (the connection must be closed)."""
        errors = self.errors
        errors.append(now)
        while errors and errors[0] <= now - window:
            errors.popleft()
        return len(errors) > limit
