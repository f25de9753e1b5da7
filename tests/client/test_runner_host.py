"""RunnerHost with a custom runner, against a real server (both
transports): what a runner sets on its context goes with the result, and
what it sets wrong is left out, never the result itself."""

from __future__ import annotations

import asyncio
import logging

import pytest

from citron_client.runner import BuildContext, Runner, RunnerHost
from citron_protocol import Run, Step, StepState

from ..conftest import ServerProc
from ..peers import ask, peer, submit


class Stepper(Runner):
    type = "simple"

    def __init__(self, steps: int) -> None:
        self.steps = steps

    async def run(self, build: Run, ctx: BuildContext) -> bool:
        ctx.exit_code = 0
        ctx.steps = tuple(Step(state=StepState.PASSED, exit_code=0) for _ in range(self.steps))
        return True


async def run_once(server: ServerProc, runner: Runner) -> object:
    host = RunnerHost(runner, server.url, once=True)
    serving = asyncio.create_task(host.serve())
    api = await peer(server.url)
    for _ in range(200):  # until the runner registered
        if (await ask(api, "API:get_runners:")).runners:
            break
        await asyncio.sleep(0.05)
    build = await submit(api, script='["one", "two"]')
    await asyncio.wait_for(serving, timeout=30)
    return (await ask(api, f'API:get_build:{{"build": "{build}"}}')).build


async def test_a_runners_steps_go_with_its_result(server: ServerProc) -> None:
    info = await run_once(server, Stepper(2))
    assert info.state.value == "success"  # type: ignore[attr-defined]
    assert [s.state for s in info.steps] == [StepState.PASSED] * 2  # type: ignore[attr-defined]


async def test_steps_of_another_count_are_left_out_not_the_result(
    server: ServerProc, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="citron.runner"):
        info = await run_once(server, Stepper(3))
    assert info.state.value == "success" and info.steps is None  # type: ignore[attr-defined]
    assert info.exit_code == 0  # type: ignore[attr-defined]
    assert "3 steps for 2 script lines; reported without steps" in caplog.text
