"""``SmtpServer(path=...)``: SMTP and LMTP on a Unix-domain socket, with real clients (smtplib's
LMTP, aiosmtplib's ``socket_path``), real HAProxy sending the PROXY protocol to the socket,
and workers sharing one listening socket (a real process tree).

Also :meth:`SmtpServer.protocol_factory`: the sessions of a server for an asyncio listener of
your own (TCP or Unix), sharing the server's pools and counted in its sessions.

Postfix delivering by LMTP to such a socket is in test_lmtp_postfix.py.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiosmtplib
import pytest

from _lmtp import lmtp_send
from alephsmtp import Reply, SmtpServer

T = TypeVar("T")
MESSAGE = b"Subject: over a Unix socket\r\n\r\n.leading dot\r\nbody\r\n"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for socket files: a Unix socket's path has room for 107 bytes, and
    pytest's tmp_path may take most of them."""
    directory = Path(tempfile.mkdtemp(prefix="alephsmtp-unix-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class Kept:
    """on_session: keeps each session and each message's (peer, envelope peer, bytes)."""

    def __init__(self) -> None:
        self.sessions: list[Any] = []
        self.messages: list[tuple[Any, Any, bytes]] = []

    def __call__(self, session: Any) -> None:
        self.sessions.append(session)
        session.message_received += self.received

    def received(self, session: Any, e: Any) -> None:
        self.messages.append((session.peer, e.envelope.peer, bytes(e.message)))


def send(path: Path, recipients: list[str]) -> dict[str, tuple[int, bytes]]:
    return lmtp_send(path, "alice@example.org", recipients, MESSAGE)


# --- serving -----------------------------------------------------------------------------------


def test_smtp_and_lmtp_on_a_unix_socket_on_each_loop(
    sock_dir: Path, run_on_each_loop: Callable[[Coroutine[Any, Any, T]], T]
) -> None:
    path = sock_dir / "lmtp.sock"

    async def scenario() -> None:
        kept = Kept()
        lmtp = SmtpServer(path=path, lmtp=True, hostname="mx.test", on_session=kept)
        smtp_path = sock_dir / "smtp.sock"
        smtp = SmtpServer(path=str(smtp_path), hostname="mx.test", on_session=kept)
        async with lmtp, smtp:
            assert lmtp.path == str(path)
            assert lmtp.port == 0
            assert stat.S_ISSOCK(path.stat().st_mode)
            replies = await asyncio.to_thread(send, path, ["bob@example.net", "eve@x.test"])
            assert [code for code, _ in replies.values()] == [250, 250]
            async with aiosmtplib.SMTP(socket_path=str(smtp_path), hostname=None) as client:
                await client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
        assert not path.exists()
        assert not smtp_path.exists()
        # No IP address: the peer is the socket the client came in on.
        assert kept.messages == [
            (str(path), str(path), MESSAGE),
            (str(smtp_path), str(smtp_path), MESSAGE),
        ]
        for server in (lmtp, smtp):
            assert [pool.in_use for pool in server.buffer_pools] == [0, 0]

    run_on_each_loop(scenario())


async def test_lmtp_replies_per_recipient(sock_dir: Path) -> None:
    path = sock_dir / "lmtp.sock"

    def on_session(session: Any) -> None:
        def received(sender: Any, e: Any) -> list[Reply | str]:
            return [
                "250 2.1.5 delivered" if r.startswith("bob") else "552 5.2.2 mailbox full"
                for r in e.envelope.recipients
            ]

        session.message_received += received

    async with SmtpServer(path=path, lmtp=True, hostname="mx.test", on_session=on_session):
        replies = await asyncio.to_thread(send, path, ["bob@example.net", "carol@x.test"])
    assert replies == {
        "bob@example.net": (250, b"2.1.5 delivered"),
        "carol@x.test": (552, b"5.2.2 mailbox full"),
    }


async def test_the_per_ip_limit_does_not_apply(sock_dir: Path) -> None:
    path = sock_dir / "s.sock"
    async with SmtpServer(
        path=path, hostname="mx.test", max_connections_per_ip=1, connection_limit_exempt=()
    ) as server:
        clients = [aiosmtplib.SMTP(socket_path=str(path), hostname=None) for _ in range(3)]
        for client in clients:
            await client.connect()  # the greeting: 220, not 421
        try:
            assert len(server.sessions) == 3
            for client in clients:
                assert (await client.noop()).code == 250
        finally:
            for client in clients:
                await client.quit()


# --- the socket file -------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    ("options", "expected"),
    [({}, 0o660), ({"path_mode": 0o600}, 0o600), ({"path_mode": None}, None)],
    ids=["default", "0o600", "umask"],
)
async def test_socket_file_permissions(
    sock_dir: Path, options: dict[str, Any], expected: int | None
) -> None:
    path = sock_dir / "s.sock"
    async with SmtpServer(path=path, hostname="mx.test", **options):
        mode = stat.S_IMODE(path.stat().st_mode)
    # bind() makes a socket file 0o777 less the umask; path_mode=None leaves it so.
    assert mode == (0o777 & ~_umask() if expected is None else expected)


async def test_a_stale_socket_file_is_replaced(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = sock_dir / "s.sock"
    with socket.socket(socket.AF_UNIX) as dead:  # a server that died: its file stays behind
        dead.bind(str(path))
    path.chmod(0o700)
    caplog.set_level("INFO", logger="alephsmtp.server")
    async with SmtpServer(path=path, hostname="mx.test"):
        assert f"replacing the stale socket file {path}" in caplog.text
        assert stat.S_IMODE(path.stat().st_mode) == 0o660  # ours now
        async with aiosmtplib.SMTP(socket_path=str(path), hostname=None) as client:
            assert (await client.noop()).code == 250


async def greeting(path: Path) -> str:
    client = aiosmtplib.SMTP(socket_path=str(path), hostname=None)
    response = await client.connect()
    await client.quit()
    return response.message


async def test_a_live_servers_socket_is_left_alone(sock_dir: Path) -> None:
    path = sock_dir / "s.sock"
    async with SmtpServer(path=path, hostname="first.test"):
        second = SmtpServer(path=path, hostname="second.test")
        with pytest.raises(OSError, match="address in use") as raised:
            await second.start()
        assert raised.value.errno == errno.EADDRINUSE
        assert "first.test" in await greeting(path)  # the first still serves on its file
    assert not path.exists()


async def test_anything_but_a_socket_is_never_replaced(sock_dir: Path) -> None:
    path = sock_dir / "s.sock"
    path.write_text("not a socket")
    with pytest.raises(OSError, match="is not a socket"):
        await SmtpServer(path=path, hostname="mx.test").start()
    assert path.read_text() == "not a socket"


async def test_a_file_replaced_since_is_not_removed(sock_dir: Path) -> None:
    """close() removes the file it made, not one another server has put there since."""
    path = sock_dir / "s.sock"
    server = SmtpServer(path=path, hostname="mx.test")
    await server.start()
    path.unlink()
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        await server.stop()
        assert path.exists()


async def test_linux_abstract_socket(sock_dir: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("abstract Unix sockets are Linux's")
    name = f"\0alephsmtp-test-{os.getpid()}"
    async with SmtpServer(path=name, hostname="mx.test"):
        assert "mx.test" in await greeting(name)  # type: ignore[arg-type]


def test_options_that_cannot_go_with_path() -> None:
    with pytest.raises(ValueError, match="excludes host and port"):
        SmtpServer("127.0.0.1", path="/tmp/x.sock")
    with pytest.raises(ValueError, match="excludes host and port"):
        SmtpServer(port=25, path="/tmp/x.sock")
    with pytest.raises(ValueError, match="reuse_port"):
        SmtpServer(path="/tmp/x.sock", reuse_port=True)
    with pytest.raises(ValueError, match="path_mode"):
        SmtpServer(path="/tmp/x.sock", path_mode=0o1777)
    with pytest.raises(ValueError, match="empty"):
        SmtpServer(path="")
    # Without path, host and port keep their defaults.
    server = SmtpServer(hostname="mx.test")
    assert (server.host, server.port, server.path) == ("127.0.0.1", 25, None)


# --- the PROXY protocol on a Unix socket, from a real HAProxy -------------------------------

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")

HAPROXY_CONFIG = """
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend smtp
    bind 127.0.0.1:{front}
    default_backend mx

backend mx
    server a unix@{path} send-proxy-v2 check inter 200ms
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def send_through(front: int) -> tuple[str, int]:
    deadline = time.monotonic() + 30
    while True:  # bounded by the deadline: HAProxy starts listening
        try:
            client = smtplib.SMTP("127.0.0.1", front, timeout=30)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with client:
        assert client.sock is not None
        address = client.sock.getsockname()[:2]
        client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
    return address


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (scripts/install-peers)")
async def test_haproxy_sends_the_proxy_header_to_a_unix_socket(sock_dir: Path) -> None:
    """The socket's clients have no address to judge: the file's permissions let HAProxy in,
    and the header's client becomes the session's peer."""
    path = sock_dir / "mx.sock"
    kept = Kept()
    front = free_port()
    config = sock_dir / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(front=front, path=path))
    async with SmtpServer(path=path, proxy_protocol=True, hostname="mx.test", on_session=kept):
        assert HAPROXY is not None
        with (sock_dir / "haproxy.log").open("wb") as log:
            haproxy = subprocess.Popen([HAPROXY, "-f", str(config), "-db"], stdout=log, stderr=log)
        try:
            clients = [await asyncio.to_thread(send_through, front) for _ in range(2)]
            deadline = time.monotonic() + 30
            while not any(s.proxy is not None and s.proxy.source is None for s in kept.sessions):
                assert time.monotonic() < deadline, "no LOCAL health check seen"
                await asyncio.sleep(0.05)
        finally:
            haproxy.terminate()
            haproxy.wait(timeout=30)
    assert [peer for peer, _, _ in kept.messages] == clients
    assert all(message == MESSAGE for _, _, message in kept.messages)
    # A health check (PP 2 LOCAL) names no client: the peer is the socket.
    checks = [s for s in kept.sessions if s.proxy is not None and s.proxy.source is None]
    assert all(s.peer == str(path) for s in checks)


# --- protocol_factory: this server's sessions for a listener of your own ---------------------


async def test_protocol_factory_for_listeners_of_your_own(sock_dir: Path) -> None:
    kept, other = Kept(), Kept()
    server = SmtpServer(hostname="mx.test", on_session=kept)  # never started itself
    loop = asyncio.get_running_loop()
    path = sock_dir / "own.sock"
    unix = await loop.create_unix_server(server.protocol_factory(), str(path))
    tcp = await loop.create_server(server.protocol_factory(other), "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    try:
        async with aiosmtplib.SMTP(socket_path=str(path), hostname=None) as client:
            await client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"220 mx.test")
        writer.write(b"EHLO client.test\r\n")
        ehlo = [await reader.readline()]
        while ehlo[-1].startswith(b"250-") and len(ehlo) < 50:
            ehlo.append(await reader.readline())
        assert ehlo[-1].startswith(b"250 ")
        # Counted as the server's sessions, on its pools: the second connection, through the
        # other listener, reads into the buffer the first one gave back.
        assert len(server.sessions) == 1
        command_pool, _ = server.buffer_pools
        assert command_pool.allocated == 1
        # The server's close() ends them: 421 4.3.2 to the idle one (RFC 5321 3.8).
        server.close()
        assert await reader.read() == b"421 4.3.2 Service shutting down, closing connection\r\n"
        writer.close()
    finally:
        unix.close()
        tcp.close()
        await server.wait_closed(5)
    # on_session given to protocol_factory replaces the server's for that listener.
    assert len(kept.sessions) == 1
    assert len(other.sessions) == 1
    # A Unix client has no name: the session names it by the socket it came in on.
    assert kept.messages == [(str(path), str(path), MESSAGE)]
    assert other.sessions[0].peer[0] == "127.0.0.1"
    assert [pool.in_use for pool in server.buffer_pools] == [0, 0]


# --- workers: one listening socket, shared ------------------------------------------------------

WORKERS_SCRIPT = """
import logging, os, sys
from alephsmtp import SmtpServer

path, out = sys.argv[1], sys.argv[2]
logging.basicConfig(
    level=logging.INFO, stream=sys.stderr, format="%(process)d %(name)s %(message)s"
)

def on_session(session):
    def received(sender, e):
        with open(out, "a") as f:
            f.write(f"{os.getpid()} {session.peer}\\n")
    session.message_received += received

SmtpServer(path=path, workers=2, lmtp=True, hostname="mx.test").run(on_session, loop="asyncio")
"""


def test_workers_share_one_unix_socket(sock_dir: Path) -> None:
    path = sock_dir / "lmtp.sock"
    out = sock_dir / "messages.txt"
    script = sock_dir / "serve.py"
    script.write_text(WORKERS_SCRIPT)
    log_path = sock_dir / "stderr.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(script), str(path), str(out)], stderr=log, env=os.environ.copy()
        )
    try:
        deadline = time.monotonic() + 60
        while len(re.findall(r"listening on unix:", log_path.read_text())) < 2:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        for _ in range(6):
            assert send(path, ["bob@example.net"])["bob@example.net"][0] == 250
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    said = log_path.read_text()
    assert f"started 2 workers on unix:{path}" in said
    lines = out.read_text().splitlines()
    assert len(lines) == 6
    assert all(line.split()[1] == str(path) for line in lines)
    workers = {int(pid) for pid in re.findall(r"worker \d+ started \(pid (\d+)\)", said)}
    assert {int(line.split()[0]) for line in lines} <= workers  # served by the workers
    assert not path.exists()  # removed by the parent, once every worker had stopped
