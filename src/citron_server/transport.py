"""What the websockets and aiohttp transports share: what they are given,
how a WebSocket handshake is admitted, and how long a handshake may take."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence

from citron_protocol import Role

from .host import Host
from .metrics import Metrics
from .security import FULL, Gate, Refusal
from .settings import Settings

__all__ = ["HANDSHAKE_TIMEOUT", "BaseTransport", "library_level"]

#: Seconds a TCP connection has to complete its TLS and HTTP handshakes.
HANDSHAKE_TIMEOUT = 10.0


def library_level() -> int:
    """The level of the web libraries' own loggers: WARNING, so that their
    INFO lines (a line per connection) stay out of the server's log; INFO
    when the server logs at DEBUG. Never DEBUG: at DEBUG they log frames and
    headers, which carry build secrets and tokens."""
    debug = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    return logging.INFO if debug else logging.WARNING


class BaseTransport:
    """The host to run, the gate to pass, the metrics to serve, the
    settings, and the TLS context (None: plain TCP)."""

    def __init__(
        self,
        host: Host,
        gate: Gate,
        metrics: Metrics,
        settings: Settings,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host, self.gate, self.metrics, self.settings = host, gate, metrics, settings
        self.tls = tls

    def admit(
        self,
        *,
        host: Sequence[str],
        origin: Sequence[str],
        authorization: Sequence[str],
        query_token: Sequence[str],
    ) -> frozenset[Role] | Refusal:
        """A WebSocket handshake's roles, or the refusal to answer: the
        gate's checks, then ``--max-connections``."""
        roles = self.gate.websocket(
            host=host, origin=origin, authorization=authorization, query_token=query_token
        )
        if isinstance(roles, Refusal):
            return roles
        return FULL if self.host.full else roles
