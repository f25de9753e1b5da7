"""python-socketio relaying one client's lines to the others in a room.

python -m bench.sio_server   prints PORT and serves until killed.
"""

from __future__ import annotations

import asyncio

import socketio
from aiohttp import web

from .relay import serve_app


async def main() -> None:
    sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins=[])

    @sio.event
    async def join(sid: str) -> None:
        await sio.enter_room(sid, "readers")

    @sio.event
    async def line(sid: str, data: str) -> None:
        await sio.emit("line", data, room="readers", skip_sid=sid)

    app = web.Application()
    sio.attach(app)
    await serve_app(app)


if __name__ == "__main__":
    asyncio.run(main())
