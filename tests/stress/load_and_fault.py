"""Load and faults against a real server on 127.0.0.1: nothing accepted is lost or doubled.

    python tests/stress/load_and_fault.py [--clients 2000] [--concurrency 100] [--seconds 120]

Starts an alephsmtp server in this process (port 0) and runs many concurrent clients. Each
client opens a connection and does one of: normal transactions, a pipelined group of
transactions, BDAT, a mid-DATA/mid-BDAT/mid-command close or reset (RST), junk commands, or a
slow reader that lets replies pile up before reading them. Every message carries a unique id.
At the end it checks:

- every message that got 250 after its data was delivered exactly once, byte-exact;
- no message was delivered that did not get 250, except where the client dropped the
  connection *after* sending the end of data (it could not see the 250 that may have come);
- the buffer pools show nothing in use and no session is left.

Bounded in clients and seconds; loopback only; prints a summary; exits 1 on a violation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from alephsmtp import SmtpServer

ENVELOPE = b"MAIL FROM:<load@example.org>\r\nRCPT TO:<sink@example.net>\r\n"


@dataclass
class Ledger:
    accepted: dict[bytes, bytes] = field(default_factory=dict)  # id -> body, got 250
    maybe: dict[bytes, bytes] = field(default_factory=dict)  # id -> body, dropped after the end
    delivered: Counter[bytes] = field(default_factory=Counter)
    bodies: dict[bytes, bytes] = field(default_factory=dict)
    kinds: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


def make_body(rng: random.Random, message_id: bytes) -> bytes:
    lines = [b"Message-Id: <" + message_id + b">", b""]
    for _ in range(rng.randrange(1, 60)):
        kind = rng.random()
        if kind < 0.1:
            lines.append(b"." * rng.randrange(1, 4) + b"dot line")
        elif kind < 0.15:
            lines.append(bytes(rng.randrange(128, 256) for _ in range(rng.randrange(1, 30))))
        else:
            lines.append(b"x" * rng.randrange(0, 200))
    return b"\r\n".join(lines) + b"\r\n"


def stuff(body: bytes) -> bytes:
    return body.replace(b"\r\n.", b"\r\n..")  # bodies never start with a dot


async def read_replies(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    """``count`` final reply lines (multi-line replies folded into their last line)."""
    replies = []
    while len(replies) < count:
        line = await asyncio.wait_for(reader.readline(), 30)
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            replies.append(line)
    return replies


class Client:
    def __init__(self, port: int, ledger: Ledger, rng: random.Random, number: int) -> None:
        self.port, self.ledger, self.rng, self.number = port, ledger, rng, number
        self.serial = 0

    def new_message(self) -> tuple[bytes, bytes]:
        self.serial += 1
        message_id = b"%d.%d@load.test" % (self.number, self.serial)
        body = make_body(self.rng, message_id)
        self.ledger.bodies[message_id] = body
        return message_id, body

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        await read_replies(reader, 1)
        writer.write(b"EHLO load.test\r\n")
        await read_replies(reader, 1)
        return reader, writer

    async def run(self) -> None:
        kind = self.rng.choice(
            ["normal", "pipelined", "bdat", "abort-data", "reset-data", "abort-bdat",
             "abort-command", "junk", "slow-reader", "drop-after-end"]
        )  # fmt: skip
        self.ledger.kinds[kind] += 1
        reader, writer = await self.open()
        try:
            await getattr(self, "_" + kind.replace("-", "_"))(reader, writer)
        finally:
            writer.close()

    async def _transaction(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        message_id, body = self.new_message()
        writer.write(ENVELOPE + b"DATA\r\n")
        replies = await read_replies(reader, 3)
        assert replies[2].startswith(b"354"), replies
        writer.write(stuff(body) + b".\r\n")
        (reply,) = await read_replies(reader, 1)
        if reply.startswith(b"250"):
            self.ledger.accepted[message_id] = body

    async def _normal(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(self.rng.randrange(1, 4)):
            await self._transaction(reader, writer)
        writer.write(b"QUIT\r\n")
        await read_replies(reader, 1)

    async def _pipelined(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The whole group in one write, as a bulk sender does (RFC 2920).
        messages = [self.new_message() for _ in range(self.rng.randrange(2, 8))]
        writer.write(
            b"".join(ENVELOPE + b"DATA\r\n" + stuff(body) + b".\r\n" for _, body in messages)
            + b"QUIT\r\n"
        )
        replies = await read_replies(reader, 4 * len(messages) + 1)
        for index, (message_id, body) in enumerate(messages):
            if replies[4 * index + 3].startswith(b"250"):
                self.ledger.accepted[message_id] = body

    async def _bdat(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        message_id, body = self.new_message()
        cut = self.rng.randrange(0, len(body))
        writer.write(
            ENVELOPE
            + b"BDAT %d\r\n%s" % (cut, body[:cut])
            + b"BDAT %d LAST\r\n%s" % (len(body) - cut, body[cut:])
        )
        replies = await read_replies(reader, 4)
        if replies[3].startswith(b"250"):
            self.ledger.accepted[message_id] = body

    async def _abort_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = self.new_message()
        writer.write(ENVELOPE + b"DATA\r\n")
        await read_replies(reader, 3)
        writer.write(stuff(body)[: self.rng.randrange(0, len(body))])
        await writer.drain()

    async def _reset_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._abort_data(reader, writer)
        writer.transport.abort()  # RST

    async def _abort_bdat(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = self.new_message()
        writer.write(ENVELOPE + b"BDAT %d LAST\r\n" % len(body) + body[: len(body) // 2])
        await writer.drain()
        if self.rng.random() < 0.5:
            writer.transport.abort()

    async def _abort_command(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"MAIL FROM:<half-a-comm")
        await writer.drain()

    async def _junk(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        junk = bytes(self.rng.randrange(0, 256) for _ in range(self.rng.randrange(1, 3000)))
        writer.write(junk + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)
        await self._transaction(reader, writer)  # the session still serves (or has closed)

    async def _slow_reader(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"NOOP\r\n" * 5000)
        await asyncio.sleep(0.2)  # replies pile up; the server stops reading us meanwhile
        await read_replies(reader, 5000)
        await self._transaction(reader, writer)

    async def _drop_after_end(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        message_id, body = self.new_message()
        writer.write(ENVELOPE + b"DATA\r\n")
        await read_replies(reader, 3)
        writer.write(stuff(body) + b".\r\n")
        await writer.drain()
        writer.transport.abort()  # the server may or may not have accepted it: both are fine
        self.ledger.maybe[message_id] = body


async def run(clients: int, concurrency: int, seconds: float, seed: int) -> tuple[Ledger, Any]:
    ledger = Ledger()

    def on_session(session: Any) -> None:
        def record(sender: Any, e: Any) -> None:
            message_id = e.message.split(b">", 1)[0].split(b"<", 1)[1]
            ledger.delivered[message_id] += 1
            if ledger.bodies.get(message_id) != e.message:
                ledger.errors.append(f"{message_id!r} delivered altered")

        session.message_received += record

    server = SmtpServer("127.0.0.1", 0, on_session=on_session, hostname="load.test")
    await server.start()
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    semaphore = asyncio.Semaphore(concurrency)

    async def one(number: int) -> None:
        async with semaphore:
            if time.monotonic() > deadline:
                return
            client = Client(server.port, ledger, random.Random(rng.random()), number)
            # Faults are the point; the checks below are on the server's side.
            with contextlib.suppress(
                ConnectionError, asyncio.TimeoutError, AssertionError, OSError
            ):
                await asyncio.wait_for(client.run(), 60)

    await asyncio.gather(*(one(number) for number in range(clients)))
    for _ in range(500):  # let the server see every close
        if not server.sessions:
            break
        await asyncio.sleep(0.01)
    state = {
        "sessions": len(server.sessions),
        "pools": [pool.in_use for pool in server.buffer_pools],
    }
    await server.stop(grace=5)
    return ledger, state


def check(ledger: Ledger, state: dict[str, Any]) -> list[str]:
    problems = list(ledger.errors)
    for message_id in ledger.accepted:
        if ledger.delivered[message_id] != 1:
            problems.append(f"{message_id!r} got 250, delivered {ledger.delivered[message_id]}x")
    for message_id, count in ledger.delivered.items():
        if count != 1:
            problems.append(f"{message_id!r} delivered {count} times")
        if message_id not in ledger.accepted and message_id not in ledger.maybe:
            problems.append(f"{message_id!r} delivered without a 250")
    if state["sessions"]:
        problems.append(f"{state['sessions']} sessions left")
    if state["pools"] != [0, 0]:
        problems.append(f"buffers still in use: {state['pools']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    started = time.monotonic()
    ledger, state = asyncio.run(run(args.clients, args.concurrency, args.seconds, seed))
    problems = check(ledger, state)
    print(
        f"load_and_fault: seed={seed} clients={sum(ledger.kinds.values())} "
        f"accepted={len(ledger.accepted)} delivered={sum(ledger.delivered.values())} "
        f"dropped-after-end={len(ledger.maybe)} problems={len(problems)} "
        f"seconds={time.monotonic() - started:.1f}"
    )
    print("  " + ", ".join(f"{kind}: {n}" for kind, n in sorted(ledger.kinds.items())))
    for problem in problems[:20]:
        print("  PROBLEM", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
