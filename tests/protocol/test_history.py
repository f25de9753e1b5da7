"""The hub's working set: finished builds beyond the window leave memory and
are read back from the store; retention; the JSON snapshot and what it
refuses."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import pathlib
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from citron_protocol import BuildState, Hub, HubConfig, SnapshotError
from citron_protocol.hub import CountingIds

from ..helpers import Harness
from ..peers import builds_query

DONE = 'RUNNER:process:{"finished": true, "success": true}'
FAIL = 'RUNNER:process:{"finished": true, "success": false}'
LINE = 'RUNNER:process:{"finished": false, "log": "line %d\\n"}'


def finish_builds(h: Harness, runner: int, api: int, n: int, *, fail_every: int = 0) -> list[str]:
    """Submit and run ``n`` builds on ``runner``, one log line each."""
    out = []
    for i in range(n):
        h.now += 0.01  # (a backend's request budget is 200 a second)
        build = h.submit(api)
        h.recv(runner)
        h.send(runner, LINE % i)
        h.send(runner, FAIL if fail_every and i % fail_every == 0 else DONE)
        out.append(build)
    return out


def in_memory(h: Harness) -> int:
    return sum(h.hub.build_counts().values())


def page_all(h: Harness, api: int, limit: int, state: str | None = None) -> list[str]:
    """Every build, newest first, by paging get_builds with before."""
    seen: list[str] = []
    before = ""
    while True:
        (reply,) = h.send(api, "API:get_builds:" + builds_query(limit, state, before))
        assert reply.COMMAND == "builds", reply
        ids = [b.id for b in reply.builds]
        seen += ids
        if len(ids) < limit and not reply.more:
            return seen
        before = ids[-1]


def test_memory_holds_the_window_and_the_store_the_rest() -> None:
    h = Harness(HubConfig(window=50))
    runner, api = h.runner(), h.connect()
    builds = finish_builds(h, runner, api, 20_000)
    assert in_memory(h) == 50
    assert len(h.store.builds) == 20_000
    # The store's copy of a build that left memory is whole: its counters too.
    oldest = h.store.builds[builds[0]]
    assert (oldest.state, oldest.log_seq, oldest.log_bytes) == (BuildState.SUCCESS, 1, 7)


def test_paging_with_before_lists_each_build_once_newest_first() -> None:
    h = Harness(HubConfig(window=7))
    runner, api = h.runner(), h.connect()
    done = finish_builds(h, runner, api, 60, fail_every=3)
    # Builds that stay live, older and newer than the window: a running one
    # and queued ones.
    running = h.submit(api)
    queued = [h.submit(api, extra=', "type": "none"') for _ in range(3)]
    everything = [*reversed(done), running][::-1]
    expected = list(reversed([*done, running, *queued]))
    assert everything  # (done then running: numbers ascending)
    for limit in (1, 4, 7, 50, 1000):
        assert page_all(h, api, limit) == expected
    failed = [b for i, b in enumerate(done) if i % 3 == 0]
    assert page_all(h, api, 5, "failure") == list(reversed(failed))
    assert page_all(h, api, 5, "queued") == list(reversed(queued))
    assert page_all(h, api, 5, "running") == [running]


def test_an_old_build_and_its_log_come_from_the_store() -> None:
    h = Harness(HubConfig(window=3))
    runner, api = h.runner(), h.connect()
    oldest, *_ = finish_builds(h, runner, api, 20)
    (reply,) = h.send(api, f'API:get_build:{{"build": "{oldest}", "req": "g"}}')
    assert (reply.COMMAND, reply.build.id, reply.build.state, reply.req) == (
        "build",
        oldest,
        BuildState.SUCCESS,
        "g",
    )
    web = h.connect()
    frames = h.send(web, f'WEB:subscribe:{{"build": "{oldest}", "from": 0}}')
    assert [f.COMMAND for f in frames] == ["subscribed", "log", "state"]
    assert frames[1].log == "line 0\n" and frames[2].build.state is BuildState.SUCCESS
    (unsubscribed,) = h.send(web, f'WEB:unsubscribe:{{"build": "{oldest}"}}')
    assert unsubscribed.COMMAND == "unsubscribed"
    (error,) = h.send(api, f'API:cancel:{{"build": "{oldest}"}}')
    assert error.code == "bad_state"


def test_unknown_builds_are_answered_from_the_store_without_counting_errors() -> None:
    h = Harness(HubConfig(window=1, max_errors=3))
    runner, api = h.runner(), h.connect()
    finish_builds(h, runner, api, 5)
    for _ in range(10):  # more than max_errors: asked of the store, not held against it
        (error,) = h.send(api, 'API:get_build:{"build": "nope", "req": "x"}')
        assert (error.code, error.req) == ("unknown_build", "x")
    (error,) = h.send(api, 'API:get_builds:{"before": "nope"}')
    assert error.code == "unknown_build"
    web = h.connect()
    (error,) = h.send(web, 'WEB:subscribe:{"build": "nope"}')
    assert error.code == "unknown_build"
    (error,) = h.send(web, 'WEB:unsubscribe:{"build": "nope"}')
    assert error.code == "unknown_build"
    assert api not in h.closed and web not in h.closed


def test_a_restart_loads_only_the_live_builds() -> None:
    h = Harness(HubConfig(window=10))
    runner, api = h.runner(), h.connect()
    done = finish_builds(h, runner, api, 100)
    queued = h.submit(api, extra=', "type": "none"')
    h.restart()
    assert in_memory(h) == 1
    api = h.connect()
    assert page_all(h, api, 30) == [queued, *reversed(done)]
    # Numbers go on from the store's highest: the new build is the newest.
    latest = h.submit(api)
    (reply,) = h.send(api, f'API:get_build:{{"build": "{latest}"}}')
    assert reply.build.id not in done
    assert page_all(h, api, 30)[0] == latest


def test_a_store_that_cannot_be_read_answers_unavailable() -> None:
    h = Harness(HubConfig(window=1))
    runner, api = h.runner(), h.connect()
    first, *_ = finish_builds(h, runner, api, 3)
    fx = h.hub.receive(api, f'API:get_build:{{"build": "{first}", "req": "r"}}', h.now)
    (find,) = fx.finds
    fx = h.hub.builds_found(find.request, None, h.now, failed="disk I/O error")
    h.apply(fx)
    (error,) = h.recv(api)
    assert (error.code, error.req) == ("unavailable", "r") and "disk I/O error" in error.message


def test_retention_drops_old_builds_from_memory() -> None:
    h = Harness(HubConfig(window=100, retention=3600))
    runner, api = h.runner(), h.connect()
    old = finish_builds(h, runner, api, 5)
    h.advance(1800)
    new = finish_builds(h, runner, api, 5)
    h.advance(1900)  # the first five finished 3700 s ago, the others 1900 s ago
    assert in_memory(h) == 5
    h.store.purge(h.now - 3600, 100)
    assert page_all(h, api, 50) == list(reversed(new))
    (error,) = h.send(api, f'API:get_build:{{"build": "{old[0]}"}}')
    assert error.code == "unknown_build"


# -- the snapshot's format -------------------------------------------------------------


def busy_hub() -> Harness:
    h = Harness(HubConfig(window=4))
    runner, api = h.runner(), h.connect()
    finish_builds(h, runner, api, 10)
    h.send(api, 'API:run:{"repo": "r", "script": ["x"], "secrets": {"T": "abcdef"}}')
    h.send(api, 'API:run:{"repo": "r", "script": ["x"], "type": "t"}')
    h.runner("other")
    return h


def test_a_snapshot_is_versioned_json_and_round_trips() -> None:
    h = busy_hub()
    data = h.hub.snapshot()
    outer = json.loads(data)
    assert (outer["format"], outer["version"]) == ("citron-hub", 2)
    copy_ = Hub.from_snapshot(data, copy.deepcopy(h.ids), h.config)
    assert copy_.snapshot() == data
    assert copy_.build_counts() == h.hub.build_counts()


def tampered(data: bytes, change: object) -> bytes:
    """``data`` with its content changed by ``change`` and the digest made
    to match again (as someone with write access to Redis could)."""
    outer = json.loads(data)
    content = json.loads(outer["hub"])
    change(content)  # type: ignore[operator]
    outer["hub"] = json.dumps(content)
    outer["sha256"] = hashlib.sha256(outer["hub"].encode()).hexdigest()
    return json.dumps(outer).encode()


def _drop_conns(c: dict) -> None:  # type: ignore[type-arg]
    c["conns"] = []


def _bad_state(c: dict) -> None:  # type: ignore[type-arg]
    c["builds"][0]["record"]["state"] = "exploded"


def _extra_field(c: dict) -> None:  # type: ignore[type-arg]
    c["builds"][0]["__reduce__"] = "os.system"


def _wrong_type(c: dict) -> None:  # type: ignore[type-arg]
    c["number"] = "12"


def _waiting_ghost(c: dict) -> None:  # type: ignore[type-arg]
    c["waiting"].append("r-ghost")


def _bad_init(c: dict) -> None:  # type: ignore[type-arg]
    c["runners"][0]["init"] = "API:run:{}"


@pytest.mark.parametrize(
    "change",
    [_drop_conns, _bad_state, _extra_field, _wrong_type, _waiting_ghost, _bad_init],
)
def test_tampered_content_is_refused(change: object) -> None:
    h = busy_hub()
    with pytest.raises(SnapshotError, match="does not check out"):
        Hub.from_snapshot(tampered(h.hub.snapshot(), change), CountingIds())


def test_a_changed_byte_or_another_version_is_refused() -> None:
    data = busy_hub().hub.snapshot()
    outer = json.loads(data)
    outer["hub"] = outer["hub"].replace('"number":', '"number": ', 1)
    with pytest.raises(SnapshotError, match="digest"):
        Hub.from_snapshot(json.dumps(outer).encode(), CountingIds())
    outer = json.loads(data)
    outer["version"] = 3
    with pytest.raises(SnapshotError, match="version 3"):
        Hub.from_snapshot(json.dumps(outer).encode(), CountingIds())
    with pytest.raises(SnapshotError, match="not a citron hub snapshot"):
        Hub.from_snapshot(b'{"format": "other"}', CountingIds())


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (pathlib.Path("/tmp/citron-pickle-ran").touch, ())  # type: ignore[return-value]


def test_a_pickle_is_refused_and_never_run(tmp_path: pathlib.Path) -> None:
    marker = pathlib.Path("/tmp/citron-pickle-ran")
    marker.unlink(missing_ok=True)
    evil = pickle.dumps(_Boom())
    for data in (evil, base64.b64encode(evil)):
        with pytest.raises(SnapshotError, match="pickle"):
            Hub.from_snapshot(data, CountingIds())
    assert not marker.exists()


def test_no_pickle_in_the_sources() -> None:
    src = pathlib.Path(__file__).parents[2] / "src"
    users = [
        str(p.relative_to(src))
        for p in src.rglob("*.py")
        if "import pickle" in p.read_text() or "from pickle" in p.read_text()
    ]
    assert users == []
    assert (src / "citron_protocol" / "hub.py").is_file()  # the walk found the sources


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(1, 12))
def test_paging_matches_the_store_whatever_the_window(window: int, n: int, limit: int) -> None:
    h = Harness(HubConfig(window=window))
    runner, api = h.runner(), h.connect()
    done = finish_builds(h, runner, api, n)
    live = h.submit(api, extra=', "type": "none"')
    assert page_all(h, api, limit) == [live, *reversed(done)]
    assert in_memory(h) == min(window, n) + 1


def resealed(data: bytes, body: str) -> bytes:
    """``data`` with its content text replaced and the digest made to match."""
    outer = json.loads(data)
    outer["hub"] = body
    outer["sha256"] = hashlib.sha256(body.encode()).hexdigest()
    return json.dumps(outer).encode()


def test_nan_and_deep_nesting_are_refused() -> None:
    data = busy_hub().hub.snapshot()
    body = json.loads(data)["hub"]
    with pytest.raises(SnapshotError, match="NaN"):
        Hub.from_snapshot(
            resealed(data, body.replace('"now":', '"now":NaN,"was":', 1)), CountingIds()
        )
    content = json.loads(body)
    content["conns"][0]["id"] = "PLACEHOLDER"
    deep = json.dumps(content).replace('"PLACEHOLDER"', "[" * 5000 + "0" + "]" * 5000)
    with pytest.raises(SnapshotError, match="does not check out"):
        Hub.from_snapshot(resealed(data, deep), CountingIds())
    with pytest.raises(SnapshotError, match="not JSON"):
        Hub.from_snapshot(b"[" * 100_000, CountingIds())
