"""Log sections (docs/protocol.md §5.8): a log line ``::group::TITLE`` starts
a section titled TITLE, a line ``::endgroup::`` ends the current one. A
runner writes them (:func:`section_line`); a front folds the log by them, or
shows a marker as its title in plain text (:class:`SectionText`)."""

from __future__ import annotations

from typing import Final

__all__ = ["SECTION_END", "SECTION_START", "SectionText", "section_line"]

SECTION_START: Final = "::group::"
SECTION_END: Final = "::endgroup::"


def section_line(title: str) -> str:
    """The log line that starts a section titled ``title``; a title of
    several lines is named by its first, followed by an ellipsis."""
    first, _, rest = title.partition("\n")
    return f"{SECTION_START}{first}{' …' if rest else ''}\n"


class SectionText:
    """A log as plain text: a start marker becomes its title, an end marker
    nothing, whatever the chunks' boundaries. Text that cannot be the start
    of a marker is passed on at once, so live output stays live."""

    def __init__(self) -> None:
        self._held = ""  # the start of a line that may be a marker
        self._at_start = True  # the next text begins a line

    def feed(self, text: str) -> str:
        """The text to show for the next chunk of the log."""
        text, self._held = self._held + text, ""
        out = []
        start = 0
        while start < len(text):
            end = text.find("\n", start)
            line = text[start:] if end < 0 else text[start : end + 1]
            if not self._at_start:  # the rest of a line already begun: as it is
                out.append(line)
            elif end < 0 and _maybe_marker(line):
                self._held = line  # wait for the rest of the line
                break
            else:
                out.append(_shown(line))
            start += len(line)
            self._at_start = line.endswith("\n")
        return "".join(out)

    def flush(self) -> str:
        """What was held back, at the end of the log."""
        held, self._held = self._held, ""
        return _shown(held)


def _maybe_marker(line: str) -> bool:
    return any(m.startswith(line) or line.startswith(m) for m in (SECTION_START, SECTION_END))


def _shown(line: str) -> str:
    if line.startswith(SECTION_START):
        return line[len(SECTION_START) :]
    if line.rstrip("\n") == SECTION_END:
        return ""
    return line
