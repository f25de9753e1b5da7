"""``pip install citron`` without extras: the protocol, the clients and the
server on websockets with SQLite, and a one-line answer naming the extra for
everything else. In a fresh venv, as a user would install it."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from .procs import GIT_ENV

ROOT = Path(__file__).parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with ``pip install .`` (no extras); its bin directory."""
    venv = tmp_path_factory.mktemp("lean") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    result = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return venv / "bin"


def run(bin: Path, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CITRON_URL", "PYTHONPATH")}
    return subprocess.run(
        [str(bin / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env, **GIT_ENV},
    )


def test_the_core_brings_no_extra(lean: Path) -> None:
    probe = "import importlib.util as u; print(*[m for m in MODULES if u.find_spec(m)])"
    modules = ("aiohttp", "redis", "hiredis", "hypothesis")
    result = run(lean, "python", "-c", f"MODULES = {modules!r}; {probe}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"installed without being asked for: {result.stdout}"


def test_a_build_runs_on_the_core(lean: Path, git_repo: Path, tmp_path: Path) -> None:
    server = subprocess.Popen(
        [str(lean / "citron-server"), "--port", "0", "--db", str(tmp_path / "c.db")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    runner = None
    try:
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], 30)
        assert ready, "the server did not start"
        url = server.stdout.readline().decode().split()[-1]
        assert url.startswith("ws://127.0.0.1:")
        runner = subprocess.Popen(
            [str(lean / "citron-runner"), "-u", url, "--once"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        result = run(
            lean,
            "citron",
            "submit",
            "-u",
            url,
            "--repo",
            str(git_repo),
            "--script",
            "bash build.sh",
            "--wait",
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "built from main" in result.stdout
        conformance = run(lean, "citron", "conformance", url, "--check", "log_order")
        assert conformance.returncode == 0, conformance.stdout + conformance.stderr
    finally:
        for proc in (runner, server):
            if proc is not None:
                proc.kill()
                proc.wait(10)
        if server.stdout is not None:
            server.stdout.close()


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["citron-server", "--port", "0", "--db", ":memory:", "--transport", "aiohttp"], "aiohttp"),
        (["citron-server", "--port", "0", "--engine", "redis://127.0.0.1:9/0"], "redis"),
        (["citron", "fuzz", "-u", "ws://127.0.0.1:9/ws", "--frames", "10"], "fuzz"),
    ],
)
def test_a_missing_extra_is_one_line(lean: Path, argv: list[str], extra: str) -> None:
    result = run(lean, *argv)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"pip install 'citron[{extra}]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_strategies_name_their_extra(lean: Path) -> None:
    result = run(lean, "python", "-c", "import citron_protocol.strategies")
    assert result.returncode == 1
    assert "MissingExtra" in result.stderr and "pip install 'citron[fuzz]'" in result.stderr
