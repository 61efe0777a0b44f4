"""A message as it arrives: in memory while it is small, in a temporary file past a threshold.

Postfix writes its queue file as the data comes; alephsmtp does the same past ``spool_threshold``
bytes, so that a client sending a large message (or many clients sending large messages at once, or
a message that is refused in the end) costs disk, not RAM. Handlers see the message through
[`MessageReceivedEventArgs`][alephsmtp.events.MessageReceivedEventArgs]: ``e.message`` reads it
whole (once, on first use), ``e.open()`` gives a binary file view that reads it in pieces, whichever
way it was kept.

The temporary file has no name (``tempfile.TemporaryFile``): nothing is left behind when the
process dies, and it is deleted once the last reference to the message (the envelope, the
event arguments, a file view) goes away.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
from typing import BinaryIO

__all__ = ["MessageSpool", "SpoolError"]


class SpoolError(Exception):
    """The spooled message cannot be read: it was discarded (the message was refused)."""


class MessageSpool:
    """The bytes of one message: appended with [`write()`][alephsmtp.spool.MessageSpool.write], read
    with [`getvalue()`][alephsmtp.spool.MessageSpool.getvalue] or
    [`open()`][alephsmtp.spool.MessageSpool.open]. Up to ``threshold`` bytes stay in memory; past
    it, everything goes to a temporary file in ``directory`` (the system's temporary directory by
    default).

    ``write`` raises ``OSError`` when the disk refuses (full, read-only): the session then
    answers the message with a temporary error and discards it.
    """

    __slots__ = ("_buffer", "_directory", "_discarded", "_file", "_lock", "_size", "_threshold",
                 "_value")  # fmt: skip

    def __init__(self, threshold: int, directory: str | None = None) -> None:
        self._threshold = threshold
        self._directory = directory
        self._buffer: list[bytes] = []
        self._file: BinaryIO | None = None
        self._size = 0
        self._value: bytes | None = None  # the whole message, once read
        self._discarded = False
        self._lock: threading.Lock | None = None  # for readers without os.pread (Windows)

    def __repr__(self) -> str:
        where = "file" if self._file is not None else "memory"
        return f"<MessageSpool {self._size} bytes in {where}>"

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    @property
    def spooled(self) -> bool:
        """Whether the message went to a temporary file."""
        return self._file is not None

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``."""
        if not chunk:
            return
        self._size += len(chunk)
        file = self._file
        if file is not None:
            file.write(chunk)
            return
        self._buffer.append(chunk)
        if self._size > self._threshold:
            file = tempfile.TemporaryFile(dir=self._directory)  # noqa: SIM115 - kept open
            try:
                file.write(b"".join(self._buffer))
            except BaseException:
                file.close()
                raise
            self._file = file
            self._buffer = []

    def getvalue(self) -> bytes:
        """The whole message (read from its file once, then kept)."""
        if self._value is not None:
            return self._value
        if self._discarded:
            raise SpoolError("the message was discarded")
        file = self._file
        if file is None:
            value = b"".join(self._buffer)
            self._buffer = [value] if value else []
        else:
            file.flush()
            with self.open() as reader:
                value = reader.read()
        self._value = value
        return value

    def open(self) -> BinaryIO:
        """A binary file view of the message from its start (readable and seekable); views
        are independent of each other."""
        if self._value is not None:
            return io.BytesIO(self._value)
        if self._discarded:
            raise SpoolError("the message was discarded")
        file = self._file
        if file is None:
            return io.BytesIO(b"".join(self._buffer))
        file.flush()
        if self._lock is None and not hasattr(os, "pread"):
            self._lock = threading.Lock()
        return io.BufferedReader(_FileView(file, self._size, self._lock))

    def discard(self) -> None:
        """Drop the message now (it was refused): its memory and its file go."""
        self._discarded = True
        self._buffer = []
        self._value = None
        file, self._file = self._file, None
        if file is not None:
            file.close()


class _FileView(io.RawIOBase):
    """A read-only view of the first ``size`` bytes of ``file``, with its own position.

    Reads use ``os.pread``, which leaves the file's own offset alone, so any number of views
    (and the writer) can share the file; without it (Windows) a lock guards seek + read.
    """

    def __init__(self, file: BinaryIO, size: int, lock: threading.Lock | None) -> None:
        super().__init__()
        self._file = file
        self._fd = file.fileno()
        self._size = size
        self._lock = lock
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._position + offset
        elif whence == io.SEEK_END:
            position = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence!r}")
        if position < 0:
            raise ValueError("negative seek position")
        self._position = position
        return position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        wanted = min(len(buffer), self._size - self._position)
        if wanted <= 0:
            return 0
        if self._lock is None:
            data = os.pread(self._fd, wanted, self._position)
        else:
            with self._lock:
                self._file.seek(self._position)
                data = self._file.read(wanted)
                self._file.seek(0, io.SEEK_END)
        count = len(data)
        memoryview(buffer)[:count] = data
        self._position += count
        return count
