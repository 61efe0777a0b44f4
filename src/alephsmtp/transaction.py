"""One mail transaction's state (RFC 5321 3.3): everything between an accepted MAIL and the
reply to its message (or an RSET, a new EHLO, a TLS handshake, the connection's end).

The session holds at most one `Transaction`; starting a new one or dropping it is one
assignment. The envelope is what handlers see; the rest is how the message is being read:
which reader takes the bytes, where they go (a [`MessageSpool`][alephsmtp.spool.MessageSpool], or
``message_chunk`` handlers), how much came, since when.
"""

from __future__ import annotations

import collections
from typing import Any

from .commands import BdatCommand
from .envelope import SmtpEnvelope
from .replies import Reply
from .spool import MessageSpool

__all__ = ["Transaction"]


class Transaction:
    """The state of one mail transaction. Attributes are the session's to read and write."""

    __slots__ = (
        "bdat_command",
        "bdat_refusal",
        "bytes_read",
        "clocked",
        "ended",
        "envelope",
        "first",
        "rate_marks",
        "reader",
        "refusal",
        "size",
        "spool",
        "started",
        "streamed",
    )

    def __init__(self, envelope: SmtpEnvelope) -> None:
        self.envelope = envelope
        #: The reader the message's bytes go through (DataReader, BdatReader), while one runs.
        self.reader: Any = None
        #: The message as it arrives: its first piece as it is (a message in one piece needs
        #: no more), then all of it in a spool (None while nothing came, or when streamed).
        self.first: bytes | None = None
        self.spool: MessageSpool | None = None
        self.size = 0  # BDAT: what the chunks before this one added up to
        self.streamed = 0  # bytes handed to message_chunk handlers
        #: Set when the message can no longer be accepted (a handler's stream failure, the
        #: disk): the reply it gets at its end.
        self.refusal: Reply | None = None
        self.bdat_command: BdatCommand | None = None  # the chunk being read
        self.bdat_refusal: Reply | None = None  # its reply, if it is read only to be dropped
        self.started = 0.0  # when DATA's 354 or the first BDAT came
        self.bytes_read = 0  # bytes read for this message (for min_data_rate)
        self.clocked = False  # the data timeout and rate checks are armed for this message
        self.ended = 0.0  # when its end was read (measure_latency only)
        #: (time, bytes_read) marks of the rate checks, the oldest within the window first.
        self.rate_marks: collections.deque[tuple[float, int]] = collections.deque()

    def discard(self) -> None:
        """Drop what was kept of the message (it will not be delivered)."""
        self.first = None
        spool, self.spool = self.spool, None
        if spool is not None:
            spool.discard()
