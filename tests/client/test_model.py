"""``citron fuzz --model``: the server's answers against the reference
model, on citron (no difference) and on the broken hubs of
tests/client/broken_hubs.py (a difference, where a frame can reach the
broken rule)."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest

from citron_client.model import STATE_FRAMES, ModelFuzzer, Normal, edge_frames
from citron_protocol import Hub, HubConfig, Role
from citron_server.host import RandomIds

from ..conftest import ServerFactory
from ..procs import citron
from .broken_hubs import BROKEN
from .test_conformance_broken import Served

CONFIG = HubConfig()  # the model's, and the served hubs': citron's defaults
FRAMES = 1500
SEED = 3

#: Broken rules the model comparison cannot see, and why (the conformance
#: check named for each catches it: test_conformance_broken.py).
UNSEEN = {
    "no_acks": "ack: frames come when the store says, so they are not compared",
    "no_result_ack": "ack: frames come when the store says, so they are not compared",
    "acks_to_protocol_1": "ack: frames come when the store says, so they are not compared",
    "no_rate_limit": "the fuzzer stays within the request budget, on purpose",
}

#: Real servers on loopback sockets, in-process: part of the slow suite.
pytestmark = pytest.mark.slow


@functools.cache
def frames() -> list[tuple[str, Role, str]]:
    return ModelFuzzer("ws://unused/ws", frames=FRAMES, seed=SEED).frames_to_send()


@functools.cache
def state_frames() -> list[tuple[str, Role, str]]:
    """The edge and state frames only, drawn with ``random`` alone: the same
    on every machine, whatever hypothesis drew before in the process."""
    rng = random.Random(SEED)
    out = [("edge", role, frame) for role, frame in edge_frames()]
    out += [("state", *rng.choice(STATE_FRAMES)) for _ in range(FRAMES - len(out))]
    rng.shuffle(out)
    return out


async def model_fuzz(
    hub: Hub, stop_after: int = 20, sent: list[tuple[str, Role, str]] | None = None
) -> object:
    async with Served(hub) as url:
        fuzzer = ModelFuzzer(
            url, frames=FRAMES, seed=SEED, timeout=0.5, config=CONFIG, stop_after=stop_after
        )
        return await fuzzer.run(frames() if sent is None else sent)


async def test_citron_has_no_difference_from_the_model() -> None:
    report = await model_fuzz(Hub(RandomIds(), CONFIG))
    assert report.differences == [], report.differences[:3]  # type: ignore[attr-defined]
    states = await model_fuzz(Hub(RandomIds(), CONFIG), sent=state_frames())
    assert states.differences == [], states.differences[:3]  # type: ignore[attr-defined]
    assert report.compared > FRAMES  # type: ignore[attr-defined]
    kinds = report.kinds  # type: ignore[attr-defined]
    assert {"valid", "invalid", "legacy", "edge", "state", "fence"} <= set(kinds)


def test_most_broken_rules_are_seen() -> None:
    assert set(UNSEEN) <= set(BROKEN)
    assert len(BROKEN) - len(UNSEEN) >= 46


def test_frames_are_the_same_for_a_seed_and_reach_every_kind() -> None:
    again = ModelFuzzer("ws://unused/ws", frames=FRAMES, seed=SEED).frames_to_send()
    assert again == frames()
    assert {kind for kind, _, _ in again} == {"valid", "invalid", "legacy", "edge", "state"}
    assert {role for _, role, _ in again} == set(Role)


async def test_a_server_that_stops_reading_ends_the_run_with_a_difference() -> None:
    """A peer that never reads: the fuzzer does not hang on its send."""
    import asyncio

    from websockets.asyncio.server import serve

    done = asyncio.Event()

    async def never_reads(ws: object) -> None:
        await done.wait()

    async with serve(
        never_reads, "127.0.0.1", 0, max_queue=1, max_size=None, close_timeout=0.5
    ) as server:
        port = server.sockets[0].getsockname()[1]
        big = "API:get_runners:" + json.dumps({"req": "r", "pad": "x" * 500_000})
        fuzzer = ModelFuzzer(f"ws://127.0.0.1:{port}/ws", timeout=0.2, stop_after=10**6)
        try:
            report = await asyncio.wait_for(fuzzer.run([("replay", Role.API, big)] * 200), 60)
        finally:
            done.set()
    assert fuzzer.stuck
    last = report.differences[-1]
    assert last.got == ["(unread after 0.2 s)"], (last, report.steps)
    assert report.steps < 200


def test_normalizing_maps_ids_secrets_and_times_by_rank() -> None:
    server, model = Normal(), Normal()
    a = server.frame('ready:{"runner": "r-9f", "protocol": 1, "session": "x' + "s" * 31 + '"}')
    b = model.frame('ready:{"runner": "runner-1", "protocol": 1, "session": "' + "t" * 32 + '"}')
    assert a == b
    assert server.frame('error:{"code": "no_build", "message": "b-1 is gone"}') == model.frame(
        'error:{"code": "no_build", "message": "other words"}'
    )
    t1 = '{"build": "b-1", "seq": 1, "log": "x", "time": "2026-12-08T01:02:03.004Z"}'
    t2 = '{"build": "build-7", "seq": 1, "log": "x", "time": "2030-01-01T00:00:00.000Z"}'
    assert server.frame("log:" + t1) == model.frame("log:" + t2)
    # A time that is not one, a short session: kept, and so a difference.
    bad = t1.replace(".004Z", ".004+00:00")
    assert Normal().frame("log:" + bad) != Normal().frame("log:" + t1)
    assert Normal().frame('ready:{"session": "short"}') != Normal().frame(
        'ready:{"session": "' + "l" * 16 + '"}'
    )


def test_cli_model_fuzz_passes_on_citron(server_factory: ServerFactory, tmp_path: Path) -> None:
    server = server_factory()
    result = citron(
        "fuzz", server.url, "--model", "--frames", "1000", "--seed", "5", "--json", timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    report = json.loads(result.stdout)
    assert report["differences"] == [] and report["compared"] > 1000
    # --replay FILE: these frames, in order.
    replay = tmp_path / "frames.txt"
    replay.write_text(
        "# a build, queued for a runner type nobody has, cancelled\n"
        'API:run:{"repo": "r", "script": [], "type": "nobody"}\n'
        "\n"
        "API:get_runners:\n"
    )
    again = citron("fuzz", server.url, "--model", "--replay", str(replay), timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "frames sent: 2 (replay 2)" in again.stdout
    bad = tmp_path / "bad.txt"
    bad.write_text("hello\n")
    refused = citron("fuzz", server.url, "--model", "--replay", str(bad))
    assert refused.returncode == 64 and "line 1: not ROLE:command:payload" in refused.stderr
    missing = citron("fuzz", server.url, "--model", "--replay", str(tmp_path / "none.txt"))
    assert missing.returncode == 64 and "none.txt" in missing.stderr
    assert "Traceback" not in missing.stderr
    # A frame the transport refuses before the hub sees it is counted, not sent.
    big = tmp_path / "big.txt"
    big.write_text("API:get_runners:" + "x" * (600 * 1024) + "\nAPI:get_runners:\n")
    counted = citron("fuzz", server.url, "--model", "--replay", str(big), timeout=120)
    assert counted.returncode == 0, counted.stdout + counted.stderr
    assert "replay 1, replay not sent (binary or over 512 KiB) 1" in counted.stdout
    negative = citron("conformance", server.url, "--model", "-1")
    assert negative.returncode == 64 and "--model -1" in negative.stderr
