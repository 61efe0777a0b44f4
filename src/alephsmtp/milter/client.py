"""The MTA side of one milter connection, on asyncio: connect, send packets, read responses.

One [`MilterConnection`][alephsmtp.milter.client.MilterConnection] per SMTP session per milter, as
Postfix does (libmilter closes its socket when the SMTP client goes, so a connection serves one
session). The connection only moves packets and enforces time limits; what they mean is
[`chain`][alephsmtp.milter.chain]'s business. Every failure — refused or slow connection, a filter
that stops answering, closes, or sends bytes that break the protocol — is a
[`MilterError`][alephsmtp.milter.client.MilterError].
"""

from __future__ import annotations

import asyncio
import collections
import re
from dataclasses import dataclass
from typing import Any

from .protocol import Continue, PacketDecoder, ProtocolError, Response, decode_response

__all__ = [
    "Endpoint",
    "MilterClosed",
    "MilterConnection",
    "MilterError",
    "MilterProtocolError",
    "MilterTimeout",
    "MilterUnavailable",
]


_timeout = getattr(asyncio, "timeout", None)


class MilterError(Exception):
    """A milter could not be used: the failure policy (``default_action``) decides."""


class MilterUnavailable(MilterError):
    """The milter's socket could not be connected to."""


class MilterTimeout(MilterError):
    """The milter did not answer in time."""


class MilterClosed(MilterError):
    """The milter closed the connection (or it broke)."""


class MilterProtocolError(MilterError):
    """The milter sent something the protocol does not allow."""


_INET_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d+)\Z")
_INET_PORT_AT = re.compile(r"(?P<port>\d+)@(?:\[(?P<v6>[^\]]+)\]|(?P<host>.+))\Z")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a milter listens: ``inet:host:port`` (Postfix), ``inet:port@host`` (Sendmail,
    OpenDKIM), ``inet6:port@[::1]``, ``unix:/path`` or ``local:/path``."""

    text: str
    host: str | None = None
    port: int = 0
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        kind, colon, where = text.partition(":")
        kind = kind.lower()
        if not colon or not where:
            raise ValueError(f"milter endpoint must be inet:HOST:PORT or unix:PATH, not {text!r}")
        if kind in ("unix", "local"):
            return cls(text, path=where)
        if kind in ("inet", "inet6"):
            match = _INET_HOST_PORT.match(where) or _INET_PORT_AT.match(where)
            if match is not None:
                port = int(match.group("port"))
                host = match.group("v6") or match.group("host")
                if 0 < port < 65536 and host:
                    return cls(text, host=host, port=port)
        raise ValueError(
            f"milter endpoint must be inet:HOST:PORT, inet:PORT@HOST or unix:PATH, not {text!r}"
        )

    def __str__(self) -> str:
        return self.text


class MilterConnection(asyncio.Protocol):
    """A connected milter socket: [`send()`][alephsmtp.milter.client.MilterConnection.send] packets,
    await [`response()`][alephsmtp.milter.client.MilterConnection.response].

    Responses are decoded as they arrive and queued; a protocol violation or the connection's end is
    kept and raised by the next [`response()`][alephsmtp.milter.client.MilterConnection.response].
    Writing honours flow control through [`drain()`][alephsmtp.milter.client.MilterConnection.drain]
    (a filter that reads slowly slows a streamed message down).
    """

    __slots__ = (
        "_closed",
        "_deadline",
        "_decoder",
        "_drain_waiter",
        "_error",
        "_loop",
        "_paused",
        "_responses",
        "_timeout",
        "_timer",
        "_transport",
        "_waiter",
        "_wanted",
        "endpoint",
    )

    def __init__(self, endpoint: Endpoint, loop: asyncio.AbstractEventLoop) -> None:
        self.endpoint = endpoint
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._decoder = PacketDecoder()
        self._responses: collections.deque[Response] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: MilterError | None = None
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._timeout = 0.0
        self._wanted = 1

    @classmethod
    async def open(cls, endpoint: Endpoint, timeout: float) -> MilterConnection:
        """Connect to ``endpoint`` within ``timeout`` seconds;
        [`MilterUnavailable`][alephsmtp.milter.client.MilterUnavailable]."""
        loop = asyncio.get_running_loop()
        connection = cls(endpoint, loop)
        try:
            if endpoint.path is not None:
                coroutine: Any = loop.create_unix_connection(lambda: connection, endpoint.path)
            else:
                coroutine = loop.create_connection(
                    lambda: connection, endpoint.host or "127.0.0.1", endpoint.port
                )
            if _timeout is not None:  # Python 3.11+: no task of its own, unlike wait_for
                async with _timeout(timeout):
                    await coroutine
            else:  # pragma: no cover - Python 3.10
                await asyncio.wait_for(coroutine, timeout)
        except asyncio.TimeoutError:
            raise MilterUnavailable(f"connect to milter {endpoint}: timed out") from None
        except OSError as error:
            reason = error.strerror or str(error)
            raise MilterUnavailable(f"connect to milter {endpoint}: {reason}") from None
        return connection

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        responses = self._responses
        decisive = False  # something other than "continue" came: the reader looks at once
        try:
            for command, payload in self._decoder.feed(data):
                response = decode_response(command, payload)
                responses.append(response)
                if type(response) is not Continue:
                    decisive = True
        except ProtocolError as error:
            self._fail(MilterProtocolError(f"milter {self.endpoint}: {error}"))
            self.close()
            return
        if decisive or len(responses) >= self._wanted:
            self._wake()

    def eof_received(self) -> bool | None:
        return False  # a half-closed milter answers no more: close

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._closed = True
        self._stop_timer()
        if self._error is None:
            reason = f": {exc}" if exc else ""
            self._fail(MilterClosed(f"milter {self.endpoint} closed the connection{reason}"))
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)

    # --- use ---------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, data: bytes) -> None:
        """Write packets (already encoded); a closed connection shows at the next read."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def drain(self) -> None:
        """Wait while the milter's socket buffer is full."""
        if self._paused and not self._closed:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter
            self._drain_waiter = None

    async def response(self, timeout: float, expected: int = 1) -> Response:
        """The next response; [`MilterTimeout`][alephsmtp.milter.client.MilterTimeout] after
        ``timeout`` seconds without one.

        ``expected``: how many plain "continue" answers are due (a batch of events): the
        reader is woken once they are all in, or at the first other answer, not per packet.
        """
        if not self._responses:
            if self._error is not None:
                raise self._error
            self._wanted = expected
            loop = self._loop
            self._deadline = loop.time() + timeout
            self._timeout = timeout
            # One lazy timer per connection, not one per response (a timer handle and a heap
            # entry each): it fires at the deadline it was set for and, if the wait has moved
            # on, sets itself for the new one.
            if self._timer is None:
                self._timer = loop.call_at(self._deadline, self._check_deadline)
            waiter = self._waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
            if not self._responses:
                assert self._error is not None
                raise self._error
        return self._responses.popleft()

    def close(self) -> None:
        """Close the socket (what was written is still sent)."""
        self._closed = True
        self._stop_timer()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def abort(self) -> None:
        """Drop the socket at once: after a timeout or a protocol error the stream is out of
        step and nothing more may be read from it (Postfix shuts it down likewise)."""
        self._closed = True
        self._stop_timer()
        transport = self._transport
        if transport is not None:
            transport.abort()

    def _fail(self, error: MilterError) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_deadline(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done() or self._closed:
            return  # not waiting: the next wait sets a timer again
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._check_deadline)
            return
        self._fail(MilterTimeout(f"milter {self.endpoint}: no answer in {self._timeout:g} s"))
        self.abort()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
