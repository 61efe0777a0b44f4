"""alephsmtp sessions in front of milters: every verdict, every edit, every failure.

A real alephsmtp server on 127.0.0.1 and a scripted fake milter (tests/_fakemilter.py: the
filter side of the protocol, for the answers and faults real milters cannot be made to give),
driven by a raw SMTP client so each reply is seen exactly. Real milters are in
test_milter_peers.py; Postfix, as the reference, in test_milter_postfix.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from _fakemilter import FakeMilter
from alephsmtp import SmtpServer
from alephsmtp.milter import Milter, Milters
from alephsmtp.milter import protocol as p

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: hello\r\n"
    b" folded\r\n"
    b"Subject: second\r\n"
    b"\r\n"
    b"body line\r\n"
    b".dot line\r\n"
)


class Client:
    """A raw SMTP client: one command, one exact reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> tuple[Client, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        return client, await client.reply()

    async def reply(self) -> str:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 30)
            if not line:
                lines.append("<closed>")
                break
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                break
        return "\n".join(lines)

    async def cmd(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply()

    async def data(self, message: bytes) -> str:
        go = await self.cmd("DATA")
        if not go.startswith("354"):
            return go
        stuffed = b"\r\n".join(
            b"." + x if x.startswith(b".") else x for x in message.split(b"\r\n")
        )
        self.writer.write(stuffed + b".\r\n")
        return await self.reply()

    async def bdat(self, chunk: bytes, last: bool = False) -> str:
        self.writer.write(f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode() + chunk)
        return await self.reply()

    async def send(
        self,
        message: bytes = MESSAGE,
        sender: str = "alice@example.org",
        rcpts: tuple[str, ...] = ("bob@example.net",),
    ) -> list[str]:
        replies = [await self.cmd(f"MAIL FROM:<{sender}>")]
        replies += [await self.cmd(f"RCPT TO:<{rcpt}>") for rcpt in rcpts]
        replies.append(await self.data(message))
        return replies

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
            await self.reply()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class Mta:
    """An alephsmtp server with milters in front of a recording message handler."""

    def __init__(self, server: SmtpServer) -> None:
        self.server = server
        self.received: list[Any] = []
        self.chunks: list[bytes] = []
        self.discarded: list[Any] = []
        self.sessions: list[Any] = []
        self.port = 0

    async def client(self, ehlo: bool = True) -> Client:
        client, greeting = await Client.open(self.server.port)
        assert greeting.startswith("220"), greeting
        if ehlo:
            assert (await client.cmd("EHLO client.test")).startswith("250")
        return client


@contextlib.asynccontextmanager
async def mta(
    milters: Milters,
    *,
    stream: bool = False,
    wrap: bool = True,
    setup: Callable[[Any], None] | None = None,
    **options: Any,
) -> AsyncIterator[Mta]:
    options.setdefault("hostname", "mx.test")
    server = SmtpServer("127.0.0.1", 0, **options)
    box = Mta(server)

    def on_session(session: Any) -> None:
        box.sessions.append(session)
        if stream:
            session.message_chunk += lambda s, e: box.chunks.append(e.chunk)
        session.message_received += lambda s, e: box.received.append(e)
        session.message_discarded += lambda s, e: box.discarded.append(e)
        if setup is not None:
            setup(session)

    def attach_then(session: Any) -> None:
        on_session(session)  # the user's handlers first: the milters still answer before them
        milters.attach(session)

    await server.start(milters.wrap(on_session) if wrap else attach_then)
    box.port = server.port
    try:
        yield box
    finally:
        await server.stop(grace=2)


async def until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def eom(*responses: p.Response) -> dict[bytes, Any]:
    return {p.SMFIC_BODYEOB: list(responses) or [p.Continue()]}


# --- the conversation ----------------------------------------------------------------------------


async def test_every_event_reaches_the_milter_with_its_macros() -> None:
    async with FakeMilter() as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        assert await client.send(rcpts=("bob@example.net", "carol@example.net")) == [
            "250 2.1.0 OK",
            "250 2.1.5 OK",
            "250 2.1.5 OK",
            "250 2.0.0 OK: queued",
        ]
        await client.close()
        await milter.wait_closed()
    (delivered,) = box.received
    assert delivered.message == MESSAGE
    conversation = milter.last
    assert conversation.codes() == b"ODCHDMDRDRDTLLLLDNBDEQ"
    negotiation = conversation.commands[0]
    assert negotiation.numbers == (6, int(p.ALL_ACTIONS), int(p.ALL_PROTOCOL))
    (connect,) = conversation.of(p.SMFIC_CONNECT)
    host, port = client.writer.get_extra_info("sockname")[:2]
    assert connect.strings == (f"[{host}]", host)
    assert connect.family == p.SMFIA_INET
    assert connect.numbers == (port,)
    assert conversation.of(p.SMFIC_HELO)[0].strings == ("client.test",)
    assert conversation.of(p.SMFIC_MAIL)[0].strings == ("<alice@example.org>",)
    assert [c.strings for c in conversation.of(p.SMFIC_RCPT)] == [
        ("<bob@example.net>",),
        ("<carol@example.net>",),
    ]
    # Header values as Sendmail sends them: one leading space gone, folded lines joined by LF.
    assert [c.strings for c in conversation.of(p.SMFIC_HEADER)] == [
        ("From", "Alice <alice@example.org>"),
        ("To", "Bob <bob@example.net>"),
        ("Subject", "hello\n folded"),
        ("Subject", "second"),
    ]
    assert conversation.of(p.SMFIC_BODY)[0].data == b"body line\r\n.dot line\r\n"
    connect_macros = conversation.macros(p.SMFIC_CONNECT)
    assert connect_macros["j"] == "mx.test"
    assert connect_macros["{daemon_name}"] == "alephsmtp"
    assert connect_macros["{client_addr}"] == host
    assert connect_macros["{client_port}"] == str(port)
    assert connect_macros["{daemon_port}"] == str(box.port)
    assert connect_macros["_"] == f"unknown [{host}]"
    queue_id = conversation.macros(p.SMFIC_MAIL)["i"]
    assert conversation.macros(p.SMFIC_MAIL)["{mail_addr}"] == "alice@example.org"
    assert conversation.macros(p.SMFIC_MAIL)["{mail_host}"] == "example.org"
    assert conversation.macros(p.SMFIC_RCPT) == {
        "i": queue_id,
        "{rcpt_addr}": "carol@example.net",
        "{rcpt_host}": "example.net",
    }
    assert conversation.macros(p.SMFIC_DATA) == {"i": queue_id}
    assert conversation.macros(p.SMFIC_EOH) == {"i": queue_id}
    assert conversation.macros(p.SMFIC_BODYEOB) == {"i": queue_id}
    report = delivered.envelope.milter
    assert report.queue_id == queue_id
    assert report.applied
    assert [(v.milter, v.stage, v.action) for v in report.verdicts] == [
        (milter.endpoint, "end-of-message", "continue")
    ]


async def test_auth_macros_name_the_user_and_the_mechanism() -> None:
    """After AUTH, MAIL's macros say who and how, as Postfix sends them ({auth_type},
    {auth_authen}, {auth_author}): rspamd and OpenDKIM treat such mail as outbound."""

    def setup(session: Any) -> None:
        session.auth += lambda s, e: e.username == "alice" and e.check_password("pw")

    plain = base64.b64encode(b"\0alice\0pw").decode()
    async with (
        FakeMilter() as milter,
        mta(Milters([milter.endpoint]), setup=setup, auth_over_plaintext=True) as box,
    ):
        client = await box.client()
        assert (await client.cmd(f"AUTH PLAIN {plain}")).startswith("235")
        assert (await client.cmd("MAIL FROM:<alice@example.org> AUTH=<>")).startswith("250")
        await client.close()
        await milter.wait_closed()
    macros = milter.last.macros(p.SMFIC_MAIL)
    assert macros["{auth_type}"] == "PLAIN"
    assert macros["{auth_authen}"] == "alice"
    assert macros["{auth_author}"] == "<>"
    assert box.sessions[0].auth_mechanism == "PLAIN"


async def test_a_nul_in_a_header_is_refused_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No milter string can carry a NUL: the message is refused (5xx: it is the message's
    fault, retrying will not help), and nothing is logged as an error."""
    async with FakeMilter() as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        message = b"From: a@example.org\r\nSubject: a\x00b\r\n\r\nbody\r\n"
        replies = await client.send(message)
        assert replies[-1] == "554 5.6.0 Message content rejected: NUL in a header field"
        assert (await client.cmd("NOOP")).startswith("250")  # the session goes on
        await client.close()
    assert box.received == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_mail_parameters_and_unknown_commands_reach_the_milter() -> None:
    async with FakeMilter() as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        assert (await client.cmd("MAIL FROM:<> SIZE=100 BODY=8BITMIME")).startswith("250")
        assert (await client.cmd("RCPT TO:<bob@example.net> NOTIFY=NEVER")).startswith("250")
        assert (await client.cmd("XYZZY plugh")).startswith("500")
        await client.close()
        await milter.wait_closed()
    conversation = milter.last
    assert conversation.of(p.SMFIC_MAIL)[0].strings == ("<>", "SIZE=100", "BODY=8BITMIME")
    assert conversation.of(p.SMFIC_RCPT)[0].strings == ("<bob@example.net>", "NOTIFY=NEVER")
    assert conversation.of(p.SMFIC_UNKNOWN)[0].strings == ("XYZZY plugh",)
    # The transaction never ended: the milter is told before QUIT.
    assert conversation.codes().endswith(b"UAQ")  # as Postfix: abort, then quit


async def test_large_body_goes_in_65535_byte_chunks() -> None:
    body = b"".join(b"%06d " % n + b"x" * 70 + b"\r\n" for n in range(3000))
    message = b"Subject: big\r\n\r\n" + body
    async with FakeMilter() as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        assert (await client.send(message))[-1].startswith("250")
        await client.close()
    chunks = [c.data for c in milter.last.of(p.SMFIC_BODY)]
    assert [len(c) for c in chunks] == [65535, 65535, 65535, len(body) - 3 * 65535]
    assert b"".join(chunks) == body
    assert box.received[0].message == message


async def test_body_without_final_crlf_gets_one_for_the_milter() -> None:
    async with FakeMilter() as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        await client.cmd("MAIL FROM:<a@example.org>")
        await client.cmd("RCPT TO:<b@example.net>")
        assert (await client.bdat(b"Subject: x\r\n\r\nno end", last=True)).startswith("250")
        await client.close()
    assert milter.last.of(p.SMFIC_BODY)[0].data == b"no end\r\n"
    assert box.received[0].message == b"Subject: x\r\n\r\nno end"  # the message is not changed
    # CHUNKING: the DATA event comes with the first chunk, before the content.
    assert milter.last.codes().index(p.SMFIC_DATA) < milter.last.codes().index(p.SMFIC_HEADER)


# --- verdicts at each stage ----------------------------------------------------------------------


async def test_connect_reject_refuses_at_the_greeting() -> None:
    script = {p.SMFIC_CONNECT: [p.Reject()]}
    async with FakeMilter(script) as milter, mta(Milters([milter.endpoint])) as box:
        client, greeting = await Client.open(box.port)
        assert greeting == "554 5.7.1 mx.test ESMTP not accepting connections"
        assert await client.reply() == "<closed>"


async def test_connect_tempfail_answers_mail_and_not_helo() -> None:
    # Sendmail/Postfix: a connect-stage refusal does not refuse HELO/EHLO; it answers MAIL
    # (and VRFY, STARTTLS...) for the rest of the session.
    script = {p.SMFIC_CONNECT: [p.Tempfail()]}
    async with FakeMilter(script) as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        assert await client.cmd("MAIL FROM:<a@example.org>") == (
            "451 4.7.1 Service unavailable - try again later"
        )
        assert (await client.cmd("VRFY bob")).startswith("451 4.7.1")
        assert await client.cmd("MAIL FROM:<a@example.org>") == (
            "451 4.7.1 Service unavailable - try again later"
        )
        await client.close()
    assert milter.last.codes() == b"ODC"  # nothing more went to it


async def test_connect_reject_without_waiting_answers_mail() -> None:
    # attach() without awaiting it: the greeting does not wait, the refusal answers MAIL.
    script = {p.SMFIC_CONNECT: [p.ReplyCode("550 5.7.1 go away")]}
    async with FakeMilter(script) as milter, mta(Milters([milter.endpoint]), wrap=False) as box:
        client = await box.client()
        assert await client.cmd("MAIL FROM:<a@example.org>") == "550 5.7.1 go away"
        await client.close()


async def test_helo_reject_answers_mail() -> None:
    script = {p.SMFIC_HELO: [p.Reject()]}
    async with FakeMilter(script) as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()  # EHLO itself is accepted
        assert await client.cmd("MAIL FROM:<a@example.org>") == "550 5.7.1 Command rejected"
        await client.close()


@pytest.mark.parametrize(
    ("response", "reply"),
    [
        (p.Reject(), "550 5.7.1 Command rejected"),
        (p.Tempfail(), "451 4.7.1 Service unavailable - try again later"),
        (
            p.ReplyCode("553 5.1.8 sender domain does not exist"),
            "553 5.1.8 sender domain does not exist",
        ),
        (p.ReplyCode("452 4.3.1 try 100%% later"), "452 4.3.1 try 100% later"),
        (
            p.ReplyCode("550-5.7.1 first line\r\n550 5.7.1 second line"),
            "550-5.7.1 first line\n550 5.7.1 second line",
        ),
    ],
    ids=["reject", "tempfail", "reply", "percent", "multiline"],
)
async def test_mail_verdicts(response: p.Response, reply: str) -> None:
    async with (
        FakeMilter({p.SMFIC_MAIL: [response]}) as milter,
        mta(Milters([milter.endpoint])) as box,
    ):
        client = await box.client()
        assert await client.cmd("MAIL FROM:<a@example.org>") == reply
        # The next transaction goes to the milter again.
        assert await client.cmd("MAIL FROM:<a@example.org>") == reply
        await client.close()
    assert milter.last.counts[p.SMFIC_MAIL] == 2


async def test_rcpt_reject_refuses_that_recipient_only() -> None:
    def rcpt(command: p.Command, conversation: Any) -> list[p.Response]:
        if "spamtrap" in command.strings[0]:
            return [p.ReplyCode("550 5.1.1 no such user")]
        return [p.Continue()]

    async with FakeMilter({p.SMFIC_RCPT: rcpt}) as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        replies = await client.send(
            rcpts=("bob@example.net", "spamtrap@example.net", "carol@example.net")
        )
        assert replies == [
            "250 2.1.0 OK",
            "250 2.1.5 OK",
            "550 5.1.1 no such user",
            "250 2.1.5 OK",
            "250 2.0.0 OK: queued",
        ]
        await client.close()
    assert box.received[0].envelope.recipients == ["bob@example.net", "carol@example.net"]
    (verdict,) = [v for v in box.received[0].envelope.milter.verdicts if v.stage == "rcpt"]
    assert (verdict.action, str(verdict.reply)) == ("reject", "550 5.1.1 no such user")


async def test_data_tempfail() -> None:
    async with (
        FakeMilter({p.SMFIC_DATA: [p.Tempfail()]}) as milter,
        mta(Milters([milter.endpoint])) as box,
    ):
        client = await box.client()
        assert (await client.send())[-1] == "451 4.7.1 Service unavailable - try again later"
        await client.close()
    assert box.received == []


async def test_bdat_first_chunk_refused_by_data_event() -> None:
    async with (
        FakeMilter({p.SMFIC_DATA: [p.Reject()]}) as milter,
        mta(Milters([milter.endpoint])) as box,
    ):
        client = await box.client()
        await client.cmd("MAIL FROM:<a@example.org>")
        await client.cmd("RCPT TO:<b@example.net>")
        assert (
            await client.bdat(b"Subject: x\r\n\r\nhi\r\n", last=True)
            == "550 5.7.1 Command rejected"
        )
        await client.close()
    assert box.received == []


@pytest.mark.parametrize("libmilter", [True, False], ids=["libmilter", "answers-everything"])
@pytest.mark.parametrize("code", [p.SMFIC_HEADER, p.SMFIC_EOH, p.SMFIC_BODY, p.SMFIC_BODYEOB])
async def test_content_reject_refuses_the_message(code: bytes, libmilter: bool) -> None:
    script = {code: [p.ReplyCode("554 5.7.1 spam")]}
    async with (
        FakeMilter(script, libmilter=libmilter) as milter,
        mta(Milters([milter.endpoint])) as box,
    ):
        client = await box.client()
        assert (await client.send())[-1] == "554 5.7.1 spam"
        # The session goes on: the next message is judged afresh.
        assert (await client.send())[-1] == "554 5.7.1 spam"
        await client.close()
        await milter.wait_closed(len(milter.conversations))
    assert box.received == []
    # The content goes in one batch. A verdict before its end may leave answers in flight
    # (libmilter ignores the rest; a filter that answers it all would be out of step), so
    # the next message goes over a fresh connection, shown the connection and HELO again.
    if code == p.SMFIC_BODYEOB:
        (conversation,) = milter.conversations
        assert conversation.codes().count(p.SMFIC_BODYEOB) == 2
    else:
        first, second = milter.conversations
        assert first.codes().count(p.SMFIC_MAIL) == 1
        assert second.codes().startswith(b"ODCHDM")
        assert second.codes().count(p.SMFIC_MAIL) == 1


async def test_eom_accept_progress_and_quarantine() -> None:
    script = eom(p.Progress(), p.Quarantine("looks odd"), p.Progress(), p.Accept())
    async with FakeMilter(script) as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        assert (await client.send())[-1] == "250 2.0.0 OK: queued"
        await client.close()
    report = box.received[0].envelope.milter
    assert report.quarantine == "looks odd"
    assert [v.action for v in report.verdicts] == ["quarantine", "accept"]


@pytest.mark.parametrize("code", [p.SMFIC_MAIL, p.SMFIC_RCPT, p.SMFIC_HEADER, p.SMFIC_BODYEOB])
async def test_discard_accepts_and_drops(code: bytes) -> None:
    async with FakeMilter({code: [p.Discard()]}) as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        replies = await client.send()
        assert all(reply.startswith("250") for reply in replies)
        # The next transaction is not discarded.
        milter.script = {}
        assert (await client.send())[-1].startswith("250")
        await client.close()
    assert len(box.received) == 1


async def test_shutdown_at_helo_answers_the_next_command() -> None:
    # HELO's answer is read before the milter's next event (it never refuses HELO itself).
    script = {p.SMFIC_HELO: [p.Shutdown()]}
    async with FakeMilter(script) as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        assert await client.cmd("MAIL FROM:<a@example.org>") == (
            "421 4.7.0 Server closing connection"
        )
        assert await client.reply() == "<closed>"


async def test_shutdown_says_421_and_closes() -> None:
    async with (
        FakeMilter({p.SMFIC_RCPT: [p.Shutdown()]}) as milter,
        mta(Milters([milter.endpoint])) as box,
    ):
        client = await box.client()
        assert (await client.cmd("MAIL FROM:<a@example.org>")).startswith("250")
        assert await client.cmd("RCPT TO:<b@example.net>") == "421 4.7.0 Server closing connection"
        assert await client.reply() == "<closed>"


async def test_skip_is_understood() -> None:
    # The whole content goes in one batch, so SMFIR_SKIP cannot spare the chunks already
    # sent (a libmilter filter answers each of them); it spares the later ones of a streamed
    # message (test_streamed_skip_spares_later_chunks).
    body = b"y" * 200_000
    script = {p.SMFIC_BODY: [p.Skip()]}
    async with FakeMilter(script) as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        assert (await client.send(b"Subject: s\r\n\r\n" + body + b"\r\n"))[-1].startswith("250")
        await client.close()
    assert milter.last.counts[p.SMFIC_BODY] == 4
    assert p.SMFIC_BODYEOB in milter.last.counts
    assert box.received[0].message.endswith(body + b"\r\n")


async def test_streamed_skip_spares_later_chunks() -> None:
    script = {p.SMFIC_BODY: [p.Skip()]}
    async with FakeMilter(script) as milter, mta(Milters([milter.endpoint]), stream=True) as box:
        client = await box.client()
        await client.cmd("MAIL FROM:<a@example.org>")
        await client.cmd("RCPT TO:<b@example.net>")
        assert (await client.bdat(b"Subject: s\r\n\r\n" + b"y" * 70_000)).startswith("250")
        assert (await client.bdat(b"z" * 70_000)).startswith("250")
        assert (await client.bdat(b"end\r\n", last=True)).startswith("250")
        await client.close()
    assert milter.last.counts[p.SMFIC_BODY] == 1
    assert p.SMFIC_BODYEOB in milter.last.counts
    assert len(box.received) == 1


async def test_unknown_command_reject_replaces_500() -> None:
    script = {p.SMFIC_UNKNOWN: [p.ReplyCode("554 5.7.1 go away")]}
    async with FakeMilter(script) as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        assert await client.cmd("XYZZY") == "554 5.7.1 go away"
        await client.close()


# --- negotiation ---------------------------------------------------------------------------------


async def test_no_reply_steps_are_not_waited_for() -> None:
    # rspamd's way: no reply to anything but the end of the message.
    async with (
        FakeMilter(protocol=int(p.NO_REPLY)) as milter,
        mta(Milters([milter.endpoint])) as box,
    ):
        client = await box.client()
        assert (await client.send())[-1].startswith("250")
        await client.close()
        await milter.wait_closed()
    assert milter.last.codes() == b"ODCHDMDRDTLLLLDNBDEQ"


async def test_steps_left_out_are_not_sent_but_their_macros_are() -> None:
    steps = p.Step.NOCONNECT | p.Step.NOHELO | p.Step.NORCPT | p.Step.NOHDRS | p.Step.NOBODY
    async with FakeMilter(protocol=int(steps)) as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        assert (await client.send())[-1].startswith("250")
        await client.close()
        await milter.wait_closed()
    assert milter.last.codes() == b"ODDMDDTDNDEQ"


async def test_macro_lists_asked_for_in_the_negotiation() -> None:
    wanted = {p.MacroStage.CONNECT: ("j", "{nonexistent}"), p.MacroStage.ENVFROM: ("{mail_addr}",)}
    async with FakeMilter(macros=wanted) as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        assert (await client.send())[-1].startswith("250")
        await client.close()
    assert milter.last.macros(p.SMFIC_CONNECT) == {"j": "mx.test"}
    assert milter.last.macros(p.SMFIC_MAIL) == {"{mail_addr}": "alice@example.org"}


async def test_protocol_version_2_gets_no_data_or_unknown_events() -> None:
    async with FakeMilter(version=2) as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        assert (await client.cmd("XYZZY")).startswith("500")
        assert (await client.send())[-1].startswith("250")
        await client.close()
    assert p.SMFIC_DATA not in milter.last.counts
    assert p.SMFIC_UNKNOWN not in milter.last.counts


async def test_negotiation_asking_for_too_much_is_a_failure() -> None:
    # A filter version newer than the MTA's is a protocol failure (Postfix: milter8_connect).
    async with FakeMilter(version=7) as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        assert (await client.cmd("MAIL FROM:<a@example.org>")).startswith("451 4.7.1")
        await client.close()


# --- modifications -------------------------------------------------------------------------------


async def test_header_edits_as_postfix_applies_them() -> None:
    edits = [
        p.AddHeader("X-Added", "appended"),
        p.InsertHeader(0, "X-Top", "first"),
        p.InsertHeader(1, "X-Also-Top", "second"),  # index 1: after the MTA's own Received:
        p.InsertHeader(3, "X-Third", "third"),
        p.ChangeHeader(2, "subject", "changed second"),
        p.ChangeHeader(1, "To", ""),  # deleted
        p.ChangeHeader(1, "X-Missing", "added at the end"),
        p.ChangeHeader(1, "X-Gone", ""),  # nothing to delete
        p.AddHeader("X-Folded", "line one\nline two\r\n\tline three"),
    ]
    async with (
        FakeMilter(eom(*edits, p.Continue())) as milter,
        mta(Milters([milter.endpoint])) as box,
    ):
        client = await box.client()
        assert (await client.send())[-1].startswith("250")
        await client.close()
    delivered = box.received[0]
    # Postfix's rules: inserts count the MTA's own (hidden) Received: field at the top, which
    # X-Top went above, so X-Also-Top (1) went above it too, and X-Third (3) right below it;
    # a changed field takes the milter's spelling of its name.
    assert delivered.message == (
        b"X-Top: first\r\n"
        b"X-Also-Top: second\r\n"
        b"X-Third: third\r\n"
        b"From: Alice <alice@example.org>\r\n"
        b"Subject: hello\r\n"
        b" folded\r\n"
        b"subject: changed second\r\n"
        b"X-Added: appended\r\n"
        b"X-Missing: added at the end\r\n"
        b"X-Folded: line one\r\n"
        b"\tline two\r\n"
        b"\tline three\r\n"
        b"\r\n"
        b"body line\r\n"
        b".dot line\r\n"
    )
    assert delivered.envelope.message == delivered.message
    assert delivered.size == len(delivered.message)
    report = delivered.envelope.milter
    assert report.added_headers[:2] == (("X-Added", "appended"), ("X-Top", "first"))
    assert [e.modification for e in report.edits] == edits


async def test_leading_space_milter_writes_its_own_blank() -> None:
    script = eom(p.AddHeader("X-Raw", "  two spaces"), p.Continue())
    async with (
        FakeMilter(script, protocol=int(p.Step.HDR_LEADSPC)) as milter,
        mta(Milters([milter.endpoint])) as box,
    ):
        client = await box.client()
        assert (await client.send())[-1].startswith("250")
        await client.close()
    assert b"\r\nX-Raw:  two spaces\r\n\r\n" in box.received[0].message
    # With SMFIP_HDR_LEADSPC the header values keep their leading space.
    assert milter.last.of(p.SMFIC_HEADER)[0].strings == ("From", " Alice <alice@example.org>")


async def test_envelope_edits() -> None:
    edits = [
        p.ChangeSender("<bounce@example.org>", "RET=HDRS ENVID=abc+2Bdef"),
        p.AddRecipient("<archive@example.org>"),
        p.AddRecipient("<copy@example.org>", "NOTIFY=NEVER"),
        p.DeleteRecipient("<bob@example.net>"),
        p.AddRecipient("<not an address>"),  # dropped with a warning, as Postfix drops bad args
    ]
    async with (
        FakeMilter(eom(*edits, p.Continue())) as milter,
        mta(Milters([milter.endpoint])) as box,
    ):
        client = await box.client()
        assert (await client.send(rcpts=("bob@example.net", "carol@example.net")))[-1].startswith(
            "250"
        )
        await client.close()
    envelope = box.received[0].envelope
    assert envelope.return_path == "bounce@example.org"
    assert envelope.dsn_ret == "HDRS"
    assert envelope.dsn_envid == "abc+def"
    assert envelope.recipients == ["carol@example.net", "archive@example.org", "copy@example.org"]
    assert envelope.rcpt_parameters[2] == {"NOTIFY": "NEVER"}
    assert len(envelope.dsn_notify) == len(envelope.dsn_orcpt) == 3
    assert envelope.milter.sender == "<bounce@example.org>"
    assert envelope.milter.removed_recipients == ("<bob@example.net>",)
    assert envelope.milter.added_recipients == ("<archive@example.org>", "<copy@example.org>")
    assert box.received[0].message == MESSAGE


async def test_replace_body() -> None:
    script = eom(
        p.ReplaceBody(b"new body\nsecond "), p.ReplaceBody(b"line\r\nno end"), p.Continue()
    )
    async with FakeMilter(script) as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        assert (await client.send())[-1].startswith("250")
        await client.close()
    assert (
        box.received[0].message.split(b"\r\n\r\n", 1)[1] == b"new body\r\nsecond line\r\nno end\r\n"
    )
    assert box.received[0].envelope.milter.body_replaced


async def test_edits_need_their_negotiated_action() -> None:
    actions = int(p.Action.ADDHDRS)  # no SMFIF_CHGBODY
    script = eom(p.ReplaceBody(b"x"), p.Continue())
    async with (
        FakeMilter(script, actions=actions) as milter,
        mta(Milters([milter.endpoint])) as box,
    ):
        client = await box.client()
        assert (await client.send())[-1] == "451 4.7.1 Service unavailable - try again later"
        await client.close()
    assert box.received == []


async def test_bad_header_name_is_a_protocol_failure() -> None:
    script = eom(p.AddHeader("Bad Name", "x"), p.Continue())
    async with FakeMilter(script) as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        assert (await client.send())[-1].startswith("451 4.7.1")
        await client.close()


# --- chains of milters ---------------------------------------------------------------------------


async def test_second_milter_sees_the_first_ones_edits() -> None:
    first = FakeMilter(eom(p.InsertHeader(0, "X-First", "was here"), p.Continue()))
    second = FakeMilter(eom(p.AddHeader("X-Second", "too"), p.Accept()))
    async with (
        first,
        second,
        mta(Milters([first.endpoint, Milter(second.endpoint, name="two")])) as box,
    ):
        client = await box.client()
        assert (await client.send())[-1].startswith("250")
        await client.close()
    assert second.last.of(p.SMFIC_HEADER)[0].strings == ("X-First", "was here")
    message = box.received[0].message
    assert message.startswith(b"X-First: was here\r\nFrom:")
    assert b"\r\nX-Second: too\r\n\r\n" in message
    report = box.received[0].envelope.milter
    assert [(v.milter, v.action) for v in report.verdicts] == [
        (first.endpoint, "continue"),
        ("two", "accept"),
    ]


async def test_first_refusal_ends_the_chain() -> None:
    first = FakeMilter({p.SMFIC_MAIL: [p.Reject()]})
    second = FakeMilter()
    async with first, second, mta(Milters([first.endpoint, second.endpoint])) as box:
        client = await box.client()
        assert (await client.cmd("MAIL FROM:<a@example.org>")).startswith("550")
        await client.close()
    assert p.SMFIC_MAIL not in second.last.counts


async def test_accept_at_rcpt_leaves_that_milter_out_of_this_message_only() -> None:
    first = FakeMilter({p.SMFIC_RCPT: [[p.Accept()], [p.Continue()]]})
    second = FakeMilter()
    async with first, second, mta(Milters([first.endpoint, second.endpoint])) as box:
        client = await box.client()
        assert (await client.send())[-1].startswith("250")
        assert (await client.send())[-1].startswith("250")
        await client.close()
    codes = first.last.codes()
    assert codes.count(p.SMFIC_BODYEOB) == 1  # only the second message
    assert second.last.codes().count(p.SMFIC_BODYEOB) == 2


# --- failures: the failure policy, never a hang --------------------------------------------------


async def test_unreachable_milter_tempfails_by_default() -> None:
    async with FakeMilter() as milter:
        endpoint = milter.endpoint  # closed when the block ends: nothing listens there
    async with mta(Milters([endpoint])) as box:
        client = await box.client()
        assert await client.cmd("MAIL FROM:<a@example.org>") == (
            "451 4.7.1 Service unavailable - try again later"
        )
        await client.close()
    async with mta(Milters([endpoint], default_action="accept")) as box:
        client = await box.client()
        assert (await client.send())[-1].startswith("250")
        await client.close()
    verdicts = box.received[0].envelope.milter.verdicts
    assert [(v.stage, v.action) for v in verdicts] == [("connect", "failed")]
    async with mta(Milters([endpoint], default_action="reject")) as box:
        client, greeting = await Client.open(box.port)
        assert greeting == "554 5.7.1 mx.test ESMTP not accepting connections"
    async with mta(Milters([endpoint], default_action="reject"), wrap=False) as box:
        client = await box.client()
        assert await client.cmd("MAIL FROM:<a@example.org>") == "550 5.5.0 Service unavailable"
        await client.close()


@pytest.mark.parametrize(
    "fault",
    [
        "close",
        ("sleep", 5.0),
        "hang",
        b"\x00\x00\x00\x00",
        b"\x00\x00\x00\x01Z",
        b"\xff\xff\xff\xffc",
    ],
    ids=["dies", "slow", "hangs", "zero-length", "unknown-reply", "huge-length"],
)
@pytest.mark.parametrize("code", [p.SMFIC_RCPT, p.SMFIC_HEADER, p.SMFIC_BODYEOB])
async def test_faulty_milter_gets_its_default_action(fault: Any, code: bytes) -> None:
    milters = Milters([Milter("inet:127.0.0.1:1", name="placeholder")])
    async with FakeMilter({code: [fault]}) as milter:
        milters = Milters(
            [Milter(milter.endpoint, command_timeout=0.5, content_timeout=0.5)],
            default_action="tempfail",
        )
        async with mta(milters) as box:
            client = await box.client()
            replies = await client.send()
            assert replies[-1].startswith("451 4.7.1") or (
                code == p.SMFIC_RCPT and replies[1].startswith("451 4.7.1")
            ), replies
            # The milter stays out of the session: its failure answers the next transaction.
            assert await client.cmd("RSET") == "250 2.0.0 OK"
            assert (await client.cmd("MAIL FROM:<a@example.org>")).startswith("451 4.7.1")
            await client.close()
        assert box.received == []


async def test_faulty_milter_with_accept_policy_is_skipped() -> None:
    milter = FakeMilter({p.SMFIC_HEADER: ["close"]})
    async with milter, mta(Milters([milter.endpoint], default_action="accept")) as box:
        client = await box.client()
        assert (await client.send())[-1] == "250 2.0.0 OK: queued"
        assert (await client.send())[-1] == "250 2.0.0 OK: queued"
        await client.close()
    assert [e.message for e in box.received] == [MESSAGE, MESSAGE]
    failed = box.received[0].envelope.milter.verdicts[0]
    assert (failed.stage, failed.action) == ("header", "failed")
    assert "closed" in (failed.detail or "")


async def test_half_an_edit_list_is_not_applied() -> None:
    # An edit, then the milter dies before its verdict.
    async with FakeMilter({p.SMFIC_BODYEOB: [[p.AddHeader("X-Half", "1"), "close"]]}) as milter:
        milters = Milters([milter.endpoint], default_action="accept")
        async with mta(milters) as box:
            client = await box.client()
            assert (await client.send())[-1].startswith("250")
            await client.close()
    assert box.received[0].message == MESSAGE
    assert box.received[0].envelope.milter.edits == ()


async def test_client_gone_while_the_milter_works_ends_cleanly() -> None:
    # The client sent its message and left before the verdict. The session, not reading
    # while a handler works, learns of it when it answers (as Postfix's smtpd does: RFC 1047's
    # window); nothing hangs, the milter connection is closed, the server stops cleanly.
    async with (
        FakeMilter({p.SMFIC_BODYEOB: [("sleep", 0.3)]}) as milter,
        mta(Milters([milter.endpoint])) as box,
    ):
        client = await box.client()
        await client.cmd("MAIL FROM:<a@example.org>")
        await client.cmd("RCPT TO:<b@example.net>")
        await client.cmd("DATA")
        client.writer.write(MESSAGE + b".\r\n")
        await client.writer.drain()
        await until(lambda: p.SMFIC_BODYEOB in milter.last.counts)
        client.writer.transport.abort()
        await milter.wait_closed()
    assert len(box.received) <= 1


async def test_client_gone_mid_data_tells_the_milter() -> None:
    async with FakeMilter() as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        await client.cmd("MAIL FROM:<a@example.org>")
        await client.cmd("RCPT TO:<b@example.net>")
        await client.cmd("DATA")
        client.writer.write(MESSAGE[:40])
        await client.writer.drain()
        await asyncio.sleep(0.05)
        client.writer.transport.abort()
        await milter.wait_closed()
    assert box.received == []
    assert milter.last.codes().endswith(b"AQ")


# --- streaming -----------------------------------------------------------------------------------


async def test_streamed_message_goes_to_the_milter_as_it_arrives() -> None:
    body = b"z" * 150_000 + b"\r\n"
    script = eom(p.InsertHeader(0, "X-Signed", "yes"), p.Continue())
    async with FakeMilter(script) as milter, mta(Milters([milter.endpoint]), stream=True) as box:
        client = await box.client()
        assert (await client.send(b"Subject: streamed\r\n\r\n" + body))[-1].startswith("250")
        await client.close()
    stored = b"".join(box.chunks)
    assert stored == b"Subject: streamed\r\n\r\n" + body
    assert b"".join(c.data for c in milter.last.of(p.SMFIC_BODY)) == body
    delivered = box.received[0]
    assert delivered.streamed
    assert delivered.message == b""
    report = delivered.envelope.milter
    assert not report.applied
    assert report.apply(stored) == b"X-Signed: yes\r\n" + stored


async def test_streamed_body_replacement_is_refused_clearly() -> None:
    script = eom(p.ReplaceBody(b"other\r\n"), p.Continue())
    async with FakeMilter(script) as milter, mta(Milters([milter.endpoint]), stream=True) as box:
        client = await box.client()
        assert (await client.send())[-1] == "451 4.7.1 Service unavailable - try again later"
        await client.close()
    assert box.received == []
    assert len(box.discarded) == 1  # the user's spool is told


async def test_streamed_bdat_sends_data_before_content() -> None:
    async with FakeMilter() as milter, mta(Milters([milter.endpoint]), stream=True) as box:
        client = await box.client()
        await client.cmd("MAIL FROM:<a@example.org>")
        await client.cmd("RCPT TO:<b@example.net>")
        assert (await client.bdat(b"Subject: one\r\n")).startswith("250")
        assert (await client.bdat(b"\r\nbody\r\n", last=True)).startswith("250")
        await client.close()
    codes = milter.last.codes()
    assert codes.index(p.SMFIC_DATA) < codes.index(p.SMFIC_HEADER) < codes.index(p.SMFIC_EOH)
    assert milter.last.of(p.SMFIC_BODY)[0].data == b"body\r\n"
    assert b"".join(box.chunks) == b"Subject: one\r\n\r\nbody\r\n"


async def test_streamed_reject_tells_message_discarded() -> None:
    async with (
        FakeMilter(eom(p.Reject())) as milter,
        mta(Milters([milter.endpoint]), stream=True) as box,
    ):
        client = await box.client()
        assert (await client.send())[-1] == "550 5.7.1 Command rejected"
        await client.close()
    assert box.received == []
    assert [str(e.reply) for e in box.discarded] == ["550 5.7.1 Command rejected"]


# --- transactions --------------------------------------------------------------------------------


async def test_rset_aborts_the_transaction_at_the_milter() -> None:
    async with FakeMilter() as milter, mta(Milters([milter.endpoint])) as box:
        client = await box.client()
        await client.cmd("MAIL FROM:<a@example.org>")
        await client.cmd("RCPT TO:<b@example.net>")
        await client.cmd("RSET")
        assert (await client.send())[-1].startswith("250")
        await client.close()
    assert b"DRA" in milter.last.codes()
    assert len(box.received) == 1


async def test_lmtp_keeps_its_recipients() -> None:
    script = eom(
        p.AddRecipient("<extra@example.org>"), p.DeleteRecipient("<bob@example.net>"), p.Continue()
    )
    async with FakeMilter(script) as milter, mta(Milters([milter.endpoint]), lmtp=True) as box:
        client, _ = await Client.open(box.port)
        assert (await client.cmd("LHLO client.test")).startswith("250")
        await client.cmd("MAIL FROM:<a@example.org>")
        await client.cmd("RCPT TO:<bob@example.net>")
        assert (await client.data(MESSAGE)).startswith("250")
        await client.close()
    assert box.received[0].envelope.recipients == ["bob@example.net"]
    assert box.received[0].envelope.milter.edits == ()


async def test_one_milter_connection_per_session_closed_with_quit() -> None:
    async with FakeMilter() as milter, mta(Milters([milter.endpoint])) as box:
        for _ in range(3):
            client = await box.client()
            assert (await client.send())[-1].startswith("250")
            assert (await client.send())[-1].startswith("250")
            await client.close()
        await milter.wait_closed(3)
    assert len(milter.conversations) == 3
    assert all(
        c.codes().endswith(b"EQ") and c.codes().count(b"E") == 2 for c in milter.conversations
    )


@pytest.mark.parametrize("wrap", [True, False], ids=["wrap", "attach"])
async def test_client_gone_during_the_connect_stage_leaves_no_milter_connection(
    wrap: bool,
) -> None:
    milter = FakeMilter(negotiation=("sleep", 0.3))
    async with milter, mta(Milters([milter.endpoint]), wrap=wrap) as box:
        _, writer = await asyncio.open_connection("127.0.0.1", box.port)
        writer.transport.abort()  # while the milter negotiates
        await until(lambda: bool(milter.conversations))
        await milter.wait_closed()  # closed by the MTA, not left open
    assert len(milter.conversations) == 1
