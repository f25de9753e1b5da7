"""The lifecycle tables, and the diagrams in docs/protocol.md drawn from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from citron_protocol import (
    BUILD_TRANSITIONS,
    BuildEvent,
    BuildState,
    RunnerEvent,
    RunnerState,
    UsageError,
    build_diagram,
    next_build_state,
    next_runner_state,
    runner_diagram,
)

DOC = Path(__file__).parents[2] / "docs" / "protocol.md"


def test_docs_show_the_diagrams_drawn_from_the_tables() -> None:
    text = DOC.read_text()
    assert f"```mermaid\n{build_diagram()}\n```" in text
    assert f"```mermaid\n{runner_diagram()}\n```" in text


def test_finished_states_have_no_way_out_but_lost() -> None:
    for (state, _), _target in BUILD_TRANSITIONS.items():
        assert not state.finished or state is BuildState.LOST


def test_refused_transitions() -> None:
    with pytest.raises(UsageError):
        next_build_state(BuildState.SUCCESS, BuildEvent.CANCEL)
    with pytest.raises(UsageError):
        next_runner_state(None, RunnerEvent.DISPATCH)
    assert next_runner_state(RunnerState.RUNNING, RunnerEvent.LEAVE) is None
