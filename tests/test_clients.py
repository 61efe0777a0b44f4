"""ESMTP against real clients on 127.0.0.1: smtplib, aiosmtplib, swaks, curl; real TLS (trustme)."""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from alephsmtp import SmtpServer

USERS = {"alice": "s3cret"}


class Sink:
    """Collects messages, with the session facts seen when each arrived."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.tls: list[Any] = []
        self.auth: list[str | None] = []
        self.arrived = asyncio.Event()

    def on_session(self, session: Any) -> None:
        def authenticate(sender: Any, e: Any) -> bool:
            return e.username in USERS and e.check_password(USERS[e.username])

        def message(sender: Any, e: Any) -> None:
            self.messages.append(e)
            self.tls.append(sender.tls)
            self.auth.append(sender.authenticated_as)
            self.arrived.set()

        session.auth += authenticate
        session.message_received += message


ServerFactory = Callable[..., Any]


@pytest.fixture
async def serve(server_context: ssl.SSLContext) -> AsyncIterator[ServerFactory]:
    servers: list[SmtpServer] = []

    async def start(**options: Any) -> tuple[SmtpServer, Sink]:
        sink = Sink()
        options.setdefault("hostname", "localhost")
        options.setdefault("tls_context", server_context)
        server = SmtpServer("127.0.0.1", 0, on_session=sink.on_session, **options)
        await server.start()
        servers.append(server)
        return server, sink

    yield start
    for server in servers:
        await server.stop(grace=2)
        assert [pool.in_use for pool in server.buffer_pools] == [0, 0]


BODY = b"Subject: hello\r\n\r\n.first line has a dot\r\nsecond\r\n"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
async def test_smtplib_starttls_then_auth(
    serve: ServerFactory, client_context: ssl.SSLContext, mechanism: str
) -> None:
    server, sink = await serve()

    def client() -> None:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            assert smtp.has_extn("starttls")
            assert not smtp.has_extn("auth")  # no AUTH over plaintext (RFC 4954 4)
            smtp.starttls(context=client_context)
            smtp.ehlo("client.test")
            assert not smtp.has_extn("starttls")
            assert smtp.esmtp_features["auth"].split() == ["PLAIN", "LOGIN", "CRAM-MD5"]
            smtp.user, smtp.password = "alice", "s3cret"
            method = {"PLAIN": smtp.auth_plain, "LOGIN": smtp.auth_login}.get(
                mechanism, smtp.auth_cram_md5
            )
            code, _ = smtp.auth(mechanism, method, initial_response_ok=mechanism == "PLAIN")
            assert code == 235
            smtp.sendmail("alice@example.org", ["bob@example.net"], BODY)

    await asyncio.to_thread(client)
    await asyncio.wait_for(sink.arrived.wait(), 5)
    assert sink.messages[0].message == BODY
    assert sink.auth == ["alice"]
    assert sink.messages[0].envelope.auth_identity == "alice"
    assert sink.messages[0].envelope.tls
    tls = sink.tls[0]
    assert tls.version in ("TLSv1.2", "TLSv1.3")
    assert tls.cipher


async def test_smtplib_wrong_password(serve: ServerFactory, client_context: ssl.SSLContext) -> None:
    # smtplib tries each mechanism offered: three failures, the last two delayed.
    server, _ = await serve(auth_failure_delay=0.1)

    def client() -> None:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
            smtp.starttls(context=client_context)
            with pytest.raises(smtplib.SMTPAuthenticationError) as info:
                smtp.login("alice", "nope")
            assert info.value.smtp_code == 535

    await asyncio.to_thread(client)


async def test_starttls_discards_pipelined_plaintext(
    serve: ServerFactory, client_context: ssl.SSLContext
) -> None:
    """CVE-2011-0411: a command injected after STARTTLS must never run."""
    server, sink = await serve()

    def client() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            stream = raw.makefile("rb")
            assert stream.readline().startswith(b"220 ")
            raw.sendall(b"EHLO evil.test\r\n")
            while not stream.readline().startswith(b"250 "):
                pass
            raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")
            assert stream.readline() == b"220 2.0.0 Ready to start TLS\r\n"
            with client_context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls_stream = tls.makefile("rb")
                # The session starts over (RFC 3207 4.2): MAIL needs a new EHLO, and the
                # injected MAIL was never answered.
                tls.sendall(b"MAIL FROM:<a@example.org>\r\nQUIT\r\n")
                return [tls_stream.readline(), tls_stream.readline()]

    replies = await asyncio.to_thread(client)
    assert replies == [b"503 5.5.1 Error: send HELO/EHLO first\r\n", b"221 2.0.0 Bye\r\n"]
    assert sink.messages == []


async def test_require_tls(serve: ServerFactory, client_context: ssl.SSLContext) -> None:
    server, sink = await serve(require_tls=True)

    def client() -> None:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
            smtp.ehlo()
            assert smtp.mail("a@example.org") == (530, b"5.7.0 Must issue a STARTTLS command first")
            smtp.rset()
            smtp.starttls(context=client_context)
            smtp.sendmail("a@example.org", ["b@example.net"], BODY)

    await asyncio.to_thread(client)
    await asyncio.wait_for(sink.arrived.wait(), 5)


async def test_implicit_tls_with_smtplib(
    serve: ServerFactory, client_context: ssl.SSLContext
) -> None:
    server, sink = await serve(implicit_tls=True)

    def client() -> None:
        with smtplib.SMTP_SSL("127.0.0.1", server.port, context=client_context, timeout=10) as s:
            s.ehlo()
            assert not s.has_extn("starttls")
            s.login("alice", "s3cret")
            s.sendmail("a@example.org", ["b@example.net"], BODY)

    await asyncio.to_thread(client)
    await asyncio.wait_for(sink.arrived.wait(), 5)
    assert sink.tls[0].version in ("TLSv1.2", "TLSv1.3")
    assert sink.auth == ["alice"]


async def test_aiosmtplib_starttls_auth_and_smtputf8(
    serve: ServerFactory, client_context: ssl.SSLContext
) -> None:
    server, sink = await serve()
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=server.port, tls_context=client_context, start_tls=True
    ) as smtp:
        await smtp.login("alice", "s3cret")
        await smtp.sendmail(
            "jörg@bücher.example",
            ["δοκιμή@παράδειγμα.example"],
            "Subject: ü\r\n\r\nü\r\n".encode(),
            mail_options=["SMTPUTF8"],
        )
    await asyncio.wait_for(sink.arrived.wait(), 5)
    envelope = sink.messages[0].envelope
    assert envelope.smtputf8
    assert envelope.return_path == "jörg@bücher.example"
    assert envelope.recipients == ["δοκιμή@παράδειγμα.example"]


async def test_smtplib_smtputf8(serve: ServerFactory) -> None:
    server, sink = await serve()

    def client() -> None:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
            smtp.ehlo()
            assert smtp.has_extn("smtputf8")
            smtp.sendmail(
                "jörg@example.org", ["ü@example.net"], b"x\r\n", mail_options=["SMTPUTF8"]
            )
            # Without SMTPUTF8 the same address is refused (RFC 6531 3.5).
            code, text = smtp.docmd("MAIL", "FROM:<jörg@example.org>")
            assert (code, text[:5]) == (553, b"5.6.7")

    await asyncio.to_thread(client)
    await asyncio.wait_for(sink.arrived.wait(), 5)
    assert sink.messages[0].envelope.recipients == ["ü@example.net"]


async def test_lmtp_with_smtplib() -> None:
    def on_session(session: Any) -> None:
        session.message_received += lambda s, e: [
            "452 4.2.2 Mailbox full" if r.local_part == "full" else "250 2.1.5 Delivered"
            for r in e.envelope.recipients
        ]

    server = SmtpServer("127.0.0.1", 0, on_session=on_session, lmtp=True, hostname="lmtp.test")
    async with server:

        def client() -> list[tuple[int, bytes]]:
            with smtplib.LMTP("127.0.0.1", server.port) as lmtp:
                code, _ = lmtp.ehlo()  # smtplib.LMTP sends LHLO
                assert code == 250
                assert lmtp.mail("a@example.org")[0] == 250
                for recipient in ("one@example.net", "full@example.net", "two@example.net"):
                    assert lmtp.rcpt(recipient)[0] == 250
                # RFC 2033 4.2: one reply per recipient after the message.
                replies = [lmtp.data(b"Subject: lmtp\r\n\r\nhi\r\n")]
                replies += [lmtp.getreply(), lmtp.getreply()]
                return replies

        replies = await asyncio.to_thread(client)
    assert replies == [
        (250, b"2.1.5 Delivered"),
        (452, b"4.2.2 Mailbox full"),
        (250, b"2.1.5 Delivered"),
    ]


async def test_large_message_over_starttls(
    serve: ServerFactory, client_context: ssl.SSLContext
) -> None:
    """Many TLS records per read: the TLS layer fills the pooled buffer in several steps."""
    server, sink = await serve()
    body = b"Subject: big\r\n\r\n" + b"".join(b"line %07d .\r\n..dot\r\n" % i for i in range(60000))

    def client() -> None:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
            smtp.starttls(context=client_context)
            smtp.sendmail("a@example.org", ["b@example.net"], body)

    await asyncio.to_thread(client)
    await asyncio.wait_for(sink.arrived.wait(), 10)
    assert sink.messages[0].message == body


async def test_bdat_on_a_real_socket(serve: ServerFactory) -> None:
    server, sink = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    await reader.readline()
    chunk = bytes(range(256)) * 300
    writer.write(
        b"EHLO x\r\nMAIL FROM:<a@example.org> BODY=BINARYMIME\r\nRCPT TO:<b@example.net>\r\n"
        + b"BDAT %d\r\n" % len(chunk)
        + chunk
        + b"BDAT %d LAST\r\n" % len(chunk)
        + chunk
        + b"QUIT\r\n"
    )
    await writer.drain()
    replies = (await asyncio.wait_for(reader.read(), 10)).split(b"\r\n")
    writer.close()
    assert [r[:3] for r in replies if r[3:4] == b" "] == [b"250"] * 5 + [b"221"]
    assert sink.messages[0].message == chunk * 2


needs_swaks = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@needs_swaks
async def test_swaks_pipelining_starttls_auth(serve: ServerFactory, ca_file: Path) -> None:
    server, sink = await serve()
    result = await asyncio.to_thread(
        _run,
        [
            "swaks", "--server", "127.0.0.1", "--port", str(server.port),
            "--from", "alice@example.org", "--to", "bob@example.net",
            "--tls", "--tls-ca-path", str(ca_file), "--tls-verify",
            "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", "s3cret",
            "--pipeline", "--header", "Subject: swaks", "--body", ".dot line",
        ],
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    await asyncio.wait_for(sink.arrived.wait(), 5)
    assert b"Subject: swaks" in sink.messages[0].message
    assert b"\r\n.dot line\r\n" in sink.messages[0].message
    assert sink.auth == ["alice"]
    assert sink.tls[0] is not None


@needs_curl
async def test_curl_starttls_and_auth(serve: ServerFactory, ca_file: Path, tmp_path: Path) -> None:
    server, sink = await serve()
    mail = tmp_path / "mail.txt"
    mail.write_bytes(b"Subject: curl\r\n\r\nsent by curl\r\n")
    result = await asyncio.to_thread(
        _run,
        [
            "curl", "--silent", "--show-error", f"smtp://localhost:{server.port}",
            "--connect-to", f"localhost:{server.port}:127.0.0.1:{server.port}",
            "--ssl-reqd", "--cacert", str(ca_file), "--user", "alice:s3cret",
            "--mail-from", "alice@example.org", "--mail-rcpt", "bob@example.net",
            "--upload-file", str(mail),
        ],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    await asyncio.wait_for(sink.arrived.wait(), 5)
    assert sink.messages[0].message == b"Subject: curl\r\n\r\nsent by curl\r\n"
    assert sink.auth == ["alice"]


def test_the_same_exchanges_on_uvloop(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """uvloop's transports are not asyncio's classes and hold buffer exports differently."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[bytes]:
        sink = Sink()
        server = SmtpServer(
            "127.0.0.1", 0, on_session=sink.on_session, tls_context=server_context,
            hostname="localhost",
        )  # fmt: skip
        async with server:
            assert "uvloop" in type(asyncio.get_running_loop()).__module__
            big = b"Subject: big\r\n\r\n" + b"".join(b"%06d .\r\n..x\r\n" % i for i in range(50000))
            async with aiosmtplib.SMTP(
                hostname="127.0.0.1", port=server.port, tls_context=client_context,
                start_tls=True,
            ) as smtp:  # fmt: skip
                await smtp.login("alice", "s3cret")
                await smtp.sendmail("a@example.org", ["b@example.net"], big)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            await reader.readline()
            writer.write(
                b"EHLO x\r\n"
                + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nhi\r\n.\r\n"
                * 20
                + b"QUIT\r\n"
            )
            await asyncio.wait_for(reader.read(), 10)
            writer.close()
        assert [pool.in_use for pool in server.buffer_pools] == [0, 0]
        assert sink.messages[0].message == big
        return [e.message for e in sink.messages[1:]]

    assert uvloop.run(main()) == [b"hi\r\n"] * 20
