"""The dashboard in a real browser (Debian's Chromium, driven by Playwright),
against a real citron-server and citron-runner, for both transports."""

from __future__ import annotations

import asyncio
import functools
import http.server
import os
import re
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .. import procs
from ..conftest import ServerProc
from ..procs import Spawn, runner_argv

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).parents[2]
SCREENSHOTS = ROOT / "build" / "screenshots"

if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must install Debian's chromium (see .ci/run)")
    pytest.skip(
        "the dashboard's browser tests drive Debian's Chromium: apt-get install chromium",
        allow_module_level=True,
    )

playwright = pytest.importorskip(
    "playwright.async_api",
    reason="the dashboard's browser tests need Playwright: pip install -e '.[test]'",
)


class Page:
    """A browser page that records console errors and dialogs."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

        async def dismiss(dialog: Any) -> None:
            self.dialogs.append(dialog.message)
            await dialog.dismiss()

        page.on("dialog", dismiss)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright.async_playwright() as p:
        instance = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield instance
        await instance.close()


async def open_page(browser: Any, url: str, height: int = 900) -> Page:
    page = Page(await browser.new_page(viewport={"width": 1280, "height": height}))
    await page.page.goto(url)
    return page


async def submit(server: ServerProc, repo: Path, *script: str) -> str:
    return await asyncio.to_thread(procs.submit, server.url, repo, *script)


async def log_lines(page: Page) -> list[tuple[int, str]]:
    """The log lines in the page: number, and text as shown."""
    rows = await page.page.locator("#log .line").evaluate_all(
        """rows => rows.map(r => [Number(r.dataset.line),
            [...r.querySelectorAll('span')].map(s => s.textContent).join('')])"""
    )
    return [(int(n), str(t)) for n, t in rows]


def http_base(server: ServerProc) -> str:
    return f"http://127.0.0.1:{server.port}/"


async def test_runners_builds_and_a_live_log(
    server: ServerProc, spawn: Spawn, git_repo: Path, browser: Any, tmp_path: Path, transport: str
) -> None:
    spawn(*runner_argv(server.url, "--name", "browser-runner"), log_name="runner")
    page = await open_page(browser, http_base(server) + "#/runners")
    runners = page.page.locator("#runners tbody tr[data-runner]")
    await runners.first.wait_for()
    assert "browser-runner" in await runners.first.inner_text()
    assert "WAITING" in await runners.first.inner_text()

    marker = tmp_path / "go"
    build = await submit(
        server,
        git_repo,
        f"echo first-$((0+1)); while [ ! -e {marker} ]; do sleep 0.05; done; echo second-$((1+1))",
    )
    await page.page.goto(http_base(server) + "#/builds")
    row = page.page.locator(f'#builds tr[data-build="{build}"]')
    await row.wait_for()
    await page.page.click(f'#builds tr[data-build="{build}"] a')
    await page.page.locator("#log .line", has_text="first-1").wait_for()
    assert await page.page.locator("#log .line", has_text="second-2").count() == 0  # still waiting
    marker.touch()
    await page.page.locator("#log .line", has_text="second-2").wait_for()
    await page.page.locator('[data-fact="state"] .badge.success').wait_for()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.page.screenshot(path=str(SCREENSHOTS / f"build-page-{transport}.png"))
    assert page.errors == []


async def test_ansi_progress_lines_and_html_in_logs(
    server: ServerProc, spawn: Spawn, git_repo: Path, browser: Any
) -> None:
    spawn(*runner_argv(server.url), log_name="runner")
    build = await submit(
        server,
        git_repo,
        r"printf '\033[1;32mgreen bold\033[0m plain \033[38;5;208morange\033[0m\n'",
        r"printf 'progress 10%%\rprogress 50%%\rprogress 100%%\n'",
        "printf '<img src=x onerror=alert(%d)>\\n' 1",
        "printf '<script>alert(%d)</script>\\n' 2",
    )
    page = await open_page(browser, http_base(server) + f"#/builds/{build}")
    await page.page.locator('[data-fact="state"] .badge.success').wait_for()
    await page.page.locator("#log .line", has_text="alert(2)").wait_for()
    green = page.page.locator("#log .line span.b.fg32", has_text="green bold")
    assert await green.count() == 1
    orange = page.page.locator("#log .line").get_by_text("orange", exact=True)
    assert await orange.evaluate("e => getComputedStyle(e).color") == "rgb(255, 135, 0)"
    shown = [text for _, text in await log_lines(page)]
    assert [t for t in shown if "progress" in t and not t.startswith("$")] == ["progress 100%"]
    assert "<img src=x onerror=alert(1)>" in shown and "<script>alert(2)</script>" in shown
    html = page.page.locator("#log .line", has_text="<img src=x onerror=alert(1)>")
    assert await html.count() == 1
    assert await page.page.locator("#log img").count() == 0
    assert await page.page.locator("#log script").count() == 0
    await asyncio.sleep(0.3)
    assert page.dialogs == [] and page.errors == []


async def test_a_server_restart_mid_build_shows_every_line_once(
    server: ServerProc, spawn: Spawn, git_repo: Path, browser: Any
) -> None:
    spawn(*runner_argv(server.url), log_name="runner")
    build = await submit(
        server, git_repo, "for i in $(seq 1 250); do echo numbered $i; sleep 0.01; done"
    )
    page = await open_page(browser, http_base(server) + f"#/builds/{build}", height=9000)
    await page.page.locator("#log .line", has_text="numbered 40").wait_for()
    await asyncio.to_thread(server.kill9)
    await page.page.locator('#status[data-state="closed"]').wait_for()
    await asyncio.to_thread(server.restart)
    await page.page.locator('[data-fact="state"] .badge.success').wait_for(timeout=60_000)
    await page.page.locator("#log .line", has_text="numbered 250").wait_for()
    shown = [text for _, text in await log_lines(page)]
    numbered = [text for text in shown if text.startswith("numbered ")]
    assert numbered == [f"numbered {i}" for i in range(1, 251)]
    # While the server was down, Chromium reports each refused WebSocket
    # connection on the console; nothing else may be there.
    assert [e for e in page.errors if "WebSocket connection" not in e] == []


async def test_a_long_log_stays_responsive(
    server: ServerProc, spawn: Spawn, git_repo: Path, browser: Any
) -> None:
    spawn(*runner_argv(server.url), log_name="runner")
    build = await submit(server, git_repo, "seq 1 100000")
    page = await open_page(browser, http_base(server) + f"#/builds/{build}")
    await page.page.locator('[data-fact="state"] .badge.success').wait_for()
    # Section "$ git clone": "Cloning into", "done."; section "$ seq 1 100000":
    # 1 to 100000 (the sections' headers are not numbered lines).
    last = page.page.locator('#log .line[data-line="100002"]')
    await last.wait_for(timeout=60_000)
    assert dict(await log_lines(page))[100002] == "100000"
    rendered = await page.page.locator("#log .line").count()
    assert rendered < 200  # only the lines in view are in the page
    await page.page.goto(http_base(server) + f"#/builds/{build}/50002")
    target = page.page.locator('#log .line.target[data-line="50002"]')
    await target.wait_for(timeout=60_000)
    assert dict(await log_lines(page))[50002] == "50000"
    assert page.errors == []


async def test_the_page_passes_its_token(server_factory: Any, browser: Any) -> None:
    server = server_factory("--web-token", "pw", "--api-token", "a", "--runner-token", "r")
    page = await open_page(browser, http_base(server) + "?token=pw#/runners")
    await page.page.locator('#status[data-state="open"]').wait_for()
    await page.page.locator("#runners .empty").wait_for()
    assert page.errors == []


async def test_the_builds_list_pages_and_updates_live(server: ServerProc, browser: Any) -> None:
    from citron_client import Client

    async with Client(server.url) as api:
        ids = [
            await api.submit("https://example.org/r.git", ["make"], type="nobody")
            for _ in range(55)
        ]
        page = await open_page(browser, http_base(server) + "#/builds")
        rows = page.page.locator("#builds tbody tr[data-build]")
        await page.page.locator(f'#builds tr[data-build="{ids[-1]}"]').wait_for()
        assert await rows.count() == 50  # newest first, one page
        assert await rows.first.get_attribute("data-build") == ids[-1]
        await page.page.click("#older")
        await page.page.locator(f'#builds tr[data-build="{ids[0]}"]').wait_for()
        assert await rows.count() == 55
        assert await page.page.locator("#older").is_hidden()
        newest = await api.submit("https://example.org/r.git", ["make"], type="nobody")
        await page.page.locator(f'#builds tbody tr[data-build="{newest}"]').wait_for()
        assert await rows.first.get_attribute("data-build") == newest
        await api.cancel(ids[0])
        await page.page.locator(f'#builds tr[data-build="{ids[0]}"] .badge.cancelled').wait_for()
    assert page.errors == []


ATTACK = """<!doctype html><title>cat pictures</title><script>
window.seen = [];
const ws = new WebSocket("ws://127.0.0.1:PORT/ws");
ws.onopen = () => {
  window.seen.push("open");
  ws.send('API:run:{"repo": "https://x/r.git", "script": ["id > /tmp/pwned"]}');
};
ws.onmessage = (e) => { window.seen.push("message " + e.data); document.title = "done"; };
ws.onerror = () => window.seen.push("error");
ws.onclose = (e) => { window.seen.push("close " + e.code); document.title = "done"; };
</script>"""


@pytest.fixture
def other_origin(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A web server on another port of 127.0.0.1: another origin."""
    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))

    class Quiet(http.server.ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            pass

    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    httpd = Quiet(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield site, int(httpd.server_address[1])
    httpd.shutdown()
    httpd.server_close()


async def test_a_page_from_another_origin_cannot_queue_a_build(
    server: ServerProc, browser: Any, other_origin: tuple[Path, int], spawn: Spawn
) -> None:
    from citron_client import Client

    spawn(*runner_argv(server.url, "--name", "victim"), log_name="runner")
    site, port = other_origin
    (site / "index.html").write_text(ATTACK.replace("PORT", str(server.port)))
    attack = await open_page(browser, f"http://127.0.0.1:{port}/")
    await attack.page.wait_for_function("document.title === 'done'", timeout=10_000)
    seen = await attack.page.evaluate("window.seen")
    assert "open" not in seen and not any(s.startswith("message") for s in seen), seen
    assert "403" in server.log() and f"http://127.0.0.1:{port}" in server.log()
    # The dashboard, loaded from the server itself, works in the same browser.
    async with Client(server.url) as api:
        assert await api.builds() == ()
        build = await api.submit("https://example.org/r.git", ["make"], type="nobody")
    page = await open_page(browser, http_base(server) + "#/builds")
    await page.page.locator('#status[data-state="open"]').wait_for()
    await page.page.locator(f'#builds tr[data-build="{build}"]').wait_for()
    assert page.errors == []


async def test_a_rebound_host_name_gets_403(server: ServerProc) -> None:
    # A name the attacker controls, resolved to 127.0.0.1 (DNS rebinding).
    async with playwright.async_playwright() as p:
        instance = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=[*ARGS, "--host-resolver-rules=MAP rebound.test 127.0.0.1"],
        )
        try:
            page = await instance.new_page()
            response = await page.goto(f"http://rebound.test:{server.port}/")
            assert response is not None and response.status == 403
            api = await page.evaluate(
                """port => new Promise(done => {
                    const ws = new WebSocket(`ws://rebound.test:${port}/ws`);
                    ws.onopen = () => done("open");
                    ws.onclose = (e) => done("close " + e.code);
                })""",
                server.port,
            )
            assert api == "close 1006"
        finally:
            await instance.close()


async def test_builds_is_the_default_with_loading_empty_and_error_states(
    server: ServerProc, browser: Any
) -> None:
    # Loading: a server that accepts the WebSocket and answers nothing yet.
    silent = Page(await browser.new_page(viewport={"width": 1280, "height": 900}))
    await silent.page.route_web_socket("**/ws*", lambda ws: None)
    await silent.page.goto(http_base(server))
    await silent.page.locator("#builds .loading", has_text="Loading…").wait_for()
    assert await silent.page.locator('nav a.active[data-view="builds"]').count() == 1
    await silent.page.close()
    # Empty, with what to do about it.
    page = await open_page(browser, http_base(server))
    await page.page.locator("#builds .empty", has_text="No build yet.").wait_for()
    hint = await page.page.locator("#builds .empty").inner_text()
    assert f"citron submit --url http://127.0.0.1:{server.port}/" in hint
    # The server goes away: the page says so, and keeps trying.
    await asyncio.to_thread(server.kill9)
    notice = page.page.locator("#notice", has_text="Cannot reach the server")
    await notice.wait_for()
    await asyncio.to_thread(server.restart)
    await page.page.locator('#status[data-state="open"]').wait_for(timeout=60_000)
    await notice.wait_for(state="hidden")
    await page.page.goto(http_base(server) + "#/runners")
    await page.page.locator("#runners .empty", has_text="No runner connected.").wait_for()
    # (Chromium reports each refused connection while the server was down.)
    refused = ("WebSocket connection", "ERR_CONNECTION_REFUSED")
    assert [e for e in page.errors if not any(r in e for r in refused)] == []


async def test_a_401_asks_for_the_token_and_keeps_it(server_factory: Any, browser: Any) -> None:
    server = server_factory("--web-token", "pw", "--api-token", "a", "--runner-token", "r")
    page = await open_page(browser, http_base(server))
    form = page.page.locator("#notice #token-form")
    await form.wait_for()
    assert "This server needs a token to read." in await page.page.locator("#notice").inner_text()
    await page.page.fill("#token-input", "wrong")
    await page.page.click("#token-form button")
    await page.page.locator("#notice", has_text="The server refused this token.").wait_for()
    await page.page.fill("#token-input", "pw")
    await page.page.click("#token-form button")
    await page.page.locator('#status[data-state="open"]').wait_for()
    await page.page.locator("#builds .empty", has_text="No build yet.").wait_for()
    # Kept for the tab's session: a reload needs no new prompt.
    await page.page.reload()
    await page.page.locator('#status[data-state="open"]').wait_for()
    assert await page.page.locator("#token-form").count() == 0
    # A server whose WEB role needs a token but whose other roles are open
    # accepts the connection and refuses each request: the page asks too.
    open_api = server_factory("--web-token", "pw")
    other = await open_page(browser, http_base(open_api))
    await other.page.locator("#notice #token-form").wait_for()
    errors = [e for e in page.errors + other.errors if "WebSocket" not in e and "401" not in e]
    assert errors == []


async def test_a_cancelled_build_opens_the_cancelled_step(
    server: ServerProc, spawn: Spawn, git_repo: Path, browser: Any
) -> None:
    """The step that was running when the build was cancelled is the open
    section, marked cancelled; the line after it did not run."""
    spawn(*runner_argv(server.url), log_name="runner")
    build = await submit(server, git_repo, "echo one", "sleep 120", "echo never")
    page = await open_page(browser, http_base(server) + f"#/builds/{build}")
    await page.page.locator("#log .section", has_text="$ sleep 120").wait_for()
    cancelled = await asyncio.to_thread(procs.citron, "cancel", server.url, build)
    assert cancelled.returncode == 0, cancelled.stderr
    await page.page.locator('[data-fact="state"] .badge.cancelled').wait_for()
    await page.page.locator('#log .section[data-step="cancelled"]').wait_for()
    opened = page.page.locator("#log .section.open")
    assert await opened.count() == 1
    assert await opened.locator(".title").inner_text() == "$ sleep 120"
    assert await opened.locator(".step").inner_text() == "\u2298 cancelled"
    items = page.page.locator('[data-fact="script"] li')
    assert await items.evaluate_all("items => items.map(i => i.dataset.step)") == [
        "passed",
        "cancelled",
        "skipped",
    ]
    assert page.errors == []


async def test_sections_failure_banner_and_raw_log(
    server: ServerProc, spawn: Spawn, git_repo: Path, browser: Any, transport: str
) -> None:
    spawn(*runner_argv(server.url), log_name="runner")
    build = await submit(server, git_repo, "echo one", "echo two; exit 3", "echo never")
    page = await open_page(browser, http_base(server) + f"#/builds/{build}")
    await page.page.locator('[data-fact="state"] .badge.failure').wait_for()
    # (Until the log is in, the banner can only say that the build failed.)
    banner = page.page.locator("#banner", has_text="Failed: $ echo two")
    await banner.wait_for()
    assert await banner.inner_text() == "Failed: $ echo two; exit 3 exited with code 3."
    sections = page.page.locator("#log .section")
    titles = await sections.locator(".title").all_inner_texts()
    assert titles[0].startswith("$ git clone ") and titles[1:] == [
        "$ echo one",
        "$ echo two; exit 3",
    ]
    # The failing section is open, the others folded.
    assert await page.page.locator("#log .section.open").count() == 1
    assert await page.page.locator("#log .section.open.failed .title").inner_text() == titles[2]
    shown = [text for _, text in await log_lines(page)]
    assert "two" in shown and "one" not in shown and "never" not in shown
    await page.page.locator('#log .section[data-step="failed"] .time').wait_for()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.page.screenshot(path=str(SCREENSHOTS / f"build-failure-{transport}.png"))
    await page.page.click('#log .section[data-section="2"]')
    await page.page.locator("#log .line", has_text="one").wait_for()
    # Each script line's section says its step's state and time; the clone's
    # section is no step.
    steps = await sections.evaluate_all(
        """rows => rows.map(r => [r.dataset.step ?? null,
            r.querySelector('.step')?.textContent ?? null,
            r.querySelector('.time')?.textContent ?? null])"""
    )
    assert [s[:2] for s in steps] == [
        [None, None],
        ["passed", "✓ passed"],
        ["failed", "✗ failed"],
    ]
    assert steps[0][2] is None and all(re.fullmatch(r"\d+\.\ds", s[2]) for s in steps[1:])
    # The script one line per line, each with its state (the line that did
    # not run: skipped, no time); commit and exit code.
    assert await page.page.locator('[data-fact="script"] li code').all_inner_texts() == [
        "echo one",
        "echo two; exit 3",
        "echo never",
    ]
    items = page.page.locator('[data-fact="script"] li')
    assert await items.evaluate_all("items => items.map(i => i.dataset.step)") == [
        "passed",
        "failed",
        "skipped",
    ]
    assert await items.locator(".time").count() == 2
    assert await items.nth(2).locator(".step").inner_text() == "\u2013 skipped"
    assert await page.page.locator('[data-fact="exit code"]').inner_text() == "3"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=git_repo, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert await page.page.locator('[data-fact="commit"]').inner_text() == head
    # The raw log, from the page's link.
    href = await page.page.locator("#raw-log").get_attribute("href")
    assert href == f"/builds/{build}/log"
    raw = await page.page.evaluate(f"fetch({href!r}).then(r => r.text())")
    assert "::group::$ echo one\none\n" in raw and "exited with code 3" in raw
    assert page.errors == []


async def test_line_timestamps(server: ServerProc, browser: Any) -> None:
    """Each line can show when the server received it; the choice stays."""
    from ..peers import expect, peer, runner

    api = await peer(server.url)
    build = (await ask_build(api)).build
    ws = await runner(server.url)
    await expect(ws, "run")
    await ws.send('RUNNER:process:{"finished": false, "log": "early\\n"}')
    await asyncio.sleep(1.2)
    await ws.send('RUNNER:process:{"finished": false, "log": "late\\nsame chunk\\n"}')
    await ws.send('RUNNER:process:{"finished": true, "success": true}')
    page = await open_page(browser, http_base(server) + f"#/builds/{build}")
    await page.page.locator('[data-fact="state"] .badge.success').wait_for()
    await page.page.locator("#log .line", has_text="same chunk").wait_for()
    assert await page.page.locator("#log .ts").count() == 0  # off by default
    await page.page.check("#timestamps")
    stamps = await page.page.locator("#log .line .ts").all_inner_texts()
    assert len(stamps) == 3 and all(re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", s) for s in stamps)
    assert stamps[1] == stamps[2] != stamps[0]  # one chunk, one time
    await page.page.reload()
    await page.page.locator("#log .line .ts").first.wait_for()  # remembered
    assert page.errors == []


async def ask_build(api: Any) -> Any:
    from ..peers import ask

    return await ask(api, 'API:run:{"repo": "https://x/r.git", "script": ["make"]}')
