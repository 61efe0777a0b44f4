"""SMTP replies: one type, one writer, and every fixed reply by name.

A reply is a three-digit code, an optional RFC 3463 enhanced status code and one or more text lines.
[`Reply.to_bytes()`][alephsmtp.replies.Reply.to_bytes] is the only place reply bytes are produced,
so no text can ever smuggle a second reply (RFC 5321 4.2: a reply line ends at CRLF; text lines with
CR or LF are split into a proper multi-line reply, never written raw).

The replies the library sends on its own are the constants below, by name; nowhere else does the
library spell a fixed reply. [`WireReplies`][alephsmtp.replies.WireReplies] renders all of them once
per configuration (enhanced status codes on or off), so a session writes a fixed reply by reading an
attribute: no rendering, no hashing.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .errors import SmtpError

__all__ = [
    "NAMES",
    "Reply",
    "ReplyLike",
    "WireReplies",
    "bad_parameter",
    "challenge",
    "chunk_received",
    "coerce_reply",
    "default_enhanced_code",
    "from_error",
]

_CODE_LINE = re.compile(r"([2-5][0-9][0-9])(?:([ -])(.*))?\Z", re.S)
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\Z")


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: ``Reply(250, "2.1.0", "Sender OK")``.

    ``enhanced`` is ``None`` for "add the right one" (RFC 3463, by command and code, while
    ENHANCEDSTATUSCODES is on) and ``""`` for "none" (3xx replies never carry one, RFC 2034).
    ``text`` may hold several lines, as a sequence or separated by newlines; each becomes one
    line of a multi-line reply (RFC 5321 4.2.1).
    """

    code: int
    enhanced: str | None = None
    text: str | Sequence[str] = ""
    # The reply as written, once rendered (enhanced codes on, off): a reply is immutable.
    _wire: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _wire_plain: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code!r}")
        if self.enhanced:
            match = _ENHANCED.match(self.enhanced)
            if match is None or match.group(1) != str(self.code)[0]:
                raise ValueError(
                    f"enhanced status code {self.enhanced!r} does not fit reply code {self.code}"
                )

    @property
    def lines(self) -> tuple[str, ...]:
        """The text lines, split at any CR or LF (so none can start a reply of its own)."""
        parts = [self.text] if isinstance(self.text, str) else list(self.text)
        lines = [line for part in parts for line in re.split(r"\r\n|\r|\n", part)]
        return tuple(lines) or ("",)

    @property
    def is_positive(self) -> bool:
        """2xx or 3xx: the command was accepted (or the server waits for more)."""
        return self.code < 400

    def with_enhanced(self, enhanced: str) -> Reply:
        """This reply with ``enhanced`` filled in where it was left to the server."""
        if self.enhanced is not None:
            return self
        return Reply(self.code, enhanced, self.text)

    def wire(self, enhanced_status_codes: bool = True) -> bytes:
        """[`to_bytes()`][alephsmtp.replies.Reply.to_bytes], rendered once per reply and kept."""
        data = self._wire if enhanced_status_codes else self._wire_plain
        if data is None:
            data = self.to_bytes(enhanced_status_codes)
            object.__setattr__(self, "_wire" if enhanced_status_codes else "_wire_plain", data)
        return data

    def to_bytes(self, enhanced_status_codes: bool = True) -> bytes:
        """The reply as written on the wire, every line ending with CRLF."""
        code = str(self.code)
        prefix = ""
        if enhanced_status_codes and self.enhanced and self.code // 100 != 3:
            prefix = self.enhanced + " "
        lines = self.lines
        last = len(lines) - 1
        out = []
        for index, line in enumerate(lines):
            sep = " " if index == last else "-"
            text = f"{code}{sep}{prefix}{line}"
            # RFC 5321 4.2: no SP without text; but RFC 4954 4: "334" SP [base64].
            out.append((text if self.code == 334 else text.rstrip(" ")) + "\r\n")
        return "".join(out).encode("utf-8", "surrogateescape")

    def __str__(self) -> str:
        return self.to_bytes().decode("utf-8", "surrogateescape").rstrip("\r\n")

    @classmethod
    def parse(cls, text: str) -> Reply:
        """A reply written as text, as the seed's callbacks return it: ``"250 ok\\r\\n"``.

        Accepts a trailing CRLF, multi-line replies (``"250-a\\r\\n250 b"``), and an enhanced
        code after the code (``"550 5.1.1 No such user"``). Every line must carry the same code,
        so a callback cannot inject a second reply; ``ValueError`` otherwise.
        """
        raw_lines = re.split(r"\r\n|\r|\n", text.rstrip("\r\n")) if text else []
        if not raw_lines:
            raise ValueError("empty reply")
        code: int | None = None
        texts: list[str] = []
        for index, raw in enumerate(raw_lines):
            match = _CODE_LINE.match(raw)
            if match is None:
                raise ValueError(f"reply line does not start with a reply code: {raw!r}")
            line_code = int(match.group(1))
            if code is not None and line_code != code:
                raise ValueError("reply lines carry different codes")
            code = line_code
            last = index == len(raw_lines) - 1
            if match.group(2) == "-" and last:
                raise ValueError("multi-line reply does not end with a final line")
            if match.group(2) == " " and not last:
                raise ValueError("reply has text after its final line")
            texts.append(match.group(3) or "")
        assert code is not None
        enhanced: str | None = None
        first_word, _, rest = texts[0].partition(" ")
        if _ENHANCED.match(first_word) and first_word[0] == str(code)[0]:
            enhanced = first_word
            # RFC 2034: every line of a multi-line reply repeats the enhanced code.
            texts = [rest] + [
                t[len(first_word) + 1 :] if t.startswith(first_word + " ") else t for t in texts[1:]
            ]
        return cls(code, enhanced, tuple(texts))


ReplyLike = Reply | str | None


# Handlers mostly answer with the same few strings ("250 ok", a session's greeting): each is
# parsed once. Replies are immutable, so one parsed reply serves every session. Bounded in
# entries and in length, so handlers that answer with ever new text cannot grow it.
_PARSED: dict[str, Reply] = {}
_PARSED_MAX_ENTRIES = 1024
_PARSED_MAX_LENGTH = 512


def coerce_reply(value: Reply | str) -> Reply:
    """A callback's answer as a [`Reply`][alephsmtp.replies.Reply] (``ValueError``/``TypeError`` if
    it is not one)."""
    if isinstance(value, Reply):
        return value
    if isinstance(value, str):
        reply = _PARSED.get(value)
        if reply is None:
            reply = Reply.parse(value)
            if len(value) <= _PARSED_MAX_LENGTH and len(_PARSED) < _PARSED_MAX_ENTRIES:
                _PARSED[value] = reply
        return reply
    raise TypeError(f"a reply must be a str or a Reply, not {type(value).__name__}")


# RFC 3463 / RFC 5248: the enhanced code a reply gets when its author gave none. The detail
# depends on what was being answered: addresses (X.1.x) for MAIL and RCPT, the message (X.6.0)
# after DATA, the system otherwise.
_BY_VERB: dict[tuple[str, int], str] = {
    ("MAIL", 2): "2.1.0",
    ("RCPT", 2): "2.1.5",
    ("MAIL", 5): "5.1.0",
    ("RCPT", 5): "5.1.1",
    ("MAIL", 4): "4.1.0",
    ("RCPT", 4): "4.1.1",
    ("DATA", 2): "2.0.0",
    ("DATA", 5): "5.6.0",
    ("DATA", 4): "4.3.0",
    ("VRFY", 2): "2.1.5",
    ("VRFY", 5): "5.1.1",
    ("AUTH", 2): "2.7.0",
    ("AUTH", 5): "5.7.8",
    ("AUTH", 4): "4.7.0",
}


def default_enhanced_code(verb: str, code: int) -> str:
    """The RFC 3463 enhanced code for a reply ``code`` to ``verb``, where the author gave none.

    ``verb`` is the command answered (``"DATA"`` also for the reply after the end of data,
    ``"BDAT"`` likewise); 3xx replies get none (RFC 2034 section 4).
    """
    klass = code // 100
    if klass == 3:
        return ""
    if verb == "BDAT":
        verb = "DATA"
    if code == 552:
        return "5.3.4" if verb == "DATA" else "5.2.2"
    if code == 452 and verb == "RCPT":
        return "4.5.3"
    if code == 421:
        return "4.3.0"
    if code == 503:
        return "5.5.1"
    if code == 500:
        return "5.5.2"
    if code == 501:
        return "5.5.4"
    if code == 502:
        return "5.5.1"
    if code == 504:
        return "5.5.4"
    if code == 530:
        return "5.7.0"
    if code == 535:
        return "5.7.8"
    return _BY_VERB.get((verb, klass), f"{klass}.0.0")


# --- every fixed reply, by name ----------------------------------------------------------------
# (RFC 5321 4.2.2 for the codes, RFC 3463 / RFC 5248 for the enhanced ones.)

OK = Reply(250, "2.0.0", "OK")
MAIL_OK = Reply(250, "2.1.0", "OK")
RCPT_OK = Reply(250, "2.1.5", "OK")
DATA_GO = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
QUEUED = Reply(250, "2.0.0", "OK: queued")
BYE = Reply(221, "2.0.0", "Bye")
VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
EXPN = Reply(502, "5.5.1", "EXPN not available")
HELP = Reply(214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP")
# Placeholders: their text is the server's hostname (HELO/EHLO), the chunk's size (BDAT).
HELLO_OK = Reply(250, "", "")
CHUNK_OK = Reply(250, "2.0.0", "octets received")

# Order (RFC 5321 4.3.2, RFC 3030 2, RFC 4954 4).
SEQ_HELO_FIRST = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
SEQ_NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
SEQ_NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
SEQ_NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
SEQ_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
SEQ_BDAT_STARTED = Reply(503, "5.5.1", "Error: BDAT in progress")

# Syntax and parameters.
UNKNOWN = Reply(500, "5.5.1", "Error: command not recognized")
BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
PARAMETER_UNKNOWN = Reply(555, "5.5.4", "Error: parameter not recognized or not implemented")
BAD_BODY = Reply(501, "5.5.4", "Error: unsupported BODY type")
BAD_SMTPUTF8 = Reply(501, "5.5.4", "Error: SMTPUTF8 takes no value")
BAD_RET = Reply(501, "5.5.4", "Error: RET must be FULL or HDRS")
BAD_ENVID = Reply(501, "5.5.4", "Error: bad ENVID")
BAD_AUTH_PARAMETER = Reply(501, "5.5.4", "Error: bad AUTH parameter")
BAD_NOTIFY = Reply(501, "5.5.4", "Error: bad NOTIFY parameter")
BAD_ORCPT = Reply(501, "5.5.4", "Error: bad ORCPT parameter")
NOT_LMTP = Reply(500, "5.5.1", "Error: this is an LMTP server; use LHLO")
NOT_SMTP = Reply(500, "5.5.1", "Error: this is an SMTP server; use EHLO")
OUT_OF_SYNC = Reply(554, "5.5.0", "Error: SMTP protocol synchronization")
BINARYMIME_DATA = Reply(503, "5.5.1", "Error: BODY=BINARYMIME needs BDAT, not DATA")

# Limits.
TOO_BIG = Reply(552, "5.3.4", "Error: message size exceeds fixed maximum message size")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Error: too many recipients")
DATA_BARE = Reply(554, "5.5.2", "Error: message contains bare <CR> or <LF>")
DATA_LINE = Reply(500, "5.5.6", "Error: message line too long")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Error: too many authentication failures")
TOO_MANY_COMMANDS = Reply(421, "4.7.0", "Error: too many commands in this session")
TOO_MANY_TRANSACTIONS = Reply(421, "4.7.0", "Error: too many transactions in this session")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address")
TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")
SLOW = Reply(421, "4.4.2", "Error: data rate too low")

# Faults on our side: temporary, never a bounce (RFC 5321 4.2.1).
HANDLER_FAILED = Reply(451, "4.3.0", "Error: local error in processing")
MESSAGE_HANDLER_FAILED = Reply(451, "4.3.0", "Error: message could not be processed now")
HANDLER_TIMEOUT = Reply(451, "4.3.0", "Error: timeout while processing, try again later")
AUTH_HANDLER_FAILED = Reply(454, "4.7.0", "Temporary authentication failure")
STORAGE_FAILED = Reply(452, "4.3.1", "Error: insufficient system storage")
SHUTDOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
UNAVAILABLE = Reply(421, "4.3.0", "Service not available, closing connection")
# Not a reply to send: a handler's 421 was sent, and the session closes after it (RFC 5321
# 3.8) without another word.
ALREADY_SAID = Reply(421, "4.3.0", "(already said)")

# XCLIENT / XFORWARD (Postfix's XCLIENT_README, XFORWARD_README).
NOT_AUTHORIZED = Reply(550, "5.7.0", "Error: insufficient authorization")
XFORWARD_OK = Reply(250, "2.0.0", "Ok")

# STARTTLS (RFC 3207) and AUTH (RFC 4954).
TLS_GO = Reply(220, "2.0.0", "Ready to start TLS")
TLS_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
AUTH_ENCRYPTION = Reply(538, "5.7.11", "Encryption required for requested authentication")
AUTH_TWICE = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_LINE = Reply(500, "5.5.6", "Authentication exchange line is too long")


# The ready-made handlers (alephsmtp.handlers): storing and relaying. Local trouble is
# temporary (RFC 5321 4.2.1): the client keeps the message and retries.
MAILBOX_BUSY = Reply(451, "4.2.0", "Mailbox busy, try again later")
STORAGE_FULL = Reply(452, "4.3.1", "Insufficient system storage")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing")
UPSTREAM_UNREACHABLE = Reply(451, "4.4.1", "Upstream server unreachable, try again later")
UPSTREAM_LOST = Reply(451, "4.4.2", "Connection to upstream server lost, try again later")
UPSTREAM_SECURITY = Reply(451, "4.7.0", "Upstream server refused TLS or authentication")
UPSTREAM_CERTIFICATE = Reply(
    451, "4.7.0", "Upstream server's TLS certificate could not be verified, try again later"
)
UPSTREAM_NO_UTF8 = Reply(553, "5.6.7", "Upstream server does not support SMTPUTF8")
RELAY_BINARYMIME = Reply(554, "5.6.3", "Conversion required: cannot relay a BINARYMIME message")
RELAY_STREAMED = Reply(451, "4.3.0", "Local error in processing")

# Milters (alephsmtp.milter): Postfix's words for a milter's verdicts and for a milter that
# cannot be reached.
MILTER_REJECT = Reply(550, "5.7.1", "Command rejected")
MILTER_TEMPFAIL = Reply(451, "4.7.1", "Service unavailable - try again later")
MILTER_SHUTDOWN = Reply(421, "4.7.0", "Server closing connection")
MILTER_DISCARDED = Reply(250, "2.0.0", "OK: queued")
# A milter that failed, by milter_default_action (Postfix's milter8.c words).
MILTER_UNAVAILABLE = Reply(451, "4.7.1", "Service unavailable - try again later")
MILTER_UNAVAILABLE_REJECT = Reply(550, "5.5.0", "Service unavailable")
MILTER_NUL_IN_HEADER = Reply(554, "5.6.0", "Message content rejected: NUL in a header field")
MILTER_STREAMED_BODY = Reply(451, "4.3.5", "Server configuration problem - try again later")

# Sender authentication (alephsmtp.mailauth): a DNS failure is never a bounce.
MAILAUTH_TEMPFAIL = Reply(451, "4.7.5", "Sender authentication temporarily failed, try again later")
MAILAUTH_LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing")

# DKIM signing (alephsmtp.mailauth.DkimSigner).
SIGN_FAILED = Reply(451, "4.3.0", "Local error in processing")


def from_error(error: SmtpError) -> Reply:
    """The reply an error carries (its code, enhanced code and text)."""
    return Reply(error.code, error.enhanced, error.text)


def chunk_received(size: int) -> Reply:
    """The reply to a BDAT chunk that is not the last (RFC 3030 4.2)."""
    return Reply(250, "2.0.0", f"{size} octets received")


def bad_parameter(keyword: str) -> Reply:
    """A parameter of a registered extension whose value its converter refused."""
    return Reply(501, "5.5.4", f"Error: bad {keyword} parameter")


def challenge(data: bytes) -> Reply:
    """A SASL challenge (RFC 4954 4): ``334`` and ``data`` in base64, no enhanced code."""
    return Reply(334, "", base64.b64encode(data).decode("ascii"))


#: The names of every fixed reply above.
NAMES: tuple[str, ...] = tuple(
    name for name, value in list(globals().items()) if isinstance(value, Reply) and name.isupper()
)


class WireReplies:
    """Every fixed reply as written on the wire for one configuration: ``wire.MAIL_OK`` is
    ``b"250 2.1.0 OK\\r\\n"`` (or ``b"250 OK\\r\\n"`` without enhanced status codes).

    Made once per server (per configuration); a session writes a fixed reply with one
    attribute read.
    """

    __slots__ = NAMES

    # One attribute per name in NAMES (a test holds them equal), typed for the checkers.
    OK: bytes
    MAIL_OK: bytes
    RCPT_OK: bytes
    DATA_GO: bytes
    QUEUED: bytes
    BYE: bytes
    VRFY: bytes
    EXPN: bytes
    HELP: bytes
    HELLO_OK: bytes
    CHUNK_OK: bytes
    SEQ_HELO_FIRST: bytes
    SEQ_NESTED_MAIL: bytes
    SEQ_NEED_MAIL: bytes
    SEQ_NEED_RCPT: bytes
    SEQ_IN_TRANSACTION: bytes
    SEQ_BDAT_STARTED: bytes
    UNKNOWN: bytes
    BAD_SYNTAX: bytes
    NOT_IMPLEMENTED: bytes
    LINE_TOO_LONG: bytes
    PARAMETER_UNKNOWN: bytes
    BAD_BODY: bytes
    BAD_SMTPUTF8: bytes
    BAD_RET: bytes
    BAD_ENVID: bytes
    BAD_AUTH_PARAMETER: bytes
    BAD_NOTIFY: bytes
    BAD_ORCPT: bytes
    NOT_LMTP: bytes
    NOT_SMTP: bytes
    OUT_OF_SYNC: bytes
    BINARYMIME_DATA: bytes
    TOO_BIG: bytes
    TOO_MANY_RCPTS: bytes
    DATA_BARE: bytes
    DATA_LINE: bytes
    TOO_MANY_ERRORS: bytes
    TOO_MANY_AUTH_FAILURES: bytes
    TOO_MANY_COMMANDS: bytes
    TOO_MANY_TRANSACTIONS: bytes
    TOO_MANY_CONNECTIONS: bytes
    TOO_MANY_FROM_IP: bytes
    TIMEOUT: bytes
    SLOW: bytes
    HANDLER_FAILED: bytes
    MESSAGE_HANDLER_FAILED: bytes
    HANDLER_TIMEOUT: bytes
    AUTH_HANDLER_FAILED: bytes
    STORAGE_FAILED: bytes
    SHUTDOWN: bytes
    UNAVAILABLE: bytes
    ALREADY_SAID: bytes
    TLS_GO: bytes
    TLS_ACTIVE: bytes
    TLS_REQUIRED: bytes
    AUTH_OK: bytes
    AUTH_FAILED: bytes
    AUTH_NOT_ENABLED: bytes
    AUTH_ENCRYPTION: bytes
    AUTH_TWICE: bytes
    AUTH_MECHANISM: bytes
    AUTH_REQUIRED: bytes
    AUTH_LINE: bytes

    def __init__(self, enhanced_status_codes: bool = True) -> None:
        for name in NAMES:
            setattr(self, name, globals()[name].to_bytes(enhanced_status_codes))
