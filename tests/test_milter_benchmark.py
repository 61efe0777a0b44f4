"""benchmarks/milter.py runs end to end on a few messages (its figures are not looked at)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "milter.py"
SBIN = "/usr/sbin:/usr/local/sbin:/usr/bin:/bin"
MISSING = [
    name
    for name in ("opendkim", "opendkim-genkey", "postfix", "smtp-source")
    if shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN) is None
]


@pytest.mark.skipif(not SCRIPT.exists(), reason="benchmarks/ not shipped here")
@pytest.mark.skipif(bool(MISSING), reason=f"not installed: {MISSING} (scripts/install-peers)")
@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="needs root on Linux")
def test_milter_benchmark_smoke(tmp_path: Path) -> None:
    results = SCRIPT.parent / "results"
    before = sorted(results.iterdir()) if results.exists() else []
    out = tmp_path / "milter.json"
    env = {k: v for k, v in os.environ.items() if k != "ALEPHSMTP_NO_EXTENSIONS"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--messages", "10", "--warmup", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "postfix-3.7+opendkim" in done.stdout
    data = json.loads(out.read_text())
    servers = {run["server"] for run in data["best"]}
    assert {"alephsmtp-asyncio+opendkim", "postfix-3.7+opendkim"} <= servers
    assert all(run["messages"] == 10 for run in data["best"])
    # Results and server logs where --json says, nothing in the checkout (issue 11).
    assert (sorted(results.iterdir()) if results.exists() else []) == before
    assert list(tmp_path.glob("milter-*.stderr.log"))
