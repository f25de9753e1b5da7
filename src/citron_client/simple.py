"""The simple runner: clone the repository, run the script in one bash session.

For each build: a fresh working directory; ``git clone`` of ``repo`` (and a
checkout of ``ref``); then the script's lines in one ``bash`` with ``set -eo
pipefail``, with the build's ``env`` and ``secrets``, the first failing
command ending the build (:func:`citron_client.shell.run_script`, which says
the details: steps, sections, what is left running). stdout and stderr are
merged and streamed live. Cancel and timeout end the whole session (SIGTERM,
then SIGKILL after a grace period); nothing a build started outlives it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from citron_protocol import Run, Step, StepState
from citron_protocol.sections import section_line

from .runner import BuildContext, Runner
from .shell import KILL_GRACE, MAX_CHUNK, NOTICE, run_command, run_script

__all__ = ["MAX_CHUNK", "SimpleRunner"]


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
    """Runs builds as docs/protocol.md §5.7 says: a checkout, one shell."""

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
        try:
            checkout = os.path.join(root, "src")
            fetch = [
                (f"$ git clone {build.repo}", ["git", "clone", "--", build.repo, checkout], root)
            ]
            if build.ref:
                fetch.append(
                    (f"$ git checkout {build.ref}", ["git", "checkout", "-q", build.ref], checkout)
                )
            for title, argv, cwd in fetch:
                ctx.log(section_line(title))
                ended = await run_command(
                    argv, ctx, cwd=cwd, env=env, deadline=deadline, kill_grace=self.kill_grace
                )
                if ended.stopped is not None or ended.status != 0:
                    ctx.steps = tuple(Step(state=StepState.SKIPPED) for _ in build.script)
                    if ended.stopped is None:
                        ctx.exit_code = ended.status
                        ctx.log(f"{NOTICE} exited with code {ended.status}\n")
                    return False
            ctx.commit = await _head(checkout, env)
            result = await run_script(
                build.script,
                ctx,
                cwd=checkout,
                env=env,
                deadline=deadline,
                kill_grace=self.kill_grace,
            )
            return result.success
        finally:
            if not self.keep:
                shutil.rmtree(root, ignore_errors=True)
