"""MailAuth on real sessions: a real server on loopback, real clients (aiosmtplib, and a raw
socket for the PROXY header), DNS from dnsmasq serving the test zone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

pytest.importorskip("dkim", reason="the mailauth extra is not installed")

import aiosmtplib
import dkim

from _mailauth import Zone, message, running_zone
from alephsmtp import SmtpServer
from alephsmtp.mailauth import AuthResults, DnsResolver, MailAuth, StaticResolver


@pytest.fixture(scope="module")
def zone() -> Iterator[Zone]:
    yield from running_zone()


@pytest.fixture(scope="module")
def resolver(zone: Zone) -> DnsResolver:
    return DnsResolver(["127.0.0.1"], port=zone.dns.port, timeout=5.0)


class Received:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.results: list[AuthResults] = []
        self.chunks: list[bytes] = []

    def __call__(self, session: Any, e: Any) -> None:
        self.messages.append(e.message)
        self.results.append(e.envelope.auth_results)


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    servers: list[SmtpServer] = []

    async def start(
        auth: MailAuth, *, stream: bool = False, **options: Any
    ) -> tuple[int, Received]:
        received = Received()

        def on_session(session: Any) -> None:
            auth.attach(session)
            if stream:
                session.message_chunk += lambda s, e: received.chunks.append(e.chunk)
            session.message_received += received

        server = SmtpServer("127.0.0.1", 0, hostname="mx.test", **options)
        await server.start(on_session)
        servers.append(server)
        return server.port, received

    yield start
    for server in servers:
        await server.stop()


def sign(zone: Zone, data: bytes, domain: str) -> bytes:
    signature: bytes = dkim.sign(data, b"sel", domain.encode(), zone.key.read_bytes())
    return signature + data


async def send(port: int, sender: str, data: bytes, helo: str = "client.test") -> Any:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname=helo) as client:
        return await client.sendmail(sender, ["bob@example.org"], data)


async def test_annotates_and_records(zone: Zone, resolver: DnsResolver, serve: Any) -> None:
    port, received = await serve(MailAuth(resolver))
    data = sign(zone, message(author="a@reject.test"), "reject.test")
    await send(port, "bounces@reject.test", data, helo="helo.test")
    [stored] = received.messages
    [results] = received.results
    assert stored.startswith(b"Authentication-Results: mx.test;\r\n\t")
    assert stored.endswith(data)
    assert results.spf is not None
    assert (results.spf.result, results.spf.domain, results.spf.client_ip) == (
        "pass",
        "reject.test",
        "127.0.0.1",
    )
    assert results.spf_helo is not None
    assert results.spf_helo.result == "pass"
    assert [(d.result, d.domain, d.selector) for d in results.dkim] == [
        ("pass", "reject.test", "sel")
    ]
    assert results.arc is not None
    assert results.arc.result == "none"
    assert results.dmarc is not None
    assert (results.dmarc.result, results.dmarc.policy) == ("pass", "reject")


async def test_forged_header_is_replaced(zone: Zone, resolver: DnsResolver, serve: Any) -> None:
    port, received = await serve(MailAuth(resolver))
    forged = b"Authentication-Results: mx.test; dmarc=pass header.from=reject.test\r\n"
    await send(port, "a@fail.test", forged + message(author="a@reject.test"))
    [stored] = received.messages
    assert stored.count(b"Authentication-Results: mx.test") == 1
    assert b"dmarc=fail" in stored


async def test_enforce_rejects_per_dmarc(zone: Zone, resolver: DnsResolver, serve: Any) -> None:
    port, received = await serve(MailAuth(resolver, policy="enforce"))
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(port, "a@fail.test", message(author="ceo@reject.test"))
    assert refused.value.code == 550
    assert refused.value.message.startswith("5.7.1 ")
    assert received.messages == []
    # quarantine and none are accepted; the disposition is on the envelope
    await send(port, "a@fail.test", message(author="a@quarantine.test"))
    await send(port, "a@fail.test", message(author="a@example.test"))
    assert [r.dmarc.disposition for r in received.results if r.dmarc] == ["quarantine", "none"]
    # annotate (the default) never refuses
    port, received = await serve(MailAuth(resolver))
    await send(port, "a@fail.test", message(author="ceo@reject.test"))
    assert received.results[0].dmarc is not None
    assert received.results[0].dmarc.result == "fail"


async def test_dns_failure_is_a_tempfail_never_a_bounce(zone: Zone, serve: Any) -> None:
    failing = StaticResolver(
        {("_dmarc.reject.test", "TXT"): ["v=DMARC1; p=reject"]},
        failures=[("reject.test", "TXT"), ("sel._domainkey.reject.test", "TXT")],
    )
    port, _ = await serve(MailAuth(failing, policy="enforce"))
    data = sign(zone, message(author="a@reject.test"), "reject.test")
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(port, "a@reject.test", data)
    assert refused.value.code == 451
    assert refused.value.message.startswith("4.7.5 ")
    failing = StaticResolver(failures=[("_dmarc.reject.test", "TXT")])
    port, _ = await serve(MailAuth(failing, policy="enforce"))
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(port, "a@reject.test", message(author="a@reject.test"))
    assert refused.value.code == 451


async def test_streamed_message_is_verified_as_it_arrives(
    zone: Zone, resolver: DnsResolver, serve: Any
) -> None:
    port, received = await serve(MailAuth(resolver), stream=True, max_message_size=64 << 20)
    line = b"streamed body line with  some   spaces\t\r\n"
    data = sign(
        zone, message(author="a@reject.test", body=line * ((10 << 20) // len(line))), "reject.test"
    )
    await send(port, "a@reject.test", data)
    assert b"".join(received.chunks) == data
    assert len(received.chunks) > 1
    [results] = received.results
    assert [d.result for d in results.dkim] == ["pass"]
    assert results.dmarc is not None
    assert results.dmarc.result == "pass"
    # The header cannot be prepended to a streamed message: it is on the results.
    assert received.messages == [b""]
    assert results.header().startswith(b"Authentication-Results: mx.test;")
    # A second transaction on another connection, tampered: fails
    await send(port, "a@reject.test", data.replace(b"some   spaces", b"some   spices", 1))
    assert [d.result for d in received.results[1].dkim] == ["fail"]


async def test_client_address_from_proxy_header(resolver: DnsResolver, serve: Any) -> None:
    port, received = await serve(MailAuth(resolver, methods=["spf"]), proxy_protocol=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # PROXY v1 from a trusted loopback balancer: the client is 127.0.0.9, which
    # example.test's SPF (ip4:127.0.0.1) does not allow.
    writer.write(b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 25\r\n")
    lines = [b"EHLO client.test", b"MAIL FROM:<a@example.test>", b"RCPT TO:<b@example.org>"]
    await reader.readline()
    for line in lines:
        writer.write(line + b"\r\n")
        while (reply := await reader.readline())[3:4] == b"-":
            pass
        assert reply[:1] == b"2", reply
    writer.write(b"DATA\r\n")
    assert (await reader.readline())[:3] == b"354"
    writer.write(message() + b".\r\n")
    assert (await reader.readline())[:3] == b"250"
    writer.write(b"QUIT\r\n")
    await reader.readline()
    writer.close()
    [results] = received.results
    assert results.spf is not None
    assert (results.spf.result, results.spf.client_ip) == ("fail", "127.0.0.9")
    assert results.dkim == []
    assert results.dmarc is None
    assert received.messages[0].startswith(b"Authentication-Results: mx.test;\r\n\tspf=fail")


async def test_cli_verifies_enforces_and_signs_what_it_relays(
    zone: Zone, resolver: DnsResolver, serve: Any
) -> None:
    from _cli import start_cli, stop_cli

    upstream_port, upstream = await serve(MailAuth(resolver, methods=["dkim"]))
    process, port = await asyncio.to_thread(
        start_cli,
        "--verify",
        "spf,dkim,dmarc,arc",
        "--dmarc-policy",
        "enforce",
        "--dns-server",
        f"127.0.0.1:{zone.dns.port}",
        "--dkim-sign",
        f"example.test:sel:{zone.key}",
        "--relay",
        f"127.0.0.1:{upstream_port}",
    )
    try:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await send(port, "a@fail.test", message(author="ceo@reject.test"))
        assert refused.value.code == 550
        await send(port, "alice@example.test", message())
    finally:
        await asyncio.to_thread(stop_cli, process)
    [relayed] = upstream.messages
    # Received (the relay's), Authentication-Results (the upstream's own check, then the
    # CLI's), DKIM-Signature (the CLI's), then the message.
    assert b"Authentication-Results: cli.test;\r\n\tspf=pass" in relayed
    assert b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test" in relayed
    [check] = upstream.results
    assert [(d.result, d.domain) for d in check.dkim] == [("pass", "example.test")]
