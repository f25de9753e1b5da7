"""citron-server's command line: options, environment, and clear failures."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import ServerFactory
from ..peers import RawClient
from ..procs import citron, run_module


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return run_module("citron_server", *args, timeout=20, env=env, cwd=cwd)


def test_help() -> None:
    result = run("--help")
    assert result.returncode == 0
    for option in [
        "--host",
        "--port",
        "--transport",
        "--db",
        "--runner-token",
        "--api-token",
        "--web-token",
        "--max-frame",
        "--log-cap",
        "--lost-grace",
        "--retry-lost",
        "--cancel-timeout",
        "--compression",
        "--log-level",
        "--insecure",
        "--engine",
        "--node-lease",
        "--log-retention",
        "--snapshot-every",
        "CITRON_",
    ]:
        assert option in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--port", "abc"], {}, "--port: expected a whole number"),
        (["--port", "70000"], {}, "at most 65535"),
        (["--transport", "tornado"], {}, "invalid choice"),
        (["--lost-grace", "-1"], {}, "positive number of seconds"),
        (["--bogus"], {}, "unrecognized arguments"),
        ([], {"CITRON_RETRY_LOST": "nope"}, "CITRON_RETRY_LOST: expected a whole number"),
        ([], {"CITRON_TRANSPORT": "x"}, "CITRON_TRANSPORT: 'x' is not one of"),
        (["--host", "0.0.0.0"], {}, "refusing to listen on 0.0.0.0"),
        (["--host", "0.0.0.0", "--api-token", "a", "--web-token", "w"], {}, "(RUNNER)"),
        (["--db", "/nonexistent/dir/citron.db"], {}, "cannot open database"),
        (["--engine", "mysql://db/citron"], {}, "expected sqlite or a Redis URL"),
        (["--engine", "redis://localhost:abc/0"], {}, "not a usable Redis URL"),
        (["--engine", "redis://localhost:6379/xyz"], {}, "must be a number"),
        (["--log-retention", "60"], {}, "--log-retention needs --engine redis://"),
        (["--snapshot-every", "0"], {}, "must be at least 1"),
        (["--retention", "0"], {}, "--retention: must be a positive number of days"),
        ([], {"CITRON_RETENTION": "a week"}, "CITRON_RETENTION: expected days"),
        (["--window", "0"], {}, "--window: must be at least 1"),
        ([], {"CITRON_ENGINE": "postgres://x"}, "CITRON_ENGINE: expected sqlite or a Redis"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(
    args: list[str], env: dict[str, str], needle: str, tmp_path: Path
) -> None:
    result = run("--port", "0", *args, env=env, cwd=tmp_path)
    assert result.returncode == 2, result
    assert result.stderr.startswith("citron-server: error: ")
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_database_that_is_not_sqlite(tmp_path: Path) -> None:
    bad = tmp_path / "citron.db"
    bad.write_bytes(b"this is not a database" * 100)
    result = run("--port", "0", "--db", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot open database" in result.stderr and "Traceback" not in result.stderr


def test_a_port_in_use(server_factory: ServerFactory, tmp_path: Path) -> None:
    server = server_factory()
    old = tmp_path / "old.db"
    old.write_bytes((server.workdir / "citron.db").read_bytes())  # schema 2, but say v1:
    with contextlib.closing(sqlite3.connect(old)) as db:  # (closed: its WAL written back)
        db.execute("PRAGMA user_version = 1")
        db.commit()
    before = old.read_bytes()
    for db in (tmp_path / "new.db", old):
        result = run("--port", str(server.port), "--db", str(db), cwd=tmp_path)
        assert result.returncode == 2
        assert "cannot listen on 127.0.0.1" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # nothing migrated
    # Said before the database was touched: none created, none migrated.
    assert not (tmp_path / "new.db").exists()
    assert old.read_bytes() == before


def test_the_server_log_is_quiet_at_info(server_factory: ServerFactory) -> None:
    """Clients that come and go (a CLI call, a dashboard tab) leave no line;
    builds, runners and unusual closes do. At DEBUG, the libraries' own
    INFO lines come too, never their frames or headers."""
    server = server_factory()
    for _ in range(5):
        assert citron("runners", "-u", server.url).returncode == 0
    citron("submit", "-u", server.url, "--repo", "r", "--script", "make")
    server.stop()
    log = server.log()
    assert "opened (roles" not in log and "closed (role" not in log, log
    assert "queued (attempt 1" in log
    assert "websockets" not in log.lower().replace("transport websockets", "")
    debug = server_factory("--log-level", "DEBUG", "--api-token", "secret-token-1")
    assert citron("runners", "-u", debug.url, "--token", "secret-token-1").returncode == 0
    debug.stop()
    log = debug.log()
    assert "connection 1 opened" in log and "closed (role API, code 1000)" in log
    assert "secret-token-1" not in log
    assert "get_runners" not in log  # no frames


def test_insecure_allows_open_roles_off_loopback(server_factory: ServerFactory) -> None:
    server = server_factory("--host", "0.0.0.0", "--insecure")
    assert server.lines[3] == "citron-server: open roles (no token needed): API, RUNNER, WEB"


def test_environment_sets_options(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CITRON_COMPRESSION", "deflate")
    server = server_factory()
    assert server.lines[1].endswith("compression deflate")


def test_memory_database(server_factory: ServerFactory, tmp_path: Path) -> None:
    server = server_factory("--db", ":memory:")
    assert "nothing is kept" in server.lines[2]


def test_default_database_is_in_the_working_directory(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "citron_server", "--port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert f"database {tmp_path.resolve() / 'citron.db'} (SQLite, WAL)" in lines[2]
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        if proc.stdout is not None:
            proc.stdout.close()
    assert (tmp_path / "citron.db").exists()


async def test_keepalive_closes_a_silent_peer(server_factory: ServerFactory) -> None:
    server = server_factory("--ping-interval", "0.5")
    silent = RawClient(server.port)  # never answers pings
    frames = await asyncio.wait_for(asyncio.to_thread(silent.frames), 10)
    opcodes = [opcode for opcode, _ in frames]
    assert 9 in opcodes  # it was pinged
    assert server.http("/healthz")[0] == 200


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("redis://user:hunter2@localhost:6379/xyz", "must be a number"),
        ("redis://:hunter2@localhost:abc/0", "not a usable Redis URL"),
        ("mysql://user:hunter2@db/citron", "expected sqlite or a Redis URL"),
        ("redis://localhost:6379/xyz?password=hunter2", "must be a number"),
    ],
)
def test_a_bad_engine_url_never_shows_its_password(url: str, needle: str, tmp_path: Path) -> None:
    result = run("--port", "0", "--engine", url, cwd=tmp_path)
    assert result.returncode == 2
    assert needle in result.stderr
    assert "hunter2" not in result.stderr
