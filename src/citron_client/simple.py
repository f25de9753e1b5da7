"""The simple runner: clone the repository, run each script line in bash.

For each build: a fresh working directory; ``git clone`` of ``repo`` (and a
checkout of ``ref``); then each script line in order with ``bash -c``, with
the build's ``env`` and ``secrets``, stopping at the first line that fails.
stdout and stderr are merged and streamed live: a chunk at least every
100 ms while output flows, at most 64 KiB each, decoded incrementally as UTF-8
(invalid bytes become U+FFFD). Cancel and timeout send SIGTERM to the line's
whole process group, then SIGKILL after a grace period; every process group a
build started is killed when it ends.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from citron_protocol import Run
from citron_protocol.sections import section_line

from .runner import BuildContext, Runner

__all__ = ["MAX_CHUNK", "SimpleRunner"]

MAX_CHUNK = 64 * 1024  # bytes of UTF-8 per log chunk
FLUSH_EVERY = 0.1  # seconds
KILL_GRACE = 10.0  # seconds between SIGTERM and SIGKILL


class _Stop(Exception):
    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _split_utf8(text: str, limit: int) -> tuple[str, str]:
    """The longest prefix of ``text`` of at most ``limit`` UTF-8 bytes, and the rest."""
    if len(text) * 4 <= limit or len(text.encode("utf-8", "surrogatepass")) <= limit:
        return text, ""
    head = text.encode("utf-8", "surrogatepass")[:limit].decode("utf-8", "ignore")
    return head, text[len(head) :]


async def _head(checkout: str, env: dict[str, str]) -> str | None:
    """The full id of the commit checked out in ``checkout``; None if git
    cannot say."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "git",
            "rev-parse",
            "HEAD",
            cwd=checkout,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await proc.communicate()
    except OSError:
        return None
    commit = out.decode("ascii", "replace").strip()
    if proc.returncode != 0 or not commit or len(commit) > 64:
        return None
    return commit


class SimpleRunner(Runner):
    """Runs builds as the original ci-tron runner does, in a shell."""

    def __init__(
        self,
        type: str = "simple",
        name: str | None = None,
        workdir: str | None = None,
        keep: bool = False,
        kill_grace: float = KILL_GRACE,
    ) -> None:
        self.type = type
        self.name = name
        self.workdir = workdir
        self.keep = keep
        self.kill_grace = kill_grace

    async def run(self, build: Run, ctx: BuildContext) -> bool:
        if self.workdir:
            Path(self.workdir).mkdir(parents=True, exist_ok=True)
        root = tempfile.mkdtemp(prefix=f"citron-{build.build or 'build'}-", dir=self.workdir)
        deadline = time.monotonic() + build.timeout if build.timeout else None
        env = {**os.environ, **(build.env or {}), **(build.secrets or {})}
        groups: list[int] = []
        try:
            checkout = os.path.join(root, "src")
            steps: list[tuple[str, list[str], str]] = [
                (f"$ git clone {build.repo}", ["git", "clone", "--", build.repo, checkout], root)
            ]
            if build.ref:
                steps.append(
                    (f"$ git checkout {build.ref}", ["git", "checkout", "-q", build.ref], checkout)
                )
            checked_out = len(steps)  # the steps that fetch the source come first
            steps += [(f"$ {line}", ["bash", "-c", line], checkout) for line in build.script]
            for i, (echo, argv, cwd) in enumerate(steps):
                if i == checked_out:
                    ctx.commit = await _head(checkout, env)
                ctx.log(section_line(echo))
                code = await self._step(argv, cwd, env, ctx, deadline, groups)
                if code != 0:
                    ctx.exit_code = code
                    ctx.log(f"[citron-runner] exited with code {code}\n")
                    return False
            if ctx.commit is None:  # (an empty script)
                ctx.commit = await _head(checkout, env)
            ctx.exit_code = 0
            return True
        except _Stop as stop:
            ctx.log(f"\n[citron-runner] {stop.why}\n")
            return False
        finally:
            await self._kill_groups(groups)
            if not self.keep:
                shutil.rmtree(root, ignore_errors=True)

    async def _step(
        self,
        argv: list[str],
        cwd: str,
        env: dict[str, str],
        ctx: BuildContext,
        deadline: float | None,
        groups: list[int],
    ) -> int:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group, to kill it whole
            )
        except OSError as exc:
            ctx.log(f"[citron-runner] cannot start {argv[0]}: {exc.strerror or exc}\n")
            return 127
        groups.append(proc.pid)
        pump = asyncio.create_task(self._pump(proc, ctx))
        waiting = asyncio.create_task(proc.wait())
        cancelled = asyncio.create_task(ctx.wait_cancelled())
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
        try:
            done, _ = await asyncio.wait(
                {waiting, cancelled}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if waiting not in done:
                why = "cancelled" if cancelled in done else "timed out"
                await self._terminate(proc)
                await self._drain(pump)
                raise _Stop(why)
            await self._drain(pump)
            return waiting.result()
        finally:
            cancelled.cancel()
            waiting.cancel()

    async def _drain(self, pump: asyncio.Task[None]) -> None:
        """Let the pump read what is left; a background process may hold the
        pipe open, so give up after a moment."""
        try:
            await asyncio.wait_for(asyncio.shield(pump), 0.5)
        except TimeoutError:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _pump(self, proc: asyncio.subprocess.Process, ctx: BuildContext) -> None:
        assert proc.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        last = time.monotonic()
        try:
            while True:
                await ctx.room()  # (protocol 2: no more than a window ahead of the server)
                try:
                    data = await asyncio.wait_for(proc.stdout.read(MAX_CHUNK), FLUSH_EVERY)
                except TimeoutError:
                    data = None
                if data == b"":
                    break
                if data:
                    pending += decoder.decode(data)
                while len(pending) * 4 > MAX_CHUNK and len(pending.encode()) > MAX_CHUNK:
                    head, pending = _split_utf8(pending, MAX_CHUNK)
                    ctx.log(head)
                    last = time.monotonic()
                if pending and time.monotonic() - last >= FLUSH_EVERY:
                    ctx.log(pending)
                    pending = ""
                    last = time.monotonic()
        finally:
            pending += decoder.decode(b"", final=True)
            while pending:
                head, pending = _split_utf8(pending, MAX_CHUNK)
                ctx.log(head)

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM to the process group, SIGKILL after the grace period."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.kill_grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def _kill_groups(self, groups: list[int]) -> None:
        """Nothing a build started outlives it: end every group it made."""
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
        if groups:
            await asyncio.sleep(0.05)
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
