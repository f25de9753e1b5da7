"""A real redis-server and three citron-server processes on it."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from ..conftest import ServerProc

# The nodes mix the transports: a cluster does not care which one a node uses.
NODE_TRANSPORTS = ["websockets", "aiohttp", "websockets"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """Debian's redis-server on a free loopback port, with its append-only
    file (as docs/operations.md asks), in a temporary directory."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI"):
                raise RuntimeError("CI must install Debian's redis-server (see .ci/run)")
            pytest.skip(
                "the cluster tests start Debian's redis-server: apt-get install redis-server"
            )
        self.binary, self.workdir = binary, workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.start()

    def start(self) -> None:
        log = open(self.workdir / "redis.log", "a")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--dir",
                str(self.workdir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        else:
            raise AssertionError("redis-server did not answer")
        client.close()

    def stop(self) -> None:
        """Shut down as an operator would (SIGTERM: the append-only file is
        synced, a restart finds everything)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)


class Cluster:
    """Nodes on one Redis. ``url`` hands out each node in turn, so that the
    peers of a test (runner, backend, fronts) land on different nodes."""

    def __init__(self, redis_server: RedisServer, nodes: list[ServerProc]) -> None:
        self.redis = redis_server
        self.nodes = nodes
        self._turn = itertools.count()

    @property
    def url(self) -> str:
        return self.nodes[next(self._turn) % len(self.nodes)].url

    @property
    def port(self) -> int:
        return self.nodes[next(self._turn) % len(self.nodes)].port

    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


ClusterFactory = Callable[..., Cluster]


@pytest.fixture
def cluster_factory(tmp_path: Path, redis_server: RedisServer) -> Iterator[ClusterFactory]:
    started: list[ServerProc] = []
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    redis_server.client().flushall()

    def factory(*args: str, nodes: int = 3) -> Cluster:
        procs = []
        for i in range(nodes):
            workdir = tmp_path / f"node{len(started)}"
            workdir.mkdir()
            proc = ServerProc(
                workdir,
                NODE_TRANSPORTS[i % len(NODE_TRANSPORTS)],
                ["--engine", redis_server.url(), "--node-lease", "1", *args],
                workdir / "unused.db",
            )
            started.append(proc)
            procs.append(proc)
        return Cluster(redis_server, procs)

    yield factory
    for proc in started:
        proc.stop()


@pytest.fixture
def cluster(cluster_factory: ClusterFactory) -> Cluster:
    return cluster_factory()
