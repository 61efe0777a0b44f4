"""What the aiosmtpd layer needs besides the classes users see: reply strings taken verbatim,
TLS details in aiosmtpd's shape, and MAIL/RCPT parameters as aiosmtpd lists them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from alephsmtp.replies import Reply

__all__ = ["ssl_details", "verbatim_reply", "word_options"]

# A reply line: the code, "-" (more lines follow) or " " (the last), the text (RFC 5321 4.2).
_LINE = re.compile(r"([2-5][0-9][0-9])([ -]?)(.*)\Z", re.S)
_BREAK = re.compile(r"\r\n|\r|\n")
_VERBATIM: dict[str | bytes, Reply] = {}
_VERBATIM_MAX_ENTRIES = 1024
_VERBATIM_MAX_LENGTH = 512


def verbatim_reply(status: str | bytes) -> Reply:
    """The reply an aiosmtpd hook returned (``"250 OK"``, ``"550 5.1.1 No such user"``), as a
    [`Reply`][alephsmtp.replies.Reply] that is written exactly as given: the enhanced code, if the
    author wrote one, stays part of the text and none is added.

    Each line must start with the same code, and only the last may be a final line (RFC 5321
    4.2.1), so a hook cannot smuggle a second reply; ``ValueError`` otherwise. A last line
    written as a continuation (``"250-..."``) is taken as the final one: sent as it stands,
    the client would wait forever for the rest.
    """
    reply = _VERBATIM.get(status)
    if reply is not None:
        return reply
    text = status.decode("utf-8", "surrogateescape") if isinstance(status, bytes) else status
    if not isinstance(text, str):
        raise TypeError(f"a reply must be a str, not {type(status).__name__}")
    lines = _BREAK.split(text[:-2] if text.endswith("\r\n") else text.rstrip("\r\n"))
    code = ""
    texts: list[str] = []
    last = len(lines) - 1
    for index, line in enumerate(lines):
        match = _LINE.match(line)
        if match is None:
            raise ValueError(f"reply line does not start with a reply code: {line!r}")
        if code and match.group(1) != code:
            raise ValueError("reply lines carry different codes")
        code = match.group(1)
        if index != last and match.group(2) != "-":
            raise ValueError("reply has text after its final line")
        texts.append(match.group(3))
    # enhanced="": the text is sent as written, whatever the session's ENHANCEDSTATUSCODES.
    reply = Reply(int(code), "", texts[0] if len(texts) == 1 else tuple(texts))
    if len(text) <= _VERBATIM_MAX_LENGTH and len(_VERBATIM) < _VERBATIM_MAX_ENTRIES:
        _VERBATIM[status] = reply
    return reply


# The keys of the dictionary aiosmtpd keeps as ``session.ssl`` (asyncio's SSL transport
# extras); every one is also a ``get_extra_info`` name.
_SSL_EXTRA = ("sslcontext", "ssl_object", "peercert", "cipher", "compression")


def ssl_details(transport: Any) -> dict[str, Any]:
    """``session.ssl``: the TLS transport's extra information, by aiosmtpd's keys."""
    return {key: transport.get_extra_info(key) for key in _SSL_EXTRA}


def word_options(parameters: Mapping[str, str | None]) -> list[str]:
    """MAIL/RCPT parameters as aiosmtpd hands them to hooks: ``["SIZE=1000", "SMTPUTF8"]``,
    uppercased as aiosmtpd does (keyword and value)."""
    return [
        (key if value is None else f"{key}={value}").upper() for key, value in parameters.items()
    ]
