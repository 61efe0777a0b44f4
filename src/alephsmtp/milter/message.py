"""A message as milters see it and edit it: header fields, end of header, body, and edits.

No I/O. [`HeaderScanner`][alephsmtp.milter.message.HeaderScanner] splits a message (whole, or
streamed piece by piece) into header fields and body the way Postfix's cleanup does before it shows
them to a milter; [`apply()`][alephsmtp.milter.message.apply] turns the filters' end-of-message
edits into the new message bytes, with Postfix's (and Sendmail's) rules for header indexes, folding
and body line ends.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .protocol import (
    AddHeader,
    ChangeHeader,
    InsertHeader,
    Modification,
    ProtocolError,
    ReplaceBody,
)

__all__ = [
    "MAX_HEADER_SECTION",
    "HeaderField",
    "HeaderScanner",
    "apply",
    "body_of",
    "milter_value",
    "split_message",
]

# A header section held back while a streamed message comes in is cut here: what follows is
# body (Postfix bounds header fields by header_size_limit the same way).
MAX_HEADER_SECTION = 1 << 20

# RFC 5322 2.2 field name: printable ASCII but ":"; Postfix's is_header() also lets blanks
# stand between the name and the colon.
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_NAME = re.compile(r"[!-9;-~]+\Z")


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field: its name and its raw bytes (every line, each with its CRLF)."""

    name: bytes
    raw: bytes

    @property
    def value(self) -> bytes:
        """The value as a milter gets it: after the colon, lines joined by LF (not CRLF)."""
        return milter_value(self.raw, leading_space=True)


def milter_value(raw: bytes, *, leading_space: bool) -> bytes:
    """A raw header field's value as ``SMFIC_HEADER`` carries it.

    Sendmail sends folded lines separated by LF, and by default drops one space (not a tab)
    after the colon; with ``SMFIP_HDR_LEADSPC`` (``leading_space``) the value is as written.
    """
    colon = raw.index(b":")
    value = raw[colon + 1 :]
    if value.endswith(b"\r\n"):
        value = value[:-2]
    elif value.endswith(b"\n"):
        value = value[:-1]
    value = value.replace(b"\r\n", b"\n")
    if not leading_space and value.startswith(b" "):
        value = value[1:]
    return value


class HeaderScanner:
    """Splits a message into header fields and body, fed whole or in pieces.

    ``feed(data)`` returns the header fields that ``data`` completed and the body bytes that
    followed the header section; ``finish()`` ends the message. `in_header` says whether
    the section is still open. It ends at an empty line (which belongs to neither side) or at
    the first line that is neither a field nor a continuation (that line starts the body, as in
    Postfix's cleanup). Lines end at LF; a CR before it stays in the raw bytes. A section
    longer than ``max_header`` bytes is cut after its last complete field; the rest is body.
    """

    __slots__ = ("_current", "_pending", "blank_line", "in_header", "max_header", "size")

    def __init__(self, max_header: int = MAX_HEADER_SECTION) -> None:
        self.max_header = max_header
        self.in_header = True
        self.blank_line = False  # the section ended at an empty line
        self.size = 0  # bytes of the section so far (fields done, empty line included)
        self._pending = bytearray()  # an incomplete line
        self._current: list[bytes] = []  # the lines of the field being read

    def feed(self, data: bytes) -> tuple[list[HeaderField], bytes]:
        if not self.in_header:
            return [], bytes(data)
        fields: list[HeaderField] = []
        pending = self._pending
        pending += data
        start = 0
        while True:
            end = pending.find(b"\n", start)
            if end < 0:
                break
            line = bytes(pending[start : end + 1])
            if self._line(line, fields):
                # The section is over: the body starts after an empty line, or with this line.
                body = bytes(pending[start if not self.blank_line else end + 1 :])
                pending.clear()
                return fields, body
            start = end + 1
        del pending[:start]
        held = len(pending) + sum(len(line) for line in self._current)
        if self.size + held > self.max_header:
            if bytes(pending[:1]) not in (b" ", b"\t"):
                self._close_field(fields)  # the open line cannot continue that field
            body = b"".join(self._current) + bytes(pending)
            self._current = []
            pending.clear()
            self.in_header = False
            return fields, body
        return fields, b""

    def finish(self) -> tuple[list[HeaderField], bytes]:
        """The end of the message: an open field is complete; an unterminated last line is a
        field, a continuation or the body, as a terminated one would be."""
        if not self.in_header:
            return [], b""
        fields: list[HeaderField] = []
        rest = bytes(self._pending)
        self._pending.clear()
        if rest and self._line(rest, fields):
            return fields, rest
        self._close_field(fields)
        self.in_header = False
        return fields, b""

    def _line(self, line: bytes, fields: list[HeaderField]) -> bool:
        """Take one line of the section; true when the section ended with it."""
        if line in (b"\r\n", b"\n"):
            self._close_field(fields)
            self.size += len(line)
            self.in_header = False
            self.blank_line = True
            return True
        if self._current and line[:1] in (b" ", b"\t"):
            self._current.append(line)
            return False
        self._close_field(fields)
        if _FIELD.match(line):
            self._current = [line]
            return False
        self.in_header = False  # neither field nor continuation: the body starts here
        return True

    def _close_field(self, fields: list[HeaderField]) -> None:
        if self._current:
            raw = b"".join(self._current)
            self._current = []
            self.size += len(raw)
            match = _FIELD.match(raw)
            assert match is not None
            fields.append(HeaderField(match.group(1), raw))


# One whole header field (its first line and its continuation lines), for split_message.
_FIELD_LINES = re.compile(rb"([!-9;-~]+)[ \t]*:[^\n]*\n(?:[ \t][^\n]*\n)*")


def split_message(message: bytes) -> tuple[list[HeaderField], bool, bytes]:
    """A whole message: its header fields, whether an empty line ended them, and the body.

    The same split as [`HeaderScanner`][alephsmtp.milter.message.HeaderScanner] fed the whole
    message (a test holds them equal), one regular-expression match per field instead of a step per
    line.
    """
    fields: list[HeaderField] = []
    position = 0
    match = _FIELD_LINES.match
    while True:
        found = match(message, position)
        if found is None:
            break
        fields.append(HeaderField(found.group(1), found.group(0)))
        position = found.end()
    rest = message[position:]
    if rest.startswith(b"\r\n"):
        return fields, True, message[position + 2 :]
    if rest.startswith(b"\n"):
        return fields, True, message[position + 1 :]
    last_line = _FIELD.match(rest) if rest and b"\n" not in rest else None
    if last_line is not None:  # an unterminated last field
        fields.append(HeaderField(last_line.group(1), rest))
        return fields, False, b""
    if fields and rest[:1] in (b" ", b"\t") and b"\n" not in rest:
        # An unterminated continuation of the last field.
        last = fields.pop()
        fields.append(HeaderField(last.name, last.raw + rest))
        return fields, False, b""
    return fields, False, rest


def body_of(body: bytes) -> bytes:
    """The body as a milter gets it: CRLF line ends, the last line terminated (Postfix sends
    every body line with its CRLF, so a body that does not end in one gets it)."""
    if body and not body.endswith(b"\n"):
        return body + b"\r\n"
    return body


# --- edits ----------------------------------------------------------------------------------


def _raw_field(name: str, value: str, leading_space: bool) -> bytes:
    """A header field from a filter's name and value, as Postfix's cleanup writes it.

    ``name: value`` (no space added with ``SMFIP_HDR_LEADSPC``). The value's lines may be
    separated by LF or CRLF; a continuation line that does not start with a blank gets a tab,
    and a lone CR becomes a space, so a value can never end the header section, start a field
    of its own or put a bare CR on the wire.
    """
    if not _NAME.match(name):
        raise ProtocolError(f"bad header field name from the filter: {name!r}")
    out = bytearray(name.encode("ascii") + b":")
    if not leading_space:
        out += b" "
    for index, line in enumerate(value.encode("utf-8", "surrogateescape").split(b"\n")):
        if line.endswith(b"\r"):
            line = line[:-1]
        line = line.replace(b"\r", b" ")
        if index and line[:1] not in (b" ", b"\t"):
            out += b"\t"
        out += line + b"\r\n"
    return bytes(out)


def _replacement_body(chunks: Iterable[bytes]) -> bytes:
    """SMFIR_REPLBODY chunks as the new body: lines end at LF (a CR before it dropped, a lone
    CR kept), each written with CRLF, the last one too (Postfix's cleanup_repl_body)."""
    data = b"".join(chunks)
    if not data:
        return b""
    lines = data.split(b"\n")
    last = lines.pop()
    out = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    if last:
        out.append(last)
    return b"".join(line + b"\r\n" for line in out)


# Postfix and Sendmail add their own Received: field at the top and hide it from milters:
# header changes count from the fields as received, inserts from the top as delivered. A
# placeholder stands for that field, so index 0 and 1 both insert at the top, as they do.
_OWN_RECEIVED = None


def apply(
    message: bytes,
    edits: Sequence[Modification],
    *,
    leading_space: bool = False,
) -> bytes:
    """``message`` with the header and body edits of one filter applied, in order.

    Envelope edits (sender, recipients) are not about the bytes and are skipped here.
    ``ProtocolError`` for an edit that cannot be made (a field name that is not one).
    """
    content = [edit for edit in edits if isinstance(edit, (AddHeader, InsertHeader, ChangeHeader))]
    bodies = [edit.chunk for edit in edits if isinstance(edit, ReplaceBody)]
    if not content and not bodies:
        return message
    fields, blank_line, body = split_message(message)
    headers: list[HeaderField | None] = [_OWN_RECEIVED, *fields]
    for edit in content:
        if isinstance(edit, AddHeader):
            raw = _raw_field(edit.name, edit.value, leading_space)
            headers.append(HeaderField(edit.name.encode("ascii"), raw))
        elif isinstance(edit, InsertHeader):
            raw = _raw_field(edit.name, edit.value, leading_space)
            position = min(edit.index, len(headers))
            headers.insert(position, HeaderField(edit.name.encode("ascii"), raw))
        else:
            _change(headers, edit, leading_space)
    if bodies:
        body = _replacement_body(bodies)
    head = b"".join(
        field.raw if field.raw.endswith(b"\n") else field.raw + b"\r\n"
        for field in headers
        if field is not None
    )
    # The empty line stays where it was; one is added when fields were edited in front of a
    # body that had none, so its first line cannot become part of the section.
    separator = b"\r\n" if blank_line or (content and body) else b""
    return head + separator + body


def _change(headers: list[HeaderField | None], edit: ChangeHeader, leading_space: bool) -> None:
    """SMFIR_CHGHEADER: the ``index``-th field of that name (0 counts as 1), case-insensitive,
    changed, or deleted for an empty value; not found: added (non-empty value) or nothing."""
    if not _NAME.match(edit.name):
        raise ProtocolError(f"bad header field name from the filter: {edit.name!r}")
    wanted = edit.name.encode("ascii").lower()
    count = max(edit.index, 1)
    for position, field in enumerate(headers):
        if field is not None and field.name.lower() == wanted:
            count -= 1
            if count == 0:
                if edit.value:
                    headers[position] = HeaderField(
                        field.name, _raw_field(edit.name, edit.value, leading_space)
                    )
                else:
                    del headers[position]
                return
    if edit.value:
        headers.append(HeaderField(wanted, _raw_field(edit.name, edit.value, leading_space)))
