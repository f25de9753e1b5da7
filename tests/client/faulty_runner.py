"""citron-runner with one fault injected at the wire, for ``citron
conformance --runner`` to catch.

``python faulty_runner.py FAULT URL``: a WebSocket proxy on a free loopback
port relays between ``citron-runner`` and ``URL``, changing frames as FAULT
says. The runner itself is the real one: each fault is one rule broken, as a
runner written by someone else could break it.

- ``success``: every result says success.
- ``split_secrets``: secrets reach the runner as plain ``env`` (so it does not
  mask them), and each chunk is masked on its own: a secret split across two
  chunks goes through.
- ``ignore_shutdown``: ``shutdown:`` never reaches the runner.
- ``no_protocol``: ``init`` without ``protocol``.
- ``keep_acked``: says protocol 2 but never reads an ``ack:``, so it keeps
  (and resends) every chunk.
- ``from_one``: protocol 1; after a resume it resends every chunk from seq 1,
  which the protocol allows (this one must pass).

SIGTERM is left to the runner (same process group); the proxy exits with it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

FAULT, UPSTREAM = sys.argv[1], sys.argv[-1]
SECRETS: list[str] = []


def _split(text: str) -> tuple[str, str, Any]:
    head, _, payload = text.partition(":{")
    return head, "{" + payload, json.loads("{" + payload) if payload else None


def to_server(text: str) -> str | None:
    if text.startswith("RUNNER:init:"):
        head, _, init = _split(text)
        if FAULT == "no_protocol":
            init.pop("protocol", None)
        elif FAULT == "from_one":
            init["protocol"] = 1
        return f"{head}:{json.dumps(init)}"
    if text.startswith("RUNNER:process:"):
        head, _, chunk = _split(text)
        if FAULT == "success" and chunk.get("finished"):
            chunk["success"] = True
        if FAULT == "split_secrets" and "log" in chunk:
            for value in SECRETS:
                chunk["log"] = chunk["log"].replace(value, "***")
        return f"{head}:{json.dumps(chunk)}"
    return text


def to_runner(text: str) -> str | None:
    if FAULT == "ignore_shutdown" and text.startswith("shutdown:"):
        return None
    if FAULT == "keep_acked" and text.startswith("ack:"):
        return None
    if FAULT == "split_secrets" and text.startswith("run:"):
        _, _, run = _split(text)
        secrets = run.pop("secrets", None) or {}
        SECRETS[:] = secrets.values()
        run["env"] = {**(run.get("env") or {}), **secrets}
        return f"run:{json.dumps(run)}"
    if FAULT == "from_one" and text.startswith("ready:"):
        _, _, ready = _split(text)
        if ready.get("resume"):
            ready["resume"]["seq"] = 0
        return f"ready:{json.dumps(ready)}"
    return text


async def relay(source: Any, sink: Any, change: Any) -> None:
    try:
        async for text in source:
            changed = change(text)
            if changed is not None:
                await sink.send(changed)
    except ConnectionClosed:
        pass
    code = source.close_code if source.close_code in (1000, 1001, 4001, 4002) else 1000
    await sink.close(code)


async def handler(runner: ServerConnection) -> None:
    try:
        async with connect(UPSTREAM, compression=None, max_size=None) as server:
            await asyncio.gather(relay(runner, server, to_server), relay(server, runner, to_runner))
    except OSError:
        await runner.close(1001)


async def main() -> int:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: None)  # the runner decides
    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as proxy:
        port = proxy.sockets[0].getsockname()[1]
        runner = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "citron_client.runner_cli", f"ws://127.0.0.1:{port}/ws"
        )
        return await runner.wait()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
