"""Relaying over STARTTLS to a real upstream alephsmtp server whose certificate comes from a
test CA (trustme): untrusted, the client is told ``451 4.7.0`` (never "unreachable", never a
bounce) and the reason is logged; trusted through ``tls_context`` / ``--relay-ca-file``, the
message goes through encrypted. Both relay clients, and the CLI as a process."""

from __future__ import annotations

import logging
import smtplib
import ssl
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from _cli import start_cli
from alephsmtp import SmtpServer
from alephsmtp.handlers import Relay
from alephsmtp.testing import SmtpTestServer

MESSAGE = b"Subject: relayed\r\n\r\nover TLS\r\n"


@pytest.fixture
def upstream() -> Any:
    with SmtpTestServer(tls=True, require_tls=True) as server:
        yield server


async def relay_once(relay: Relay) -> aiosmtplib.SMTPResponse | aiosmtplib.SMTPDataError:
    """One message through an alephsmtp server whose only handler is ``relay``."""

    def on_session(session: Any) -> None:
        session.message_received += relay

    async with (
        SmtpServer("127.0.0.1", 0, on_session=on_session, hostname="relay.test") as srv,
        aiosmtplib.SMTP(hostname="127.0.0.1", port=srv.port, timeout=30) as client,
    ):
        try:
            _, response = await client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
        except aiosmtplib.SMTPDataError as refused:
            return refused
    return aiosmtplib.SMTPResponse(250, response)


@pytest.mark.parametrize("client", ["aiosmtplib", "smtplib"])
async def test_an_untrusted_upstream_certificate_is_a_temporary_security_failure(
    upstream: SmtpTestServer, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    relay = Relay("127.0.0.1", upstream.port, starttls=True, client=client, timeout=20)
    with caplog.at_level(logging.INFO, logger="alephsmtp"):
        outcome = await relay_once(relay)
    assert isinstance(outcome, aiosmtplib.SMTPDataError)
    assert outcome.code == 451
    assert outcome.message.startswith("4.7.0 ")
    assert "certificate" in outcome.message
    assert upstream.messages == []
    relay_lines = [r.getMessage() for r in caplog.records if r.name == "alephsmtp.handlers"]
    assert any("certificate verify failed" in line for line in relay_lines), relay_lines


@pytest.mark.parametrize("client", ["aiosmtplib", "smtplib"])
async def test_an_upstream_trusted_through_tls_context_gets_the_message(
    upstream: SmtpTestServer, client: Any
) -> None:
    assert upstream.ca_pem is not None
    context = ssl.create_default_context(cadata=upstream.ca_pem.decode("ascii"))
    relay = Relay(
        "127.0.0.1", upstream.port, starttls=True, tls_context=context, client=client, timeout=20
    )
    outcome = await relay_once(relay)
    assert not isinstance(outcome, aiosmtplib.SMTPDataError), outcome
    (relayed,) = upstream.messages
    assert relayed.tls is not None
    assert relayed.data.endswith(MESSAGE)


def test_cli_relay_ca_file(upstream: SmtpTestServer, tmp_path: Path) -> None:
    assert upstream.ca_pem is not None
    ca_file = tmp_path / "upstream-ca.pem"
    ca_file.write_bytes(upstream.ca_pem)
    relay = ("--relay", f"127.0.0.1:{upstream.port}", "--relay-starttls")

    # Not trusted: the system's CAs do not know the test CA.
    process, port = start_cli(*relay)
    try:
        with (
            smtplib.SMTP("127.0.0.1", port, timeout=30) as client,
            pytest.raises(smtplib.SMTPDataError) as refused,
        ):
            client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    finally:
        process.terminate()
        _, log = process.communicate(timeout=10)
    assert refused.value.smtp_code == 451
    assert refused.value.smtp_error.startswith(b"4.7.0 ")
    assert "certificate verify failed" in log, log
    assert upstream.messages == []

    # Trusted through --relay-ca-file.
    process, port = start_cli(*relay, "--relay-ca-file", str(ca_file))
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    finally:
        process.terminate()
        process.communicate(timeout=10)
    (relayed,) = upstream.messages
    assert relayed.tls is not None
    assert relayed.data.endswith(MESSAGE)
