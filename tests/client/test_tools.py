"""citron fuzz and citron conformance: they pass on citron, and they can fail."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.server import ServerConnection, serve

from citron_protocol import Effects, Hub, Role
from citron_protocol.hub import CountingIds
from citron_protocol.records import MemoryStore

from ..conftest import ServerFactory
from ..peers import ask, peer, submit
from ..procs import citron, runner_argv


def test_conformance_passes_on_citron_server(server_factory: ServerFactory) -> None:
    # One token opens RUNNER and API (role_mismatch), another WEB (unauthorized).
    tokens = ["--runner-token", "at", "--api-token", "at", "--web-token", "wt"]
    server = server_factory("--lost-grace", "1", "--cancel-timeout", "1", *tokens)
    result = citron(
        "conformance",
        server.url,
        "--lost-grace",
        "1",
        "--cancel-timeout",
        "1",
        *tokens,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "32 passed, 0 failed, 1 skipped" in result.stdout
    assert re.search(r"model +SKIP  give --model N", result.stdout)
    # Every code but unavailable (a cluster node without its Redis): with
    # these tokens, unauthorized and role_mismatch too.
    assert "14 codes (unavailable not checked" in result.stdout


def test_conformance_skips_long_timers(server_factory: ServerFactory) -> None:
    server = server_factory()
    result = citron("conformance", server.url, "--max-wait", "5", timeout=180)
    assert result.returncode == 0, result.stdout
    skipped = r"runner_loss_requeue +SKIP  the lost grace \(60 s\) is longer than --max-wait"
    assert re.search(skipped, result.stdout), result.stdout
    assert "30 passed, 0 failed, 3 skipped" in result.stdout


def test_fuzz_passes_on_citron_server(server_factory: ServerFactory) -> None:
    server = server_factory()
    result = citron(
        "fuzz", server.url, "--frames", "1500", "--seed", "7", "--role", "all", timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "violations: 0" in result.stdout
    assert "health checks passed: 2" in result.stdout
    for kind in ("valid", "invalid", "legacy", "binary", "oversized", "out_of_order", "flood"):
        assert f"  {kind} " in result.stdout
    # It leaves nothing queued for a later runner.
    assert "builds queued by the fuzzing:" in result.stdout
    queued = citron("builds", server.url, "--state", "queued", "--json")
    assert json.loads(queued.stdout) == []


def test_fuzz_json_is_json(server_factory: ServerFactory) -> None:
    server = server_factory()
    result = citron(
        "fuzz", server.url, "--frames", "200", "--seed", "3", "--role", "API", "--json", timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    report = json.loads(result.stdout)
    assert (report["seed"], report["violations"], report["health_checks"]) == (3, [], 1)
    assert report["sent"]["valid"] > 0 and report["builds_left"] == 0
    assert report["builds_cancelled"] <= report["builds_queued"]


@pytest.mark.slow
def test_conformance_runner_passes_on_citron_runner() -> None:
    result = citron("conformance", "--runner", "--", *runner_argv("")[:-1], timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "15 passed, 0 failed, 0 skipped" in result.stdout
    assert "protocol          PASS  protocol 2" in result.stdout


FAULTY = Path(__file__).with_name("faulty_runner.py")


def faulty(fault: str, *checks: str, timeout: str = "3") -> subprocess.CompletedProcess[str]:
    """``citron conformance --runner`` on citron-runner with ``fault`` injected."""
    only = [arg for check in checks for arg in ("--check", check)]
    argv = [sys.executable, str(FAULTY), fault]
    return citron("conformance", "--runner", "--timeout", timeout, *only, "--", *argv, timeout=180)


def row(result: subprocess.CompletedProcess[str], check: str) -> str:
    return next(line for line in result.stdout.splitlines() if line.startswith(f"  {check} "))


@pytest.mark.parametrize(
    ("fault", "checks", "why"),
    [
        ("success", ["failing_script"], "a script with a line that exits 3 reported success"),
        ("split_secrets", ["secret_masking"], "a secret split across two chunks is in the log"),
        ("ignore_shutdown", ["shutdown_idle"], "did not close its connection after shutdown"),
        ("ignore_shutdown", ["shutdown_busy"], 'has no "leave": true'),
        ("no_protocol", ["protocol"], "init has no protocol"),
        ("keep_acked", ["acks"], "resent after the server acknowledged"),
    ],
)
@pytest.mark.slow
def test_conformance_runner_catches_each_broken_rule(
    fault: str, checks: list[str], why: str
) -> None:
    result = faulty(fault, *checks)
    assert result.returncode == 1, result.stdout + result.stderr
    for check in checks:
        assert "FAIL" in row(result, check) and why in row(result, check), result.stdout
    # The runner's own account comes with the failure.
    assert "the runner's stderr:" in result.stdout
    assert "      | " in result.stdout and "INFO citron.runner:" in result.stdout


SHELL_RUNNER = Path(__file__).with_name("shell_runner.py")
SHELL = ["failing_script", "pipefail", "errexit", "shell_state", "steps", "background"]


@pytest.mark.parametrize(
    ("fault", "failing"),
    [
        ("none", []),
        ("per_line", ["pipefail", "errexit", "shell_state", "steps"]),
        ("no_stop", ["failing_script", "pipefail", "errexit", "shell_state", "steps"]),
        ("no_pipefail", ["pipefail"]),
        ("no_errexit", ["pipefail", "errexit"]),
        ("no_steps", ["steps"]),
        ("wrong_steps", ["steps"]),
        ("keep_background", ["background"]),
    ],
)
@pytest.mark.slow
def test_conformance_runner_checks_the_script_semantics(fault: str, failing: list[str]) -> None:
    """A runner with one rule of docs/protocol.md §5.7.1 broken fails the
    checks of that rule and passes the others; citron-runner passes all."""
    only = [arg for check in SHELL for arg in ("--check", check)]
    argv = [sys.executable, str(SHELL_RUNNER), fault]
    result = citron("conformance", "--runner", "--timeout", "5", *only, "--", *argv, timeout=180)
    assert result.returncode == (1 if failing else 0), result.stdout + result.stderr
    for check in SHELL:
        assert ("FAIL" if check in failing else "PASS") in row(result, check), result.stdout
    assert f"{len(SHELL) - len(failing)} passed, {len(failing)} failed" in result.stdout
    # Nothing the broken runner left running outlives the check.
    left = subprocess.run(["pgrep", "-f", r"^sleep 3[0-9][0-9]\.[0-9]{6}$"], capture_output=True)
    assert left.returncode == 1, left.stdout


@pytest.mark.slow
def test_conformance_protocol_only_skips_the_shell_checks_saying_why(tmp_path: Path) -> None:
    """The how-to's word counter runs no shell: with --protocol-only it
    passes what it can be asked, and each shell check is a skip with its
    reason."""
    from citron_client.conformance import SHELL_CHECKS

    text = (Path(__file__).parents[2] / "docs" / "howto-runner.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.DOTALL)[0]
    path = tmp_path / "word_counter.py"
    path.write_text(code)
    argv = [sys.executable, str(path)]
    result = citron(
        "conformance", "--runner", "--protocol-only", "--timeout", "5", "--", *argv, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for check, why in SHELL_CHECKS.items():
        assert f"SKIP  --protocol-only: needs {why}" in row(result, check), result.stdout
    for check in ("init", "protocol", "build_and_log", "shutdown_idle"):
        assert "PASS" in row(result, check), result.stdout
    assert f"4 passed, 0 failed, {len(SHELL_CHECKS)} skipped" in result.stdout
    # Without it, the word counter fails the shell checks: it is no shell.
    plain = citron(
        "conformance", "--runner", "--timeout", "5", "--check", "errexit", "--", *argv, timeout=60
    )
    assert plain.returncode == 1 and "FAIL" in row(plain, "errexit")
    # A server has no shell checks.
    server = citron("conformance", "ws://127.0.0.1:9/ws", "--protocol-only")
    assert server.returncode == 64 and "--protocol-only is for --runner" in server.stderr


@pytest.mark.slow
def test_the_scratch_runner_of_the_how_to_passes_the_shell_checks(tmp_path: Path) -> None:
    """docs/howto-runner.md: run_script gives a custom runner the script
    semantics of docs/protocol.md §5.7.1 in one call."""
    text = (Path(__file__).parents[2] / "docs" / "howto-runner.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.DOTALL)[1]
    assert "run_script" in code
    path = tmp_path / "scratch_runner.py"
    path.write_text(code)
    only = [arg for check in SHELL for arg in ("--check", check)]
    argv = [sys.executable, str(path)]
    result = citron("conformance", "--runner", "--timeout", "5", *only, "--", *argv, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(SHELL)} passed, 0 failed, 0 skipped" in result.stdout


@pytest.mark.slow
def test_conformance_runner_accepts_a_resend_from_one() -> None:
    """The protocol lets a resumed protocol 1 runner resend from seq 1
    (stored seqs are ignored): such a runner passes."""
    result = faulty("from_one", "protocol", "reconnect_resume", "acks", timeout="10")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed, 0 failed, 1 skipped" in result.stdout
    assert "stored chunks sent again (ignored)" in row(result, "reconnect_resume")
    assert "SKIP  the runner asked for protocol 1" in row(result, "acks")


@pytest.mark.slow
def test_conformance_runner_stops_each_runner() -> None:
    """A runner that ignores SIGTERM is killed after the grace, and each check
    has its own process: one stuck runner is one failure."""
    result = citron(
        "conformance",
        "--runner",
        "--timeout",
        "2",
        "--check",
        "init",
        "--check",
        "build_and_log",
        "--",
        sys.executable,
        "-c",
        STUBBORN_RUNNER,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "PASS" in row(result, "init")
    assert "FAIL" in row(result, "build_and_log")
    assert "killed" in result.stdout and "stubborn runner up" in result.stdout


STUBBORN_RUNNER = """
import asyncio, signal, sys
from websockets.asyncio.client import connect

signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("stubborn runner up", file=sys.stderr, flush=True)

async def main():
    async with connect(sys.argv[-1]) as ws:
        await ws.send('RUNNER:init:{"type": "stubborn", "protocol": 1}')
        await asyncio.sleep(3600)  # never runs anything

asyncio.run(main())
"""


# -- broken implementations ------------------------------------------------------------


@contextlib.asynccontextmanager
async def hub_server(*, broken: bool = False, late: float = 0.0) -> AsyncIterator[str]:
    """citron's hub on a bare websockets server, with one bug (``broken``: it
    answers WEB:run with queued) or slow (``late``: what a runner's
    ``process`` frame brings, an error say, is sent that many seconds late,
    and everything after it waits its turn: late, but in order)."""
    hub = Hub(CountingIds())
    store = MemoryStore()
    conns: dict[int, ServerConnection] = {}
    outboxes: dict[int, asyncio.Queue[tuple[float, str | tuple[int, str]]]] = {}

    async def deliver(cid: int, ws: ServerConnection) -> None:
        outbox = outboxes[cid]
        while True:
            due, item = await outbox.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if isinstance(item, str):
                await ws.send(item)
            else:
                await ws.close(*item)

    async def apply(fx: Effects, delay: float = 0.0) -> None:
        store.apply(fx.records)
        due = time.monotonic() + delay
        for conn, text in fx.sends:
            if conn in outboxes:
                outboxes[conn].put_nowait((due, text))  # type: ignore[index]
        for close in fx.closes:
            if close.conn in outboxes:
                outboxes[close.conn].put_nowait((due, (close.code, close.reason)))  # type: ignore[index]
        for load in fx.loads:
            chunks = store.read_log(load.build, load.after, load.until, load.limit)
            await apply(hub.log_loaded(load.request, chunks, time.time()))
        for find in fx.finds:
            records = store.find_builds(find)
            await apply(hub.builds_found(find.request, records, time.time()))

    async def handler(ws: ServerConnection) -> None:
        cid = id(ws)
        conns[cid] = ws
        outboxes[cid] = asyncio.Queue()
        sender = asyncio.create_task(deliver(cid, ws))
        await apply(hub.connect(cid, list(Role), time.time()))
        try:
            async for text in ws:
                if broken and isinstance(text, str) and text.startswith("WEB:run:"):
                    outboxes[cid].put_nowait((0.0, 'queued:{"build": "b-broken"}'))  # the bug
                elif isinstance(text, str):
                    delay = late if text.startswith("RUNNER:process:") else 0.0
                    await apply(hub.receive(cid, text, time.time()), delay)
                else:
                    await apply(hub.receive_binary(cid, time.time()))
        except Exception:  # noqa: BLE001 - a closed peer
            pass
        finally:
            sender.cancel()
            conns.pop(cid, None)
            outboxes.pop(cid, None)
            await apply(hub.disconnect(cid, time.time()))

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=1024 * 1024) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws"


@pytest.fixture
async def broken_server() -> AsyncIterator[str]:
    async with hub_server(broken=True) as url:
        yield url


async def test_conformance_fails_on_a_broken_server(broken_server: str) -> None:
    result = await asyncio.to_thread(
        citron, "conformance", broken_server, "--max-wait", "2", timeout=180
    )
    assert result.returncode == 1
    line = next(line for line in result.stdout.splitlines() if "permissions" in line)
    assert "FAIL" in line and "WEB:run" in line


@pytest.mark.slow
async def test_fuzz_fails_on_a_broken_server(broken_server: str) -> None:
    result = await asyncio.to_thread(
        citron,
        "fuzz",
        broken_server,
        "--frames",
        "1500",
        "--seed",
        "2",
        "--role",
        "WEB",
        timeout=300,
    )
    assert result.returncode == 1
    assert "answered reply:queued, expected error:forbidden" in result.stdout
    assert "--replay '\"WEB:run:" in result.stdout
    line = next(line for line in result.stdout.splitlines() if "--replay '\"WEB:run:" in line)
    argv = shlex.split(line)  # the line is a shell command: its quoting is the shell's
    replay = argv[argv.index("--replay") + 1]
    again = await asyncio.to_thread(
        citron, "fuzz", broken_server, "--role", "WEB", "--replay", replay, timeout=60
    )
    assert again.returncode == 1 and "violations: 1" in again.stdout


BROKEN_RUNNER = """
import asyncio, json, sys
from websockets.asyncio.client import connect

async def main():
    async with connect(sys.argv[-1]) as ws:
        await ws.send('RUNNER:init:{"type": "broken", "protocol": 1}')
        async for text in ws:
            if text.startswith("run:"):  # the bug: no output, always success
                await ws.send('RUNNER:process:{"finished": true, "success": true}')

asyncio.run(main())
"""


@pytest.mark.slow
def test_conformance_runner_fails_on_a_broken_runner(tmp_path: Path) -> None:
    path = tmp_path / "broken_runner.py"
    path.write_text(BROKEN_RUNNER)
    result = citron(
        "conformance",
        "--runner",
        "--timeout",
        "3",
        "--cancel-grace",
        "3",
        "--",
        sys.executable,
        str(path),
        timeout=180,
    )
    assert result.returncode == 1
    assert "output is missing" in row(result, "build_and_log")
    assert "FAIL" in row(result, "failing_script")


def test_conformance_usage_errors() -> None:
    assert citron("conformance", "not-a-url").returncode == 64
    assert citron("conformance", "--runner", "-u", "ws://h/ws", "--", "true").returncode == 64
    assert citron("conformance", "--runner").returncode == 64
    unknown = citron("conformance", "--runner", "--check", "nope", "--", "true")
    assert unknown.returncode == 64 and "no check named 'nope'" in unknown.stderr
    assert citron("runners", "ws://x/ws", "--", "echo").returncode == 64


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["conformance", "--runner", "--", "/no/such/runner"], 64, "cannot start the runner"),
        (["conformance", "ws://127.0.0.1:9/ws"], 69, "cannot connect"),
        (["fuzz", "ws://127.0.0.1:9/ws", "--frames", "10"], 69, "cannot connect"),
    ],
)
def test_tools_fail_in_one_line(args: list[str], code: int, needle: str) -> None:
    result = citron(*args)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stderr.startswith("citron: error: ") and needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.slow
async def test_fuzz_pairs_late_answers_with_their_frames() -> None:
    """A server that answers a runner's chunk late, but in order, is right;
    the fuzzer must pair each answer with its frame (it once gave such an
    answer to the next frame and reported violations shifted by one)."""
    async with hub_server(late=0.3) as url:
        result = await asyncio.to_thread(
            citron,
            "fuzz",
            url,
            "--frames",
            "240",
            "--seed",
            "5",
            "--role",
            "RUNNER",
            "--connections",
            "4",
            "--json",
            timeout=300,
        )
    report = json.loads(result.stdout)
    assert report["violations"] == [], report["violations"][:3]
    assert result.returncode == 0
    # The late answers came: runner chunks before init got not_registered.
    assert report["answers"].get("error:not_registered", 0) > 20, report["answers"]


async def test_fuzz_cancels_its_builds_past_the_error_window(server_factory: ServerFactory) -> None:
    """150 builds that ended (each cancel answers bad_state, an error: the
    server closes the connection after 100) and 5 still queued: every queued
    one is cancelled, none is counted as left."""
    from citron_client.fuzz import Fuzzer

    server = server_factory()
    api = await peer(server.url)
    ended = [await submit(api) for _ in range(150)]
    for build in ended:
        assert (await ask(api, f'API:cancel:{{"build": "{build}"}}')).COMMAND == "build"
    queued = [await submit(api) for _ in range(5)]
    fuzzer = Fuzzer(server.url)
    fuzzer.report.queued = ended + queued
    await fuzzer.cancel_queued()
    assert (fuzzer.report.cancelled, fuzzer.report.left) == (5, 0)
    for build in queued:
        reply = await ask(api, f'API:get_build:{{"build": "{build}"}}')
        assert reply.build.state == "cancelled"
    await api.close()
