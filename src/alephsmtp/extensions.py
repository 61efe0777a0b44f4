"""What each ESMTP extension adds, without I/O: EHLO keywords and MAIL/RCPT parameters.

The session asks here which keywords to advertise for what is on now (TLS active, AUTH
offered) and whether a MAIL or RCPT command's parameters are ones it serves, before any
handler runs: ``555 5.5.4`` for a parameter of an extension that is off or unknown (RFC 5321
4.1.1.11), ``501 5.5.4`` for a bad value, ``552 5.3.4`` for a declared size over the limit.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import replies as R
from .commands import MailCommand, RcptCommand
from .config import SessionConfig
from .replies import Reply

__all__ = ["R_TOO_BIG", "check_mail_parameters", "check_rcpt_parameters", "ehlo_keywords"]

R_TOO_BIG = R.TOO_BIG  # the name other modules import
_NOTIFY_KEYWORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_MAX_ENVID = 100  # RFC 3461 4.4
_MAX_ORCPT = 500  # RFC 3461 4.2


def ehlo_keywords(
    config: SessionConfig, *, starttls: bool, auth: Sequence[str] | bool
) -> list[str]:
    """The EHLO keywords for what this session serves now (RFC 5321 4.1.1.1); ``auth`` is
    the SASL mechanisms offered (``True``: those configured; empty or false: none)."""
    keywords = []
    if config.pipelining:
        keywords.append("PIPELINING")
    keywords.append(f"SIZE {config.max_message_size}" if config.max_message_size else "SIZE")
    if config.eightbitmime:
        keywords.append("8BITMIME")
    if config.chunking:
        keywords.append("CHUNKING")
        if config.binarymime:
            keywords.append("BINARYMIME")
    if config.smtputf8:
        keywords.append("SMTPUTF8")
    if config.dsn:
        keywords.append("DSN")
    if starttls:
        keywords.append("STARTTLS")
    if auth:
        mechanisms = config.auth_mechanisms if auth is True else auth
        keywords.append("AUTH " + " ".join(mechanisms))
    if config.enhanced_status_codes:
        keywords.append("ENHANCEDSTATUSCODES")
    keywords.append("HELP")
    return keywords


def body_types(config: SessionConfig) -> frozenset[str]:
    """The ``BODY=`` values served (RFC 6152, RFC 3030 3)."""
    types = {"7BIT", "8BITMIME"}
    if config.chunking and config.binarymime:
        types.add("BINARYMIME")
    return frozenset(types)


def check_mail_parameters(
    command: MailCommand, config: SessionConfig, *, auth: bool
) -> Reply | None:
    """``None`` if every MAIL parameter is served and well formed, else the refusal.

    Reads the fields the command decoded when it was made; nothing is decoded again.
    """
    malformed = command.malformed
    for key, value in command.parameters.items():
        if key == "SIZE":
            # RFC 1870 6.1: a declared size over the limit is refused at MAIL.
            size = command.size
            if size is not None and config.max_message_size and size > config.max_message_size:
                return R.TOO_BIG
        elif key == "BODY" and config.eightbitmime:
            if command.body not in body_types(config):
                return R.BAD_BODY
        elif key == "SMTPUTF8" and config.smtputf8:
            if value is not None:
                return R.BAD_SMTPUTF8
        elif key == "RET" and config.dsn:
            if command.ret not in ("FULL", "HDRS"):
                return R.BAD_RET
        elif key == "ENVID" and config.dsn:
            # RFC 3461 4.4: xtext whose decoded value is printable US-ASCII (no CR LF).
            envid = command.envid
            if value is None or len(value) > _MAX_ENVID or envid is None or not _printable(envid):
                return R.BAD_ENVID
        elif key == "AUTH" and auth:
            if value is None or "AUTH" in malformed:
                return R.BAD_AUTH_PARAMETER
        else:
            return R.PARAMETER_UNKNOWN
    return None


def check_rcpt_parameters(command: RcptCommand, config: SessionConfig) -> Reply | None:
    """``None`` if every RCPT parameter is served and well formed, else the refusal."""
    for key, value in command.parameters.items():
        if key == "NOTIFY" and config.dsn:
            # RFC 3461 4.1: NEVER alone, or a list of SUCCESS, FAILURE, DELAY.
            notify = command.notify
            if (
                value is None
                or notify is None
                or len(set(notify)) != len(notify)
                or (notify != ("NEVER",) and not set(notify) <= _NOTIFY_KEYWORDS)
            ):
                return R.BAD_NOTIFY
        elif key == "ORCPT" and config.dsn:
            # RFC 3461 4.2: addr-type ";" xtext, decoded printable US-ASCII (RFC 6533: a
            # utf-8 address type allows UTF-8, but still no control characters).
            orcpt = command.orcpt
            if value is None or len(value) > _MAX_ORCPT or orcpt is None:
                return R.BAD_ORCPT
            address_type, address = orcpt
            if not address_type or not address or ";" not in value:
                return R.BAD_ORCPT
            if not all(c.isascii() and (c.isalnum() or c == "-") for c in address_type):
                return R.BAD_ORCPT
            utf8 = address_type.lower() == "utf-8"
            if not (address.isprintable() if utf8 else _printable(address)):
                return R.BAD_ORCPT
        else:
            return R.PARAMETER_UNKNOWN
    return None


def _printable(text: str) -> bool:
    """Printable US-ASCII (RFC 3461 4): space to tilde."""
    return all(" " <= char <= "~" for char in text)
