"""The milter protocol, version 6, without I/O: packets in, packets out.

The protocol is Sendmail's (libmilter, 8.14), written up in draft-adams-milter-protocol and
implemented MTA-side by Postfix's ``milter8.c``. Every packet is a 4-byte length in network
byte order (counting the command byte and the data), a command byte, and the data::

    uint32 len | char cmd | data[len - 1]

Strings in the data end with NUL; numbers are 32-bit (16-bit for the port of ``SMFIC_CONNECT``) in
network byte order. The MTA sends ``SMFIC_*`` commands, the filter answers with ``SMFIR_*``
responses. This module encodes both directions and decodes both directions (the filter side serves
the tests' fake milters), checks the option negotiation, and leaves sockets, timeouts and the
meaning of a verdict to [`client`][alephsmtp.milter.client] and [`chain`][alephsmtp.milter.chain].
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "ALL_ACTIONS",
    "ALL_PROTOCOL",
    "MAX_BODY_CHUNK",
    "MAX_PACKET",
    "NO_REPLY",
    "NO_SEND",
    "PROTOCOL_VERSION",
    "SMFIA_INET",
    "SMFIA_INET6",
    "SMFIA_UNIX",
    "SMFIA_UNKNOWN",
    "SMFIC_ABORT",
    "SMFIC_BODY",
    "SMFIC_BODYEOB",
    "SMFIC_CONNECT",
    "SMFIC_DATA",
    "SMFIC_EOH",
    "SMFIC_HEADER",
    "SMFIC_HELO",
    "SMFIC_MACRO",
    "SMFIC_MAIL",
    "SMFIC_OPTNEG",
    "SMFIC_QUIT",
    "SMFIC_QUIT_NC",
    "SMFIC_RCPT",
    "SMFIC_UNKNOWN",
    "SMFIR_ACCEPT",
    "SMFIR_ADDHEADER",
    "SMFIR_ADDRCPT",
    "SMFIR_ADDRCPT_PAR",
    "SMFIR_CHGFROM",
    "SMFIR_CHGHEADER",
    "SMFIR_CONN_FAIL",
    "SMFIR_CONTINUE",
    "SMFIR_DELRCPT",
    "SMFIR_DISCARD",
    "SMFIR_INSHEADER",
    "SMFIR_PROGRESS",
    "SMFIR_QUARANTINE",
    "SMFIR_REJECT",
    "SMFIR_REPLBODY",
    "SMFIR_REPLYCODE",
    "SMFIR_SETSYMLIST",
    "SMFIR_SHUTDOWN",
    "SMFIR_SKIP",
    "SMFIR_TEMPFAIL",
    "Accept",
    "Action",
    "AddHeader",
    "AddRecipient",
    "ChangeHeader",
    "ChangeSender",
    "Command",
    "ConnectionFailure",
    "Continue",
    "DeleteRecipient",
    "Discard",
    "InsertHeader",
    "MacroStage",
    "Modification",
    "Negotiate",
    "Negotiated",
    "PacketDecoder",
    "Progress",
    "ProtocolError",
    "Quarantine",
    "Reject",
    "ReplaceBody",
    "ReplyCode",
    "Response",
    "Shutdown",
    "Skip",
    "Step",
    "Tempfail",
    "decode_command",
    "decode_response",
    "encode_abort",
    "encode_body",
    "encode_connect",
    "encode_data",
    "encode_end_of_body",
    "encode_end_of_headers",
    "encode_header",
    "encode_helo",
    "encode_macros",
    "encode_mail",
    "encode_negotiate",
    "encode_quit",
    "encode_quit_new_connection",
    "encode_rcpt",
    "encode_response",
    "encode_unknown",
    "negotiate",
    "packet",
]

PROTOCOL_VERSION = 6
# The body goes to the filter in chunks of at most this many bytes: libmilter's buffer
# (MILTER_CHUNK_SIZE), unless the filter negotiated larger ones (SMFIP_MDS_*, not offered).
MAX_BODY_CHUNK = 65535
# Largest packet accepted from a filter. Without SMFIP_MDS_* a libmilter filter sends at most
# 64 KiB of data per packet; rspamd's own implementation uses 64 KiB chunks too.
MAX_PACKET = 1 << 20

# --- commands, MTA to filter (SMFIC_*) ------------------------------------------------------
SMFIC_ABORT = b"A"  # abort the current message
SMFIC_BODY = b"B"  # a body chunk
SMFIC_CONNECT = b"C"  # connection information
SMFIC_MACRO = b"D"  # define macros for the next command
SMFIC_BODYEOB = b"E"  # end of the body (of the message)
SMFIC_HELO = b"H"  # HELO/EHLO
SMFIC_QUIT_NC = b"K"  # QUIT, and a new connection follows on this socket (8.14)
SMFIC_HEADER = b"L"  # one header field
SMFIC_MAIL = b"M"  # MAIL FROM
SMFIC_EOH = b"N"  # end of the header
SMFIC_OPTNEG = b"O"  # option negotiation
SMFIC_QUIT = b"Q"  # QUIT
SMFIC_RCPT = b"R"  # RCPT TO
SMFIC_DATA = b"T"  # DATA (protocol version 4)
SMFIC_UNKNOWN = b"U"  # an unknown SMTP command (protocol version 3)

# --- responses, filter to MTA (SMFIR_*) -----------------------------------------------------
SMFIR_ADDRCPT = b"+"  # add a recipient
SMFIR_DELRCPT = b"-"  # remove a recipient
SMFIR_ADDRCPT_PAR = b"2"  # add a recipient, with ESMTP parameters (8.14)
SMFIR_SHUTDOWN = b"4"  # 421: close the SMTP connection
SMFIR_ACCEPT = b"a"  # accept: no more events for this message (connection at connect/HELO)
SMFIR_REPLBODY = b"b"  # replace the body (a chunk of the new one)
SMFIR_CONTINUE = b"c"  # go on
SMFIR_DISCARD = b"d"  # accept the message and throw it away
SMFIR_CHGFROM = b"e"  # change the envelope sender (8.14)
SMFIR_CONN_FAIL = b"f"  # cause a connection failure
SMFIR_ADDHEADER = b"h"  # append a header field
SMFIR_INSHEADER = b"i"  # insert a header field at an index
SMFIR_SETSYMLIST = b"l"  # macro names for a stage (inside SMFIC_OPTNEG's answer)
SMFIR_CHGHEADER = b"m"  # change (or delete) the n-th header field of a name
SMFIR_PROGRESS = b"p"  # still working: reset the timeout
SMFIR_QUARANTINE = b"q"  # quarantine the message, with a reason
SMFIR_REJECT = b"r"  # reject (5xx)
SMFIR_SKIP = b"s"  # skip further events of this kind (body chunks) (8.14)
SMFIR_TEMPFAIL = b"t"  # temporary failure (4xx)
SMFIR_REPLYCODE = b"y"  # reject or tempfail with this SMTP reply

# --- connection families in SMFIC_CONNECT (SMFIA_*) -----------------------------------------
SMFIA_UNKNOWN = b"U"
SMFIA_UNIX = b"L"
SMFIA_INET = b"4"
SMFIA_INET6 = b"6"


class Action(enum.IntFlag):
    """What a filter may do to a message (``SMFIF_*``), agreed in the negotiation."""

    ADDHDRS = 0x01  # add header fields
    CHGBODY = 0x02  # replace the body
    ADDRCPT = 0x04  # add recipients
    DELRCPT = 0x08  # remove recipients
    CHGHDRS = 0x10  # change or delete header fields
    QUARANTINE = 0x20  # quarantine the message (8.13)
    CHGFROM = 0x40  # change the envelope sender (8.14)
    ADDRCPT_PAR = 0x80  # add recipients with ESMTP parameters (8.14)
    SETSYMLIST = 0x100  # send the macro names it wants per stage (8.14)


class Step(enum.IntFlag):
    """Protocol flags (``SMFIP_*``): steps the filter does not want, replies it will not send,
    and what the MTA can do besides."""

    NOCONNECT = 1 << 0
    NOHELO = 1 << 1
    NOMAIL = 1 << 2
    NORCPT = 1 << 3
    NOBODY = 1 << 4
    NOHDRS = 1 << 5
    NOEOH = 1 << 6
    NR_HDR = 1 << 7  # no reply per header field (SMFIP_NOHREPL in 8.13)
    NOUNKNOWN = 1 << 8
    NODATA = 1 << 9
    SKIP = 1 << 10  # the MTA understands SMFIR_SKIP
    RCPT_REJ = 1 << 11  # the filter wants rejected recipients too
    NR_CONN = 1 << 12
    NR_HELO = 1 << 13
    NR_MAIL = 1 << 14
    NR_RCPT = 1 << 15
    NR_DATA = 1 << 16
    NR_UNKN = 1 << 17
    NR_EOH = 1 << 18
    NR_BODY = 1 << 19
    HDR_LEADSPC = 1 << 20  # header values keep their leading space


class MacroStage(enum.IntEnum):
    """Where a macro list applies (``SMFIM_*``), in the negotiation's macro lists."""

    CONNECT = 0
    HELO = 1
    ENVFROM = 2
    ENVRCPT = 3
    DATA = 4
    EOM = 5
    EOH = 6


ALL_ACTIONS = (
    Action.ADDHDRS
    | Action.CHGBODY
    | Action.ADDRCPT
    | Action.DELRCPT
    | Action.CHGHDRS
    | Action.QUARANTINE
    | Action.CHGFROM
    | Action.ADDRCPT_PAR
    | Action.SETSYMLIST
)
NO_SEND = (
    Step.NOCONNECT
    | Step.NOHELO
    | Step.NOMAIL
    | Step.NORCPT
    | Step.NOBODY
    | Step.NOHDRS
    | Step.NOEOH
    | Step.NOUNKNOWN
    | Step.NODATA
)
NO_REPLY = (
    Step.NR_CONN
    | Step.NR_HELO
    | Step.NR_MAIL
    | Step.NR_RCPT
    | Step.NR_DATA
    | Step.NR_UNKN
    | Step.NR_HDR
    | Step.NR_EOH
    | Step.NR_BODY
)
# What this MTA offers: every step may be left out or go unanswered, SMFIR_SKIP is understood,
# header values may keep their leading space. Not SMFIP_RCPT_REJ: alephsmtp's handlers come
# before the user's, so a recipient the user refuses has already been shown as accepted.
ALL_PROTOCOL = NO_SEND | NO_REPLY | Step.SKIP | Step.HDR_LEADSPC

# The events each older protocol version knows (Postfix's MILTER8_V*_PROTO_MASK): a filter
# that answers the negotiation with an older version never gets the newer events.
_V2_STEPS = (
    Step.NOCONNECT | Step.NOHELO | Step.NOMAIL | Step.NORCPT | Step.NOBODY | Step.NOHDRS
) | Step.NOEOH
_V3_STEPS = _V2_STEPS | Step.NOUNKNOWN
_V4_STEPS = _V3_STEPS | Step.NODATA

_U32 = struct.Struct("!I")
_U32_U32_U32 = struct.Struct("!III")


class ProtocolError(Exception):
    """Bytes that break the milter protocol (framing, a malformed packet, a bad negotiation)."""


# --- encoding -------------------------------------------------------------------------------


def packet(command: bytes, data: bytes = b"") -> bytes:
    """One packet: length (command byte included), command, data."""
    return _U32.pack(len(data) + 1) + command + data


def _cstring(value: str | bytes) -> bytes:
    """A NUL-terminated string. Text is UTF-8 (surrogate escapes give back the bytes they
    stand for); a NUL inside would end the string early, so it is refused."""
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise ValueError("a milter string cannot hold a NUL byte")
    return raw + b"\0"


def encode_negotiate(
    version: int = PROTOCOL_VERSION,
    actions: int = ALL_ACTIONS,
    protocol: int = ALL_PROTOCOL,
    macros: Mapping[MacroStage, Iterable[str]] | None = None,
) -> bytes:
    """``SMFIC_OPTNEG``: version, actions, protocol flags. The filter's answer has the same
    shape, followed by the macro lists it asks for (``macros``, used when encoding it)."""
    data = _U32_U32_U32.pack(version, int(actions), int(protocol))
    if macros:
        data += b"".join(
            _U32.pack(int(stage)) + _cstring(" ".join(names)) for stage, names in macros.items()
        )
    return packet(SMFIC_OPTNEG, data)


def encode_macros(command: bytes, macros: Mapping[str, str] | Iterable[tuple[str, str]]) -> bytes:
    """``SMFIC_MACRO``: the macros for the ``command`` that follows (its command byte), as
    name/value string pairs."""
    items = macros.items() if isinstance(macros, Mapping) else macros
    return packet(
        SMFIC_MACRO, command + b"".join(_cstring(name) + _cstring(value) for name, value in items)
    )


def encode_connect(hostname: str, family: bytes, port: int = 0, address: str = "") -> bytes:
    """``SMFIC_CONNECT``: host name, family (``SMFIA_*``), port, address; the family
    ``SMFIA_UNKNOWN`` carries neither port nor address."""
    data = _cstring(hostname) + family
    if family != SMFIA_UNKNOWN:
        data += struct.pack("!H", port) + _cstring(address)
    return packet(SMFIC_CONNECT, data)


def encode_helo(name: str) -> bytes:
    """``SMFIC_HELO``: the name the client gave in HELO/EHLO."""
    return packet(SMFIC_HELO, _cstring(name))


def encode_mail(arguments: Sequence[str]) -> bytes:
    """``SMFIC_MAIL``: the reverse-path in angle brackets, then each ESMTP parameter."""
    return packet(SMFIC_MAIL, b"".join(_cstring(argument) for argument in arguments))


def encode_rcpt(arguments: Sequence[str]) -> bytes:
    """``SMFIC_RCPT``: the forward-path in angle brackets, then each ESMTP parameter."""
    return packet(SMFIC_RCPT, b"".join(_cstring(argument) for argument in arguments))


def encode_data() -> bytes:
    """``SMFIC_DATA`` (protocol version 4): the client sent DATA (or its first BDAT)."""
    return packet(SMFIC_DATA)


def encode_header(name: str | bytes, value: str | bytes) -> bytes:
    """``SMFIC_HEADER``: name and value of one header field (folded lines joined by LF)."""
    return packet(SMFIC_HEADER, _cstring(name) + _cstring(value))


def encode_end_of_headers() -> bytes:
    """``SMFIC_EOH``."""
    return packet(SMFIC_EOH)


def encode_body(chunk: bytes | bytearray | memoryview) -> bytes:
    """``SMFIC_BODY``: raw body bytes, CRLF line ends, at most `MAX_BODY_CHUNK`."""
    if len(chunk) > MAX_BODY_CHUNK:
        raise ValueError(f"a body chunk holds at most {MAX_BODY_CHUNK} bytes")
    return packet(SMFIC_BODY, bytes(chunk))


def encode_end_of_body() -> bytes:
    """``SMFIC_BODYEOB``: the message is complete; the filter's edits and verdict follow."""
    return packet(SMFIC_BODYEOB)


def encode_abort() -> bytes:
    """``SMFIC_ABORT``: forget the current message (no reply)."""
    return packet(SMFIC_ABORT)


def encode_quit() -> bytes:
    """``SMFIC_QUIT``: the session is over (no reply); the filter closes."""
    return packet(SMFIC_QUIT)


def encode_quit_new_connection() -> bytes:
    """``SMFIC_QUIT_NC``: this SMTP session is over; another one follows on this socket."""
    return packet(SMFIC_QUIT_NC)


def encode_unknown(command_line: str) -> bytes:
    """``SMFIC_UNKNOWN`` (protocol version 3): a command the MTA does not know, as sent."""
    return packet(SMFIC_UNKNOWN, _cstring(command_line))


# --- the filter's responses -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    """Base of every decoded filter response."""


@dataclass(frozen=True, slots=True)
class Continue(Response):
    """``SMFIR_CONTINUE``: go on to the next step."""


@dataclass(frozen=True, slots=True)
class Accept(Response):
    """``SMFIR_ACCEPT``: accept; no more events for this message (for the connection, when
    answered to the connect or HELO event)."""


@dataclass(frozen=True, slots=True)
class Reject(Response):
    """``SMFIR_REJECT``: reject (``550 5.7.1``); at connect/HELO, every later command."""


@dataclass(frozen=True, slots=True)
class Tempfail(Response):
    """``SMFIR_TEMPFAIL``: temporary failure (``451 4.7.1``)."""


@dataclass(frozen=True, slots=True)
class Discard(Response):
    """``SMFIR_DISCARD``: accept the message and silently drop it."""


@dataclass(frozen=True, slots=True)
class Progress(Response):
    """``SMFIR_PROGRESS``: still working; the MTA restarts its timeout and waits."""


@dataclass(frozen=True, slots=True)
class Skip(Response):
    """``SMFIR_SKIP``: no more events of this kind (body chunks) until the next step."""


@dataclass(frozen=True, slots=True)
class Shutdown(Response):
    """``SMFIR_SHUTDOWN``: answer ``421`` and close the SMTP connection."""


@dataclass(frozen=True, slots=True)
class ConnectionFailure(Response):
    """``SMFIR_CONN_FAIL``: the filter wants the connection to fail."""


@dataclass(frozen=True, slots=True)
class ReplyCode(Response):
    """``SMFIR_REPLYCODE``: refuse with this SMTP reply (``"550 5.7.1 text"``, 4xx or 5xx,
    possibly multi-line with CRLF between the lines)."""

    text: str


@dataclass(frozen=True, slots=True)
class Quarantine(Response):
    """``SMFIR_QUARANTINE``: put the message in quarantine, with a reason. Not a verdict: the
    filter's verdict still follows."""

    reason: str


@dataclass(frozen=True, slots=True)
class Modification(Response):
    """Base of the end-of-message edits (valid only as answers to ``SMFIC_BODYEOB``)."""

    action = Action(0)  # the negotiated action that allows it


@dataclass(frozen=True, slots=True)
class AddHeader(Modification):
    """``SMFIR_ADDHEADER``: append a header field (``value``: folded lines joined by LF)."""

    action = Action.ADDHDRS
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class InsertHeader(Modification):
    """``SMFIR_INSHEADER``: insert a header field at ``index`` (0: at the top)."""

    action = Action.ADDHDRS
    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ChangeHeader(Modification):
    """``SMFIR_CHGHEADER``: replace the ``index``-th (from 1) field called ``name``; an empty
    ``value`` deletes it."""

    action = Action.CHGHDRS
    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class AddRecipient(Modification):
    """``SMFIR_ADDRCPT`` (``parameters`` is ``None``) or ``SMFIR_ADDRCPT_PAR``."""

    address: str
    parameters: str | None = None

    @property
    def action(self) -> Action:  # type: ignore[override]
        return Action.ADDRCPT if self.parameters is None else Action.ADDRCPT_PAR


@dataclass(frozen=True, slots=True)
class DeleteRecipient(Modification):
    """``SMFIR_DELRCPT``: remove a recipient (as given to the filter: ``<addr>`` or ``addr``)."""

    action = Action.DELRCPT
    address: str


@dataclass(frozen=True, slots=True)
class ChangeSender(Modification):
    """``SMFIR_CHGFROM``: a new envelope sender, with optional ESMTP parameters."""

    action = Action.CHGFROM
    address: str
    parameters: str | None = None


@dataclass(frozen=True, slots=True)
class ReplaceBody(Modification):
    """``SMFIR_REPLBODY``: a chunk of the new body; the chunks of one answer, joined, are it."""

    action = Action.CHGBODY
    chunk: bytes


@dataclass(frozen=True, slots=True)
class Negotiate(Response):
    """``SMFIC_OPTNEG`` as the filter answers it: its version, the actions it will take, the
    protocol flags it wants, and the macro names it asks for per stage."""

    version: int
    actions: int
    protocol: int
    macros: Mapping[MacroStage, tuple[str, ...]] = field(default_factory=dict)


def _split_strings(data: bytes, count: int | None, what: str) -> list[str]:
    """NUL-terminated strings filling ``data`` exactly (``count`` of them, if given)."""
    if not data.endswith(b"\0"):
        raise ProtocolError(f"{what}: string not NUL-terminated")
    parts = data[:-1].split(b"\0")
    if count is not None and len(parts) != count:
        raise ProtocolError(f"{what}: {len(parts)} strings, expected {count}")
    return [part.decode("utf-8", "surrogateescape") for part in parts]


def _no_data(data: bytes, what: str) -> None:
    if data:
        raise ProtocolError(f"{what} followed by {len(data)} data bytes")


_SIMPLE: dict[bytes, Response] = {
    SMFIR_CONTINUE: Continue(),
    SMFIR_ACCEPT: Accept(),
    SMFIR_REJECT: Reject(),
    SMFIR_TEMPFAIL: Tempfail(),
    SMFIR_DISCARD: Discard(),
    SMFIR_PROGRESS: Progress(),
    SMFIR_SKIP: Skip(),
    SMFIR_SHUTDOWN: Shutdown(),
    SMFIR_CONN_FAIL: ConnectionFailure(),
}


def decode_response(command: bytes, data: bytes) -> Response:
    """A filter's packet (command byte and data) as a
    [`Response`][alephsmtp.milter.protocol.Response]; ``ProtocolError`` for an unknown command or
    data that does not fit it."""
    simple = _SIMPLE.get(command)
    if simple is not None:
        _no_data(data, f"response {command!r}")
        return simple
    if command == SMFIR_REPLYCODE:
        # Postfix reads this one as a raw buffer; libmilter sends it NUL-terminated.
        text = data[:-1] if data.endswith(b"\0") else data
        if b"\0" in text:
            raise ProtocolError("reply code text holds a NUL byte")
        return ReplyCode(text.decode("utf-8", "surrogateescape"))
    if command == SMFIR_QUARANTINE:
        reason = data[:-1] if data.endswith(b"\0") else data
        return Quarantine(reason.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"))
    if command == SMFIR_ADDHEADER:
        name, value = _split_strings(data, 2, "SMFIR_ADDHEADER")
        return AddHeader(name, value)
    if command in (SMFIR_INSHEADER, SMFIR_CHGHEADER):
        if len(data) < 4:
            raise ProtocolError(f"response {command!r}: no index")
        (index,) = _U32.unpack_from(data)
        name, value = _split_strings(data[4:], 2, f"response {command!r}")
        if command == SMFIR_INSHEADER:
            return InsertHeader(index, name, value)
        return ChangeHeader(index, name, value)
    if command == SMFIR_ADDRCPT:
        (address,) = _split_strings(data, 1, "SMFIR_ADDRCPT")
        return AddRecipient(address)
    if command in (SMFIR_ADDRCPT_PAR, SMFIR_CHGFROM):
        # The parameters are optional: one or two strings.
        strings = _split_strings(data, None, f"response {command!r}")
        if len(strings) > 2:
            raise ProtocolError(f"response {command!r}: {len(strings)} strings")
        parameters = strings[1] if len(strings) == 2 else None
        if command == SMFIR_CHGFROM:
            return ChangeSender(strings[0], parameters)
        return AddRecipient(strings[0], parameters if parameters is not None else "")
    if command == SMFIR_DELRCPT:
        (address,) = _split_strings(data, 1, "SMFIR_DELRCPT")
        return DeleteRecipient(address)
    if command == SMFIR_REPLBODY:
        return ReplaceBody(bytes(data))
    if command == SMFIC_OPTNEG:
        return _decode_negotiate(data)
    raise ProtocolError(f"unknown filter response {command!r}")


def _decode_negotiate(data: bytes) -> Negotiate:
    if len(data) < 12:
        raise ProtocolError(f"option negotiation: {len(data)} bytes, at least 12 expected")
    version, actions, protocol = _U32_U32_U32.unpack_from(data)
    macros: dict[MacroStage, tuple[str, ...]] = {}
    rest = data[12:]
    while rest:
        # Secondary negotiation (8.14, SMFIF_SETSYMLIST): uint32 stage, then a string of
        # macro names separated by spaces.
        if len(rest) < 5:
            raise ProtocolError("option negotiation: truncated macro list")
        (stage,) = _U32.unpack_from(rest)
        end = rest.find(b"\0", 4)
        if end < 0:
            raise ProtocolError("option negotiation: macro list not NUL-terminated")
        names = tuple(rest[4:end].decode("ascii", "replace").split())
        rest = rest[end + 1 :]
        try:
            macros[MacroStage(stage)] = names
        except ValueError:
            continue  # an unknown stage is ignored, as Postfix does
    return Negotiate(version, actions, protocol, macros)


def encode_response(response: Response) -> bytes:
    """A filter's packet for ``response`` (what a filter writes; the tests' fake milters)."""
    for command, simple in _SIMPLE.items():
        if type(response) is type(simple):
            return packet(command)
    if isinstance(response, ReplyCode):
        return packet(SMFIR_REPLYCODE, _cstring(response.text))
    if isinstance(response, Quarantine):
        return packet(SMFIR_QUARANTINE, _cstring(response.reason))
    if isinstance(response, AddHeader):
        return packet(SMFIR_ADDHEADER, _cstring(response.name) + _cstring(response.value))
    if isinstance(response, (InsertHeader, ChangeHeader)):
        command = SMFIR_INSHEADER if isinstance(response, InsertHeader) else SMFIR_CHGHEADER
        data = _U32.pack(response.index) + _cstring(response.name) + _cstring(response.value)
        return packet(command, data)
    if isinstance(response, AddRecipient):
        if response.parameters is None:
            return packet(SMFIR_ADDRCPT, _cstring(response.address))
        return packet(SMFIR_ADDRCPT_PAR, _cstring(response.address) + _cstring(response.parameters))
    if isinstance(response, DeleteRecipient):
        return packet(SMFIR_DELRCPT, _cstring(response.address))
    if isinstance(response, ChangeSender):
        data = _cstring(response.address)
        if response.parameters is not None:
            data += _cstring(response.parameters)
        return packet(SMFIR_CHGFROM, data)
    if isinstance(response, ReplaceBody):
        return packet(SMFIR_REPLBODY, response.chunk)
    if isinstance(response, Negotiate):
        data = _U32_U32_U32.pack(response.version, response.actions, response.protocol)
        for stage, names in response.macros.items():
            data += _U32.pack(int(stage)) + _cstring(" ".join(names))
        return packet(SMFIC_OPTNEG, data)
    raise TypeError(f"not a filter response: {response!r}")


# --- the MTA's commands, decoded (the filter's side: the tests' fake milters) -----------------


@dataclass(frozen=True, slots=True)
class Command:
    """An MTA command as a filter reads it: the command byte and its decoded arguments.

    ``strings`` holds the NUL-terminated strings (``SMFIC_MACRO``: the macro names and values
    after the stage byte, in ``stage``); ``numbers`` the 32-bit numbers (``SMFIC_OPTNEG``) or
    the port (``SMFIC_CONNECT``); ``data`` the raw bytes (``SMFIC_BODY``).
    """

    code: bytes
    strings: tuple[str, ...] = ()
    numbers: tuple[int, ...] = ()
    data: bytes = b""
    stage: bytes = b""
    family: bytes = b""


def decode_command(command: bytes, data: bytes) -> Command:
    """An MTA packet as a [`Command`][alephsmtp.milter.protocol.Command]; ``ProtocolError`` when it
    does not fit."""
    if command == SMFIC_OPTNEG:
        if len(data) != 12:
            raise ProtocolError("SMFIC_OPTNEG: 12 bytes expected")
        return Command(command, numbers=_U32_U32_U32.unpack(data))
    if command == SMFIC_MACRO:
        if not data:
            raise ProtocolError("SMFIC_MACRO without a stage")
        strings = tuple(_split_strings(data[1:], None, "SMFIC_MACRO")) if data[1:] else ()
        return Command(command, strings=strings, stage=data[:1])
    if command == SMFIC_CONNECT:
        end = data.find(b"\0")
        if end < 0 or end + 1 >= len(data):
            raise ProtocolError("SMFIC_CONNECT: no family")
        hostname = data[:end].decode("utf-8", "surrogateescape")
        family = data[end + 1 : end + 2]
        if family == SMFIA_UNKNOWN:
            return Command(command, strings=(hostname,), family=family)
        rest = data[end + 2 :]
        if len(rest) < 3:
            raise ProtocolError("SMFIC_CONNECT: no port or address")
        (port,) = struct.unpack_from("!H", rest)
        (address,) = _split_strings(rest[2:], 1, "SMFIC_CONNECT")
        return Command(command, strings=(hostname, address), numbers=(port,), family=family)
    if command == SMFIC_BODY:
        return Command(command, data=bytes(data))
    if command in (SMFIC_HELO, SMFIC_UNKNOWN):
        return Command(command, strings=tuple(_split_strings(data, 1, repr(command))))
    if command == SMFIC_HEADER:
        return Command(command, strings=tuple(_split_strings(data, 2, "SMFIC_HEADER")))
    if command in (SMFIC_MAIL, SMFIC_RCPT):
        return Command(command, strings=tuple(_split_strings(data, None, repr(command))))
    if command in (SMFIC_ABORT, SMFIC_BODYEOB, SMFIC_EOH, SMFIC_QUIT, SMFIC_QUIT_NC, SMFIC_DATA):
        _no_data(data, f"command {command!r}")
        return Command(command)
    raise ProtocolError(f"unknown MTA command {command!r}")


# --- framing --------------------------------------------------------------------------------


class PacketDecoder:
    """Splits a byte stream into packets: ``feed(data)`` returns the complete ones as
    ``(command, data)`` pairs and keeps the rest. A length of zero or above ``max_packet`` raises
    [`ProtocolError`][alephsmtp.milter.protocol.ProtocolError] (the stream cannot be resynchronised
    after that)."""

    __slots__ = ("_buffer", "max_packet")

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        buffer = self._buffer
        buffer += data
        packets: list[tuple[bytes, bytes]] = []
        start = 0
        end = len(buffer)
        while end - start >= 4:
            (length,) = _U32.unpack_from(buffer, start)
            if length < 1 or length > self.max_packet:
                raise ProtocolError(f"bad packet length {length}")
            if end - start - 4 < length:
                break
            body = start + 4
            packets.append(
                (bytes(buffer[body : body + 1]), bytes(buffer[body + 1 : body + length]))
            )
            start = body + length
        if start:
            del buffer[:start]
        return packets

    @property
    def pending(self) -> int:
        """Bytes of an incomplete packet held back."""
        return len(self._buffer)


# --- negotiation ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The outcome of the option negotiation with one filter.

    ``actions`` are what the filter may do, ``protocol`` its protocol flags (steps it does not
    want, replies it will not send), ``skipped`` the steps its protocol version does not know
    (never sent), ``macros`` the macro names it asked for per stage (empty: the MTA's defaults).
    """

    version: int
    actions: Action
    protocol: Step
    skipped: Step = Step.NOCONNECT & 0
    macros: Mapping[MacroStage, tuple[str, ...]] = field(default_factory=dict)

    def sends(self, step: Step) -> bool:
        """Whether an event guarded by the ``SMFIP_NO*`` flag ``step`` goes to the filter."""
        return not (self.protocol & step or self.skipped & step)

    def replies(self, no_reply: Step) -> bool:
        """Whether the filter answers an event whose ``SMFIP_NR_*`` flag is ``no_reply``."""
        return not self.protocol & no_reply


def negotiate(
    answer: Negotiate,
    offered_actions: int = ALL_ACTIONS,
    offered_protocol: int = ALL_PROTOCOL,
    version: int = PROTOCOL_VERSION,
) -> Negotiated:
    """Check a filter's answer to the negotiation, as Postfix's ``milter8_connect`` does.

    The filter's version may be older than ours (2 to 6; it then gets only the events its
    version knows) but not newer, and it may ask only for actions that were offered
    (``ProtocolError`` otherwise). Its protocol flags are taken as given: a filter that says it
    will not reply to a step is never waited for, whether or not that was offered.
    """
    if answer.version > version or answer.version < 2:
        raise ProtocolError(f"filter protocol version {answer.version}, MTA speaks 2 to {version}")
    extra = int(answer.actions) & ~int(offered_actions) & 0xFFFFFFFF
    if extra:
        raise ProtocolError(
            f"filter asks for actions 0x{answer.actions:x}, MTA offered 0x{offered_actions:x}"
        )
    if answer.version >= 6:
        known = Step(0)
    elif answer.version >= 4:
        known = _V4_STEPS
    elif answer.version == 3:
        known = _V3_STEPS
    else:
        known = _V2_STEPS
    skipped = (NO_SEND & ~known) if known else Step(0)
    return Negotiated(
        answer.version,
        Action(answer.actions & int(ALL_ACTIONS)),
        Step(answer.protocol & int(ALL_PROTOCOL | Step.RCPT_REJ)),
        skipped,
        dict(answer.macros),
    )
