"""``alephsmtp --milter ...``: the command line as a real process, in front of fake milters
running in this test's threads (one on TCP, one on a Unix socket)."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from _cli import start_cli, stop_cli
from _fakemilter import ThreadedFakeMilter
from alephsmtp.milter import protocol as p

MESSAGE = b"From: a@example.org\r\nSubject: through the milters\r\n\r\nhello\r\n"


def send(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        try:
            client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
        except smtplib.SMTPResponseException as error:
            return error.smtp_code, error.smtp_error
    return 250, b""


@pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets")
def test_cli_runs_the_milters_in_order(tmp_path: Path) -> None:
    first = ThreadedFakeMilter(
        script={p.SMFIC_BODYEOB: [[p.AddHeader("X-First", "tcp"), p.Continue()]]}
    )
    second = ThreadedFakeMilter(
        path=str(tmp_path / "milter.sock"),
        script={p.SMFIC_BODYEOB: [[p.AddHeader("X-Second", "unix"), p.Accept()]]},
    )
    with first as tcp, second as unix:
        process, port = start_cli("--milter", tcp.endpoint, "--milter", unix.endpoint)
        try:
            assert send(port) == (250, b"")
            unix.script = {p.SMFIC_BODYEOB: [p.ReplyCode("554 5.7.1 no thanks")]}
            assert send(port) == (554, b"5.7.1 no thanks")
        finally:
            printed = stop_cli(process)
    assert "X-First: tcp\nX-Second: unix\n\nhello" in printed.replace("\r\n", "\n")
    assert printed.count("Subject: through the milters") == 1


def test_cli_default_action(tmp_path: Path) -> None:
    with ThreadedFakeMilter() as milter:
        endpoint = milter.endpoint
    # Nothing listens there any more: tempfail by default, or go on without it.
    process, port = start_cli("--milter", endpoint)
    try:
        assert send(port) == (451, b"4.7.1 Service unavailable - try again later")
    finally:
        stop_cli(process)
    process, port = start_cli("--milter", endpoint, "--milter-default-action", "accept")
    try:
        assert send(port) == (250, b"")
    finally:
        printed = stop_cli(process)
    assert "hello" in printed


def test_cli_refuses_a_bad_endpoint() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "alephsmtp", "--port", "0", "--milter", "tcp:nowhere"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("alephsmtp: milter endpoint must be")
