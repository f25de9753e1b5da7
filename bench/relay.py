"""The baseline: a minimal relay server on the same WebSocket library.

A connection's first message names what it is: ``reader`` (receives every
message a writer sends), ``writer`` (its messages go, unparsed, to every
reader), ``echo`` (its messages come back), ``replay BUILD`` (the build's
log chunks, read from the SQLite file given after the transport, each sent
as a ``log:`` frame with the library's own send), or anything else (idle).

    python -m bench.relay websockets|aiohttp [DB]
prints ``PORT`` and serves on 127.0.0.1 until killed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import Iterator
from typing import Any

readers: set[Any] = set()


def stored_log(build: str) -> Iterator[str]:
    """The ``log:`` frames of a build stored by citron, page by page."""
    from citron_protocol.codec import encode_log_chunk

    db = sqlite3.connect(sys.argv[2])
    after = 0
    while True:
        rows = db.execute(
            "SELECT seq, log FROM log_chunks WHERE build = ? AND seq > ? ORDER BY seq LIMIT 64",
            (build, after),
        ).fetchall()
        if not rows:
            break
        for seq, text in rows:
            yield encode_log_chunk(build, seq, text)
        after = rows[-1][0]
    db.close()


async def serve_websockets() -> None:
    from websockets.asyncio.server import broadcast, serve

    async def handler(ws) -> None:  # type: ignore[no-untyped-def]
        role = await ws.recv()
        if role == "reader":
            readers.add(ws)
            try:
                await ws.wait_closed()
            finally:
                readers.discard(ws)
        elif role == "writer":
            async for message in ws:
                broadcast(readers, message)  # websockets' fastest fan-out
        elif role == "echo":
            async for message in ws:
                await ws.send(message)
        elif role.startswith("replay "):
            for frame in stored_log(role.split()[1]):
                await ws.send(frame)  # waits for the socket to drain
            await ws.wait_closed()
        else:
            await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()


async def serve_aiohttp() -> None:
    from aiohttp import WSMsgType, web

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, max_msg_size=0)
        await ws.prepare(request)
        role = (await ws.receive()).data
        if role == "reader":
            readers.add(ws)
            try:
                async for _ in ws:
                    pass
            finally:
                readers.discard(ws)
        elif role == "writer":
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    for reader in readers:  # a send per reader; aiohttp waits for no drain
                        await reader.send_str(message.data)
        elif role == "echo":
            async for message in ws:
                await ws.send_str(message.data)
        elif role.startswith("replay "):
            for frame in stored_log(role.split()[1]):
                await ws.send_str(frame)  # waits for the socket to drain now and then
            async for _ in ws:
                pass
        else:
            async for _ in ws:
                pass
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    await serve_app(app)


async def serve_app(app: Any) -> None:
    """Serve an aiohttp application on a free loopback port, print the port,
    and run until killed."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(serve_websockets() if sys.argv[1] == "websockets" else serve_aiohttp())
