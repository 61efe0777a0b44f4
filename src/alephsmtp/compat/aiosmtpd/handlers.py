"""``aiosmtpd.handlers``: the stock handlers (``Sink``, ``Debugging``, ``Message``,
``AsyncMessage``, ``Mailbox``, ``Proxy``), with aiosmtpd 1.4's behaviour.

Written for alephsmtp from aiosmtpd's documentation; they take the same arguments and do the
same work. ``Proxy`` differs where aiosmtpd loses mail (see ``docs/aiosmtpd.md``): it delivers
in a worker thread instead of blocking the event loop, and when the upstream server could not
take the message for any recipient the client is told so instead of getting ``250 OK``.
"""

from __future__ import annotations

import asyncio
import logging
import mailbox
import os
import re
import smtplib
import sys
from abc import ABCMeta, abstractmethod
from argparse import ArgumentParser
from email.message import Message as EmailMessage
from email.parser import BytesParser, Parser
from typing import Any, TextIO, TypeVar

from .smtp import SMTP, Envelope, Session

__all__ = ["AsyncMessage", "Debugging", "Mailbox", "Message", "MessageBase", "Proxy", "Sink"]

log = logging.getLogger("alephsmtp.compat.aiosmtpd")

T = TypeVar("T")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


class Debugging:
    """Print every message (envelope options, then the content with an ``X-Peer`` header
    after the headers) to ``stream`` (standard output by default)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream: TextIO = sys.stdout if stream is None else stream

    @classmethod
    def from_cli(cls, parser: ArgumentParser, *args: str) -> Debugging:
        """``-c ...Debugging [stdout|stderr]``."""
        if not args:
            return cls()
        if len(args) == 1 and args[0] in ("stdout", "stderr"):
            return cls(getattr(sys, args[0]))
        parser.error("Debugging usage: [stdout|stderr]")
        raise AssertionError("unreachable")  # pragma: no cover - parser.error exits

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        out = self.stream
        print("---------- MESSAGE FOLLOWS ----------", file=out)
        separate = False
        if envelope.mail_options:
            print("mail options:", envelope.mail_options, file=out)
            separate = True
        if any(envelope.rcpt_options):
            print("rcpt options:", envelope.rcpt_options, file=out)
            separate = True
        if separate:
            print(file=out)
        content = envelope.content if envelope.content is not None else b""
        in_headers = True
        for line in content.splitlines():
            if in_headers and not line:
                print(f"X-Peer: {session.peer!r}", file=out)
                in_headers = False
            print(line.decode("utf-8", "replace") if isinstance(line, bytes) else line, file=out)
        print("------------ END MESSAGE ------------", file=out)
        return "250 OK"


class Proxy:
    """Forward every message to ``remote_hostname``:``remote_port`` (smtplib, in a worker
    thread), with an ``X-Peer`` header naming the client."""

    def __init__(self, remote_hostname: str, remote_port: int) -> None:
        self._hostname = remote_hostname
        self._port = remote_port

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = (
            envelope.original_content if isinstance(envelope.content, str) else envelope.content
        )
        assert isinstance(content, bytes) and envelope.mail_from is not None
        lines = content.splitlines(keepends=True)
        # The X-Peer header goes last among the headers, with their line ending.
        at, ending = len(lines), b"\r\n"
        for index, line in enumerate(lines):
            if _LINE_BREAK.fullmatch(line):
                at, ending = index, line
                break
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        lines.insert(at, b"X-Peer: " + peer.encode("ascii", "replace") + ending)
        data = b"".join(lines)
        recipients = list(envelope.rcpt_tos)
        refused = await asyncio.get_running_loop().run_in_executor(
            None, self._deliver, envelope.mail_from, recipients, data
        )
        if refused:
            log.info("we got some refusals: %s", refused)
        if recipients and set(recipients) <= set(refused):
            # No recipient got it: the client must not be told it was delivered. A failure to
            # reach the upstream (aiosmtpd's code -1) or a 4xx is temporary (RFC 5321 4.2.5).
            codes = [code for code, _ in refused.values()]
            if any(code < 500 for code in codes):
                return "451 4.4.1 Error: upstream server unavailable, try again later"
            code, text = next(iter(refused.values()))
            message = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
            return f"{code} {' '.join(message.split())}"
        return "250 OK"

    def _deliver(self, mail_from: str, rcpt_tos: list[str], data: bytes | str) -> Any:
        """Send with smtplib; the refused recipients, ``{address: (code, text)}``."""
        refused: dict[str, tuple[int, bytes]] = {}
        try:
            client = smtplib.SMTP()
            client.connect(self._hostname, self._port)
            try:
                refused = client.sendmail(mail_from, rcpt_tos, data)
            finally:
                client.quit()
        except smtplib.SMTPRecipientsRefused as error:
            log.info("got SMTPRecipientsRefused")
            refused = dict(error.recipients)
        except (OSError, smtplib.SMTPException) as error:
            log.exception("got %s", error.__class__)
            code = getattr(error, "smtp_code", -1)
            text = getattr(error, "smtp_error", b"ignore")
            refused = dict.fromkeys(rcpt_tos, (code, text))
        return refused


class Sink:
    """Accept every message and discard it (no hooks: every reply is the default)."""

    @classmethod
    def from_cli(cls, parser: ArgumentParser, *args: str) -> Sink:
        """``-c ...Sink`` (no arguments)."""
        if args:
            parser.error("Sink handler does not accept arguments")
        return cls()


class MessageBase(metaclass=ABCMeta):
    """Turn each message into an `email.message.Message` (``message_class``) with
    ``X-Peer``, ``X-MailFrom`` and ``X-RcptTo`` headers, for `handle_message()`."""

    def __init__(self, message_class: type[EmailMessage] | None = None) -> None:
        self.message_class = message_class

    def prepare_message(self, session: Session, envelope: Envelope) -> EmailMessage:
        data = envelope.content
        message: EmailMessage
        if isinstance(data, (bytes, bytearray)):
            message = BytesParser(self.message_class).parsebytes(bytes(data))
        elif isinstance(data, str):
            message = Parser(self.message_class).parsestr(data)
        else:
            raise TypeError(f"Expected str or bytes, got {type(data)}")
        message["X-Peer"] = str(session.peer)
        message["X-MailFrom"] = envelope.mail_from or ""
        message["X-RcptTo"] = ", ".join(envelope.rcpt_tos)
        return message

    @abstractmethod
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str: ...


class Message(MessageBase, metaclass=ABCMeta):
    """Calls the synchronous ``handle_message(message)`` for every message."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.handle_message(self.prepare_message(session, envelope))
        return "250 OK"

    @abstractmethod
    def handle_message(self, message: EmailMessage) -> None: ...


class AsyncMessage(MessageBase, metaclass=ABCMeta):
    """Awaits ``handle_message(message)`` for every message."""

    def __init__(
        self,
        message_class: type[EmailMessage] | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(message_class)
        self._loop = loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop given, else the one running (aiosmtpd creates one at construction)."""
        if self._loop is not None:
            return self._loop
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.get_event_loop_policy().get_event_loop()

    @loop.setter
    def loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._loop = loop

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await self.handle_message(self.prepare_message(session, envelope))
        return "250 OK"

    @abstractmethod
    async def handle_message(self, message: EmailMessage) -> None: ...


class Mailbox(Message):
    """Store every message in the Maildir ``mail_dir`` (stdlib `mailbox.Maildir`)."""

    def __init__(
        self, mail_dir: str | os.PathLike[str], message_class: type[EmailMessage] | None = None
    ) -> None:
        self.mailbox = mailbox.Maildir(mail_dir)
        self.mail_dir = mail_dir
        super().__init__(message_class)

    def handle_message(self, message: EmailMessage) -> None:
        self.mailbox.add(message)

    def reset(self) -> None:
        """Remove every message from the Maildir."""
        self.mailbox.clear()

    @classmethod
    def from_cli(cls, parser: ArgumentParser, *args: str) -> Mailbox:
        """``-c ...Mailbox <maildir>``."""
        if len(args) != 1:
            parser.error(
                "The directory for the maildir is required"
                if not args
                else "Too many arguments for Mailbox handler"
            )
        return cls(args[0])
