"""How citron prints a log in a terminal: section markers become their
titles, whatever the chunks' boundaries, and nothing else changes."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from citron_protocol.sections import SectionText

LOG = (
    "::group::$ git clone r\nCloning...\ndone.\n::group::$ make\n"
    "progress 10%\rprogress 100%\n::endgroup::\nafter\n::group::$ echo :: x\n"
    "::not a marker\n:\nlast"
)
SHOWN = (
    "$ git clone r\nCloning...\ndone.\n$ make\nprogress 10%\rprogress 100%\n"
    "after\n$ echo :: x\n::not a marker\n:\nlast"
)


def shown(parts: list[str]) -> str:
    text = SectionText()
    return "".join(text.feed(part) for part in parts) + text.flush()


@given(st.lists(st.integers(min_value=0, max_value=len(LOG)), max_size=15))
def test_markers_become_titles_however_the_log_is_cut(cuts: list[int]) -> None:
    points = sorted({0, len(LOG), *cuts})
    parts = [LOG[a:b] for a, b in itertools.pairwise(points)]
    assert shown(parts) == SHOWN


@given(st.lists(st.text(alphabet="ab:\n\r", max_size=12), max_size=8))
def test_text_without_markers_is_unchanged(parts: list[str]) -> None:
    joined = "".join(parts)
    lines = joined.split("\n")
    if any(line.startswith(("::group::", "::endgroup::")) for line in lines):
        return
    assert shown(parts) == joined


def test_a_marker_inside_a_line_is_text() -> None:
    assert shown(["abc", "::group::x\n"]) == "abc::group::x\n"
    assert shown(["abc::", "endgroup::\n"]) == "abc::endgroup::\n"


def test_output_that_cannot_be_a_marker_is_not_held() -> None:
    text = SectionText()
    assert text.feed("progress 10%") == "progress 10%"  # live: shown at once
    assert text.feed("\r::gr") == "\r::gr"  # not at a line's start
    assert text.feed("\n::gr") == "\n"  # may be a marker: held...
    assert text.feed("oup::$ make\n") == "$ make\n"  # ...and it was
