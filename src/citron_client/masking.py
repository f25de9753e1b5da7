"""Masking secret values in streamed output."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["MASK", "SecretMasker"]

MASK = "***"


class SecretMasker:
    """Replaces every secret value in a stream of text with ``***``, the
    longest first (equal lengths in alphabetical order).

    Feed it the output as it comes: it returns what is safe to send now and
    holds back a tail that could be the start of a secret split across two
    chunks; :meth:`flush` returns the rest at the end.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, equal lengths alphabetically: where secrets overlap,
        # the output is the same in every process (a set's order is not).
        self._secrets = sorted({s for s in secrets if s}, key=lambda s: (-len(s), s))
        self._keep = max((len(s) for s in self._secrets), default=1) - 1
        self._tail = ""

    def feed(self, text: str) -> str:
        if not self._secrets:
            return text
        text = self._mask(self._tail + text)
        hold = self._partial_tail(text)
        self._tail = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        rest, self._tail = self._tail, ""
        return rest

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def _partial_tail(self, text: str) -> int:
        for k in range(min(self._keep, len(text)), 0, -1):
            end = text[-k:]
            if any(s.startswith(end) for s in self._secrets):
                return k
        return 0
