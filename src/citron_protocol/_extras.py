"""Optional parts of citron, and the one-line answer when one is missing.

``pip install citron`` is the protocol, the clients and the server on
websockets with SQLite. The rest comes with extras: ``citron[aiohttp]`` (the
aiohttp transport), ``citron[redis]`` (several servers as one hub),
``citron[fuzz]`` (hypothesis: ``citron_protocol.strategies`` and ``citron
fuzz``), ``citron[test]`` and ``citron[all]``.
"""

from __future__ import annotations

import importlib.util

__all__ = ["MissingExtra", "need"]


class MissingExtra(ImportError):
    """A feature was used whose extra is not installed; the message says
    which, and the command that installs it."""


def need(module: str, extra: str, feature: str) -> None:
    """Raise :class:`MissingExtra` if ``module`` cannot be imported."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingExtra(
            f"{feature} needs the {extra} extra ({module} is not installed):"
            f" pip install 'citron[{extra}]'"
        )
