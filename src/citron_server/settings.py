"""``citron-server`` options: command line first, then ``CITRON_<NAME>``
environment variables, then defaults."""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import attrs

__all__ = ["ConfigError", "Settings", "parse_settings", "redacted"]


class ConfigError(Exception):
    """An option has a value the server cannot use."""


@attrs.frozen(kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8765
    transport: str = "websockets"
    db: str = "citron.db"
    engine: str = "sqlite"
    node_lease: float = 5.0
    log_retention: float | None = None
    retention: float | None = None  # days
    window: int = 1000
    snapshot_every: int = 10_000
    runner_token: str | None = None
    api_token: str | None = None
    web_token: str | None = None
    max_frame: int = 1024 * 1024
    max_buffer: int = 1024 * 1024
    send_timeout: float = 10.0
    init_timeout: float = 10.0
    max_connections: int = 10_000
    log_cap: int = 64 * 1024 * 1024
    lost_grace: float = 60.0
    retry_lost: int = 1
    cancel_timeout: float = 30.0
    compression: str = "off"
    ping_interval: float = 20.0
    log_level: str = "INFO"
    insecure: bool = False
    allowed_origin: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_token: str | None = None

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def _whole(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int = _whole(1)
_count = _whole(0)


def _port(text: str) -> int:
    value = _count(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be at most 65535, got {value}")
    return value


def _positive(unit: str) -> Callable[[str], float]:
    """An argparse type: a positive, finite number of ``unit``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {unit}, got {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive number of {unit}, got {text}")
        return value

    return parse


_seconds = _positive("seconds")
_days = _positive("days")


def redacted(url: str) -> str:
    """A URL without its credentials (``user:password@``, ``?password=``),
    for messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, where = rest.rpartition("@")
    if at and credentials:
        url = f"{scheme}{sep}***@{where}"
    return _PASSWORD_ARG.sub(r"\1***", url)


_PASSWORD_ARG = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)


def _engine(text: str) -> str:
    if text == "sqlite":
        return text
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise argparse.ArgumentTypeError(
            f"expected sqlite or a Redis URL (redis://HOST:PORT/DB), got {redacted(text)!r}"
        )
    from citron_protocol._extras import MissingExtra, need

    try:
        need("redis", "redis", "a Redis engine")
    except MissingExtra as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    from redis.connection import parse_url

    try:
        parse_url(text)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a usable Redis URL: {exc}") from None
    path = text.split("?", 1)[0].split("://", 1)[1].partition("/")[2]
    if not text.startswith("unix://") and path and not path.isdigit():
        raise argparse.ArgumentTypeError(f"the database in {redacted(text)!r} must be a number")
    return text


def _origin(text: str) -> tuple[str, ...]:
    """One origin, or several comma-separated (as CITRON_ALLOWED_ORIGIN has them)."""
    from .security import normalize_origin

    try:
        return tuple(normalize_origin(o) for o in text.split(",") if o.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _token(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("a token must not be empty")
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--host", {"help": "address to listen on (default 127.0.0.1)"}),
    ("--port", {"type": _port, "help": "port (default 8765; 0 picks a free one)"}),
    ("--transport", {"choices": ["websockets", "aiohttp"], "help": "default websockets"}),
    ("--db", {"help": "SQLite file (default citron.db; :memory: keeps nothing)"}),
    (
        "--engine",
        {
            "type": _engine,
            "help": "sqlite (default: one server, the --db file) or redis://HOST:PORT/DB"
            " (any number of servers on one Redis form one hub)",
        },
    ),
    (
        "--node-lease",
        {
            "type": _seconds,
            "help": "with Redis: seconds after which a silent server is declared dead (default 5)",
        },
    ),
    (
        "--log-retention",
        {
            "type": _seconds,
            "help": "with Redis: seconds a finished build's log is kept (default: for ever)",
        },
    ),
    (
        "--retention",
        {
            "type": _days,
            "metavar": "DAYS",
            "help": "days a finished build and its log are kept, then deleted (default: for ever)",
        },
    ),
    (
        "--window",
        {
            "type": _positive_int,
            "metavar": "BUILDS",
            "help": "finished builds kept in memory, the newest (default 1000); older"
            " ones are read from the store when asked for",
        },
    ),
    (
        "--snapshot-every",
        {
            "type": _positive_int,
            "help": "with Redis: entries of the command stream between two snapshots"
            " (default 10000); the stream is trimmed after each",
        },
    ),
    ("--runner-token", {"type": _token, "help": "token for the RUNNER role (none: open)"}),
    ("--api-token", {"type": _token, "help": "token for the API role (none: open)"}),
    ("--web-token", {"type": _token, "help": "token for the WEB role (none: open)"}),
    (
        "--metrics-token",
        {"type": _token, "help": "token that /metrics needs as Authorization: Bearer (none: open)"},
    ),
    (
        "--allowed-origin",
        {
            "type": _origin,
            "action": "append",
            "metavar": "ORIGIN",
            "help": "a web origin (https://host:port) whose pages may open WebSockets here,"
            " besides the server's own (repeat; CITRON_ALLOWED_ORIGIN: comma-separated)",
        },
    ),
    ("--tls-cert", {"metavar": "FILE", "help": "PEM certificate chain: serve wss:// and https://"}),
    ("--tls-key", {"metavar": "FILE", "help": "PEM private key of --tls-cert"}),
    ("--max-frame", {"type": _positive_int, "help": "largest frame in bytes (default 1 MiB)"}),
    (
        "--max-buffer",
        {
            "type": _positive_int,
            "help": "outgoing bytes a connection may have waiting before it is closed"
            " as a slow consumer (default 1 MiB)",
        },
    ),
    (
        "--send-timeout",
        {
            "type": _seconds,
            "help": "seconds a connection's outgoing data may stand still before it is"
            " closed as a slow consumer (default 10)",
        },
    ),
    (
        "--init-timeout",
        {
            "type": _seconds,
            "help": "seconds a new WebSocket has to send its first frame before it is"
            " closed with 1008 (default 10)",
        },
    ),
    (
        "--max-connections",
        {
            "type": _positive_int,
            "help": "open WebSockets at most; past it handshakes get HTTP 503 (default 10000)",
        },
    ),
    ("--log-cap", {"type": _positive_int, "help": "log bytes stored per build (default 64 MiB)"}),
    (
        "--lost-grace",
        {"type": _seconds, "help": "seconds a build waits for its runner to resume (default 60)"},
    ),
    ("--retry-lost", {"type": _count, "help": "times a lost build is requeued (default 1)"}),
    (
        "--cancel-timeout",
        {"type": _seconds, "help": "seconds a runner has to end a cancelled build (default 30)"},
    ),
    (
        "--ping-interval",
        {
            "type": _seconds,
            "help": "seconds between keepalive pings; a peer that does not answer"
            " within as long again is closed (default 20)",
        },
    ),
    ("--compression", {"choices": ["deflate", "off"], "help": "permessage-deflate (default off)"}),
    (
        "--log-level",
        {
            "choices": ["DEBUG", "INFO", "WARNING", "ERROR"],
            "type": str.upper,
            "help": "default INFO",
        },
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="citron-server",
        description="The citron coordination server for ci-tron runners, backends and fronts. "
        "Every option can also be set as an environment variable CITRON_<NAME> "
        "(e.g. CITRON_API_TOKEN).",
    )
    for flag, kwargs in _OPTIONS:
        parser.add_argument(flag, **kwargs)
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow listening on a non-loopback address while a role has no token",
    )
    return parser


def parse_settings(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """Settings from the command line and the environment; ConfigError if bad."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    values: dict[str, Any] = {}
    for action in parser._actions:
        name = action.dest
        if name == "help":
            continue
        value = getattr(args, name)
        env_name = f"CITRON_{name.upper()}"
        if value is None and env_name in environ:
            raw = environ[env_name]
            if name == "insecure":
                value = raw.lower() in ("1", "true", "yes", "on")
            else:
                try:
                    value = action.type(raw) if callable(action.type) else raw
                except argparse.ArgumentTypeError as exc:
                    raise ConfigError(f"{env_name}: {exc}") from None
                if action.choices is not None and value not in action.choices:
                    choices = ", ".join(map(str, action.choices))
                    raise ConfigError(f"{env_name}: {raw!r} is not one of {choices}")
        if isinstance(value, list):  # a repeated option (append): one tuple each
            value = tuple(item for group in value for item in group)
        if value is not None:
            values[name] = value
    settings = Settings(**values)
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if settings.engine == "sqlite" and settings.log_retention is not None:
        raise ConfigError("--log-retention needs --engine redis://...")
    if settings.transport == "aiohttp":
        from citron_protocol._extras import MissingExtra, need

        try:
            need("aiohttp", "aiohttp", "--transport aiohttp")
        except MissingExtra as exc:
            raise ConfigError(str(exc)) from None
    open_roles = [
        role
        for role, token in (
            ("RUNNER", settings.runner_token),
            ("API", settings.api_token),
            ("WEB", settings.web_token),
        )
        if not token
    ]
    if open_roles and not settings.loopback and not settings.insecure:
        raise ConfigError(
            f"refusing to listen on {settings.host} with roles open to anyone "
            f"({', '.join(open_roles)}): set their tokens, or pass --insecure"
        )
    return settings
