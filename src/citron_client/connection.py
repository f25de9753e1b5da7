"""Connecting to a citron server: errors, tokens, and reconnection backoff."""

from __future__ import annotations

import asyncio
import functools
import random
import ssl
import time
from collections.abc import Mapping, Sequence

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

__all__ = [
    "DEFAULT_URL",
    "AuthError",
    "Backoff",
    "Endpoints",
    "ClientError",
    "ConnectError",
    "ConnectionLost",
    "RequestError",
    "TrustError",
    "UrlError",
    "open_any",
    "open_connection",
    "tls_context",
    "choose_urls",
    "server_urls",
    "websocket_url",
]

#: Where the command-line tools look for a server when given no URL.
DEFAULT_URL = "ws://127.0.0.1:8765/ws"
_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}


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


class TrustError(ClientError):
    """The CA file given to trust (``ca=``, ``--ca``) cannot be used."""


class UrlError(ClientError, ValueError):
    """A server URL that cannot be one (a usage error, not a network one)."""


def websocket_url(text: str) -> str:
    """A server's WebSocket URL from what a person may paste: ``ws://`` and
    ``wss://`` as they are; ``http://`` and ``https://`` (the dashboard's
    address) become ``ws://`` and ``wss://``, with the path ``/ws`` when it
    is empty or ``/``. Raises :class:`UrlError` for anything else."""
    from urllib.parse import urlsplit, urlunsplit

    text = text.strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError as exc:
        raise UrlError(f"{text!r} is not a server URL ({exc})") from None
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise UrlError(
            f"{text!r} is not a server URL: expected ws://HOST:PORT/ws"
            " (or the dashboard's http://HOST:PORT/)"
        )
    path = parts.path
    if parts.scheme.lower() in ("http", "https") and path in ("", "/"):
        path = "/ws"
    return urlunsplit((scheme, parts.netloc, path or "/", parts.query, ""))


def server_urls(text: str) -> list[str]:
    """:func:`websocket_url` of each of the comma-separated URLs in ``text``."""
    urls = [websocket_url(part) for part in text.split(",") if part.strip()]
    if not urls:
        raise UrlError("no server URL given")
    return urls


def choose_urls(given: str | None, option: str | None, environ: Mapping[str, str]) -> list[str]:
    """The server's URLs, from the first of: the command's argument,
    ``--url``, ``$CITRON_URL``, :data:`DEFAULT_URL`. Raises
    :class:`UrlError`, naming where a bad one came from, or when both the
    argument and ``--url`` are given."""
    if given and option:
        raise UrlError("the server URL is given twice: as an argument and with --url")
    for source, text in (
        ("", given),
        ("--url: ", option),
        ("$CITRON_URL: ", environ.get("CITRON_URL")),
    ):
        if text:
            try:
                return server_urls(text)
            except UrlError as exc:
                raise UrlError(f"{source}{exc}") from None
    return server_urls(DEFAULT_URL)


@functools.cache
def tls_context(ca: str | None = None) -> ssl.SSLContext:
    """The context of a ``wss://`` connection: certificates are verified
    against the system's store (or ``$SSL_CERT_FILE``, ``$SSL_CERT_DIR``),
    and also against the PEM file ``ca`` when given (a private CA, or a
    server's self-signed certificate). Raises :class:`TrustError`."""
    context = ssl.create_default_context()
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except OSError as exc:  # ssl.SSLError is one
            reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
            raise TrustError(f"cannot use {ca} as a CA certificate: {reason}") from None
    return context


def _tls_failure(url: str, exc: ssl.SSLError) -> ConnectError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason or "verification failed"
        return ConnectError(
            f"{url}: the server's certificate is not trusted: {why}"
            " (to trust a private CA or a self-signed certificate: --ca FILE)"
        )
    return ConnectError(f"{url}: the TLS handshake failed: {exc.reason or exc}")


class Backoff:
    """Exponential backoff with full jitter: 0.1 s doubling up to ``cap``.

    It starts over only after a connection that lasted ``stable`` seconds
    (:meth:`opened`, then :meth:`closed`): a server that accepts and closes
    at once (a 4008, a node that is going away) is retried ever more slowly,
    not every 0.1 s.
    """

    def __init__(self, base: float = 0.1, cap: float = 30.0, stable: float = 10.0) -> None:
        self.base, self.cap, self.stable = base, cap, stable
        self.attempt = 0
        self._opened: float | None = None

    def opened(self) -> None:
        """A connection is open."""
        self._opened = time.monotonic()

    def closed(self) -> None:
        """That connection ended: start over if it had lasted."""
        if self._opened is not None and time.monotonic() - self._opened >= self.stable:
            self.reset()
        self._opened = None

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0

    async def sleep(self) -> None:
        await asyncio.sleep(self.next_delay())


async def open_connection(
    url: str, token: str | None, *, ca: str | None = None
) -> ClientConnection:
    """Open a WebSocket to a citron server, compression off; a ``wss://``
    URL is verified as :func:`tls_context` says.

    Raises :class:`ConnectError`, :class:`AuthError` or :class:`TrustError`.
    """
    headers: Sequence[tuple[str, str]] = [("Authorization", f"Bearer {token}")] if token else []
    secure = url.lower().startswith("wss:")
    try:
        return await connect(
            url,
            ssl=tls_context(ca) if secure else None,
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
    except ssl.SSLError as exc:
        raise _tls_failure(url, exc) from None
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


async def open_any(
    endpoints: Endpoints, token: str | None, *, ca: str | None = None
) -> ClientConnection:
    """Connect to the first URL that answers, starting with the current one.

    Raises :class:`AuthError` at once (the token will not do better
    elsewhere), or the last :class:`ConnectError` when none answers.
    """
    last: ConnectError | None = None
    for _ in endpoints.urls:
        try:
            return await open_connection(endpoints.current, token, ca=ca)
        except ConnectError as exc:
            last = exc
            endpoints.rotate()
    assert last is not None
    raise last
