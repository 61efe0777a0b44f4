"""TLS on a connection: the server side of an upgrade (STARTTLS, RFC 3207; or after a PROXY
protocol header, RFC 8314 implicit TLS), and [`TlsInfo`][alephsmtp.tls.TlsInfo], what TLS a
connection uses.

[`upgrade()`][alephsmtp.tls.upgrade] is the one place the library starts TLS on an existing
transport, for the session's STARTTLS and for the PROXY receiver. It owns the failure path: when the
handshake fails (a reset, a close, silence past the timeout, garbage, a refused certificate) the
connection is aborted and the error raised, and the caller, whose protocol never hears of it from
asyncio (the TLS layer never called its ``connection_made``), does its own clean-up.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = [
    "HANDSHAKE_ERRORS",
    "TlsAcceptor",
    "TlsInfo",
    "describe",
    "feed_protocol",
    "looks_like_tls",
    "upgrade",
    "where",
]

log = logging.getLogger("alephsmtp.tls")

# What a failed handshake raises: a TLS alert or bad record, a reset or close, the timeout.
HANDSHAKE_ERRORS = (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError, EOFError)

_TLS_HANDSHAKE_RECORD = 0x16  # RFC 8446 5.1: ContentType handshake(22)
_TLS_MAJOR_VERSION = 0x03  # every TLS record's legacy_record_version starts with 3


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What TLS the connection uses: protocol version, cipher, the client's certificate."""

    version: str | None
    cipher: str | None
    bits: int | None
    peer_certificate: dict[str, Any] | None

    @classmethod
    def of(cls, transport: asyncio.BaseTransport) -> TlsInfo:
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return cls(None, None, None, None)
        cipher = ssl_object.cipher()
        return cls(
            ssl_object.version(),
            cipher[0] if cipher else None,
            cipher[2] if cipher else None,
            ssl_object.getpeercert() or None,
        )


def looks_like_tls(data: bytes) -> bool:
    """Whether ``data`` starts like a TLS handshake record (a ClientHello)."""
    return len(data) >= 2 and data[0] == _TLS_HANDSHAKE_RECORD and data[1] == _TLS_MAJOR_VERSION


async def upgrade(
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    *,
    handshake_timeout: float | None,
    early_data: bytes = b"",
) -> asyncio.Transport:
    """Run the server side of a TLS handshake on ``transport``; the TLS transport for
    ``protocol`` once it is done.

    ``early_data`` is what the client sent after the plaintext that asked for TLS and that
    was already read from the socket: a client that does not wait for the 220 of STARTTLS
    sends its ClientHello in the same segment. It goes to the TLS layer before anything
    else is read, so the handshake sees the bytes in order. (Only TLS bytes belong here: the
    caller discards plaintext, RFC 3207 5 / CVE-2011-0411.)

    On any failure the connection is aborted and the error raised (one of
    [`HANDSHAKE_ERRORS`][alephsmtp.tls.HANDSHAKE_ERRORS], or ``CancelledError``).
    """
    loop = asyncio.get_running_loop()
    starting = loop.create_task(
        loop.start_tls(
            transport,
            protocol,
            context,
            server_side=True,
            ssl_handshake_timeout=handshake_timeout,
        )
    )
    try:
        if early_data:
            await _hand_early_data(loop, transport, protocol, starting, early_data)
        tls_transport = await starting
    except BaseException:
        starting.cancel()
        transport.abort()
        raise
    if tls_transport is None:  # pragma: no cover - closed as the handshake ended
        transport.abort()
        raise ConnectionResetError("connection closed during the TLS handshake")
    return tls_transport


async def _hand_early_data(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    starting: asyncio.Task[Any],
    data: bytes,
) -> None:
    """Give ``data`` to the TLS layer as if the transport had just read it.

    ``start_tls`` swaps its TLS protocol in with the transport paused, and schedules that
    protocol's ``connection_made`` and then the transport's ``resume_reading``. A callback
    scheduled after those runs in the same round, before the socket is read again: so the
    early bytes reach the TLS layer after it is set up and before any later byte.
    """
    for _ in range(100):  # bounded: start_tls swaps the protocol on its first step
        if transport.get_protocol() is not protocol or starting.done():
            break
        await asyncio.sleep(0)
    if starting.done():
        return
    tls_protocol = transport.get_protocol()
    if tls_protocol is protocol:  # pragma: no cover - start_tls did not start
        return

    def feed() -> None:
        if not transport.is_closing():
            feed_protocol(tls_protocol, data)

    loop.call_soon(feed)


def feed_protocol(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Hand ``data`` to ``protocol`` as its transport would have: through ``get_buffer`` and
    ``buffer_updated`` for a buffered protocol, ``data_received`` otherwise (Python 3.10's
    TLS protocol)."""
    get_buffer = getattr(protocol, "get_buffer", None)
    if get_buffer is None:
        protocol.data_received(data)  # type: ignore[attr-defined]
        return
    view = memoryview(data)
    while view:
        buffer = get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        view = view[size:]
        protocol.buffer_updated(size)  # type: ignore[attr-defined]


# Bytes a client may send right after its handshake, before the greeting reaches it (an
# impatient client's first command); more than this is not a client waiting for a greeting.
_MAX_EARLY_DATA = 64 << 10


class TlsAcceptor(asyncio.Protocol):
    """The first protocol of an implicit-TLS connection (RFC 8314, port 465 style).

    It waits for the client's first bytes (its ClientHello), then runs the handshake
    ([`upgrade()`][alephsmtp.tls.upgrade]) with them, all within ``handshake_timeout``, and hands
    the TLS transport to the protocol ``make_protocol()`` builds (``set_protocol`` and
    ``connection_made``). ``admit()``, asked when the connection arrives, may refuse it (the server
    is full: closed at once, as nothing can be said before TLS). ``on_close(acceptor)`` is called
    exactly once: when the connection is handed over, refused or gone. So a server counts a
    connection from its accept to its end, handshake included. ``metrics`` (the server's
    [`Metrics`][alephsmtp.metrics.Metrics]) counts failed handshakes (``tls_failures``), those that
    did not end in time also as ``timeouts["tls"]``.

    (The handshake starts from the first bytes, not from ``connection_made``: uvloop starts
    reading a new connection only after ``connection_made`` returns, so a handshake started
    there could miss the ClientHello.)
    """

    def __init__(
        self,
        make_protocol: Callable[[], asyncio.BaseProtocol],
        context: ssl.SSLContext,
        *,
        handshake_timeout: float | None,
        on_close: Callable[[TlsAcceptor], None] | None = None,
        admit: Callable[[], bool] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._make_protocol = make_protocol
        self._metrics = metrics
        self._context = context
        self._handshake_timeout = handshake_timeout
        self._on_close = on_close
        self._admit = admit
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly
        self._started = 0.0  # when the connection came
        self._tls_started = False  # the first bytes came: the handshake runs
        self._done = False
        self._early = bytearray()  # read after the handshake, before the hand-over
        self.peer: Any = None

    def __repr__(self) -> str:
        return f"<TlsAcceptor {self.peer!r}{' done' if self._done else ''}>"

    def abort(self) -> None:
        """Drop the connection (a server shutting down); nothing is sent."""
        self._metrics = None  # what fails now is the shutdown's doing, not the client's
        if self._transport is not None:
            self._transport.abort()
        self._finish()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not derive from asyncio's.
        self._transport = transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")
        if self._admit is not None and not self._admit():
            log.info("[%s] server full; closed before TLS", where(self.peer))
            transport.abort()
            self._finish()
            return
        loop = asyncio.get_running_loop()
        self._started = loop.time()
        if self._handshake_timeout:
            self._timer = loop.call_later(self._handshake_timeout, self._silent)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if self._done or transport is None:
            return
        if not self._tls_started:
            # The ClientHello (or its start): the handshake takes it from here, in the time
            # left of handshake_timeout.
            self._tls_started = True
            self._cancel_timer()
            transport.pause_reading()
            timeout = self._handshake_timeout
            if timeout:
                timeout = max(timeout - (asyncio.get_running_loop().time() - self._started), 0.1)
            self._task = asyncio.get_running_loop().create_task(
                self._handshake(transport, bytes(data), timeout)
            )
            return
        # After the handshake, before the hand-over: a client that did not wait for the
        # greeting sent its first command with its last handshake bytes. It is kept for the
        # protocol, which reads it after its greeting, as from a plain socket.
        self._early += data
        if len(self._early) > _MAX_EARLY_DATA:
            log.info("[%s] client sent too much before the greeting; closed", where(self.peer))
            transport.abort()
            self._finish()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._finish()

    def _silent(self) -> None:
        self._timer = None
        log.info(
            "[%s] no TLS handshake within %g s; closed", where(self.peer), self._handshake_timeout
        )
        self._failed(timeout=True)
        if self._transport is not None:
            self._transport.abort()
        self._finish()

    async def _handshake(
        self, transport: asyncio.Transport, hello: bytes, timeout: float | None
    ) -> None:
        try:
            tls_transport = await upgrade(
                transport, self, self._context, handshake_timeout=timeout, early_data=hello
            )
        except HANDSHAKE_ERRORS as error:
            log.info("[%s] TLS handshake failed: %s", where(self.peer), describe(error))
            self._failed(timeout=isinstance(error, asyncio.TimeoutError))
            self._finish()
            return
        if self._done:  # dropped (a shutdown, or too much data) as the handshake ended
            tls_transport.abort()
            return
        self._finish()
        protocol = self._make_protocol()
        tls_transport.set_protocol(protocol)
        protocol.connection_made(tls_transport)
        if self._early and not tls_transport.is_closing():
            feed_protocol(protocol, bytes(self._early))
        self._early = bytearray()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _failed(self, *, timeout: bool) -> None:
        if self._metrics is not None:
            self._metrics.tls_failed(timeout=timeout)

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self._cancel_timer()
        if self._on_close is not None:
            self._on_close(self)


def describe(error: BaseException) -> str:
    """An error as a log line can say it: its text, or its type when it has none (a
    timeout's text is empty)."""
    return str(error) or type(error).__name__


def where(address: Any) -> str:
    """A peer as a log line names it: ``host:port``, ``[v6-host]:port``, or as it is."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)
