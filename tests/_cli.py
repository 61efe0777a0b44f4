"""The command line as a real process: start it on a port the OS picks, stop it gracefully."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def start_cli(*args: str) -> tuple[subprocess.Popen[str], int]:
    """Start ``python -m alephsmtp`` on a free port; returns the process and its port."""
    process, ready = _start(["--port", "0"], args, r"listening on 127\.0\.0\.1:(\d+)")
    return process, int(ready.group(1))


def start_unix(path: Path, *args: str) -> subprocess.Popen[str]:
    """``python -m alephsmtp --unix PATH ...``, once it listens."""
    process, _ = _start(["--unix", str(path)], args, re.escape(f"listening on unix:{path}"))
    return process


def _start(
    listen: list[str], args: tuple[str, ...], ready: str
) -> tuple[subprocess.Popen[str], re.Match[str]]:
    """The CLI with ``listen`` options and ``args``, once its log says ``ready`` (a pattern)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "alephsmtp", *listen, "--hostname", "cli.test", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    for line in process.stderr:
        match = re.search(ready, line)
        if match:
            return process, match
    process.kill()
    raise AssertionError(f"the CLI did not start: {process.communicate()}")


def stop_cli(process: subprocess.Popen[str]) -> str:
    """Stop it as SIGTERM does (graceful, exit 0); returns what it printed on stdout."""
    process.terminate()
    out, _ = process.communicate(timeout=10)
    # Windows has no SIGTERM: terminate() kills the process there (exit status 1).
    assert process.returncode == (1 if sys.platform == "win32" else 0)
    return out
