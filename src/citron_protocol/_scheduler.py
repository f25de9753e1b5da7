"""Which build goes to which runner: the queue and the waiting runners.

Builds wait in FIFO order, untyped ones for any runner and typed ones for
runners of their type; runners wait longest first. The scheduler holds
those orders and answers the two questions of dispatch: which waiting
runner takes a build just queued, and which queued build a runner just
freed takes. It changes no state of a build or a runner: the hub does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._state import Build, Runner


class Scheduler:
    """The queue (by type) and the waiting runners (by type)."""

    def __init__(self) -> None:
        self.order = 0  # the last queue order given (a build's place in the queue)
        self._queue_any: dict[str, Build] = {}  # queued builds without a type
        self._queue_typed: dict[str, dict[str, Build]] = {}  # type -> queued builds
        self._waiting_any: dict[str, Runner] = {}  # waiting runners, longest first
        self._waiting_typed: dict[str, dict[str, Runner]] = {}

    # -- builds ----------------------------------------------------------------------

    def enqueue(self, build: Build, *, order: int | None = None) -> None:
        """Queue ``build`` at the end (or at ``order``, restoring a queue
        given in order)."""
        if order is None:
            self.order += 1
            order = self.order
        build.queue_order = order
        t = build.record.type
        queue = self._queue_any if t is None else self._queue_typed.setdefault(t, {})
        queue[build.id] = build

    def dequeue(self, build: Build) -> None:
        t = build.record.type
        if t is None:
            self._queue_any.pop(build.id, None)
            return
        queue = self._queue_typed.get(t, {})
        queue.pop(build.id, None)
        if not queue:
            self._queue_typed.pop(t, None)

    def depth(self) -> int:
        """Builds waiting for a runner."""
        return len(self._queue_any) + sum(len(q) for q in self._queue_typed.values())

    # -- runners ---------------------------------------------------------------------

    def wait(self, runner: Runner) -> None:
        """``runner`` waits for a build, after every runner waiting already."""
        self._waiting_any[runner.id] = runner
        self._waiting_typed.setdefault(runner.init.type, {})[runner.id] = runner

    def unwait(self, runner: Runner) -> None:
        self._waiting_any.pop(runner.id, None)
        typed = self._waiting_typed.get(runner.init.type, {})
        typed.pop(runner.id, None)
        if not typed:
            self._waiting_typed.pop(runner.init.type, None)

    def waiting(self) -> list[str]:
        """The waiting runners' ids, longest first."""
        return list(self._waiting_any)

    def is_waiting(self, runner: Runner) -> bool:
        return runner.id in self._waiting_any

    # -- dispatch --------------------------------------------------------------------

    def runner_for(self, build: Build) -> Runner | None:
        """The waiting runner that takes ``build``: the longest waiting of
        its type (any runner for an untyped build)."""
        t = build.record.type
        pool = self._waiting_any if t is None else self._waiting_typed.get(t)
        return next(iter(pool.values())) if pool else None

    def build_for(self, runner: Runner) -> Build | None:
        """The queued build ``runner`` takes: the oldest it can run."""
        candidates = []
        if self._queue_any:
            candidates.append(next(iter(self._queue_any.values())))
        typed = self._queue_typed.get(runner.init.type)
        if typed:
            candidates.append(next(iter(typed.values())))
        return min(candidates, key=lambda b: b.queue_order) if candidates else None
