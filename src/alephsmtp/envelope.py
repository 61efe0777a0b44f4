"""The envelope of one mail transaction (RFC 5321 2.3.1): who sent it, to whom, and how."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from .addresses import Address
from .spool import MessageSpool

if TYPE_CHECKING:
    from .milter.report import MilterReport

__all__ = ["SmtpEnvelope"]


@dataclass(slots=True)
class SmtpEnvelope:
    """Filled in by the session as MAIL and RCPT are accepted; handed to ``message_received``.

    ``recipients`` holds only the recipients that got a 2xx reply, in order, and
    ``rcpt_parameters``, ``dsn_notify`` and ``dsn_orcpt`` their ESMTP parameters at the same index.
    ``message`` is the message once it has been received whole (the seed's ``MessageBody``): read on
    first use, from memory or from the temporary file a large message was spooled to;
    [`open_message()`][alephsmtp.envelope.SmtpEnvelope.open_message] reads it as a file instead.
    """

    return_path: Address | None = None
    recipients: list[Address] = field(default_factory=list)
    mail_parameters: dict[str, str | None] = field(default_factory=dict)
    rcpt_parameters: list[dict[str, str | None]] = field(default_factory=list)
    helo_name: str | None = None
    peer: Any = None
    smtputf8: bool = False
    body_type: str | None = None
    dsn_ret: str | None = None  # RFC 3461 RET=: FULL or HDRS
    dsn_envid: str | None = None  # RFC 3461 ENVID=, decoded
    dsn_notify: list[tuple[str, ...] | None] = field(default_factory=list)  # per recipient
    dsn_orcpt: list[tuple[str, str] | None] = field(default_factory=list)  # per recipient
    auth_identity: str | None = None  # who authenticated (RFC 4954) on this session
    auth_submitter: str | None = None  # MAIL ... AUTH=, decoded (RFC 4954 5)
    tls: bool = False  # the transaction came over TLS
    # XFORWARD (Postfix): what a trusted MTA said of the original client (NAME, ADDR, PORT,
    # PROTO, HELO, IDENT, SOURCE), for this transaction.
    xforward: dict[str, str] = field(default_factory=dict)
    # The typed values of parameters of registered extensions (alephsmtp.Extension): of MAIL,
    # and of each accepted RCPT at the index of its recipient.
    mail_extensions: Mapping[str, Any] = field(default_factory=dict)
    rcpt_extensions: list[Mapping[str, Any]] = field(default_factory=list)
    # What optional subsystems found, when they are in use (None otherwise): the milters'
    # verdicts and edits (alephsmtp.milter), SPF/DKIM/DMARC/ARC results (alephsmtp.mailauth).
    milter: MilterReport | None = None
    auth_results: Any = None
    _content: bytes | MessageSpool | None = field(default=None, init=False, repr=False)

    @property
    def message(self) -> bytes | None:
        """The whole message, once received (``None`` before, or when it was streamed)."""
        content = self._content
        if isinstance(content, MessageSpool):
            return content.getvalue()
        return content

    @message.setter
    def message(self, value: bytes | None) -> None:
        self._content = value

    @property
    def message_size(self) -> int:
        """The message's size in bytes, without reading it (0 before it was received)."""
        content = self._content
        if isinstance(content, MessageSpool):
            return content.size
        return len(content) if content is not None else 0

    def open_message(self) -> BinaryIO:
        """The message as a binary file (readable, seekable), without loading it whole."""
        content = self._content
        if isinstance(content, MessageSpool):
            return content.open()
        return io.BytesIO(content or b"")

    def set_content(self, content: bytes | MessageSpool | None) -> None:
        """Set the message: bytes, or the spool it is arriving in (the session's)."""
        self._content = content

    @property
    def mail_from(self) -> Address | None:
        """The reverse-path (``MAIL FROM``), the name other libraries use."""
        return self.return_path

    @property
    def rcpt_tos(self) -> list[Address]:
        """The forward-paths (``RCPT TO``), the name other libraries use."""
        return self.recipients
