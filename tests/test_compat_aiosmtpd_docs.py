"""aiosmtpd's own documentation examples, run unchanged but for the import line.

The examples are read from the documentation aiosmtpd 1.4.6 installs with itself
(``aiosmtpd/docs/*.rst``: the test extra installs it), so nothing of it is copied here. Each
Sphinx doctest group (``.. doctest:: <group>`` blocks and bare ``>>>`` blocks) runs in its own
namespace, in the order the groups first appear, as ``sphinx.ext.doctest`` runs them, with its
default flags (ELLIPSIS, IGNORE_EXCEPTION_DETAIL).

Every example runs twice: on aiosmtpd itself (the control: it proves the extraction and the
environment) and with ``aiosmtpd`` replaced by ``alephsmtp.compat.aiosmtpd`` in its import
lines. An output may differ from the documented one only by a documented difference, each
named here; the test checks that exactly those were needed.

Two things are arranged around the examples, not in them: the controllers' default port
(8025 in the examples) is set to a free port below the ephemeral range, so that parallel runs
on one machine do not collide, and each file runs in a temporary directory (one example makes
a Unix socket file in the current directory).
"""

from __future__ import annotations

import doctest
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtpd
import pytest

from _aiosmtpd_pair import EXTRA_KEYWORDS, IMPLEMENTATIONS, free_port

pytestmark = pytest.mark.filterwarnings(
    # One example passes the deprecated server_kwargs on purpose.
    "ignore:server_kwargs will be removed:DeprecationWarning"
)

DOCS = Path(aiosmtpd.__file__).parent / "docs"
# The pages with examples (the others have none).
PAGES = ("controller.rst", "smtp.rst", "handlers.rst")
# What sphinx.ext.doctest evaluates before every group (aiosmtpd's conf.py).
GLOBAL_SETUP = {"sys": sys, "in_win32": sys.platform == "win32", "in_cygwin": False}

# The documented differences an example's output may show (docs/aiosmtpd.md), by page.
EXPECTED_DIFFERENCES = {
    "controller.rst": {"ehlo-keywords"},
    "smtp.rst": set(),
    "handlers.rst": set(),
}


@dataclass
class Block:
    group: str
    source: str
    lineno: int
    skipif: str | None = None


@dataclass
class Page:
    name: str
    groups: dict[str, list[Block]] = field(default_factory=dict)


_DIRECTIVE = re.compile(r"\.\. doctest::\s*(\S*)\s*$")


def read_page(path: Path) -> Page:
    """The doctest blocks of one reST page, by group, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = Page(path.name)
    index = 0
    while index < len(lines):
        line = lines[index]
        match = _DIRECTIVE.match(line.strip())
        if match:
            # A directive, maybe nested in another one: its content is what is indented more.
            indent = len(line) - len(line.lstrip())
            group = match.group(1) or "default"
            index += 1
            skipif = None
            while index < len(lines) and lines[index].strip().startswith(":"):
                option = lines[index].strip()
                if option.startswith(":skipif:"):
                    skipif = option[len(":skipif:") :].strip()
                index += 1
            start = index
            while index < len(lines) and (
                not lines[index].strip() or len(lines[index]) - len(lines[index].lstrip()) > indent
            ):
                index += 1
            body = textwrap.dedent("\n".join(lines[start:index]))
            page.groups.setdefault(group, []).append(Block(group, body, start + 1, skipif))
            continue
        if line.strip().startswith(">>>"):
            # A bare doctest block: a paragraph that starts with ">>>" (group "default").
            start = index
            while index < len(lines) and lines[index].strip():
                index += 1
            body = textwrap.dedent("\n".join(lines[start:index]))
            page.groups.setdefault("default", []).append(Block("default", body, start + 1))
            continue
        index += 1
    return page


_IMPORT = re.compile(r"^(\s*(?:>>>|\.\.\.)\s*(?:from|import)\s+)aiosmtpd\b", re.M)


def swap_imports(source: str) -> str:
    """``from aiosmtpd.x import y`` -> ``from alephsmtp.compat.aiosmtpd.x import y``."""
    return _IMPORT.sub(r"\1alephsmtp.compat.aiosmtpd", source)


class DocumentedDifferences(doctest.OutputChecker):
    """Exact doctest comparison, and else only the differences docs/aiosmtpd.md lists."""

    def __init__(self) -> None:
        super().__init__()
        self.used: set[str] = set()

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        if super().check_output(want, got, optionflags):
            return True
        if self._more_ehlo_keywords(want, got):
            self.used.add("ehlo-keywords")
            return True
        return False

    @staticmethod
    def _more_ehlo_keywords(want: str, got: str) -> bool:
        # The EHLO keywords aiosmtpd lists, in its order, plus the extensions alephsmtp
        # serves on top (PIPELINING, CHUNKING, BINARYMIME, DSN).
        wanted, seen = want.split(), got.split()
        kept = [word for word in seen if word not in EXTRA_KEYWORDS]
        return bool(wanted) and kept == wanted and set(seen) - set(wanted) <= EXTRA_KEYWORDS


def run_page(page: Page, impl: str) -> tuple[list[str], set[str]]:
    """Run every group of ``page`` on ``impl``; the failures and the differences used."""
    checker = DocumentedDifferences()
    failures: list[str] = []
    flags = doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL
    for group, blocks in page.groups.items():
        globs: dict[str, Any] = dict(GLOBAL_SETUP)
        runner = doctest.DocTestRunner(checker=checker, optionflags=flags, verbose=False)
        parser = doctest.DocTestParser()
        for block in blocks:
            if block.skipif and eval(block.skipif, dict(GLOBAL_SETUP)):
                continue
            source = block.source if impl == "aiosmtpd" else swap_imports(block.source)
            test = parser.get_doctest(
                source, globs, f"{page.name}[{group}]", page.name, block.lineno
            )
            out: list[str] = []
            result = runner.run(test, out=out.append, clear_globs=False)
            globs = test.globs  # DocTest copies the namespace it is given: carry it on
            if result.failed:
                failures.append("".join(out))
        for value in globs.values():  # a controller left running would keep its port
            stop = getattr(value, "stop", None)
            if getattr(value, "_thread", None) is not None and callable(stop):
                stop()
    return failures, checker.used


def test_the_examples_are_found() -> None:
    assert DOCS.is_dir(), f"aiosmtpd's documentation is not installed at {DOCS}"
    counts = {}
    for name in PAGES:
        page = read_page(DOCS / name)
        examples = doctest.DocTestParser().get_examples(
            "\n".join(b.source for blocks in page.groups.values() for b in blocks)
        )
        counts[name] = (sorted(page.groups), len(examples))
    assert counts["controller.rst"][0] == [
        "controller_kwargs",
        "default",
        "unix_socket",
        "unthreaded",
    ]
    assert counts["controller.rst"][1] >= 50
    assert counts["smtp.rst"][1] >= 10
    assert counts["handlers.rst"][1] >= 10


@pytest.mark.parametrize("impl", ["aiosmtpd", "compat"])
@pytest.mark.parametrize("name", PAGES)
def test_documentation_examples(
    name: str, impl: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    port = free_port()
    # The examples use the controllers' default port; give it one nobody else uses now.
    mixin = IMPLEMENTATIONS[impl].controller.InetMixin
    defaults = mixin.__init__.__defaults__
    assert defaults == (None, 8025, None)
    monkeypatch.setattr(mixin.__init__, "__defaults__", (None, port, None))
    page = read_page(DOCS / name)
    assert page.groups
    failures, used = run_page(page, impl)
    assert not failures, "\n".join(failures)
    assert used == (EXPECTED_DIFFERENCES[name] if impl == "compat" else set())
