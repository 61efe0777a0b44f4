"""Ready-made ``message_received`` handlers: print, store in a Maildir, or discard.

Each is a callable ``handler(session, e)`` to add to a session's ``message_received`` event::

    store = MaildirStore("~/Maildir")
    def on_session(session):
        session.message_received += store
"""

from __future__ import annotations

import mailbox
import os
import sys
import threading
from typing import Any, TextIO

from .envelope import SmtpEnvelope
from .events import MessageReceivedEventArgs

__all__ = ["MaildirStore", "PrintMessage", "envelope_headers", "sink"]


def envelope_headers(envelope: SmtpEnvelope) -> bytes:
    """Trace headers for a stored message: Return-Path and Delivered-To (RFC 5321 4.4)."""
    lines = [f"Return-Path: <{envelope.return_path or ''}>"]
    lines += [f"Delivered-To: {recipient}" for recipient in envelope.recipients]
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def sink(session: Any, e: MessageReceivedEventArgs) -> None:
    """Accept and discard (the default reply, 250 2.0.0)."""


class PrintMessage:
    """Print each message with its envelope, then a separator, to ``stream`` (stdout)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._lock = threading.Lock()

    def __call__(self, session: Any, e: MessageReceivedEventArgs) -> None:
        stream = self.stream if self.stream is not None else sys.stdout
        envelope = e.envelope
        peer = envelope.peer[0] if isinstance(envelope.peer, tuple) else envelope.peer
        header = (
            f"---------- message from {peer} (HELO {envelope.helo_name}) ----------\n"
            f"MAIL FROM: <{envelope.return_path or ''}>\n"
            + "".join(f"RCPT TO: <{rcpt}>\n" for rcpt in envelope.recipients)
            + f"{len(e.message)} bytes\n\n"
        )
        body = e.message.replace(b"\r\n", b"\n").decode("utf-8", "replace")
        with self._lock:
            stream.write(header + body + ("" if body.endswith("\n") else "\n"))
            stream.write("---------- end of message ----------\n")
            stream.flush()


class MaildirStore:
    """Deliver each message into a Maildir (created if missing), with trace headers.

    Files use LF line endings, as Maildir readers expect.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.expanduser(os.fspath(path))
        self.maildir = mailbox.Maildir(self.path, create=True)
        self._lock = threading.Lock()

    def __call__(self, session: Any, e: MessageReceivedEventArgs) -> None:
        data = (envelope_headers(e.envelope) + e.message).replace(b"\r\n", b"\n")
        with self._lock:
            self.maildir.add(data)
