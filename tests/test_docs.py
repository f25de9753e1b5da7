"""Every code block of the README and docs/ runs in a test: here, or in the
test named for it (which must exist). A block that nothing runs, and that is
not listed with the reason it cannot run, fails ``test_every_block_is_run``:
a new example cannot go untested by accident."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import ServerFactory
from .procs import Spawn, citron, runner_argv

ROOT = Path(__file__).parents[1]
FILES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```([\w-]+)\n(.*?)```", re.DOTALL)  # (MyST's ```{directive} are not code)


@pytest.fixture
def transport() -> str:
    """One transport: what these tests check is the documented examples, the same on both
    (the servers' own tests run on both)."""
    return "websockets"


def blocks() -> dict[str, tuple[str, str]]:
    """Every code block by id, ``FILE#N`` (N counts the file's blocks), with
    its language and text."""
    out = {}
    for name in FILES:
        for n, (lang, body) in enumerate(FENCE.findall((ROOT / name).read_text())):
            out[f"{name}#{n}"] = (lang, body)
    return out


def block(block_id: str) -> str:
    return blocks()[block_id][1]


#: Blocks run by another test: (test file, test function).
ELSEWHERE = {
    "README.md#0": ("tests/test_install.py", "test_a_build_runs_on_the_core"),
    "README.md#2": ("tests/test_readme.py", "test_ci_runs_the_readme_test_command"),
    "README.md#3": ("tests/test_readme.py", "test_the_readme_example_runs"),
    "docs/benchmarks.md#0": ("tests/test_bench.py", "test_the_quick_benchmarks_run"),
    "docs/howto-runner.md#0": ("tests/client/test_e2e.py", "test_the_custom_runner_from_the_docs"),
    "docs/howto-runner.md#1": (
        "tests/client/test_tools.py",
        "test_the_scratch_runner_of_the_how_to_passes_the_shell_checks",
    ),
    "docs/operations.md#2": ("tests/cluster/test_cluster.py", "test_startup_says_engine_and_node"),
    "docs/operations.md#4": ("tests/server/test_tls.py", "test_https_and_wss"),
    "docs/operations.md#5": (
        "tests/server/test_tls.py",
        "test_a_real_build_over_wss",
    ),
    "docs/testing-tools.md#1": (
        "tests/client/test_tools.py",
        "test_conformance_runner_passes_on_citron_runner",
    ),
    "docs/testing-tools.md#2": ("tests/client/test_tools.py", "test_fuzz_passes_on_citron_server"),
}
#: Example frames and transcripts: every frame in them is decoded.
FRAMES = ("tests/protocol/test_codec.py", "test_the_example_frames_of_the_spec_decode")
#: Blocks that are not code to run, and why.
NOT_CODE = {
    "README.md#1": "the commands of README.md#0's server, as text: run by docs/howto-front.md#3",
    "docs/benchmarks.md#1": "output of python -m bench (tests/test_bench.py checks its figures)",
    "docs/benchmarks.md#2": "output of python -m bench",
    "docs/benchmarks.md#3": "output of python -m bench",
    "docs/howto-front.md#2": "pseudocode: the steps of a follow loop",
    "docs/howto-runner.md#2": "pseudocode: the steps of a runner's loop",
    "docs/howto-runner.md#3": "a diagram (compared with the code by tests/protocol/test_runner.py)",
    "docs/protocol.md#4": "a diagram (compared with the code by tests/protocol/test_states.py)",
    "docs/protocol.md#6": "a diagram (compared with the code by tests/protocol/test_states.py)",
    "docs/operations.md#3": "two lines of a redis.conf",
    "docs/operations.md#6": "an nginx configuration: citron's side of it (Host) is tested by"
    " tests/server/test_security.py",
    "docs/testing-tools.md#3": "output of citron fuzz",
    "docs/testing-tools.md#4": "output of citron fuzz --model (tests/client/test_model.py runs it)",
}
#: Blocks run by this file.
HERE = {
    "docs/howto-adapter.md#0",
    "docs/howto-adapter.md#1",
    "docs/howto-adapter.md#2",
    "docs/howto-front.md#0",
    "docs/howto-front.md#1",
    "docs/howto-front.md#3",
    "docs/operations.md#0",
    "docs/operations.md#1",
    "docs/protocol.md#3",
    "docs/testing-tools.md#0",
}


def test_every_block_is_run() -> None:
    found = blocks()
    frames = {
        i
        for i, (lang, body) in found.items()
        if i.startswith("docs/protocol.md") and lang == "text"
    }
    accounted = set(ELSEWHERE) | set(NOT_CODE) | HERE | frames
    assert sorted(set(found) - accounted) == [], "a code block that no test runs"
    assert sorted(accounted - set(found)) == [], "a listed block that is gone (renumber)"
    for test_file, test in [*ELSEWHERE.values(), FRAMES]:
        assert f"def {test}(" in (ROOT / test_file).read_text(), (test_file, test)


# -- the blocks run here -----------------------------------------------------------------


def test_the_adapter_guide_peer_is_the_hosts_peer() -> None:
    from citron_server.host import Peer

    namespace: dict[str, Any] = {}
    exec(compile(block("docs/howto-adapter.md#0"), "howto-adapter#0", "exec"), namespace)
    documented = {n for n in vars(namespace["MyPeer"]) if not n.startswith("_")}
    expected = {n for n in vars(Peer) if not n.startswith("_")}
    assert documented == expected


async def test_the_adapter_guide_host_calls_run(tmp_path: Path) -> None:
    """The calls an adapter makes, on a real Host over SQLite, with the
    guide's own MyPeer."""
    import ast

    from citron_protocol import Role
    from citron_server.host import Host
    from citron_server.store import SqliteStore

    namespace: dict[str, Any] = {}
    exec(compile(block("docs/howto-adapter.md#0"), "howto-adapter#0", "exec"), namespace)
    host = Host(SqliteStore(str(tmp_path / "c.db")))
    await host.start()
    namespace.update(
        host=host,
        peer=namespace["MyPeer"](),
        roles=[Role.API],
        text="API:get_runners:",
        close_code=1000,
    )
    code = compile(
        block("docs/howto-adapter.md#1"),
        "howto-adapter#1",
        "exec",
        flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
    )
    result = eval(code, namespace)  # the guide's code
    if result is not None:
        await result
    assert host.connections == {}  # opened, used and closed
    await host.shutdown()


def test_the_adapter_guide_hub_loop_runs() -> None:
    sent: list[tuple[object, str]] = []
    handled: list[Any] = []
    namespace: dict[str, Any] = {
        "now": 1000.0,
        "conn_id": 1,
        "text": 'API:get_runners:{"req": "r1"}',
        "send": lambda conn, text: sent.append((conn, text)),
        "close_connection": lambda conn, code, reason: None,
        "forget": lambda request: None,
        "handle": handled.append,
        "send_when_durable": lambda conn, slot, text: None,
    }
    exec(compile(block("docs/howto-adapter.md#2"), "howto-adapter#2", "exec"), namespace)
    assert sent == [(1, 'runners:{"runners":[],"req":"r1"}')]


def test_the_front_guide_client_protocol() -> None:
    from citron_protocol import ClientProtocol, GetBuilds, Role
    from citron_protocol.client import Reply

    frames: list[str] = []
    namespace: dict[str, Any] = {
        "ClientProtocol": ClientProtocol,
        "GetBuilds": GetBuilds,
        "Role": Role,
        "send": frames.append,
        "text": 'builds:{"builds":[],"more":false,"req":"1"}',
    }
    exec(compile(block("docs/howto-front.md#1"), "howto-front#1", "exec"), namespace)
    assert frames and frames[0].startswith("WEB:get_builds:")
    event = namespace["event"]
    assert isinstance(event, Reply) and event.req == namespace["req"]


def test_the_front_guide_program(
    server_factory: ServerFactory, spawn: Spawn, tmp_path: Path
) -> None:
    server = server_factory()
    spawn(*runner_argv(server.url), log_name="runner")  # it cannot clone example.org: failure
    code = block("docs/howto-front.md#0").replace("ws://127.0.0.1:8765/ws", server.url)
    path = tmp_path / "front.py"
    path.write_text(code)
    result = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "[failure]" in result.stdout and "bad_state" in result.stdout
    assert "::group::$ git clone https://example.org/app.git" in result.stdout


def test_the_front_guide_commands(
    server_factory: ServerFactory, spawn: Spawn, git_repo: Path
) -> None:
    server = server_factory()
    spawn(*runner_argv(server.url), log_name="runner")
    http = server.url.replace("ws://", "http://").removesuffix("ws")
    script = (
        block("docs/howto-front.md#3")
        .replace("http://127.0.0.1:8765/", http)
        .replace("https://github.com/you/app.git", str(git_repo))
        .replace("'make test'", "'bash build.sh'")
    )
    result = subprocess.run(
        ["bash", "-e", "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "built from main" in result.stdout


def test_the_start_up_lines_are_as_documented(server_factory: ServerFactory) -> None:
    server = server_factory()
    documented = block("docs/operations.md#0").splitlines()
    assert documented[0] == "$ citron-server"
    shape = [re.sub(r"ws://\S+|/\S+|websockets|aiohttp", "X", line) for line in documented[1:]]
    shown = [re.sub(r"ws://\S+|/\S+|websockets|aiohttp", "X", line) for line in server.lines]
    assert shown == shape


async def test_the_raw_log_command(server_factory: ServerFactory) -> None:
    from .peers import expect, peer, runner, submit

    if shutil.which("curl") is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI must install curl (see .ci/run)")
        pytest.skip("the operations guide's raw-log command needs curl: apt-get install curl")

    server = server_factory("--web-token", "wt")
    api = await peer(server.url)
    build = await submit(api)
    ws = await runner(server.url)
    await expect(ws, "run")
    await ws.send('RUNNER:process:{"finished": false, "log": "from the docs\\n"}')
    await ws.send('RUNNER:process:{"finished": true, "success": true}')
    await asyncio.sleep(0.3)
    command = block("docs/operations.md#1").replace("8765", str(server.port))
    command = command.replace("b-3f9c2e", build)
    result = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", "curl -sS --fail " + command.removeprefix("curl ")],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "CITRON_WEB_TOKEN": "wt"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "from the docs\n"


def test_the_runner_object_decodes() -> None:
    from citron_protocol import RunnerInfo
    from citron_protocol.codec import _converter

    info = _converter.structure(json.loads(block("docs/protocol.md#3")), RunnerInfo)
    assert (info.id, info.build) == ("r-1", "b-7")


def test_the_conformance_run_is_as_documented(server_factory: ServerFactory) -> None:
    documented = block("docs/testing-tools.md#0").splitlines()
    argv = documented[0].removeprefix("$ citron ").split()
    server = server_factory("--lost-grace", "2", "--cancel-timeout", "2")
    argv[argv.index("ws://127.0.0.1:8765/ws")] = server.url
    result = citron(*argv, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = [line.split()[0] for line in documented[2:-1]]
    shown = [line.split()[0] for line in result.stdout.splitlines()[1:-1]]
    assert shown == checks
    assert result.stdout.splitlines()[-1] == documented[-1]


@pytest.mark.parametrize("mode", ["server", "runner"])
def test_the_documented_check_names_are_the_tools(mode: str) -> None:
    from citron_client.conformance import RunnerConformance, ServerConformance

    text = block("docs/testing-tools.md#0" if mode == "server" else "docs/testing-tools.md#1")
    documented = [line.split()[0] for line in text.splitlines()[2:-1]]
    tool = ServerConformance("ws://x/ws") if mode == "server" else RunnerConformance(["x"])
    assert documented == [name for name, _ in tool.checks]
