"""``SmtpServer(..., workers=N).run()``: N processes on one port (SO_REUSEPORT), and the loop.

Each test runs a small script as a real process tree on 127.0.0.1 and talks to it with
smtplib; the handler appends a line per message (worker pid, loop module, subject) to a file.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from alephsmtp import SmtpServer
from alephsmtp.server import _loop_runner

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "SO_REUSEPORT") or not hasattr(os, "fork"),
    reason="workers need SO_REUSEPORT and fork",
)

SCRIPT = """
import asyncio, logging, os, sys
from alephsmtp import SmtpServer

out, workers, loop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
logging.basicConfig(
    level=logging.INFO, stream=sys.stderr, format="%(process)d %(name)s %(message)s"
)

def on_session(session):
    def received(sender, e):
        subject = e.message.split(b"Subject: ", 1)[1].split(b"\\r\\n", 1)[0].decode()
        module = type(asyncio.get_running_loop()).__module__.split(".")[0]
        with open(out, "a") as f:
            f.write(f"{os.getpid()} {module} {subject}\\n")
    session.message_received += received

SmtpServer("127.0.0.1", 0, workers=workers, hostname="mx.test").run(on_session, loop=loop)
"""

LISTENING = re.compile(r"^(\d+) alephsmtp\.server listening on 127\.0\.0\.1:(\d+)$", re.M)
STARTED = re.compile(r"worker \d+ started \(pid (\d+)\)")


class Served:
    """A server script running as a process, its log, and what its handler recorded."""

    def __init__(self, tmp_path: Path, workers: int, loop: str = "auto") -> None:
        script = tmp_path / "serve.py"
        script.write_text(SCRIPT)
        self.out = tmp_path / "messages.txt"
        self.log_path = tmp_path / "stderr.log"
        self._log_file = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(self.out), str(workers), loop],
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
            env=os.environ.copy(),
        )
        self.port, self.listener_pids = self._wait_listening(workers)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_listening(self, count: int) -> tuple[int, set[int]]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # bounded by the deadline
            found = LISTENING.findall(self.log())
            if len(found) >= count:
                ports = {int(port) for _, port in found}
                assert len(ports) == 1, f"workers on different ports: {ports}"
                return ports.pop(), {int(pid) for pid, _ in found}
            assert self.process.poll() is None, f"server exited early:\n{self.log()}"
            time.sleep(0.05)
        pytest.fail(f"server not listening:\n{self.log()}")

    def records(self) -> list[tuple[int, str, str]]:
        if not self.out.exists():
            return []
        lines = self.out.read_text().splitlines()
        return [(int(pid), module, subject) for pid, module, subject in map(str.split, lines)]

    def wait_records(self, count: int) -> list[tuple[int, str, str]]:
        """The records, once ``count`` are written (the reply to DATA comes after)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # bounded by the deadline
            records = self.records()
            if len(records) >= count:
                return records
            time.sleep(0.02)
        return self.records()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            self._log_file.close()

    def kill(self) -> None:
        """Last resort for a failed test: the whole tree, by pid."""
        for pid in self.listener_pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._log_file.close()


Serve = Callable[..., Served]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """Start the script (``serve(workers, loop="auto")``); whatever is left is killed after."""
    started: list[Served] = []

    def start(workers: int, loop: str = "auto") -> Served:
        served = Served(tmp_path, workers, loop)
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it is gone but for its exit status)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def send(port: int, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(
            "a@client.example", ["b@mx.test"], f"Subject: {subject}\r\n\r\nbody\r\n".encode()
        )


def test_two_workers_share_the_port_and_stop_on_sigterm(serve: Serve) -> None:
    served = serve(2)
    workers = {int(pid) for pid in STARTED.findall(served.log())}
    assert len(workers) == 2
    assert served.listener_pids == workers
    assert served.process.pid not in workers
    for number in range(20):  # one connection each: the kernel spreads them over the sockets
        send(served.port, f"m{number}")
    records = served.wait_records(20)
    assert sorted(subject for _, _, subject in records) == sorted(f"m{n}" for n in range(20))
    pids = {pid for pid, _, _ in records}
    assert pids <= workers
    assert len(pids) > 1, "every message went to one worker"
    # uvloop is used automatically when it is installed.
    expected_loop = "uvloop" if _installed("uvloop") else "asyncio"
    assert {module for _, module, _ in records} == {expected_loop}
    assert served.stop() == 0
    assert not [pid for pid in workers if _alive(pid)], "worker processes left behind"
    log = served.log()
    for pid in workers:
        assert re.search(rf"\(pid {pid}\) stopped", log), log


def test_sigterm_lets_a_transaction_in_progress_finish(serve: Serve) -> None:
    served = serve(2)
    client = smtplib.SMTP("127.0.0.1", served.port, timeout=30)
    try:
        client.ehlo("client.example")
        client.mail("a@client.example")
        client.rcpt("b@mx.test")
        code, _ = client.docmd("DATA")
        assert code == 354
        served.process.send_signal(signal.SIGTERM)
        # Both workers stop accepting (their graceful stop has begun) before the message ends.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # bounded by the deadline
            try:
                socket.create_connection(("127.0.0.1", served.port), timeout=5).close()
            except ConnectionRefusedError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("workers still accept connections after SIGTERM")
        client.send(b"Subject: late\r\n\r\nbody\r\n.\r\n")
        code, _ = client.getreply()
        assert code == 250
        # Then, the transaction over, the session ends (RFC 5321 3.8).
        code, message = client.getreply()
        assert (code, message[:5]) == (421, b"4.3.2")
    finally:
        client.close()
    assert [subject for _, _, subject in served.wait_records(1)] == ["late"]
    assert served.stop() == 0


def test_loop_opt_out(serve: Serve) -> None:
    served = serve(1, loop="asyncio")
    send(served.port, "plain")
    assert [(module, subject) for _, module, subject in served.wait_records(1)] == [
        ("asyncio", "plain")
    ]
    assert served.stop() == 0


def test_address_in_use_fails_in_the_caller() -> None:
    # The parent binds before it forks: an address in use is an OSError here, no worker starts.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = SmtpServer("127.0.0.1", taken.getsockname()[1], workers=2)
        with pytest.raises(OSError, match="in use"):
            server.run()


def test_loop_choice() -> None:
    assert _loop_runner("asyncio") is asyncio.run
    with pytest.raises(ValueError, match="loop must be"):
        _loop_runner("trio")
    if _installed("uvloop"):
        import uvloop

        assert _loop_runner("auto") is uvloop.run
        assert _loop_runner("uvloop") is uvloop.run
    else:
        assert _loop_runner("auto") is asyncio.run
        with pytest.raises(ImportError):
            _loop_runner("uvloop")


def test_workers_option_is_checked() -> None:
    with pytest.raises(ValueError, match="workers"):
        SmtpServer("127.0.0.1", 0, workers=0)


def _installed(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True
