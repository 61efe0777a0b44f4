"""A real HAProxy in front of two alephsmtp servers, speaking the PROXY protocol to them.

HAProxy (Debian's ``haproxy``) runs in TCP mode from a config written to a tmp dir, balancing
round robin over two servers on 127.0.0.1. Messages go through it with smtplib; each must
arrive with ``envelope.peer`` equal to the client socket's own address — the one HAProxy saw,
carried in the PROXY header — not HAProxy's. Its health checks (LOCAL, PP 2.2) and its CRC32C
and UNIQUE_ID TLVs are exercised too. Skipped only when ``haproxy`` is not installed.
"""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from alephsmtp import SmtpServer
from alephsmtp.proxy import ProxyCommand

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
pytestmark = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (Debian: apt-get install haproxy)"
)

CONFIG = """
global
    log stderr format short local0 info

defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend smtp
    bind 127.0.0.1:{front}
    unique-id-format %{{+X}}o%ci:%cp_%fi:%fp_%Ts_%rt
    default_backend mx

backend mx
    balance roundrobin
    server a 127.0.0.1:{port_a} {proxy} check inter 200ms
    server b 127.0.0.1:{port_b} {proxy} check inter 200ms
"""


class Recorder:
    """Per server: every session (health checks included) and every message."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sessions: list[Any] = []
        self.messages: list[tuple[Any, Any]] = []

    def on_session(self, session: Any) -> None:
        self.sessions.append(session)

        def received(sender: Any, e: Any) -> None:
            self.messages.append((sender, e))

        session.message_received += received


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def backends() -> AsyncIterator[list[tuple[SmtpServer, Recorder]]]:
    pairs = []
    for name in ("a", "b"):
        recorder = Recorder(name)
        server = SmtpServer(
            "127.0.0.1",
            0,
            on_session=recorder.on_session,
            proxy_protocol=True,
            hostname=f"mx-{name}.test",
        )
        await server.start()
        pairs.append((server, recorder))
    yield pairs
    for server, _ in pairs:
        await server.stop(grace=5)
        command_pool, data_pool = server.buffer_pools
        assert command_pool.in_use == 0
        assert data_pool.in_use == 0


def start_haproxy(
    tmp_path: Path, front: int, ports: list[int], proxy: str
) -> subprocess.Popen[bytes]:
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG.format(front=front, port_a=ports[0], port_b=ports[1], proxy=proxy))
    assert HAPROXY is not None
    check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, check=False)
    assert check.returncode == 0, check.stderr.decode(errors="replace")
    # -db: stay in the foreground, no daemon; the test owns and ends the process.
    with (tmp_path / "haproxy.log").open("wb") as log:
        return subprocess.Popen([HAPROXY, "-f", str(config), "-db"], stdout=log, stderr=log)


def send_through(front: int, subject: str) -> tuple[str, int]:
    """One message through HAProxy; the client socket's own address (what HAProxy saw).

    Retries only the connection while HAProxy starts listening.
    """
    deadline = time.monotonic() + 30
    while True:  # bounded by the deadline
        try:
            client = smtplib.SMTP("127.0.0.1", front, timeout=30)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with client:
        assert client.sock is not None
        host, port = client.sock.getsockname()[:2]
        client.sendmail(
            "sender@client.example",
            ["rcpt@mx.test"],
            f"Subject: {subject}\r\n\r\nthrough haproxy\r\n".encode(),
        )
    return host, port


@pytest.mark.parametrize(
    ("proxy", "version"),
    [("send-proxy-v2 proxy-v2-options crc32c,unique-id", 2), ("send-proxy", 1)],
    ids=["v2", "v1"],
)
async def test_haproxy_passes_the_client_address(
    tmp_path: Path,
    backends: list[tuple[SmtpServer, Recorder]],
    proxy: str,
    version: int,
) -> None:
    front = free_port()
    haproxy = start_haproxy(tmp_path, front, [server.port for server, _ in backends], proxy)
    try:
        clients = {}
        for number in range(6):  # one connection each: round robin alternates the servers
            subject = f"message {number}"
            clients[subject] = await asyncio.to_thread(send_through, front, subject)
        if version == 2:
            # Health checks: PP 2.2 LOCAL headers, which keep the connection's real peer.
            deadline = time.monotonic() + 30
            while not all(_local_sessions(recorder) for _, recorder in backends):
                assert time.monotonic() < deadline, "no LOCAL health check seen"
                await asyncio.sleep(0.05)
    finally:
        haproxy.terminate()
        haproxy.wait(timeout=30)
    log = (tmp_path / "haproxy.log").read_text(errors="replace")

    seen = {}
    for _, recorder in backends:
        assert recorder.messages, f"server {recorder.name} got nothing; haproxy said:\n{log}"
        for session, e in recorder.messages:
            subject = e.message.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            seen[subject] = e.envelope.peer
            header = session.proxy
            assert header.version == version
            assert header.command is ProxyCommand.PROXY
            assert header.destination == ("127.0.0.1", front)
            if version == 2:
                assert header.crc32c is not None  # sent by HAProxy, verified by us
                assert header.unique_id  # HAProxy's id of the connection
    # The original client, port and all: HAProxy's own connections come from other ports.
    assert seen == clients
    assert all(host == "127.0.0.1" for host, _ in seen.values())
    if version == 2:
        for _, recorder in backends:
            for session in _local_sessions(recorder):
                assert session.peer[0] == "127.0.0.1"
                assert session.peer not in clients.values()
                assert session.envelope is None


def _local_sessions(recorder: Recorder) -> list[Any]:
    return [
        session
        for session in recorder.sessions
        if session.proxy is not None and session.proxy.command is ProxyCommand.LOCAL
    ]
