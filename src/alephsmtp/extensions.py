"""What each ESMTP extension adds, without I/O: EHLO keywords and MAIL/RCPT parameters.

The session asks here which keywords to advertise for what is on now (TLS active, AUTH
offered) and whether a MAIL or RCPT command's parameters are ones it serves, before any
handler runs: ``555 5.5.4`` for a parameter of an extension that is off or unknown (RFC 5321
4.1.1.11), ``501 5.5.4`` for a bad value, ``552 5.3.4`` for a declared size over the limit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import replies as R
from .commands import XCLIENT_ATTRIBUTES, XFORWARD_ATTRIBUTES, MailCommand, RcptCommand

if TYPE_CHECKING:
    from .config import SessionConfig
from .replies import Reply

__all__ = [
    "R_TOO_BIG",
    "Extension",
    "check_mail_parameters",
    "check_rcpt_parameters",
    "ehlo_keywords",
]

R_TOO_BIG = R.TOO_BIG  # the name other modules import
_NOTIFY_KEYWORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_MAX_ENVID = 100  # RFC 3461 4.4
_MAX_ORCPT = 500  # RFC 3461 4.2


@dataclass(frozen=True)
class Extension:
    """An ESMTP extension of your own: its EHLO keyword and the MAIL/RCPT parameters it
    allows (RFC 5321 4.1.1.1, 4.1.1.11).

    ``Extension("XPRIORITY", "1-9", mail_parameters={"XPRIORITY": int})`` lists
    ``XPRIORITY 1-9`` in EHLO and takes ``MAIL FROM:<...> XPRIORITY=5``: each parameter's
    converter gets the value (``None`` for a parameter without ``=``) and returns the typed
    value handlers see in ``e.command.extensions["XPRIORITY"]`` (and
    ``e.envelope.mail_extensions``, or ``rcpt_extensions`` per recipient); a converter that
    raises ``ValueError`` or ``TypeError`` makes the command ``501 5.5.4`` before any
    handler runs. A parameter no extension names stays ``555 5.5.4``.
    """

    keyword: str
    text: str = ""  # what follows the keyword on its EHLO line
    mail_parameters: Mapping[str, Callable[[str | None], Any]] = field(default_factory=dict)
    rcpt_parameters: Mapping[str, Callable[[str | None], Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # RFC 5321 4.1.1.1: ehlo-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-").
        for name in (self.keyword, *self.mail_parameters, *self.rcpt_parameters):
            if not _KEYWORD.match(name):
                raise ValueError(f"not an ESMTP keyword: {name!r}")
        if any(c in self.text for c in "\r\n"):
            raise ValueError("an EHLO line's text has no CR or LF")
        object.__setattr__(self, "keyword", self.keyword.upper())
        object.__setattr__(
            self, "mail_parameters", {k.upper(): v for k, v in self.mail_parameters.items()}
        )
        object.__setattr__(
            self, "rcpt_parameters", {k.upper(): v for k, v in self.rcpt_parameters.items()}
        )

    @property
    def ehlo_line(self) -> str:
        return f"{self.keyword} {self.text}" if self.text else self.keyword


_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*\Z")


def _custom(
    command: MailCommand | RcptCommand,
    config: SessionConfig,
    key: str,
    value: str | None,
    rcpt: bool,
) -> Reply | None:
    """A parameter of a registered extension: its typed value kept on the command."""
    for extension in config.esmtp_extensions:
        converters = extension.rcpt_parameters if rcpt else extension.mail_parameters
        convert = converters.get(key)
        if convert is None:
            continue
        try:
            typed = convert(value)
        except (ValueError, TypeError):
            return R.bad_parameter(key)
        # The command is frozen: its mapping of typed values is replaced, one key more.
        object.__setattr__(command, "extensions", {**command.extensions, key: typed})
        return None
    return R.PARAMETER_UNKNOWN


def ehlo_keywords(
    config: SessionConfig,
    *,
    starttls: bool,
    auth: Sequence[str] | bool,
    xclient: bool = False,
    xforward: bool = False,
) -> list[str]:
    """The EHLO keywords for what this session serves now (RFC 5321 4.1.1.1); ``auth`` is
    the SASL mechanisms offered (``True``: those configured; empty or false: none);
    ``xclient`` and ``xforward``: the client may send them (Postfix lists the attributes)."""
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
    if xclient:
        keywords.append("XCLIENT " + " ".join(XCLIENT_ATTRIBUTES))
    if xforward:
        keywords.append("XFORWARD " + " ".join(XFORWARD_ATTRIBUTES))
    keywords.extend(extension.ehlo_line for extension in config.esmtp_extensions)
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
            refusal = _custom(command, config, key, value, rcpt=False)
            if refusal is not None:
                return refusal
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
            refusal = _custom(command, config, key, value, rcpt=True)
            if refusal is not None:
                return refusal
    return None


def _printable(text: str) -> bool:
    """Printable US-ASCII (RFC 3461 4): space to tilde."""
    return all(" " <= char <= "~" for char in text)
