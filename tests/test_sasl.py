"""SASL beyond passwords: XOAUTH2, OAUTHBEARER (RFC 7628), EXTERNAL (a TLS client certificate),
mechanisms of one's own, and AUTH exchanges run by a handler (aiosmtpd's ``handle_AUTH``)."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiosmtplib
import pytest
import trustme

from _harness import Harness, MockLoop, settle
from alephsmtp import SmtpServer
from alephsmtp.auth import Credentials, SaslContext, SaslExchange, register_mechanism

TOKEN = "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="

# RFC 7628 4.1 and 4.3, the examples (host server.example.com, port 587).
RFC7628_REQUEST = (
    "bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9NTg3AWF1dGg9QmVhcmVyIHZG"
    "OWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB"
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def oauth_harness(good_token: str = TOKEN, **options: Any) -> tuple[Harness, list[Any]]:
    seen: list[Any] = []

    def on_session(s: Any) -> None:
        def check(sender: Any, e: Any) -> bool:
            seen.append((e.mechanism, e.username, e.token, e.password))
            return e.token == good_token

        s.auth += check

    options.setdefault("auth_mechanisms", ("PLAIN", "XOAUTH2", "OAUTHBEARER"))
    h = Harness(on_session, auth_over_plaintext=True, **options)
    h.send(b"EHLO client.example\r\n")
    assert "250-AUTH PLAIN XOAUTH2 OAUTHBEARER" in h.replies()
    return h, seen


def test_the_rfc_7628_oauthbearer_example_parses() -> None:
    exchange = SaslExchange("OAUTHBEARER", SaslContext("server.example.com"))
    credentials = exchange.step(RFC7628_REQUEST)
    assert isinstance(credentials, Credentials)
    assert (credentials.username, credentials.token) == ("user@example.com", TOKEN)
    assert credentials.password is None
    assert not credentials.check_password(TOKEN)  # a token is not a password


async def test_oauthbearer_accepted_as_in_rfc_7628_4_1() -> None:
    h, seen = oauth_harness()
    h.send(f"AUTH OAUTHBEARER {RFC7628_REQUEST}\r\n".encode())
    assert h.replies() == ["235 2.7.0 Authentication successful"]
    assert h.session.authenticated_as == "user@example.com"
    assert seen == [("OAUTHBEARER", "user@example.com", TOKEN, None)]


async def test_oauthbearer_refused_as_in_rfc_7628_4_3() -> None:
    """A refusal is an error JSON in a 334, answered with ^A, then 535 (RFC 7628 3.2.2)."""
    h, _ = oauth_harness(good_token="another")
    h.send(f"AUTH OAUTHBEARER {RFC7628_REQUEST}\r\n".encode())
    (challenge,) = h.replies()
    assert challenge.startswith("334 ")
    assert b'"status": "invalid_token"' in base64.b64decode(challenge[4:])
    h.send(b"AQ==\r\n")
    assert h.replies() == ["535 5.7.8 Authentication credentials invalid"]
    assert h.session.authenticated_as is None
    h.send(b"NOOP\r\n")  # the exchange is over
    assert h.replies() == ["250 2.0.0 OK"]


@pytest.mark.parametrize(
    "request_text",
    [
        b"n,a=user@example.com,\x01auth=Basic abc\x01\x01",  # not a bearer token
        b"p=tls-unique,,\x01auth=Bearer abc\x01\x01",  # channel binding: not offered
        b"n,a=user@example.com,host=x",  # no ^A after the GS2 header
    ],
)
async def test_malformed_oauthbearer_gets_501(request_text: bytes) -> None:
    h, seen = oauth_harness()
    h.send(f"AUTH OAUTHBEARER {b64(request_text)}\r\n".encode())
    assert h.replies() == ["501 5.5.2 Malformed OAUTHBEARER response"]
    assert seen == []


@pytest.fixture(scope="module")
def pki() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_server(
    pki: trustme.CA,
) -> AsyncIterator[tuple[SmtpServer, ssl.SSLContext, list[Any]]]:
    """A server offering XOAUTH2 and EXTERNAL over STARTTLS, asking for client certificates."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.issue_cert("localhost", "127.0.0.1").configure_cert(server_context)
    server_context.verify_mode = ssl.CERT_OPTIONAL  # a client certificate if offered
    pki.configure_trust(server_context)
    seen: list[Any] = []

    def on_session(session: Any) -> None:
        def check(sender: Any, e: Any) -> bool:
            seen.append((e.mechanism, e.username))
            if e.mechanism == "EXTERNAL":
                return e.certificate is not None and e.username == "client.example"
            return e.token == TOKEN

        session.auth += check

    server = SmtpServer(
        "127.0.0.1",
        0,
        on_session=on_session,
        hostname="localhost",
        tls_context=server_context,
        auth_mechanisms=("XOAUTH2", "EXTERNAL"),
        auth_failure_delay=0,
    )
    client_context = ssl.create_default_context()
    pki.configure_trust(client_context)
    async with server:
        yield server, client_context, seen


async def test_xoauth2_with_aiosmtplib(
    tls_server: tuple[SmtpServer, ssl.SSLContext, list[Any]],
) -> None:
    server, client_context, seen = tls_server
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=server.port, tls_context=client_context, start_tls=True
    ) as client:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
            await client.auth_xoauth2("alice@example.org", "expired")
        assert refused.value.code == 535  # after the error challenge, answered empty
        await client.auth_xoauth2("alice@example.org", TOKEN)
        await client.sendmail("alice@example.org", ["b@example.net"], b"Subject: t\r\n\r\nx\r\n")
    assert seen == [("XOAUTH2", "alice@example.org"), ("XOAUTH2", "alice@example.org")]


async def test_external_with_a_client_certificate(
    tls_server: tuple[SmtpServer, ssl.SSLContext, list[Any]], pki: trustme.CA
) -> None:
    server, client_context, seen = tls_server
    # Without a certificate EXTERNAL is not offered at all.
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=server.port, tls_context=client_context, start_tls=True
    ) as client:
        await client.ehlo()
        assert client.esmtp_extensions["auth"].split() == ["XOAUTH2"]
    pki.issue_cert("client.example").configure_cert(client_context)
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=server.port, tls_context=client_context, start_tls=True
    ) as client:
        await client.ehlo()
        assert client.esmtp_extensions["auth"].split() == ["XOAUTH2", "EXTERNAL"]
        code, _ = await client.execute_command(b"AUTH", b"EXTERNAL", b"=")
        assert code == 235
    assert seen == [("EXTERNAL", "client.example")]


class _Rot13:
    """A toy mechanism of one's own: the client sends user:rot13(password)."""

    def __init__(self, context: SaslContext) -> None:
        self.asked = False

    def step(self, response: bytes | None) -> bytes | Credentials:
        if response is None:
            self.asked = True
            return b"who are you?"
        user, _, secret = response.decode().partition(":")
        return Credentials("X-ROT13", user, secret.translate(_ROT13))

    def failure(self) -> bytes | None:
        return None


_ROT13 = str.maketrans(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    "NOPQRSTUVWXYZABCDEFGHIJKLMnopqrstuvwxyzabcdefghijklm",
)


async def test_a_registered_mechanism_runs_as_a_built_in_one() -> None:
    register_mechanism("X-ROT13", _Rot13)

    def on_session(s: Any) -> None:
        s.auth += lambda sender, e: e.check_password("secret")

    h = Harness(on_session, auth_over_plaintext=True, auth_mechanisms=("X-ROT13",))
    h.send(b"EHLO c\r\n")
    assert "250-AUTH X-ROT13" in h.replies()
    h.send(b"AUTH X-ROT13\r\n")
    assert h.replies() == [f"334 {b64(b'who are you?')}"]
    h.send(f"{b64(b'alice:frperg')}\r\n".encode())
    assert h.replies() == ["235 2.7.0 Authentication successful"]
    assert h.session.authenticated_as == "alice"


async def test_an_unknown_mechanism_is_not_offered_without_an_auth_command_handler() -> None:
    h = Harness(
        lambda s: s.auth.connect(lambda sender, e: True),
        auth_over_plaintext=True,
        auth_mechanisms=("PLAIN", "X-NOBODY"),
    )
    h.send(b"EHLO c\r\nAUTH X-NOBODY\r\n")
    replies = h.replies()
    assert "250-AUTH PLAIN" in replies
    assert replies[-1] == "504 5.5.4 Unrecognized authentication type"


async def test_an_auth_command_handler_runs_its_own_exchange() -> None:
    """aiosmtpd's handle_AUTH / auth_XXX: the handler sends challenges and judges."""

    async def exchange(sender: Any, e: Any) -> str | None:
        if e.mechanism != "X-CHALLENGE":
            return None  # the built-in mechanisms run as usual
        first = await sender.sasl_challenge(b"name?")
        second = await sender.sasl_challenge(b"word?")
        if base64.b64decode(first) == b"alice" and base64.b64decode(second) == b"open":
            e.identity = "alice"
            return "235 2.7.0 Welcome"
        return "535 5.7.8 No"

    def on_session(s: Any) -> None:
        s.auth_command += exchange
        s.auth += lambda sender, e: e.check_password("s3cret")

    h = Harness(on_session, auth_over_plaintext=True, auth_mechanisms=("PLAIN", "X-CHALLENGE"))
    h.send(b"EHLO c\r\n")
    assert "250-AUTH PLAIN X-CHALLENGE" in h.replies()
    h.send(b"AUTH X-CHALLENGE\r\n")
    await settle()
    assert h.replies() == [f"334 {b64(b'name?')}"]
    h.send(f"{b64(b'alice')}\r\n".encode())
    await settle()
    assert h.replies() == [f"334 {b64(b'word?')}"]
    h.send(f"{b64(b'open')}\r\nNOOP\r\n".encode())  # NOOP waits for the AUTH's reply
    await settle()
    assert h.replies() == ["235 2.7.0 Welcome", "250 2.0.0 OK"]
    assert h.session.authenticated_as == "alice"


async def test_the_client_s_turn_in_a_handler_s_exchange_is_timed_as_a_command() -> None:
    """While sasl_challenge() waits for the client, idle_timeout applies (the client's time),
    not handler_timeout (the handler's): a slow typist is not a slow handler."""

    async def exchange(sender: Any, e: Any) -> str:
        answer = await sender.sasl_challenge(b"name?")
        if base64.b64decode(answer) != b"alice":
            return "535 5.7.8 No"
        e.identity = "alice"
        return "235 2.7.0 Welcome"

    loop = MockLoop()
    h = Harness(
        lambda s: s.auth_command.connect(exchange),
        loop=loop,
        auth_over_plaintext=True,
        auth_mechanisms=("X-CHALLENGE",),
        handler_timeout=5,
        idle_timeout=60,
    )
    h.send(b"EHLO c\r\nAUTH X-CHALLENGE\r\n")
    await settle()
    h.output()
    loop.advance(30)  # past handler_timeout, within idle_timeout
    await settle()
    assert h.replies() == []
    h.send(f"{b64(b'alice')}\r\n".encode())
    await settle()
    assert h.replies() == ["235 2.7.0 Welcome"]
    h.send(b"AUTH X-CHALLENGE\r\n")  # answered already: 503
    loop.advance(61)
    await settle()
    assert h.replies()[-1] == "421 4.4.2 Error: timeout exceeded"


async def test_auth_served_only_by_an_auth_command_handler_asks_for_tls_first() -> None:
    h = Harness(
        lambda s: s.auth_command.connect(lambda sender, e: "235 2.7.0 ok"),
        auth_mechanisms=("X-CHALLENGE",),
        tls_context=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH),
    )
    h.send(b"EHLO c\r\nAUTH X-CHALLENGE\r\n")
    assert h.replies()[-1].startswith("538 5.7.11 ")


async def test_an_auth_command_handler_exchange_cancelled_with_a_star() -> None:
    outcomes: list[str] = []

    async def exchange(sender: Any, e: Any) -> str:
        try:
            await sender.sasl_challenge(b"name?")
        except Exception as error:
            outcomes.append(type(error).__name__)
            raise
        return "535 5.7.8 No"

    h = Harness(
        lambda s: s.auth_command.connect(exchange),
        auth_over_plaintext=True,
        auth_mechanisms=("X-CHALLENGE",),
    )
    h.send(b"EHLO c\r\nAUTH X-CHALLENGE\r\n")
    await settle()
    h.output()
    h.send(b"*\r\n")
    await settle()
    assert h.replies() == ["501 5.0.0 Authentication cancelled"]
    assert outcomes == ["AuthCancelled"]


async def test_an_auth_command_handler_may_pass_to_the_built_in_mechanism() -> None:
    async def passes(sender: Any, e: Any) -> None:
        await asyncio.sleep(0)

    def on_session(s: Any) -> None:
        s.auth_command += passes
        s.auth += lambda sender, e: e.check_password("s3cret")

    h = Harness(on_session, auth_over_plaintext=True)
    h.send(b"EHLO c\r\n")
    h.output()
    credentials = b64(b"\0alice\0s3cret")
    h.send(f"AUTH PLAIN {credentials}\r\n".encode())
    await settle()
    assert h.replies() == ["235 2.7.0 Authentication successful"]
