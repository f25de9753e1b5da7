"""The hub over ``aiohttp``."""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.base_protocol import BaseProtocol

from .host import unsent_bytes
from .metrics import CONTENT_TYPE, health
from .security import Refusal
from .static import HEADERS, static_file
from .store import StoreError
from .transport import (
    HANDSHAKE_TIMEOUT,
    RAW_LOG_HEADERS,
    RAW_LOG_SLICE,
    BaseTransport,
    library_level,
    raw_log_build,
)

log = logging.getLogger("citron.server")

__all__ = ["AiohttpTransport"]


class _Peer:
    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        protocol: BaseProtocol | None = None,
    ) -> None:
        self.ws = ws
        self.transport = transport
        self.protocol = protocol

    async def send(self, text: str) -> None:
        await self.ws.send_str(text)

    def write_batch(self, texts: list[str]) -> bool:
        transport = self.transport
        if self.ws.closed or transport is None or transport.is_closing():
            return True  # closing: a send would be refused too
        if not self.ws.compress:
            # Uncompressed server frames are a header and the payload: build
            # them here so that a turn's frames go out in one write (aiohttp
            # writes, and so calls the kernel, once per frame).
            transport.write(b"".join(_text_frame(text.encode()) for text in texts))
            return True
        for text in texts:
            self._write_now(text)
        return True

    def _write_now(self, text: str) -> bool:
        # aiohttp's send_str writes the frame to the transport at once and
        # only then, now and again, awaits a drain. Step it by hand: when it
        # does not suspend the frame is out with no task; when it does, a
        # task waits the drain out (the frame is already written, so order
        # holds; the host bounds the buffer).
        if self.ws.closed:
            return True
        coro = self.ws.send_str(text)
        try:
            waiting = coro.send(None)
        except StopIteration:
            return True
        except Exception:  # noqa: BLE001 - a closing transport: the reader reports it
            coro.close()
            return True
        task = asyncio.ensure_future(_finish(coro, waiting))
        _pending.add(task)
        task.add_done_callback(_pending.discard)
        return True

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code=code, message=reason.encode())

    def buffered(self) -> int:
        # aiohttp's send_str does not wait for the socket to drain: measure it.
        transport = self.transport
        if transport is None or transport.is_closing():
            return 0
        return transport.get_write_buffer_size()

    async def drain(self) -> None:
        # The connection's protocol gets the transport's pause and resume;
        # aiohttp's own writers wait on it the same way (there is no public
        # drain on a WebSocketResponse).
        protocol = self.protocol
        if protocol is not None and protocol.writing_paused:
            await protocol._drain_helper()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def unsent(self) -> int:
        return unsent_bytes(self.transport)


_pending: set[asyncio.Future[None]] = set()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _refused(refusal: Refusal) -> web.Response:
    return web.Response(
        status=refusal.status, body=refusal.body, content_type="text/plain", charset="utf-8"
    )


def _text_frame(payload: bytes) -> bytes:
    """An unmasked, final, uncompressed text frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


async def _finish(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Drive a coroutine that suspended on ``waiting`` to its end."""
    try:
        while True:
            try:
                if waiting is None:
                    await asyncio.sleep(0)  # a bare yield
                else:
                    await waiting
            except BaseException as exc:  # noqa: BLE001 - handed back to the coroutine
                waiting = coro.throw(exc)
            else:
                waiting = coro.send(None)
    except StopIteration:
        return
    except Exception:  # noqa: BLE001 - the connection broke while draining
        return


class _Deadline(asyncio.Protocol):
    """Stands before aiohttp's protocol for one TCP connection and aborts it
    when no request has come whole within ``seconds`` (aiohttp waits for
    headers for ever: one byte every few seconds holds a connection)."""

    def __init__(
        self, inner: asyncio.Protocol, seconds: float, waiting: dict[Any, _Deadline]
    ) -> None:
        self.inner, self.seconds, self.waiting = inner, seconds, waiting
        self.transport: asyncio.BaseTransport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.waiting[transport] = self
        self.timer = asyncio.get_running_loop().call_later(self.seconds, self._expired)
        self.inner.connection_made(transport)

    def _expired(self) -> None:
        self.waiting.pop(self.transport, None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()  # type: ignore[attr-defined]

    def met(self) -> None:
        """A request came whole: the deadline no longer applies."""
        if self.timer is not None:
            self.timer.cancel()
        self.waiting.pop(self.transport, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.met()
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _Site(web.BaseSite):
    """aiohttp's TCPSite, with :class:`_Deadline` before each connection."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        deadline: float,
        waiting: dict[Any, _Deadline],
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self.host, self.port, self.deadline, self.waiting = host, port, deadline, waiting

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.Protocol:
            return _Deadline(server(), self.deadline, self.waiting)

        self._server = await asyncio.get_running_loop().create_server(
            protocol,
            self.host,
            self.port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self.deadline if self._ssl_context else None,
            reuse_address=True,
        )


class AiohttpTransport(BaseTransport):
    """Serves ``/ws``, ``/healthz`` and ``/metrics`` with aiohttp."""

    _runner: web.AppRunner | None = None
    _site: _Site | None = None
    _waiting: dict[Any, _Deadline]  # by transport: connections with no request yet

    async def start(self) -> int:
        self._waiting = {}
        logging.getLogger("aiohttp").setLevel(library_level())
        app = web.Application(middlewares=[self._check_host])
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/builds/{build}/log", self._raw_log)
        for path in ("/", "/index.html", "/static/app.js", "/static/style.css"):
            app.router.add_get(path, self._static)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        self._site = _Site(
            self._runner,
            self.settings.host,
            self.settings.port,
            self.tls,
            HANDSHAKE_TIMEOUT,
            self._waiting,
        )
        await self._site.start()
        return int(self._runner.addresses[0][1])

    def addresses(self) -> list[str]:
        """The addresses the server listens on."""
        found = self._runner.addresses if self._runner is not None else []
        return [str(address[0]) for address in found]

    async def stop_accepting(self) -> None:
        if self._site is not None:
            await self._site.stop()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _check_host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        deadline = self._waiting.get(request.transport)
        if deadline is not None:
            deadline.met()
        refused = self.gate.host(request.headers.getall("Host", []))
        if refused is not None:
            return _refused(refused)
        return await handler(request)

    async def _raw_log(self, request: web.Request) -> web.StreamResponse:
        """GET /builds/ID/log, streamed a slice at a time: a reader holds at
        most a page read from the store, and one that takes nothing for
        ``--send-timeout`` is cut off."""
        build = raw_log_build(request.rel_url.raw_path)
        assert build is not None
        size = await self.raw_log_size(
            build,
            authorization=request.headers.getall("Authorization", []),
            query_token=request.query.getall("token", []),
        )
        if isinstance(size, Refusal):
            return _refused(size)
        self.raw_readers += 1
        try:
            response = web.StreamResponse(headers=RAW_LOG_HEADERS)
            await response.prepare(request)
            async for page in self.host.log_pages(build):
                data = page.encode("utf-8", "surrogatepass")
                for at in range(0, len(data), RAW_LOG_SLICE):
                    async with asyncio.timeout(self.settings.send_timeout):
                        await response.write(data[at : at + RAW_LOG_SLICE])
            await response.write_eof()
            return response
        except ConnectionError:
            log.debug("GET /builds/%s/log: the reader went away", build)
            return response
        except (StoreError, TimeoutError) as exc:
            log.info(
                "GET /builds/%s/log cut short: %s", build, str(exc) or "the reader took nothing"
            )
            if request.transport is not None:
                request.transport.abort()  # the reader sees a short, failed response
            return response
        finally:
            self.raw_readers -= 1

    async def _healthz(self, request: web.Request) -> web.Response:
        body = health(self.host)
        return web.json_response(body, status=200 if body["status"] == "ok" else 503)

    async def _static(self, request: web.Request) -> web.Response:
        found = static_file(request.path)
        if found is None:
            raise web.HTTPNotFound()
        body, content_type = found
        return web.Response(body=body, headers={"Content-Type": content_type, **HEADERS})

    async def _metrics(self, request: web.Request) -> web.Response:
        refused = self.gate.metrics(request.headers.getall("Authorization", []))
        if refused is not None:
            return _refused(refused)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        headers = request.headers
        roles = self.admit(
            host=headers.getall("Host", []),
            origin=headers.getall("Origin", []),
            authorization=headers.getall("Authorization", []),
            query_token=request.query.getall("token", []),
        )
        if isinstance(roles, Refusal):
            return _refused(roles)
        ws = web.WebSocketResponse(
            heartbeat=self.settings.ping_interval,
            # aiohttp refuses a message of exactly max_msg_size bytes: one more,
            # so that --max-frame is the largest frame accepted on both transports.
            max_msg_size=self.settings.max_frame + 1,
            compress=self.settings.compression == "deflate",
        )
        await ws.prepare(request)
        conn = self.host.open(_Peer(ws, request.transport, request.protocol), roles)
        try:
            async for message in ws:
                if self.host.busy:
                    await self.host.pace()
                if message.type is WSMsgType.TEXT:
                    self.host.receive(conn, message.data)
                elif message.type is WSMsgType.BINARY:
                    self.host.receive_binary(conn)
                elif message.type is WSMsgType.ERROR:
                    break
        finally:
            self.host.closed(conn, ws.close_code)
        return ws
