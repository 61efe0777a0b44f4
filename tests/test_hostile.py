"""Hostile clients against a real server on 127.0.0.1: none may hold the server's resources
for longer than its timeouts allow, or take more of them than its limits grant."""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from alephsmtp import SmtpServer

HOST = "127.0.0.1"
GIVE_UP = 15.0  # seconds any one wait may take before the test fails


async def wait_until(condition: Callable[[], bool], what: str, seconds: float = GIVE_UP) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {seconds} s: {what}")


def small_send_buffer(session: Any) -> None:
    """The server's socket gets a small send buffer, so a client that reads nothing fills it
    with a few hundred replies rather than megabytes (the kernel still does the filling)."""
    sock = session.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def deaf_client(port: int, burst: bytes) -> tuple[socket.socket, int]:
    """Connects with a tiny receive window, sends ``burst`` (as much as the server takes) and
    never reads a byte: the server's replies pile up in its send buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((HOST, port))
    sock.setblocking(False)
    view = memoryview(burst)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            break  # the server stopped reading (it cannot write): the rest stays unsent
        view = view[sent:]
    return sock, len(burst) - len(view)


async def test_a_client_that_never_reads_is_cut_at_the_idle_timeout() -> None:
    """The idle timeout's 421 cannot be delivered to a client that reads nothing; the
    connection is aborted once writing has been stuck for write_timeout."""
    async with SmtpServer(
        HOST,
        0,
        on_session=small_send_buffer,
        hostname="mx.test",
        idle_timeout=1.0,
        write_timeout=1.0,
    ) as server:
        sock, _ = deaf_client(server.port, b"EHLO deaf.example\r\n" * 5000)
        try:
            await wait_until(lambda: len(server.sessions) == 1, "the session started")
            await wait_until(lambda: not server.sessions, "the deaf client cut")
        finally:
            sock.close()


async def test_a_client_that_stops_reading_is_cut_while_writing_is_stuck() -> None:
    """However long the idle timeout, a session whose replies have not moved for
    write_timeout seconds is aborted: its send buffer is not the client's to keep."""
    async with SmtpServer(
        HOST,
        0,
        on_session=small_send_buffer,
        hostname="mx.test",
        idle_timeout=300.0,
        write_timeout=1.0,
    ) as server:
        sock, _ = deaf_client(server.port, b"EHLO deaf.example\r\n" * 5000)
        try:
            await wait_until(lambda: len(server.sessions) == 1, "the session started")
            await wait_until(lambda: not server.sessions, "the stuck writer cut")
        finally:
            sock.close()


async def test_a_slow_reader_is_not_cut() -> None:
    """A client that reads its replies, however late within write_timeout, keeps its session."""
    async with SmtpServer(
        HOST, 0, on_session=small_send_buffer, hostname="mx.test", write_timeout=5.0
    ) as server:
        command = b"EHLO slow.example\r\n"
        sock, sent = deaf_client(server.port, command * 2000)
        try:
            assert sent == len(command) * 2000
            await asyncio.sleep(1.0)
            loop = asyncio.get_running_loop()
            received = b""
            while received.count(b"250 HELP\r\n") < 2000:
                data = await asyncio.wait_for(loop.sock_recv(sock, 65536), GIVE_UP)
                assert data, "the server closed a client that reads"
                received += data
            assert len(server.sessions) == 1
        finally:
            sock.close()


async def test_password_guessing_is_slowed_and_cut(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """300 wrong passwords pipelined on one connection: the first is answered at once, the
    next ones each after auth_failure_delay, and the session ends at max_auth_failures."""
    attempts: list[str] = []

    def on_session(session: Any) -> None:
        def check(sender: Any, e: Any) -> bool:
            attempts.append(e.password)
            return e.check_password("right")

        session.auth += check

    async with SmtpServer(
        HOST,
        0,
        on_session=on_session,
        hostname="localhost",
        tls_context=server_context,
        implicit_tls=True,
        auth_failure_delay=0.2,
    ) as server:
        reader, writer = await asyncio.open_connection(
            HOST, server.port, ssl=client_context, server_hostname="localhost"
        )
        guesses = b"".join(
            b"AUTH PLAIN " + base64.b64encode(b"\0alice\0guess%d" % n) + b"\r\n" for n in range(300)
        )
        writer.write(b"EHLO brute.example\r\n" + guesses)
        answer = await asyncio.wait_for(reader.read(), GIVE_UP)  # until the server closes
        writer.close()
    assert answer.count(b"535 5.7.8 ") == server.config.max_auth_failures == 5
    assert answer.endswith(b"421 4.7.0 Error: too many authentication failures\r\n")
    assert len(attempts) == 5


SERVER_UNDER_A_DESCRIPTOR_LIMIT = """
import asyncio, resource, sys, logging
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))  # like `ulimit -n 128`
from alephsmtp import SmtpServer

async def main():
    server = SmtpServer("127.0.0.1", 0, hostname="mx.test")  # max_connections: 10000
    await server.start()
    print("PORT", server.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    await server.stop(grace=1)

if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_descriptor_limit_bounds_connections_with_421_and_one_log_line(
    loop: str, tmp_path: Path
) -> None:
    """With ``ulimit -n 128`` and the default max_connections (10,000), a burst of 300
    clients: each gets its greeting or 421 4.7.0 (none hangs on a failed accept), the server
    says once why, logs no traceback, and serves again once they are gone."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    script = tmp_path / "server.py"
    script.write_text(SERVER_UNDER_A_DESCRIPTOR_LIMIT)
    server = subprocess.Popen(
        [sys.executable, str(script), loop, "128"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[1])
        clients = []
        for _ in range(300):
            sock = socket.create_connection((HOST, port), timeout=GIVE_UP)
            sock.settimeout(GIVE_UP)
            clients.append(sock)
        greetings = Counter(sock.recv(3) for sock in clients)
        for sock in clients:
            sock.close()
        assert set(greetings) == {b"220", b"421"}, greetings
        assert greetings[b"220"] < 128
        # Served again, once the burst is gone.
        for _ in range(int(GIVE_UP / 0.1)):
            with socket.create_connection((HOST, port), timeout=GIVE_UP) as sock:
                sock.settimeout(GIVE_UP)
                if sock.recv(3) == b"220":
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("not served again")
    finally:
        _, errors = server.communicate("", timeout=GIVE_UP)
    assert "Traceback" not in errors
    assert errors.count("allows") == 1  # the one warning: the capacity the limit leaves
    assert errors.count("accepting connections fails") <= 1


async def test_a_flooding_client_still_reads_the_reply_that_ends_its_session() -> None:
    """20,000 pipelined NOOPs: cut at the junk command limit, and the client reads the 421
    (the close lingers: closing with its unread commands would reset the connection, and a
    reset makes the client's kernel drop the replies it had not read yet)."""
    async with SmtpServer(HOST, 0, hostname="mx.test") as server:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        await reader.readline()
        writer.write(b"NOOP\r\n" * 20000)
        answer = await asyncio.wait_for(reader.read(), GIVE_UP)
        writer.close()
    assert answer.count(b"\r\n") == 100 + 20 + 1
    assert answer.endswith(b"421 4.7.0 Error: too many errors\r\n")
