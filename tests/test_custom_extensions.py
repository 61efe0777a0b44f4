"""ESMTP extensions of one's own (``alephsmtp.Extension``): an EHLO keyword and the MAIL/RCPT
parameters it allows, each typed by its converter, with real clients (smtplib, aiosmtplib)."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from typing import Any

import aiosmtplib
import pytest

from alephsmtp import Extension, SmtpServer
from alephsmtp.testing import SmtpTestServer

MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


def priority(value: str | None) -> int:
    number = int(value or "")
    if not 1 <= number <= 9:
        raise ValueError(value)
    return number


PRIORITY = Extension(
    "XPRIORITY", "1-9", mail_parameters={"xpriority": priority}, rcpt_parameters={"XNOTE": str}
)
FLAG = Extension("XFLAG", mail_parameters={"XFLAG": lambda value: value is None})


@pytest.fixture
def seen() -> list[Any]:
    return []


@pytest.fixture
def server(seen: list[Any]) -> Iterator[SmtpTestServer]:
    def on_session(session: Any) -> None:
        session.mail += lambda s, e: seen.append(dict(e.command.extensions))
        session.rcpt += lambda s, e: seen.append(dict(e.command.extensions))

    with SmtpTestServer(esmtp_extensions=(PRIORITY, FLAG), on_session=on_session) as server:
        yield server


def test_ehlo_lists_them(server: SmtpTestServer) -> None:
    with smtplib.SMTP(server.connect_host, server.port, timeout=10) as client:
        client.ehlo()
        assert client.esmtp_features["xpriority"] == "1-9"
        assert "xflag" in client.esmtp_features
        # Listed after the built-in extensions, before ENHANCEDSTATUSCODES and HELP.
        names = list(client.esmtp_features)
        assert names[-4:] == ["xpriority", "xflag", "enhancedstatuscodes", "help"]


def test_smtplib_gives_typed_values(server: SmtpTestServer, seen: list[Any]) -> None:
    with smtplib.SMTP(server.connect_host, server.port, timeout=10) as client:
        client.ehlo()
        client.mail("x@example.org", ["XPRIORITY=7", "XFLAG"])
        client.rcpt("b@example.net", ["XNOTE=first"])
        client.rcpt("c@example.net")
        client.rcpt("d@example.net", ["xnote=third"])
        client.data(MESSAGE)
    assert seen == [{"XPRIORITY": 7, "XFLAG": True}, {"XNOTE": "first"}, {}, {"XNOTE": "third"}]
    envelope = server.wait_for_messages(1)[0].envelope
    assert envelope.mail_extensions == {"XPRIORITY": 7, "XFLAG": True}
    # One entry per recipient, in order.
    assert envelope.rcpt_extensions == [{"XNOTE": "first"}, {}, {"XNOTE": "third"}]


def test_a_recipient_without_them_leaves_the_list_empty(server: SmtpTestServer) -> None:
    with smtplib.SMTP(server.connect_host, server.port, timeout=10) as client:
        client.sendmail("x@example.org", ["b@example.net", "c@example.net"], MESSAGE)
    envelope = server.wait_for_messages(1)[0].envelope
    assert envelope.mail_extensions == {}
    assert envelope.rcpt_extensions == []


async def test_aiosmtplib_gives_typed_values(server: SmtpTestServer) -> None:
    await aiosmtplib.send(
        MESSAGE,
        sender="x@example.org",
        recipients=["b@example.net"],
        hostname=server.connect_host,
        port=server.port,
        mail_options=["XPRIORITY=2"],
        rcpt_options=["XNOTE=n"],
        start_tls=False,
    )
    envelope = server.wait_for_messages(1)[0].envelope
    assert envelope.mail_extensions == {"XPRIORITY": 2}
    assert envelope.rcpt_extensions == [{"XNOTE": "n"}]


BAD = (501, b"5.5.4 Error: bad XPRIORITY parameter")


@pytest.mark.parametrize(
    ("argument", "reply"),
    [
        ("XPRIORITY=0", BAD),
        ("XPRIORITY", BAD),  # the converter is given None
        ("XPRIORITY=nine", BAD),
        ("XCOLOR=blue", (555, b"5.5.4")),
        ("XNOTE=mail", (555, b"5.5.4")),  # a RCPT parameter only
    ],
)
def test_refused_before_any_handler(
    server: SmtpTestServer, seen: list[Any], argument: str, reply: tuple[int, bytes]
) -> None:
    with smtplib.SMTP(server.connect_host, server.port, timeout=10) as client:
        client.ehlo()
        code, text = client.docmd("MAIL", "FROM:<x@example.org> " + argument)
        assert (code, text[: len(reply[1])]) == reply
        assert client.docmd("MAIL", "FROM:<x@example.org>")[0] == 250  # the session goes on
    assert seen == [{}]


def test_a_server_without_them_refuses_their_parameters() -> None:
    with (
        SmtpTestServer() as server,
        smtplib.SMTP(server.connect_host, server.port, timeout=10) as client,
    ):
        client.ehlo()
        assert "xpriority" not in client.esmtp_features
        assert client.docmd("MAIL", "FROM:<x@example.org> XPRIORITY=5")[0] == 555


@pytest.mark.parametrize(
    ("extension", "error"),
    [
        (lambda: Extension("X_PRIORITY"), "not an ESMTP keyword"),
        (lambda: Extension("XP", "a\r\nb"), "no CR or LF"),
        (lambda: Extension("XP", mail_parameters={"X P": str}), "not an ESMTP keyword"),
    ],
)
def test_a_malformed_extension_is_refused(extension: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        extension()


@pytest.mark.parametrize(
    ("extensions", "error"),
    [
        ((Extension("SIZE"),), "served already"),
        ((PRIORITY, Extension("xpriority")), "served already"),
        ((Extension("XP", mail_parameters={"BODY": str}),), "parameters served already"),
        (("XPRIORITY",), "not an alephsmtp.Extension"),
    ],
)
def test_a_conflicting_extension_is_refused(extensions: Any, error: str) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        SmtpServer("127.0.0.1", 0, esmtp_extensions=extensions)
