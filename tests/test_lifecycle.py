"""Every way a session can end releases its connection slot exactly once (real sockets).

Each scenario below is a real client on 127.0.0.1 that ends its connection at one step of a
session's life: during a STARTTLS handshake (reset, closed, silent, garbage, a refused
certificate), during an implicit-TLS handshake, before or inside a PROXY protocol header, while
an asynchronous ``on_session`` or handler runs, inside DATA, after TLS is up. After each, run
several times over, the server must hold nothing: no session, no connection counted (globally
or for the client's address), no pooled buffer; new clients get their greeting up to the limit;
and ``stop()`` finds nothing to wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest

from alephsmtp import SmtpServer

HOST = "127.0.0.1"
LIMIT = 2  # max_connections and max_connections_per_ip of every server here
ROUNDS = LIMIT + 2  # more aborted sessions than slots: a leak would lock the server out
Run = Callable[[Coroutine[Any, Any, None]], None]
GIVE_UP = 10.0  # seconds any one wait in these tests may take before it fails
V1_HEADER = b"PROXY TCP4 192.0.2.10 192.0.2.20 40000 25\r\n"


# --- client tools ---------------------------------------------------------------------------


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(HOST, port), GIVE_UP)


async def reply(reader: asyncio.StreamReader) -> bytes:
    """One whole reply (all lines of a multi-line one)."""
    lines = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), GIVE_UP)
        lines += line
        if len(line) < 4 or line[3:4] != b"-":
            return lines


def reset(writer: asyncio.StreamWriter) -> None:
    """Drop the connection with a TCP RST (SO_LINGER 0), as an attacker or a crash would."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def until_closed(reader: asyncio.StreamReader) -> None:
    """Read (and drop) until the server closes the connection."""
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(65536), GIVE_UP):
            pass


class TlsClient:
    """A real TLS client (the ssl module) driven by hand over a plain stream, so a test can
    send its ClientHello in the same segment as STARTTLS, or stop half way."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.pending = b""

    def hello(self) -> bytes:
        """The ClientHello, the first bytes a TLS client sends."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    async def handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                writer.write(self.outgoing.read())
                data = await asyncio.wait_for(reader.read(65536), GIVE_UP)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                self.incoming.write(data)
                continue
            writer.write(self.outgoing.read())
            return

    async def send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        self.tls.write(data)
        writer.write(self.outgoing.read())
        await writer.drain()

    async def reply(self, reader: asyncio.StreamReader) -> bytes:
        """One whole reply read over TLS; what follows it stays for the next call."""
        while True:
            end = 0
            while (cut := self.pending.find(b"\r\n", end)) >= 0:
                line, end = self.pending[end : cut + 2], cut + 2
                if line[3:4] != b"-":
                    answer, self.pending = self.pending[:end], self.pending[end:]
                    return answer
            try:
                self.pending += self.tls.read(65536)
            except ssl.SSLWantReadError:
                chunk = await asyncio.wait_for(reader.read(65536), GIVE_UP)
                if not chunk:
                    raise ConnectionError("closed") from None
                self.incoming.write(chunk)


async def starttls_prologue(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connected, greeted, EHLO answered, STARTTLS answered 220: the handshake is next."""
    reader, writer = await connect(port)
    assert (await reply(reader)).startswith(b"220 ")
    writer.write(b"EHLO client.example\r\n")
    assert b"STARTTLS" in await reply(reader)
    writer.write(b"STARTTLS\r\n")
    assert (await reply(reader)).startswith(b"220 ")
    return reader, writer


# --- the scenarios: each ends a session at one step ------------------------------------------


@dataclass
class World:
    """What a scenario may use: the server's port, TLS contexts, and gates it controls."""

    port: int
    client_context: ssl.SSLContext
    release: asyncio.Event = field(default_factory=asyncio.Event)  # lets handlers go on
    started: asyncio.Event = field(default_factory=asyncio.Event)  # a handler began
    outcomes: list[str] = field(default_factory=list)  # what handlers saw, for the scenario


Scenario = Callable[[World], Awaitable[None]]


async def starttls_then_reset(world: World) -> None:
    _, writer = await starttls_prologue(world.port)
    reset(writer)


async def starttls_then_close(world: World) -> None:
    _, writer = await starttls_prologue(world.port)
    writer.close()


async def starttls_half_a_hello_then_reset(world: World) -> None:
    _, writer = await starttls_prologue(world.port)
    writer.write(TlsClient(world.client_context).hello()[:20])
    await writer.drain()
    await asyncio.sleep(0.05)
    reset(writer)


async def starttls_then_silence(world: World) -> None:
    reader, writer = await starttls_prologue(world.port)
    await until_closed(reader)  # the server's handshake timeout
    writer.close()


async def starttls_then_garbage(world: World) -> None:
    reader, writer = await starttls_prologue(world.port)
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    await until_closed(reader)
    writer.close()


async def starttls_certificate_refused(world: World) -> None:
    reader, writer = await starttls_prologue(world.port)
    client = TlsClient(ssl.create_default_context())  # does not trust the test CA
    with pytest.raises(ssl.SSLCertVerificationError):
        await client.handshake(reader, writer)
    writer.write(client.outgoing.read())  # the alert
    await until_closed(reader)
    writer.close()


async def tls_up_then_reset(world: World) -> None:
    reader, writer = await starttls_prologue(world.port)
    client = TlsClient(world.client_context)
    await client.handshake(reader, writer)
    await client.send(writer, b"EHLO client.example\r\n")
    assert (await client.reply(reader)).startswith(b"250-")
    reset(writer)


async def implicit_tls_half_a_hello_then_reset(world: World) -> None:
    _, writer = await connect(world.port)
    writer.write(TlsClient(world.client_context).hello()[:20])
    await writer.drain()
    await asyncio.sleep(0.05)
    reset(writer)


async def implicit_tls_silence(world: World) -> None:
    reader, writer = await connect(world.port)
    await until_closed(reader)
    writer.close()


async def proxy_reset_before_the_header(world: World) -> None:
    _, writer = await connect(world.port)
    reset(writer)


async def proxy_half_a_header_then_reset(world: World) -> None:
    _, writer = await connect(world.port)
    writer.write(V1_HEADER[:10])
    await writer.drain()
    await asyncio.sleep(0.05)
    reset(writer)


async def proxy_silence(world: World) -> None:
    reader, writer = await connect(world.port)
    await until_closed(reader)
    writer.close()


async def proxy_then_reset_in_the_tls_handshake(world: World) -> None:
    _, writer = await connect(world.port)
    writer.write(V1_HEADER + TlsClient(world.client_context).hello()[:20])
    await writer.drain()
    await asyncio.sleep(0.05)
    reset(writer)


async def proxy_then_session_then_reset(world: World) -> None:
    reader, writer = await connect(world.port)
    writer.write(V1_HEADER)
    assert (await reply(reader)).startswith(b"220 ")
    reset(writer)


async def reset_while_on_session_runs(world: World) -> None:
    _, writer = await connect(world.port)
    await asyncio.wait_for(world.started.wait(), GIVE_UP)
    reset(writer)
    await asyncio.sleep(0.05)
    world.release.set()  # on_session returns after its client is gone
    world.started.clear()
    world.release.clear()


async def on_session_fails(world: World) -> None:
    reader, writer = await connect(world.port)
    assert (await reply(reader)).startswith(b"421 ")
    await until_closed(reader)
    writer.close()


async def reset_while_a_handler_runs(world: World) -> None:
    reader, writer = await connect(world.port)
    assert (await reply(reader)).startswith(b"220 ")
    writer.write(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
    await asyncio.wait_for(world.started.wait(), GIVE_UP)
    reset(writer)
    await asyncio.sleep(0.05)
    world.release.set()
    world.started.clear()
    world.release.clear()


async def reset_in_data(world: World) -> None:
    reader, writer = await connect(world.port)
    assert (await reply(reader)).startswith(b"220 ")
    writer.write(
        b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
    )
    for _ in range(4):
        await reply(reader)
    writer.write(b"Subject: cut\r\n\r\nhalf a mess")
    await writer.drain()
    await asyncio.sleep(0.05)
    reset(writer)


async def reset_in_a_handler_s_auth_exchange(world: World) -> None:
    """An auth_command handler waits in sasl_challenge() for the client, which resets: the
    handler is told (ConnectionResetError) and the session ends once."""
    reader, writer = await connect(world.port)
    assert (await reply(reader)).startswith(b"220 ")
    writer.write(b"EHLO c.example\r\n")
    assert b"AUTH X-CHALLENGE" in await reply(reader)
    writer.write(b"AUTH X-CHALLENGE\r\n")
    assert (await reply(reader)).startswith(b"334 ")
    reset(writer)
    for _ in range(int(GIVE_UP / 0.01)):
        if world.outcomes:
            break
        await asyncio.sleep(0.01)
    assert world.outcomes.pop() == "ConnectionResetError"


async def quit_politely(world: World) -> None:
    reader, writer = await connect(world.port)
    assert (await reply(reader)).startswith(b"220 ")
    writer.write(b"QUIT\r\n")
    assert (await reply(reader)).startswith(b"221 ")
    await until_closed(reader)
    writer.close()


async def gated_on_session(world: World, session: Any) -> None:
    world.started.set()
    await world.release.wait()


def failing_on_session(session: Any) -> None:
    raise RuntimeError("on_session failed on purpose")


def gated_rcpt(world: World) -> Callable[[Any], None]:
    def on_session(session: Any) -> None:
        async def rcpt(sender: Any, e: Any) -> None:
            world.started.set()
            await world.release.wait()

        session.rcpt += rcpt

    return on_session


def challenging_auth(world: World) -> Callable[[Any], None]:
    def on_session(session: Any) -> None:
        async def exchange(sender: Any, e: Any) -> str:
            try:
                await sender.sasl_challenge(b"name?")
            except Exception as error:
                world.outcomes.append(type(error).__name__)
                raise
            return "535 5.7.8 No"

        session.auth_command += exchange

    return on_session


# name: (scenario, server options, on_session factory)
SCENARIOS: dict[str, tuple[Scenario, dict[str, Any], Callable[[World], Any] | None]] = {
    "starttls-reset": (starttls_then_reset, {}, None),
    "starttls-close": (starttls_then_close, {}, None),
    "starttls-half-hello-reset": (starttls_half_a_hello_then_reset, {}, None),
    "starttls-silence": (starttls_then_silence, {}, None),
    "starttls-garbage": (starttls_then_garbage, {}, None),
    "starttls-certificate-refused": (starttls_certificate_refused, {}, None),
    "tls-up-then-reset": (tls_up_then_reset, {}, None),
    "implicit-tls-half-hello-reset": (
        implicit_tls_half_a_hello_then_reset,
        {"implicit_tls": True},
        None,
    ),
    "implicit-tls-silence": (implicit_tls_silence, {"implicit_tls": True}, None),
    "proxy-reset": (proxy_reset_before_the_header, {"proxy_protocol": True}, None),
    "proxy-half-header-reset": (proxy_half_a_header_then_reset, {"proxy_protocol": True}, None),
    "proxy-silence": (proxy_silence, {"proxy_protocol": True}, None),
    "proxy-tls-handshake-reset": (
        proxy_then_reset_in_the_tls_handshake,
        {"proxy_protocol": True, "implicit_tls": True},
        None,
    ),
    "proxy-session-reset": (proxy_then_session_then_reset, {"proxy_protocol": True}, None),
    "async-on-session-reset": (
        reset_while_on_session_runs,
        {},
        lambda world: lambda session: gated_on_session(world, session),
    ),
    "on-session-raises": (on_session_fails, {}, lambda world: failing_on_session),
    "handler-running-reset": (reset_while_a_handler_runs, {}, gated_rcpt),
    "data-reset": (reset_in_data, {}, None),
    "auth-exchange-reset": (
        reset_in_a_handler_s_auth_exchange,
        {"auth_over_plaintext": True, "auth_mechanisms": ("X-CHALLENGE",)},
        challenging_auth,
    ),
    "quit": (quit_politely, {}, None),
}


async def greeted(
    world: World, options: dict[str, Any]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A new client, connected the way the server expects, that got its 220 greeting."""
    tls = world.client_context if options.get("implicit_tls") else None
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            HOST, world.port, ssl=tls, server_hostname="localhost" if tls else None
        )
        if not options.get("proxy_protocol")
        else _proxied(world.port, tls),
        GIVE_UP,
    )
    assert (await reply(reader)).startswith(b"220 ")
    return reader, writer


async def _proxied(
    port: int, tls: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.create_connection((HOST, port))
    sock.sendall(V1_HEADER)
    sock.setblocking(False)
    return await asyncio.open_connection(
        sock=sock, ssl=tls, server_hostname="localhost" if tls else None
    )


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(int(GIVE_UP / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {GIVE_UP} s: {what}")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_end_of_a_session_releases_its_slot_once(
    name: str,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
    run_on_each_loop: Run,
) -> None:
    run_on_each_loop(_end_and_release(name, server_context, client_context, caplog))


async def _end_and_release(
    name: str,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scenario, options, make_on_session = SCENARIOS[name]
    world = World(0, client_context)
    server = SmtpServer(
        HOST,
        0,
        on_session=make_on_session(world) if make_on_session is not None else None,
        hostname="localhost",
        tls_context=server_context,
        tls_handshake_timeout=0.5,
        proxy_header_timeout=0.5,
        max_connections=LIMIT,
        max_connections_per_ip=LIMIT,
        connection_limit_exempt=(),  # loopback counts per address too
        **options,
    )
    await server.start()
    world.port = server.port
    try:
        for _ in range(ROUNDS):
            await scenario(world)
            await wait_until(lambda: not server.open_connections, "every connection gone")
            assert not server.sessions
        await wait_until(lambda: server.metrics.connections == 0, "no connection counted")
        assert server.metrics.connections_closed == server.metrics.connections_opened
        assert [pool.in_use for pool in server.buffer_pools] == [0, 0]
        # The limits still take LIMIT new clients at once, from the same address.
        if name != "on-session-raises":
            world.release.set()  # a gated on_session or handler lets them through
            clients = [await greeted(world, options) for _ in range(LIMIT)]
            for _, writer in clients:
                writer.close()
            await wait_until(lambda: not server.open_connections, "the new clients gone")
    finally:
        world.release.set()
        with caplog.at_level(logging.WARNING, logger="alephsmtp.server"):
            await asyncio.wait_for(server.stop(grace=GIVE_UP), 2 * GIVE_UP)
    assert "after the grace period" not in caplog.text


def test_starttls_with_the_client_hello_in_the_same_segment(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, run_on_each_loop: Run
) -> None:
    run_on_each_loop(_hello_with_starttls(server_context, client_context))


async def _hello_with_starttls(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """A client that does not wait for the 220 (RFC 3207 4 says it should) but sends its TLS
    ClientHello with STARTTLS still gets TLS: the bytes go to the TLS layer, never read as
    commands (CVE-2011-0411)."""
    async with SmtpServer(
        HOST, 0, hostname="localhost", tls_context=server_context, tls_handshake_timeout=5
    ) as server:
        reader, writer = await connect(server.port)
        assert (await reply(reader)).startswith(b"220 ")
        writer.write(b"EHLO client.example\r\n")
        await reply(reader)
        client = TlsClient(client_context)
        writer.write(b"STARTTLS\r\n" + client.hello())
        assert (await reply(reader)).startswith(b"220 ")
        await client.handshake(reader, writer)
        await client.send(writer, b"EHLO client.example\r\n")
        answer = await client.reply(reader)
        assert answer.startswith(b"250-localhost")
        assert b"STARTTLS" not in answer
        reset(writer)


def test_plaintext_pipelined_after_starttls_is_still_discarded(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, run_on_each_loop: Run
) -> None:
    run_on_each_loop(_plaintext_after_starttls(server_context, client_context))


async def _plaintext_after_starttls(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """Plaintext after STARTTLS in the same segment is dropped, not handed to TLS: the
    client's own handshake then works, and the injected command never runs."""
    seen: list[str] = []

    def on_session(session: Any) -> None:
        session.mail += lambda s, e: seen.append(str(e.command.return_path))

    async with SmtpServer(
        HOST, 0, on_session=on_session, hostname="localhost", tls_context=server_context
    ) as server:
        reader, writer = await connect(server.port)
        await reply(reader)
        writer.write(b"EHLO client.example\r\n")
        await reply(reader)
        writer.write(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")
        assert (await reply(reader)).startswith(b"220 ")
        client = TlsClient(client_context)
        await client.handshake(reader, writer)
        await client.send(writer, b"EHLO client.example\r\nMAIL FROM:<real@example.org>\r\n")
        assert (await client.reply(reader)).startswith(b"250-")
        assert (await client.reply(reader)).startswith(b"250 ")
        assert seen == ["real@example.org"]
        reset(writer)


async def test_starttls_inside_a_transaction_resets_it(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """RFC 3207 4.2: STARTTLS may come inside a transaction (Postfix, aiosmtpd and
    smtp-server take it); the handshake ends it, and streamed chunks are discarded."""
    discarded: list[Any] = []
    chunks: list[bytes] = []

    def on_session(session: Any) -> None:
        session.message_chunk += lambda s, e: chunks.append(e.chunk)
        session.message_discarded += lambda s, e: discarded.append(e.reply)

    async with SmtpServer(
        HOST, 0, on_session=on_session, hostname="localhost", tls_context=server_context
    ) as server:
        reader, writer = await connect(server.port)
        await reply(reader)
        writer.write(
            b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
            b"BDAT 5\r\nhello"
        )
        for _ in range(4):
            assert (await reply(reader))[:1] == b"2"
        writer.write(b"STARTTLS\r\n")
        assert (await reply(reader)).startswith(b"220 ")
        client = TlsClient(client_context)
        await client.handshake(reader, writer)
        await client.send(writer, b"EHLO c.example\r\nRCPT TO:<b@example.net>\r\n")
        assert (await client.reply(reader)).startswith(b"250-")
        assert await client.reply(reader) == b"503 5.5.1 Error: need MAIL command\r\n"
        reset(writer)
        await wait_until(lambda: not server.sessions, "the session gone")
    assert chunks == [b"hello"]
    assert discarded == [None]
