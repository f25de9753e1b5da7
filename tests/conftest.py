"""Real citron-server processes on loopback, one per test, for both transports."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from .peers import OPEN, RawClient

TRANSPORTS = ["websockets", "aiohttp"]


class ServerProc:
    """A citron-server started as a user starts it: ``python -m citron_server``."""

    def __init__(self, workdir: Path, transport: str, args: list[str], db: Path) -> None:
        self.workdir, self.transport, self.args, self.db = workdir, transport, args, db
        self.proc: subprocess.Popen[bytes] | None = None
        self._out = b""
        self.lines: list[str] = []
        self.url = ""
        self.port = 0
        self.start()

    def start(self, port: int = 0) -> None:
        self.stop()
        stderr = open(self.workdir / "server.log", "a")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "citron_server",
                "--port",
                str(port),
                "--db",
                str(self.db),
                "--transport",
                self.transport,
                *self.args,
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=self.workdir,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        stderr.close()
        self._out = b""
        self.lines = [self._readline(10) for _ in range(4)]
        first = self.lines[0]
        assert first.startswith(
            ("citron-server: listening on ws://", "citron-server: listening on wss://")
        ), (first, self.log())
        self.url = first.split()[-1]
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def _readline(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._out:
            ready, _, _ = select.select([fd], [], [], timeout)
            data = os.read(fd, 4096) if ready else b""
            if not data:
                raise AssertionError(f"no start-up line from the server; its log:\n{self.log()}")
            self._out += data
        line, self._out = self._out.split(b"\n", 1)
        return line.decode()

    def log(self) -> str:
        path = self.workdir / "server.log"
        return path.read_text() if path.exists() else ""

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def http(self, path: str) -> tuple[int, str, str]:
        """GET path; returns status, content type, body."""
        try:
            with urllib.request.urlopen(self.http_base + path, timeout=5) as response:
                return response.status, response.headers["Content-Type"], response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()

    def healthz(self) -> dict[str, object]:
        status, _, body = self.http("/healthz")
        assert status == 200
        result: dict[str, object] = json.loads(body)
        return result

    def terminate(self, timeout: float = 10) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        self.stop()

    def restart(self) -> None:
        """Start again on the same port and database."""
        self.start(self.port)

    def stop(self) -> None:
        """kill -9, if it still runs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


ServerFactory = Callable[..., ServerProc]


@pytest.fixture(autouse=True)
async def close_peers() -> AsyncIterator[None]:
    yield
    while OPEN:
        client = OPEN.pop()
        if isinstance(client, RawClient):
            client.close()
        else:
            await client.close()


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server_factory(tmp_path: Path, transport: str) -> Iterator[ServerFactory]:
    started: list[ServerProc] = []

    def factory(*args: str, db: Path | None = None) -> ServerProc:
        workdir = tmp_path / f"server{len(started)}"
        workdir.mkdir()
        proc = ServerProc(workdir, transport, list(args), db or workdir / "citron.db")
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.stop()


@pytest.fixture
def server(server_factory: ServerFactory) -> ServerProc:
    return server_factory()


#: Fixtures that start real processes (a server, a runner, a browser, Redis,
#: a fresh venv): a test that uses one is marked ``slow``, so that
#: ``python -m pytest -m "not slow"`` is the quick, in-memory part.
SLOW_FIXTURES = frozenset(
    {"server", "server_factory", "spawn", "browser", "cluster_factory", "redis", "lean"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


from .procs import git_repo, spawn  # noqa: E402, F401 - fixtures for every test folder
