"""Run one server under test with a sink handler (accept every message, discard it).

Started by ``server.py`` and ``memory.py``, one process per server, but usable by hand::

    python benchmarks/_servers.py alephsmtp --loop uvloop --port 2525
    ALEPHSMTP_NO_EXTENSIONS=1 python benchmarks/_servers.py alephsmtp --port 2525   # pure twin
    python benchmarks/_servers.py aiosmtpd --loop asyncio --port 2526
    python benchmarks/_servers.py aiosmtpd-compat --port 2528   # the same code on alephsmtp
    python benchmarks/_servers.py floor --loop asyncio --port 2527
    python benchmarks/_servers.py alephsmtp-metrics --port 2529   # + Prometheus, scraped 1/s

``alephsmtp-metrics`` is ``alephsmtp`` with its Prometheus endpoint on (``metrics=``, which
also times every handler and reply for the latency histograms), scraped once a second by a
child process of its own (its CPU is not the server's): what metrics cost, asked for 15 to 60
times more often than a usual Prometheus ``scrape_interval``.

``floor`` is not an SMTP server: a few lines of ``asyncio.BufferedProtocol`` with canned
replies and ``bytes.find`` for the end of data, no parsing, no checks, no events. It measures
what the event loop and the transport cost by themselves, the CPU floor under any Python server
on that loop (``server.py`` only: it holds a 64 KiB buffer per connection, no memory floor).

It prints ``READY <port> <implementation>`` on stdout once it listens, logs warnings and
errors (tracebacks included) to stderr, and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine
from typing import Any

HOSTNAME = "bench.example"
MAX_MESSAGE_SIZE = 64 << 20  # room for the 10 MiB scenario
BACKLOG = 4096  # many connections at once (memory.py) must not overflow the accept queue


async def serve_alephsmtp(
    port: int, ready: Callable[[int, str], None], *, metrics: bool = False
) -> None:
    from alephsmtp import IMPLEMENTATION, SmtpServer
    from alephsmtp.handlers import sink

    def on_session(session: Any) -> None:
        session.message_received += sink

    server = SmtpServer(
        "127.0.0.1",
        port,
        hostname=HOSTNAME,
        max_message_size=MAX_MESSAGE_SIZE,
        backlog=BACKLOG,
        on_session=on_session,
        metrics="127.0.0.1:0" if metrics else None,
    )
    await server.start()
    scraper = None
    if server.exporter is not None:
        scraper = subprocess.Popen(
            [sys.executable, "-c", SCRAPER, server.exporter.url, str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
    ready(server.port, IMPLEMENTATION)
    try:
        await _until_signalled()
    finally:
        if scraper is not None:
            scraper.terminate()
            scraper.wait(5)
    server.close()
    await server.wait_closed(1.0)


async def serve_alephsmtp_metrics(port: int, ready: Callable[[int, str], None]) -> None:
    await serve_alephsmtp(port, ready, metrics=True)


# A Prometheus stand-in: GET /metrics once a second; stops when the server is gone (its
# parent changed, or three scrapes in a row failed) or after 10 hours, whichever comes first.
SCRAPER = """
import os, sys, time, urllib.request
url, parent = sys.argv[1], int(sys.argv[2])
failures = 0
for _ in range(36000):
    time.sleep(1.0)
    if os.getppid() != parent:
        break
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
        failures = 0
    except OSError:
        failures += 1
        if failures >= 3:
            break
"""


class AiosmtpdSink:
    """aiosmtpd handler: accept and discard."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


async def serve_aiosmtpd(port: int, ready: Callable[[int, str], None]) -> None:
    from aiosmtpd.smtp import SMTP

    await _serve_aiosmtpd_program(SMTP, port, ready, "aiosmtpd")


async def serve_aiosmtpd_compat(port: int, ready: Callable[[int, str], None]) -> None:
    # The same program as serve_aiosmtpd, but for its import line.
    from alephsmtp.compat.aiosmtpd.smtp import SMTP

    await _serve_aiosmtpd_program(SMTP, port, ready, "alephsmtp.compat.aiosmtpd")


async def _serve_aiosmtpd_program(
    SMTP: Any,  # the class the program imported
    port: int,
    ready: Callable[[int, str], None],
    implementation: str,
) -> None:
    loop = asyncio.get_running_loop()
    handler = AiosmtpdSink()

    def factory() -> Any:
        return SMTP(handler, hostname=HOSTNAME, data_size_limit=MAX_MESSAGE_SIZE, loop=loop)

    server = await loop.create_server(factory, "127.0.0.1", port, backlog=BACKLOG)
    ready(server.sockets[0].getsockname()[1], implementation)
    await _until_signalled()
    server.close()


class FloorProtocol(asyncio.BufferedProtocol):
    """Canned replies in order; the end of data found with ``bytes.find``. A reference only.

    A ``BufferedProtocol`` reading into one buffer of its own, as alephsmtp's sessions read into
    pooled ones: asyncio's plain ``Protocol`` allocates a fresh 256 KiB ``bytes`` for every read,
    which costs more than all the rest on some machines, and would make a poor floor.
    """

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.pending = b""
        self.in_data = False
        self.memory = bytearray(64 * 1024)
        self.view = memoryview(self.memory)
        transport.write(b"220 " + HOSTNAME.encode() + b" ESMTP\r\n")

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        buffer = self.pending + self.memory[:nbytes]  # bytes (bytes + bytearray)
        replies = []
        while True:
            if self.in_data:
                end = buffer.find(b"\r\n.\r\n")
                if end < 0:
                    buffer = buffer[-4:]
                    break
                buffer = buffer[end + 5 :]
                self.in_data = False
                replies.append(b"250 2.0.0 OK\r\n")
                continue
            eol = buffer.find(b"\r\n")
            if eol < 0:
                break
            verb = buffer[:4].upper()
            buffer = buffer[eol + 2 :]
            if verb == b"DATA":
                self.in_data = True
                buffer = b"\r\n" + buffer  # so that an empty body's ".\r\n" ends it too
                replies.append(b"354 go on\r\n")
            elif verb == b"QUIT":
                replies.append(b"221 bye\r\n")
                self.transport.write(b"".join(replies))
                self.transport.close()
                return
            elif verb == b"EHLO":
                replies.append(b"250-" + HOSTNAME.encode() + b"\r\n250 PIPELINING\r\n")
            else:
                replies.append(b"250 OK\r\n")
        self.pending = buffer
        if replies:
            self.transport.write(b"".join(replies))


async def serve_floor(port: int, ready: Callable[[int, str], None]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FloorProtocol, "127.0.0.1", port, backlog=BACKLOG)
    ready(server.sockets[0].getsockname()[1], "floor")
    await _until_signalled()
    server.close()


async def _until_signalled() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _ready(port: int, implementation: str) -> None:
    print(f"READY {port} {implementation}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "server", choices=["alephsmtp", "alephsmtp-metrics", "aiosmtpd", "aiosmtpd-compat", "floor"]
    )
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--port", type=int, default=0, help="0: the OS chooses")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s"
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    serve = {
        "alephsmtp": serve_alephsmtp,
        "alephsmtp-metrics": serve_alephsmtp_metrics,
        "aiosmtpd": serve_aiosmtpd,
        "aiosmtpd-compat": serve_aiosmtpd_compat,
        "floor": serve_floor,
    }[args.server]
    coroutine: Coroutine[Any, Any, None] = serve(args.port, _ready)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(coroutine)
    else:
        asyncio.run(coroutine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
