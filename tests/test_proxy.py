"""The PROXY protocol (HAProxy's "The PROXY protocol", versions 1 and 2): parser and server.

Parser vectors are fed whole, one byte at a time, and with bytes after the header (h11's
``tr()`` style); the server tests send a header by hand over a real socket on 127.0.0.1, then
speak SMTP, and check which address the session saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alephsmtp import SmtpServer
from alephsmtp.proxy import (
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NETNS,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V2_SIGNATURE,
    ProxyCommand,
    ProxyFamily,
    ProxyHeader,
    ProxyHeaderReader,
    ProxyProtocolError,
    ProxyTransport,
    Tlv,
    address_in_networks,
    crc32c,
)

# --- building version 2 headers by hand (PP 2.2) --------------------------------------------


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def v2(
    addresses: bytes = b"",
    tlvs: bytes = b"",
    *,
    command: int = 0x1,
    family: int = 0x11,
    version: int = 0x2,
    with_crc: bool = False,
) -> bytes:
    """A version 2 header; ``with_crc`` appends a PP2_TYPE_CRC32C TLV with the right sum."""
    body = addresses + tlvs + (tlv(PP2_TYPE_CRC32C, bytes(4)) if with_crc else b"")
    header = V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", len(body))
    header += body
    if with_crc:  # PP 2.2.3: the sum of the header with its own field zeroed, at the end
        header = header[:-4] + struct.pack("!I", crc32c(header))
    return header


def inet4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def unix(src: bytes, dst: bytes) -> bytes:
    return src.ljust(108, b"\0") + dst.ljust(108, b"\0")


# --- feeding: whole, byte by byte, with trailing bytes ----------------------------------------

TRAILING = b"EHLO client.example\r\n"


def feed_whole(data: bytes) -> tuple[ProxyHeader, bytes]:
    reader = ProxyHeaderReader()
    header = reader.feed(data)
    assert header is not None
    return header, reader.trailing


def feed_bytewise(data: bytes) -> tuple[ProxyHeader, bytes]:
    reader = ProxyHeaderReader()
    for index in range(len(data)):
        header = reader.feed(data[index : index + 1])
        if header is not None:
            # The header is complete exactly at its last byte, not later.
            assert index + 1 == header.length
            break
    else:
        pytest.fail("header never completed")
    reader.feed(data[index + 1 :])
    return header, reader.trailing


def feed_as_server(data: bytes) -> tuple[ProxyHeader, bytes]:
    """Read as the receiver does: never more than ``needed`` bytes at a time."""
    reader = ProxyHeaderReader()
    offset = 0
    header = None
    while header is None:  # bounded: needed >= 1 until the header is complete
        size = reader.needed
        assert size >= 1
        header = reader.feed(data[offset : offset + size])
        offset += size
        assert offset <= len(data)
    assert reader.needed == 0
    assert reader.trailing == b"", "read past the header"
    assert offset == header.length
    return header, data[offset:]


FEEDERS = [feed_whole, feed_bytewise, feed_as_server]
Feeder = Callable[[bytes], tuple[ProxyHeader, bytes]]


@pytest.fixture(params=FEEDERS, ids=["whole", "bytewise", "as-server"])
def feed(request: pytest.FixtureRequest) -> Feeder:
    feeder: Feeder = request.param
    return feeder


def parse(feed: Feeder, data: bytes) -> ProxyHeader:
    header, trailing = feed(data + TRAILING)
    assert trailing == TRAILING
    assert header.length == len(data)
    return header


def refuse(data: bytes) -> str:
    """Feed whole and byte by byte: both refuse; the message of the whole feed."""
    with pytest.raises(ProxyProtocolError) as whole:
        ProxyHeaderReader().feed(data)
    reader = ProxyHeaderReader()
    with pytest.raises(ProxyProtocolError):  # noqa: PT012 - the loop is the feeding
        for index in range(len(data)):
            reader.feed(data[index : index + 1])
    return str(whole.value)


# --- CRC-32C ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0x00000000),
        (b"123456789", 0xE3069283),  # the CRC catalogue's check value for CRC-32C
        # RFC 3720 B.4 (iSCSI) test vectors
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
)
def test_crc32c_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected


def test_crc32c_continues() -> None:
    assert crc32c(b"56789", crc32c(b"1234")) == crc32c(b"123456789")


def crc32c_bitwise(data: bytes) -> int:
    """The reference: RFC 4960 Appendix B's reflected polynomial, one bit at a time."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


@settings(deadline=None)  # no timing assertions: a loaded machine is slow
@given(st.binary(max_size=300))
def test_crc32c_table_matches_the_bitwise_reference(data: bytes) -> None:
    assert crc32c(data) == crc32c_bitwise(data)


# --- version 1 (PP 2.1) ----------------------------------------------------------------------


def test_v1_tcp4(feed: Feeder) -> None:
    header = parse(feed, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n")
    assert header == ProxyHeader(
        1,
        ProxyCommand.PROXY,
        ProxyFamily.INET,
        ProxyTransport.STREAM,
        ("192.168.0.1", 56324),
        ("192.168.0.11", 443),
        length=47,
    )


def test_v1_tcp6(feed: Feeder) -> None:
    header = parse(feed, b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 65535 0\r\n")
    assert header.family is ProxyFamily.INET6
    assert header.source == ("2001:db8::1", 65535)  # canonical form
    assert header.destination == ("::1", 0)


def test_v1_longest_line(feed: Feeder) -> None:
    line = b"PROXY TCP6 " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
    assert len(line) == 104
    assert parse(feed, line).source == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:f::f ffff:f::f 65535 65535\r\n",
        # PP 2.1: "the receiver must ignore anything presented before the CRLF"; 107 bytes.
        b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n",
    ],
)
def test_v1_unknown_keeps_the_real_endpoints(feed: Feeder, line: bytes) -> None:
    header = parse(feed, line)
    assert header.version == 1
    assert header.command is ProxyCommand.PROXY
    assert header.family is ProxyFamily.UNSPEC
    assert header.source is None
    assert header.destination is None


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "no CRLF in the first 107"),
        (b"PROXY TCP4 " + b"1" * 200, "no CRLF in the first 107"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "LF, not CRLF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\r\n", "CR without LF"),
        (b"PROXY TCP4 1.2.3.4\r 5.6.7.8 1 2\r\n", "CR without LF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 080\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 0x10 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 123456 2\r\n", "bad port"),
        (b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", "bad INET address"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad INET address"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad INET address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad INET6 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad INET6 address"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "5 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "5 fields"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown version 1 protocol"),
        (b"PROXY \r\n", "5 fields"),
        (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
        (b"EHLO client.example\r\n", "not a PROXY protocol header"),
        (b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
    ],
)
def test_v1_refused(line: bytes, reason: str) -> None:
    assert reason in refuse(line)


def test_v1_too_long_is_refused_at_byte_107() -> None:
    reader = ProxyHeaderReader()
    reader.feed(b"PROXY UNKNOWN " + b"x" * 92)  # 106 bytes: a CRLF may still come
    with pytest.raises(ProxyProtocolError):
        reader.feed(b"x")


def test_not_a_header_is_refused_at_the_first_byte() -> None:
    # PP 2.1: "abort the connection as soon as possible".
    for first in (b"E", b"\x16", b"G", b"\r\n\r\n\x01"):
        with pytest.raises(ProxyProtocolError):
            ProxyHeaderReader().feed(first)


# --- version 2 (PP 2.2) ----------------------------------------------------------------------


def test_v2_ipv4(feed: Feeder) -> None:
    header = parse(feed, v2(inet4("203.0.113.9", "192.0.2.1", 40001, 25)))
    assert header == ProxyHeader(
        2,
        ProxyCommand.PROXY,
        ProxyFamily.INET,
        ProxyTransport.STREAM,
        ("203.0.113.9", 40001),
        ("192.0.2.1", 25),
        length=28,
    )


def test_the_header_keeps_its_raw_bytes(feed: Feeder) -> None:
    v1_line = b"PROXY TCP4 192.0.2.7 192.0.2.1 40001 25\r\n"
    assert parse(feed, v1_line).raw == v1_line
    v2_header = v2(inet4("203.0.113.9", "192.0.2.1", 40001, 25))
    assert parse(feed, v2_header).raw == v2_header


def test_v2_ipv6_udp(feed: Feeder) -> None:
    header = parse(feed, v2(inet6("2001:db8::7", "2001:db8::25", 5555, 25), family=0x22))
    assert (header.family, header.transport) == (ProxyFamily.INET6, ProxyTransport.DGRAM)
    assert header.source == ("2001:db8::7", 5555)
    assert header.destination == ("2001:db8::25", 25)


def test_v2_unix(feed: Feeder) -> None:
    header = parse(feed, v2(unix(b"/run/client.sock", b"\0abstract"), family=0x31))
    assert header.family is ProxyFamily.UNIX
    assert header.source == "/run/client.sock"
    assert header.destination == "\0abstract"  # Linux's abstract namespace


def test_v2_local_keeps_the_real_endpoints(feed: Feeder) -> None:
    # PP 2.2: LOCAL discards the protocol block "including the family", whatever it holds,
    # but its length is skipped all the same.
    header = parse(feed, v2(b"\xff" * 20, command=0x0, family=0x77))
    assert header.command is ProxyCommand.LOCAL
    assert header.family is ProxyFamily.UNSPEC
    assert header.source is None
    assert header.tlvs == ()


def test_v2_local_empty(feed: Feeder) -> None:
    header = parse(feed, v2(command=0x0, family=0x00))
    assert (header.command, header.length) == (ProxyCommand.LOCAL, 16)


def test_v2_unspec_family_is_ignored(feed: Feeder) -> None:
    header = parse(feed, v2(b"anything", family=0x00))
    assert header.command is ProxyCommand.PROXY
    assert header.source is None


def test_v2_tlvs(feed: Feeder) -> None:
    ssl_value = (
        bytes([PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN])
        + struct.pack("!I", 0)
        + tlv(PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3")
        + tlv(PP2_SUBTYPE_SSL_CN, b"client.example")
        + tlv(PP2_SUBTYPE_SSL_CIPHER, b"TLS_AES_256_GCM_SHA384")
    )
    tlvs = (
        tlv(PP2_TYPE_ALPN, b"smtp")
        + tlv(PP2_TYPE_AUTHORITY, "mx.exämple.org".encode())
        + tlv(PP2_TYPE_NOOP, b"")
        + tlv(PP2_TYPE_UNIQUE_ID, b"u" * 128)
        + tlv(PP2_TYPE_SSL, ssl_value)
        + tlv(PP2_TYPE_NETNS, b"blue")
        + tlv(0xE0, b"\x00custom")
    )
    header = parse(feed, v2(inet4("198.51.100.1", "192.0.2.1", 1, 25), tlvs))
    assert header.alpn == b"smtp"
    assert header.authority == "mx.exämple.org"
    assert header.unique_id == b"u" * 128
    assert header.netns == "blue"
    assert header.crc32c is None
    assert header.tlv(0xE0) == b"\x00custom"
    assert header.tlv(0xE1) is None
    assert [each.type for each in header.tlvs] == [0x01, 0x02, 0x04, 0x05, 0x20, 0x30, 0xE0]
    assert header.tlvs[2] == Tlv(PP2_TYPE_NOOP, b"")
    ssl_info = header.ssl
    assert ssl_info is not None
    assert ssl_info.tls
    assert ssl_info.client_certificate
    assert ssl_info.verified
    assert ssl_info.version == "TLSv1.3"
    assert ssl_info.cn == "client.example"
    assert ssl_info.cipher == "TLS_AES_256_GCM_SHA384"
    assert ssl_info.sig_alg is None
    assert ssl_info.key_alg is None


def test_v2_crc32c_right(feed: Feeder) -> None:
    data = v2(inet4("198.51.100.1", "192.0.2.1", 1, 25), tlv(PP2_TYPE_ALPN, b"x"), with_crc=True)
    header = parse(feed, data)
    assert header.crc32c == struct.unpack("!I", data[-4:])[0]


# Offsets in the 35-byte header: 16-27 the address block, 28-30 the TLV's type and length,
# 31-34 the checksum itself.
@pytest.mark.parametrize(("offset", "bit"), [(16, 0), (19, 7), (27, 3), (31, 0), (34, 7)])
def test_v2_crc32c_wrong(offset: int, bit: int) -> None:
    data = bytearray(v2(inet4("198.51.100.1", "192.0.2.1", 1, 25), with_crc=True))
    data[offset] ^= 1 << bit
    assert "CRC32C mismatch" in refuse(bytes(data))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (V2_SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x00", "not a PROXY protocol header"),
        (b"\r\n\r\n\x01", "not a PROXY protocol header"),
        (v2(version=0x1), "unsupported PROXY protocol version 1"),
        (v2(version=0x3), "unsupported PROXY protocol version 3"),
        (v2(command=0x2), "unknown version 2 command 2"),
        (v2(inet4("1.2.3.4", "5.6.7.8", 1, 2), family=0x13), "family/transport 0x13"),
        (v2(inet4("1.2.3.4", "5.6.7.8", 1, 2), family=0x41), "family/transport 0x41"),
        (v2(inet4("1.2.3.4", "5.6.7.8", 1, 2), family=0x10), "family/transport 0x10"),
        (v2(inet4("1.2.3.4", "5.6.7.8", 1, 2)[:11]), "address block too short for INET"),
        (v2(inet4("1.2.3.4", "5.6.7.8", 1, 2), family=0x21), "address block too short for INET6"),
        (v2(inet4("1.2.3.4", "5.6.7.8", 1, 2) + b"\x01\x00"), "truncated TLV"),
        (v2(inet4("1.2.3.4", "5.6.7.8", 1, 2) + b"\x01\x00\x05abc"), "longer than the header"),
        (v2(inet4("1.2.3.4", "5.6.7.8", 1, 2), tlv(PP2_TYPE_CRC32C, b"abc")), "bad CRC32C"),
        (
            v2(inet4("1.2.3.4", "5.6.7.8", 1, 2), tlv(PP2_TYPE_UNIQUE_ID, b"u" * 129)),
            "UNIQUE_ID",
        ),
        (v2(inet4("1.2.3.4", "5.6.7.8", 1, 2), tlv(PP2_TYPE_SSL, b"\x01\x00\x00")), "bad SSL"),
        (
            v2(inet4("1.2.3.4", "5.6.7.8", 1, 2), tlv(PP2_TYPE_SSL, bytes(5) + b"\x21\x00\x09x")),
            "longer than the header",
        ),
    ],
)
def test_v2_refused(data: bytes, reason: str) -> None:
    assert reason in refuse(data)


def test_v2_truncated_waits() -> None:
    data = v2(inet4("198.51.100.1", "192.0.2.1", 1, 25), tlv(PP2_TYPE_ALPN, b"smtp"))
    for cut in range(len(data)):
        reader = ProxyHeaderReader()
        assert reader.feed(data[:cut]) is None
        if cut >= 16:  # the length field is known: exactly the rest
            assert reader.needed == len(data) - cut
        else:
            assert 1 <= reader.needed <= 16 - cut


def test_v2_too_long_is_refused_from_its_length_field() -> None:
    reader = ProxyHeaderReader(max_length=256)
    with pytest.raises(ProxyProtocolError, match="too long"):
        reader.feed(V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 241))
    assert ProxyHeaderReader(max_length=256).feed(v2(b"\x00" * 240, family=0x00)) is not None


def test_reader_after_the_end() -> None:
    reader = ProxyHeaderReader()
    header = reader.feed(b"PROXY UNKNOWN\r\nab")
    assert header is not None
    assert reader.feed(b"cd") is header
    assert reader.trailing == b"abcd"
    assert reader.needed == 0


def test_reader_after_an_error() -> None:
    reader = ProxyHeaderReader()
    with pytest.raises(ProxyProtocolError):
        reader.feed(b"HELO")
    with pytest.raises(ProxyProtocolError):
        reader.feed(b"PROXY UNKNOWN\r\n")
    assert reader.needed == 0
    assert reader.header is None


VALID_HEADERS = [
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n",
    b"PROXY UNKNOWN\r\n",
    v2(inet4("198.51.100.1", "192.0.2.1", 1, 25), tlv(PP2_TYPE_ALPN, b"x"), with_crc=True),
    v2(inet6("2001:db8::7", "2001:db8::25", 5555, 25), family=0x21),
    v2(unix(b"/run/a", b"/run/b"), family=0x31),
    v2(command=0x0, family=0x00),
]


@settings(deadline=None)  # no timing assertions: a loaded machine is slow
@given(
    data=st.sampled_from(VALID_HEADERS),
    trailing=st.binary(max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_any_split_gives_the_same_header(data: bytes, trailing: bytes, cuts: list[int]) -> None:
    expected, _ = feed_whole(data)
    stream = data + trailing
    points = sorted({0, len(stream), *(cut for cut in cuts if cut < len(stream))})
    reader = ProxyHeaderReader()
    for start, end in itertools.pairwise(points):
        reader.feed(stream[start:end])
    assert reader.header == expected
    assert reader.trailing == trailing


@settings(deadline=None)  # no timing assertions: a loaded machine is slow
@given(st.binary(max_size=300))
def test_random_bytes_are_refused_or_parsed_never_crash(data: bytes) -> None:
    reader = ProxyHeaderReader()
    try:
        reader.feed(data)
    except ProxyProtocolError:
        return
    assert reader.needed >= 0


@settings(deadline=None)  # no timing assertions: a loaded machine is slow
@given(
    st.sampled_from([b"PROXY ", V2_SIGNATURE + b"\x21\x11\x00\x0c"]),
    st.binary(max_size=200),
)
def test_random_after_a_valid_start(start: bytes, rest: bytes) -> None:
    reader = ProxyHeaderReader()
    try:
        header = reader.feed(start + rest)
    except ProxyProtocolError:
        return
    assert header is None or header.length <= len(start + rest)


def test_address_in_networks() -> None:
    networks = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert address_in_networks("127.0.0.1", networks)
    assert address_in_networks("::1", networks)
    assert address_in_networks("::ffff:127.0.0.2", networks)  # dual-stack socket, IPv4 peer
    assert not address_in_networks("192.0.2.1", networks)
    assert not address_in_networks("not an address", networks)


# --- the server, over real sockets ------------------------------------------------------------


class Seen:
    """What the server's sessions saw: sessions as they start, messages as they arrive."""

    def __init__(self) -> None:
        self.sessions: list[Any] = []
        self.messages: list[Any] = []
        self.message = asyncio.Event()

    def on_session(self, session: Any) -> None:
        self.sessions.append(session)

        def received(sender: Any, e: Any) -> None:
            self.messages.append((sender, e))
            self.message.set()

        session.message_received += received


@pytest.fixture
async def proxied() -> AsyncIterator[Callable[..., Any]]:
    """Start servers with proxy_protocol on 127.0.0.1:0; every one is stopped and leak-checked."""
    servers: list[SmtpServer] = []

    async def start(**options: Any) -> tuple[SmtpServer, Seen]:
        seen = Seen()
        options.setdefault("hostname", "mx.test")
        server = SmtpServer(
            "127.0.0.1", 0, on_session=seen.on_session, proxy_protocol=True, **options
        )
        await server.start()
        servers.append(server)
        return server, seen

    yield start
    for server in servers:
        await server.stop(grace=5)
        assert not server._receivers
        command_pool, data_pool = server.buffer_pools
        assert command_pool.in_use == 0
        assert data_pool.in_use == 0


async def read_reply(reader: asyncio.StreamReader) -> str:
    """One SMTP reply (all its lines), or "" at EOF."""
    lines = []
    for _ in range(100):  # bounded: no reply here has 100 lines
        line = (await asyncio.wait_for(reader.readline(), 10)).decode()
        if not line:
            break
        lines.append(line)
        if line[3:4] != "-":
            break
    return "".join(lines)


async def send_message(
    port: int, header: bytes, *, pipelined: bool = False
) -> tuple[str, tuple[str, int]]:
    """Header, then one message; returns the greeting and the client socket's address."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        local = writer.get_extra_info("sockname")
        ehlo = b"EHLO client.example\r\n"
        writer.write(header + ehlo if pipelined else header)
        greeting = await read_reply(reader)
        if not pipelined:
            writer.write(ehlo)
        assert (await read_reply(reader)).startswith("250")
        for command, code in [
            (b"MAIL FROM:<a@client.example>\r\n", "250"),
            (b"RCPT TO:<b@mx.test>\r\n", "250"),
            (b"DATA\r\n", "354"),
            (b"Subject: hi\r\n\r\nproxied\r\n.\r\n", "250"),
            (b"QUIT\r\n", "221"),
        ]:
            writer.write(command)
            assert (await read_reply(reader)).startswith(code)
        return greeting, (local[0], local[1])
    finally:
        writer.close()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """What arrives before the server closes. A close with bytes of ours still unread in the
    server's socket is a reset (RFC 1122 4.2.2.13), not a FIN: both end it."""
    try:
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b""


async def refused_without_greeting(port: int, data: bytes = b"") -> bytes:
    """Connect, send ``data``; what the server sends before it closes (expected: nothing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if data:
            writer.write(data)
        return await read_until_closed(reader)
    finally:
        writer.close()


async def test_v1_header_gives_the_session_the_original_client(proxied: Any) -> None:
    server, seen = await proxied()
    greeting, _ = await send_message(server.port, b"PROXY TCP4 203.0.113.9 192.0.2.25 40001 25\r\n")
    assert greeting.startswith("220 mx.test")
    await asyncio.wait_for(seen.message.wait(), 10)
    session, e = seen.messages[0]
    assert e.envelope.peer == ("203.0.113.9", 40001)
    assert session.peer == ("203.0.113.9", 40001)
    assert session.proxy.version == 1
    assert session.proxy.destination == ("192.0.2.25", 25)


async def test_v2_header_with_tlvs_and_crc(proxied: Any) -> None:
    server, seen = await proxied()
    header = v2(
        inet6("2001:db8::7", "2001:db8::25", 5555, 25),
        tlv(PP2_TYPE_AUTHORITY, b"mx.example.org") + tlv(PP2_TYPE_UNIQUE_ID, b"conn-42"),
        family=0x21,
        with_crc=True,
    )
    await send_message(server.port, header)
    await asyncio.wait_for(seen.message.wait(), 10)
    session, e = seen.messages[0]
    assert e.envelope.peer == ("2001:db8::7", 5555)
    assert session.proxy.authority == "mx.example.org"
    assert session.proxy.unique_id == b"conn-42"
    assert session.proxy.crc32c is not None


async def test_bytes_after_the_header_wait_for_the_greeting(proxied: Any) -> None:
    # The header and a command in one segment: the command is not read with the header, so
    # the session answers it after its greeting, as it would without a proxy (RFC 5321 3.1).
    server, seen = await proxied()
    greeting, _ = await send_message(
        server.port, v2(inet4("198.51.100.7", "192.0.2.25", 2525, 25)), pipelined=True
    )
    assert greeting.startswith("220 ")
    await asyncio.wait_for(seen.message.wait(), 10)
    assert seen.messages[0][1].envelope.peer == ("198.51.100.7", 2525)


async def test_local_command_keeps_the_real_peer(proxied: Any) -> None:
    server, seen = await proxied()
    _, local = await send_message(server.port, v2(command=0x0, family=0x00))
    await asyncio.wait_for(seen.message.wait(), 10)
    session, e = seen.messages[0]
    assert e.envelope.peer == local  # the socket's own peer: this client
    assert session.proxy.command is ProxyCommand.LOCAL


async def test_v1_unknown_keeps_the_real_peer(proxied: Any) -> None:
    server, seen = await proxied()
    _, local = await send_message(server.port, b"PROXY UNKNOWN\r\n")
    await asyncio.wait_for(seen.message.wait(), 10)
    assert seen.messages[0][1].envelope.peer == local


async def test_untrusted_peer_is_closed_without_greeting(
    proxied: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server, seen = await proxied(proxy_trusted_networks=("192.0.2.0/24",))
    with caplog.at_level(logging.INFO, "alephsmtp.proxy"):
        answer = await refused_without_greeting(
            server.port, b"PROXY TCP4 203.0.113.9 192.0.2.25 40001 25\r\n"
        )
    assert answer == b""
    assert seen.sessions == []
    assert any("not a trusted proxy" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "alephsmtp.proxy")


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client.example\r\n",
        b"PROXY TCP4 203.0.113.9 192.0.2.25 40001 99999\r\n",
        v2(inet4("1.2.3.4", "5.6.7.8", 1, 2), with_crc=True)[:-1] + b"\x00",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    ],
    ids=["smtp", "bad-port", "bad-crc", "tls"],
)
async def test_malformed_header_is_closed_without_greeting(
    proxied: Any, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    server, seen = await proxied()
    with caplog.at_level(logging.INFO, "alephsmtp.proxy"):
        assert await refused_without_greeting(server.port, data) == b""
    assert seen.sessions == []
    assert any("bad PROXY protocol header" in r.getMessage() for r in caplog.records)


async def test_no_header_in_time_is_closed_without_greeting(
    proxied: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server, seen = await proxied(proxy_header_timeout=0.2)
    with caplog.at_level(logging.INFO, "alephsmtp.proxy"):
        # Half a header, then silence.
        assert await refused_without_greeting(server.port, b"PROXY TCP4 203.0") == b""
    assert seen.sessions == []
    assert any("no PROXY header within" in r.getMessage() for r in caplog.records)


async def test_connection_limit_counts_the_original_address(proxied: Any) -> None:
    server, _ = await proxied(max_connections_per_ip=1, connection_limit_exempt=())
    connections = []
    try:
        for source, expected in [
            ("198.51.100.1", "220 "),
            ("198.51.100.1", "421 4.7.0"),  # a second from the same client
            ("198.51.100.2", "220 "),  # the same proxy, another client
        ]:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            connections.append(writer)
            writer.write(f"PROXY TCP4 {source} 192.0.2.25 1000 25\r\n".encode())
            assert (await read_reply(reader)).startswith(expected)
    finally:
        for writer in connections:
            writer.close()


async def test_stop_closes_connections_waiting_for_a_header(proxied: Any) -> None:
    server, _ = await proxied()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"PROXY ")
        await writer.drain()
        for _ in range(1000):  # bounded: until the server has accepted it
            if server._receivers:
                break
            await asyncio.sleep(0.01)
        assert server._receivers
        await server.stop(grace=5)
        assert await read_until_closed(reader) == b""
        assert not server._receivers
    finally:
        writer.close()


def test_one_trusted_network_as_a_string() -> None:
    server = SmtpServer("127.0.0.1", 0, proxy_protocol=True, proxy_trusted_networks="10.0.0.0/8")
    assert server.proxy_trusted_networks == (ipaddress.ip_network("10.0.0.0/8"),)


def test_server_options_are_checked() -> None:
    with pytest.raises(ValueError, match="proxy_header_timeout"):
        SmtpServer("127.0.0.1", 0, proxy_protocol=True, proxy_header_timeout=0)
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 network"):
        SmtpServer("127.0.0.1", 0, proxy_protocol=True, proxy_trusted_networks=("nope",))


# --- implicit TLS behind the header (PROXY first, then TLS, as HAProxy sends them) -------------


class TlsClient:
    """A blocking TLS client over ``ssl.MemoryBIO``, so that the bytes before TLS and the
    ClientHello leave in one segment, as HAProxy forwards them after its header."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def handshake(self, first: bytes) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        self.sock.sendall(first + self.outgoing.read())  # header + ClientHello, together
        for _ in range(100):  # bounded: a handshake is a few flights
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._send()
                self._receive()
            else:
                self._send()
                return
        pytest.fail("TLS handshake did not finish")

    def write(self, data: bytes) -> None:
        self.tls.write(data)
        self._send()

    def readline(self) -> str:
        line = bytearray()
        for _ in range(100_000):  # bounded: no reply line is that long
            try:
                line += self.tls.read(1)
            except ssl.SSLWantReadError:
                self._receive()
                continue
            if line.endswith(b"\n"):
                break
        return line.decode()

    def reply(self) -> str:
        lines = [self.readline()]
        for _ in range(50):  # bounded: the EHLO reply's lines
            if lines[-1][3:4] != "-":
                break
            lines.append(self.readline())
        return "".join(lines)

    def _send(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionResetError("closed by the server")
        self.incoming.write(data)


def tls_exchange(port: int, header: bytes, context: ssl.SSLContext) -> tuple[str, str]:
    """The header in clear, TLS right behind it; the greeting and the EHLO reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        client = TlsClient(raw, context)
        client.handshake(header)
        greeting = client.reply()
        client.write(b"EHLO client.example\r\n")
        ehlo = client.reply()
        client.write(b"QUIT\r\n")
        client.reply()
        return greeting, ehlo


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for "localhost" from a throwaway CA."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return server_context, client_context


async def test_implicit_tls_after_the_header(
    proxied: Any, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_context, client_context = tls_contexts
    server, seen = await proxied(tls_context=server_context, implicit_tls=True)
    greeting, ehlo = await asyncio.to_thread(
        tls_exchange,
        server.port,
        b"PROXY TCP6 2001:db8::9 2001:db8::25 465 465\r\n",
        client_context,
    )
    assert greeting.startswith("220 ")
    assert ehlo.startswith("250")
    session = seen.sessions[0]
    assert session.peer == ("2001:db8::9", 465)
    assert session.tls is not None
    assert session.tls.version is not None


# --- uvloop: the hand-over works on its transports too ------------------------------------------


def test_proxied_sessions_on_uvloop(tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    uvloop = pytest.importorskip("uvloop")
    server_context, client_context = tls_contexts

    async def main() -> tuple[type, Any, Any]:
        plain, tls = Seen(), Seen()
        options: dict[str, Any] = {"proxy_protocol": True, "hostname": "mx.test"}
        async with (
            SmtpServer("127.0.0.1", 0, on_session=plain.on_session, **options) as server,
            SmtpServer(
                "127.0.0.1",
                0,
                on_session=tls.on_session,
                tls_context=server_context,
                implicit_tls=True,
                **options,
            ) as tls_server,
        ):
            # Header and first command in one segment: the session reads the command itself.
            await send_message(
                server.port, b"PROXY TCP4 203.0.113.50 192.0.2.25 6000 25\r\n", pipelined=True
            )
            await asyncio.wait_for(plain.message.wait(), 10)
            greeting, _ = await asyncio.to_thread(
                tls_exchange,
                tls_server.port,
                v2(inet4("203.0.113.51", "192.0.2.25", 6001, 465)),
                client_context,
            )
            assert greeting.startswith("220 ")
            return (
                type(asyncio.get_running_loop()),
                plain.messages[0][1].envelope.peer,
                tls.sessions[0].peer,
            )

    loop_type, plain_peer, tls_peer = uvloop.run(main())
    assert loop_type.__module__.startswith("uvloop")
    assert plain_peer == ("203.0.113.50", 6000)
    assert tls_peer == ("203.0.113.51", 6001)
