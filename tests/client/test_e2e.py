"""The client side end to end: citron-runner, the citron CLI and the Client
library against a real citron-server, for both transports."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from citron_client import Client, RequestError
from citron_protocol import BuildState, LogChunk

from ..conftest import ServerFactory, ServerProc
from ..procs import GIT_ENV, Spawn, citron, citron_popen, eventually, runner_argv, show, submit

ROOT = Path(__file__).parents[2]


def wait_for_runners(server: ServerProc, n: int = 1) -> None:
    def registered() -> bool | None:
        result = citron("runners", server.url, "--json")
        return True if result.returncode == 0 and len(json.loads(result.stdout)) >= n else None

    eventually(registered, f"{n} runner(s) registered", tries=200)


def sleeping(tag: str) -> bool:
    """Whether a process whose command line has ``sleep TAG`` runs."""
    return subprocess.run(["pgrep", "-f", f"sleep {tag}"], capture_output=True).returncode == 0


def state_is(server: ServerProc, build: str, *states: str) -> Any:
    """A check for ``eventually``: the build object once it is in ``states``."""

    def check() -> dict[str, Any] | None:
        shown = show(server.url, build)
        return shown if shown["state"] in states else None

    return check


def stored_log(server: ServerProc, build: str) -> str:
    result = citron("logs", server.url, build)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_submit_wait_streams_live_and_exits_with_the_result(
    server: ServerProc, spawn: Spawn, git_repo: Path, tmp_path: Path
) -> None:
    spawn(*runner_argv(server.url, "--name", "r1"), log_name="runner")
    wait_for_runners(server)
    marker = tmp_path / "go"
    script = (
        f"echo first; echo err-line >&2; while [ ! -e {marker} ]; do sleep 0.02; done; echo second"
    )
    proc = citron_popen(
        "submit",
        server.url,
        "--repo",
        str(git_repo),
        "--script",
        "bash build.sh",
        "--script",
        script,
        "--wait",
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # "first" arrives while the build still waits for the marker
        seen.append(line)
        if line == "first\n":
            break
    marker.touch()
    rest, err = proc.communicate(timeout=30)
    output = "".join(seen) + rest
    assert proc.returncode == 0, err
    assert "$ git clone" in output
    assert output.index("built from main") < output.index("first") < output.index("err-line")
    assert output.index("err-line") < output.index("second")
    failing = citron("submit", server.url, "--repo", str(git_repo), "--script", "exit 3", "--wait")
    assert failing.returncode == 1
    assert "exited with code 3" in failing.stdout


def test_ref_env_and_a_failed_clone(server: ServerProc, spawn: Spawn, git_repo: Path) -> None:
    spawn(*runner_argv(server.url), log_name="runner")
    wait_for_runners(server)
    ok = citron(
        "submit",
        server.url,
        "--repo",
        str(git_repo),
        "--ref",
        "v1",
        "--env",
        "GREETING=hi there",
        "--script",
        'echo "$GREETING"; git describe --tags',
        "--wait",
    )
    assert ok.returncode == 0, ok.stderr
    assert "hi there\nv1\n" in ok.stdout
    missing = citron(
        "submit", server.url, "--repo", str(git_repo / "nope"), "--script", "true", "--wait"
    )
    assert missing.returncode == 1
    assert "exited with code 128" in missing.stdout
    newest = json.loads(citron("builds", server.url, "--json").stdout)[0]
    assert [s["state"] for s in show(server.url, newest["id"])["steps"]] == ["skipped"]
    # The runner survived both.
    again = citron("submit", server.url, "--repo", str(git_repo), "--script", "true", "--wait")
    assert again.returncode == 0


def test_a_multibyte_character_split_across_reads(
    server: ServerProc, spawn: Spawn, git_repo: Path
) -> None:
    spawn(*runner_argv(server.url), log_name="runner")
    wait_for_runners(server)
    script = r"printf 'caf\xc3'; sleep 0.4; printf '\xa9 \xff end\n'"
    result = citron("submit", server.url, "--repo", str(git_repo), "--script", script, "--wait")
    assert result.returncode == 0, result.stderr
    assert "café \ufffd end\n" in result.stdout


def test_cancel_kills_the_whole_build(server: ServerProc, spawn: Spawn, git_repo: Path) -> None:
    spawn(*runner_argv(server.url), log_name="runner")
    wait_for_runners(server)
    tag = "600.4242"
    build = submit(server.url, git_repo, f"sleep {tag} & sleep {tag}")
    eventually(lambda: sleeping(tag) or None, "the build's sleep started", tries=200)
    cancelled = citron("cancel", server.url, build)
    assert cancelled.returncode == 0 and "cancelling" in cancelled.stdout
    shown = eventually(
        state_is(server, build, "cancelled", "failure", "success"), "the build ended"
    )
    assert shown["state"] == "cancelled"
    assert not sleeping(tag)
    assert "[citron-runner] cancelled" in stored_log(server, build)


def test_server_restart_mid_build_loses_no_line(
    server: ServerProc, spawn: Spawn, git_repo: Path
) -> None:
    spawn(*runner_argv(server.url), log_name="runner")
    wait_for_runners(server)
    script = "for i in $(seq 1 300); do echo line $i; sleep 0.01; done"
    build = submit(server.url, git_repo, script)
    eventually(lambda: "line 40\n" in stored_log(server, build) or None, "line 40 stored")
    server.kill9()
    server.restart()
    shown = eventually(
        state_is(server, build, "success", "failure", "lost", "cancelled", "queued"),
        "the build ended",
        tries=600,
    )
    assert shown["state"] == "success", shown
    assert shown["attempt"] == 1
    lines = [line for line in stored_log(server, build).splitlines() if line.startswith("line ")]
    assert lines == [f"line {i}" for i in range(1, 301)]


def test_the_custom_runner_from_the_docs(server: ServerProc, spawn: Spawn, tmp_path: Path) -> None:
    text = (ROOT / "docs" / "howto-runner.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.DOTALL)[0]
    assert len(code.strip().splitlines()) <= 30
    path = tmp_path / "word_counter.py"
    path.write_text(code)
    spawn(sys.executable, str(path), server.url, log_name="custom")
    wait_for_runners(server)
    result = citron(
        "submit",
        server.url,
        "--repo",
        "anything",
        "--type",
        "words",
        "--script",
        "one two three",
        "--script",
        "four",
        "--wait",
    )
    assert result.returncode == 0, result.stderr
    assert "'one two three': 3 words\n" in result.stdout and "total: 4\n" in result.stdout


async def test_secrets_never_reach_the_log_or_a_front(
    server: ServerProc, spawn: Spawn, git_repo: Path
) -> None:
    spawn(*runner_argv(server.url), log_name="runner")
    await asyncio.to_thread(wait_for_runners, server)
    secret = "s3cr3t-value-42"
    script = (
        'echo "whole: $TOKEN"; printf "split: %s" "${TOKEN:0:6}"; sleep 0.5;'
        ' printf "%s\\n" "${TOKEN:6}"'
    )
    async with Client(server.url) as api:
        build = await api.submit(str(git_repo), [script], secrets={"TOKEN": secret})
        seen = []
        async with Client(server.url) as front:
            async for event in front.follow(build):
                seen.append(event.log if isinstance(event, LogChunk) else repr(event))
        info = await api.build(build)
    assert info.state is BuildState.SUCCESS
    live = "".join(seen)
    assert "whole: ***" in live and "split: ***" in live
    assert secret not in live and secret[:6] not in live.replace("***", "")
    stored = await asyncio.to_thread(stored_log, server, build)
    assert secret not in stored and "split: ***\n" in stored
    assert secret.encode() not in server.db.read_bytes()
    short = await asyncio.to_thread(
        citron, "submit", server.url, "--repo", "r", "--script", "true", "--secret", "A=abc"
    )
    assert short.returncode == 64 and "at least 4" in short.stderr


async def test_the_client_library(server: ServerProc) -> None:
    async with Client(server.url) as api:
        build = await api.submit("https://x/r.git", ["make"], type="nobody")
        assert [b.id for b in await api.builds()] == [build]
        assert (await api.build(build)).state is BuildState.QUEUED
        assert await api.runners() == ()
        with pytest.raises(RequestError) as info:
            await api.build("nope")
        assert info.value.code == "unknown_build"
        assert (await api.cancel(build)).state is BuildState.CANCELLED
        with pytest.raises(RequestError) as info:
            await api.cancel(build)
        assert info.value.code == "bad_state"
        events = [e async for e in api.follow(build)]
        assert events[-1].build.state is BuildState.CANCELLED


async def test_a_follower_survives_a_server_restart(
    server: ServerProc, spawn: Spawn, git_repo: Path
) -> None:
    spawn(*runner_argv(server.url), log_name="runner")
    await asyncio.to_thread(wait_for_runners, server)
    script = "for i in $(seq 1 200); do echo line $i; sleep 0.01; done"
    async with Client(server.url, backoff_cap=0.5) as api:
        build = await api.submit(str(git_repo), [script])
    chunks: list[LogChunk] = []
    async with Client(server.url, backoff_cap=0.5) as front:
        restarted = False
        async for event in front.follow(build):
            if isinstance(event, LogChunk):
                chunks.append(event)
                if not restarted and "line 50\n" in event.log:
                    restarted = True
                    await asyncio.to_thread(server.kill9)
                    await asyncio.to_thread(server.restart)
    assert [c.seq for c in chunks] == list(range(1, len(chunks) + 1))
    lines = [line for c in chunks for line in c.log.splitlines() if line.startswith("line ")]
    assert lines == [f"line {i}" for i in range(1, 201)]


def test_cli_errors_are_one_line_with_distinct_codes(server_factory: ServerFactory) -> None:
    server = server_factory("--api-token", "a", "--web-token", "w")
    cases = [
        (["runners", "ws://127.0.0.1:9/ws"], 69, "cannot connect"),
        (["runners", "http://127.0.0.1:9/"], 69, "ws://127.0.0.1:9/ws: cannot connect"),
        (["runners", "nope"], 64, "not a server URL"),
        (["runners", server.url, "--token", "wrong"], 77, "refused the token"),
        (["runners", server.url], 77, "unauthorized"),
        (["show", server.url, "nope", "--token", "a"], 65, "unknown_build"),
        (["submit", server.url, "--token", "w", "--role", "web"], 64, ""),
        (["submit", server.url, "--repo", "r"], 64, "--script"),
        (
            [
                "submit",
                server.url,
                "--repo",
                "r",
                "--script",
                "x",
                "--env",
                "novalue",
                "--token",
                "a",
            ],
            64,
            "NAME=VALUE",
        ),
        (["bogus"], 64, "invalid choice"),
        (["cancel", server.url, "nope", "--token", "a"], 65, "unknown_build"),
    ]
    for args, code, needle in cases:
        result = citron(*args)
        assert result.returncode == code, (args, result.returncode, result.stderr)
        assert result.stderr.startswith("citron: error: "), (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        assert needle in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_web_token_cannot_submit(server_factory: ServerFactory) -> None:
    server = server_factory("--api-token", "a", "--web-token", "w")
    result = citron("submit", server.url, "--repo", "r", "--script", "x", "--token", "w")
    assert result.returncode == 77 and "unauthorized" in result.stderr


def test_tables_and_json(server: ServerProc) -> None:
    build = citron(
        "submit", server.url, "--repo", "https://x/r.git", "--script", "make", "--type", "t"
    ).stdout.strip()
    table = citron("builds", server.url).stdout.splitlines()
    assert table[0].split() == ["ID", "STATE", "REPO", "RUNNER", "STARTED", "DURATION"]
    assert table[1].split()[:3] == [build, "queued", "https://x/r.git"]
    as_json = json.loads(citron("builds", server.url, "--json", "--state", "queued").stdout)
    assert [b["id"] for b in as_json] == [build]
    shown = citron("show", server.url, build).stdout
    assert f"id:         {build}" in shown and "  make" in shown
    assert (
        json.loads(citron("submit", server.url, "--repo", "r", "--script", "x", "--json").stdout)[
            "state"
        ]
        == "queued"
    )


def test_spawn_once_timeout_and_graceful_exit(
    server: ServerProc, spawn: Spawn, git_repo: Path, tmp_path: Path
) -> None:
    runners = spawn(*runner_argv(server.url, "--spawn", "2", "--name", "pool"), log_name="pool")
    wait_for_runners(server, 2)
    names = sorted(r["name"] for r in json.loads(citron("runners", server.url, "--json").stdout))
    assert names == ["pool-1", "pool-2"]
    # A timeout kills the build and fails it.
    slow = citron(
        "submit",
        server.url,
        "--repo",
        str(git_repo),
        "--script",
        "sleep 30",
        "--timeout",
        "1",
        "--wait",
    )
    assert slow.returncode == 1 and "timed out" in slow.stdout
    # SIGTERM: the build in flight finishes, then the runner leaves and exits 0.
    marker = tmp_path / "go"
    build = submit(
        server.url, git_repo, f"while [ ! -e {marker} ]; do sleep 0.05; done; echo finished"
    )
    eventually(state_is(server, build, "running"), "the build running", tries=200)
    runners.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert runners.poll() is None  # still finishing its build
    marker.touch()
    assert runners.wait(30) == 0
    assert show(server.url, build)["state"] == "success"
    assert json.loads(citron("runners", server.url, "--json").stdout) == []
    # --once: one build, then exit 0.
    once = spawn(*runner_argv(server.url, "--once"), log_name="once")
    wait_for_runners(server)
    assert (
        citron(
            "submit", server.url, "--repo", str(git_repo), "--script", "true", "--wait"
        ).returncode
        == 0
    )
    assert once.wait(30) == 0


def test_logs_follow(server: ServerProc, spawn: Spawn, git_repo: Path, tmp_path: Path) -> None:
    spawn(*runner_argv(server.url), log_name="runner")
    wait_for_runners(server)
    marker = tmp_path / "go"
    build = submit(
        server.url,
        git_repo,
        f"echo before; while [ ! -e {marker} ]; do sleep 0.05; done; echo after",
    )
    follower = subprocess.Popen(
        [sys.executable, "-m", "citron_client", "logs", server.url, build, "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert follower.stdout is not None
    for line in follower.stdout:
        if line == "before\n":
            break
    marker.touch()
    rest, _ = follower.communicate(timeout=30)
    assert follower.returncode == 0 and "after\n" in rest


def test_several_urls_are_tried_in_turn(server_factory: Any, spawn: Spawn, git_repo: Path) -> None:
    first, second = server_factory(), server_factory()
    dead = "ws://127.0.0.1:9/ws"
    runner = spawn(*runner_argv(first.url, second.url), log_name="runner")
    wait_for_runners(first)
    # The CLI takes a comma-separated list and skips what does not answer.
    listed = citron("runners", f"{dead},{first.url}", "--json")
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 1
    first.kill9()  # the runner moves on to the next URL
    wait_for_runners(second)
    result = citron(
        "submit", f"{dead},{second.url}", "--repo", str(git_repo), "--script", "true", "--wait"
    )
    assert result.returncode == 0, result.stderr
    assert runner.poll() is None
    none = citron("runners", f"{dead},ws://127.0.0.1:10/ws")
    assert none.returncode == 69 and "cannot connect" in none.stderr


def test_runners_shutdown_lets_a_running_runner_end_its_build_then_go(
    server: ServerProc, spawn: Spawn, git_repo: Path, tmp_path: Path
) -> None:
    runner_proc = spawn(*runner_argv(server.url, "--name", "leaving"), log_name="runner")
    wait_for_runners(server)
    marker = tmp_path / "go"
    build = submit(
        server.url, git_repo, f"while [ ! -e {marker} ]; do sleep 0.02; done; echo finished"
    )
    eventually(lambda: show(server.url, build)["state"] == "running" or None, "running")
    listed = json.loads(citron("runners", server.url, "--json").stdout)
    told = citron("runners", server.url, "--shutdown", listed[0]["id"])
    assert told.returncode == 0, told.stderr
    assert f"told to leave, after build {build}" in told.stdout
    assert runner_proc.poll() is None  # still running its build
    marker.touch()
    assert runner_proc.wait(timeout=30) == 0
    info = show(server.url, build)
    assert info["state"] == "success"
    logs = citron("logs", server.url, build)
    assert "finished" in logs.stdout
    assert json.loads(citron("runners", server.url, "--json").stdout) == []
    unknown = citron("runners", server.url, "--shutdown", "r-nope")
    assert unknown.returncode == 65 and "unknown_runner" in unknown.stderr


def test_builds_record_the_commit_and_the_exit_code(
    server: ServerProc, spawn: Spawn, git_repo: Path
) -> None:
    """From a real git repository: the commit citron-runner checked out, the
    exit code of the line that failed; kept in the store (read back after a
    restart, when the server no longer holds them in memory)."""
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=git_repo, capture_output=True, text=True, check=True
    ).stdout.strip()
    spawn(*runner_argv(server.url), log_name="runner")
    wait_for_runners(server)
    passing = submit(server.url, git_repo, "bash build.sh")
    failing = submit(server.url, git_repo, "echo one", "exit 3", "echo never")
    ended = ("success", "failure", "cancelled", "lost")
    shown = eventually(state_is(server, failing, *ended), "the failing build ended")
    assert (shown["state"], shown["commit"], shown["exit_code"]) == ("failure", head, 3)
    shown = eventually(state_is(server, passing, *ended), "the passing build ended")
    assert (shown["state"], shown["commit"], shown["exit_code"]) == ("success", head, 0)
    text = citron("show", server.url, failing).stdout
    assert f"commit:     {head}" in text and "exit code:  3" in text
    assert "steps:" in text and "skipped" in text and "(exit code 3)" in text
    server.kill9()
    server.restart()
    again = show(server.url, failing)
    assert (again["commit"], again["exit_code"]) == (head, 3)
    assert [s["state"] for s in again["steps"]] == ["passed", "failed", "skipped"]
    assert [s["exit_code"] for s in again["steps"]] == [0, 3, None]


def test_script_semantics_end_to_end(
    server: ServerProc, spawn: Spawn, git_repo: Path, tmp_path: Path
) -> None:
    """docs/protocol.md §5.7.1 with the real citron-runner, a real git
    repository and the real server: verdicts, steps, state between lines,
    what is left running, cancel and timeout of a multi-line build."""
    env = {**os.environ, **GIT_ENV}
    (git_repo / "t.sh").write_text("echo 'test 1 ok'\necho 'test 2 FAIL'\nexit 1\n")
    (git_repo / "t.sh").chmod(0o755)
    (git_repo / "sub").mkdir()
    (git_repo / "sub" / "marker.txt").write_text("in sub\n")
    for argv in (["git", "add", "."], ["git", "commit", "-q", "-m", "tests"]):
        subprocess.run(argv, cwd=git_repo, check=True, env=env)
    spawn(*runner_argv(server.url), log_name="runner")
    wait_for_runners(server)
    ended = ("success", "failure", "cancelled", "lost")

    def run(*script: str, timeout: str | None = None) -> tuple[dict[str, Any], str]:
        args = ["submit", server.url, "--repo", str(git_repo)]
        for line in script:
            args += ["--script", line]
        if timeout is not None:
            args += ["--timeout", timeout]
        build = citron(*args).stdout.strip()
        shown = eventually(state_is(server, build, *ended), f"build {build} ended", tries=600)
        return shown, stored_log(server, build)

    piped, _ = run("./t.sh | tail -1")
    assert (piped["state"], piped["exit_code"]) == ("failure", 1)
    shown, log = run("false; echo after")
    assert (shown["state"], shown["exit_code"]) == ("failure", 1)
    assert "after\n" not in log.replace("$ false; echo after\n", "")
    shown, log = run("cd sub && export FOO=1", 'echo "FOO=$FOO"; cat marker.txt')
    assert shown["state"] == "success" and "FOO=1\nin sub\n" in log
    shown, log = run("echo one", "exit 3", "echo never")
    assert (shown["state"], shown["exit_code"]) == ("failure", 3)
    assert [s["state"] for s in shown["steps"]] == ["passed", "failed", "skipped"]
    assert "never" not in log and "$ exit 3\n" in log
    shown, _ = run("echo fine | cat")
    assert shown["state"] == "success" and shown["steps"][0]["state"] == "passed"

    tag = "300.0521"
    started = time.monotonic()
    shown, log = run(f"sleep {tag} & echo started")
    assert time.monotonic() - started < 10
    assert shown["state"] == "success" and "ended 1 process left running" in log
    assert not sleeping(tag)

    timed, log = run("echo a", f"sleep {tag} & sleep {tag}", "echo never", timeout="2")
    assert timed["state"] == "failure" and "timed out" in log and not sleeping(tag)
    assert [s["state"] for s in timed["steps"]] == ["passed", "failed", "skipped"]

    build = submit(server.url, git_repo, "echo a", f"sleep {tag} & sleep {tag}", "echo never")
    eventually(lambda: sleeping(tag) or None, "the build's sleeps started", tries=200)
    assert citron("cancel", server.url, build).returncode == 0
    shown = eventually(state_is(server, build, *ended), "the cancelled build ended")
    assert shown["state"] == "cancelled" and not sleeping(tag)
    assert [s["state"] for s in shown["steps"]] == ["passed", "cancelled", "skipped"]


def test_a_runner_is_named_after_its_host_by_default(server: ServerProc, spawn: Spawn) -> None:
    import socket

    spawn(*runner_argv(server.url), log_name="runner")
    wait_for_runners(server)
    (shown,) = json.loads(citron("runners", server.url, "--json").stdout)
    assert shown["name"] == socket.gethostname()
