"""A fake transport and a fake clock for session tests: the session's logic, no sockets.

The session is fed exactly as asyncio feeds it (``get_buffer`` then ``buffer_updated``), in
pieces as small as the test wants, and what it writes is collected as reply lines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from alephsmtp.session import SessionConfig, SmtpSession


class FakeTransport(asyncio.Transport):
    def __init__(self, protocol: SmtpSession, peer: Any = ("192.0.2.7", 40000)) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = bytearray()
        self.writes = 0
        self.closed = False
        self.aborted = False
        self.reading = True
        self.peer = peer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.written += data
        self.writes += 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.protocol.connection_lost(None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0  # every write is taken at once

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 25)}.get(name, default)


class MockTimer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class MockLoop:
    """A clock that moves only when the test says so (timers without sleeps)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[MockTimer] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> MockTimer:
        return self.call_at(self.now + delay, callback, *args)

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> MockTimer:
        timer = MockTimer(when, lambda: callback(*args))
        self.timers.append(timer)
        return timer

    def create_task(self, coroutine: Any) -> Any:
        return asyncio.get_running_loop().create_task(coroutine)

    def create_future(self) -> Any:
        return asyncio.get_running_loop().create_future()

    def advance(self, seconds: float) -> None:
        """Move the clock, running every timer that falls due, in order."""
        self.now += seconds
        while True:
            due = [t for t in self.timers if not t.cancelled and t.when <= self.now]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            timer.callback()


class Harness:
    """One session on a fake transport. ``send`` feeds bytes; ``replies`` reads what came back."""

    def __init__(
        self,
        on_session: Any = None,
        *,
        loop: Any = None,
        read_size: int | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("hostname", "mx.test")
        self.config = SessionConfig(**options)
        self.session = SmtpSession(self.config, on_session, loop=loop)
        self.transport = FakeTransport(self.session)
        self.read_size = read_size
        self.session.connection_made(self.transport)
        self._seen = 0

    def send(self, data: bytes, read_size: int | None = None) -> None:
        """Deliver ``data`` as reads of at most ``read_size`` bytes (the buffer size)."""
        size = read_size or self.read_size
        view = memoryview(data)
        while view:
            assert self.transport.reading or self.session.state.name == "CLOSED", (
                "sent while the session paused reading"
            )
            buffer = self.session.get_buffer(-1)
            assert isinstance(buffer, memoryview)
            n = min(len(buffer), len(view), size or len(view))
            buffer[:n] = view[:n]
            view = view[n:]
            self.session.buffer_updated(n)

    def output(self) -> bytes:
        """Everything written since the last call."""
        data = bytes(self.transport.written[self._seen :])
        self._seen = len(self.transport.written)
        return data

    def replies(self) -> list[str]:
        """Reply lines written since the last call, without CRLF."""
        text = self.output().decode("utf-8")
        assert text == "" or text.endswith("\r\n"), text
        return text.split("\r\n")[:-1]

    def codes(self) -> list[str]:
        """The first reply line's ``code enhanced`` (or code) of each final reply line."""
        return [line[:3] for line in self.replies() if line[3:4] != "-"]


async def settle(rounds: int = 10) -> None:
    """Let tasks started by async handlers run."""
    for _ in range(rounds):
        await asyncio.sleep(0)
