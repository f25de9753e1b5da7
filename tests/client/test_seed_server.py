"""citron-runner for a server that speaks only the seed protocol (the
original ci-tron): no ready:, run: without a build id, process frames
without ids, no resume. The server here is the test's own."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

from websockets.asyncio.server import ServerConnection, serve

from ..procs import runner_argv


class SeedServer:
    """Gives each runner that says init the queued scripts, one build at a
    time, records what comes back, then says shutdown:."""

    def __init__(self, repo: str, scripts: list[list[str]]) -> None:
        self.repo, self.scripts = repo, scripts
        self.inits: list[str] = []
        self.builds: list[list[dict[str, object]]] = []  # the process payloads of each build
        self.other: list[str] = []

    async def handler(self, ws: ServerConnection) -> None:
        init = await ws.recv()
        assert isinstance(init, str)
        self.inits.append(init)
        for script in self.scripts:
            await ws.send("run:" + json.dumps({"repo": self.repo, "script": script}))
            frames: list[dict[str, object]] = []
            self.builds.append(frames)
            while True:
                text = await ws.recv()
                assert isinstance(text, str)
                if not text.startswith("RUNNER:process:"):
                    self.other.append(text)
                    continue
                payload = json.loads(text.removeprefix("RUNNER:process:"))
                frames.append(payload)
                if payload["finished"]:
                    break
        await ws.send("shutdown:")
        await ws.wait_closed()


async def test_citron_runner_works_for_a_seed_only_server(git_repo: Path, tmp_path: Path) -> None:
    seed = SeedServer(str(git_repo), [["bash build.sh", "echo second line"], ["echo x", "exit 3"]])
    async with serve(seed.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            *runner_argv(f"ws://127.0.0.1:{port}/ws", "--name", "seedling"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
        finally:
            if proc.returncode is None:
                proc.kill()
    text = output.decode()
    assert proc.returncode == 0, text
    assert json.loads(seed.inits[0].removeprefix("RUNNER:init:"))["name"] == "seedling"
    passing, failing = seed.builds
    for frames in (passing, failing):
        assert all("build" not in f and "seq" not in f for f in frames), frames
    assert passing[-1] == {"finished": True, "success": True}
    assert failing[-1] == {"finished": True, "success": False}
    log = "".join(str(f.get("log", "")) for f in passing)
    assert "built from main" in log and "second line" in log
    assert "x\n" in "".join(str(f.get("log", "")) for f in failing)
    assert seed.other == []
    assert "seed-only server" in text  # its log names the builds it cannot name


async def test_a_frame_the_runner_cannot_use_is_an_error_in_its_log(tmp_path: Path) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send('run:{"script": "not a list"}')
        await ws.send("shutdown:")
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            *runner_argv(f"ws://127.0.0.1:{port}/ws"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    text = output.decode()
    assert "ERROR" in text and "cannot use (run:," in text, text
