"""``citron-server``: parse the options, open the store, serve until a signal."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from citron_protocol import HubConfig, Role

from .host import Host, HostConfig
from .metrics import Metrics
from .security import Auth, Gate, server_tls
from .settings import ConfigError, Settings, parse_settings
from .store import SqliteStore, Store, StoreError

__all__ = ["all_loopback", "clear_text_warning", "main", "serve"]

log = logging.getLogger("citron.server")


class Transport(Protocol):
    async def start(self) -> int: ...
    def addresses(self) -> list[str]: ...
    async def stop_accepting(self) -> None: ...
    async def close(self) -> None: ...


def _say(line: str) -> None:
    print(f"citron-server: {line}", flush=True)


async def serve(settings: Settings, stop: asyncio.Event, tls: ssl.SSLContext | None = None) -> None:
    """Run the server until ``stop`` is set; raises StoreError if the database
    cannot be used, OSError if the address cannot be bound. ``tls``: the
    context of ``settings.tls_cert`` (made from it if not given)."""
    if tls is None:
        tls = _tls(settings)
    await _can_listen(settings.host, settings.port)  # before the database is touched
    metrics = Metrics()
    hub_config = HubConfig(
        log_cap=settings.log_cap,
        lost_grace=settings.lost_grace,
        retry_lost=settings.retry_lost,
        cancel_timeout=settings.cancel_timeout,
        window=settings.window,
        retention=None if settings.retention is None else settings.retention * 86400,
    )
    host_config = HostConfig(
        max_buffer=settings.max_buffer,
        send_timeout=settings.send_timeout,
        init_timeout=settings.init_timeout,
        max_connections=settings.max_connections,
    )
    store: Store
    host: Host
    if settings.engine == "sqlite":
        store = SqliteStore(settings.db, on_commit=metrics.on_commit)
        host = Host(store, hub_config, host_config)
    else:
        from .cluster import ClusterConfig, ClusterHost, RedisStore, redacted

        redis_store = RedisStore(
            ClusterConfig(
                url=settings.engine,
                lease=settings.node_lease,
                log_retention=settings.log_retention,
                snapshot_every=settings.snapshot_every,
            )
        )
        store = redis_store
        cluster_host = ClusterHost(redis_store, hub_config, host_config)
        host = cluster_host
        engine_line = f"engine {redacted(settings.engine)} (Redis, node {cluster_host.node})"
    metrics.watch(host)
    auth = Auth(
        {
            Role.RUNNER: settings.runner_token,
            Role.API: settings.api_token,
            Role.WEB: settings.web_token,
        }
    )
    gate = Gate(
        auth,
        tls=tls is not None,
        loopback=settings.loopback,
        allowed_origins=settings.allowed_origin,
        metrics_token=settings.metrics_token,
    )
    await host.start()
    transport: Transport
    if settings.transport == "aiohttp":
        from .aio import AiohttpTransport

        transport = AiohttpTransport(host, gate, metrics, settings, tls)
    else:
        from .ws import WebsocketsTransport

        transport = WebsocketsTransport(host, gate, metrics, settings, tls)
    try:
        port = await transport.start()
    except OSError:
        await store.close()
        raise
    # Whether the Host check applies: by the addresses bound, not the name given.
    loopback = all_loopback(transport.addresses())
    gate.loopback = loopback
    where = f"[{settings.host}]" if ":" in settings.host else settings.host
    scheme = "wss" if tls is not None else "ws"
    _say(f"listening on {scheme}://{where}:{port}/ws")
    _say(f"transport {settings.transport}, compression {settings.compression}")
    if settings.engine == "sqlite":
        db = settings.db if settings.db == ":memory:" else str(Path(settings.db).resolve())
        kept = ", nothing is kept" if settings.db == ":memory:" else ", WAL"
        _say(f"database {db} (SQLite{kept})")
    else:
        _say(engine_line)
    open_roles = sorted(auth.open_roles)
    if open_roles:
        _say(f"open roles (no token needed): {', '.join(open_roles)}")
    else:
        _say("every role needs a token")
    warning = clear_text_warning(settings.host, loopback, tls is not None)
    if warning is not None:
        _say(warning)
    await stop.wait()
    log.info("shutting down")
    await transport.stop_accepting()
    await host.shutdown()
    await transport.close()


async def _can_listen(host: str, port: int) -> None:
    """Raise OSError now if ``host:port`` cannot be listened on (a port in
    use, an address not here), so that a server that cannot serve says so
    before it opens, creates or migrates its database."""
    if port == 0:
        return  # any free port: nothing to find out
    probe = await asyncio.get_running_loop().create_server(asyncio.Protocol, host, port)
    probe.close()
    await probe.wait_closed()


def _tls(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of ``--tls-cert`` and ``--tls-key``; ConfigError if unusable."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    return server_tls(settings.tls_cert, settings.tls_key)


def all_loopback(addresses: Sequence[str]) -> bool:
    """Whether every listening address is a loopback one (and there is one)."""
    try:
        return bool(addresses) and all(
            ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addresses
        )
    except ValueError:  # not an IP address: a Unix socket or the like
        return False


def clear_text_warning(host: str, loopback: bool, tls: bool) -> str | None:
    """The start-up warning of a server reachable from the network without TLS."""
    if tls or loopback:
        return None
    return (
        f"warning: listening on {host} without TLS: tokens, secrets and logs"
        " cross the network in clear text (use --tls-cert and --tls-key, or a proxy)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(sys.argv[1:] if argv is None else argv, os.environ)
        tls = _tls(settings)  # a bad certificate is refused before anything starts
    except ConfigError as exc:
        print(f"citron-server: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(settings, stop, tls)
        except StoreError as exc:
            print(f"citron-server: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(
                f"citron-server: error: cannot listen on {settings.host}:{settings.port}: "
                f"{exc.strerror or exc}",
                file=sys.stderr,
            )
            return 2
        return 0

    return asyncio.run(run())
