"""``citron conformance`` against servers that each break one rule of
docs/protocol.md (tests/client/broken_hubs.py): the check named for the
rule must fail, saying why; the unbroken hub, served the same way, must
pass every check."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from citron_client.conformance import FAIL, PASS, SKIP, ServerConformance
from citron_protocol import Hub, HubConfig, Role
from citron_server.host import Host, RandomIds
from citron_server.metrics import Metrics
from citron_server.security import Auth, Gate
from citron_server.settings import parse_settings
from citron_server.store import SqliteStore

from .broken_hubs import BROKEN, FAST

Serve = Callable[[Hub], "AsyncIterator[str]"]

#: Real servers on loopback sockets, in-process: part of the slow suite.
pytestmark = pytest.mark.slow


class Served:
    """A hub served by the real websockets transport on a free loopback port."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.host = Host(SqliteStore(":memory:"), hub.config, hub=hub)
        self.server: object = None

    async def __aenter__(self) -> str:
        from citron_server.ws import WebsocketsTransport

        await self.host.start()
        settings = parse_settings(["--port", "0"], {})
        gate = Gate(Auth({Role.RUNNER: None, Role.API: None, Role.WEB: None}), loopback=True)
        self.server = WebsocketsTransport(self.host, gate, Metrics(), settings, None)
        port = await self.server.start()  # type: ignore[attr-defined]
        return f"ws://127.0.0.1:{port}/ws"

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop_accepting()  # type: ignore[attr-defined]
        await self.host.shutdown()
        await self.server.close()  # type: ignore[attr-defined]


def conformance(url: str, *only: str, model: int = 0) -> ServerConformance:
    return ServerConformance(
        url,
        lost_grace=FAST.lost_grace,
        cancel_timeout=FAST.cancel_timeout,
        max_wait=5,
        timeout=2,
        only=only,
        model=model,
    )


async def test_the_unbroken_hub_passes_every_check() -> None:
    async with Served(Hub(RandomIds(), FAST)) as url:
        results = await conformance(url).run()
    # (The model check needs citron's default timers: below.)
    failed = [r for r in results if r.status != PASS and r.name != "model"]
    assert failed == [], failed
    assert len(results) == len(conformance("ws://x/ws").checks)
    (model,) = [r for r in results if r.name == "model"]
    assert model.status == SKIP and "give --model N" in model.detail


async def test_a_timer_check_names_the_setting_to_align() -> None:
    """A server whose lost grace is longer than the tool was told: the
    check fails, naming --lost-grace (and --cancel-timeout likewise)."""
    slow = HubConfig(lost_grace=4.0, cancel_timeout=4.0)
    async with Served(Hub(RandomIds(), slow)) as url:
        checker = ServerConformance(
            url,
            lost_grace=0.5,
            cancel_timeout=0.5,
            max_wait=5,
            timeout=1,
            only=("runner_loss_requeue", "cancel_timeout"),
        )
        results = {r.name: r for r in await checker.run()}
    loss, cancel = results["runner_loss_requeue"], results["cancel_timeout"]
    assert loss.status == FAIL and "give it with --lost-grace" in loss.detail, loss
    assert cancel.status == FAIL and "give it with --cancel-timeout" in cancel.detail, cancel


async def test_the_model_check_compares_with_the_reference_model() -> None:
    async with Served(Hub(RandomIds(), HubConfig())) as url:
        (result,) = await conformance(url, "model", model=600).run()
    assert result.status == PASS and "answers equal the model's" in result.detail, result
    make, _, _ = BROKEN["get_builds_oldest_first"]
    async with Served(make(HubConfig())) as url:
        (result,) = await conformance(url, "model", model=600).run()
    assert result.status == FAIL and "the model sent" in result.detail, result


@pytest.mark.parametrize("name", sorted(BROKEN))
async def test_each_broken_rule_is_caught_by_its_check(name: str) -> None:
    make, check, why = BROKEN[name]
    async with Served(make()) as url:
        (result,) = await conformance(url, check).run()
    assert result.status == FAIL, (name, result)
    assert why in result.detail, (name, result.detail)


def test_the_broken_servers_cover_every_category() -> None:
    checks = {check for _, check, _ in BROKEN.values()}
    assert len(BROKEN) >= 40
    # Every check of the server side is exercised by at least one broken
    # server, except those that need a timer longer than a test should wait
    # or tokens (runner loss after the grace, the cancel timeout are run by
    # the unbroken hub above with a 1 s grace).
    untested = {name for name, _ in conformance("ws://x/ws").checks} - checks
    assert untested <= {"registration", "cancel_timeout", "runner_loss_requeue", "model"}
