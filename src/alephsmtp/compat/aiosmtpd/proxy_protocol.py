"""``aiosmtpd.proxy_protocol``: what ``handle_PROXY`` receives,
[`ProxyData`][alephsmtp.compat.aiosmtpd.proxy_protocol.ProxyData].

The header itself is read by alephsmtp ([`alephsmtp.proxy`][alephsmtp.proxy], versions 1 and 2, TLVs
and CRC32C checked); [`proxy_data()`][alephsmtp.compat.aiosmtpd.proxy_protocol.proxy_data] gives its
result the shape aiosmtpd hooks expect. The enumerations are those of HAProxy's specification ("The
PROXY protocol", section 2.2).
"""

from __future__ import annotations

import enum
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any

from alephsmtp.proxy import ProxyCommand, ProxyHeader

__all__ = [
    "AF",
    "PROTO",
    "V2_CMD",
    "V2_SIGNATURE",
    "MalformedTLV",
    "ProxyData",
    "ProxyTLV",
    "UnknownTypeTLV",
    "proxy_data",
]

log = logging.getLogger("alephsmtp.compat.aiosmtpd")

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # PP 2.2


class V2_CMD(enum.IntEnum):
    """PP 2.2: the command, the low 4 bits of the 13th byte."""

    LOCAL = 0
    PROXY = 1


class AF(enum.IntEnum):
    """PP 2.2: the address family (version 1 ``UNKNOWN`` is ``UNSPEC``)."""

    UNSPEC = 0
    INET = 1
    INET6 = 2
    UNIX = 3


class PROTO(enum.IntEnum):
    """PP 2.2: the transport protocol (version 1 ``UNKNOWN`` is ``UNSPEC``)."""

    UNSPEC = 0
    STREAM = 1
    DGRAM = 2


class MalformedTLV(RuntimeError):
    """A TLV whose length runs past the data."""


class UnknownTypeTLV(KeyError):
    """A TLV of a type the specification does not name (``strict`` parsing only)."""


class ProxyTLV(dict[str, Any]):
    """The version 2 TLVs by name (``tlv["ALPN"]``, or ``tlv.ALPN``; ``None`` if absent).

    The SSL TLV (PP 2.2.6) is flattened: ``SSL`` (it parsed), ``SSL_CLIENT``, ``SSL_VERIFY``
    and its sub-TLVs (``SSL_VERSION``, ``SSL_CN``, ...). Types the specification does not name
    appear as ``"xNN"``. ``tlv_loc`` maps each name to the TLV's offset in the raw bytes.
    """

    __slots__ = ("tlv_loc",)

    PP2_TYPENAME: dict[int, str] = {
        0x01: "ALPN",
        0x02: "AUTHORITY",
        0x03: "CRC32C",
        0x04: "NOOP",
        0x05: "UNIQUE_ID",
        0x20: "SSL",
        0x21: "SSL_VERSION",
        0x22: "SSL_CN",
        0x23: "SSL_CIPHER",
        0x24: "SSL_SIG_ALG",
        0x25: "SSL_KEY_ALG",
        0x30: "NETNS",
    }

    def __init__(self, *args: Any, _tlv_loc: dict[str, int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tlv_loc = _tlv_loc

    def __getattr__(self, name: str) -> Any:
        return self.get(name)

    def same_attribs(self, _raises: bool = False, **expected: Any) -> bool:
        """Whether every ``name=value`` given is present with that value."""
        return _same(self.get, _raises, expected)

    @classmethod
    def parse(
        cls, data: bytes | bytearray, partial_ok: bool = True, strict: bool = False
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """The TLVs in ``data`` by name, and where each starts (PP 2.2: type, 16-bit length,
        value). ``partial_ok`` keeps what parsed before a malformed TLV."""
        found: dict[str, Any] = {}
        where: dict[str, int] = {}
        try:
            cls._walk(bytes(data), 0, found, where, strict)
        except MalformedTLV:
            if not partial_ok:
                raise
        return found, where

    @classmethod
    def _walk(
        cls, data: bytes, base: int, found: dict[str, Any], where: dict[str, int], strict: bool
    ) -> None:
        index = 0
        while index < len(data):
            if index + 3 > len(data):
                raise MalformedTLV("truncated TLV header")
            kind = data[index]
            length = int.from_bytes(data[index + 1 : index + 3], "big")
            value = data[index + 3 : index + 3 + length]
            if len(value) < length:
                raise MalformedTLV(f"TLV 0x{kind:02X} is malformed")
            name = cls.PP2_TYPENAME.get(kind)
            if name is None:
                name = f"x{kind:02X}"
                if strict:
                    raise UnknownTypeTLV(name)
            where[name] = base + index
            if name == "SSL" and len(value) >= 5:
                # PP 2.2.6: <client> (1 byte), <verify> (4 bytes), then sub-TLVs.
                found["SSL_CLIENT"] = value[0]
                found["SSL_VERIFY"] = int.from_bytes(value[1:5], "big")
                try:
                    cls._walk(value[5:], base + index, found, where, strict)
                except MalformedTLV:
                    found["SSL"] = False
                    raise
                found["SSL"] = True
            else:
                found[name] = value
            index += 3 + length

    @classmethod
    def from_raw(cls, raw: bytes | bytearray, strict: bool = False) -> ProxyTLV | None:
        """The TLVs of ``raw``; ``None`` for no bytes; raises
        [`MalformedTLV`][alephsmtp.compat.aiosmtpd.proxy_protocol.MalformedTLV]."""
        if not raw:
            return None
        found, where = cls.parse(raw, partial_ok=False, strict=strict)
        return cls(found, _tlv_loc=where)

    @classmethod
    def name_to_num(cls, name: str) -> int | None:
        """The numeric type of a TLV name, or ``None``."""
        for number, known in cls.PP2_TYPENAME.items():
            if known == name:
                return number
        return None


EndpointAddress = ipaddress.IPv4Address | ipaddress.IPv6Address | str | bytes


@dataclass(slots=True)
class ProxyData:
    """A parsed PROXY header, as aiosmtpd's ``handle_PROXY`` hook receives it.

    ``src_addr``/``dst_addr`` are `ipaddress` objects (a path for AF_UNIX); ``rest`` is what
    followed the addresses (version 2: the raw TLVs, which
    [`tlv`][alephsmtp.compat.aiosmtpd.proxy_protocol.ProxyData.tlv] decodes). ``whole_raw`` stays
    empty: alephsmtp checks the header (CRC32C included) and keeps its fields, not its bytes.
    """

    version: int | None = field(kw_only=True)
    command: V2_CMD | None = None
    family: AF | None = None
    protocol: PROTO | None = None
    src_addr: EndpointAddress | None = None
    dst_addr: EndpointAddress | None = None
    src_port: int | None = None
    dst_port: int | None = None
    rest: bytes = b""
    whole_raw: bytearray = field(default_factory=bytearray)
    tlv_start: int | None = None
    error: str = ""
    _tlv: ProxyTLV | None = None

    @property
    def valid(self) -> bool:
        """Parsed without error into a version and a protocol."""
        return not (self.error or self.version is None or self.protocol is None)

    @property
    def tlv(self) -> ProxyTLV | None:
        """The version 2 TLVs by name, or ``None``."""
        if self._tlv is None:
            try:
                self._tlv = ProxyTLV.from_raw(self.rest)
            except MalformedTLV:
                return None
        return self._tlv

    def with_error(self, error_msg: str, log_prefix: bool = True) -> ProxyData:
        """This object with ``error`` set (and the error logged)."""
        log.warning("PROXY error: %s" if log_prefix else "%s", error_msg)
        self.error = error_msg
        return self

    def same_attribs(self, _raises: bool = False, **expected: Any) -> bool:
        """Whether every attribute ``name=value`` given has that value."""
        return _same(lambda name, default: getattr(self, name, default), _raises, expected)

    def __bool__(self) -> bool:
        return self.valid


_MISSING = object()


def _same(get: Any, raises: bool, expected: dict[str, Any]) -> bool:
    for name, value in expected.items():
        actual = get(name, _MISSING)
        if actual is _MISSING:
            if raises:
                raise KeyError(f"notfound:{name}")
            return False
        if actual != value:
            if raises:
                raise ValueError(f"mismatch:{name} actual={actual!r} expect={value!r}")
            return False
    return True


def _endpoint(address: Any) -> tuple[EndpointAddress | None, int | None]:
    if isinstance(address, tuple):
        return ipaddress.ip_address(address[0]), int(address[1])
    if isinstance(address, str):
        return address, None  # AF_UNIX: a path
    return None, None


def proxy_data(header: ProxyHeader) -> ProxyData:
    """The aiosmtpd view of a header alephsmtp read and checked."""
    data = ProxyData(version=header.version)
    # aiosmtpd names the command only for version 2 (version 1 has none on the wire).
    if header.version == 2:
        data.command = V2_CMD(int(header.command))
    data.family = AF(int(header.family))
    data.protocol = PROTO(int(header.transport))
    if header.command == ProxyCommand.PROXY:
        data.src_addr, data.src_port = _endpoint(header.source)
        data.dst_addr, data.dst_port = _endpoint(header.destination)
    # The header as sent, when alephsmtp keeps it (see NEEDS.md).
    data.whole_raw = bytearray(getattr(header, "raw", b""))
    data.rest = b"".join(
        bytes([tlv.type]) + len(tlv.value).to_bytes(2, "big") + tlv.value for tlv in header.tlvs
    )
    return data
