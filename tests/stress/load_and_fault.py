"""Load and faults against a real server on 127.0.0.1: nothing accepted is lost or doubled.

    python tests/stress/load_and_fault.py [--clients 200] [--concurrency 50] [--seconds 120]
                                          [--seed N] [--loop asyncio|uvloop]

(``ALEPHSMTP_NO_EXTENSIONS=1`` in the environment runs the server on the pure-Python core.)

Starts an alephsmtp ``SmtpServer`` in this process on 127.0.0.1, port 0, whose
``message_received`` handler records every message, and runs many concurrent asyncio clients.
Each client connects and plays one part (:data:`KINDS`): plain and pipelined transactions, BDAT,
aborts in the middle of DATA, of BDAT and of a command (``close()``, or ``transport.abort()`` for
an RST), a half close in DATA, junk, refused messages (too large, bare LF), a BDAT count smaller
than the chunk sent, a slow reader that sends a long pipelined burst and reads nothing for a
while, a client that drops the connection right after its end of data; and hostile ones: a
STARTTLS handshake that dies, a client that never reads, a command line trickled a byte at a
time, a NOOP flood, password guessing, a 2**63-octet BDAT chunk. Every message carries
a unique id; the client records the exact body it framed, whether it sent the end of data (the
end mark, or the last BDAT chunk) and the reply it read after it, if any.

At the end, the checks (any failure exits 1):

- every message that got 250 after its end of data was delivered exactly once, byte-exact;
- no other message was delivered, except one whose client sent its end of data and then
  dropped the connection without reading the reply (the server may have accepted it first:
  the inherent race, counted as "unconfirmed", delivered at most once and byte-exact);
- nothing was delivered that no client framed, and nothing twice;
- clients that play by the rules got exactly the replies they expect;
- every hostile client was cut, refused or slowed as docs/security.md says, in bounded time;
- when the clients are done: no session left on the server and no pooled buffer in use.

Bounded by ``--clients`` and ``--seconds`` (clients not started by then are skipped; each
client is also bounded in time). Loopback only. Prints a table and a summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import random
import re
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from alephsmtp import IMPLEMENTATION, SmtpServer

HOST = "127.0.0.1"
REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][^\r\n]*\r\n")
MAX_MESSAGE_SIZE = 256 << 10
REPLY_TIMEOUT = 30.0  # seconds a client waits for one reply
CLIENT_TIMEOUT = 90.0  # seconds one client may take in all
ENVELOPE = b"MAIL FROM:<load@example.org>\r\nRCPT TO:<sink@example.net>\r\n"
MAX_AUTH_FAILURES = 3
CUT_WITHIN = 30.0  # seconds a hostile client may stay before it counts as not cut


def _server_tls() -> Any:
    """A certificate for localhost from a test CA (trustme): the server offers STARTTLS."""
    import ssl

    import trustme

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


KINDS = (
    "normal", "pipelined", "bdat", "bdat-pipelined", "abort-data", "reset-data",
    "half-close-data", "abort-bdat", "reset-between-chunks", "abort-command", "junk",
    "too-large", "bare-lf", "bdat-short-count", "slow-reader", "drop-after-end",
    "starttls-abort", "deaf", "trickle", "noop-flood", "auth-guess", "huge-bdat",
)  # fmt: skip
# Parts that follow the rules: any reply they did not expect is a finding.
WELL_BEHAVED = frozenset({"normal", "pipelined", "bdat", "bdat-pipelined", "slow-reader"})


class Anomaly(Exception):
    """A reply a well-behaved client did not expect."""


class MalformedReply(Anomaly):
    """A line that is not an SMTP reply line: a finding whoever the client is."""


class NotCut(Anomaly):
    """A hostile client the server should have cut (or refused) and did not: a finding."""


@dataclass
class Message:
    """One message as its client framed it."""

    id: bytes
    body: bytes
    kind: str
    end_sent: bool = False  # the end mark / the last chunk was handed to the transport
    reply: int | None = None  # the code read after the end of data


@dataclass
class Ledger:
    """Everything both sides saw."""

    messages: dict[bytes, Message] = field(default_factory=dict)
    delivered: Counter[bytes] = field(default_factory=Counter)
    altered: list[bytes] = field(default_factory=list)
    unknown: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)  # client-side errors, by type
    anomalies: list[str] = field(default_factory=list)
    skipped: int = 0
    sessions_left: int = 0
    buffers_in_use: tuple[int, ...] = ()

    def record(self, body: bytes) -> None:
        """The server's message_received: which message, and is it the one framed?"""
        start = body.find(b"Message-Id: <")
        end = body.find(b">", start)
        message = self.messages.get(body[start + 13 : end]) if start == 0 else None
        if message is None:
            self.unknown += 1
            return
        self.delivered[message.id] += 1
        if body != message.body:
            self.altered.append(message.id)


def make_body(rng: random.Random, message_id: bytes, size: int = 0) -> bytes:
    """A body of CRLF lines (some with leading dots, some 8-bit, some long) with the id first."""
    lines = [b"Message-Id: <" + message_id + b">", b"Subject: load", b""]
    total = 0
    for _ in range(rng.randrange(1, 80)):
        roll = rng.random()
        if roll < 0.1:
            line = b"." * rng.randrange(1, 4) + b"dot line"
        elif roll < 0.15:
            line = bytes(rng.randrange(128, 256) for _ in range(rng.randrange(1, 30)))
        elif roll < 0.18:
            line = b"." if rng.random() < 0.5 else b".\x00."
        elif roll < 0.2:
            line = b"z" * rng.randrange(1000, 5000)
        else:
            line = b"x" * rng.randrange(0, 200)
        lines.append(line)
        total += len(line) + 2
    while total < size:
        lines.append(b"y" * 998)
        total += 1000
    return b"\r\n".join(lines) + b"\r\n"


def stuff(body: bytes) -> bytes:
    """RFC 5321 4.5.2: double a leading dot (every body here starts with "Message-Id")."""
    return body.replace(b"\r\n.", b"\r\n..")


class Client:
    """One connection playing one part."""

    def __init__(self, port: int, ledger: Ledger, rng: random.Random, number: int) -> None:
        self.port = port
        self.ledger = ledger
        self.rng = rng
        self.number = number
        self.serial = 0
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    # -- plumbing ------------------------------------------------------------------------------

    def new_message(self, kind: str, size: int = 0) -> Message:
        self.serial += 1
        message_id = b"%d.%d@load.test" % (self.number, self.serial)
        message = Message(message_id, make_body(self.rng, message_id, size), kind)
        self.ledger.messages[message_id] = message
        return message

    def write(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)

    async def replies(self, count: int) -> list[int]:
        """The codes of the next ``count`` replies (a multi-line reply counts once)."""
        return await asyncio.wait_for(self._replies(count), REPLY_TIMEOUT + count / 1000)

    async def _replies(self, count: int) -> list[int]:
        assert self.reader is not None
        codes: list[int] = []
        while len(codes) < count:
            line = await self.reader.readline()
            if not line.endswith(b"\r\n"):
                raise ConnectionError("connection closed")
            if REPLY_LINE.fullmatch(line) is None:
                raise MalformedReply(f"not a reply line: {line[:80]!r}")
            if line[3:4] != b"-":
                codes.append(int(line[:3]))
        return codes

    async def until_closed(self) -> list[int]:
        """Every reply until the server closes (bounded in replies and time)."""
        codes: list[int] = []
        with contextlib.suppress(ConnectionError):
            for _ in range(100_000):
                codes += await self.replies(1)
        return codes

    async def expect(self, *codes: int) -> list[int]:
        got = await self.replies(len(codes))
        if got != list(codes):
            raise Anomaly(f"expected {list(codes)}, got {got}")
        return got

    def reset(self) -> None:
        """Drop the connection with an RST (SO_LINGER 0 under the hood)."""
        assert self.writer is not None
        self.writer.transport.abort()

    async def run(self, kind: str) -> None:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        try:
            await self.expect(220)
            self.write(b"EHLO load.test\r\n")
            await self.expect(250)
            await getattr(self, "part_" + kind.replace("-", "_"))()
        finally:
            self.writer.close()

    async def transaction(self, kind: str, message: Message | None = None) -> Message:
        message = message or self.new_message(kind)
        self.write(ENVELOPE + b"DATA\r\n")
        await self.expect(250, 250, 354)
        message.end_sent = True
        self.write(stuff(message.body) + b".\r\n")
        (message.reply,) = await self.replies(1)
        return message

    async def quit(self) -> None:
        self.write(b"QUIT\r\n")
        await self.expect(221)

    # -- the parts -----------------------------------------------------------------------------

    async def part_normal(self) -> None:
        for _ in range(self.rng.randrange(1, 4)):
            message = await self.transaction("normal")
            if message.reply != 250:
                raise Anomaly(f"a plain message got {message.reply}")
            if self.rng.random() < 0.3:
                self.write(b"RSET\r\nNOOP\r\n")
                await self.expect(250, 250)
        await self.quit()

    async def part_pipelined(self) -> None:
        # A whole group per write, as a bulk sender does (RFC 2920).
        messages = [self.new_message("pipelined") for _ in range(self.rng.randrange(2, 8))]
        for message in messages:
            message.end_sent = True
        self.write(
            b"".join(ENVELOPE + b"DATA\r\n" + stuff(m.body) + b".\r\n" for m in messages)
            + b"QUIT\r\n"
        )
        codes = await self.replies(4 * len(messages) + 1)
        for index, message in enumerate(messages):
            message.reply = codes[4 * index + 3]
        if codes != [250, 250, 354, 250] * len(messages) + [221]:
            raise Anomaly(f"pipelined group got {codes}")

    def chunks(self, body: bytes) -> list[bytes]:
        cuts = sorted(self.rng.randrange(0, len(body) + 1) for _ in range(self.rng.randrange(3)))
        points = [0, *cuts, len(body)]
        return [body[a:b] for a, b in itertools.pairwise(points)]

    async def part_bdat(self) -> None:
        message = self.new_message("bdat")
        self.write(ENVELOPE)
        await self.expect(250, 250)
        chunks = self.chunks(message.body)
        for chunk in chunks[:-1]:
            self.write(b"BDAT %d\r\n" % len(chunk) + chunk)
            await self.expect(250)
        message.end_sent = True
        self.write(b"BDAT %d LAST\r\n" % len(chunks[-1]) + chunks[-1])
        (message.reply,) = await self.replies(1)
        if message.reply != 250:
            raise Anomaly(f"BDAT LAST got {message.reply}")
        await self.quit()

    async def part_bdat_pipelined(self) -> None:
        messages = [self.new_message("bdat-pipelined") for _ in range(self.rng.randrange(1, 5))]
        data = []
        expected: list[int] = []
        last_reply: list[int] = []  # where each message's reply to BDAT LAST is
        for message in messages:
            chunks = self.chunks(message.body)
            data.append(ENVELOPE + b"".join(b"BDAT %d\r\n" % len(c) + c for c in chunks[:-1]))
            data.append(b"BDAT %d LAST\r\n" % len(chunks[-1]) + chunks[-1])
            expected += [250] * (len(chunks) + 2)
            last_reply.append(len(expected) - 1)
            message.end_sent = True
        self.write(b"".join(data) + b"QUIT\r\n")
        codes = await self.replies(len(expected) + 1)
        for message, at in zip(messages, last_reply, strict=True):
            message.reply = codes[at]
        if codes != [*expected, 221]:
            raise Anomaly(f"pipelined BDAT got {codes}")

    async def part_abort_data(self, kind: str = "abort-data", rst: bool = False) -> None:
        message = self.new_message(kind)
        self.write(ENVELOPE + b"DATA\r\n")
        await self.expect(250, 250, 354)
        framed = stuff(message.body)
        self.write(framed[: self.rng.randrange(0, len(framed))])  # never the end mark
        await self.drain_a_little()
        if rst:
            self.reset()

    async def part_reset_data(self) -> None:
        await self.part_abort_data("reset-data", rst=True)

    async def part_half_close_data(self) -> None:
        message = self.new_message("half-close-data")
        self.write(ENVELOPE + b"DATA\r\n")
        await self.expect(250, 250, 354)
        self.write(stuff(message.body)[: len(message.body) // 2])
        assert self.writer is not None
        self.writer.write_eof()  # the server must drop the partial message
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            await self.replies(1)

    async def part_abort_bdat(self) -> None:
        message = self.new_message("abort-bdat")
        self.write(ENVELOPE)
        await self.expect(250, 250)
        part = message.body[: self.rng.randrange(0, len(message.body))]
        self.write(b"BDAT %d LAST\r\n" % len(message.body) + part)  # fewer bytes than said
        await self.drain_a_little()
        if self.rng.random() < 0.5:
            self.reset()

    async def part_reset_between_chunks(self) -> None:
        message = self.new_message("reset-between-chunks")
        self.write(ENVELOPE)
        await self.expect(250, 250)
        cut = self.rng.randrange(0, len(message.body))
        self.write(b"BDAT %d\r\n" % cut + message.body[:cut])
        await self.expect(250)
        self.reset()  # the transaction is open, the last chunk never comes

    async def part_abort_command(self) -> None:
        self.write(self.rng.choice([b"MAIL FROM:<half-a-comm", b"RCPT", b"DATA", b"BD"]))
        await self.drain_a_little()
        if self.rng.random() < 0.5:
            self.reset()

    async def part_junk(self) -> None:
        rng = self.rng
        pieces = [b"\r\n", b"\n", b"\r", b"\x00", b".", b"DATA\r\n", b"BDAT 3\r\n", b"\xff"]
        junk = b"".join(
            rng.choice(pieces) if rng.random() < 0.5 else rng.randbytes(rng.randrange(1, 40))
            for _ in range(rng.randrange(1, 200))
        )
        # A checked message first; then the junk, and QUIT after enough line ends that a
        # BDAT in the junk cannot swallow it. The session answers or closes (421), never hangs.
        await self.transaction("junk")
        self.write(junk + b"\r\n" * 4 + b"QUIT\r\n")
        codes = await self.until_closed()
        if not codes or codes[-1] not in (221, 421):
            raise Anomaly(f"junk then QUIT ended with {codes[-3:]}")

    async def part_too_large(self) -> None:
        message = await self.transaction("too-large", self.new_message("too-large", 2 << 20))
        if message.reply != 552:
            raise Anomaly(f"a message over the size limit got {message.reply}")
        await self.quit()

    async def part_bare_lf(self) -> None:
        message = self.new_message("bare-lf")
        message.body = message.body.replace(b"Subject: load\r\n", b"Subject: load\n")
        await self.transaction("bare-lf", message)
        if message.reply != 554:
            raise Anomaly(f"a message with a bare LF got {message.reply}")
        await self.quit()

    async def part_bdat_short_count(self) -> None:
        # The count says less than the client sends: the message is what the count covers, the
        # rest is read as commands (here a NOOP and a junk line).
        message = self.new_message("bdat-short-count")
        extra = b"NOOP\r\nXJUNK\r\n"
        self.write(ENVELOPE + b"BDAT %d LAST\r\n" % len(message.body) + message.body + extra)
        message.end_sent = True
        codes = await self.replies(5)
        message.reply = codes[2]
        if codes != [250, 250, 250, 250, 500]:
            raise Anomaly(f"BDAT with extra bytes got {codes}")
        await self.quit()

    async def part_slow_reader(self) -> None:
        # Replies pile up unread; the server stops reading while it cannot write. (HELO, not
        # NOOP: a NOOP flood is cut at the junk command limit.)
        noops = self.rng.randrange(1000, 40000)
        messages = [self.new_message("slow-reader") for _ in range(self.rng.randrange(1, 4))]
        for message in messages:
            message.end_sent = True
        self.write(
            b"HELO slow.example\r\n" * noops
            + b"".join(ENVELOPE + b"DATA\r\n" + stuff(m.body) + b".\r\n" for m in messages)
        )
        await asyncio.sleep(self.rng.uniform(0.05, 0.5))
        codes = await self.replies(noops + 4 * len(messages))
        for index, message in enumerate(messages):
            message.reply = codes[noops + 4 * index + 3]
        if codes != [250] * noops + [250, 250, 354, 250] * len(messages):
            raise Anomaly(f"slow reader got {Counter(codes)}")
        await self.quit()

    async def part_drop_after_end(self) -> None:
        message = self.new_message("drop-after-end")
        self.write(ENVELOPE + b"DATA\r\n")
        await self.expect(250, 250, 354)
        message.end_sent = True
        self.write(stuff(message.body) + b".\r\n")
        await self.drain_a_little()
        if self.rng.random() < 0.5:
            self.reset()  # the server may or may not have accepted it: both are right

    # -- hostile clients: each must be cut, refused or slowed as docs/security.md says ---------

    async def part_starttls_abort(self) -> None:
        # STARTTLS, then the handshake dies (a reset, a close, or silence): the slot is freed.
        self.write(b"STARTTLS\r\n")
        await self.expect(220)
        how = self.rng.choice(["reset", "close", "garbage"])
        if how == "garbage":
            self.write(b"\x16\x03\x01\x00\x05hello")  # a broken ClientHello
            await self.drain_a_little()
        if how == "close":
            assert self.writer is not None
            self.writer.close()
        else:
            self.reset()

    async def part_deaf(self) -> None:
        # Sends and never reads a reply: cut once writing to it is stuck (write_timeout).
        assert self.writer is not None
        self.writer.transport.pause_reading()
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.write(b"HELO deaf.example\r\n" * 20000)
        for _ in range(int(CUT_WITHIN / 0.25)):
            await asyncio.sleep(0.25)
            if self.writer.transport.is_closing():
                return
            self.write(b"HELO still.example\r\n")  # fails once the server has cut us
        raise NotCut(f"a client that reads nothing still connected after {CUT_WITHIN} s")

    async def part_trickle(self) -> None:
        # A command line one byte at a time: cut at idle_timeout whatever the bytes (421).
        line = b"NOOP " + b"x" * 200 + b"\r\n"
        started = time.monotonic()
        for byte in line:
            self.write(bytes([byte]))
            try:
                code = await asyncio.wait_for(self.replies(1), 0.25)
            except asyncio.TimeoutError:
                continue
            if code != [421]:
                raise NotCut(f"a trickled line got {code}")
            return
        raise NotCut(f"a trickled line not cut after {time.monotonic() - started:.0f} s")

    async def part_noop_flood(self) -> None:
        # Junk commands past the limit count as errors: the flood ends with 421.
        self.write(b"NOOP\r\n" * 5000)
        codes = await self.until_closed()
        if not codes or codes[-1] != 421 or len(codes) > 200:
            raise NotCut(f"a NOOP flood got {len(codes)} replies, the last {codes[-1:]}")

    async def part_auth_guess(self) -> None:
        # Password guessing, pipelined: slowed down, then cut at max_auth_failures.
        guess = b"AUTH PLAIN " + base64.b64encode(b"\0load\0wrong") + b"\r\n"
        self.write(guess * 50)
        codes = await self.until_closed()
        if codes.count(535) > MAX_AUTH_FAILURES or not codes or codes[-1] != 421:
            raise NotCut(f"password guessing got {codes}")

    async def part_huge_bdat(self) -> None:
        # A chunk no message may be (2**63 octets): 552 5.3.4, and the connection closes.
        self.write(ENVELOPE + b"BDAT 9223372036854775808 LAST\r\nthe start of it")
        await self.expect(250, 250)
        codes = await self.until_closed()
        if codes != [552]:
            raise NotCut(f"a 2**63-octet chunk got {codes}")

    async def drain_a_little(self) -> None:
        assert self.writer is not None
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(self.writer.drain(), REPLY_TIMEOUT)
        await asyncio.sleep(self.rng.choice([0, 0, 0.001, 0.01]))


async def run(
    clients: int = 200,
    concurrency: int = 50,
    seconds: float = 120.0,
    seed: int = 0,
    *,
    kinds: tuple[str, ...] = KINDS,
    idle_timeout: float = 5.0,
) -> Ledger:
    """Serve, run the clients, and fill in what the checks need. Loopback only."""
    ledger = Ledger()

    def on_session(session: Any) -> None:
        session.message_received += lambda sender, e: ledger.record(e.message)
        session.auth += lambda sender, e: False  # every password is wrong
        # Small send buffers: a client that reads nothing fills them in a few hundred
        # replies, not megabytes (the kernel's autotuning would take 4 MiB each).
        sock = session.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)

    server = SmtpServer(
        HOST,
        0,
        on_session=on_session,
        hostname="localhost",
        max_message_size=MAX_MESSAGE_SIZE,
        max_connections_per_ip=0,
        tls_context=_server_tls(),
        tls_handshake_timeout=3,
        idle_timeout=idle_timeout,
        write_timeout=2,
        auth_over_plaintext=True,
        auth_failure_delay=0.05,
        max_auth_failures=MAX_AUTH_FAILURES,
    )
    await server.start()
    rng = random.Random(seed)
    # Every part in turn (so a short run has them all), in a shuffled order.
    plan = [(number, kinds[number % len(kinds)], rng.random()) for number in range(clients)]
    rng.shuffle(plan)
    deadline = time.monotonic() + seconds
    gate = asyncio.Semaphore(concurrency)

    async def one(number: int, kind: str, client_seed: float) -> None:
        async with gate:
            if time.monotonic() >= deadline:
                ledger.skipped += 1
                return
            ledger.kinds[kind] += 1
            client = Client(server.port, ledger, random.Random(client_seed), number)
            try:
                await asyncio.wait_for(client.run(kind), CLIENT_TIMEOUT)
            except Anomaly as anomaly:
                ledger.faults[type(anomaly).__name__] += 1
                if kind in WELL_BEHAVED or isinstance(anomaly, (MalformedReply, NotCut)):
                    ledger.anomalies.append(f"client {number} ({kind}): {anomaly}")
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as error:
                ledger.faults[type(error).__name__] += 1  # faults are the point
                if kind in WELL_BEHAVED:
                    ledger.anomalies.append(f"client {number} ({kind}): {error!r}")
            except Exception as error:  # a bug of this script, or of what the server sent
                ledger.faults[type(error).__name__] += 1
                ledger.anomalies.append(f"client {number} ({kind}): unexpected {error!r}")

    try:
        await asyncio.gather(*(one(*entry) for entry in plan))
        # Let the server see every close (bounded in rounds and time).
        settle_until = time.monotonic() + 10
        for _ in range(1000):
            if not server.sessions or time.monotonic() > settle_until:
                break
            await asyncio.sleep(0.01)
        ledger.sessions_left = len(server.sessions)
        ledger.buffers_in_use = tuple(pool.in_use for pool in server.buffer_pools)
    finally:
        await server.stop(grace=2)
    return ledger


def check(ledger: Ledger) -> list[str]:
    """Every rule of the module docstring; an empty list when all hold."""
    problems = list(ledger.anomalies)
    for message in ledger.messages.values():
        count = ledger.delivered[message.id]
        where = f"{message.id.decode()} ({message.kind})"
        if message.reply == 250 and count != 1:
            problems.append(f"{where} got 250 and was delivered {count} times")
        elif message.reply is not None and message.reply != 250 and count:
            problems.append(f"{where} got {message.reply} and was delivered")
        elif message.reply is None and count and not message.end_sent:
            problems.append(f"{where} was delivered without its end of data")
        elif count > 1:
            problems.append(f"{where} was delivered {count} times")
    problems += [f"{m.decode()} was delivered altered" for m in ledger.altered]
    if ledger.unknown:
        problems.append(f"{ledger.unknown} delivered messages no client framed")
    if ledger.sessions_left:
        problems.append(f"{ledger.sessions_left} sessions left on the server")
    if any(ledger.buffers_in_use):
        problems.append(f"pooled buffers still in use (command, data): {ledger.buffers_in_use}")
    return problems


def table(ledger: Ledger) -> str:
    """Per part: clients, messages framed, got 250, delivered, unconfirmed, refused."""
    rows = [("part", "clients", "framed", "got 250", "delivered", "unconfirmed", "refused")]
    for kind in KINDS:
        if not ledger.kinds[kind]:
            continue
        messages = [m for m in ledger.messages.values() if m.kind == kind]
        rows.append(
            (
                kind,
                str(ledger.kinds[kind]),
                str(len(messages)),
                str(sum(m.reply == 250 for m in messages)),
                str(sum(ledger.delivered[m.id] for m in messages)),
                str(sum(m.reply is None and m.end_sent for m in messages)),
                str(sum(m.reply not in (None, 250) for m in messages)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200, help="connections in all (200)")
    parser.add_argument("--concurrency", type=int, default=50, help="at a time (50)")
    parser.add_argument("--seconds", type=float, default=120.0, help="time bound (120)")
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(
        f"load_and_fault: seed={seed} clients={args.clients} concurrency={args.concurrency} "
        f"loop={args.loop} core={IMPLEMENTATION}"
    )
    sys.stdout.flush()
    started = time.monotonic()
    coroutine = run(args.clients, args.concurrency, args.seconds, seed)
    if args.loop == "uvloop":
        import uvloop

        ledger = uvloop.run(coroutine)
    else:
        ledger = asyncio.run(coroutine)
    problems = check(ledger)
    print(table(ledger))
    for problem in problems[:30]:
        print("  PROBLEM", problem)
    messages = ledger.messages.values()
    print(
        f"load_and_fault: clients={sum(ledger.kinds.values())} skipped={ledger.skipped} "
        f"messages={len(ledger.messages)} accepted={sum(m.reply == 250 for m in messages)} "
        f"delivered={sum(ledger.delivered.values())} "
        f"unconfirmed={sum(m.reply is None and m.end_sent for m in messages)} "
        f"client-faults={sum(ledger.faults.values())} problems={len(problems)} "
        f"seconds={time.monotonic() - started:.1f}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
