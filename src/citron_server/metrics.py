"""``/metrics`` (Prometheus text format) and ``/healthz`` (JSON)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from citron_protocol import BuildState

from .host import Host

__all__ = ["CONTENT_TYPE", "Metrics", "health"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _HubCollector(Collector):
    def __init__(self, host: Host) -> None:
        self.host = host

    def collect(self) -> Iterator[Metric]:
        hub = self.host.hub
        stats = hub.stats
        conns = GaugeMetricFamily("citron_connections", "Open connections by role", labels=["role"])
        by_role: dict[str, int] = {"RUNNER": 0, "API": 0, "WEB": 0, "none": 0}
        for conn_id in self.host.connections:
            conn_role = hub.role_of(conn_id)
            by_role[conn_role.value if conn_role else "none"] += 1
        for role_name, n in by_role.items():
            conns.add_metric([role_name], n)
        yield conns
        frames_in = CounterMetricFamily(
            "citron_frames_in", "Valid frames received", labels=["role", "command"]
        )
        for (role_in, command), n in stats.frames_in.items():
            frames_in.add_metric([role_in, command], n)
        yield frames_in
        frames_out = CounterMetricFamily(
            "citron_frames_out", "Frames sent", labels=["role", "command"]
        )
        for (role_out, command), n in stats.frames_out.items():
            frames_out.add_metric([role_out or "none", command], n)
        yield frames_out
        errors = CounterMetricFamily("citron_errors", "error: frames sent", labels=["code"])
        for code, n in stats.errors.items():
            errors.add_metric([code], n)
        yield errors
        builds = GaugeMetricFamily(
            "citron_builds",
            "Builds in memory by state: all not finished, and the newest finished (--window)",
            labels=["state"],
        )
        for state, n in hub.build_counts().items():
            builds.add_metric([state], n)
        yield builds
        ended = CounterMetricFamily(
            "citron_builds_finished", "Builds that ended since the server started", labels=["state"]
        )
        for state, n in stats.finished.items():
            ended.add_metric([state], n)
        yield ended
        runners = GaugeMetricFamily(
            "citron_runners", "Registered runners by state", labels=["state"]
        )
        for state, n in hub.runner_counts().items():
            runners.add_metric([state], n)
        yield runners
        yield GaugeMetricFamily(
            "citron_queue_depth", "Builds waiting for a runner", value=hub.queue_depth()
        )
        yield CounterMetricFamily(
            "citron_log_bytes_stored", "Log bytes stored since start", value=stats.log_bytes
        )
        yield CounterMetricFamily(
            "citron_internal_errors",
            "Frames that raised inside the hub (connection closed with 1011)",
            value=self.host.internal_errors,
        )
        yield CounterMetricFamily(
            "citron_slow_consumer_disconnects",
            "Connections closed with 4008",
            value=self.host.slow_consumers,
        )


class Metrics:
    """The server's registry: hub counters plus the store's commit latency."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.commit_seconds = Histogram(
            "citron_store_commit_seconds",
            "Time to commit one batch of records",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )

    def watch(self, host: Host) -> None:
        self.registry.register(_HubCollector(host))

    def on_commit(self, seconds: float, records: int) -> None:
        """Called from the store's thread after each commit."""
        self.commit_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def health(host: Host) -> dict[str, Any]:
    """The ``/healthz`` body."""
    counts = host.hub.build_counts()
    error = host.store.error
    status = "ok" if host.started else "starting"
    if error is not None:
        status = f"store failed: {error}"
    return {
        "status": status,
        "runners": host.hub.runner_counts(),
        "builds": {state: counts[state] for state in (BuildState.QUEUED, BuildState.RUNNING)},
    }
