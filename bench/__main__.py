"""``python -m bench [--quick] [--transport websockets|aiohttp|both] [--json PATH]``

Prints one table (figure, citron, baseline, ratio, target, PASS/MISS) and
writes the results as JSON. Servers and load generators run in separate
processes over loopback; compression is off on both sides of every pair.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from citron_protocol import decode, encode

ROOT = Path(__file__).parents[1]
#: Runs of each side of a server figure (see ``Bench.paired``).
RUNS = 9

FRAME = 'RUNNER:process:{"finished":false,"log":"' + "x" * 79 + '\\n"}'


class Server:
    """A server process that prints its port (or citron's start-up lines)."""

    def __init__(self, argv: list[str], citron: bool) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if citron:
            self.port = int(line.rsplit(":", 1)[1].split("/")[0])
            for _ in range(3):
                self.proc.stdout.readline()
        else:
            self.port = int(line)
        time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        """Resident memory in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def citron_server(transport: str, db: str, *extra: str) -> Server:
    return Server(
        [
            sys.executable,
            "-m",
            "citron_server",
            "--port",
            "0",
            "--transport",
            transport,
            "--db",
            db,
            "--compression",
            "off",
            "--log-level",
            "ERROR",
            "--max-buffer",
            str(8 << 20),
            *extra,
        ],
        citron=True,
    )


def relay_server(transport: str) -> Server:
    return Server([sys.executable, "-m", "bench.relay", transport], citron=False)


def loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def rate_of(runs: int, spec: dict[str, Any]) -> float:  # for a baseline alone
    """The median rate of ``runs`` runs of a relay scenario."""
    return float(statistics.median(loadgen(spec)["rate"] for _ in range(runs)))


class Bench:
    def __init__(self, quick: bool, transports: list[str]) -> None:
        self.quick = quick
        self.transports = transports
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.tmp = tempfile.mkdtemp(prefix="citron-bench-")
        self.live_1: dict[str, float] = {}
        self.sqlite_10: dict[str, float] = {}

    def row(
        self,
        figure: str,
        transport: str,
        value: float,
        baseline: float,
        target: str,
        unit: str,
        *,
        absolute: bool = False,
    ) -> None:
        """One figure; ``absolute``: the target bounds the value itself (the
        baseline is shown for reference), else the ratio."""
        ratio = value / baseline if baseline else float("nan")
        op, bound = target.split(" ")
        judged = value if absolute else ratio
        ok = judged >= float(bound) if op == ">=" else judged <= float(bound)
        self.rows.append(
            {
                "figure": figure,
                "transport": transport,
                "citron": value,
                "baseline": baseline,
                "ratio": ratio,
                "target": target,
                "result": "PASS" if ok else "MISS",
                "unit": unit,
            }
        )
        print(
            f"  {figure:44} {transport:10} {value:12.1f} {baseline:12.1f} {ratio:7.2f} "
            f"{target:7} {'PASS' if ok else 'MISS'}  ({unit})",
            flush=True,
        )

    def db(self, name: str) -> str:
        path = os.path.join(self.tmp, name)
        for suffix in ("", "-wal", "-shm"):
            with_suffix = path + suffix
            if os.path.exists(with_suffix):
                os.remove(with_suffix)
        return path

    # -- figures ---------------------------------------------------------------------

    def codec(self) -> None:
        n, pairs = (10_000, 1) if self.quick else (50_000, 15)
        message = decode(FRAME)

        def base_round_trip() -> None:
            role, command, payload = FRAME.split(":", 2)
            f"{role}:{command}:" + orjson.dumps(orjson.loads(payload)).decode()

        def citron_round_trip() -> None:
            encode(decode(FRAME))

        def base_decode() -> None:
            orjson.loads(FRAME.split(":", 2)[2])

        def citron_decode() -> None:
            decode(FRAME)

        assert encode(message) == FRAME.replace("\\n", "\\n")
        for figure, mine, theirs in [
            ("codec round trip (log frame)", citron_round_trip, base_round_trip),
            ("codec decode (log frame)", citron_decode, base_decode),
        ]:
            rate, base = self.paired(
                lambda fn=mine: n / timeit.timeit(fn, number=n),  # type: ignore[misc]
                lambda fn=theirs: n / timeit.timeit(fn, number=n),  # type: ignore[misc]
                runs=pairs,
            )
            self.row(figure, "-", rate, base, ">= 0.5", "frames/s")

    def interleaved(
        self, mine: Server, theirs: Server, spec: dict[str, Any]
    ) -> tuple[float, float]:
        """citron's rate and the baseline's, from runs in pairs (see ``paired``)."""

        def runner(server: Server, kind: str) -> Callable[[], float]:
            def go() -> float:
                run = {k: v for k, v in spec.items() if k != "kind_theirs"}
                run.update(kind=kind, url=f"ws://127.0.0.1:{server.port}/ws")
                return float(loadgen(run)["rate"])

            return go

        return self.paired(runner(mine, "citron"), runner(theirs, spec.get("kind_theirs", "raw")))

    def paired(
        self, mine: Callable[[], float], theirs: Callable[[], float], runs: int = RUNS
    ) -> tuple[float, float]:
        """Measure both rates back to back, ``runs`` times (once in quick
        mode), the order alternating, and return the pair whose ratio is the
        median of the pairs' ratios.

        One run on this machine can be 40% off in either direction; the two
        runs of a pair see the same phase of the machine, and the median pair
        ignores the odd fast or slow run that a best-of-N would pick.
        """
        pairs = []
        for i in range(1 if self.quick else runs):
            if i % 2:
                theirs_rate = theirs()
                mine_rate = mine()
            else:
                mine_rate = mine()
                theirs_rate = theirs()
            pairs.append((mine_rate, theirs_rate))
        pairs.sort(key=lambda pair: pair[0] / pair[1])
        return pairs[len(pairs) // 2]

    def relay(self, transport: str) -> None:
        sizes = (
            [(1, 3000, 0.6), (10, 2000, 0.8), (100, 300, 0.8)]
            if self.quick
            else [(1, 30000, 0.6), (10, 20000, 0.8), (100, 3000, 0.8)]
        )
        for readers, lines, target in sizes:
            server = citron_server(transport, self.db(f"relay-{transport}-{readers}.db"))
            relay = relay_server(transport)
            try:
                mine, base = self.interleaved(
                    server, relay, {"scenario": "relay", "readers": readers, "lines": lines}
                )
            finally:
                server.stop()
                relay.stop()
            self.row(
                f"log relay, {readers} front(s)",
                transport,
                mine,
                base,
                f">= {target}",
                "lines/s per front",
            )
            if readers == 1:
                self.live_1[transport] = mine
            if readers == 10:
                self.sqlite_10[transport] = mine

    def socketio(self, transport: str) -> None:
        readers, lines = (10, 2000) if self.quick else (10, 10000)
        runs = 1 if self.quick else RUNS
        sio = Server([sys.executable, "-m", "bench.sio_server"], citron=False)
        try:
            base = rate_of(
                runs,
                {
                    "scenario": "relay",
                    "kind": "sio",
                    "url": f"http://127.0.0.1:{sio.port}",
                    "readers": readers,
                    "lines": lines,
                },
            )
        finally:
            sio.stop()
        self.row(
            "log relay, 10 fronts vs python-socketio",
            transport,
            self.sqlite_10[transport],
            base,
            ">= 1.5",
            "lines/s per front",
        )

    def persistence(self, transport: str) -> None:
        lines = 2000 if self.quick else 20000
        sqlite = citron_server(transport, self.db(f"persist-{transport}.db"))
        memory = citron_server(transport, ":memory:")
        try:
            on_disk, in_memory = self.interleaved(
                sqlite,
                memory,
                {"scenario": "relay", "readers": 10, "lines": lines, "kind_theirs": "citron"},
            )
        finally:
            sqlite.stop()
            memory.stop()
        self.row(
            "persistence: 10 fronts, SQLite vs :memory:",
            transport,
            on_disk,
            in_memory,
            ">= 0.85",
            "lines/s per front",
        )

    def cluster(self, transport: str) -> None:
        """10 fronts on one node, the runner on another, over Redis, against
        the single-node SQLite server in the same run."""
        binary = shutil.which("redis-server")
        if binary is None:
            self.notes.append("cluster figure skipped: no redis-server (apt-get install it)")
            return
        lines = 2000 if self.quick else 20000
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        redis = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.tmp,
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:  # until redis-server accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    redis.kill()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        engine = ("--engine", f"redis://127.0.0.1:{port}/0")
        nodes = [citron_server(transport, self.db("unused.db"), *engine) for _ in range(2)]
        single = citron_server(transport, self.db(f"cluster-base-{transport}.db"))
        spec = {"scenario": "relay", "kind": "citron", "readers": 10, "lines": lines}
        try:
            in_cluster, single_rate = self.paired(
                lambda: float(
                    loadgen(
                        {
                            **spec,
                            "url": f"ws://127.0.0.1:{nodes[0].port}/ws",
                            "front_url": f"ws://127.0.0.1:{nodes[1].port}/ws",
                        }
                    )["rate"]
                ),
                lambda: float(loadgen({**spec, "url": f"ws://127.0.0.1:{single.port}/ws"})["rate"]),
            )
        finally:
            for server in [*nodes, single]:
                server.stop()
            redis.kill()
            redis.wait()
        self.row(
            "cluster: 10 fronts on another node, Redis",
            transport,
            in_cluster,
            single_rate,
            ">= 0.5",
            "lines/s per front",
        )

    def idle(self, transport: str) -> None:
        """Memory per idle connection, then dispatch latency against the echo
        round trip: both servers hold their connections at once, and the
        latency samples come in rounds that alternate between them, so that
        a slow phase of the machine hits both sides alike."""
        connections = 300 if self.quick else 5000
        rounds, per_round = (4, 5) if self.quick else (20, 10)
        servers: dict[str, Server] = {}
        gens: dict[str, subprocess.Popen[str]] = {}
        growth: dict[str, float] = {}
        latencies: dict[str, list[float]] = {"citron": [], "raw": []}
        nofile = 0
        try:
            for kind in ("citron", "raw"):
                server = (
                    citron_server(transport, self.db(f"idle-{transport}.db"))
                    if kind == "citron"
                    else relay_server(transport)
                )
                servers[kind] = server
                time.sleep(0.5)
                before = server.rss()
                spec = {
                    "scenario": "idle",
                    "kind": kind,
                    "url": f"ws://127.0.0.1:{server.port}/ws",
                    "connections": connections,
                }
                gen = subprocess.Popen(
                    [sys.executable, "-m", "bench.loadgen", json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                )
                gens[kind] = gen
                assert gen.stdout is not None
                nofile = json.loads(gen.stdout.readline())["nofile"]
                time.sleep(1.0)
                growth[kind] = (server.rss() - before) / connections
            for i in range(rounds):
                for kind in ("citron", "raw") if i % 2 == 0 else ("raw", "citron"):
                    gen = gens[kind]
                    assert gen.stdin is not None and gen.stdout is not None
                    gen.stdin.write(f"{per_round}\n")
                    gen.stdin.flush()
                    latencies[kind] += json.loads(gen.stdout.readline())["latencies"]
        finally:
            for gen in gens.values():
                if gen.stdin is not None:
                    gen.stdin.close()  # end of input: the generator closes its sockets
                try:
                    gen.wait(60)
                except subprocess.TimeoutExpired:
                    gen.kill()
                    gen.wait()
            for server in servers.values():
                server.stop()
        self.notes.append(f"open-file limit raised to {nofile} for {connections} sockets")
        self.row(
            f"memory per idle runner ({connections})",
            transport,
            growth["citron"],
            growth["raw"],
            "<= 1.5",
            "bytes/connection",
        )
        self.row(
            f"dispatch latency, {connections} idle runners",
            transport,
            statistics.median(latencies["citron"]) * 1e6,
            statistics.median(latencies["raw"]) * 1e6,
            "<= 2.0",
            "µs median (echo RTT baseline)",
        )

    def replay(self, transport: str) -> None:
        lines = 5000 if self.quick else 100_000
        db = self.db(f"replay-{transport}.db")
        server = citron_server(transport, db)
        try:
            filled = loadgen(
                {"scenario": "fill", "url": f"ws://127.0.0.1:{server.port}/ws", "lines": lines}
            )
        finally:
            server.stop()
        server = citron_server(transport, db)  # a restart: the log is only in SQLite
        try:
            rate = loadgen(
                {
                    "scenario": "replay",
                    "url": f"ws://127.0.0.1:{server.port}/ws",
                    "build": filled["build"],
                    "lines": lines,
                }
            )["rate"]
        finally:
            server.stop()
        self.row(
            f"log replay after restart ({lines} chunks)",
            transport,
            rate,
            self.live_1[transport],
            ">= 1.0",
            "chunks/s vs live 1-front lines/s",
        )

    def big_replay(self, transport: str) -> None:
        """A 64 MiB log in 64 KiB chunks replayed to one front after a
        restart, against the same chunks read from the same SQLite file and
        sent with the library's own send."""
        total = (4 if self.quick else 64) << 20
        db = self.db(f"big-replay-{transport}.db")
        server = citron_server(transport, db, "--log-cap", str(256 << 20))
        try:
            filled = loadgen(
                {
                    "scenario": "fill_big",
                    "url": f"ws://127.0.0.1:{server.port}/ws",
                    "chunk": 64 * 1024,
                    "total": total,
                }
            )
        finally:
            server.stop()
        mine = citron_server(transport, db, "--log-cap", str(256 << 20))
        theirs = Server([sys.executable, "-m", "bench.relay", transport, db], citron=False)

        def rate(server: Server, kind: str) -> Callable[[], float]:
            def go() -> float:
                spec = {
                    "scenario": "replay_bytes",
                    "url": f"ws://127.0.0.1:{server.port}/ws",
                    "build": filled["build"],
                    "chunks": filled["chunks"],
                    "kind": kind,
                }
                return float(loadgen(spec)["rate"])

            return go

        try:
            mine_rate, theirs_rate = self.paired(rate(mine, "citron"), rate(theirs, "raw"))
        finally:
            mine.stop()
            theirs.stop()
        self.row(
            f"replay of a {total >> 20} MiB log (64 KiB chunks)",
            transport,
            mine_rate,
            theirs_rate,
            ">= 0.5",
            "MB/s vs SQLite + library send",
        )

    # -- history: the hub's working set --------------------------------------------------

    def history(self) -> None:
        """Memory per finished build, start-up and a page of get_builds with
        a long history, and the hub's own cost per log chunk."""
        self.chunk_cost()
        big, small = (20_000, 1000) if self.quick else (1_000_000, 1000)
        dbs = {}
        for n in (big, small):
            dbs[n] = self.db(f"history-{n}.db")
            make_history(dbs[n], n)
        empty = self.db("history-empty.db")
        starts = {n: startup_time(db) for n, db in ((big, dbs[big]), (0, empty))}
        self.row(
            f"start to healthy /healthz, {big} builds",
            "-",
            starts[big],
            starts[0],
            "<= 2",
            "s (baseline: an empty store)",
            absolute=True,
        )
        medians = {}
        for n in (big, small):
            server = citron_server("websockets", dbs[n])
            try:
                rng = random.Random(n)
                befores = ["", *(f"b-{rng.randrange(100, n)}" for _ in range(199))]
                medians[n] = loadgen(
                    {
                        "scenario": "pages",
                        "url": f"ws://127.0.0.1:{server.port}/ws",
                        "befores": befores,
                        "limit": 50,
                    }
                )["median"]
            finally:
                server.stop()
        self.row(
            f"get_builds page (50) at {big} vs {small} builds",
            "-",
            medians[big] * 1e6,
            medians[small] * 1e6,
            "<= 2.0",
            "µs median",
        )
        warm, total = (2000, 10_000) if self.quick else (10_000, 100_000)
        server = citron_server("websockets", self.db("history-mem.db"))
        try:
            url = f"ws://127.0.0.1:{server.port}/ws"
            base = server.rss()
            loadgen({"scenario": "builds", "url": url, "builds": warm})
            time.sleep(0.5)
            warmed = server.rss()
            loadgen({"scenario": "builds", "url": url, "builds": total - warm})
            time.sleep(0.5)
            end = server.rss()
        finally:
            server.stop()
        self.row(
            f"memory per finished build ({total} builds)",
            "-",
            (end - warmed) / (total - warm),
            (warmed - base) / warm,
            "<= 250",
            f"bytes/build (baseline: the first {warm}, window filling)",
            absolute=True,
        )

    def chunk_cost(self) -> None:
        """The hub's own work per log chunk, in memory, with one follower;
        the codec's decode of the same frame for reference."""
        from citron_protocol import Hub, HubConfig, Role
        from citron_protocol.hub import CountingIds

        hub = Hub(CountingIds(), HubConfig(log_cap=1 << 40))
        for conn in (1, 2, 3):
            hub.connect(conn, list(Role), 0.0)
        hub.receive(1, 'RUNNER:init:{"type": "simple", "protocol": 1}', 0.0)
        queued = hub.receive(2, 'API:run:{"repo": "r", "script": ["make"]}', 0.0)
        build = decode(queued.sends[0][1]).build  # type: ignore[union-attr]
        hub.receive(3, f'WEB:subscribe:{{"build": "{build}"}}', 0.0)
        n = 20_000 if self.quick else 100_000
        costs, decodes = [], []
        for _ in range(3 if self.quick else 9):
            started = time.perf_counter()
            for _ in range(n):
                hub.receive(1, FRAME, 1.0)
            costs.append((time.perf_counter() - started) / n * 1e6)
            decodes.append(timeit.timeit(lambda: decode(FRAME), number=n) / n * 1e6)
        self.row(
            "hub cost per log chunk (1 follower)",
            "-",
            statistics.median(costs),
            statistics.median(decodes),
            "<= 5",
            "µs, in memory (baseline: decode alone)",
            absolute=True,
        )


def make_history(path: str, n: int) -> None:
    """A SQLite store holding ``n`` finished builds, written straight in
    the schema the server uses."""
    import attrs

    from citron_protocol import BuildState
    from citron_protocol.records import BuildRecord
    from citron_server.store import write_database

    template = BuildRecord(
        id="",
        number=0,
        state=BuildState.SUCCESS,
        repo="https://x/r.git",
        script=("make",),
        created=1.7e9,
        started=1.7e9,
        finished=1.7e9,
        success=True,
        log_seq=1,
        log_bytes=3,
        revision=3,
    )
    write_database(
        path,
        (attrs.evolve(template, id=f"b-{number}", number=number) for number in range(1, n + 1)),
    )


def startup_time(db: str) -> float:
    """Seconds from starting citron-server on ``db`` to /healthz answering."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "citron_server", "--port", str(port), "--db", db],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        while time.perf_counter() - started < 60:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - started
            except OSError:
                time.sleep(0.01)
        raise RuntimeError("citron-server did not become healthy in 60 s")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: proves the benchmarks run"
    )
    parser.add_argument("--transport", choices=["websockets", "aiohttp", "both"], default="both")
    parser.add_argument(
        "--json", default=str(ROOT / "bench" / "results.json"), help="where to write results"
    )
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    transports = ["websockets", "aiohttp"] if args.transport == "both" else [args.transport]
    bench = Bench(args.quick, transports)
    mode = " (quick)" if args.quick else ""
    print(
        f"citron benchmarks{mode}: {cpu_model()}, Python {platform.python_version()},"
        f" open files raised {soft} -> {hard}"
    )
    header = f"{'citron':>12} {'baseline':>12} {'ratio':>7} {'target':7} result"
    print(f"  {'figure':44} {'transport':10} {header}")
    bench.codec()
    for transport in transports:
        bench.relay(transport)
        bench.socketio(transport)
        bench.persistence(transport)
        bench.cluster(transport)
        bench.idle(transport)
        bench.replay(transport)
        bench.big_replay(transport)
    bench.history()
    for note in bench.notes:
        print(f"note: {note}")
    misses = [r for r in bench.rows if r["result"] == "MISS"]
    print(f"{len(bench.rows) - len(misses)} PASS, {len(misses)} MISS")
    Path(args.json).write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(),
                "quick": args.quick,
                "python": platform.python_version(),
                "rows": bench.rows,
                "notes": bench.notes,
                "median_ratio": statistics.median(r["ratio"] for r in bench.rows),
            },
            indent=2,
        )
    )
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
