"""TLS on both transports, with a certificate the test makes: https, wss,
the citron CLI and citron-runner with --ca, and what fails how."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from citron_protocol import decode_server

from ..conftest import ServerFactory, ServerProc
from ..procs import Spawn, citron, eventually, run_module, runner_argv
from ..tls import make_cert, trusting


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    return make_cert(tmp_path)


@pytest.fixture
def tls_server(server_factory: ServerFactory, cert: tuple[Path, Path]) -> ServerProc:
    return server_factory("--tls-cert", str(cert[0]), "--tls-key", str(cert[1]))


def https_get(port: int, path: str, context: ssl.SSLContext) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}{path}", timeout=5, context=context
        ) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_https_and_wss(tls_server: ServerProc, cert: tuple[Path, Path]) -> None:
    assert tls_server.url.startswith("wss://127.0.0.1:")
    context = trusting(cert[0])
    status, body = await asyncio.to_thread(https_get, tls_server.port, "/healthz", context)
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = await asyncio.to_thread(https_get, tls_server.port, "/", context)
    assert status == 200 and b"<html" in body.lower()
    async with connect(tls_server.url, ssl=context, compression=None) as ws:
        await ws.send('API:run:{"repo": "https://x/r.git", "script": ["make"], "req": "1"}')
        reply = decode_server(str(await asyncio.wait_for(ws.recv(), 5)))
        assert reply.COMMAND == "queued"
    # The server's own https origin may open a WebSocket; http of the same host may not.
    own = f"https://127.0.0.1:{tls_server.port}"
    async with connect(tls_server.url, ssl=context, origin=own) as ws:  # type: ignore[arg-type]
        await ws.send('WEB:get_runners:{"req": "r"}')
        assert decode_server(str(await asyncio.wait_for(ws.recv(), 5))).COMMAND == "runners"


async def test_plain_ws_to_the_tls_port_fails(tls_server: ServerProc) -> None:
    plain = tls_server.url.replace("wss://", "ws://")
    with pytest.raises(Exception) as failed:  # any handshake failure will do
        async with connect(plain, open_timeout=5):
            pass
    assert "101" not in str(failed.value)
    result = await asyncio.to_thread(citron, "runners", plain)
    assert result.returncode == 69, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


async def test_without_ca_the_clients_refuse_the_certificate(tls_server: ServerProc) -> None:
    result = await asyncio.to_thread(citron, "runners", tls_server.url)
    assert result.returncode == 69
    assert result.stderr.count("\n") == 1, result.stderr
    assert "certificate" in result.stderr and "self-signed" in result.stderr
    assert "--ca" in result.stderr
    runner = await asyncio.to_thread(
        run_module, "citron_client.runner_cli", tls_server.url, "--once", timeout=30
    )
    assert runner.returncode == 69
    lines = [line for line in runner.stderr.splitlines() if "Traceback" in line]
    assert lines == [] and "self-signed" in runner.stderr


async def test_a_bad_ca_file_is_a_usage_error(tls_server: ServerProc, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for ca in (str(junk), str(tmp_path / "missing.pem")):
        result = await asyncio.to_thread(citron, "runners", tls_server.url, "--ca", ca)
        assert result.returncode == 64, result.stderr
        assert result.stderr.count("\n") == 1 and ca in result.stderr
        runner = await asyncio.to_thread(
            run_module, "citron_client.runner_cli", tls_server.url, "--ca", ca, timeout=30
        )
        assert runner.returncode == 2 and "Traceback" not in runner.stderr


async def test_ssl_cert_file_is_honoured(tls_server: ServerProc, cert: tuple[Path, Path]) -> None:
    result = await asyncio.to_thread(
        citron, "runners", tls_server.url, env={"SSL_CERT_FILE": str(cert[0])}
    )
    assert result.returncode == 0, result.stderr


async def test_a_real_build_over_wss(
    tls_server: ServerProc, cert: tuple[Path, Path], spawn: Spawn, git_repo: Path
) -> None:
    ca = str(cert[0])
    spawn(*runner_argv(tls_server.url, "--ca", ca, "--name", "tls-runner"), log_name="runner")

    def registered() -> bool | None:
        shown = citron("runners", tls_server.url, "--ca", ca, "--json")
        assert shown.returncode == 0, shown.stderr
        return True if json.loads(shown.stdout) else None

    await asyncio.to_thread(eventually, registered, "the runner registers over wss")
    result = await asyncio.to_thread(
        citron,
        "submit",
        tls_server.url,
        "--ca",
        ca,
        "--repo",
        str(git_repo),
        "--script",
        "bash build.sh",
        "--wait",
    )
    assert result.returncode == 0, result.stderr
    assert "built from main" in result.stdout


BAD_PAIRS = ["missing cert", "missing key", "garbage cert", "key of another cert", "swapped"]


@pytest.mark.parametrize("case", BAD_PAIRS)
def test_a_bad_certificate_or_key_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    cert, key = make_cert(tmp_path)
    other_cert, other_key = make_cert(tmp_path, "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    pair = {
        "missing cert": (tmp_path / "none.crt", key),
        "missing key": (cert, tmp_path / "none.key"),
        "garbage cert": (garbage, key),
        "key of another cert": (cert, other_key),
        "swapped": (key, cert),
    }[case]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "citron_server",
            "--port",
            "0",
            "--db",
            str(tmp_path / "c.db"),
            "--tls-cert",
            str(pair[0]),
            "--tls-key",
            str(pair[1]),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("citron-server: error:")
    assert result.stdout == ""
    assert not (tmp_path / "c.db").exists()  # refused before the database is touched
    assert other_cert.exists()


def test_tls_cert_and_key_go_together(tmp_path: Path) -> None:
    cert, _ = make_cert(tmp_path)
    result = run_module("citron_server", "--tls-cert", str(cert), "--port", "0", cwd=tmp_path)
    assert result.returncode == 2 and "go together" in result.stderr


async def test_a_tls_handshake_that_never_comes_is_cut(
    tls_server: ServerProc, cert: tuple[Path, Path]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", tls_server.port)
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), 30)  # sends nothing; the server ends it
    assert data == b""
    assert 9 <= time.monotonic() - started <= 10 + 2
    writer.close()
    status, _ = await asyncio.to_thread(https_get, tls_server.port, "/healthz", trusting(cert[0]))
    assert status == 200
