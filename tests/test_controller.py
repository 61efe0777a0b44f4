"""``alephsmtp.Controller``: a server in a background thread, from plain synchronous code.

Started and stopped many times in a loop (on asyncio's loop and on uvloop's, on TCP and on a
Unix socket), with a message through it each time: afterwards no thread and no descriptor is
left over. Also: start errors in the caller's thread, a graceful stop that lets a transaction
finish, and one whose grace runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import smtplib
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _lmtp import lmtp_send
from alephsmtp import Controller, SmtpServer

CYCLES = 50


def descriptors() -> dict[int, str]:
    """This process's open descriptors and what each is (a socket, a pipe, a file)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return found


class Counted:
    """on_session: counts the messages (from the server's thread; read after stop())."""

    def __init__(self) -> None:
        self.subjects: list[str] = []

    def __call__(self, session: Any) -> None:
        session.message_received += self.received

    def received(self, session: Any, e: Any) -> None:
        self.subjects.append(e.message.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode())


def send(controller: Controller, subject: str) -> None:
    address = controller.address
    data = f"Subject: {subject}\r\n\r\nhi\r\n".encode()
    if isinstance(address, str):
        assert lmtp_send(address, "a@example.org", ["b@example.net"], data) == {
            "b@example.net": (250, b"2.0.0 OK: queued")
        }
        return
    with smtplib.SMTP(*address, timeout=30) as client:
        client.sendmail("a@example.org", ["b@example.net"], data)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="alephsmtp-ctl-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_start_and_stop_many_times_leaves_nothing_behind(
    loop: str, where: str, sock_dir: Path
) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    counted = Counted()
    options: dict[str, Any] = (
        {"port": 0} if where == "tcp" else {"path": sock_dir / "s.sock", "lmtp": True}
    )
    controller = Controller(counted, hostname="mx.test", loop=loop, **options)  # type: ignore[arg-type]
    # One round first: uvloop opens a pipe of its own once per process, on first use.
    with controller:
        send(controller, "warm-up")
    threads = set(threading.enumerate())
    gc.collect()  # an event loop another test left to the collector must not close mid-count
    open_before = descriptors()
    ports = set()
    for cycle in range(CYCLES):
        controller.start()
        assert controller.is_running
        ports.add(controller.port)
        send(controller, str(cycle))
        controller.stop()
        assert not controller.is_running
        if where == "unix":
            assert not (sock_dir / "s.sock").exists()
    assert set(threading.enumerate()) == threads
    gc.collect()
    left = {fd: what for fd, what in descriptors().items() if open_before.get(fd) != what}
    assert left == {}
    assert counted.subjects == ["warm-up", *map(str, range(CYCLES))]
    if where == "tcp":
        assert len(ports) > 1  # port 0: a new one at each start


def test_the_thread_its_name_and_daemon_flag() -> None:
    with Controller(port=0, hostname="mx.test", name="mail-in", daemon=False) as controller:
        (thread,) = [t for t in threading.enumerate() if t.name == "mail-in"]
        assert not thread.daemon
        assert controller.address == ("127.0.0.1", controller.port)
        assert controller.host == "127.0.0.1"
        assert controller.path is None
        assert isinstance(controller.server, SmtpServer)
        assert controller.server.is_serving
        # The loop, for work handed to the server's thread.
        assert controller.loop is not None
        future = asyncio.run_coroutine_threadsafe(asyncio.sleep(0, "ran"), controller.loop)
        assert future.result(10) == "ran"
        assert repr(controller) == f"<Controller 127.0.0.1:{controller.port} running>"
    assert not thread.is_alive()
    assert controller.loop is None
    with Controller(port=0, hostname="mx.test") as controller:
        (thread,) = [t for t in threading.enumerate() if t.name == "alephsmtp-server"]
        assert thread.daemon


def test_wildcard_address_is_reached_on_loopback() -> None:
    with Controller(counted := Counted(), "0.0.0.0", 0, hostname="mx.test") as controller:
        assert controller.address == ("127.0.0.1", controller.port)
        send(controller, "wildcard")
    assert counted.subjects == ["wildcard"]


def test_a_start_error_is_raised_in_the_callers_thread() -> None:
    threads = set(threading.enumerate())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        controller = Controller(port=taken.getsockname()[1], hostname="mx.test")
        with pytest.raises(OSError, match="address already in use"):
            controller.start()
    assert not controller.is_running
    assert set(threading.enumerate()) == threads
    controller.stop()  # not running: nothing to do


def test_wrong_options_fail_at_construction() -> None:
    with pytest.raises(TypeError):
        Controller(no_such_option=1)
    with pytest.raises(ValueError, match="workers"):
        Controller(port=0, workers=2)
    with pytest.raises(ValueError, match="loop"):
        Controller(port=0, loop="trio")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="excludes host and port"):
        Controller(port=0, path="/tmp/x.sock")


def test_started_twice_is_refused() -> None:
    with Controller(port=0, hostname="mx.test") as controller:
        with pytest.raises(RuntimeError, match="already running"):
            controller.start()
        assert controller.is_running


def test_stop_from_a_handler_is_refused_not_a_deadlock() -> None:
    errors: list[RuntimeError] = []

    def on_session(session: Any) -> None:
        try:
            controller.stop()
        except RuntimeError as error:
            errors.append(error)

    controller = Controller(on_session, port=0, hostname="mx.test")
    with controller:
        send(controller, "x")
    assert "deadlock" in str(errors[0])


def greeting(controller: Controller) -> tuple[int, bytes]:
    client = smtplib.SMTP(timeout=30)
    try:
        return client.connect(*controller.address)
    finally:
        client.close()


def test_an_async_on_session_and_the_on_session_attribute() -> None:
    async def slow(session: Any) -> None:
        await asyncio.sleep(0.01)
        session.start_transaction("220 mx.test slow but ready")

    with Controller(slow, port=0, hostname="mx.test") as controller:
        assert greeting(controller) == (220, b"mx.test slow but ready")
        controller.on_session = None  # takes effect with the next session
        assert greeting(controller) == (220, b"mx.test ESMTP alephsmtp")


def test_stop_lets_a_transaction_finish() -> None:
    counted = Counted()
    controller = Controller(counted, port=0, hostname="mx.test").start()
    client = smtplib.SMTP(*controller.address, timeout=30)
    try:
        client.ehlo()
        client.mail("a@example.org")
        client.rcpt("b@example.net")
        stopping = threading.Thread(target=controller.stop, kwargs={"grace": 30})
        stopping.start()
        # The server stops accepting at once, and waits for this transaction.
        deadline = time.monotonic() + 10
        while controller.server.is_serving:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert stopping.is_alive()
        assert client.data(b"Subject: finished\r\n\r\nhi\r\n")[0] == 250
        stopping.join(30)
        assert not stopping.is_alive()
    finally:
        client.close()
    assert counted.subjects == ["finished"]


def test_stop_aborts_what_outlasts_the_grace() -> None:
    # The server's own grace is long: only stop(grace=...) can end this in time.
    controller = Controller(port=0, hostname="mx.test", shutdown_grace=3600).start()
    client = smtplib.SMTP(*controller.address, timeout=30)
    try:
        client.ehlo()
        client.mail("a@example.org")
        client.rcpt("b@example.net")
        stopping = threading.Thread(target=controller.stop, kwargs={"grace": 0.2})
        stopping.start()
        stopping.join(60)
        assert not stopping.is_alive()  # the transaction was aborted, not waited for
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.data(b"Subject: too late\r\n\r\nhi\r\n")
    finally:
        client.close()
