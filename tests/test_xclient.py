"""XCLIENT and XFORWARD (Postfix's XCLIENT_README and XFORWARD_README), against real clients:
swaks sends XCLIENT as a proxy would, Postfix's SMTP client sends XFORWARD when it relays.

Only the networks named in ``xclient_networks`` / ``xforward_networks`` may send them; for
everyone else they are refused (550 5.7.0) and not listed in EHLO, and a server that names no
network does not serve them at all (500, as any verb it does not know).
"""

from __future__ import annotations

import smtplib
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from _milterpeers import program
from _postfix import POSTFIX, private_postfix, relay_to
from alephsmtp.testing import SmtpTestServer

SWAKS = program("swaks")
LOOPBACK = ("127.0.0.0/8",)
MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


class Seen:
    """What the handlers saw: the session's client as each MAIL and message found it."""

    def __init__(self) -> None:
        self.mail: list[dict[str, Any]] = []

    def on_session(self, session: Any) -> None:
        def mail(sender: Any, e: Any) -> None:
            self.mail.append(
                {
                    "peer": sender.peer,
                    "helo": sender.helo_name,
                    "login": sender.authenticated_as,
                    "xclient": dict(sender.xclient_attributes),
                    "xforward": dict(e.envelope.xforward),
                    "auth_identity": e.envelope.auth_identity,
                }
            )

        session.mail += mail


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def proxy_server(seen: Seen) -> Iterator[SmtpTestServer]:
    with SmtpTestServer(
        xclient_networks=LOOPBACK, xforward_networks=LOOPBACK, on_session=seen.on_session
    ) as server:
        yield server


def connect(server: SmtpTestServer) -> smtplib.SMTP:
    client = smtplib.SMTP(server.connect_host, server.port, timeout=10)
    client.ehlo("proxy.example")
    return client


# --- XCLIENT ----------------------------------------------------------------------------------


@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (scripts/install-peers)")
def test_swaks_names_the_client_with_xclient(proxy_server: SmtpTestServer, seen: Seen) -> None:
    assert SWAKS is not None
    done = subprocess.run(
        [
            SWAKS,
            "--server", f"127.0.0.1:{proxy_server.port}",
            "--from", "x@example.org",
            "--to", "b@example.net",
            "--xclient-addr", "IPV6:2001:db8::25",
            "--xclient-port", "4025",
            "--xclient-name", "mail.example.net",
            "--xclient-helo", "helo.example.net",
            "--xclient-login", "alice",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # The EHLO before listed it; the reply to XCLIENT is the greeting again, and swaks greets.
    assert "250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT" in done.stdout
    assert done.stdout.count("<-  220 localhost ESMTP") == 2
    (mail,) = seen.mail
    assert mail["peer"] == ("2001:db8::25", 4025)
    assert mail["login"] == mail["auth_identity"] == "alice"
    assert mail["xclient"] == {
        "ADDR": "IPV6:2001:db8::25",
        "PORT": "4025",
        "NAME": "mail.example.net",
        "HELO": "helo.example.net",
        "LOGIN": "alice",
    }
    assert len(proxy_server.wait_for_messages(1)) == 1


def test_xclient_starts_the_session_over(proxy_server: SmtpTestServer, seen: Seen) -> None:
    with connect(proxy_server) as client:
        assert client.docmd("XCLIENT", "ADDR=192.0.2.9 NAME=a+2Bb.example")[0] == 220
        # The greeting exchange starts over: MAIL before a new EHLO is out of order.
        assert client.docmd("MAIL", "FROM:<x@example.org>")[0] == 503
        code, lines = client.ehlo("client.example")
        assert code == 250
        assert b"XCLIENT" in lines  # trust is of the proxy, not of the client it named
        client.sendmail("x@example.org", ["b@example.net"], MESSAGE)
    (mail,) = seen.mail
    assert mail["peer"] == ("192.0.2.9", 0)
    assert mail["helo"] == "client.example"
    assert mail["login"] is None
    assert mail["xclient"]["NAME"] == "a+b.example"  # xtext, decoded


def test_an_unavailable_address_leaves_no_peer(proxy_server: SmtpTestServer, seen: Seen) -> None:
    with connect(proxy_server) as client:
        assert client.docmd("XCLIENT", "ADDR=[UNAVAILABLE] NAME=[TEMPUNAVAIL]")[0] == 220
        client.ehlo("client.example")
        assert client.docmd("MAIL", "FROM:<x@example.org>")[0] == 250
    assert seen.mail[0]["peer"] is None
    assert seen.mail[0]["xclient"] == {"ADDR": "[UNAVAILABLE]", "NAME": "[TEMPUNAVAIL]"}


@pytest.mark.parametrize(
    "argument",
    [
        "",
        "ADDR",
        "ADDR=not-an-address",
        "PORT=65536",
        "PORT=-1",
        "PROTO=HTTP",
        "COLOR=blue",
        "NAME=bad+zz",  # not xtext
    ],
)
def test_malformed_xclient_is_a_syntax_error(proxy_server: SmtpTestServer, argument: str) -> None:
    with connect(proxy_server) as client:
        code, text = client.docmd("XCLIENT", argument)
        assert (code, text[:5]) == (501, b"5.5.4"), text
        # Nothing changed: the session goes on as before.
        assert client.docmd("MAIL", "FROM:<x@example.org>")[0] == 250


def test_xclient_in_a_transaction_is_out_of_order(proxy_server: SmtpTestServer) -> None:
    with connect(proxy_server) as client:
        client.docmd("MAIL", "FROM:<x@example.org>")
        code, text = client.docmd("XCLIENT", "ADDR=192.0.2.9")
        assert (code, text[:5]) == (503, b"5.5.1")


def test_an_untrusted_client_may_not_send_them(seen: Seen) -> None:
    with SmtpTestServer(
        xclient_networks=("192.0.2.0/24",),
        xforward_networks=("192.0.2.0/24",),
        on_session=seen.on_session,
    ) as server, connect(server) as client:  # fmt: skip
        assert not client.has_extn("xclient")
        assert not client.has_extn("xforward")
        for verb in ("XCLIENT", "XFORWARD"):
            code, text = client.docmd(verb, "ADDR=192.0.2.9")
            assert (code, text) == (550, b"5.7.0 Error: insufficient authorization")
        client.sendmail("x@example.org", ["b@example.net"], MESSAGE)
    assert seen.mail[0]["peer"][0] == "127.0.0.1"
    assert seen.mail[0]["xforward"] == {}


def test_a_server_without_networks_does_not_know_them() -> None:
    unknown: list[tuple[str, str]] = []

    def on_session(session: Any) -> None:
        session.unhandled_command += lambda s, e: unknown.append(
            (e.command.verb, e.command.parameter)
        )

    with SmtpTestServer(on_session=on_session) as server, connect(server) as client:
        assert not client.has_extn("xclient")
        assert client.docmd("XCLIENT", "ADDR=192.0.2.9")[0] == 500
        assert client.docmd("XFORWARD", "bogus")[0] == 500
    assert unknown == [("XCLIENT", "ADDR=192.0.2.9"), ("XFORWARD", "bogus")]


def test_a_handler_may_refuse_xclient(seen: Seen) -> None:
    def on_session(session: Any) -> None:
        seen.on_session(session)
        session.xclient += lambda s, e: (
            "550 5.7.1 not that one" if e.command.attributes.get("ADDR") == "192.0.2.66" else None
        )

    with (
        SmtpTestServer(xclient_networks=LOOPBACK, on_session=on_session) as server,
        connect(server) as client,
    ):
        assert client.docmd("XCLIENT", "ADDR=192.0.2.66") == (550, b"5.7.1 not that one")
        assert client.docmd("XCLIENT", "ADDR=192.0.2.67")[0] == 220
        client.ehlo("c.example")
        client.docmd("MAIL", "FROM:<>")
    assert seen.mail[0]["peer"] == ("192.0.2.67", 0)


def test_a_failing_xclient_handler_is_a_temporary_error() -> None:
    def on_session(session: Any) -> None:
        session.xclient += lambda s, e: 1 / 0

    with (
        SmtpTestServer(xclient_networks=LOOPBACK, on_session=on_session) as server,
        connect(server) as client,
    ):
        code, text = client.docmd("XCLIENT", "ADDR=192.0.2.9")
        assert (code, text[:5]) == (451, b"4.3.0"), text


def test_the_connection_counts_against_the_client_xclient_names() -> None:
    """Per-address limits see the real client: after XCLIENT the connection counts against
    the address named (the proxy's count is given back), and a client at its limit is
    refused, whichever proxy connection it comes through."""
    with SmtpTestServer(
        xclient_networks=LOOPBACK, max_connections_per_ip=1, connection_limit_exempt=()
    ) as server:
        with connect(server) as first:
            assert first.docmd("XCLIENT", "ADDR=192.0.2.9")[0] == 220
            # The proxy's own count is free again: a second connection from it is admitted...
            with connect(server) as second:
                # ...but not for a client already at its limit.
                assert second.docmd("XCLIENT", "ADDR=192.0.2.9") == (
                    421,
                    b"4.7.0 Too many connections from your address",
                )
                with pytest.raises(smtplib.SMTPServerDisconnected):  # 421 closes
                    second.docmd("NOOP")
            assert first.ehlo("c.example")[0] == 250
        deadline = time.monotonic() + 10
        while server.server.open_connections and time.monotonic() < deadline:
            time.sleep(0.01)
        # Every count was given back to the address it was taken for: the proxy's (this
        # connection is admitted) and the client's (named again).
        with connect(server) as third:
            assert third.docmd("XCLIENT", "ADDR=192.0.2.9")[0] == 220


# --- XFORWARD ---------------------------------------------------------------------------------


def test_xforward_is_for_the_next_transaction(proxy_server: SmtpTestServer, seen: Seen) -> None:
    with connect(proxy_server) as client:
        assert client.docmd("XFORWARD", "NAME=c.example ADDR=192.0.2.9") == (250, b"2.0.0 Ok")
        assert client.docmd("XFORWARD", "PROTO=ESMTP HELO=c.example SOURCE=REMOTE")[0] == 250
        client.sendmail("x@example.org", ["b@example.net"], MESSAGE)
        client.sendmail("y@example.org", ["b@example.net"], MESSAGE)  # none this time
        assert client.docmd("XFORWARD", "NAME=gone.example")[0] == 250
        client.rset()  # RSET drops them
        client.docmd("MAIL", "FROM:<z@example.org>")
    first, second, third = (mail["xforward"] for mail in seen.mail)
    assert first == {
        "NAME": "c.example",
        "ADDR": "192.0.2.9",
        "PROTO": "ESMTP",
        "HELO": "c.example",
        "SOURCE": "REMOTE",
    }
    assert second == third == {}
    # XFORWARD names no new client: the session's peer stays the connection's.
    assert all(mail["peer"][0] == "127.0.0.1" for mail in seen.mail)
    envelope = proxy_server.wait_for_messages(2)[0].envelope
    assert envelope.xforward["NAME"] == "c.example"


def test_xforward_in_a_transaction_is_out_of_order(proxy_server: SmtpTestServer) -> None:
    with connect(proxy_server) as client:
        client.docmd("MAIL", "FROM:<x@example.org>")
        code, text = client.docmd("XFORWARD", "NAME=late.example")
        assert (code, text[:5]) == (503, b"5.5.1")
        assert client.docmd("XFORWARD", "IDENT=x SOURCE=NEARBY")[0] == 503  # order first


@pytest.mark.parametrize("argument", ["SOURCE=NEARBY", "ADDR=300.1.1.1", "LOGIN=x", ""])
def test_malformed_xforward_is_a_syntax_error(proxy_server: SmtpTestServer, argument: str) -> None:
    with connect(proxy_server) as client:
        code, text = client.docmd("XFORWARD", argument)
        assert (code, text[:5]) == (501, b"5.5.4"), text


@pytest.mark.skipif(POSTFIX is None, reason="postfix is not installed (scripts/install-peers)")
def test_postfix_forwards_its_client_with_xforward(seen: Seen) -> None:
    """Postfix relays to alephsmtp with ``smtp_send_xforward_command = yes``: it sends XFORWARD
    because EHLO listed it, with what its own smtpd knew of the client."""
    with SmtpTestServer(
        xforward_networks=LOOPBACK, on_session=seen.on_session, hostname="sink.test"
    ) as sink, private_postfix(
        relay_to(sink.port), {"smtpd": ""}, main_cf="smtp_send_xforward_command = yes\n"
    ) as postfix:  # fmt: skip
        with smtplib.SMTP("127.0.0.1", postfix.ports["smtpd"], timeout=30) as client:
            client.ehlo("client.example")
            client.sendmail("x@example.org", ["b@example.net"], MESSAGE)
        (message,) = sink.wait_for_messages(1, timeout=60)
    xforward = message.envelope.xforward
    assert xforward["HELO"] == "client.example"
    assert xforward["ADDR"] == "127.0.0.1"
    assert xforward["PROTO"] == "ESMTP"
    assert xforward["SOURCE"] == "REMOTE"  # it came over the network (not from sendmail)
    assert xforward["PORT"].isdigit()
    assert "NAME" in xforward
    assert message.data.endswith(b"\r\n\r\nhello\r\n")
