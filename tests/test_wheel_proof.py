"""scripts/wheel-proof: the built sdist and wheels, installed, pass the suite.

The whole proof builds twice and installs into fresh venvs (about a minute, with PyPI access),
so it runs only when asked: ``ALEPHSMTP_WHEEL_PROOF=1 python -m pytest tests/test_wheel_proof.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "wheel-proof"
BASH = shutil.which("bash")

# A POSIX script; on Windows "bash" may be WSL's launcher rather than a shell. Run against an
# installed wheel (tests copied out of the tree, or an sdist's tests) there is no script.
needs_bash = pytest.mark.skipif(
    BASH is None or sys.platform == "win32" or not SCRIPT.exists(),
    reason="needs bash on a POSIX system, and the checkout's scripts/",
)


@needs_bash
def test_script_parses() -> None:
    assert BASH is not None
    subprocess.run([BASH, "-n", str(SCRIPT)], check=True)


@needs_bash
@pytest.mark.skipif(
    not os.environ.get("ALEPHSMTP_WHEEL_PROOF"), reason="set ALEPHSMTP_WHEEL_PROOF=1 to run it"
)
def test_wheel_proof() -> None:
    assert BASH is not None
    env = {k: v for k, v in os.environ.items() if k != "ALEPHSMTP_NO_EXTENSIONS"}
    result = subprocess.run(
        [BASH, str(SCRIPT)], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "== wheel-proof passed" in result.stdout
