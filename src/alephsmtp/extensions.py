"""What each ESMTP extension adds, without I/O: EHLO keywords and MAIL/RCPT parameters.

The session asks here which keywords to advertise for what is on now (TLS active, AUTH
offered) and whether a MAIL or RCPT command's parameters are ones it serves, before any
handler runs: ``555 5.5.4`` for a parameter of an extension that is off or unknown (RFC 5321
4.1.1.11), ``501 5.5.4`` for a bad value, ``552 5.3.4`` for a declared size over the limit.
"""

from __future__ import annotations

from .addresses import ParameterError, decode_xtext
from .commands import MailCommand, RcptCommand
from .config import SessionConfig
from .replies import Reply

__all__ = ["check_mail_parameters", "check_rcpt_parameters", "ehlo_keywords"]

R_TOO_BIG = Reply(552, "5.3.4", "Error: message size exceeds fixed maximum message size")
_UNKNOWN = Reply(555, "5.5.4", "Error: parameter not recognized or not implemented")
_NOTIFY_KEYWORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_MAX_ENVID = 100  # RFC 3461 4.4
_MAX_ORCPT = 500  # RFC 3461 4.2


def _bad(text: str) -> Reply:
    return Reply(501, "5.5.4", text)


def ehlo_keywords(config: SessionConfig, *, starttls: bool, auth: bool) -> list[str]:
    """The EHLO keywords for what this session serves now (RFC 5321 4.1.1.1)."""
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
        keywords.append("AUTH " + " ".join(config.auth_mechanisms))
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
    """``None`` if every MAIL parameter is served and well formed, else the refusal."""
    for key, value in command.parameters.items():
        if key == "SIZE":
            # RFC 1870 6.1: a declared size over the limit is refused at MAIL.
            size = command.size
            if size is not None and config.max_message_size and size > config.max_message_size:
                return R_TOO_BIG
        elif key == "BODY" and config.eightbitmime:
            if command.body not in body_types(config):
                return _bad("Error: unsupported BODY type")
        elif key == "SMTPUTF8" and config.smtputf8:
            if value is not None:
                return _bad("Error: SMTPUTF8 takes no value")
        elif key == "RET" and config.dsn:
            if command.ret not in ("FULL", "HDRS"):
                return _bad("Error: RET must be FULL or HDRS")
        elif key == "ENVID" and config.dsn:
            # RFC 3461 4.4: xtext whose decoded value is printable US-ASCII (no CR LF).
            if value is None or len(value) > _MAX_ENVID or not _is_printable_xtext(value):
                return _bad("Error: bad ENVID")
        elif key == "AUTH" and auth:
            if value is None or (value != "<>" and not _is_xtext(value)):
                return _bad("Error: bad AUTH parameter")
        else:
            return _UNKNOWN
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
                return _bad("Error: bad NOTIFY parameter")
        elif key == "ORCPT" and config.dsn:
            # RFC 3461 4.2: addr-type ";" xtext.
            if value is None or len(value) > _MAX_ORCPT:
                return _bad("Error: bad ORCPT parameter")
            address_type, semicolon, address = value.partition(";")
            if not semicolon or not address_type or not address:
                return _bad("Error: bad ORCPT parameter")
            if not _is_printable_xtext(address, utf8=address_type.lower() == "utf-8"):
                return _bad("Error: bad ORCPT parameter")
            if not all(c.isascii() and (c.isalnum() or c == "-") for c in address_type):
                return _bad("Error: bad ORCPT parameter")
        else:
            return _UNKNOWN
    return None


def _is_printable_xtext(value: str, *, utf8: bool = False) -> bool:
    """xtext whose decoded text is printable US-ASCII (RFC 3461 4); with ``utf8`` (an ORCPT
    of type utf-8, RFC 6533) non-ASCII characters too, but still no control characters."""
    try:
        text = decode_xtext(value)
    except ParameterError:
        return False
    if utf8:
        return text.isprintable()
    return all(" " <= char <= "~" for char in text)


def _is_xtext(value: str) -> bool:
    try:
        decode_xtext(value)
    except ParameterError:
        return False
    return True
