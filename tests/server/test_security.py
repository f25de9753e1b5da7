"""The server's defences, end to end on both transports: Origin and Host
checks, credentials that are malformed, /metrics' token, what reaches the log
at DEBUG, and the database's file modes."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import stat
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.exceptions import InvalidStatus

from citron_protocol import Role
from citron_server.app import all_loopback, clear_text_warning
from citron_server.security import Auth, Gate, Refusal, normalize_origin
from citron_server.settings import ConfigError, parse_settings

from ..conftest import ServerFactory, ServerProc
from ..peers import ask, peer, recv, submit

FOREIGN = "http://evil.example:8080"


def raw_request(port: int, head: bytes, then: bytes = b"", timeout: float = 5) -> bytes:
    """Send an HTTP request as bytes (and ``then`` right after it); return
    everything the server sends until it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + then)
        out = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                out += data
                if b"\r\n\r\n" in out and _complete(out):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return out


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def handshake(
    port: int, path: str = "/ws", headers: list[tuple[str, bytes]] | None = None
) -> bytes:
    """A WebSocket handshake's bytes; ``headers`` replace or add to the usual ones."""
    key = base64.b64encode(os.urandom(16)).decode()
    usual: list[tuple[str, bytes]] = [
        ("Host", f"127.0.0.1:{port}".encode()),
        ("Upgrade", b"websocket"),
        ("Connection", b"Upgrade"),
        ("Sec-WebSocket-Key", key.encode()),
        ("Sec-WebSocket-Version", b"13"),
    ]
    extra = headers or []
    replaced = {name.lower() for name, _ in extra}
    lines = [(n, v) for n, v in usual if n.lower() not in replaced] + extra
    head = f"GET {path} HTTP/1.1\r\n".encode()
    head += b"".join(name.encode() + b": " + value + b"\r\n" for name, value in lines)
    return head + b"\r\n"


def get(port: int, path: str, headers: list[tuple[str, bytes]] | None = None) -> bytes:
    lines: list[tuple[str, bytes]] = [("Host", f"127.0.0.1:{port}".encode())]
    extra = headers or []
    replaced = {name.lower() for name, _ in extra}
    lines = [(n, v) for n, v in lines if n.lower() not in replaced] + extra
    head = f"GET {path} HTTP/1.1\r\n".encode()
    head += b"".join(name.encode() + b": " + value + b"\r\n" for name, value in lines)
    return raw_request(port, head + b"Connection: close\r\n\r\n")


def masked_frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    header = (
        struct.pack("!BB", 0x81, 0x80 | n) if n < 126 else struct.pack("!BBH", 0x81, 0x80 | 126, n)
    )
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def build_count(server: ServerProc) -> int:
    api = await peer(server.url)
    reply = await ask(api, 'API:get_builds:{"req": "n"}')
    await api.close()
    return len(reply.builds)


# -- Origin ---------------------------------------------------------------------------


async def test_a_foreign_origin_gets_403_and_no_frame_is_answered(server: ServerProc) -> None:
    run = masked_frame('API:run:{"repo": "https://x/r.git", "script": ["id > pwned"]}')
    answer = await asyncio.to_thread(
        raw_request,
        server.port,
        handshake(server.port, headers=[("Origin", FOREIGN.encode())]),
        run,
    )
    assert status_of(answer) == 403
    assert b"queued" not in answer and b"\x81" not in answer.partition(b"\r\n\r\n")[2]
    with pytest.raises(InvalidStatus) as refused:
        await peer(server.url, origin=FOREIGN)  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    assert await build_count(server) == 0
    assert f"origin '{FOREIGN}' (403)" in server.log()


@pytest.mark.parametrize(
    "origin",
    [
        "null",  # a sandboxed frame or a file: page
        "http://127.0.0.1:1",  # the server's host, another port
        "https://127.0.0.1:{port}",  # another scheme
        "http://localhost:{port}",  # another name for the same address
        "http://127.0.0.1:{port}/path",
        "",
    ],
)
async def test_origins_that_are_not_the_servers_own(server: ServerProc, origin: str) -> None:
    value = origin.format(port=server.port).encode()
    answer = await asyncio.to_thread(
        raw_request, server.port, handshake(server.port, headers=[("Origin", value)])
    )
    assert status_of(answer) == 403


async def test_two_origin_headers_are_refused(server: ServerProc) -> None:
    own = f"http://127.0.0.1:{server.port}".encode()
    headers = [("Origin", own), ("Origin", own)]
    answer = await asyncio.to_thread(
        raw_request, server.port, handshake(server.port, headers=headers)
    )
    assert status_of(answer) == 403


async def test_the_servers_own_origin_and_no_origin_work(server: ServerProc) -> None:
    for origin in (f"http://127.0.0.1:{server.port}", f"HTTP://127.0.0.1:{server.port}", None):
        api = await peer(server.url, origin=origin)  # type: ignore[arg-type]
        await submit(api)
        await api.close()
    assert await build_count(server) == 3


async def test_an_allowed_origin_works(server_factory: ServerFactory) -> None:
    server = server_factory(
        "--allowed-origin", "https://front.example", "--allowed-origin", "http://ci.example:3000"
    )
    for origin in ("https://front.example", "https://front.example:443", "http://ci.example:3000"):
        api = await peer(server.url, origin=origin)  # type: ignore[arg-type]
        await submit(api)
        await api.close()
    for origin in ("http://front.example", "https://front.example:8443", FOREIGN):
        with pytest.raises(InvalidStatus) as refused:
            await peer(server.url, origin=origin)  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403


# -- Host (DNS rebinding) ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/healthz", "/metrics", "/nothing"])
async def test_a_loopback_listener_refuses_other_host_names(server: ServerProc, path: str) -> None:
    port = server.port
    for host in (f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "10.0.0.1"):
        answer = await asyncio.to_thread(get, port, path, [("Host", host.encode())])
        assert status_of(answer) == 403, (host, answer[:200])
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", "127.0.0.2"):
        answer = await asyncio.to_thread(get, port, path, [("Host", host.encode())])
        assert status_of(answer) != 403, (host, answer[:200])


async def test_a_websocket_for_another_host_name_is_refused(server: ServerProc) -> None:
    headers = [("Host", f"rebound.example:{server.port}".encode())]
    answer = await asyncio.to_thread(
        raw_request, server.port, handshake(server.port, headers=headers)
    )
    assert status_of(answer) == 403
    headers = [("Host", f"localhost:{server.port}".encode())]
    answer = await asyncio.to_thread(
        raw_request, server.port, handshake(server.port, headers=headers)
    )
    assert status_of(answer) == 101


# -- credentials -------------------------------------------------------------------------

BAD_CREDENTIALS: list[tuple[str, list[tuple[str, bytes]], str]] = [
    ("non-ASCII header", [("Authorization", "Bearer tökén".encode())], ""),
    ("latin-1 header", [("Authorization", b"Bearer \xff\xfe")], ""),
    ("undecodable bytes", [("Authorization", b"Bearer \xc3\x28\xa0\xa1")], ""),
    ("empty header", [("Authorization", b"")], ""),
    ("blank header", [("Authorization", b"   ")], ""),
    ("bearer without token", [("Authorization", b"Bearer")], ""),
    ("another scheme", [("Authorization", b"Basic YTpi")], ""),
    (
        "repeated header",
        [("Authorization", b"Bearer api-secret"), ("Authorization", b"Bearer api-secret")],
        "",
    ),
    ("empty query token", [], "?token="),
    ("repeated query token", [], "?token=api-secret&token=api-secret"),
    ("undecodable query token", [], "?token=%ff%fe"),
    ("surrogate query token", [], "?token=%ed%a0%80"),
    ("non-ASCII query token", [], "?token=t%C3%B6k%C3%A9n"),
]


@pytest.mark.parametrize(
    ("what", "headers", "query"), BAD_CREDENTIALS, ids=[c[0] for c in BAD_CREDENTIALS]
)
async def test_malformed_credentials_are_401(
    server_factory: ServerFactory, what: str, headers: list[tuple[str, bytes]], query: str
) -> None:
    # One role open: a malformed credential must not fall back to "no token".
    server = server_factory("--api-token", "api-secret", "--runner-token", "runner-secret")
    answer = await asyncio.to_thread(
        raw_request, server.port, handshake(server.port, "/ws" + query, headers)
    )
    assert status_of(answer) == 401, what
    # The server is still there and well.
    api = await peer(server.url, token="api-secret")
    await submit(api)
    log = server.log()
    assert "Traceback" not in log and " 500" not in log


async def test_the_right_token_in_either_form_still_works(server_factory: ServerFactory) -> None:
    server = server_factory("--api-token", "api-secret")
    api = await peer(server.url, token="api-secret")
    await submit(api)
    api = await peer(server.url + "?token=api-secret")
    await submit(api)


# -- /metrics ------------------------------------------------------------------------------


async def test_the_metrics_token(server_factory: ServerFactory) -> None:
    server = server_factory("--metrics-token", "scrape-me")
    port = server.port
    for headers in (
        [],
        [("Authorization", b"Bearer wrong")],
        [("Authorization", b"Bearer \xff")],
        [("Authorization", b"scrape-me")],
    ):
        answer = await asyncio.to_thread(get, port, "/metrics", headers)
        assert status_of(answer) == 401, headers
    answer = await asyncio.to_thread(
        get, port, "/metrics", [("Authorization", b"Bearer scrape-me")]
    )
    assert status_of(answer) == 200 and b"citron_connections" in answer
    answer = await asyncio.to_thread(get, port, "/healthz")
    assert status_of(answer) == 200


async def test_metrics_are_open_without_the_option(server: ServerProc) -> None:
    status, _, body = await asyncio.to_thread(server.http, "/metrics")
    assert status == 200 and "citron_connections" in body


# -- nothing secret in the log ---------------------------------------------------------------


async def test_nothing_secret_reaches_the_log_at_debug(
    server_factory: ServerFactory, transport: str
) -> None:
    tokens = {"runner": "runner-tok-3141", "api": "api-tok-2718", "web": "web-tok-1618"}
    server = server_factory(
        "--log-level",
        "DEBUG",
        "--runner-token",
        tokens["runner"],
        "--api-token",
        tokens["api"],
        "--web-token",
        tokens["web"],
    )
    secret = "hunter2-very-secret-value"
    # Every token, in the header form and in the query form.
    r = await peer(server.url, token=tokens["runner"])
    ready = await ask(r, 'RUNNER:init:{"type": "simple", "protocol": 1}')
    session = ready.session
    api = await peer(server.url, token=tokens["api"])
    web = await peer(server.url + f"?token={tokens['web']}")
    other_api = await peer(server.url + f"?token={tokens['api']}")
    web_header = await peer(server.url, token=tokens["web"])
    build = await submit(api, extra=f', "secrets": {{"PASSWORD": "{secret}"}}')
    run = await recv(r)
    assert run.COMMAND == "run" and run.secrets == {"PASSWORD": secret}
    await r.send(f'RUNNER:process:{{"build": "{build}", "finished": false, "log": "ok\\n"}}')
    await r.close()
    # The session secret proves a resume, on a connection with ?token=.
    again = await peer(server.url + f"?token={tokens['runner']}")
    resumed = await ask(
        again,
        'RUNNER:init:{"type": "simple", "protocol": 1, '
        f'"resume": {{"build": "{build}", "session": "{session}"}}}}',
    )
    assert resumed.COMMAND == "ready" and resumed.resume is not None
    await ask(web, f'WEB:get_build:{{"build": "{build}", "req": "w"}}')
    await ask(web_header, 'WEB:get_runners:{"req": "r"}')
    await ask(other_api, 'API:get_builds:{"req": "b"}')
    # A refused token is not logged either.
    with pytest.raises(InvalidStatus):
        await peer(server.url + "?token=wrong-tok-5772")
    for ws in (api, web, other_api, web_header, again):
        await ws.close()
    await asyncio.sleep(0.3)
    assert server.terminate() == 0
    log = server.log()
    assert "DEBUG" in log  # the level took effect
    for value in (secret, session, *tokens.values(), "wrong-tok-5772"):
        assert value not in log, value


# -- files -------------------------------------------------------------------------------------


async def test_the_database_files_are_private(server: ServerProc) -> None:
    api = await peer(server.url)
    await submit(api)
    await asyncio.sleep(0.2)  # the store commits within 10 ms
    names = [server.db, Path(f"{server.db}-wal"), Path(f"{server.db}-shm")]
    for path in names:
        assert path.exists(), path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, (path, oct(path.stat().st_mode))


# -- the gate, in memory ---------------------------------------------------------------------

OPEN_AUTH = Auth({Role.RUNNER: None, Role.API: None, Role.WEB: None})
TOKENS = Auth({Role.RUNNER: "r-token", Role.API: "a-token", Role.WEB: None})


def test_origins_normalize() -> None:
    assert normalize_origin("HTTPS://CI.Example.org") == "https://ci.example.org:443"
    assert normalize_origin("http://ci.example.org:80/") == "http://ci.example.org:80"
    assert normalize_origin("http://[::1]:8765") == "http://[::1]:8765"
    for bad in ("ci.example.org", "ftp://x", "http://x/path", "http://", "null", "http://a:b@x"):
        with pytest.raises(ValueError):
            normalize_origin(bad)


def test_the_gate_on_origins() -> None:
    gate = Gate(OPEN_AUTH, loopback=True, allowed_origins=["https://front.example"])
    host = ["127.0.0.1:8765"]
    assert gate.origin([], host) is None
    assert gate.origin(["http://127.0.0.1:8765"], host) is None
    assert gate.origin(["https://front.example"], host) is None
    assert gate.origin(["https://front.example:443"], host) is None
    for origin in ("https://127.0.0.1:8765", "http://127.0.0.1:8766", "null", "http://x:8765"):
        refused = gate.origin([origin], host)
        assert refused is not None and refused.status == 403, origin
    tls = Gate(OPEN_AUTH, tls=True)
    assert tls.origin(["https://ci.example.org"], ["ci.example.org"]) is None
    assert tls.origin(["https://ci.example.org"], ["ci.example.org:443"]) is None
    assert tls.origin(["http://ci.example.org"], ["ci.example.org"]) is not None
    assert tls.origin(["https://ci.example.org"], []) is not None


def test_the_gate_on_hosts() -> None:
    gate = Gate(OPEN_AUTH, loopback=True)
    for ok in (
        "127.0.0.1:1",
        "localhost",
        "LOCALHOST:80",
        "a.localhost:9",
        "[::1]:8765",
        "127.9.9.9",
    ):
        assert gate.host([ok]) is None, ok
    for bad in ("evil.example", "0.0.0.0:1", "10.1.2.3", "localhost.evil", "[::2]", "", "a b"):
        refused = gate.host([bad])
        assert refused is not None and refused.status == 403, bad
    assert gate.host([]) is not None
    assert gate.host(["localhost", "localhost"]) is not None
    anywhere = Gate(OPEN_AUTH, loopback=False)
    assert anywhere.host(["ci.example.org"]) is None


def test_the_gate_on_credentials() -> None:
    gate = Gate(TOKENS)
    assert gate.credentials([], []) == frozenset({Role.WEB})
    assert gate.credentials(["Bearer a-token"], []) == frozenset({Role.API, Role.WEB})
    assert gate.credentials(["bearer   r-token "], []) == frozenset({Role.RUNNER, Role.WEB})
    assert gate.credentials([], ["a-token"]) == frozenset({Role.API, Role.WEB})
    for authorization, query in (
        ([""], []),
        (["Bearer"], []),
        (["Basic a-token"], []),
        (["Bearer a-token", "Bearer a-token"], []),
        (["Bearer a-tok\udcff"], []),
        ([], [""]),
        ([], ["a-token", "a-token"]),
        ([], ["\ud800"]),
        (["Bearer wrong"], ["a-token"]),  # the header wins
    ):
        refused = gate.credentials(authorization, query)
        assert isinstance(refused, Refusal) and refused.status == 401, (authorization, query)


@given(
    st.lists(st.text(), max_size=3),
    st.lists(st.text(), max_size=3),
    st.lists(st.text(), max_size=3),
    st.lists(st.text(), max_size=3),
)
def test_the_gate_never_raises(
    host: list[str], origin: list[str], authorization: list[str], query: list[str]
) -> None:
    for auth in (OPEN_AUTH, TOKENS):
        for gate in (Gate(auth, loopback=True), Gate(auth, tls=True, allowed_origins=["http://a"])):
            answer = gate.websocket(
                host=host, origin=origin, authorization=authorization, query_token=query
            )
            assert isinstance(answer, frozenset) or answer.status in (401, 403)
            assert gate.metrics(authorization) is None
            assert Gate(auth, metrics_token="m").metrics(authorization) in (
                None,
                Refusal(401, "unauthorized: /metrics needs its token"),
            )


def test_allowed_origins_from_the_environment() -> None:
    settings = parse_settings([], {"CITRON_ALLOWED_ORIGIN": "https://a.example, http://b:81"})
    assert settings.allowed_origin == ("https://a.example:443", "http://b:81")
    settings = parse_settings(
        ["--allowed-origin", "https://a.example", "--allowed-origin", "http://c,http://d"], {}
    )
    assert settings.allowed_origin == ("https://a.example:443", "http://c:80", "http://d:80")
    with pytest.raises(ConfigError, match="expected an origin"):
        parse_settings(["--allowed-origin", "a.example"], {})
    with pytest.raises(ConfigError, match="CITRON_ALLOWED_ORIGIN"):
        parse_settings([], {"CITRON_ALLOWED_ORIGIN": "ftp://a"})


def test_which_listeners_are_loopback_and_warned_about() -> None:
    assert all_loopback(["127.0.0.1"]) and all_loopback(["::1", "127.0.0.5"])
    assert not all_loopback(["127.0.0.1", "0.0.0.0"]) and not all_loopback(["::"])
    assert not all_loopback([]) and not all_loopback(["/run/citron.sock"])
    assert all_loopback(["fe80::1%eth0"]) is False
    warning = clear_text_warning("0.0.0.0", loopback=False, tls=False)
    assert warning is not None and "without TLS" in warning and "0.0.0.0" in warning
    assert clear_text_warning("0.0.0.0", loopback=False, tls=True) is None
    assert clear_text_warning("localhost", loopback=True, tls=False) is None


async def test_a_loopback_name_gets_the_host_check(server_factory: ServerFactory) -> None:
    # "localhost" is a name, not an address: what was bound decides.
    server = server_factory("--host", "localhost")
    answer = await asyncio.to_thread(
        get, server.port, "/healthz", [("Host", f"evil.example:{server.port}".encode())]
    )
    assert status_of(answer) == 403
    assert "without TLS" not in server.log() and all("warning" not in x for x in server.lines)
