"""The content of a hub snapshot: the hub's records, written by id, as
plain attrs classes that one strict cattrs converter turns into JSON and
back (see :meth:`Hub.snapshot <citron_protocol.hub.Hub.snapshot>`).
Nothing in it can run code: every value is checked for its exact type,
and unknown fields are refused."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import attrs
import cattrs

from .errors import SnapshotError, UsageError
from .messages import BuildState, StepState
from .records import BuildRecord

ConnId = Hashable


@attrs.frozen(kw_only=True)
class ConnState:
    id: Any  # str, int, or a list of them (a tuple id)
    roles: list[str]
    role: str | None
    errors: list[float]
    closing: bool
    tokens: float
    refilled: float


@attrs.frozen(kw_only=True)
class RunnerRecord:
    id: str
    conn: Any
    init: str  # its RUNNER:init frame
    session: str
    state: str | None


@attrs.frozen(kw_only=True)
class BuildEntry:
    record: BuildRecord
    runner: str | None
    queue_order: int
    secrets: dict[str, str] | None
    log_seq: int
    log_bytes: int
    run_seq: int


@attrs.frozen(kw_only=True)
class HubState:
    now: float
    counter: int
    number: int
    evicted: int
    evictions: int
    next_expiry: float
    conns: list[ConnState]
    runners: list[RunnerRecord]
    waiting: list[str]  # waiting runners, longest first
    builds: list[BuildEntry]
    deadlines: dict[str, float]


converter = cattrs.Converter(forbid_extra_keys=True)


def _strict(kind: type[Any]) -> Callable[[Any, Any], Any]:
    """Take a JSON value only of exactly ``kind`` (cattrs would convert)."""

    def structure(value: Any, _: Any) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if type(value) is not kind:
            raise TypeError(f"{value!r} is not a {kind.__name__}")
        return value

    return structure


for _kind in (str, int, float, bool):
    converter.register_structure_hook(_kind, _strict(_kind))
converter.register_structure_hook(Any, lambda value, _: value)
converter.register_structure_hook(BuildState, lambda value, _: BuildState(value))
converter.register_structure_hook(StepState, lambda value, _: StepState(value))


def check_conn_id(value: Any) -> None:
    if isinstance(value, tuple):
        for item in value:
            check_conn_id(item)
    elif type(value) not in (str, int):
        raise UsageError(f"connection id {value!r}: a snapshot takes str, int or tuples of them")


def conn_id_of(value: Any) -> ConnId:
    """A connection id from JSON: lists were tuples."""
    if isinstance(value, list):
        return tuple(conn_id_of(item) for item in value)
    if type(value) not in (str, int):
        raise SnapshotError(f"hub snapshot content does not check out: connection id {value!r}")
    return value  # type: ignore[no-any-return]


def no_constant(name: str) -> Any:
    """JSON's ``NaN`` and ``Infinity`` are no value of a hub's state."""
    raise ValueError(f"{name} is not a number a snapshot holds")
