"""The lifecycle tables, and the diagrams in docs/protocol.md drawn from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from citron_protocol import BuildState, RunnerState, UsageError
from citron_protocol.states import (
    BUILD_TRANSITIONS,
    PHASE_TRANSITIONS,
    BuildEvent,
    PhaseEvent,
    RunnerEvent,
    RunnerPhase,
    build_diagram,
    next_build_state,
    next_phase,
    next_runner_state,
    phase_diagram,
    runner_diagram,
)

DOC = Path(__file__).parents[2] / "docs" / "protocol.md"


def test_docs_show_the_diagrams_drawn_from_the_tables() -> None:
    text = DOC.read_text()
    assert f"```mermaid\n{build_diagram()}\n```" in text
    assert f"```mermaid\n{runner_diagram()}\n```" in text
    runner_doc = (DOC.parent / "howto-runner.md").read_text()
    assert f"```mermaid\n{phase_diagram()}\n```" in runner_doc


def test_every_phase_is_reachable_and_closed_is_final() -> None:
    reached = {RunnerPhase.DISCONNECTED}
    for _ in range(len(RunnerPhase)):
        reached |= {PHASE_TRANSITIONS[key] for key in PHASE_TRANSITIONS if key[0] in reached}
    assert reached == set(RunnerPhase)
    assert {t for (p, _), t in PHASE_TRANSITIONS.items() if p is RunnerPhase.CLOSED} == {
        RunnerPhase.CLOSED
    }
    with pytest.raises(UsageError):
        next_phase(RunnerPhase.WAITING, PhaseEvent.CONNECT)


def test_finished_states_have_no_way_out_but_lost() -> None:
    for (state, _), _target in BUILD_TRANSITIONS.items():
        assert not state.finished or state is BuildState.LOST


def test_refused_transitions() -> None:
    with pytest.raises(UsageError):
        next_build_state(BuildState.SUCCESS, BuildEvent.CANCEL)
    with pytest.raises(UsageError):
        next_runner_state(None, RunnerEvent.DISPATCH)
    assert next_runner_state(RunnerState.RUNNING, RunnerEvent.LEAVE) is None


def test_the_hubs_rows_agree_with_the_table() -> None:
    """The hub's cancel and deadline rows carry effects; which states allow
    an event is still the table's to say."""
    from citron_protocol import Hub
    from citron_protocol.hub import CountingIds, _already
    from citron_protocol.states import HELD_STATES

    hub = Hub(CountingIds())
    assert {BuildState.RUNNING, BuildState.CANCELLING} == HELD_STATES
    cancels = {s for (s, _), fx in hub._on_cancel_rows.items() if fx is not _already}
    assert cancels == {s for (s, e) in BUILD_TRANSITIONS if e is BuildEvent.CANCEL}
    idle = {s for (s, _), fx in hub._on_cancel_rows.items() if fx is _already}
    assert idle <= HELD_STATES  # cancelling again: nothing to do, not an error
    assert {s for s, _ in hub._on_deadline} <= HELD_STATES
