"""Test peers: websockets clients, and a raw socket client for what a polite
library will not do (send invalid UTF-8, stop reading)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from citron_protocol import decode_server

#: Every client a test opened; the ``close_peers`` fixture closes them.
OPEN: list[ClientConnection | RawClient] = []


async def peer(url: str, token: str | None = None, **kwargs: Any) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    ws = await connect(
        url, additional_headers=headers, compression=None, max_size=None, open_timeout=5, **kwargs
    )
    OPEN.append(ws)
    return ws


async def recv(ws: ClientConnection, timeout: float = 5) -> Any:
    text = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(text, str)
    return decode_server(text)


async def expect(ws: ClientConnection, command: str, timeout: float = 5) -> Any:
    """Read until a frame with ``command`` comes; return it."""
    async with asyncio.timeout(timeout):
        while True:
            message = await recv(ws, timeout)
            if command == message.COMMAND:
                return message


async def ask(ws: ClientConnection, frame: str, timeout: float = 5) -> Any:
    await ws.send(frame)
    return await recv(ws, timeout)


def builds_query(limit: int, state: str | None = None, before: str = "") -> str:
    """The payload of a get_builds page."""
    fields = [f'"limit": {limit}']
    if state:
        fields.append(f'"state": "{state}"')
    if before:
        fields.append(f'"before": "{before}"')
    return "{" + ", ".join(fields) + "}"


async def page_all(ws: ClientConnection, limit: int, state: str | None = None) -> list[str]:
    """Every build's id, newest first, paging get_builds with before."""
    seen: list[str] = []
    before = ""
    while True:
        reply = await ask(ws, "WEB:get_builds:" + builds_query(limit, state, before))
        ids = [b.id for b in reply.builds]
        seen += ids
        if len(ids) < limit and not reply.more:
            return seen
        before = ids[-1]


async def runner(url: str, type: str = "simple", token: str | None = None) -> ClientConnection:
    ws = await peer(url, token)
    ready = await ask(ws, f'RUNNER:init:{{"type": "{type}", "protocol": 1}}')
    assert ready.COMMAND == "ready"
    return ws


async def submit(api: ClientConnection, script: str = '["make"]', extra: str = "") -> str:
    reply = await ask(api, f'API:run:{{"repo": "https://x/r.git", "script": {script}{extra}}}')
    assert reply.COMMAND == "queued", reply
    return str(reply.build)


async def follow(ws: ClientConnection, build: str, timeout: float = 10) -> list[tuple[int, str]]:
    """Collect log chunks until a state: shows the build finished with all of them."""
    chunks: list[tuple[int, str]] = []
    async with asyncio.timeout(timeout):
        while True:
            message = await recv(ws, timeout)
            if message.COMMAND == "log" and message.build == build:
                chunks.append((message.seq, message.log))
            elif message.COMMAND == "state" and message.build.id == build:
                info = message.build
                if info.state.finished and (not chunks or chunks[-1][0] >= info.log_seq):
                    return chunks


class RawClient:
    """A WebSocket client on a bare socket, with a small receive buffer."""

    def __init__(self, port: int, path: str = "/ws", rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        OPEN.append(self)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            data = self.sock.recv(4096)
            assert data, "closed during the handshake"
            self.buffer += data
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def send_frame(self, payload: bytes, opcode: int = 1) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def frames(self) -> list[tuple[int, bytes]]:
        """Read frames until the server closes; returns (opcode, payload)."""
        out: list[tuple[int, bytes]] = []
        while True:
            frame = self._next_frame()
            if frame is None:
                return out
            out.append(frame)
            if frame[0] == 8:
                return out

    def _read(self, n: int) -> bytes | None:
        while len(self.buffer) < n:
            try:
                data = self.sock.recv(1 << 20)
            except (ConnectionResetError, TimeoutError):
                return None
            if not data:
                return None
            self.buffer += data
        chunk, self.buffer = self.buffer[:n], self.buffer[n:]
        return chunk

    def _next_frame(self) -> tuple[int, bytes] | None:
        head = self._read(2)
        if head is None:
            return None
        opcode, n = head[0] & 0x0F, head[1] & 0x7F
        if n == 126:
            ext = self._read(2)
            if ext is None:
                return None
            n = struct.unpack("!H", ext)[0]
        elif n == 127:
            ext = self._read(8)
            if ext is None:
                return None
            n = struct.unpack("!Q", ext)[0]
        payload = self._read(n)
        if payload is None:
            return None
        return opcode, payload

    def close_code(self) -> int | None:
        for opcode, payload in self.frames():
            if opcode == 8:
                return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else 1005
        return None

    def close(self) -> None:
        self.sock.close()
