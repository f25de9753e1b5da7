"""What the websockets and aiohttp transports share: what they are given,
how a WebSocket handshake is admitted, and how long a handshake may take."""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Sequence
from urllib.parse import unquote

from citron_protocol import Role

from .host import Host
from .metrics import Metrics
from .security import FULL, Gate, Refusal
from .settings import Settings
from .store import StoreError

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "RAW_LOG_HEADERS",
    "RAW_LOG_READERS",
    "RAW_LOG_SLICE",
    "BUSY",
    "BaseTransport",
    "library_level",
    "raw_log_build",
]

#: Seconds a TCP connection has to complete its TLS and HTTP handshakes.
HANDSHAKE_TIMEOUT = 10.0


#: Headers of GET /builds/ID/log: text for people and curl, never sniffed
#: as HTML (a log is whatever a build printed), never cached.
RAW_LOG_HEADERS = {
    "Content-Type": "text/plain; charset=utf-8",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
#: Raw logs (GET /builds/ID/log) sent at once; past it, 503. A reader
#: that takes nothing for ``--send-timeout`` is cut off, and its place and
#: what was held for it let go.
RAW_LOG_READERS = 16
#: Bytes written at once to a raw log's reader (each must be taken within
#: ``--send-timeout``).
RAW_LOG_SLICE = 64 * 1024
_RAW_LOG = re.compile(r"/builds/([^/]+)/log")


#: The answer while as many raw logs as may be are being sent.
BUSY = Refusal(503, "busy: other raw logs are being sent, try again in a few seconds")


def raw_log_build(path: str) -> str | None:
    """The build id of a ``/builds/ID/log`` path, or None for another path."""
    found = _RAW_LOG.fullmatch(path)
    return unquote(found.group(1)) if found else None


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
        self.raw_readers = 0  # raw logs being sent (RAW_LOG_READERS at most)

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

    async def raw_log_size(
        self, build: str, *, authorization: Sequence[str], query_token: Sequence[str]
    ) -> int | Refusal:
        """May this request read ``build``'s raw log (a WEB or API token, as
        for the WebSocket), and how large is it? The refusal otherwise: 401,
        403, 404 for no such build, 503 when the store cannot say."""
        roles = self.gate.credentials(authorization, query_token)
        if isinstance(roles, Refusal):
            return roles
        if not roles & {Role.WEB, Role.API}:
            return Refusal(403, "forbidden: this token may not read builds")
        try:
            size = await self.host.log_size(build)
        except StoreError as exc:
            logging.getLogger("citron.server").error("reading build %s failed: %s", build, exc)
            return Refusal(503, "unavailable: the store cannot be read now, try again later")
        if size is None:
            return Refusal(404, f"not found: no build {build!r}")
        if self.raw_readers >= RAW_LOG_READERS:
            return BUSY
        return size
