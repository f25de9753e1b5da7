"""citron-runner with its script semantics (docs/protocol.md §5.7.1) broken
in one way, for ``citron conformance --runner`` to catch.

``python shell_runner.py FAULT URL``; FAULT is one of:

- ``none``: citron-runner as it is (must pass);
- ``per_line``: each line alone in ``bash -c``, without ``-e`` or
  ``pipefail``, stopping at the first line that exits non-zero, no steps:
  the way citron-runner ran scripts before, and the way a runner written
  from the older text would;
- ``no_stop``: as ``per_line``, but every line runs whatever came before;
- ``no_pipefail``: one session with ``set -e`` only;
- ``no_errexit``: one session with ``set -o pipefail`` only;
- ``no_steps``: right, but the result has no steps;
- ``wrong_steps``: right, but every step says passed;
- ``keep_background``: right, but what a script leaves running in the
  background is left running.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from typing import Any

from citron_client import BuildContext, RunnerHost, shell
from citron_client.simple import SimpleRunner
from citron_protocol import Run, Step, StepState
from citron_protocol.sections import section_line

FAULT, URL = sys.argv[1], sys.argv[-1]


class PerLine(SimpleRunner):
    """Each line alone in ``bash -c``."""

    def __init__(self, stop: bool) -> None:
        super().__init__()
        self.stop = stop

    async def run(self, build: Run, ctx: BuildContext) -> bool:
        root = tempfile.mkdtemp(prefix="citron-per-line-")
        checkout = os.path.join(root, "src")
        env = {**os.environ, **(build.env or {}), **(build.secrets or {})}
        cloned = await shell.run_command(
            ["git", "clone", "-q", build.repo, checkout], ctx, cwd=root
        )
        if cloned.status != 0:
            return False
        ok = True
        for line in build.script:
            ctx.log(section_line(f"$ {line}"))
            ended = await shell.run_command(["bash", "-c", line], ctx, cwd=checkout, env=env)
            if ended.status != 0:
                ctx.exit_code = ended.status
                ok = False
                if self.stop:
                    break
        return ok


class Adjusted(SimpleRunner):
    """citron-runner, its steps changed after the fact."""

    async def run(self, build: Run, ctx: BuildContext) -> bool:
        ok = await super().run(build, ctx)
        if FAULT == "no_steps":
            ctx.steps = None
        elif FAULT == "wrong_steps":
            ctx.steps = tuple(Step(state=StepState.PASSED) for _ in build.script)
        return ok


def replace_options(options: str) -> None:
    original = shell.script_text

    def script_text(script: Any, token: str) -> str:
        return original(script, token).replace("set -eo pipefail\n", options + "\n", 1)

    shell.script_text = script_text  # type: ignore[assignment]


async def leave_them(self: Any, leader: int) -> int:
    return 0


runner: SimpleRunner
if FAULT in ("per_line", "no_stop"):
    runner = PerLine(stop=FAULT == "per_line")
else:
    runner = Adjusted()
    if FAULT == "no_pipefail":
        replace_options("set -e")
    elif FAULT == "no_errexit":
        replace_options("set -o pipefail")
    elif FAULT == "keep_background":
        shell._Session._end_leftovers = leave_them  # type: ignore[method-assign]
    elif FAULT not in ("none", "no_steps", "wrong_steps"):
        raise SystemExit(f"unknown fault {FAULT!r}")

asyncio.run(RunnerHost(runner, URL).serve())
