"""The PROXY protocol, versions 1 and 2: the client's address, from the load balancer in front.

A TCP load balancer (HAProxy, nginx ``stream``, AWS NLB) that relays SMTP connections hides the
client: every connection seems to come from the balancer. With the PROXY protocol (HAProxy's
specification "The PROXY protocol", 2020/03/05, cited below as "PP 2.1" etc.) the balancer
sends one header first, before any SMTP byte, naming the original source and destination.

[`ProxyHeaderReader`][alephsmtp.proxy.ProxyHeaderReader] is the sans-I/O parser: feed it bytes, it
answers ``None`` (more needed) or a [`ProxyHeader`][alephsmtp.proxy.ProxyHeader], or raises
[`ProxyProtocolError`][alephsmtp.proxy.ProxyProtocolError]; version 1 (text) and version 2 (binary,
with TLVs) are told apart by their first byte. Limits hold while parsing.
[`ProxyHeaderReader.needed`][alephsmtp.proxy.ProxyHeaderReader.needed] says how many bytes may be
read without reading past the header, so a server can read exactly the header and leave what follows
in the socket.

[`ProxyProtocolReceiver`][alephsmtp.proxy.ProxyProtocolReceiver] is the asyncio side: the protocol a
server's transport starts with. It checks that the peer is a trusted proxy, reads exactly the header
within a timeout (optionally runs the TLS handshake that follows it), then hands the transport to
the protocol that ``make_protocol(header)`` builds (``transport.set_protocol`` and
``connection_made``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from .metrics import Metrics
from .tls import HANDSHAKE_ERRORS, describe, upgrade
from .tls import where as _where

__all__ = [
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_KEY_ALG",
    "PP2_SUBTYPE_SSL_SIG_ALG",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "Network",
    "ProxyAddress",
    "ProxyCommand",
    "ProxyFamily",
    "ProxyHeader",
    "ProxyHeaderReader",
    "ProxyProtocolError",
    "ProxyProtocolReceiver",
    "ProxyTransport",
    "SslInfo",
    "Tlv",
    "address_in_networks",
    "crc32c",
]

log = logging.getLogger("alephsmtp.proxy")

# PP 2.2: the TLV types and the SSL sub-types registered by the specification.
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30
# PP 2.2.6: the bits of the SSL TLV's <client> field.
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # PP 2.1: the worst case, "PROXY UNKNOWN <ipv6> <ipv6> 65535 65535\r\n"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # PP 2.2: the 12 bytes that open a version 2 header
_V2_FIXED = 16  # PP 2.2: signature, version/command, family/transport, length
_V2_UNIQUE_ID_MAX = 128  # PP 2.2.5
_V2_SSL_FIXED = 5  # PP 2.2.6: <client> (1 byte) and <verify> (4 bytes) before the sub-TLVs
# The shortest possible headers, so that a server never reads past one (see ``needed``):
# "PROXY UNKNOWN\r\n"; "PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n"; "PROXY TCP6 :: :: 0 0\r\n".
_V1_SHORTEST = 15
_V1_SHORTEST_BY_PROTOCOL = {b"TCP4 ": 32, b"TCP6 ": 22}
_V1_PROTOCOL_END = len(V1_PREFIX) + 5  # "PROXY " and "TCP4 "
_CR, _LF = 0x0D, 0x0A

# Up to 4 KiB by default: a header carries addresses (at most 232 bytes with the fixed part)
# and a few TLVs; PP 2.2's 16-bit length would otherwise let a peer make us buffer 64 KiB.
DEFAULT_MAX_LENGTH = 4096

ProxyAddress = tuple[str, int] | str | None
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header (PP 2.1, 2.2): drop the connection."""


class ProxyCommand(enum.IntEnum):
    """PP 2.2, the low 4 bits of the 13th byte (version 1 headers are always PROXY)."""

    LOCAL = 0x0  # the balancer's own connection (a health check): the real peer stands
    PROXY = 0x1  # relayed: the header names the original endpoints


class ProxyFamily(enum.IntEnum):
    """PP 2.2, the high 4 bits of the 14th byte (version 1: TCP4, TCP6, UNKNOWN)."""

    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class ProxyTransport(enum.IntEnum):
    """PP 2.2, the low 4 bits of the 14th byte."""

    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


# PP 2.2: the only family/transport bytes a sender may emit; anything else is rejected.
_V2_FAMILIES = frozenset({0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32})
_V2_ADDRESS_LENGTH = {
    ProxyFamily.UNSPEC: 0,
    ProxyFamily.INET: 2 * 4 + 2 * 2,
    ProxyFamily.INET6: 2 * 16 + 2 * 2,
    ProxyFamily.UNIX: 2 * 108,
}


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):  # the reflected Castagnoli polynomial, RFC 4960 Appendix B
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C (Castagnoli) of ``data``, as RFC 4960 Appendix B (and PP 2.2.3) define it.

    Table-driven, a byte at a time: headers are small. ``crc`` continues an earlier result.
    """
    table = _CRC32C_TABLE
    crc ^= 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Tlv:
    """One PP 2.2 Type-Length-Value vector: ``type`` (0..255) and its raw ``value``."""

    type: int
    value: bytes


def _find(tlvs: Iterable[Tlv], kind: int) -> bytes | None:
    for tlv in tlvs:
        if tlv.type == kind:
            return tlv.value
    return None


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class SslInfo:
    """PP 2.2.6: what the balancer knows of the client's TLS connection to it."""

    client: int  # PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
    verify: int  # 0: the client's certificate (if any) was verified
    tlvs: tuple[Tlv, ...]  # the sub-TLVs, PP2_SUBTYPE_SSL_*

    @property
    def tls(self) -> bool:
        """The client connected over TLS (PP2_CLIENT_SSL)."""
        return bool(self.client & PP2_CLIENT_SSL)

    @property
    def client_certificate(self) -> bool:
        """The client presented a certificate (on this connection or its TLS session)."""
        return bool(self.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS))

    @property
    def verified(self) -> bool:
        """The client presented a certificate and it was verified."""
        return self.client_certificate and self.verify == 0

    @property
    def version(self) -> str | None:
        """The TLS version, e.g. ``"TLSv1.3"`` (PP2_SUBTYPE_SSL_VERSION)."""
        return _text(_find(self.tlvs, PP2_SUBTYPE_SSL_VERSION))

    @property
    def cn(self) -> str | None:
        """The Common Name of the client certificate's subject (PP2_SUBTYPE_SSL_CN)."""
        return _text(_find(self.tlvs, PP2_SUBTYPE_SSL_CN))

    @property
    def cipher(self) -> str | None:
        """The cipher, e.g. ``"ECDHE-RSA-AES128-GCM-SHA256"`` (PP2_SUBTYPE_SSL_CIPHER)."""
        return _text(_find(self.tlvs, PP2_SUBTYPE_SSL_CIPHER))

    @property
    def sig_alg(self) -> str | None:
        """The signature algorithm of the balancer's certificate (PP2_SUBTYPE_SSL_SIG_ALG)."""
        return _text(_find(self.tlvs, PP2_SUBTYPE_SSL_SIG_ALG))

    @property
    def key_alg(self) -> str | None:
        """The key algorithm of the balancer's certificate (PP2_SUBTYPE_SSL_KEY_ALG)."""
        return _text(_find(self.tlvs, PP2_SUBTYPE_SSL_KEY_ALG))


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY protocol header.

    ``source`` is the original client's address — ``(host, port)`` for TCP/UDP, a path for
    UNIX — or ``None`` when the connection's own endpoints stand: a LOCAL command (PP 2.2), a
    version 1 ``UNKNOWN`` line (PP 2.1) or an AF_UNSPEC family. ``tlvs`` are the version 2
    TLVs in their order (PP 2.2); the properties decode the registered ones.
    """

    version: int  # 1 or 2
    command: ProxyCommand
    family: ProxyFamily
    transport: ProxyTransport
    source: ProxyAddress
    destination: ProxyAddress
    tlvs: tuple[Tlv, ...] = ()
    ssl: SslInfo | None = None  # PP2_TYPE_SSL
    length: int = 0  # the header's size on the wire
    raw: bytes = field(default=b"", compare=False)  # the header as received

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of type ``kind``, or ``None``."""
        return _find(self.tlvs, kind)

    @property
    def alpn(self) -> bytes | None:
        """PP2_TYPE_ALPN: the protocol the client negotiated with the balancer (RFC 7301)."""
        return self.tlv(PP2_TYPE_ALPN)

    @property
    def authority(self) -> str | None:
        """PP2_TYPE_AUTHORITY: the host name the client asked for (TLS SNI, RFC 6066 3)."""
        return _text(self.tlv(PP2_TYPE_AUTHORITY))

    @property
    def crc32c(self) -> int | None:
        """PP2_TYPE_CRC32C: the header's checksum (already verified), or ``None``."""
        value = self.tlv(PP2_TYPE_CRC32C)
        return None if value is None else int.from_bytes(value, "big")

    @property
    def unique_id(self) -> bytes | None:
        """PP2_TYPE_UNIQUE_ID: the balancer's identifier of this connection (<= 128 bytes)."""
        return self.tlv(PP2_TYPE_UNIQUE_ID)

    @property
    def netns(self) -> str | None:
        """PP2_TYPE_NETNS: the network namespace the client's connection arrived in."""
        return _text(self.tlv(PP2_TYPE_NETNS))


class ProxyHeaderReader:
    """Incremental parser of one PROXY protocol header, version 1 or 2 (sans I/O).

    ``feed(data)`` returns ``None`` while the header is incomplete, then the
    [`ProxyHeader`][alephsmtp.proxy.ProxyHeader]; what followed it is in
    [`trailing`][alephsmtp.proxy.ProxyHeaderReader.trailing] (later feeds add to it). Malformed
    input raises [`ProxyProtocolError`][alephsmtp.proxy.ProxyProtocolError] as soon as it is seen
    (PP 2.1: "abort the connection as soon as possible"), and so does every later feed. A version 2
    header longer than ``max_length`` bytes is refused when its length field arrives.
    """

    __slots__ = ("_buffer", "_error", "_header", "_max_length", "_scanned", "_trailing")

    def __init__(self, *, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        if max_length < V1_MAX_LENGTH:
            raise ValueError(f"max_length below {V1_MAX_LENGTH}")
        self._max_length = max_length
        self._buffer = bytearray()
        self._scanned = 0  # version 1: bytes already searched for the line end
        self._header: ProxyHeader | None = None
        self._error: ProxyProtocolError | None = None
        self._trailing = b""

    @property
    def header(self) -> ProxyHeader | None:
        """The header, once complete."""
        return self._header

    @property
    def trailing(self) -> bytes:
        """The bytes fed after the end of the header."""
        return self._trailing

    @property
    def needed(self) -> int:
        """How many bytes may be read next without reading past the end of the header.

        Always at least 1 until the header is complete (or refused), then 0. A server that
        reads at most this much leaves whatever follows the header in the socket, for the
        protocol it hands the connection to (TLS, or SMTP's first command).
        """
        if self._header is not None or self._error is not None:
            return 0
        buffer = self._buffer
        have = len(buffer)
        if have and buffer[0] == V2_SIGNATURE[0]:
            if have < _V2_FIXED:
                return _V2_FIXED - have
            return _V2_FIXED + int.from_bytes(buffer[14:16], "big") - have
        shortest = _V1_SHORTEST
        if have >= _V1_PROTOCOL_END:
            shortest = _V1_SHORTEST_BY_PROTOCOL.get(
                bytes(buffer[len(V1_PREFIX) : _V1_PROTOCOL_END]), shortest
            )
        # Only CRLF ends a line: at least 2 more bytes, 1 after a CR.
        return max(shortest - have, 1 if have and buffer[-1] == _CR else 2)

    def feed(self, data: bytes | bytearray | memoryview) -> ProxyHeader | None:
        """Take the next bytes; the header once complete, else ``None``."""
        if self._error is not None:
            raise self._error
        if self._header is not None:
            self._trailing += data
            return self._header
        self._buffer += data
        try:
            # PP 2.2: version 2 opens with CR, version 1 with "PROXY"; either can tell at once.
            parse = self._parse_v2 if self._buffer[:1] == V2_SIGNATURE[:1] else self._parse_v1
            header = parse()
        except ProxyProtocolError as error:
            self._error = error
            self._buffer = bytearray()
            raise
        if header is not None:
            header = dataclasses.replace(header, raw=bytes(self._buffer[: header.length]))
            self._trailing = bytes(self._buffer[header.length :])
            self._buffer = bytearray()
            self._header = header
        return header

    # --- version 1 (PP 2.1) ----------------------------------------------------------------

    def _parse_v1(self) -> ProxyHeader | None:
        buffer = self._buffer
        start = len(V1_PREFIX)
        if buffer[:start] != V1_PREFIX[: len(buffer)]:
            raise ProxyProtocolError("not a PROXY protocol header")
        # Resume one byte back (a CR may have ended the last feed); a CR anywhere earlier was
        # refused then. Only the first 107 bytes may hold the line (PP 2.1).
        limit = min(len(buffer), V1_MAX_LENGTH)
        begin = max(self._scanned - 1, 0)
        self._scanned = limit
        end = buffer.find(b"\n", begin, limit)
        carriage = buffer.find(b"\r", begin, limit if end < 0 else end)
        if end < 0:
            if 0 <= carriage < limit - 1:
                raise ProxyProtocolError("version 1 line has a CR without LF")
            if limit >= V1_MAX_LENGTH:
                raise ProxyProtocolError(f"no CRLF in the first {V1_MAX_LENGTH} bytes")
            return None
        # PP 2.1: "must not tolerate a single CR or LF character to end the line".
        if 0 <= carriage < end - 1:
            raise ProxyProtocolError("version 1 line has a CR without LF")
        if carriage != end - 1:
            raise ProxyProtocolError("version 1 line ends with LF, not CRLF")
        fields = bytes(buffer[start:carriage]).split(b" ")
        length = end + 1
        if fields[0] == b"UNKNOWN":
            # PP 2.1: the receiver must ignore anything before the CRLF and use the real
            # connection's endpoints.
            return ProxyHeader(
                1,
                ProxyCommand.PROXY,
                ProxyFamily.UNSPEC,
                ProxyTransport.UNSPEC,
                None,
                None,
                length=length,
            )
        if len(fields) != 5:
            raise ProxyProtocolError("version 1 line needs 5 fields after PROXY")
        protocol, source, destination, source_port, destination_port = fields
        if protocol == b"TCP4":
            family = ProxyFamily.INET
        elif protocol == b"TCP6":
            family = ProxyFamily.INET6
        else:
            raise ProxyProtocolError(f"unknown version 1 protocol {protocol!r}")
        return ProxyHeader(
            1,
            ProxyCommand.PROXY,
            family,
            ProxyTransport.STREAM,
            (_v1_address(source, family), _v1_port(source_port)),
            (_v1_address(destination, family), _v1_port(destination_port)),
            length=length,
        )

    # --- version 2 (PP 2.2) ----------------------------------------------------------------

    def _parse_v2(self) -> ProxyHeader | None:
        buffer = self._buffer
        if buffer[: len(V2_SIGNATURE)] != V2_SIGNATURE[: len(buffer)]:
            raise ProxyProtocolError("not a PROXY protocol header")
        if len(buffer) < _V2_FIXED:
            return None
        version, command = buffer[12] >> 4, buffer[12] & 0x0F
        if version != 2:
            raise ProxyProtocolError(f"unsupported PROXY protocol version {version}")
        if command not in (ProxyCommand.LOCAL, ProxyCommand.PROXY):
            raise ProxyProtocolError(f"unknown version 2 command {command}")
        length = _V2_FIXED + int.from_bytes(buffer[14:16], "big")
        if length > self._max_length:
            raise ProxyProtocolError(f"version 2 header of {length} bytes is too long")
        if len(buffer) < length:
            return None
        header = bytes(buffer[:length])
        if command == ProxyCommand.LOCAL:
            # PP 2.2: "must use the real connection endpoints and discard the protocol block
            # including the family which is ignored" (length bytes are skipped all the same).
            return ProxyHeader(
                2,
                ProxyCommand.LOCAL,
                ProxyFamily.UNSPEC,
                ProxyTransport.UNSPEC,
                None,
                None,
                length=length,
            )
        if header[13] not in _V2_FAMILIES:
            raise ProxyProtocolError(f"unknown version 2 family/transport 0x{header[13]:02x}")
        family, transport = ProxyFamily(header[13] >> 4), ProxyTransport(header[13] & 0x0F)
        if family == ProxyFamily.UNSPEC:
            # PP 2.2: an unspecified family's block has no known layout; its addresses are
            # ignored and the real endpoints used.
            return ProxyHeader(2, ProxyCommand.PROXY, family, transport, None, None, length=length)
        tlvs_start = _V2_FIXED + _V2_ADDRESS_LENGTH[family]
        if length < tlvs_start:
            raise ProxyProtocolError(f"version 2 address block too short for {family.name}")
        source, destination = _v2_addresses(family, header[_V2_FIXED:tlvs_start])
        tlvs, ssl_info = _v2_tlvs(header, tlvs_start)
        return ProxyHeader(
            2, ProxyCommand.PROXY, family, transport, source, destination, tlvs, ssl_info, length
        )


def _v1_address(text: bytes, family: ProxyFamily) -> str:
    # PP 2.1: canonical forms, no leading zeroes (ipaddress refuses them), and the family
    # the protocol field named; a scope ("%eth0") is not an address.
    try:
        if family == ProxyFamily.INET:
            return str(ipaddress.IPv4Address(text.decode("ascii")))
        if b"%" not in text:
            return str(ipaddress.IPv6Address(text.decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        pass
    raise ProxyProtocolError(f"bad {family.name} address {text!r} in version 1 line")


def _v1_port(text: bytes) -> int:
    # PP 2.1: decimal in [0..65535], no leading zeroes.
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise ProxyProtocolError(f"bad port {text!r} in version 1 line")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"bad port {text!r} in version 1 line")
    return port


def _v2_addresses(family: ProxyFamily, block: bytes) -> tuple[ProxyAddress, ProxyAddress]:
    if family == ProxyFamily.UNIX:
        # PP 2.2: two 108-byte paths, NUL-padded; a leading NUL is Linux's abstract namespace.
        return _unix_path(block[:108]), _unix_path(block[108:])
    size = 4 if family == ProxyFamily.INET else 16
    make = ipaddress.IPv4Address if family == ProxyFamily.INET else ipaddress.IPv6Address
    ports = 2 * size
    return (
        (str(make(block[:size])), int.from_bytes(block[ports : ports + 2], "big")),
        (str(make(block[size:ports])), int.from_bytes(block[ports + 2 : ports + 4], "big")),
    )


def _unix_path(raw: bytes) -> str:
    if raw[:1] == b"\0":
        return "\0" + raw[1:].rstrip(b"\0").decode("utf-8", "surrogateescape")
    return raw.partition(b"\0")[0].decode("utf-8", "surrogateescape")


def _walk_tlvs(data: bytes, start: int) -> list[tuple[int, int, bytes]]:
    """PP 2.2's TLVs in ``data[start:]``: (type, offset of the value, value); exact fit."""
    found = []
    offset, end = start, len(data)
    while offset < end:  # bounded: every round moves at least 3 bytes on
        if end - offset < 3:
            raise ProxyProtocolError("truncated TLV")
        value_start = offset + 3
        value_end = value_start + int.from_bytes(data[offset + 1 : value_start], "big")
        if value_end > end:
            raise ProxyProtocolError(f"TLV 0x{data[offset]:02x} longer than the header")
        found.append((data[offset], value_start, data[value_start:value_end]))
        offset = value_end
    return found


def _v2_tlvs(header: bytes, start: int) -> tuple[tuple[Tlv, ...], SslInfo | None]:
    tlvs: list[Tlv] = []
    ssl_info: SslInfo | None = None
    checksum_at: int | None = None
    for kind, offset, value in _walk_tlvs(header, start):
        if kind == PP2_TYPE_CRC32C:
            if len(value) != 4 or checksum_at is not None:
                raise ProxyProtocolError("bad CRC32C TLV")
            checksum_at = offset
        elif kind == PP2_TYPE_UNIQUE_ID and len(value) > _V2_UNIQUE_ID_MAX:
            raise ProxyProtocolError("UNIQUE_ID TLV longer than 128 bytes")  # PP 2.2.5
        elif kind == PP2_TYPE_SSL:
            if len(value) < _V2_SSL_FIXED or ssl_info is not None:
                raise ProxyProtocolError("bad SSL TLV")
            sub = _walk_tlvs(value, _V2_SSL_FIXED)
            ssl_info = SslInfo(
                value[0],
                int.from_bytes(value[1:_V2_SSL_FIXED], "big"),
                tuple(Tlv(sub_kind, sub_value) for sub_kind, _, sub_value in sub),
            )
        tlvs.append(Tlv(kind, value))
    if checksum_at is not None:
        # PP 2.2.3: the checksum of the whole header with its own 4 bytes zeroed.
        zeroed = bytearray(header)
        zeroed[checksum_at : checksum_at + 4] = bytes(4)
        if crc32c(zeroed) != int.from_bytes(header[checksum_at : checksum_at + 4], "big"):
            raise ProxyProtocolError("CRC32C mismatch")
    return tuple(tlvs), ssl_info


def address_in_networks(host: str, networks: Iterable[Network]) -> bool:
    """Whether ``host`` (an IP address) is in one of ``networks``; IPv4-mapped IPv6 counts as
    the IPv4 address (RFC 4291 2.5.5.2), as a dual-stack socket reports IPv4 clients."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


_READ_SIZE = 256  # a header arrives in one or two reads of this size (PP 2: one segment)


class _Phase(enum.Enum):
    HEADER = "header"
    TLS = "tls"
    DONE = "done"


def _is_unix(transport: asyncio.BaseTransport) -> bool:
    """Whether the connection came over a Unix-domain socket."""
    sock = transport.get_extra_info("socket")
    return sock is not None and getattr(sock, "family", None) == getattr(socket, "AF_UNIX", -1)


class ProxyProtocolReceiver(asyncio.BufferedProtocol):
    """The first protocol of a connection behind a load balancer: reads the PROXY header.

    A peer outside ``trusted_networks`` is closed at once (PP 2: only trusted proxies may speak
    the protocol, or anyone could claim any address); a client of a Unix-domain socket, which
    has no address, was let in by the socket file's permissions. Then exactly the header is read
    — never a byte past it — within ``timeout`` seconds (PP 2: "a short timeout"); a malformed
    header or none in time closes the connection without a word. With ``tls_context`` the TLS
    handshake (RFC 8314 implicit TLS) follows the header. Finally ``make_protocol(header)``
    gives the protocol that takes the transport over; it gets ``connection_made`` and reads
    what follows the header from the socket itself. ``admit()``, asked when the connection
    arrives, may refuse it (the server is full: closed, as nothing can be said before the
    header). ``on_close(receiver)`` is called once, when the connection is handed over,
    refused or gone. ``metrics`` (the server's [`Metrics`][alephsmtp.metrics.Metrics]) counts
    what went wrong: ``proxy_failures`` by reason, failed TLS handshakes, timeouts.
    """

    def __init__(
        self,
        make_protocol: Callable[[ProxyHeader], asyncio.BaseProtocol],
        *,
        trusted_networks: Iterable[Network],
        timeout: float,
        tls_context: ssl.SSLContext | None = None,
        tls_handshake_timeout: float | None = None,
        on_close: Callable[[ProxyProtocolReceiver], None] | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        admit: Callable[[], bool] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._make_protocol = make_protocol
        self._metrics = metrics
        self._trusted = tuple(trusted_networks)
        self._timeout = timeout
        self._tls_context = tls_context
        self._tls_handshake_timeout = tls_handshake_timeout
        self._on_close = on_close
        self._admit = admit
        self._reader = ProxyHeaderReader(max_length=max_length)
        self._view = memoryview(bytearray(_READ_SIZE))
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tls_task: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly
        self._phase = _Phase.HEADER
        self.peer: Any = None  # the balancer's address

    def __repr__(self) -> str:
        return f"<ProxyProtocolReceiver {self.peer!r} {self._phase.value}>"

    def abort(self) -> None:
        """Drop the connection (a server shutting down); nothing is sent."""
        self._metrics = None  # what fails now is the shutdown's doing, not the client's
        if self._transport is not None:
            self._transport.abort()
        self._finish()

    # --- asyncio.BufferedProtocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not derive from asyncio's.
        self._transport = transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")
        host = self.peer[0] if isinstance(self.peer, tuple) else None
        if host is None and _is_unix(transport):
            pass  # no address to judge: the socket file's permissions said who may connect
        elif host is None or not address_in_networks(host, self._trusted):
            log.info("[%s] not a trusted proxy; closed", _where(self.peer))
            self._failed("untrusted")
            self._close()
            return
        if self._admit is not None and not self._admit():
            log.info("[%s] server full; closed before the PROXY header", _where(self.peer))
            self._close()
            return
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._on_timeout)

    def get_buffer(self, sizehint: int) -> memoryview:
        # Never past the header (``needed``), never an empty buffer (asyncio refuses one).
        return self._view[: max(1, min(self._reader.needed, _READ_SIZE))]

    def buffer_updated(self, nbytes: int) -> None:
        if self._phase is not _Phase.HEADER:
            # Application data before our greeting, right after the TLS handshake: the
            # client speaks out of turn (RFC 5321 3.1, 4.3.1), and nothing may take it.
            log.info("[%s] client sent data before the greeting; closed", _where(self.peer))
            self._close()
            return
        try:
            header = self._reader.feed(self._view[:nbytes])
        except ProxyProtocolError as error:
            log.info("[%s] bad PROXY protocol header (%s); closed", _where(self.peer), error)
            self._failed("malformed")
            self._close()
            return
        if header is None:
            return
        assert not self._reader.trailing, "read past the PROXY header"
        log.debug(
            "[%s] PROXY v%d %s for %s",
            _where(self.peer),
            header.version,
            header.command.name,
            _where(header.source),
        )
        self._cancel_timer()
        if self._tls_context is None:
            self._hand_over(header, self._transport)
        else:
            # Nothing more is read until start_tls owns the transport (it resumes reading):
            # uvloop may read again before the task runs, and the ClientHello is TLS's.
            assert self._transport is not None
            self._transport.pause_reading()
            self._phase = _Phase.TLS
            self._tls_task = asyncio.get_running_loop().create_task(self._start_tls(header))

    def eof_received(self) -> bool | None:
        log.debug("[%s] closed before the PROXY header", _where(self.peer))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._phase is _Phase.HEADER:  # gone before a whole header (not closed by us)
            self._failed("closed")
        self._finish()

    # --- internals --------------------------------------------------------------------------

    async def _start_tls(self, header: ProxyHeader) -> None:
        transport, context = self._transport, self._tls_context
        assert transport is not None and context is not None
        try:
            tls_transport = await upgrade(
                transport, self, context, handshake_timeout=self._tls_handshake_timeout
            )
        except HANDSHAKE_ERRORS as error:
            log.info(
                "[%s] TLS handshake failed: %s",
                _where(header.source or self.peer),
                describe(error),
            )
            if self._metrics is not None:
                self._metrics.tls_failed(timeout=isinstance(error, asyncio.TimeoutError))
            self._finish()
            return
        finally:
            self._tls_task = None
        if self._phase is _Phase.DONE:
            # Dropped by a shutdown while the handshake ran.
            tls_transport.abort()
            return
        self._hand_over(header, tls_transport)

    def _hand_over(self, header: ProxyHeader, transport: asyncio.Transport | None) -> None:
        self._finish()
        if transport is None or transport.is_closing():
            return
        protocol = self._make_protocol(header)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def _on_timeout(self) -> None:
        self._timer = None
        log.info("[%s] no PROXY header within %g s; closed", _where(self.peer), self._timeout)
        self._failed("timeout")
        if self._metrics is not None:
            self._metrics.timeouts["proxy"] += 1
        self._close()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._finish()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _failed(self, reason: str) -> None:
        """A connection that gets no session, counted by why (before ``_finish``)."""
        if self._metrics is not None and self._phase is _Phase.HEADER:
            self._metrics.proxy_failures[reason] += 1

    def _finish(self) -> None:
        """The receiver's part is over (handed over, refused, or gone): once."""
        if self._phase is _Phase.DONE:
            return
        self._phase = _Phase.DONE
        self._cancel_timer()
        if self._on_close is not None:
            self._on_close(self)
