"""Run a build's script as docs/protocol.md §5.7 says a ``run:`` means.

:func:`run_script` runs the script's lines in order in **one** ``bash``
process with ``set -eo pipefail`` in effect: a line's ``cd``, ``export``,
variables and functions carry over to the next line; the first command that
fails, a failing element of a pipe included, ends the script, and that
line's status is the build's ``exit_code``; no later line runs. A line
whose status is not 0 while the user turned errexit off (``set +e``) is a
failed step, and the script goes on. The build ends when its shell exits:
what it left running in the background is then ended (SIGTERM, SIGKILL
after a grace period) and the log says so. Cancel and timeout end the whole
session the same way.

Each line gets its own log section (``::group::$ LINE``) and a
:class:`~citron_protocol.Step` with its state, exit status and duration, so
a custom runner has the same semantics in one call::

    from citron_client import BuildContext, Runner
    from citron_client.shell import run_script

    class MyRunner(Runner):
        async def run(self, build, ctx: BuildContext) -> bool:
            checkout = await prepare(build)          # your own
            result = await run_script(build.script, ctx, cwd=checkout)
            return result.success                    # ctx.steps, ctx.exit_code set

How: the lines are written to a script file, each as ``eval 'LINE'``
between two marker lines that the shell prints to the output pipe (on a
descriptor of its own, so a line that redirects its stdout does not lose
them). The markers carry a random token, the line's index, its status and
the shell's clock (``$EPOCHREALTIME``); the reader takes them out of the
output and puts the section titles in their place, so each line's output is
under its title whatever the timing. Output is streamed live: a chunk at
least every 100 ms while output flows, at most 64 KiB each, decoded
incrementally as UTF-8 (invalid bytes become U+FFFD).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import secrets
import signal
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs

from citron_protocol import Step, StepState
from citron_protocol.sections import section_line

from .runner import BuildContext

__all__ = [
    "FLUSH_EVERY",
    "KILL_GRACE",
    "MAX_CHUNK",
    "CommandResult",
    "ScriptResult",
    "run_command",
    "run_script",
]

MAX_CHUNK = 64 * 1024  # bytes of UTF-8 per log chunk
FLUSH_EVERY = 0.1  # seconds
KILL_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
#: Seconds the output of a finished session is read for before what holds
#: its pipe (a process that left the session) is no longer waited for.
DRAIN = 0.5
#: The descriptor the script's shell writes its markers to (a copy of its
#: stdout that the lines do not get).
MARKER_FD = 87
#: Seconds between two looks at whether the session's leader exited.
EXIT_POLL = 0.02
NOTICE = "[citron-runner]"


@attrs.frozen(kw_only=True)
class CommandResult:
    """How a process ended: ``status`` (its exit status; 128 + N when a
    signal N ended it; None when it was stopped), ``stopped`` ("cancelled",
    "timed out" or None), ``left_running`` (processes of its session
    still running when it ended, which were ended) and ``ended`` (when it
    exited or was stopped, seconds since the epoch; None if it never
    started)."""

    status: int | None
    stopped: str | None = None
    left_running: int = 0
    ended: float | None = None


@attrs.frozen(kw_only=True)
class ScriptResult:
    """What became of a script: ``success``, ``exit_code`` (the status of
    the line that ended it, 0 on success; None when it was stopped),
    ``steps`` (one per line), ``stopped`` and ``left_running`` as in
    :class:`CommandResult`."""

    success: bool
    exit_code: int | None
    steps: tuple[Step, ...]
    stopped: str | None = None
    left_running: int = 0


async def run_command(
    argv: Sequence[str],
    ctx: BuildContext,
    *,
    cwd: str,
    env: Mapping[str, str] | None = None,
    deadline: float | None = None,
    kill_grace: float = KILL_GRACE,
) -> CommandResult:
    """Run one command in a session of its own, its output (stdout and
    stderr merged) streamed to ``ctx.log``, until it exits, ``ctx`` is
    cancelled or ``deadline`` (a ``time.monotonic()`` value) passes; what
    it leaves running is ended. A command that cannot start has status 127
    and a notice in the log."""
    session = _Session(ctx, kill_grace, _Output(ctx, None, None))
    return await session.run(list(argv), cwd, env, deadline)


async def run_script(
    script: Sequence[str],
    ctx: BuildContext,
    *,
    cwd: str,
    env: Mapping[str, str] | None = None,
    deadline: float | None = None,
    kill_grace: float = KILL_GRACE,
    shell: str = "bash",
) -> ScriptResult:
    """Run ``script`` in one ``shell`` session in ``cwd`` (see the module's
    text). ``env`` is the whole environment (default: the runner's, with
    the build's ``env`` and ``secrets``); ``deadline`` is a
    ``time.monotonic()`` value. Sets ``ctx.steps`` and ``ctx.exit_code``,
    and writes a notice when a line fails, the build is stopped or
    processes were left running."""
    if env is None:
        build = ctx.build
        env = {**os.environ, **(build.env or {}), **(build.secrets or {})}
    token = "\x1b[citron-" + secrets.token_hex(8) + "]"
    tracker = _Steps(list(script))
    output = _Output(ctx, token, tracker.marker)
    fd, path = _script_file(script, token)
    try:
        session = _Session(ctx, kill_grace, output)
        ended = await session.run([shell, path], cwd, env, deadline)
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
    result = tracker.result(ended, ended.ended if ended.ended is not None else time.time())
    ctx.steps = result.steps
    ctx.exit_code = result.exit_code
    if result.stopped is None and not result.success:
        ctx.log(f"{NOTICE} exited with code {result.exit_code}\n")
    return result


def script_text(script: Sequence[str], token: str) -> str:
    """The shell script that runs ``script`` with its markers."""

    def marker(fields: str) -> str:
        return (
            f"builtin printf '%s{fields}:%s\\n' {_quote(token)} \"${{EPOCHREALTIME-}}\""
            f" >&{MARKER_FD}\n"
        )

    out = [f"exec {MARKER_FD}>&1\n", "set -eo pipefail\n"]
    for i, line in enumerate(script):
        out.append(marker(f"s:{i}"))
        out.append(f"builtin eval {_quote(line)} {MARKER_FD}>&-\n")
        # ($? is the line's status: printf's arguments are expanded first.)
        out.append(
            f"builtin printf '%se:{i}:%d:%s\\n' {_quote(token)} $?"
            f' "${{EPOCHREALTIME-}}" >&{MARKER_FD}\n'
        )
    return "".join(out)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _script_file(script: Sequence[str], token: str) -> tuple[int, str]:
    """The script in a private temporary file, open (bash reads a script as
    it runs it, so it stays until the session ends)."""
    fd, path = tempfile.mkstemp(prefix="citron-script-", suffix=".sh")
    os.write(fd, script_text(script, token).encode("utf-8", "surrogateescape"))
    return fd, path


class _Steps:
    """Each line's start, end and status, from the markers."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.started: dict[int, float] = {}
        self.ended: dict[int, tuple[int, float]] = {}
        self.last: int | None = None  # the last line started

    def marker(self, fields: list[str], now: float) -> str | None:
        """A marker's fields (``s:I:T`` or ``e:I:STATUS:T``); the text to put
        in its place in the log. A marker that does not parse is dropped."""
        try:
            kind, index = fields[0], int(fields[1])
            when = _clock(fields[-1], now)
            if not 0 <= index < len(self.script):
                return None
            if kind == "s" and len(fields) == 3:
                self.started[index] = when
                self.last = index
                return section_line(f"$ {self.script[index]}")
            if kind == "e" and len(fields) == 4 and index in self.started:
                self.ended[index] = (int(fields[2]), when)
        except (ValueError, IndexError):
            pass
        return None

    def result(self, ended: CommandResult, now: float) -> ScriptResult:
        """The script's result, from its markers and how its shell ended
        (``now``: when that was, which ends the line that was running)."""
        steps: list[Step] = []
        exit_code: int | None = 0
        success = ended.stopped is None
        for i in range(len(self.script)):
            if i not in self.started:
                steps.append(Step(state=StepState.SKIPPED))
                continue
            start = self.started[i]
            if i in self.ended:
                status, end = self.ended[i]
                state = StepState.PASSED if status == 0 else StepState.FAILED
                steps.append(Step(state=state, exit_code=status, duration=_span(start, end)))
                if status != 0 and i == self.last:  # the last line's status is the script's
                    exit_code, success = status, False
                continue
            # Started, not ended: the line that ended the script, or the one
            # running when it was stopped.
            span = _span(start, now)
            if ended.stopped is not None:
                state = StepState.CANCELLED if ended.stopped == "cancelled" else StepState.FAILED
                steps.append(Step(state=state, duration=span))
                continue
            status = ended.status if ended.status is not None else 1
            state = StepState.PASSED if status == 0 else StepState.FAILED
            steps.append(Step(state=state, exit_code=status, duration=span))
            exit_code, success = status, status == 0
        if ended.stopped is not None:
            return ScriptResult(
                success=False,
                exit_code=None,
                steps=tuple(steps),
                stopped=ended.stopped,
                left_running=ended.left_running,
            )
        if success and ended.status != 0:  # an EXIT trap's own status, say
            exit_code, success = ended.status, False
        if not self.started and ended.status == 0 and self.script:
            exit_code, success = 1, False  # the shell never reached the first line
        return ScriptResult(
            success=success,
            exit_code=exit_code,
            steps=tuple(steps),
            left_running=ended.left_running,
        )


def _clock(text: str, fallback: float) -> float:
    """The shell's ``$EPOCHREALTIME`` (bash 5; a comma in some locales),
    or ``fallback`` when it has none."""
    try:
        value = float(text.replace(",", "."))
    except ValueError:
        return fallback
    return value if value > 0 else fallback


def _span(start: float, end: float) -> float:
    return round(max(end - start, 0.0), 3)


class _Output:
    """A session's output on its way to the log: markers taken out (and
    replaced by what ``on_marker`` returns, on a line of its own), the rest
    gathered into chunks."""

    def __init__(
        self,
        ctx: BuildContext,
        token: str | None,
        on_marker: Callable[[list[str], float], str | None] | None,
    ) -> None:
        self.ctx = ctx
        self.token = token
        self.on_marker = on_marker
        self.pending = ""  # text for the log, not sent yet
        self.held = ""  # what may be the start of a marker
        self.at_line_start = True
        self.last_sent = time.monotonic()

    def feed(self, text: str) -> None:
        if self.token is None:
            self._add(text)
            return
        text, self.held = self.held + text, ""
        token = self.token
        while text:
            at = text.find(token)
            if at < 0:
                keep = _partial_suffix(text, token)
                self._add(text[: len(text) - keep])
                self.held = text[len(text) - keep :]
                return
            self._add(text[:at])
            end = text.find("\n", at)
            if end < 0:
                self.held = text[at:]
                return
            fields = text[at + len(token) : end].split(":")
            assert self.on_marker is not None
            shown = self.on_marker(fields, time.time())
            if shown:
                if not self.at_line_start:
                    self._add("\n")
                self._add(shown)
            text = text[end + 1 :]

    def _add(self, text: str) -> None:
        if text:
            self.pending += text
            self.at_line_start = text.endswith("\n")

    def send(self, final: bool = False) -> None:
        """Send full chunks; everything (``final``, or when the last send
        is ``FLUSH_EVERY`` old)."""
        if final:
            self._add(self.held)
            self.held = ""
        while len(self.pending) * 4 > MAX_CHUNK and len(self.pending.encode()) > MAX_CHUNK:
            head, self.pending = _split_utf8(self.pending, MAX_CHUNK)
            self.ctx.log(head)
            self.last_sent = time.monotonic()
        if self.pending and (final or time.monotonic() - self.last_sent >= FLUSH_EVERY):
            self.ctx.log(self.pending)
            self.pending = ""
            self.last_sent = time.monotonic()


def _partial_suffix(text: str, token: str) -> int:
    """The length of the longest end of ``text`` that begins ``token``."""
    first = token[0]
    start = text.rfind(first, max(0, len(text) - len(token) + 1))
    while start >= 0:
        if token.startswith(text[start:]):
            return len(text) - start
        start = text.rfind(first, max(0, len(text) - len(token) + 1), start)
    return 0


def _split_utf8(text: str, limit: int) -> tuple[str, str]:
    """The longest prefix of ``text`` of at most ``limit`` UTF-8 bytes, and the rest."""
    if len(text) * 4 <= limit or len(text.encode("utf-8", "surrogatepass")) <= limit:
        return text, ""
    head = text.encode("utf-8", "surrogatepass")[:limit].decode("utf-8", "ignore")
    return head, text[len(head) :]


class _Session:
    """One process, leader of a session of its own, and everything it starts."""

    def __init__(self, ctx: BuildContext, kill_grace: float, output: _Output) -> None:
        self.ctx = ctx
        self.kill_grace = kill_grace
        self.output = output

    async def run(
        self,
        argv: list[str],
        cwd: str,
        env: Mapping[str, str] | None,
        deadline: float | None,
    ) -> CommandResult:
        ctx = self.ctx
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # a session and group of its own, to end it whole
            )
        except OSError as exc:
            ctx.log(f"{NOTICE} cannot start {argv[0]}: {exc.strerror or exc}\n")
            return CommandResult(status=127)
        leader = proc.pid
        pump = asyncio.create_task(self._pump(proc))
        waiting = asyncio.create_task(_exited(proc))
        cancelled = asyncio.create_task(ctx.wait_cancelled())
        stopped: str | None = None
        try:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
            done, _ = await asyncio.wait(
                {waiting, cancelled}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            ended = time.time()
            if waiting not in done:
                stopped = "cancelled" if cancelled in done else "timed out"
                await self._end_session(leader, waiting)
            left = await self._end_leftovers(leader)
            await self._drain(pump)
        finally:
            cancelled.cancel()
            if not waiting.done():  # (the runner itself is being cancelled)
                _signal_session(leader, signal.SIGKILL)
            waiting.cancel()
            if not pump.done():
                pump.cancel()
        if stopped is not None:
            ctx.log(f"\n{NOTICE} {stopped}\n")
        if left:
            ctx.log(f"{NOTICE} ended {left} process{'es' if left != 1 else ''} left running\n")
        status = waiting.result() if stopped is None else None
        if status is not None and status < 0:
            status = 128 - status  # ended by signal -status, as a shell says it
        return CommandResult(status=status, stopped=stopped, left_running=left, ended=ended)

    async def _end_session(self, leader: int, waiting: asyncio.Task[int]) -> None:
        """SIGTERM to the whole session, SIGKILL after the grace period."""
        _signal_session(leader, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiting), self.kill_grace)
        if not waiting.done():
            _signal_session(leader, signal.SIGKILL)
            await waiting

    async def _end_leftovers(self, leader: int) -> int:
        """End what the session left running; how many processes that was."""
        left = _session_members(leader)
        if left is None:  # no /proc: the group is all that can be found
            if not _signal_session(leader, signal.SIGTERM):
                return 0
            await asyncio.sleep(min(self.kill_grace, 1.0))
            _signal_session(leader, signal.SIGKILL)
            return 0
        if not left:
            return 0
        _signal_session(leader, signal.SIGTERM)
        give_up = time.monotonic() + self.kill_grace
        while time.monotonic() < give_up:
            await asyncio.sleep(0.05)
            if not _session_members(leader):
                return len(left)
        _signal_session(leader, signal.SIGKILL)
        await asyncio.sleep(0.05)
        return len(left)

    async def _drain(self, pump: asyncio.Task[None]) -> None:
        """Let the pump read what is left; a process that left the session may
        hold the pipe open, so give up after a moment."""
        try:
            await asyncio.wait_for(asyncio.shield(pump), DRAIN)
        except TimeoutError:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        output = self.output
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while True:
                await self.ctx.room()  # (protocol 2: no more than a window ahead of the server)
                try:
                    data = await asyncio.wait_for(proc.stdout.read(MAX_CHUNK), FLUSH_EVERY)
                except TimeoutError:
                    data = None
                if data == b"":
                    break
                if data:
                    output.feed(decoder.decode(data))
                output.send()
        finally:
            output.feed(decoder.decode(b"", final=True))
            output.send(final=True)


async def _exited(proc: asyncio.subprocess.Process) -> int:
    """The process's exit status, as soon as it exits. (``proc.wait()``
    also waits for its pipe to close, which a process it left running in
    the background may hold for ever.)"""
    while proc.returncode is None:
        await asyncio.sleep(EXIT_POLL)
    return proc.returncode


def _signal_session(leader: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to the session's process group and to every other
    process of the session; False if there was none."""
    sent = False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, sig)
        sent = True
    for pid in _session_members(leader) or ():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
            sent = True
    return sent


def _session_members(leader: int) -> list[int] | None:
    """The live processes of the session (or group) ``leader`` leads, read
    from /proc; None where there is no /proc."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...: comm may hold anything but ')'
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 4 or fields[0] in (b"Z", b"X"):
            continue
        if int(fields[2]) == leader or int(fields[3]) == leader:
            found.append(int(entry.name))
    return found
