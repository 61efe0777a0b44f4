"""The documentation builds as docs/mkdocs.yml says (``mkdocs build --strict``: every page,
every cross-reference resolved), and the API reference shows no raw Sphinx roles."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocstrings", reason="the docs extra (part of the test extra)")

ROOT = Path(__file__).resolve().parent.parent


def test_the_docs_build_strictly_and_render_no_sphinx_roles(tmp_path: Path) -> None:
    if not (ROOT / "docs" / "mkdocs.yml").is_file():
        pytest.skip("docs/ is not shipped here (an installed wheel's tests)")
    site = tmp_path / "site"
    done = subprocess.run(
        [
            sys.executable, "-m", "mkdocs", "build",
            "-f", "docs/mkdocs.yml",
            "--strict", "-d", str(site),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,  # the command the docs give, from the checkout
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    roles = re.compile(r":(class|func|meth|attr|mod|data|exc|obj):`")
    raw = [
        page.relative_to(site)
        for page in site.rglob("*.html")
        if roles.search(page.read_text(errors="replace"))
    ]
    assert raw == []
    # The session's events and SessionConfig's fields are on the reference pages.
    session = (site / "reference" / "session" / "index.html").read_text()
    for event in ("message_received", "xclient", "handler_error"):
        assert event in session
    config = (site / "reference" / "config" / "index.html").read_text()
    assert "Seconds to wait for a command" in config  # idle_timeout's description
