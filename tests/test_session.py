"""Session logic over a fake transport: replies, order, events, errors, flow, timers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from _harness import Harness, MockLoop, settle
from alephsmtp import Reply, SmtpError, State
from alephsmtp.parser import IMPLEMENTATION
from alephsmtp.session import _HOLD_LIMIT

TRANSACTION = (
    b"EHLO client.test\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"
)

DEFAULT_EHLO = [
    "250-mx.test",
    "250-PIPELINING",
    f"250-SIZE {32 << 20}",
    "250-8BITMIME",
    "250-CHUNKING",
    "250-BINARYMIME",
    "250-SMTPUTF8",
    "250-DSN",
    "250-ENHANCEDSTATUSCODES",
    "250 HELP",
]


def received(h: Harness) -> list[Any]:
    messages: list[Any] = []
    h.session.message_received += lambda s, e: messages.append(e)
    return messages


async def test_greeting_and_default_replies_carry_enhanced_codes() -> None:
    h = Harness()
    assert h.replies() == ["220 mx.test ESMTP alephsmtp"]
    h.send(b"EHLO client.test\r\n")
    assert h.replies() == DEFAULT_EHLO
    h.send(b"MAIL FROM:<a@example.org>\r\n")
    assert h.replies() == ["250 2.1.0 OK"]
    h.send(b"RCPT TO:<b@example.org>\r\n")
    assert h.replies() == ["250 2.1.5 OK"]
    h.send(b"DATA\r\n")
    assert h.replies() == ["354 End data with <CR><LF>.<CR><LF>"]
    h.send(b"hello\r\n.\r\n")
    assert h.replies() == ["250 2.0.0 OK: queued"]
    for command, reply in [
        (b"NOOP\r\n", "250 2.0.0 OK"),
        (b"RSET\r\n", "250 2.0.0 OK"),
        (
            b"VRFY bob\r\n",
            "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
        ),
        (b"EXPN list\r\n", "502 5.5.1 EXPN not available"),
        (b"FOO bar\r\n", "500 5.5.1 Error: command not recognized"),
    ]:
        h.send(command)
        assert h.replies() == [reply]
    h.send(b"HELP\r\n")
    assert h.replies()[0].startswith("214 2.0.0 ")
    h.send(b"QUIT\r\n")
    assert h.replies() == ["221 2.0.0 Bye"]
    assert h.transport.closed


async def test_helo_reply_has_no_extensions() -> None:
    h = Harness()
    h.output()
    h.send(b"HELO client.test\r\n")
    assert h.replies() == ["250 mx.test"]
    h.send(b"MAIL FROM:<a@example.org>\r\n")
    assert h.replies() == ["250 2.1.0 OK"]


async def test_seed_example_shape() -> None:
    envelopes: dict[Any, dict[str, Any]] = {}

    def on_session(c: Any) -> None:
        envelopes[c] = {"rcpts": []}
        c.ehlo += lambda sender, e: "550 not implemented\r\n"
        c.helo += lambda sender, e: "250 ok\r\n"

        def mail(sender: Any, e: Any) -> str:
            envelopes[sender]["from"] = e.command.return_path
            return "250 ok\r\n"

        c.mail += mail
        c.rcpt += lambda sender, e: (
            envelopes[sender]["rcpts"].append(e.command.recipient_address) or "250 ok\r\n"
        )
        c.data += lambda sender, e: "354 end data with <cr><lf>.<cr><lf>\r\n"
        c.message_received += lambda sender, e: (
            envelopes[sender].update(body=e.message) or ("250 ok\r\n")
        )
        c.quit += lambda sender, e: "221 closing connection\r\n"
        closes: list[Any] = []
        envelopes[c]["closes"] = closes
        c.close_requested += lambda sender, e: closes.append(sender)
        c.start_transaction("220 my.server.net\r\n")

    h = Harness(on_session)
    assert h.replies() == ["220 my.server.net"]
    h.send(b"EHLO x\r\n")
    assert h.replies() == ["550 5.0.0 not implemented"]
    h.send(b"HELO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    assert h.replies() == [
        "250 ok",
        "250 2.1.0 ok",
        "250 2.1.5 ok",
        "354 end data with <cr><lf>.<cr><lf>",
    ]
    h.send(b"Subject: hi\r\n\r\n..dot\r\n.\r\n")
    assert h.replies() == ["250 2.0.0 ok"]
    h.send(b"QUIT\r\n")
    assert h.replies() == ["221 2.0.0 closing connection"]
    state = envelopes[h.session]
    assert state["from"] == "a@b.example"
    assert state["rcpts"] == ["c@d.example"]
    assert state["body"] == b"Subject: hi\r\n\r\n.dot\r\n"
    assert state["closes"] == [h.session]
    assert h.transport.closed


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        (b"MAIL FROM:<a@b.example>\r\n", "503 5.5.1 Error: send HELO/EHLO first"),
        (b"EHLO x\r\nRCPT TO:<a@b.example>\r\n", "503 5.5.1 Error: need MAIL command"),
        (b"EHLO x\r\nDATA\r\n", "503 5.5.1 Error: need MAIL command"),
        (b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nDATA\r\n", "503 5.5.1 Error: need RCPT command"),
        (
            b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nMAIL FROM:<a@b.example>\r\n",
            "503 5.5.1 Error: nested MAIL command",
        ),
        (
            b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRSET\r\nRCPT TO:<a@b.example>\r\n",
            "503 5.5.1 Error: need MAIL command",
        ),
        (
            b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nEHLO y\r\nRCPT TO:<a@b.example>\r\n",
            "503 5.5.1 Error: need MAIL command",
        ),
    ],
)
async def test_out_of_order_commands_get_503_before_any_handler(
    commands: bytes, expected: str
) -> None:
    calls: list[str] = []

    def on_session(s: Any) -> None:
        for name in ("mail", "rcpt", "data"):
            getattr(s, name).connect(lambda sender, e, name=name: calls.append(name))

    h = Harness(on_session)
    h.output()
    h.send(commands)
    replies = h.replies()
    assert replies[-1] == expected
    # The refused command itself never reached its handler.
    refused_verb = commands.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1][:4].decode().lower()
    assert calls.count(refused_verb) == commands.upper().count(refused_verb.upper().encode()) - 1


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (b"MAIL FROM:<not an address>\r\n", "501 5.1.7"),
        (b"MAIL TO:<a@b.example>\r\n", "501 5.5.4"),
        (b"MAIL FROM:<a@b.example> SIZE=abc\r\n", "501 5.5.4"),
        (b"MAIL FROM:<a@b.example> FOO=bar\r\n", "555 5.5.4"),
        (b"MAIL FROM:<a@b.example> BODY=BINARY\r\n", "501 5.5.4"),
        (b"MAIL FROM:<j\xc3\xb6rg@b.example>\r\n", "553 5.6.7"),
    ],
)
async def test_bad_mail_syntax_never_reaches_the_handler(command: bytes, expected: str) -> None:
    calls: list[Any] = []
    h = Harness(lambda s: s.mail.connect(lambda sender, e: calls.append(e)))
    h.send(b"EHLO x\r\n")
    h.output()
    h.send(command)
    assert h.replies()[0].startswith(expected)
    assert calls == []
    h.send(b"MAIL FROM:<a@b.example>\r\n")  # the session goes on
    assert h.replies() == ["250 2.1.0 OK"]
    assert len(calls) == 1


async def test_smtputf8_mail_accepts_utf8_addresses() -> None:
    h = Harness()
    messages = received(h)
    h.send(b"EHLO x\r\n")
    h.output()
    h.send(
        "MAIL FROM:<jörg@bücher.example> SMTPUTF8\r\nRCPT TO:<δοκιμή@παράδειγμα.example>\r\n"
        "DATA\r\nhi\r\n.\r\n".encode()
    )
    assert h.codes() == ["250", "250", "354", "250"]
    assert messages[0].envelope.return_path == "jörg@bücher.example"
    assert messages[0].envelope.recipients == ["δοκιμή@παράδειγμα.example"]
    assert messages[0].envelope.smtputf8


async def test_size_parameter_over_limit_refused_at_mail() -> None:
    h = Harness(max_message_size=1000)
    h.send(b"EHLO x\r\n")
    assert "250-SIZE 1000" in h.replies()
    h.send(b"MAIL FROM:<a@b.example> SIZE=1001\r\n")
    assert h.replies() == ["552 5.3.4 Error: message size exceeds fixed maximum message size"]
    h.send(b"MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME\r\n")
    assert h.replies() == ["250 2.1.0 OK"]


async def test_oversized_message_gets_552_after_end_mark_and_stays_in_sync() -> None:
    h = Harness(max_message_size=100)
    messages = received(h)
    h.send(TRANSACTION)
    h.output()
    h.send(b"x" * 98 + b"\r\n" + b"y" * 50 + b"\r\n", read_size=7)
    assert h.replies() == []  # still reading to the end mark
    h.send(b".\r\nNOOP\r\n")
    assert h.replies() == [
        "552 5.3.4 Error: message size exceeds fixed maximum message size",
        "250 2.0.0 OK",
    ]
    assert messages == []
    # The transaction is over: a new one works.
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nok\r\n.\r\n")
    assert h.codes() == ["250", "250", "354", "250"]
    assert messages[0].message == b"ok\r\n"


@pytest.mark.parametrize("read_size", [1, 3, 64, None])
async def test_message_is_byte_exact_whatever_the_read_size(read_size: int | None) -> None:
    body = (
        b"From: a@b.example\r\nSubject: dots\r\n\r\n"
        b".leading dot\r\n..two dots\r\n.\tx\r\n\xff\xfe 8-bit \x00 NUL\r\n"
        b"bare CR? no: CR LF only\r\nlast line without dot"
    )
    stuffed = body.replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\n"
    h = Harness(read_size=read_size)
    messages = received(h)
    h.send(TRANSACTION + stuffed + b"QUIT\r\n")
    assert h.codes() == ["220", "250", "250", "250", "354", "250", "221"]
    assert messages[0].message == body + b"\r\n"
    assert messages[0].envelope.return_path == "alice@example.org"
    assert messages[0].envelope.recipients == ["bob@example.net"]
    assert messages[0].envelope.helo_name == "client.test"
    assert messages[0].envelope.peer == ("192.0.2.7", 40000)


async def test_empty_message() -> None:
    h = Harness()
    messages = received(h)
    h.send(TRANSACTION + b".\r\n")
    assert h.codes()[-1] == "250"
    assert messages[0].message == b""


async def test_pipelined_group_is_answered_in_order_in_one_write() -> None:
    h = Harness()
    messages = received(h)
    h.output()
    writes = h.transport.writes
    h.send(TRANSACTION)
    assert h.codes() == ["250", "250", "250", "354"]
    assert h.transport.writes == writes + 1
    # Many transactions, each pipelined after the end of the previous message.
    group = b"".join(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<n%d@d.example>\r\nDATA\r\n" % i
        + b"message %d\r\n.\r\n" % i
        for i in range(50)
    )
    h.send(b"body\r\n.\r\n" + group)
    assert h.codes() == ["250"] + ["250", "250", "354", "250"] * 50
    assert [m.message for m in messages] == [b"body\r\n"] + [
        b"message %d\r\n" % i for i in range(50)
    ]


def test_reply_strings_are_parsed_once_and_the_cache_is_bounded() -> None:
    from alephsmtp import replies

    first = replies.coerce_reply("250 2.0.0 fine")
    assert first == Reply(250, "2.0.0", ("fine",))
    assert replies.coerce_reply("250 2.0.0 fine") is first  # parsed once, shared (immutable)
    long = "250 " + "x" * replies._PARSED_MAX_LENGTH
    assert replies.coerce_reply(long) == replies.coerce_reply(long)
    assert long not in replies._PARSED  # long texts are parsed every time, never kept
    for i in range(replies._PARSED_MAX_ENTRIES + 10):
        replies.coerce_reply(f"250 reply number {i}")
    assert len(replies._PARSED) <= replies._PARSED_MAX_ENTRIES
    with pytest.raises(ValueError, match="different codes"):
        replies.coerce_reply("250-a\r\n550 b")  # refused every time, never cached
    assert "250-a\r\n550 b" not in replies._PARSED


async def test_handler_reply_forms() -> None:
    def on_session(s: Any) -> None:
        s.helo += lambda sender, e: Reply(250, None, "hello there")
        s.mail += lambda sender, e: "250-first line\r\n250 second line\r\n"
        s.rcpt += lambda sender, e: Reply(550, "5.1.1", "No such user here")
        s.noop += lambda sender, e: Reply(250, "2.0.0", ["a", "b"])
        s.vrfy += lambda sender, e: "252 2.1.5 maybe"

    h = Harness(on_session)
    h.output()
    h.send(b"HELO x\r\n")
    assert h.replies() == ["250 hello there"]
    h.send(b"MAIL FROM:<a@b.example>\r\n")
    assert h.replies() == ["250-2.1.0 first line", "250 2.1.0 second line"]
    h.send(b"RCPT TO:<c@d.example>\r\n")
    assert h.replies() == ["550 5.1.1 No such user here"]
    h.send(b"DATA\r\n")  # the refused recipient did not count
    assert h.replies() == ["503 5.5.1 Error: need RCPT command"]
    h.send(b"NOOP\r\nVRFY x\r\n")
    assert h.replies() == ["250-2.0.0 a", "250 2.0.0 b", "252 2.1.5 maybe"]


async def test_enhanced_codes_can_be_turned_off() -> None:
    h = Harness(enhanced_status_codes=False)
    h.send(b"EHLO x\r\n")
    assert "250-ENHANCEDSTATUSCODES" not in h.replies()
    h.send(b"MAIL FROM:<a@b.example>\r\nMAIL FROM:<a@b.example>\r\n")
    assert h.replies() == ["250 OK", "503 Error: nested MAIL command"]


async def test_prepend_puts_a_handler_before_the_others() -> None:
    def on_session(s: Any) -> None:
        s.noop += lambda sender, e: "250 2.0.0 mine"
        assert s.noop.prepend(lambda sender, e: "250 2.0.0 the filter's") is s.noop.handlers[0]
        with pytest.raises(TypeError):
            s.noop.prepend("not callable")

    h = Harness(on_session)
    h.output()
    h.send(b"NOOP\r\n")
    assert h.replies() == ["250 2.0.0 the filter's"]


async def test_event_operators() -> None:
    calls: list[str] = []

    def first(sender: Any, e: Any) -> None:
        calls.append("first")

    def second(sender: Any, e: Any) -> str:
        calls.append("second")
        return "250 2.0.0 second"

    def third(sender: Any, e: Any) -> str:
        calls.append("third")
        return "250 2.0.0 third"

    def on_session(s: Any) -> None:
        s.noop += first
        s.noop += second
        s.noop.connect(third)
        assert len(s.noop) == 3

    h = Harness(on_session)
    h.output()
    h.send(b"NOOP\r\n")
    # Handlers run in order; the first reply decides, later handlers are not called.
    assert h.replies() == ["250 2.0.0 second"]
    assert calls == ["first", "second"]
    h.session.noop -= second
    h.send(b"NOOP\r\n")
    assert h.replies() == ["250 2.0.0 third"]
    with pytest.raises(ValueError, match="not connected"):
        h.session.noop -= second
    with pytest.raises(TypeError):
        h.session.noop += "not callable"  # type: ignore[operator]


async def test_async_handlers_keep_order_and_hold_what_comes_meanwhile() -> None:
    release = asyncio.Event()

    async def slow_rcpt(sender: Any, e: Any) -> str:
        await release.wait()
        return "250 2.1.5 slow but sure"

    h = Harness(lambda s: s.rcpt.connect(slow_rcpt))
    messages = received(h)
    h.output()
    h.send(TRANSACTION)
    await settle()
    assert h.replies() == [*DEFAULT_EHLO, "250 2.1.0 OK"]
    # While the handler decides, what comes is read (no pause: two system calls saved) and
    # held, not answered...
    assert h.transport.reading
    h.send(b"x\r\n.\r\n")
    await settle()
    assert h.replies() == []
    # ...up to a bound: past it, reading pauses until the handler is done.
    head, tail = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n", b".\r\n"
    body = b"y" * (_HOLD_LIMIT - len(head) - len(tail) - 2) + b"\r\n"
    h.send(head + body + tail)  # with the 6 bytes above: past the bound on the last read
    assert not h.transport.reading
    release.set()
    await settle()
    assert h.replies() == [
        "250 2.1.5 slow but sure",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 OK: queued",
        "250 2.1.0 OK",
        "250 2.1.5 slow but sure",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 OK: queued",
    ]
    assert h.transport.reading
    assert [m.message for m in messages] == [b"x\r\n", body]


async def test_async_message_handler() -> None:
    stored: list[bytes] = []

    async def store(sender: Any, e: Any) -> str:
        await asyncio.sleep(0)
        stored.append(e.message)
        return "250 2.0.0 stored"

    h = Harness(lambda s: s.message_received.connect(store))
    h.send(TRANSACTION + b"a\r\n.\r\nNOOP\r\n")
    await settle()
    assert h.codes()[-2:] == ["250", "250"]
    assert stored == [b"a\r\n"]


async def test_handler_that_raises_gets_451_and_the_session_continues(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def boom(sender: Any, e: Any) -> str:
        raise RuntimeError("secret internal detail")

    h = Harness(lambda s: s.rcpt.connect(boom))
    h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n")
    h.output()
    with caplog.at_level(logging.ERROR, logger="alephsmtp"):
        h.send(b"RCPT TO:<c@d.example>\r\n")
    assert h.replies() == ["451 4.3.0 Error: local error in processing"]
    assert "secret internal detail" in caplog.text  # logged with its traceback ...
    assert "Traceback" in caplog.text
    h.send(b"NOOP\r\n")  # ... never shown to the client, and the session goes on
    assert h.replies() == ["250 2.0.0 OK"]


@pytest.mark.parametrize(
    "error", [RuntimeError("database down"), ConnectionError("refused"), OSError(28, "full")]
)
async def test_a_message_handler_that_raises_is_a_temporary_failure(error: Exception) -> None:
    """A fault is never a bounce: the client gets 451 and retries (no 554 5.3.0)."""

    async def boom(sender: Any, e: Any) -> None:
        raise error

    h = Harness(lambda s: s.message_received.connect(boom))
    h.send(TRANSACTION + b"a\r\n.\r\n")
    await settle()
    assert h.replies()[-1] == "451 4.3.0 Error: message could not be processed now"
    h.send(b"MAIL FROM:<a@b.example>\r\n")
    assert h.replies() == ["250 2.1.0 OK"]


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_a_handler_says_permanent_by_raising_an_smtp_error(asynchronous: bool) -> None:
    def refuse(sender: Any, e: Any) -> None:
        raise SmtpError("Message content rejected", code=554, enhanced="5.7.1")

    async def refuse_later(sender: Any, e: Any) -> None:
        refuse(sender, e)

    h = Harness(lambda s: s.message_received.connect(refuse_later if asynchronous else refuse))
    h.send(TRANSACTION + b"a\r\n.\r\n")
    await settle()
    assert h.replies()[-1] == "554 5.7.1 Message content rejected"


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_a_handler_error_hook_chooses_the_reply(asynchronous: bool) -> None:
    seen: list[Any] = []

    def on_session(s: Any) -> None:
        def store(sender: Any, e: Any) -> None:
            raise ValueError("a bug in the user's code")

        def hook(sender: Any, e: Any) -> str:
            seen.append((e.event, type(e.exception).__name__, str(e.reply)))
            return "452 4.3.1 Try again tomorrow"

        async def hook_later(sender: Any, e: Any) -> str:
            return hook(sender, e)

        s.message_received += store
        s.handler_error += hook_later if asynchronous else hook

    h = Harness(on_session)
    h.send(TRANSACTION + b"a\r\n.\r\n")
    await settle()
    assert h.replies()[-1] == "452 4.3.1 Try again tomorrow"
    assert seen == [
        ("message_received", "ValueError", "451 4.3.0 Error: message could not be processed now")
    ]


async def test_a_handler_error_hook_that_fails_keeps_the_temporary_reply() -> None:
    def on_session(s: Any) -> None:
        s.rcpt += lambda sender, e: 1 / 0
        s.handler_error += lambda sender, e: {}["nothing"]
        s.handler_error += lambda sender, e: "not a reply"

    h = Harness(on_session)
    h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
    assert h.replies()[-1] == "451 4.3.0 Error: local error in processing"


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_a_chunk_handler_fault_is_temporary_and_its_smtp_error_is_its_reply(
    asynchronous: bool,
) -> None:
    for error, expected in (
        (RuntimeError("disk"), "451 4.3.0 Error: message could not be processed now"),
        (SmtpError("Virus found", code=554, enhanced="5.7.1"), "554 5.7.1 Virus found"),
    ):

        def chunk(sender: Any, e: Any, error: Exception = error) -> None:
            raise error

        async def chunk_later(sender: Any, e: Any, error: Exception = error) -> None:
            raise error

        received: list[Any] = []

        def on_session(s: Any, received: list[Any] = received) -> None:
            s.message_chunk += chunk_later if asynchronous else chunk
            s.message_received += lambda sender, e: received.append(e)

        h = Harness(on_session)
        h.send(TRANSACTION + b"a\r\n.\r\n")
        await settle()
        assert h.replies()[-1] == expected
        assert received == []


@pytest.mark.parametrize(
    ("answer", "told"),
    [("250 2.0.0 stored", []), ("550 5.7.1 no", ["550 5.7.1 no"]), (None, [])],
)
async def test_a_refused_streamed_message_is_discarded_once(
    answer: str | None, told: list[str]
) -> None:
    """message_chunk handlers stored the message as it came; when a message_received handler
    refuses it they hear message_discarded (once), so they drop what they stored."""
    discarded: list[Any] = []

    def on_session(s: Any) -> None:
        s.message_chunk += lambda sender, e: None
        s.message_received += lambda sender, e: answer
        s.message_discarded += lambda sender, e: discarded.append(str(e.reply))

    h = Harness(on_session)
    h.send(TRANSACTION + b"a\r\n.\r\n")
    await settle()
    assert h.replies()[-1] == (answer or "250 2.0.0 OK: queued")
    assert discarded == told


async def test_an_auth_handler_fault_is_a_temporary_authentication_failure() -> None:
    h = Harness(lambda s: s.auth.connect(lambda sender, e: 1 / 0), auth_over_plaintext=True)
    h.send(b"EHLO x\r\nAUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n")
    assert h.replies()[-1] == "454 4.7.0 Temporary authentication failure"
    h.send(b"AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n")  # not counted as a guess: answered at once
    assert h.replies() == ["454 4.7.0 Temporary authentication failure"]


@pytest.mark.parametrize(
    "bad_reply", ["hello", "250 ok\r\n550 injected", "354 go on", 42, Reply(354, "", "x")]
)
async def test_invalid_handler_reply_is_refused(bad_reply: Any) -> None:
    h = Harness(lambda s: s.mail.connect(lambda sender, e: bad_reply))
    h.send(b"EHLO x\r\n")
    h.output()
    h.send(b"MAIL FROM:<a@b.example>\r\n")
    assert h.replies() == ["451 4.3.0 Error: local error in processing"]
    h.send(b"RCPT TO:<a@b.example>\r\n")  # MAIL was not accepted
    assert h.replies() == ["503 5.5.1 Error: need MAIL command"]


async def test_data_handler_may_refuse_and_pipelined_lines_are_still_commands() -> None:
    h = Harness(lambda s: s.data.connect(lambda sender, e: "554 5.7.1 no thanks"))
    h.send(TRANSACTION + b"NOOP\r\n")
    assert h.replies()[-2:] == ["554 5.7.1 no thanks", "250 2.0.0 OK"]
    assert h.session.state is State.RCPT


async def test_unhandled_command_event() -> None:
    seen: list[Any] = []

    def unknown(sender: Any, e: Any) -> str | None:
        seen.append((e.command.verb, e.command.parameter))
        return "250 2.0.0 xclient ok" if e.command.verb == "XCLIENT" else None

    h = Harness(lambda s: s.unhandled_command.connect(unknown))
    h.output()
    h.send(b"xclient NAME=x\r\nBOGUS\r\n")
    assert h.replies() == ["250 2.0.0 xclient ok", "500 5.5.1 Error: command not recognized"]
    assert seen == [("XCLIENT", "NAME=x"), ("BOGUS", "")]


async def test_too_many_recipients() -> None:
    h = Harness(max_recipients=2)
    h.send(b"EHLO x\r\nMAIL FROM:<>\r\n")
    h.output()
    h.send(b"RCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\nRCPT TO:<c@x.example>\r\n")
    assert h.codes() == ["250", "250", "452"]


async def test_long_command_line_is_refused_and_the_next_line_is_intact() -> None:
    h = Harness()
    h.output()
    h.send(b"NOOP " + b"x" * 2000 + b"\r\nNOOP\r\n", read_size=100)
    assert h.replies() == ["500 5.5.2 Line too long", "250 2.0.0 OK"]


async def test_bare_lf_in_commands_is_refused() -> None:
    h = Harness()
    h.output()
    h.send(b"NOOP\nNOOP\r\n")
    assert h.codes() == ["500", "250"]


@pytest.mark.parametrize(
    "smuggled",
    [
        # Every known SMTP smuggling end-of-data variant, and cousins: none ends the message.
        b"a\n.\nMAIL FROM:<evil@x.example>\r\n",  # <LF>.<LF>
        b"a\r.\rMAIL FROM:<evil@x.example>\r\n",  # <CR>.<CR>
        b"a\n.\r\nMAIL FROM:<evil@x.example>\r\n",  # <LF>.<CR><LF>
        b"a\r\n.\nMAIL FROM:<evil@x.example>\r\n",  # <CR><LF>.<LF>
        b"a\r\n.\rMAIL FROM:<evil@x.example>\r\n",  # <CR><LF>.<CR>
        b"a\r\n.\x00\r\nMAIL FROM:<evil@x.example>\r\n",  # .<NUL>
        b"a\r.\r\nMAIL FROM:<evil@x.example>\r\n",  # <CR>.<CR><LF>
        b"a\r\n.\r\r\nMAIL FROM:<evil@x.example>\r\n",  # <CR><LF>.<CR><CR><LF>
        b"a\r\n \r\n.\nMAIL FROM:<evil@x.example>\r\n",  # space line, then <LF>
        b"a\r\n\x00.\r\nMAIL FROM:<evil@x.example>\r\n",  # <NUL>.<CR><LF>
    ],
)
@pytest.mark.parametrize("policy", ["reject", "normalize"])
async def test_smuggled_end_of_data_never_ends_the_message(smuggled: bytes, policy: str) -> None:
    h = Harness(bare_newline=policy)
    messages = received(h)
    h.send(TRANSACTION + smuggled)
    assert messages == []
    assert h.session.state is State.DATA  # still the same message: nothing smuggled out
    h.output()
    h.send(b"\r\n.\r\n")
    (reply,) = h.replies()
    bare = smuggled.replace(b"\r\n", b"")
    if policy == "reject" and (b"\r" in bare or b"\n" in bare):
        # A bare CR or bare LF under "reject": refused, never delivered.
        assert reply.startswith("554 5.5.2")
        assert messages == []
    else:
        # Clean, or normalized (bare LF read as CRLF, bare CR kept as text): ONE message,
        # with the would-be command inside it as text.
        assert reply.startswith("250")
        assert len(messages) == 1
        assert b"MAIL FROM:<evil@x.example>" in messages[0].message


async def test_bare_lf_normalized_when_configured() -> None:
    h = Harness(bare_newline="normalize")
    messages = received(h)
    h.send(TRANSACTION + b"a\nb\r\n.\r\n")
    assert h.codes()[-1] == "250"
    assert messages[0].message == b"a\r\nb\r\n"


async def test_disconnect_during_data_never_delivers() -> None:
    h = Harness()
    messages = received(h)
    lost: list[Any] = []
    h.session.disconnected += lambda s, e: lost.append(e.exception)
    h.send(TRANSACTION + b"partial message\r\n")
    h.transport.close()
    assert messages == []
    assert lost == [None]


async def test_on_session_without_start_transaction_gets_default_greeting() -> None:
    h = Harness(lambda s: None)
    assert h.replies() == ["220 mx.test ESMTP alephsmtp"]


async def test_async_on_session() -> None:
    async def on_session(s: Any) -> None:
        await asyncio.sleep(0)
        s.start_transaction("220 later.test ready")

    h = Harness(on_session)
    assert h.replies() == []
    assert not h.transport.reading  # nothing is read before the greeting
    await settle()
    assert h.replies() == ["220 later.test ready"]
    assert h.transport.reading


async def test_554_greeting_refuses_the_session() -> None:
    h = Harness(lambda s: s.start_transaction("554 5.7.1 go away"))
    assert h.replies() == ["554 5.7.1 go away"]
    assert h.transport.closed


async def test_idle_timeout_with_a_fake_clock() -> None:
    loop = MockLoop()
    h = Harness(loop=loop, idle_timeout=300)
    h.output()
    loop.advance(200)
    h.send(b"NOOP\r\n")  # activity moves the deadline
    assert h.replies() == ["250 2.0.0 OK"]
    loop.advance(200)
    assert not h.transport.closed
    loop.advance(100)
    assert h.replies() == ["421 4.4.2 Error: timeout exceeded"]
    assert h.transport.closed


async def test_buffers_go_back_to_the_pool() -> None:
    h = Harness()
    command_pool, data_pool = h.session._pools.command, h.session._pools.data
    h.send(TRANSACTION + b"x" * 100 + b"\r\n", read_size=10)
    # Between reads the session holds no buffer: an idle connection costs no read buffer.
    assert command_pool.in_use == 0
    assert data_pool.in_use == 0
    h.session.get_buffer(-1)  # asyncio asked for a buffer, then the peer went away
    assert data_pool.in_use == 1
    h.transport.close()
    assert command_pool.in_use == 0
    assert data_pool.in_use == 0
    assert command_pool.allocated == command_pool.in_use + command_pool.free


async def test_shutdown_of_an_idle_session() -> None:
    h = Harness()
    h.send(b"EHLO x\r\n")
    h.output()
    h.session.shutdown()
    assert h.replies() == ["421 4.3.2 Service shutting down, closing connection"]
    assert h.transport.closed


async def test_shutdown_lets_a_transaction_finish() -> None:
    h = Harness()
    messages = received(h)
    h.send(TRANSACTION + b"part one\r\n")
    h.output()
    h.session.shutdown()
    assert not h.transport.closed
    h.send(b".\r\n")
    assert h.replies() == [
        "250 2.0.0 OK: queued",
        "421 4.3.2 Service shutting down, closing connection",
    ]
    assert messages[0].message == b"part one\r\n"
    assert h.transport.closed


def test_implementation_is_known() -> None:
    assert IMPLEMENTATION in ("cython", "python")


async def test_events_are_made_on_first_use_and_cannot_be_replaced() -> None:
    h = Harness()
    assert h.session._events == {}  # an idle session carries no event objects
    h.session.custom_attribute = "users may keep their own state on a session"
    h.session.noop += lambda s, e: "250 2.0.0 mine"
    assert list(h.session._events) == ["noop"]
    with pytest.raises(AttributeError, match=r"use \+= / -= / \.connect"):
        h.session.noop = None  # type: ignore[assignment]
    h.output()
    h.send(b"NOOP\r\n")
    assert h.replies() == ["250 2.0.0 mine"]


async def test_message_size_is_reported() -> None:
    h = Harness()
    messages = received(h)
    h.send(TRANSACTION + b"12345678\r\n.\r\n")
    assert (messages[0].size, messages[0].streamed) == (10, False)
