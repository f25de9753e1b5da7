"""python-socketio relaying one client's lines to the others in a room.

python -m bench.sio_server   prints PORT and serves until killed.
"""

from __future__ import annotations

import asyncio

import socketio
from aiohttp import web


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
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
