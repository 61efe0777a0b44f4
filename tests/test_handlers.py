"""Ready-made handlers over real sockets: print, Maildir, mbox, .eml files, relay upstream."""

from __future__ import annotations

import asyncio
import io
import mailbox
import os
import re
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from _cli import start_cli, stop_cli
from alephsmtp import Address, SmtpEnvelope, SmtpServer
from alephsmtp.handlers import (
    Deliver,
    EmlDirectory,
    MaildirStore,
    MboxStore,
    PrintMessage,
    Relay,
    _received_header,
    envelope_headers,
)
from alephsmtp.testing import SmtpTestServer

MESSAGE = (
    b"From: Alice <a@example.org>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"From the start of a line: mbox must mangle this one.\r\n"
    b".a dot-stuffed line\r\n"
    b"last line\r\n"
)
Serve = Callable[..., Awaitable[SmtpServer]]
# mailbox writes os.linesep: LF, or CRLF on Windows.
NL = os.linesep.encode()


class Inbox:
    """A ``message_received`` handler that keeps what it got."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def __call__(self, session: Any, e: Any) -> None:
        self.messages.append(e)


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start servers on 127.0.0.1 in this test's loop: ``await serve(*handlers, **options)``."""
    servers: list[SmtpServer] = []

    async def start(
        *handlers: Any, setup: Callable[[Any], None] | None = None, **options: Any
    ) -> SmtpServer:
        def on_session(session: Any) -> None:
            if setup is not None:
                setup(session)
            for handler in handlers:
                session.message_received += handler

        options.setdefault("hostname", "mx.test")
        server = SmtpServer("127.0.0.1", 0, on_session=on_session, **options)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(grace=1)
        assert [pool.in_use for pool in server.buffer_pools] == [0, 0]


async def send(
    server: SmtpServer,
    message: bytes = MESSAGE,
    sender: str = "a@example.org",
    recipients: tuple[str, ...] = ("b@example.net",),
) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port) as client:
        await client.sendmail(sender, list(recipients), message)


def unused_port() -> int:
    # Bound, never listened on, then closed: connecting to it is refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- envelope_headers, PrintMessage, MaildirStore (unchanged behaviour) ---------------------


def test_envelope_headers() -> None:
    envelope = SmtpEnvelope(recipients=["b@example.net", "c@example.net"])  # type: ignore[list-item]
    assert envelope_headers(envelope) == (
        b"Return-Path: <>\r\nDelivered-To: b@example.net\r\nDelivered-To: c@example.net\r\n"
    )


async def test_print_message(serve: Serve) -> None:
    stream = io.StringIO()
    server = await serve(PrintMessage(stream))
    await send(server)
    printed = stream.getvalue()
    assert "MAIL FROM: <a@example.org>\nRCPT TO: <b@example.net>\n" in printed
    assert f"{len(MESSAGE)} bytes\n\n" in printed
    assert MESSAGE.decode().replace("\r\n", "\n") in printed
    assert printed.endswith("---------- end of message ----------\n")


async def test_maildir_store(serve: Serve, tmp_path: Path) -> None:
    server = await serve(MaildirStore(tmp_path / "Maildir"))
    await send(server)
    (key,) = mailbox.Maildir(tmp_path / "Maildir").keys()
    stored = (tmp_path / "Maildir" / "new" / key).read_bytes()
    assert stored == (
        b"Return-Path: <a@example.org>\nDelivered-To: b@example.net\n"
        + MESSAGE.replace(b"\r\n", b"\n")
    ).replace(b"\n", NL)


# --- MboxStore ----------------------------------------------------------------------------

FROM_LINE = re.compile(rb"From (\S+) \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\r?\n")


def mbox_entries(path: Path) -> list[tuple[bytes, bytes]]:
    """(sender, contents) per message, split at the From_ lines mailbox wrote; LF endings."""
    data = path.read_bytes().replace(NL, b"\n")
    starts = [m for m in FROM_LINE.finditer(data) if m.start() == 0 or data[m.start() - 1] == 10]
    ends = [m.start() for m in starts[1:]] + [len(data)] if starts else []
    return [(m.group(1), data[m.end() : end]) for m, end in zip(starts, ends, strict=True)]


async def test_mbox_store_byte_exact(serve: Serve, tmp_path: Path) -> None:
    path = tmp_path / "inbox.mbox"
    store = MboxStore(path)
    server = await serve(store)
    await send(server)
    await send(server, b"Subject: second\r\n\r\nFrom here\r\n", sender="")
    store.close()
    lf = MESSAGE.replace(b"\r\n", b"\n")
    assert mbox_entries(path) == [
        (
            b"a@example.org",
            b"Return-Path: <a@example.org>\nDelivered-To: b@example.net\n"
            + lf.replace(b"\nFrom the", b"\n>From the")  # mangled, as mbox readers expect
            + b"\n",  # the blank line that ends an mbox message
        ),
        (
            b"MAILER-DAEMON",  # the null reverse-path
            b"Return-Path: <>\nDelivered-To: b@example.net\nSubject: second\n\n>From here\n\n",
        ),
    ]
    box = mailbox.mbox(path)
    assert [message["Subject"] for message in box] == ["hello", "second"]
    assert next(iter(box)).get_from().startswith("a@example.org ")


async def test_mbox_store_without_trace_headers(serve: Serve, tmp_path: Path) -> None:
    path = tmp_path / "inbox.mbox"
    server = await serve(MboxStore(path, trace_headers=False))
    await send(server, b"Subject: x\r\n\r\nbody\r\n")
    assert mbox_entries(path) == [(b"a@example.org", b"Subject: x\n\nbody\n\n")]


async def test_mbox_locked_by_another_program_is_a_temporary_failure(
    serve: Serve, tmp_path: Path
) -> None:
    path = tmp_path / "inbox.mbox"
    server = await serve(MboxStore(path))
    reader = mailbox.mbox(path)
    reader.lock()  # a mail reader holds the lock (fcntl and the .lock file)
    try:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await send(server)
        assert (refused.value.code, refused.value.message) == (
            451,
            "4.2.0 Mailbox busy, try again later",
        )
        assert path.read_bytes() == b""
    finally:
        reader.unlock()
        reader.close()
    await send(server)  # the client's retry
    assert len(mbox_entries(path)) == 1


@pytest.mark.skipif(sys.platform == "win32", reason="Windows cannot replace a file held open")
async def test_mbox_replaced_by_a_mail_reader_is_reopened(serve: Serve, tmp_path: Path) -> None:
    path = tmp_path / "inbox.mbox"
    server = await serve(MboxStore(path, trace_headers=False))
    await send(server, b"Subject: one\r\n\r\n")
    # Readers that rewrite an mbox write a new file and rename it over the old one.
    os.replace(path, tmp_path / "old.mbox")
    path.write_bytes(b"")
    await send(server, b"Subject: two\r\n\r\n")
    assert [entry[1] for entry in mbox_entries(path)] == [b"Subject: two\n\n\n"]
    assert [entry[1] for entry in mbox_entries(tmp_path / "old.mbox")] == [b"Subject: one\n\n\n"]


# --- EmlDirectory -------------------------------------------------------------------------


async def test_eml_directory_byte_exact_unique_atomic(serve: Serve, tmp_path: Path) -> None:
    directory = tmp_path / "eml"
    server = await serve(EmlDirectory(directory, fsync=True))
    bodies = [b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n) for n in range(5)]
    for body in bodies:
        await send(server, body)
    names = sorted(os.listdir(directory))
    assert len(names) == 5
    assert all(re.fullmatch(r"\d{20}-[0-9a-f]{12}\.eml", name) for name in names)
    trace = b"Return-Path: <a@example.org>\r\nDelivered-To: b@example.net\r\n"
    # Names sort in arrival order; contents keep CRLF; no temporary file is left behind.
    assert [(directory / name).read_bytes() for name in names] == [trace + b for b in bodies]


async def test_eml_directory_without_trace_headers(serve: Serve, tmp_path: Path) -> None:
    store = EmlDirectory(tmp_path, trace_headers=False)
    server = await serve(store)
    await send(server)
    (name,) = os.listdir(tmp_path)
    assert (tmp_path / name).read_bytes() == MESSAGE


async def test_eml_directory_failure_is_temporary(serve: Serve, tmp_path: Path) -> None:
    directory = tmp_path / "eml"
    server = await serve(EmlDirectory(directory))
    directory.rmdir()  # the storage went away
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(server)
    assert (refused.value.code, refused.value.message) == (451, "4.3.0 Local error in processing")


def _break_maildir(path: Path) -> None:
    (path / "tmp").rmdir()
    (path / "tmp").write_text("not a directory")  # every add fails with an OSError


def _break_eml(path: Path) -> None:
    path.rmdir()
    path.write_text("not a directory")


@pytest.mark.parametrize(
    ("make", "break_it"),
    [
        pytest.param(lambda path: MaildirStore(path), _break_maildir, id="maildir"),
        pytest.param(lambda path: EmlDirectory(path), _break_eml, id="eml"),
        pytest.param(
            lambda path: MboxStore(path),
            lambda path: path.unlink() or path.mkdir(),  # replaced by a directory
            id="mbox",
        ),
    ],
)
async def test_every_store_answers_a_storage_fault_with_a_temporary_error(
    serve: Serve, tmp_path: Path, make: Any, break_it: Any
) -> None:
    """A fault is never a bounce: every store answers 451 (452 for a full disk), as a
    client must retry a message we failed to keep (Maildir used to raise: 554)."""
    path = tmp_path / "store"
    server = await serve(make(path))
    break_it(path)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(server)
    assert refused.value.code == 451
    assert refused.value.message.startswith("4.3.0 ")


@pytest.mark.parametrize("kind", [MaildirStore, EmlDirectory, MboxStore])
def test_a_store_pointed_at_the_wrong_kind_of_file_fails_when_made(
    tmp_path: Path, kind: Any
) -> None:
    target = tmp_path / "target"
    if kind is MboxStore:
        target.mkdir()  # an mbox is a file
    else:
        target.write_text("a regular file")
    with pytest.raises((NotADirectoryError, IsADirectoryError, FileExistsError)):
        kind(target)


@pytest.mark.parametrize(
    ("make", "count"),
    [
        (lambda path: MaildirStore(path), lambda path: len(list((path / "new").iterdir()))),
        (lambda path: EmlDirectory(path), lambda path: len(list(path.iterdir()))),
        (lambda path: MboxStore(path), lambda path: len(mbox_entries(path))),
    ],
)
async def test_store_then_relay_never_stores_twice_when_the_relay_fails(
    serve: Serve, tmp_path: Path, make: Any, count: Any
) -> None:
    """The CLI's --maildir/--mbox/--eml-dir with --relay: the relay fails (451), the client
    retries, the relay takes it: the message is stored once, not once per try."""
    answers = ["451 4.3.0 upstream busy", None]
    upstream_inbox = Inbox()

    def upstream_handler(session: Any, e: Any) -> Any:
        answer = answers.pop(0)
        if answer is None:
            upstream_inbox(session, e)
        return answer

    upstream = await serve(upstream_handler)
    target = tmp_path / "store"
    store = make(target)
    relay = Relay("127.0.0.1", upstream.port, received_header=False)
    server = await serve(Deliver(store, relay))
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(server)
    assert refused.value.code == 451
    assert count(target) == 0  # taken back
    await send(server)  # the client's retry
    assert count(target) == 1
    assert len(upstream_inbox.messages) == 1


async def test_deliver_takes_back_earlier_stores_when_a_later_one_fails(
    serve: Serve, tmp_path: Path
) -> None:
    first, second = EmlDirectory(tmp_path / "first"), EmlDirectory(tmp_path / "second")
    server = await serve(Deliver(first, second))
    _break_eml(tmp_path / "second")
    with pytest.raises(aiosmtplib.SMTPDataError):
        await send(server)
    assert list((tmp_path / "first").iterdir()) == []


# --- Relay --------------------------------------------------------------------------------

CLIENTS = ["aiosmtplib", "smtplib"]
RECEIVED = re.compile(
    rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
    rb"\tby relay\.test with (?P<protocol>\w+)(?:\r\n\tfor <(?P<for>[^>]+)>)?; [^\r\n]+\r\n"
)


async def relay_pair(
    serve: Serve, relay: Relay, *more: Any, **upstream_options: Any
) -> tuple[SmtpServer, SmtpServer, Inbox]:
    """An upstream server collecting messages, and a server relaying to it (then ``more``)."""
    upstream_inbox = Inbox()
    upstream = await serve(upstream_inbox, **upstream_options)
    relay.port = upstream.port
    relayed = await serve(relay, *more, hostname="relay.test")
    return relayed, upstream, upstream_inbox


@pytest.mark.parametrize("client", CLIENTS)
async def test_relay_forwards_envelope_and_bytes(serve: Serve, client: str) -> None:
    relay = Relay("127.0.0.1", 0, client=client)  # type: ignore[arg-type]
    relayed, _, inbox = await relay_pair(serve, relay)
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relayed.port, local_hostname="client.test"
    ) as smtp:
        await smtp.sendmail("a@example.org", ["b@example.net"], MESSAGE)
        await smtp.sendmail("a@example.org", ["b@example.net", "c@example.net"], MESSAGE)
    first, second = inbox.messages
    assert first.envelope.return_path == "a@example.org"
    assert first.envelope.recipients == ["b@example.net"]
    assert second.envelope.recipients == ["b@example.net", "c@example.net"]
    for e, named in ((first, b"b@example.net"), (second, None)):
        match = RECEIVED.match(e.message)
        assert match is not None, e.message[:200]
        assert match["protocol"] == b"ESMTP"
        assert match["for"] == named  # one recipient only: never disclose the others
        assert e.message[match.end() :] == MESSAGE  # the rest byte-exact


def test_the_received_header_writes_no_control_character() -> None:
    """Whatever a handler left as the HELO name, the relay's trace header line stays one line
    (no header injection) and printable."""
    envelope = SmtpEnvelope(
        return_path=Address("a", "example.org"),
        recipients=[Address("b", "example.net")],
        helo_name="a.example\r\nX-Injected: yes\x00",
        peer=("192.0.2.1", 4000),
    )
    header = _received_header(None, envelope)
    lines = header.split(b"\r\n")
    assert lines[0] == b"Received: from a.example??X-Injected: yes? ([192.0.2.1])"
    assert all(line.startswith(b"\t") for line in lines[1:-1])
    assert lines[-1] == b""


async def test_relay_carries_smtputf8_and_8bitmime(serve: Serve) -> None:
    relayed, _, inbox = await relay_pair(serve, Relay("127.0.0.1", received_header=False))
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relayed.port) as smtp:
        await smtp.sendmail(
            "jürgen@exämple.org",
            ["b@example.net"],
            "Subject: grüße\r\n\r\nbody\r\n".encode(),
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
    (e,) = inbox.messages
    assert e.envelope.smtputf8
    assert e.envelope.body_type == "8BITMIME"
    assert e.envelope.return_path == "jürgen@exämple.org"
    assert e.message == "Subject: grüße\r\n\r\nbody\r\n".encode()


def refuse_nobody(session: Any) -> None:
    session.rcpt += lambda s, e: (
        "550 5.1.1 <nobody@example.net>: no such user"
        if e.command.recipient_address.local_part == "nobody"
        else None
    )


@pytest.mark.parametrize("client", CLIENTS)
async def test_relay_passes_the_upstream_refusal_on(serve: Serve, client: str) -> None:
    relay = Relay("127.0.0.1", client=client)  # type: ignore[arg-type]
    relayed, _, inbox = await relay_pair(serve, relay, setup=refuse_nobody)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(relayed, recipients=("nobody@example.net",))
    assert refused.value.code == 550
    assert refused.value.message.startswith("5.1.1 <nobody@example.net>: ")
    # Some refused, some delivered: the first refusal is the reply (a bounce, not a loss).
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(relayed, recipients=("b@example.net", "nobody@example.net"))
    assert refused.value.code == 550
    (delivered,) = inbox.messages
    assert delivered.envelope.recipients == ["b@example.net"]


@pytest.mark.parametrize("client", CLIENTS)
async def test_relay_passes_sender_and_data_refusals_on(serve: Serve, client: str) -> None:
    def policy(session: Any) -> None:
        session.mail += lambda s, e: (
            "553 5.7.1 sender not allowed" if e.command.return_path == "spam@example.org" else None
        )
        session.message_received += lambda s, e: (
            "554 5.7.1 message refused" if b"viagra" in e.message else None
        )

    relay = Relay("127.0.0.1", client=client)  # type: ignore[arg-type]
    relayed, _, inbox = await relay_pair(serve, relay, setup=policy)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(relayed, sender="spam@example.org")
    assert (refused.value.code, refused.value.message) == (553, "5.7.1 sender not allowed")
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(relayed, b"Subject: viagra\r\n\r\n")
    assert (refused.value.code, refused.value.message) == (554, "5.7.1 message refused")
    assert inbox.messages == []


async def test_relay_lmtp_answers_per_recipient(serve: Serve) -> None:
    relay = Relay("127.0.0.1", received_header=False)
    upstream = await serve(Inbox(), setup=refuse_nobody)
    relay.port = upstream.port
    relayed = await serve(relay, lmtp=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", relayed.port)
    writer.write(
        b"LHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
        b"RCPT TO:<nobody@example.net>\r\nDATA\r\n"
    )
    await writer.drain()
    lines: list[bytes] = []
    while not lines or not lines[-1].startswith(b"354"):
        lines.append(await reader.readline())
    writer.write(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    replies = [await reader.readline() for _ in range(3)]
    writer.close()
    await writer.wait_closed()
    # RFC 2033 4.2: one reply per recipient, in RCPT order.
    assert replies[0] == b"250 2.0.0 OK: relayed\r\n"
    assert replies[1].startswith(b"550 5.1.1 <nobody@example.net>: ")
    assert replies[2].startswith(b"221")


@pytest.mark.parametrize("client", CLIENTS)
async def test_relay_upstream_unreachable_is_451_4_4_1(serve: Serve, client: str) -> None:
    relayed = await serve(Relay("127.0.0.1", unused_port(), client=client))  # type: ignore[arg-type]
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(relayed)
    assert refused.value.code == 451
    assert refused.value.message.startswith("4.4.1 ")


@pytest.mark.parametrize("client", CLIENTS)
async def test_relay_upstream_greeting_refusal_is_temporary(serve: Serve, client: str) -> None:
    upstream = await serve(setup=lambda session: session.start_transaction("554 go away"))
    relay = Relay("127.0.0.1", upstream.port, client=client)  # type: ignore[arg-type]
    relayed = await serve(relay)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(relayed)
    assert refused.value.code == 451


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_contexts(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return server_context, client_context


def accept_alice(session: Any) -> None:
    session.auth += lambda s, e: e.username == "alice" and e.check_password("s3cret")


@pytest.mark.parametrize("client", CLIENTS)
async def test_relay_starttls_and_auth_upstream(serve: Serve, ca: trustme.CA, client: str) -> None:
    server_context, client_context = tls_contexts(ca)
    relay = Relay(
        "127.0.0.1",
        starttls=True,
        username="alice",
        password="s3cret",
        tls_context=client_context,
        client=client,  # type: ignore[arg-type]
    )
    relayed, _, inbox = await relay_pair(
        serve, relay, tls_context=server_context, auth_require=True, setup=accept_alice
    )
    await send(relayed)
    (e,) = inbox.messages
    assert e.envelope.tls
    assert e.envelope.auth_identity == "alice"
    assert e.message.endswith(MESSAGE)
    assert "s3cret" not in repr(relay)


@pytest.mark.parametrize("client", CLIENTS)
async def test_relay_refused_credentials_are_temporary(
    serve: Serve, ca: trustme.CA, client: str
) -> None:
    server_context, client_context = tls_contexts(ca)
    relay = Relay(
        "127.0.0.1",
        starttls=True,
        username="alice",
        password="wrong",
        tls_context=client_context,
        client=client,  # type: ignore[arg-type]
    )
    relayed, _, inbox = await relay_pair(
        serve, relay, tls_context=server_context, setup=accept_alice
    )
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(relayed)
    assert (refused.value.code, refused.value.message[:6]) == (451, "4.7.0 ")
    assert inbox.messages == []


@pytest.mark.parametrize("client", CLIENTS)
async def test_relay_starttls_required_but_not_offered(serve: Serve, client: str) -> None:
    relay = Relay("127.0.0.1", starttls=True, client=client)  # type: ignore[arg-type]
    relayed, _, inbox = await relay_pair(serve, relay)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(relayed)
    assert (refused.value.code, refused.value.message[:6]) == (451, "4.7.0 ")
    assert inbox.messages == []


async def test_relay_bdat_bare_line_ends_become_crlf(serve: Serve) -> None:
    relayed, _, inbox = await relay_pair(serve, Relay("127.0.0.1", received_header=False))
    reader, writer = await asyncio.open_connection("127.0.0.1", relayed.port)
    body = b"Subject: x\r\n\r\na\nb\rc\r\n.\r\n"
    writer.write(
        b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
        + b"BDAT %d LAST\r\n" % len(body)
        + body
        + b"QUIT\r\n"
    )
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert b"250 2.0.0 OK: queued" in data
    (e,) = inbox.messages
    assert e.message == b"Subject: x\r\n\r\na\r\nb\r\nc\r\n.\r\n"


async def test_relay_refuses_binarymime(serve: Serve) -> None:
    relayed, _, inbox = await relay_pair(serve, Relay("127.0.0.1"))
    reader, writer = await asyncio.open_connection("127.0.0.1", relayed.port)
    writer.write(
        b"EHLO client.test\r\nMAIL FROM:<a@example.org> BODY=BINARYMIME\r\n"
        b"RCPT TO:<b@example.net>\r\nBDAT 3 LAST\r\n\x00\x01\x02QUIT\r\n"
    )
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert b"554 5.6.3 " in data
    assert inbox.messages == []


async def test_relay_then_store_both_run(serve: Serve, tmp_path: Path) -> None:
    # A handler that succeeded returns None, so the next one runs as well.
    store = EmlDirectory(tmp_path, trace_headers=False)
    relayed, _, inbox = await relay_pair(serve, Relay("127.0.0.1", received_header=False), store)
    await send(relayed)
    assert inbox.messages[0].message == MESSAGE
    (name,) = os.listdir(tmp_path)
    assert (tmp_path / name).read_bytes() == MESSAGE


def test_relay_arguments() -> None:
    with pytest.raises(ValueError, match="go together"):
        Relay("127.0.0.1", username="u")
    with pytest.raises(ValueError, match="client must be"):
        Relay("127.0.0.1", client="curl")  # type: ignore[arg-type]
    assert Relay("127.0.0.1").client == "aiosmtplib"  # installed here


# --- the handlers from the command line ----------------------------------------------------


@pytest.mark.parametrize(
    ("option", "stored"),
    [
        ("--mbox", lambda path: mbox_entries(path)[0][1].endswith(b"last line\n\n")),
        ("--eml-dir", lambda path: next(path.iterdir()).read_bytes().endswith(MESSAGE)),
    ],
)
def test_cli_stores(tmp_path: Path, option: str, stored: Callable[[Path], bool]) -> None:
    target = tmp_path / "store"
    process, port = start_cli(option, str(target))
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    finally:
        stop_cli(process)
    assert stored(target)


def test_cli_relays_with_auth(tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("pw\n", encoding="utf-8")
    with SmtpTestServer(credentials={"relay": "pw"}) as upstream:
        process, port = start_cli(
            "--relay",
            f"127.0.0.1:{upstream.port}",
            "--relay-user",
            "relay",
            "--relay-password-file",
            str(password_file),
        )
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
        finally:
            stop_cli(process)
        (relayed,) = upstream.messages
    assert relayed.authenticated_as == "relay"
    assert relayed.envelope.recipients == ["b@example.net"]
    assert relayed.data.endswith(MESSAGE)
    assert relayed.message["Received"].startswith("from ")


def test_cli_refuses_a_store_it_cannot_use_at_start(tmp_path: Path) -> None:
    regular = tmp_path / "a-file"
    regular.write_text("not a Maildir")
    result = subprocess.run(
        [sys.executable, "-m", "alephsmtp", "--port", "0", "--maildir", str(regular)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "Not a directory" in result.stderr
