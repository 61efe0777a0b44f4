"""Errors that the parsers and the session raise or report, each carrying the reply it earns.

The byte parsers report broken rules as *values* (an instance in their output, or in
``DataReader.error``) rather than raising, so that one bad line never costs the other lines of a
read; the session turns each into its reply. Every error knows its SMTP reply code and its
RFC 3463 enhanced status code.
"""

from __future__ import annotations

__all__ = [
    "BareCarriageReturn",
    "BareLineFeed",
    "CommandSyntaxError",
    "LineTooLong",
    "MessageTooLarge",
    "SmtpError",
]


class SmtpError(Exception):
    """Base class: a problem the client caused, answered with ``code enhanced text``."""

    code: int = 500
    enhanced: str = "5.5.2"
    text: str = "Syntax error"

    def __init__(
        self, text: str | None = None, *, code: int | None = None, enhanced: str | None = None
    ) -> None:
        if text is not None:
            self.text = text
        if code is not None:
            self.code = code
        if enhanced is not None:
            self.enhanced = enhanced
        super().__init__(self.text)

    def __eq__(self, other: object) -> bool:
        # Values, not identities: both parsers must produce *equal* output.
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, SmtpError)
        return (self.code, self.enhanced, self.text) == (other.code, other.enhanced, other.text)

    def __hash__(self) -> int:
        return hash((type(self), self.code, self.enhanced, self.text))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code}, {self.enhanced!r}, {self.text!r})"


class LineTooLong(SmtpError):
    """A command line (RFC 5321 4.5.3.1.4) or text line (4.5.3.1.6) longer than the limit."""

    code = 500
    enhanced = "5.5.2"
    text = "Line too long"


class BareLineFeed(SmtpError):
    """A line ended by LF without CR (RFC 5321 2.3.8); refused to prevent SMTP smuggling."""

    code = 500
    enhanced = "5.5.2"
    text = "Bare <LF> received; lines must end with <CR><LF>"


class BareCarriageReturn(SmtpError):
    """A CR not followed by LF (RFC 5321 2.3.8); refused to prevent SMTP smuggling."""

    code = 500
    enhanced = "5.5.2"
    text = "Bare <CR> received; lines must end with <CR><LF>"


class MessageTooLarge(SmtpError):
    """The message passed the size limit (RFC 1870 section 6.2: 552 5.3.4)."""

    code = 552
    enhanced = "5.3.4"
    text = "Message size exceeds fixed maximum message size"


class CommandSyntaxError(SmtpError):
    """A command whose arguments do not parse (RFC 5321 4.1: 501; 553 or 555 by the command)."""

    code = 501
    enhanced = "5.5.4"
    text = "Syntax error in parameters or arguments"
