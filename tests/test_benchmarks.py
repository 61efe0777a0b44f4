"""The benchmark scripts run end to end on small inputs and write their JSON.

Smoke runs only: the figures are not looked at (tests never time anything). What is checked is
that each script a user is told to run starts its servers, drives them, reports every row
without errors and writes results a user can read back — all of it (results and server logs)
where ``--json`` says, never into the checkout's ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.skipif(not BENCHMARKS.is_dir(), reason="benchmarks/ not shipped here")


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Each file under ``directory`` with its size and modification time."""
    if not directory.is_dir():
        return {}
    return {
        str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in directory.rglob("*")
        if path.is_file()
    }


def run_script(name: str, *args: str, timeout: float = 180) -> str:
    env = {k: v for k, v in os.environ.items() if k != "ALEPHSMTP_NO_EXTENSIONS"}
    before = snapshot(BENCHMARKS / "results")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert snapshot(BENCHMARKS / "results") == before, "wrote into the checkout"
    return done.stdout


def load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def test_parser_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "parser.json"
    stdout = run_script("parser.py", "--size-mib", "0.25", "--repeat", "1", "--json", str(out))
    assert "DataReader" in stdout
    assert "LineReader" in stdout
    assert load(out)


def test_server_benchmark_with_the_bundled_load_client(tmp_path: Path) -> None:
    out = tmp_path / "server.json"
    stdout = run_script(
        "server.py",
        "--quick",
        "--loadgen",
        "python",
        "--servers",
        "alephsmtp-cython-asyncio,floor-asyncio",
        "--scenarios",
        "1k-persistent,1k-per-connection",
        "--time-limit",
        "60",
        "--json",
        str(out),
    )
    assert "alephsmtp-cython-asyncio" in stdout
    assert "floor-asyncio" in stdout
    runs = load(out)["runs"]
    assert {(r["server"], r["scenario"]) for r in runs} == {
        (server, scenario)
        for server in ("alephsmtp-cython-asyncio", "floor-asyncio")
        for scenario in ("1k-persistent", "1k-per-connection")
    }
    for run in runs:
        assert run["messages"] > 0, run
        assert not run["errors"], run
        assert not run["server_stderr"], run
    assert (tmp_path / "alephsmtp-cython-asyncio.stderr.log").is_file()


def test_memory_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    stdout = run_script(
        "memory.py", "--connections", "50", "--servers", "alephsmtp-cython", "--json", str(out)
    )
    assert "alephsmtp-cython-asyncio" in stdout
    results = load(out)["results"]
    assert results, stdout
    for result in results:
        assert result["connections"] == 50, result
        assert not result["errors"], result
    assert (tmp_path / "alephsmtp-cython-asyncio.stderr.log").is_file()


def test_stream_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "stream.json"
    stdout = run_script("stream.py", "--mib", "8", "--json", str(out))
    assert "equal to what was sent" in stdout
    result = load(out)["stream"]
    assert result["received_bytes"] == 8 << 20
    assert result["digest_equal"] is True


def test_server_benchmark_metrics_rows(tmp_path: Path) -> None:
    # The metrics-on server (endpoint scraped by its own child process) beside the same
    # server without: both serve every message, and the side-by-side table is printed.
    out = tmp_path / "server.json"
    stdout = run_script(
        "server.py",
        "--quick",
        "--loadgen",
        "python",
        "--servers",
        "alephsmtp-cython-asyncio,alephsmtp-metrics-cython-asyncio",
        "--scenarios",
        "1k-persistent",
        "--repeat",
        "2",
        "--json",
        str(out),
    )
    assert "Metrics on / off" in stdout
    runs = load(out)["runs"]
    assert {r["server"] for r in runs} == {
        "alephsmtp-cython-asyncio",
        "alephsmtp-metrics-cython-asyncio",
    }
    for run in runs:
        assert run["messages"] > 0, run
        assert not run["errors"], run
        assert not run["server_stderr"], run


def test_metrics_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    stdout = run_script("metrics.py", "--messages", "200", "--rounds", "1", "--json", str(out))
    assert "scrape, one process" in stdout
    result = load(out)
    assert set(result["session_us_per_message"]) >= {"off", "latency"}
    assert result["exporter"]["scrape_bytes"] > 0
