"""Ready-made ``message_received`` handlers: print, store (Maildir, mbox, .eml files), relay.

Each is a callable ``handler(session, e)`` to add to a session's ``message_received`` event::

    store = MaildirStore("~/Maildir")
    def on_session(session):
        session.message_received += store

A handler that stores or relays returns ``None`` when it succeeded, so the next handler of the
event runs too (store *and* relay), and a reply when it did not (a temporary ``4xx`` for a
local problem such as a busy mailbox or an unreachable upstream, so the client tries again; the
upstream's own refusal for a message the upstream refused). The first reply decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import errno
import functools
import logging
import mailbox
import os
import re
import secrets
import smtplib
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO, cast

from . import replies as R
from .envelope import SmtpEnvelope
from .events import MessageReceivedEventArgs, Pending, run_chain
from .replies import Reply, coerce_reply
from .session import SessionLogger, SmtpSession
from .tls import describe

__all__ = [
    "Deliver",
    "EmlDirectory",
    "MaildirStore",
    "MboxStore",
    "PrintMessage",
    "Relay",
    "Store",
    "StoreBusy",
    "envelope_headers",
    "sink",
]

log = logging.getLogger("alephsmtp.handlers")
_Logger = logging.Logger | logging.LoggerAdapter  # type: ignore[type-arg]


def _logger_of(session: Any) -> _Logger:
    """This module's logger, its lines naming the session and the peer as the session's own
    do, when the handler runs for a session."""
    return SessionLogger(log, session) if isinstance(session, SmtpSession) else log


# Local trouble is temporary (RFC 5321 4.2.1: 4yz, the client keeps the message and retries);
# a 554 from a raising handler would make the client bounce a message we simply failed to store.


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


class Store:
    """A ``message_received`` handler that stores each message where it stays (a mailbox, a
    directory), and can take a stored message back.

    ``store(e)`` stores the message and returns a receipt; ``remove(receipt)`` takes it back
    ([`Deliver`][alephsmtp.handlers.Deliver] does, when a later output fails, so that the client's
    retry does not store the message twice). Called as a handler, a store answers ``None`` (the next
    handler runs) or a temporary failure: ``452 4.3.1`` for a full disk, ``451 4.2.0`` for a busy
    mailbox, ``451 4.3.0`` for any other storage error. Every store behaves alike.
    """

    path: str

    def __call__(self, session: Any, e: MessageReceivedEventArgs) -> Reply | None:
        logger = _logger_of(session)
        try:
            self.store(e)
        except StoreBusy:
            logger.warning("%s is busy", self.path)
            return R.MAILBOX_BUSY
        except OSError as error:
            return _storage_failure(self.path, error, logger)
        logger.info("stored in %s", self.path)
        return None

    def store(self, e: MessageReceivedEventArgs) -> object:
        """Store the message; a receipt for [`remove()`][alephsmtp.handlers.Store.remove]. Raises
        ``OSError`` or [`StoreBusy`][alephsmtp.handlers.StoreBusy]."""
        raise NotImplementedError

    def remove(self, receipt: object) -> bool:
        """Take a stored message back; whether it could be."""
        raise NotImplementedError


class StoreBusy(Exception):
    """The store is locked by another program: try again later (451 4.2.0)."""


def _usable_directory(path: str) -> None:
    """``NotADirectoryError`` for a path that exists and is not a directory, so a store
    pointed at a file fails when it is made (the CLI says so at start), not per message."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)


class MaildirStore(Store):
    """Deliver each message into a Maildir (created if missing), with trace headers.

    Files use LF line endings, as Maildir readers expect.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.expanduser(os.fspath(path))
        _usable_directory(self.path)
        self.maildir = mailbox.Maildir(self.path, create=True)
        for sub in ("tmp", "new", "cur"):
            _usable_directory(os.path.join(self.path, sub))
        self._lock = threading.Lock()

    def store(self, e: MessageReceivedEventArgs) -> object:
        data = (envelope_headers(e.envelope) + e.message).replace(b"\r\n", b"\n")
        with self._lock:
            return self.maildir.add(data)

    def remove(self, receipt: object) -> bool:
        try:
            with self._lock:
                self.maildir.remove(str(receipt))
        except (KeyError, OSError) as error:
            log.warning("cannot take message %s back from %s: %s", receipt, self.path, error)
            return False
        return True


def _storage_failure(what: str, error: OSError, logger: _Logger = log) -> Reply:
    """The reply for a message that could not be stored: a full disk is said as such."""
    logger.error("cannot store message in %s: %s", what, error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return R.STORAGE_FULL
    return R.LOCAL_ERROR


class MboxStore(Store):
    """Append each message to an mbox file (created if missing), locked while writing.

    The file is written by the standard library's `mailbox.mbox`: a ``From `` line with
    the envelope sender (``MAILER-DAEMON`` for the null sender) and the time, the message with
    LF line endings and body lines that start with ``From `` written as ``>From `` (the mbox
    convention, so they cannot start a message), and a blank line. With ``trace_headers``
    (the default) ``Return-Path`` and ``Delivered-To`` come first (RFC 5321 4.4).

    The mbox is locked as mail readers expect (``fcntl`` and a ``.lock`` file) and never
    waited for: while another program holds the lock the client gets ``451 4.2.0`` and tries
    again later. If the file is replaced (a mail reader rewrote it) or removed, it is opened
    again, so nothing is appended to a file nobody will read.
    """

    def __init__(self, path: str | os.PathLike[str], *, trace_headers: bool = True) -> None:
        self.path = os.path.expanduser(os.fspath(path))
        self.trace_headers = trace_headers
        self._lock = threading.Lock()
        self._mbox: mailbox.mbox | None = None
        self._identity: tuple[int, int] | None = None
        with self._lock:
            self._open()

    def _open(self) -> mailbox.mbox:
        if self._mbox is not None:
            self._mbox.close()
        self._mbox = mailbox.mbox(self.path, create=True)
        stat = os.stat(self.path)
        self._identity = (stat.st_dev, stat.st_ino)
        return self._mbox

    def _current(self) -> mailbox.mbox:
        """The open mbox, reopened if the file at ``path`` is no longer the one we hold."""
        try:
            stat = os.stat(self.path)
            same = (stat.st_dev, stat.st_ino) == self._identity
        except FileNotFoundError:
            same = False
        if self._mbox is None or not same:
            return self._open()
        return self._mbox

    def store(self, e: MessageReceivedEventArgs) -> object:
        envelope = e.envelope
        body = envelope_headers(envelope) + e.message if self.trace_headers else e.message
        sender = str(envelope.return_path) if envelope.return_path else "MAILER-DAEMON"
        # The From_ line is ours (RFC 4155: envelope sender and date); mailbox.mbox takes a
        # leading "From " line as given and mangles every later line that starts with "From ".
        from_line = f"From {sender} {time.asctime(time.gmtime())}\n".encode()
        data = from_line + body.replace(b"\r\n", b"\n")
        with self._lock:
            box = self._current()
            try:
                box.lock()
            except mailbox.ExternalClashError:
                log.warning("mbox %s is locked by another program", self.path)
                raise StoreBusy(self.path) from None
            try:
                start = os.path.getsize(self.path)
                box.add(data)
                box.flush()
                end = os.path.getsize(self.path)
            finally:
                box.unlock()
        return (self._identity, start, end)

    def remove(self, receipt: object) -> bool:
        """Cut the message off the end of the file, if nothing was appended after it."""
        identity, start, end = cast(tuple[tuple[int, int], int, int], receipt)
        with self._lock:
            try:
                box = self._current()
                box.lock()
            except (mailbox.ExternalClashError, OSError) as error:
                log.warning("cannot take a message back from %s: %s", self.path, error)
                return False
            try:
                if self._identity != identity or os.path.getsize(self.path) != end:
                    log.warning("cannot take a message back from %s: it changed", self.path)
                    return False
                box.close()  # mailbox.mbox keeps offsets: reopened after the cut
                self._mbox = None
                os.truncate(self.path, start)
                return True
            except OSError as error:
                log.warning("cannot take a message back from %s: %s", self.path, error)
                return False
            finally:
                with contextlib.suppress(OSError):
                    box.unlock()

    def close(self) -> None:
        """Close the mbox file."""
        with self._lock:
            if self._mbox is not None:
                self._mbox.close()
                self._mbox = None


class EmlDirectory(Store):
    """Write each message to its own ``.eml`` file in a directory (created if missing).

    The file holds the message exactly as received, CRLF line endings kept, after the
    ``Return-Path`` and ``Delivered-To`` trace headers unless ``trace_headers=False``. Names
    sort in arrival order and are unique (``<nanoseconds>-<random>.eml``). A file appears
    whole or not at all: it is written under a hidden temporary name in the same directory
    and renamed (atomic on POSIX and Windows). ``fsync=True`` also forces it to disk before
    the client is told the message is accepted, at the cost of a disk flush per message.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        trace_headers: bool = True,
        fsync: bool = False,
    ) -> None:
        self.path = os.path.expanduser(os.fspath(path))
        self.trace_headers = trace_headers
        self.fsync = fsync
        _usable_directory(self.path)
        os.makedirs(self.path, exist_ok=True)
        self._last_stamp = 0
        self._stamp_lock = threading.Lock()

    def store(self, e: MessageReceivedEventArgs) -> object:
        data = envelope_headers(e.envelope) + e.message if self.trace_headers else e.message
        return self.write(data)

    def remove(self, receipt: object) -> bool:
        try:
            os.unlink(str(receipt))
        except OSError as error:
            log.warning("cannot take message %s back: %s", receipt, error)
            return False
        return True

    def write(self, data: bytes) -> str:
        """Write ``data`` to a new ``.eml`` file atomically; returns its path."""
        with self._stamp_lock:
            # Strictly increasing, so names sort in arrival order even where the clock is
            # coarse (Windows); the random part keeps other processes' names apart.
            self._last_stamp = stamp = max(time.time_ns(), self._last_stamp + 1)
        name = f"{stamp:020d}-{secrets.token_hex(6)}.eml"
        fd, temporary = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                if self.fsync:
                    file.flush()
                    os.fsync(file.fileno())
            final = os.path.join(self.path, name)
            os.replace(temporary, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        if self.fsync and hasattr(os, "O_DIRECTORY"):
            # The rename is durable only once the directory entry is (POSIX).
            directory = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        return final


# --- relaying ----------------------------------------------------------------------------

_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3}) ")
_LINE_ENDING = re.compile(rb"\r\n|\r|\n")

RelayClient = Literal["auto", "aiosmtplib", "smtplib"]


@dataclass(slots=True)
class _Upstream:
    """What the upstream made of one message: refused whole, or recipients refused."""

    failure: Reply | None = None
    refused: dict[str, Reply] = field(default_factory=dict)


def _upstream_reply(code: int, text: str, prefix: str) -> Reply:
    """The upstream's refusal, as our reply: its code and enhanced code, its text."""
    if not 400 <= code <= 599:
        return R.UPSTREAM_LOST  # not a refusal any client could act on
    enhanced: str | None = None
    match = _ENHANCED.match(text + " ")
    if match is not None and match.group(1)[0] == str(code)[0]:
        enhanced = match.group(1)
        text = text[match.end() :]
    return Reply(code, enhanced, f"{prefix}{' '.join(text.split())}".strip())


def _have_aiosmtplib() -> bool:
    try:
        import aiosmtplib  # noqa: F401
    except ImportError:
        return False
    return True


class Relay:
    """Forward each message to an upstream SMTP server (a smarthost).

    ``Relay("smtp.example.org", 587, starttls=True, username="u", password="p")`` sends each
    message on, over a connection of its own, with the same envelope (SMTPUTF8 and
    ``BODY=8BITMIME`` carried over) and a ``Received:`` trace header on top (RFC 5321 4.4).
    It is an ``async`` handler: with ``aiosmtplib`` installed it uses it, else the standard
    library's `smtplib` in a worker thread, so the event loop never blocks
    (``client="smtplib"`` or ``"aiosmtplib"`` chooses).

    The client's reply says what the upstream did:

    - accepted for every recipient: ``None``, the default ``250`` (and later handlers run);
    - refused (at MAIL, RCPT or after DATA): the upstream's own code, enhanced code and text,
      so ``550 5.1.1`` upstream is ``550 5.1.1`` here. When only some recipients were refused
      the first refusal is the reply: the client reports (5xx) or retries (4xx) the message,
      and the recipients who got it may get it again on a retry — a duplicate rather than a
      lost message. In an LMTP session each recipient gets its own reply instead;
    - no connection (refused, unreachable, no greeting within ``timeout``): ``451 4.4.1``;
      the connection lost or timed out later: ``451 4.4.2``; STARTTLS or AUTH refused
      upstream, the TLS handshake failed or the upstream's certificate not verified:
      ``451 4.7.0``, with the reason logged — the relay's trouble, never a bounce.

    ``starttls=True`` requires STARTTLS and verifies the upstream's certificate against
    ``tls_context`` (default: the system's trusted CAs; for a private CA,
    ``ssl.create_default_context(cafile=...)``). ``timeout`` bounds each step.
    """

    def __init__(
        self,
        host: str,
        port: int = 25,
        *,
        starttls: bool = False,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        tls_context: ssl.SSLContext | None = None,
        local_hostname: str | None = None,
        received_header: bool = True,
        client: RelayClient = "auto",
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("username and password go together")
        if client not in ("auto", "aiosmtplib", "smtplib"):
            raise ValueError("client must be 'auto', 'aiosmtplib' or 'smtplib'")
        self.host = host
        self.port = port
        self.starttls = starttls
        self.username = username
        self.password = password
        self.timeout = timeout
        self.tls_context = tls_context
        self.local_hostname = local_hostname
        self.received_header = received_header
        if client == "auto":
            client = "aiosmtplib" if _have_aiosmtplib() else "smtplib"
        self.client: RelayClient = client

    def __repr__(self) -> str:
        # Never the password: reprs end up in logs.
        return f"<Relay {self.host}:{self.port} via {self.client}>"

    async def __call__(
        self, session: Any, e: MessageReceivedEventArgs
    ) -> Reply | list[Reply] | None:
        envelope = e.envelope
        logger = _logger_of(session)
        if e.streamed:
            logger.error("Relay needs the whole message; it cannot relay streamed messages")
            return R.RELAY_STREAMED
        if envelope.body_type == "BINARYMIME":
            # RFC 3030 3: DATA cannot carry it, and we do not convert (5.6.3).
            return R.RELAY_BINARYMIME
        message = e.message
        # BDAT bodies follow no line rules; DATA needs CRLF lines, so a bare CR or LF is sent
        # as CRLF rather than as a bare line end some upstream could read as an end of data.
        if message.count(b"\n") != message.count(b"\r\n") or message.count(b"\r") != (
            message.count(b"\r\n")
        ):
            message = _LINE_ENDING.sub(b"\r\n", message)
        if self.received_header:
            message = _received_header(session, envelope) + message
        sender = str(envelope.return_path or "")
        recipients = [str(recipient) for recipient in envelope.recipients]
        options = ["SMTPUTF8"] if envelope.smtputf8 else []
        if envelope.body_type == "8BITMIME":
            options.append("BODY=8BITMIME")
        if self.client == "aiosmtplib":
            outcome = await self._send_aiosmtplib(sender, recipients, message, options, logger)
        else:
            outcome = await asyncio.to_thread(
                self._send_smtplib, sender, recipients, message, options, logger
            )
        return self._reply(session, recipients, outcome, logger)

    def _reply(
        self, session: Any, recipients: Sequence[str], outcome: _Upstream, logger: _Logger
    ) -> Reply | list[Reply] | None:
        if outcome.failure is not None:
            logger.info("relay to %s:%s refused: %s", self.host, self.port, outcome.failure)
            return outcome.failure
        if not outcome.refused:
            logger.info("relayed to %s:%s", self.host, self.port)
            return None
        logger.info(
            "relay to %s:%s refused %d recipient(s)", self.host, self.port, len(outcome.refused)
        )
        if getattr(session, "lmtp", False):
            relayed = Reply(250, "2.0.0", "OK: relayed")
            return [outcome.refused.get(recipient, relayed) for recipient in recipients]
        return next(iter(outcome.refused.values()))

    def _tls_failure(self, error: ssl.SSLError, logger: _Logger) -> Reply:
        """The TLS handshake with the upstream failed: the reason logged (OpenSSL's words,
        or the exception's name when it has none), ``451 4.7.0`` for the client."""
        reason = describe(error)
        if isinstance(error, ssl.SSLCertVerificationError):
            what, reply = "TLS certificate not trusted", R.UPSTREAM_CERTIFICATE
        else:
            what, reply = "TLS handshake failed", R.UPSTREAM_SECURITY
        logger.warning("upstream %s:%s: %s: %s", self.host, self.port, what, reason)
        return reply

    async def _send_aiosmtplib(
        self,
        sender: str,
        recipients: list[str],
        message: bytes,
        options: list[str],
        logger: _Logger,
    ) -> _Upstream:
        import aiosmtplib

        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            timeout=self.timeout,
            start_tls=self.starttls,
            tls_context=self.tls_context,
            local_hostname=self.local_hostname,
        )
        try:
            try:
                await client.connect()
            except aiosmtplib.SMTPConnectResponseError as error:
                logger.warning("upstream %s:%s greeted with %s", self.host, self.port, error)
                return _Upstream(R.UPSTREAM_UNREACHABLE)
            except ssl.SSLError as error:
                # Before OSError, its base class: the server was reached; TLS failed.
                return _Upstream(self._tls_failure(error, logger))
            except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError, OSError) as error:
                logger.warning("cannot connect to upstream %s:%s: %s", self.host, self.port, error)
                return _Upstream(R.UPSTREAM_UNREACHABLE)
            except aiosmtplib.SMTPException as error:  # EHLO or STARTTLS refused
                logger.warning("upstream %s:%s: %s", self.host, self.port, error)
                return _Upstream(R.UPSTREAM_SECURITY)
            if self.username is not None and self.password is not None:
                try:
                    await client.login(self.username, self.password)
                except aiosmtplib.SMTPResponseException as error:
                    logger.warning(
                        "upstream %s:%s refused AUTH: %s", self.host, self.port, error.code
                    )
                    return _Upstream(R.UPSTREAM_SECURITY)
                except aiosmtplib.SMTPException as error:  # no AUTH offered
                    logger.warning("upstream %s:%s: %s", self.host, self.port, error)
                    return _Upstream(R.UPSTREAM_SECURITY)
            try:
                refused, _ = await client.sendmail(
                    sender, recipients, message, mail_options=options
                )
            except aiosmtplib.SMTPRecipientsRefused as error:
                return _Upstream(
                    refused={
                        each.recipient: _upstream_reply(
                            each.code, each.message, f"<{each.recipient}>: "
                        )
                        for each in error.recipients
                    }
                )
            except aiosmtplib.SMTPNotSupported:
                return _Upstream(R.UPSTREAM_NO_UTF8)
            except (aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPDataError) as error:
                return _Upstream(_upstream_reply(error.code, error.message, ""))
            except aiosmtplib.SMTPResponseException as error:
                return _Upstream(_upstream_reply(error.code, error.message, ""))
            except (aiosmtplib.SMTPException, OSError) as error:
                logger.warning("upstream %s:%s: %s", self.host, self.port, error)
                return _Upstream(R.UPSTREAM_LOST)
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.quit()
            return _Upstream(
                refused={
                    recipient: _upstream_reply(response.code, response.message, f"<{recipient}>: ")
                    for recipient, response in refused.items()
                }
            )
        finally:
            client.close()

    def _send_smtplib(
        self,
        sender: str,
        recipients: list[str],
        message: bytes,
        options: list[str],
        logger: _Logger,
    ) -> _Upstream:
        try:
            client = smtplib.SMTP(
                self.host, self.port, local_hostname=self.local_hostname, timeout=self.timeout
            )
        except smtplib.SMTPConnectError as error:
            logger.warning("upstream %s:%s greeted with %s", self.host, self.port, error.smtp_code)
            return _Upstream(R.UPSTREAM_UNREACHABLE)
        except (smtplib.SMTPException, OSError) as error:
            logger.warning("cannot connect to upstream %s:%s: %s", self.host, self.port, error)
            return _Upstream(R.UPSTREAM_UNREACHABLE)
        try:
            try:
                if self.starttls:
                    # smtplib's own default context checks no certificate; ours does.
                    client.starttls(context=self.tls_context or ssl.create_default_context())
                if self.username is not None and self.password is not None:
                    client.login(self.username, self.password)
            except ssl.SSLError as error:  # before OSError, its base class
                return _Upstream(self._tls_failure(error, logger))
            except smtplib.SMTPException as error:
                logger.warning("upstream %s:%s: %s", self.host, self.port, error)
                return _Upstream(R.UPSTREAM_SECURITY)
            except OSError as error:
                logger.warning("upstream %s:%s: %s", self.host, self.port, error)
                return _Upstream(R.UPSTREAM_LOST)
            try:
                refused = client.sendmail(sender, recipients, message, mail_options=options)
            except smtplib.SMTPRecipientsRefused as error:
                return _Upstream(
                    refused={
                        recipient: _upstream_reply(code, _text(text), f"<{recipient}>: ")
                        for recipient, (code, text) in error.recipients.items()
                    }
                )
            except smtplib.SMTPNotSupportedError:
                return _Upstream(R.UPSTREAM_NO_UTF8)
            except smtplib.SMTPResponseException as error:  # MAIL or DATA refused
                return _Upstream(_upstream_reply(error.smtp_code, _text(error.smtp_error), ""))
            except (smtplib.SMTPException, OSError) as error:
                logger.warning("upstream %s:%s: %s", self.host, self.port, error)
                return _Upstream(R.UPSTREAM_LOST)
            # The message is delivered: what QUIT gets back changes nothing (RFC 5321 4.1.1.10).
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()
        finally:
            client.close()
        return _Upstream(
            refused={
                recipient: _upstream_reply(code, _text(text), f"<{recipient}>: ")
                for recipient, (code, text) in refused.items()
            }
        )


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _received_header(session: Any, envelope: SmtpEnvelope) -> bytes:
    """A ``Received:`` trace header for a message passed on (RFC 5321 4.4, RFC 3848)."""
    peer = envelope.peer
    ip = str(peer[0]) if isinstance(peer, tuple) and peer else None
    literal = f"[IPv6:{ip}]" if ip and ":" in ip else f"[{ip}]" if ip else None
    # The session refuses a HELO name with control characters; a handler may have set one:
    # no client-chosen byte may end the header line (header injection).
    helo = "".join(c if c.isprintable() else "?" for c in envelope.helo_name or "unknown")
    source = helo + (f" ({literal})" if literal else "")
    config = getattr(session, "config", None)
    by = getattr(config, "hostname", None) or "localhost"
    # RFC 3848: ESMTP, plus S for TLS and A for AUTH; LMTP likewise; HELO is plain SMTP.
    if getattr(session, "lmtp", False):
        protocol = "LMTP"
    else:
        protocol = "ESMTP" if getattr(session, "esmtp", True) else "SMTP"
    if protocol != "SMTP":
        suffix = ("S" if envelope.tls else "") + ("A" if envelope.auth_identity else "")
        protocol += suffix
    # One recipient may be named (RFC 5321 4.4 "for"); several would disclose each other.
    for_clause = f"\r\n\tfor <{envelope.recipients[0]}>" if len(envelope.recipients) == 1 else ""
    date = email.utils.formatdate(localtime=True)
    header = f"Received: from {source}\r\n\tby {by} with {protocol}{for_clause}; {date}\r\n"
    return header.encode("utf-8")


# --- several outputs, all or nothing ----------------------------------------------------


class Deliver:
    """Several outputs as one ``message_received`` handler: each store, then (last) a relay or
    any other handler, in order; the message is accepted only if every output took it.

    When an output refuses or fails, what the stores before it stored is taken back
    ([`Store.remove()`][alephsmtp.handlers.Store.remove]) and the client gets that output's reply: a
    temporary failure makes it try again, and its retry does not leave the message stored twice. (A
    relay cannot be taken back: put it last.) Outputs answer as handlers do; the first reply
    decides.
    """

    def __init__(self, *outputs: Callable[[Any, MessageReceivedEventArgs], Any]) -> None:
        if not outputs:
            raise ValueError("Deliver needs at least one output")
        self.outputs = outputs

    def __repr__(self) -> str:
        return f"<Deliver {', '.join(repr(output) for output in self.outputs)}>"

    def __call__(self, session: Any, e: MessageReceivedEventArgs) -> Any:
        # The outputs run as a handler chain (inline while they answer inline); each store
        # notes its receipt, so that a refusal or failure further on takes it back.
        receipts: list[tuple[Store, object]] = []
        steps = [
            functools.partial(self._store, output, receipts=receipts)
            if isinstance(output, Store)
            else output
            for output in self.outputs
        ]
        try:
            result = run_chain(steps, session, e)
        except BaseException:
            self._take_back(receipts)
            raise
        if type(result) is Pending:
            return self._finish(result.coroutine, receipts)
        return None if result is None else self._decided(result, receipts)

    async def _finish(self, pending: Awaitable[Any], receipts: list[tuple[Store, object]]) -> Any:
        try:
            result = await pending
        except BaseException:
            self._take_back(receipts)
            raise
        return None if result is None else self._decided(result, receipts)

    def _store(
        self,
        store: Store,
        session: Any,
        e: MessageReceivedEventArgs,
        *,
        receipts: list[tuple[Store, object]],
    ) -> Reply | None:
        logger = _logger_of(session)
        try:
            receipt = store.store(e)
        except StoreBusy:
            self._take_back(receipts)
            logger.warning("%s is busy", store.path)
            return R.MAILBOX_BUSY
        except OSError as error:
            self._take_back(receipts)
            return _storage_failure(store.path, error, logger)
        except BaseException:
            self._take_back(receipts)
            raise
        receipts.append((store, receipt))
        logger.info("stored in %s", store.path)
        return None

    def _decided(self, result: Any, receipts: list[tuple[Store, object]]) -> Any:
        if not _accepts(result):
            self._take_back(receipts)
        return result

    @staticmethod
    def _take_back(receipts: list[tuple[Store, object]]) -> None:
        for store, receipt in reversed(receipts):
            store.remove(receipt)
        receipts.clear()


def _accepts(result: Any) -> bool:
    """Whether a handler's answer accepts the message (for LMTP: for any recipient)."""
    if isinstance(result, (list, tuple)):
        return any(_accepts(each) for each in result)
    try:
        return coerce_reply(result).code // 100 == 2
    except (TypeError, ValueError):
        return False
