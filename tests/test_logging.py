"""The logs an operator runs a server by: one INFO line per message with its outcome, the
refusals at MAIL/RCPT/DATA, a DEBUG trace of every line (AUTH payloads never shown), and the
ready-made handlers' lines naming the session and the client like the session's own."""

from __future__ import annotations

import base64
import logging
import re
import smtplib
from pathlib import Path
from typing import Any

import pytest

from alephsmtp.handlers import MaildirStore
from alephsmtp.testing import SmtpTestServer

MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nhello\r\n"
SESSION = r"session \d+ \[127\.0\.0\.1:\d+\] "


def lines(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == name]


def trace(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The trace's lines without their session prefix (checked to be there)."""
    traced = lines(caplog, "alephsmtp.trace")
    assert all(re.match(SESSION, line) for line in traced), traced
    return [re.sub(SESSION, "", line, count=1) for line in traced]


def test_one_line_per_message_says_what_the_client_was_told(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO, logger="alephsmtp")
    store = MaildirStore(str(tmp_path / "Maildir"))

    def on_session(session: Any) -> None:
        session.message_received += lambda s, e: (
            "451 4.3.0 come back later" if e.envelope.return_path.local_part == "late" else None
        )
        session.message_received += store

    with SmtpTestServer(on_session=on_session) as server:
        with smtplib.SMTP(server.connect_host, server.port, timeout=10) as client:
            client.sendmail("x@example.org", ["b@example.net", "c@example.net"], MESSAGE)
            with pytest.raises(smtplib.SMTPDataError):
                client.sendmail("late@example.org", ["b@example.net"], MESSAGE)
        server.wait_for_messages(1)
    session_lines = lines(caplog, "alephsmtp.session")
    handler_lines = lines(caplog, "alephsmtp.handlers")
    outcomes = [line for line in session_lines if "octets" in line]
    size = len(MESSAGE)
    assert re.fullmatch(
        SESSION + rf"message <x@example.org> -> <b@example.net>, <c@example.net>, {size} octets, "
        r"accepted: 250 2\.0\.0 OK: queued",
        outcomes[0],
    ), outcomes
    assert re.fullmatch(
        SESSION + rf"message <late@example.org> -> <b@example.net>, {size} octets, "
        r"refused: 451 4\.3\.0 come back later",
        outcomes[1],
    ), outcomes
    assert len(outcomes) == 2
    # The store said what it did, for the session, before the outcome was known.
    (stored,) = handler_lines
    assert re.fullmatch(SESSION + r"stored in .*Maildir", stored), handler_lines
    records = [r for r in caplog.records if r.name.startswith("alephsmtp.")]
    order = [r.getMessage() for r in records]
    assert order.index(stored) < order.index(outcomes[0])


def test_lmtp_outcomes_are_per_recipient(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="alephsmtp")

    def on_session(session: Any) -> None:
        session.message_received += lambda s, e: [
            "250 2.0.0 delivered" if r.local_part == "b" else "552 5.2.2 mailbox full"
            for r in e.envelope.recipients
        ]

    with (
        SmtpTestServer(lmtp=True, on_session=on_session) as server,
        smtplib.LMTP(server.connect_host, server.port, timeout=10) as client,
    ):
        # smtplib's LMTP reads one reply to DATA: the conversation by hand.
        client.ehlo_or_helo_if_needed()
        client.mail("x@example.org")
        client.rcpt("b@example.net")
        client.rcpt("c@example.net")
        assert client.docmd("DATA")[0] == 354
        client.send(MESSAGE + b".\r\n")
        assert client.getreply() == (250, b"2.0.0 delivered")
        assert client.getreply() == (552, b"5.2.2 mailbox full")
    (outcome,) = [line for line in lines(caplog, "alephsmtp.session") if "octets" in line]
    assert outcome.endswith(
        " octets, 1 of 2 recipients accepted: 250 2.0.0 delivered; 552 5.2.2 mailbox full"
    ), outcome


def test_refusals_at_mail_and_rcpt_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="alephsmtp")

    def on_session(session: Any) -> None:
        session.rcpt += lambda s, e: (
            "550 5.1.1 no such user" if e.command.recipient_address.local_part == "nobody" else None
        )

    with (
        SmtpTestServer(on_session=on_session, max_message_size=1000) as server,
        smtplib.SMTP(server.connect_host, server.port, timeout=10) as client,
    ):
        client.ehlo()
        assert client.docmd("MAIL", "FROM:<x@example.org> SIZE=5000")[0] == 552
        assert client.docmd("MAIL", "FROM:<x@example.org>")[0] == 250
        assert client.docmd("RCPT", "TO:<nobody@example.net>")[0] == 550
        assert client.docmd("RCPT", "TO:<b@example.net>")[0] == 250
    refusals = [line for line in lines(caplog, "alephsmtp.session") if " refused: " in line]
    assert len(refusals) == 2, refusals
    assert re.fullmatch(
        SESSION + r"MAIL FROM:<x@example\.org> SIZE=5000 refused: 552 5\.3\.4 .*", refusals[0]
    )
    assert re.fullmatch(
        SESSION + r"RCPT TO:<nobody@example\.net> refused: 550 5\.1\.1 no such user", refusals[1]
    )


def test_the_trace_shows_every_line_but_no_credentials(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="alephsmtp.trace")
    password = "correct horse battery staple"
    plain = base64.b64encode(f"\0alice\0{password}".encode()).decode()
    with (
        SmtpTestServer(credentials={"alice": password, "bob": password}) as server,
        smtplib.SMTP(server.connect_host, server.port, timeout=10) as client,
    ):
        client.ehlo("client.example")
        assert client.docmd("AUTH", f"PLAIN {plain}")[0] == 235
        client.sendmail("x@example.org", ["b@example.net"], MESSAGE)
    traced = trace(caplog)
    text = "\n".join(traced)
    assert password not in text
    assert plain not in text
    assert "< ehlo client.example" in traced  # as smtplib sends it
    assert "> 250-localhost" in traced
    assert "< AUTH PLAIN (initial response)" in traced
    assert "> 235 2.7.0 Authentication successful" in traced
    assert f"< mail FROM:<x@example.org> size={len(MESSAGE)}" in traced
    assert "> 354 End data with <CR><LF>.<CR><LF>" in traced
    assert "> 250 2.0.0 OK: queued" in traced
    assert "hello" not in text  # the message is not traced


def test_auth_login_responses_are_not_traced(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="alephsmtp.trace")
    password = "hunter2-but-longer"
    with (
        SmtpTestServer(credentials={"alice": password}) as server,
        smtplib.SMTP(server.connect_host, server.port, timeout=10) as client,
    ):
        client.ehlo()
        assert client.docmd("AUTH", "LOGIN")[0] == 334
        assert client.docmd(base64.b64encode(b"alice").decode())[0] == 334
        assert client.docmd(base64.b64encode(password.encode()).decode())[0] == 235
    traced = trace(caplog)
    text = "\n".join(traced)
    assert password not in text
    assert base64.b64encode(password.encode()).decode() not in text
    assert base64.b64encode(b"alice").decode() not in text
    assert traced.count("< (an AUTH response, 8 octets)") == 1
    assert "< AUTH LOGIN" in traced
