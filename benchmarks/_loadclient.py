"""A pipelining SMTP load client (asyncio; uvloop when installed), bounded in messages and time.

``server.py`` runs it when Postfix's ``smtp-source`` is not installed (or with
``--loadgen python``); it can also be run by hand::

    python benchmarks/_loadclient.py --port 2525 --message-file msg.txt --messages 10000 \\
        --sessions 10 --persistent --timeout 60

Each of ``--sessions`` connections sends messages until ``--messages`` have been claimed or
``--timeout`` seconds have passed, whichever comes first. Commands are pipelined in RFC 2920
groups: ``MAIL``, ``RCPT`` and ``DATA`` in one write; after the 354 the message content, its
end mark and the next group (or ``QUIT``) in one write ("the actual transfer of message
content is explicitly allowed to be the first command in a group", RFC 2920 3.1). Without
``--persistent`` every message has its own connection. The message file is sent like
``smtp-source -F``: LF line ends become CRLF and lines starting with a dot are dot-stuffed.

It prints one JSON object on stdout: messages sent and accepted, elapsed seconds, its own CPU
seconds, errors (the first unexpected replies, timeouts, connection failures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from _common import have_uvloop, wire_message

READ_TIMEOUT = 30.0  # a server silent this long is reported as hung
MAX_ERRORS_KEPT = 20


class ProtocolError(Exception):
    """The server answered something else than expected."""


@dataclass
class Stats:
    """What the client did, shared by its sessions."""

    to_claim: int
    deadline: float
    sent: int = 0
    accepted: int = 0
    connections: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    timed_out: bool = False

    def claim(self) -> bool:
        """Take the next message to send; False once all are taken or the time is up."""
        if self.to_claim <= 0:
            return False
        if time.monotonic() >= self.deadline:
            self.timed_out = True
            return False
        self.to_claim -= 1
        return True

    def error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(text)


class Replies:
    """Reads SMTP replies (multi-line ones too) from a stream, several per read."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buffer = b""
        self.lines: list[bytes] = []  # the lines of the reply being read

    async def expect(self, *codes: int) -> None:
        """Read one reply per code; ``ProtocolError`` on any other code."""
        for code in codes:
            reply = await self.next()
            if reply[:3] != str(code).encode():
                raise ProtocolError(f"expected {code}, got {reply.decode('utf-8', 'replace')!r}")

    async def next(self) -> bytes:
        """The next whole reply, its lines joined by LF."""
        while True:
            end = self.buffer.find(b"\r\n")
            while end >= 0:
                line = self.buffer[:end]
                self.buffer = self.buffer[end + 2 :]
                self.lines.append(line)
                if line[3:4] != b"-":
                    reply = b"\n".join(self.lines)
                    self.lines = []
                    return reply
                end = self.buffer.find(b"\r\n")
            data = await asyncio.wait_for(self.reader.read(65536), READ_TIMEOUT)
            if not data:
                raise ProtocolError("connection closed by the server")
            self.buffer += data


class Client:
    """The load: ``sessions`` connections sending ``message`` (wire form, with its end mark)."""

    def __init__(self, host: str, port: int, message: bytes, stats: Stats) -> None:
        self.host = host
        self.port = port
        self.message = message
        self.stats = stats
        self.group = (
            b"MAIL FROM:<sender@example.org> SIZE=%d\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\n"
            % len(message)
        )

    async def connect(self) -> tuple[asyncio.StreamWriter, Replies]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=1 << 20), READ_TIMEOUT
        )
        self.stats.connections += 1
        replies = Replies(reader)
        await replies.expect(220)
        writer.write(b"EHLO client.example\r\n")
        await replies.expect(250)
        return writer, replies

    async def persistent(self) -> None:
        """One connection, messages one after another, each group pipelined."""
        if not self.stats.claim():
            return
        writer, replies = await self.connect()
        try:
            writer.write(self.group)
            await replies.expect(250, 250, 354)
            while True:
                self.stats.sent += 1
                more = self.stats.claim()
                writer.write(self.message + (self.group if more else b"QUIT\r\n"))
                await replies.expect(250)
                self.stats.accepted += 1
                if not more:
                    await replies.expect(221)
                    break
                await replies.expect(250, 250, 354)
        finally:
            writer.close()

    async def one_per_connection(self) -> None:
        """A connection per message: greeting, EHLO, one transaction, QUIT."""
        while self.stats.claim():
            writer, replies = await self.connect()
            try:
                writer.write(self.group)
                await replies.expect(250, 250, 354)
                self.stats.sent += 1
                writer.write(self.message + b"QUIT\r\n")
                await replies.expect(250)
                self.stats.accepted += 1
                await replies.expect(221)
            finally:
                writer.close()

    async def session(self, persistent: bool) -> None:
        try:
            if persistent:
                await self.persistent()
            else:
                await self.one_per_connection()
        except (ProtocolError, OSError, asyncio.TimeoutError) as error:
            kind = f"timeout: no reply within {READ_TIMEOUT:g} s"
            self.stats.error(kind if isinstance(error, asyncio.TimeoutError) else str(error))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with open(args.message_file, encoding="utf-8") as f:
        message = wire_message(f.read())
    start = time.monotonic()
    cpu_start = time.process_time()
    stats = Stats(args.messages, start + args.timeout)
    client = Client(args.host, args.port, message, stats)
    tasks = [asyncio.create_task(client.session(args.persistent)) for _ in range(args.sessions)]
    # Bounded even if a session hangs between its reads' timeouts.
    _, pending = await asyncio.wait(tasks, timeout=args.timeout + READ_TIMEOUT + 5)
    for task in pending:
        task.cancel()
    if pending:
        stats.error(f"{len(pending)} session(s) still running at the hard time limit; cancelled")
        await asyncio.wait(pending, timeout=5)
    elapsed = time.monotonic() - start
    return {
        "sent": stats.sent,
        "accepted": stats.accepted,
        "connections": stats.connections,
        "elapsed": elapsed,
        "cpu": time.process_time() - cpu_start,  # this client's CPU over the run
        "timed_out": stats.timed_out,
        "error_count": stats.error_count,
        "errors": stats.errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--message-file", required=True)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--persistent", action="store_true", help="many messages per connection")
    parser.add_argument("--timeout", type=float, default=60.0, help="stop sending after this")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    args = parser.parse_args()
    loop = args.loop
    if loop == "auto":
        loop = "uvloop" if have_uvloop() else "asyncio"
    if loop == "uvloop":
        import uvloop

        result = uvloop.run(run(args))
    else:
        result = asyncio.run(run(args))
    result["loop"] = loop
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
