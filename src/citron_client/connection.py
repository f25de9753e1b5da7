"""Connecting to a citron server: errors, tokens, and reconnection backoff."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

__all__ = [
    "AuthError",
    "Backoff",
    "Endpoints",
    "ClientError",
    "ConnectError",
    "ConnectionLost",
    "RequestError",
    "open_any",
    "open_connection",
]


class ClientError(Exception):
    """Root of the client's errors."""


class ConnectError(ClientError):
    """The server could not be reached (refused, unreachable, bad URL)."""


class AuthError(ClientError):
    """The server refused the credentials (HTTP 401, or ``unauthorized``)."""


class ConnectionLost(ClientError):
    """The connection dropped before the reply came."""


class RequestError(ClientError):
    """The server answered with ``error:``; ``code`` is its stable code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Backoff:
    """Exponential backoff with full jitter: 0.1 s doubling up to ``cap``."""

    def __init__(self, base: float = 0.1, cap: float = 30.0) -> None:
        self.base, self.cap = base, cap
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0

    async def sleep(self) -> None:
        await asyncio.sleep(self.next_delay())


async def open_connection(url: str, token: str | None) -> ClientConnection:
    """Open a WebSocket to a citron server, compression off.

    Raises :class:`ConnectError` or :class:`AuthError`.
    """
    headers: Sequence[tuple[str, str]] = [("Authorization", f"Bearer {token}")] if token else []
    try:
        return await connect(
            url,
            additional_headers=headers,
            compression=None,
            max_size=None,
            open_timeout=10,
            ping_interval=20,
            ping_timeout=20,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 401:
            raise AuthError(f"{url}: the server refused the token (HTTP 401)") from None
        raise ConnectError(f"{url}: the server answered HTTP {status}") from None
    except InvalidURI as exc:
        raise ConnectError(f"{url}: not a WebSocket URL ({exc})") from None
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ConnectError(f"{url}: cannot connect: {reason}") from None


class Endpoints:
    """One server URL or several (the nodes of one citron deployment), tried
    in turn: each failure to connect moves on to the next."""

    def __init__(self, urls: str | Sequence[str]) -> None:
        self.urls = [urls] if isinstance(urls, str) else [u for u in urls if u]
        if not self.urls:
            raise ValueError("at least one server URL is needed")
        self._next = 0

    @property
    def current(self) -> str:
        return self.urls[self._next % len(self.urls)]

    def rotate(self) -> None:
        self._next += 1

    def __str__(self) -> str:
        return ", ".join(self.urls)


async def open_any(endpoints: Endpoints, token: str | None) -> ClientConnection:
    """Connect to the first URL that answers, starting with the current one.

    Raises :class:`AuthError` at once (the token will not do better
    elsewhere), or the last :class:`ConnectError` when none answers.
    """
    last: ConnectError | None = None
    for _ in endpoints.urls:
        try:
            return await open_connection(endpoints.current, token)
        except ConnectError as exc:
            last = exc
            endpoints.rotate()
    assert last is not None
    raise last
