"""Real runners (citron-runner, or a custom one) and the citron CLI, as
subprocesses, against a real citron-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
}


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    """A real git repository with one commit and a tag."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "build.sh").write_text("echo built from $(git rev-parse --abbrev-ref HEAD)\n")
    env = {**os.environ, **GIT_ENV}
    for argv in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "add", "."],
        ["git", "commit", "-q", "-m", "first"],
        ["git", "tag", "v1"],
    ):
        subprocess.run(argv, cwd=repo, check=True, env=env)
    return repo


Spawn = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start a long-running process (a runner); killed at the end of the test."""
    procs: list[subprocess.Popen[str]] = []

    def start(*argv: str, log_name: str = "proc") -> subprocess.Popen[str]:
        log = open(tmp_path / f"{log_name}-{len(procs)}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
        )
        log.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def runner_argv(url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "citron_client.runner_cli", url, *args]


def run_module(
    module: str,
    *args: str,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m module args...`` to the end, output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def citron(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_module("citron_client", *args, timeout=timeout, env=env)


def submit(server_url: str, repo: Path | str, *script: str) -> str:
    """``citron submit``: the build's id."""
    args = ["submit", server_url, "--repo", str(repo)]
    for line in script:
        args += ["--script", line]
    result = citron(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def show(server_url: str, build: str) -> dict[str, Any]:
    """``citron show --json``: the build object."""
    result = citron("show", server_url, build, "--json")
    assert result.returncode == 0, result.stderr
    shown: dict[str, Any] = json.loads(result.stdout)
    return shown


def eventually(check: Callable[[], T | None], what: str, tries: int = 400) -> T:
    """Poll ``check`` until it returns something; fail naming ``what``."""
    for _ in range(tries):
        found = check()
        if found is not None:
            return found
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def citron_popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "citron_client", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
