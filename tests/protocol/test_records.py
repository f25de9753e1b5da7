"""Records: the fast LogRecord and the reference MemoryStore."""

from __future__ import annotations

import copy
import pickle

import attrs
import pytest

from citron_protocol import BuildState
from citron_protocol.records import BuildRecord, FindBuilds, LogRecord, MemoryStore, log_record


def test_the_fast_log_record_is_an_ordinary_log_record() -> None:
    fast = log_record("b", 3, "text\n", 1, 2, 5)
    slow = LogRecord(build="b", seq=3, log="text\n", attempt=1, run_seq=2, size=5)
    assert type(fast) is LogRecord
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
    assert pickle.loads(pickle.dumps(fast)) == slow
    assert copy.copy(fast) == slow and attrs.evolve(fast, seq=4).seq == 4
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        fast.seq = 9  # type: ignore[misc]


def test_the_memory_store_finds_and_purges() -> None:
    store = MemoryStore()
    for n in range(1, 11):
        state = BuildState.QUEUED if n % 4 == 0 else BuildState.SUCCESS
        store.apply(
            [
                BuildRecord(
                    id=f"b{n}",
                    number=n,
                    state=state,
                    repo="r",
                    script=(),
                    created=float(n),
                    finished=float(n) if state.finished else None,
                ),
                LogRecord(build=f"b{n}", seq=1, log="x", attempt=1, run_seq=1, size=1),
            ]
        )
    assert store.max_number() == 10
    assert [b.id for b in store.load_builds()] == ["b4", "b8"]
    page = store.find_builds(FindBuilds(request=1, conn=1, before=9, limit=3)) or []
    assert [b.number for b in page] == [8, 7, 6]
    assert store.find_builds(FindBuilds(request=1, conn=1, build="b11")) is None
    assert store.purge(5.5, 100) == 4  # b1, b2, b3, b5: finished before 5.5
    assert sorted(store.builds) == sorted(f"b{n}" for n in (4, 6, 7, 8, 9, 10))
    assert "b1" not in store.logs and "b4" in store.logs
