"""What a type checker says about code written against alephsmtp: mypy (strict, the project's
own settings) on a user's program, each line marked ``# E`` an error and no other line one.

The points a user meets: an LMTP handler answering per recipient types, a misspelt or mistyped
``SmtpServer`` option does not, and state of one's own on a session has a typed home
(``SessionKey``).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alephsmtp.config import SessionConfig, SessionOptions

pytest.importorskip("mypy", reason="mypy comes with the lint extra (the README's test command)")

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = """\
from __future__ import annotations

from alephsmtp import MessageReceivedEventArgs, SessionKey, SmtpServer, SmtpSession
from alephsmtp.handlers import MaildirStore, Relay


def mailbox_ok(recipient: object) -> bool:
    return True


def deliver(sender: SmtpSession, e: MessageReceivedEventArgs) -> list[str]:
    return [
        "250 2.1.5 delivered" if mailbox_ok(r) else "452 4.2.2 mailbox full"
        for r in e.envelope.recipients
    ]


QUOTA = SessionKey("quota", int)


def on_session(session: SmtpSession) -> None:
    session.message_received += deliver
    session.message_received += lambda s, e: ["250 ok", "550 no"]
    session.message_received += MaildirStore("/tmp/alephsmtp-typing-maildir")
    session.message_received += Relay("127.0.0.1", 2525)
    session[QUOTA] = 3
    left: int = session[QUOTA] - 1
    maybe: int | None = session.get(QUOTA)
    session[QUOTA] = "three"  # E
    name: str = session[QUOTA]  # E
    print(left, maybe, name)


SmtpServer("127.0.0.1", 8025, lmtp=True, max_message_size=10 << 20, bare_newline="normalize")
SmtpServer("127.0.0.1", 8025, max_mesage_size=10)  # E
SmtpServer("127.0.0.1", 8025, max_message_size="10")  # E
SmtpServer("127.0.0.1", 8025, bare_newline="ignore")  # E
"""


def test_mypy_checks_what_users_write(tmp_path: Path) -> None:
    program = tmp_path / "program.py"
    program.write_text(PROGRAM)
    expected = {
        number for number, line in enumerate(PROGRAM.splitlines(), 1) if line.endswith("# E")
    }
    done = subprocess.run(
        [
            sys.executable, "-m", "mypy",
            "--config-file", str(ROOT / "pyproject.toml"),
            "--cache-dir", str(tmp_path / "cache"),
            "--no-error-summary",
            str(program),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    errors = {
        int(match.group(1)) for match in re.finditer(r"program\.py:(\d+): error:", done.stdout)
    }
    assert errors == expected, done.stdout + done.stderr


def test_session_options_are_the_configs_fields() -> None:
    """``SessionOptions`` (what ``SmtpServer(**options)`` takes) lists every field of
    ``SessionConfig`` with the same type."""
    fields = {field.name: str(field.type) for field in dataclasses.fields(SessionConfig)}
    options = {
        name: getattr(kind, "__forward_arg__", kind)
        for name, kind in SessionOptions.__annotations__.items()
    }
    assert options == fields
