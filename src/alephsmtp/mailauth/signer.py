"""DKIM signing (RFC 6376 5) and ARC sealing (RFC 8617 5.1) of messages this server sends on.

[`DkimSigner`][alephsmtp.mailauth.signer.DkimSigner] signs with dkimpy. Use it as a
``message_received`` handler placed before [`Relay`][alephsmtp.handlers.Relay]: it prepends
the signature to ``e.message`` and passes (returns ``None``), so the relay sends the signed
message::

    signer = DkimSigner("example.org", "mail", "/etc/dkim/mail.private")
    session.message_received += signer
    session.message_received += Relay("smarthost.example.org")

or call [`DkimSigner.sign()`][alephsmtp.mailauth.signer.DkimSigner.sign] on the bytes yourself. With
``arc_seal=True`` it also adds an ARC set (RFC 8617) built from this server's own
``Authentication-Results`` (the [`MailAuth`][alephsmtp.mailauth.handler.MailAuth] header with the
same authserv-id), for forwarding.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import dkim

from alephsmtp import replies as R
from alephsmtp.events import MessageReceivedEventArgs
from alephsmtp.replies import Reply

from .dmarc_check import from_domain
from .verifier import MalformedHeader, parse_headers

__all__ = ["DEFAULT_SIGNED_HEADERS", "DkimSigner"]

log = logging.getLogger("alephsmtp.mailauth")

#: RFC 6376 5.4.1's recommended fields (From is required). Each is signed as often as it
#: occurs; a field listed but absent is signed as absent, so nobody can add it later.
DEFAULT_SIGNED_HEADERS = (
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Resent-Date",
    "Resent-From",
    "Resent-To",
    "Resent-Cc",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
)


class DkimSigner:
    """Signs messages for ``domain`` with the key ``private_key`` under ``selector``.

    ``private_key`` is a PEM private key (bytes) or a path to one (as ``opendkim-genkey``
    writes it). ``headers`` are the fields to sign; ``canonicalization`` is
    ``(header, body)``, relaxed/relaxed by default (robust to the whitespace changes relays
    make). ``sign_all=False`` (the default) signs only messages whose ``From:`` domain is
    ``domain`` or one of its subdomains — the mail this key speaks for, the way opendkim's
    ``Domain`` setting works; ``sign_all=True`` signs everything. ``arc_seal=True`` adds an
    ARC set with ``authserv_id`` (default: the session's hostname).
    """

    def __init__(
        self,
        domain: str,
        selector: str,
        private_key: bytes | str | os.PathLike[str],
        *,
        headers: Sequence[str] = DEFAULT_SIGNED_HEADERS,
        canonicalization: tuple[str, str] = ("relaxed", "relaxed"),
        sign_all: bool = False,
        arc_seal: bool = False,
        authserv_id: str | None = None,
    ) -> None:
        if isinstance(private_key, bytes):
            key = private_key
        else:
            with open(private_key, "rb") as file:
                key = file.read()
        if b"PRIVATE KEY" not in key:
            raise ValueError("private_key must be a PEM private key or the path of one")
        self.domain = domain.rstrip(".").lower()
        self.selector = selector
        self._key = key
        self.headers = tuple(headers)
        if not any(name.lower() == "from" for name in self.headers):
            raise ValueError("From must be signed (RFC 6376 5.4)")
        for algorithm in canonicalization:
            if algorithm not in ("simple", "relaxed"):
                raise ValueError(f"unknown canonicalization {algorithm!r}")
        self.canonicalization = canonicalization
        self.sign_all = sign_all
        self.arc_seal = arc_seal
        self.authserv_id = authserv_id
        # Fail now, not on the first message, when the key cannot sign.
        self.sign(b"From: check@" + self.domain.encode() + b"\r\n\r\n", force=True)

    def __repr__(self) -> str:
        return f"<DkimSigner d={self.domain} s={self.selector}>"

    def covers(self, message: bytes) -> bool:
        """Whether this signer speaks for the message's From domain."""
        if self.sign_all:
            return True
        head = message.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        try:
            fields = parse_headers(head)
        except MalformedHeader:
            return False
        values = [value for name, value in fields if name.lower() == b"from"]
        domain, _ = from_domain(values)
        return domain is not None and (domain == self.domain or domain.endswith("." + self.domain))

    def sign(self, message: bytes, *, force: bool = False, authserv_id: str | None = None) -> bytes:
        """The header fields to prepend to ``message``: the ARC set (when sealing) and the
        ``DKIM-Signature``, CRLF-terminated; ``b""`` when the From domain is not covered."""
        if not force and not self.covers(message):
            return b""
        added = b""
        if self.arc_seal and not force:
            server = (authserv_id or self.authserv_id or "").encode()
            arc_set = dkim.arc_sign(
                message,
                self.selector.encode(),
                self.domain.encode(),
                self._key,
                server,
                include_headers=[name.encode() for name in self.headers],
            )
            # Prepended as dkimpy returns them (ARC-Seal on top); order within a set does
            # not matter to verifiers (RFC 8617 4.2.1 goes by i=).
            added = b"".join(arc_set)
        signature = dkim.sign(
            added + message,
            self.selector.encode(),
            self.domain.encode(),
            self._key,
            canonicalize=tuple(name.encode() for name in self.canonicalization),
            include_headers=[name.encode() for name in self.headers],
        )
        return bytes(signature) + added

    def __call__(self, session: Any, e: MessageReceivedEventArgs) -> Reply | None:
        if e.streamed:
            log.error("DkimSigner needs the whole message; streamed messages are not signed")
            return R.SIGN_FAILED
        authserv_id = self.authserv_id or getattr(
            getattr(session, "config", None), "hostname", None
        )
        try:
            fields = self.sign(e.message, authserv_id=authserv_id)
        except dkim.DKIMException:
            log.exception("DKIM signing failed")
            return R.SIGN_FAILED
        if fields:
            e.message = fields + e.message
        return None
