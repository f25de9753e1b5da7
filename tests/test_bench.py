"""The benchmarks still run (their figures are not judged here: see bench/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_the_quick_benchmarks_run(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    figures = {row["figure"].split(" (")[0].split(",")[0] for row in rows}
    assert {
        "codec round trip",
        "codec decode",
        "log relay",
        "persistence: 10 fronts",
        "dispatch latency",
        "log replay after restart",
        "replay of a 4 MiB log",
    } <= figures
    assert {row["transport"] for row in rows} == {"-", "websockets", "aiohttp"}
    assert all(row["citron"] > 0 and row["baseline"] > 0 for row in rows)
