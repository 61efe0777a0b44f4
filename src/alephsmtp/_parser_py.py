"""Pure-Python twin of the compiled parsing core ``alephsmtp._parser``.

CONTRACT (both implementations must follow it to the byte; tests compare them):

Byte-likes: every ``feed``/``split_command`` argument may be ``bytes``, ``bytearray`` or a
``memoryview`` of one (the session passes a memoryview slice of a pooled buffer that it reuses
right after the call, so nothing may keep a reference to the argument: copy what you keep).

Errors are reported as values, instances of [`alephsmtp.errors`][alephsmtp.errors] classes created
with no arguments (``LineTooLong()``, ``BareLineFeed()``, ``BareCarriageReturn()``,
``MessageTooLarge()``); they compare equal by value. Programming errors (bad policy name, negative
sizes) raise ``ValueError``.

Policies: ``bare_newline`` is ``"reject"`` (default) or ``"normalize"``.
  * reject: a bare LF (LF not preceded by CR) or a bare CR (CR not followed by LF) breaks the rule.
  * normalize (Postfix ``smtpd_forbid_bare_newline = normalize``): a bare LF is treated as if
    the client had sent CRLF; a bare CR is ordinary content. The end of DATA still needs the
    standard ``<CRLF>.<CRLF>``.

BufferPool(buffer_size=16384, max_free=64)
  A free list of reusable ``bytearray`` buffers of exactly ``buffer_size`` bytes.
  ``acquire() -> bytearray``: pops a free buffer, or allocates a new one when none is free.
  ``release(buf) -> None``: gives it back; kept on the free list while fewer than ``max_free``
  are free, otherwise dropped. ``ValueError`` if ``len(buf) != buffer_size``.
  Counters (read-only ints): ``allocated`` (buffers created and not dropped), ``in_use``
  (acquired and not yet released), ``free`` (on the free list). Invariant:
  ``allocated == in_use + free``. ``buffer_size`` and ``max_free`` are readable.

LineReader(max_line_length=512, bare_newline="reject")
  Incremental CRLF line scanner for the command phase (RFC 5321 2.3.8, 4.1.1).
  ``max_line_length`` counts the line *including* its terminator (RFC 5321 4.5.3.1.4: 512);
  0 means no limit. It is read-only: a limit that changed would apply to lines already
  scanned, and so depend on how the client's bytes were split (the session holds command
  lines to their own limit, and gives the reader the longest any state may take).
  ``feed(data) -> list[bytes | SmtpError]``: scans what is held plus ``data``; returns the
  complete lines in order, each without its terminator (CRLF, or in normalize mode a bare LF).
  The terminator is the first LF; a line whose LF is not preceded by CR is a bare-LF line.
  In place of a line, an error instance:
    * ``LineTooLong()`` when the line's length including its terminator exceeds the limit.
      Enforced while scanning: once the held incomplete line reaches ``max_line_length`` bytes
      without an LF it can only be too long, so its bytes are discarded (never held) up to and
      including the next LF, and the error is reported at that point, in order.
    * reject mode: ``BareLineFeed()`` for a line ended by a bare LF; else ``BareCarriageReturn()``
      for a line containing a CR not directly followed by LF. (LineTooLong wins over both.)
  STOP RULE: scanning stops right after a line (a real line, not an error) whose first four
  bytes, ASCII-uppercased, are ``DATA`` or ``BDAT``, or whose first eight are ``STARTTLS``:
  such a command may change how the following bytes are read, so they stay held, unscanned.
  ``feed(b"")`` resumes scanning the held bytes; ``take_pending()`` takes them instead.
  ``take_pending() -> bytes``: returns every held byte (unscanned bytes and the incomplete last
  line, in stream order, exactly as received) and clears them; resets the discard state.
  ``pending`` (int): how many bytes are held. An idle reader holds nothing: ``b""``.

DataReader(max_size=0, max_line_length=0, bare_newline="reject")
  The DATA phase (RFC 5321 4.1.1.4, 4.5.2). Created after the 354 reply, so the stream starts
  at the beginning of a line that follows a real CRLF (the DATA command's).
  ``feed(data) -> bytes``: returns the message bytes this call completed, unstuffed (a shared
  ``b""`` when none). The message is everything before the end mark, including the CRLF that
  ends its last line: ``"a\r\n.\r\n"`` gives ``b"a\r\n"``; ``".\r\n"`` at once gives ``b""``.
    * End mark: a line consisting of exactly ``.`` + CRLF, *if* that line follows a real CRLF
      (or is the first line). Nothing else ends the message: not ``<LF>.<LF>``, ``<CR>.<CR>``,
      ``<LF>.<CRLF>``, ``<CRLF>.<LF>``, ``<CRLF>.<CR>``, ... (SMTP smuggling).
    * Dot-unstuffing: a line that starts with ``.`` and has other characters before its
      terminator loses that first dot. A line that is only ``.`` but is not the end mark (it
      follows a bare LF, or is ended by a bare LF in normalize mode) is kept as ``.``.
    * normalize mode: a bare LF comes out as CRLF and starts a new line (dot-unstuffing
      applies to it, but it is not end-mark eligible); bare CRs come out unchanged.
    * ``max_line_length`` (0: none) counts a text line unstuffed, including its terminator
      (RFC 5321 4.5.3.1.6: 1000), a bare LF counting 1 in normalize mode (it was received as 1).
    * ``size``: the number of message bytes so far, as they would come out (unstuffed,
      normalized), counted on even after an error.
    * ``error``: ``None``, or the first rule broken: ``MessageTooLarge()`` once ``size`` exceeds
      a non-zero ``max_size``; ``LineTooLong()``; ``BareLineFeed()`` / ``BareCarriageReturn()``
      in reject mode. Once set, it stays; the call that set it and every later call return
      ``b""`` (the message is being discarded), but scanning for the end mark goes on so the
      session stays in sync and can answer after the end mark.
    * ``done`` (bool): the end mark was seen. ``trailing`` (bytes): what followed the end mark in
      the call that found it, untouched (pipelined commands). After ``done``, ``feed`` raises
      ``RuntimeError``.
  Output bytes are emitted as soon as they are known to be message bytes; at most the state of
  a line start (a dot, a dot and CR) is held between calls, so ``b"".join`` of all outputs is
  the same whatever the split points.

BdatReader(size, max_size=0, received=0)
  CHUNKING (RFC 3030): exactly ``size`` bytes, no unstuffing, no line rules.
  ``received`` is the message size before this chunk (for ``max_size``).
  ``feed(data) -> bytes``: the chunk bytes in this call (``b""`` once ``error`` is set);
  ``done``; ``trailing`` (bytes after the chunk, untouched); ``remaining`` (bytes still owed);
  ``size`` (``received`` plus the bytes read so far); ``error`` (``MessageTooLarge()`` once
  ``size`` exceeds a non-zero ``max_size``; the chunk is still read to its end).
  ``size=0`` is done at once. After ``done``, ``feed`` raises ``RuntimeError``.

split_command(line) -> tuple[bytes, bytes]
  ``(verb, argument)``: the verb is the bytes before the first space, ASCII-uppercased; the
  argument is what follows that space with leading and trailing spaces stripped (``b""`` when
  none). Leading spaces before the verb are stripped first. ``b"mail FROM:<a@b>  "`` gives
  ``(b"MAIL", b"FROM:<a@b>")``; ``b""`` gives ``(b"", b"")``.

scan_path(argument, keyword) -> tuple[str, str, bytes] | None
  The common MAIL/RCPT argument in one call (RFC 5321 4.1.1.2, 4.1.1.3); ``None`` for anything
  else, which the caller hands to the general parser
  ([`parse_path()`][alephsmtp.addresses.parse_path] via [`commands`][alephsmtp.commands]), the
  one that decides what it is. ``argument`` is the command argument as ``split_command``
  returns it; ``keyword`` (``bytes``) is ``b"FROM:"`` or
  ``b"TO:"``, matched ASCII-case-insensitively (RFC 5321 2.4) at the start. Then, exactly:
  zero or more spaces, ``<`` Dot-string ``@`` Domain ``>``, then the end of the argument or one
  or more spaces and the rest. Dot-string (RFC 5321 4.1.2) is atoms of ASCII atext
  (``A-Za-z0-9!#$%&'*+-/=?^_`{|}~``, RFC 5322 3.2.3) joined by single dots; Domain is labels
  of 1 to 63 letters, digits and hyphens, not starting or ending with a hyphen, joined by single
  dots. Limits (RFC 5321 4.5.3.1.1, 4.5.3.1.3): the local part has at most 64 octets and the
  path with its ``<``, ``@`` and ``>`` at most 256.
  Returns ``(local_part, domain, rest)``: ``local_part`` and ``domain`` are ASCII ``str``;
  ``rest`` is the ``bytes`` after the spaces that follow ``>`` (the ESMTP parameters, not
  checked here and not necessarily UTF-8; ``b""`` when none).
  ``None`` for every other argument: another keyword, the null path ``<>``, ``<Postmaster>``,
  a source route, a quoted local part, an address literal, non-ASCII, no angle brackets, any
  other syntax error, a limit broken. It never raises for content; ``TypeError`` when
  ``argument`` has no buffer protocol or ``keyword`` is not ``bytes``.
  It is [`parse_path()`][alephsmtp.addresses.parse_path]'s fast path in bytes: it returns a
  tuple exactly when that path's pattern and limits take the text after the keyword and its spaces,
  and then ``parse_path`` gives the same local part, domain and (decoded) rest.

CLARIFICATIONS (decided while implementing; both implementations follow them, tests pin them):
  * Arguments: a ``feed``/``split_command`` argument without the buffer protocol raises
    ``TypeError`` (a non-contiguous buffer is accepted: its bytes are copied first). Sizes and
    limits are ints (``operator.index``; ``TypeError`` otherwise).
  * BufferPool: ``buffer_size`` must be at least 1 (a 0-byte read buffer reads nothing).
    ``release`` of anything but a ``bytearray`` raises ``TypeError``; a release while
    ``in_use`` is 0 (more releases than acquires) raises ``ValueError`` rather than break the
    invariant. New buffers are zero-filled; reused ones come back as they were left.
  * LineReader: ``take_pending()`` during a discard drops the discarded line silently (it
    never ended, so it is never reported).
  * DataReader, lines: every LF ends a line, in both modes (so a line after a bare LF is a new
    line for dot-unstuffing, but never end-mark eligible); a CR never ends a line.
  * DataReader, ``size`` after a reject-mode bare LF counts it as the 1 byte it is (it is not
    normalized); the held line-start dot (and CR) is counted when it turns out to be content
    and never when it is part of the end mark.
  * DataReader, which error is first: a rule is broken at the byte that reveals it: a bare CR
    at the byte after the CR; ``LineTooLong`` at the byte that takes the line past the limit;
    ``BareLineFeed`` at the LF; ``MessageTooLarge`` at the byte whose output takes ``size`` past
    ``max_size`` (a held dot or dot+CR is output by the byte that resolves it). The earliest
    such byte wins; for one byte, in the order BareCarriageReturn, LineTooLong, BareLineFeed,
    MessageTooLarge. This depends only on the stream, never on the split points.
  * DataReader: ``b"".join`` of the outputs is split-independent while ``error`` is ``None``;
    after an error each call's output is ``b""``, so what was returned before the error is a
    prefix of the message and must be discarded by the caller.
  * BdatReader: a ``received`` already past a non-zero ``max_size`` sets ``error`` at once; the
    call whose bytes take ``size`` past ``max_size`` returns ``b""`` (as DataReader does).
"""

from __future__ import annotations

import operator
import re
import sys
from typing import Final, TypeAlias

from .errors import BareCarriageReturn, BareLineFeed, LineTooLong, MessageTooLarge, SmtpError

__all__ = ["BdatReader", "BufferPool", "DataReader", "LineReader", "scan_path", "split_command"]

BytesLike: TypeAlias = bytes | bytearray | memoryview
"""What ``feed``, ``split_command`` and ``scan_path`` accept."""

_EMPTY: Final = b""
_CR: Final = 13
_LF: Final = 10
_DOT: Final = 46
_END_MARK: Final = b"\r\n.\r\n"
_CRLF_DOT: Final = b"\r\n."

# scan_path: "<" Dot-string "@" Domain ">" (RFC 5321 4.1.2) in ASCII, then the end or spaces.
# Atom = 1*atext (RFC 5322 3.2.3); sub-domain = Let-dig [Ldh-str], at most 63 octets (RFC 1035
# 2.3.4). The compiled core scans the same grammar with a character-class table.
_ATOM: Final = rb"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_LABEL: Final = rb"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_SIMPLE_PATH: Final = re.compile(
    rb" *<(%s(?:\.%s)*)@(%s(?:\.%s)*)>(?: +|\Z)" % (_ATOM, _ATOM, _LABEL, _LABEL)
)
# RFC 5321 4.5.3.1.1 and 4.5.3.1.3: the local part; the path with "<", "@" and ">".
_MAX_LOCAL_PART: Final = 64
_MAX_PATH: Final = 256

# DataReader line-start states: nothing of the line seen yet / a dot / a dot and a CR (both
# held, not output yet) / inside a line (output as it comes).
_ST_START: Final = 0
_ST_DOT: Final = 1
_ST_DOTCR: Final = 2
_ST_MID: Final = 3
# For the bulk path: the held state rebuilt in front of the data, after a (virtual) CRLF.
_HEADS: Final = (b"\r\n", b"\r\n.", b"\r\n.\r")

# DataReader error kinds, in their order of precedence at one byte.
_E_NONE: Final = 0
_E_BARE_CR: Final = 1
_E_TOO_LONG: Final = 2
_E_BARE_LF: Final = 3
_E_TOO_LARGE: Final = 4


def _as_bytes(data: BytesLike) -> bytes:
    """Return ``data`` as ``bytes``, copying anything that is not ``bytes`` already."""
    if type(data) is bytes:
        return data
    return memoryview(data).tobytes()


def _check_size(value: int, name: str) -> int:
    """Return ``value`` as an int, refusing negative values and values past ``sys.maxsize``
    (what the compiled core's ``Py_ssize_t`` holds) with ``ValueError``."""
    number = operator.index(value)
    if number < 0:
        raise ValueError(f"{name} must not be negative, got {number}")
    if number > sys.maxsize:
        raise ValueError(f"{name} must be at most {sys.maxsize}, got {number}")
    return number


def _check_policy(bare_newline: str) -> bool:
    """Return True for ``"normalize"``, False for ``"reject"``; ``ValueError`` otherwise."""
    if bare_newline == "reject":
        return False
    if bare_newline == "normalize":
        return True
    raise ValueError(f"bare_newline must be 'reject' or 'normalize', not {bare_newline!r}")


def _new_error(kind: int) -> SmtpError:
    """Create the error instance for a DataReader error kind."""
    if kind == _E_BARE_CR:
        return BareCarriageReturn()
    if kind == _E_TOO_LONG:
        return LineTooLong()
    if kind == _E_BARE_LF:
        return BareLineFeed()
    return MessageTooLarge()


def _stops(line: bytes) -> bool:
    """The STOP RULE: True for a line that starts with DATA, BDAT or STARTTLS (any case)."""
    head = line[:8].upper()
    return head[:4] in (b"DATA", b"BDAT") or head == b"STARTTLS"


class BufferPool:
    """A free list of reusable ``bytearray`` read buffers of one size."""

    __slots__ = ("_allocated", "_buffer_size", "_free", "_in_use", "_max_free")

    def __init__(self, buffer_size: int = 16384, max_free: int = 64) -> None:
        """Create an empty pool of ``buffer_size``-byte buffers keeping up to ``max_free``."""
        size = _check_size(buffer_size, "buffer_size")
        if size == 0:
            raise ValueError("buffer_size must be at least 1")
        self._buffer_size: int = size
        self._max_free: int = _check_size(max_free, "max_free")
        self._free: list[bytearray] = []
        self._allocated: int = 0
        self._in_use: int = 0

    @property
    def buffer_size(self) -> int:
        """The size of every buffer of this pool."""
        return self._buffer_size

    @property
    def max_free(self) -> int:
        """How many released buffers are kept for reuse at most."""
        return self._max_free

    @property
    def allocated(self) -> int:
        """Buffers created and not dropped: ``in_use + free``."""
        return self._allocated

    @property
    def in_use(self) -> int:
        """Buffers acquired and not yet released."""
        return self._in_use

    @property
    def free(self) -> int:
        """Buffers on the free list."""
        return len(self._free)

    def acquire(self) -> bytearray:
        """Return a free buffer, or a new one when none is free."""
        if self._free:
            buf = self._free.pop()
        else:
            buf = bytearray(self._buffer_size)
            self._allocated += 1
        self._in_use += 1
        return buf

    def release(self, buf: bytearray) -> None:
        """Give ``buf`` back: kept while fewer than ``max_free`` are free, else dropped."""
        if not isinstance(buf, bytearray):
            raise TypeError(f"release() needs a bytearray, not {type(buf).__name__}")
        if len(buf) != self._buffer_size:
            raise ValueError(
                f"release() of a {len(buf)}-byte buffer to a pool of {self._buffer_size}-byte ones"
            )
        if self._in_use <= 0:
            raise ValueError("release() without a matching acquire()")
        self._in_use -= 1
        if len(self._free) < self._max_free:
            self._free.append(buf)
        else:
            self._allocated -= 1

    def __repr__(self) -> str:
        """Show the size and the counters."""
        return (
            f"<BufferPool buffer_size={self._buffer_size} allocated={self._allocated} "
            f"in_use={self._in_use} free={len(self._free)}>"
        )


class LineReader:
    """Incremental CRLF line scanner for the command phase."""

    __slots__ = ("_discard", "_held", "_limit", "_normalize")

    def __init__(self, max_line_length: int = 512, bare_newline: str = "reject") -> None:
        """Create a reader with a line limit (0: none) and a bare-newline policy."""
        self._normalize: bool = _check_policy(bare_newline)
        self._limit: int = _check_size(max_line_length, "max_line_length")
        self._held: bytes = _EMPTY
        self._discard: bool = False

    @property
    def max_line_length(self) -> int:
        """The longest line accepted, terminator included; 0 means no limit."""
        return self._limit

    @property
    def bare_newline(self) -> str:
        """The bare-newline policy: ``"reject"`` or ``"normalize"``."""
        return "normalize" if self._normalize else "reject"

    @property
    def pending(self) -> int:
        """How many bytes are held (unscanned bytes and the incomplete last line)."""
        return len(self._held)

    def take_pending(self) -> bytes:
        """Return every held byte, exactly as received, and forget them."""
        held = self._held
        self._held = _EMPTY
        self._discard = False
        return held

    def feed(self, data: BytesLike) -> list[bytes | SmtpError]:
        """Scan the held bytes plus ``data``; return the complete lines and errors in order."""
        chunk = _as_bytes(data)
        buf = self._held + chunk if self._held else chunk
        out: list[bytes | SmtpError] = []
        limit = self._limit
        pos = 0
        if self._discard:
            lf = buf.find(b"\n")
            if lf < 0:
                self._held = _EMPTY
                return out
            out.append(LineTooLong())
            self._discard = False
            pos = lf + 1
        last = buf.rfind(b"\n")
        if last < pos:
            return self._hold(buf, pos, out)
        # Bulk path: only CRLF lines, none too long, no bare CR (reject), nothing that stops.
        n_crlf = buf.count(b"\r\n", pos, last)
        if (
            last > pos
            and buf[last - 1] == _CR
            and buf.count(b"\n", pos, last + 1) == n_crlf + 1
            and (self._normalize or buf.count(b"\r", pos, last + 1) == n_crlf + 1)
        ):
            block = buf[pos : last - 1]
            upper = block.upper()
            if b"DATA" not in upper and b"BDAT" not in upper and b"STARTTLS" not in upper:
                lines = block.split(b"\r\n")
                if not limit or max(map(len, lines)) + 2 <= limit:
                    out.extend(lines)
                    return self._hold(buf, last + 1, out)
        normalize = self._normalize
        while True:
            lf = buf.find(b"\n", pos)
            if lf < 0:
                break
            start = pos
            pos = lf + 1
            if limit and pos - start > limit:
                out.append(LineTooLong())
                continue
            if lf > start and buf[lf - 1] == _CR:
                line = buf[start : lf - 1]
            elif normalize:
                line = buf[start:lf]
            else:
                out.append(BareLineFeed())
                continue
            if not normalize and _CR in line:
                out.append(BareCarriageReturn())
                continue
            out.append(line)
            if _stops(line):
                self._held = buf[pos:]
                return out
        return self._hold(buf, pos, out)

    def _hold(self, buf: bytes, pos: int, out: list[bytes | SmtpError]) -> list[bytes | SmtpError]:
        """Keep the incomplete line ``buf[pos:]`` (or start discarding it); return ``out``."""
        limit = self._limit
        if limit and len(buf) - pos >= limit:
            self._held = _EMPTY
            self._discard = True
        else:
            self._held = buf[pos:]
        return out

    def __repr__(self) -> str:
        """Show the limit, the policy and how much is held."""
        return (
            f"<LineReader max_line_length={self._limit} bare_newline={self.bare_newline!r} "
            f"pending={len(self._held)}>"
        )


class DataReader:
    """The DATA phase: finds the end mark, unstuffs dots and enforces the message rules."""

    __slots__ = (
        "_cr",
        "_done",
        "_eligible",
        "_error",
        "_limit",
        "_line_len",
        "_max_size",
        "_normalize",
        "_size",
        "_state",
        "_trailing",
    )

    def __init__(
        self, max_size: int = 0, max_line_length: int = 0, bare_newline: str = "reject"
    ) -> None:
        """Create a reader for one message: size limit, line limit (0: none) and policy."""
        self._max_size: int = _check_size(max_size, "max_size")
        self._limit: int = _check_size(max_line_length, "max_line_length")
        self._normalize: bool = _check_policy(bare_newline)
        self._state: int = _ST_START
        self._cr: bool = False  # inside a line, its last byte so far is a CR (already output)
        self._eligible: bool = True  # the current line follows a real CRLF (or is the first)
        self._line_len: int = 0  # the current line so far, unstuffed (held bytes not counted)
        self._size: int = 0
        self._error: SmtpError | None = None
        self._done: bool = False
        self._trailing: bytes = _EMPTY

    @property
    def max_size(self) -> int:
        """The size limit; 0 means none."""
        return self._max_size

    @property
    def max_line_length(self) -> int:
        """The text line limit, terminator included; 0 means none."""
        return self._limit

    @property
    def bare_newline(self) -> str:
        """The bare-newline policy: ``"reject"`` or ``"normalize"``."""
        return "normalize" if self._normalize else "reject"

    @property
    def size(self) -> int:
        """The message bytes so far, as they come out (unstuffed, normalized)."""
        return self._size

    @property
    def error(self) -> SmtpError | None:
        """The first rule the message broke, or None."""
        return self._error

    @property
    def done(self) -> bool:
        """True once the end mark was seen."""
        return self._done

    @property
    def trailing(self) -> bytes:
        """The bytes after the end mark in the call that found it."""
        return self._trailing

    def feed(self, data: BytesLike) -> bytes:
        """Scan ``data``; return the message bytes it completed (``b""`` for none)."""
        if self._done:
            raise RuntimeError("DataReader.feed() after the end of the data")
        chunk = _as_bytes(data)
        if not chunk:
            return _EMPTY
        out = self._feed_bulk(chunk)
        if out is None:
            out = self._feed_lines(chunk)
        return out

    def _feed_bulk(self, data: bytes) -> bytes | None:
        """The common case on whole reads; None (nothing changed) when it does not apply.

        It applies when the data has no bare LF and, while no error is set, no bare CR (reject
        mode) and no line that could be too long: then the only rule left is the size.
        """
        state = self._state
        if state == _ST_MID:
            head = b"\r" if self._cr else _EMPTY
        elif self._eligible:
            head = _HEADS[state]
        else:
            return None  # the line after a bare LF: the per-line path
        virtual = 2 if state != _ST_MID else len(head)  # head bytes that were output already
        work = head + data if head else data
        end = work.rfind(_END_MARK)
        done = end >= 0
        new_state = _ST_MID
        if done:
            end = work.find(_END_MARK)
            region = work[: end + 2]
        else:
            if work.endswith(_CRLF_DOT):
                new_state = _ST_DOT
                region = work[:-1]
            elif work.endswith(b"\r\n.\r"):
                new_state = _ST_DOTCR
                region = work[:-2]
            else:
                if work.endswith(b"\r\n"):
                    new_state = _ST_START
                region = work
        pending_cr = not done and new_state == _ST_MID and region.endswith(b"\r")
        check = region[:-1] if pending_cr else region
        n_cr = check.count(b"\r")
        breaks = len(check.splitlines())
        if check and check[-1] != _LF and check[-1] != _CR:
            breaks -= 1  # the incomplete last line
        # breaks == CRLFs + bare CRs + bare LFs and n_cr == CRLFs + bare CRs.
        if breaks != n_cr:
            return None  # a bare LF
        error = self._error
        limit = self._limit
        if error is None:
            if not self._normalize and breaks != check.count(b"\n"):
                return None  # a bare CR
            if limit:
                parts = check.split(b"\n")
                if max(map(len, parts)) + 1 > limit or self._line_len + len(parts[0]) + 1 > limit:
                    return None  # perhaps a line too long: the exact per-line path
            # Unstuff: every "<CRLF>." here starts a line with more than the dot.
            out = b"\r\n".join(region.split(_CRLF_DOT)) if _CRLF_DOT in region else region
            if virtual:
                out = out[virtual:]
            size = self._size + len(out)
            max_size = self._max_size
            if max_size and size > max_size:
                self._error = MessageTooLarge()
                out = _EMPTY
        else:
            size = self._size + len(region) - virtual - region.count(_CRLF_DOT)
            out = _EMPTY
        self._size = size
        if done:
            self._done = True
            self._trailing = work[end + 5 :]
            return out
        if limit and self._error is None:
            last_lf = region.rfind(b"\n")
            if last_lf >= 0:
                self._line_len = len(region) - last_lf - 1
                if region[last_lf + 1 : last_lf + 2] == b".":
                    self._line_len -= 1
            else:
                self._line_len += len(region) - virtual
        if new_state != _ST_MID or b"\n" in region:
            self._eligible = True
        self._state = new_state
        self._cr = pending_cr
        return out

    def _feed_lines(self, data: bytes) -> bytes:
        """The exact path, line by line: bare LFs, bare CRs, long lines, the first error."""
        normalize = self._normalize
        limit = self._limit
        max_size = self._max_size
        state = self._state
        cr = self._cr
        eligible = self._eligible
        line_len = self._line_len
        size = self._size
        error = self._error
        keep = error is None  # collect output (until an error is found)
        pieces: list[bytes] = []
        n = len(data)
        pos = 0
        run = 0  # data[run:pos] is output not yet collected
        while pos < n:
            if state != _ST_MID:
                c = data[pos]
                if state == _ST_START:
                    if c == _DOT:
                        if keep:
                            pieces.append(data[run:pos])
                        state = _ST_DOT
                        pos += 1
                        run = pos
                        continue
                    state = _ST_MID
                elif state == _ST_DOT:
                    if c == _CR:
                        state = _ST_DOTCR
                        pos += 1
                        run = pos
                        continue
                    state = _ST_MID
                    if c == _LF:  # ".<LF>": the dot is content
                        if keep:
                            pieces.append(b".")
                        line_len = 1
                        size += 1
                    # else: a stuffed dot, dropped
                else:  # _ST_DOTCR
                    if c == _LF:
                        if eligible:  # the end mark
                            self._done = True
                            self._trailing = data[pos + 1 :]
                            break
                        if keep:
                            pieces.append(b".\r")
                        line_len = 3
                        size += 3
                        if error is None:
                            if limit and line_len > limit:
                                error = LineTooLong()
                            elif max_size and size > max_size:
                                error = MessageTooLarge()
                            keep = error is None
                        state = _ST_START
                        eligible = True
                        line_len = 0
                        pos += 1
                        continue
                    # ".<CR>x": a stuffed dot, then a bare CR
                    if keep:
                        pieces.append(b"\r")
                    line_len = 1
                    size += 1
                    if error is None and not normalize:
                        error = BareCarriageReturn()
                        keep = False
                    state = _ST_MID
            # Inside a line, at pos.
            if cr:
                cr = False
                if data[pos] == _LF:
                    line_len += 1
                    size += 1
                    if error is None:
                        if limit and line_len > limit:
                            error = LineTooLong()
                        elif max_size and size > max_size:
                            error = MessageTooLarge()
                        keep = error is None
                    state = _ST_START
                    eligible = True
                    line_len = 0
                    pos += 1
                    continue
                if error is None and not normalize:
                    error = BareCarriageReturn()
                    keep = False
            lf = data.find(b"\n", pos)
            end = lf if lf >= 0 else n
            bare = lf >= 0 and not (lf > pos and data[lf - 1] == _CR)
            if error is None:
                best = n + 1
                kind = _E_NONE
                if not normalize and end - 1 > pos:
                    i = data.find(b"\r", pos, end - 1)
                    if i >= 0:
                        best = i + 1
                        kind = _E_BARE_CR
                if limit:
                    rem = limit - line_len
                    if rem <= (lf if lf >= 0 else n - 1) - pos:
                        j = pos + rem if rem > 0 else pos
                        if j < best:
                            best = j
                            kind = _E_TOO_LONG
                if bare and not normalize and lf < best:
                    best = lf
                    kind = _E_BARE_LF
                if max_size:
                    rem = max_size - size
                    if rem < end - pos:
                        j = pos + rem if rem > 0 else pos
                        if j < best:
                            best = j
                            kind = _E_TOO_LARGE
                    elif (
                        lf >= 0 and rem < end - pos + (2 if bare and normalize else 1) and lf < best
                    ):
                        best = lf
                        kind = _E_TOO_LARGE
                if kind != _E_NONE:
                    error = _new_error(kind)
                    keep = False
            line_len += end - pos
            size += end - pos
            if lf < 0:
                cr = data[n - 1] == _CR
                pos = n
                break
            if bare:
                eligible = False
                if normalize:
                    size += 2
                    if keep:
                        pieces.append(data[run:lf])
                        pieces.append(b"\r")
                        run = lf
                else:
                    size += 1
            else:
                eligible = True
                size += 1
            state = _ST_START
            line_len = 0
            pos = lf + 1
        self._state = state
        self._cr = cr
        self._eligible = eligible
        self._line_len = line_len
        self._size = size
        self._error = error
        if not keep:
            return _EMPTY
        pieces.append(data[run:pos])
        return b"".join(pieces)

    def __repr__(self) -> str:
        """Show the progress."""
        return (
            f"<DataReader size={self._size} error={self._error!r} done={self._done} "
            f"bare_newline={self.bare_newline!r}>"
        )


class BdatReader:
    """One BDAT chunk (RFC 3030): exactly ``size`` bytes, taken as they are."""

    __slots__ = ("_done", "_error", "_max_size", "_remaining", "_size", "_trailing")

    def __init__(self, size: int, max_size: int = 0, received: int = 0) -> None:
        """Read a ``size``-byte chunk of a message that already has ``received`` bytes."""
        self._remaining: int = _check_size(size, "size")
        self._max_size: int = _check_size(max_size, "max_size")
        self._size: int = _check_size(received, "received")
        self._error: SmtpError | None = None
        if self._max_size and self._size > self._max_size:
            self._error = MessageTooLarge()
        self._done: bool = self._remaining == 0
        self._trailing: bytes = _EMPTY

    @property
    def max_size(self) -> int:
        """The message size limit; 0 means none."""
        return self._max_size

    @property
    def remaining(self) -> int:
        """Chunk bytes still owed."""
        return self._remaining

    @property
    def size(self) -> int:
        """The message size: ``received`` plus the chunk bytes read so far (at most 2**63 - 1)."""
        return self._size

    @property
    def error(self) -> SmtpError | None:
        """``MessageTooLarge()`` once ``size`` passed a non-zero ``max_size``, else None."""
        return self._error

    @property
    def done(self) -> bool:
        """True once the whole chunk was read."""
        return self._done

    @property
    def trailing(self) -> bytes:
        """The bytes after the chunk in the call that completed it."""
        return self._trailing

    def feed(self, data: BytesLike) -> bytes:
        """Take up to ``remaining`` bytes of ``data``; return them (``b""`` after an error)."""
        if self._done:
            raise RuntimeError("BdatReader.feed() after the end of the chunk")
        chunk = _as_bytes(data)
        remaining = self._remaining
        if len(chunk) >= remaining:
            self._trailing = chunk[remaining:]
            chunk = chunk[:remaining]
            self._done = True
        self._remaining = remaining - len(chunk)
        # Saturating at what the compiled core's counter holds (received may be that large).
        self._size = min(self._size + len(chunk), sys.maxsize)
        if self._error is None and self._max_size and self._size > self._max_size:
            self._error = MessageTooLarge()
        if self._error is not None:
            return _EMPTY
        return chunk

    def __repr__(self) -> str:
        """Show the progress."""
        return (
            f"<BdatReader remaining={self._remaining} size={self._size} "
            f"error={self._error!r} done={self._done}>"
        )


def split_command(line: BytesLike) -> tuple[bytes, bytes]:
    """Split a command line into its ASCII-uppercased verb and its space-stripped argument."""
    verb, _, argument = _as_bytes(line).lstrip(b" ").partition(b" ")
    return verb.upper(), argument.strip(b" ")


def scan_path(argument: BytesLike, keyword: bytes) -> tuple[str, str, bytes] | None:
    """The simple ``keyword<local@domain>`` MAIL/RCPT argument as its parts, else None."""
    if type(keyword) is not bytes:
        raise TypeError(f"scan_path() keyword must be bytes, not {type(keyword).__name__}")
    data = _as_bytes(argument)
    size = len(keyword)
    # bytes.lower() changes ASCII letters only (RFC 5321 2.4: verbs and keywords in any case).
    if data[:size].lower() != keyword.lower():
        return None
    match = _SIMPLE_PATH.match(data, size)
    if match is None:
        return None
    local_part, domain = match.group(1, 2)
    if len(local_part) > _MAX_LOCAL_PART or len(local_part) + len(domain) + 3 > _MAX_PATH:
        return None
    return local_part.decode("ascii"), domain.decode("ascii"), data[match.end() :]
