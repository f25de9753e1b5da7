"""The hub over ``aiohttp``."""

from __future__ import annotations

import asyncio

from aiohttp import WSMsgType, web

from .host import Auth, Host
from .metrics import CONTENT_TYPE, Metrics, health
from .settings import Settings

__all__ = ["AiohttpTransport"]


class _Peer:
    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport | None) -> None:
        self.ws = ws
        self.transport = transport

    async def send(self, text: str) -> None:
        await self.ws.send_str(text)

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code=code, message=reason.encode())

    def buffered(self) -> int:
        # aiohttp's send_str does not wait for the socket to drain: measure it.
        transport = self.transport
        if transport is None or transport.is_closing():
            return 0
        return transport.get_write_buffer_size()


class AiohttpTransport:
    """Serves ``/ws``, ``/healthz`` and ``/metrics`` with aiohttp."""

    def __init__(self, host: Host, auth: Auth, metrics: Metrics, settings: Settings) -> None:
        self.host, self.auth, self.metrics, self.settings = host, auth, metrics, settings
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        await self._site.start()
        return int(self._runner.addresses[0][1])

    async def stop_accepting(self) -> None:
        if self._site is not None:
            await self._site.stop()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response(health(self.host))

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        token = Auth.token_from(request.headers.get("Authorization"), request.query.get("token"))
        roles = self.auth.roles_for(token)
        if roles is None:
            raise web.HTTPUnauthorized(text="unauthorized: a valid token is needed\n")
        ws = web.WebSocketResponse(
            heartbeat=self.settings.ping_interval,
            max_msg_size=self.settings.max_frame,
            compress=self.settings.compression == "deflate",
        )
        await ws.prepare(request)
        conn = self.host.open(_Peer(ws, request.transport), roles)
        try:
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    self.host.receive(conn, message.data)
                elif message.type is WSMsgType.BINARY:
                    self.host.receive_binary(conn)
                elif message.type is WSMsgType.ERROR:
                    break
        finally:
            self.host.closed(conn, ws.close_code)
        return ws
