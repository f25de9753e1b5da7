"""Raw frame I/O for the testing tools: send any text, read what comes back."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import attrs
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from citron_protocol import decode_server

from .connection import open_connection

__all__ = ["Closed", "Wire", "WireTimeout"]


@attrs.frozen
class Closed:
    """The server closed the connection."""

    code: int | None
    reason: str


class WireTimeout(Exception):
    """Nothing came in time."""


class Wire:
    """One WebSocket connection, frame by frame."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.closed: Closed | None = None

    @classmethod
    async def open(cls, url: str, token: str | None, *, ca: str | None = None) -> Wire:
        return cls(await open_connection(url, token, ca=ca))

    async def send(self, frame: str | bytes) -> bool:
        """Send; False if the connection is closed."""
        try:
            await self.ws.send(frame)
        except ConnectionClosed as exc:
            self._closed(exc)
            return False
        return True

    async def recv_text(self, timeout: float) -> str | Closed:
        """The next text frame, or :class:`Closed`; WireTimeout if none in time."""
        if self.closed is not None:
            return self.closed
        try:
            data = await asyncio.wait_for(self.ws.recv(), timeout)
        except TimeoutError:
            raise WireTimeout(f"no answer within {timeout:g} s") from None
        except ConnectionClosed as exc:
            return self._closed(exc)
        return data if isinstance(data, str) else data.decode("utf-8", "replace")

    async def recv(self, timeout: float) -> Any:
        # A ServerMessage or Closed; Any so that checks read fields freely.
        """The next frame, decoded; a frame that does not decode raises
        :class:`~citron_protocol.ProtocolError`."""
        text = await self.recv_text(timeout)
        if isinstance(text, Closed):
            return text
        return decode_server(text)

    async def expect(self, command: str, timeout: float, skip: tuple[str, ...] = ()) -> Any:
        """Read until a frame with ``command``; frames in ``skip`` are passed over,
        anything else is an error."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.recv(timeout)
                if isinstance(message, Closed):
                    raise AssertionError(
                        f"the connection closed ({message.code}) before {command}:"
                    )
                if command == message.COMMAND:
                    return message
                if message.COMMAND not in skip:
                    raise AssertionError(f"expected {command}:, got {message.COMMAND}: {message!r}")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()

    def _closed(self, exc: ConnectionClosed) -> Closed:
        frame = exc.rcvd
        self.closed = Closed(frame.code if frame else None, frame.reason if frame else "")
        return self.closed
