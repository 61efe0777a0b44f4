"""DKIM body hashes computed as the message streams in (RFC 6376 3.4.3, 3.4.4, 3.7).

dkimpy canonicalises and hashes a body held whole; here the same canonical form is produced
piece by piece, so a message of any size is hashed in one pass with memory bounded by the
longest line. Only complete lines (up to the last CRLF seen) are canonicalised; the rest waits
for the next piece. Empty lines are counted, not hashed, until a line with content follows
them: both canonicalisations ignore empty lines at the end of the body.

The canonical form is dkimpy's, byte for byte (the tests hash the same messages both ways,
split at every point): simple (3.4.3) — the body as is, trailing empty lines removed, a CRLF
added when the body does not end with one, an empty body is one CRLF; relaxed (3.4.4) —
whitespace at the end of each line removed, every other run of spaces and tabs one space,
trailing empty lines removed, an empty body stays empty. ``l=`` (3.5) counts canonical octets.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["HASHES", "BodyCanonicalizer", "BodyHasher"]

#: The ``a=`` hash names and their hashlib constructors (RFC 6376 3.3, RFC 8463).
HASHES = {"sha256": hashlib.sha256, "sha1": hashlib.sha1}

_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
_WSP = re.compile(rb"[\t ]+")


def _trailing_empty_lines(block: bytes) -> int:
    """How many CRLF pairs end ``block`` (a run of whole lines)."""
    stripped = len(block.rstrip(b"\r\n"))
    tail = block[stripped:]
    if not tail:
        return 0
    if len(tail) % 2 == 0 and tail == b"\r\n" * (len(tail) // 2):
        return len(tail) // 2
    # A bare CR or LF ends the content ("x\n\r\n"): count whole pairs from the end only.
    parts = tail.split(b"\r\n")
    count = 0
    for part in reversed(parts[1:]):
        if part:
            break
        count += 1
    return count


class BodyCanonicalizer:
    """Feeds the canonical form of a body, ``simple`` or ``relaxed``, to its sinks.

    ``feed(piece)`` takes the body in pieces of any size; ``close()`` ends it. Each sink is a
    callable taking canonical bytes.
    """

    __slots__ = ("_emitted", "_empty_lines", "_pending", "_relaxed", "_sinks")

    def __init__(self, algorithm: str, sinks: Iterable[Any] = ()) -> None:
        if algorithm not in ("simple", "relaxed"):
            raise ValueError(f"unknown body canonicalization {algorithm!r}")
        self._relaxed = algorithm == "relaxed"
        self._sinks = list(sinks)
        self._pending = b""  # an incomplete last line
        self._empty_lines = 0  # empty lines seen but not yet emitted (maybe trailing)
        self._emitted = False

    def add_sink(self, sink: Any) -> None:
        self._sinks.append(sink)

    def _emit(self, data: bytes) -> None:
        self._emitted = True
        for sink in self._sinks:
            sink(data)

    def _lines(self, block: bytes) -> None:
        """Canonicalise a run of whole lines (ends with CRLF, starts a line)."""
        if self._relaxed:
            block = _WSP.sub(b" ", _TRAILING_WSP.sub(b"\r\n", block))
        trailing = _trailing_empty_lines(block)
        if trailing * 2 == len(block):
            self._empty_lines += trailing  # only empty lines: maybe the body's end
            return
        if self._empty_lines:
            # Empty lines followed by content are part of the body.
            self._emit(b"\r\n" * self._empty_lines)
        # Keep the CRLF that ends the last line with content; hold the empty ones back.
        self._emit(block[: len(block) - 2 * (trailing - 1)] if trailing > 1 else block)
        self._empty_lines = trailing - 1 if trailing else 0

    def feed(self, piece: bytes) -> None:
        data = self._pending + piece if self._pending else piece
        end = data.rfind(b"\r\n")
        if end < 0:
            self._pending = bytes(data)
            return
        self._pending = bytes(data[end + 2 :])
        self._lines(bytes(data[: end + 2]))

    def close(self) -> None:
        pending, self._pending = self._pending, b""
        if pending:
            # The body did not end with CRLF: its last line gets one (dkimpy, as RFC 6376
            # 3.4.3 / 3.4.4 treat the body as lines). Relaxed compresses the whitespace in it
            # (trailing whitespace only goes before a CRLF, as in dkimpy).
            if self._relaxed:
                pending = _WSP.sub(b" ", pending)
            if self._empty_lines:
                self._emit(b"\r\n" * self._empty_lines)
            self._emit(pending + b"\r\n")
        elif not self._emitted and not self._relaxed:
            self._emit(b"\r\n")  # 3.4.3: an empty body is a single CRLF (relaxed: nothing)
        self._empty_lines = 0


class BodyHasher:
    """A hash of the canonical body, of at most ``limit`` octets (``l=``) when given."""

    __slots__ = ("_hash", "count", "limit")

    def __init__(self, algorithm: str, limit: int | None = None) -> None:
        self._hash = HASHES[algorithm]()
        self.limit = limit
        self.count = 0  # canonical octets seen (all of them, past the limit too)

    def __call__(self, data: bytes) -> None:
        limit = self.limit
        if limit is None:
            self._hash.update(data)
        elif self.count < limit:
            self._hash.update(data[: limit - self.count])
        self.count += len(data)

    def digest(self) -> bytes:
        return self._hash.digest()
