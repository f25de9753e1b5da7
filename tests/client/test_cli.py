"""The citron CLI as a user meets it: where the server is, exit codes, what
--wait and --follow say, a closed pipe, Ctrl-C; citron-runner's URL and
name. Each against a real server (both transports)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from ..conftest import ServerFactory, ServerProc
from ..peers import ask, expect, peer, runner, submit
from ..procs import Spawn, citron, eventually, runner_argv


@pytest.fixture
def transport() -> str:
    """One transport: what these tests check is the CLI, the same on both
    (the servers' own tests run on both)."""
    return "websockets"


def http(server: ServerProc) -> str:
    """The dashboard's address of ``server``, as a person would paste it."""
    return server.url.replace("ws://", "http://").removesuffix("/ws") + "/"


def test_the_server_comes_from_url_env_or_argument(server: ServerProc) -> None:
    assert citron("builds", server.url).returncode == 0  # the argument, as before
    for args, env in [
        (["--url", server.url], {}),
        (["-u", http(server)], {}),  # http://host:port/ maps to ws://host:port/ws
        (["-u", http(server).removesuffix("/")], {}),  # no path at all
        ([], {"CITRON_URL": http(server)}),
        ([], {"CITRON_URL": server.url}),
    ]:
        result = citron("runners", *args, "--json", env=env)
        assert result.returncode == 0, (args, env, result.stderr)
        assert json.loads(result.stdout) == []


def test_without_any_url_it_tries_the_default() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CITRON_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "citron_client", "runners"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    # Nothing listens there in the tests (or something else does): 69 with
    # the default URL named, never a usage error.
    assert result.returncode in (0, 69), result.stderr
    if result.returncode == 69:
        assert "ws://127.0.0.1:8765/ws" in result.stderr


def test_bad_and_misplaced_urls_are_usage_errors(server: ServerProc) -> None:
    cases = [
        (["runners", "127.0.0.1:8765"], "is not a server URL"),
        (["runners", "ftp://host/ws"], "is not a server URL"),
        (["runners", "-u", "ws://host:port/ws"], "--url: "),
        (["show", "b-1", server.url], "is where the build id goes"),
        (["logs", "b-1", http(server)], "is where the build id goes"),
        (["runners", server.url, "-u", server.url], "given twice"),
    ]
    for args, needle in cases:
        result = citron(*args)
        assert result.returncode == 64, (args, result.stderr)
        assert result.stderr.startswith("citron: error: ") and needle in result.stderr, args
        assert len(result.stderr.strip().splitlines()) == 1
    bad_env = citron("runners", env={"CITRON_URL": "localhost"})
    assert bad_env.returncode == 64 and "$CITRON_URL: " in bad_env.stderr


async def test_a_closed_pipe_ends_quietly(server: ServerProc) -> None:
    api = await peer(server.url)
    for _ in range(300):  # about 100 KiB of JSON: more than a pipe holds
        await submit(api)
    command = f"{sys.executable} -m citron_client builds -u {server.url} --limit 300 --json"
    result = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", f"{command} | head -c 100 >/dev/null; echo ${{PIPESTATUS[0]}} >&2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stderr.strip() == "141", result.stderr  # no traceback, no message
    assert "Traceback" not in result.stderr


async def _finish_next(url: str, success: bool) -> None:
    """A runner that takes one build and reports ``success``."""
    ws = await runner(url)
    await expect(ws, "run", timeout=30)
    await ws.send('RUNNER:process:{"finished": false, "log": "hello\\n"}')
    await ws.send(f'RUNNER:process:{{"finished": true, "success": {json.dumps(success)}}}')
    await asyncio.sleep(0.5)
    await ws.close()


async def test_logs_follow_exits_like_submit_wait(server: ServerProc) -> None:
    api = await peer(server.url)
    codes = {}
    for name, success in (("success", True), ("failure", False)):
        build = await submit(api)
        await _finish_next(server.url, success)
        result = await asyncio.to_thread(citron, "logs", "-u", server.url, build, "--follow")
        assert result.stdout == "hello\n"
        codes[name] = result.returncode
    cancelled = await submit(api)
    await ask(api, f'API:cancel:{{"build": "{cancelled}"}}')
    result = await asyncio.to_thread(citron, "logs", "-u", server.url, cancelled, "-f", "--json")
    codes["cancelled"] = result.returncode
    assert json.loads(result.stdout.splitlines()[-1])["state"] == "cancelled"
    assert codes == {"success": 0, "failure": 1, "cancelled": 2}


async def test_submit_json_wait_ends_with_the_build(server: ServerProc) -> None:
    argv = ["submit", "-u", server.url, "--repo", "r", "--script", "make", "--json", "--wait"]
    proc = asyncio.create_task(asyncio.to_thread(citron, *argv))
    await _finish_next(server.url, False)
    result = await proc
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert (lines[0]["seq"], lines[0]["log"]) == (1, "hello\n")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", lines[0]["time"])
    assert lines[-1]["state"] == "failure" and lines[-1]["id"].startswith("b-")
    assert len(lines) == 2


async def test_wait_says_why_a_build_stays_queued(server: ServerProc) -> None:
    await runner(server.url, type="simple")
    argv = [sys.executable, "-m", "citron_client", "submit", "-u", server.url]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        *("--repo", "r", "--script", "make", "--type", "gpu", "--wait"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # As in a terminal: a test run in the background inherits SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr is not None
    try:
        first = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        build = first.split()[-1]
        hint = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        assert f"build {build} is still queued" in hint
        assert "no connected runner has type 'gpu' (connected types: simple)" in hint
        # Ctrl-C: the build goes on, and the message says how to cancel it.
        proc.send_signal(signal.SIGINT)
        _, rest = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130
    text = rest.decode()
    assert f"build {build} goes on" in text and f"citron cancel -u {server.url} {build}" in text
    assert "Traceback" not in text
    api = await peer(server.url)
    assert (await ask(api, f'API:get_build:{{"build": "{build}"}}')).build.state == "queued"


def test_citron_runner_takes_url_and_env_and_is_named_after_the_host(
    server_factory: ServerFactory, spawn: Spawn
) -> None:
    server = server_factory()
    spawn(*runner_argv("")[:-1], "-u", http(server), log_name="by-option")
    env_runner = [sys.executable, "-m", "citron_client.runner_cli", "--name", "by-env"]
    old = os.environ.get("CITRON_URL")
    os.environ["CITRON_URL"] = server.url
    try:
        spawn(*env_runner, log_name="by-env")
    finally:
        if old is None:
            del os.environ["CITRON_URL"]
        else:
            os.environ["CITRON_URL"] = old

    def two() -> list[dict[str, str]] | None:
        runners = json.loads(citron("runners", server.url, "--json").stdout)
        return runners if len(runners) == 2 else None

    names = sorted(r["name"] for r in eventually(two, "two runners"))
    assert names == sorted(["by-env", socket.gethostname()])


def test_citron_runner_bad_url_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "citron_client.runner_cli", "-u", "nope"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert (
        result.stderr.startswith("citron-runner: error: ") and "not a server URL" in result.stderr
    )
