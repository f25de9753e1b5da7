"""Protocol 2 end to end: a runner keeps only what the server has not made
durable, whatever the size of the build's log (real server, both
transports, the runner framework in this process)."""

from __future__ import annotations

import asyncio
import json

from citron_client.runner import BuildContext, Runner, RunnerHost
from citron_protocol import Run

from ..conftest import ServerProc
from ..peers import ask, peer, submit

CHUNK = 64 * 1024
TOTAL = 64 * 1024 * 1024


class Firehose(Runner):
    """Writes TOTAL bytes of output in 64 KiB chunks as fast as it is let."""

    type = "simple"

    def __init__(self) -> None:
        self.most = 0  # the most output held unacknowledged
        self.host: RunnerHost | None = None

    async def run(self, build: Run, ctx: BuildContext) -> bool:
        assert self.host is not None
        line = "y" * (CHUNK - 1) + "\n"
        for _ in range(TOTAL // CHUNK):
            await ctx.room()
            ctx.log(line)
            self.most = max(self.most, self.host.proto.unacknowledged)
            await asyncio.sleep(0)
        return True


async def test_a_64_mib_build_is_streamed_holding_a_window_at_most(server: ServerProc) -> None:
    firehose = Firehose()
    host = RunnerHost(firehose, server.url, once=True)
    firehose.host = host
    serving = asyncio.create_task(host.serve())
    api = await peer(server.url)
    for _ in range(200):  # until the runner registered
        if (await ask(api, "API:get_runners:")).runners:
            break
        await asyncio.sleep(0.05)
    build = await submit(api)
    await asyncio.wait_for(serving, timeout=300)
    assert host.proto.acks  # the server spoke protocol 2 with it
    assert firehose.most <= host.window + CHUNK, firehose.most
    assert host.proto.unacknowledged == 0
    info = (await ask(api, f'API:get_build:{{"build": "{build}"}}')).build
    assert (info.state.value, info.log_bytes) == ("success", TOTAL)
    assert json.loads(server.http("/healthz")[2])["status"] == "ok"
