"""The hub over the ``websockets`` library (the default transport)."""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from citron_protocol import Role

from .host import unsent_bytes
from .metrics import CONTENT_TYPE, health
from .security import Refusal
from .static import HEADERS, static_file
from .store import StoreError
from .transport import (
    BUSY,
    HANDSHAKE_TIMEOUT,
    RAW_LOG_HEADERS,
    BaseTransport,
    library_level,
    raw_log_build,
)

#: Bytes of raw logs (GET /builds/ID/log) held at once for their readers
#: (at least twice --log-cap, so that any one log can be served).
RAW_LOG_BUDGET = 128 * 1024 * 1024

log = logging.getLogger("citron.server")

__all__ = ["WebsocketsTransport"]


class _Peer:
    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws

    async def send(self, text: str) -> None:
        await self.ws.send(text)

    def write_batch(self, texts: list[str]) -> bool:
        # As websockets' broadcast() does, but all frames in one write: the
        # sans-IO protocol serializes them, the transport gets them at once.
        # No waiting for the socket to drain: the host bounds the buffer.
        ws = self.ws
        protocol = ws.protocol
        if protocol.state is not State.OPEN:
            return True  # closing: a send would be refused too
        for text in texts:
            protocol.send_text(text.encode())
        data = protocol.data_to_send()
        if all(data):
            ws.transport.write(b"".join(data))
        else:  # an end-of-stream marker among them: let websockets handle it
            for chunk in data:
                if chunk:
                    ws.transport.write(chunk)
            ws.send_data()
        return True

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)

    def buffered(self) -> int:
        return self.ws.transport.get_write_buffer_size()

    async def drain(self) -> None:
        # websockets' flow control: waits while the transport is paused.
        await self.ws.drain()

    def abort(self) -> None:
        self.ws.transport.abort()

    def unsent(self) -> int:
        return unsent_bytes(self.ws.transport)


def _refused(refusal: Refusal) -> Response:
    return _response(refusal.status, refusal.body, "text/plain; charset=utf-8")


def _response(
    status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None
) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body)))])
    for name, value in (extra or {}).items():
        headers[name] = value
    return Response(status, HTTPStatus(status).phrase, headers, body)


def _library_logger() -> logging.Logger:
    logger = logging.getLogger("citron.server.websockets")
    logger.setLevel(library_level())
    return logger


class WebsocketsTransport(BaseTransport):
    """Serves ``/ws``, ``/healthz``, ``/metrics``, the dashboard and
    ``/builds/ID/log`` with websockets."""

    _server: Server | None = None
    # The roles of each accepted handshake, until its handler takes them.
    # Weak: a handshake that fails after process_request (no
    # Sec-WebSocket-Key, say) never reaches the handler to pop its entry.
    _roles: weakref.WeakKeyDictionary[ServerConnection, frozenset[Role]]

    async def start(self) -> int:
        self._roles = weakref.WeakKeyDictionary()
        self._raw_held = 0  # bytes of raw logs handed to websockets, not yet taken
        self._raw_tasks: set[asyncio.Task[None]] = set()
        s = self.settings
        self._server = await serve(
            self._handler,
            s.host,
            s.port,
            process_request=self._process_request,
            compression="deflate" if s.compression == "deflate" else None,
            max_size=s.max_frame,
            ping_interval=s.ping_interval,
            ping_timeout=s.ping_interval,
            server_header="citron",
            open_timeout=HANDSHAKE_TIMEOUT,  # the whole HTTP handshake, headers included
            ssl=self.tls,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.tls is not None else None,
            # Its own logger, never below WARNING: at DEBUG websockets logs
            # every frame and the handshake's headers (secrets, tokens), at
            # INFO each connection, which the host logs already.
            logger=_library_logger(),
        )
        return int(self._server.sockets[0].getsockname()[1])

    def addresses(self) -> list[str]:
        """The addresses the server listens on."""
        sockets = self._server.sockets if self._server is not None else []
        return [str(sock.getsockname()[0]) for sock in sockets]

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=False)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        url = urlsplit(request.path)
        headers = request.headers
        host = headers.get_all("Host")
        refused = self.gate.host(host)
        if refused is not None:
            return _refused(refused)
        build = raw_log_build(url.path)
        if build is not None and "Upgrade" not in headers:
            return await self._raw_log(connection, build, headers, url.query)
        if url.path == "/healthz":
            body = health(self.host)
            status = 200 if body["status"] == "ok" else 503
            return _response(status, json.dumps(body).encode(), "application/json")
        if url.path == "/metrics":
            refused = self.gate.metrics(headers.get_all("Authorization"))
            if refused is not None:
                return _refused(refused)
            return _response(200, self.metrics.render(), CONTENT_TYPE)
        if url.path != "/ws":
            found = static_file(url.path) if "Upgrade" not in headers else None
            if found is not None:
                return _response(200, found[0], found[1], HEADERS)
            return _response(404, b"not found\n", "text/plain; charset=utf-8")
        roles = self.admit(
            host=host,
            origin=headers.get_all("Origin"),
            authorization=headers.get_all("Authorization"),
            query_token=parse_qs(url.query, keep_blank_values=True).get("token", []),
        )
        if isinstance(roles, Refusal):
            return _refused(roles)
        self._roles[connection] = roles
        return None

    async def _raw_log(
        self, connection: ServerConnection, build: str, headers: Headers, query: str
    ) -> Response:
        """GET /builds/ID/log. websockets sends a response whole, so the log
        is held in memory until the reader has taken it: the bytes so held
        are bounded (RAW_LOG_BUDGET, or twice ``--log-cap``), so are the
        readers (RAW_LOG_READERS), and a reader that takes nothing for
        ``--send-timeout`` is cut off."""
        size = await self.raw_log_size(
            build,
            authorization=headers.get_all("Authorization"),
            query_token=parse_qs(query, keep_blank_values=True).get("token", []),
        )
        if isinstance(size, Refusal):
            return _refused(size)
        budget = max(RAW_LOG_BUDGET, 2 * self.settings.log_cap)
        if self._raw_held + size > budget:
            return _refused(BUSY)
        self._raw_held += size
        self.raw_readers += 1
        try:
            pages = [page async for page in self.host.log_pages(build)]
        except StoreError:
            self._raw_held -= size
            self.raw_readers -= 1
            return _refused(Refusal(503, "unavailable: the store cannot be read now"))
        body = b"".join(page.encode("utf-8", "surrogatepass") for page in pages)
        del pages
        self._raw_held += len(body) - size  # (a running build's log grew meanwhile)
        task = asyncio.create_task(self._release_raw(connection, build, len(body)))
        self._raw_tasks.add(task)
        task.add_done_callback(self._raw_tasks.discard)
        extra = {k: v for k, v in RAW_LOG_HEADERS.items() if k != "Content-Type"}
        return _response(200, body, RAW_LOG_HEADERS["Content-Type"], extra)

    async def _release_raw(self, connection: ServerConnection, build: str, size: int) -> None:
        """Once the reader has taken the log (the connection closed), let go
        of it; cut off a reader that takes nothing for ``--send-timeout``."""
        transport = connection.transport
        closed = asyncio.ensure_future(connection.wait_closed())
        still, since = -1, asyncio.get_running_loop().time()
        try:
            while not closed.done():
                await asyncio.wait({closed}, timeout=min(1.0, self.settings.send_timeout / 4))
                left = transport.get_write_buffer_size()
                now = asyncio.get_running_loop().time()
                if left != still:
                    still, since = left, now  # it took some: it reads
                elif now - since >= self.settings.send_timeout:
                    log.info("GET /builds/%s/log cut short: the reader took nothing", build)
                    transport.abort()
                    break
        finally:
            closed.cancel()
            self._raw_held -= size
            self.raw_readers -= 1

    async def _handler(self, ws: ServerConnection) -> None:
        roles = self._roles.pop(ws, frozenset())
        conn = self.host.open(_Peer(ws), roles)
        try:
            async for message in ws:
                if self.host.busy:
                    await self.host.pace()
                if isinstance(message, str):
                    self.host.receive(conn, message)
                else:
                    self.host.receive_binary(conn)
        except ConnectionClosed:
            pass
        finally:
            self.host.closed(conn, ws.close_code)
