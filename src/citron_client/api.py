"""An asyncio client for the backend (``API``) and the front (``WEB``).

::

    async with Client("ws://127.0.0.1:8765/ws", token="...") as client:
        build = await client.submit("https://example.org/app.git", ["make test"])
        async for event in client.follow(build):
            if isinstance(event, LogChunk):
                print(event.log, end="")
        print((await client.build(build)).state)

Replies are matched to requests by ``req``; an ``error:`` reply raises
:class:`RequestError` with its code. If the connection drops, the client
reconnects with backoff (requests in flight fail with :class:`ConnectionLost`)
and every ``follow`` resubscribes from the last chunk it yielded: no chunk
twice, none missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import attrs
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from citron_protocol import (
    BuildInfo,
    BuildState,
    CancelBuild,
    ClientMessage,
    ClientProtocol,
    Failure,
    Follow,
    GetBuild,
    GetBuilds,
    GetRunners,
    LogChunk,
    ProtocolError,
    Push,
    Reply,
    Role,
    RunnerInfo,
    StateChange,
    SubmitBuild,
    Unsubscribe,
)
from citron_protocol.client import FollowEvent
from citron_protocol.messages import BuildReply, Builds, Queued, Runners, ShutdownRunner

from .connection import (
    AuthError,
    Backoff,
    ClientError,
    ConnectionLost,
    Endpoints,
    RequestError,
    open_any,
)

__all__ = ["Client", "FollowEvent"]

log = logging.getLogger("citron.client")


@attrs.define(eq=False)
class _Follower:
    follow: Follow
    queue: asyncio.Queue[FollowEvent | ClientError] = attrs.Factory(asyncio.Queue)


class Client:
    """A backend or front connection to a citron server."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        role: Role = Role.API,
        reconnect: bool = True,
        backoff_cap: float = 30.0,
        ca: str | None = None,
    ) -> None:
        self.endpoints = Endpoints(url)
        self.ca = ca
        self.token, self.role = token, role
        self.reconnect = reconnect
        self._proto = ClientProtocol(role)
        self._ws: ClientConnection | None = None
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._followers: dict[str, list[_Follower]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closed = False
        self._backoff = Backoff(cap=backoff_cap)
        self._fatal: ClientError | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------

    async def connect(self) -> Client:
        """Open the connection. Raises ConnectError or AuthError at once."""
        self._ws = await open_any(self.endpoints, self.token, ca=self.ca)
        self._backoff.opened()
        self._connected.set()
        self._reader = asyncio.create_task(self._read_loop())
        return self

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        self._fail_pending(ConnectionLost("the client was closed"))

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- requests ----------------------------------------------------------------------

    async def submit(
        self,
        repo: str,
        script: list[str] | tuple[str, ...],
        *,
        type: str | None = None,
        ref: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        secrets: dict[str, str] | None = None,
    ) -> str:
        """Queue a build; returns its id."""
        reply = await self._request(
            SubmitBuild(
                repo=repo,
                script=tuple(script),
                type=type,
                ref=ref,
                env=env,
                timeout=timeout,
                secrets=secrets,
            )
        )
        assert isinstance(reply, Queued)
        return reply.build

    async def cancel(self, build: str) -> BuildInfo:
        """Cancel a build; returns it as it is after the request."""
        reply = await self._request(CancelBuild(build=build))
        assert isinstance(reply, BuildReply)
        return reply.build

    async def runners(self) -> tuple[RunnerInfo, ...]:
        """Every registered runner: a reply the server cut (``more``) is
        followed by further pages."""
        out: list[RunnerInfo] = []
        after: str | None = None
        while True:
            reply = await self._request(GetRunners(role=self.role, after=after))
            assert isinstance(reply, Runners)
            out.extend(reply.runners)
            last = reply.runners[-1].id if reply.runners else None
            if not reply.more or last is None or (after is not None and last <= after):
                return tuple(out)  # the end, or a cursor that does not move on
            after = last

    async def builds(
        self, state: BuildState | None = None, limit: int = 50, before: str | None = None
    ) -> tuple[BuildInfo, ...]:
        """Builds, newest first, ``limit`` of them when there are as many: a
        reply the server cut short (``more``) is followed by further pages."""
        out: list[BuildInfo] = []
        while True:
            reply = await self._request(
                GetBuilds(role=self.role, state=state, limit=limit - len(out), before=before)
            )
            assert isinstance(reply, Builds)
            out.extend(reply.builds)
            if not reply.more or not reply.builds or len(out) >= limit:
                return tuple(out)
            before = reply.builds[-1].id

    async def shutdown_runner(self, runner: str) -> RunnerInfo:
        """Tell runner ``runner`` to leave (API role): it ends the build it
        runs, if any, then goes. Returns the runner as it was."""
        reply = await self._request(ShutdownRunner(runner=runner))
        assert isinstance(reply, Runners)
        return reply.runners[0]

    async def build(self, build: str) -> BuildInfo:
        reply = await self._request(GetBuild(role=self.role, build=build))
        assert isinstance(reply, BuildReply)
        return reply.build

    async def follow(self, build: str, from_: int = 0) -> AsyncIterator[FollowEvent]:
        """The build's log chunks (after ``from_``) and state changes, backlog
        first, then live; ends when the build has ended and every chunk is out."""
        follower = _Follower(Follow(build, from_))
        self._followers.setdefault(build, []).append(follower)
        try:
            try:
                await self._subscribe(build)
            except ConnectionLost:
                if not self.reconnect:
                    raise  # otherwise the reconnection subscribes it again
            while not follower.follow.done:
                item = await follower.queue.get()
                if isinstance(item, ClientError):
                    raise item
                for event in follower.follow.receive(item):
                    yield event
        finally:
            followers = self._followers.get(build, [])
            if follower in followers:
                followers.remove(follower)
            if not followers:
                self._followers.pop(build, None)
                if self._ws is not None and not self._closed:
                    with contextlib.suppress(ClientError, ConnectionClosed):
                        req, frame = self._proto.request(Unsubscribe(role=self.role, build=build))
                        self._proto.pending.discard(req)  # its reply is not awaited
                        await self._ws.send(frame)

    async def _subscribe(self, build: str) -> None:
        """One subscription serves every follower of ``build``: from the
        furthest behind."""
        followers = [f for f in self._followers.get(build, []) if not f.follow.done]
        if not followers:
            return
        behind = min(followers, key=lambda f: f.follow.after)
        await self._request(behind.follow.subscribe(self.role))

    async def _request(self, message: ClientMessage) -> Any:
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise ConnectionLost("the client was closed")
        await self._connected.wait()
        ws = self._ws
        assert ws is not None
        req, frame = self._proto.request(message)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[req] = future
        try:
            await ws.send(frame)
        except ConnectionClosed:
            self._pending.pop(req, None)
            self._proto.pending.discard(req)
            raise ConnectionLost("the connection dropped before the request was sent") from None
        return await future

    # -- the reader ---------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while not self._closed:
            ws = self._ws
            assert ws is not None
            try:
                async for text in ws:
                    if isinstance(text, str):
                        self._dispatch(text)
            except ConnectionClosed:
                pass
            code = ws.close_code
            self._backoff.closed()
            self._connected.clear()
            self._fail_pending(ConnectionLost(f"the connection closed (code {code})"))
            if self._closed:
                return
            if not self.reconnect or code == 1008:
                self._fatal = (
                    AuthError("the server closed the connection: unauthorized")
                    if code == 1008
                    else ConnectionLost(f"the connection closed (code {code})")
                )
                self._fail_followers(self._fatal)
                return
            await self._reconnect()

    async def _reconnect(self) -> None:
        while not self._closed:
            await self._backoff.sleep()
            try:
                self._ws = await open_any(self.endpoints, self.token, ca=self.ca)
            except AuthError as exc:
                self._fatal = exc
                self._fail_followers(exc)
                return
            except ClientError as exc:
                log.info("reconnecting to %s: %s", self.endpoints, exc)
                continue
            self._backoff.opened()
            self._proto = ClientProtocol(self.role)
            self._connected.set()
            log.info("reconnected to %s", self.endpoints.current)
            for build in list(self._followers):
                task = asyncio.create_task(self._resubscribe(build))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return

    async def _resubscribe(self, build: str) -> None:
        try:
            await self._subscribe(build)
        except ClientError as exc:
            for follower in self._followers.get(build, []):
                follower.queue.put_nowait(exc)

    def _dispatch(self, text: str) -> None:
        try:
            event = self._proto.receive(text)
        except ProtocolError as exc:
            log.warning("ignoring a bad frame from the server: %s", exc)
            return
        if isinstance(event, Reply):
            future = self._pending.pop(event.req, None)
            if future is not None and not future.done():
                future.set_result(event.message)
        elif isinstance(event, Failure):
            error = RequestError(event.error.code, event.error.message)
            future = self._pending.pop(event.req, None) if event.req else None
            if future is not None and not future.done():
                future.set_exception(error)
            else:
                log.warning("error from the server: %s", error)
        elif isinstance(event, Push):
            message = event.message
            if isinstance(message, LogChunk):
                for follower in self._followers.get(message.build, []):
                    follower.queue.put_nowait(message)
            elif isinstance(message, StateChange):
                for follower in self._followers.get(message.build.id, []):
                    follower.queue.put_nowait(message)

    def _fail_pending(self, error: ClientError) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    def _fail_followers(self, error: ClientError) -> None:
        for followers in self._followers.values():
            for follower in followers:
                follower.queue.put_nowait(error)
