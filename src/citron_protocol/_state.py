"""The hub's records: builds, runners and subscriptions, and the one place
a build and a runner are tied to each other.

Records refer to each other directly in memory; :mod:`._snapshot` writes
them out by id. ``build.runner`` and ``runner.build`` change only through
:func:`link` and :func:`unlink`, so they always agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from datetime import UTC, datetime

import attrs

from ._session import Session
from .messages import BuildInfo, BuildState, RunnerInfo, RunnerInit, RunnerState
from .records import BuildRecord

ConnId = Hashable


@attrs.define(eq=False)
class Sub:
    """A connection following one build's log."""

    conn: Session
    build: Build
    after: int  # the last seq sent (or skipped by ``from``)
    until: int = 0  # while replaying: the last seq that comes from the store
    pending: list[tuple[int, str]] | None = None  # while replaying: live frames held back
    request: int | None = None  # while replaying: the page asked of the host


@attrs.define(eq=False)
class Runner:
    id: str
    conn: Session
    init: RunnerInit
    session: str
    state: RunnerState | None = None
    build: Build | None = None  # see link()

    def info(self) -> RunnerInfo:
        assert self.state is not None
        return RunnerInfo(
            id=self.id,
            type=self.init.type,
            name=self.init.name,
            state=self.state,
            build=self.build.id if self.build else None,
        )


@attrs.define(eq=False)
class Build:
    record: BuildRecord  # as last saved; the log counters below are newer
    runner: Runner | None = None  # the registration running it, if connected; see link()
    subs: dict[ConnId, Sub] = attrs.Factory(dict)
    queue_order: int = 0
    windowed: bool = False  # finished, and counted in the hub's window
    secrets: dict[str, str] | None = None  # never persisted
    # Counters that change with every chunk, kept out of the frozen record.
    log_seq: int = 0
    log_bytes: int = 0
    run_seq: int = 0

    @classmethod
    def of(cls, record: BuildRecord, secrets: dict[str, str] | None = None) -> Build:
        return cls(
            record=record,
            secrets=secrets,
            log_seq=record.log_seq,
            log_bytes=record.log_bytes,
            run_seq=record.run_seq,
        )

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def state(self) -> BuildState:
        return self.record.state

    def info(self) -> BuildInfo:
        r = self.record
        return BuildInfo(
            id=r.id,
            state=r.state,
            repo=r.repo,
            script=r.script,
            type=r.type,
            ref=r.ref,
            runner=r.runner,
            attempt=r.attempt,
            created=rfc3339(r.created),
            started=rfc3339(r.started) if r.started is not None else None,
            finished=rfc3339(r.finished) if r.finished is not None else None,
            success=r.success,
            log_seq=self.log_seq,
            log_bytes=self.log_bytes,
            truncated=r.truncated,
            commit=r.commit,
            exit_code=r.exit_code,
            steps=r.steps,
        )


def link(build: Build, runner: Runner) -> None:
    """``runner`` runs ``build``: the one place the two are tied."""
    unlink(build)
    if runner.build is not None:
        unlink(runner.build)
    build.runner, runner.build = runner, build


def unlink(build: Build) -> Runner | None:
    """``build`` and its runner part (both sides); the runner, if any."""
    runner = build.runner
    if runner is not None and runner.build is build:
        runner.build = None
    build.runner = None
    return runner


def rfc3339(t: float) -> str:
    """Seconds since the epoch as an RFC 3339 UTC string (millisecond precision)."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
