"""TLS on a connection: the server side of an upgrade (STARTTLS, RFC 3207; or after a PROXY
protocol header, RFC 8314 implicit TLS), and :class:`TlsInfo`, what TLS a connection uses.

:func:`upgrade` is the one place the library starts TLS on an existing transport, for the
session's STARTTLS and for the PROXY receiver. It owns the failure path: when the handshake
fails (a reset, a close, silence past the timeout, garbage, a refused certificate) the
connection is aborted and the error raised, and the caller, whose protocol never hears of it
from asyncio (the TLS layer never called its ``connection_made``), does its own clean-up.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Any

__all__ = ["HANDSHAKE_ERRORS", "TlsInfo", "looks_like_tls", "upgrade"]

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
    :data:`HANDSHAKE_ERRORS`, or ``CancelledError``).
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
        if transport.is_closing():
            return
        # asyncio's TLS protocol is a BufferedProtocol since Python 3.11, as uvloop's is;
        # Python 3.10's takes data_received.
        get_buffer = getattr(tls_protocol, "get_buffer", None)
        if get_buffer is None:
            tls_protocol.data_received(data)  # type: ignore[attr-defined]
            return
        view = memoryview(data)
        while view:
            buffer = get_buffer(len(view))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            view = view[size:]
            tls_protocol.buffer_updated(size)  # type: ignore[attr-defined]

    loop.call_soon(feed)
