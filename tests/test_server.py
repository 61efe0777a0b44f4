"""Real sockets on 127.0.0.1, real clients (smtplib, aiosmtplib, the CLI as a process)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import mailbox
import re
import smtplib
import subprocess
import sys
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from _cli import start_cli, stop_cli
from alephsmtp import SmtpServer
from alephsmtp.parser import IMPLEMENTATION


class Collector:
    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.event = asyncio.Event()

    def __call__(self, session: Any, e: Any) -> None:
        self.messages.append(e)
        self.event.set()


@pytest.fixture
async def server() -> AsyncIterator[tuple[SmtpServer, Collector]]:
    collector = Collector()

    def on_session(session: Any) -> None:
        session.message_received += collector

    srv = SmtpServer("127.0.0.1", 0, on_session=on_session, hostname="mx.test")
    async with srv:
        yield srv, collector
    command_pool, data_pool = srv.buffer_pools
    assert command_pool.in_use == 0
    assert data_pool.in_use == 0


async def test_seed_example_with_smtplib() -> None:
    clients: dict[Any, dict[str, Any]] = {}
    closed = asyncio.Event()

    def on_session(c: Any) -> None:
        clients[c] = {"recipients": []}
        c.ehlo += lambda sender, e: "550 not implemented\r\n"
        c.helo += lambda sender, e: "250 ok\r\n"

        def mail(sender: Any, e: Any) -> str:
            clients[sender]["return_path"] = e.command.return_path
            return "250 ok\r\n"

        def rcpt(sender: Any, e: Any) -> str:
            clients[sender]["recipients"].append(e.command.recipient_address)
            return "250 ok\r\n"

        def message(sender: Any, e: Any) -> str:
            clients[sender]["body"] = e.message
            return "250 ok\r\n"

        c.mail += mail
        c.rcpt += rcpt
        c.rset += lambda sender, e: "250 ok\r\n"
        c.data += lambda sender, e: "354 end data with <cr><lf>.<cr><lf>\r\n"
        c.message_received += message
        c.noop += lambda sender, e: "250 ok\r\n"
        c.quit += lambda sender, e: "221 closing connection\r\n"
        c.close_requested += lambda sender, e: closed.set()
        c.start_transaction("220 my.server.net\r\n")

    async with SmtpServer("127.0.0.1", 0, on_session=on_session) as srv:

        def client() -> Any:
            with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
                # EHLO is refused, so smtplib falls back to HELO, as with the seed.
                return smtp.sendmail(
                    "a@example.org",
                    ["b@example.net", "c@example.net"],
                    b"Subject: seed\r\n\r\nhello\r\n",
                )

        refused = await asyncio.to_thread(client)
        await asyncio.wait_for(closed.wait(), 5)
    assert refused == {}
    (state,) = clients.values()
    assert state["return_path"] == "a@example.org"
    assert state["recipients"] == ["b@example.net", "c@example.net"]
    assert state["body"] == b"Subject: seed\r\n\r\nhello\r\n"


async def test_smtplib_dot_lines_and_8bit(server: tuple[SmtpServer, Collector]) -> None:
    srv, collector = server
    body = b"Subject: dots\r\n\r\n.\r\n..\r\n.starts with a dot\r\n\xe2\x82\xac 8-bit\r\nend\r\n"

    def client() -> None:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            assert smtp.has_extn("pipelining")
            assert smtp.has_extn("enhancedstatuscodes")
            assert smtp.has_extn("8bitmime")
            assert smtp.esmtp_features["size"] == str(32 << 20)
            smtp.sendmail("a@example.org", ["b@example.net"], body, mail_options=["BODY=8BITMIME"])

    await asyncio.to_thread(client)
    await asyncio.wait_for(collector.event.wait(), 5)
    (e,) = collector.messages
    assert e.message == body
    assert e.envelope.helo_name == "client.test"
    assert e.envelope.peer[0] == "127.0.0.1"
    # smtplib declares the size (RFC 1870) since the server offers SIZE.
    assert e.envelope.mail_parameters == {"SIZE": str(len(body)), "BODY": "8BITMIME"}


async def test_aiosmtplib_20_mib_message(server: tuple[SmtpServer, Collector]) -> None:
    srv, collector = server
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b".\r\n"  # 75 octets a line
    chunk = b".dot-led line\r\n" + line * 1000
    body = b"Subject: big\r\n\r\n" + chunk * (20 * 1024 * 1024 // len(chunk) + 1)
    assert len(body) > 20 * 1024 * 1024
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=srv.port, timeout=60) as smtp:
        await smtp.sendmail("a@example.org", ["b@example.net"], body)
    await asyncio.wait_for(collector.event.wait(), 10)
    assert collector.messages[0].message == body


async def test_aiosmtplib_email_message_and_errors(server: tuple[SmtpServer, Collector]) -> None:
    srv, collector = server
    message = EmailMessage()
    message["From"] = "a@example.org"
    message["To"] = "b@example.net"
    message["Subject"] = "über"
    message.set_content("Grüße\n.\n..\n")
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=srv.port) as smtp:
        await smtp.send_message(message)
        response = await smtp.execute_command(b"BOGUS")
        assert (response.code, response.message) == (500, "5.5.1 Error: command not recognized")
        response = await smtp.execute_command(b"MAIL", b"FROM:<not valid>")
        assert (response.code, response.message[:5]) == (501, "5.1.7")
        assert (await smtp.noop()).code == 250
    await asyncio.wait_for(collector.event.wait(), 5)
    parsed = email.message_from_bytes(collector.messages[0].message, policy=email.policy.default)
    assert parsed["Subject"] == "über"
    assert parsed.get_content() == "Grüße\r\n.\r\n..\r\n"  # 8-bit content, CRLF lines


async def test_fifty_pipelined_transactions_on_one_connection(
    server: tuple[SmtpServer, Collector],
) -> None:
    srv, collector = server
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    assert (await reader.readline()).startswith(b"220 ")
    writer.write(b"EHLO pipeliner.test\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    # RFC 2920: the client may send a whole group; DATA's 354 is waited for per message,
    # but here the whole stream is sent at once, the way a bulk sender does it.
    stream = b"".join(
        b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r%d@example.net>\r\nDATA\r\n"
        b"Subject: %d\r\n\r\n.body %d\r\n.\r\n" % (i, i, i)
        for i in range(50)
    )
    writer.write(stream + b"QUIT\r\n")
    await writer.drain()
    replies = (await asyncio.wait_for(reader.read(), 10)).decode().split("\r\n")[:-1]
    writer.close()
    assert [r[:3] for r in replies] == ["250", "250", "354", "250"] * 50 + ["221"]
    assert [m.message for m in collector.messages] == [
        b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(50)
    ]
    assert [m.envelope.recipients for m in collector.messages] == [
        [f"r{i}@example.net"] for i in range(50)
    ]


async def test_many_concurrent_clients(server: tuple[SmtpServer, Collector]) -> None:
    srv, collector = server

    async def one(i: int) -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=srv.port) as smtp:
            await smtp.sendmail("a@example.org", [f"r{i}@example.net"], b"n=%d\r\n" % i)

    await asyncio.gather(*(one(i) for i in range(40)))
    assert sorted(m.message for m in collector.messages) == sorted(
        b"n=%d\r\n" % i for i in range(40)
    )


async def test_close_sends_421_to_idle_sessions() -> None:
    srv = SmtpServer("127.0.0.1", 0)
    await srv.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    await reader.readline()
    writer.write(b"EHLO x\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    await srv.stop(grace=5)
    assert await reader.readline() == b"421 4.3.2 Service shutting down, closing connection\r\n"
    assert await reader.read() == b""
    assert not srv.is_serving
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", srv.port)
    writer.close()


async def test_listen_inside_a_running_loop() -> None:
    srv = SmtpServer("127.0.0.1", 0)
    got: list[bytes] = []
    srv.listen(lambda s: s.message_received.connect(lambda sender, e: got.append(e.message)))
    for _ in range(100):
        if srv.is_serving:
            break
        await asyncio.sleep(0.01)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=srv.port) as smtp:
        await smtp.sendmail("a@example.org", ["b@example.net"], b"x\r\n")
    await srv.stop()
    assert got == [b"x\r\n"]


def test_cli_prints_messages() -> None:
    process, port = start_cli()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            code, banner = smtp.ehlo()
            assert code == 250
            assert banner.startswith(b"cli.test")
            smtp.sendmail(
                "from@example.org", ["to@example.net"], b"Subject: cli\r\n\r\nprinted body\r\n"
            )
    finally:
        out = stop_cli(process)
    assert "MAIL FROM: <from@example.org>" in out
    assert "RCPT TO: <to@example.net>" in out
    assert "Subject: cli\n\nprinted body\n" in out


def test_cli_maildir(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    process, port = start_cli("--maildir", str(maildir))
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.sendmail(
                "from@example.org", ["to@example.net"], b"Subject: stored\r\n\r\nin a maildir\r\n"
            )
    finally:
        stop_cli(process)
    (message,) = list(mailbox.Maildir(maildir, create=False))
    assert message["Subject"] == "stored"
    assert message["Return-Path"] == "<from@example.org>"
    assert message["Delivered-To"] == "to@example.net"
    assert message.get_payload() == "in a maildir\n"


def test_cli_reports_a_port_in_use() -> None:
    process, port = start_cli()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "alephsmtp", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=20,
        )
    finally:
        stop_cli(process)
    assert result.returncode == 2
    assert "cannot listen" in result.stderr


def test_cli_version_names_the_parser() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "alephsmtp", "--version"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    assert IMPLEMENTATION in result.stdout


async def _greeting(port: int) -> tuple[bytes, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return await reader.readline(), writer


async def test_connection_limits() -> None:
    async with SmtpServer("127.0.0.1", 0, max_connections=2) as srv:
        first, w1 = await _greeting(srv.port)
        second, w2 = await _greeting(srv.port)
        third, w3 = await _greeting(srv.port)
        assert first.startswith(b"220 ")
        assert second.startswith(b"220 ")
        assert third == b"421 4.7.0 Too many connections, try again later\r\n"
        w1.close()
        await w1.wait_closed()
        for _ in range(100):  # the slot frees once the server saw the close
            if len(srv.sessions) == 1:
                break
            await asyncio.sleep(0.01)
        fourth, w4 = await _greeting(srv.port)
        assert fourth.startswith(b"220 ")
        for writer in (w2, w3, w4):
            writer.close()


async def test_connection_limit_per_ip_with_loopback_not_exempt() -> None:
    async with SmtpServer(
        "127.0.0.1", 0, max_connections_per_ip=1, connection_limit_exempt=()
    ) as srv:
        first, w1 = await _greeting(srv.port)
        second, w2 = await _greeting(srv.port)
        assert first.startswith(b"220 ")
        assert second == b"421 4.7.0 Too many connections from your address\r\n"
        w1.close()
        w2.close()
    async with SmtpServer("127.0.0.1", 0, max_connections_per_ip=1) as srv:
        # Loopback is exempt by default, as Postfix exempts $mynetworks.
        first, w1 = await _greeting(srv.port)
        second, w2 = await _greeting(srv.port)
        assert second.startswith(b"220 ")
        w1.close()
        w2.close()


async def test_logs_name_the_session_and_never_hold_bodies_or_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def on_session(session: Any) -> None:
        session.auth += lambda s, e: e.check_password("hunter2-secret")

    body = b"Subject: private\r\n\r\nthe-secret-body-text\r\n"
    async with SmtpServer("127.0.0.1", 0, on_session=on_session, auth_over_plaintext=True) as srv:
        with caplog.at_level(logging.DEBUG, logger="alephsmtp"):
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=srv.port) as smtp:
                with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                    await smtp.login("alice", "wrong-secret")
                await smtp.login("alice", "hunter2-secret")
                await smtp.sendmail("a@example.org", ["b@example.net"], body)
    text = caplog.text
    assert "authentication failed for 'alice'" in text
    assert "authenticated as 'alice'" in text
    assert re.search(r"session \d+ \[127\.0\.0\.1:\d+\]", text)
    for secret in ("hunter2-secret", "wrong-secret", "the-secret-body-text", "aHVudGVy"):
        assert secret not in text


async def test_metrics_count_and_the_hook_sees_each_change() -> None:
    seen: list[tuple[str, int, int | None]] = []

    def hook(name: str, amount: int, code: int | None) -> None:
        seen.append((name, amount, code))
        if name == "connections_closed":
            raise RuntimeError("a broken exporter must not break the server")

    async with SmtpServer("127.0.0.1", 0, metrics_hook=hook) as srv:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=srv.port) as smtp:
            await smtp.sendmail("a@example.org", ["b@example.net"], b"x" * 98 + b"\r\n")
            await smtp.execute_command(b"BOGUS")
            await smtp.execute_command(b"RCPT", b"TO:<b@example.net>")
        for _ in range(100):
            if srv.metrics.connections == 0:
                break
            await asyncio.sleep(0.01)
        metrics = srv.metrics
    assert (metrics.connections_opened, metrics.connections_closed) == (1, 1)
    assert (metrics.messages, metrics.message_bytes) == (1, 100)
    assert metrics.rejections == {500: 1, 503: 1}
    assert ("messages", 1, None) in seen
    assert ("rejections", 1, 503) in seen


def test_cli_reports_a_bad_certificate(tmp_path: Path) -> None:
    bad = tmp_path / "cert.pem"
    bad.write_text("not a certificate\n", encoding="ascii")
    result = subprocess.run(
        [sys.executable, "-m", "alephsmtp", "--port", "0", "--tls-cert", str(bad)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"alephsmtp: cannot load the TLS certificate {bad}")
    assert "Traceback" not in result.stderr
