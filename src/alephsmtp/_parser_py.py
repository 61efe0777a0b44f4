"""Pure-Python twin of the compiled parsing core ``alephsmtp._parser``.

CONTRACT (both implementations must follow it to the byte; tests compare them):

Byte-likes: every ``feed``/``split_command`` argument may be ``bytes``, ``bytearray`` or a
``memoryview`` of one (the session passes a memoryview slice of a pooled buffer that it reuses
right after the call, so nothing may keep a reference to the argument: copy what you keep).

Errors are reported as values, instances of :mod:`alephsmtp.errors` classes created with no
arguments (``LineTooLong()``, ``BareLineFeed()``, ``BareCarriageReturn()``,
``MessageTooLarge()``); they compare equal by value. Programming errors (bad policy name,
negative sizes) raise ``ValueError``.

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
  it is a writable attribute (the session raises it for extensions). 0 means no limit.
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
"""

from __future__ import annotations

__all__ = ["BdatReader", "BufferPool", "DataReader", "LineReader", "split_command"]
