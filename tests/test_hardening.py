"""Limits, timeouts (on a fake clock), faults and streaming: nothing lost, nothing hangs."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from _harness import Harness, MockLoop, settle
from alephsmtp import Reply, SmtpServer, State
from alephsmtp.session import _HOLD_LIMIT

TRANSACTION = b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"


def received(h: Harness) -> list[Any]:
    messages: list[Any] = []
    h.session.message_received += lambda s, e: messages.append(e)
    return messages


# --- timeouts -----------------------------------------------------------------------------


async def test_data_timeout() -> None:
    loop = MockLoop()
    h = Harness(loop=loop, idle_timeout=300, data_timeout=180, min_data_rate=0)
    messages = received(h)
    h.send(TRANSACTION + b"part of a message\r\n")
    h.output()
    loop.advance(179)
    assert not h.transport.closed
    h.send(b"more\r\n")  # activity restarts the clock
    loop.advance(179)
    assert not h.transport.closed
    loop.advance(1)
    assert h.replies() == ["421 4.4.2 Error: timeout exceeded"]
    assert h.transport.closed
    assert messages == []


async def test_data_timeout_runs_from_the_354() -> None:
    """A client silent after DATA's 354 is cut after data_timeout (RFC 5321 4.5.3.2.5), not
    after the longer idle_timeout."""
    loop = MockLoop()
    h = Harness(loop=loop, idle_timeout=300, data_timeout=30, min_data_rate=0)
    h.send(TRANSACTION)
    assert h.replies()[-1].startswith("354")
    loop.advance(29)
    assert not h.transport.closed
    loop.advance(1)
    assert h.replies() == ["421 4.4.2 Error: timeout exceeded"]
    assert h.transport.closed


async def test_slowloris_is_cut_by_the_minimum_data_rate() -> None:
    loop = MockLoop()
    h = Harness(loop=loop, data_timeout=180, min_data_rate=500, data_rate_grace=30)
    h.send(TRANSACTION)
    h.output()
    # One byte every 4 seconds beats the 180 s timeout forever, but not the rate.
    for _ in range(10):
        loop.advance(4)
        h.send(b"x")
        if h.transport.closed:
            break
    assert h.replies() == ["421 4.4.2 Error: data rate too low"]
    assert h.transport.closed


async def test_a_fast_start_buys_a_slow_client_nothing() -> None:
    """The rate is judged over the recent window, not the whole message: 1 MiB at once,
    then a byte every 25 s (each within the data timeout), is cut within a window."""
    loop = MockLoop()
    h = Harness(loop=loop, data_timeout=180, min_data_rate=500, data_rate_grace=30)
    messages = received(h)
    h.send(TRANSACTION + (b"x" * 1022 + b"\r\n") * 1024)
    h.output()
    for step in range(100):  # 500 s: the whole-message average would stay above 500 B/s
        loop.advance(5)  # the session checks the rate every 5 s
        if h.transport.closed:
            break
        if step % 5 == 4:
            h.send(b"y")
    assert h.replies() == ["421 4.4.2 Error: data rate too low"]
    assert h.transport.closed
    assert loop.now - 1000.0 <= 40  # at the first check whose window is slow
    assert messages == []


async def test_a_fast_client_is_never_cut_by_the_rate_check() -> None:
    loop = MockLoop()
    h = Harness(loop=loop, min_data_rate=500, data_rate_grace=30)
    messages = received(h)
    h.send(TRANSACTION)
    for _ in range(20):
        loop.advance(5)
        h.send(b"y" * 2998 + b"\r\n")  # 600 bytes/s
    h.send(b".\r\n")
    assert h.codes()[-1] == "250"
    assert len(messages[0].message) == 60000


async def test_hanging_handler_times_out_with_451_and_the_session_goes_on() -> None:
    loop = MockLoop()
    never = asyncio.Event()

    async def hang(sender: Any, e: Any) -> str:
        await never.wait()
        return "250 2.1.5 too late"

    h = Harness(lambda s: s.rcpt.connect(hang), loop=loop, handler_timeout=60)
    h.send(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
    await settle()
    h.output()
    loop.advance(59)
    await settle()
    assert h.replies() == []
    loop.advance(1)
    await settle()
    assert h.replies() == ["451 4.3.0 Error: timeout while processing, try again later"]
    assert h.transport.reading
    h.send(b"NOOP\r\n")
    assert h.replies() == ["250 2.0.0 OK"]


async def test_hanging_message_handler_times_out_and_nothing_is_accepted() -> None:
    loop = MockLoop()
    never = asyncio.Event()

    async def hang(sender: Any, e: Any) -> None:
        await never.wait()

    h = Harness(lambda s: s.message_received.connect(hang), loop=loop, message_handler_timeout=300)
    h.send(TRANSACTION + b"body\r\n.\r\n")
    await settle()
    h.output()
    loop.advance(300)
    await settle()
    assert h.replies() == ["451 4.3.0 Error: timeout while processing, try again later"]


async def test_a_command_line_trickled_byte_by_byte_is_cut() -> None:
    """Postfix's smtpd_per_record_deadline: a line must be complete within idle_timeout of
    when the session began waiting for it, however often its bytes arrive."""
    loop = MockLoop()
    h = Harness(loop=loop, idle_timeout=10)
    h.output()
    for byte in b"NOOP and more and more":
        loop.advance(1)
        if h.transport.closed:
            break
        h.send(bytes([byte]))
    assert h.replies() == ["421 4.4.2 Error: timeout exceeded"]
    assert h.transport.closed


async def test_a_client_with_complete_lines_is_not_cut_by_the_record_deadline() -> None:
    loop = MockLoop()
    h = Harness(loop=loop, idle_timeout=10)
    h.output()
    for _ in range(5):
        loop.advance(4)
        h.send(b"NO")
        loop.advance(4)
        h.send(b"OP\r\n")
    assert h.replies() == ["250 2.0.0 OK"] * 5
    assert not h.transport.closed


async def test_an_auth_exchange_line_has_the_same_deadline() -> None:
    loop = MockLoop()
    h = Harness(
        lambda s: s.auth.connect(lambda sender, e: False),
        loop=loop,
        idle_timeout=10,
        auth_over_plaintext=True,
    )
    h.send(b"EHLO x\r\nAUTH LOGIN\r\n")
    h.output()
    for _ in range(12):
        loop.advance(1)
        if h.transport.closed:
            break
        h.send(b"Y")
    assert h.replies() == ["421 4.4.2 Error: timeout exceeded"]


# --- limits -------------------------------------------------------------------------------


async def test_too_many_bad_commands() -> None:
    h = Harness(max_bad_commands=3)
    h.output()
    h.send(b"FOO\r\nBAR\r\nNOOP\r\nBAZ\r\nNOOP\r\n")
    assert h.replies() == [
        "500 5.5.1 Error: command not recognized",
        "500 5.5.1 Error: command not recognized",
        "250 2.0.0 OK",
        "500 5.5.1 Error: command not recognized",
        "421 4.7.0 Error: too many errors",
    ]
    assert h.transport.closed


async def test_junk_commands_past_their_limit_count_as_errors() -> None:
    """Postfix's smtpd_junk_command_limit: NOOP, RSET, VRFY, EXPN and HELP past the limit each
    count as an error, so a flood ends at max_bad_commands."""
    h = Harness(max_junk_commands=5, max_bad_commands=3)
    h.output()
    h.send(b"NOOP\r\nRSET\r\nVRFY a\r\nHELP\r\nNOOP\r\n" + b"NOOP\r\n" * 10)
    replies = h.replies()
    assert replies[-1] == "421 4.7.0 Error: too many errors"
    assert len(replies) == 5 + 3 + 1
    assert h.transport.closed


async def test_an_accepted_message_resets_the_junk_count() -> None:
    h = Harness(max_junk_commands=3, max_bad_commands=1)
    messages = received(h)
    h.send(b"NOOP\r\n" * 3 + TRANSACTION + b"hi\r\n.\r\n" + b"NOOP\r\n" * 3)
    assert h.replies()[-3:] == ["250 2.0.0 OK"] * 3
    assert len(messages) == 1
    h.send(b"NOOP\r\n")
    assert h.replies() == ["250 2.0.0 OK", "421 4.7.0 Error: too many errors"]


async def test_a_pipelined_noop_flood_is_cut() -> None:
    h = Harness()
    h.output()
    h.send(b"NOOP\r\n" * 20000)
    replies = h.replies()
    assert replies[-1] == "421 4.7.0 Error: too many errors"
    assert len(replies) == 100 + 20 + 1  # the junk limit, then max_bad_commands
    assert h.transport.closed


async def test_max_commands_and_transactions() -> None:
    h = Harness(max_commands=3)
    h.output()
    h.send(b"NOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n")
    assert h.replies()[-1] == "421 4.7.0 Error: too many commands in this session"
    assert h.transport.closed
    h = Harness(max_transactions=1)
    messages = received(h)
    h.send(TRANSACTION + b"one\r\n.\r\nMAIL FROM:<a@example.org>\r\n")
    assert h.replies()[-2:] == [
        "250 2.0.0 OK: queued",
        "421 4.7.0 Error: too many transactions in this session",
    ]
    assert len(messages) == 1


async def test_text_line_limit_policy() -> None:
    h = Harness(max_text_line_length=1000)
    messages = received(h)
    h.send(TRANSACTION + b"x" * 998 + b"\r\n" + b"y" * 999 + b"\r\n.\r\nNOOP\r\n")
    assert h.replies()[-2:] == ["500 5.5.6 Error: message line too long", "250 2.0.0 OK"]
    assert messages == []


# --- faults -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "partial",
    [
        TRANSACTION + b"half a message",
        TRANSACTION + b"line\r\n.",  # the end mark cut short
        b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nBDAT 10\r\n12345",
        b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nBDAT 2\r\n12",
    ],
)
async def test_disconnect_mid_message_never_delivers(partial: bytes) -> None:
    h = Harness()
    messages = received(h)
    h.send(partial)
    h.transport.abort()
    assert messages == []
    assert h.session._pools.command.in_use == 0
    assert h.session._pools.data.in_use == 0


async def test_eof_mid_message_closes_without_delivery() -> None:
    h = Harness()
    messages = received(h)
    h.send(TRANSACTION + b"partial\r\n")
    assert h.session.eof_received() is False  # asyncio then closes the transport
    h.transport.close()
    assert messages == []


async def test_a_client_that_never_reads_stops_being_read() -> None:
    h = Harness()
    h.session.pause_writing()  # the transport's write buffer is over its high-water mark
    assert not h.transport.reading
    h.session.resume_writing()
    assert h.transport.reading


@pytest.mark.parametrize(
    "reply",
    [
        "250 ok\r\n250 2.0.0 smuggled second reply",
        "250 ok\r\n\r\n250 x",
        Reply(250, "2.0.0", "line one\r\n250 2.0.0 pretend"),
    ],
)
async def test_handler_replies_cannot_inject_a_second_reply(reply: Any) -> None:
    h = Harness(lambda s: s.noop.connect(lambda sender, e: reply))
    h.output()
    h.send(b"NOOP\r\n")
    lines = h.replies()
    # Either refused (451) or one proper multi-line reply: every line but the last has "-".
    assert all(line[3] == "-" for line in lines[:-1])
    assert lines[-1][3] == " "
    assert len({line[:3] for line in lines}) == 1


# --- streaming ----------------------------------------------------------------------------


async def test_streaming_hands_chunks_over_and_keeps_nothing() -> None:
    chunks: list[bytes] = []
    done: list[Any] = []

    def on_session(s: Any) -> None:
        def chunk(sender: Any, e: Any) -> None:
            assert e.offset == sum(map(len, chunks))
            assert sender._tx.spool is None  # the session holds none of it
            chunks.append(e.chunk)

        s.message_chunk += chunk
        s.message_received += lambda sender, e: done.append(e)

    h = Harness(on_session, read_size=7)
    body = b"".join(b"line %d\r\n..dot\r\n" % i for i in range(100))
    h.send(TRANSACTION + body + b".\r\n")
    assert b"".join(chunks) == body.replace(b"\r\n..", b"\r\n.")
    assert done[0].streamed
    assert done[0].message == b""
    assert done[0].size == len(b"".join(chunks))


async def test_async_chunk_handler_holds_what_comes_then_pauses_reading() -> None:
    """Back-pressure: while an async message_chunk handler works, what comes is held, not
    streamed, and past a bound reading pauses until the handler is done."""
    gate = asyncio.Event()
    got: list[bytes] = []

    async def slow(sender: Any, e: Any) -> None:
        await gate.wait()
        got.append(e.chunk)

    h = Harness(lambda s: s.message_chunk.connect(slow))
    h.send(TRANSACTION + b"first\r\n")
    await settle()
    assert h.transport.reading
    more = b"z" * (_HOLD_LIMIT - 1) + b"\r\n"  # past the bound on its last read
    h.send(more)
    await settle()
    assert got == []
    assert not h.transport.reading
    gate.set()
    await settle()
    assert h.transport.reading
    h.send(b"second\r\n.\r\n")
    await settle()
    assert b"".join(got) == b"first\r\n" + more + b"second\r\n"
    assert h.codes()[-1] == "250"


async def test_streamed_message_refused_or_dropped_is_discarded() -> None:
    discarded: list[Any] = []

    def on_session(s: Any) -> None:
        s.message_chunk += lambda sender, e: None
        s.message_discarded += lambda sender, e: discarded.append(e.reply)

    h = Harness(on_session, max_message_size=10)
    h.send(TRANSACTION + b"0123456789abc\r\n.\r\n")
    assert h.codes()[-1] == "552"
    assert [r.code for r in discarded] == [552]
    h.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nx")
    h.transport.close()
    assert discarded[-1] is None


async def test_streaming_a_large_message_over_a_socket() -> None:
    """A 64 MiB message streams through; the session never holds it."""
    digest = hashlib.sha256()
    sizes: list[int] = []
    held: list[int] = []

    def on_session(s: Any) -> None:
        def chunk(sender: Any, e: Any) -> None:
            digest.update(e.chunk)
            held.append(0 if sender._tx.spool is None else sender._tx.spool.size)

        s.message_chunk += chunk
        s.message_received += lambda sender, e: sizes.append(e.size)

    line = b"x" * 1022 + b"\r\n"
    block = line * 1024  # 1 MiB
    async with SmtpServer("127.0.0.1", 0, on_session=on_session, max_message_size=0) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        await reader.readline()
        writer.write(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        while not (await reader.readline()).startswith(b"354"):
            pass
        for _ in range(64):
            writer.write(block)
            await writer.drain()
        writer.write(b".\r\nQUIT\r\n")
        tail = await asyncio.wait_for(reader.read(), 30)
        writer.close()
    assert tail.startswith(b"250 2.0.0")
    assert sizes == [64 << 20]
    assert digest.hexdigest() == hashlib.sha256(block * 64).hexdigest()
    assert set(held) == {0}


# --- the same faults over real sockets ----------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def on_session(self, session: Any) -> None:
        session.message_received += lambda s, e: self.messages.append(e.message)


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await reader.readline()).startswith(b"220 ")
    return reader, writer


async def test_half_close_and_reset_mid_data_deliver_nothing() -> None:
    recorder = Recorder()
    async with SmtpServer("127.0.0.1", 0, on_session=recorder.on_session) as srv:
        for how in ("half-close", "reset"):
            reader, writer = await _open(srv.port)
            writer.write(TRANSACTION + b"a partial message\r\n.")
            await writer.drain()
            if how == "half-close":
                writer.write_eof()
                assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"250-")
            else:
                writer.transport.abort()  # RST
            writer.close()
        # The server still serves: a whole message gets through.
        reader, writer = await _open(srv.port)
        writer.write(TRANSACTION + b"whole\r\n.\r\nQUIT\r\n")
        replies = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert replies.endswith(b"250 2.0.0 OK: queued\r\n221 2.0.0 Bye\r\n")
    assert recorder.messages == [b"whole\r\n"]
    assert [pool.in_use for pool in srv.buffer_pools] == [0, 0]


async def test_a_client_that_never_reads_is_not_read_either() -> None:
    async with SmtpServer("127.0.0.1", 0) as srv:
        _reader, writer = await _open(srv.port)
        (session,) = srv.sessions
        flood = b"EHLO x\r\n" * 20000  # not junk: NOOP floods are cut (junk limit)
        # Keep sending without reading a reply; the server's replies fill the socket
        # buffers, its transport pauses, and it stops reading our commands.
        for _ in range(200):
            writer.write(flood)
            await asyncio.sleep(0.01)
            if not session.transport.is_reading():  # type: ignore[union-attr]
                break
        assert not session.transport.is_reading()  # type: ignore[union-attr]
        assert session.transport.get_write_buffer_size() < 1 << 20  # type: ignore[union-attr]
        writer.transport.abort()


async def test_shutdown_lets_a_transaction_in_progress_finish() -> None:
    recorder = Recorder()
    srv = SmtpServer("127.0.0.1", 0, on_session=recorder.on_session)
    await srv.start()
    reader, writer = await _open(srv.port)
    writer.write(TRANSACTION + b"first half\r\n")
    await writer.drain()
    while len(await reader.readline()) and not srv.sessions:
        pass
    for _ in range(100):
        if next(iter(srv.sessions)).state is State.DATA:
            break
        await asyncio.sleep(0.01)
    stopping = asyncio.create_task(srv.stop(grace=10))
    await asyncio.sleep(0.05)
    with pytest.raises(ConnectionRefusedError):  # no longer accepting ...
        await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(b"second half\r\n.\r\n")  # ... but this transaction may finish
    rest = await asyncio.wait_for(reader.read(), 5)
    await stopping
    assert rest.endswith(
        b"250 2.0.0 OK: queued\r\n421 4.3.2 Service shutting down, closing connection\r\n"
    )
    assert recorder.messages == [b"first half\r\nsecond half\r\n"]


async def test_tls_handshake_timeout(tmp_path: Any) -> None:
    trustme = pytest.importorskip("trustme")
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("localhost").configure_cert(context)
    async with SmtpServer(
        "127.0.0.1", 0, tls_context=context, implicit_tls=True, tls_handshake_timeout=0.2
    ) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        # Say nothing: the server gives up on the handshake and closes.
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        # The connection never became a session, so nothing waits for it at shutdown.
        assert not srv.sessions


# --- forbid_unauth_pipelining (Postfix 3.9), off by default ---------------------------------


@pytest.mark.parametrize(
    "stream",
    [
        b"EHLO x\r\nMAIL FROM:<a@example.org>\r\n",  # no wait for the EHLO reply
        b"EHLO x\r\n",  # then, below: DATA with the message behind it, before the 354
    ],
)
async def test_unauthenticated_pipelining_past_a_group_end_is_refused(stream: bytes) -> None:
    h = Harness(forbid_unauth_pipelining=True)
    messages = received(h)
    h.output()
    h.send(stream)
    if not h.transport.closed:
        h.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
        h.send(b"DATA\r\nSubject: early\r\n\r\nno wait for 354\r\n.\r\n")
    assert h.replies()[-1] == "554 5.5.0 Error: SMTP protocol synchronization"
    assert h.transport.closed
    assert messages == []


async def test_a_client_that_waits_is_served_with_forbid_unauth_pipelining() -> None:
    h = Harness(forbid_unauth_pipelining=True)
    messages = received(h)
    for step in (b"EHLO x\r\n", b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n",
                 b"DATA\r\n", b"hi\r\n.\r\n", b"QUIT\r\n"):  # fmt: skip
        h.send(step)
    assert h.codes()[-2:] == ["250", "221"]
    assert len(messages) == 1


async def test_pipelining_is_not_policed_by_default() -> None:
    h = Harness()
    messages = received(h)
    h.send(TRANSACTION + b"hi\r\n.\r\nQUIT\r\n")
    assert h.codes()[-2:] == ["250", "221"]
    assert len(messages) == 1


@pytest.mark.parametrize(
    "name",
    [b"a\x00b.example", b"a\x1b[31m.example", b"a\x7f.example", b"a\x0c.example", b"a\tb"],
)
@pytest.mark.parametrize("verb", [b"HELO", b"EHLO"])
async def test_a_hello_name_with_control_characters_is_refused(verb: bytes, name: bytes) -> None:
    """A name is written into trace headers and handed to milters: control characters (found
    by SEC Consult's scanner and boofuzz, docs/security.md) get a syntax error."""
    h = Harness()
    h.output()
    h.send(verb + b" " + name + b"\r\n")
    assert h.replies() == [f"501 5.5.4 Syntax: {verb.decode()} hostname"]
    h.send(verb + b" client.example\r\n")
    assert h.codes()[-1] == "250"


async def test_a_bare_cr_in_a_hello_name_injects_no_header_under_normalize() -> None:
    h = Harness(bare_newline="normalize")
    h.output()
    h.send(b"EHLO a.example\rX-Injected:yes\r\n")
    assert h.replies() == ["501 5.5.4 Syntax: EHLO hostname"]
