"""The hub over the ``websockets`` library (the default transport)."""

from __future__ import annotations

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
from .transport import HANDSHAKE_TIMEOUT, BaseTransport, library_level

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
    """Serves ``/ws``, ``/healthz`` and ``/metrics`` with websockets."""

    _server: Server | None = None
    # The roles of each accepted handshake, until its handler takes them.
    # Weak: a handshake that fails after process_request (no
    # Sec-WebSocket-Key, say) never reaches the handler to pop its entry.
    _roles: weakref.WeakKeyDictionary[ServerConnection, frozenset[Role]]

    async def start(self) -> int:
        self._roles = weakref.WeakKeyDictionary()
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

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        headers = request.headers
        host = headers.get_all("Host")
        refused = self.gate.host(host)
        if refused is not None:
            return _refused(refused)
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
