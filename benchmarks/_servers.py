"""Run one server under test with a sink handler (accept every message, discard it).

Started by ``server.py`` and ``memory.py``, one process per server, but usable by hand::

    python benchmarks/_servers.py alephsmtp --loop uvloop --port 2525
    ALEPHSMTP_NO_EXTENSIONS=1 python benchmarks/_servers.py alephsmtp --port 2525   # pure twin
    python benchmarks/_servers.py aiosmtpd --loop asyncio --port 2526

It prints ``READY <port> <implementation>`` on stdout once it listens, logs warnings and
errors (tracebacks included) to stderr, and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

HOSTNAME = "bench.example"
MAX_MESSAGE_SIZE = 64 << 20  # room for the 10 MiB scenario
BACKLOG = 4096  # many connections at once (memory.py) must not overflow the accept queue


async def serve_alephsmtp(port: int, ready: Callable[[int, str], None]) -> None:
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
    )
    await server.start()
    ready(server.port, IMPLEMENTATION)
    await _until_signalled()
    server.close()
    await server.wait_closed(1.0)


class AiosmtpdSink:
    """aiosmtpd handler: accept and discard."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


async def serve_aiosmtpd(port: int, ready: Callable[[int, str], None]) -> None:
    from aiosmtpd.smtp import SMTP

    loop = asyncio.get_running_loop()
    handler = AiosmtpdSink()

    def factory() -> SMTP:
        return SMTP(handler, hostname=HOSTNAME, data_size_limit=MAX_MESSAGE_SIZE, loop=loop)

    server = await loop.create_server(factory, "127.0.0.1", port, backlog=BACKLOG)
    ready(server.sockets[0].getsockname()[1], "aiosmtpd")
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
    parser.add_argument("server", choices=["alephsmtp", "aiosmtpd"])
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--port", type=int, default=0, help="0: the OS chooses")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s"
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    serve = serve_alephsmtp if args.server == "alephsmtp" else serve_aiosmtpd
    coroutine: Coroutine[Any, Any, None] = serve(args.port, _ready)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(coroutine)
    else:
        asyncio.run(coroutine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
