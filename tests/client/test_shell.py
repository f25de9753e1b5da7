"""citron_client.shell: a script in one bash session (docs/protocol.md
§5.7.1), run for real in a temp directory, and the marker reader's
properties over any cut of its input."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from citron_client import BuildContext
from citron_client.shell import _Output, _Steps, run_command, run_script
from citron_protocol import Run, Step, StepState
from citron_protocol.sections import SECTION_START, section_line


class Log:
    def __init__(self) -> None:
        self.chunks: list[str] = []

    def __call__(self, text: str) -> None:
        self.chunks.append(text)

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def context(*script: str, **run: object) -> tuple[BuildContext, Log]:
    log = Log()
    build = Run(build="b-1", repo="file:///nowhere", script=script, **run)  # type: ignore[arg-type]
    return BuildContext(build, log), log


async def script(tmp_path: Path, *lines: str, **kw: object) -> tuple[object, str, BuildContext]:
    ctx, log = context(*lines)
    result = await run_script(lines, ctx, cwd=str(tmp_path), **kw)  # type: ignore[arg-type]
    ctx.close()
    return result, log.text, ctx


def states(result: object) -> list[str]:
    return [s.state.value for s in result.steps]  # type: ignore[attr-defined]


def codes(result: object) -> list[int | None]:
    return [s.exit_code for s in result.steps]  # type: ignore[attr-defined]


def running(tag: str) -> bool:
    return subprocess.run(["pgrep", "-f", tag], capture_output=True).returncode == 0


slow = pytest.mark.slow


@slow
async def test_a_pipe_that_hides_a_failure_fails(tmp_path: Path) -> None:
    (tmp_path / "t.sh").write_text("echo 'test 1 ok'\necho 'test 2 FAIL'\nexit 1\n")
    (tmp_path / "t.sh").chmod(0o755)
    result, text, ctx = await script(tmp_path, "./t.sh | tail -1", "echo next")
    assert not result.success and result.exit_code == 1  # type: ignore[attr-defined]
    assert states(result) == ["failed", "skipped"] and codes(result) == [1, None]
    assert "test 2 FAIL" in text and "next" not in text
    assert ctx.exit_code == 1 and ctx.steps == result.steps  # type: ignore[attr-defined]
    assert "[citron-runner] exited with code 1" in text


@slow
async def test_false_then_echo_stops_at_false(tmp_path: Path) -> None:
    result, text, _ = await script(tmp_path, "false; echo after")
    assert not result.success and result.exit_code == 1  # type: ignore[attr-defined]
    assert "after" not in text.replace("$ false; echo after", "")


@slow
async def test_state_carries_from_line_to_line(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    result, text, _ = await script(
        tmp_path,
        "cd sub && export FOO=1; BAR=2; greet() { echo hello-$1; }",
        'echo "in=$(basename "$PWD") FOO=$FOO BAR=$BAR"; greet you',
    )
    assert result.success, text  # type: ignore[attr-defined]
    assert "in=sub FOO=1 BAR=2\nhello-you\n" in text
    assert states(result) == ["passed", "passed"]


@slow
async def test_a_failing_middle_line_skips_the_rest(tmp_path: Path) -> None:
    result, text, _ = await script(tmp_path, "echo one", "exit 3", "echo never")
    assert result.exit_code == 3 and not result.success  # type: ignore[attr-defined]
    assert states(result) == ["passed", "failed", "skipped"]
    assert codes(result) == [0, 3, None]
    assert result.steps[2].duration is None  # type: ignore[attr-defined]
    assert all(s.duration is not None for s in result.steps[:2])  # type: ignore[attr-defined]
    # Each line that ran is a section, in order; the one that did not is absent.
    assert text.index(section_line("$ echo one")) < text.index("one\n", text.index("$ echo one\n"))
    assert section_line("$ exit 3") in text
    assert "never" not in text


@slow
async def test_passing_lines_and_their_times(tmp_path: Path) -> None:
    result, text, _ = await script(tmp_path, "echo fine | cat", "sleep 0.3", "true")
    assert result.success and result.exit_code == 0  # type: ignore[attr-defined]
    assert states(result) == ["passed"] * 3 and codes(result) == [0, 0, 0]
    durations = [s.duration for s in result.steps]  # type: ignore[attr-defined]
    assert durations[1] >= 0.3 and durations[0] < durations[1]
    assert "fine\n" in text and "exited with code" not in text


@slow
async def test_set_plus_e_is_the_users_choice(tmp_path: Path) -> None:
    result, _, _ = await script(tmp_path, "set +e", "false", "echo went on")
    assert result.success  # type: ignore[attr-defined]
    assert states(result) == ["passed", "failed", "passed"] and codes(result) == [0, 1, 0]
    # ... but the last line's status is the script's.
    last, _, _ = await script(tmp_path, "set +e", "false")
    assert not last.success and last.exit_code == 1  # type: ignore[attr-defined]
    # `cmd || true` keeps one command's failure from ending the build.
    kept, text, _ = await script(tmp_path, "false || true", "echo still")
    assert kept.success and "still\n" in text  # type: ignore[attr-defined]


@slow
async def test_exit_0_ends_the_script_as_a_success(tmp_path: Path) -> None:
    result, text, _ = await script(tmp_path, "echo a", "exit 0", "echo b")
    assert result.success and result.exit_code == 0  # type: ignore[attr-defined]
    assert states(result) == ["passed", "passed", "skipped"]
    assert "b\n" not in text.replace("$ echo b", "")


@slow
async def test_a_syntax_error_fails_its_line_only_when_it_runs(tmp_path: Path) -> None:
    result, text, _ = await script(tmp_path, "echo before", "if then", "echo after")
    assert states(result) == ["passed", "failed", "skipped"]
    assert result.exit_code == 2  # type: ignore[attr-defined]
    assert "syntax error" in text
    # A quote left open is confined to its line.
    quoted, _, _ = await script(tmp_path, "echo 'open", "echo fine")
    assert states(quoted) == ["failed", "skipped"]


@slow
async def test_lines_that_redirect_their_output_keep_their_steps(tmp_path: Path) -> None:
    result, text, _ = await script(
        tmp_path, "exec > out.txt", "echo hidden", "echo shown >&2", "exit 5"
    )
    assert states(result) == ["passed", "passed", "passed", "failed"]
    assert result.exit_code == 5  # type: ignore[attr-defined]
    assert (tmp_path / "out.txt").read_text() == "hidden\n"
    assert text.index("$ echo shown") < text.index("shown\n", text.index("$ echo shown >&2\n"))
    # The marker descriptor is not handed to the lines.
    listed, fds, _ = await script(tmp_path, "ls /proc/self/fd")
    assert listed.success and "\n87\n" not in fds  # type: ignore[attr-defined]


@slow
async def test_multi_line_lines_quotes_and_a_line_without_a_newline(tmp_path: Path) -> None:
    result, text, _ = await script(
        tmp_path, 'for i in 1 2; do\n  echo "it\'s $i"\ndone', "printf 'no newline'", "echo z"
    )
    assert result.success, text  # type: ignore[attr-defined]
    assert "it's 1\nit's 2\n" in text
    assert f"{SECTION_START}$ for i in 1 2; do …\n" in text
    # The section after output that ended mid-line starts on a line of its own.
    assert "no newline\n" + section_line("$ echo z") in text


@slow
async def test_output_that_looks_like_a_marker_is_output(tmp_path: Path) -> None:
    result, text, _ = await script(tmp_path, r"printf '\033[citron-0000000000000000]s:0:1\n'")
    assert result.success  # type: ignore[attr-defined]
    assert "\x1b[citron-0000000000000000]s:0:1\n" in text
    assert text.count(SECTION_START) == 1


@slow
async def test_the_build_ends_when_its_shell_does(tmp_path: Path) -> None:
    tag = "300.0417"
    started = time.monotonic()
    result, text, _ = await script(
        tmp_path, f"sleep {tag} & sleep {tag} & echo started", kill_grace=5.0
    )
    assert time.monotonic() - started < 5
    assert result.success and result.left_running == 2  # type: ignore[attr-defined]
    assert "started\n" in text and "[citron-runner] ended 2 processes left running" in text
    assert not running(f"sleep {tag}")


@slow
async def test_a_background_process_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    tag = "300.0418"
    started = time.monotonic()
    result, text, _ = await script(
        tmp_path,
        f"(trap '' TERM; echo bg-up; exec sleep {tag}) & sleep 0.2; exit 4",
        kill_grace=1.0,
    )
    took = time.monotonic() - started
    assert 1.0 <= took < 5  # the grace, then SIGKILL
    assert not result.success and result.exit_code == 4  # type: ignore[attr-defined]
    assert result.left_running == 1  # type: ignore[attr-defined]
    # The failing line's time ends when its shell did, not after the grace.
    assert 0.2 <= result.steps[0].duration < 0.9  # type: ignore[attr-defined]
    assert "bg-up" in text and "ended 1 process left running" in text
    assert not running(f"sleep {tag}")


@slow
async def test_timeout_and_cancel_end_the_whole_session(tmp_path: Path) -> None:
    tag = "300.0419"
    result, text, ctx = await script(
        tmp_path,
        "echo a",
        f"sleep {tag} & sleep {tag}",
        "echo never",
        deadline=time.monotonic() + 1.0,
        kill_grace=2.0,
    )
    assert not result.success and result.stopped == "timed out"  # type: ignore[attr-defined]
    assert result.exit_code is None and ctx.exit_code is None  # type: ignore[attr-defined]
    assert states(result) == ["passed", "failed", "skipped"]
    assert codes(result) == [0, None, None]
    assert "[citron-runner] timed out" in text
    assert not running(f"sleep {tag}")

    ctx2, log = context("echo a", f"sleep {tag}", "echo never")
    task = asyncio.create_task(run_script(ctx2.build.script, ctx2, cwd=str(tmp_path)))
    for _ in range(200):
        if running(f"sleep {tag}"):
            break
        await asyncio.sleep(0.02)
    ctx2.cancel()
    cancelled = await asyncio.wait_for(task, 15)
    assert cancelled.stopped == "cancelled" and not cancelled.success
    assert [s.state for s in cancelled.steps] == [
        StepState.PASSED,
        StepState.CANCELLED,
        StepState.SKIPPED,
    ]
    assert not running(f"sleep {tag}")
    assert "[citron-runner] cancelled" in log.text


@slow
async def test_a_shell_that_cannot_start(tmp_path: Path) -> None:
    result, text, _ = await script(tmp_path, "true", shell=str(tmp_path / "no-bash"))
    assert not result.success and result.exit_code == 127  # type: ignore[attr-defined]
    assert states(result) == ["skipped"]
    assert "cannot start" in text


@slow
async def test_secrets_and_env_reach_the_shell(tmp_path: Path) -> None:
    ctx, log = context('echo "$WHO $PASS"', env={"WHO": "me"}, secrets={"PASS": "hunter22"})
    result = await run_script(ctx.build.script, ctx, cwd=str(tmp_path))
    ctx.close()
    assert result.success and "me ***\n" in log.text and "hunter22" not in log.text


@slow
async def test_big_output_is_chunked_and_whole(tmp_path: Path) -> None:
    ctx, log = context("head -c 3000000 /dev/zero | tr '\\0' y", "echo end")
    result = await run_script(ctx.build.script, ctx, cwd=str(tmp_path))
    ctx.close()
    text = log.text
    assert result.success
    assert text.count("y") == 3_000_001 and text.endswith("end\n")  # (one in the title)
    assert max(len(c.encode()) for c in log.chunks) <= 64 * 1024
    assert len(log.chunks) >= 3_000_000 // (64 * 1024)


@slow
async def test_run_command_reports_the_status(tmp_path: Path) -> None:
    ctx, log = context()
    ended = await run_command(["sh", "-c", "echo hi; exit 7"], ctx, cwd=str(tmp_path))
    ctx.close()
    assert ended.status == 7 and ended.stopped is None and log.text == "hi\n"
    killed = await run_command(["sh", "-c", "kill -9 $$"], ctx, cwd=str(tmp_path))
    assert killed.status == 128 + 9
    missing = await run_command([str(tmp_path / "none")], ctx, cwd=str(tmp_path))
    assert missing.status == 127


# -- the marker reader, in memory ---------------------------------------------------

TOKEN = "\x1b[citron-feedfacefeedface]"
SCRIPT = ["echo one", "exit 3", "echo never"]


def stream(parts: list[str]) -> tuple[str, _Steps]:
    """Feed ``parts`` to a reader of SCRIPT's markers; the log, the steps."""
    ctx, log = context(*SCRIPT)
    steps = _Steps(SCRIPT)
    out = _Output(ctx, TOKEN, steps.marker)
    for part in parts:
        out.feed(part)
        out.send()
    out.send(final=True)
    return log.text, steps


RAW = f"{TOKEN}s:0:100.5\none\n{TOKEN}e:0:0:100.75\npartial{TOKEN}s:1:101.0\nbye\x1b[0m\n\x1b"


@given(st.lists(st.integers(min_value=0, max_value=len(RAW)), max_size=8))
def test_markers_are_read_whatever_the_cuts(cuts: list[int]) -> None:
    bounds = sorted({0, len(RAW), *cuts})
    parts = [RAW[a:b] for a, b in itertools.pairwise(bounds)]
    text, steps = stream(parts)
    assert text == (
        section_line("$ echo one")
        + "one\npartial\n"
        + section_line("$ exit 3")
        + "bye\x1b[0m\n\x1b"
    )
    assert steps.started == {0: 100.5, 1: 101.0}
    assert steps.ended == {0: (0, 100.75)}


def test_the_steps_of_a_script_the_shell_ended() -> None:
    from citron_client.shell import CommandResult

    _, steps = stream([RAW])
    result = steps.result(CommandResult(status=3), now=102.0)
    assert result.steps == (
        Step(state=StepState.PASSED, exit_code=0, duration=0.25),
        Step(state=StepState.FAILED, exit_code=3, duration=1.0),
        Step(state=StepState.SKIPPED),
    )
    assert result.exit_code == 3 and not result.success


def test_markers_that_do_not_parse_are_dropped() -> None:
    text, steps = stream([f"{TOKEN}s:9:1\n{TOKEN}x\n{TOKEN}e:0:zz:1\n{TOKEN}s:0:abc\nok\n"])
    assert text == section_line("$ echo one") + "ok\n"
    assert steps.ended == {} and 0 in steps.started  # (no shell clock: the reader's)


def test_the_members_of_a_session_are_found() -> None:
    # (None where there is no /proc.)
    from citron_client.shell import _session_members

    members = _session_members(os.getsid(0))
    assert members is None or os.getpid() in members
